//! The driver side of one split virtqueue (virtio 1.2, 2.7), written straight into guest
//! RAM with the memory ordering a guest driver uses, and with `VIRTIO_RING_F_EVENT_IDX`
//! (both backends offer it, and Linux guests use it).
//!
//! Layout from `base` (all 4 KiB aligned by [`RingLayout`]): the descriptor table, the
//! avail ring, then the used ring on its own page. virtio-queue's mock rings are not used:
//! their layout helper places the used ring inside the avail ring (see
//! `vhost-blk/tests/common/mod.rs`), and their bounds-checked accessors would cost the load
//! generator more CPU than the backend it measures.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::guest::GuestRam;

/// Descriptor flags (virtio 1.2, 2.7.5).
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
/// Bytes of one descriptor.
pub const DESC_BYTES: u64 = 16;
const PAGE_BYTES: u64 = 4096;

/// Where one queue's rings live in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct RingLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// First byte after the rings (page aligned).
    pub end: u64,
}

impl RingLayout {
    /// Rings for `size` entries starting at page-aligned `base`.
    pub fn new(base: u64, size: u16) -> RingLayout {
        assert!(base.is_multiple_of(PAGE_BYTES) && size.is_power_of_two());
        let n = u64::from(size);
        let desc = base;
        let avail = desc + DESC_BYTES * n;
        // flags, idx, ring[n], used_event
        let avail_bytes = 4 + 2 * n + 2;
        let used = (avail + avail_bytes).div_ceil(PAGE_BYTES) * PAGE_BYTES;
        // flags, idx, ring[n] of {id, len}, avail_event
        let used_bytes = 4 + 8 * n + 2;
        let end = (used + used_bytes).div_ceil(PAGE_BYTES) * PAGE_BYTES;
        RingLayout {
            size,
            desc,
            avail,
            used,
            end,
        }
    }

    /// Bytes the rings of `size` entries take.
    pub fn bytes(size: u16) -> u64 {
        RingLayout::new(0, size).end
    }
}

/// One used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// The driver's view of one split virtqueue.
pub struct DriverRing {
    ram: Arc<GuestRam>,
    layout: RingLayout,
    // Avail entries written but not yet published (the driver's shadow of avail.idx).
    avail_shadow: u16,
    // avail.idx as last published to the device.
    avail_published: u16,
    // The driver's last_used_idx: used entries consumed so far.
    used_seen: u16,
}

