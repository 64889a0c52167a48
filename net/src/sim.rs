//! A deterministic in-process link for unit and simulation tests.
//!
//! [`SimNet`] stands in for the WAN between two engines, side [`Side::A`] and side
//! [`Side::B`]: simulated TCP connections carry byte chunks with a one-way delay, jitter,
//! a bandwidth, a window, and faults. Nothing depends on the wall clock or on thread
//! timing: time is a [`SimClock`] that moves only when the test steps the simulation, and
//! every random choice comes from one ChaCha stream seeded by the test, so the same seed
//! and the same calls give the same events, byte for byte ([`SimNet::trace_digest`]). A
//! failing seed is a reproducible bug.
//!
//! What is modelled, and why it is modelled that way:
//!
//! - Each connection is FIFO in each direction, like TCP: jitter can reorder chunks
//!   *between* connections, never within one.
//! - TCP never loses bytes silently, so "loss" is a connection that breaks: with
//!   probability [`LinkConfig::loss_per_million`] a send breaks its connection, every
//!   chunk in flight on it (both directions) is lost, and each side learns of it
//!   [`LinkConfig::reset_detect_ns`] later ([`SimEvent::Reset`]). Until then a side's
//!   sends are accepted and vanish, as they would into a dead socket. Chunks that arrived
//!   before the break stay readable.
//! - A partition ([`SimNet::partition`]) breaks every connection when it starts, and no
//!   connection can be opened until it ends.
//! - A window ([`LinkConfig::window_bytes`]) bounds the bytes a direction holds in flight
//!   or unread; the receiver's read frees them one delay later (the ACK's trip back). A
//!   single connection thus carries at most one window per RTT, the reason the link
//!   stripes over several.
//! - Bandwidth serialises each direction of a connection; an optional shared bottleneck
//!   ([`SimConfig::shared_bandwidth_bytes_per_s`]) serialises all connections together.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use thiserror::Error;

/// Most connections one simulation may open; a simulation that opens more is stuck in a
/// reconnect loop, and each connection's state is kept for the whole run.
pub const MAX_SIM_CONNECTIONS: usize = 4096;

/// Most events kept for [`SimNet::poll_event`]. A test that never drains them would grow
/// without end; past this the oldest are dropped and counted
/// ([`SimNet::dropped_event_count`]), while [`SimNet::trace_digest`] still covers them.
pub const MAX_QUEUED_EVENTS: usize = 1 << 16;

const NS_PER_S: u64 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// The simulated time, in nanoseconds since the simulation started. Clones share one
/// clock; only [`SimNet`] advances it.
#[derive(Debug, Clone, Default)]
pub struct SimClock(Arc<AtomicU64>);

impl SimClock {
    /// The current simulated time.
    pub fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn advance_to(&self, t_ns: u64) {
        self.0.fetch_max(t_ns, Ordering::Relaxed);
    }
}

/// One end of the simulated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// One engine.
    A,
    /// The other engine.
    B,
}

impl Side {
    /// The other side.
    pub fn peer(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// Names a simulated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SimConnId(pub u32);

impl fmt::Display for SimConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn{}", self.0)
    }
}

/// The behaviour of one connection (both directions alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// One-way delay.
    pub delay_ns: u64,
    /// Extra delay per chunk, drawn uniformly from `0..=jitter_ns`.
    pub jitter_ns: u64,
    /// Rate at which a direction serialises its chunks; 0 for unlimited.
    pub bandwidth_bytes_per_s: u64,
    /// Bytes a direction may hold sent but not yet read and acknowledged (the TCP window).
    pub window_bytes: u64,
    /// Chance, in millionths, that a send breaks the connection.
    pub loss_per_million: u32,
    /// Round trips before the first byte can leave (TCP and TLS 1.3 handshakes: 2).
    pub handshake_round_trips: u32,
    /// Time from a break until each side sees [`SimEvent::Reset`] (a TCP user timeout or
    /// the session's own liveness timeout).
    pub reset_detect_ns: u64,
}

