//! Producing event lines to Kafka the way a CRM integration would: one message per line,
//! keyed by the normalised `customer_id` so a customer's events stay in one partition and in
//! order. Used by `kafkaload` and by the Kafka tests.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// An idempotent producer: a retried request never puts a line in the topic twice.
pub fn producer(brokers: &str) -> KafkaResult<BaseProducer> {
    producer_with(brokers, &[])
}

/// [`producer`] with more librdkafka options (`security.protocol`, `ssl.*`, `sasl.*`, ...).
pub fn producer_with(brokers: &str, options: &[(&str, &str)]) -> KafkaResult<BaseProducer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        // Kafka's default partitioner (the Java client's), not librdkafka's CRC32 one: a
        // customer's events land in the partition the engine hashes the customer to.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000");
    for (key, value) in options {
        config.set(*key, *value);
    }
    config.create()
}

/// The message key of an event line: its normalised `customer_id`; `None` for lines that
/// have none (malformed ones go unkeyed, as a real integration would send them).
pub fn customer_key(line: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(line).ok()?;
    Some(rules::normalize(value["customer_id"].as_str()?).into_owned())
}

/// Produces every line (blank ones skipped), keyed by [`customer_key`], waits until the
/// broker has them all, and returns how many were sent.
pub fn produce<L: AsRef<[u8]>>(
    producer: &BaseProducer,
    topic: &str,
    lines: impl IntoIterator<Item = L>,
) -> KafkaResult<u64> {
    produce_keyed(producer, topic, lines, true)
}

/// [`produce`], or with `keyed` false every line unkeyed (a random partition each, as a
/// producer that does not key by customer sends them).
pub fn produce_keyed<L: AsRef<[u8]>>(
    producer: &BaseProducer,
    topic: &str,
    lines: impl IntoIterator<Item = L>,
    keyed: bool,
) -> KafkaResult<u64> {
    let mut sent = 0;
    for line in lines {
        let line = line.as_ref();
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let key = keyed.then(|| customer_key(line)).flatten();
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).payload(line);
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
                Err((e, _)) => return Err(e),
            }
        }
        sent += 1;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(sent)
}
