//! Live migration of a running VM: the VMM migrates its own memory and device state,
//! strait carries it across the WAN beside the disk.
//!
//! Today: the memory stream ([`stream`]). The orchestration (phases, switchover, the
//! failure rules) is described in `docs/migration.md` and comes next.

pub mod stream;
