//! The VM's memory stream, carried over the link: the VMM migrates its own RAM and device
//! state into a local Unix socket, and strait carries that stream to the destination
//! engine on the link's `Memory` class, in the same session and under the same congestion
//! control as the disk's `Mirror` and `Bulk` classes. Both directions are carried, so
//! QEMU's `return-path` works.
//!
//! - [`SourceEnd`]: binds a Unix socket for the source VMM (`migrate uri=unix:PATH`),
//!   accepts exactly one connection, announces the stream (`Start`), and relays.
//! - [`DestinationEnd`]: waits for `Start`, connects to the destination VMM's incoming
//!   socket (`-incoming unix:PATH` or `migrate-incoming`), and relays.
//! - [`StreamMonitor`]: counters and rates for a progress bar, and `abort`.
//!
//! The messages are in [`protocol`]; `docs/migration.md` ("The memory stream") tells the
//! whole story.
//!
//! **Small local buffers.** The VMM decides when to stop the guest from its own estimate
//! of the bandwidth (bytes it got rid of per 100 ms). If strait swallowed its stream into
//! a large buffer, QEMU would see a local socket's speed, switch over too early, and the
//! real downtime would include draining that buffer across the WAN. So the relay reads at
//! most [`PIECE_BYTES`] at a time, hands the link a piece only while less than
//! [`LINK_UNSENT_BYTES_MAX`] of the class waits to go on a connection, and keeps the
//! kernel's socket buffers at [`LOCAL_SOCKET_BUFFER_BYTES`]. What is in flight on the
//! network is the link's business: its windows cover the bandwidth-delay product.
//!
//! **Success.** A byte relay cannot tell a VMM that closed its socket at the end of a
//! migration from one that crashed half-way. QEMU's return path can: the destination ends
//! it with `SHUT`, 0 when it loaded everything ([`return_path`]). A stream succeeds when
//! both directions ended and the return path carried `SHUT 0`; both engines see the same
//! return-path bytes, so both agree.

mod monitor;
pub mod protocol;
mod relay;
pub mod return_path;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use strait_net::session::tcp::{Link, LinkError};
use strait_net::StreamClass;
use thiserror::Error;
use tracing::{info, warn};

pub use monitor::{StreamMonitor, StreamPhase, StreamProgress, RATE_WINDOW};
pub use protocol::{ProtocolError, StreamId};
pub use return_path::Verdict;

use protocol::{Message, VERSION};
use relay::{configure_socket, Relay, ReturnPath};

/// Most bytes read from the VMM's socket at once, and so the largest `Data` message: a
/// quarter of a link frame, 2 ms of a 1 Gbit/s link. Large enough that the per-message
/// cost (a frame header, a lock, a syscall) is noise, small enough to be a negligible
/// buffer.
pub const PIECE_BYTES: usize = 256 << 10;
const _: () = assert!(PIECE_BYTES <= protocol::DATA_BYTES_MAX);

/// Most bytes of this stream the link may hold that no connection has taken yet: four
/// pieces, 8 ms of a 1 Gbit/s link and 42 ms of a 200 Mbit/s one, against QEMU's 100 ms
/// rate-measurement period. Enough that the link never waits for the relay (it is
/// refilled every [`PACE_POLL`]); what the connections have taken is on the network,
/// bounded by TCP and the link's windows.
pub const LINK_UNSENT_BYTES_MAX: u64 = 4 * PIECE_BYTES as u64;

/// `SO_SNDBUF` and `SO_RCVBUF` asked for on the VMM's socket (the kernel doubles it): the
/// relay's side of the local buffer. The VMM's own send buffer (`wmem_default`, 208 KiB
/// on Debian) is its side; strait cannot shrink it.
pub const LOCAL_SOCKET_BUFFER_BYTES: usize = 64 << 10;

