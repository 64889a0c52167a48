//! The thin runtime layer: everything the device code needs from an async runtime, and
//! nothing more.
//!
//! Device code (`queue.rs`, `device.rs`) never names glommio; it uses [`CoreExecutor`],
//! [`ImageFile`], [`Notify`], [`yield_now`] and [`spawn_local`]. glommio's last release is
//! 0.9.0 (2024) and its maintainers have asked for successors, so this module is the one
//! place to change if the runtime is replaced (for example by a hand-rolled io_uring loop).
//!
//! Decisions that live here:
//! - One glommio `LocalExecutor` per configured core, pinned to it. A virtqueue is owned by
//!   exactly one executor for its whole life, so the data path has no cross-thread state.
//! - The image is opened by each executor itself (glommio files belong to the reactor of the
//!   executor that opened them) with `O_DIRECT` where the filesystem allows it, and with
//!   buffered io_uring I/O otherwise (tmpfs before Linux 6.6, some FUSE filesystems).
//! - Kicks arrive from another thread (see `docs/architecture.md`): [`Notify`] is the bridge.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use glommio::io::{BufferedFile, DmaFile, OpenOptions};
use glommio::{LocalExecutorBuilder, Placement};

/// Size of each executor's io_uring submission ring. The deepest queue we serve is
/// [`crate::MAX_QUEUE_SIZE`] requests, and an executor may own several queues; 128 entries
/// keep a full queue in flight without glommio having to hold requests back.
const RING_DEPTH: usize = 128;

/// How long an executor spins before it parks in `io_uring_enter`. Zero: on a 2-core host
/// the VMM's vCPU threads need the CPU more than we need the few microseconds a spin saves.
/// The adaptive poll in the queue loop (see `queue.rs`) covers back-to-back requests.
const SPIN_BEFORE_PARK: Duration = Duration::ZERO;

/// Errors of the runtime layer.
#[derive(Debug, thiserror::Error)]
pub enum RtError {
    #[error("failed to start the executor for core {core}")]
    Spawn {
        core: usize,
        #[source]
        source: glommio::GlommioError<()>,
    },
    #[error("executor for core {core} panicked")]
    Panicked { core: usize },
    #[error("failed to {op} disk image {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running executor pinned to one core.
pub struct CoreExecutor {
    core: usize,
    handle: glommio::ExecutorJoinHandle<()>,
}

impl CoreExecutor {
    /// Starts a thread pinned to `core` running an executor, and runs the future made by
    /// `make` on it until that future ends.
    pub fn spawn<G, F>(core: usize, name: &str, make: G) -> Result<CoreExecutor, RtError>
    where
        G: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let handle = LocalExecutorBuilder::new(Placement::Fixed(core))
            .name(name)
            .ring_depth(RING_DEPTH)
            .spin_before_park(SPIN_BEFORE_PARK)
            .spawn(make)
            .map_err(|source| RtError::Spawn { core, source })?;
        Ok(CoreExecutor { core, handle })
    }

    /// Waits for the executor's main future to end.
    pub fn join(self) -> Result<(), RtError> {
        self.handle
            .join()
            .map_err(|_| RtError::Panicked { core: self.core })
    }
}

/// Spawns a task on the current executor. Panics if called outside one (a programming error,
/// not an input error).
pub fn spawn_local<T: 'static>(future: impl Future<Output = T> + 'static) -> Task<T> {
    Task(glommio::spawn_local(future))
}

/// A task spawned with [`spawn_local`]; awaiting it waits for its result.
pub struct Task<T>(glommio::Task<T>);

