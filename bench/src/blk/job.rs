//! A load job against one vhost-user-blk socket: what to run ([`JobSpec`]), where each
//! queue's rings and buffers live in guest RAM ([`QueueArea`]), and what came out
//! ([`JobResult`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::frontend::Device;
use super::guest::GuestRam;
use super::pattern::SECTOR_BYTES;
use super::procstat::{machine_busy_s, CpuClock};
use super::ring::{DriverRing, RingLayout, DESC_BYTES};
use super::worker::{QueueOutcome, Worker, DESCS_PER_REQUEST};

/// Ring size of every queue: 256 is the largest strait accepts (`MAX_QUEUE_SIZE`) and
/// qemu-storage-daemon takes up to 1024, so both get the same ring.
pub const QUEUE_SIZE: u16 = 256;
/// Most queues a job drives: strait's `MAX_QUEUES`.
pub const MAX_QUEUES: u16 = 16;
/// Largest block: 1 MiB, twice Linux's default `max_sectors_kb` of 512 KiB, and far under
/// strait's 4 MiB request limit.
pub const MAX_BLOCK_BYTES: u32 = 1 << 20;
/// Guest RAM layout unit; data buffers start on their own pages so `O_DIRECT` backends
/// never bounce them.
const PAGE_BYTES: u64 = 4096;
/// Per-slot metadata: a 16-byte header, a status byte (its own 16-byte cell) and an
/// indirect table of three descriptors.
const HEADER_CELL_BYTES: u64 = 16;
const STATUS_CELL_BYTES: u64 = 16;
const INDIRECT_TABLE_BYTES: u64 = DESC_BYTES * DESCS_PER_REQUEST as u64;

/// Most requests in flight per queue: each needs three descriptors of the ring, or one with
/// indirect descriptors.
pub fn max_iodepth(indirect: bool) -> u16 {
    if indirect {
        QUEUE_SIZE
    } else {
        QUEUE_SIZE / DESCS_PER_REQUEST
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct JobSpec {
    pub queues: u16,
    pub iodepth: u16,
    pub block_bytes: u32,
    /// Share of reads, 0..=100 (ignored in verify mode, which alternates write and read).
    pub read_pct: u8,
    pub random: bool,
    pub warmup: Duration,
    pub duration: Duration,
    /// Write-then-read-back with full comparison, on slot-owned blocks.
    pub verify: bool,
    /// Frame requests in indirect descriptor tables, as Linux guests do.
    pub indirect: bool,
    /// Busy-poll the used ring this long after the last completion before sleeping on the
    /// call eventfd.
    pub poll: Duration,
    /// Bytes of the disk the job addresses, from 0 (at most the image size).
    pub image_bytes: u64,
    /// CPUs the queue threads run on (queue `i` on `load_cpus[i % len]`); empty: anywhere.
    pub load_cpus: Vec<usize>,
    pub seed: u64,
    /// Submit at most this many requests per second, all queues together (like fio's
    /// `rate_iops`): a workload below a link's rate, to see what replication costs when
    /// the link keeps up. None: as fast as the backend completes.
    pub rate_iops: Option<u64>,
}

impl JobSpec {
    /// Checks the bounds the layout and the workers rely on.
    pub fn validate(&self) -> Result<()> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            bail!("{} queues; 1 to {MAX_QUEUES} allowed", self.queues);
        }
        let max_depth = max_iodepth(self.indirect);
        if self.iodepth == 0 || self.iodepth > max_depth {
            bail!(
                "iodepth {}; 1 to {max_depth} allowed{}",
                self.iodepth,
                if self.indirect {
                    ""
                } else {
                    " (more with --indirect)"
                }
            );
        }
        if self.block_bytes == 0
            || !u64::from(self.block_bytes).is_multiple_of(SECTOR_BYTES)
            || self.block_bytes > MAX_BLOCK_BYTES
        {
            bail!(
                "block size {} must be a multiple of {SECTOR_BYTES} up to {MAX_BLOCK_BYTES}",
                self.block_bytes
            );
        }
        if self.read_pct > 100 {
            bail!("read share {}% above 100%", self.read_pct);
        }
        let blocks = self.image_bytes / u64::from(self.block_bytes);
        let owners = u64::from(self.queues) * u64::from(self.iodepth);
        if blocks < owners.max(1) {
            bail!(
                "{} bytes of disk hold {blocks} blocks; the job needs at least {owners}",
                self.image_bytes
            );
        }
        Ok(())
    }

    /// Guest RAM the job needs.
    pub fn ram_bytes(&self) -> u64 {
        QueueArea::bytes(self) * u64::from(self.queues)
    }
}

