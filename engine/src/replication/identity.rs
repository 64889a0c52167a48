//! What a destination remembers across restarts, in a small file beside its disk
//! (`DISK.strait-replica`): which replica it is (a random id made when the file is made),
//! the disk and source it is bound to, and whether it was promoted. Without it a restarted
//! destination would take any source again (a promoted disk could be overwritten), and a
//! source could not tell a restarted replica from a replaced disk.
//!
//! The file is a few `key=hex` lines, written to a temporary file, synced and renamed, so
//! a crash leaves the old or the new one. It is local, but read as untrusted all the same:
//! anything unexpected is an error that names the file, never a guess.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::wire::ID_BYTES;

/// Longest identity file read: a few lines of hex; anything larger is not ours.
const FILE_BYTES_MAX: u64 = 4096;

/// A replica's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaIdentity {
    pub generation: [u8; ID_BYTES],
    pub disk_id: Option<[u8; ID_BYTES]>,
    pub source_id: Option<[u8; ID_BYTES]>,
    pub promoted: bool,
}

/// The identity file cannot be read or written.
#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a strait replica identity ({reason}); move it away to start a new replica"
    )]
    Malformed { path: PathBuf, reason: String },
    #[error("cannot draw a random replica id from /dev/urandom")]
    Random(#[source] std::io::Error),
}

/// Where the identity of the replica on `disk` lives.
pub fn path_for(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_owned();
    name.push(".strait-replica");
    PathBuf::from(name)
}

impl ReplicaIdentity {
    /// The identity stored beside `disk`, or a new one (not yet stored) if there is none.
    pub fn load_or_new(disk: &Path) -> Result<ReplicaIdentity, IdentityError> {
        let path = path_for(disk);
        match File::open(&path) {
            Ok(file) => ReplicaIdentity::read(&path, file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut generation = [0; ID_BYTES];
                File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut generation))
                    .map_err(IdentityError::Random)?;
                Ok(ReplicaIdentity {
                    generation,
                    disk_id: None,
                    source_id: None,
                    promoted: false,
                })
            }
            Err(source) => Err(IdentityError::Read { path, source }),
        }
    }

    fn read(path: &Path, file: File) -> Result<ReplicaIdentity, IdentityError> {
        let mut text = String::new();
        file.take(FILE_BYTES_MAX + 1)
            .read_to_string(&mut text)
            .map_err(|source| IdentityError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        ReplicaIdentity::parse(&text).map_err(|reason| IdentityError::Malformed {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn parse(text: &str) -> Result<ReplicaIdentity, String> {
        if text.len() as u64 > FILE_BYTES_MAX {
            return Err(format!("longer than {FILE_BYTES_MAX} bytes"));
        }
        let mut id = ReplicaIdentity {
            generation: [0; ID_BYTES],
            disk_id: None,
            source_id: None,
            promoted: false,
        };
        let mut has_generation = false;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not key=value"))?;
            match key {
                "generation" => {
                    id.generation = hex_id(value)?;
                    has_generation = true;
                }
                "disk" => id.disk_id = Some(hex_id(value)?),
                "source" => id.source_id = Some(hex_id(value)?),
                "promoted" => {
                    id.promoted = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("promoted={value:?} is not true or false")),
                    }
                }
                _ => return Err(format!("unknown key {key:?}")),
            }
        }
        if !has_generation {
            return Err("no generation".into());
        }
        Ok(id)
    }

    fn render(&self) -> String {
        let mut out = format!("generation={}\n", hex(&self.generation));
        if let Some(d) = self.disk_id {
            out.push_str(&format!("disk={}\n", hex(&d)));
        }
        if let Some(s) = self.source_id {
            out.push_str(&format!("source={}\n", hex(&s)));
        }
        out.push_str(&format!("promoted={}\n", self.promoted));
        out
    }

    /// Stores the identity beside `disk`, durably (temporary file, sync, rename).
    pub fn store(&self, disk: &Path) -> Result<(), IdentityError> {
        let path = path_for(disk);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = |source| IdentityError::Write {
            path: path.clone(),
            source,
        };
        let mut file = File::create(&tmp).map_err(write)?;
        file.write_all(self.render().as_bytes()).map_err(write)?;
        file.sync_all().map_err(write)?;
        std::fs::rename(&tmp, &path).map_err(write)?;
        // The rename itself is durable once the directory is synced.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(write)?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_id(text: &str) -> Result<[u8; ID_BYTES], String> {
    let text = text.trim();
    if text.len() != 2 * ID_BYTES || !text.is_ascii() {
        return Err(format!("{text:?} is not {ID_BYTES} bytes of hex"));
    }
    let mut out = [0; ID_BYTES];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{text:?} is not hex"))?;
    }
    Ok(out)
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_survives_a_store_and_a_load() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let fresh = ReplicaIdentity::load_or_new(&disk).unwrap();
        assert_ne!(fresh.generation, [0; ID_BYTES]);
        let again = ReplicaIdentity::load_or_new(&disk).unwrap();
        assert_ne!(
            fresh.generation, again.generation,
            "not stored yet: a new id"
        );
        let bound = ReplicaIdentity {
            disk_id: Some([1; ID_BYTES]),
            source_id: Some([2; ID_BYTES]),
            promoted: true,
            ..fresh
        };
        bound.store(&disk).unwrap();
        assert_eq!(ReplicaIdentity::load_or_new(&disk).unwrap(), bound);
    }

    #[test]
    fn a_damaged_identity_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        for bad in [
            "",
            "generation=zz\n",
            "generation=00\n",
            "nonsense\n",
            "generation=000102030405060708090a0b0c0d0e0f\npromoted=maybe\n",
            "generation=000102030405060708090a0b0c0d0e0f\ncolour=blue\n",
        ] {
            std::fs::write(path_for(&disk), bad).unwrap();
            let err = ReplicaIdentity::load_or_new(&disk).unwrap_err().to_string();
            assert!(err.contains("disk.img.strait-replica"), "{bad:?}: {err}");
        }
        std::fs::write(path_for(&disk), vec![b'x'; 10_000]).unwrap();
        assert!(ReplicaIdentity::load_or_new(&disk).is_err());
    }
}
