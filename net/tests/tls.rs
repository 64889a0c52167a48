//! Mutual TLS between engines over real TCP sockets on 127.0.0.1.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use strait_net::tls::{
    accept, add_node, connect, peer_identity, write_certs, CertPaths, ClientStream, ServerStream,
    TlsError, TlsIdentity, ALPN_PROTOCOL,
};

/// 1 MiB each way: many full 16 KiB records, plus the partial one at the end.
const PAYLOAD_BYTES: usize = 1024 * 1024;
/// A test that hangs is a failed test; no socket waits longer than this.
const TEST_IO_TIMEOUT: Duration = Duration::from_secs(30);

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A fresh cert dir valid for the loopback names; the TempDir must outlive its use.
fn new_certs() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("create temp dir");
    let dir = tmp.path().join("certs");
    write_certs(&dir, &names(&["localhost", "127.0.0.1"])).expect("write certs");
    (tmp, dir)
}

fn identity(dir: &Path) -> TlsIdentity {
    TlsIdentity::load(dir).expect("load identity")
}

/// Deterministic bytes that differ per `seed` (xorshift64), so a reordered, dropped or
/// duplicated record shows up as a mismatch.
fn payload(seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..PAYLOAD_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Runs `server` on an accepted TLS connection in a thread and `client` on a dialled one,
/// connecting to `server_name`; returns what each side returned.
fn pair<S, C>(
    server_config: Arc<ServerConfig>,
    client_config: Arc<ClientConfig>,
    server_name: &str,
    server: impl FnOnce(Result<ServerStream, TlsError>) -> S + Send + 'static,
    client: impl FnOnce(Result<ClientStream, TlsError>) -> C,
) -> (S, C)
where
    S: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind listener");
    let addr = listener.local_addr().expect("listener address");
    let server_thread = thread::spawn(move || {
        let (sock, _) = listener.accept().expect("accept TCP");
        set_test_timeouts(&sock);
        server(accept(server_config, sock))
    });
    let sock = TcpStream::connect(addr).expect("connect TCP");
    set_test_timeouts(&sock);
    let client_result = client(connect(client_config, server_name, sock));
    let server_result = server_thread.join().expect("server thread panicked");
    (server_result, client_result)
}

fn set_test_timeouts(sock: &TcpStream) {
    sock.set_read_timeout(Some(TEST_IO_TIMEOUT))
        .expect("set read timeout");
    sock.set_write_timeout(Some(TEST_IO_TIMEOUT))
        .expect("set write timeout");
}

/// What a server saw: its accept error, or the bytes the client sent before closing.
type ServerOutcome = Result<Vec<u8>, TlsError>;

/// A server that, once accepted, reads everything the client sends.
fn reading_server(result: Result<ServerStream, TlsError>) -> ServerOutcome {
    let mut stream = result?;
    let mut received = Vec::new();
    // The error (if any) is the client going away; what was delivered is what counts.
    let _ = stream.read_to_end(&mut received);
    Ok(received)
}

/// How a client that tried to send the payload and read a reply failed.
#[derive(Debug)]
enum ClientFailure {
    Connect(TlsError),
    Io(io::Error),
    Eof,
}

/// A client that tries to send the payload and read a reply; returns the first failure.
fn sending_client(result: Result<ClientStream, TlsError>) -> Result<(), ClientFailure> {
    let mut stream = result.map_err(ClientFailure::Connect)?;
    stream
        .write_all(&payload(1))
        .and_then(|()| stream.flush())
        .map_err(ClientFailure::Io)?;
    let mut reply = [0u8; 1];
    match stream.read(&mut reply) {
        Ok(0) => Err(ClientFailure::Eof),
        Ok(_) => Ok(()),
        Err(e) => Err(ClientFailure::Io(e)),
    }
}

