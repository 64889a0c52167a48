//! Certificates and mutual TLS 1.3 between engines.
//!
//! Every byte between two engines crosses a WAN that neither of them controls, so every
//! connection is TLS 1.3 with a certificate on *both* sides, all issued by one private CA per
//! deployment.
//!
//! # Setting up
//!
//! 1. `write_certs(dir, names)` creates `dir` (mode 0700) with a self-signed CA (`ca.pem`,
//!    and its key `ca.key`, mode 0600) and one node certificate (`node.pem`, `node.key`, mode
//!    0600) valid for `names` — the DNS names and IP addresses peers will dial — and usable both
//!    as a server and as a client certificate.
//! 2. Two engines on one machine (or hosts given copies of `dir`) can talk at once: both load
//!    `node.pem`, and each trusts `ca.pem`.
//! 3. For more hosts, `add_node(dir, name, names)` signs `NAME.pem`/`NAME.key` with the same CA;
//!    that host gets `ca.pem`, `NAME.pem` and `NAME.key` (never `ca.key`) and loads them with
//!    [`TlsIdentity::load_node`].
//!
//! # A connection
//!
//! 1. Client → server: TCP connect, then `ClientHello` offering ALPN [`ALPN_PROTOCOL`].
//! 2. Server → client: its certificate, proven with its key; a request for the client's.
//!    The client checks the chain against `ca.pem` and that it names the address dialled.
//! 3. Client → server: its certificate, proven with its key. The server checks the chain
//!    against `ca.pem`; an unknown CA or no certificate at all ends the connection with an alert.
//! 4. Both: if the peer did not agree on [`ALPN_PROTOCOL`], close ([`TlsError::NoAlpn`]).
//!
//! [`accept`] and [`connect`] run these steps on a blocking [`TcpStream`] and hand back a
//! [`rustls::StreamOwned`]. In TLS 1.3 the client completes its side (step 3) before the server
//! has judged its certificate, so a refused client learns it on its first read, as an
//! `AlertReceived` error; the link's own handshake (a hello the server answers) is therefore
//! what tells a client it was accepted. The refusing side sends its alert, then drains the
//! peer's socket for up to a second before closing, so the peer reads the reason instead of a
//! connection reset; a refused `accept` or `connect` can thus take that long to return.
//!
//! # What is authenticated
//!
//! - The peer holds the private key of a certificate signed by this deployment's CA that is
//!   valid now, in both directions.
//! - The client also checks that the server's certificate names the host or IP it dialled.
//! - Both ends speak `strait/1` (ALPN), so a peer of another protocol version is refused before
//!   any frame is parsed.
//! - Everything after the handshake is encrypted and integrity-protected by TLS 1.3.
//!
//! # What is not
//!
//! - *Which* node the client is: the server accepts any certificate the CA signed and does not
//!   check the client's names. [`peer_identity`] names the peer for logs only, and engines that
//!   share `node.pem` cannot be told apart at all.
//! - Revocation: there are no CRLs or OCSP. A leaked node key stays valid until the
//!   certificate expires ([`NODE_LIFETIME`]) or the deployment moves to a new CA; `ca.pem` may
//!   hold several CA certificates, all trusted, to make that move without downtime.
//! - `ca.key` is the whole trust: anyone holding it can mint nodes. It only needs to exist where
//!   certificates are signed.
//! - Traffic analysis: sizes and timing of records are visible, and the client sends the server's
//!   DNS name in clear (SNI; not for IP addresses). Certificates themselves are encrypted.
//! - No session resumption and no 0-RTT data: every connection does a full handshake, so no
//!   replayable early data exists and every connection re-proves both keys. On a WAN a full
//!   TLS 1.3 handshake costs one round trip, the same as a resumed one.
//!
//! Records keep rustls' default size (the TLS maximum, 16 KiB of plaintext): smaller records
//! only add per-record overhead, and bigger ones do not exist in TLS.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::DerefMut;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, SystemTimeError, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, InvalidDnsNameError, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, VerifierBuilderError, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, ClientConnection, CommonState, ConnectionCommon, RootCertStore, ServerConfig,
    ServerConnection, SideData, StreamOwned,
};
use tracing::{info, warn};

