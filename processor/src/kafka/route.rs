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

/// The header of an event the group's identity resolver sent to its customer's partition
/// (`docs/design/cluster.md` §6, [`crate::engine::Resolved`]): the customer it is applied
/// to, and after a NUL the customer its best identifier first came with when another.
pub const RESOLVED_HEADER: &str = "tagstream-resolved";

/// The header of a record that is not an event but a [`Request`] (its JSON value): a merge
/// by hand for the resolver (to partition 0), or a customer to hand over (to its partition).
pub const REQUEST_HEADER: &str = "tagstream-request";

/// What a member asks of a partition's owner through the events topic, in that partition's
/// order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// To partition 0, whose owner holds the group's identity graph: `absorbed` join
    /// `survivor` ([`crate::Engine::merge_requested`]).
    Merge {
        survivor: String,
        absorbed: Vec<String>,
        cause: String,
    },
    /// To the absorbed customer's partition: it is handed over to `survivor`
    /// ([`crate::Engine::hand_over_requested`]).
    HandOver {
        absorbed: String,
        survivor: String,
        cause: String,
    },
    /// To the survivor's partition: the resolver merged `absorbed` into `survivor`
    /// ([`crate::Engine::merge_noticed`]).
    Merging { survivor: String, absorbed: String },
    /// To partition 0: `split` (customers merged into `survivor`) are split off it again
    /// ([`crate::Engine::unmerge_requested`]); `id` names the unmerge.
    Unmerge {
        survivor: String,
        split: Vec<String>,
        cause: String,
        id: String,
    },
    /// To the partition of `at`: a split the resolver decided, on its way to the store that
    /// holds the customer's events ([`crate::Engine::split_requested`]).
    Split {
        customer: String,
        at: String,
        members: Vec<String>,
        cause: String,
        id: String,
    },
}

impl Request {
    /// A [`Request::Split`]'s request as the engine takes it.
    pub fn split_request(
        customer: &str,
        at: &str,
        members: &[String],
        cause: &str,
        id: &str,
        partitions: u32,
    ) -> crate::SplitRequest {
        crate::SplitRequest {
            partition: crate::partition::partition_of(at.as_bytes(), partitions),
            customer: Arc::from(customer),
            at: Arc::from(at),
            members: members.iter().map(|m| Arc::from(m.as_str())).collect(),
            cause: cause.to_owned(),
            id: id.to_owned(),
        }
    }
}

/// Where an event of a batch was read.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
    /// `TOPIC:PARTITION:OFFSET` where it was first read, when another member forwarded it.
    pub forwarded: Option<String>,
    /// The customer the group's resolver decided it belongs to ([`RESOLVED_HEADER`]).
    pub resolved: Option<crate::engine::Resolved>,
}

/// A [`RESOLVED_HEADER`]'s value.
pub fn resolved_header(resolved: &crate::engine::Resolved) -> String {
    match &resolved.origin {
        Some(origin) => format!("{}\0{origin}", resolved.canonical),
        None => resolved.canonical.to_string(),
    }
}

