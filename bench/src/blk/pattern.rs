//! Self-describing disk contents, so the load generator can check what it reads.
//!
//! Every 512-byte sector starts with a 24-byte header `{MAGIC, sector number, stamp}` (all
//! little-endian u64) followed by 61 words derived from sector and stamp. The image is
//! filled with stamp 0 before a run, and every write the generator makes carries a header,
//! so at any time each sector of the image describes itself:
//!
//! - in load mode, reads check every sector's header (magic and sector number: a read that
//!   returns another place's data, or nothing, fails) and writes refresh only headers;
//! - in verify mode each request slot owns its blocks, writes full sectors with a fresh
//!   stamp, reads them back and compares every byte.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::guest::GuestRam;

/// Size of the unit that carries a header: the virtio-blk sector.
pub const SECTOR_BYTES: u64 = 512;
/// Marks a sector written by this generator ("strait" + 2 bytes).
pub const MAGIC: u64 = 0x5354_5241_4954_0b1c;
const HEADER_BYTES: usize = 24;
/// The image is written in chunks of this size when it is filled: large enough for the
/// page cache / tmpfs to take at full speed, small enough to keep the buffer cheap.
const FILL_CHUNK_BYTES: usize = 1 << 20;

/// What a checked sector held instead of what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "sector {sector}: header {{magic {magic:#x}, sector {found_sector}, stamp {stamp:#x}}} \
     or body does not match{}", if *.body { " (body differs)" } else { "" }
)]
pub struct Mismatch {
    pub sector: u64,
    pub magic: u64,
    pub found_sector: u64,
    pub stamp: u64,
    pub body: bool,
}

fn seed(sector: u64, stamp: u64) -> u64 {
    // splitmix64's finaliser: neighbouring sectors and stamps give unrelated words.
    let mut z = sector ^ stamp.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills one sector buffer with the full pattern.
pub fn fill_sector(buf: &mut [u8], sector: u64, stamp: u64) {
    assert_eq!(buf.len(), SECTOR_BYTES as usize);
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&sector.to_le_bytes());
    buf[16..24].copy_from_slice(&stamp.to_le_bytes());
    let s = seed(sector, stamp);
    for (i, word) in buf[HEADER_BYTES..].chunks_exact_mut(8).enumerate() {
        let w = s.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        word.copy_from_slice(&w.to_le_bytes());
    }
}

/// Writes full sectors `first..first + count` with `stamp` into guest RAM at `gpa`.
pub fn fill_guest(ram: &GuestRam, gpa: u64, first: u64, count: u64, stamp: u64) {
    let mut buf = [0u8; SECTOR_BYTES as usize];
    for i in 0..count {
        fill_sector(&mut buf, first + i, stamp);
        ram.write(gpa + i * SECTOR_BYTES, &buf);
    }
}

/// Writes only the headers of sectors `first..first + count` (load mode: cheap).
pub fn stamp_guest_headers(ram: &GuestRam, gpa: u64, first: u64, count: u64, stamp: u64) {
    for i in 0..count {
        let at = gpa + i * SECTOR_BYTES;
        ram.write_u64(at, MAGIC);
        ram.write_u64(at + 8, first + i);
        ram.write_u64(at + 16, stamp);
    }
}

/// Checks the headers of sectors `first..first + count` in guest RAM at `gpa`.
pub fn check_guest_headers(
    ram: &GuestRam,
    gpa: u64,
    first: u64,
    count: u64,
) -> Result<(), Mismatch> {
    for i in 0..count {
        let at = gpa + i * SECTOR_BYTES;
        let magic = ram.read_u64(at);
        let found_sector = ram.read_u64(at + 8);
        if magic != MAGIC || found_sector != first + i {
            return Err(Mismatch {
                sector: first + i,
                magic,
                found_sector,
                stamp: ram.read_u64(at + 16),
                body: false,
            });
        }
    }
    Ok(())
}

