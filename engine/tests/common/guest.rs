//! The test guest's kernel and initramfs, the per-test folders, and the "is QEMU installed"
//! gate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::HarnessError;

/// The QEMU system emulator the tests boot the guest with.
pub(crate) const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The reference vhost-user-blk backend that ships with QEMU (package qemu-system-common).
pub(crate) const QSD_BINARY: &str = "qemu-storage-daemon";
/// Unix socket paths must fit in `sun_path` (108 bytes with the NUL); leaving 28 bytes for
/// the socket's own file name keeps every test's socket under the limit.
const TEST_DIR_PATH_MAX: usize = 80;

/// Paths of a built guest, ready for QEMU's `-kernel` and `-initrd`.
#[derive(Clone, Debug)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// The workspace root (the engine crate's parent folder).
pub(crate) fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Builds the guest with `scripts/guest/build.sh` once per test process and returns its paths.
///
/// The script caches its output (`$STRAIT_GUEST_DIR`, default `<repo>/.cache/guest`), so
/// after the first build this costs a few milliseconds. Panics if the build fails: every test
/// that needs the guest would fail anyway, and the panic carries the script's output.
pub fn guest_artifacts() -> Guest {
    static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
    match GUEST.get_or_init(|| build_guest().map_err(|e| format!("{e:?}"))) {
        Ok(guest) => guest.clone(),
        Err(message) => panic!("building the test guest failed: {message}"),
    }
}

fn build_guest() -> Result<Guest, HarnessError> {
    let script = repo_root().join("scripts/guest/build.sh");
    let output = Command::new(&script)
        .output()
        .map_err(|source| HarnessError::Spawn {
            program: script.display().to_string(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(HarnessError::Command {
            program: script.display().to_string(),
            status: output.status.to_string(),
            output: stderr.into_owned(),
        });
    }
    // The script's only stdout line is its output folder.
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.gz"),
    };
    for path in [&guest.kernel, &guest.initramfs] {
        std::fs::metadata(path).map_err(|e| HarnessError::io("find built guest file", path, e))?;
    }
    Ok(guest)
}

fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// Gate for a test that needs `programs`: true if all are installed. If one is missing the
/// test must not silently pass: under CI (the `CI` variable is set) this panics, elsewhere it
/// prints a loud skip message and returns false.
fn require(test_kind: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "{test_kind} test needs {} on PATH (run scripts/install-deps.sh as root)",
        missing.join(" and ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{message}; CI must not skip it");
    }
    eprintln!("\n**********\n*** SKIPPED: {message}\n**********\n");
    false
}

/// True if QEMU can run; see [`require`] for what happens when it cannot.
pub fn require_qemu() -> bool {
    require("QEMU", &[QEMU_BINARY])
}

/// True if QEMU and qemu-storage-daemon can run; see [`require`].
pub fn require_qsd() -> bool {
    require("QEMU + qemu-storage-daemon", &[QEMU_BINARY, QSD_BINARY])
}

/// A fresh temporary folder for one test (images, sockets, logs), removed on drop. Its path
/// is short enough for Unix socket names inside it.
pub fn test_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("strait-{prefix}-"))
        .tempdir()
        .expect("create a temporary test folder");
    let length = dir.path().as_os_str().len();
    assert!(
        length <= TEST_DIR_PATH_MAX,
        "temporary folder {} is {length} bytes long, too long for Unix sockets inside it; \
         point TMPDIR at a shorter path",
        dir.path().display()
    );
    dir
}