/// The ALPN protocol both ends must agree on. The version moves when the wire protocol changes
/// incompatibly, so mismatched engines are refused during the handshake instead of
/// misparsing each other's frames.
pub const ALPN_PROTOCOL: &[u8] = b"strait/1";

/// The CA certificate file (shared by every node of a deployment).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key file; only needed where nodes are signed.
pub const CA_KEY_FILE: &str = "ca.key";
/// The node name [`write_certs`] uses and [`TlsIdentity::load`] loads (`node.pem`, `node.key`).
pub const DEFAULT_NODE: &str = "node";

/// How long the CA is valid. Renewing it means re-issuing every node, so it outlives them.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node certificate is valid. Without revocation, expiry is what retires a stolen
/// node key; two years keeps re-issuing a planned chore rather than a surprise outage.
pub const NODE_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Certificates start being valid this long before they are made, because hosts on two
/// continents disagree about the time and a peer whose clock is behind must still accept a
/// certificate minted a moment ago.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);

/// A handshake not finished after this long is abandoned. A TLS 1.3 handshake is two round
/// trips of 100–250 ms on our WAN; ten seconds leaves room for TCP retransmissions on a lossy
/// link without letting a silent peer hold an acceptor forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a refused peer gets to read our alert and close (see `linger_close`): one WAN round
/// trip of up to 250 ms, with room for a retransmission.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// What a refused peer may still push at us while we linger. A peer of ours sends at most a
/// hello before it reads; a young TCP connection cannot have much more in flight in one round
/// trip either.
const REFUSAL_DRAIN_BYTES_MAX: usize = 4 * 1024 * 1024;
/// One TLS record's worth per read while draining.
const DRAIN_CHUNK_BYTES: usize = 16 * 1024;

/// A node has a handful of names and addresses; a longer list is a script gone wrong.
const NAMES_MAX: usize = 64;
/// Node names become file names (`NAME.pem`); keep them short enough to read in a listing.
const NODE_NAME_LEN_MAX: usize = 64;
/// A certificate chain or key is a few KiB; a file far bigger than this is the wrong file.
const PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Bytes of the CA key's identifier put in the CA's name: 64 bits tell apart every CA an
/// operator will make, and the name stays short in logs.
const CA_ID_BYTES: usize = 8;
/// [`peer_identity`] output is for logs; a longer name is cut (253 is the longest DNS name).
const IDENTITY_CHARS_MAX: usize = 253;

const KEY_FILE_MODE: u32 = 0o600;
const CERT_FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

/// What can go wrong making, loading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("a node certificate needs at least one DNS name or IP address")]
    NoNames,
    #[error("{count} names for one node certificate (at most {NAMES_MAX})")]
    TooManyNames { count: usize },
    #[error("{name:?} is neither a DNS name nor an IP address")]
    InvalidName {
        name: String,
        source: InvalidDnsNameError,
    },
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName { name: String, reason: &'static str },
    #[error("failed to create certificate directory {}", .path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{} exists and is not a directory", .path.display())]
    NotADirectory { path: PathBuf },
    #[error("refusing to overwrite existing {}", .path.display())]
    Exists { path: PathBuf },
    #[error("failed to write {}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("failed to read {}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is larger than {PEM_FILE_BYTES_MAX} bytes; not a PEM certificate or key", .path.display())]
    TooLarge { path: PathBuf },
    #[error("{} does not hold a valid PEM {what}", .path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        source: pem::Error,
    },
    #[error("{} does not hold a usable private key", .path.display())]
    InvalidKey {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{} is not a usable certificate", .path.display())]
    InvalidCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{} does not hold the private key of {}", .key.display(), .cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("{} is not signed by the CA in {} (or is not valid now)", .cert.display(), .ca.display())]
    NotSignedByCa {
        cert: PathBuf,
        ca: PathBuf,
        source: rustls::Error,
    },
    #[error("failed to generate the {what}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("the system clock is before 1970")]
    ClockBeforeEpoch { source: SystemTimeError },
    #[error("the system clock is outside the range a certificate can express")]
    ClockOutOfRange,
    #[error("failed to build the TLS {side} configuration")]
    Config {
        side: &'static str,
        source: rustls::Error,
    },
    #[error("failed to build the TLS {side} certificate verifier")]
    Verifier {
        side: &'static str,
        source: VerifierBuilderError,
    },
    #[error("{name:?} is not a valid server name to connect to")]
    ServerName {
        name: String,
        source: InvalidDnsNameError,
    },
    #[error("TLS handshake with {peer} failed")]
    Handshake { peer: String, source: rustls::Error },
    #[error("refused the {peer_role} certificate of {peer}")]
    UntrustedCertificate {
        peer: String,
        peer_role: &'static str,
        source: rustls::Error,
    },
    #[error("refused {peer_role} {peer}: it presented no certificate")]
    NoPeerCertificate {
        peer: String,
        peer_role: &'static str,
    },
    #[error("I/O error during the TLS handshake with {peer}")]
    HandshakeIo { peer: String, source: io::Error },
    #[error("{peer} closed the connection during the TLS handshake")]
    HandshakeEof { peer: String },
    #[error("{peer} did not agree on ALPN protocol \"strait/1\"")]
    NoAlpn { peer: String },
}

