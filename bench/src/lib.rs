//! Benchmarks and load generation for tagstream.
//!
//! - [`loadgen`]: realistic CRM event streams (Zipf activity per customer, the event mix of
//!   the product's scenarios, chosen fractions of late, duplicate and malformed events).
//! - `benches/`: criterion micro-benchmarks; `RESULTS.md`: committed figures.

pub mod loadgen;
