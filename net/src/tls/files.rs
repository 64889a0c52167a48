//! Reading and writing the certificate directory: private modes, no overwrite, bounded reads.

use super::*;

pub(super) fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(TlsError::NotADirectory {
                path: dir.to_owned(),
            }),
            Err(source) => Err(TlsError::CreateDir {
                path: dir.to_owned(),
                source,
            }),
        },
        Err(source) => Err(TlsError::CreateDir {
            path: dir.to_owned(),
            source,
        }),
    }
}

pub(super) fn refuse_existing(paths: &[&PathBuf]) -> Result<(), TlsError> {
    for path in paths {
        // symlink_metadata: a dangling symlink is still something we would write through.
        if fs::symlink_metadata(path).is_ok() {
            return Err(TlsError::Exists {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Writes every file or none: on a failure, the files this call already wrote are removed, so
/// a retry does not trip over half a setup.
pub(super) fn write_new_files(
    dir: &Path,
    files: &[(&PathBuf, &[u8], u32)],
) -> Result<(), TlsError> {
    let mut written: Vec<&Path> = Vec::with_capacity(files.len());
    for &(path, contents, mode) in files {
        if let Err(e) = write_new_file(path, contents, mode) {
            for done in written {
                // Best effort: the original error is the one worth reporting.
                let _ = fs::remove_file(done);
            }
            return Err(e);
        }
        written.push(path);
    }
    // Make the new directory entries durable too, not only the file contents.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| TlsError::Write {
            path: dir.to_owned(),
            source,
        })
}

pub(super) fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    // create_new: never follow or replace something that appeared since refuse_existing().
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(TlsError::Exists {
                path: path.to_owned(),
            })
        }
        Err(source) => return Err(write_err(source)),
    };
    // The umask may have cleared bits of `mode`; set it exactly.
    let result = file
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all());
    if let Err(source) = result {
        let _ = fs::remove_file(path);
        return Err(write_err(source));
    }
    Ok(())
}

pub(super) fn read_bytes(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut contents = Vec::new();
    file.take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut contents)
        .map_err(read_err)?;
    if contents.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(contents)
}

pub(super) fn read_text(path: &Path) -> Result<String, TlsError> {
    String::from_utf8(read_bytes(path)?).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// Every certificate in a PEM file; at least one.
pub(super) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |source| TlsError::Pem {
        path: path.to_owned(),
        what: "certificate",
        source,
    };
    let contents = read_bytes(path)?;
    let certs = CertificateDer::pem_slice_iter(&contents)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(pem_err(pem::Error::NoItemsFound));
    }
    Ok(certs)
}

pub(super) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read_bytes(path)?).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
        source,
    })
}

pub(super) fn warn_if_readable_by_others(key: &Path) {
    if let Ok(meta) = fs::metadata(key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(path = %key.display(), mode = %format!("{mode:o}"), "private key is readable by other users; chmod 600 it");
        }
    }
}