/// Where one queue's rings, per-slot metadata and data buffers live in guest RAM.
#[derive(Debug, Clone, Copy)]
pub struct QueueArea {
    pub rings: RingLayout,
    headers: u64,
    status: u64,
    indirect: u64,
    data: u64,
    data_stride: u64,
}

impl QueueArea {
    fn meta_bytes() -> u64 {
        let slots = u64::from(QUEUE_SIZE);
        let bytes = slots * (HEADER_CELL_BYTES + STATUS_CELL_BYTES + INDIRECT_TABLE_BYTES);
        bytes.div_ceil(PAGE_BYTES) * PAGE_BYTES
    }

    fn data_stride(spec: &JobSpec) -> u64 {
        u64::from(spec.block_bytes).div_ceil(PAGE_BYTES) * PAGE_BYTES
    }

    /// Bytes one queue's area takes.
    pub fn bytes(spec: &JobSpec) -> u64 {
        RingLayout::bytes(QUEUE_SIZE)
            + Self::meta_bytes()
            + Self::data_stride(spec) * u64::from(spec.iodepth)
    }

    fn new(spec: &JobSpec, queue: u16) -> QueueArea {
        let base = Self::bytes(spec) * u64::from(queue);
        let rings = RingLayout::new(base, QUEUE_SIZE);
        let slots = u64::from(QUEUE_SIZE);
        let headers = rings.end;
        let status = headers + slots * HEADER_CELL_BYTES;
        let indirect = status + slots * STATUS_CELL_BYTES;
        QueueArea {
            rings,
            headers,
            status,
            indirect,
            data: rings.end + Self::meta_bytes(),
            data_stride: Self::data_stride(spec),
        }
    }

    pub fn header_addr(&self, slot: usize) -> u64 {
        self.headers + HEADER_CELL_BYTES * slot as u64
    }

    pub fn status_addr(&self, slot: usize) -> u64 {
        self.status + STATUS_CELL_BYTES * slot as u64
    }

    pub fn indirect_addr(&self, slot: usize) -> u64 {
        self.indirect + INDIRECT_TABLE_BYTES * slot as u64
    }

    pub fn data_addr(&self, slot: usize) -> u64 {
        self.data + self.data_stride * slot as u64
    }
}

/// What a job measured, over the measurement window only.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub iops: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub reads: u64,
    pub writes: u64,
    /// Requests the backend completed with a status other than OK.
    pub errors: u64,
    /// Used entries whose length was not data + status byte.
    pub bad_used_len: u64,
    /// Reads whose data failed the check.
    pub mismatches: u64,
    /// Reads compared byte for byte against what this job wrote (verify mode).
    pub verified_reads: u64,
    pub seconds: f64,
    /// CPU seconds the backend process used in the window (None: no process to watch).
    pub backend_cpu_s: Option<f64>,
    /// Backend CPU microseconds per completed request.
    pub backend_cpu_us_per_io: Option<f64>,
    /// CPU seconds this load generator used in the window.
    pub loader_cpu_s: f64,
    /// CPU seconds everything else on the machine used in the window (other processes,
    /// kernel threads not counted to either side): a run disturbed by others shows here.
    pub other_cpu_s: Option<f64>,
    /// Kicks the generator sent per completed request (the backend asks for them with
    /// `avail_event`; fewer means the backend was polling its ring).
    pub kicks_per_io: f64,
    /// Sleeps on the call eventfd per completed request (each costs the backend an
    /// eventfd write and the generator a wake-up).
    pub sleeps_per_io: f64,
    pub first_problem: Option<String>,
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; `cpu` is checked against the set size.
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        bail!("cpu {cpu} beyond the affinity mask");
    }
    // SAFETY: `cpu` is inside the set (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning to cpu {cpu}"));
    }
    Ok(())
}

