//! The destination's durable record of its migration decisions, beside its disk
//! (`DISK.strait-migration`): for each recent migration id, committed or refused. It is the
//! commit point of the switchover (`docs/migration.md`): the destination writes "committed"
//! before it runs the VM, and "refused" before it tells a source that asks that the
//! migration will never commit, so the source may resume only after the destination can no
//! longer run the VM, and the destination runs it only after the source can no longer
//! resume.
//!
//! Written whole each time: to a temporary file, synced, renamed over the record, and the
//! directory synced.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::wire::MigrationId;

/// Decisions kept: a source asks only about its latest attempt, so a few suffice; the
/// bound keeps the file small whatever a peer does.
pub const DECISIONS_MAX: usize = 16;

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Committed,
    Refused,
}

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("cannot write the migration record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the migration record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the migration record {path} is corrupt at line {line}: {text:?}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// The record, loaded.
#[derive(Debug)]
pub struct MigrationRecord {
    path: PathBuf,
    /// Oldest first.
    decisions: Vec<(MigrationId, Decision)>,
}

impl MigrationRecord {
    /// Where the record of `disk` lives.
    pub fn path_for(disk: &Path) -> PathBuf {
        let mut name = disk.as_os_str().to_owned();
        name.push(".strait-migration");
        PathBuf::from(name)
    }

    /// Loads the record of `disk`; none yet is an empty record. A corrupt record is an
    /// error, never read as "nothing decided": it may hold a commit.
    pub fn load(disk: &Path) -> Result<MigrationRecord, RecordError> {
        let path = Self::path_for(disk);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(RecordError::Read { path, source }),
        };
        let mut decisions = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let corrupt = || RecordError::Corrupt {
                path: path.clone(),
                line: i + 1,
                text: line.chars().take(80).collect(),
            };
            let (id, what) = line.split_once(' ').ok_or_else(corrupt)?;
            let id: MigrationId = u64::from_str_radix(id, 16).map_err(|_| corrupt())?;
            let decision = match what {
                "committed" => Decision::Committed,
                "refused" => Decision::Refused,
                _ => return Err(corrupt()),
            };
            decisions.push((id, decision));
        }
        Ok(MigrationRecord { path, decisions })
    }

    /// What was decided for `id`, if anything.
    pub fn get(&self, id: MigrationId) -> Option<Decision> {
        self.decisions
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, d)| *d)
    }

    /// The id of the most recent decision, if that decision was a commit.
    pub fn last_decision_committed(&self) -> Option<MigrationId> {
        self.decisions
            .last()
            .filter(|(_, d)| *d == Decision::Committed)
            .map(|(id, _)| *id)
    }

    /// The last migration committed here, if any.
    pub fn last_committed(&self) -> Option<MigrationId> {
        self.decisions
            .iter()
            .rev()
            .find(|(_, d)| *d == Decision::Committed)
            .map(|(id, _)| *id)
    }

    /// Records `decision` for `id` durably. A decision is final: recording another one
    /// for the same id is refused by the caller's logic, and kept out here by replacing
    /// nothing.
    pub fn decide(&mut self, id: MigrationId, decision: Decision) -> Result<(), RecordError> {
        if self.get(id).is_some() {
            return Ok(());
        }
        self.decisions.push((id, decision));
        if self.decisions.len() > DECISIONS_MAX {
            let excess = self.decisions.len() - DECISIONS_MAX;
            self.decisions.drain(..excess);
        }
        self.store()
    }

    fn store(&self) -> Result<(), RecordError> {
        let err = |source| RecordError::Write {
            path: self.path.clone(),
            source,
        };
        let mut text = String::new();
        for (id, d) in &self.decisions {
            let what = match d {
                Decision::Committed => "committed",
                Decision::Refused => "refused",
            };
            text.push_str(&format!("{id:016x} {what}\n"));
        }
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_survive_a_reload_and_are_final() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = dir.path().join("disk.img");
        let mut r = MigrationRecord::load(&disk).expect("empty");
        assert_eq!(r.get(1), None);
        r.decide(1, Decision::Refused).expect("write");
        r.decide(0xabc, Decision::Committed).expect("write");
        // Final: a later, different decision for the same id changes nothing.
        r.decide(1, Decision::Committed).expect("write");
        let r = MigrationRecord::load(&disk).expect("load");
        assert_eq!(r.get(1), Some(Decision::Refused));
        assert_eq!(r.get(0xabc), Some(Decision::Committed));
        assert_eq!(r.last_committed(), Some(0xabc));
        assert_eq!(r.last_decision_committed(), Some(0xabc));
    }

    #[test]
    fn the_record_is_bounded_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = dir.path().join("disk.img");
        let mut r = MigrationRecord::load(&disk).expect("empty");
        for id in 0..(DECISIONS_MAX as u64 + 5) {
            r.decide(id, Decision::Refused).expect("write");
        }
        let r = MigrationRecord::load(&disk).expect("load");
        assert_eq!(r.decisions.len(), DECISIONS_MAX);
        assert_eq!(r.get(0), None);
        std::fs::write(MigrationRecord::path_for(&disk), "zz committed\n").expect("write");
        assert!(matches!(
            MigrationRecord::load(&disk),
            Err(RecordError::Corrupt { line: 1, .. })
        ));
    }
}
