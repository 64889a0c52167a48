//! Starting, serving and stopping one block device: the executors, the vhost-user socket and
//! its protocol thread.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;

use crate::capture::WriteCapture;
use crate::config::feature_names;
use crate::device::{BlockBackend, DeviceShared, DiskInfo};
use crate::limits::{MAX_QUEUES, SECTOR_SIZE, SERIAL_BYTES};
use crate::metrics::QueueSnapshot;
use crate::queue::QueueWorker;
use crate::rt::{self, CoreExecutor, ImageFile};

/// How often the protocol thread looks at the stop flag while no VMM is connected. Bounds
/// how long `shutdown` waits for an idle listener.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// How long start-up waits for every executor to open the image. Opening is one `open(2)`;
/// 10 s only trips on a hung filesystem.
const EXECUTOR_START_TIMEOUT: Duration = Duration::from_secs(10);

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The image (a regular file or a block device).
    pub disk: PathBuf,
    /// The vhost-user socket to create.
    pub socket: PathBuf,
    /// Number of virtqueues (1..=[`MAX_QUEUES`]).
    pub queues: u16,
    /// Cores to run an executor on; queue `i` goes to `cores[i % cores.len()]`.
    pub cores: Vec<usize>,
    /// Refuse guest writes and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// `GET_ID` answer (truncated to 20 bytes); derived from the image if None.
    pub serial: Option<String>,
    /// Try `O_DIRECT` (falls back to buffered I/O where the filesystem refuses it).
    pub direct_io: bool,
    /// Start fenced: guest mutations are refused until [`Backend::unfence`] (a replica
    /// that is not yet promoted).
    pub fenced: bool,
}

/// What can go wrong starting or running the backend.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("disk image {path} cannot be used")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is not a regular file or block device")]
    DiskKind { path: PathBuf },
    #[error("disk image {path} is smaller than one 512-byte sector")]
    DiskEmpty { path: PathBuf },
    #[error("{queues} queues requested; between 1 and {MAX_QUEUES} are allowed")]
    Queues { queues: u16 },
    #[error("no cores given")]
    NoCores,
    #[error("vhost-user socket {path} is in use by another process")]
    SocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    SocketNotSocket { path: PathBuf },
    #[error("cannot create vhost-user socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] rt::RtError),
    #[error("executor for core {core} did not start within {EXECUTOR_START_TIMEOUT:?}")]
    ExecutorStart { core: usize },
    #[error("cannot start the vhost-user protocol thread")]
    Thread(#[source] std::io::Error),
    #[error("a write capture is already attached")]
    CaptureAttached,
    #[error("vhost-user protocol thread panicked")]
    ProtocolPanicked,
}

/// The running backend.
pub struct Backend {
    shared: Arc<DeviceShared>,
    config: BackendConfig,
    started: Instant,
    executors: Vec<CoreExecutor>,
    protocol: Option<JoinHandle<()>>,
    connection: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
}

/// Static facts about the served disk and the live negotiation, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub read_only: bool,
    /// Guest mutations are refused (see [`Backend::fence`]).
    pub fenced: bool,
    pub block_size_bytes: u32,
    pub direct_io: bool,
    pub serial: String,
    pub queues: u16,
    pub queue_size: u16,
    pub cores: Vec<usize>,
    pub vmm_connected: bool,
    pub offered_features: Vec<&'static str>,
    pub acked_features: Vec<&'static str>,
    pub protocol_features: Vec<&'static str>,
    pub dirty_logging: bool,
    pub writeback: bool,
    pub uptime_s: f64,
}

/// One queue's counters with the core that owns it.
#[derive(Debug, Clone)]
pub struct QueueStats {
    pub index: u16,
    pub core: usize,
    pub counters: QueueSnapshot,
}

