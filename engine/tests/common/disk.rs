//! Disk images for the backend and md5 sums of them to compare with what the guest reports.
//! md5 because busybox's `md5sum` is the hash the guest has; the host uses coreutils' one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::HarnessError;

/// Chunk for filling and hashing images: large enough to be fast, small enough to not matter.
const CHUNK_SIZE: usize = 1 << 20;

/// What a new image contains.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// All zeros, as a sparse file.
    Zeros,
    /// Every byte the same.
    Byte(u8),
    /// A deterministic pseudo-random stream (xorshift64*) from the seed, so a test can
    /// recreate the expected content of any range.
    Seeded(u64),
}

/// Creates (or truncates) `path` as a raw image of `size_bytes` filled with `fill`.
pub fn make_image(path: &Path, size_bytes: u64, fill: Fill) -> Result<(), HarnessError> {
    let mut file = File::create(path).map_err(|e| HarnessError::io("create image", path, e))?;
    let mut state = match fill {
        Fill::Seeded(seed) => xorshift_state(seed),
        _ => 0,
    };
    let mut chunk = vec![0u8; CHUNK_SIZE];
    if let Fill::Byte(byte) = fill {
        chunk.fill(byte);
    }
    if !matches!(fill, Fill::Zeros) {
        let mut written = 0u64;
        while written < size_bytes {
            let take = (size_bytes - written).min(CHUNK_SIZE as u64) as usize;
            if let Fill::Seeded(_) = fill {
                fill_xorshift(&mut chunk[..take], &mut state);
            }
            file.write_all(&chunk[..take])
                .map_err(|e| HarnessError::io("write image", path, e))?;
            written += take as u64;
        }
    }
    file.set_len(size_bytes)
        .map_err(|e| HarnessError::io("size image", path, e))?;
    file.sync_all()
        .map_err(|e| HarnessError::io("sync image", path, e))
}

/// Spreads the seed with splitmix64 so nearby seeds give unrelated streams; xorshift's state
/// must not be 0 (a fixed point).
fn xorshift_state(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

fn fill_xorshift(buf: &mut [u8], state: &mut u64) {
    for word in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let value = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
}

/// The md5 (lowercase hex, as `md5sum` prints it) of `length` bytes of `path` at `offset`.
/// Fails if the file is shorter than the range.
pub fn md5_file_range(path: &Path, offset: u64, length: u64) -> Result<String, HarnessError> {
    let mut file = File::open(path).map_err(|e| HarnessError::io("open image", path, e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| HarnessError::io("seek image", path, e))?;
    let mut range = file.take(length);
    md5_of_reader(&mut range, length, path)
}

/// The md5 of the whole file.
pub fn md5_file(path: &Path) -> Result<String, HarnessError> {
    let length = std::fs::metadata(path)
        .map_err(|e| HarnessError::io("stat image", path, e))?
        .len();
    md5_file_range(path, 0, length)
}

/// The md5 of `length` zero bytes (what a discarded range should read as).
pub fn md5_zeros(length: u64) -> Result<String, HarnessError> {
    md5_of_reader(
        &mut std::io::repeat(0).take(length),
        length,
        Path::new("<zeros>"),
    )
}

fn md5_of_reader(reader: &mut impl Read, length: u64, path: &Path) -> Result<String, HarnessError> {
    let spawn_error = |source| HarnessError::Spawn {
        program: "md5sum".into(),
        source,
    };
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let copied = match child.stdin.take() {
        // md5sum reads to the end before it prints anything, so writing everything first
        // and then collecting its output cannot deadlock. Dropping stdin closes it.
        Some(mut stdin) => std::io::copy(reader, &mut stdin),
        None => Ok(0),
    };
    let output = child.wait_with_output().map_err(spawn_error)?;
    let copied = copied.map_err(|e| HarnessError::io("read for md5", path, e))?;
    if copied != length {
        return Err(HarnessError::io(
            "read the whole range for md5",
            path,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("got {copied} of {length} bytes"),
            ),
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.split_whitespace().next() {
        Some(hex) if output.status.success() && hex.len() == 32 => Ok(hex.to_owned()),
        _ => Err(HarnessError::Command {
            program: "md5sum".into(),
            status: output.status.to_string(),
            output: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
        }),
    }
}