/// A client that behaves like an engine: a short hello, then it waits for the answer.
fn hello_client(result: Result<ClientStream, TlsError>) -> Result<(), ClientFailure> {
    let mut stream = result.map_err(ClientFailure::Connect)?;
    stream
        .write_all(b"hello from a strait engine")
        .and_then(|()| stream.flush())
        .map_err(ClientFailure::Io)?;
    let mut reply = [0u8; 1];
    match stream.read(&mut reply) {
        Ok(0) => Err(ClientFailure::Eof),
        Ok(_) => Ok(()),
        Err(e) => Err(ClientFailure::Io(e)),
    }
}

/// The refusal as the client's first read reports it: the server's alert, nothing vaguer.
fn alert_on_read(outcome: Result<(), ClientFailure>) -> AlertDescription {
    match outcome {
        Err(ClientFailure::Io(e)) => match rustls_error(&e) {
            Some(rustls::Error::AlertReceived(alert)) => *alert,
            _ => panic!("expected an alert, got {e:?}"),
        },
        other => panic!("expected an alert on read, got {other:?}"),
    }
}

/// In TLS 1.3 a refused client finishes its handshake and learns of the refusal from the
/// server's alert on its next read. The server lingers so the alert normally arrives; a reset or
/// broken pipe is accepted too, because a 1 MiB write can outlast that bounded linger on a
/// loaded machine (`refused_clients_read_the_reason` pins the alert down exactly).
fn assert_refused_with(outcome: Result<(), ClientFailure>, alert: AlertDescription) {
    match outcome {
        Err(ClientFailure::Connect(TlsError::Handshake {
            source: rustls::Error::AlertReceived(got),
            ..
        })) if got == alert => {}
        Err(ClientFailure::Io(e))
            if rustls_error(&e) == Some(&rustls::Error::AlertReceived(alert)) => {}
        Err(ClientFailure::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) => {}
        other => panic!("client should be refused with {alert:?}, got {other:?}"),
    }
}