/// Reads a [`RESOLVED_HEADER`]'s value.
pub fn parse_resolved(value: &[u8]) -> Option<crate::engine::Resolved> {
    let value = std::str::from_utf8(value).ok()?;
    let (canonical, origin) = match value.split_once('\0') {
        Some((canonical, origin)) => (canonical, Some(Arc::from(origin))),
        None => (value, None),
    };
    (!canonical.is_empty()).then(|| crate::engine::Resolved {
        canonical: Arc::from(canonical),
        origin,
    })
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
    /// Identity is resolved in partition 0 ([`crate::EngineConfig::resolver`]): events with
    /// identifiers go there first.
    resolver: bool,
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
            resolver: reader.resolver(),
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
            // With a resolver, an event with identifiers is resolved in partition 0 first.
            let to_resolve = self.resolver && event.resolved.is_none() && event.carries_ids();
            let Some(customer) = (match &event.resolved {
                Some(resolved) => Some(std::borrow::Cow::Borrowed(&*resolved.canonical)),
                None => named_customer(event, identity),
            }) else {
                continue;
            };
            // A customer handed over from here goes on to its survivor's partition, even
            // when it arrived forwarded (sent before the handover was known).
            let moved = match to_resolve {
                true => None,
                false => self.reader.moved_to(&customer),
            };
            let origin = match from {
                Where::Read(origins) => match origins.get(i) {
                    Some(origin) if origin.forwarded.is_none() || moved.is_some() => Some(origin),
                    _ => continue,
                },
                Where::Posted(_) => None,
            };
            // On a group's resolver the survivor's store does not know the absorbed id: the
            // event goes on named by the survivor.
            let resolved = match (&moved, self.resolver) {
                (Some(survivor), true) => Some(crate::engine::Resolved {
                    canonical: survivor.clone(),
                    origin: event
                        .resolved
                        .as_ref()
                        .and_then(|r| r.origin.clone())
                        .or_else(|| Some(Arc::from(customer.as_ref()))),
                }),
                _ => None,
            };
            let customer = match moved {
                Some(survivor) => std::borrow::Cow::Owned(survivor.to_string()),
                None => customer,
            };
            let partition = match to_resolve {
                true => 0,
                false => crate::partition::partition_of(customer.as_bytes(), self.partitions),
            };
            let stays = match (from, origin) {
                (Where::Posted(owned), _) => owned.contains(&partition),
                (Where::Read(_), Some(origin)) => origin.partition == partition as i32,
                (Where::Read(_), None) => true,
            };
            if stays {
                continue;
            }
            here[i] = false;
            let mut headers = origin.map(|origin| {
                let first_read = match &origin.forwarded {
                    Some(first) => first.clone(),
                    None => first_read(&self.topic, origin),
                };
                OwnedHeaders::new().insert(Header {
                    key: FORWARDED_HEADER,
                    value: Some(first_read.as_str()),
                })
            });
            if let Some(resolved) = &resolved {
                let value = resolved_header(resolved);
                headers = Some(headers.unwrap_or_default().insert(Header {
                    key: RESOLVED_HEADER,
                    value: Some(value.as_str()),
                }));
            }
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

impl Router {
    /// Sends the records the group's resolver made ([`crate::ReadHandle::resolver_outbox`]),
    /// in order, and returns once the broker confirmed them all.
    pub fn send_resolved(&self, pending: &[crate::PendingRecord]) -> Result<(), String> {
        let records: Vec<Outgoing> = pending.iter().map(|p| resolver_record(&p.record)).collect();
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        send_all(&self.producer, &self.topic, &records, &self.stop)
            .map_err(|e| format!("sending {} records of the identity resolver: {e}", records.len()))?;
        metrics::counter!("tagstream_kafka_resolved_sent_total").increment(records.len() as u64);
        Ok(())
    }

    /// Sends a merge by hand to partition 0, whose owner holds the group's identity graph,
    /// and returns once the broker confirmed it.
    pub fn send_merge(&self, survivor: &str, absorbed: &[String], cause: &str) -> Result<(), String> {
        let request = Request::Merge {
            survivor: survivor.to_owned(),
            absorbed: absorbed.to_vec(),
            cause: cause.to_owned(),
        };
        let record = request_record(&request, survivor, 0);
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        send_all(&self.producer, &self.topic, &[record], &self.stop)
            .map_err(|e| format!("sending a merge to the identity resolver (partition 0): {e}"))
    }

    /// Sends an unmerge by hand to partition 0, whose owner holds the group's identity
    /// graph, and returns once the broker confirmed it.
    pub fn send_unmerge(
        &self,
        survivor: &str,
        split: &[String],
        cause: &str,
        id: &str,
    ) -> Result<(), String> {
        let request = Request::Unmerge {
            survivor: survivor.to_owned(),
            split: split.to_vec(),
            cause: cause.to_owned(),
            id: id.to_owned(),
        };
        let record = request_record(&request, survivor, 0);
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        send_all(&self.producer, &self.topic, &[record], &self.stop)
            .map_err(|e| format!("sending an unmerge to the identity resolver (partition 0): {e}"))
    }

    /// Sends a split request on to the partition of the store it asks next
    /// ([`crate::Engine::split_requested`]), and returns once the broker confirmed it.
    pub fn send_split(&self, split: &crate::SplitRequest) -> Result<(), String> {
        let record = resolver_record(&crate::ResolverRecord::Split(split.clone()));
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        send_all(&self.producer, &self.topic, &[record], &self.stop)
            .map_err(|e| format!("sending a split on to partition {}: {e}", split.partition))
    }
}

/// The record that carries a resolver's record to its partition.
fn resolver_record(record: &crate::ResolverRecord) -> Outgoing {
    match record {
        crate::ResolverRecord::Event(e) => {
            let mut headers = OwnedHeaders::new();
            if let Some(first_read) = &e.first_read {
                headers = headers.insert(Header {
                    key: FORWARDED_HEADER,
                    value: Some(first_read.as_str()),
                });
            }
            let resolved = resolved_header(&e.resolved);
            Outgoing {
                key: Some(e.resolved.canonical.as_bytes().to_vec()),
                payload: Some(e.raw.clone()),
                headers: Some(headers.insert(Header {
                    key: RESOLVED_HEADER,
                    value: Some(resolved.as_str()),
                })),
                partition: Some(e.partition as i32),
            }
        }
        crate::ResolverRecord::HandOver(h) => {
            let request = Request::HandOver {
                absorbed: h.absorbed.to_string(),
                survivor: h.survivor.to_string(),
                cause: h.cause.clone(),
            };
            request_record(&request, &h.absorbed, h.partition)
        }
        crate::ResolverRecord::Merging(h) => {
            let request = Request::Merging {
                survivor: h.survivor.to_string(),
                absorbed: h.absorbed.to_string(),
            };
            request_record(&request, &h.survivor, h.partition)
        }
        crate::ResolverRecord::Split(s) => {
            let request = Request::Split {
                customer: s.customer.to_string(),
                at: s.at.to_string(),
                members: s.members.iter().map(|m| m.to_string()).collect(),
                cause: s.cause.clone(),
                id: s.id.clone(),
            };
            request_record(&request, &s.at, s.partition)
        }
    }
}

fn request_record(request: &Request, key: &str, partition: u32) -> Outgoing {
    Outgoing {
        key: Some(key.as_bytes().to_vec()),
        payload: Some(serde_json::to_vec(request).expect("a request serialises")),
        headers: Some(OwnedHeaders::new().insert(Header {
            key: REQUEST_HEADER,
            value: Some("1"),
        })),
        partition: Some(partition as i32),
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
/// deduplicated by: where it was first read — with a resolver, also one with identifiers
/// read in partition 0 (where it is resolved, and sent on with that key).
pub fn mark_forwarded(batch: &KafkaBatch, parsed: &mut [Result<ValidEvent, Rejection>]) {
    // The topic, on a member whose partition 0 resolves identity.
    let resolving = batch
        .router
        .as_ref()
        .filter(|router| router.resolver)
        .map(|router| router.topic.as_str());
    for (event, origin) in parsed.iter_mut().zip(&batch.origins) {
        let Ok(event) = event else {
            continue;
        };
        if event.event_id.is_some() {
            continue;
        }
        let first_read = match &origin.forwarded {
            Some(first_read) => first_read.clone(),
            None if origin.partition == 0 && event.resolved.is_none() && event.carries_ids() => {
                match resolving {
                    Some(topic) => first_read(topic, origin),
                    None => continue,
                }
            }
            None => continue,
        };
        event.position_key = Some(format!("\u{0}forwarded:{first_read}"));
    }
}

/// Names each event of `batch` the group's resolver sent with the customer it decided
/// ([`RESOLVED_HEADER`]).
pub fn mark_resolved(batch: &KafkaBatch, parsed: &mut [Result<ValidEvent, Rejection>]) {
    for (event, origin) in parsed.iter_mut().zip(&batch.origins) {
        if let (Ok(event), Some(resolved)) = (event, &origin.resolved) {
            event.resolved = Some(resolved.clone());
        }
    }
}