/// How often a relay waiting for room in the link looks again: the link has no
/// notification for "sent", and 1 ms is an eighth of what [`LINK_UNSENT_BYTES_MAX`] lasts
/// at 1 Gbit/s.
pub const PACE_POLL: Duration = Duration::from_millis(1);

/// Every blocking call of the relay (socket read and write, link receive) returns at least
/// this often to look for a failure of the other direction or an abort: short enough that
/// an abort is prompt, long enough to cost nothing.
pub const TICK: Duration = Duration::from_millis(50);

/// Once one direction has ended, the longest the other may take: in a clean migration the
/// destination QEMU closes right after its `SHUT` and the source QEMU right after reading
/// it, one WAN trip apart; after a failure, a QEMU reads the end of stream and exits. A
/// QEMU that keeps its socket open this long after the other side ended is hung.
pub const END_LINGER_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest the VMM may take no bytes while the relay has some for it: loading RAM takes it
/// microseconds per page; a full minute is a hung VMM.
pub const LOCAL_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest the link may accept nothing of this stream. Above the link's resume window
/// (30 s; past it the session fails by itself) and above the peer's
/// [`LOCAL_WRITE_STALL_TIMEOUT`], so that the side that knows why reports first.
pub const LINK_STALL_TIMEOUT: Duration = Duration::from_secs(90);

/// Longest one `send` waits for room in the link's buffer for the class. The pacing keeps
/// the class far below the buffer, so only a stuck session waits here.
pub const LINK_SEND_TIMEOUT: Duration = LINK_STALL_TIMEOUT;

/// Longest the source end waits to tell the peer it is aborting: a local enqueue unless
/// the session is stuck, when the peer learns it from its own timeouts instead.
pub const ABORT_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// How often the source end looks for the VMM's connection and for an abort.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// Between two attempts to connect to the destination VMM's socket.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// Default of [`StreamConfig::accept_timeout`]: QEMU connects as soon as `migrate`
/// returns; 30 s covers a VMM on a loaded host.
pub const ACCEPT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Default of [`StreamConfig::start_timeout`]: the destination end may be started while
/// the disk is still copying, long before the memory phase.
pub const START_TIMEOUT_DEFAULT: Duration = Duration::from_secs(3600);

/// Default of [`StreamConfig::connect_timeout`]: QEMU's `migrate-incoming` listens before
/// it returns, so the socket is there at once; 2 s covers a file created a moment before
/// the listen.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(2);

/// The waits a stream's owner may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// Source: how long the VMM may take to connect.
    pub accept_timeout: Duration,
    /// Destination: how long to wait for the source's `Start`.
    pub start_timeout: Duration,
    /// Destination: how long the VMM's socket may take to accept.
    pub connect_timeout: Duration,
    /// Succeed only if the return path carried the destination's `SHUT 0`. Off only for a
    /// VMM without a return path, where an end of stream is all there is to know.
    pub require_loaded: bool,
}

impl Default for StreamConfig {
    fn default() -> StreamConfig {
        StreamConfig {
            accept_timeout: ACCEPT_TIMEOUT_DEFAULT,
            start_timeout: START_TIMEOUT_DEFAULT,
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            require_loaded: true,
        }
    }
}