impl Backend {
    /// Validates the configuration, opens the image on every core, binds the socket and
    /// starts serving. Returns once a VMM can connect.
    pub fn start(config: BackendConfig) -> Result<Backend, ServerError> {
        if config.queues == 0 || config.queues > MAX_QUEUES {
            return Err(ServerError::Queues {
                queues: config.queues,
            });
        }
        if config.cores.is_empty() {
            return Err(ServerError::NoCores);
        }
        let (size_bytes, default_serial) = inspect_disk(&config.disk)?;
        let listener = bind_socket(&config.socket)?;

        let queue_cores: Vec<usize> = (0..config.queues as usize)
            .map(|i| config.cores[i % config.cores.len()])
            .collect();
        let (executors, share_txs, info) = start_executors(&config)?;

        let mut serial = [0u8; SERIAL_BYTES];
        let text = config.serial.clone().unwrap_or(default_serial);
        let n = text.len().min(SERIAL_BYTES);
        serial[..n].copy_from_slice(&text.as_bytes()[..n]);
        let disk = DiskInfo {
            path: config.disk.clone(),
            size_bytes: size_bytes - size_bytes % SECTOR_SIZE,
            read_only: config.read_only,
            serial,
            // virtio-blk needs at least a sector; O_DIRECT may need more.
            block_size: info.alignment.clamp(SECTOR_SIZE, 4096) as u32,
            direct_io: info.direct,
        };
        let shared = Arc::new(DeviceShared::new(disk, &queue_cores, config.fenced));
        for tx in share_txs {
            // An executor that died after opening the image reports through join().
            let _ = tx.send(shared.clone());
        }

        let connection = Arc::new(Mutex::new(None));
        let protocol = {
            let shared = shared.clone();
            let connection = connection.clone();
            std::thread::Builder::new()
                .name("strait-vhost-user".into())
                .spawn(move || serve_connections(listener, shared, connection))
                .map_err(ServerError::Thread)?
        };
        tracing::info!(disk = %config.disk.display(), size_bytes, queues = config.queues,
            cores = ?config.cores, direct_io = info.direct, socket = %config.socket.display(),
            "serving");
        Ok(Backend {
            shared,
            config,
            started: Instant::now(),
            executors,
            protocol: Some(protocol),
            connection,
        })
    }

    /// Fences the disk: from now on no guest write, discard or write-zeroes is applied or
    /// acknowledged (they fail with an I/O error; reads and flushes go on). Returns once
    /// the mutations in flight are done, at most `timeout` later (see `crate::fence`).
    pub fn fence(&self, timeout: std::time::Duration) -> Result<(), crate::FenceTimeout> {
        let result = self.shared.fence.fence(timeout);
        tracing::warn!(disk = %self.config.disk.display(), "disk fenced: guest writes are refused");
        result
    }

    /// Lifts the fence: guest writes are applied again.
    pub fn unfence(&self) {
        self.shared.fence.lift();
        tracing::info!(disk = %self.config.disk.display(), "fence lifted: guest writes are applied");
    }

    /// Whether the disk is fenced.
    pub fn is_fenced(&self) -> bool {
        self.shared.fence.is_fenced()
    }

    /// Attaches the write capture. Only one may be attached, once.
    pub fn set_capture(&self, capture: Arc<dyn WriteCapture>) -> Result<(), ServerError> {
        self.shared
            .capture
            .set(capture)
            .map_err(|_| ServerError::CaptureAttached)
    }

    /// The disk, queues and negotiated features.
    pub fn status(&self) -> DeviceStatus {
        let s = &self.shared;
        let serial_len = s
            .disk
            .serial
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(SERIAL_BYTES);
        DeviceStatus {
            path: s.disk.path.clone(),
            size_bytes: s.disk.size_bytes,
            read_only: s.disk.read_only,
            fenced: s.fence.is_fenced(),
            block_size_bytes: s.disk.block_size,
            direct_io: s.disk.direct_io,
            serial: String::from_utf8_lossy(&s.disk.serial[..serial_len]).into_owned(),
            queues: s.queues.len() as u16,
            queue_size: crate::limits::MAX_QUEUE_SIZE,
            cores: self.config.cores.clone(),
            vmm_connected: s.connected(),
            offered_features: feature_names(s.offered_features()),
            acked_features: feature_names(s.acked_features()),
            protocol_features: crate::device::PROTOCOL_FEATURES
                .iter_names()
                .map(|(name, _)| name)
                .collect(),
            dirty_logging: s.log.is_on(),
            writeback: s.writeback(),
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Every queue's counters.
    pub fn stats(&self) -> Vec<QueueStats> {
        self.shared
            .queues
            .iter()
            .map(|q| QueueStats {
                index: q.index,
                core: q.core,
                counters: q.metrics.snapshot(),
            })
            .collect()
    }

    /// Disconnects the VMM, finishes in-flight requests, flushes the image and stops.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ServerError> {
        self.shared.shutdown.store(true, Ordering::Release);
        if let Some(handle) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            handle.shutdown();
        }
        let mut result = Ok(());
        if let Some(protocol) = self.protocol.take() {
            if protocol.join().is_err() {
                result = Err(ServerError::ProtocolPanicked);
            }
        }
        self.shared.wake_all();
        for exec in self.executors.drain(..) {
            if let Err(err) = exec.join() {
                result = Err(err.into());
            }
        }
        let _ = std::fs::remove_file(&self.config.socket);
        result
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.protocol.is_some() || !self.executors.is_empty() {
            if let Err(err) = self.stop() {
                tracing::error!(error = %err, "backend stopped with an error");
            }
        }
    }
}

