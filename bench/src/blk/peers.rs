//! Starting the backends under test on the same image and the same CPUs: strait (`strait
//! serve`) and qemu-storage-daemon's vhost-user-blk export, each pinned with `taskset`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// How long a backend may take to create its socket. Both need well under a second.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a backend may take to exit after SIGTERM (strait flushes the image first).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    Strait,
    Qsd,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Strait => "strait",
            Peer::Qsd => "qsd",
        }
    }
}

/// qemu-storage-daemon's I/O engine for the image (`aio=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum QsdAio {
    IoUring,
    Threads,
    Native,
}

impl QsdAio {
    fn option(self) -> &'static str {
        match self {
            QsdAio::IoUring => "io_uring",
            QsdAio::Threads => "threads",
            QsdAio::Native => "native",
        }
    }
}

/// How to start the backends.
#[derive(Debug, Clone, Serialize)]
pub struct PeerConfig {
    pub image: PathBuf,
    pub queues: u16,
    /// The CPUs both backends are confined to (and strait's `--cores`).
    pub cpus: Vec<usize>,
    /// The command that is `strait` (program and leading arguments).
    pub strait: Vec<String>,
    pub qsd_aio: QsdAio,
    /// `cache.direct=on` for qsd (strait always tries `O_DIRECT`).
    pub qsd_direct: bool,
    /// Run qsd's export in an iothread (with adaptive polling, as deployed) rather than in
    /// its main loop.
    pub qsd_iothread: bool,
    /// Where sockets and logs go.
    pub dir: PathBuf,
}

/// A backend process serving the image.
pub struct RunningPeer {
    pub peer: Peer,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The command line (without `taskset`) that starts `peer`.
pub fn command_line(peer: Peer, cfg: &PeerConfig, socket: &Path) -> Vec<String> {
    let cpus = cpu_list(&cfg.cpus);
    match peer {
        Peer::Strait => {
            let mut args = cfg.strait.clone();
            args.extend([
                "serve".into(),
                "--disk".into(),
                cfg.image.display().to_string(),
                "--vhost-socket".into(),
                socket.display().to_string(),
                "--control".into(),
                socket.with_extension("ctl").display().to_string(),
                "--queues".into(),
                cfg.queues.to_string(),
                "--cores".into(),
                cpus,
            ]);
            args
        }
        Peer::Qsd => {
            let mut args = vec!["qemu-storage-daemon".to_string()];
            if cfg.qsd_iothread {
                args.extend(["--object".into(), "iothread,id=io0".into()]);
            }
            args.extend([
                "--blockdev".into(),
                format!(
                    "driver=file,filename={},node-name=d,cache.direct={},aio={}",
                    cfg.image.display(),
                    if cfg.qsd_direct { "on" } else { "off" },
                    cfg.qsd_aio.option()
                ),
                "--export".into(),
                format!(
                    "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},\
                     writable=on,num-queues={}{}",
                    socket.display(),
                    cfg.queues,
                    if cfg.qsd_iothread {
                        ",iothread=io0"
                    } else {
                        ""
                    }
                ),
            ]);
            args
        }
    }
}

impl RunningPeer {
    /// Starts `peer` pinned to `cfg.cpus` and waits until its socket exists.
    pub fn start(peer: Peer, cfg: &PeerConfig, tag: &str) -> Result<RunningPeer> {
        let socket = cfg.dir.join(format!("{}-{tag}.sock", peer.name()));
        let log = cfg.dir.join(format!("{}-{tag}.log", peer.name()));
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(socket.with_extension("ctl"));
        let args = command_line(peer, cfg, &socket);
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(cpu_list(&cfg.cpus))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("log file")?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", args.join(" ")))?;
        let mut running = RunningPeer {
            peer,
            socket,
            log,
            child: Some(child),
        };
        running.wait_for_socket()?;
        Ok(running)
    }

    fn wait_for_socket(&mut self) -> Result<()> {
        let start = Instant::now();
        while !self.socket.exists() {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("waiting for the backend")? {
                    bail!(
                        "{} exited ({status}) before listening; log {}:\n{}",
                        self.peer.name(),
                        self.log.display(),
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "{} did not create {} within {START_TIMEOUT:?}",
                    self.peer.name(),
                    self.socket.display()
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// The backend's process id (taskset execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `STOP_TIMEOUT` (10 s).
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid")?;
        // SAFETY: kill(2) with a pid of a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if child
                .try_wait()
                .context("waiting for the backend")?
                .is_some()
            {
                let _ = std::fs::remove_file(&self.socket);
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
        let hint = match self.peer {
            Peer::Qsd => {
                " (qsd 7.2 deadlocks on exit while a vhost-user client is still connected \
                 to an export in an iothread: was the frontend disconnected first?)"
            }
            Peer::Strait => "",
        };
        bail!(
            "{} ignored SIGTERM for {STOP_TIMEOUT:?}{hint}",
            self.peer.name()
        )
    }
}

impl Drop for RunningPeer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether qemu-storage-daemon is installed.
pub fn qsd_available() -> bool {
    Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
