//! A synchronous QMP client: one connection, one reader thread, commands matched to replies
//! by `id`, events queued.
//!
//! Threads: the caller's threads send commands (one at a time, under a lock) and wait on a
//! condition variable; a reader thread owned by the client reads every line QEMU sends,
//! puts a reply in the slot of the command that waits for it and an event in the bounded
//! [`EventQueue`]. Any thread may wait for events while another runs commands.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::event_queue::{EventQueue, EVENT_QUEUE_CAPACITY};
use super::lines::{LineError, LineReader};
use super::protocol::{Greeting, ParseError, QmpEvent, QmpMessage, CAPABILITIES_COMMAND};

/// How long QEMU may take to greet a new client. QEMU greets at once from its main loop;
/// 10 s covers a main loop held up by a busy 2-core machine. No greeting by then usually
/// means another client holds QEMU's one QMP connection.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one command may take by default. Most answer in milliseconds, but `stop` (and
/// the switchover) waits for every vhost-user backend to hand back its rings, which strait's
/// backend bounds at 30 s (`GET_VRING_BASE` drains in-flight I/O); 45 s is that plus margin.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(45);
/// How long sending one command may block. A command is under 1 KiB and fits the socket
/// buffer at once; blocking for seconds means QEMU stopped reading its socket.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed send waits for the reader to see the end of the stream. The reader
/// sees it within microseconds of the peer closing; 1 s covers a loaded machine, and is
/// paid only when a send fails on a connection that is still open.
const CLOSE_NOTICE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often to try connecting again while [`QmpConfig::connect_timeout`] runs.
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(10);
/// The longest preview of a malformed line kept in an error.
const PREVIEW_BYTES: usize = 120;

/// Timeouts and bounds of one connection; [`QmpConfig::default`] uses the constants above.
#[derive(Clone, Debug)]
pub struct QmpConfig {
    /// How long to keep trying while the socket is missing or refuses connections; zero
    /// (the default) tries once. For callers that have just started QEMU: QEMU creates its
    /// socket file a moment before it listens on it, and a connection in between is refused.
    pub connect_timeout: Duration,
    /// See [`GREETING_TIMEOUT`].
    pub greeting_timeout: Duration,
    /// Default for [`QmpClient::execute`]; see [`COMMAND_TIMEOUT`].
    pub command_timeout: Duration,
    /// See [`WRITE_TIMEOUT`].
    pub write_timeout: Duration,
    /// See [`EVENT_QUEUE_CAPACITY`].
    pub event_queue_capacity: usize,
}

impl Default for QmpConfig {
    fn default() -> Self {
        QmpConfig {
            connect_timeout: Duration::ZERO,
            greeting_timeout: GREETING_TIMEOUT,
            command_timeout: COMMAND_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            event_queue_capacity: EVENT_QUEUE_CAPACITY,
        }
    }
}

