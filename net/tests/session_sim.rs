//! Deterministic simulation of the session layer over `SimNet`. Every test is seeded; a
//! failure prints the seed, and the same seed replays the same run.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

use strait_net::protocol::{Role, MAX_FRAME_PAYLOAD_BYTES};
use strait_net::session::sim_driver::SimPair;
use strait_net::session::{SessionConfig, SessionError, SessionEvent, SessionState};
use strait_net::sim::{LinkConfig, Side, SimConfig};
use strait_net::StreamClass;

const NS_PER_MS: u64 = 1_000_000;
const NS_PER_S: u64 = 1_000_000_000;
const MIB: u64 = 1 << 20;

/// FNV-1a, chained over every byte of a class in order: equal digests and counts on
/// both ends mean byte-exact, in-order delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest {
    hash: u64,
    bytes: u64,
    frames: u64,
}

impl Default for Digest {
    fn default() -> Digest {
        Digest {
            hash: 0xcbf2_9ce4_8422_2325,
            bytes: 0,
            frames: 0,
        }
    }
}

impl Digest {
    fn add(&mut self, data: &[u8]) {
        for b in data {
            self.hash = (self.hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.bytes += data.len() as u64;
        self.frames += 1;
    }
}

/// A small deterministic generator for the tests' own choices.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Traffic in one direction: what the sender still has to send per class, and the
/// digests of both ends.
#[derive(Debug)]
struct Flow {
    from: Side,
    rng: Rng,
    /// Bytes left to send per class.
    left: [u64; 4],
    /// Largest payload.
    frame_max: u64,
    /// A payload refused with WouldBlock, retried first.
    held: [Option<Vec<u8>>; 4],
    sent: [Digest; 4],
    received: [Digest; 4],
    /// Receiver applies at most this many bytes per call (None: everything at once).
    apply_per_call: Option<u64>,
    /// Bytes taken by recv but not yet marked applied, per class.
    unapplied: [u64; 4],
    /// The receiving application applies at most this rate (None: at once).
    apply_rate_bytes_per_s: Option<u64>,
    applied: [u64; 4],
}

impl Flow {
    fn new(from: Side, seed: u64, left: [u64; 4], frame_max: u64) -> Flow {
        Flow {
            from,
            rng: Rng(seed),
            left,
            frame_max,
            held: Default::default(),
            sent: Default::default(),
            received: Default::default(),
            apply_per_call: None,
            unapplied: [0; 4],
            apply_rate_bytes_per_s: None,
            applied: [0; 4],
        }
    }

    /// Sends as much as the buffers take, receives and applies everything available.
    fn pump(&mut self, pair: &mut SimPair) {
        let to = self.from.peer();
        for (i, class) in StreamClass::ALL.into_iter().enumerate() {
            loop {
                let payload = match self.held[i].take() {
                    Some(p) => p,
                    None if self.left[i] == 0 => break,
                    None => {
                        let len = (1 + self.rng.below(self.frame_max)).min(self.left[i]);
                        let fill = self.rng.next();
                        (0..len)
                            .map(|k| (fill.wrapping_add(k.wrapping_mul(31)) >> (k % 7)) as u8)
                            .collect::<Vec<u8>>()
                    }
                };
                let len = payload.len() as u64;
                match pair.core(self.from).send(class, payload.clone()) {
                    Ok(_) => {
                        self.sent[i].add(&payload);
                        self.left[i] = self.left[i].saturating_sub(len);
                    }
                    Err(_) => {
                        self.held[i] = Some(payload);
                        break;
                    }
                }
            }
            while let Some(payload) = pair.core(to).recv(class) {
                self.received[i].add(&payload);
                self.unapplied[i] += payload.len() as u64;
            }
            let mut apply = self
                .apply_per_call
                .map_or(self.unapplied[i], |m| m.min(self.unapplied[i]));
            if let Some(rate) = self.apply_rate_bytes_per_s {
                let budget = (u128::from(rate) * u128::from(pair.net.now_ns())
                    / u128::from(NS_PER_S)) as u64;
                apply = apply.min(budget.saturating_sub(self.applied[i]));
            }
            if apply > 0 {
                pair.core(to).mark_applied(class, apply).unwrap();
                self.unapplied[i] -= apply;
                self.applied[i] += apply;
            }
        }
    }

    fn done(&self) -> bool {
        self.left.iter().all(|l| *l == 0)
            && self.held.iter().all(Option::is_none)
            && self.sent == self.received
    }

    fn check(&self, seed: u64) {
        for (i, class) in StreamClass::ALL.into_iter().enumerate() {
            assert_eq!(
                self.sent[i], self.received[i],
                "seed {seed}: {class:?} from {:?} not byte-exact",
                self.from
            );
        }
    }
}

fn wan(jitter_ns: u64) -> SimConfig {
    SimConfig {
        link: LinkConfig {
            jitter_ns,
            ..LinkConfig::wan()
        },
        ..SimConfig::default()
    }
}

fn events_of(pair: &SimPair, side: Side) -> &[SessionEvent] {
    &pair.events[match side {
        Side::A => 0,
        Side::B => 1,
    }]
}

#[test]
fn twenty_mib_arrive_byte_exact_in_order_over_four_jittered_connections() {
    let seed = 1;
    let mut pair = SimPair::with_defaults(seed, wan(20 * NS_PER_MS)).unwrap();
    let mut forward = Flow::new(Side::A, seed, [MIB, 7 * MIB, 8 * MIB, 4 * MIB], 512 << 10);
    let mut backward = Flow::new(Side::B, seed + 1, [MIB / 2, MIB / 2, 0, 0], 64 << 10);
    let done = pair
        .run(60 * NS_PER_S, |p| {
            forward.pump(p);
            backward.pump(p);
            forward.done() && backward.done()
        })
        .unwrap();
    assert!(done, "seed {seed}: not done by {} ns", pair.net.now_ns());
    forward.check(seed);
    backward.check(seed);
    let stats = pair.dialer.stats();
    assert_eq!(stats.ready_connections, 4, "seed {seed}");
    assert!(
        stats.srtt_ns.is_some_and(|s| s >= 150 * NS_PER_MS),
        "seed {seed}: {stats:?}"
    );
    assert_eq!(
        events_of(&pair, Side::A).first(),
        Some(&SessionEvent::Connected)
    );
    eprintln!(
        "seed {seed}: 21 MiB took {} ms simulated",
        pair.net.now_ns() / NS_PER_MS
    );
}

/// Runs in slices of `tick_ns`, so the application acts at least that often.
fn run_ticks(
    pair: &mut SimPair,
    until_ns: u64,
    tick_ns: u64,
    mut app: impl FnMut(&mut SimPair) -> bool,
) -> bool {
    while pair.net.now_ns() < until_ns {
        let slice_ns = (pair.net.now_ns() + tick_ns).min(until_ns);
        if pair.run(slice_ns, &mut app).unwrap() {
            return true;
        }
    }
    app(pair)
}

fn retransmitted_bytes(pair: &SimPair) -> u64 {
    let a = pair.dialer.stats();
    let b = pair.acceptor.stats();
    a.send
        .iter()
        .chain(b.send.iter())
        .map(|s| s.retransmitted_bytes)
        .sum()
}

#[test]
fn a_connection_reset_mid_transfer_loses_and_duplicates_nothing() {
    let seed = 2;
    let mut pair = SimPair::with_defaults(seed, wan(5 * NS_PER_MS)).unwrap();
    let mut forward = Flow::new(
        Side::A,
        seed,
        [MIB, 20 * MIB, 20 * MIB, 10 * MIB],
        256 << 10,
    );
    let mut backward = Flow::new(Side::B, seed + 1, [MIB, MIB, 0, 0], 64 << 10);
    let mut resets = 0;
    let done = run_ticks(&mut pair, 60 * NS_PER_S, 20 * NS_PER_MS, |p| {
        forward.pump(p);
        backward.pump(p);
        // Reset one connection twice while data flows, each time with all four up (a
        // replacement takes a few RTTs behind the shared bottleneck's queue).
        let sent = p
            .dialer
            .stats()
            .send
            .iter()
            .map(|s| s.sent_bytes)
            .sum::<u64>();
        let all_up = p.dialer.stats().ready_connections == 4;
        if all_up && ((resets == 0 && sent > 4 * MIB) || (resets == 1 && sent > 16 * MIB)) {
            if let Some(conn) = p.live_connections().first().copied() {
                p.reset_connection(conn);
                resets += 1;
            }
        }
        forward.done() && backward.done()
    });
    assert!(done, "seed {seed}: not done by {} ns", pair.net.now_ns());
    assert_eq!(resets, 2, "seed {seed}");
    forward.check(seed);
    backward.check(seed);
    assert!(
        retransmitted_bytes(&pair) > 0,
        "seed {seed}: nothing was retransmitted"
    );
    // The session never lost every connection, so it never had to resume.
    assert_eq!(pair.dialer.stats().resumes, 0, "seed {seed}");
}

#[test]
fn a_five_second_partition_within_the_window_resumes_byte_exact() {
    let seed = 3;
    let mut pair = SimPair::with_defaults(seed, wan(5 * NS_PER_MS)).unwrap();
    let mut forward = Flow::new(Side::A, seed, [MIB, 8 * MIB, 8 * MIB, 4 * MIB], 256 << 10);
    let mut backward = Flow::new(Side::B, seed + 1, [MIB, MIB, 0, 0], 64 << 10);
    let mut partitioned = false;
    let done = run_ticks(&mut pair, 120 * NS_PER_S, 20 * NS_PER_MS, |p| {
        forward.pump(p);
        backward.pump(p);
        let sent = p
            .dialer
            .stats()
            .send
            .iter()
            .map(|s| s.sent_bytes)
            .sum::<u64>();
        if !partitioned && sent > 6 * MIB {
            let now = p.net.now_ns();
            p.net.partition(now, now + 5 * NS_PER_S).unwrap();
            partitioned = true;
        }
        forward.done() && backward.done()
    });
    assert!(partitioned, "seed {seed}");
    assert!(done, "seed {seed}: not done by {} ns", pair.net.now_ns());
    forward.check(seed);
    backward.check(seed);
    for side in [Side::A, Side::B] {
        let resumed = events_of(&pair, side)
            .iter()
            .any(|e| matches!(e, SessionEvent::Resumed { .. }));
        assert!(
            resumed,
            "seed {seed}: {side:?} never resumed: {:?}",
            events_of(&pair, side)
        );
    }
    assert!(retransmitted_bytes(&pair) > 0, "seed {seed}");
    assert_eq!(pair.dialer.state(), &SessionState::Established);
}

#[test]
fn a_partition_longer_than_the_window_fails_both_sides_cleanly() {
    let seed = 4;
    let mut pair = SimPair::with_defaults(seed, wan(5 * NS_PER_MS)).unwrap();
    let mut forward = Flow::new(Side::A, seed, [0, 64 * MIB, 0, 0], 256 << 10);
    let mut partition_at = None;
    let failed = |p: &SimPair| {
        matches!(p.dialer.state(), SessionState::Failed(_))
            && matches!(p.acceptor.state(), SessionState::Failed(_))
    };
    let done = run_ticks(&mut pair, 100 * NS_PER_S, 50 * NS_PER_MS, |p| {
        forward.pump(p);
        if partition_at.is_none() && p.dialer.stats().send[1].sent_bytes > 8 * MIB {
            let now = p.net.now_ns();
            p.net.partition(now, now + 40 * NS_PER_S).unwrap();
            partition_at = Some(now);
        }
        failed(p)
    });
    assert!(
        done,
        "seed {seed}: sessions did not fail: {:?} {:?}",
        pair.dialer.state(),
        pair.acceptor.state()
    );
    let partition_at = partition_at.unwrap();
    for side in [Side::A, Side::B] {
        let state = pair.core(side).state().clone();
        let SessionState::Failed(SessionError::ResumeWindowExpired {
            window_ns,
            down_since_ns,
        }) = state
        else {
            panic!("seed {seed}: {side:?} ended in {state:?}");
        };
        assert_eq!(window_ns, 30 * NS_PER_S);
        assert!(down_since_ns >= partition_at, "seed {seed}");
        assert!(
            pair.net.now_ns() >= down_since_ns + window_ns,
            "seed {seed}"
        );
        let failed_events = events_of(&pair, side)
            .iter()
            .filter(|e| matches!(e, SessionEvent::Failed { .. }))
            .count();
        assert_eq!(failed_events, 1, "seed {seed}: {side:?}");
        // A failed session refuses to send and asks for no connection.
        assert!(pair.core(side).send(StreamClass::Bulk, vec![1]).is_err());
        assert!(!pair.core(side).wants_connection(u64::MAX));
    }
    // Failure comes within a second or so of the window's end, not much later.
    assert!(
        pair.net.now_ns() < partition_at + 33 * NS_PER_S,
        "seed {seed}"
    );
}

#[test]
fn credit_bounds_what_is_outstanding_and_a_slow_receiver_throttles_the_sender() {
    let seed = 5;
    let window = 2 * MIB;
    let apply_rate = 4_000_000;
    let mut acceptor = SessionConfig::new(Role::Destination);
    acceptor.recv_window_bytes = window;
    let mut pair = SimPair::new(
        seed,
        wan(5 * NS_PER_MS),
        SessionConfig::new(Role::Source),
        acceptor,
    )
    .unwrap();
    let mut forward = Flow::new(Side::A, seed, [0, 0, 200 * MIB, 0], 128 << 10);
    forward.apply_rate_bytes_per_s = Some(apply_rate);
    let mut checks = 0u64;
    run_ticks(&mut pair, 12 * NS_PER_S, 10 * NS_PER_MS, |p| {
        forward.pump(p);
        let sent = p.dialer.stats().send;
        let recv = p.acceptor.stats().recv;
        for i in 0..4 {
            // The sender's bytes on the wire never exceed what the receiver granted,
            // which is at most what it applied plus its window.
            assert!(
                sent[i].sent_bytes <= recv[i].granted_bytes,
                "seed {seed}: class {i}"
            );
            assert!(
                sent[i].sent_bytes <= recv[i].applied_bytes + window,
                "seed {seed}: class {i}"
            );
            assert!(
                recv[i].received_bytes <= recv[i].granted_bytes,
                "seed {seed}"
            );
            assert!(
                sent[i].sent_bytes <= sent[i].credit_limit_bytes,
                "seed {seed}"
            );
        }
        checks += 1;
        false
    });
    assert!(checks > 1000, "{checks}");
    let memory = pair.dialer.stats().send[2];
    let rate = memory.drain_rate_bytes_per_s;
    assert!(
        rate > apply_rate * 8 / 10 && rate < apply_rate * 12 / 10,
        "seed {seed}: drain rate {rate} B/s against an apply rate of {apply_rate} B/s"
    );
    // The sender is throttled: most of its data is still queued.
    assert!(memory.backlog_bytes > 0);
    assert!(
        memory.acked_bytes <= 12 * apply_rate + window,
        "seed {seed}: {memory:?}"
    );
}

#[test]
fn scheduler_puts_control_first_and_shares_the_rest_by_weight() {
    let seed = 6;
    let mut pair = SimPair::with_defaults(seed, wan(5 * NS_PER_MS)).unwrap();
    // Everything is queued before the session opens, so every class is backlogged.
    let mut forward = Flow::new(
        Side::A,
        seed,
        [2 * MIB, 100 * MIB, 100 * MIB, 100 * MIB],
        128 << 10,
    );
    forward.pump(&mut pair);
    let mut at_control_done = None;
    let mut at_steady = None;
    let mut shares = None;
    // Skip the first 20 MiB after control (the pipe fills), then measure 60 MiB: twice
    // what 4 connections hold in flight, so the shares are the scheduler's.
    run_ticks(&mut pair, 60 * NS_PER_S, 5 * NS_PER_MS, |p| {
        forward.pump(p);
        let r = forward.received.map(|d| d.bytes);
        if at_control_done.is_none() && r[0] == 2 * MIB {
            at_control_done = Some(r);
        }
        if let Some(start) = at_control_done {
            let delivered: u64 = (1..4).map(|i| r[i] - start[i]).sum();
            if at_steady.is_none() && delivered >= 20 * MIB {
                at_steady = Some(r);
            }
            if let Some(steady) = at_steady {
                if shares.is_none() && delivered >= 80 * MIB {
                    shares = Some((1..4).map(|i| r[i] - steady[i]).collect::<Vec<u64>>());
                }
            }
        }
        shares.is_some()
    });
    let start = at_control_done.expect("control never completed");
    let others_before: u64 = start[1..].iter().sum();
    assert!(
        others_before <= 2 * MIB,
        "seed {seed}: {others_before} bytes of other classes arrived before control completed"
    );
    let shares = shares.expect("no share measurement");
    let total: u64 = shares.iter().sum();
    let expected = [4.0 / 9.0, 4.0 / 9.0, 1.0 / 9.0];
    for (i, share) in shares.iter().enumerate() {
        let got = *share as f64 / total as f64;
        assert!(
            (got - expected[i]).abs() < 0.05,
            "seed {seed}: class {} got {got:.3} of the link, expected {:.3}: {shares:?}",
            i + 1,
            expected[i]
        );
    }
    assert!(shares[2] > 0, "bulk starved");
}

#[test]
fn random_scenarios_deliver_byte_exact_for_two_hundred_seeds() {
    let started = std::time::Instant::now();
    let (mut resumed_runs, mut retransmit_runs) = (0, 0);
    // STRAIT_SIM_SEED=n replays one seed; STRAIT_SIM_SEEDS=n widens the sweep.
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds = match (env("STRAIT_SIM_SEED"), env("STRAIT_SIM_SEEDS")) {
        (Some(seed), _) => seed..seed + 1,
        (None, count) => 1000..1000 + count.unwrap_or(200),
    };
    let sweep = seeds.end - seeds.start;
    for seed in seeds {
        let mut rng = Rng(seed);
        let link = LinkConfig {
            delay_ns: (1 + rng.below(40)) * NS_PER_MS,
            jitter_ns: rng.below(10) * NS_PER_MS,
            loss_per_million: rng.below(3) as u32 * 2_000,
            reset_detect_ns: (100 + rng.below(900)) * NS_PER_MS,
            ..LinkConfig::wan()
        };
        let config = SimConfig {
            link,
            ..SimConfig::default()
        };
        let mut dialer = SessionConfig::new(Role::Source);
        dialer.connections = 1 + rng.below(6) as u16;
        let mut pair =
            SimPair::new(seed, config, dialer, SessionConfig::new(Role::Destination)).unwrap();
        let sizes = |rng: &mut Rng| std::array::from_fn(|_| rng.below(3) * rng.below(MIB));
        let frame_max = 1 + rng.below(u64::from(MAX_FRAME_PAYLOAD_BYTES) / 4);
        let mut forward = Flow::new(Side::A, seed, sizes(&mut rng), frame_max);
        let mut backward = Flow::new(Side::B, seed + 7, sizes(&mut rng), frame_max);
        // Faults strike mid-transfer: when the dialer has sent a given share.
        let total: u64 = forward.left.iter().sum::<u64>().max(1);
        let mut partition = (rng.below(2) == 1).then(|| 1 + rng.below(8 * NS_PER_S));
        let partition_at = rng.below(total);
        let mut resets: Vec<u64> = (0..rng.below(3)).map(|_| rng.below(total)).collect();
        let done = pair
            .run(200 * NS_PER_S, |p| {
                forward.pump(p);
                backward.pump(p);
                let sent: u64 = p.dialer.stats().send.iter().map(|s| s.sent_bytes).sum();
                if let Some(length_ns) = partition.filter(|_| sent >= partition_at) {
                    let now = p.net.now_ns();
                    p.net.partition(now + 1, now + 1 + length_ns).unwrap();
                    partition = None;
                }
                if resets.last().is_some_and(|at| sent >= *at) {
                    if let Some(conn) = p.live_connections().last().copied() {
                        p.reset_connection(conn);
                    }
                    resets.pop();
                }
                forward.done() && backward.done()
            })
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(
            done,
            "seed {seed}: not done by {} ns: {:?} {:?} {:?}",
            pair.net.now_ns(),
            pair.dialer.state(),
            pair.acceptor.state(),
            pair.events
        );
        forward.check(seed);
        backward.check(seed);
        resumed_runs += u32::from(pair.dialer.stats().resumes > 0);
        retransmit_runs += u32::from(retransmitted_bytes(&pair) > 0);
    }
    eprintln!(
        "{sweep} seeds in {:?}: {resumed_runs} resumed, {retransmit_runs} retransmitted",
        started.elapsed()
    );
    // The scenarios must really exercise the recovery paths.
    assert!(
        resumed_runs >= 20 && retransmit_runs >= 40,
        "{resumed_runs} {retransmit_runs}"
    );
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let run = |seed: u64| {
        let link = LinkConfig {
            loss_per_million: 3_000,
            ..LinkConfig::wan()
        };
        let config = SimConfig {
            link,
            ..SimConfig::default()
        };
        let mut pair = SimPair::with_defaults(seed, config).unwrap();
        let mut forward = Flow::new(Side::A, seed, [MIB, 2 * MIB, 2 * MIB, MIB], 128 << 10);
        let done = pair
            .run(60 * NS_PER_S, |p| {
                forward.pump(p);
                forward.done()
            })
            .unwrap();
        assert!(done, "seed {seed}");
        forward.check(seed);
        (
            pair.net.trace_digest(),
            pair.net.now_ns(),
            pair.events.clone(),
            pair.step_count,
        )
    };
    let first = run(77);
    assert_eq!(first, run(77), "seed 77 did not replay identically");
    assert_ne!(first.0, run(78).0);
}
