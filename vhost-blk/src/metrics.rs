//! Per-queue counters and a latency histogram.
//!
//! Each queue's metrics are written by exactly one thread (the executor that owns the queue)
//! and read by the control API, so every field is a relaxed atomic: no lock, no false
//! sharing between queues (each queue's block is its own allocation).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Sub-buckets per power of two in the latency histogram: 8 gives a worst-case relative
/// error of 12.5%, plenty to tell a 20 µs request from a 200 µs one.
const SUB_BUCKET_BITS: u32 = 3;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
/// Powers of two covered: 2^40 ns is about 18 minutes, beyond any request that completes.
const MAGNITUDES: usize = 40;
const BUCKETS: usize = MAGNITUDES * SUB_BUCKETS;

/// Why a request failed. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A malformed or out-of-bounds descriptor chain.
    BadDescriptor,
    /// A request that reaches past the end of the disk.
    OutOfRange,
    /// An unknown request type.
    Unsupported,
    /// A write, discard or write-zeroes to a read-only disk.
    ReadOnly,
    /// The host I/O failed.
    Io,
    /// A mutation refused because the disk is fenced (a demoted or superseded replication
    /// source, or a destination not yet promoted).
    Fenced,
}

/// What kind of request completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    Other,
}

/// The live counters of one queue.
#[derive(Debug)]
pub struct QueueMetrics {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    get_id: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    bad_descriptor: AtomicU64,
    out_of_range: AtomicU64,
    unsupported: AtomicU64,
    read_only: AtomicU64,
    fenced: AtomicU64,
    io: AtomicU64,
    latency_max_ns: AtomicU64,
    latency: Box<[AtomicU64]>,
}

impl Default for QueueMetrics {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            write_zeroes: AtomicU64::new(0),
            get_id: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            bad_descriptor: AtomicU64::new(0),
            out_of_range: AtomicU64::new(0),
            unsupported: AtomicU64::new(0),
            read_only: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            io: AtomicU64::new(0),
            latency_max_ns: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB_BUCKETS as u64 {
        return ns as usize;
    }
    let magnitude = 63 - ns.leading_zeros(); // >= SUB_BUCKET_BITS
    let shift = magnitude - SUB_BUCKET_BITS;
    let sub = ((ns >> shift) as usize) & (SUB_BUCKETS - 1);
    let index = (shift as usize + 1) * SUB_BUCKETS + sub;
    index.min(BUCKETS - 1)
}

/// The smallest latency that falls into `index` (the bucket's lower edge).
fn bucket_floor_ns(index: usize) -> u64 {
    if index < SUB_BUCKETS {
        return index as u64;
    }
    let shift = (index / SUB_BUCKETS - 1) as u32;
    let sub = (index % SUB_BUCKETS) as u64;
    (SUB_BUCKETS as u64 + sub) << shift
}

impl QueueMetrics {
    /// Records one completed request.
    pub fn record(&self, op: OpKind, bytes: u64, latency_ns: u64) {
        bump(&self.requests, 1);
        match op {
            OpKind::Read => {
                bump(&self.reads, 1);
                bump(&self.bytes_read, bytes);
            }
            OpKind::Write => {
                bump(&self.writes, 1);
                bump(&self.bytes_written, bytes);
            }
            OpKind::Flush => bump(&self.flushes, 1),
            OpKind::Discard => bump(&self.discards, 1),
            OpKind::WriteZeroes => bump(&self.write_zeroes, 1),
            OpKind::GetId => bump(&self.get_id, 1),
            OpKind::Other => {}
        }
        bump(&self.latency[bucket_of(latency_ns)], 1);
        self.latency_max_ns.fetch_max(latency_ns, Ordering::Relaxed);
    }

    /// Records a failed request by reason.
    pub fn record_error(&self, kind: ErrorKind) {
        let counter = match kind {
            ErrorKind::BadDescriptor => &self.bad_descriptor,
            ErrorKind::OutOfRange => &self.out_of_range,
            ErrorKind::Unsupported => &self.unsupported,
            ErrorKind::ReadOnly => &self.read_only,
            ErrorKind::Io => &self.io,
            ErrorKind::Fenced => &self.fenced,
        };
        bump(counter, 1);
    }

