//! The VMM beside the engine, behind one trait.
//!
//! The migration orchestration drives the VMM that runs the guest (pause, resume, start and
//! watch a migration, switch over) through [`Vmm`]. [`QemuVmm`] implements it over QMP with
//! the small synchronous client in [`qmp`]; `docs/vmm.md` describes the mapping and what a
//! Cloud Hypervisor driver needs. [`VcpuQuota`] slows a guest's vCPU threads from outside
//! any VMM, with a CFS quota (the migration's throttle with `throttle` "cgroup").
//!
//! Everything here is blocking and thread-based (the engine's control side runs on std
//! threads): each QMP connection has one reader thread, and every wait has a timeout.

#![deny(missing_docs)]

mod migration;
mod qemu;
pub mod qmp;
mod stun;
mod vmm;

pub use migration::{
    MigrationCapabilities, MigrationInfo, MigrationParameters, MigrationStatus, MigrationUri,
    RamStats, RunState, VmmEvent, VmmEventKind,
};
pub use qemu::QemuVmm;
pub use stun::{sweep_stale_quotas, StunError, VcpuQuota};
pub use vmm::{Vmm, VmmError, VmmFeatures, STATUS_POLL_INTERVAL};