/// Why the reader thread stopped; every later call reports it.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket closed, failed, or sent a line too long or unfinished.
    #[error(transparent)]
    Line(#[from] LineError),
    /// A line that is not a QMP message.
    #[error("malformed message from QEMU: {preview:?}")]
    Malformed {
        /// The start of the line, lossily decoded.
        preview: String,
        /// What is wrong with it.
        #[source]
        source: ParseError,
    },
    /// A reply whose `id` matches no command this client sent.
    #[error("a reply with id {id} that answers no command sent")]
    UnknownId {
        /// The `id` as QEMU sent it.
        id: String,
    },
    /// A reply without `id` while no command waits for one.
    #[error("a reply without id while no command was waiting")]
    UnexpectedReply,
}

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Nothing at the socket path.
    #[error("no QMP socket at {path} (is QEMU running with -qmp unix:PATH,server=on,wait=off?)")]
    SocketMissing {
        /// The socket path.
        path: PathBuf,
        /// The error of `connect`.
        #[source]
        source: io::Error,
    },
    /// The socket exists but the connection failed (nobody listens: QEMU exited?).
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error of `connect`.
        #[source]
        source: io::Error,
    },
    /// Something answered, but not with a QMP greeting.
    #[error("{path} does not speak QMP")]
    NotQmp {
        /// The socket path.
        path: PathBuf,
        /// What came instead.
        #[source]
        source: ReadError,
    },
    /// No greeting in time.
    #[error(
        "no QMP greeting on {path} within {timeout:?} (another client may hold QEMU's one QMP connection)"
    )]
    GreetingTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long it waited.
        timeout: Duration,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command} on {path}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// The socket path.
        path: PathBuf,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No reply in time. The connection stays usable; the late reply is discarded.
    #[error("no reply to {command} from {path} within {timeout:?}")]
    CommandTimeout {
        /// The command.
        command: String,
        /// The socket path.
        path: PathBuf,
        /// How long it waited.
        timeout: Duration,
    },
    /// No matching event in time.
    #[error("no {what} event from {path} within {timeout:?}")]
    EventTimeout {
        /// What was awaited.
        what: String,
        /// The socket path.
        path: PathBuf,
        /// How long it waited.
        timeout: Duration,
    },
    /// The connection is gone (QEMU closed it, or sent something that ended it).
    #[error("the QMP connection to {path} is gone")]
    Disconnected {
        /// The socket path.
        path: PathBuf,
        /// Why the reader stopped.
        #[source]
        source: Arc<ReadError>,
    },
    /// Sending a command failed; the connection is closed, since QEMU may have half of it.
    #[error("cannot send {command} to {path}")]
    Send {
        /// The command.
        command: String,
        /// The socket path.
        path: PathBuf,
        /// The write error.
        #[source]
        source: io::Error,
    },
    /// A reply that does not decode into the expected type.
    #[error("unexpected reply to {command} from {path}")]
    Decode {
        /// The command.
        command: String,
        /// The socket path.
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// Setting up the connection (socket options, the reader thread) failed.
    #[error("cannot set up the QMP connection to {path}: {what}")]
    Setup {
        /// The socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A reply in the slot of the waiting command.
#[derive(Debug)]
enum Reply {
    Return(Value),
    Error { class: String, desc: String },
}

#[derive(Debug)]
struct State {
    /// The id the next command gets; ids below it were sent.
    next_id: u64,
    /// The id of the command waiting for its reply.
    // Invariant: awaiting < next_id; reply is Some only while awaiting is Some.
    awaiting: Option<u64>,
    reply: Option<Reply>,
    events: EventQueue,
    /// Replies that came after their command timed out, discarded.
    stale_reply_count: u64,
    /// Set once, when the reader thread stops.
    closed: Option<Arc<ReadError>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves no half-updated state (every update is a
        // single assignment or push), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_until<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> MutexGuard<'a, State> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.changed
            .wait_timeout(guard, remaining)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }
}

/// A connection to one QEMU's QMP socket, in command mode.
///
/// All methods take `&self`: the client is `Send + Sync`, so one thread can wait for events
/// while another runs commands. Commands are sent one at a time.
#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    greeting: Greeting,
    config: QmpConfig,
    /// Held while one command is sent and answered: one command in flight means a reply's
    /// id is either the awaited one or the stale id of a command that timed out.
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl QmpClient {
    /// Connects with the default timeouts; see [`QmpClient::connect_with`].
    pub fn connect(path: &Path) -> Result<QmpClient, QmpError> {
        Self::connect_with(path, QmpConfig::default())
    }

    /// Connects to the QMP socket at `path`, reads the greeting and leaves capabilities
    /// negotiation mode (`qmp_capabilities`), so the client is ready for commands.
    pub fn connect_with(path: &Path, config: QmpConfig) -> Result<QmpClient, QmpError> {
        let path = path.to_owned();
        let stream = connect_socket(&path, config.connect_timeout)?;
        let setup = |what: &'static str| {
            let path = path.clone();
            move |source| QmpError::Setup { path, what, source }
        };
        stream
            .set_write_timeout(Some(config.write_timeout))
            .map_err(setup("set the write timeout"))?;
        let mut lines = LineReader::new(stream.try_clone().map_err(setup("clone the socket"))?);
        let greeting = read_greeting(&mut lines, &path, config.greeting_timeout)?;
        lines
            .clear_timeout()
            .map_err(setup("clear the read timeout"))?;
        debug!(path = %path.display(), version = ?greeting.version.qemu, "QMP greeting");

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_id: 0,
                awaiting: None,
                reply: None,
                // A queue that holds nothing could not hand over even one event.
                events: EventQueue::new(config.event_queue_capacity.max(1)),
                stale_reply_count: 0,
                closed: None,
            }),
            changed: Condvar::new(),
        });
        let reader_shared = Arc::clone(&shared);
        let reader_path = path.clone();
        let reader = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_loop(lines, &reader_shared, &reader_path))
            .map_err(setup("start the reader thread"))?;
        let client = QmpClient {
            path,
            greeting,
            config,
            writer: Mutex::new(stream),
            shared,
            reader: Some(reader),
        };
        client.execute::<Value>(CAPABILITIES_COMMAND, None)?;
        Ok(client)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What QEMU said when the client connected (its version).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Runs `command` with the default timeout and decodes its return value.
    pub fn execute<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        self.execute_with_timeout(command, arguments, self.config.command_timeout)
    }

    /// Runs `command` and decodes its return value; waits at most `timeout` for the reply.
    pub fn execute_with_timeout<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<T, QmpError> {
        let value = self.execute_value(command, arguments, timeout)?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode {
            command: command.to_owned(),
            path: self.path.clone(),
            source,
        })
    }

    fn execute_value(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let id = {
            let mut state = self.shared.lock();
            if let Some(cause) = &state.closed {
                return Err(self.disconnected(cause));
            }
            let id = state.next_id;
            state.next_id += 1;
            state.awaiting = Some(id);
            state.reply = None;
            id
        };
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        debug!(command, id, "QMP command");
        if let Err(source) = writer.write_all(&line) {
            let mut state = self.shared.lock();
            state.awaiting = None;
            // A peer that has closed makes the write fail (EPIPE) possibly before the reader
            // has read the end of the stream: give the reader a moment, so that the error
            // says the connection is gone, and why.
            let deadline = Instant::now() + CLOSE_NOTICE_TIMEOUT;
            while state.closed.is_none() && Instant::now() < deadline {
                state = self.shared.wait_until(state, deadline);
            }
            if let Some(cause) = state.closed.clone() {
                return Err(self.disconnected(&cause));
            }
            drop(state);
            // QEMU may hold half a command now; only a new connection is in a known state.
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return Err(QmpError::Send {
                command: command.to_owned(),
                path: self.path.clone(),
                source,
            });
        }
        // The writer lock stays held until the reply: one command in flight at a time.
        let reply = self.wait_reply(command, id, timeout);
        drop(writer);
        reply
    }

    fn wait_reply(&self, command: &str, id: u64, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(reply) = state.reply.take() {
                state.awaiting = None;
                return match reply {
                    Reply::Return(value) => Ok(value),
                    Reply::Error { class, desc } => Err(QmpError::Command {
                        command: command.to_owned(),
                        path: self.path.clone(),
                        class,
                        desc,
                    }),
                };
            }
            if let Some(cause) = state.closed.clone() {
                state.awaiting = None;
                return Err(self.disconnected(&cause));
            }
            if Instant::now() >= deadline {
                state.awaiting = None;
                warn!(command, id, ?timeout, "QMP command timed out");
                return Err(QmpError::CommandTimeout {
                    command: command.to_owned(),
                    path: self.path.clone(),
                    timeout,
                });
            }
            state = self.shared.wait_until(state, deadline);
        }
    }

    /// The oldest queued event, waiting at most `timeout` for one; `None` if none came.
    /// Events that arrived before the connection closed are still returned; after them, a
    /// closed connection is an error.
    pub fn next_event(&self, timeout: Duration) -> Result<Option<QmpEvent>, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(event) = state.events.pop() {
                return Ok(Some(event));
            }
            if let Some(cause) = &state.closed {
                return Err(self.disconnected(cause));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            state = self.shared.wait_until(state, deadline);
        }
    }

    /// Consumes events until one satisfies `matches` and returns it; the events before it
    /// are discarded. `what` names the awaited event in the timeout error.
    pub fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&QmpEvent) -> bool,
    ) -> Result<QmpEvent, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_event(remaining)? {
                Some(event) if matches(&event) => return Ok(event),
                Some(event) => debug!(event = event.name, "QMP event skipped while waiting"),
                None => {
                    return Err(QmpError::EventTimeout {
                        what: what.to_owned(),
                        path: self.path.clone(),
                        timeout,
                    })
                }
            }
        }
    }

    /// Removes and returns every queued event.
    pub fn drain_events(&self) -> Vec<QmpEvent> {
        self.shared.lock().events.drain()
    }

    /// Events received since connecting, consumed or not. It only grows: compare it before
    /// and after [`QmpClient::wait_for_events_after`] to learn that something happened
    /// without taking events from other consumers.
    pub fn event_count(&self) -> u64 {
        self.shared.lock().events.received_count()
    }

    /// Waits until more than `seen` events were received (see [`QmpClient::event_count`]) or
    /// `timeout` passes; returns the new count (equal to `seen` on timeout). Consumes nothing.
    pub fn wait_for_events_after(&self, seen: u64, timeout: Duration) -> Result<u64, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            let count = state.events.received_count();
            if count > seen {
                return Ok(count);
            }
            if let Some(cause) = &state.closed {
                return Err(self.disconnected(cause));
            }
            if Instant::now() >= deadline {
                return Ok(count);
            }
            state = self.shared.wait_until(state, deadline);
        }
    }

    /// Events dropped because nobody consumed them and the queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.shared.lock().events.dropped_count()
    }

    /// Replies that arrived after their command had timed out (discarded).
    pub fn stale_replies(&self) -> u64 {
        self.shared.lock().stale_reply_count
    }

    /// True while the reader thread runs (QEMU has not closed the connection).
    pub fn is_connected(&self) -> bool {
        self.shared.lock().closed.is_none()
    }

    fn disconnected(&self, cause: &Arc<ReadError>) -> QmpError {
        QmpError::Disconnected {
            path: self.path.clone(),
            source: Arc::clone(cause),
        }
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        // Shutting the socket down ends the reader's blocking read with end-of-stream.
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writer.shutdown(std::net::Shutdown::Both);
        drop(writer);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Connects, trying again on a missing or refusing socket until `timeout` has passed.
fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream, QmpError> {
    let deadline = Instant::now() + timeout;
    loop {
        let source = match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(source) => source,
        };
        let kind = source.kind();
        let retriable = matches!(
            kind,
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        );
        if !retriable || Instant::now() >= deadline {
            let path = path.to_owned();
            return Err(if kind == io::ErrorKind::NotFound {
                QmpError::SocketMissing { path, source }
            } else {
                QmpError::Connect { path, source }
            });
        }
        std::thread::sleep(CONNECT_RETRY_INTERVAL);
    }
}