impl LinkConfig {
    /// The project's target WAN: 150 ms RTT (75 ms each way, ±5 ms jitter), 1 Gbit/s, a
    /// 4 MiB window (Linux's default `tcp_wmem` maximum), no loss, a break seen in 1 s.
    pub fn wan() -> LinkConfig {
        LinkConfig {
            delay_ns: 75 * NS_PER_MS,
            jitter_ns: 5 * NS_PER_MS,
            bandwidth_bytes_per_s: 125_000_000,
            window_bytes: 4 << 20,
            loss_per_million: 0,
            handshake_round_trips: 2,
            reset_detect_ns: NS_PER_S,
        }
    }

    /// No delay, no bandwidth limit, no faults: for tests about something else.
    pub fn ideal() -> LinkConfig {
        LinkConfig {
            delay_ns: 0,
            jitter_ns: 0,
            bandwidth_bytes_per_s: 0,
            window_bytes: u64::MAX,
            loss_per_million: 0,
            handshake_round_trips: 0,
            reset_detect_ns: 0,
        }
    }
}

/// The whole simulated network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// What [`SimNet::connect`] gives a new connection.
    pub link: LinkConfig,
    /// A bottleneck all connections share, per direction; 0 for none.
    pub shared_bandwidth_bytes_per_s: u64,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            link: LinkConfig::wan(),
            shared_bandwidth_bytes_per_s: 125_000_000,
        }
    }
}

/// What happened in the simulation, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SimEvent {
    /// A chunk arrived and can be read with [`SimNet::recv`] by `to`.
    Arrived {
        /// When.
        at_ns: u64,
        /// On which connection.
        conn: SimConnId,
        /// The reading side.
        to: Side,
        /// The chunk's size.
        len: usize,
    },
    /// The connection broke (loss or partition); the sides do not know yet.
    Broken {
        /// When.
        at_ns: u64,
        /// Which connection.
        conn: SimConnId,
    },
    /// `side` saw its connection reset: its sends now fail.
    Reset {
        /// When.
        at_ns: u64,
        /// Which connection.
        conn: SimConnId,
        /// Who noticed.
        side: Side,
    },
    /// The peer of `side` closed the connection; everything it sent has arrived.
    Closed {
        /// When.
        at_ns: u64,
        /// Which connection.
        conn: SimConnId,
        /// Who sees the end of stream.
        side: Side,
    },
    /// A send of `side` was refused for a full window, and the window has room again.
    Writable {
        /// When.
        at_ns: u64,
        /// Which connection.
        conn: SimConnId,
        /// The sender.
        side: Side,
    },
    /// A partition began: every connection broke.
    PartitionStarted {
        /// When.
        at_ns: u64,
    },
    /// A partition ended: connections can be opened again.
    PartitionEnded {
        /// When.
        at_ns: u64,
    },
}

/// A refused simulation call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SimError {
    /// No such connection.
    #[error("{conn} does not exist")]
    UnknownConnection {
        /// The connection named.
        conn: SimConnId,
    },
    /// The side already saw this connection reset.
    #[error("{conn} was reset")]
    Reset {
        /// The connection.
        conn: SimConnId,
    },
    /// The side already closed this connection.
    #[error("{conn} is closed for sending")]
    Closed {
        /// The connection.
        conn: SimConnId,
    },
    /// The window is full; retry after [`SimEvent::Writable`].
    #[error("{conn} window full")]
    WouldBlock {
        /// The connection.
        conn: SimConnId,
    },
    /// A chunk larger than the whole window could never be sent.
    #[error("{len}-byte chunk exceeds the {window_bytes}-byte window of {conn}")]
    ChunkTooLarge {
        /// The connection.
        conn: SimConnId,
        /// The chunk's size.
        len: usize,
        /// The window.
        window_bytes: u64,
    },
    /// No connection can be opened during a partition.
    #[error("network partitioned")]
    Partitioned,
    /// [`MAX_SIM_CONNECTIONS`] reached.
    #[error("more than {MAX_SIM_CONNECTIONS} connections opened")]
    TooManyConnections,
    /// A partition must start no earlier than now and end after it starts.
    #[error("partition {from_ns}..{until_ns} is empty or in the past (now {now_ns})")]
    PartitionInterval {
        /// Requested start.
        from_ns: u64,
        /// Requested end.
        until_ns: u64,
        /// The clock.
        now_ns: u64,
    },
}

