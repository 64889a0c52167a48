//! The data path of one virtqueue, on the executor that owns it.
//!
//! The loop pops every available chain (with guest notifications off while it is busy),
//! validates each, and runs its I/O as a future on this core; completions are published
//! (status byte, used entry, one interrupt per batch) as they finish, so a deep queue stays
//! pipelined. The vring lock `vhost-user-backend` puts around the queue is taken once per
//! batch of pops and once per batch of completions; only the protocol thread ever contends
//! for it, on setup messages.

use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{select, Either, FutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use crate::capture::{GuestWrite, WriteCapture};
use crate::device::{DeviceShared, GuestMemory, QueueShared, Vring};
use crate::limits::{MAX_INFLIGHT_BYTES, MAX_QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE};
use crate::metrics::{ErrorKind, OpKind};
use crate::request::{Request, RequestKind, Segment};
use crate::rt::{self, ImageFile};

/// After the last request, keep polling the avail ring this long before sleeping on a kick.
/// A guest with requests in flight usually submits the next one within a few microseconds
/// of a completion; catching it by polling saves the two thread hops of the kick path
/// (vhost-user epoll thread, then executor wake-up, about 10 µs), while 20 µs of polling per
/// idle period costs under 2% of a core at 1000 idle periods per second.
const POLL_IDLE: Duration = Duration::from_micros(20);

/// The outcome of one request, ready to publish.
struct Completion {
    head: u16,
    status: Option<(GuestAddress, u8)>,
    /// Bytes the device wrote into guest buffers, excluding the status byte.
    written_len: u32,
    op: OpKind,
    bytes: u64,
    inflight_bytes: u64,
    /// The request counted in `QueueWorker::slow_inflight`.
    slow: bool,
    started: Instant,
    error: Option<ErrorKind>,
}

/// One queue's worker. Runs until the device shuts down.
pub(crate) struct QueueWorker {
    device: Arc<DeviceShared>,
    queue: Arc<QueueShared>,
    file: Rc<ImageFile>,
    vring: Option<Vring>,
    vring_generation: u64,
    stop_acked: u64,
    inflight_bytes: u64,
    // Requests in flight that may take milliseconds whatever the queue's load (flushes,
    // discards, write-zeroes); while there are any, guest notifications stay on.
    slow_inflight: usize,
    // The last walk found an avail index virtio-queue refuses (more entries than the ring
    // holds); only the guest can repair it, so the worker waits for a kick before retrying.
    ring_broken: bool,
    // Completions waiting to be published; emptied by every `publish`. At most one per
    // request in flight plus the chains one walk rejects, so it never outgrows a ring.
    done: Vec<Completion>,
    // Whether we last left guest notifications enabled on this ring; saves rewriting the
    // used flags (a guest memory write) on every walk while busy.
    notifications_on: bool,
}

impl QueueWorker {
    pub(crate) fn new(
        device: Arc<DeviceShared>,
        queue: Arc<QueueShared>,
        file: Rc<ImageFile>,
    ) -> Self {
        QueueWorker {
            device,
            queue,
            file,
            vring: None,
            vring_generation: 0,
            stop_acked: 0,
            inflight_bytes: 0,
            slow_inflight: 0,
            ring_broken: false,
            done: Vec::with_capacity(usize::from(MAX_QUEUE_SIZE)),
            notifications_on: true,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut inflight = FuturesUnordered::new();
        let mut idle_since: Option<Instant> = None;
        loop {
            // Publish whatever finished, without waiting.
            while let Some(Some(c)) = inflight.next().now_or_never() {
                self.done.push(c);
            }
            self.publish();

            if self.device.shutdown.load(Ordering::Acquire) && inflight.is_empty() {
                return;
            }
            let stop = self.queue.stop_requested();
            if stop != self.stop_acked {
                // GET_VRING_BASE: the ring is already marked not ready, so nothing new is
                // popped; finish what is in flight, then let the VMM read the ring base.
                while let Some(c) = inflight.next().await {
                    self.done.push(c);
                    self.publish();
                }
                self.stop_acked = stop;
                self.queue.ack_stop(stop);
                continue;
            }
            if let Some((generation, vring)) = self.queue.vring_if_newer(self.vring_generation) {
                self.vring_generation = generation;
                self.vring = vring;
                // A new ring starts with notifications on (used flags 0, no avail event).
                self.notifications_on = true;
            }

            let popped = self.pop(&mut inflight, execute);
            if popped > 0 {
                idle_since = None;
                continue;
            }
            if !inflight.is_empty() {
                self.wait_busy(&mut inflight).await;
                continue;
            }
            // Idle. With the in-flight budget spent or a ring virtio-queue refuses to walk
            // (only the guest can repair it, then kick), walking again at once finds nothing:
            // go straight to sleep rather than spin this core.
            let stalled = self.stalled();
            let idle = *idle_since.get_or_insert_with(Instant::now);
            if !stalled && idle.elapsed() < POLL_IDLE && self.vring.is_some() {
                // Notifications stay as the last busy period left them (off while the guest
                // was active): a guest that submits within the window costs no kick, so no
                // epoll-thread and executor wake-ups.
                rt::yield_now().await;
                continue;
            }
            // Re-enable notifications only now, then look once more: a request published
            // between our last walk and the enable would otherwise never be kicked.
            if self.reenable_notification() && !stalled {
                idle_since = None;
                continue;
            }
            self.queue.kick.notified().await;
            idle_since = None;
        }
    }

    /// Waits, with requests in flight, for a completion or a kick.
    ///
    /// Guest notifications stay off while only reads and writes are in flight: a kick would
    /// only wake the epoll thread and this executor for a ring we re-walk after every
    /// completion batch anyway. With a slow request in flight (a flush takes milliseconds on
    /// a disk) they go back on, with the usual re-check, so a request the guest submits
    /// behind it does not wait for it to finish.
    async fn wait_busy<F>(&mut self, inflight: &mut FuturesUnordered<F>)
    where
        F: Future<Output = Completion>,
    {
        if !self.notifications_on
            && self.slow_inflight > 0
            && self.reenable_notification()
            && !self.stalled()
        {
            return;
        }
        let queue = self.queue.clone();
        let kick = pin!(queue.kick.notified());
        match select(inflight.next(), kick).await {
            Either::Left((Some(c), _)) => self.done.push(c),
            Either::Left((None, _)) | Either::Right(_) => {}
        }
    }

    /// Whether walking the ring again at once is pointless: the in-flight budget is spent
    /// (only a completion frees room) or virtio-queue refuses to walk the ring (only the
    /// guest can repair it, then kick).
    fn stalled(&self) -> bool {
        self.inflight_bytes >= MAX_INFLIGHT_BYTES || self.ring_broken
    }

    /// Turns guest notifications back on before sleeping; true if a request slipped in.
    fn reenable_notification(&mut self) -> bool {
        let Some(vring) = &self.vring else {
            return false;
        };
        let mem = self.device.guest.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            return false;
        }
        self.notifications_on = true;
        state
            .get_queue_mut()
            .enable_notification(&*mem)
            .unwrap_or(false)
    }

    /// Pops and starts every available request the in-flight budget allows. `start` makes
    /// a request's future ([`execute`]); taking it as a parameter keeps the future unboxed.
    fn pop<F, S>(&mut self, inflight: &mut FuturesUnordered<F>, start: S) -> usize
    where
        S: Fn(IoContext, Ticket, Request) -> F,
    {
        let Some(vring) = self.vring.clone() else {
            return 0;
        };
        let mem = self.device.guest.memory().into_inner();
        let mut count = 0;
        {
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                return 0;
            }
            let queue = state.get_queue_mut();
            if self.notifications_on
                && queue
                    .avail_idx(&*mem, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != queue.next_avail())
            {
                // The guest is active: it need not kick while we are busy. Turned back on
                // before we sleep, or while a flush, discard or write-zeroes is in flight.
                let _ = queue.disable_notification(&*mem);
                self.notifications_on = false;
            }
            let Ok(mut iter) = queue.iter(&*mem) else {
                // A corrupt avail index: virtio-queue refuses to walk it. Treat the ring as
                // empty; the next kick retries.
                self.queue.metrics.record_error(ErrorKind::BadDescriptor);
                self.ring_broken = true;
                return 0;
            };
            self.ring_broken = false;
            // One clock read per walk: the chains of one walk are popped microseconds apart.
            let started = Instant::now();
            while self.inflight_bytes < MAX_INFLIGHT_BYTES {
                let Some(mut chain) = iter.next() else { break };
                count += 1;
                let head = chain.head_index();
                match Request::parse(&mut chain) {
                    Ok(req) => {
                        let cost = u64::from(req.data_len);
                        self.inflight_bytes += cost;
                        let slow = matches!(
                            req.kind,
                            RequestKind::Flush | RequestKind::Discard | RequestKind::WriteZeroes
                        );
                        self.slow_inflight += usize::from(slow);
                        let ctx = IoContext {
                            device: self.device.clone(),
                            queue: self.queue.index,
                            file: self.file.clone(),
                            mem: mem.clone(),
                        };
                        let ticket = Ticket {
                            head,
                            started,
                            cost,
                            slow,
                        };
                        inflight.push(start(ctx, ticket, req));
                    }
                    Err(rej) => {
                        tracing::debug!(queue = self.queue.index, head, error = %rej.error,
                            "rejected descriptor chain");
                        let (code, kind) = if rej.error.is_unsupported() {
                            (VIRTIO_BLK_S_UNSUPP, ErrorKind::Unsupported)
                        } else {
                            (VIRTIO_BLK_S_IOERR, ErrorKind::BadDescriptor)
                        };
                        self.done.push(Completion {
                            head,
                            status: rej.status.map(|a| (a, code as u8)),
                            written_len: 0,
                            op: OpKind::Other,
                            bytes: 0,
                            inflight_bytes: 0,
                            slow: false,
                            started,
                            error: Some(kind),
                        });
                    }
                }
            }
        }
        self.publish();
        count
    }

    /// Writes status bytes and used entries, then interrupts the guest once if needed.
    fn publish(&mut self) {
        if self.done.is_empty() {
            return;
        }
        // Taken out (and put back) so the loop below can update the budget; the vector keeps
        // its capacity, so publishing allocates nothing.
        let mut done = std::mem::take(&mut self.done);
        self.publish_batch(&done);
        done.clear();
        self.done = done;
    }

    fn publish_batch(&mut self, done: &[Completion]) {
        let Some(vring) = self.vring.clone() else {
            // The ring is gone (the VMM stopped or disconnected): nothing can be published,
            // but the requests are over, so their share of the in-flight budget comes back;
            // otherwise a queue that restarts after requests completed this way would find
            // its budget shrunk, and eventually stall.
            for c in done {
                self.inflight_bytes -= c.inflight_bytes;
                self.slow_inflight -= usize::from(c.slow);
            }
            return;
        };
        let mem = self.device.guest.memory();
        let metrics = &self.queue.metrics;
        // One clock read per batch, as for pops.
        let now = Instant::now();
        let mut state = vring.get_mut();
        for c in done {
            self.inflight_bytes -= c.inflight_bytes;
            self.slow_inflight -= usize::from(c.slow);
            let mut used_len = c.written_len;
            if let Some((addr, status)) = c.status {
                if mem.write_obj(status, addr).is_ok() {
                    used_len += 1;
                }
            }
            if let Err(err) = state.get_queue_mut().add_used(&*mem, c.head, used_len) {
                tracing::warn!(queue = self.queue.index, head = c.head, error = %err,
                    "cannot add used entry");
                metrics.record_error(ErrorKind::BadDescriptor);
                continue;
            }
            match c.error {
                Some(kind) => metrics.record_error(kind),
                None => {
                    let latency = now.saturating_duration_since(c.started);
                    metrics.record(c.op, c.bytes, latency.as_nanos() as u64)
                }
            }
        }
        if state
            .get_queue_mut()
            .needs_notification(&*mem)
            .unwrap_or(true)
        {
            if let Err(err) = state.signal_used_queue() {
                tracing::warn!(queue = self.queue.index, error = %err, "cannot signal the guest");
            }
        }
    }
}

