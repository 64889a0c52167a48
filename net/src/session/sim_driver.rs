//! Runs a dialer and an acceptor [`SessionCore`] over [`SimNet`]: the dialer is
//! [`Side::A`], the acceptor [`Side::B`]. Everything is deterministic for a seed.

use std::collections::BTreeMap;

use super::{ConnId, SessionConfig, SessionCore, SessionError, SessionEvent};
use crate::protocol::{ResumeToken, Role, SessionId};
use crate::sim::{Side, SimConfig, SimConnId, SimError, SimEvent, SimNet};

/// The smallest step the driver takes when a timer is due now, so a timer that cannot
/// make progress slows the simulation instead of hanging it.
const STEP_MIN_NS: u64 = 1_000;

/// Most driver steps one [`SimPair::run`] takes: a run that needs more is stuck.
pub const RUN_STEPS_MAX: u64 = 50_000_000;

#[derive(Debug, Default)]
struct Slot {
    up: bool,
    /// Bytes `poll_transmit` returned that the window did not take yet.
    pending: Option<Vec<u8>>,
}

/// Two sessions and the simulated network between them.
#[derive(Debug)]
pub struct SimPair {
    /// The network; tests may partition it.
    pub net: SimNet,
    /// Side A: dials.
    pub dialer: SessionCore,
    /// Side B: accepts.
    pub acceptor: SessionCore,
    /// Events each side reported, in order: `[dialer, acceptor]`.
    pub events: [Vec<SessionEvent>; 2],
    conns: BTreeMap<SimConnId, [Slot; 2]>,
    /// Steps taken, for the bound and for the tests.
    pub step_count: u64,
}

