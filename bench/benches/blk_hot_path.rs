//! Per-request costs on strait's block data path besides parsing (`request_parse.rs`):
//!
//! - `guest_copy`: copying a read's data into guest memory through vm-memory, the way the
//!   queue worker does, for each state of the dirty-log bitmap: a region never attached to
//!   a device, attached with logging off (the normal case: two relaxed loads per write), and
//!   logging on before the VMM has shared a log (vhost-user-backend then takes a lock per
//!   write). A shared log itself cannot be built outside the vhost-user protocol
//!   (`MmapLogReg::from_file` is crate-private in vhost-user-backend 0.24), so logging into
//!   a real log is measured end to end by `strait-bench-blk`, not here.
//! - `metrics`: recording one completion in a queue's counters and latency histogram.
//!
//! ```text
//! cargo bench -p strait-bench --bench blk_hot_path -- --warm-up-time 0.2 --measurement-time 0.5
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strait_vhost_blk::bitmap::{LogBitmap, LogSwitch};
use strait_vhost_blk::metrics::{OpKind, QueueMetrics};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory of the copy cases: room for the largest copy at a page-aligned address.
const MEMORY_BYTES: usize = 1 << 20;
const DATA_ADDR: u64 = 0x1000;
/// A 4 KiB read (the random-I/O case) and a 64 KiB one (`MAX_SEGMENT_BYTES`).
const COPY_SIZES: [usize; 2] = [4096, 65536];

/// Short by default so the suite can run on every CI push; criterion's flags override.
const WARM_UP: Duration = Duration::from_millis(500);
const MEASUREMENT: Duration = Duration::from_secs(2);
/// Fewer bootstrap resamples than criterion's 100 000, as in `request_parse.rs`.
const RESAMPLES: usize = 10_000;

#[derive(Clone, Copy)]
enum LogState {
    Unattached,
    Off,
    OnWithoutLog,
}

impl LogState {
    fn name(self) -> &'static str {
        match self {
            LogState::Unattached => "unattached",
            LogState::Off => "log_off",
            LogState::OnWithoutLog => "log_on_no_region",
        }
    }
}

fn memory(state: LogState) -> GuestMemoryMmap<LogBitmap> {
    let mem = GuestMemoryMmap::<LogBitmap>::from_ranges(&[(GuestAddress(0), MEMORY_BYTES)])
        .expect("guest memory maps");
    let switch = Arc::new(LogSwitch::default());
    match state {
        LogState::Unattached => {}
        LogState::Off => mem.iter().for_each(|r| (**r).bitmap().attach(&switch)),
        LogState::OnWithoutLog => {
            mem.iter().for_each(|r| (**r).bitmap().attach(&switch));
            switch.set(true);
        }
    }
    mem
}

fn bench_guest_copy(c: &mut Criterion) {
    let mut group = c.benchmark_group("guest_copy");
    for size in COPY_SIZES {
        let data = vec![0x5Au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        for state in [LogState::Unattached, LogState::Off, LogState::OnWithoutLog] {
            let mem = memory(state);
            // The copy really lands: checked once before timing.
            mem.write_slice(&data, GuestAddress(DATA_ADDR))
                .expect("inside guest memory");
            let mut back = vec![0u8; size];
            mem.read_slice(&mut back, GuestAddress(DATA_ADDR))
                .expect("inside guest memory");
            assert_eq!(back, data);
            group.bench_with_input(BenchmarkId::new(state.name(), size), &size, |b, _| {
                b.iter(|| {
                    mem.write_slice(black_box(&data), GuestAddress(DATA_ADDR))
                        .expect("inside guest memory");
                    // The status byte every completion writes.
                    mem.write_obj(0u8, GuestAddress(DATA_ADDR - 1))
                        .expect("inside guest memory");
                })
            });
        }
    }
    group.finish();
}

fn bench_metrics(c: &mut Criterion) {
    let metrics = QueueMetrics::default();
    let mut latency_ns = 1_000u64;
    c.bench_function("metrics/record_read", |b| {
        b.iter(|| {
            // Spread over the histogram's buckets as real latencies are.
            latency_ns = latency_ns.wrapping_mul(13).wrapping_add(7) % 10_000_000;
            metrics.record(OpKind::Read, 4096, black_box(latency_ns));
        })
    });
    assert!(metrics.snapshot().requests > 0);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .nresamples(RESAMPLES)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_guest_copy, bench_metrics
}
criterion_main!(benches);
