//! The test guest against qemu-storage-daemon, QEMU's own vhost-user-blk backend.
//!
//! This is the baseline: it proves the guest, the harness and the host-side checks on a
//! backend known to be right, so that when the same scenarios fail against `strait serve`
//! (tests/qemu_e2e.rs) the fault is strait's.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    parse_console_line, ConsoleLine, Fill, GuestReport, Heartbeat, HeartbeatArrival, HeartbeatGap,
    Qemu, QemuConfig, QsdConfig, Scenario, StorageDaemon, Verdict, BOOT_AND_SCENARIO_TIMEOUT,
    MIGRATE_BLOCK_SIZE_BYTES, MIGRATE_REGION_BYTES,
};

/// Big enough for every scenario's range at its default offset, small enough that the
/// guest's md5 of the whole disk takes well under a second under TCG.
const IMAGE_SIZE_BYTES: u64 = 32 << 20;
const MIB: u64 = 1 << 20;

/// Boots the guest with `config` against a qsd export of `image` and returns its report.
fn run_guest(dir: &Path, qsd: &QsdConfig, config: &QemuConfig) -> GuestReport {
    let _backend = StorageDaemon::start(qsd, dir).expect("start qemu-storage-daemon");
    let mut qemu = Qemu::spawn(config).expect("start QEMU");
    let report = qemu
        .wait_verdict(BOOT_AND_SCENARIO_TIMEOUT)
        .expect("guest verdict");
    report.log(config.scenario);
    report
}

struct Setup {
    dir: tempfile::TempDir,
    image: std::path::PathBuf,
    socket: std::path::PathBuf,
    guest: common::Guest,
}

fn setup(name: &str, fill: Fill) -> Setup {
    let guest = common::guest_artifacts();
    let dir = common::test_dir(name);
    let image = dir.path().join("disk.img");
    common::make_image(&image, IMAGE_SIZE_BYTES, fill).expect("create image");
    let socket = dir.path().join("vhost.sock");
    Setup {
        dir,
        image,
        socket,
        guest,
    }
}

#[test]
fn harness_parses_console_lines() {
    assert_eq!(
        parse_console_line("STRAIT-RESULT a=1 b=x=y\r"),
        ConsoleLine::Results(vec![("a".into(), "1".into()), ("b".into(), "x=y".into())])
    );
    // A kernel message can precede the marker on the same serial line.
    assert_eq!(
        parse_console_line("[    2.1] virtio_blk virtio0: 1/0/0STRAIT-VERDICT PASS"),
        ConsoleLine::Verdict(Verdict::Pass)
    );
    assert_eq!(
        parse_console_line("STRAIT-VERDICT FAIL reason=no_disk"),
        ConsoleLine::Verdict(Verdict::Fail {
            reason: "no_disk".into()
        })
    );
    assert_eq!(
        parse_console_line("STRAIT-VERDICT MAYBE"),
        ConsoleLine::BadVerdict
    );
    assert_eq!(
        parse_console_line("[    0.0] Linux version"),
        ConsoleLine::Other
    );
}

#[test]
fn harness_md5_helpers_agree() {
    let dir = common::test_dir("md5");
    let image = dir.path().join("zeros.img");
    common::make_image(&image, 3 * MIB, Fill::Zeros).expect("create image");
    let zeros = common::md5_zeros(3 * MIB).expect("md5 of zeros");
    assert_eq!(common::md5_file(&image).expect("md5 of image"), zeros);
    // Well-known: md5 of 1 MiB of zeros.
    assert_eq!(
        common::md5_file_range(&image, MIB, MIB).expect("md5 of range"),
        "b6d81b360a5672d80c27430f39153e2c"
    );
    assert!(common::md5_file_range(&image, 2 * MIB, 2 * MIB).is_err());

    let seeded = dir.path().join("seeded.img");
    common::make_image(&seeded, MIB + 3, Fill::Seeded(7)).expect("create image");
    let again = dir.path().join("again.img");
    common::make_image(&again, MIB + 3, Fill::Seeded(7)).expect("create image");
    assert_eq!(
        common::md5_file(&seeded).expect("md5"),
        common::md5_file(&again).expect("md5")
    );
    assert_ne!(
        common::md5_file(&seeded).expect("md5"),
        common::md5_zeros(MIB + 3).expect("md5")
    );
    let other = dir.path().join("other.img");
    common::make_image(&other, MIB + 3, Fill::Seeded(6)).expect("create image");
    assert_ne!(
        common::md5_file(&seeded).expect("md5"),
        common::md5_file(&other).expect("md5")
    );
}