impl DriverRing {
    /// A fresh, empty queue (all indices 0). Zeroes its ring memory.
    pub fn new(ram: Arc<GuestRam>, layout: RingLayout) -> DriverRing {
        ram.write(layout.desc, &vec![0u8; (layout.end - layout.desc) as usize]);
        DriverRing {
            ram,
            layout,
            avail_shadow: 0,
            avail_published: 0,
            used_seen: 0,
        }
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Writes descriptor `index`.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.layout.size);
        write_desc_at(
            &self.ram,
            self.layout.desc + DESC_BYTES * u64::from(index),
            addr,
            len,
            flags,
            next,
        );
    }

    /// Queues the chain at `head` for the device (visible after [`DriverRing::publish`]).
    pub fn push_avail(&mut self, head: u16) {
        let slot = u64::from(self.avail_shadow % self.layout.size);
        self.ram
            .write(self.layout.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_shadow = self.avail_shadow.wrapping_add(1);
    }

    /// Makes every pushed chain visible; returns whether the device asked for a kick
    /// (its `avail_event` lies among the entries just published).
    pub fn publish(&mut self) -> bool {
        let old = self.avail_published;
        let new = self.avail_shadow;
        if old == new {
            return false;
        }
        // Release: descriptors and ring entries are visible before the index that covers
        // them.
        self.ram
            .atomic_u16(self.layout.avail + 2)
            .store(new, Ordering::Release);
        self.avail_published = new;
        // The index store must be visible before we read avail_event, or we and the device
        // could each miss the other's update (virtio 1.2, 2.7.10: the driver's full barrier).
        fence(Ordering::SeqCst);
        let event = self.avail_event();
        need_event(event, new, old)
    }

    fn avail_event(&self) -> u16 {
        let at = self.layout.used + 4 + 8 * u64::from(self.layout.size);
        self.ram.atomic_u16(at).load(Ordering::Acquire)
    }

    /// Whether the device has used entries we have not consumed.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.used_seen
    }

    fn used_idx(&self) -> u16 {
        self.ram
            .atomic_u16(self.layout.used + 2)
            .load(Ordering::Acquire)
    }

    /// Consumes the next used entry, if any.
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        if !self.has_used() {
            return None;
        }
        let slot = u64::from(self.used_seen % self.layout.size);
        let at = self.layout.used + 4 + 8 * slot;
        // The Acquire load of used.idx in has_used orders these reads after it.
        let id = self.ram.atomic_u32(at).load(Ordering::Relaxed);
        let len = self.ram.atomic_u32(at + 4).load(Ordering::Relaxed);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some(UsedElem {
            id: u32::from_le(id),
            len: u32::from_le(len),
        })
    }

    /// Asks for an interrupt when the next used entry appears (`used_event`). The caller
    /// re-checks [`DriverRing::has_used`] afterwards before sleeping.
    pub fn arm_interrupt(&self) {
        let at = self.layout.avail + 4 + 2 * u64::from(self.layout.size);
        self.ram
            .atomic_u16(at)
            .store(self.used_seen, Ordering::Release);
        // The device must see used_event before we look at used.idx again.
        fence(Ordering::SeqCst);
    }
}

/// Writes one descriptor at guest address `at` (a table slot, direct or indirect).
pub fn write_desc_at(ram: &GuestRam, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; DESC_BYTES as usize];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write(at, &d);
}

/// `vring_need_event` (virtio 1.2, 2.7.10): whether an event index the other side set lies
/// in the window `[old, new)` of entries just made visible.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_rings_apart_and_aligned() {
        let l = RingLayout::new(0x10000, 256);
        assert_eq!(l.desc, 0x10000);
        assert_eq!(l.avail, 0x11000);
        assert_eq!(l.used, 0x12000);
        assert!(l.used >= l.avail + 4 + 512 + 2);
        assert_eq!(l.end, 0x13000);
        assert_eq!(RingLayout::bytes(256), 0x3000);
    }

    #[test]
    fn need_event_matches_the_spec_formula() {
        // The device wants a kick once entry 5 is published.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(9, 8, 3));
        // Across the 16-bit wrap.
        assert!(need_event(65535, 2, 65530));
        assert!(!need_event(3, 2, 65530));
    }

    #[test]
    fn publish_and_used_round_trip_through_ram() {
        let ram = Arc::new(GuestRam::new(1 << 20).expect("ram"));
        let layout = RingLayout::new(0, 8);
        let mut ring = DriverRing::new(ram.clone(), layout);
        ring.write_desc(0, 0x5000, 512, F_WRITE, 0);
        ring.push_avail(0);
        // avail_event is 0: the device wants a kick for the first entry.
        assert!(ring.publish());
        assert_eq!(ram.atomic_u16(layout.avail + 2).load(Ordering::Acquire), 1);
        assert!(!ring.has_used());
        // Play the device: one used entry.
        ram.atomic_u32(layout.used + 4).store(0, Ordering::Relaxed);
        ram.atomic_u32(layout.used + 8)
            .store(513, Ordering::Relaxed);
        ram.atomic_u16(layout.used + 2).store(1, Ordering::Release);
        assert_eq!(ring.pop_used(), Some(UsedElem { id: 0, len: 513 }));
        assert_eq!(ring.pop_used(), None);
        ring.arm_interrupt();
        let used_event = ram
            .atomic_u16(layout.avail + 4 + 2 * 8)
            .load(Ordering::Acquire);
        assert_eq!(used_event, 1);
    }
}
