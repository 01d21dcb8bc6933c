//! Events read from the wrong partition go to the partition of their customer (issue #21).
//!
//! In a group of several, a customer's state is kept, judged and moved with its partition:
//! Kafka's default partitioner on its id ([`crate::partition::partition_of`]), and a
//! partition's Kafka offset travels with its state in the state changelog, so a restore
//! resumes exactly where the state ends. A producer that keys events by `customer_id` puts
//! each in its customer's partition; one keyed by something else (a session, a device,
//! nothing at all), or an event that names its customer only by `ids`, lands in any
//! partition. The member reading such an event does not apply it, even when it owns the
//! customer's partition too (the event's offset and its effect would then be in two
//! partitions' changelogs, which a crash can cut apart — losing the event, or applying it
//! again): it produces it again to the events topic, to the partition of the customer it
//! names ([`IdentityConfig::named_customer`]), keyed by that customer, with the header
//! `tagstream-forwarded` saying where it was first read (`TOPIC:PARTITION:OFFSET`); the
//! owner of that partition applies it there, with that partition's offset.
//!
//! - **Nothing lost**: the broker confirms every forward of a batch before the batch — with
//!   the offsets of every event read, forwarded or not — is committed, so a crash in
//!   between reads the batch again instead of dropping what it forwarded.
//! - **Nothing twice** (within the dedup horizon): a forward sent again (after such a
//!   crash, or a failed apply) is the same event: the owner deduplicates it by its
//!   `event_id`, or, without one, by the position in the header ([`mark_forwarded`]).
//! - **At most one hop**: an event that arrives forwarded is in its customer's partition
//!   and is applied where it arrives — unless its customer was handed over from there to a
//!   survivor of another partition since (a merge across partitions,
//!   [`crate::engine::Engine::hand_over`]): then it goes on to the survivor's, keeping the
//!   header of where it was first read. Every event naming a customer handed over goes to
//!   its survivor's partition, whose store knows the id as the survivor's.
//!
//! Rejected events stay with the member that read them (its dead letters), and each event
//! is recorded in the data-quality record once, by the member that applies it. Events
//! posted over HTTP to a member that owns only some partitions are sent the same way to
//! the partitions it does not own (without the header: they are first read there).

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseProducer;

use super::{send_all, KafkaBatch, Outgoing, PublishCtx};
use crate::event::{Rejection, ValidEvent};
use crate::identity::IdentityConfig;

/// The header a forwarded event carries: where it was first read.
pub const FORWARDED_HEADER: &str = "tagstream-forwarded";

/// The header of a record that is not an event but a customer handed over to a survivor
/// of its partition (a merge across partitions, [`crate::engine::Engine::hand_over`]): the
/// absorbed customer's id. The record's value is the handover's frame.
pub const HANDOVER_HEADER: &str = "tagstream-handover";

/// Where an event of a batch was read.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
    /// `TOPIC:PARTITION:OFFSET` where it was first read, when another member forwarded it.
    pub forwarded: Option<String>,
}