/// Checks every byte of sectors `first..first + count` against `stamp`.
pub fn check_guest_full(
    ram: &GuestRam,
    gpa: u64,
    first: u64,
    count: u64,
    stamp: u64,
) -> Result<(), Mismatch> {
    let mut want = [0u8; SECTOR_BYTES as usize];
    let mut got = [0u8; SECTOR_BYTES as usize];
    for i in 0..count {
        fill_sector(&mut want, first + i, stamp);
        ram.read(gpa + i * SECTOR_BYTES, &mut got);
        if got != want {
            let word = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&got[at..at + 8]);
                u64::from_le_bytes(b)
            };
            return Err(Mismatch {
                sector: first + i,
                magic: word(0),
                found_sector: word(8),
                stamp: word(16),
                body: got[..HEADER_BYTES] == want[..HEADER_BYTES],
            });
        }
    }
    Ok(())
}

/// Creates (or overwrites) `path` with `bytes` of self-describing sectors, stamp 0.
pub fn fill_image(path: &Path, bytes: u64) -> Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("creating image {}", path.display()))?;
    let mut chunk = vec![0u8; FILL_CHUNK_BYTES];
    let mut sector = 0u64;
    let sectors = bytes / SECTOR_BYTES;
    while sector < sectors {
        let n = (sectors - sector).min(FILL_CHUNK_BYTES as u64 / SECTOR_BYTES);
        let len = (n * SECTOR_BYTES) as usize;
        for (i, buf) in chunk[..len]
            .chunks_exact_mut(SECTOR_BYTES as usize)
            .enumerate()
        {
            fill_sector(buf, sector + i as u64, 0);
        }
        file.write_all(&chunk[..len])
            .with_context(|| format!("writing image {}", path.display()))?;
        sector += n;
    }
    file.sync_all()
        .with_context(|| format!("syncing image {}", path.display()))?;
    Ok(())
}

/// Whether `path` already holds a filled image of `bytes` (checked on a few sectors), so
/// rounds and repeated runs can reuse it.
pub fn image_looks_filled(path: &Path, bytes: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(file) = File::open(path) else {
        return false;
    };
    if file.metadata().map(|m| m.len()).unwrap_or(0) != bytes {
        return false;
    }
    let sectors = bytes / SECTOR_BYTES;
    [0, sectors / 3, sectors / 2, sectors.saturating_sub(1)]
        .iter()
        .all(|&s| {
            let mut buf = [0u8; 16];
            file.read_exact_at(&mut buf, s * SECTOR_BYTES).is_ok()
                && buf[0..8] == MAGIC.to_le_bytes()
                && buf[8..16] == s.to_le_bytes()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_header_checks_catch_what_they_should() {
        let ram = GuestRam::new(1 << 20).expect("ram");
        fill_guest(&ram, 0x1000, 40, 8, 7);
        assert_eq!(check_guest_full(&ram, 0x1000, 40, 8, 7), Ok(()));
        assert_eq!(check_guest_headers(&ram, 0x1000, 40, 8), Ok(()));
        // Another stamp: headers still place the data, the full check refuses it.
        assert!(check_guest_full(&ram, 0x1000, 40, 8, 8).is_err());
        // Misplaced data: the header check refuses it.
        let err = check_guest_headers(&ram, 0x1000, 41, 8).expect_err("misplaced");
        assert_eq!((err.sector, err.found_sector), (41, 40));
        // One flipped body byte.
        ram.write(0x1000 + 3 * 512 + 100, &[0xFF]);
        let err = check_guest_full(&ram, 0x1000, 40, 8, 7).expect_err("body");
        assert_eq!(err.sector, 43);
        assert!(err.body);
        stamp_guest_headers(&ram, 0x1000, 40, 8, 9);
        assert_eq!(check_guest_headers(&ram, 0x1000, 40, 8), Ok(()));
    }

    #[test]
    fn image_fill_is_recognised() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("img");
        assert!(!image_looks_filled(&path, 1 << 20));
        fill_image(&path, 1 << 20).expect("fill");
        assert!(image_looks_filled(&path, 1 << 20));
        assert!(!image_looks_filled(&path, 2 << 20));
        let data = std::fs::read(&path).expect("read");
        let mut want = [0u8; 512];
        fill_sector(&mut want, 1000, 0);
        assert_eq!(&data[1000 * 512..1001 * 512], &want[..]);
    }
}