/// The files of one certificate setup, as written by [`write_certs`] or [`add_node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The CA certificate every node trusts.
    pub ca_cert: PathBuf,
    /// The CA private key (secret; mode 0600).
    pub ca_key: PathBuf,
    /// The node certificate.
    pub node_cert: PathBuf,
    /// The node private key (secret; mode 0600).
    pub node_key: PathBuf,
}

impl CertPaths {
    fn new(dir: &Path, node: &str) -> CertPaths {
        CertPaths {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            node_cert: dir.join(format!("{node}.pem")),
            node_key: dir.join(format!("{node}.key")),
        }
    }
}

/// Creates `out` (mode 0700) with a new CA and one node certificate valid for `names`.
///
/// `names` are the DNS names and IP addresses peers use to reach the node; the first one is also
/// the certificate's common name, which [`peer_identity`] reports. Nothing is overwritten: if any
/// of the four files exists, this fails naming it and writes nothing. An `out` that already
/// exists is used as it is, mode included; the key files are 0600 either way.
pub fn write_certs(out: &Path, names: &[String]) -> Result<CertPaths, TlsError> {
    validate_names(names)?;
    let paths = CertPaths::new(out, DEFAULT_NODE);
    create_private_dir(out)?;
    refuse_existing(&[
        &paths.ca_cert,
        &paths.ca_key,
        &paths.node_cert,
        &paths.node_key,
    ])?;

    let ca_key = generate_key("CA key")?;
    let ca_params = ca_params(&ca_key)?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| TlsError::Generate {
            what: "CA certificate",
            source,
        })?;
    let ca_key_pem = ca_key.serialize_pem();
    let roots = roots_from(&paths.ca_cert, vec![ca_cert.der().clone()])?;
    let issuer = Issuer::new(ca_params, ca_key);
    let (node_cert, node_key) = sign_node(&issuer, &names[0], names)?;
    check_signed_by(node_cert.der(), &roots, &names[0], |source| {
        TlsError::NotSignedByCa {
            cert: paths.node_cert.clone(),
            ca: paths.ca_cert.clone(),
            source,
        }
    })?;

    write_new_files(
        out,
        &[
            (&paths.ca_key, ca_key_pem.as_bytes(), KEY_FILE_MODE),
            (&paths.ca_cert, ca_cert.pem().as_bytes(), CERT_FILE_MODE),
            (
                &paths.node_key,
                node_key.serialize_pem().as_bytes(),
                KEY_FILE_MODE,
            ),
            (&paths.node_cert, node_cert.pem().as_bytes(), CERT_FILE_MODE),
        ],
    )?;
    info!(dir = %out.display(), names = ?names, "wrote a new CA and node certificate");
    Ok(paths)
}