/// Where events to route come from.
#[derive(Clone, Copy)]
pub enum Where<'a> {
    /// Read from the events topic, each at its origin: one read from a partition other
    /// than its customer's is forwarded (an event that arrived forwarded stays), with the
    /// header naming where it was first read.
    Read(&'a [Origin]),
    /// Posted over HTTP to a member owning these partitions (and holding them): one of a
    /// customer of another partition is sent there, without the header.
    Posted(&'a BTreeSet<u32>),
}

/// A member's producer of forwards.
pub struct Router {
    producer: BaseProducer<PublishCtx>,
    /// Held while a batch of forwards is sent (the consumer's thread and HTTP ingest).
    sending: Mutex<()>,
    topic: String,
    partitions: u32,
    /// Which customers this store handed over to survivors of other partitions
    /// ([`crate::ReadHandle::moved_to`]): events naming them go to the survivor's.
    reader: crate::ReadHandle,
    stop: Arc<AtomicBool>,
}

impl Router {
    pub(super) fn new(
        producer: BaseProducer<PublishCtx>,
        topic: String,
        reader: crate::ReadHandle,
        stop: Arc<AtomicBool>,
    ) -> Router {
        Router {
            producer,
            sending: Mutex::new(()),
            topic,
            partitions: reader.partitions(),
            reader,
            stop,
        }
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl Router {
    /// Sends each of `events` (parsed as `parsed`) to the partition of the customer it
    /// names, keyed by that customer, when `Where` says it is not to be applied here, and
    /// returns once the broker confirmed them all; `Ok` says, per event, whether it is to
    /// be applied here.
    pub fn forward<B: AsRef<[u8]>>(
        &self,
        events: &[B],
        parsed: &[Result<ValidEvent, Rejection>],
        from: Where<'_>,
        identity: Option<&IdentityConfig>,
    ) -> Result<Vec<bool>, String> {
        let mut here = vec![true; parsed.len()];
        let mut records = Vec::new();
        for (i, event) in parsed.iter().enumerate() {
            let Ok(event) = event else {
                continue;
            };
            let Some(customer) = named_customer(event, identity) else {
                continue;
            };
            // A customer handed over from here goes on to its survivor's partition, even
            // when it arrived forwarded (sent before the handover was known).
            let moved = self.reader.moved_to(&customer);
            let origin = match from {
                Where::Read(origins) => match origins.get(i) {
                    Some(origin) if origin.forwarded.is_none() || moved.is_some() => Some(origin),
                    _ => continue,
                },
                Where::Posted(_) => None,
            };
            let customer = match moved {
                Some(survivor) => std::borrow::Cow::Owned(survivor.to_string()),
                None => customer,
            };
            let partition = crate::partition::partition_of(customer.as_bytes(), self.partitions);
            let stays = match (from, origin) {
                (Where::Posted(owned), _) => owned.contains(&partition),
                (Where::Read(_), Some(origin)) => origin.partition == partition as i32,
                (Where::Read(_), None) => true,
            };
            if stays {
                continue;
            }
            here[i] = false;
            let headers = origin.map(|origin| {
                let first_read = match &origin.forwarded {
                    Some(first) => first.clone(),
                    None => first_read(&self.topic, origin),
                };
                OwnedHeaders::new().insert(Header {
                    key: FORWARDED_HEADER,
                    value: Some(first_read.as_str()),
                })
            });
            records.push(Outgoing {
                key: Some(customer.as_bytes().to_vec()),
                payload: Some(events[i].as_ref().to_vec()),
                headers,
                partition: Some(partition as i32),
            });
        }
        if !records.is_empty() {
            // One sender at a time: the producer's failure slot is the batch's.
            let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
            send_all(&self.producer, &self.topic, &records, &self.stop).map_err(|e| {
                format!(
                    "forwarding {} events to their partitions' owners: {e}",
                    records.len()
                )
            })?;
            metrics::counter!("tagstream_kafka_forwarded_total").increment(records.len() as u64);
        }
        Ok(here)
    }
}

impl Router {
    /// Sends the events the engine handed back unapplied ([`crate::IngestOutcome::moved`]:
    /// their partitions moved away between the ownership check and the apply) to their
    /// customers' partitions, and returns once the broker confirmed them all.
    pub fn forward_moved(
        &self,
        moved: &[crate::MovedEvent],
        identity: Option<&IdentityConfig>,
    ) -> Result<(), String> {
        let raw: Vec<&[u8]> = moved.iter().map(|m| m.raw.as_slice()).collect();
        let parsed: Vec<Result<ValidEvent, Rejection>> = moved.iter().map(|m| Ok(m.event.clone())).collect();
        let nowhere = BTreeSet::new();
        let here = self.forward(&raw, &parsed, Where::Posted(&nowhere), identity)?;
        match here.iter().filter(|&&stays| stays).count() {
            0 => Ok(()),
            n => Err(format!("{n} of them name no customer")),
        }
    }
}

impl Router {
    /// Sends a handover's `frame` (`absorbed` handed over to `survivor`) to the survivor's
    /// partition, keyed by the survivor, and returns once the broker confirmed it.
    pub fn send_handover(&self, absorbed: &str, survivor: &str, frame: &[u8]) -> Result<(), String> {
        let partition = crate::partition::partition_of(survivor.as_bytes(), self.partitions);
        let record = Outgoing {
            key: Some(survivor.as_bytes().to_vec()),
            payload: Some(frame.to_vec()),
            headers: Some(OwnedHeaders::new().insert(Header {
                key: HANDOVER_HEADER,
                value: Some(absorbed),
            })),
            partition: Some(partition as i32),
        };
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        send_all(&self.producer, &self.topic, &[record], &self.stop)
            .map_err(|e| format!("sending `{absorbed}`'s handover to partition {partition}: {e}"))?;
        metrics::counter!("tagstream_kafka_handovers_sent_total").increment(1);
        Ok(())
    }
}

/// The customer an event names ([`IdentityConfig::named_customer`]): the partition it
/// is sent to.
pub fn named_customer<'a>(
    event: &'a ValidEvent,
    identity: Option<&IdentityConfig>,
) -> Option<std::borrow::Cow<'a, str>> {
    match (&event.prepared, identity) {
        (Some(prepared), Some(identity)) => identity.named_customer(&event.customer_id, prepared),
        _ if event.customer_id.is_empty() => None,
        _ => Some(std::borrow::Cow::Borrowed(&event.customer_id)),
    }
}

/// Where an event was read: `TOPIC:PARTITION:OFFSET`.
fn first_read(topic: &str, origin: &Origin) -> String {
    format!("{topic}:{}:{}", origin.partition, origin.offset)
}

/// Gives each event of `batch` that arrived forwarded without an `event_id` the key it is
/// deduplicated by: where it was first read.
pub fn mark_forwarded(batch: &KafkaBatch, parsed: &mut [Result<ValidEvent, Rejection>]) {
    for (event, origin) in parsed.iter_mut().zip(&batch.origins) {
        if let (Ok(event), Some(first_read)) = (event, &origin.forwarded) {
            if event.event_id.is_none() {
                event.position_key = Some(format!("\u{0}forwarded:{first_read}"));
            }
        }
    }
}
