//! One queue's load: a thread that keeps `iodepth` requests in flight on its ring, busy-polls
//! the used ring for a short while after each completion and otherwise sleeps on the call
//! eventfd, times every request and checks every read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use vmm_sys_util::eventfd::EventFd;

use super::guest::GuestRam;
use super::job::{JobSpec, QueueArea};
use super::pattern::{self, SECTOR_BYTES};
use super::ring::{write_desc_at, DriverRing, DESC_BYTES, F_INDIRECT, F_NEXT, F_WRITE};

/// virtio-blk request types and status (virtio 1.2, 5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
/// What a status byte holds until the device writes it.
const STATUS_UNSET: u8 = 0xEE;
/// Descriptors per request: header, one data buffer, status.
pub const DESCS_PER_REQUEST: u16 = 3;

/// A queue that completes nothing for this long is stuck; the job fails rather than hang.
/// Requests take microseconds to milliseconds, even on the real disk.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest single sleep on the call eventfd, so the stall and end-of-run checks still run
/// when no interrupt comes.
const SLEEP_SLICE_MS: i32 = 20;
/// With `rate_iops`, the last stretch before a submission's turn is spun rather than slept:
/// a sleep overshoots by tens of microseconds.
const RATE_SPIN: Duration = Duration::from_micros(50);
/// Spin iterations between `sched_yield`s while polling: when several queue threads share
/// one CPU, a spinning thread must let the others reap their completions.
const SPINS_PER_YIELD: u32 = 64;

/// What one queue measured.
pub struct QueueOutcome {
    pub latency_ns: Histogram<u64>,
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub bad_used_len: u64,
    pub mismatches: u64,
    pub verified_reads: u64,
    /// Kicks sent (the device asked for them through `avail_event`), whole run.
    pub kicks: u64,
    /// Times the thread slept on the call eventfd, whole run.
    pub sleeps: u64,
    /// Requests completed over the whole run (warm-up and drain included), the base of
    /// the two counters above.
    pub completed: u64,
    pub first_problem: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Clone, Copy)]
struct Slot {
    op: Op,
    sector: u64,
    stamp: u64,
    submitted: Instant,
    busy: bool,
    // Verify mode: the block this slot last wrote and must read back next.
    pending_readback: Option<(u64, u64)>,
}

/// xorshift64*: cheap, and deterministic per seed so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

pub struct Worker {
    pub index: u16,
    pub spec: JobSpec,
    pub ram: Arc<GuestRam>,
    pub area: QueueArea,
    pub ring: DriverRing,
    pub kick: EventFd,
    pub call: EventFd,
    /// The run starts (warm-up begins) at this instant for every queue.
    pub start: Instant,
}

struct State {
    slots: Vec<Slot>,
    rng: Rng,
    cursor: u64,
    counter: u64,
    out: QueueOutcome,
}

impl Worker {
    fn block_sectors(&self) -> u64 {
        u64::from(self.spec.block_bytes) / SECTOR_BYTES
    }

    fn blocks(&self) -> u64 {
        self.spec.image_bytes / u64::from(self.spec.block_bytes)
    }

    /// Picks the next request of slot `s`.
    fn next_op(&self, st: &mut State, s: usize) -> (Op, u64, u64) {
        st.counter += 1;
        let stamp = (u64::from(self.index) << 48) | ((s as u64) << 36) | st.counter;
        if self.spec.verify {
            if let Some((sector, stamp)) = st.slots[s].pending_readback.take() {
                return (Op::Read, sector, stamp);
            }
            // Slot-owned blocks: no two requests in flight ever touch the same sectors.
            let owners = u64::from(self.spec.queues) * u64::from(self.spec.iodepth);
            let owner = u64::from(self.index) * u64::from(self.spec.iodepth) + s as u64;
            let rounds = (self.blocks() - owner).div_ceil(owners);
            let k = if self.spec.random {
                st.rng.next() % rounds
            } else {
                st.cursor += 1;
                st.cursor % rounds
            };
            let sector = (owner + k * owners) * self.block_sectors();
            st.slots[s].pending_readback = Some((sector, stamp));
            return (Op::Write, sector, stamp);
        }
        let op = if st.rng.next() % 100 < u64::from(self.spec.read_pct) {
            Op::Read
        } else {
            Op::Write
        };
        let block = if self.spec.random {
            st.rng.next() % self.blocks()
        } else {
            let b = st.cursor % self.blocks();
            st.cursor += 1;
            b
        };
        (op, block * self.block_sectors(), stamp)
    }

