//! The load generator against real backends, briefly, so it cannot rot: `strait serve`
//! (this crate's `strait-bench-blk strait serve`, the same library and build as the `strait`
//! binary) and qemu-storage-daemon. Each run asserts on data: requests completed, none
//! failed, and in verify mode every block read back is byte-for-byte what was written.

use std::path::Path;
use std::time::Duration;

use strait_bench::blk::job::{run_job, JobResult, JobSpec};
use strait_bench::blk::pattern;
use strait_bench::blk::peers::{qsd_available, Peer, PeerConfig, QsdAio, RunningPeer};

/// Small enough to fill in a few milliseconds, large enough for 2 x 8 slot-owned blocks of
/// 64 KiB many times over.
const IMAGE_BYTES: u64 = 32 << 20;
/// Long enough for thousands of requests, short enough for CI.
const RUN: Duration = Duration::from_millis(700);

fn spec(verify: bool, read_pct: u8, block_bytes: u32, queues: u16) -> JobSpec {
    JobSpec {
        queues,
        iodepth: 8,
        block_bytes,
        read_pct,
        random: true,
        warmup: Duration::from_millis(100),
        duration: RUN,
        verify,
        indirect: false,
        poll: Duration::from_micros(20),
        image_bytes: IMAGE_BYTES,
        load_cpus: Vec::new(),
        seed: 7,
        rate_iops: None,
    }
}

fn config(dir: &Path, queues: u16) -> PeerConfig {
    let image = dir.join("disk.img");
    if !pattern::image_looks_filled(&image, IMAGE_BYTES) {
        pattern::fill_image(&image, IMAGE_BYTES).expect("image");
    }
    PeerConfig {
        image,
        queues,
        cpus: vec![0],
        strait: vec![
            env!("CARGO_BIN_EXE_strait-bench-blk").into(),
            "strait".into(),
        ],
        qsd_aio: QsdAio::IoUring,
        qsd_direct: true,
        qsd_iothread: true,
        dir: dir.to_owned(),
    }
}

fn run_on(peer: Peer, cfg: &PeerConfig, job: &JobSpec, tag: &str) -> JobResult {
    let running = RunningPeer::start(peer, cfg, tag).expect("backend starts");
    let result = run_job(&running.socket, job, Some(running.pid()));
    // Stopped either way, but a failed job is the first thing to report.
    let stopped = running.stop();
    let result = result.expect("job runs");
    stopped.expect("backend stops");
    result
}

#[track_caller]
fn assert_clean(r: &JobResult, what: &str) {
    assert!(r.iops > 0.0, "{what}: no I/O completed: {r:?}");
    assert_eq!(
        (r.errors, r.mismatches, r.bad_used_len),
        (0, 0, 0),
        "{what}: {:?}",
        r.first_problem
    );
    assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us, "{what}: {r:?}");
    assert!(
        r.backend_cpu_s.is_some(),
        "{what}: backend CPU not measured"
    );
}

fn exercise(peer: Peer) {
    let dir = tempfile::tempdir().expect("dir");
    let cfg = config(dir.path(), 2);
    // Write then read back, full comparison, on two queues.
    let r = run_on(peer, &cfg, &spec(true, 0, 4096, 2), "verify");
    assert_clean(&r, "verify");
    assert!(r.verified_reads > 0, "verify mode read nothing back: {r:?}");
    assert!(r.writes > 0);
    // Mixed 64 KiB load: reads check every sector header, including sectors written by
    // the writes in flight around them.
    let r = run_on(peer, &cfg, &spec(false, 70, 65536, 2), "mixed");
    assert_clean(&r, "mixed");
    assert!(r.reads > 0 && r.writes > 0, "{r:?}");
}

#[test]
fn loadgen_against_strait_serve() {
    exercise(Peer::Strait);
}

#[test]
fn loadgen_against_qsd() {
    if !qsd_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-storage-daemon missing under CI (scripts/install-deps.sh installs it)"
        );
        eprintln!("SKIPPED loadgen_against_qsd: qemu-storage-daemon is not installed");
        return;
    }
    exercise(Peer::Qsd);
}

/// The checks themselves must fail when the disk holds the wrong data: an image that was
/// never filled (all zeros) fails every header check.
#[test]
fn loadgen_detects_wrong_data_on_strait() {
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = config(dir.path(), 1);
    cfg.image = dir.path().join("zeros.img");
    std::fs::File::create(&cfg.image)
        .and_then(|f| f.set_len(IMAGE_BYTES))
        .expect("zero image");
    let mut job = spec(false, 100, 4096, 1);
    job.duration = Duration::from_millis(200);
    let r = run_on(Peer::Strait, &cfg, &job, "zeros");
    // Mismatches are counted for every read, reads only inside the measured window.
    assert!(r.reads > 0 && r.mismatches >= r.reads, "{r:?}");
    let problem = r.first_problem.unwrap_or_default();
    assert!(problem.contains("magic 0x0"), "{problem}");
}
