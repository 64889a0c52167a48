//! `strait certs` and `strait wanem`: thin wrappers over `strait-net`.

#![allow(clippy::print_stdout)] // These commands' output is their result.

use strait_net::tls::{write_certs, TlsError};
use strait_net::wanem::{run_cli, WanemConfig, WanemError};

use crate::cli::{CertsArgs, WanemArgs};

/// What `strait certs` or `strait wanem` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NetCmdError {
    #[error(transparent)]
    Certs(#[from] TlsError),
    #[error(transparent)]
    Wanem(#[from] WanemError),
}

/// `strait certs --out DIR`: a CA and one node certificate for a first setup.
pub fn certs(args: CertsArgs) -> Result<(), NetCmdError> {
    let paths = write_certs(&args.out, &args.names)?;
    println!("CA certificate   {}", paths.ca_cert.display());
    println!(
        "CA key           {}  (keep it offline once every node is signed)",
        paths.ca_key.display()
    );
    println!("node certificate {}", paths.node_cert.display());
    println!("node key         {}", paths.node_key.display());
    println!("Give this directory to both engines with --tls-dir for a one-machine setup.");
    Ok(())
}

/// `strait wanem ...`: two namespaces joined by an emulated WAN.
pub fn wanem(args: WanemArgs) -> Result<(), NetCmdError> {
    crate::init_logging();
    let config = WanemConfig {
        rtt_ms: args.rtt_ms,
        rate_mbit: args.rate_mbit,
        loss_pct: args.loss_pct,
        jitter_ms: args.jitter_ms,
        cut_at_s: args.cut_at_s,
        cut_for_s: args.cut_for_s,
        seed: args.seed,
    };
    run_cli(config, args.run_a, args.run_b, args.seconds)?;
    Ok(())
}