fn side_index(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

impl SimPair {
    /// A pair over a fresh network seeded with `seed`; `dialer` and `acceptor` configure
    /// each side (their roles must differ).
    pub fn new(
        seed: u64,
        net: SimConfig,
        dialer: SessionConfig,
        acceptor: SessionConfig,
    ) -> Result<SimPair, SessionError> {
        // The ids need only be non-zero and fixed per seed: the simulation is one session.
        let mut session_id = [0x5a; 16];
        session_id[..8].copy_from_slice(&seed.to_le_bytes());
        let mut token = [0xa5; 16];
        token[8..].copy_from_slice(&seed.to_le_bytes());
        Ok(SimPair {
            net: SimNet::new(seed, net),
            dialer: SessionCore::dialer(dialer, SessionId(session_id), 0)?,
            acceptor: SessionCore::acceptor(acceptor, ResumeToken(token), 0)?,
            events: [Vec::new(), Vec::new()],
            conns: BTreeMap::new(),
            step_count: 0,
        })
    }

    /// Default configurations: the source dials, the destination accepts.
    pub fn with_defaults(seed: u64, net: SimConfig) -> Result<SimPair, SessionError> {
        SimPair::new(
            seed,
            net,
            SessionConfig::new(Role::Source),
            SessionConfig::new(Role::Destination),
        )
    }

    /// The core of `side`.
    pub fn core(&mut self, side: Side) -> &mut SessionCore {
        match side {
            Side::A => &mut self.dialer,
            Side::B => &mut self.acceptor,
        }
    }

    /// Calls `app` then steps, until `app` returns true (`Ok(true)`) or the clock passes
    /// `until_ns` (`Ok(false)`).
    pub fn run(
        &mut self,
        until_ns: u64,
        mut app: impl FnMut(&mut SimPair) -> bool,
    ) -> Result<bool, SimStuck> {
        for _ in 0..RUN_STEPS_MAX {
            if app(self) {
                return Ok(true);
            }
            if self.net.now_ns() >= until_ns {
                return Ok(false);
            }
            self.step(until_ns);
        }
        Err(SimStuck {
            now_ns: self.net.now_ns(),
        })
    }

    /// One round: timers, dials, network events, transmits; then the clock moves to the
    /// next thing scheduled (at most `until_ns`).
    pub fn step(&mut self, until_ns: u64) {
        self.step_count += 1;
        let now_ns = self.net.now_ns();
        self.dialer.on_timer(now_ns);
        self.acceptor.on_timer(now_ns);
        while self.dialer.wants_connection(now_ns) {
            match self.net.connect() {
                Ok(id) => {
                    self.conns.insert(
                        id,
                        [
                            Slot {
                                up: true,
                                pending: None,
                            },
                            Slot {
                                up: true,
                                pending: None,
                            },
                        ],
                    );
                    self.dialer
                        .on_connection_up(ConnId(u64::from(id.0)), now_ns);
                    self.acceptor
                        .on_connection_up(ConnId(u64::from(id.0)), now_ns);
                }
                Err(_) => {
                    self.dialer.on_connect_failed(now_ns);
                    break;
                }
            }
        }
        self.drain_core_events();
        self.flush_all();
        while let Some(event) = self.net.poll_event() {
            self.on_net_event(event, now_ns);
        }
        self.drain_core_events();
        self.flush_all();
        let next = [
            self.net.next_event_time(),
            self.dialer.poll_timeout(),
            self.acceptor.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(until_ns)
        .min(until_ns)
        .max(now_ns + STEP_MIN_NS);
        self.net.step_until(next);
    }

    /// Connections both sides still use.
    pub fn live_connections(&self) -> Vec<SimConnId> {
        self.conns
            .iter()
            .filter(|(_, s)| s[0].up && s[1].up)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Resets `conn` now, as a TCP reset seen at once by both sides: whatever is in
    /// flight on it is lost.
    pub fn reset_connection(&mut self, conn: SimConnId) {
        let now_ns = self.net.now_ns();
        for side in [Side::A, Side::B] {
            self.down(side, conn, now_ns);
        }
        self.drain_core_events();
    }

    fn on_net_event(&mut self, event: SimEvent, now_ns: u64) {
        match event {
            SimEvent::Arrived { conn, to, .. } => {
                while let Some(chunk) = self.net.recv(to, conn) {
                    let up = self.conns.get(&conn).is_some_and(|s| s[side_index(to)].up);
                    if up {
                        self.core(to)
                            .on_bytes(ConnId(u64::from(conn.0)), &chunk, now_ns);
                    }
                }
            }
            SimEvent::Reset { conn, side, .. } | SimEvent::Closed { conn, side, .. } => {
                self.down(side, conn, now_ns);
            }
            SimEvent::Writable { conn, side, .. } => self.flush(side, conn),
            SimEvent::Broken { .. }
            | SimEvent::PartitionStarted { .. }
            | SimEvent::PartitionEnded { .. } => {}
        }
    }

    fn down(&mut self, side: Side, conn: SimConnId, now_ns: u64) {
        if let Some(slots) = self.conns.get_mut(&conn) {
            let slot = &mut slots[side_index(side)];
            if slot.up {
                slot.up = false;
                slot.pending = None;
                let _ = self.net.close(side, conn);
            }
        }
        self.core(side)
            .on_connection_down(ConnId(u64::from(conn.0)), now_ns);
    }

    fn drain_core_events(&mut self) {
        let now_ns = self.net.now_ns();
        for side in [Side::A, Side::B] {
            while let Some(event) = self.core(side).poll_event() {
                if let SessionEvent::ConnectionClosed { conn, .. } = &event {
                    if let Ok(id) = u32::try_from(conn.0) {
                        // Flush what the core queued last (a Refuse), then close.
                        self.flush(side, SimConnId(id));
                        self.down(side, SimConnId(id), now_ns);
                    }
                }
                self.events[side_index(side)].push(event);
            }
        }
    }

    fn flush_all(&mut self) {
        let ids: Vec<SimConnId> = self.conns.keys().copied().collect();
        for id in ids {
            for side in [Side::A, Side::B] {
                self.flush(side, id);
            }
        }
    }

    fn flush(&mut self, side: Side, conn: SimConnId) {
        let now_ns = self.net.now_ns();
        let i = side_index(side);
        loop {
            let Some(slot) = self.conns.get_mut(&conn) else {
                return;
            };
            if !slot[i].up {
                return;
            }
            let bytes = match slot[i].pending.take() {
                Some(bytes) => bytes,
                None => match self.core(side).poll_transmit(ConnId(u64::from(conn.0))) {
                    Some(bytes) => bytes,
                    None => return,
                },
            };
            match self.net.send(side, conn, &bytes) {
                Ok(()) => {}
                Err(SimError::WouldBlock { .. }) => {
                    if let Some(slot) = self.conns.get_mut(&conn) {
                        slot[i].pending = Some(bytes);
                    }
                    return;
                }
                Err(_) => {
                    self.down(side, conn, now_ns);
                    return;
                }
            }
        }
    }
}

/// A simulation that took [`RUN_STEPS_MAX`] steps without finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("simulation stuck at {now_ns} ns after {RUN_STEPS_MAX} steps")]
pub struct SimStuck {
    /// The simulated time.
    pub now_ns: u64,
}
