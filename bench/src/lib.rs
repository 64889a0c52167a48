//! Benchmarks for strait. The criterion suites live in `benches/`; the side-by-side
//! comparisons against peers come with the benchmark issue.
