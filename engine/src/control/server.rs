//! The control server: one accept thread, and one thread per connected client, at most
//! [`MAX_CONNECTIONS`] of them.
//!
//! Shutdown has to interrupt threads blocked in `accept` and `read`. The accept thread waits
//! in `poll(2)` on the listener and on one end of a socket pair whose other end shutdown
//! closes; connection threads are woken by shutting their sockets down, which makes their
//! blocked reads return end of input.

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;
use tracing::{debug, info, warn};

use super::protocol::{
    self, error_response, is_blank, ok_response, parse_request, read_line_bounded, Command,
    ErrorCode, Framed, MAX_DISCARD_BYTES, MAX_REQUEST_BYTES,
};
use super::{ControlError, Handler};

/// The most clients served at once. Operators and monitoring agents open one connection
/// each, briefly; sixteen covers several agents plus a person at a shell, and bounds the
/// threads and buffers a misbehaving local process can make the engine hold.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a connection may sit without sending a request before the engine closes it. A
/// monitor that polls `stats` every few seconds never hits it; a forgotten `socat` session
/// gives its slot back within a minute.
pub const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one response write may block. Responses are a few KiB and fit the socket buffer;
/// a client that stops reading while it keeps sending requests would otherwise hold a
/// connection thread forever.
pub const CONNECTION_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the accept thread pauses after `accept` fails for a reason other than a client
/// going away (out of file descriptors, say): long enough not to spin on a persistent error,
/// short enough that clients barely notice once it clears.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The read buffer of one connection, in bytes. Requests are tiny; this only sets how many
/// `read` calls an oversized line takes to discard.
const CONNECTION_READ_BUFFER_BYTES: usize = 8 * 1024;

/// A running control server. Dropping it shuts it down like [`ControlServer::shutdown`].
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// Invariant: `Some` until the server has been shut down.
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    /// Dropping this end wakes the accept thread's `poll`.
    wake: UnixStream,
    accept_thread: JoinHandle<()>,
    connections: Arc<Connections>,
    /// Device and inode of the socket file we bound, so that shutdown only removes our own.
    socket_identity: (u64, u64),
}

/// The live connections, shared by the accept thread (which adds them), the connection
/// threads (which remove themselves) and shutdown (which closes them all).
#[derive(Debug, Default)]
struct Connections {
    /// Invariant: at most [`MAX_CONNECTIONS`] entries; each is a clone of the stream that
    /// the connection's thread serves, kept only to shut it down.
    streams: Mutex<HashMap<u64, UnixStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
}

impl Connections {
    /// The registry stays consistent across a panic (every update is one insert or
    /// remove), so a poisoned lock is still usable.
    fn streams(&self) -> MutexGuard<'_, HashMap<u64, UnixStream>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ControlServer {
    /// Binds the socket at `path` (refuses if the path exists and a server answers on it:
    /// "in use"; removes a stale socket file nobody listens on; refuses a path that exists
    /// and is not a socket), sets mode 0600 on it, and serves on its own thread(s) until
    /// shutdown.
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> Result<ControlServer, ControlError> {
        clear_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        // Between bind and chmod the socket has the umask's mode. Clients that connect in
        // that window are served, so keep the socket in a directory only its owner can
        // enter (docs/api.md says so) rather than rely on the mode alone.
        let socket_identity = match secure_socket(path) {
            Ok(identity) => identity,
            Err(err) => {
                remove_quietly(path);
                return Err(err);
            }
        };
        match spawn_accept_thread(path, listener, handler) {
            Ok((wake, accept_thread, connections)) => {
                info!(path = %path.display(), "control socket listening");
                Ok(ControlServer {
                    path: path.to_path_buf(),
                    running: Some(Running {
                        wake,
                        accept_thread,
                        connections,
                        socket_identity,
                    }),
                })
            }
            Err(err) => {
                remove_quietly(path);
                Err(err)
            }
        }
    }