#[test]
fn harness_parses_heartbeats_strictly() {
    assert_eq!(
        common::parse_heartbeat("STRAIT-HB i=42 up=18.02\r"),
        Some(Heartbeat {
            i: 42,
            guest_uptime_ms: 18_020
        })
    );
    assert_eq!(
        common::parse_heartbeat("[    9.1] virtio_blk: xSTRAIT-HB i=7 up=0.50").map(|h| h.i),
        Some(7)
    );
    // A line cut short by a migration never yields a wrong number.
    for cut in [
        "STRAIT-HB i=4",
        "STRAIT-HB i=42 up=",
        "STRAIT-HB i=42 up=18.0",
    ] {
        assert_eq!(common::parse_heartbeat(cut), None, "{cut}");
    }
    assert_eq!(
        common::parse_heartbeat("STRAIT-HB i=42 up=18.02 more"),
        None
    );
    assert_eq!(common::parse_heartbeat("STRAIT-RESULT i=42 up=18.02"), None);
    let console = "boot\nSTRAIT-HB i=1 up=1.00\nnoise\nSTRAIT-HB i=2 up=1.01\n";
    let numbers: Vec<u64> = common::heartbeats(console).iter().map(|h| h.i).collect();
    assert_eq!(numbers, [1, 2]);
}

#[test]
fn harness_finds_the_largest_heartbeat_gap() {
    let start = Instant::now();
    let arrival = |i: u64, ms: u64| HeartbeatArrival {
        heartbeat: Heartbeat {
            i,
            guest_uptime_ms: 0,
        },
        arrived: start + Duration::from_millis(ms),
    };
    let arrivals = [
        arrival(1, 0),
        arrival(2, 10),
        arrival(3, 250),
        arrival(4, 260),
    ];
    assert_eq!(
        common::largest_heartbeat_gap(&arrivals),
        Some(HeartbeatGap {
            gap: Duration::from_millis(240),
            before_i: 2,
            after_i: 3
        })
    );
    assert_eq!(common::largest_heartbeat_gap(&arrivals[..1]), None);
}

#[test]
fn harness_migrate_region_holds_the_last_counter_per_block() {
    let block_size = MIGRATE_BLOCK_SIZE_BYTES as usize;
    let block = common::migrate_block(5);
    assert_eq!(block.len(), block_size);
    assert!(block.starts_with(b"strait-migrate i=5         \n0123"));
    assert!(block.ends_with(b"+/0123456789abcdefghijklmnopqrstuvwxy\n"));
    let region = common::migrate_region(2500);
    assert_eq!(region.len() as u64, MIGRATE_REGION_BYTES);
    let header = |b: usize| &region[b * block_size..b * block_size + 28];
    assert_eq!(header(0), &common::migrate_block(2048)[..28]);
    assert_eq!(header(452), &common::migrate_block(2500)[..28]);
    assert_eq!(header(453), &common::migrate_block(1477)[..28]);
    assert_eq!(header(1023), &common::migrate_block(2047)[..28]);
    assert_eq!(
        common::migrate_region(0),
        common::migrate_block(0).repeat(1024)
    );
}

#[test]
fn harness_migration_destination_waits_paused_with_two_monitors() {
    let guest = common::Guest {
        kernel: "vmlinuz".into(),
        initramfs: "initramfs.gz".into(),
    };
    let config = QemuConfig::new(&guest, Path::new("v.sock"), Scenario::Migrate)
        .duration_s(30)
        .qmp_socket(Path::new("engine.qmp"))
        .qmp_socket(Path::new("test.qmp"))
        .incoming_paused();
    let args = config.args().join(" ");
    assert!(
        args.contains("-qmp unix:engine.qmp,server=on,wait=off"),
        "{args}"
    );
    assert!(
        args.contains("-qmp unix:test.qmp,server=on,wait=off"),
        "{args}"
    );
    assert!(args.ends_with("-incoming defer -S"), "{args}");
    assert!(
        config
            .kernel_cmdline()
            .ends_with("strait.test=migrate strait.arg=30"),
        "{}",
        config.kernel_cmdline()
    );
}

