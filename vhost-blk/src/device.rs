//! The device as the vhost-user protocol thread sees it: features, config space, memory
//! updates, kicks and ring stops. The data path lives in `queue.rs` on the executors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::bitmap::{LogBitmap, LogSwitch, RegionLog};
use crate::capture::WriteCapture;
use crate::config::{config_slice, BlkConfig, VHOST_F_LOG_ALL, WRITEBACK_OFFSET};
use crate::fence::Fence;
use crate::limits::MAX_QUEUE_SIZE;
use crate::metrics::QueueMetrics;
use crate::rt::Notify;

/// Guest memory as this backend maps it.
pub type GuestMemory = GuestMemoryMmap<LogBitmap>;
/// The shared, swappable view of guest memory (replaced on `SET_MEM_TABLE`).
pub type AtomicMemory = GuestMemoryAtomic<GuestMemory>;
/// One vring as `vhost-user-backend` keeps it.
pub type Vring = VringRwLock<AtomicMemory>;

/// The vhost-user protocol features offered: the config space (QEMU's vhost-user-blk needs
/// it), several queues, the shared dirty log (migration), acknowledged requests.
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::REPLY_ACK);

/// How long `GET_VRING_BASE` waits for a queue's in-flight requests. A request still running
/// after 30 s is stuck in the host's storage stack (Linux's own block-layer timeout is 30 s);
/// we answer the VMM anyway rather than hang it, and log the stuck queue.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the device knows about its disk, fixed at start.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub path: std::path::PathBuf,
    pub size_bytes: u64,
    pub read_only: bool,
    pub serial: [u8; crate::limits::SERIAL_BYTES],
    pub block_size: u32,
    pub direct_io: bool,
}

/// State one queue shares between the protocol thread and the executor that owns it.
pub struct QueueShared {
    pub index: u16,
    pub core: usize,
    /// Kicks forwarded from the vhost-user epoll thread; also used to wake the worker for a
    /// stop request or shutdown.
    pub kick: Notify,
    // Generation of the connection whose vring is in `vring`.
    vring_generation: AtomicU64,
    vring: Mutex<Option<Vring>>,
    // Stop handshake for GET_VRING_BASE: the protocol thread bumps `stop_requested`; the
    // worker answers by storing the same value in `stop_acked` once nothing is in flight.
    stop_requested: AtomicU64,
    stop_acked: Mutex<u64>,
    stop_cond: Condvar,
    pub metrics: QueueMetrics,
}

impl std::fmt::Debug for QueueShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueShared")
            .field("index", &self.index)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl QueueShared {
    fn new(index: u16, core: usize) -> Self {
        QueueShared {
            index,
            core,
            kick: Notify::default(),
            vring_generation: AtomicU64::new(0),
            vring: Mutex::new(None),
            stop_requested: AtomicU64::new(0),
            stop_acked: Mutex::new(0),
            stop_cond: Condvar::new(),
            metrics: QueueMetrics::default(),
        }
    }

    /// The current vring (None: no frontend), if it changed since `known_generation`.
    pub fn vring_if_newer(&self, known_generation: u64) -> Option<(u64, Option<Vring>)> {
        let generation = self.vring_generation.load(Ordering::Acquire);
        if generation == known_generation {
            return None;
        }
        let guard = self.vring.lock().unwrap_or_else(|e| e.into_inner());
        Some((generation, guard.clone()))
    }

    fn detach_vring(&self, generation: u64) {
        *self.vring.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.vring_generation.store(generation, Ordering::Release);
    }

    /// The latest stop request the worker has to answer.
    pub fn stop_requested(&self) -> u64 {
        self.stop_requested.load(Ordering::Acquire)
    }

    /// The worker: nothing of this queue is in flight as of stop request `epoch`.
    pub fn ack_stop(&self, epoch: u64) {
        let mut acked = self.stop_acked.lock().unwrap_or_else(|e| e.into_inner());
        *acked = epoch;
        self.stop_cond.notify_all();
    }

    fn request_stop_and_wait(&self) -> bool {
        let epoch = self.stop_requested.fetch_add(1, Ordering::AcqRel) + 1;
        self.kick.notify();
        let acked = self.stop_acked.lock().unwrap_or_else(|e| e.into_inner());
        let (acked, timeout) = self
            .stop_cond
            .wait_timeout_while(acked, STOP_TIMEOUT, |acked| *acked < epoch)
            .unwrap_or_else(|e| e.into_inner());
        drop(acked);
        !timeout.timed_out()
    }
}

/// State shared by the protocol thread and every executor.
pub struct DeviceShared {
    pub disk: DiskInfo,
    pub queues: Vec<Arc<QueueShared>>,
    /// The memory `vhost-user-backend` maps and swaps on each memory-table message.
    pub memory: AtomicMemory,
    /// The memory the data path uses: the same regions, published only once `update_memory`
    /// has connected their bitmaps to the log. Writing through `memory` instead would leave
    /// a window, between the swap and `update_memory`, in which backend writes to a new
    /// table's regions reach no log.
    pub guest: AtomicMemory,
    pub log: Arc<LogSwitch>,
    pub capture: OnceLock<Arc<dyn WriteCapture>>,
    /// Whether guest mutations are refused (see [`crate::fence`]).
    pub fence: Fence,
    config: Mutex<BlkConfig>,
    offered_features: u64,
    acked_features: AtomicU64,
    writeback: AtomicBool,
    event_idx: AtomicBool,
    connected: AtomicBool,
    pub shutdown: AtomicBool,
    // Bumped for every new frontend connection; queues re-attach their vrings on change.
    generation: AtomicU64,
}

