//! A vhost-user-blk load generator that needs no VM: it is the frontend (the `vhost` crate's
//! vhost-user frontend plus driver-side split virtqueues in shared memfd RAM), so it can
//! drive any vhost-user-blk backend socket, strait or qemu-storage-daemon alike.
//!
//! - [`guest`]: the shared guest RAM; [`ring`]: the driver side of a split virtqueue.
//! - [`frontend`]: negotiation and ring hand-over over the vhost-user socket.
//! - [`job`] and its per-queue [`worker`]s: keep `iodepth` requests in flight per queue,
//!   one thread each, time them into an HDR histogram and check every read ([`pattern`]).
//! - [`procstat`]: the backend's CPU time; [`peers`]: starting strait and
//!   qemu-storage-daemon; [`compare`]: alternating rounds and the strait/qsd ratios.

pub mod compare;
pub mod frontend;
pub mod guest;
pub mod job;
pub mod pattern;
pub mod peers;
pub mod procstat;
pub mod ring;
pub mod worker;

pub use job::{run_job, JobResult, JobSpec};
