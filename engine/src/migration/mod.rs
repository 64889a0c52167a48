//! Live migration of a running VM: the VMM migrates its own memory and device state,
//! strait carries it across the WAN beside the disk, and the two engines switch over
//! atomically (`docs/migration.md`).
//!
//! - [`stream`]: the memory stream on the link's Memory class.
//! - [`wire`] and [`port`]: the engines' migration messages, on the replication session.
//! - [`source`]: the orchestration on the source (phases, throttle, switchover, rollback).
//! - [`target`]: the destination's answers (ready, commit, refuse).
//! - [`record`]: the destination's durable commit record: the commit point.
//! - [`stun`]: the vCPU throttle controller (Stun During Page Send).

pub mod port;
pub mod record;
pub mod source;
pub mod stream;
pub mod stun;
pub mod target;
pub mod wire;

use std::path::Path;

use strait_vmm::{QemuVmm, Vmm, VmmError};
use thiserror::Error;

/// What can stop a migration from starting.
#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("unknown VMM {0:?}: expected qemu:PATH (the QMP socket of the VMM)")]
    VmmSpec(String),
    #[error("cannot reach the VMM at {spec}")]
    Vmm {
        spec: String,
        #[source]
        source: VmmError,
    },
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error("cannot start the migration thread")]
    Thread(#[source] std::io::Error),
}

/// Checks a VMM address without connecting: `qemu:PATH`.
pub fn parse_vmm_spec(spec: &str) -> Result<&Path, MigrationError> {
    match spec.split_once(':') {
        Some(("qemu", path)) if !path.is_empty() => Ok(Path::new(path)),
        _ => Err(MigrationError::VmmSpec(spec.to_string())),
    }
}

/// Connects to the VMM named by `spec` (`qemu:PATH`, PATH its QMP socket).
pub fn connect_vmm(spec: &str) -> Result<Box<dyn Vmm>, MigrationError> {
    let path = parse_vmm_spec(spec)?;
    QemuVmm::connect(path)
        .map(|v| Box::new(v) as Box<dyn Vmm>)
        .map_err(|source| MigrationError::Vmm {
            spec: spec.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_specs() {
        assert_eq!(
            parse_vmm_spec("qemu:/run/q.sock").ok(),
            Some(Path::new("/run/q.sock"))
        );
        for bad in ["qemu:", "/run/q.sock", "ch:/x", ""] {
            assert!(
                matches!(parse_vmm_spec(bad), Err(MigrationError::VmmSpec(_))),
                "{bad}"
            );
        }
    }
}
