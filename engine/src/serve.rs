//! `strait serve`: one disk to one VMM, with the control API beside it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use signal_hook::consts::{SIGINT, SIGTERM};
use strait_vhost_blk::{Backend, BackendConfig, QueueSnapshot, QueueStats};

use crate::cli::ServeArgs;
use crate::control::{ControlError, ControlServer, Handler, API_VERSION};

/// What can stop `strait serve` from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("disk image {0} does not exist")]
    MissingDisk(PathBuf),
    #[error("core {core} does not exist: this machine has cores 0 to {last}")]
    NoSuchCore { core: usize, last: usize },
    #[error(transparent)]
    Backend(#[from] strait_vhost_blk::ServerError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot install the SIGTERM/SIGINT handler")]
    Signals(#[source] std::io::Error),
}

/// A running `strait serve`: the block backend and its control server.
pub struct Server {
    backend: Arc<Backend>,
    control: Option<ControlServer>,
}

impl Server {
    /// Starts the backend and the control API.
    pub fn start(args: &ServeArgs) -> Result<Server, ServeError> {
        if !args.disk.exists() {
            return Err(ServeError::MissingDisk(args.disk.clone()));
        }
        let cores = args.cores.clone().map_or_else(|| vec![0], |c| c.0);
        let online = online_cores();
        if let Some(&core) = cores.iter().find(|c| **c >= online) {
            return Err(ServeError::NoSuchCore {
                core,
                last: online.saturating_sub(1),
            });
        }
        let backend = Arc::new(Backend::start(BackendConfig {
            disk: args.disk.clone(),
            socket: args.vhost_socket.clone(),
            queues: args.queues,
            cores,
            read_only: args.read_only,
            serial: args.serial.clone(),
            direct_io: true,
        })?);
        let handler = Arc::new(EngineHandler {
            backend: backend.clone(),
            last_stats: Mutex::new(None),
        });
        let control = match ControlServer::start(&args.control, handler) {
            Ok(c) => c,
            Err(err) => {
                // Do not leave a half-started backend behind.
                if let Ok(backend) = Arc::try_unwrap(backend) {
                    let _ = backend.shutdown();
                }
                return Err(err.into());
            }
        };
        Ok(Server {
            backend,
            control: Some(control),
        })
    }

    /// Stops the control API, disconnects the VMM, flushes the image.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(control) = self.control.take() {
            control.shutdown();
        }
        match Arc::try_unwrap(self.backend) {
            Ok(backend) => backend.shutdown()?,
            // Still referenced by a handler being torn down: Drop stops it.
            Err(_) => tracing::warn!("backend still referenced at shutdown"),
        }
        Ok(())
    }
}

fn online_cores() -> usize {
    // SAFETY: sysconf reads a system constant and has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Runs `strait serve` until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    crate::init_logging();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    let server = Server::start(&args)?;
    tracing::info!(control = %args.control.display(), "ready");
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "stopping");
    }
    server.shutdown()?;
    tracing::info!("stopped; image flushed");
    Ok(())
}

struct EngineHandler {
    backend: Arc<Backend>,
    // The previous `stats` answer, to turn counters into rates over the interval between
    // two calls.
    last_stats: Mutex<Option<(Instant, Vec<QueueStats>)>>,
}

impl Handler for EngineHandler {
    fn status(&self) -> Value {
        let s = self.backend.status();
        json!({
            "engine_version": env!("CARGO_PKG_VERSION"),
            "api_version": API_VERSION,
            "disk": {
                "path": s.path,
                "size_bytes": s.size_bytes,
                "read_only": s.read_only,
                "block_size_bytes": s.block_size_bytes,
                "direct_io": s.direct_io,
                "serial": s.serial,
            },
            "queues": s.queues,
            "queue_size": s.queue_size,
            "cores": s.cores,
            "vmm_connected": s.vmm_connected,
            "features": {
                "offered": s.offered_features,
                "acked": s.acked_features,
                "protocol": s.protocol_features,
                "dirty_logging": s.dirty_logging,
                "writeback": s.writeback,
            },
            "uptime_s": s.uptime_s,
        })
    }

    fn stats(&self) -> Value {
        let now = Instant::now();
        let current = self.backend.stats();
        let uptime_s = self.backend.status().uptime_s;
        let mut last = self.last_stats.lock().unwrap_or_else(|e| e.into_inner());
        let (interval_s, previous) = match last.as_ref() {
            Some((at, prev)) => (now.duration_since(*at).as_secs_f64(), Some(prev.clone())),
            None => (uptime_s, None),
        };
        let empty = QueueSnapshot::default();
        let mut queues = Vec::new();
        let mut total = QueueSnapshot::default();
        let mut total_prev = QueueSnapshot::default();
        for q in &current {
            let prev = previous
                .as_ref()
                .and_then(|p| p.iter().find(|x| x.index == q.index))
                .map(|x| &x.counters)
                .unwrap_or(&empty);
            let mut entry = queue_json(&q.counters, prev, interval_s);
            entry["index"] = json!(q.index);
            entry["core"] = json!(q.core);
            queues.push(entry);
            total.add(&q.counters);
            total_prev.add(prev);
        }
        *last = Some((now, current));
        json!({
            "uptime_s": uptime_s,
            "interval_s": interval_s,
            "queues": queues,
            "totals": queue_json(&total, &total_prev, interval_s),
        })
    }
}

/// One queue's figures: counters since start, rates and latency over the interval.
fn queue_json(now: &QueueSnapshot, before: &QueueSnapshot, interval_s: f64) -> Value {
    let rate = |a: u64, b: u64| {
        if interval_s > 0.0 {
            a.saturating_sub(b) as f64 / interval_s
        } else {
            0.0
        }
    };
    let window = now.latency.since(&before.latency);
    let us = |q: f64| window.quantile_ns(q) / 1_000;
    json!({
        "requests": now.requests,
        "reads": now.reads,
        "writes": now.writes,
        "flushes": now.flushes,
        "discards": now.discards,
        "write_zeroes": now.write_zeroes,
        "get_id": now.get_id,
        "bytes_read": now.bytes_read,
        "bytes_written": now.bytes_written,
        "iops": rate(now.requests, before.requests),
        "read_bytes_per_s": rate(now.bytes_read, before.bytes_read),
        "write_bytes_per_s": rate(now.bytes_written, before.bytes_written),
        "latency_us": {
            "p50": us(0.5),
            "p90": us(0.9),
            "p99": us(0.99),
            "p999": us(0.999),
            "max": now.latency.max_ns() / 1_000,
        },
        "errors": now.errors,
    })
}