fn rustls_error(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A client built by hand, as an attacker or a misconfigured engine would: it trusts the CA in
/// `trusted_ca_dir` (so it accepts our server) and presents `node.pem`/`node.key` from
/// `cert_dir`, or no certificate at all.
fn hand_built_client_config(trusted_ca_dir: &Path, cert_dir: Option<&Path>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(trusted_ca_dir.join("ca.pem")).expect("open ca.pem") {
        roots.add(ca.expect("parse ca.pem")).expect("add CA");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots);
    let mut config = match cert_dir {
        None => builder.with_no_client_auth(),
        Some(dir) => {
            let chain = CertificateDer::pem_file_iter(dir.join("node.pem"))
                .expect("open node.pem")
                .collect::<Result<Vec<_>, _>>()
                .expect("parse node.pem");
            let key = PrivateKeyDer::from_pem_file(dir.join("node.key")).expect("node.key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
    };
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    Arc::new(config)
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn engines_sharing_one_cert_dir_exchange_1_mib_both_ways() {
    let (_tmp, dir) = new_certs();
    // Two engines: each loads the same directory on its own.
    let (server_engine, client_engine) = (identity(&dir), identity(&dir));
    let to_server = payload(1);
    let to_client = payload(2);
    let expected_by_client = to_client.clone();

    let (server_seen, client_seen) = pair(
        server_engine.server_config().expect("server config"),
        client_engine.client_config().expect("client config"),
        "127.0.0.1",
        move |result| {
            let mut stream = result.expect("server handshake");
            assert_eq!(stream.conn.alpn_protocol(), Some(ALPN_PROTOCOL));
            assert_eq!(
                stream.conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let who = peer_identity(&stream.conn);
            let mut received = vec![0u8; PAYLOAD_BYTES];
            stream.read_exact(&mut received).expect("server read");
            stream.write_all(&to_client).expect("server write");
            stream.flush().expect("server flush");
            stream.conn.send_close_notify();
            stream.flush().expect("server close_notify");
            (who, received)
        },
        |result| {
            let mut stream = result.expect("client handshake");
            let who = peer_identity(&stream.conn);
            stream.write_all(&to_server).expect("client write");
            stream.flush().expect("client flush");
            let mut received = Vec::new();
            stream.read_to_end(&mut received).expect("client read");
            (who, received)
        },
    );

    assert_eq!(server_seen.0.as_deref(), Some("localhost"));
    assert_eq!(client_seen.0.as_deref(), Some("localhost"));
    assert_eq!(server_seen.1.len(), PAYLOAD_BYTES);
    assert_eq!(client_seen.1.len(), PAYLOAD_BYTES);
    assert_eq!(
        crc32c::crc32c(&server_seen.1),
        crc32c::crc32c(&payload(1)),
        "client → server checksum"
    );
    assert_eq!(
        crc32c::crc32c(&client_seen.1),
        crc32c::crc32c(&expected_by_client),
        "server → client checksum"
    );
    assert!(server_seen.1 == payload(1), "client → server bytes differ");
    assert!(
        client_seen.1 == expected_by_client,
        "server → client bytes differ"
    );
}

#[test]
fn client_from_another_ca_is_refused_as_unknown_and_delivers_nothing() {
    let (_tmp, dir) = new_certs();
    let (_other_tmp, other_dir) = new_certs();

    let (server_seen, client_seen) = pair(
        identity(&dir).server_config().expect("server config"),
        hand_built_client_config(&dir, Some(&other_dir)),
        "127.0.0.1",
        reading_server,
        sending_client,
    );

    // The server never hands out a stream, so not one byte of the payload reaches it.
    match server_seen {
        Err(TlsError::UntrustedCertificate {
            peer_role: "client",
            source: rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            ..
        }) => {}
        other => panic!("server should refuse an unknown client CA, got {other:?}"),
    }
    assert_refused_with(client_seen, AlertDescription::UnknownCA);
}

#[test]
fn server_refusal_message_names_the_unknown_issuer() {
    let (_tmp, dir) = new_certs();
    let (_other_tmp, other_dir) = new_certs();
    let (server_seen, _) = pair(
        identity(&dir).server_config().expect("server config"),
        hand_built_client_config(&dir, Some(&other_dir)),
        "127.0.0.1",
        reading_server,
        sending_client,
    );
    let error = server_seen.expect_err("refused");
    let message = format!(
        "{error}: {}",
        std::error::Error::source(&error).expect("source")
    );
    assert!(
        message.starts_with("refused the client certificate of 127.0.0.1:"),
        "{message}"
    );
    assert!(
        message.ends_with("invalid peer certificate: UnknownIssuer"),
        "{message}"
    );
}

#[test]
fn refused_clients_read_the_reason() {
    let (_tmp, dir) = new_certs();
    let (_other_tmp, other_dir) = new_certs();
    let server_config = identity(&dir).server_config().expect("server config");
    for (client_config, alert) in [
        (
            hand_built_client_config(&dir, Some(&other_dir)),
            AlertDescription::UnknownCA,
        ),
        (
            hand_built_client_config(&dir, None),
            AlertDescription::CertificateRequired,
        ),
    ] {
        let (server_seen, client_seen) = pair(
            server_config.clone(),
            client_config,
            "127.0.0.1",
            reading_server,
            hello_client,
        );
        assert!(server_seen.is_err(), "{server_seen:?}");
        assert_eq!(alert_on_read(client_seen), alert);
    }
}

#[test]
fn server_from_another_ca_is_refused_by_the_client() {
    let (_tmp, dir) = new_certs();
    let (_other_tmp, other_dir) = new_certs();

    let (server_seen, client_seen) = pair(
        identity(&other_dir).server_config().expect("server config"),
        identity(&dir).client_config().expect("client config"),
        "127.0.0.1",
        reading_server,
        |result| result.map(|_| ()),
    );

    match client_seen {
        Err(TlsError::UntrustedCertificate {
            peer_role: "server",
            source: rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            ..
        }) => {}
        other => panic!("client should refuse an unknown server CA, got {other:?}"),
    }
    match server_seen {
        Err(TlsError::Handshake {
            source: rustls::Error::AlertReceived(AlertDescription::UnknownCA),
            ..
        }) => {}
        other => panic!("server should be told its CA is unknown, got {other:?}"),
    }
}

#[test]
fn server_name_not_in_the_certificate_is_refused() {
    let (_tmp, dir) = new_certs();
    let (server_seen, client_seen) = pair(
        identity(&dir).server_config().expect("server config"),
        identity(&dir).client_config().expect("client config"),
        "elsewhere.example",
        reading_server,
        |result| result.map(|_| ()),
    );
    assert!(
        matches!(
            client_seen,
            Err(TlsError::UntrustedCertificate {
                peer_role: "server",
                source: rustls::Error::InvalidCertificate(_),
                ..
            })
        ),
        "{client_seen:?}"
    );
    assert!(server_seen.is_err());
}

#[test]
fn client_without_a_certificate_is_refused() {
    let (_tmp, dir) = new_certs();

    let (server_seen, client_seen) = pair(
        identity(&dir).server_config().expect("server config"),
        hand_built_client_config(&dir, None),
        "127.0.0.1",
        reading_server,
        sending_client,
    );

    match &server_seen {
        Err(
            error @ TlsError::NoPeerCertificate {
                peer_role: "client",
                ..
            },
        ) => assert!(
            error.to_string().ends_with("it presented no certificate"),
            "{error}"
        ),
        other => panic!("server should require a client certificate, got {other:?}"),
    }
    assert_refused_with(client_seen, AlertDescription::CertificateRequired);
}

#[test]
fn client_without_alpn_is_refused() {
    let (_tmp, dir) = new_certs();
    let id = identity(&dir);
    let mut client_config = (*id.client_config().expect("client config")).clone();
    client_config.alpn_protocols.clear();

    let (server_seen, client_seen) = pair(
        id.server_config().expect("server config"),
        Arc::new(client_config),
        "127.0.0.1",
        reading_server,
        |result| result.map(|_| ()),
    );

    assert!(
        matches!(server_seen, Err(TlsError::NoAlpn { .. })),
        "{server_seen:?}"
    );
    // Our own connect() applies the same rule to the server's answer.
    assert!(
        matches!(client_seen, Err(TlsError::NoAlpn { .. })),
        "{client_seen:?}"
    );
}

#[test]
fn server_without_alpn_is_refused() {
    let (_tmp, dir) = new_certs();
    let id = identity(&dir);
    let mut server_config = (*id.server_config().expect("server config")).clone();
    server_config.alpn_protocols.clear();

    let (_, client_seen) = pair(
        Arc::new(server_config),
        id.client_config().expect("client config"),
        "127.0.0.1",
        reading_server,
        |result| result.map(|_| ()),
    );

    assert!(
        matches!(client_seen, Err(TlsError::NoAlpn { .. })),
        "{client_seen:?}"
    );
}

#[test]
fn client_with_another_alpn_is_refused_in_the_handshake() {
    let (_tmp, dir) = new_certs();
    let id = identity(&dir);
    let mut client_config = (*id.client_config().expect("client config")).clone();
    client_config.alpn_protocols = vec![b"strait/2".to_vec()];

    let (server_seen, client_seen) = pair(
        id.server_config().expect("server config"),
        Arc::new(client_config),
        "127.0.0.1",
        reading_server,
        |result| result.map(|_| ()),
    );

    assert!(
        matches!(
            server_seen,
            Err(TlsError::Handshake {
                source: rustls::Error::NoApplicationProtocol,
                ..
            })
        ),
        "{server_seen:?}"
    );
    assert!(
        matches!(
            client_seen,
            Err(TlsError::Handshake {
                source: rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol),
                ..
            })
        ),
        "{client_seen:?}"
    );
}

#[test]
fn write_certs_sets_private_modes() {
    let (_tmp, dir) = new_certs();
    let paths = CertPaths {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        node_cert: dir.join("node.pem"),
        node_key: dir.join("node.key"),
    };
    assert_eq!(mode_of(&dir), 0o700, "certificate directory");
    assert_eq!(mode_of(&paths.ca_key), 0o600, "ca.key");
    assert_eq!(mode_of(&paths.node_key), 0o600, "node.key");
    assert_eq!(mode_of(&paths.ca_cert), 0o644, "ca.pem");
    assert_eq!(mode_of(&paths.node_cert), 0o644, "node.pem");
}

#[test]
fn write_certs_returns_the_paths_it_wrote() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("certs");
    let paths = write_certs(&dir, &names(&["localhost"])).expect("write certs");
    for path in [
        &paths.ca_cert,
        &paths.ca_key,
        &paths.node_cert,
        &paths.node_key,
    ] {
        assert!(path.is_file(), "{} missing", path.display());
        assert_eq!(path.parent(), Some(dir.as_path()));
    }
}

#[test]
fn write_certs_refuses_to_overwrite() {
    let (_tmp, dir) = new_certs();
    let before = fs::read(dir.join("ca.key")).expect("read ca.key");

    let error = write_certs(&dir, &names(&["localhost"])).expect_err("second write_certs");
    match &error {
        TlsError::Exists { path } => assert_eq!(path, &dir.join("ca.pem")),
        other => panic!("expected Exists, got {other:?}"),
    }
    assert!(error.to_string().contains("ca.pem"), "{error}");
    assert_eq!(fs::read(dir.join("ca.key")).expect("read ca.key"), before);
}

#[test]
fn write_certs_with_one_file_present_names_it_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("certs");
    fs::create_dir(&dir).expect("create dir");
    fs::write(dir.join("node.key"), b"precious").expect("write node.key");

    let error = write_certs(&dir, &names(&["localhost"])).expect_err("must refuse");
    assert!(error.to_string().contains("node.key"), "{error}");
    assert_eq!(fs::read(dir.join("node.key")).expect("read"), b"precious");
    assert!(!dir.join("ca.pem").exists(), "nothing else may be written");
    assert!(!dir.join("ca.key").exists(), "nothing else may be written");
}

#[test]
fn write_certs_refuses_bad_names() {
    let tmp = tempfile::tempdir().expect("temp dir");
    assert!(matches!(
        write_certs(&tmp.path().join("a"), &[]),
        Err(TlsError::NoNames)
    ));
    let error = write_certs(&tmp.path().join("b"), &names(&["not a host"])).expect_err("bad name");
    assert!(error.to_string().contains("not a host"), "{error}");
}

#[test]
fn load_names_a_missing_file() {
    for file in ["ca.pem", "node.pem", "node.key"] {
        let (_tmp, dir) = new_certs();
        fs::remove_file(dir.join(file)).expect("remove");
        let error = TlsIdentity::load(&dir).expect_err("load without a file");
        assert!(
            matches!(&error, TlsError::Read { path, source }
                if path == &dir.join(file) && source.kind() == io::ErrorKind::NotFound),
            "{error:?}"
        );
        assert!(error.to_string().contains(file), "{error}");
    }
}

#[test]
fn load_names_a_corrupt_file() {
    let garbage: &[u8] = b"this is not PEM\n";
    let bad_der: &[u8] = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    for (file, contents) in [
        ("ca.pem", garbage),
        ("node.pem", garbage),
        ("node.key", garbage),
        ("ca.pem", bad_der),
    ] {
        let (_tmp, dir) = new_certs();
        fs::write(dir.join(file), contents).expect("corrupt");
        let error = TlsIdentity::load(&dir).expect_err("load a corrupt file");
        assert!(
            error.to_string().contains(file),
            "{file}: {error} does not name the file"
        );
    }
}

#[test]
fn load_refuses_a_key_that_does_not_match_the_certificate() {
    let (_tmp, dir) = new_certs();
    let (_other_tmp, other_dir) = new_certs();
    fs::remove_file(dir.join("node.key")).expect("remove");
    fs::copy(other_dir.join("node.key"), dir.join("node.key")).expect("copy");
    let error = TlsIdentity::load(&dir).expect_err("mismatched key");
    assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");
    assert!(error.to_string().contains("node.key"), "{error}");
}

#[test]
fn load_refuses_a_node_certificate_from_another_ca() {
    let (_tmp, dir) = new_certs();
    let (_other_tmp, other_dir) = new_certs();
    for file in ["node.pem", "node.key"] {
        fs::remove_file(dir.join(file)).expect("remove");
        fs::copy(other_dir.join(file), dir.join(file)).expect("copy");
    }
    let error = TlsIdentity::load(&dir).expect_err("foreign node certificate");
    assert!(matches!(error, TlsError::NotSignedByCa { .. }), "{error:?}");
    assert!(error.to_string().contains("node.pem"), "{error}");
}

#[test]
fn add_node_certificate_is_accepted_by_the_original_node_both_ways() {
    let (_tmp, dir) = new_certs();
    let paths = add_node(&dir, "east", &names(&["east.example", "127.0.0.1"])).expect("add");
    assert_eq!(paths.node_cert, dir.join("east.pem"));
    assert_eq!(mode_of(&paths.node_key), 0o600, "east.key");
    let original = identity(&dir);
    let east = TlsIdentity::load_node(&dir, "east").expect("load east");

    // east dials the original node.
    let (server_seen, client_seen) = pair(
        original.server_config().expect("server config"),
        east.client_config().expect("client config"),
        "localhost",
        |result| result.map(|s| peer_identity(&s.conn)),
        |result| result.map(|s| peer_identity(&s.conn)),
    );
    assert_eq!(server_seen.expect("server").as_deref(), Some("east"));
    assert_eq!(client_seen.expect("client").as_deref(), Some("localhost"));

    // The original node dials east by its DNS name (the TCP address is loopback).
    let (server_seen, client_seen) = pair(
        east.server_config().expect("server config"),
        original.client_config().expect("client config"),
        "east.example",
        |result| result.map(|s| peer_identity(&s.conn)),
        |result| result.map(|s| peer_identity(&s.conn)),
    );
    assert_eq!(server_seen.expect("server").as_deref(), Some("localhost"));
    assert_eq!(client_seen.expect("client").as_deref(), Some("east"));
}

#[test]
fn add_node_refuses_overwrite_and_bad_names() {
    let (_tmp, dir) = new_certs();
    add_node(&dir, "east", &names(&["east.example"])).expect("add");
    let error = add_node(&dir, "east", &names(&["east.example"])).expect_err("again");
    assert!(
        matches!(&error, TlsError::Exists { path } if path == &dir.join("east.pem")),
        "{error:?}"
    );
    let error = add_node(&dir, "node", &names(&["x.example"])).expect_err("the first node");
    assert!(error.to_string().contains("node.pem"), "{error}");
    for bad in ["../evil", "ca", ".hidden", ""] {
        assert!(
            matches!(
                add_node(&dir, bad, &names(&["x.example"])),
                Err(TlsError::InvalidNodeName { .. })
            ),
            "{bad:?} accepted"
        );
    }
    assert!(!dir.join("../evil.pem").exists());
}

#[test]
fn add_node_with_a_foreign_ca_key_is_refused() {
    let (_tmp, dir) = new_certs();
    let (_other_tmp, other_dir) = new_certs();
    fs::remove_file(dir.join("ca.key")).expect("remove");
    fs::copy(other_dir.join("ca.key"), dir.join("ca.key")).expect("copy");
    let error = add_node(&dir, "east", &names(&["east.example"])).expect_err("mismatch");
    assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");
    assert!(error.to_string().contains("ca.key"), "{error}");
    assert!(!dir.join("east.pem").exists(), "nothing may be written");
}
