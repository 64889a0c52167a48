//! How the destination writes what it receives: through io_uring, many writes in flight at
//! once (a disk, or a RAID behind it, is only fast with a queue), made durable with one
//! `fdatasync` before anything is confirmed.
//!
//! Order: two writes to overlapping ranges must land in the order they were received (a
//! newer mirror write over an older one, a chunk over mirror writes the rules let it
//! replace). The applier never has two overlapping writes in flight: a write that overlaps
//! one waiting is preceded by a flush, which waits for every write in flight.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use io_uring::{opcode, types, IoUring};

/// Writes in flight at most: 64 keeps an SSD or a RAID busy, and 64 chunk writes of 512 KiB
/// are 32 MiB of buffers, one bulk window (`BULK_INFLIGHT_MAX`).
pub const APPLY_DEPTH: usize = 64;

/// The destination disk's writer.
pub struct Applier {
    file: File,
    ring: IoUring,
    /// Writes handed to the ring (or about to be) and not yet completed, with their data,
    /// which must stay where it is until the kernel is done with it.
    pending: Vec<(u64, Vec<u8>)>,
    /// Of `pending`, how many are pushed to the submission queue.
    pushed: usize,
    writes: u64,
    flushes: u64,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("pending", &self.pending.len())
            .field("writes", &self.writes)
            .field("flushes", &self.flushes)
            .finish_non_exhaustive()
    }
}

impl Applier {
    /// An applier writing to `file` (opened for writing).
    pub fn new(file: File) -> io::Result<Applier> {
        Ok(Applier {
            file,
            ring: IoUring::new(APPLY_DEPTH as u32)?,
            pending: Vec::with_capacity(APPLY_DEPTH),
            pushed: 0,
            writes: 0,
            flushes: 0,
        })
    }

    /// Queues `data` to be written at `offset`; it is written by the next [`Self::flush`]
    /// at the latest.
    pub fn write(&mut self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset.saturating_add(data.len() as u64);
        let overlaps = self
            .pending
            .iter()
            .any(|(o, d)| offset < o + d.len() as u64 && *o < end);
        if overlaps || self.pending.len() == APPLY_DEPTH {
            self.flush()?;
        }
        self.pending.push((offset, data));
        self.writes += 1;
        Ok(())
    }

    /// The file written, for reading what [`Self::flush`] wrote (verify hashes it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Makes `len` bytes at `offset` read as zeros, after every write queued before it.
    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.flush()?;
        zero(&self.file, offset, len)
    }

    /// Waits until every queued write is written (not yet durable: see [`Self::sync`]).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.flushes += 1;
        let fd = types::Fd(self.file.as_raw_fd());
        while self.pushed < self.pending.len() {
            let (offset, data) = &self.pending[self.pushed];
            let len = u32::try_from(data.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
            let entry = opcode::Write::new(fd, data.as_ptr(), len)
                .offset(*offset)
                .build()
                .user_data(self.pushed as u64);
            // SAFETY: the buffer is owned by `self.pending`, whose elements are neither
            // dropped nor mutated until this flush has reaped every completion below (a
            // reallocation of `pending` moves the Vec headers, not the heap buffers the
            // entries point to); the fd stays open as long as `self.file`.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_err() {
                // The submission queue holds APPLY_DEPTH entries and `pending` never more.
                return Err(io::Error::other("io_uring submission queue full"));
            }
            self.pushed += 1;
        }
        let mut done = 0;
        let mut short = Vec::new();
        let mut failed = None;
        while done < self.pushed {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The writes in flight keep their buffers (`pending` is kept) for as long
                // as the applier lives; the caller ends the session.
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                done += 1;
                let index = cqe.user_data() as usize;
                let result = cqe.result();
                let Some((offset, data)) = self.pending.get(index) else {
                    continue;
                };
                if result < 0 {
                    failed.get_or_insert(io::Error::from_raw_os_error(-result));
                } else if (result as usize) < data.len() {
                    short.push((offset + result as u64, index, result as usize));
                }
            }
        }
        // Every buffer is released by the kernel now.
        let pending = std::mem::take(&mut self.pending);
        self.pushed = 0;
        if let Some(e) = failed {
            return Err(e);
        }
        // A short write (rare: a signal, a full disk) finishes synchronously; these ranges
        // do not overlap, so their order does not matter.
        for (at, index, written) in short {
            self.file.write_all_at(&pending[index].1[written..], at)?;
        }
        Ok(())
    }

    /// Writes everything queued and makes it durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(u64::MAX);
        // SAFETY: the entry holds no buffer; the fd stays open as long as `self.file`.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => {
                    other?;
                    break;
                }
            }
        }
        let Some(cqe) = self.ring.completion().next() else {
            return Err(io::Error::other(
                "io_uring returned no completion for fdatasync",
            ));
        };
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(())
    }

    /// Writes queued in total, and the flushes that wrote them (writes per flush is the
    /// depth the disk saw).
    pub fn counts(&self) -> (u64, u64) {
        (self.writes, self.flushes)
    }
}

/// Makes `len` bytes at `offset` read as zeros: a hole where the filesystem can punch
/// one, written zeros where it cannot.
pub fn zero(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let zeros = vec![0; super::wire::DATA_BYTES_MAX];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn read(file: &File, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn overlapping_writes_land_in_order_and_others_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let check = file.try_clone().unwrap();
        let mut a = Applier::new(file).unwrap();
        // 200 disjoint writes: queued together, flushed APPLY_DEPTH at a time.
        for i in 0..200u64 {
            a.write(i * 4096, vec![i as u8 + 1; 4096]).unwrap();
        }
        // Then a write over the first, and one over that: the last must win.
        a.write(0, vec![0xAA; 8192]).unwrap();
        a.write(4096, vec![0xBB; 100]).unwrap();
        a.zero(8192, 4096).unwrap();
        a.sync().unwrap();
        assert_eq!(read(&check, 0, 4096), vec![0xAA; 4096]);
        let mut second = vec![0xBB; 100];
        second.extend(vec![0xAA; 4096 - 100]);
        assert_eq!(read(&check, 4096, 4096), second);
        assert_eq!(read(&check, 8192, 4096), vec![0; 4096]);
        for i in 3..200u64 {
            assert_eq!(
                read(&check, i * 4096, 4096),
                vec![i as u8 + 1; 4096],
                "block {i}"
            );
        }
        let (writes, flushes) = a.counts();
        assert_eq!(writes, 202);
        // 200 disjoint writes need 4 flushes at depth 64; each overlap one more.
        assert!(
            flushes <= 7,
            "{flushes} flushes: the writes did not go together"
        );
    }

    #[test]
    fn a_failed_write_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, b"x").unwrap();
        // Read-only: every write fails with EBADF.
        let file = File::open(&path).unwrap();
        let mut a = Applier::new(file).unwrap();
        a.write(0, vec![1; 4096]).unwrap();
        assert!(a.flush().is_err());
        // And the applier is usable afterwards (nothing left pending).
        assert!(a.flush().is_ok());
    }
}
