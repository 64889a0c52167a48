//! Shared harness for the tests that boot a real guest under QEMU against a vhost-user-blk
//! backend (qemu-storage-daemon as the reference, `strait serve` as the subject).
//!
//! The guest is a Debian cloud kernel plus a busybox initramfs built by
//! `scripts/guest/build.sh`; its `/init` runs one [`Scenario`] against `/dev/vda` and prints
//! `STRAIT-RESULT key=value` lines and a final `STRAIT-VERDICT` on the serial console, which
//! [`Qemu::wait_verdict`] parses into a [`GuestReport`].
//!
//! ```ignore
//! mod common;
//! use common::{Fill, Qemu, QemuConfig, Scenario, StorageDaemon, QsdConfig};
//!
//! #[test]
//! fn qemu_guest_rw() {
//!     if !common::require_qemu() {
//!         return;
//!     }
//!     let guest = common::guest_artifacts();
//!     let dir = common::test_dir("rw");
//!     let image = dir.path().join("disk.img");
//!     common::make_image(&image, 32 << 20, Fill::Zeros).expect("image");
//!     let socket = dir.path().join("vhost.sock");
//!     let _backend = StorageDaemon::start(&QsdConfig::new(&image, &socket), dir.path())
//!         .expect("qsd");
//!     let mut qemu = Qemu::spawn(&QemuConfig::new(&guest, &socket, Scenario::Rw).arg_mib(8))
//!         .expect("qemu");
//!     let report = qemu.wait_verdict(common::BOOT_AND_SCENARIO_TIMEOUT).expect("verdict");
//!     report.assert_pass();
//!     let offset = report.value_u64("offset");
//!     let length = report.value_u64("length");
//!     assert_eq!(
//!         common::md5_file_range(&image, offset, length).expect("md5"),
//!         report.value("md5_written"),
//!     );
//! }
//! ```
//!
//! Tests that use this harness put `qemu` in their name (house style: tests that need QEMU
//! say so) and start with `if !common::require_qemu() { return; }`.

// Every test binary compiles this module but uses a different part of it.
#![allow(dead_code, unused_imports)]

mod disk;
mod engine;
mod error;
mod guest;
mod migrate;
mod process;
mod qemu;
mod qsd;
mod wan;

pub use disk::{make_image, md5_file, md5_file_range, md5_zeros, Fill};
pub use engine::{Engine, ENGINE_START_TIMEOUT};
pub use error::HarnessError;
pub use guest::{guest_artifacts, require_qemu, require_qsd, test_dir, Guest};
pub use migrate::{
    downtime_from_heartbeats, heartbeats, largest_heartbeat_gap, migrate_block, migrate_region,
    parse_heartbeat, Heartbeat, HeartbeatArrival, HeartbeatGap, MIGRATE_BLOCK_SIZE_BYTES,
    MIGRATE_REGION_BLOCKS, MIGRATE_REGION_BYTES, MIGRATE_REGION_OFFSET_DEFAULT,
};
pub use process::{kill_with_parent, wait_for_socket};
pub use qemu::{
    parse_console_line, ConsoleLine, GuestReport, Qemu, QemuConfig, Scenario, Verdict,
    BOOT_AND_SCENARIO_TIMEOUT, QEMU_EXIT_TIMEOUT,
};
pub use qsd::{QsdConfig, StorageDaemon, SOCKET_WAIT_TIMEOUT};
pub use wan::wanem_or_skip;