/// What a request's I/O needs from its queue.
struct IoContext {
    device: Arc<DeviceShared>,
    queue: u16,
    file: Rc<ImageFile>,
    /// The memory snapshot the chain was parsed against; kept for the request's life so a
    /// memory-table change mid-request cannot unmap its buffers.
    mem: Arc<GuestMemory>,
}

/// The bookkeeping a request carries from pop to completion.
#[derive(Clone, Copy)]
struct Ticket {
    head: u16,
    started: Instant,
    /// In-flight budget bytes the request holds until it completes.
    cost: u64,
    /// Counted in `QueueWorker::slow_inflight` until it completes.
    slow: bool,
}

impl Completion {
    /// This mutation's completion, turned into a refusal: the disk was fenced while it
    /// ran.
    fn fenced(self) -> Completion {
        Completion {
            status: self
                .status
                .map(|(addr, _)| (addr, VIRTIO_BLK_S_IOERR as u8)),
            written_len: 0,
            op: OpKind::Other,
            bytes: 0,
            error: Some(ErrorKind::Fenced),
            ..self
        }
    }
}

impl Ticket {
    fn fail(self, status: GuestAddress, kind: ErrorKind) -> Completion {
        let code = if kind == ErrorKind::Unsupported {
            VIRTIO_BLK_S_UNSUPP
        } else {
            VIRTIO_BLK_S_IOERR
        };
        Completion {
            head: self.head,
            status: Some((status, code as u8)),
            written_len: 0,
            op: OpKind::Other,
            bytes: 0,
            inflight_bytes: self.cost,
            slow: self.slow,
            started: self.started,
            error: Some(kind),
        }
    }

