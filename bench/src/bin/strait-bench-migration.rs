//! Aggregates the migration sweep (`bench/migration.sh`): reads the runs (JSON lines),
//! writes `migration.md`, `migration-vs-qemu.md` and the timelines' SVG.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use strait_bench::migration::{chart, parse_runs, tables};

/// Writes the migration results files from a sweep's runs.
#[derive(Parser)]
struct Args {
    /// The runs: one `strait demo --json` report per line, with the script's `bench` object.
    #[arg(long)]
    runs: PathBuf,
    /// Where the results go (`migration.md`, `migration-vs-qemu.md`, the SVG).
    #[arg(long)]
    out_dir: PathBuf,
    /// The command that ran the sweep, for the "how to reproduce" section.
    #[arg(long)]
    command: String,
    /// The date, the commit and the machine, as the files state them.
    #[arg(long)]
    date: String,
    #[arg(long)]
    commit: String,
    #[arg(long)]
    machine: String,
}

/// The chart's file name, next to the results files.
const SVG_FILE: &str = "migration-timelines.svg";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.runs)
        .with_context(|| format!("read the runs file {}", args.runs.display()))?;
    let runs = parse_runs(&text).with_context(|| format!("parse {}", args.runs.display()))?;
    let ctx = tables::Context {
        date: args.date,
        machine: args.machine,
        commit: args.commit,
        command: args.command,
        runs_file: format!(
            "bench/results/{}",
            args.runs
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ),
        svg_file: SVG_FILE.into(),
    };
    let write = |name: &str, content: &str| {
        let path = args.out_dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))
    };
    write("migration.md", &tables::migration_md(&runs, &ctx))?;
    write("migration-vs-qemu.md", &tables::versus_md(&runs, &ctx))?;
    if let Some(svg) = chart::render(&runs) {
        write(SVG_FILE, &svg)?;
    }
    eprintln!(
        "wrote migration.md, migration-vs-qemu.md and {SVG_FILE} in {} from {} runs",
        args.out_dir.display(),
        runs.len()
    );
    Ok(())
}
