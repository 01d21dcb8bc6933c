//! Benchmarks and load generation for tagstream.
//!
//! - [`loadgen`]: realistic CRM event streams (Zipf activity per customer, the event mix of
//!   the product's scenarios, chosen fractions of late, duplicate and malformed events).
//! - [`kafka`]: producing event lines to a topic keyed by customer (`kafkaload`, tests).
//! - `benches/`: criterion micro-benchmarks; `RESULTS.md`: committed figures.

pub mod kafka;
pub mod loadgen;

/// CPU seconds used so far by every thread of this process (`/proc/self/stat`'s utime and
/// stime, in clock ticks of 1/100 s on Linux).
pub fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("reading /proc/self/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("a /proc stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}
