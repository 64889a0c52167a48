//! `strait serve` refuses bad arguments with a clear message, and stops cleanly on signals.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a refused `strait serve` may take to say so: it never gets past validation.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);

fn serve(dir: &Path, image: &Path, extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("serve")
        .arg("--disk")
        .arg(image)
        .arg("--vhost-socket")
        .arg(dir.join("vhost.sock"))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + REFUSAL_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("strait serve did not refuse {extra:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

#[test]
fn missing_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve(dir.path(), &dir.path().join("nope.img"), &[]);
    refused(&out, "nope.img does not exist");
}

#[test]
fn too_many_queues_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    refused(
        &serve(dir.path(), &img, &["--queues", "17"]),
        "between 1 and 16",
    );
    refused(
        &serve(dir.path(), &img, &["--queues", "0"]),
        "between 1 and 16",
    );
}

#[test]
fn absent_core_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    refused(
        &serve(dir.path(), &img, &["--cores", "4096"]),
        "core 4096 does not exist",
    );
    refused(
        &serve(dir.path(), &img, &["--cores", "1-0"]),
        "runs backwards",
    );
}

#[test]
fn socket_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("vhost.sock")).unwrap();
    refused(&serve(dir.path(), &img, &[]), "in use by another process");
}

#[test]
fn socket_path_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    std::fs::write(dir.path().join("vhost.sock"), b"precious").unwrap();
    refused(&serve(dir.path(), &img, &[]), "is not a socket");
    assert_eq!(
        std::fs::read(dir.path().join("vhost.sock")).unwrap(),
        b"precious"
    );
}

#[test]
fn directory_as_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    refused(
        &serve(dir.path(), &sub, &[]),
        "not a regular file or block device",
    );
}

#[test]
fn empty_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.img");
    std::fs::write(&img, b"").unwrap();
    refused(
        &serve(dir.path(), &img, &[]),
        "smaller than one 512-byte sector",
    );
}

#[test]
fn sigint_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("serve")
        .arg("--disk")
        .arg(&img)
        .arg("--vhost-socket")
        .arg(dir.path().join("vhost.sock"))
        .arg("--control")
        .arg(dir.path().join("control.sock"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + REFUSAL_TIMEOUT;
    while !dir.path().join("control.sock").exists() {
        assert!(Instant::now() < deadline, "never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + REFUSAL_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "ignored SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(!dir.path().join("vhost.sock").exists());
    assert!(!dir.path().join("control.sock").exists());
}