#[test]
fn qemu_guest_rw_with_qsd_backend() {
    if !common::require_qsd() {
        return;
    }
    // Non-zero content outside the written range, so md5_disk checks it was left alone.
    let s = setup("qsd-rw", Fill::Seeded(1));
    let config = QemuConfig::new(&s.guest, &s.socket, Scenario::Rw).arg_mib(8);
    let report = run_guest(s.dir.path(), &QsdConfig::new(&s.image, &s.socket), &config);

    report.assert_pass();
    assert_eq!(report.value("md5_written"), report.value("md5_read"));
    assert_eq!(report.value_u64("offset"), MIB);
    assert_eq!(report.value_u64("length"), 8 * MIB);
    let host_range = common::md5_file_range(&s.image, MIB, 8 * MIB).expect("md5 of range");
    assert_eq!(
        host_range,
        report.value("md5_written"),
        "{}",
        report.console
    );
    let host_disk = common::md5_file(&s.image).expect("md5 of image");
    assert_eq!(host_disk, report.value("md5_disk"), "{}", report.console);
}

#[test]
fn qemu_guest_rw_at_offset_with_two_queues_and_qsd_backend() {
    if !common::require_qsd() {
        return;
    }
    let s = setup("qsd-rw2", Fill::Zeros);
    let offset = 20 * MIB + 4096;
    let config = QemuConfig::new(&s.guest, &s.socket, Scenario::Rw)
        .arg_mib(4)
        .offset_bytes(offset)
        .num_queues(2);
    let qsd = QsdConfig::new(&s.image, &s.socket).num_queues(2);
    let report = run_guest(s.dir.path(), &qsd, &config);

    report.assert_pass();
    assert_eq!(report.value_u64("offset"), offset);
    let host_range = common::md5_file_range(&s.image, offset, 4 * MIB).expect("md5 of range");
    assert_eq!(
        host_range,
        report.value("md5_written"),
        "{}",
        report.console
    );
    assert_eq!(
        common::md5_file(&s.image).expect("md5 of image"),
        report.value("md5_disk")
    );
}

#[test]
fn qemu_guest_flush_with_qsd_backend() {
    if !common::require_qsd() {
        return;
    }
    let s = setup("qsd-flush", Fill::Zeros);
    let config = QemuConfig::new(&s.guest, &s.socket, Scenario::Flush);
    let report = run_guest(s.dir.path(), &QsdConfig::new(&s.image, &s.socket), &config);

    report.assert_pass();
    assert_eq!(report.value("flush"), "ok");
    let range =
        common::md5_file_range(&s.image, report.value_u64("offset"), MIB).expect("md5 of range");
    assert_eq!(range, report.value("md5_written"), "{}", report.console);
}

#[test]
fn qemu_guest_discard_with_qsd_backend() {
    if !common::require_qsd() {
        return;
    }
    let s = setup("qsd-discard", Fill::Byte(0xa5));
    let config = QemuConfig::new(&s.guest, &s.socket, Scenario::Discard).arg_mib(4);
    let report = run_guest(s.dir.path(), &QsdConfig::new(&s.image, &s.socket), &config);

    report.assert_pass();
    assert!(report.value_u64("discard_max_bytes") > 0);
    let zeros = common::md5_zeros(4 * MIB).expect("md5 of zeros");
    assert_eq!(report.value("md5_zeros"), zeros);
    assert_eq!(report.value("md5_after"), zeros);
    let range = common::md5_file_range(&s.image, report.value_u64("offset"), 4 * MIB)
        .expect("md5 of range");
    assert_eq!(
        range, zeros,
        "host image range is not zero after the discard"
    );
}

#[test]
fn qemu_guest_read_only_with_qsd_backend() {
    if !common::require_qsd() {
        return;
    }
    let s = setup("qsd-ro", Fill::Seeded(2));
    let before = common::md5_file(&s.image).expect("md5 of image");
    let config = QemuConfig::new(&s.guest, &s.socket, Scenario::ReadOnly);
    let qsd = QsdConfig::new(&s.image, &s.socket).read_only();
    let report = run_guest(s.dir.path(), &qsd, &config);

    report.assert_pass();
    assert_eq!(report.value("ro"), "1");
    assert_eq!(report.value("write"), "refused");
    assert_eq!(report.value("md5_disk"), before);
    assert_eq!(common::md5_file(&s.image).expect("md5 of image"), before);
}

