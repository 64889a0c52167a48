//! The `strait` binary: parse the command line, run the library, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = strait_engine::cli::Cli::parse();
    match strait_engine::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The chain carries what failed and on what; print all of it.
            eprintln!("strait: error: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
