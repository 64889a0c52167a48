//! `strait link listen|send`: two `strait` processes given one `strait certs` directory
//! talk over mutual TLS and the listener verifies every byte; a sender whose certificate
//! another CA signed is refused, and the listener keeps waiting for a trusted one.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest a transfer on loopback may take (tens of MiB: well under a second when idle).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn strait() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strait"))
}

fn certs(dir: &Path) {
    let status = strait()
        .args(["certs", "--out"])
        .arg(dir)
        .args(["--names", "127.0.0.1"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// A listener on an ephemeral loopback port, and the address it printed.
fn start_listener(security: &[&str]) -> (Child, String) {
    let mut child = strait()
        .args(["link", "listen", "--listen", "127.0.0.1:0"])
        .args(security)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let line: Value = serde_json::from_str(&first).unwrap();
    (child, line["listening"].as_str().unwrap().to_string())
}

fn wait(mut child: Child) -> Output {
    let deadline = Instant::now() + RUN_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("strait link did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn send(addr: &str, security: &[&str], mib: u64) -> Output {
    let child = strait()
        .args(["link", "send", "--to", addr, "--mib", &mib.to_string()])
        .args(security)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait(child)
}

fn last_json(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

#[test]
fn two_engines_with_one_cert_dir_exchange_verified_bytes() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let tls = ["--tls-dir", dir.path().to_str().unwrap()];
    let (listener, addr) = start_listener(&tls);
    let sent = send(&addr, &tls, 48);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let received = wait(listener);
    assert!(
        received.status.success(),
        "{}",
        String::from_utf8_lossy(&received.stderr)
    );
    let (sent, received) = (last_json(&sent), last_json(&received));
    assert_eq!(sent["sent_bytes"], 48 << 20);
    assert_eq!(sent["tls"], true);
    assert_eq!(received["received_bytes"], 48 << 20);
    assert_eq!(received["verified"], true);
    assert_eq!(received["tls"], true);
}

#[test]
fn a_sender_from_another_ca_is_refused_and_the_listener_waits_on() {
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certs(ours.path());
    certs(theirs.path());
    let tls = ["--tls-dir", ours.path().to_str().unwrap()];
    let (mut listener, addr) = start_listener(&tls);
    let stranger = send(&addr, &["--tls-dir", theirs.path().to_str().unwrap()], 1);
    let stderr = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        !stranger.status.success(),
        "a stranger got through: {stderr}"
    );
    assert!(stderr.contains("could not open the session"), "{stderr}");
    assert!(
        listener.try_wait().unwrap().is_none(),
        "the listener gave up"
    );
    // A trusted sender still gets through to the same listener.
    let trusted = send(&addr, &tls, 1);
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let _ = listener.kill();
    let out = listener.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("refused a connection"), "{log}");
}

#[test]
fn plain_needs_insecure_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    // Neither --tls-dir nor --insecure: refused before anything starts.
    let out = strait()
        .args(["link", "send", "--to", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let (listener, addr) = start_listener(&["--insecure"]);
    let plain = send(&addr, &["--insecure"], 8);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert_eq!(last_json(&plain)["tls"], false);
    assert_eq!(last_json(&wait(listener))["received_bytes"], 8 << 20);
    // A TLS sender to a plain listener fails clearly instead of hanging.
    let (mut listener, addr) = start_listener(&["--insecure"]);
    let mismatched = send(&addr, &["--tls-dir", dir.path().to_str().unwrap()], 1);
    assert!(!mismatched.status.success());
    let _ = listener.kill();
    let _ = listener.wait();
}