    /// A consistent-enough copy of the counters (each field is read atomically; the set is
    /// not a transaction, which a monitoring reader does not need).
    pub fn snapshot(&self) -> QueueSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueSnapshot {
            requests: get(&self.requests),
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            write_zeroes: get(&self.write_zeroes),
            get_id: get(&self.get_id),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            errors: ErrorCounts {
                bad_descriptor: get(&self.bad_descriptor),
                out_of_range: get(&self.out_of_range),
                unsupported: get(&self.unsupported),
                read_only: get(&self.read_only),
                io: get(&self.io),
                fenced: get(&self.fenced),
            },
            latency: Histogram {
                buckets: self.latency.iter().map(get).collect(),
                max_ns: get(&self.latency_max_ns),
            },
        }
    }
}

/// Error counters by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    pub bad_descriptor: u64,
    pub out_of_range: u64,
    pub unsupported: u64,
    pub read_only: u64,
    pub io: u64,
    pub fenced: u64,
}

impl ErrorCounts {
    /// All errors, whatever the reason.
    pub fn total(&self) -> u64 {
        self.bad_descriptor
            + self.out_of_range
            + self.unsupported
            + self.read_only
            + self.io
            + self.fenced
    }

    fn add(&mut self, other: &ErrorCounts) {
        self.bad_descriptor += other.bad_descriptor;
        self.out_of_range += other.out_of_range;
        self.unsupported += other.unsupported;
        self.read_only += other.read_only;
        self.io += other.io;
        self.fenced += other.fenced;
    }
}

/// A latency histogram snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    buckets: Vec<u64>,
    max_ns: u64,
}

impl Histogram {
    /// The number of samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The largest sample.
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The latency below which `quantile` (0.0..=1.0) of the samples fall, as the lower edge
    /// of the bucket that holds it; 0 with no samples.
    pub fn quantile_ns(&self, quantile: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        let rank = ((quantile.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_floor_ns(index).min(self.max_ns);
            }
        }
        self.max_ns
    }

    /// The histogram of samples recorded between `earlier` and `self`.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        Histogram {
            buckets,
            max_ns: self.max_ns,
        }
    }

    fn add(&mut self, other: &Histogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.max_ns = self.max_ns.max(other.max_ns);
    }
}

/// A copy of one queue's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_id: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: ErrorCounts,
    pub latency: Histogram,
}

impl QueueSnapshot {
    /// Adds another queue's counters to these (for totals).
    pub fn add(&mut self, other: &QueueSnapshot) {
        self.requests += other.requests;
        self.reads += other.reads;
        self.writes += other.writes;
        self.flushes += other.flushes;
        self.discards += other.discards;
        self.write_zeroes += other.write_zeroes;
        self.get_id += other.get_id;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.errors.add(&other.errors);
        self.latency.add(&other.latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1_000,
            65_535,
            1 << 30,
            u64::MAX,
        ] {
            let b = bucket_of(ns);
            assert!(b >= last, "bucket of {ns} went backwards");
            last = b;
            let floor = bucket_floor_ns(b);
            assert!(floor <= ns, "floor {floor} above sample {ns}");
            if b < BUCKETS - 1 {
                // Relative error bound of the histogram: one sub-bucket.
                assert!(
                    ns - floor <= ns / SUB_BUCKETS as u64,
                    "{ns} vs floor {floor}"
                );
            }
        }
    }

    #[test]
    fn quantiles_come_from_the_samples() {
        let m = QueueMetrics::default();
        for i in 1..=100u64 {
            m.record(OpKind::Read, 4096, i * 1_000);
        }
        m.record_error(ErrorKind::OutOfRange);
        let s = m.snapshot();
        assert_eq!(s.reads, 100);
        assert_eq!(s.bytes_read, 409_600);
        assert_eq!(s.errors.out_of_range, 1);
        assert_eq!(s.errors.total(), 1);
        let p50 = s.latency.quantile_ns(0.5);
        assert!((44_000..=50_000).contains(&p50), "p50 {p50}");
        let p99 = s.latency.quantile_ns(0.99);
        assert!((87_000..=99_000).contains(&p99), "p99 {p99}");
        assert_eq!(s.latency.max_ns(), 100_000);
        assert_eq!(Histogram::default().quantile_ns(0.5), 0);
    }
}