    /// The path of the control socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, closes connections, joins threads, removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        // Closing our end of the pair makes the accept thread's poll report it readable.
        drop(running.wake);
        if running.accept_thread.join().is_err() {
            warn!(path = %self.path.display(), "the control accept thread panicked");
        }
        // The accept thread is gone, so no connection is added from here on.
        for stream in running.connections.streams().values() {
            // The peer may already have gone; either way the thread's read returns.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let threads = std::mem::take(&mut *running.connections.threads());
        for thread in threads {
            if thread.join().is_err() {
                warn!(path = %self.path.display(), "a control connection thread panicked");
            }
        }
        // Only remove the file if it is still the socket we bound: an operator may have
        // replaced it, or a new server may already be listening there.
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|meta| (meta.dev(), meta.ino()) == running.socket_identity)
            .unwrap_or(false);
        if ours {
            remove_quietly(&self.path);
        }
        info!(path = %self.path.display(), "control socket closed");
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes `path` free for `bind`: absent, or a socket nobody listens on (a previous engine
/// that died without cleaning up), which is removed.
fn clear_stale_socket(path: &Path) -> Result<(), ControlError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing stale control socket");
            std::fs::remove_file(path).map_err(|source| ControlError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(ControlError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Sets mode 0600 on the freshly bound socket and returns its (device, inode).
fn secure_socket(path: &Path) -> Result<(u64, u64), ControlError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::SetPermissions {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| ControlError::Inspect {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((meta.dev(), meta.ino()))
}

fn remove_quietly(path: &Path) {
    if let Err(err) = std::fs::remove_file(path) {
        if err.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %err, "cannot remove the control socket");
        }
    }
}

type Spawned = (UnixStream, JoinHandle<()>, Arc<Connections>);

fn spawn_accept_thread(
    path: &Path,
    listener: UnixListener,
    handler: Arc<dyn Handler>,
) -> Result<Spawned, ControlError> {
    let setup = |source| ControlError::Setup {
        path: path.to_path_buf(),
        source,
    };
    // Non-blocking, so that a client that connects and vanishes between poll and accept
    // cannot leave the thread stuck in accept where shutdown cannot reach it.
    listener.set_nonblocking(true).map_err(setup)?;
    let (wake, woken) = UnixStream::pair().map_err(setup)?;
    let connections = Arc::new(Connections::default());
    let acceptor = Acceptor {
        path: path.to_path_buf(),
        listener,
        woken,
        handler,
        connections: Arc::clone(&connections),
    };
    let accept_thread = thread::Builder::new()
        .name("strait-ctl-accept".to_string())
        .spawn(move || acceptor.run())
        .map_err(|source| ControlError::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((wake, accept_thread, connections))
}

struct Acceptor {
    path: PathBuf,
    listener: UnixListener,
    /// Becomes readable (end of input) when the server shuts down.
    woken: UnixStream,
    handler: Arc<dyn Handler>,
    connections: Arc<Connections>,
}

impl Acceptor {
    fn run(self) {
        loop {
            match wait_readable(&self.listener, &self.woken) {
                Ok(Readable::Shutdown) => return,
                Ok(Readable::Listener) => {}
                Err(err) => {
                    // Without poll the thread cannot be woken for shutdown; stop serving.
                    warn!(path = %self.path.display(), error = %err, "control socket poll failed; no longer accepting");
                    return;
                }
            }
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(err) if is_transient_accept_error(&err) => {}
                Err(err) => {
                    warn!(path = %self.path.display(), error = %err, "control socket accept failed");
                    thread::sleep(ACCEPT_ERROR_BACKOFF);
                }
            }
        }
    }

    fn admit(&self, stream: UnixStream) {
        self.reap_finished_threads();
        let mut streams = self.connections.streams();
        if streams.len() >= MAX_CONNECTIONS {
            drop(streams);
            warn!(path = %self.path.display(), limit = MAX_CONNECTIONS, "refusing a control client: too many connections");
            let message = format!(
                "the engine already serves {MAX_CONNECTIONS} control connections; try again later"
            );
            refuse(stream, ErrorCode::TooManyConnections, &message);
            return;
        }
        let registered = stream.try_clone();
        let registered = match registered {
            Ok(registered) => registered,
            Err(err) => {
                warn!(error = %err, "cannot clone a control connection");
                refuse(
                    stream,
                    ErrorCode::Internal,
                    "the engine cannot serve this connection",
                );
                return;
            }
        };
        let id = self.connections.next_id.fetch_add(1, Ordering::Relaxed);
        streams.insert(id, registered);
        drop(streams);

        let connection = Connection {
            id,
            stream,
            handler: Arc::clone(&self.handler),
            connections: Arc::clone(&self.connections),
        };
        let spawned = thread::Builder::new()
            .name(format!("strait-ctl-{id}"))
            .spawn(move || connection.run());
        match spawned {
            Ok(thread) => self.connections.threads().push(thread),
            Err(err) => {
                warn!(error = %err, "cannot start a control connection thread");
                if let Some(stream) = self.connections.streams().remove(&id) {
                    refuse(
                        stream,
                        ErrorCode::Internal,
                        "the engine cannot serve this connection",
                    );
                }
            }
        }
    }

    /// Joins the threads of connections that have ended, so their handles do not pile up
    /// over the engine's lifetime.
    fn reap_finished_threads(&self) {
        let mut threads = self.connections.threads();
        let (finished, running): (Vec<_>, Vec<_>) =
            threads.drain(..).partition(JoinHandle::is_finished);
        *threads = running;
        drop(threads);
        for thread in finished {
            if thread.join().is_err() {
                warn!(path = %self.path.display(), "a control connection thread panicked");
            }
        }
    }
}

/// Errors from `accept` that concern one client (or none), not the listener.
fn is_transient_accept_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    )
}

/// Sends one error line to a client that will not be served, then closes it.
fn refuse(mut stream: UnixStream, code: ErrorCode, message: &str) {
    // The accept thread writes this; a client that does not read must not block it.
    let line = error_response(&Value::Null, code, message) + "\n";
    let written = stream
        .set_nonblocking(true)
        .and_then(|()| stream.write_all(line.as_bytes()));
    if let Err(err) = written {
        debug!(error = %err, "cannot tell a refused control client why");
    }
}

enum Readable {
    Listener,
    Shutdown,
}

/// Blocks until a client is waiting on `listener` or `woken` reports shutdown.
fn wait_readable(listener: &UnixListener, woken: &UnixStream) -> io::Result<Readable> {
    let mut fds = [
        libc::pollfd {
            fd: woken.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an initialised array of `fds.len()` pollfd structs that outlives
        // the call, and both descriptors are owned by objects borrowed for this function.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    // Shutdown wins over a waiting client: shutdown is about to close them all anyway.
    if fds[0].revents != 0 {
        return Ok(Readable::Shutdown);
    }
    Ok(Readable::Listener)
}

/// One client's connection, served on its own thread.
struct Connection {
    id: u64,
    stream: UnixStream,
    handler: Arc<dyn Handler>,
    connections: Arc<Connections>,
}

impl Connection {
    fn run(self) {
        debug!(connection = self.id, "control client connected");
        if let Err(err) = self.serve() {
            // Idle timeouts, clients that vanish mid-line, shutdown: all end here.
            debug!(connection = self.id, error = %err, "control connection ended");
        }
        self.connections.streams().remove(&self.id);
        debug!(connection = self.id, "control client disconnected");
    }

    fn serve(&self) -> io::Result<()> {
        self.stream
            .set_read_timeout(Some(CONNECTION_IDLE_TIMEOUT))?;
        self.stream
            .set_write_timeout(Some(CONNECTION_WRITE_TIMEOUT))?;
        let mut reader = BufReader::with_capacity(CONNECTION_READ_BUFFER_BYTES, &self.stream);
        let mut line = Vec::with_capacity(CONNECTION_READ_BUFFER_BYTES);
        loop {
            let framed =
                read_line_bounded(&mut reader, &mut line, MAX_REQUEST_BYTES, MAX_DISCARD_BYTES)?;
            let response = match framed {
                Framed::End => return Ok(()),
                Framed::Line if is_blank(&line) => continue,
                Framed::Line => self.answer(&line),
                Framed::TooLarge { resynced } => {
                    warn!(
                        connection = self.id,
                        limit_bytes = MAX_REQUEST_BYTES,
                        resynced,
                        "control request too large"
                    );
                    let message = format!(
                        "the request line is longer than {MAX_REQUEST_BYTES} bytes{}",
                        if resynced {
                            ""
                        } else {
                            "; closing the connection"
                        }
                    );
                    let response =
                        error_response(&Value::Null, ErrorCode::RequestTooLarge, &message);
                    if !resynced {
                        return send(&self.stream, &response);
                    }
                    response
                }
            };
            send(&self.stream, &response)?;
        }
    }

    /// The response line to one request line.
    fn answer(&self, line: &[u8]) -> String {
        let request = match parse_request(line) {
            Ok(request) => request,
            Err(refusal) => {
                debug!(connection = self.id, code = %refusal.code, message = %refusal.message, "control request refused");
                return refusal.to_response();
            }
        };
        let command = request.command;
        let handler = &self.handler;
        // A bug in a handler must cost one response, not the connection or the server.
        let result = panic::catch_unwind(AssertUnwindSafe(|| match command {
            Command::Status => Ok(handler.status()),
            Command::Stats => Ok(handler.stats()),
            Command::Version => Ok(protocol::version_result()),
            Command::Help => Ok(protocol::help_result()),
            Command::Replicate => handler.replicate(&request.args),
            Command::Verify => handler.verify(&request.args),
            Command::Promote => handler.promote(&request.args),
            Command::Demote => handler.demote(),
            Command::Migrate => handler.migrate(&request.args),
            Command::MigrateCancel => handler.migrate_cancel(),
        }));
        match result {
            Ok(Ok(result)) => ok_response(&request.id, result),
            Ok(Err((code, message))) => error_response(&request.id, code, &message),
            Err(payload) => {
                let reason = panic_message(payload.as_ref());
                warn!(
                    connection = self.id,
                    command = command.name(),
                    reason,
                    "control handler panicked"
                );
                let message = format!("the `{}` handler failed: {reason}", command.name());
                error_response(&request.id, ErrorCode::Internal, &message)
            }
        }
    }
}

fn send(mut stream: &UnixStream, response: &str) -> io::Result<()> {
    // One write per response, newline included, so that responses never interleave.
    let mut line = String::with_capacity(response.len() + 1);
    line.push_str(response);
    line.push('\n');
    stream.write_all(line.as_bytes())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&'static str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "panic"
    }
}
