//! What the integration tests of `strait-net` share: the network-namespace guard of the
//! emulator tests and a checksummed three-class transfer over a session.

// Each test binary uses part of this module.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use strait_net::session::tcp::Link;
use strait_net::tls::{write_certs, TlsIdentity};
use strait_net::wanem::{Wanem, WanemConfig};
use strait_net::StreamClass;

pub const MIB: u64 = 1 << 20;

/// Serialises the tests of one binary: they measure time and throughput on two cores.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether this machine can run the tests: root, `ip netns` works, /dev/net/tun exists.
pub fn netns_usable() -> Result<(), String> {
    static USABLE: OnceLock<Result<(), String>> = OnceLock::new();
    USABLE
        .get_or_init(|| {
            // SAFETY: geteuid takes no arguments and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return Err("not root".into());
            }
            if !std::path::Path::new("/dev/net/tun").exists() {
                return Err("no /dev/net/tun".into());
            }
            // Creating a namespace is what needs the privilege; try it on a scratch thread,
            // which is the only one that moves.
            let unshared = thread::spawn(|| {
                // SAFETY: unshare takes no pointers and moves only this thread, which
                // exits right after.
                unsafe { libc::unshare(libc::CLONE_NEWNET) }
            })
            .join();
            if !matches!(unshared, Ok(0)) {
                return Err("cannot create a network namespace (unshare CLONE_NEWNET)".into());
            }
            match Command::new("ip").args(["netns", "list"]).output() {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => Err(format!(
                    "`ip netns list` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )),
                Err(err) => Err(format!("cannot run `ip`: {err}")),
            }
        })
        .clone()
}

/// Starts an emulator, or returns None (after saying so loudly) where netns is unusable
/// outside CI.
pub fn start(config: WanemConfig) -> Option<Wanem> {
    if let Err(why) = netns_usable() {
        if std::env::var_os("CI").is_some() {
            panic!("network namespaces are required in CI but unusable: {why}");
        }
        eprintln!("SKIPPED: network namespaces unusable here ({why})");
        return None;
    }
    Some(Wanem::start(config).unwrap())
}

/// Writes a CA and a node pair valid for `host` into `dir` and loads them.
pub fn identity_for(dir: &std::path::Path, host: &str) -> TlsIdentity {
    write_certs(dir, &[host.to_string()]).unwrap();
    TlsIdentity::load(dir).unwrap()
}

pub fn fnv(hash: &mut u64, data: &[u8]) {
    for b in data {
        *hash = (*hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
}

pub const CLASSES: [StreamClass; 3] = [StreamClass::Mirror, StreamClass::Memory, StreamClass::Bulk];

/// Sends `total` bytes spread over three classes from `tx` to `rx`, calling `fault` with
/// the bytes received so far; returns (sent digests, received digests).
pub fn transfer(
    tx: &Link,
    rx: &Link,
    total: u64,
    mut fault: impl FnMut(u64),
) -> ([u64; 3], [u64; 3]) {
    let received_bytes = Arc::new(AtomicU64::new(0));
    let (sent, got) = thread::scope(|scope| {
        let counter = received_bytes.clone();
        let receiver = scope.spawn(move || {
            let mut digests = [0xcbf2_9ce4_8422_2325u64; 3];
            let mut bytes = 0;
            let deadline = Instant::now() + Duration::from_secs(50);
            while bytes < total {
                assert!(
                    Instant::now() < deadline,
                    "receive timed out at {bytes} bytes"
                );
                let mut idle = true;
                for (i, class) in CLASSES.into_iter().enumerate() {
                    while let Some(p) = rx.recv(class, Duration::ZERO).unwrap() {
                        fnv(&mut digests[i], &p);
                        bytes += p.len() as u64;
                        rx.mark_applied(class, p.len() as u64).unwrap();
                        idle = false;
                    }
                }
                counter.store(bytes, Ordering::Relaxed);
                if idle {
                    if let Some(p) = rx
                        .recv(StreamClass::Memory, Duration::from_millis(5))
                        .unwrap()
                    {
                        fnv(&mut digests[1], &p);
                        bytes += p.len() as u64;
                        rx.mark_applied(StreamClass::Memory, p.len() as u64)
                            .unwrap();
                    }
                }
            }
            digests
        });
        let mut digests = [0xcbf2_9ce4_8422_2325u64; 3];
        let mut sent = 0u64;
        let mut k = 0u64;
        while sent < total {
            let len = (64 << 10) + (k * 7919) % (448 << 10);
            let len = len.min(total - sent);
            let i = (k % 3) as usize;
            let payload: Vec<u8> = (0..len)
                .map(|j| (j.wrapping_mul(k + 1) >> 3) as u8)
                .collect();
            fnv(&mut digests[i], &payload);
            tx.send(CLASSES[i], payload, Duration::from_secs(30))
                .unwrap();
            sent += len;
            k += 1;
            fault(received_bytes.load(Ordering::Relaxed));
        }
        // The send buffers may take everything long before it arrives: keep offering
        // the fault hook the receiver's progress until it is done.
        while !receiver.is_finished() {
            fault(received_bytes.load(Ordering::Relaxed));
            thread::sleep(Duration::from_millis(1));
        }
        let got = receiver.join().unwrap();
        (digests, got)
    });
    (sent, got)
}
