//! Produces an NDJSON file to a Kafka topic, one message per non-blank line, keyed by the
//! line's normalised `customer_id` (lines without one go unkeyed), with the idempotent
//! producer. For the Kafka → tags benchmark (`bench/kafka.sh`).
//!
//! ```text
//! kafkaload --brokers 127.0.0.1:9092 --topic events --file stream.ndjson
//! ```

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

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
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()
        .unwrap_or_else(|e| fail(&format!("producer: {e}")));
    let reader = BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(&file).unwrap_or_else(|e| fail(&format!("{file}: {e}"))),
    );
    let started = Instant::now();
    let mut sent = 0u64;
    for line in reader.split(b'\n') {
        let line = line.unwrap_or_else(|e| fail(&format!("reading {file}: {e}")));
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let key = serde_json::from_slice::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| {
                v["customer_id"]
                    .as_str()
                    .map(|c| rules::normalize(c).into_owned())
            });
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&topic).payload(&line[..]);
        if let Some(key) = &key {
            record = record.key(key.as_str());
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    producer.poll(Duration::from_millis(5));
                    record = r;
                }
                Err((e, _)) => fail(&format!("producing: {e}")),
            }
        }
        sent += 1;
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(120))
        .unwrap_or_else(|e| fail(&format!("flush: {e}")));
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
