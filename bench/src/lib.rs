//! Benchmarks for strait. The criterion suites live in `benches/`; [`blk`] is the block
//! load generator behind `strait-bench-blk`, the side-by-side comparison with
//! qemu-storage-daemon; [`migration`] aggregates the live-migration sweep
//! (`bench/migration.sh`, `strait-bench-migration`).

pub mod blk;
pub mod migration;
