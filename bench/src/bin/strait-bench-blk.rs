//! `strait-bench-blk`: the block data path of strait against qemu-storage-daemon, side by
//! side, with no VM: this program is the vhost-user frontend (see `strait_bench::blk`).
//!
//! ```text
//! strait-bench-blk --backend both --rw randread --bs 4k --iodepth 32 --seconds 5 --json
//! ```
//!
//! starts each backend on the same image, pinned to the same CPUs, runs the job on them in
//! alternating rounds and prints medians, spread and the strait/qsd ratios; with `--json`
//! the last line of stdout is one JSON object with `strait`, `qsd` and `ratio`.
//!
//! `strait-bench-blk strait ARGS...` is the `strait` command line itself (same library,
//! same build): the default way the comparison starts `strait serve`, so the measured
//! backend always comes from the tree being benchmarked. `--strait PATH` runs another
//! binary instead.

// A benchmark's report goes to stdout by design.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use strait_bench::blk::compare::{compare, Comparison, PeerSummary, FIGURES};
use strait_bench::blk::job::{run_job, JobResult, JobSpec};
use strait_bench::blk::pattern;
use strait_bench::blk::peers::{qsd_available, Peer, PeerConfig, QsdAio};

/// Defaults: a 5 s window after 1 s of warm-up, three rounds per backend.
const DEFAULT_SECONDS: f64 = 5.0;
const DEFAULT_WARMUP_SECONDS: f64 = 1.0;
const DEFAULT_ROUNDS: u32 = 3;
/// 1 GiB: far more than any cache line set or TLB reach, small enough to create on tmpfs
/// in about a second.
const DEFAULT_IMAGE_BYTES: &str = "1G";
/// After the last completion, spin this long before sleeping on the call eventfd: a guest
/// driver under load sees the next completion within a few microseconds.
const DEFAULT_POLL_US: u64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Strait,
    Qsd,
    Both,
}

/// fio's names for the patterns (`rw` is fio's mixed sequential read/write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[allow(clippy::enum_variant_names)]
enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Rw,
    Randrw,
}

/// Drive vhost-user-blk backends with a VM-less frontend and compare strait with
/// qemu-storage-daemon.
#[derive(Debug, Parser)]
#[command(name = "strait-bench-blk")]
struct Args {
    /// Which backend(s) to start and measure.
    #[arg(long, value_enum, default_value_t = Backend::Both)]
    backend: Backend,
    /// Drive an already running backend on this socket instead of starting one.
    #[arg(long, conflicts_with = "backend")]
    socket: Option<PathBuf>,
    /// I/O pattern (as fio names it).
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Share of reads for rw/randrw, in percent.
    #[arg(long, default_value_t = 50)]
    rwmixread: u8,
    /// Block size (bytes; k and m suffixes).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    iodepth: u16,
    /// Virtqueues (one load thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Measured seconds per round.
    #[arg(long, default_value_t = DEFAULT_SECONDS)]
    seconds: f64,
    /// Unmeasured seconds before each measurement.
    #[arg(long, default_value_t = DEFAULT_WARMUP_SECONDS)]
    warmup_seconds: f64,
    /// Rounds per backend (alternating).
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    rounds: u32,
    /// Write then read back every block, comparing every byte (slot-owned blocks).
    #[arg(long)]
    verify: bool,
    /// Frame requests in indirect descriptor tables, as Linux guests do.
    #[arg(long)]
    indirect: bool,
    /// Submit at most this many requests per second, all queues together (fio's
    /// `rate_iops`); unlimited when absent.
    #[arg(long)]
    rate_iops: Option<u64>,
    /// Busy-poll the used ring this many microseconds before sleeping on the eventfd.
    #[arg(long, default_value_t = DEFAULT_POLL_US)]
    poll_us: u64,
    /// Directory for the image (tmpfs measures the backend, a disk adds the device).
    #[arg(long, default_value = "/dev/shm")]
    image_dir: PathBuf,
    /// Image size (k, m, g suffixes). Reused across runs when already filled.
    #[arg(long, default_value = DEFAULT_IMAGE_BYTES, value_parser = parse_size)]
    image_size: u64,
    /// CPUs both backends are pinned to (comma list); strait gets them as --cores.
    #[arg(long, default_value = "1", value_parser = parse_cpus)]
    backend_cpus: CpuList,
    /// CPUs the load threads are pinned to (comma list; empty: not pinned).
    #[arg(long, default_value = "0", value_parser = parse_cpus)]
    load_cpus: CpuList,
    /// The strait binary (default: this program's embedded `strait`).
    #[arg(long)]
    strait: Option<PathBuf>,
    /// qemu-storage-daemon's aio engine.
    #[arg(long, value_enum, default_value_t = QsdAio::IoUring)]
    qsd_aio: QsdAio,
    /// Run qsd with cache.direct=off (strait still tries O_DIRECT).
    #[arg(long)]
    qsd_buffered: bool,
    /// Run qsd's export in its main loop instead of an iothread.
    #[arg(long)]
    qsd_no_iothread: bool,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s}"))
}

/// A comma-separated CPU list (a newtype so clap takes it as one value).
#[derive(Debug, Clone)]
struct CpuList(Vec<usize>);

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    if s.is_empty() {
        return Ok(CpuList(Vec::new()));
    }
    s.split(',')
        .map(|c| c.trim().parse().map_err(|_| format!("not a CPU list: {s}")))
        .collect::<Result<_, _>>()
        .map(CpuList)
}