/// Signs another node certificate, `dir/NAME.pem` and `dir/NAME.key`, with the CA in `dir`.
///
/// `name` is the node's label: the file stem and the certificate's common name. `names` are the
/// DNS names and IP addresses that node is reached at. Nothing is overwritten.
pub fn add_node(dir: &Path, name: &str, names: &[String]) -> Result<CertPaths, TlsError> {
    validate_node_name(name)?;
    validate_names(names)?;
    let paths = CertPaths::new(dir, name);
    refuse_existing(&[&paths.node_cert, &paths.node_key])?;

    let ca_key_pem = read_text(&paths.ca_key)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| TlsError::InvalidKey {
        path: paths.ca_key.clone(),
        source: Box::new(source),
    })?;
    let roots = roots_from(&paths.ca_cert, read_certs(&paths.ca_cert)?)?;
    // rcgen can only read back a CA certificate with its `x509-parser` feature, which this crate
    // does not enable; the CA's name is a function of its key, so it is rebuilt from the key and
    // the new certificate is then checked against `ca.pem` itself.
    let issuer = Issuer::new(ca_params(&ca_key)?, ca_key);
    let (node_cert, node_key) = sign_node(&issuer, name, names)?;
    check_signed_by(node_cert.der(), &roots, &names[0], |source| {
        TlsError::KeyMismatch {
            cert: paths.ca_cert.clone(),
            key: paths.ca_key.clone(),
            source,
        }
    })?;

    write_new_files(
        dir,
        &[
            (
                &paths.node_key,
                node_key.serialize_pem().as_bytes(),
                KEY_FILE_MODE,
            ),
            (&paths.node_cert, node_cert.pem().as_bytes(), CERT_FILE_MODE),
        ],
    )?;
    info!(dir = %dir.display(), node = name, names = ?names, "signed a new node certificate");
    Ok(paths)
}

/// This engine's certificate and key, and the CA it trusts: everything needed to build the
/// server and client TLS configurations.
pub struct TlsIdentity {
    /// Invariant: holds at least one CA certificate, and `cert_chain[0]` chains to one of them.
    roots: Arc<RootCertStore>,
    /// Invariant: not empty; `cert_chain[0]` is the public half of `key`.
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<CryptoProvider>,
    cert_path: PathBuf,
}

impl fmt::Debug for TlsIdentity {
    // Written by hand so the private key can never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_path", &self.cert_path)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Loads `ca.pem`, `node.pem` and `node.key` from `dir`.
    pub fn load(dir: &Path) -> Result<TlsIdentity, TlsError> {
        Self::load_node(dir, DEFAULT_NODE)
    }

    /// Loads `ca.pem`, `NAME.pem` and `NAME.key` from `dir` (a node made by [`add_node`]).
    ///
    /// Checks that the key belongs to the certificate and that the certificate is signed by the
    /// CA and valid now, so a mixed-up directory fails here rather than at every handshake.
    pub fn load_node(dir: &Path, name: &str) -> Result<TlsIdentity, TlsError> {
        validate_node_name(name)?;
        let paths = CertPaths::new(dir, name);
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let roots = roots_from(&paths.ca_cert, read_certs(&paths.ca_cert)?)?;
        let cert_chain = read_certs(&paths.node_cert)?;
        let key = read_key(&paths.node_key)?;
        warn_if_readable_by_others(&paths.node_key);

        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|source| TlsError::InvalidKey {
                path: paths.node_key.clone(),
                source: Box::new(source),
            })?;
        CertifiedKey::new(cert_chain.clone(), signing_key)
            .keys_match()
            .map_err(|source| TlsError::KeyMismatch {
                cert: paths.node_cert.clone(),
                key: paths.node_key.clone(),
                source,
            })?;
        client_verifier(&roots, &provider)?
            .verify_client_cert(&cert_chain[0], &cert_chain[1..], UnixTime::now())
            .map_err(|source| TlsError::NotSignedByCa {
                cert: paths.node_cert.clone(),
                ca: paths.ca_cert.clone(),
                source,
            })?;

        Ok(TlsIdentity {
            roots,
            cert_chain,
            key,
            provider,
            cert_path: paths.node_cert,
        })
    }

    /// The server side: TLS 1.3 only, a client certificate signed by the CA required, ALPN
    /// [`ALPN_PROTOCOL`] offered, no session resumption.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let config_err = |source| TlsError::Config {
            side: "server",
            source,
        };
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(client_verifier(&self.roots, &self.provider)?)
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(config_err)?;
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The client side: TLS 1.3 only, the server verified against the CA, the node certificate
    /// presented, ALPN [`ALPN_PROTOCOL`] offered, no session resumption.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config_err = |source| TlsError::Config {
            side: "client",
            source,
        };
        let verifier = server_verifier(&self.roots, &self.provider)?;
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(config_err)?;
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// A server-side TLS stream over TCP, as returned by [`accept`].
pub type ServerStream = StreamOwned<ServerConnection, TcpStream>;
/// A client-side TLS stream over TCP, as returned by [`connect`].
pub type ClientStream = StreamOwned<ClientConnection, TcpStream>;