/// Size of the image and a default serial derived from its identity.
fn inspect_disk(path: &Path) -> Result<(u64, String), ServerError> {
    let disk_err = |source| ServerError::Disk {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(disk_err)?;
    let size = if meta.file_type().is_block_device() {
        use std::io::Seek;
        let mut f = std::fs::File::open(path).map_err(disk_err)?;
        f.seek(std::io::SeekFrom::End(0)).map_err(disk_err)?
    } else if meta.is_file() {
        meta.len()
    } else {
        return Err(ServerError::DiskKind {
            path: path.to_owned(),
        });
    };
    if size < SECTOR_SIZE {
        return Err(ServerError::DiskEmpty {
            path: path.to_owned(),
        });
    }
    let serial = format!("strait-{:x}", meta.dev() ^ meta.ino().rotate_left(17));
    Ok((size, serial))
}

/// Binds the vhost-user socket, replacing a stale socket file nobody listens on.
fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::SocketNotSocket {
                path: path.to_owned(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::SocketInUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(|source| ServerError::Socket {
            path: path.to_owned(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| ServerError::Socket {
        path: path.to_owned(),
        source,
    })
}

struct OpenedInfo {
    direct: bool,
    alignment: u64,
}

type ShareSender = mpsc::Sender<Arc<DeviceShared>>;

/// Starts one executor per core; each opens the image and waits for the device.
fn start_executors(
    config: &BackendConfig,
) -> Result<(Vec<CoreExecutor>, Vec<ShareSender>, OpenedInfo), ServerError> {
    let (info_tx, info_rx) = mpsc::channel();
    let mut executors = Vec::new();
    let mut share_txs = Vec::new();
    let cores = config.cores.len();
    for (slot, &core) in config.cores.iter().enumerate() {
        let (share_tx, share_rx) = mpsc::channel::<Arc<DeviceShared>>();
        share_txs.push(share_tx);
        let info_tx = info_tx.clone();
        let path = config.disk.clone();
        let writable = !config.read_only;
        let direct = config.direct_io;
        let exec = CoreExecutor::spawn(core, &format!("strait-core{core}"), move || async move {
            let file = match ImageFile::open(&path, writable, direct).await {
                Ok(f) => f,
                Err(err) => {
                    let _ = info_tx.send(Err(err));
                    return;
                }
            };
            let _ = info_tx.send(Ok(OpenedInfo {
                direct: file.is_direct(),
                alignment: file.alignment(),
            }));
            // Start-up only: nothing else runs on this executor yet.
            let Ok(shared) = share_rx.recv() else { return };
            run_core(shared, slot, cores, file).await;
        })?;
        executors.push(exec);
    }
    drop(info_tx);
    let mut first = None;
    for &core in &config.cores {
        match info_rx.recv_timeout(EXECUTOR_START_TIMEOUT) {
            Ok(Ok(info)) => {
                first.get_or_insert(info);
            }
            Ok(Err(err)) => return Err(err.into()),
            Err(_) => return Err(ServerError::ExecutorStart { core }),
        }
    }
    let info = first.ok_or(ServerError::NoCores)?;
    Ok((executors, share_txs, info))
}

/// The main future of one core: run the workers of the queues this core owns, then make the
/// image durable.
async fn run_core(shared: Arc<DeviceShared>, slot: usize, cores: usize, file: ImageFile) {
    let file = Rc::new(file);
    let mut tasks = Vec::new();
    for queue in &shared.queues {
        if queue.index as usize % cores == slot {
            let worker = QueueWorker::new(shared.clone(), queue.clone(), file.clone());
            tasks.push(rt::spawn_local(worker.run()));
        }
    }
    for task in tasks {
        task.await;
    }
    if !shared.disk.read_only {
        if let Err(err) = file.fdatasync().await {
            tracing::error!(error = %err, "final flush failed");
        }
    }
}

/// The protocol thread: one VMM connection at a time, until shutdown.
fn serve_connections(
    listener: UnixListener,
    shared: Arc<DeviceShared>,
    connection: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
) {
    let mut listener = Listener::from(listener);
    while !shared.shutdown.load(Ordering::Acquire) {
        if !wait_readable(listener.as_raw_fd(), ACCEPT_POLL) {
            continue;
        }
        let backend = BlockBackend {
            shared: shared.clone(),
        };
        let mut daemon = match VhostUserDaemon::new(
            "strait-vhost-blk".to_string(),
            backend,
            shared.memory.clone(),
        ) {
            Ok(d) => d,
            Err(err) => {
                tracing::error!(error = %err, "cannot create the vhost-user daemon");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        if let Err(err) = daemon.start(&mut listener) {
            tracing::warn!(error = %err, "vhost-user accept failed");
            continue;
        }
        shared.set_connected(true);
        *connection.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        tracing::info!("VMM connected");
        if shared.shutdown.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => tracing::info!("VMM disconnected"),
            Err(err) => tracing::warn!(error = %err, "VMM connection ended with an error"),
        }
        connection.lock().unwrap_or_else(|e| e.into_inner()).take();
        shared.set_connected(false);
    }
}

/// poll(2) for readability with a timeout.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass a count of 1.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    ret > 0 && pfd.revents & libc::POLLIN != 0
}