impl<T> Future for Task<T> {
    type Output = T;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// Lets other tasks on this executor run.
pub async fn yield_now() {
    YieldOnce(false).await;
}

struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// A one-slot, cross-thread notification: any thread may [`Notify::notify`]; one task on an
/// executor awaits [`Notify::notified`]. Notifications coalesce, like an eventfd in
/// semaphore-less mode: ten kicks before the task runs wake it once.
#[derive(Debug, Default)]
pub struct Notify {
    pending: AtomicBool,
    waker: AtomicWaker,
}

impl Notify {
    /// Records a notification and wakes the waiting task, wherever it runs.
    pub fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Consumes a pending notification without waiting.
    pub fn take(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    /// Waits until a notification is pending, then consumes it.
    pub fn notified(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.take() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A notify() between the first check and register() would be lost without this.
            if self.take() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// Size of the probe file [`prime_iopoll_probe`] writes: one block on any filesystem.
const PROBE_BYTES: usize = 4096;

/// Works around a glommio 0.9 flaw before an `O_DIRECT` open.
///
/// glommio decides whether a device supports polled I/O (`IORING_SETUP_IOPOLL`) by reading
/// the first block of the first file it opens on that device, and caches the answer per
/// thread. If that block is a hole (a sparse image, as `truncate` or `qemu-img create`
/// makes), ext4 answers from no device at all, the probe "succeeds", and every later read
/// of real data fails with `EOPNOTSUPP`. Opening a file whose first block is allocated first
/// makes the probe hit the device and cache the true answer. Returns false if no probe file
/// can be made next to the image, in which case the caller uses buffered I/O.
async fn prime_iopoll_probe(image: &Path) -> bool {
    use std::io::Write;
    let meta = match std::fs::metadata(image) {
        Ok(m) => m,
        Err(_) => return false,
    };
    // A block device has no holes: the probe of its first sector is a real read.
    if !meta.is_file() {
        return true;
    }
    let dir = image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(mut probe) = tempfile::Builder::new()
        .prefix(".strait-iopoll-probe")
        .tempfile_in(dir)
    else {
        tracing::info!(dir = %dir.display(), "cannot create the I/O probe file; using buffered I/O");
        return false;
    };
    if probe.write_all(&[0u8; PROBE_BYTES]).is_err() || probe.as_file().sync_all().is_err() {
        return false;
    }
    match OpenOptions::new().read(true).dma_open(probe.path()).await {
        Ok(file) => {
            let _ = file.close().await;
            true
        }
        Err(_) => false,
    }
}

/// The disk image as one executor sees it: io_uring reads and writes, `O_DIRECT` when the
/// filesystem allows it.
pub struct ImageFile {
    path: PathBuf,
    inner: Inner,
}

enum Inner {
    Direct(DmaFile),
    Buffered(BufferedFile),
}

impl ImageFile {
    /// Opens `path` on the current executor. Tries `O_DIRECT` first unless `direct` is false.
    pub async fn open(path: &Path, writable: bool, direct: bool) -> Result<ImageFile, RtError> {
        let mut options = OpenOptions::new();
        options.read(true).write(writable);
        let direct = direct && prime_iopoll_probe(path).await;
        if direct {
            match options.dma_open(path).await {
                Ok(file) => {
                    return Ok(ImageFile {
                        path: path.to_owned(),
                        inner: Inner::Direct(file),
                    })
                }
                Err(err) => {
                    tracing::info!(path = %path.display(), error = %err,
                        "O_DIRECT refused; using buffered io_uring I/O");
                }
            }
        }
        let file = options
            .buffered_open(path)
            .await
            .map_err(|err| RtError::Io {
                op: "open",
                path: path.to_owned(),
                source: err.into(),
            })?;
        Ok(ImageFile {
            path: path.to_owned(),
            inner: Inner::Buffered(file),
        })
    }

    /// Whether reads and writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        matches!(self.inner, Inner::Direct(_))
    }

    /// The offset and length alignment `O_DIRECT` requires (1 when buffered).
    pub fn alignment(&self) -> u64 {
        match &self.inner {
            Inner::Direct(file) => file.alignment(),
            Inner::Buffered(_) => 1,
        }
    }

    fn io_error(&self, op: &'static str, err: impl Into<std::io::Error>) -> RtError {
        RtError::Io {
            op,
            path: self.path.clone(),
            source: err.into(),
        }
    }

    /// Reads exactly `len` bytes at `offset` and hands them to `sink`.
    pub async fn read_at<R>(
        &self,
        offset: u64,
        len: usize,
        sink: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, RtError> {
        let result = match &self.inner {
            Inner::Direct(file) => file.read_at(offset, len).await,
            Inner::Buffered(file) => file.read_at(offset, len).await,
        }
        .map_err(|err| self.io_error("read", err))?;
        if result.len() != len {
            return Err(self.io_error(
                "read",
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read"),
            ));
        }
        Ok(sink(&result))
    }

    /// Writes `len` bytes at `offset`; `fill` fills the buffer first, and `after` sees the
    /// bytes once they are written (the capture point uses it).
    pub async fn write_at<E, A>(
        &self,
        offset: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
        after: Option<A>,
    ) -> Result<Result<(), E>, RtError>
    where
        A: FnOnce(&[u8]),
    {
        let written = match &self.inner {
            Inner::Direct(file) => {
                let mut buf = file.alloc_dma_buffer(len);
                if let Err(err) = fill(buf.as_bytes_mut()) {
                    return Ok(Err(err));
                }
                let buf = std::rc::Rc::new(buf);
                let written = file.write_rc_at(buf.clone(), offset).await;
                if let (Ok(n), Some(after)) = (&written, after) {
                    if *n == len {
                        after(&buf.as_bytes()[..len]);
                    }
                }
                written
            }
            Inner::Buffered(file) => {
                let mut buf = vec![0u8; len];
                if let Err(err) = fill(&mut buf) {
                    return Ok(Err(err));
                }
                // BufferedFile consumes its buffer; keep a copy only when someone looks.
                let copy = after.as_ref().map(|_| buf.clone());
                let written = file.write_at(buf, offset).await;
                if let (Ok(n), Some(after), Some(copy)) = (&written, after, copy) {
                    if *n == len {
                        after(&copy);
                    }
                }
                written
            }
        }
        .map_err(|err| self.io_error("write", err))?;
        if written != len {
            return Err(self.io_error(
                "write",
                std::io::Error::new(std::io::ErrorKind::WriteZero, "short write"),
            ));
        }
        Ok(Ok(()))
    }

    /// Makes every completed write durable (`fdatasync`, through io_uring).
    pub async fn fdatasync(&self) -> Result<(), RtError> {
        match &self.inner {
            Inner::Direct(file) => file.fdatasync().await,
            Inner::Buffered(file) => file.fdatasync().await,
        }
        .map_err(|err| self.io_error("fdatasync", err))
    }

    /// Punches a hole: the range reads as zeros and its blocks are freed.
    pub async fn punch_hole(&self, offset: u64, len: u64) -> Result<(), RtError> {
        match &self.inner {
            Inner::Direct(file) => file.deallocate(offset, len).await,
            Inner::Buffered(file) => file.deallocate(offset, len).await,
        }
        .map_err(|err| self.io_error("punch a hole in", err))
    }

    /// Zeroes a range, keeping it allocated (`FALLOC_FL_ZERO_RANGE`).
    ///
    /// glommio exposes no zero-range operation, so this is a synchronous `fallocate` on the
    /// executor thread: a metadata-only operation that takes microseconds on ext4 and xfs.
    pub async fn zero_range(&self, offset: u64, len: u64) -> Result<(), RtError> {
        let fd = match &self.inner {
            Inner::Direct(file) => file.as_raw_fd(),
            Inner::Buffered(file) => file.as_raw_fd(),
        };
        let (Ok(off), Ok(length)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(self.io_error(
                "zero a range of",
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        };
        // SAFETY: fallocate takes a file descriptor we own for the lifetime of `self` and
        // plain integers; it touches no memory of ours.
        let ret = unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, off, length) };
        if ret == 0 {
            Ok(())
        } else {
            Err(self.io_error("zero a range of", std::io::Error::last_os_error()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn notify_coalesces_and_crosses_threads() {
        let notify = Arc::new(Notify::default());
        let remote = notify.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let exec = CoreExecutor::spawn(0, "notify-test", move || async move {
            remote.notified().await;
            tx.send(1).ok();
            remote.notified().await;
            tx.send(2).ok();
        })
        .expect("executor starts");
        notify.notify();
        notify.notify();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(1));
        // The two notifications above coalesced into one wake-up.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        notify.notify();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(2));
        exec.join().expect("executor ends");
    }

    #[test]
    fn image_file_round_trips_through_io_uring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("image");
        let exec = CoreExecutor::spawn(0, "file-test", move || async move {
            let file = ImageFile::open(&path, true, true).await.expect("open");
            let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            let wrote = file
                .write_at(
                    4096,
                    8192,
                    |buf| {
                        buf.copy_from_slice(&pattern);
                        Ok::<(), ()>(())
                    },
                    None::<fn(&[u8])>,
                )
                .await
                .expect("write");
            assert_eq!(wrote, Ok(()));
            file.fdatasync().await.expect("sync");
            let back = file
                .read_at(4096, 8192, |d| d.to_vec())
                .await
                .expect("read");
            assert_eq!(back, pattern);
            // A large read (what a guest's 126-segment request becomes).
            let big = file.read_at(0, 516_096, |d| d.len()).await;
            assert_eq!(
                big.map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e))),
                Ok(516_096)
            );
            file.punch_hole(4096, 4096).await.expect("punch");
            let zeros = file
                .read_at(4096, 4096, |d| d.to_vec())
                .await
                .expect("read");
            assert!(zeros.iter().all(|b| *b == 0));
            file.zero_range(8192, 4096).await.expect("zero");
            let zeros = file
                .read_at(8192, 4096, |d| d.to_vec())
                .await
                .expect("read");
            assert!(zeros.iter().all(|b| *b == 0));
        })
        .expect("executor starts");
        exec.join().expect("executor ends");
    }
}