/// Why a memory stream failed.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The source socket could not be created.
    #[error("failed to bind the migration socket {path}")]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A socket operation failed.
    #[error("failed to {op} on the migration socket {path}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The source VMM did not connect in time.
    #[error("the VMM did not connect to {path} within {timeout:?}")]
    AcceptTimeout {
        /// The socket's path.
        path: PathBuf,
        /// The wait.
        timeout: Duration,
    },
    /// No socket at the destination VMM's path.
    #[error("no destination VMM socket at {path} after {timeout:?} (did the VMM start listening, e.g. migrate-incoming?)")]
    VmmSocketMissing {
        /// The path.
        path: PathBuf,
        /// The wait.
        timeout: Duration,
    },
    /// The destination VMM's socket refused or failed the connection.
    #[error("failed to connect to the destination VMM socket {path}")]
    Connect {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The source engine never announced the stream.
    #[error("no Start from the source engine within {timeout:?}")]
    StartTimeout {
        /// The wait.
        timeout: Duration,
    },
    /// The source engine speaks another version of the protocol.
    #[error("the source engine speaks memory-stream version {version}, this engine {VERSION}")]
    Version {
        /// The peer's version.
        version: u8,
    },
    /// The link failed under the stream.
    #[error("link {op} on the memory class failed")]
    Link {
        /// What was attempted.
        op: &'static str,
        /// The cause (boxed: a link error is large, and this enum travels in `Result`s).
        source: Box<LinkError>,
    },
    /// The peer sent a message that does not decode.
    #[error("the peer engine sent a bad memory-stream message")]
    Malformed(#[source] ProtocolError),
    /// The peer sent a valid message at the wrong time.
    #[error("unexpected {what} from the peer engine")]
    Unexpected {
        /// What came.
        what: &'static str,
    },
    /// The peer engine aborted the stream.
    #[error("the peer engine aborted the memory stream: {reason}")]
    PeerAborted {
        /// The peer's reason.
        reason: String,
    },
    /// This side aborted the stream ([`StreamMonitor::abort`]).
    #[error("memory stream aborted: {reason}")]
    Aborted {
        /// The reason given.
        reason: String,
    },
    /// Reading the VMM's socket failed (a VMM that dies with unread data resets it).
    #[error("reading the VMM's migration socket {path} failed")]
    VmmRead {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Writing the VMM's socket failed (the VMM closed it with bytes still to come).
    #[error("writing to the VMM's migration socket {path} failed")]
    VmmWrite {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The VMM took no bytes for [`LOCAL_WRITE_STALL_TIMEOUT`].
    #[error("the VMM at {path} took no bytes for {timeout:?}")]
    VmmStalled {
        /// The socket's path.
        path: PathBuf,
        /// The wait.
        timeout: Duration,
    },
    /// The link took nothing of the stream for [`LINK_STALL_TIMEOUT`].
    #[error("the link took no memory-stream bytes for {timeout:?}")]
    LinkStalled {
        /// The wait.
        timeout: Duration,
    },
    /// One direction ended and the other did not follow.
    #[error("{waiting_for} did not end within {timeout:?} of the other direction")]
    EndTimeout {
        /// The direction still open.
        waiting_for: &'static str,
        /// The wait.
        timeout: Duration,
    },
    /// The destination VMM said on its return path that it failed to load the state.
    #[error("the destination VMM failed to load the state (return-path SHUT {value})")]
    DestinationFailed {
        /// QEMU's `SHUT` value.
        value: u32,
    },
    /// Both directions ended, but the destination never confirmed the load.
    #[error("the stream ended without the destination VMM confirming it loaded the state: {why}")]
    Unconfirmed {
        /// What the return path showed.
        why: &'static str,
    },
    /// A relay thread could not be started.
    #[error("failed to start a memory-stream thread")]
    Spawn {
        /// The cause.
        source: io::Error,
    },
    /// A relay thread panicked (a bug).
    #[error("a memory-stream thread panicked")]
    Panicked,
}

impl StreamError {
    /// Whether the peer should hear of this failure: not when it came from the peer, or
    /// when the link that would carry the news is what failed.
    fn tell_peer(&self) -> bool {
        !matches!(
            self,
            StreamError::PeerAborted { .. } | StreamError::Link { .. }
        )
    }
}

/// What a stream that succeeded moved.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamReport {
    /// The stream.
    pub stream: StreamId,
    /// The counters at the end ([`StreamProgress`]).
    pub progress: StreamProgress,
    /// What the return path said (on success, [`Verdict::Loaded`] unless
    /// [`StreamConfig::require_loaded`] is off).
    pub verdict: Verdict,
    /// QEMU return-path messages relayed.
    pub return_path_messages: u64,
    /// From the VMM's connection (source) or `Start` (destination) to the end.
    pub duration: Duration,
}

/// A stream running on its own thread.
#[derive(Debug)]
pub struct StreamHandle {
    monitor: StreamMonitor,
    thread: JoinHandle<Result<StreamReport, StreamError>>,
}

impl StreamHandle {
    /// The stream's monitor: progress and abort.
    pub fn monitor(&self) -> &StreamMonitor {
        &self.monitor
    }

    /// Whether the stream has ended (`join` will not block).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the stream's end. Every wait inside is bounded (see the constants) except
    /// an idle stream between its start and its end, which the VMM may legitimately hold
    /// (QEMU at `pre-switchover`): abort through the monitor to end it.
    pub fn join(self) -> Result<StreamReport, StreamError> {
        self.thread.join().unwrap_or(Err(StreamError::Panicked))
    }
}

fn spawn(
    name: &str,
    monitor: StreamMonitor,
    run: impl FnOnce(&StreamMonitor) -> Result<StreamReport, StreamError> + Send + 'static,
) -> Result<StreamHandle, StreamError> {
    let m = monitor.clone();
    let thread = thread::Builder::new()
        .name(name.into())
        .spawn(move || run(&m))
        .map_err(|source| StreamError::Spawn { source })?;
    Ok(StreamHandle { monitor, thread })
}

/// The source engine's end: a Unix socket the source VMM migrates into.
#[derive(Debug)]
pub struct SourceEnd {
    listener: UnixListener,
    path: PathBuf,
    stream: StreamId,
    config: StreamConfig,
    /// The socket file is still this end's to remove (false once removed at accept: by
    /// then the path may belong to the next stream's socket).
    owns_path: bool,
}

impl SourceEnd {
    /// Binds `path` (mode 0600: the stream is the guest's whole memory) for stream
    /// `stream`. Give the VMM `unix:PATH` once this returns.
    pub fn bind(
        path: &Path,
        stream: StreamId,
        config: StreamConfig,
    ) -> Result<SourceEnd, StreamError> {
        let err = |source| StreamError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(err)?;
        let end = SourceEnd {
            listener,
            path: path.to_path_buf(),
            stream,
            config,
            owns_path: true,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        end.listener.set_nonblocking(true).map_err(err)?;
        Ok(end)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the VMM's connection, announces the stream to the peer and relays until
    /// both directions ended (see the module documentation for what success means).
    pub fn run(
        mut self,
        link: &Link,
        monitor: &StreamMonitor,
    ) -> Result<StreamReport, StreamError> {
        let inner = &monitor.inner;
        inner.set_stream(self.stream);
        inner.set_phase(StreamPhase::Waiting);
        let result = self.accept(monitor).and_then(|(sock, started)| {
            send_control(
                link,
                Message::Start {
                    stream: self.stream,
                    version: VERSION,
                },
            )?;
            info!(stream = self.stream, path = %self.path.display(), "memory stream: the source VMM connected");
            relay(link, self.stream, &self.path, monitor, ReturnPath::PeerToLocal, sock, started)
        });
        finish(
            link,
            self.stream,
            monitor,
            result,
            self.config.require_loaded,
        )
    }

    /// [`SourceEnd::run`] on a thread of its own.
    pub fn spawn(
        self,
        link: Arc<Link>,
        monitor: StreamMonitor,
    ) -> Result<StreamHandle, StreamError> {
        spawn("strait-mem-src", monitor, move |m| self.run(&link, m))
    }

    fn accept(&mut self, monitor: &StreamMonitor) -> Result<(UnixStream, Instant), StreamError> {
        let deadline = Instant::now() + self.config.accept_timeout;
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => {
                    // Exactly one connection: nobody else may connect from now on.
                    let _ = std::fs::remove_file(&self.path);
                    self.owns_path = false;
                    sock.set_nonblocking(false)
                        .map_err(|source| StreamError::Socket {
                            path: self.path.clone(),
                            op: "make the connection blocking",
                            source,
                        })?;
                    return Ok((sock, Instant::now()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(StreamError::Socket {
                        path: self.path.clone(),
                        op: "accept",
                        source,
                    })
                }
            }
            if let Some(reason) = monitor.abort_reason() {
                return Err(StreamError::Aborted { reason });
            }
            if Instant::now() >= deadline {
                return Err(StreamError::AcceptTimeout {
                    path: self.path.clone(),
                    timeout: self.config.accept_timeout,
                });
            }
            thread::sleep(ACCEPT_POLL);
        }
    }
}

impl Drop for SourceEnd {
    fn drop(&mut self) {
        // A stale file would make the next bind on the path fail.
        if self.owns_path {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The destination engine's end: connects to the destination VMM's incoming socket when
/// the source announces a stream.
#[derive(Debug, Clone)]
pub struct DestinationEnd {
    vmm_socket: PathBuf,
    config: StreamConfig,
}

impl DestinationEnd {
    /// An end that will connect to `vmm_socket` (the path the destination VMM listens on).
    pub fn new(vmm_socket: &Path, config: StreamConfig) -> DestinationEnd {
        DestinationEnd {
            vmm_socket: vmm_socket.to_path_buf(),
            config,
        }
    }

    /// Waits for the source's `Start`, connects to the VMM and relays until both
    /// directions ended. A VMM socket that cannot be reached ends the stream on both
    /// engines (the source hears `Abort` with the reason).
    pub fn run(self, link: &Link, monitor: &StreamMonitor) -> Result<StreamReport, StreamError> {
        let inner = &monitor.inner;
        inner.set_phase(StreamPhase::Waiting);
        let stream = match wait_start(link, monitor, self.config.start_timeout) {
            Ok(stream) => stream,
            Err((Some(stream), error)) => {
                return finish(
                    link,
                    stream,
                    monitor,
                    Err(error),
                    self.config.require_loaded,
                );
            }
            Err((None, error)) => {
                // No stream to tell the peer about.
                inner.set_phase(StreamPhase::Failed);
                return Err(error);
            }
        };
        inner.set_stream(stream);
        inner.set_phase(StreamPhase::Connecting);
        let started = Instant::now();
        let result = connect(&self.vmm_socket, self.config.connect_timeout, monitor)
            .and_then(|sock| {
                info!(stream, path = %self.vmm_socket.display(), "memory stream: connected to the destination VMM");
                relay(link, stream, &self.vmm_socket, monitor, ReturnPath::LocalToPeer, sock, started)
            });
        finish(link, stream, monitor, result, self.config.require_loaded)
    }

    /// [`DestinationEnd::run`] on a thread of its own.
    pub fn spawn(
        self,
        link: Arc<Link>,
        monitor: StreamMonitor,
    ) -> Result<StreamHandle, StreamError> {
        spawn("strait-mem-dst", monitor, move |m| self.run(&link, m))
    }
}

/// Sends one of the stream's own messages (not `Data`).
fn send_control(link: &Link, message: Message<'_>) -> Result<(), StreamError> {
    link.send(StreamClass::Memory, message.encode(), LINK_SEND_TIMEOUT)
        .map(|_| ())
        .map_err(|source| StreamError::Link {
            op: "send",
            source: Box::new(source),
        })
}

/// The stream id of the next `Start`, discarding anything before it. On failure, the
/// stream id if one was learnt (a `Start` of an unknown version).
fn wait_start(
    link: &Link,
    monitor: &StreamMonitor,
    timeout: Duration,
) -> Result<StreamId, (Option<StreamId>, StreamError)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(reason) = monitor.abort_reason() {
            return Err((None, StreamError::Aborted { reason }));
        }
        if Instant::now() >= deadline {
            return Err((None, StreamError::StartTimeout { timeout }));
        }
        let payload = link.recv(StreamClass::Memory, TICK).map_err(|source| {
            (
                None,
                StreamError::Link {
                    op: "receive",
                    source: Box::new(source),
                },
            )
        })?;
        let Some(payload) = payload else {
            continue;
        };
        let _ = link.mark_applied(StreamClass::Memory, payload.len() as u64);
        match protocol::decode(&payload) {
            Ok(Message::Start { stream, version }) if version == VERSION => return Ok(stream),
            Ok(Message::Start { stream, version }) => {
                return Err((Some(stream), StreamError::Version { version }))
            }
            // Leftovers of an earlier stream; a malformed one is the peer's bug, but not
            // this stream's.
            Ok(_) | Err(_) => {
                monitor
                    .inner
                    .stale_messages
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

fn connect(
    path: &Path,
    timeout: Duration,
    monitor: &StreamMonitor,
) -> Result<UnixStream, StreamError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(sock) => return Ok(sock),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline
                    && monitor.abort_reason().is_none() => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StreamError::VmmSocketMissing {
                    path: path.to_path_buf(),
                    timeout,
                })
            }
            Err(source) => {
                return Err(StreamError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        thread::sleep(CONNECT_RETRY);
    }
}

/// Relays between `sock` and the link, then reads the return path's verdict.
fn relay(
    link: &Link,
    stream: StreamId,
    path: &Path,
    monitor: &StreamMonitor,
    return_path: ReturnPath,
    sock: UnixStream,
    started: Instant,
) -> Result<StreamReport, StreamError> {
    configure_socket(&sock, path)?;
    let relay = Relay::new(link, stream, path, &monitor.inner, return_path, &sock)?;
    let shut = sock.try_clone().map_err(|source| StreamError::Socket {
        path: path.to_path_buf(),
        op: "clone the socket",
        source,
    })?;
    monitor.inner.attach_local(shut);
    let end = relay.run(sock);
    monitor.inner.detach_local();
    let end = end?;
    Ok(StreamReport {
        stream,
        progress: monitor.progress(),
        verdict: end.verdict,
        return_path_messages: end.return_path_messages,
        duration: started.elapsed(),
    })
}

/// Applies the success rule, tells the peer about a local failure, sets the final phase.
fn finish(
    link: &Link,
    stream: StreamId,
    monitor: &StreamMonitor,
    result: Result<StreamReport, StreamError>,
    require_loaded: bool,
) -> Result<StreamReport, StreamError> {
    let result = result.and_then(|report| match report.verdict {
        Verdict::Loaded => Ok(report),
        Verdict::Failed(value) => Err(StreamError::DestinationFailed { value }),
        _ if !require_loaded => Ok(report),
        Verdict::Pending => Err(StreamError::Unconfirmed {
            why: "no return-path SHUT (a VMM closed the stream early, or return-path is off)",
        }),
        Verdict::Unreadable => Err(StreamError::Unconfirmed {
            why: "the return path could not be followed",
        }),
    });
    let mut result = result;
    match &mut result {
        Ok(report) => {
            monitor.inner.set_phase(StreamPhase::Done);
            report.progress.phase = StreamPhase::Done;
            info!(
                stream,
                local_to_peer_bytes = report.progress.local_to_peer_bytes,
                peer_to_local_bytes = report.progress.peer_to_local_bytes,
                held_back_ms = report.progress.local_held_back.as_millis() as u64,
                duration_ms = report.duration.as_millis() as u64,
                "memory stream done"
            );
        }
        Err(error) => {
            monitor.inner.set_phase(StreamPhase::Failed);
            if error.tell_peer() {
                let reason = strait_net::error_chain(error);
                let abort = Message::Abort { stream, reason }.encode();
                if let Err(e) = link.send(StreamClass::Memory, abort, ABORT_SEND_TIMEOUT) {
                    warn!(stream, error = %strait_net::error_chain(&e), "could not tell the peer the memory stream failed");
                }
            }
        }
    }
    result
}
