//! A blocking-threads driver of [`SessionCore`] over TCP, with mutual TLS unless the
//! caller explicitly chose plain TCP (`tls: None`, the operator's `--insecure`).
//!
//! Each connection has a reader thread (socket → TLS → `on_bytes`) and a writer thread
//! (`poll_transmit` → TLS → socket); a timer thread runs `on_timer`, dials with the
//! core's backoff (dialer) or accepts (acceptor). The core sits behind one mutex, and one
//! condition variable wakes every waiter on any change. No thread holds the core's lock
//! or a TLS lock across a socket call, so two peers whose socket buffers are full cannot
//! deadlock: the writer encodes TLS records into memory under the lock and writes them
//! after releasing it.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, info, warn};

use super::{
    ConnId, SessionConfig, SessionCore, SessionError, SessionEvent, SessionState, SessionStats,
    MAX_CONNECTIONS, MIN_CONNECTIONS,
};
use crate::protocol::{CloseReason, ResumeToken, SessionId, RESUME_TOKEN_BYTES, SESSION_ID_BYTES};
use crate::tls::{self, TlsError, TlsIdentity};
use crate::{error_chain, StreamClass};

mod sockopt;
mod wire_bound;
use sockopt::{congestion_control, set_congestion_control, size_send_buffer, wire_info};
use wire_bound::WireBound;

/// Bytes read from a socket at once: a few TLS records, and an eighth of a 1 MiB frame.
const READ_BUF_BYTES: usize = 128 << 10;

/// Longest wait for a TCP connect: a SYN retried over a 250 ms RTT path succeeds well
/// within it, and a dead address does not hold a dial slot for long.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Most a waiting thread sleeps before looking again, as a net under any missed
/// notification; short enough that shutdown is prompt.
const WAIT_TICK: Duration = Duration::from_millis(50);

/// Longest `connect`/`accept` waits for the session's first handshake.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection attempts that may fail before the session opened, before `connect` gives
/// up: a refused certificate or an incompatible peer fails every time, so a few tries
/// (about 0.3 s of backoff) tell that apart from a single unlucky reset.
pub const OPEN_ATTEMPTS_MAX: u32 = 3;

/// Longest `close` waits for its `Close` frames to reach the sockets: a local write,
/// so this only matters when a socket is stuck with a full buffer. It also bounds how
/// long a connection the session closed may take to write its last frames and how long
/// a finished link waits for the peer's end of stream before shutting its sockets.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// Most bytes one connection's socket may hold on the network or unsent, as `TCP_INFO`
/// shows them, before its writer takes no new data (with [`Link::set_latency_bound`] on,
/// a connection keeps less: its measured bandwidth-delay product and a quarter, see
/// `tcp/wire_bound.rs`). Four connections × 10 MiB = 40 MiB: 1.5 times the 27 MiB
/// bandwidth-delay product of 1 Gbit/s × 214 ms, so the pipe stays full through BBR's
/// probing cycles, yet below that BDP plus a router queue of one BDP (54 MiB). Without
/// it, four BBR flows starting together overshoot into the queue and lose thousands of
/// packets (measured: 95 000 queue drops in 10 s at 214 ms, goodput 0.88 instead of 0.92).
/// Unlike [`super::CONN_INFLIGHT_BYTES_MAX`] it does not count data the peer's TCP holds behind a
/// hole, so a connection repairing a loss keeps sending.
pub const CONN_WIRE_BYTES_MAX: u64 = 10 << 20;

/// How often a writer whose connection is at its wire bound looks again: the
/// kernel does not signal acks to user space, and 1 ms is 1/214 of the RTT, so the
/// connection is refilled long before its pipe drains.
const WIRE_FULL_POLL: Duration = Duration::from_millis(1);

/// `TCP_NOTSENT_LOWAT`: the socket takes new data only while less than this is unsent.
/// Unsent data belongs in the session's queue, where any connection with room can take
/// it, not in one socket that a loss just slowed: one transmit batch (256 KiB).
const NOTSENT_LOWAT_BYTES: u64 = super::TRANSMIT_BATCH_BYTES as u64;

