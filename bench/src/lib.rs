//! Benchmarks and load generation for tagstream.
//!
//! - [`loadgen`]: realistic CRM event streams (Zipf activity per customer, the event mix of
//!   the product's scenarios, chosen fractions of late, duplicate and malformed events).
//! - [`kafka`]: producing event lines to a topic keyed by customer (`kafkaload`, tests).
//! - `benches/`: criterion micro-benchmarks; `RESULTS.md`: committed figures.

pub mod kafka;
pub mod loadgen;