    /// Frames slot `s`'s next request in guest memory and queues it.
    fn submit(&mut self, st: &mut State, s: usize) {
        let (op, sector, stamp) = self.next_op(st, s);
        let a = &self.area;
        let data = a.data_addr(s);
        let sectors = self.block_sectors();
        match op {
            Op::Write if self.spec.verify => {
                pattern::fill_guest(&self.ram, data, sector, sectors, stamp)
            }
            Op::Write => pattern::stamp_guest_headers(&self.ram, data, sector, sectors, stamp),
            Op::Read => {}
        }
        let header = a.header_addr(s);
        let mut h = [0u8; 16];
        let t = if op == Op::Read { T_IN } else { T_OUT };
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.ram.write(header, &h);
        let status = a.status_addr(s);
        self.ram.write(status, &[STATUS_UNSET]);
        let data_flags = if op == Op::Read { F_WRITE } else { 0 };
        let descs = [
            (header, 16u32, F_NEXT),
            (data, self.spec.block_bytes, data_flags | F_NEXT),
            (status, 1, F_WRITE),
        ];
        let head = if self.spec.indirect {
            let table = a.indirect_addr(s);
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                write_desc_at(
                    &self.ram,
                    table + DESC_BYTES * i as u64,
                    *addr,
                    *len,
                    *flags,
                    i as u16 + 1,
                );
            }
            let head = s as u16;
            let table_bytes = (DESC_BYTES * descs.len() as u64) as u32;
            self.ring
                .write_desc(head, table, table_bytes, F_INDIRECT, 0);
            head
        } else {
            let head = s as u16 * DESCS_PER_REQUEST;
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let index = head + i as u16;
                self.ring.write_desc(index, *addr, *len, *flags, index + 1);
            }
            head
        };
        st.slots[s] = Slot {
            op,
            sector,
            stamp,
            submitted: Instant::now(),
            busy: true,
            pending_readback: st.slots[s].pending_readback,
        };
        self.ring.push_avail(head);
    }

    fn slot_of(&self, id: u32) -> Option<usize> {
        let s = if self.spec.indirect {
            id as usize
        } else if id.is_multiple_of(u32::from(DESCS_PER_REQUEST)) {
            (id / u32::from(DESCS_PER_REQUEST)) as usize
        } else {
            return None;
        };
        (s < usize::from(self.spec.iodepth)).then_some(s)
    }

    /// Checks and records a completion; returns its slot, or None for a used entry no
    /// request in flight explains.
    fn complete(
        &self,
        st: &mut State,
        id: u32,
        len: u32,
        now: Instant,
        window: (Instant, Instant),
    ) -> Option<usize> {
        let s = self.slot_of(id).filter(|s| st.slots[*s].busy)?;
        let slot = st.slots[s];
        st.slots[s].busy = false;
        let a = &self.area;
        let mut status = [0u8; 1];
        self.ram.read(a.status_addr(s), &mut status);
        let problem = |st: &mut State, what: String| {
            if st.out.first_problem.is_none() {
                st.out.first_problem = Some(format!("queue {}: {what}", self.index));
            }
        };
        if status[0] != S_OK {
            st.out.errors += 1;
            problem(
                st,
                format!(
                    "status {:#x} for {} at sector {}",
                    status[0],
                    slot.op_name(),
                    slot.sector
                ),
            );
            st.slots[s].pending_readback = None;
            return Some(s);
        }
        let expected_len = match slot.op {
            Op::Read => self.spec.block_bytes + 1,
            Op::Write => 1,
        };
        if len != expected_len {
            st.out.bad_used_len += 1;
            problem(
                st,
                format!(
                    "used len {len} for {}, expected {expected_len}",
                    slot.op_name()
                ),
            );
        }
        if slot.op == Op::Read {
            let sectors = self.block_sectors();
            let checked = if self.spec.verify {
                st.out.verified_reads += 1;
                pattern::check_guest_full(
                    &self.ram,
                    a.data_addr(s),
                    slot.sector,
                    sectors,
                    slot.stamp,
                )
            } else {
                pattern::check_guest_headers(&self.ram, a.data_addr(s), slot.sector, sectors)
            };
            if let Err(m) = checked {
                st.out.mismatches += 1;
                problem(st, m.to_string());
            }
        }
        if now >= window.0 && now < window.1 {
            let ns = now.duration_since(slot.submitted).as_nanos() as u64;
            let _ = st.out.latency_ns.record(ns.max(1));
            match slot.op {
                Op::Read => st.out.reads += 1,
                Op::Write => st.out.writes += 1,
            }
            st.out.bytes += u64::from(self.spec.block_bytes);
        }
        Some(s)
    }

    fn kick_if_needed(&mut self, out: &mut QueueOutcome) -> Result<()> {
        if self.ring.publish() {
            self.kick.write(1).context("kick eventfd")?;
            out.kicks += 1;
        }
        Ok(())
    }

    /// Sleeps on the call eventfd (after arming the interrupt) for at most one slice.
    fn sleep(&self, out: &mut QueueOutcome, at_most: Duration) {
        self.ring.arm_interrupt();
        if self.ring.has_used() {
            return;
        }
        out.sleeps += 1;
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.call),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(at_most.as_millis()).unwrap_or(SLEEP_SLICE_MS);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call; count 1.
        unsafe { libc::poll(&mut pfd, 1, ms.min(SLEEP_SLICE_MS)) };
        let _ = self.call.read();
    }

    /// Runs the queue until the window ends and everything in flight has completed.
    pub fn run(mut self) -> Result<QueueOutcome> {
        let window_start = self.start + self.spec.warmup;
        let window_end = window_start + self.spec.duration;
        let depth = usize::from(self.spec.iodepth);
        let mut st = State {
            slots: vec![
                Slot {
                    op: Op::Read,
                    sector: 0,
                    stamp: 0,
                    submitted: self.start,
                    busy: false,
                    pending_readback: None,
                };
                depth
            ],
            rng: Rng(self.spec.seed
                ^ (u64::from(self.index) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                | 1),
            cursor: (self.blocks() / u64::from(self.spec.queues)) * u64::from(self.index),
            counter: 0,
            out: QueueOutcome {
                latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                    .context("latency histogram")?,
                reads: 0,
                writes: 0,
                bytes: 0,
                errors: 0,
                bad_used_len: 0,
                mismatches: 0,
                verified_reads: 0,
                kicks: 0,
                sleeps: 0,
                completed: 0,
                first_problem: None,
            },
        };
        // With a rate: this queue's share, one submission per `interval`, and the slots
        // waiting for their turn.
        let interval = self.spec.rate_iops.map(|r| {
            let per_queue = (r / u64::from(self.spec.queues)).max(1);
            Duration::from_nanos(1_000_000_000 / per_queue)
        });
        let mut waiting: Vec<usize> = Vec::new();
        let mut next_at = Instant::now();
        if interval.is_some() {
            waiting.extend((0..depth).rev());
        } else {
            for s in 0..depth {
                self.submit(&mut st, s);
            }
        }
        self.kick_if_needed(&mut st.out)?;
        let mut inflight = depth;
        let mut last_progress = Instant::now();
        let mut spins = 0u32;
        loop {
            let now = Instant::now();
            let stopping = now >= window_end;
            let mut progressed = false;
            if let Some(interval) = interval {
                if stopping {
                    inflight -= waiting.len();
                    waiting.clear();
                }
                // A queue that fell behind (a slow completion) does not burst to catch up
                // more than one request.
                next_at = next_at.max(now.checked_sub(interval).unwrap_or(now));
                while now >= next_at {
                    let Some(s) = waiting.pop() else { break };
                    self.submit(&mut st, s);
                    next_at += interval;
                    progressed = true;
                }
            }
            while let Some(used) = self.ring.pop_used() {
                let window = (window_start, window_end);
                let Some(s) = self.complete(&mut st, used.id, used.len, now, window) else {
                    bail!(
                        "queue {}: used entry {used:?} matches no request in flight",
                        self.index
                    );
                };
                progressed = true;
                st.out.completed += 1;
                if stopping {
                    inflight -= 1;
                } else if interval.is_some() {
                    waiting.push(s);
                } else {
                    self.submit(&mut st, s);
                }
            }
            self.kick_if_needed(&mut st.out)?;
            if stopping && inflight == 0 {
                return Ok(st.out);
            }
            if progressed {
                last_progress = now;
                continue;
            }
            if now.duration_since(last_progress) > STALL_TIMEOUT {
                bail!(
                    "queue {}: no completion for {STALL_TIMEOUT:?} with {inflight} requests in flight",
                    self.index
                );
            }
            if !waiting.is_empty() && inflight == waiting.len() {
                // Nothing in flight, only waiting for the next slot: no completion can
                // come, so neither a stall nor an eventfd to sleep on.
                last_progress = now;
                let wait = next_at.saturating_duration_since(now);
                if wait > RATE_SPIN {
                    std::thread::sleep(wait - RATE_SPIN);
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            if now.duration_since(last_progress) < self.spec.poll {
                spins += 1;
                if spins.is_multiple_of(SPINS_PER_YIELD) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            // With slots waiting for their turn, wake for it (a completion wakes us too).
            let until_turn = if waiting.is_empty() {
                Duration::MAX
            } else {
                next_at.saturating_duration_since(now)
            };
            if until_turn > Duration::from_millis(1) {
                self.sleep(&mut st.out, until_turn);
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Slot {
    fn op_name(&self) -> &'static str {
        match self.op {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}
