//! Produces an NDJSON file to a Kafka topic, one message per non-blank line, keyed by the
//! line's normalised `customer_id` (lines without one go unkeyed), with the idempotent
//! producer. For the Kafka → tags benchmark (`bench/kafka.sh`). With `--rate N`, N lines a
//! second; with `--now`, each event's `ts` is the wall clock (ms) when it is sent, for a
//! server in wall-clock mode (`bench/webhooks.sh`). With `--unkeyed`, every message goes
//! without a key, to a random partition (what a group's members then forward to their
//! customers' partitions: `bench/nodes.sh` with `BENCH_UNKEYED=1`).
//!
//! ```text
//! kafkaload --brokers 127.0.0.1:9092 --topic events --file stream.ndjson [--rate N] [--now] [--unkeyed]
//! ```

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut brokers, mut topic, mut file) = (String::from("127.0.0.1:9092"), String::from("events"), None);
    let (mut rate, mut now, mut keyed) = (0.0f64, false, true);
    while let Some(flag) = args.next() {
        if flag == "--now" {
            now = true;
            continue;
        }
        if flag == "--unkeyed" {
            keyed = false;
            continue;
        }
        let value = args
            .next()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--brokers" => brokers = value,
            "--topic" => topic = value,
            "--file" => file = Some(value),
            "--rate" => {
                rate = value
                    .parse()
                    .unwrap_or_else(|_| fail("--rate takes lines per second"))
            }
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
    let paced = lines.enumerate().map(|(n, line)| {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        if now {
            stamped(line)
        } else {
            line
        }
    });
    let sent = bench::kafka::produce_keyed(&producer, &topic, paced, keyed)
        .unwrap_or_else(|e| fail(&format!("producing: {e}")));
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {sent} messages in {secs:.1} s ({:.0}/s)",
        sent as f64 / secs
    );
}

/// The event line with its `ts` set to the wall clock now (a line that is no JSON object
/// is sent as it is).
fn stamped(line: Vec<u8>) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut event)) = serde_json::from_slice::<serde_json::Value>(&line) else {
        return line;
    };
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    event.insert("ts".into(), ms.into());
    serde_json::to_vec(&event).expect("an event serialises")
}

fn fail(message: &str) -> ! {
    eprintln!("kafkaload: {message}");
    std::process::exit(2)
}