/// Runs `spec` against the vhost-user-blk backend listening on `socket`. `backend_pid`,
/// if given, is the process whose CPU time is reported.
pub fn run_job(socket: &Path, spec: &JobSpec, backend_pid: Option<u32>) -> Result<JobResult> {
    spec.validate()?;
    let ram = Arc::new(GuestRam::new(
        usize::try_from(spec.ram_bytes()).context("guest RAM size")?,
    )?);
    let areas: Vec<QueueArea> = (0..spec.queues).map(|q| QueueArea::new(spec, q)).collect();
    let rings: Vec<DriverRing> = areas
        .iter()
        .map(|a| DriverRing::new(ram.clone(), a.rings))
        .collect();
    let layouts: Vec<RingLayout> = areas.iter().map(|a| a.rings).collect();
    let device = Device::connect(socket, &ram, &layouts, spec.indirect)?;

    let start = Instant::now();
    let mut handles = Vec::new();
    for (index, ((area, ring), fds)) in areas.into_iter().zip(rings).zip(&device.queues).enumerate()
    {
        let worker = Worker {
            index: index as u16,
            spec: spec.clone(),
            ram: ram.clone(),
            area,
            ring,
            kick: fds.kick.try_clone().context("kick eventfd")?,
            call: fds.call.try_clone().context("call eventfd")?,
            start,
        };
        let cpu =
            (!spec.load_cpus.is_empty()).then(|| spec.load_cpus[index % spec.load_cpus.len()]);
        let handle = std::thread::Builder::new()
            .name(format!("blk-load-q{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu)?;
                }
                worker.run()
            })
            .context("starting a queue thread")?;
        handles.push(handle);
    }

    let backend = backend_pid.map(CpuClock::for_pid);
    let me = CpuClock::for_pid(std::process::id());
    sleep_until(start + spec.warmup);
    let cpu_start = (backend.as_ref().map(|c| c.cpu_s()), me.cpu_s());
    let machine_start = machine_busy_s();
    sleep_until(start + spec.warmup + spec.duration);
    let cpu_end = (backend.as_ref().map(|c| c.cpu_s()), me.cpu_s());
    let machine_end = machine_busy_s();

    let mut outcomes = Vec::new();
    for (q, handle) in handles.into_iter().enumerate() {
        let outcome = handle
            .join()
            .map_err(|_| anyhow::anyhow!("queue thread {q} panicked"))??;
        outcomes.push(outcome);
    }
    // Every request has completed: the backend sees the hang-up with nothing in flight and
    // has closed its end before the caller may stop it.
    device
        .disconnect()
        .context("disconnecting from the backend")?;
    let backend_cpu_s = match cpu_start.0.zip(cpu_end.0) {
        Some((Ok(a), Ok(b))) => Some(b - a),
        Some((Err(e), _)) | Some((_, Err(e))) => return Err(e).context("backend CPU time"),
        None => None,
    };
    let loader_cpu_s = cpu_end.1? - cpu_start.1?;
    let machine_s = machine_end? - machine_start?;
    let mut r = summarise(spec, outcomes, backend_cpu_s, loader_cpu_s)?;
    // Only meaningful when the backend is another process (its CPU is then known).
    r.other_cpu_s = backend_cpu_s.map(|b| (machine_s - b - loader_cpu_s).max(0.0));
    Ok(r)
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn summarise(
    spec: &JobSpec,
    outcomes: Vec<QueueOutcome>,
    backend_cpu_s: Option<f64>,
    loader_cpu_s: f64,
) -> Result<JobResult> {
    let mut latency: Histogram<u64> =
        Histogram::new_with_bounds(1, 60_000_000_000, 3).context("latency histogram")?;
    let mut r = JobResult {
        iops: 0.0,
        mb_per_s: 0.0,
        p50_us: 0.0,
        p99_us: 0.0,
        p999_us: 0.0,
        max_us: 0.0,
        mean_us: 0.0,
        reads: 0,
        writes: 0,
        errors: 0,
        bad_used_len: 0,
        mismatches: 0,
        verified_reads: 0,
        seconds: spec.duration.as_secs_f64(),
        backend_cpu_s,
        backend_cpu_us_per_io: None,
        loader_cpu_s,
        other_cpu_s: None,
        kicks_per_io: 0.0,
        sleeps_per_io: 0.0,
        first_problem: None,
    };
    let (mut kicks, mut sleeps, mut completed) = (0u64, 0u64, 0u64);
    let mut bytes = 0u64;
    for o in outcomes {
        latency
            .add(&o.latency_ns)
            .context("merging latency histograms")?;
        r.reads += o.reads;
        r.writes += o.writes;
        r.errors += o.errors;
        r.bad_used_len += o.bad_used_len;
        r.mismatches += o.mismatches;
        r.verified_reads += o.verified_reads;
        bytes += o.bytes;
        kicks += o.kicks;
        sleeps += o.sleeps;
        completed += o.completed;
        if r.first_problem.is_none() {
            r.first_problem = o.first_problem;
        }
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let ios = r.reads + r.writes;
    r.iops = ios as f64 / r.seconds;
    r.mb_per_s = bytes as f64 / r.seconds / 1e6;
    r.p50_us = us(latency.value_at_quantile(0.5));
    r.p99_us = us(latency.value_at_quantile(0.99));
    r.p999_us = us(latency.value_at_quantile(0.999));
    r.max_us = us(latency.max());
    r.mean_us = latency.mean() / 1000.0;
    r.kicks_per_io = kicks as f64 / completed.max(1) as f64;
    r.sleeps_per_io = sleeps as f64 / completed.max(1) as f64;
    r.backend_cpu_us_per_io = backend_cpu_s
        .filter(|_| ios > 0)
        .map(|cpu| cpu * 1e6 / ios as f64);
    Ok(r)
}