    fn ok(self, status: GuestAddress, op: OpKind, bytes: u64, written_len: u32) -> Completion {
        Completion {
            head: self.head,
            status: Some((status, VIRTIO_BLK_S_OK as u8)),
            written_len,
            op,
            bytes,
            inflight_bytes: self.cost,
            slow: self.slow,
            started: self.started,
            error: None,
        }
    }
}

/// Runs one validated request against the image.
async fn execute(ctx: IoContext, ticket: Ticket, req: Request) -> Completion {
    let IoContext {
        device,
        queue,
        file,
        mem,
    } = ctx;
    let capacity_sectors = device.disk.size_bytes >> SECTOR_SHIFT;
    let fail = |kind| ticket.fail(req.status, kind);
    if req.kind.is_mutation() && device.disk.read_only {
        return fail(ErrorKind::ReadOnly);
    }
    if !req.check_range(capacity_sectors) {
        return fail(ErrorKind::OutOfRange);
    }
    // Counted in (on this queue's own counter) before the fence is looked at; out once
    // the mutation is captured.
    let entered = if req.kind.is_mutation() {
        match device.fence.enter(queue) {
            Some(entered) => Some(entered),
            None => return fail(ErrorKind::Fenced),
        }
    } else {
        None
    };
    let ok = |op, bytes: u64, written_len| ticket.ok(req.status, op, bytes, written_len);
    let capture = device.capture.get();
    let result = match req.kind {
        RequestKind::Read => read(&file, &mem, &req)
            .await
            .map(|()| ok(OpKind::Read, u64::from(req.data_len), req.data_len)),
        RequestKind::Write => write(&device, capture, &file, &mem, &req, queue)
            .await
            .map(|()| ok(OpKind::Write, u64::from(req.data_len), 0)),
        RequestKind::Flush => match file.fdatasync().await {
            Ok(()) => {
                if let Some(c) = capture {
                    c.capture(queue, GuestWrite::Flush);
                }
                Ok(ok(OpKind::Flush, 0, 0))
            }
            Err(err) => Err(err),
        },
        RequestKind::GetId => {
            let written = copy_to_guest(&mem, &req.segments, &device.disk.serial);
            match written {
                Some(n) => Ok(ok(OpKind::GetId, 0, n)),
                None => return fail(ErrorKind::BadDescriptor),
            }
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            discard(capture, &file, &req, queue).await.map(|bytes| {
                let op = if req.kind == RequestKind::Discard {
                    OpKind::Discard
                } else {
                    OpKind::WriteZeroes
                };
                ok(op, bytes, 0)
            })
        }
        RequestKind::Unsupported(_) => return fail(ErrorKind::Unsupported),
    };
    // Applied and captured: a fence waiting for this mutation may complete now.
    drop(entered);
    if req.kind == RequestKind::Write && result.is_ok() {
        hold_completion(capture, queue, req.data_len).await;
    }
    match result {
        // Fenced while it ran: not acknowledged (see `crate::fence`).
        Ok(c) if req.kind.is_mutation() && device.fence.is_fenced() => c.fenced(),
        Ok(c) => c,
        Err(err) => {
            tracing::warn!(queue, sector = req.sector, error = ?err, "request failed");
            fail(ErrorKind::Io)
        }
    }
}