/// Runs the server side of the handshake on an accepted, blocking `sock`.
///
/// Fails if the client presents no certificate, one the CA did not sign, or does not agree on
/// [`ALPN_PROTOCOL`]; the reason is logged and returned. The handshake must finish within
/// [`HANDSHAKE_TIMEOUT`]; the socket's own timeouts are restored after it.
pub fn accept(config: Arc<ServerConfig>, mut sock: TcpStream) -> Result<ServerStream, TlsError> {
    let peer = peer_label(&sock);
    let result = ServerConnection::new(config)
        .map_err(|source| TlsError::Handshake {
            peer: peer.clone(),
            source,
        })
        .and_then(|mut conn| {
            establish(&mut conn, &mut sock, &peer, "client")?;
            Ok(StreamOwned::new(conn, sock))
        });
    log_outcome("accept", &peer, result.as_ref().map(|s| &**s.conn));
    result
}

/// Runs the client side of the handshake on a connected, blocking `sock`; `server` is the DNS
/// name or IP address the server's certificate must hold.
///
/// Fails if the server's certificate is not signed by the CA or does not name `server`, or the
/// server does not agree on [`ALPN_PROTOCOL`]. See the module docs for why a refusal of *this*
/// client's certificate shows up on the first read instead.
pub fn connect(
    config: Arc<ClientConfig>,
    server: &str,
    mut sock: TcpStream,
) -> Result<ClientStream, TlsError> {
    let peer = peer_label(&sock);
    let name = ServerName::try_from(server.to_owned()).map_err(|source| TlsError::ServerName {
        name: server.to_owned(),
        source,
    })?;
    let result = ClientConnection::new(config, name)
        .map_err(|source| TlsError::Handshake {
            peer: peer.clone(),
            source,
        })
        .and_then(|mut conn| {
            establish(&mut conn, &mut sock, &peer, "server")?;
            Ok(StreamOwned::new(conn, sock))
        });
    log_outcome("connect", &peer, result.as_ref().map(|s| &**s.conn));
    result
}

/// The peer certificate's subject common name, or else its first DNS name or IP address, for
/// logging who connected. `None` before the handshake or if the certificate holds neither.
///
/// This is a label, not an authorization: see the module docs.
pub fn peer_identity(conn: &CommonState) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    let name = der::subject_common_name(cert).or_else(|| der::first_subject_alt_name(cert))?;
    // The name came off the wire; keep control characters out of the logs.
    Some(
        name.chars()
            .take(IDENTITY_CHARS_MAX)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
    )
}

fn log_outcome(side: &'static str, peer: &str, outcome: Result<&CommonState, &TlsError>) {
    match outcome {
        Ok(conn) => {
            let identity = peer_identity(conn);
            let identity = identity.as_deref().unwrap_or("?");
            info!(side, peer, identity, "TLS peer authenticated");
        }
        Err(error) => warn!(side, peer, error = %ErrorChain(error), "TLS handshake refused"),
    }
}

/// The handshake, then the ALPN check, under [`HANDSHAKE_TIMEOUT`]. `peer_role` is what the
/// peer is, "client" or "server", for error messages.
fn establish<C, D>(
    conn: &mut C,
    sock: &mut TcpStream,
    peer: &str,
    peer_role: &'static str,
) -> Result<(), TlsError>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    let io_err = |source| TlsError::HandshakeIo {
        peer: peer.to_owned(),
        source,
    };
    let saved = (
        sock.read_timeout().map_err(io_err)?,
        sock.write_timeout().map_err(io_err)?,
    );
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let result = handshake(conn, sock, deadline, peer, peer_role)
        .and_then(|()| require_alpn(conn, sock, peer));
    if result.is_err() {
        linger_close(sock);
        return result;
    }
    sock.set_read_timeout(saved.0).map_err(io_err)?;
    sock.set_write_timeout(saved.1).map_err(io_err)?;
    Ok(())
}