/// How often the acceptor polls its non-blocking listener: fast enough that a rejoining
/// dialer waits a negligible fraction of an RTT, cheap when idle.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// Why a link operation failed.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The session is configured wrongly or failed.
    #[error("session failed")]
    Session(#[from] SessionError),
    /// A socket operation failed.
    #[error("{op} failed")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The TLS setup failed.
    #[error("TLS setup failed")]
    Tls(#[from] TlsError),
    /// No session was established within [`OPEN_TIMEOUT`]: the first connection failed
    /// or the peer never answered.
    #[error("no session established within {timeout:?}: {last_error}")]
    OpenTimeout {
        /// The wait.
        timeout: Duration,
        /// The last connection failure seen, if any.
        last_error: String,
    },
    /// Every attempt to open the session failed.
    #[error("could not open the session after {attempts} attempts: {last_error}")]
    OpenFailed {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
    /// The payload was refused.
    #[error("send refused")]
    Send(#[from] super::SendError),
    /// The class's send buffer stayed full for the whole timeout.
    #[error("{class:?} send buffer stayed full for {timeout:?}")]
    SendTimeout {
        /// The class.
        class: StreamClass,
        /// The wait.
        timeout: Duration,
    },
    /// The link was closed by this side.
    #[error("link closed")]
    Closed,
    /// The session finished gracefully ([`Link::finish`] on either side) and every
    /// payload received was already returned: nothing more will arrive.
    #[error("link finished")]
    Finished,
    /// [`Link::finish`] did not see both sides finish within its timeout.
    #[error("session did not finish within {timeout:?} ({unacked_bytes} bytes still unacked)")]
    FinishTimeout {
        /// The wait.
        timeout: Duration,
        /// Bytes this side sent or queued that the peer had not acked.
        unacked_bytes: u64,
    },
}

enum Transport {
    Plain,
    // Boxed: the TLS state is over a kilobyte, and a plain link should not carry it.
    Tls(Box<Mutex<rustls::Connection>>),
}

struct ConnHandle {
    sock: TcpStream,
    /// The session closed this connection at this instant: its writer hands out the
    /// last frames, then ends the stream; the timer thread shuts the socket if that
    /// takes longer than [`CLOSE_FLUSH_TIMEOUT`].
    closing_since: Option<Instant>,
}

struct Inner {
    core: SessionCore,
    conns: BTreeMap<ConnId, ConnHandle>,
    next_conn: u64,
    connected: bool,
    failed: Option<SessionError>,
    last_conn_error: Option<String>,
    /// Connections or dials that failed before the session opened.
    open_failures: u32,
    closed: bool,
    threads_running: usize,
    /// Dial threads that have not yet registered their connection or failed.
    dials_in_flight: usize,
    /// Writer threads between taking bytes from the core and finishing the write.
    writes_in_progress: usize,
}

struct Shared {
    inner: Mutex<Inner>,
    cond: Condvar,
    start: Instant,
    /// Whether writers hold each connection to its measured [`WireBound`] (true) or only to
    /// [`CONN_WIRE_BYTES_MAX`]: [`Link::set_latency_bound`].
    latency_bound: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicked thread leaves the core as it was between calls: carry on with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Inner>, timeout: Duration) -> MutexGuard<'a, Inner> {
        match self.cond.wait_timeout(guard, timeout) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        }
    }
}