/// Holds a captured write's completion as long as the capture asks (back-pressure when
/// replication drains slower than the guest writes). The request keeps its in-flight slot
/// meanwhile, which is what slows a guest that waits for its writes.
async fn hold_completion(capture: Option<&Arc<dyn WriteCapture>>, queue: u16, bytes: u32) {
    let Some(c) = capture else {
        return;
    };
    let delay = c.completion_delay(queue, u64::from(bytes));
    if !delay.is_zero() {
        glommio::timer::sleep(delay).await;
    }
}

/// Copies `data` into the guest segments in order; returns the bytes written, or None if the
/// guest memory vanished under us (a memory-table change mid-request).
fn copy_to_guest(mem: &GuestMemory, segments: &[Segment], data: &[u8]) -> Option<u32> {
    let mut at = 0usize;
    for seg in segments {
        if at >= data.len() {
            break;
        }
        let n = (seg.len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], seg.addr).ok()?;
        at += n;
    }
    Some(at as u32)
}

async fn read(file: &ImageFile, mem: &GuestMemory, req: &Request) -> Result<(), rt::RtError> {
    let offset = req.sector * SECTOR_SIZE; // bounded by check_range
    let copied = file
        .read_at(offset, req.data_len as usize, |data| {
            copy_to_guest(mem, &req.segments, data)
        })
        .await?;
    copied.map(|_| ()).ok_or_else(guest_memory_gone)
}

