//! Benchmarks for strait. The criterion suites live in `benches/`; [`blk`] is the block
//! load generator behind `strait-bench-blk`, the side-by-side comparison with
//! qemu-storage-daemon.

pub mod blk;
