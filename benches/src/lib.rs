//! Benchmarks of shardlock live under `benches/`; this library is empty.
