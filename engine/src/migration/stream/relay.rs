//! The two pumps between a VMM's Unix socket and the link's `Memory` class, shared by the
//! source and the destination once their stream has begun.
//!
//! One thread reads the VMM's socket and sends (local → peer), the calling thread
//! receives and writes the VMM's socket (peer → local). Either may fail the stream: it
//! records the first error, raises a flag and shuts the socket, which wakes the other at
//! once; every wait in both is sliced into [`TICK`]s that look at that flag and at the
//! monitor's abort.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use strait_net::session::tcp::{Link, LinkError};
use strait_net::StreamClass;
use tracing::{debug, warn};

use super::monitor::{MonitorInner, StreamPhase};
use super::protocol::{self, Message, StreamId, HEADER_BYTES};
use super::return_path::{ReturnPathObserver, Verdict};
use super::{
    StreamError, END_LINGER_TIMEOUT, LINK_SEND_TIMEOUT, LINK_STALL_TIMEOUT, LINK_UNSENT_BYTES_MAX,
    LOCAL_SOCKET_BUFFER_BYTES, LOCAL_WRITE_STALL_TIMEOUT, PACE_POLL, PIECE_BYTES, TICK,
};

/// The `Memory` class's index in the link's per-class statistics.
/// A wait for the link this long is logged (debug): the link's pace normally lets the
/// VMM's bytes through within a few milliseconds.
const LONG_WAIT: Duration = Duration::from_millis(100);

fn memory_index() -> usize {
    StreamClass::ALL
        .iter()
        .position(|c| *c == StreamClass::Memory)
        .unwrap_or(2)
}

/// Which way QEMU's return path runs through this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReturnPath {
    /// Source: the return path arrives from the peer.
    PeerToLocal,
    /// Destination: the local VMM writes it.
    LocalToPeer,
}

/// How a pump stopped without finishing its direction.
enum Stop {
    /// The other pump failed, or the stream was aborted: nothing to add.
    Stopped,
}

/// One relay, from the moment both ends are known.
pub(super) struct Relay<'a> {
    pub link: &'a Link,
    pub stream: StreamId,
    pub path: &'a Path,
    pub monitor: &'a MonitorInner,
    pub return_path: ReturnPath,
    /// A handle on the socket that only shuts it, to wake the pumps.
    control: UnixStream,
    failed: AtomicBool,
    error: Mutex<Option<StreamError>>,
    /// When the first direction ended; the other must end within [`END_LINGER_TIMEOUT`].
    first_end: Mutex<Option<Instant>>,
}

/// What a relay ended with when both directions ended cleanly.
pub(super) struct RelayEnd {
    pub verdict: Verdict,
    pub return_path_messages: u64,
}

