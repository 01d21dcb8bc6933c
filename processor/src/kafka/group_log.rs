//! Reads the changes topic into the group's change log (issue #21, `engine::group_log`): on
//! a member of a group, every node's changes are in the topic, each numbered by its
//! partition (`partition`, `pseq`); each node reads all of them into its store, so any node
//! answers `GET /v1/changes?cursor=` for the whole group — also with the changes of a node
//! that is gone. The reader assigns itself every partition of the topic (no consumer group)
//! and keeps its offsets in the store, in the write that takes the records.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use super::KafkaSettings;
use crate::engine::{GroupRecord, ReadHandle};

/// Most records taken into the store in one write.
const BATCH: usize = 5_000;
/// How often the group log's retention runs.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// What the reader needs of a change record.
#[derive(Deserialize)]
struct Numbered {
    partition: Option<u32>,
    pseq: Option<u64>,
    at: i64,
}

/// Starts reading `topic` (the changes topic) into the group log. Refused, with the reason,
/// when the topic's partitions are not the engine's: then partition P of the topic would not
/// hold exactly partition P's changes in their order.
pub fn follow(
    settings: &KafkaSettings,
    topic: &str,
    reader: ReadHandle,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, String> {
    if let Some(other) = settings
        .client_options
        .get("partitioner")
        .filter(|p| !p.starts_with("murmur2"))
    {
        return Err(format!(
            "`partitioner = {other}` in the Kafka options: the changes topic must be partitioned as Kafka's default partitioner (murmur2) does, so that its partition P holds engine partition P's changes"
        ));
    }
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", format!("{}-group-log", settings.group_id))
        // A webhook of the group waits on this reader: a broker that holds a fetch for its
        // whole wait when nothing is there yet (tansu does) would add up to librdkafka's
        // default 500 ms to a delivery (bench/RESULTS.md, session 59).
        .set("fetch.wait.max.ms", "100")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .map_err(|e| format!("connecting to read the changes topic `{topic}`: {e}"))?;
    let found = super::partition_count(&consumer, topic, Duration::from_secs(10))?;
    let partitions = reader.partitions();
    if found != partitions as usize {
        return Err(format!(
            "the changes topic `{topic}` has {found} partitions and [engine] partitions is {partitions}: the group's change log needs them equal (create the topic with {partitions})"
        ));
    }
    let offsets = reader
        .group_log_offsets()
        .map_err(|e| format!("reading where the group log stands: {e}"))?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        let offset = offsets
            .get(&partition)
            .map_or(Offset::Beginning, |next| Offset::Offset(*next));
        assignment
            .add_partition_offset(topic, partition, offset)
            .map_err(|e| e.to_string())?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assigning the changes topic `{topic}`: {e}"))?;
    let topic = topic.to_owned();
    std::thread::Builder::new()
        .name("tagstream-group-log".into())
        .spawn(move || read(consumer, &topic, reader, &stop))
        .map_err(|e| e.to_string())
}

fn read(consumer: BaseConsumer, topic: &str, reader: ReadHandle, stop: &AtomicBool) {
    let mut trimmed = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if trimmed.elapsed() > TRIM_EVERY {
            trimmed = Instant::now();
            if let Err(e) = reader.group_log_trim(reader.changes_retention) {
                tracing::warn!(error = %e, "trimming the group log failed");
            }
        }
        let mut records = Vec::new();
        let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
        let mut skipped = 0u64;
        let mut wait = Duration::from_millis(100);
        while records.len() < BATCH {
            let Some(message) = consumer.poll(wait) else { break };
            wait = Duration::ZERO;
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, topic, "reading the changes topic");
                    break;
                }
            };
            offsets.insert(message.partition(), message.offset() + 1);
            let payload = message.payload().unwrap_or_default();
            match serde_json::from_slice::<Numbered>(payload) {
                Ok(Numbered {
                    partition: Some(partition),
                    pseq: Some(pseq),
                    at,
                }) if partition as i32 == message.partition() => records.push(GroupRecord {
                    partition,
                    pseq,
                    at,
                    json: payload.to_vec(),
                }),
                // A change of a node outside a group (no number), or not a change.
                _ => skipped += 1,
            }
        }
        if offsets.is_empty() {
            continue;
        }
        match reader.group_log_append(&records, &offsets) {
            Ok(outcome) => {
                let counter = |outcome: &'static str, n: u64| {
                    metrics::counter!("tagstream_group_log_records_total", "outcome" => outcome).increment(n)
                };
                counter("added", outcome.added as u64);
                counter("repeated", outcome.repeated as u64 - outcome.conflicting as u64);
                counter("conflicting", outcome.conflicting as u64);
                counter("gap", outcome.gaps as u64);
                counter("skipped", skipped);
            }
            Err(e) => {
                // Nothing of the batch was written: read it again from where the store says.
                tracing::error!(error = %e, "writing the group log failed; reading again");
                std::thread::sleep(Duration::from_secs(1));
                rewind(&consumer, topic, &reader);
            }
        }
    }
}

/// Seeks every partition back to the offset the store kept.
fn rewind(consumer: &BaseConsumer, topic: &str, reader: &ReadHandle) {
    let Ok(offsets) = reader.group_log_offsets() else {
        return;
    };
    for partition in 0..reader.partitions() as i32 {
        let offset = offsets
            .get(&partition)
            .map_or(Offset::Beginning, |next| Offset::Offset(*next));
        if let Err(e) = consumer.seek(topic, partition, offset, Duration::from_secs(5)) {
            tracing::warn!(error = %e, partition, "seeking the changes topic back");
        }
    }
}