fn read_greeting(
    lines: &mut LineReader,
    path: &Path,
    timeout: Duration,
) -> Result<Greeting, QmpError> {
    let not_qmp = |source: ReadError| QmpError::NotQmp {
        path: path.to_owned(),
        source,
    };
    let deadline = Instant::now() + timeout;
    let line = loop {
        match lines.read_line(Some(deadline)) {
            Ok(line) if line.trim_ascii().is_empty() => continue,
            Ok(line) => break line,
            Err(LineError::Deadline) => {
                return Err(QmpError::GreetingTimeout {
                    path: path.to_owned(),
                    timeout,
                })
            }
            Err(e) => return Err(not_qmp(ReadError::Line(e))),
        }
    };
    Greeting::parse(&line).map_err(|source| {
        not_qmp(ReadError::Malformed {
            preview: preview(&line),
            source,
        })
    })
}

/// The reader thread: routes every line until the connection ends, then records why.
fn read_loop(mut lines: LineReader, shared: &Shared, path: &Path) {
    let cause = loop {
        let line = match lines.read_line(None) {
            Ok(line) => line,
            Err(e) => break ReadError::Line(e),
        };
        if line.trim_ascii().is_empty() {
            continue;
        }
        let message = match QmpMessage::parse(&line) {
            Ok(message) => message,
            Err(source) => {
                break ReadError::Malformed {
                    preview: preview(&line),
                    source,
                }
            }
        };
        if let Err(e) = deliver(shared, message) {
            break e;
        }
    };
    match &cause {
        ReadError::Line(LineError::Closed) => {
            debug!(path = %path.display(), "QMP connection closed")
        }
        other => warn!(path = %path.display(), error = %other, "QMP connection ends"),
    }
    shared.lock().closed = Some(Arc::new(cause));
    shared.changed.notify_all();
}

