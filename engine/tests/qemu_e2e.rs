//! End to end with real parts: a QEMU (TCG) guest whose disk is served by `strait serve`.
//!
//! The same scenarios as `guest_qsd.rs` (the qemu-storage-daemon baseline), held to the same
//! checks: what the guest wrote, what it read back and what the image on the host holds must
//! agree, byte for byte (md5). The engine's control API is asked for its own view afterwards.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fill, GuestReport, Qemu, QemuConfig, Scenario, BOOT_AND_SCENARIO_TIMEOUT};
use serde_json::Value;
use strait_engine::control::ControlClient;

const IMAGE_SIZE_BYTES: u64 = 32 << 20;
const MIB: u64 = 1 << 20;
/// `strait serve` creates both sockets within milliseconds; 10 s covers a loaded 2-core host.
const SERVE_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Shutdown drains queues and flushes the image: well under a second here.
const SERVE_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A `strait serve` child process, killed if the test fails before stopping it.
struct Serve {
    child: Child,
    control: PathBuf,
    vhost: PathBuf,
    log: PathBuf,
}

impl Serve {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> Serve {
        let vhost = dir.join("vhost.sock");
        let control = dir.join("control.sock");
        let log = dir.join("serve.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_strait"));
        command
            .arg("serve")
            .arg("--disk")
            .arg(image)
            .arg("--vhost-socket")
            .arg(&vhost)
            .arg("--control")
            .arg(&control)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = common::kill_with_parent(&mut command).spawn().unwrap();
        for socket in [&vhost, &control] {
            common::wait_for_socket(
                socket,
                &mut child,
                "strait serve",
                Some(&log),
                SERVE_START_TIMEOUT,
            )
            .unwrap();
        }
        Serve {
            child,
            control,
            vhost,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn call(&self, cmd: &str) -> Value {
        ControlClient::connect(&self.control)
            .unwrap()
            .call(cmd)
            .unwrap()
    }

    /// SIGTERM, then the exit status; asserts a clean exit that removed its sockets.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + SERVE_STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "strait serve ignored SIGTERM: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit {status}: {}", self.log_text());
        assert!(!self.vhost.exists(), "vhost socket left behind");
        assert!(!self.control.exists(), "control socket left behind");
        assert!(
            self.log_text().contains("image flushed"),
            "{}",
            self.log_text()
        );
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(config: &QemuConfig, serve: &Serve) -> GuestReport {
    let mut qemu = Qemu::spawn(config).unwrap();
    let report = qemu
        .wait_verdict(BOOT_AND_SCENARIO_TIMEOUT)
        .unwrap_or_else(|e| panic!("no verdict: {e:?}\nstrait log:\n{}", serve.log_text()));
    report.log(config.scenario);
    report
}

fn totals(serve: &Serve) -> Value {
    serve.call("stats")["totals"].clone()
}

#[test]
fn qemu_strait_guest_writes_and_reads_back() {
    if !common::require_qemu() {
        return;
    }
    let guest = common::guest_artifacts();
    let dir = common::test_dir("strait-rw");
    let image = dir.path().join("disk.img");
    // Non-zero content outside the written range, so md5_disk checks it was left alone.
    common::make_image(&image, IMAGE_SIZE_BYTES, Fill::Seeded(1)).unwrap();
    let serve = Serve::start(dir.path(), &image, &[]);
    let report = boot(
        &QemuConfig::new(&guest, &serve.vhost, Scenario::Rw).arg_mib(8),
        &serve,
    );

    report.assert_pass();
    assert_eq!(report.value("md5_written"), report.value("md5_read"));
    assert_eq!(report.value_u64("length"), 8 * MIB);
    let offset = report.value_u64("offset");
    assert_eq!(
        common::md5_file_range(&image, offset, 8 * MIB).unwrap(),
        report.value("md5_written"),
        "host image differs from what the guest wrote\n{}",
        serve.log_text()
    );
    assert_eq!(common::md5_file(&image).unwrap(), report.value("md5_disk"));

    let t = totals(&serve);
    assert!(t["bytes_written"].as_u64().unwrap() >= 8 * MIB, "{t}");
    assert!(t["bytes_read"].as_u64().unwrap() >= 8 * MIB, "{t}");
    let errors: u64 = t["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(errors, 0, "{t}");
    let status = serve.call("status");
    assert_eq!(status["disk"]["size_bytes"], IMAGE_SIZE_BYTES);
    assert_eq!(status["vmm_connected"], false, "QEMU has exited");
    serve.stop();
}

#[test]
fn qemu_strait_two_queues_on_two_cores() {
    if !common::require_qemu() {
        return;
    }
    let cores = if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        "0,1"
    } else {
        "0"
    };
    let guest = common::guest_artifacts();
    let dir = common::test_dir("strait-mq");
    let image = dir.path().join("disk.img");
    common::make_image(&image, IMAGE_SIZE_BYTES, Fill::Zeros).unwrap();
    let serve = Serve::start(dir.path(), &image, &["--queues", "2", "--cores", cores]);
    let offset = 20 * MIB + 4096;
    let report = boot(
        &QemuConfig::new(&guest, &serve.vhost, Scenario::Rw)
            .arg_mib(4)
            .offset_bytes(offset)
            .num_queues(2)
            .cpus(2),
        &serve,
    );
    report.assert_pass();
    assert_eq!(
        common::md5_file_range(&image, offset, 4 * MIB).unwrap(),
        report.value("md5_written")
    );
    assert_eq!(common::md5_file(&image).unwrap(), report.value("md5_disk"));
    let stats = serve.call("stats");
    let queues = stats["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2);
    assert_eq!(queues[1]["core"], if cores == "0,1" { 1 } else { 0 });
    let status = serve.call("status");
    assert_eq!(status["queues"], 2);
    serve.stop();
}

#[test]
fn qemu_strait_info_matches_the_config_space() {
    if !common::require_qemu() {
        return;
    }
    let guest = common::guest_artifacts();
    let dir = common::test_dir("strait-info");
    let image = dir.path().join("disk.img");
    common::make_image(&image, IMAGE_SIZE_BYTES, Fill::Zeros).unwrap();
    let serve = Serve::start(
        dir.path(),
        &image,
        &["--queues", "2", "--serial", "strait-test-serial"],
    );
    let report = boot(
        &QemuConfig::new(&guest, &serve.vhost, Scenario::Info).num_queues(2),
        &serve,
    );
    report.assert_pass();
    assert_eq!(report.value_u64("size_bytes"), IMAGE_SIZE_BYTES);
    assert_eq!(report.value_u64("logical_block_size"), 512);
    assert_eq!(report.value_u64("num_queues"), 2);
    assert_eq!(report.value("ro"), "0");
    // GET_ID answered with the configured serial.
    assert_eq!(report.value("serial"), "strait-test-serial");
    assert!(report.value_u64("discard_max_bytes") > 0);
    assert!(report.value_u64("write_zeroes_max_bytes") > 0);
    assert_eq!(report.value("write_cache"), "write_back");
    assert!(totals(&serve)["get_id"].as_u64().unwrap() >= 1);
    serve.stop();
}

#[test]
fn qemu_strait_flush_reaches_fdatasync() {
    if !common::require_qemu() {
        return;
    }
    let guest = common::guest_artifacts();
    let dir = common::test_dir("strait-flush");
    let image = dir.path().join("disk.img");
    common::make_image(&image, IMAGE_SIZE_BYTES, Fill::Zeros).unwrap();
    let serve = Serve::start(dir.path(), &image, &[]);
    let report = boot(
        &QemuConfig::new(&guest, &serve.vhost, Scenario::Flush),
        &serve,
    );
    report.assert_pass();
    assert_eq!(report.value("flush"), "ok");
    let range = common::md5_file_range(&image, report.value_u64("offset"), MIB).unwrap();
    assert_eq!(range, report.value("md5_written"));
    assert!(totals(&serve)["flushes"].as_u64().unwrap() >= 1);
    serve.stop();
}

#[test]
fn qemu_strait_discard_punches_holes() {
    if !common::require_qemu() {
        return;
    }
    let guest = common::guest_artifacts();
    let dir = common::test_dir("strait-discard");
    let image = dir.path().join("disk.img");
    common::make_image(&image, IMAGE_SIZE_BYTES, Fill::Byte(0xa5)).unwrap();
    let serve = Serve::start(dir.path(), &image, &[]);
    let report = boot(
        &QemuConfig::new(&guest, &serve.vhost, Scenario::Discard).arg_mib(4),
        &serve,
    );
    report.assert_pass();
    let zeros = common::md5_zeros(4 * MIB).unwrap();
    assert_eq!(report.value("md5_after"), zeros);
    let range = common::md5_file_range(&image, report.value_u64("offset"), 4 * MIB).unwrap();
    assert_eq!(
        range, zeros,
        "host image range is not zero after the discard"
    );
    assert!(totals(&serve)["discards"].as_u64().unwrap() >= 1);
    serve.stop();
}

#[test]
fn qemu_strait_read_only_disk_refuses_writes() {
    if !common::require_qemu() {
        return;
    }
    let guest = common::guest_artifacts();
    let dir = common::test_dir("strait-ro");
    let image = dir.path().join("disk.img");
    common::make_image(&image, IMAGE_SIZE_BYTES, Fill::Seeded(2)).unwrap();
    let before = common::md5_file(&image).unwrap();
    let serve = Serve::start(dir.path(), &image, &["--read-only"]);
    let report = boot(
        &QemuConfig::new(&guest, &serve.vhost, Scenario::ReadOnly),
        &serve,
    );
    report.assert_pass();
    assert_eq!(report.value("ro"), "1");
    assert_eq!(report.value("write"), "refused");
    assert_eq!(report.value("md5_disk"), before);
    assert_eq!(common::md5_file(&image).unwrap(), before);
    assert_eq!(serve.call("status")["disk"]["read_only"], true);
    serve.stop();
}

/// The live-migration workload on one QEMU, without a migration: it proves the scenario and
/// the heartbeat measurement that `migration_e2e.rs` relies on.
#[test]
fn qemu_strait_migrate_workload_without_migration() {
    if !common::require_qemu() {
        return;
    }
    /// Long enough for a rate and for the counter to wrap around the region under TCG.
    const DURATION_S: u32 = 10;
    /// About 100 heartbeats a second on an idle 2-core host, 60 under load with the memory
    /// loop; below 10 a second the downtime measurement would be too coarse to mean much.
    const HEARTBEATS_PER_S_MIN: u64 = 10;
    /// Without a migration the guest never pauses; a gap this long means it stalled (TCG on
    /// a busy host still steps well under a second).
    const GAP_MAX: Duration = Duration::from_secs(2);

    let guest = common::guest_artifacts();
    let dir = common::test_dir("strait-migrate");
    let image = dir.path().join("disk.img");
    // Non-zero content, so the guest's fill of the region with counter 0 is checked too.
    common::make_image(&image, IMAGE_SIZE_BYTES, Fill::Seeded(3)).unwrap();
    let serve = Serve::start(dir.path(), &image, &[]);
    let config = QemuConfig::new(&guest, &serve.vhost, Scenario::Migrate).duration_s(DURATION_S);
    let mut qemu = Qemu::spawn(&config).unwrap();
    let report = qemu
        .wait_verdict(BOOT_AND_SCENARIO_TIMEOUT)
        .unwrap_or_else(|e| panic!("no verdict: {e:?}\nstrait log:\n{}", serve.log_text()));
    report.log(config.scenario);

    report.assert_pass();
    let iterations = report.value_u64("migrate_iterations");
    // The DMA check works: the last data read through the page cache is read again
    // without disk I/O and is right.
    assert!(report.value_u64("dma_refreshes") > 0);
    assert_eq!(
        (report.value("dma_ok"), report.value("dma_from_cache")),
        ("1", "1")
    );
    assert_eq!(report.value_u64("blocks_bad"), 0);
    assert_eq!(
        report.value_u64("blocks_checked"),
        common::MIGRATE_REGION_BLOCKS
    );
    assert_eq!(
        report.value_u64("offset"),
        common::MIGRATE_REGION_OFFSET_DEFAULT
    );
    assert!(
        iterations >= HEARTBEATS_PER_S_MIN * u64::from(DURATION_S),
        "only {iterations} heartbeats in {DURATION_S} s"
    );

    let beats = common::heartbeats(&report.console);
    let numbers: Vec<u64> = beats.iter().map(|h| h.i).collect();
    assert_eq!(
        numbers,
        (1..=iterations).collect::<Vec<_>>(),
        "heartbeats skip"
    );
    let arrivals = qemu.heartbeat_arrivals();
    assert_eq!(arrivals.len() as u64, iterations);
    let gap = common::largest_heartbeat_gap(&arrivals).unwrap();
    let span = arrivals[arrivals.len() - 1]
        .arrived
        .duration_since(arrivals[0].arrived);
    eprintln!(
        "{iterations} heartbeats in {:.2} s on the host ({:.0}/s), largest gap {:?} \
         (i={}..{}), memory copies {}",
        span.as_secs_f64(),
        iterations as f64 / span.as_secs_f64(),
        gap.gap,
        gap.before_i,
        gap.after_i,
        report.value("mem_copies"),
    );
    assert!(gap.gap < GAP_MAX, "{gap:?}");

    // What the guest read back is what the host image holds, and both are what the counter
    // says they must be.
    let offset = report.value_u64("offset");
    let length = common::MIGRATE_REGION_BYTES;
    assert_eq!(
        common::md5_file_range(&image, offset, length).unwrap(),
        report.value("md5_region")
    );
    let bytes = std::fs::read(&image).unwrap();
    let region = &bytes[offset as usize..(offset + length) as usize];
    assert!(
        region == common::migrate_region(iterations).as_slice(),
        "host image region differs from the counter's expectation"
    );
    let written = totals(&serve)["bytes_written"].as_u64().unwrap();
    assert!(written >= length + iterations * common::MIGRATE_BLOCK_SIZE_BYTES);
    serve.stop();
}