impl std::fmt::Debug for DeviceShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceShared")
            .field("disk", &self.disk)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl DeviceShared {
    /// A device for `disk` with one queue per entry of `queue_cores` (the core that owns it).
    pub fn new(disk: DiskInfo, queue_cores: &[usize], fenced: bool) -> Self {
        let queues: Vec<_> = queue_cores
            .iter()
            .enumerate()
            .map(|(i, core)| Arc::new(QueueShared::new(i as u16, *core)))
            .collect();
        let num_queues = queues.len() as u16;
        DeviceShared {
            config: Mutex::new(BlkConfig::new(
                disk.size_bytes,
                disk.block_size,
                num_queues,
                true,
            )),
            offered_features: crate::config::device_features(disk.read_only, num_queues),
            disk,
            queues,
            memory: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            guest: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            log: Arc::new(LogSwitch::default()),
            capture: OnceLock::new(),
            fence: Fence::new(queue_cores.len(), fenced),
            acked_features: AtomicU64::new(0),
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            generation: AtomicU64::new(1),
        }
    }

    /// Features the driver accepted (0 before negotiation).
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Acquire)
    }

    /// Features this device offers.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Whether the guest runs the write cache in writeback mode (flushes make writes
    /// durable) rather than writethrough (every write is durable on completion).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// Whether a VMM is connected.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Called by the server when a frontend connects or leaves.
    pub fn set_connected(&self, connected: bool) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if !connected {
            // A later frontend negotiates afresh; logging never outlives its connection, and
            // no queue may pop from the departed frontend's rings.
            self.log.set(false);
            self.log.forget_log();
            self.acked_features.store(0, Ordering::Release);
            for q in &self.queues {
                q.detach_vring(generation);
                q.kick.notify();
            }
        }
        self.connected.store(connected, Ordering::Release);
    }

    /// Wakes every queue worker (for shutdown).
    pub fn wake_all(&self) {
        for q in &self.queues {
            q.kick.notify();
        }
    }
}

/// The `VhostUserBackend` the vhost-user-backend daemon drives.
#[derive(Debug, Clone)]
pub struct BlockBackend {
    pub shared: Arc<DeviceShared>,
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = LogBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.shared.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        self.shared.offered_features
    }

    fn acked_features(&self, features: u64) {
        self.shared
            .acked_features
            .store(features, Ordering::Release);
        let logging = features & (1 << VHOST_F_LOG_ALL) != 0;
        if logging != self.shared.log.is_on() {
            tracing::info!(logging, "dirty logging switched");
        }
        self.shared.log.set(logging);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        PROTOCOL_FEATURES
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.shared.config.lock().unwrap_or_else(|e| e.into_inner());
        config_slice(&config, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only `writeback` is driver-writable, and only with CONFIG_WCE (which we offer).
        if offset as usize != WRITEBACK_OFFSET || buf.len() != 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "config write of {} bytes at offset {offset}: only writeback is writable",
                    buf.len()
                ),
            ));
        }
        let writeback = buf[0] != 0;
        self.shared.writeback.store(writeback, Ordering::Release);
        self.shared
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writeback = u8::from(writeback);
        tracing::info!(writeback, "guest set the write cache mode");
        Ok(())
    }

    fn update_memory(&self, mem: AtomicMemory) -> std::io::Result<()> {
        use vhost_user_backend::bitmap::{BitmapReplace, MemRegionBitmap};
        let mem = mem.memory();
        let log = self.shared.log.current_log();
        for region in mem.iter() {
            // The region's own bitmap (the mmap's), not the borrowed slice that
            // `GuestMemoryRegion::bitmap` hands out.
            let bitmap: &LogBitmap = (**region).bitmap();
            // Every region's bitmap obeys the device's LOG_ALL switch, and a log shared
            // before this table keeps covering it.
            bitmap.attach(&self.shared.log);
            if let Some(log) = &log {
                bitmap.replace(RegionLog::new(region, log.clone())?);
            }
        }
        self.shared
            .guest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((*mem).clone());
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the epoll thread never ends and dropping the daemon at
        // disconnect (which joins it) would hang the protocol thread.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(err) => {
                tracing::error!(error = %err, "cannot create the epoll thread's exit eventfd");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let Some(queue) = self.shared.queues.get(queue_index as usize) else {
            return Ok(());
        };
        if !queue.request_stop_and_wait() {
            tracing::error!(
                queue = queue_index,
                "requests still in flight after {STOP_TIMEOUT:?}; answering GET_VRING_BASE anyway"
            );
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let index = device_event as usize;
        let (Some(queue), Some(vring)) = (self.shared.queues.get(index), vrings.get(index)) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("event for unknown queue {device_event}"),
            ));
        };
        let generation = self.shared.generation.load(Ordering::Acquire);
        if queue.vring_generation.load(Ordering::Acquire) != generation {
            *queue.vring.lock().unwrap_or_else(|e| e.into_inner()) = Some(vring.clone());
            queue.vring_generation.store(generation, Ordering::Release);
        }
        queue.kick.notify();
        Ok(())
    }
}
