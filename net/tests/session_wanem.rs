//! The session across the WAN emulator: two `Link`s with mutual TLS, one in each of the
//! emulator's namespaces, kernel TCP over an emulated round trip, and scheduled cuts of
//! the whole link.
//!
//! Like `wanem.rs`, every test needs root and network namespaces (hence `netns` in each
//! name): where they are unusable the tests skip loudly, except under CI (env `CI` set),
//! where they fail.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use strait_net::protocol::Role;
use strait_net::session::tcp::{Link, LinkError};
use strait_net::session::{SessionConfig, SessionError};
use strait_net::wanem::{Wanem, WanemConfig};
use strait_net::StreamClass;

mod common;
use common::{identity_for, serial, start, transfer, MIB};

const NS_PER_MS: u64 = 1_000_000;

/// Connections the dialer stripes over, as in production.
const CONNECTIONS: u16 = 4;

/// Session timing scaled down so that a cut of a few seconds exercises the whole resume
/// path (every connection declared dead, redialled with backoff, resumed) in a test that
/// takes seconds: pings every 200 ms, a connection silent for 1 s is dead.
fn config(role: Role, resume_window_ms: u64) -> SessionConfig {
    let mut config = SessionConfig::new(role);
    config.ping_interval_ns = 200 * NS_PER_MS;
    config.idle_timeout_ns = 1_000 * NS_PER_MS;
    config.resume_window_ns = resume_window_ms * NS_PER_MS;
    config
}

/// An acceptor listening in namespace B and a dialer in namespace A, both with the one
/// certificate setup written into `dir` (as two engines given the same `--tls-dir`).
fn open_across(wanem: &Wanem, dir: &Path, resume_window_ms: u64) -> (Link, Link) {
    let tls = identity_for(dir, &wanem.addr_b().to_string());
    let listener = wanem
        .run_in_b(|| TcpListener::bind((wanem.addr_b(), 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    thread::scope(|s| {
        let acceptor = s.spawn(|| {
            Link::accept(
                listener,
                Some(&tls),
                config(Role::Destination, resume_window_ms),
            )
        });
        let dialer = wanem
            .run_in_a(|| {
                Link::connect(
                    addr,
                    CONNECTIONS,
                    Some(&tls),
                    config(Role::Source, resume_window_ms),
                )
            })
            .unwrap()
            .unwrap();
        (dialer, acceptor.join().unwrap().unwrap())
    })
}

/// A 3 s cut in the middle of a transfer: every connection dies, the dialer redials
/// through the cut with backoff, the session resumes, and the receiver gets exactly
/// what was sent (the digests would differ on a lost or a duplicated byte).
#[test]
fn netns_session_survives_a_link_cut_byte_exact() {
    let _serial = serial();
    let Some(wanem) = start(WanemConfig {
        rtt_ms: 50,
        rate_mbit: 200,
        cut_at_s: Some(1.5),
        cut_for_s: 3.0,
        seed: 1,
        ..WanemConfig::default()
    }) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (dialer, acceptor) = open_across(&wanem, dir.path(), 30_000);
    let started = Instant::now();
    let (sent, got) = transfer(&dialer, &acceptor, 96 * MIB, |_| {});
    let elapsed = started.elapsed();
    let link = wanem.stats();
    let stats = dialer.stats();
    eprintln!("96 MiB across a 3 s cut in {elapsed:?}; {stats:?}; {link:?}");
    assert!(
        link.a_to_b.dropped_cut > 0 && link.b_to_a.dropped_cut > 0,
        "the cut did not hit the transfer: {link:?}"
    );
    assert!(stats.resumes >= 1, "the session never resumed: {stats:?}");
    assert_eq!(sent, got, "digests differ after the cut");
}

/// A cut longer than the resume window fails both sides with the reason, promptly, and
/// neither hangs.
#[test]
fn netns_a_cut_longer_than_the_resume_window_fails_cleanly() {
    const RESUME_WINDOW_MS: u64 = 2_000;
    let _serial = serial();
    let Some(wanem) = start(WanemConfig {
        rtt_ms: 50,
        rate_mbit: 100,
        cut_at_s: Some(1.0),
        cut_for_s: 30.0,
        seed: 1,
        ..WanemConfig::default()
    }) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (dialer, acceptor) = open_across(&wanem, dir.path(), RESUME_WINDOW_MS);
    let started = Instant::now();
    dialer
        .send(StreamClass::Bulk, vec![7; 64 << 10], Duration::from_secs(1))
        .unwrap();
    // idle timeout (1 s) + resume window (2 s) after the cut at 1 s, plus slack.
    let bound = Duration::from_secs(10);
    let outcomes = thread::scope(|s| {
        let waiters = [&dialer, &acceptor].map(|link| {
            s.spawn(move || loop {
                match link.recv(StreamClass::Control, bound) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            })
        });
        waiters.map(|w| w.join().unwrap())
    });
    let elapsed = started.elapsed();
    for (side, outcome) in ["dialer", "acceptor"].iter().zip(outcomes) {
        let Some(err) = outcome else {
            panic!("{side} still had no verdict after {bound:?}");
        };
        eprintln!("{side} after {elapsed:?}: {err}");
        assert!(
            matches!(
                err,
                LinkError::Session(SessionError::ResumeWindowExpired { window_ns, .. })
                    if window_ns == RESUME_WINDOW_MS * NS_PER_MS
            ),
            "{side}: {err:?}"
        );
    }
    assert!(elapsed < bound, "took {elapsed:?}");
}