/// One direction of one connection, named by its sender.
#[derive(Debug, Default)]
struct Direction {
    /// When the last chunk finishes leaving the sender.
    tx_free_at_ns: u64,
    /// When the last chunk arrives; later chunks arrive no earlier (FIFO).
    last_arrival_ns: u64,
    /// Invariant: <= the connection's `window_bytes`.
    in_window_bytes: u64,
    /// A send was refused for the window; report when it opens.
    blocked: bool,
    /// Arrived at the receiver, not read yet.
    arrived: VecDeque<Vec<u8>>,
}

#[derive(Debug)]
struct Conn {
    config: LinkConfig,
    established_at_ns: u64,
    broken: bool,
    /// Per side: saw the reset / closed its sending direction.
    reset_seen: [bool; 2],
    closed: [bool; 2],
    /// Indexed by sending side.
    dirs: [Direction; 2],
}

// `Ord` only because the queue's tuples need one: the scheduling order before it is
// unique, so two actions are never compared.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Arrive {
        conn: SimConnId,
        from: Side,
        chunk: Vec<u8>,
    },
    ReleaseWindow {
        conn: SimConnId,
        from: Side,
        bytes: u64,
    },
    SeeReset {
        conn: SimConnId,
        side: Side,
    },
    SeeClose {
        conn: SimConnId,
        side: Side,
    },
    PartitionStart,
    PartitionEnd,
}

/// FNV-1a: stable across Rust versions and platforms, unlike `DefaultHasher`.
#[derive(Debug)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The simulated network. See the module documentation for the model.
#[derive(Debug)]
pub struct SimNet {
    config: SimConfig,
    clock: SimClock,
    rng: ChaCha8Rng,
    conns: Vec<Conn>,
    /// (time, scheduling order, action): the order makes equal times deterministic.
    queue: BinaryHeap<Reverse<(u64, u64, Action)>>,
    scheduled_count: u64,
    /// Per sending side: when the shared bottleneck is free again.
    shared_free_at_ns: [u64; 2],
    /// Partitions in force (they may overlap).
    partition_depth: u32,
    events: VecDeque<SimEvent>,
    dropped_event_count: u64,
    digest: Fnv,
}