/// Makes the kernel's buffer of `sock` in direction `option` (`SO_SNDBUF`/`SO_RCVBUF`)
/// [`LOCAL_SOCKET_BUFFER_BYTES`] (the kernel doubles the value for its bookkeeping).
fn set_buffer(sock: &UnixStream, option: libc::c_int) -> io::Result<()> {
    let value = libc::c_int::try_from(LOCAL_SOCKET_BUFFER_BYTES).unwrap_or(libc::c_int::MAX);
    // SAFETY: `sock` owns a valid socket fd for the whole call; the option value points
    // at a live c_int whose size is passed with it, and setsockopt only reads it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Readies the VMM's socket for the pumps: small kernel buffers both ways, so the VMM
/// feels the link's pace within a few hundred KiB, and timeouts that slice every blocking
/// call into [`TICK`]s.
pub(super) fn configure_socket(sock: &UnixStream, path: &Path) -> Result<(), StreamError> {
    let err = |op: &'static str| {
        move |source| StreamError::Socket {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    set_buffer(sock, libc::SO_SNDBUF).map_err(err("set SO_SNDBUF"))?;
    set_buffer(sock, libc::SO_RCVBUF).map_err(err("set SO_RCVBUF"))?;
    sock.set_read_timeout(Some(TICK))
        .map_err(err("set the read timeout"))?;
    sock.set_write_timeout(Some(TICK))
        .map_err(err("set the write timeout"))?;
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl<'a> Relay<'a> {
    pub fn new(
        link: &'a Link,
        stream: StreamId,
        path: &'a Path,
        monitor: &'a MonitorInner,
        return_path: ReturnPath,
        sock: &UnixStream,
    ) -> Result<Relay<'a>, StreamError> {
        let control = sock.try_clone().map_err(|source| StreamError::Socket {
            path: path.to_path_buf(),
            op: "clone the socket",
            source,
        })?;
        Ok(Relay {
            link,
            stream,
            path,
            monitor,
            return_path,
            control,
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            first_end: Mutex::new(None),
        })
    }

    /// Runs both pumps until both directions ended or one failed.
    pub fn run(&self, sock: UnixStream) -> Result<RelayEnd, StreamError> {
        let up_sock = sock.try_clone().map_err(|source| StreamError::Socket {
            path: self.path.to_path_buf(),
            op: "clone the socket",
            source,
        })?;
        self.monitor.set_phase(StreamPhase::Streaming);
        let (up, down) = thread::scope(|s| {
            let up = thread::Builder::new()
                .name("strait-mem-up".into())
                .spawn_scoped(s, || self.pump_up(up_sock));
            let up = match up {
                Ok(handle) => handle,
                Err(source) => {
                    self.fail(StreamError::Spawn { source });
                    return (Err(Stop::Stopped), Err(Stop::Stopped));
                }
            };
            let down = self.pump_down(sock);
            let up = up.join().unwrap_or_else(|_| {
                self.fail(StreamError::Panicked);
                Err(Stop::Stopped)
            });
            (up, down)
        });
        if let Some(error) = self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(error);
        }
        match (up, down) {
            (Ok(a), Ok(b)) => {
                let observer = a.or(b);
                Ok(RelayEnd {
                    verdict: observer.as_ref().map_or(Verdict::Pending, |o| o.verdict()),
                    return_path_messages: observer.as_ref().map_or(0, |o| o.messages()),
                })
            }
            // Stopped without an error of its own: only an abort does that.
            _ => Err(StreamError::Aborted {
                reason: self
                    .monitor
                    .abort_reason()
                    .unwrap_or_else(|| "stopped".to_owned()),
            }),
        }
    }

    /// Records the stream's first error and wakes both pumps.
    fn fail(&self, error: StreamError) -> Stop {
        {
            let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() && !self.monitor.is_aborted() {
                warn!(stream = self.stream, error = %strait_net::error_chain(&error), "memory stream failed");
                *slot = Some(error);
            }
        }
        self.failed.store(true, Ordering::Release);
        if !self.monitor.is_holding() {
            let _ = self.control.shutdown(Shutdown::Both);
        }
        Stop::Stopped
    }

    /// Fails if the stream was stopped, or if the other direction ended too long ago.
    fn check(&self, this_way: &'static str) -> Result<(), Stop> {
        if self.failed.load(Ordering::Acquire) || self.monitor.is_aborted() {
            return Err(Stop::Stopped);
        }
        let first_end = *self.first_end.lock().unwrap_or_else(|e| e.into_inner());
        if first_end.is_some_and(|t| t.elapsed() > END_LINGER_TIMEOUT) {
            return Err(self.fail(StreamError::EndTimeout {
                waiting_for: this_way,
                timeout: END_LINGER_TIMEOUT,
            }));
        }
        Ok(())
    }

    fn ended(&self, way: &'static str) {
        debug!(stream = self.stream, way, "memory stream direction ended");
        let mut first_end = self.first_end.lock().unwrap_or_else(|e| e.into_inner());
        if first_end.is_none() {
            *first_end = Some(Instant::now());
            self.monitor.set_phase(StreamPhase::Ending);
        }
    }

    fn send(&self, payload: Vec<u8>) -> Result<(), Stop> {
        match self
            .link
            .send(StreamClass::Memory, payload, LINK_SEND_TIMEOUT)
        {
            Ok(_) => Ok(()),
            Err(LinkError::SendTimeout { timeout, .. }) => {
                Err(self.fail(StreamError::LinkStalled { timeout }))
            }
            Err(source) => Err(self.fail(StreamError::Link {
                op: "send",
                source: Box::new(source),
            })),
        }
    }

    /// Waits until the link has put on the wire all but [`LINK_UNSENT_BYTES_MAX`] of what
    /// this class gave it: the VMM's bytes wait in its own socket, not in ours, so its
    /// rate estimate sees the WAN.
    fn wait_for_room(&self) -> Result<(), Stop> {
        let started = Instant::now();
        let index = memory_index();
        loop {
            let stats = self.link.stats();
            let class = &stats.send[index];
            let unsent = (class.acked_bytes + class.backlog_bytes).saturating_sub(class.sent_bytes);
            if unsent < LINK_UNSENT_BYTES_MAX {
                break;
            }
            self.check("the local VMM's stream")?;
            if started.elapsed() > LINK_STALL_TIMEOUT {
                return Err(self.fail(StreamError::LinkStalled {
                    timeout: LINK_STALL_TIMEOUT,
                }));
            }
            thread::sleep(PACE_POLL);
        }
        let waited = started.elapsed();
        if waited >= LONG_WAIT {
            let stats = self.link.stats();
            let class = &stats.send[index];
            tracing::debug!(
                waited_ms = waited.as_millis() as u64,
                sent = class.sent_bytes,
                acked = class.acked_bytes,
                backlog = class.backlog_bytes,
                "the link took no memory bytes for a while"
            );
        }
        MonitorInner::add_ns(&self.monitor.held_back_ns, waited);
        Ok(())
    }

    /// Local VMM → link, until the VMM closes its end.
    fn pump_up(&self, mut sock: UnixStream) -> Result<Option<ReturnPathObserver>, Stop> {
        let mut observer =
            (self.return_path == ReturnPath::LocalToPeer).then(ReturnPathObserver::new);
        let mut payload = Vec::new();
        loop {
            self.check("the local VMM's stream")?;
            if payload.is_empty() {
                payload = vec![0u8; HEADER_BYTES + PIECE_BYTES];
            }
            let n = match sock.read(&mut payload[HEADER_BYTES..]) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => continue,
                Err(source) => {
                    self.check("the local VMM's stream")?;
                    return Err(self.fail(StreamError::VmmRead {
                        path: self.path.to_path_buf(),
                        source,
                    }));
                }
            };
            if n == 0 {
                // Our own shutdown (a failure or an abort) also reads as an end.
                self.check("the local VMM's stream")?;
                break;
            }
            payload.truncate(HEADER_BYTES + n);
            if payload.capacity() > 2 * payload.len() {
                // The link keeps a payload until the peer acks it: not with 256 KiB of
                // spare capacity behind a few bytes.
                payload.shrink_to_fit();
            }
            let filled = protocol::fill_data_header(&mut payload, self.stream);
            debug_assert!(filled, "a piece is 1..=DATA_BYTES_MAX bytes");
            if let Some(o) = observer.as_mut() {
                o.observe(&payload[HEADER_BYTES..]);
            }
            self.wait_for_room()?;
            self.send(std::mem::take(&mut payload))?;
            self.monitor.count(true, n as u64);
            if observer
                .as_ref()
                .is_some_and(|o| o.verdict() == Verdict::Loaded)
            {
                self.monitor.set_loaded();
            }
        }
        self.send(
            Message::End {
                stream: self.stream,
            }
            .encode(),
        )?;
        self.ended("local VMM to peer");
        Ok(observer)
    }

    /// Link → local VMM, until the peer's `End`.
    fn pump_down(&self, mut sock: UnixStream) -> Result<Option<ReturnPathObserver>, Stop> {
        let mut observer =
            (self.return_path == ReturnPath::PeerToLocal).then(ReturnPathObserver::new);
        loop {
            self.check("the peer's stream")?;
            let payload = match self.link.recv(StreamClass::Memory, TICK) {
                Ok(Some(payload)) => payload,
                Ok(None) => continue,
                Err(source) => {
                    return Err(self.fail(StreamError::Link {
                        op: "receive",
                        source: Box::new(source),
                    }))
                }
            };
            let done = self.on_payload(&payload, &mut sock, observer.as_mut());
            // The peer's credit comes back once the VMM took the bytes, so the window
            // between the engines is the link's, not an extra buffer here.
            let _ = self
                .link
                .mark_applied(StreamClass::Memory, payload.len() as u64);
            if done? {
                break;
            }
        }
        if let Err(e) = sock.shutdown(Shutdown::Write) {
            // The VMM may have closed its end already (the destination QEMU does, right
            // after it confirmed the load): nothing left to tell it.
            if e.kind() != io::ErrorKind::NotConnected {
                return Err(self.fail(StreamError::VmmWrite {
                    path: self.path.to_path_buf(),
                    source: e,
                }));
            }
        }
        self.ended("peer to local VMM");
        Ok(observer)
    }

    /// Acts on one payload from the peer; `Ok(true)` at the peer's `End`.
    fn on_payload(
        &self,
        payload: &[u8],
        sock: &mut UnixStream,
        observer: Option<&mut ReturnPathObserver>,
    ) -> Result<bool, Stop> {
        let message = match protocol::decode(payload) {
            Ok(m) => m,
            Err(e) => return Err(self.fail(StreamError::Malformed(e))),
        };
        if message.stream() != self.stream {
            self.monitor.stale_messages.fetch_add(1, Ordering::Relaxed);
            debug!(
                stream = message.stream(),
                current = self.stream,
                "discarded a message of another stream"
            );
            return Ok(false);
        }
        match message {
            Message::Start { .. } => Err(self.fail(StreamError::Unexpected {
                what: "Start in the middle of a stream",
            })),
            Message::Data { bytes, .. } => {
                let mut loaded = false;
                if let Some(o) = observer {
                    o.observe(bytes);
                    loaded = o.verdict() == Verdict::Loaded;
                }
                self.write_local(sock, bytes)?;
                self.monitor.count(false, bytes.len() as u64);
                if loaded {
                    self.monitor.set_loaded();
                }
                Ok(false)
            }
            Message::End { .. } => Ok(true),
            Message::Abort { reason, .. } => Err(self.fail(StreamError::PeerAborted { reason })),
        }
    }

    /// Writes all of `bytes` to the VMM, failing if it takes nothing for
    /// [`LOCAL_WRITE_STALL_TIMEOUT`].
    fn write_local(&self, sock: &mut UnixStream, bytes: &[u8]) -> Result<(), Stop> {
        let started = Instant::now();
        let mut progress_at = started;
        let mut offset = 0;
        while offset < bytes.len() {
            self.check("the peer's stream")?;
            match sock.write(&bytes[offset..]) {
                Ok(0) => {
                    return Err(self.fail(StreamError::VmmWrite {
                        path: self.path.to_path_buf(),
                        source: io::ErrorKind::WriteZero.into(),
                    }))
                }
                Ok(n) => {
                    offset += n;
                    progress_at = Instant::now();
                }
                Err(e) if is_timeout(&e) => {
                    if progress_at.elapsed() > LOCAL_WRITE_STALL_TIMEOUT {
                        return Err(self.fail(StreamError::VmmStalled {
                            path: self.path.to_path_buf(),
                            timeout: LOCAL_WRITE_STALL_TIMEOUT,
                        }));
                    }
                }
                Err(source) => {
                    self.check("the peer's stream")?;
                    return Err(self.fail(StreamError::VmmWrite {
                        path: self.path.to_path_buf(),
                        source,
                    }));
                }
            }
        }
        MonitorInner::add_ns(&self.monitor.local_write_wait_ns, started.elapsed());
        Ok(())
    }
}