/// After a refusal, closes our direction and discards what the peer still sends until it closes
/// too. Closing a socket with unread data makes the kernel send a reset, and a reset can destroy
/// our alert before the peer reads it; draining turns the refusal into "unknown CA" on the
/// peer's side rather than "connection reset". Bounded by [`REFUSAL_LINGER`] and
/// [`REFUSAL_DRAIN_BYTES_MAX`]; failures only mean the peer is already gone.
fn linger_close(sock: &mut TcpStream) {
    if sock.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + REFUSAL_LINGER;
    let mut buf = [0u8; DRAIN_CHUNK_BYTES];
    let mut drained_bytes = 0;
    while drained_bytes < REFUSAL_DRAIN_BYTES_MAX {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return;
        };
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained_bytes += n,
        }
    }
}

fn handshake<C, D>(
    conn: &mut C,
    sock: &mut TcpStream,
    deadline: Instant,
    peer: &str,
    peer_role: &'static str,
) -> Result<(), TlsError>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    let io_err = |source| TlsError::HandshakeIo {
        peer: peer.to_owned(),
        source,
    };
    loop {
        // One deadline for the whole handshake, so a peer dripping a byte at a time cannot
        // stretch it by resetting a per-read timeout.
        set_timeouts_until(sock, deadline).map_err(io_err)?;
        while conn.wants_write() {
            conn.write_tls(sock).map_err(io_err)?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        if conn.read_tls(sock).map_err(io_err)? == 0 {
            return Err(TlsError::HandshakeEof {
                peer: peer.to_owned(),
            });
        }
        if let Err(source) = conn.process_new_packets() {
            // rustls has queued an alert saying why; send it so the peer's log names the reason.
            flush_best_effort(conn, sock);
            return Err(handshake_error(peer, peer_role, source));
        }
    }
}

fn set_timeouts_until(sock: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake took longer than HANDSHAKE_TIMEOUT",
        ));
    }
    sock.set_read_timeout(Some(left))?;
    sock.set_write_timeout(Some(left))
}

/// Gives the refusals an operator must act on (an untrusted or missing certificate) their
/// own variants, so logs and callers need not dig through rustls' error.
fn handshake_error(peer: &str, peer_role: &'static str, source: rustls::Error) -> TlsError {
    let peer = peer.to_owned();
    match source {
        rustls::Error::InvalidCertificate(_) => TlsError::UntrustedCertificate {
            peer,
            peer_role,
            source,
        },
        rustls::Error::NoCertificatesPresented => TlsError::NoPeerCertificate { peer, peer_role },
        source => TlsError::Handshake { peer, source },
    }
}

/// rustls lets a handshake without ALPN through (RFC 7301 allows it); we do not.
fn require_alpn<C, D>(conn: &mut C, sock: &mut TcpStream, peer: &str) -> Result<(), TlsError>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    if conn.alpn_protocol() == Some(ALPN_PROTOCOL) {
        return Ok(());
    }
    conn.send_close_notify();
    flush_best_effort(conn, sock);
    Err(TlsError::NoAlpn {
        peer: peer.to_owned(),
    })
}

/// Sends what rustls has queued (an alert) to a peer that is being dropped anyway; a failure
/// here changes nothing, the connection is closed either way.
fn flush_best_effort<C, D>(conn: &mut C, sock: &mut TcpStream)
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    while conn.wants_write() {
        if conn.write_tls(sock).is_err() {
            return;
        }
    }
}

fn peer_label(sock: &TcpStream) -> String {
    match sock.peer_addr() {
        Ok(addr) => addr.to_string(),
        Err(_) => "an unknown peer".to_owned(),
    }
}

/// Formats an error with its sources, `a: b: c`, for one-line logs.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

fn client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|source| TlsError::Verifier {
            side: "server",
            source,
        })
}

fn server_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|source| TlsError::Verifier {
            side: "client",
            source,
        })
}

