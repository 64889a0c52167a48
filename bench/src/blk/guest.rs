//! Guest RAM for a VM-less frontend: one memfd, mapped shared into this process and handed
//! to the backend with `SET_MEM_TABLE`, so both sides see the same bytes.
//!
//! Guest-physical addresses start at 0 and map 1:1 onto the mapping. Every access goes
//! through a raw pointer (the backend process writes the same memory concurrently, so no
//! Rust reference to guest bytes outlives one copy); this is the only module with `unsafe`
//! besides the ring accessors it exports.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32};

use anyhow::{bail, Context, Result};
use vhost::VhostUserMemoryRegionInfo;

/// Guest RAM is sized in whole 2 MiB steps: the backends map it with `mmap`, and a round
/// size keeps a later switch to huge pages possible without a layout change.
pub const RAM_ALIGN_BYTES: usize = 2 << 20;

/// Most guest RAM a job may ask for. The largest job the CLI allows (16 queues x 256 slots
/// x 1 MiB) needs 4 GiB; the machine has 24 GiB, and both backends map it too.
pub const MAX_RAM_BYTES: usize = 4 << 30;

/// Shared guest memory.
pub struct GuestRam {
    file: File,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this struct for its whole life; every
// access goes through raw-pointer copies or atomics, never through `&`/`&mut` references
// that another thread could alias, so sharing the handle across threads is sound.
unsafe impl Send for GuestRam {}
// SAFETY: as for `Send`: no method hands out references into the mapping.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Creates `len` bytes (rounded up to [`RAM_ALIGN_BYTES`]) of zeroed shared memory.
    pub fn new(len: usize) -> Result<GuestRam> {
        let len = len.div_ceil(RAM_ALIGN_BYTES) * RAM_ALIGN_BYTES;
        if len == 0 || len > MAX_RAM_BYTES {
            bail!("guest RAM of {len} bytes requested; at most {MAX_RAM_BYTES} allowed");
        }
        let name = c"strait-bench-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are a valid combination.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create for guest RAM");
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)
            .with_context(|| format!("sizing guest RAM to {len} bytes"))?;
        // SAFETY: mapping a file we own, with a length equal to its size; the result is
        // checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of guest RAM");
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).context("mmap returned a null mapping")?;
        Ok(GuestRam { file, ptr, len })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `new` refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `SET_MEM_TABLE` entry for this memory.
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.len as u64,
            userspace_addr: self.ptr.as_ptr() as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// This process's virtual address of guest address `gpa` (what `SET_VRING_ADDR` takes).
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.ptr.as_ptr() as u64 + gpa
    }

    /// A pointer to `len` bytes at `gpa`. Panics if the range leaves guest RAM: every
    /// address this crate uses comes from its own layout, so that is a programming error.
    fn at(&self, gpa: u64, len: usize) -> *mut u8 {
        let end = usize::try_from(gpa)
            .ok()
            .and_then(|start| start.checked_add(len));
        assert!(
            end.is_some_and(|end| end <= self.len),
            "guest range {gpa:#x}+{len} outside {} bytes of RAM",
            self.len
        );
        // SAFETY: `gpa + len <= self.len` was just checked, so the offset stays inside the
        // mapping.
        unsafe { self.ptr.as_ptr().add(gpa as usize) }
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let dst = self.at(gpa, data.len());
        // SAFETY: `dst` is valid for `data.len()` bytes (checked by `at`); `data` is a Rust
        // slice and cannot overlap the mapping, which no reference ever points into.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// Copies guest memory at `gpa` into `out`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) {
        let src = self.at(gpa, out.len());
        // SAFETY: as in `write`, with the direction reversed.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
    }

    /// Writes a little-endian u64 at `gpa`.
    pub fn write_u64(&self, gpa: u64, value: u64) {
        self.write(gpa, &value.to_le_bytes());
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b);
        u64::from_le_bytes(b)
    }

    /// The 16-bit ring index at `gpa`, as an atomic shared with the backend.
    pub fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        assert!(gpa.is_multiple_of(2), "unaligned ring index at {gpa:#x}");
        let p = self.at(gpa, 2);
        // SAFETY: `p` is inside the mapping (checked by `at`), 2-byte aligned (checked
        // above), and lives as long as `self`; AtomicU16 has the size and alignment of u16
        // and any bit pattern is valid. The other side only ever accesses it atomically
        // (virtio ring indices are read and written whole).
        unsafe { &*p.cast::<AtomicU16>() }
    }

    /// The 32-bit field at `gpa`, as an atomic shared with the backend.
    pub fn atomic_u32(&self, gpa: u64) -> &AtomicU32 {
        assert!(gpa.is_multiple_of(4), "unaligned ring field at {gpa:#x}");
        let p = self.at(gpa, 4);
        // SAFETY: as in `atomic_u16`, for a 4-byte aligned u32.
        unsafe { &*p.cast::<AtomicU32>() }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`; nothing refers to it
        // once `self` is dropped (the atomics borrowed from it borrow `self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;

    #[test]
    fn memory_is_shared_through_the_file() {
        let ram = GuestRam::new(4096).expect("ram");
        assert_eq!(ram.len(), RAM_ALIGN_BYTES);
        ram.write(0x1000, b"hello");
        let mut via_file = [0u8; 5];
        ram.file.read_exact_at(&mut via_file, 0x1000).expect("read");
        assert_eq!(&via_file, b"hello");
        ram.file
            .write_all_at(&7u16.to_le_bytes(), 0x2000)
            .expect("write");
        assert_eq!(ram.atomic_u16(0x2000).load(Ordering::Acquire), 7);
        ram.write_u64(0x3000, 0x0102_0304_0506_0708);
        assert_eq!(ram.read_u64(0x3000), 0x0102_0304_0506_0708);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_range_access_panics() {
        let ram = GuestRam::new(4096).expect("ram");
        ram.write(ram.len() as u64 - 2, b"abc");
    }
}
