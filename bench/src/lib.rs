//! Benchmarks and load generation for tagstream.