/// The CA certificates read from `path` as a trust store.
fn roots_from(
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs {
        roots
            .add(ca)
            .map_err(|source| TlsError::InvalidCertificate {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(Arc::new(roots))
}

/// Checks a freshly signed `cert` the way peers will check it, as a client certificate and as
/// a server certificate for `name`, before it is written; `rejected` says what a refusal means.
fn check_signed_by(
    cert: &CertificateDer<'_>,
    roots: &Arc<RootCertStore>,
    name: &str,
    rejected: impl Fn(rustls::Error) -> TlsError,
) -> Result<(), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let now = UnixTime::now();
    let server_name =
        ServerName::try_from(name.to_owned()).map_err(|source| TlsError::InvalidName {
            name: name.to_owned(),
            source,
        })?;
    client_verifier(roots, &provider)?
        .verify_client_cert(cert, &[], now)
        .map_err(&rejected)?;
    server_verifier(roots, &provider)?
        .verify_server_cert(cert, &[], &server_name, &[], now)
        .map_err(&rejected)?;
    Ok(())
}

fn validate_names(names: &[String]) -> Result<(), TlsError> {
    if names.is_empty() {
        return Err(TlsError::NoNames);
    }
    if names.len() > NAMES_MAX {
        return Err(TlsError::TooManyNames { count: names.len() });
    }
    for name in names {
        // The same parser the client uses on the name it dials, so every name written into a
        // certificate is one a peer can actually connect to.
        ServerName::try_from(name.as_str()).map_err(|source| TlsError::InvalidName {
            name: name.clone(),
            source,
        })?;
    }
    Ok(())
}

fn validate_node_name(name: &str) -> Result<(), TlsError> {
    let reason = if name.is_empty() || name.len() > NODE_NAME_LEN_MAX {
        Some("must be 1 to 64 characters")
    } else if name.starts_with('.') {
        Some("must not start with '.'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        Some("may only hold ASCII letters, digits, '-', '_' and '.'")
    } else if name == "ca" {
        Some("\"ca\" names the CA's own files")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TlsError::InvalidNodeName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn generate_key(what: &'static str) -> Result<KeyPair, TlsError> {
    // ECDSA P-256: every TLS 1.3 stack verifies it, and signing is fast enough that the
    // handshake is bounded by the WAN's round trips, not by the CPU.
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| TlsError::Generate { what, source })
}

/// The CA's certificate parameters. The subject is derived from the CA key alone, so
/// [`add_node`] can rebuild the exact issuer name from `ca.key`; every CA gets a distinct name,
/// so a certificate from another deployment's CA is reported as from an unknown issuer.
fn ca_params(ca_key: &KeyPair) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    let id = params.key_identifier(ca_key);
    let id_hex: String = id
        .iter()
        .take(CA_ID_BYTES)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "strait");
    dn.push(DnType::CommonName, format!("strait CA {id_hex}"));
    params.distinguished_name = dn;
    // Path length 0: the CA signs nodes only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    set_validity(&mut params, CA_LIFETIME)?;
    Ok(params)
}

fn sign_node(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    names: &[String],
) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(|source| TlsError::Generate {
            what: "node certificate names",
            source,
        })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "strait");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One certificate per node serves both directions: it accepts links and dials them.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_LIFETIME)?;
    let key = generate_key("node key")?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|source| TlsError::Generate {
            what: "node certificate",
            source,
        })?;
    Ok((cert, key))
}

/// Valid from [`BACKDATE`] ago until `lifetime` from now. rcgen's dates are `time` types; this
/// crate does not depend on `time`, so they are reached through rcgen and inference.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> Result<(), TlsError> {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|source| TlsError::ClockBeforeEpoch { source })?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = epoch
        .checked_add(
            since_epoch
                .try_into()
                .map_err(|_| TlsError::ClockOutOfRange)?,
        )
        .ok_or(TlsError::ClockOutOfRange)?;
    params.not_before = now
        .checked_sub(BACKDATE.try_into().map_err(|_| TlsError::ClockOutOfRange)?)
        .ok_or(TlsError::ClockOutOfRange)?;
    params.not_after = now
        .checked_add(lifetime.try_into().map_err(|_| TlsError::ClockOutOfRange)?)
        .ok_or(TlsError::ClockOutOfRange)?;
    Ok(())
}

mod der;
mod files;
#[cfg(test)]
mod tests;

use files::*;
