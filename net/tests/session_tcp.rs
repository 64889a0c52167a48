//! The session over real sockets: two `Link`s on 127.0.0.1 with mutual TLS.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use strait_net::protocol::{CloseReason, Role};
use strait_net::session::tcp::{Link, LinkError};
use strait_net::session::{SessionConfig, SessionError};
use strait_net::tls::{write_certs, TlsIdentity};
use strait_net::StreamClass;

mod common;
use common::{transfer, MIB};

fn identity(dir: &std::path::Path) -> TlsIdentity {
    write_certs(dir, &["127.0.0.1".to_string()]).unwrap();
    TlsIdentity::load(dir).unwrap()
}

/// An acceptor on an ephemeral port (in a thread) and a dialer with `connections`; both
/// load their identity from `dir`, as two nodes sharing one certificate setup.
fn open_pair(dir: &Path, connections: u16) -> (Link, Link) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls = TlsIdentity::load(dir).unwrap();
    let acceptor = thread::spawn(move || {
        Link::accept(
            listener,
            Some(&server_tls),
            SessionConfig::new(Role::Destination),
        )
    });
    let client_tls = TlsIdentity::load(dir).unwrap();
    let config = SessionConfig::new(Role::Source);
    let dialer = Link::connect(addr, connections, Some(&client_tls), config).unwrap();
    (dialer, acceptor.join().unwrap().unwrap())
}

#[test]
fn sixty_four_mib_cross_tls_over_four_connections_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    identity(dir.path());
    let (dialer, acceptor) = open_pair(dir.path(), 4);
    let started = Instant::now();
    let (sent, got) = transfer(&dialer, &acceptor, 64 * MIB, |_| {});
    assert_eq!(sent, got, "digests differ");
    eprintln!("64 MiB over TLS in {:?}", started.elapsed());
    let stats = dialer.stats();
    assert!(
        stats.srtt_ns.is_some() || stats.ready_connections == 4,
        "{stats:?}"
    );
    assert_eq!(stats.ready_connections, 4, "{stats:?}");
    // Closing one end tells the other at once.
    let started = Instant::now();
    drop(dialer);
    let err = acceptor
        .recv(StreamClass::Control, Duration::from_secs(10))
        .unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::Session(SessionError::PeerClosed {
                reason: CloseReason::Shutdown
            })
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn killed_connections_resume_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    identity(dir.path());
    let (dialer, acceptor) = open_pair(dir.path(), 4);
    let mut kills = 0;
    // More than the receive windows hold, so the transfer cannot be over before the
    // second kill: a kill can only find connections once the dialer redialled after the
    // first, and data buffered at the receiver keeps `received` rising meanwhile (with
    // 48 MiB, all of it could be in flight at the first kill, and the second kill found
    // no connection in CI).
    let (sent, got) = transfer(&dialer, &acceptor, 320 * MIB, |received| {
        let due = (kills == 0 && received > 8 * MIB) || (kills == 1 && received > 64 * MIB);
        // Right after a kill the dialer may still be redialling: try again next time.
        if due && dialer.kill_connections() > 0 {
            kills += 1;
        }
    });
    assert_eq!(kills, 2);
    assert_eq!(sent, got, "digests differ after resume");
    let stats = dialer.stats();
    assert!(stats.resumes >= 1, "{stats:?}");
}

#[test]
fn a_peer_with_an_untrusted_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls = identity(dir.path());
    let other = tempfile::tempdir().unwrap();
    let stranger = identity(other.path());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls = TlsIdentity::load(dir.path()).unwrap();
    let acceptor = thread::spawn(move || {
        Link::accept(
            listener,
            Some(&server_tls),
            SessionConfig::new(Role::Destination),
        )
    });
    let err =
        Link::connect(addr, 2, Some(&stranger), SessionConfig::new(Role::Source)).unwrap_err();
    assert!(matches!(err, LinkError::OpenFailed { .. }), "{err}");
    eprintln!("refused as expected: {err}");
    // The acceptor is still waiting, and a trusted dialer gets through.
    let dialer = Link::connect(addr, 2, Some(&tls), SessionConfig::new(Role::Source)).unwrap();
    let acceptor = acceptor.join().unwrap().unwrap();
    dialer
        .send(
            StreamClass::Control,
            b"hello".to_vec(),
            Duration::from_secs(5),
        )
        .unwrap();
    let got = acceptor
        .recv(StreamClass::Control, Duration::from_secs(5))
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"hello"[..]));
}

#[test]
fn plain_tcp_works_when_the_caller_opts_out_of_tls() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor =
        thread::spawn(move || Link::accept(listener, None, SessionConfig::new(Role::Destination)));
    let dialer = Link::connect(addr, 2, None, SessionConfig::new(Role::Source)).unwrap();
    let acceptor = acceptor.join().unwrap().unwrap();
    let (sent, got) = transfer(&dialer, &acceptor, 8 * MIB, |_| {});
    assert_eq!(sent, got);
    // And back the other way.
    let (sent, got) = transfer(&acceptor, &dialer, 2 * MIB, |_| {});
    assert_eq!(sent, got);
}
