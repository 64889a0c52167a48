//! `strait link listen|send`: check the link between two engines (certificates,
//! reachability, goodput) before replicating over it, the way `iperf` checks a path.
//!
//! The sender pushes `--mib` MiB on the Bulk class as the offset-determined stream of
//! [`crate::pattern`]; the listener checks every byte where it lands, so a lost,
//! repeated, reordered or damaged byte fails it. The sender then finishes the session
//! gracefully, which returns only once the listener has received everything. Both print
//! one JSON line last. One `strait certs --out DIR` directory given to both engines lets
//! them talk; a peer whose certificate another CA signed is refused, and the listener logs
//! the refusal and keeps waiting for a peer it trusts.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use strait_net::protocol::Role;
use strait_net::session::tcp::{Link, LinkError};
use strait_net::session::SessionConfig;
use strait_net::tls::{TlsError, TlsIdentity};
use strait_net::StreamClass;
use tracing::info;

use crate::cli::{LinkCommand, LinkListenArgs, LinkSecurity, LinkSendArgs};
use crate::pattern::{check, payload};

/// Bytes per payload: a quarter of a 1 MiB frame, the size of a disk-copy chunk.
const PAYLOAD_BYTES: usize = 256 << 10;

/// Longest one send waits for room in the send buffer. The session fails by itself when
/// the link stays down past its resume window (30 s); this only bounds a peer that stays
/// connected but stops granting credit.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest `finish` waits for the listener to confirm every byte: a full send buffer
/// (120 MiB) drains in about a second at 1 Gbit/s; two minutes cover a slow path and a
/// resume on the way.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the listener's receive waits before looking again; the session reports a
/// failure or the end by itself, so this only paces the loop.
const RECV_POLL: Duration = Duration::from_secs(1);

/// What `strait link` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LinkCmdError {
    /// The certificate directory is missing or unusable.
    #[error("cannot load the TLS identity from {dir}")]
    Identity {
        dir: PathBuf,
        #[source]
        source: Box<TlsError>,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The session could not be opened or failed.
    #[error("link with {peer} failed")]
    Link {
        peer: String,
        #[source]
        source: Box<LinkError>,
    },
    /// A byte arrived that was not sent there.
    #[error("the stream is corrupt: the payload at offset {offset} is not what was sent")]
    Corrupt { offset: u64 },
    /// Writing the result failed.
    #[error("cannot write the result")]
    Output(#[source] io::Error),
}

/// `strait link listen|send`.
pub fn run(command: LinkCommand) -> Result<(), LinkCmdError> {
    crate::init_logging();
    match command {
        LinkCommand::Listen(args) => listen(&args),
        LinkCommand::Send(args) => send(&args),
    }
}

fn identity(security: &LinkSecurity) -> Result<Option<TlsIdentity>, LinkCmdError> {
    match &security.tls_dir {
        Some(dir) if !security.insecure => {
            TlsIdentity::load(dir)
                .map(Some)
                .map_err(|source| LinkCmdError::Identity {
                    dir: dir.clone(),
                    source: Box::new(source),
                })
        }
        _ => Ok(None),
    }
}

fn print_line(value: &serde_json::Value) -> Result<(), LinkCmdError> {
    let mut out = io::stdout().lock();
    writeln!(out, "{value}")
        .and_then(|()| out.flush())
        .map_err(LinkCmdError::Output)
}

fn listen(args: &LinkListenArgs) -> Result<(), LinkCmdError> {
    let tls = identity(&args.security)?;
    let listen_err = |source| LinkCmdError::Listen {
        addr: args.listen,
        source,
    };
    let listener = TcpListener::bind(args.listen).map_err(listen_err)?;
    let addr = listener.local_addr().map_err(listen_err)?;
    info!(%addr, tls = tls.is_some(), "listening");
    print_line(&json!({ "listening": addr.to_string() }))?;
    let link_err = |source| LinkCmdError::Link {
        peer: "the sender".into(),
        source: Box::new(source),
    };
    let link = Link::accept(
        listener,
        tls.as_ref(),
        SessionConfig::new(Role::Destination),
    )
    .map_err(link_err)?;
    let mut offset = 0u64;
    let mut first_at = None;
    loop {
        match link.recv(StreamClass::Bulk, RECV_POLL) {
            Ok(Some(payload)) => {
                first_at.get_or_insert_with(Instant::now);
                if !check(&payload, offset) {
                    return Err(LinkCmdError::Corrupt { offset });
                }
                offset += payload.len() as u64;
                // Every payload returned by recv was received: this cannot be refused.
                let _ = link.mark_applied(StreamClass::Bulk, payload.len() as u64);
            }
            Ok(None) => {}
            Err(LinkError::Finished) => break,
            Err(source) => return Err(link_err(source)),
        }
    }
    let seconds = first_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    print_line(&json!({
        "received_bytes": offset,
        "verified": true,
        "seconds": seconds,
        "goodput_mbit": mbit(offset, seconds),
        "tls": tls.is_some(),
    }))
}

fn send(args: &LinkSendArgs) -> Result<(), LinkCmdError> {
    let tls = identity(&args.security)?;
    let link_err = |source| LinkCmdError::Link {
        peer: args.to.to_string(),
        source: Box::new(source),
    };
    let started = Instant::now();
    let link = Link::connect(
        args.to,
        args.connections,
        tls.as_ref(),
        SessionConfig::new(Role::Source),
    )
    .map_err(link_err)?;
    info!(peer = %args.to, tls = tls.is_some(), "session open");
    let total = args.mib << 20;
    let mut offset = 0u64;
    while offset < total {
        let len = PAYLOAD_BYTES.min(usize::try_from(total - offset).unwrap_or(PAYLOAD_BYTES));
        link.send(StreamClass::Bulk, payload(len, offset), SEND_TIMEOUT)
            .map_err(link_err)?;
        offset += len as u64;
    }
    link.finish(FINISH_TIMEOUT).map_err(link_err)?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = link.stats();
    print_line(&json!({
        "sent_bytes": total,
        "seconds": seconds,
        "goodput_mbit": mbit(total, seconds),
        "retransmitted_bytes": stats.send.iter().map(|c| c.retransmitted_bytes).sum::<u64>(),
        "srtt_ms": stats.srtt_ns.map(|ns| ns as f64 / 1e6),
        "connections": args.connections,
        "tls": tls.is_some(),
    }))
}

fn mbit(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 * 8.0 / seconds / 1e6
    } else {
        0.0
    }
}