fn deliver(shared: &Shared, message: QmpMessage) -> Result<(), ReadError> {
    let mut state = shared.lock();
    let (id, reply) = match message {
        QmpMessage::Event(event) => {
            debug!(event = event.name, data = %event.data, "QMP event");
            state.events.push(event);
            drop(state);
            shared.changed.notify_all();
            return Ok(());
        }
        QmpMessage::Return { id, value } => (id, Reply::Return(value)),
        QmpMessage::Error { id, class, desc } => (id, Reply::Error { class, desc }),
    };
    match id {
        Some(id) => {
            let number = id.as_u64();
            match number {
                Some(n) if state.awaiting == Some(n) && state.reply.is_none() => {
                    state.reply = Some(reply)
                }
                Some(n) if n < state.next_id && state.awaiting != Some(n) => {
                    state.stale_reply_count += 1;
                    debug!(id = n, "late QMP reply discarded");
                    return Ok(());
                }
                _ => return Err(ReadError::UnknownId { id: id.to_string() }),
            }
        }
        // QEMU answers a request it could not parse without an id; with one command in
        // flight at a time, it is that command's.
        None if state.awaiting.is_some() && state.reply.is_none() => state.reply = Some(reply),
        None => return Err(ReadError::UnexpectedReply),
    }
    drop(state);
    shared.changed.notify_all();
    Ok(())
}

fn preview(line: &[u8]) -> String {
    let end = line.len().min(PREVIEW_BYTES);
    String::from_utf8_lossy(&line[..end]).into_owned()
}