fn job_spec(a: &Args) -> Result<JobSpec> {
    let (read_pct, random) = match a.rw {
        Rw::Read => (100, false),
        Rw::Randread => (100, true),
        Rw::Write => (0, false),
        Rw::Randwrite => (0, true),
        Rw::Rw => (a.rwmixread, false),
        Rw::Randrw => (a.rwmixread, true),
    };
    Ok(JobSpec {
        queues: a.queues,
        iodepth: a.iodepth,
        block_bytes: u32::try_from(a.bs).context("block size")?,
        read_pct,
        random,
        warmup: Duration::from_secs_f64(a.warmup_seconds),
        duration: Duration::from_secs_f64(a.seconds),
        verify: a.verify,
        indirect: a.indirect,
        poll: Duration::from_micros(a.poll_us),
        image_bytes: a.image_size,
        load_cpus: a.load_cpus.0.clone(),
        seed: a.seed,
        rate_iops: a.rate_iops.filter(|r| *r > 0),
    })
}

fn line(r: &JobResult) -> String {
    format!(
        "{:>9.0} IOPS {:>8.1} MB/s  p50 {:>7.1} us  p99 {:>7.1} us  p99.9 {:>8.1} us  \
         backend CPU {} ({} us/IO)  loader CPU {:.2} s  others {}  kicks/IO {:.3} sleeps/IO {:.3}{}",
        r.iops,
        r.mb_per_s,
        r.p50_us,
        r.p99_us,
        r.p999_us,
        r.backend_cpu_s.map_or("-".into(), |c| format!("{c:.2} s")),
        r.backend_cpu_us_per_io
            .map_or("-".into(), |c| format!("{c:.1}")),
        r.loader_cpu_s,
        r.other_cpu_s.map_or("-".into(), |c| format!("{c:.2} s")),
        r.kicks_per_io,
        r.sleeps_per_io,
        if r.errors + r.mismatches + r.bad_used_len > 0 {
            format!(
                "  errors {} mismatches {} bad used len {}",
                r.errors, r.mismatches, r.bad_used_len
            )
        } else {
            String::new()
        }
    )
}

fn problems(r: &JobResult) -> Option<String> {
    (r.errors + r.mismatches + r.bad_used_len > 0).then(|| {
        r.first_problem
            .clone()
            .unwrap_or_else(|| "errors without detail".into())
    })
}

fn print_summary(name: &str, s: &PeerSummary) {
    println!("{name}:");
    for f in FIGURES {
        if let (Some(m), Some([lo, hi])) = (s.median.get(f), s.spread.get(f)) {
            println!("  {f:<22} median {m:>10.1}   [{lo:.1} .. {hi:.1}]");
        }
    }
}

fn strait_command(a: &Args) -> Result<Vec<String>> {
    Ok(match &a.strait {
        Some(path) => vec![path.display().to_string()],
        None => vec![
            std::env::current_exe()
                .context("locating this program")?
                .display()
                .to_string(),
            "strait".into(),
        ],
    })
}

fn run(a: Args) -> Result<bool> {
    let job = job_spec(&a)?;
    job.validate()?;
    if let Some(socket) = &a.socket {
        let r = run_job(socket, &job, None)?;
        println!("{}", line(&r));
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(problems(&r).is_none());
    }
    let peers = match a.backend {
        Backend::Strait => vec![Peer::Strait],
        Backend::Qsd => vec![Peer::Qsd],
        Backend::Both => vec![Peer::Strait, Peer::Qsd],
    };
    if peers.contains(&Peer::Qsd) && !qsd_available() {
        bail!("qemu-storage-daemon is not installed (scripts/install-deps.sh installs it)");
    }
    std::fs::create_dir_all(&a.image_dir)
        .with_context(|| format!("creating {}", a.image_dir.display()))?;
    let image = a
        .image_dir
        .join(format!("strait-bench-blk-{}.img", a.image_size));
    if !pattern::image_looks_filled(&image, a.image_size) {
        eprintln!("filling {} ({} bytes)", image.display(), a.image_size);
        pattern::fill_image(&image, a.image_size)?;
    }
    let dir = tempfile::Builder::new()
        .prefix("strait-bench-blk")
        .tempdir()
        .context("socket directory")?;
    let cfg = PeerConfig {
        image,
        queues: a.queues,
        cpus: a.backend_cpus.0.clone(),
        strait: strait_command(&a)?,
        qsd_aio: a.qsd_aio,
        qsd_direct: !a.qsd_buffered,
        qsd_iothread: !a.qsd_no_iothread,
        dir: dir.path().to_owned(),
    };
    let mut clean = true;
    let result: Comparison = compare(&job, &cfg, &peers, a.rounds, |peer, round, r| {
        eprintln!("{:<6} round {round}: {}", peer.name(), line(r));
        if let Some(p) = problems(r) {
            eprintln!("{:<6} round {round}: PROBLEM: {p}", peer.name());
            clean = false;
        }
    })?;
    for (name, s) in [("strait", &result.strait), ("qsd", &result.qsd)] {
        if let Some(s) = s {
            print_summary(name, s);
        }
    }
    if let Some(ratio) = &result.ratio {
        println!("strait / qsd:");
        for (k, v) in ratio {
            println!("  {k:<22} {v:.2}");
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    }
    Ok(clean)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("strait") {
        // The embedded `strait` command line (see the module docs).
        let cli = <strait_engine::cli::Cli as clap::Parser>::parse_from(&argv[1..]);
        return match strait_engine::run(cli) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("strait: error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("strait-bench-blk: requests failed or read back wrong data (see above)");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("strait-bench-blk: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
