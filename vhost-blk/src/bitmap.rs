//! The vhost-user dirty log, as seen by guest memory writes.
//!
//! vm-memory marks a region's bitmap on every write made through `GuestMemory` (read data,
//! status bytes, used-ring entries: all of this backend's writes go through it, none through
//! raw pointers). `vhost-user-backend` provides `BitmapMmapRegion`, which writes into the
//! log the frontend shares with `SET_LOG_BASE`, but it keeps logging after the frontend
//! switches `VHOST_F_LOG_ALL` off (a failed or cancelled migration) and takes a lock on
//! every write even when no log is set.
//!
//! [`LogBitmap`] wraps it with a per-device switch: the device turns logging on and off from
//! the negotiated features, and a write with logging off costs two relaxed atomic loads.
//!
//! `vhost-user-backend` also forgets the log when the frontend sends a new memory table
//! (`SET_MEM_TABLE`, `ADD_MEM_REGION`) after `SET_LOG_BASE`: the new regions get fresh,
//! empty bitmaps, and a VMM only resends the log when it must grow. The switch therefore
//! remembers the current log ([`RegionLog`] carries it to us on `SET_LOG_BASE`) and the
//! device re-applies it to every region of each new table (`device.rs`, `update_memory`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vhost_user_backend::bitmap::{
    AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace, MemRegionBitmap, MmapLogReg,
};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::GuestMemoryRegion;

/// The device-wide switch: is `VHOST_F_LOG_ALL` negotiated right now, and which log did the
/// frontend share last?
#[derive(Debug, Default)]
pub struct LogSwitch {
    on: AtomicBool,
    log: Mutex<Option<Arc<MmapLogReg>>>,
}

impl LogSwitch {
    /// Turns logging on or off.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Release);
    }

    /// Whether logging is on.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    fn remember(&self, log: &Arc<MmapLogReg>) {
        let mut slot = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, log)) {
            *slot = Some(log.clone());
        }
    }

    /// The log the frontend shared last, if any.
    pub fn current_log(&self) -> Option<Arc<MmapLogReg>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets the log (the frontend left; its log memory is not ours to keep writing).
    pub fn forget_log(&self) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// One region's view of the shared log, and the log itself so the device can re-apply it.
#[derive(Debug)]
pub struct RegionLog {
    log: Arc<MmapLogReg>,
    inner: AtomicBitmapMmap,
}

impl MemRegionBitmap for RegionLog {
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> io::Result<Self> {
        // AtomicBitmapMmap checks that the log covers the whole region.
        Ok(RegionLog {
            inner: AtomicBitmapMmap::new(region, logmem.clone())?,
            log: logmem,
        })
    }
}

/// The bitmap type of the guest memory this backend maps.
#[derive(Debug, Clone, Default)]
pub struct LogBitmap {
    inner: BitmapMmapRegion,
    // Shared by a region's bitmap and every slice of it; set once, when the device learns
    // about the region (`update_memory`). Regions it was never attached to do not log.
    switch: Arc<OnceLock<Arc<LogSwitch>>>,
}

impl LogBitmap {
    /// Connects this region's bitmap to the device's switch.
    pub fn attach(&self, switch: &Arc<LogSwitch>) {
        // A region is attached once per memory table; a second attach (same device) is
        // harmless, and the first switch stays.
        let _ = self.switch.set(switch.clone());
    }

    fn logging(&self) -> bool {
        self.switch.get().is_some_and(|s| s.is_on())
    }
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.logging() {
            self.inner.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.inner.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

// vm-memory makes a bitmap slice for every guest memory access (each ring index, descriptor,
// status byte and data copy). A slice that borrows the region's bitmap costs nothing; an
// owned one (as `BitmapMmapRegion` makes) clones two `Arc`s and drops them again, four
// atomic read-modify-writes per access on the data path. Offsets stay region-relative either
// way, so the same bits are marked.
impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = RefSlice<'a, LogBitmap>;
}

impl NewBitmap for LogBitmap {
    fn with_len(len: usize) -> Self {
        LogBitmap {
            inner: BitmapMmapRegion::with_len(len),
            switch: Arc::default(),
        }
    }
}

impl BitmapReplace for LogBitmap {
    type InnerBitmap = RegionLog;

    fn replace(&self, bitmap: RegionLog) {
        if let Some(switch) = self.switch.get() {
            switch.remember(&bitmap.log);
        }
        self.inner.replace(bitmap.inner);
    }
}