#[test]
fn qemu_guest_info_with_qsd_backend() {
    if !common::require_qsd() {
        return;
    }
    let s = setup("qsd-info", Fill::Zeros);
    let config = QemuConfig::new(&s.guest, &s.socket, Scenario::Info).num_queues(2);
    let qsd = QsdConfig::new(&s.image, &s.socket).num_queues(2);
    let report = run_guest(s.dir.path(), &qsd, &config);

    report.assert_pass();
    assert_eq!(report.value_u64("size_bytes"), IMAGE_SIZE_BYTES);
    assert_eq!(report.value_u64("size_sectors"), IMAGE_SIZE_BYTES / 512);
    assert_eq!(report.value_u64("logical_block_size"), 512);
    assert_eq!(report.value_u64("num_queues"), 2);
    assert_eq!(report.value("ro"), "0");
}

#[test]
fn qemu_guest_verify_reads_host_data_with_qsd_backend() {
    if !common::require_qsd() {
        return;
    }
    let s = setup("qsd-verify", Fill::Seeded(3));
    let offset = 4 * MIB;
    let config = QemuConfig::new(&s.guest, &s.socket, Scenario::Verify)
        .arg_mib(8)
        .offset_bytes(offset);
    let report = run_guest(s.dir.path(), &QsdConfig::new(&s.image, &s.socket), &config);

    report.assert_pass();
    let range = common::md5_file_range(&s.image, offset, 8 * MIB).expect("md5 of range");
    assert_eq!(report.value("md5_read"), range);
    assert_eq!(
        report.value("md5_disk"),
        common::md5_file(&s.image).expect("md5 of image")
    );
}

#[test]
fn qemu_guest_fail_verdict_reaches_the_harness() {
    if !common::require_qsd() {
        return;
    }
    // The read-only scenario on a writable disk must fail, and say why.
    let s = setup("qsd-fail", Fill::Zeros);
    let config = QemuConfig::new(&s.guest, &s.socket, Scenario::ReadOnly);
    let report = run_guest(s.dir.path(), &QsdConfig::new(&s.image, &s.socket), &config);

    assert_eq!(
        report.verdict,
        Verdict::Fail {
            reason: "not_read_only".into()
        },
        "{}",
        report.console
    );
}

#[test]
fn qemu_without_backend_reports_qemu_error() {
    if !common::require_qemu() {
        return;
    }
    // Nobody listens on the socket: QEMU exits at once, and the error must carry its
    // message so a test failing this way explains itself.
    let guest = common::guest_artifacts();
    let dir = common::test_dir("qemu-nobackend");
    let socket = dir.path().join("absent.sock");
    let mut qemu = Qemu::spawn(&QemuConfig::new(&guest, &socket, Scenario::Info)).expect("spawn");
    let error = qemu
        .wait_verdict(BOOT_AND_SCENARIO_TIMEOUT)
        .expect_err("no verdict without a backend");
    let message = format!("{error:?}");
    assert!(message.contains("without a guest verdict"), "{message}");
    assert!(message.contains("absent.sock"), "{message}");
}

#[test]
fn qemu_silent_backend_times_out_with_console() {
    if !common::require_qemu() {
        return;
    }
    // A backend that accepts the connection and never answers: QEMU waits forever in the
    // vhost-user handshake, so only the harness's timeout ends the run.
    let guest = common::guest_artifacts();
    let dir = common::test_dir("qemu-silent");
    let socket = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let mut qemu = Qemu::spawn(&QemuConfig::new(&guest, &socket, Scenario::Info)).expect("spawn");
    let _connection = listener.accept().expect("QEMU connects");
    let timeout = std::time::Duration::from_secs(3);
    let error = qemu
        .wait_verdict(timeout)
        .expect_err("no verdict from a hung QEMU");
    let message = format!("{error:?}");
    assert!(message.contains("no guest verdict within 3s"), "{message}");
    assert!(
        qemu.wait_exit(timeout).is_ok(),
        "QEMU must be gone after the timeout"
    );
}
