//! Guest memory as the VMM shares it with strait.
//!
//! This crate will own three things, all about the guest's RAM rather than its disk:
//!
//! 1. **The shared mapping.** A vhost-user frontend (QEMU, Cloud Hypervisor) hands the
//!    backend file descriptors for guest RAM (`SET_MEM_TABLE`). Today the block backend in
//!    `strait-vhost-blk` maps them through `vhost-user-backend`; the memory-stream work of
//!    the migration issue moves the policy for that mapping here.
//! 2. **The vhost-user dirty log.** While a migration runs, every guest page that strait
//!    itself writes (data of a read request, status bytes, used-ring entries) must be marked
//!    in the log the frontend shares (`VHOST_F_LOG_ALL`, `SET_LOG_BASE`), or the destination
//!    gets a stale page. [`LOG_PAGE_SIZE_BYTES`] is the page size that log is defined over.
//! 3. **The VM's memory stream.** During a live migration the VMM streams its RAM and device
//!    state; strait carries that stream across the WAN on the link's `memory` class, under
//!    the same congestion control as the disk (XvMotion's unified stream).
//!
//! Only the constants shared by the other crates live here yet.

/// Page size of the vhost-user dirty log: one bit covers this many bytes of guest physical
/// memory. Fixed by the vhost-user specification (`VHOST_LOG_PAGE`), not by the host.
pub const LOG_PAGE_SIZE_BYTES: u64 = 0x1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_page_matches_vhost_spec() {
        // The vhost-user specification fixes VHOST_LOG_PAGE at 4 KiB whatever the host page.
        assert_eq!(LOG_PAGE_SIZE_BYTES, 4096);
    }
}
