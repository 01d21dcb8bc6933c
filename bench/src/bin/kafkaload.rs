//! Produces an NDJSON file to a Kafka topic, one message per non-blank line, keyed by the
//! line's normalised `customer_id` (lines without one go unkeyed), with the idempotent
//! producer. For the Kafka → tags benchmark (`bench/kafka.sh`).
//!
//! ```text
//! kafkaload --brokers 127.0.0.1:9092 --topic events --file stream.ndjson
//! ```

use std::io::{BufRead, BufReader};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut brokers, mut topic, mut file) = (String::from("127.0.0.1:9092"), String::from("events"), None);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--brokers" => brokers = value,
            "--topic" => topic = value,
            "--file" => file = Some(value),
            other => fail(&format!("unknown flag {other}")),
        }
    }
    let file = file.unwrap_or_else(|| fail("--file is required"));
    let producer = bench::kafka::producer(&brokers).unwrap_or_else(|e| fail(&format!("producer: {e}")));
    let input = std::fs::File::open(&file).unwrap_or_else(|e| fail(&format!("{file}: {e}")));
    let lines = BufReader::with_capacity(1 << 20, input)
        .split(b'\n')
        .map(|line| line.unwrap_or_else(|e| fail(&format!("reading {file}: {e}"))));
    let started = Instant::now();
    let sent =
        bench::kafka::produce(&producer, &topic, lines).unwrap_or_else(|e| fail(&format!("producing: {e}")));
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {sent} messages in {secs:.1} s ({:.0}/s)",
        sent as f64 / secs
    );
}

fn fail(message: &str) -> ! {
    eprintln!("kafkaload: {message}");
    std::process::exit(2)
}
