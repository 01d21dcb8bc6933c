//! Events read from the wrong partition go to the member that owns their customer (issue
//! #21).
//!
//! In a group of several, a customer's state is kept, judged and moved with its partition:
//! Kafka's default partitioner on its id ([`crate::partition::partition_of`]). A producer
//! that keys events by `customer_id` puts each in its customer's partition; one keyed by
//! something else (a session, a device, nothing at all), or an event that names its
//! customer only by `ids`, lands in any partition, and the member reading it may not own
//! the customer. Such a member does not apply it: it produces the event again to the
//! events topic, to the partition of the customer it names ([`IdentityConfig::named_customer`]),
//! keyed by that customer, with the header `tagstream-forwarded` saying where it was first
//! read (`TOPIC:PARTITION:OFFSET`); the owner applies it.
//!
//! - **Nothing lost**: the broker confirms every forward of a batch before the batch — with
//!   the offsets of every event read, forwarded or not — is committed, so a crash in
//!   between reads the batch again instead of dropping what it forwarded.
//! - **Nothing twice**: a forward sent again (after such a crash, or a failed apply) is the
//!   same event: the owner deduplicates it by its `event_id`, or, without one, by the
//!   position in the header, within the dedup horizon as any repeat. An event without an
//!   `event_id` applied where it was read is deduplicated by its own position the same
//!   way ([`mark_positions`]): its reader may have forwarded it before dying, and the
//!   member that took over the partition read it again and owns its customer.
//! - **At most one hop**: the owner consumes the partition it owns and holds (not one it is
//!   still restoring, which is paused), so an event that arrives forwarded is applied where
//!   it arrives, never forwarded again.
//!
//! A member applies an event of a customer of another partition it owns and holds itself:
//! the customer's state moves with its own partition, the offset with the one read.
//! Rejected events stay with the member that read them (its dead letters), and each event
//! is recorded in the data-quality record once, by the member that applies it.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseProducer;

use super::{send_all, KafkaBatch, Outgoing, PublishCtx};
use crate::event::{Rejection, ValidEvent};
use crate::identity::IdentityConfig;

/// The header a forwarded event carries: where it was first read.
pub const FORWARDED_HEADER: &str = "tagstream-forwarded";

/// Where an event of a batch was read.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
    /// `TOPIC:PARTITION:OFFSET` where it was first read, when another member forwarded it.
    pub forwarded: Option<String>,
}

/// A member's producer of forwards.
pub struct Router {
    producer: BaseProducer<PublishCtx>,
    topic: String,
    partitions: u32,
    stop: Arc<AtomicBool>,
}

impl Router {
    pub(super) fn new(
        producer: BaseProducer<PublishCtx>,
        topic: String,
        partitions: u32,
        stop: Arc<AtomicBool>,
    ) -> Router {
        Router {
            producer,
            topic,
            partitions,
            stop,
        }
    }
}

/// A batch's routing: the router, and the partitions the member owned and held when it
/// read the batch (the consumer's thread both reads and applies it, so no rebalance falls
/// in between).
pub struct Routing {
    pub(super) router: Arc<Router>,
    pub(super) owned: BTreeSet<u32>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("topic", &self.router.topic)
            .field("owned", &self.owned)
            .finish()
    }
}

impl Routing {
    /// Forwards the events of `batch` (parsed as `parsed`) whose customer is of a partition
    /// not owned and held here, and returns once the broker confirmed them all; `Ok` says,
    /// per event, whether it is to be applied here.
    pub fn forward(
        &self,
        batch: &KafkaBatch,
        parsed: &[Result<ValidEvent, Rejection>],
        identity: Option<&IdentityConfig>,
    ) -> Result<Vec<bool>, String> {
        let router = &self.router;
        let mut here = vec![true; parsed.len()];
        let mut records = Vec::new();
        for (i, event) in parsed.iter().enumerate() {
            let (Ok(event), Some(origin)) = (event, batch.origins.get(i)) else {
                continue;
            };
            if origin.forwarded.is_some() {
                continue;
            }
            let Some(customer) = named_customer(event, identity) else {
                continue;
            };
            let partition = crate::partition::partition_of(customer.as_bytes(), router.partitions);
            if self.owned.contains(&partition) {
                continue;
            }
            here[i] = false;
            let first_read = first_read(&router.topic, origin);
            records.push(Outgoing {
                key: Some(customer.as_bytes().to_vec()),
                payload: Some(batch.events[i].clone()),
                headers: Some(OwnedHeaders::new().insert(Header {
                    key: FORWARDED_HEADER,
                    value: Some(first_read.as_str()),
                })),
                partition: Some(partition as i32),
            });
        }
        if !records.is_empty() {
            send_all(&router.producer, &router.topic, &records, &router.stop).map_err(|e| {
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

/// In a group of several, gives each event of `batch` without an `event_id` the key it is
/// deduplicated by: where it was first read (the header of a forwarded one, else its own
/// position). The same event applied where it was read and again forwarded — its reader
/// forwarded it, died before committing, and the member taking over read and applied it
/// itself — has one key, and counts once.
pub fn mark_positions(batch: &KafkaBatch, parsed: &mut [Result<ValidEvent, Rejection>]) {
    let Some(routing) = &batch.routing else {
        return;
    };
    for (event, origin) in parsed.iter_mut().zip(&batch.origins) {
        if let Ok(event) = event {
            if event.event_id.is_none() {
                let first_read = match &origin.forwarded {
                    Some(first_read) => first_read.clone(),
                    None => first_read(&routing.router.topic, origin),
                };
                event.position_key = Some(format!("\u{0}read:{first_read}"));
            }
        }
    }
}