impl Inner {
    /// Acts on the core's events: closes the sockets it gave up on.
    fn pump_events(&mut self) {
        while let Some(event) = self.core.poll_event() {
            match event {
                SessionEvent::Connected => self.connected = true,
                SessionEvent::Resumed {
                    retransmitted_bytes,
                } => {
                    info!(retransmitted_bytes, "link resumed");
                }
                SessionEvent::ConnectionClosed { conn, reason } => {
                    debug!(conn = conn.0, %reason, "session closed a connection");
                    self.last_conn_error = Some(reason.to_string());
                    // Not shut at once: the writer may hold the last frames (a `Refuse`
                    // or `Close`) taken with this event; it ends the stream after them.
                    if let Some(h) = self.conns.get_mut(&conn) {
                        h.closing_since.get_or_insert_with(Instant::now);
                    }
                }
                SessionEvent::Closed => info!("link finished"),
                SessionEvent::Failed { reason } => {
                    self.failed = Some(reason);
                    for h in self.conns.values() {
                        let _ = h.sock.shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }
}

enum Endpoint {
    Dial {
        addr: SocketAddr,
        client: Option<Arc<rustls::ClientConfig>>,
    },
    Listen {
        listener: TcpListener,
        server: Option<Arc<rustls::ServerConfig>>,
    },
}

/// One session over TCP; see the module documentation.
pub struct Link {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], LinkError> {
    let mut out = [0; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .map_err(|source| LinkError::Io {
            op: "read /dev/urandom",
            source,
        })?;
    // All zeroes means "none" on the wire; 2^-128 odds, but never send it.
    out[0] |= 1;
    Ok(out)
}

impl Link {
    /// Dials `addr` and opens a session striped over `connections` connections, with
    /// mutual TLS unless `tls` is `None`. Returns once the first handshake completed.
    pub fn connect(
        addr: SocketAddr,
        connections: u16,
        tls: Option<&TlsIdentity>,
        mut config: SessionConfig,
    ) -> Result<Link, LinkError> {
        config.connections = connections;
        let client = tls.map(TlsIdentity::client_config).transpose()?;
        let id = SessionId(random_bytes::<SESSION_ID_BYTES>()?);
        let core = SessionCore::dialer(config, id, 0)?;
        Link::start(core, Endpoint::Dial { addr, client })
    }

    /// Like [`Link::connect`], but the session chooses its connection count: it starts
    /// with [`MIN_CONNECTIONS`] and doubles up to [`MAX_CONNECTIONS`] while each doubling
    /// raises the measured drain rate with data waiting (see
    /// [`SessionConfig::connections_grow_max`]). The count chosen is
    /// [`SessionStats::connections_target`].
    pub fn connect_auto(
        addr: SocketAddr,
        tls: Option<&TlsIdentity>,
        mut config: SessionConfig,
    ) -> Result<Link, LinkError> {
        config.connections_grow_max = MAX_CONNECTIONS;
        Link::connect(addr, MIN_CONNECTIONS, tls, config)
    }

    /// Accepts one session on `listener`, with mutual TLS unless `tls` is `None`.
    /// Returns once a dialer opened it; connections that fail TLS or the handshake are
    /// logged and dropped while it waits.
    pub fn accept(
        listener: TcpListener,
        tls: Option<&TlsIdentity>,
        config: SessionConfig,
    ) -> Result<Link, LinkError> {
        let server = tls.map(TlsIdentity::server_config).transpose()?;
        let token = ResumeToken(random_bytes::<RESUME_TOKEN_BYTES>()?);
        let core = SessionCore::acceptor(config, token, 0)?;
        listener
            .set_nonblocking(true)
            .map_err(|source| LinkError::Io {
                op: "set listener non-blocking",
                source,
            })?;
        Link::start(core, Endpoint::Listen { listener, server })
    }

    fn start(core: SessionCore, endpoint: Endpoint) -> Result<Link, LinkError> {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                core,
                conns: BTreeMap::new(),
                next_conn: 0,
                connected: false,
                failed: None,
                last_conn_error: None,
                open_failures: 0,
                closed: false,
                threads_running: 1,
                dials_in_flight: 0,
                writes_in_progress: 0,
            }),
            cond: Condvar::new(),
            start: Instant::now(),
            latency_bound: AtomicBool::new(false),
        });
        let s = shared.clone();
        thread::Builder::new()
            .name("strait-link-timer".into())
            .spawn(move || timer_thread(&s, endpoint))
            .map_err(|source| LinkError::Io {
                op: "spawn timer thread",
                source,
            })?;
        let link = Link { shared };
        let deadline = Instant::now() + OPEN_TIMEOUT;
        let mut g = link.shared.lock();
        loop {
            if g.connected {
                break;
            }
            if let Some(reason) = g.failed.clone() {
                return Err(LinkError::Session(reason));
            }
            if g.open_failures >= OPEN_ATTEMPTS_MAX {
                return Err(LinkError::OpenFailed {
                    attempts: g.open_failures,
                    last_error: g.last_conn_error.clone().unwrap_or_default(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LinkError::OpenTimeout {
                    timeout: OPEN_TIMEOUT,
                    last_error: g.last_conn_error.clone().unwrap_or_default(),
                });
            }
            g = link.shared.wait(g, (deadline - now).min(WAIT_TICK));
        }
        drop(g);
        Ok(link)
    }

    /// Queues `payload` on `class`, waiting up to `timeout` for room in its buffer.
    pub fn send(
        &self,
        class: StreamClass,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<u64, LinkError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if g.closed {
                return Err(LinkError::Closed);
            }
            if let Some(reason) = g.failed.clone() {
                return Err(LinkError::Session(reason));
            }
            if g.core.can_send(class, payload.len()) {
                let result = g.core.send(class, payload);
                drop(g);
                self.shared.cond.notify_all();
                return result.map_err(LinkError::from);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LinkError::SendTimeout { class, timeout });
            }
            g = self.shared.wait(g, (deadline - now).min(WAIT_TICK));
        }
    }

    /// The next payload of `class`, waiting up to `timeout`; `Ok(None)` on timeout.
    /// Call [`Link::mark_applied`] once it is applied, or the peer runs out of credit.
    pub fn recv(
        &self,
        class: StreamClass,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, LinkError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if let Some(payload) = g.core.recv(class) {
                return Ok(Some(payload));
            }
            if let Some(reason) = g.failed.clone() {
                return Err(LinkError::Session(reason));
            }
            if g.closed {
                return Err(LinkError::Closed);
            }
            if g.core.state() == &SessionState::Closed {
                return Err(LinkError::Finished);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            g = self.shared.wait(g, (deadline - now).min(WAIT_TICK));
        }
    }

    /// The application applied `bytes` more of `class`: opens the peer's window.
    pub fn mark_applied(
        &self,
        class: StreamClass,
        bytes: u64,
    ) -> Result<(), super::AppliedBeyondReceived> {
        let result = self.shared.lock().core.mark_applied(class, bytes);
        self.shared.cond.notify_all();
        result
    }

    /// Holds every connection to its measured bandwidth-delay product and a quarter (see
    /// `tcp/wire_bound.rs`) instead of [`CONN_WIRE_BYTES_MAX`], while `on`.
    ///
    /// For a phase whose last bytes someone waits for, such as a migration's memory
    /// stream: bytes queued in the sockets and the bottleneck go ahead of them. The
    /// price is a little throughput on a long fat path (measured at 1 Gbit/s and 214 ms:
    /// goodput 0.86-0.87 of the rate, against 0.90-0.94 without), so bulk work leaves it
    /// off. While it is on, the connections also run CUBIC instead of the host's
    /// congestion control (`BOUNDED_CONGESTION`: BBR's PROBE_RTT stops them all at
    /// once for half a second every 10 s under the bound), and get their own back after.
    pub fn set_latency_bound(&self, on: bool) {
        if self.shared.latency_bound.swap(on, Ordering::Relaxed) != on {
            info!(on, "latency bound on the link's connections");
            // The writers switch their congestion control at their next look.
            self.shared.cond.notify_all();
        }
    }

    /// The session's counters.
    pub fn stats(&self) -> SessionStats {
        self.shared.lock().core.stats()
    }

    /// Waits until everything sent was acked, up to `timeout`; false on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        while !g.core.is_send_idle() {
            let now = Instant::now();
            if now >= deadline || g.failed.is_some() {
                return false;
            }
            g = self.shared.wait(g, (deadline - now).min(WAIT_TICK));
        }
        true
    }

    /// Finishes the session gracefully (step 9 of [`crate::protocol`]): refuses further
    /// sends, waits until the peer acked everything this side sent and the peer finished
    /// too (it does so on its own once its sends are acked), then closes the link. On
    /// success the peer received every byte and both sides report
    /// [`SessionState::Closed`]. Waits up to `timeout` for the exchange.
    pub fn finish(&self, timeout: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        g.core.close_gracefully();
        drop(g);
        self.shared.cond.notify_all();
        g = self.shared.lock();
        while g.core.state() != &SessionState::Closed {
            if let Some(reason) = g.failed.clone() {
                return Err(LinkError::Session(reason));
            }
            if g.closed {
                return Err(LinkError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                let unacked_bytes = g.core.stats().send.iter().map(|s| s.backlog_bytes).sum();
                return Err(LinkError::FinishTimeout {
                    timeout,
                    unacked_bytes,
                });
            }
            g = self.shared.wait(g, (deadline - now).min(WAIT_TICK));
        }
        drop(g);
        self.close();
        Ok(())
    }

    /// The session's state.
    pub fn state(&self) -> SessionState {
        self.shared.lock().core.state().clone()
    }

    /// Shuts every connection's socket down, as a network fault would: for fault drills
    /// and tests. The session resumes over new connections. Returns how many were cut.
    pub fn kill_connections(&self) -> usize {
        let g = self.shared.lock();
        for h in g.conns.values() {
            let _ = h.sock.shutdown(Shutdown::Both);
        }
        g.conns.len()
    }

    /// Closes the link: every connection is shut and the threads end. Once the session
    /// finished ([`Link::finish`]) this is quiet; otherwise the peer is told
    /// `Close { Shutdown }` and fails at once.
    pub fn close(&self) {
        let mut g = self.shared.lock();
        if !g.closed && g.core.state() == &SessionState::Closed {
            // Let the writers hand the last `Close` to the sockets and end the streams,
            // and the readers see the peer's end, so no socket is closed with unread
            // data (which would reset it and could discard our last frames).
            let deadline = Instant::now() + CLOSE_FLUSH_TIMEOUT;
            while !g.conns.is_empty() && Instant::now() < deadline {
                g = self.shared.wait(g, WAIT_TICK);
            }
        } else if !g.closed && g.failed.is_none() {
            // Tell the peer, so it fails at once instead of after its resume window.
            g.core.close(CloseReason::Shutdown);
            drop(g);
            self.shared.cond.notify_all();
            let deadline = Instant::now() + CLOSE_FLUSH_TIMEOUT;
            g = self.shared.lock();
            while (g.core.has_unsent_control() || g.writes_in_progress > 0)
                && Instant::now() < deadline
            {
                g = self.shared.wait(g, WAIT_TICK);
            }
        }
        g.closed = true;
        for h in g.conns.values() {
            let _ = h.sock.shutdown(Shutdown::Both);
        }
        drop(g);
        self.shared.cond.notify_all();
        let deadline = Instant::now() + WAIT_TICK * 20;
        let mut g = self.shared.lock();
        while g.threads_running > 0 && Instant::now() < deadline {
            g = self.shared.wait(g, WAIT_TICK);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

fn timer_thread(shared: &Arc<Shared>, endpoint: Endpoint) {
    let mut g = shared.lock();
    while !g.closed {
        let now_ns = shared.now_ns();
        let deadline_passed = g.core.poll_timeout().is_some_and(|t| t <= now_ns);
        g.core.on_timer(now_ns);
        g.pump_events();
        if deadline_passed {
            // A due ack, report or ping leaves through a writer: wake them.
            shared.cond.notify_all();
        }
        for h in g.conns.values() {
            if h.closing_since
                .is_some_and(|t| t.elapsed() >= CLOSE_FLUSH_TIMEOUT)
            {
                let _ = h.sock.shutdown(Shutdown::Both);
            }
        }
        if g.failed.is_some() {
            break;
        }
        match &endpoint {
            Endpoint::Dial { addr, client } => {
                let missing = g.core.connections_missing(now_ns);
                for _ in g.dials_in_flight..missing {
                    // Dial off this thread and in parallel: a connect plus a TLS handshake
                    // take two RTTs, and each connection's slow start should begin now.
                    let conn = ConnId(g.next_conn);
                    g.next_conn += 1;
                    g.threads_running += 1;
                    g.dials_in_flight += 1;
                    let (s, addr, client) = (shared.clone(), *addr, client.clone());
                    let spawned = thread::Builder::new()
                        .name("strait-link-dial".into())
                        .spawn(move || dial_one(&s, conn, addr, client));
                    if spawned.is_err() {
                        g.threads_running -= 1;
                        g.dials_in_flight -= 1;
                        break;
                    }
                }
            }
            Endpoint::Listen { listener, server } => {
                if let Ok((sock, peer)) = listener.accept() {
                    let conn = ConnId(g.next_conn);
                    g.next_conn += 1;
                    g.threads_running += 1;
                    let (s, server) = (shared.clone(), server.clone());
                    // The TLS handshake may take an RTT or a timeout: not on this thread.
                    let spawned = thread::Builder::new()
                        .name("strait-link-accept".into())
                        .spawn(move || accept_one(&s, conn, sock, peer, server));
                    if spawned.is_err() {
                        g.threads_running -= 1;
                    }
                    continue;
                }
            }
        }
        let wait = match (&endpoint, g.core.poll_timeout()) {
            (Endpoint::Listen { .. }, _) => ACCEPT_POLL,
            (_, Some(t)) => Duration::from_nanos(t.saturating_sub(now_ns)).min(WAIT_TICK),
            (_, None) => WAIT_TICK,
        };
        g = shared.wait(g, wait.max(Duration::from_micros(100)));
    }
    g.threads_running -= 1;
    drop(g);
    shared.cond.notify_all();
}

fn accept_one(
    shared: &Arc<Shared>,
    conn: ConnId,
    sock: TcpStream,
    peer: SocketAddr,
    server: Option<Arc<rustls::ServerConfig>>,
) {
    let result = sock
        .set_nonblocking(false)
        .and_then(|()| sock.set_nodelay(true))
        .map(|()| size_send_buffer(&sock))
        .map_err(|source| LinkError::Io {
            op: "configure accepted socket",
            source,
        })
        .and_then(|()| match server {
            None => Ok((sock, Transport::Plain)),
            Some(config) => {
                let stream = tls::accept(config, sock)?;
                Ok((
                    stream.sock,
                    Transport::Tls(Box::new(Mutex::new(stream.conn.into()))),
                ))
            }
        });
    let mut g = shared.lock();
    g.threads_running -= 1;
    match result {
        Ok((sock, transport)) if !g.closed => register(shared, &mut g, conn, sock, transport),
        Ok(_) => {}
        Err(e) => {
            warn!(%peer, error = %error_chain(&e), "refused a connection");
            g.last_conn_error = Some(error_chain(&e));
        }
    }
    drop(g);
    shared.cond.notify_all();
}

fn dial_one(
    shared: &Arc<Shared>,
    conn: ConnId,
    addr: SocketAddr,
    client: Option<Arc<rustls::ClientConfig>>,
) {
    let dialed = dial(addr, client.as_ref());
    let mut g = shared.lock();
    g.threads_running -= 1;
    g.dials_in_flight -= 1;
    match dialed {
        Ok((sock, transport)) if !g.closed => register(shared, &mut g, conn, sock, transport),
        Ok(_) => {}
        Err(e) => {
            warn!(error = %error_chain(&e), "dial failed");
            g.last_conn_error = Some(error_chain(&e));
            g.open_failures += u32::from(!g.connected);
            g.core.on_connect_failed(shared.now_ns());
        }
    }
    drop(g);
    shared.cond.notify_all();
}

fn dial(
    addr: SocketAddr,
    client: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(TcpStream, Transport), LinkError> {
    let io_err = |op| move |source| LinkError::Io { op, source };
    let sock = TcpStream::connect_timeout(&addr, DIAL_TIMEOUT).map_err(io_err("connect"))?;
    sock.set_nodelay(true).map_err(io_err("set TCP_NODELAY"))?;
    size_send_buffer(&sock);
    match client {
        None => Ok((sock, Transport::Plain)),
        Some(config) => {
            let stream = tls::connect(config.clone(), &addr.ip().to_string(), sock)?;
            Ok((
                stream.sock,
                Transport::Tls(Box::new(Mutex::new(stream.conn.into()))),
            ))
        }
    }
}

/// Hands a connected socket to the core and starts its reader and writer.
fn register(
    shared: &Arc<Shared>,
    g: &mut MutexGuard<'_, Inner>,
    conn: ConnId,
    sock: TcpStream,
    transport: Transport,
) {
    let clones = sock.try_clone().and_then(|r| Ok((r, sock.try_clone()?)));
    let Ok((read_sock, write_sock)) = clones else {
        warn!(
            conn = conn.0,
            "could not clone a socket; dropping the connection"
        );
        g.core.on_connect_failed(shared.now_ns());
        return;
    };
    g.core.on_connection_up(conn, shared.now_ns());
    g.conns.insert(
        conn,
        ConnHandle {
            sock,
            closing_since: None,
        },
    );
    let transport = Arc::new(transport);
    g.threads_running += 2;
    let (s, t) = (shared.clone(), transport.clone());
    let reader = thread::Builder::new()
        .name("strait-link-rx".into())
        .spawn(move || reader_thread(&s, conn, read_sock, &t));
    let (s, t) = (shared.clone(), transport);
    let writer = thread::Builder::new()
        .name("strait-link-tx".into())
        .spawn(move || writer_thread(&s, conn, write_sock, &t));
    if reader.is_err() || writer.is_err() {
        warn!(conn = conn.0, "could not spawn connection threads");
        g.threads_running -= usize::from(reader.is_err()) + usize::from(writer.is_err());
        if let Some(h) = g.conns.remove(&conn) {
            let _ = h.sock.shutdown(Shutdown::Both);
        }
        g.core.on_connection_down(conn, shared.now_ns());
    }
    shared.cond.notify_all();
}

/// Plaintext the TLS layer has decrypted; `Ok(true)` once the peer closed cleanly.
fn drain_plaintext(tls: &mut rustls::Connection, out: &mut Vec<u8>) -> io::Result<bool> {
    let mut buf = [0u8; 16 << 10];
    loop {
        match tls.reader().read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Reads one batch of plaintext; `Ok(None)` at end of stream.
fn read_plain(
    sock: &mut TcpStream,
    transport: &Transport,
    buf: &mut [u8],
) -> io::Result<Option<Vec<u8>>> {
    let n = sock.read(buf)?;
    if n == 0 {
        return Ok(None);
    }
    let Transport::Tls(tls) = transport else {
        return Ok(Some(buf[..n].to_vec()));
    };
    let mut tls = tls.lock().unwrap_or_else(|e| e.into_inner());
    let mut plain = Vec::new();
    let mut rest = &buf[..n];
    while !rest.is_empty() {
        tls.read_tls(&mut rest)?;
        tls.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if drain_plaintext(&mut tls, &mut plain)? {
            break;
        }
    }
    Ok(Some(plain))
}

fn reader_thread(shared: &Arc<Shared>, conn: ConnId, mut sock: TcpStream, transport: &Transport) {
    let mut buf = vec![0u8; READ_BUF_BYTES];
    // Plaintext that arrived with the end of the TLS handshake.
    let mut first = Vec::new();
    if let Transport::Tls(tls) = transport {
        let mut tls = tls.lock().unwrap_or_else(|e| e.into_inner());
        let _ = drain_plaintext(&mut tls, &mut first);
    }
    let mut next = Some(Ok(Some(first)));
    loop {
        let batch = match next.take() {
            Some(b) => b,
            None => read_plain(&mut sock, transport, &mut buf),
        };
        let bytes = match batch {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break,
            Err(e) => {
                let mut g = shared.lock();
                if !g.closed {
                    debug!(conn = conn.0, error = %e, "connection read failed");
                    g.last_conn_error = Some(error_chain(&e));
                }
                break;
            }
        };
        if bytes.is_empty() {
            continue;
        }
        let mut g = shared.lock();
        g.core.on_bytes(conn, &bytes, shared.now_ns());
        g.pump_events();
        drop(g);
        shared.cond.notify_all();
    }
    let _ = sock.shutdown(Shutdown::Both);
    let mut g = shared.lock();
    g.conns.remove(&conn);
    g.open_failures += u32::from(!g.connected);
    g.core.on_connection_down(conn, shared.now_ns());
    g.pump_events();
    g.threads_running -= 1;
    drop(g);
    shared.cond.notify_all();
}

/// The congestion control a connection uses while the latency bound is on
/// ([`Link::set_latency_bound`]).
///
/// BBR (the default on many hosts, and on these machines) enters PROBE_RTT when its
/// lowest RTT has not been seen again for 10 s: the window falls to four packets until
/// the flight drained and 200 ms more, about 0.55 s at 214 ms. Under the latency bound
/// every connection keeps a small standing queue, so the lowest RTT is never seen again,
/// and the connections, which took their lowest RTT at the same empty moment, all enter
/// it together: the link stops for half a second every 10 s, with the bytes in the
/// sockets stuck behind it. Measured with `ss -ti` during a migration at 214 ms (all four
/// connections at `cwnd:4` from 98 to about 600 ms after the stop, 275-320 KB unsent in
/// each), that was the switchover's slow mode (0.9-1.05 s against 0.37-0.55 s).
/// CUBIC has no such probe; the bound keeps its queue to a quarter of the path's RTT,
/// which a bottleneck of one bandwidth-delay product absorbs without loss.
const BOUNDED_CONGESTION: &str = "cubic";

/// What a writer did to its connection's congestion control.
enum Congestion {
    /// The host's choice, untouched.
    Native,
    /// Switched to [`BOUNDED_CONGESTION`] from the named one.
    Bounded(String),
    /// The switch failed (the kernel lacks it, a policy forbids it); not tried again
    /// until the bound is off.
    Refused,
}

impl Congestion {
    /// Follows the latency bound: [`BOUNDED_CONGESTION`] while it is on, the connection's
    /// own afterwards. Best effort: a failure keeps the host's choice, which only costs
    /// the stalls described above.
    fn follow(&mut self, sock: &TcpStream, conn: ConnId, bounded: bool) {
        match (bounded, &*self) {
            (true, Congestion::Native) => {
                let own = congestion_control(sock).unwrap_or_default();
                *self = if own == BOUNDED_CONGESTION {
                    Congestion::Bounded(own)
                } else {
                    match set_congestion_control(sock, BOUNDED_CONGESTION) {
                        Ok(()) => {
                            debug!(conn = conn.0, from = %own, to = BOUNDED_CONGESTION, "congestion control");
                            Congestion::Bounded(own)
                        }
                        Err(error) => {
                            warn!(conn = conn.0, %error, to = BOUNDED_CONGESTION,
                                "cannot switch the congestion control under the latency bound");
                            Congestion::Refused
                        }
                    }
                };
            }
            (false, Congestion::Bounded(own)) => {
                if !own.is_empty() && own != BOUNDED_CONGESTION {
                    if let Err(error) = set_congestion_control(sock, own) {
                        debug!(conn = conn.0, %error, to = %own, "cannot restore the congestion control");
                    }
                }
                *self = Congestion::Native;
            }
            (false, Congestion::Refused) => *self = Congestion::Native,
            _ => {}
        }
    }
}

fn writer_thread(shared: &Arc<Shared>, conn: ConnId, mut sock: TcpStream, transport: &Transport) {
    let mut end_stream = false;
    let mut bound = WireBound::new();
    let mut congestion = Congestion::Native;
    loop {
        let mut g = shared.lock();
        let bytes = loop {
            let Some(h) = g.conns.get(&conn) else {
                break None;
            };
            if g.closed {
                break None;
            }
            let closing = h.closing_since.is_some();
            // Without TCP_INFO the bound is not enforced; the in-flight bound still is.
            // The bound follows the connection's measures either way, so it is ready
            // when asked for.
            let bounded = shared.latency_bound.load(Ordering::Relaxed);
            congestion.follow(&sock, conn, bounded);
            let wire_full = wire_info(&sock).is_some_and(|info| {
                let measured = bound.update(shared.now_ns(), &info);
                let limit = if bounded {
                    measured
                } else {
                    CONN_WIRE_BYTES_MAX
                };
                info.bytes >= limit
            });
            g.core.set_wire_full(conn, wire_full);
            if let Some(bytes) = g.core.poll_transmit(conn) {
                g.pump_events();
                g.writes_in_progress += 1;
                break Some(bytes);
            }
            if closing {
                end_stream = true;
                break None;
            }
            g = shared.wait(g, if wire_full { WIRE_FULL_POLL } else { WAIT_TICK });
        };
        drop(g);
        let Some(bytes) = bytes else {
            break;
        };
        let written = write_all(&mut sock, transport, &bytes);
        shared.lock().writes_in_progress -= 1;
        shared.cond.notify_all();
        if let Err(e) = written {
            debug!(conn = conn.0, error = %e, "connection write failed");
            break;
        }
    }
    if end_stream {
        // The session closed this connection after its last frames: end the stream
        // cleanly (TLS close_notify, then FIN) and let the reader drain until the peer
        // ends its own, so nothing unread resets the connection under our last frames.
        let _ = end_tls(&mut sock, transport);
        let _ = sock.shutdown(Shutdown::Write);
    } else {
        // The reader sees the shutdown and reports the connection down.
        let _ = sock.shutdown(Shutdown::Both);
    }
    let mut g = shared.lock();
    g.threads_running -= 1;
    drop(g);
    shared.cond.notify_all();
}

/// Sends TLS close_notify, if the connection has TLS.
fn end_tls(sock: &mut TcpStream, transport: &Transport) -> io::Result<()> {
    let Transport::Tls(tls) = transport else {
        return Ok(());
    };
    let mut records = Vec::new();
    {
        let mut tls = tls.lock().unwrap_or_else(|e| e.into_inner());
        tls.send_close_notify();
        while tls.wants_write() {
            tls.write_tls(&mut records)?;
        }
    }
    sock.write_all(&records)
}

fn write_all(sock: &mut TcpStream, transport: &Transport, bytes: &[u8]) -> io::Result<()> {
    let Transport::Tls(tls) = transport else {
        return sock.write_all(bytes);
    };
    let records = {
        let mut tls = tls.lock().unwrap_or_else(|e| e.into_inner());
        let mut records = Vec::with_capacity(bytes.len() + bytes.len() / 64 + 64);
        let mut rest = bytes;
        // rustls takes plaintext only up to its buffer limit: encrypt as we go.
        while !rest.is_empty() {
            let n = tls.writer().write(rest)?;
            rest = &rest[n..];
            let mut drained = false;
            while tls.wants_write() {
                tls.write_tls(&mut records)?;
                drained = true;
            }
            if n == 0 && !drained {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "TLS took no plaintext",
                ));
            }
        }
        records
    };
    sock.write_all(&records)
}

#[cfg(test)]
mod tests {
    use super::sockopt::tests::connected;
    use super::*;

    #[test]
    fn a_writer_uses_cubic_under_the_latency_bound_and_gives_the_connection_back() {
        let (sock, _peer) = connected();
        // Start from another algorithm than the bound's, whatever the host's default.
        set_congestion_control(&sock, "reno").expect("reno");
        let mut congestion = Congestion::Native;
        congestion.follow(&sock, ConnId(0), false);
        assert_eq!(congestion_control(&sock).expect("read"), "reno");
        congestion.follow(&sock, ConnId(0), true);
        assert_eq!(congestion_control(&sock).expect("read"), BOUNDED_CONGESTION);
        // Looking again changes nothing.
        congestion.follow(&sock, ConnId(0), true);
        assert!(matches!(&congestion, Congestion::Bounded(own) if own == "reno"));
        congestion.follow(&sock, ConnId(0), false);
        assert_eq!(congestion_control(&sock).expect("read"), "reno");
        assert!(matches!(congestion, Congestion::Native));
    }
}
