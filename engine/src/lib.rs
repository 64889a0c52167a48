//! The strait engine: the daemon that serves a disk to a VMM, its JSON control API, and
//! (in later issues) the replication core that carries guest writes and memory across the
//! WAN.
//!
//! `main.rs` only parses arguments and calls [`run`]; everything is reachable from tests.

mod bench_link;
pub mod cli;
pub mod control;
pub mod ctl;
mod demo;
mod link_cmd;
pub mod migration;
mod netcmd;
mod pattern;
pub mod replication;
mod serve;

pub use serve::{ServeError, Server};

/// What can fail at the top level of the binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Ctl(#[from] ctl::CtlError),
    #[error(transparent)]
    Net(#[from] netcmd::NetCmdError),
    #[error(transparent)]
    Bench(#[from] Box<bench_link::BenchError>),
    #[error(transparent)]
    Link(#[from] link_cmd::LinkCmdError),
    #[error(transparent)]
    Demo(#[from] demo::DemoError),
}

/// Runs one `strait` command to completion.
pub fn run(cli: cli::Cli) -> Result<(), Error> {
    match cli.command {
        cli::Command::Serve(args) => serve::run(args)?,
        cli::Command::Ctl(args) => ctl::run(args)?,
        cli::Command::Certs(args) => netcmd::certs(args)?,
        cli::Command::Wanem(args) => netcmd::wanem(args)?,
        cli::Command::Link(cli::LinkArgs { command }) => link_cmd::run(command)?,
        cli::Command::Bench(cli::BenchArgs {
            command: cli::BenchCommand::Link(args),
        }) => bench_link::run(args).map_err(Box::new)?,
        cli::Command::Demo(args) => demo::run(args)?,
    }
    Ok(())
}

/// Logs to stderr with `tracing`; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call (tests starting several servers) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