impl SimNet {
    /// A network at time 0 whose every random choice derives from `seed`.
    pub fn new(seed: u64, config: SimConfig) -> SimNet {
        SimNet {
            config,
            clock: SimClock::default(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            conns: Vec::new(),
            queue: BinaryHeap::new(),
            scheduled_count: 0,
            shared_free_at_ns: [0; 2],
            partition_depth: 0,
            events: VecDeque::new(),
            dropped_event_count: 0,
            digest: Fnv(0xcbf2_9ce4_8422_2325),
        }
    }

    /// A handle on the simulated clock, for the code under test.
    pub fn clock(&self) -> SimClock {
        self.clock.clone()
    }

    /// The simulated time.
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Opens a connection with the default [`SimConfig::link`].
    pub fn connect(&mut self) -> Result<SimConnId, SimError> {
        self.connect_with(self.config.link)
    }

    /// Opens a connection with its own behaviour. It carries data after
    /// [`LinkConfig::handshake_round_trips`]; sends before that wait for it.
    pub fn connect_with(&mut self, config: LinkConfig) -> Result<SimConnId, SimError> {
        if self.partition_depth > 0 {
            return Err(SimError::Partitioned);
        }
        if self.conns.len() >= MAX_SIM_CONNECTIONS {
            return Err(SimError::TooManyConnections);
        }
        let id =
            SimConnId(u32::try_from(self.conns.len()).map_err(|_| SimError::TooManyConnections)?);
        let handshake_ns = config
            .delay_ns
            .saturating_mul(2)
            .saturating_mul(u64::from(config.handshake_round_trips));
        self.conns.push(Conn {
            config,
            established_at_ns: self.now_ns().saturating_add(handshake_ns),
            broken: false,
            reset_seen: [false; 2],
            closed: [false; 2],
            dirs: Default::default(),
        });
        Ok(id)
    }

    /// Sends one chunk from `side` on `conn`. `Ok` means the chunk left, not that it will
    /// arrive: a broken connection swallows it until the side sees the reset.
    pub fn send(&mut self, side: Side, conn: SimConnId, bytes: &[u8]) -> Result<(), SimError> {
        let now_ns = self.now_ns();
        let c = self.conn(conn)?;
        if c.reset_seen[side.index()] {
            return Err(SimError::Reset { conn });
        }
        if c.closed[side.index()] {
            return Err(SimError::Closed { conn });
        }
        let window_bytes = c.config.window_bytes;
        let len = bytes.len() as u64;
        if len > window_bytes {
            return Err(SimError::ChunkTooLarge {
                conn,
                len: bytes.len(),
                window_bytes,
            });
        }
        if c.dirs[side.index()].in_window_bytes + len > window_bytes {
            self.conn_mut(conn)?.dirs[side.index()].blocked = true;
            return Err(SimError::WouldBlock { conn });
        }
        if bytes.is_empty() || c.broken {
            return Ok(());
        }
        let (config, established_at_ns) = (c.config, c.established_at_ns);
        if self.below(1_000_000) < u64::from(config.loss_per_million) {
            self.break_conn(conn);
            return Ok(());
        }
        let shared_bw = self.config.shared_bandwidth_bytes_per_s;
        let bw = [config.bandwidth_bytes_per_s, shared_bw]
            .into_iter()
            .filter(|b| *b > 0)
            .min();
        let jitter_ns = self.below(config.jitter_ns.saturating_add(1));
        let dir = &self.conns[conn.0 as usize].dirs[side.index()];
        let mut start_ns = now_ns.max(established_at_ns).max(dir.tx_free_at_ns);
        if shared_bw > 0 {
            start_ns = start_ns.max(self.shared_free_at_ns[side.index()]);
        }
        let serialise_ns = bw.map_or(0, |bw| {
            let ns = (u128::from(len) * u128::from(NS_PER_S)).div_ceil(u128::from(bw));
            u64::try_from(ns).unwrap_or(u64::MAX)
        });
        let done_ns = start_ns.saturating_add(serialise_ns);
        let arrival_ns = done_ns
            .saturating_add(config.delay_ns)
            .saturating_add(jitter_ns)
            .max(dir.last_arrival_ns);
        if shared_bw > 0 {
            self.shared_free_at_ns[side.index()] = done_ns;
        }
        let dir = &mut self.conns[conn.0 as usize].dirs[side.index()];
        dir.tx_free_at_ns = done_ns;
        dir.last_arrival_ns = arrival_ns;
        dir.in_window_bytes += len;
        self.schedule(
            arrival_ns,
            Action::Arrive {
                conn,
                from: side,
                chunk: bytes.to_vec(),
            },
        );
        Ok(())
    }

    /// The next chunk that arrived for `side` on `conn`, in the order it was sent.
    pub fn recv(&mut self, side: Side, conn: SimConnId) -> Option<Vec<u8>> {
        let now_ns = self.now_ns();
        let c = self.conns.get_mut(conn.0 as usize)?;
        let chunk = c.dirs[side.peer().index()].arrived.pop_front()?;
        if !c.broken {
            let at_ns = now_ns.saturating_add(c.config.delay_ns);
            let bytes = chunk.len() as u64;
            self.schedule(
                at_ns,
                Action::ReleaseWindow {
                    conn,
                    from: side.peer(),
                    bytes,
                },
            );
        }
        Some(chunk)
    }

    /// Closes `side`'s sending direction; the peer sees [`SimEvent::Closed`] after all
    /// of `side`'s chunks arrived.
    pub fn close(&mut self, side: Side, conn: SimConnId) -> Result<(), SimError> {
        let now_ns = self.now_ns();
        let c = self.conn_mut(conn)?;
        if c.closed[side.index()] {
            return Ok(());
        }
        c.closed[side.index()] = true;
        if c.broken {
            return Ok(());
        }
        let dir = &c.dirs[side.index()];
        let at_ns = now_ns
            .saturating_add(c.config.delay_ns)
            .max(dir.last_arrival_ns);
        self.schedule(
            at_ns,
            Action::SeeClose {
                conn,
                side: side.peer(),
            },
        );
        Ok(())
    }

    /// Cuts the network from `from_ns` until `until_ns`: every connection breaks at the
    /// start, and none can be opened until the end.
    pub fn partition(&mut self, from_ns: u64, until_ns: u64) -> Result<(), SimError> {
        let now_ns = self.now_ns();
        if from_ns < now_ns || until_ns <= from_ns {
            return Err(SimError::PartitionInterval {
                from_ns,
                until_ns,
                now_ns,
            });
        }
        self.schedule(from_ns, Action::PartitionStart);
        self.schedule(until_ns, Action::PartitionEnd);
        Ok(())
    }

    /// When the next scheduled thing happens, if anything is scheduled.
    pub fn next_event_time(&self) -> Option<u64> {
        self.queue.peek().map(|Reverse((at_ns, _, _))| *at_ns)
    }

    /// Runs everything scheduled up to and including `t_ns`, then sets the clock to
    /// `t_ns` (the clock never goes back).
    pub fn step_until(&mut self, t_ns: u64) {
        while let Some(at_ns) = self.next_event_time().filter(|at_ns| *at_ns <= t_ns) {
            let Some(Reverse((_, _, action))) = self.queue.pop() else {
                break;
            };
            self.clock.advance_to(at_ns);
            self.run(action);
        }
        self.clock.advance_to(t_ns);
    }

    /// Runs everything scheduled at the next event time; false if nothing is scheduled.
    pub fn step(&mut self) -> bool {
        match self.next_event_time() {
            Some(at_ns) => {
                self.step_until(at_ns);
                true
            }
            None => false,
        }
    }

    /// The oldest event not yet taken.
    pub fn poll_event(&mut self) -> Option<SimEvent> {
        self.events.pop_front()
    }

    /// Events dropped because more than [`MAX_QUEUED_EVENTS`] were waiting.
    pub fn dropped_event_count(&self) -> u64 {
        self.dropped_event_count
    }

    /// A digest of every event so far and of every chunk's bytes: equal digests mean
    /// the runs behaved identically.
    pub fn trace_digest(&self) -> u64 {
        self.digest.finish()
    }

    /// False once the connection broke, whether or not the sides noticed yet.
    pub fn is_up(&self, conn: SimConnId) -> bool {
        self.conns.get(conn.0 as usize).is_some_and(|c| !c.broken)
    }

    fn conn(&self, conn: SimConnId) -> Result<&Conn, SimError> {
        self.conns
            .get(conn.0 as usize)
            .ok_or(SimError::UnknownConnection { conn })
    }

    fn conn_mut(&mut self, conn: SimConnId) -> Result<&mut Conn, SimError> {
        self.conns
            .get_mut(conn.0 as usize)
            .ok_or(SimError::UnknownConnection { conn })
    }

    /// Uniform in `0..n` (0 when `n` is 0), by the widening multiply: no modulo bias
    /// worth the name for the ranges used here.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.rng.next_u64()) * u128::from(n)) >> 64) as u64
    }