fn guest_memory_gone() -> rt::RtError {
    rt::RtError::Io {
        op: "copy guest data for",
        path: std::path::PathBuf::from("guest memory"),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "guest memory changed"),
    }
}

async fn write(
    device: &DeviceShared,
    capture: Option<&Arc<dyn WriteCapture>>,
    file: &ImageFile,
    mem: &GuestMemory,
    req: &Request,
    queue: u16,
) -> Result<(), rt::RtError> {
    let offset = req.sector * SECTOR_SIZE; // bounded by check_range
    let len = req.data_len as usize;
    let filled = file
        .write_at(
            offset,
            len,
            |buf| {
                let mut at = 0usize;
                for seg in &req.segments {
                    let end = at + seg.len as usize;
                    mem.read_slice(&mut buf[at..end], seg.addr)?;
                    at = end;
                }
                Ok::<(), vm_memory::GuestMemoryError>(())
            },
            capture.map(|c| move |data: &[u8]| c.capture(queue, GuestWrite::Data { offset, data })),
        )
        .await?;
    filled.map_err(|_| guest_memory_gone())?;
    if !device.writeback() {
        // Writethrough: the guest expects the write durable on completion.
        file.fdatasync().await?;
    }
    Ok(())
}

async fn discard(
    capture: Option<&Arc<dyn WriteCapture>>,
    file: &ImageFile,
    req: &Request,
    queue: u16,
) -> Result<u64, rt::RtError> {
    let mut bytes = 0;
    for range in &req.ranges {
        let offset = range.sector * SECTOR_SIZE; // bounded by check_range
        let len = u64::from(range.num_sectors) * SECTOR_SIZE;
        if len == 0 {
            continue;
        }
        let event = if req.kind == RequestKind::Discard || range.unmap {
            file.punch_hole(offset, len).await?;
            if req.kind == RequestKind::Discard {
                GuestWrite::Discard { offset, len }
            } else {
                GuestWrite::Zeroes { offset, len }
            }
        } else {
            file.zero_range(offset, len).await?;
            GuestWrite::Zeroes { offset, len }
        };
        if let Some(c) = capture {
            c.capture(queue, event);
        }
        bytes += len;
    }
    Ok(bytes)
}