    fn schedule(&mut self, at_ns: u64, action: Action) {
        self.scheduled_count += 1;
        self.queue
            .push(Reverse((at_ns, self.scheduled_count, action)));
    }

    fn emit(&mut self, event: SimEvent) {
        event.hash(&mut self.digest);
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.dropped_event_count += 1;
        }
        self.events.push_back(event);
    }

    fn break_conn(&mut self, conn: SimConnId) {
        let now_ns = self.now_ns();
        let Some(c) = self.conns.get_mut(conn.0 as usize) else {
            return;
        };
        if c.broken {
            return;
        }
        c.broken = true;
        let at_ns = now_ns.saturating_add(c.config.reset_detect_ns);
        self.emit(SimEvent::Broken {
            at_ns: now_ns,
            conn,
        });
        for side in [Side::A, Side::B] {
            self.schedule(at_ns, Action::SeeReset { conn, side });
        }
    }

    fn run(&mut self, action: Action) {
        let at_ns = self.now_ns();
        match action {
            Action::Arrive { conn, from, chunk } => {
                let Some(c) = self.conns.get_mut(conn.0 as usize) else {
                    return;
                };
                if c.broken {
                    return;
                }
                self.digest.write(&chunk);
                let len = chunk.len();
                c.dirs[from.index()].arrived.push_back(chunk);
                self.emit(SimEvent::Arrived {
                    at_ns,
                    conn,
                    to: from.peer(),
                    len,
                });
            }
            Action::ReleaseWindow { conn, from, bytes } => {
                let Some(c) = self.conns.get_mut(conn.0 as usize) else {
                    return;
                };
                let dir = &mut c.dirs[from.index()];
                dir.in_window_bytes = dir.in_window_bytes.saturating_sub(bytes);
                if dir.blocked && !c.broken {
                    dir.blocked = false;
                    self.emit(SimEvent::Writable {
                        at_ns,
                        conn,
                        side: from,
                    });
                }
            }
            Action::SeeReset { conn, side } => {
                if let Some(c) = self.conns.get_mut(conn.0 as usize) {
                    c.reset_seen[side.index()] = true;
                    self.emit(SimEvent::Reset { at_ns, conn, side });
                }
            }
            Action::SeeClose { conn, side } => {
                if self.conns.get(conn.0 as usize).is_some_and(|c| !c.broken) {
                    self.emit(SimEvent::Closed { at_ns, conn, side });
                }
            }
            Action::PartitionStart => {
                self.partition_depth += 1;
                self.emit(SimEvent::PartitionStarted { at_ns });
                for index in 0..self.conns.len() {
                    self.break_conn(SimConnId(index as u32));
                }
            }
            Action::PartitionEnd => {
                self.partition_depth = self.partition_depth.saturating_sub(1);
                self.emit(SimEvent::PartitionEnded { at_ns });
            }
        }
    }
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{encode_frame, Data, Frame, FrameDecoder, Ping};
    use crate::StreamClass;

    fn quiet_wan() -> LinkConfig {
        LinkConfig {
            jitter_ns: 0,
            ..LinkConfig::wan()
        }
    }

    fn drain(net: &mut SimNet) -> Vec<SimEvent> {
        std::iter::from_fn(|| net.poll_event()).collect()
    }

    fn run_to_idle(net: &mut SimNet) {
        // Bounded: every step consumes a scheduled action and recv schedules at most one.
        for _ in 0..1_000_000 {
            if !net.step() {
                return;
            }
        }
        panic!("simulation did not go idle");
    }

    /// A busy scenario with jitter, loss, a partition and reconnects; returns its events.
    fn scenario(seed: u64) -> (Vec<SimEvent>, u64) {
        let link = LinkConfig {
            loss_per_million: 20_000,
            ..LinkConfig::wan()
        };
        let mut net = SimNet::new(
            seed,
            SimConfig {
                link,
                ..SimConfig::default()
            },
        );
        let mut conns: Vec<SimConnId> = (0..4).map(|_| net.connect().unwrap()).collect();
        net.partition(2 * NS_PER_S, 3 * NS_PER_S).unwrap();
        let mut events = Vec::new();
        for round in 0..400u64 {
            for (i, conn) in conns.clone().into_iter().enumerate() {
                let side = if (round + i as u64) % 3 == 1 {
                    Side::B
                } else {
                    Side::A
                };
                let chunk = vec![round as u8; 1000 + i * 100];
                if let Err(SimError::Reset { .. }) = net.send(side, conn, &chunk) {
                    if let Ok(new) = net.connect() {
                        conns[i] = new;
                    }
                }
                for side in [Side::A, Side::B] {
                    while net.recv(side, conn).is_some() {}
                }
            }
            net.step_until(net.now_ns() + 10 * NS_PER_MS);
            events.extend(drain(&mut net));
        }
        (events, net.trace_digest())
    }

    #[test]
    fn same_seed_same_calls_give_the_same_events() {
        let (events, digest) = scenario(7);
        assert!(events.iter().any(|e| matches!(e, SimEvent::Broken { .. })));
        assert!(events.iter().any(|e| matches!(e, SimEvent::Reset { .. })));
        assert!(events
            .iter()
            .any(|e| matches!(e, SimEvent::PartitionEnded { .. })));
        assert_eq!(scenario(7), (events.clone(), digest));
        let (other, other_digest) = scenario(8);
        assert_ne!(other_digest, digest);
        assert_ne!(other, events);
    }

    #[test]
    fn delay_bandwidth_and_handshake_set_the_arrival_time() {
        let mut net = SimNet::new(
            1,
            SimConfig {
                link: quiet_wan(),
                ..SimConfig::default()
            },
        );
        let conn = net.connect().unwrap();
        net.send(Side::A, conn, &vec![1; 1 << 20]).unwrap();
        run_to_idle(&mut net);
        // Two handshake round trips, 1 MiB at 1 Gbit/s, one delay.
        let expected_ns = 4 * 75 * NS_PER_MS + 8_388_608 + 75 * NS_PER_MS;
        let event = net.poll_event().unwrap();
        let arrived = SimEvent::Arrived {
            at_ns: expected_ns,
            conn,
            to: Side::B,
            len: 1 << 20,
        };
        assert_eq!(event, arrived);
        assert_eq!(net.recv(Side::B, conn).map(|c| c.len()), Some(1 << 20));
        assert_eq!(net.recv(Side::B, conn), None);
    }

    #[test]
    fn connections_are_fifo_but_reorder_between_each_other() {
        let link = LinkConfig {
            jitter_ns: 50 * NS_PER_MS,
            ..LinkConfig::ideal()
        };
        let mut net = SimNet::new(
            3,
            SimConfig {
                link,
                shared_bandwidth_bytes_per_s: 0,
            },
        );
        let conns: Vec<SimConnId> = (0..4).map(|_| net.connect().unwrap()).collect();
        for n in 0..200u32 {
            let conn = conns[n as usize % conns.len()];
            net.send(Side::A, conn, &n.to_le_bytes()).unwrap();
            net.step_until(net.now_ns() + NS_PER_MS);
        }
        run_to_idle(&mut net);
        let mut arrival_order = Vec::new();
        while let Some(SimEvent::Arrived { conn, .. }) = net.poll_event() {
            let chunk = net.recv(Side::B, conn).unwrap();
            arrival_order.push(u32::from_le_bytes(chunk.try_into().unwrap()));
        }
        assert_eq!(arrival_order.len(), 200);
        for conn in 0..conns.len() as u32 {
            let on_conn: Vec<u32> = arrival_order
                .iter()
                .copied()
                .filter(|n| n % 4 == conn)
                .collect();
            assert!(
                on_conn.windows(2).all(|w| w[0] < w[1]),
                "{conn}: {on_conn:?}"
            );
        }
        assert!(
            arrival_order.windows(2).any(|w| w[0] > w[1]),
            "jitter reordered nothing"
        );
    }

    #[test]
    fn a_loss_breaks_the_connection_and_both_sides_see_the_reset() {
        let link = LinkConfig {
            loss_per_million: 1_000_000,
            ..quiet_wan()
        };
        let mut net = SimNet::new(
            5,
            SimConfig {
                link,
                ..SimConfig::default()
            },
        );
        let conn = net.connect().unwrap();
        net.send(Side::A, conn, b"lost").unwrap();
        assert!(!net.is_up(conn));
        net.send(Side::B, conn, b"into the void").unwrap();
        run_to_idle(&mut net);
        let detect_ns = LinkConfig::wan().reset_detect_ns;
        assert_eq!(
            drain(&mut net),
            [
                SimEvent::Broken { at_ns: 0, conn },
                SimEvent::Reset {
                    at_ns: detect_ns,
                    conn,
                    side: Side::A
                },
                SimEvent::Reset {
                    at_ns: detect_ns,
                    conn,
                    side: Side::B
                },
            ]
        );
        assert_eq!(net.send(Side::A, conn, b"x"), Err(SimError::Reset { conn }));
        assert_eq!(net.recv(Side::B, conn), None);
    }

    #[test]
    fn a_partition_breaks_everything_and_blocks_connects_until_it_ends() {
        let mut net = SimNet::new(
            9,
            SimConfig {
                link: quiet_wan(),
                ..SimConfig::default()
            },
        );
        let conns = [net.connect().unwrap(), net.connect().unwrap()];
        net.partition(NS_PER_S, 5 * NS_PER_S).unwrap();
        net.step_until(NS_PER_S - 1);
        net.send(Side::A, conns[0], b"in flight").unwrap();
        net.step_until(3 * NS_PER_S);
        assert_eq!(net.connect(), Err(SimError::Partitioned));
        let events = drain(&mut net);
        assert_eq!(events[0], SimEvent::PartitionStarted { at_ns: NS_PER_S });
        let resets = events
            .iter()
            .filter(|e| matches!(e, SimEvent::Reset { .. }))
            .count();
        assert_eq!(resets, 4, "{events:?}");
        assert!(!events.iter().any(|e| matches!(e, SimEvent::Arrived { .. })));
        net.step_until(5 * NS_PER_S);
        assert_eq!(
            net.poll_event(),
            Some(SimEvent::PartitionEnded {
                at_ns: 5 * NS_PER_S
            })
        );
        assert!(net.connect().is_ok());
        let bad = net.partition(NS_PER_S, 6 * NS_PER_S);
        assert!(matches!(bad, Err(SimError::PartitionInterval { .. })));
    }

    #[test]
    fn a_full_window_blocks_until_the_receiver_reads() {
        let link = LinkConfig {
            window_bytes: 1000,
            ..quiet_wan()
        };
        let mut net = SimNet::new(
            2,
            SimConfig {
                link,
                ..SimConfig::default()
            },
        );
        let conn = net.connect().unwrap();
        net.send(Side::A, conn, &[0; 600]).unwrap();
        net.send(Side::A, conn, &[0; 400]).unwrap();
        assert_eq!(
            net.send(Side::A, conn, &[0]),
            Err(SimError::WouldBlock { conn })
        );
        let too_big = net.send(Side::A, conn, &[0; 1001]);
        assert!(matches!(too_big, Err(SimError::ChunkTooLarge { .. })));
        run_to_idle(&mut net);
        drain(&mut net);
        let read_at_ns = net.now_ns();
        assert!(net.recv(Side::B, conn).is_some());
        run_to_idle(&mut net);
        let writable_ns = read_at_ns + 75 * NS_PER_MS;
        let writable = SimEvent::Writable {
            at_ns: writable_ns,
            conn,
            side: Side::A,
        };
        assert_eq!(drain(&mut net), [writable]);
        net.send(Side::A, conn, &[0; 600]).unwrap();
    }

    #[test]
    fn close_arrives_after_the_data() {
        let mut net = SimNet::new(
            4,
            SimConfig {
                link: quiet_wan(),
                ..SimConfig::default()
            },
        );
        let conn = net.connect().unwrap();
        net.send(Side::B, conn, b"last words").unwrap();
        net.close(Side::B, conn).unwrap();
        assert_eq!(
            net.send(Side::B, conn, b"more"),
            Err(SimError::Closed { conn })
        );
        run_to_idle(&mut net);
        let events = drain(&mut net);
        assert!(matches!(
            events[..],
            [SimEvent::Arrived { .. }, SimEvent::Closed { .. }]
        ));
        assert_eq!(net.recv(Side::A, conn).as_deref(), Some(&b"last words"[..]));
    }

    #[test]
    fn frames_survive_random_chunking_over_a_jittery_connection() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut frames = Vec::new();
        for seq in 1..=60u64 {
            let len = 1 + (rng.next_u32() % 5000) as usize;
            let class = StreamClass::ALL[seq as usize % StreamClass::ALL.len()];
            let payload = (0..len).map(|i| (i as u64 ^ seq) as u8).collect();
            frames.push(Frame::Data(Data {
                class,
                seq,
                retransmit: seq % 7 == 0,
                payload,
            }));
            frames.push(Frame::Ping(Ping {
                nonce: seq,
                sent_at_ns: seq * 1000,
            }));
        }
        let stream: Vec<u8> = frames
            .iter()
            .flat_map(|f| encode_frame(f).unwrap())
            .collect();

        let mut net = SimNet::new(12, SimConfig::default());
        let conn = net.connect().unwrap();
        let mut rest = stream.as_slice();
        while !rest.is_empty() {
            let take = (1 + rng.next_u32() as usize % 3000).min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            match net.send(Side::A, conn, chunk) {
                Ok(()) => rest = tail,
                Err(SimError::WouldBlock { .. }) => assert!(net.step()),
                Err(err) => panic!("{err}"),
            }
        }
        run_to_idle(&mut net);
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        while let Some(chunk) = net.recv(Side::B, conn) {
            let mut input = chunk.as_slice();
            while !input.is_empty() {
                if let Some(frame) = decoder.decode(&mut input).unwrap() {
                    decoded.push(frame);
                }
            }
        }
        assert_eq!(decoder.finish(), Ok(()));
        assert_eq!(decoded, frames);
    }
}
