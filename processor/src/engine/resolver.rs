//! Identity resolved in one partition of a group (issue #21, `docs/design/cluster.md` §6,
//! [`EngineConfig::resolver`]).
//!
//! On one store an event's identifiers are resolved, the graph changed and the event
//! applied in one commit ([`super::identity`]). In a group the customers an event's
//! identifiers name may live in partitions other nodes own, and deciding a merge needs all
//! of their graph entries read and written together. So the whole graph is the state of
//! one partition, partition 0 ([`crate::changelog::Family::partition_of_write`]), and moves
//! with it; the members send every event that carries `ids` there
//! ([`crate::kafka::route`]). Its owner resolves them in that partition's order and, in one
//! commit with that partition's offset:
//!
//! - changes the graph as one store would (identifiers attached, merges decided, the
//!   absorbed customers' identifiers re-pointed);
//! - keeps, in the partition's outbox of records to send (`r` + a sequence number), a
//!   *handover request* to each absorbed customer's partition (its owner hands the
//!   customer over to the survivor, [`Engine::hand_over_requested`], whose store takes the
//!   frame as a merge) and the event itself, named by its canonical customer and the
//!   origin an unmerge would need ([`Resolved`]), to that customer's partition.
//!
//! The event is not applied, and not recorded as seen, where it is resolved: the owner of
//! its customer's partition applies it (deduplicated there by its `event_id`, or by where
//! it was first read). The records leave between batches, in order, under the member's
//! lease, and are deleted once the broker confirmed them ([`Engine::resolver_delivered`]);
//! a crash between the two sends them again, which their receivers count once. Between the
//! decision and the handover the person is two customers; events the survivor is sent
//! meanwhile are judged without the absorbed history, and judged again over the union when
//! the frame arrives.

use super::*;
use crate::codec::{CodecError, Reader, Writer};
use crate::store::CF_IDENTITIES;

/// The customer a group's resolver decided an event is applied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub canonical: Arc<str>,
    /// The customer the event's best-ranked known identifier first came with, when another
    /// one (kept with the event for an unmerge).
    pub origin: Option<Arc<str>>,
}

/// A record the resolver sends to another partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolverRecord {
    /// An event, to its canonical customer's partition.
    Event(ResolvedEvent),
    /// A customer a merge absorbed, to be handed over by its partition's owner.
    HandOver(HandOverRequest),
    /// The same merge, to the survivor's partition (`partition` is the survivor's): its
    /// owner notes, in that partition's order, where the survivor stood when the merge was
    /// decided ([`Engine::merge_noticed`]) — what an unmerge gives back to it — before any
    /// event the resolver sent it since, some of which may precede the frame.
    Merging(HandOverRequest),
    /// A customer an unmerge split off, to be taken back from where its events are.
    Split(SplitRequest),
}

/// An event resolved by the group's resolver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEvent {
    pub partition: u32,
    pub resolved: Resolved,
    /// For an event without `event_id`: the key it is deduplicated by where it is applied
    /// (where it was first read, [`crate::kafka::route::mark_forwarded`]).
    pub first_read: Option<String>,
    /// The event as it was sent.
    pub raw: Vec<u8>,
}

/// A merge the resolver decided, to be made by the owner of the absorbed customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOverRequest {
    pub partition: u32,
    pub absorbed: Arc<str>,
    pub survivor: Arc<str>,
    /// The merge's cause, as the change log writes it ([`Cause::as_string`]).
    pub cause: String,
}

/// An unmerge the resolver decided ([`Engine::unmerge_customers`] in a group), on its way
/// to the store that holds the split customer's events ([`Engine::split_requested`]): first
/// to the split customer's own partition (`at` = `customer`), whose owner handed it over
/// and knows to whom, then on along the handovers that took its events, each hop leaving
/// after the frame it follows, to the store holding them, which splits them off and sends
/// them back to `customer`'s partition in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitRequest {
    /// The partition of `at`: where the request goes next.
    pub partition: u32,
    /// The customer split off.
    pub customer: Arc<str>,
    /// The customer whose store is asked next.
    pub at: Arc<str>,
    /// The customers whose events go back with it: itself and those merged into it before
    /// (each event keeps the customer it came with).
    pub members: Vec<Arc<str>>,
    /// The unmerge's cause, as the change log writes it ([`Cause::as_string`]).
    pub cause: String,
    /// Unique to this split: each store acts on it once.
    pub id: String,
}

impl ResolverRecord {
    /// The partition it goes to.
    pub fn partition(&self) -> u32 {
        match self {
            ResolverRecord::Event(e) => e.partition,
            ResolverRecord::HandOver(h) | ResolverRecord::Merging(h) => h.partition,
            ResolverRecord::Split(s) => s.partition,
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.write(&mut w);
        w.buf
    }

    fn write(&self, w: &mut Writer) {
        match self {
            ResolverRecord::Event(e) => {
                w.u8(1);
                w.u64(u64::from(e.partition));
                w.str(&e.resolved.canonical);
                w.str(e.resolved.origin.as_deref().unwrap_or(""));
                w.str(e.first_read.as_deref().unwrap_or(""));
                w.bytes(&e.raw);
            }
            ResolverRecord::HandOver(h) | ResolverRecord::Merging(h) => {
                w.u8(if matches!(self, ResolverRecord::HandOver(_)) {
                    2
                } else {
                    4
                });
                w.u64(u64::from(h.partition));
                w.str(&h.absorbed);
                w.str(&h.survivor);
                w.str(&h.cause);
            }
            ResolverRecord::Split(s) => {
                w.u8(3);
                w.u64(u64::from(s.partition));
                w.str(&s.customer);
                w.str(&s.at);
                w.u64(s.members.len() as u64);
                for member in &s.members {
                    w.str(member);
                }
                w.str(&s.cause);
                w.str(&s.id);
            }
        }
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<ResolverRecord, CodecError> {
        let mut r = Reader::new(bytes);
        let kind = r.u8()?;
        let partition = u32::try_from(r.u64()?).map_err(|_| CodecError("a resolver record's partition"))?;
        let record = match kind {
            1 => {
                let canonical = r.arc_str()?;
                let origin = r.arc_str()?;
                let first_read = r.str()?;
                ResolverRecord::Event(ResolvedEvent {
                    partition,
                    resolved: Resolved {
                        canonical,
                        origin: (!origin.is_empty()).then_some(origin),
                    },
                    first_read: (!first_read.is_empty()).then(|| first_read.to_owned()),
                    raw: r.bytes()?.to_vec(),
                })
            }
            2 | 4 => {
                let request = HandOverRequest {
                    partition,
                    absorbed: r.arc_str()?,
                    survivor: r.arc_str()?,
                    cause: r.str()?.to_owned(),
                };
                match kind {
                    2 => ResolverRecord::HandOver(request),
                    _ => ResolverRecord::Merging(request),
                }
            }
            3 => {
                let (customer, at) = (r.arc_str()?, r.arc_str()?);
                let mut members = Vec::new();
                for _ in 0..r.len()? {
                    members.push(r.arc_str()?);
                }
                ResolverRecord::Split(SplitRequest {
                    partition,
                    customer,
                    at,
                    members,
                    cause: r.str()?.to_owned(),
                    id: r.str()?.to_owned(),
                })
            }
            _ => return Err(CodecError("a resolver record of an unknown kind")),
        };
        if !r.is_empty() {
            return Err(CodecError("bytes after a resolver record's end"));
        }
        Ok(record)
    }
}

/// A record waiting in the resolver's outbox, under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    pub key: Vec<u8>,
    pub record: ResolverRecord,
}

/// The outbox key of the resolver's record number `seq`: `r` + `seq` big-endian, so that
/// the records sort in the order they were made.
fn record_key(seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(b'r');
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The number of the resolver's record under `key`, if it is one.
fn seq_of(key: &[u8]) -> Option<u64> {
    match (key.first(), key.get(1..9)) {
        (Some(b'r'), Some(seq)) if key.len() == 9 => {
            Some(u64::from_be_bytes(seq.try_into().expect("8 bytes")))
        }
        _ => None,
    }
}

/// The dedup key prefix a forwarded event's first-read position makes
/// ([`crate::kafka::route::mark_forwarded`]).
const FORWARDED_KEY: &str = "\u{0}forwarded:";

impl Engine {
    /// Resolves an event with identifiers as the group's resolver: the graph changed, and
    /// the handover requests and the event, named by its customer, kept to be sent.
    pub(super) fn resolve_for_group(
        &mut self,
        mut ev: ValidEvent,
        raw: &[u8],
        batch: &mut Batch,
    ) -> Result<Result<bool, Rejection>, EngineError> {
        let prepared = match ev.prepared.take() {
            Some(prepared) => prepared,
            None => match self.config.identity.prepare(&ev.ids, &ev.customer_id) {
                Ok(prepared) => prepared,
                Err(rejection) => return Ok(Err(rejection)),
            },
        };
        let resolution = match self.resolve(&ev.customer_id, prepared, batch)? {
            Ok(r) => r,
            Err(rejection) => return Ok(Err(rejection)),
        };
        // The arrival is spent here (records are created in the resolver's order, which
        // decides survivors); the event gets its own where it is applied.
        let arrival = self.counters.next_arrival;
        self.counters.next_arrival += 1;
        self.settle_graph(&resolution, arrival, batch)?;
        let canonical = resolution.canonical.clone();
        let cause = Cause::Event(ev.event_id.clone()).as_string();
        self.keep_merge_records(&canonical, &resolution.absorbed, &cause, batch)?;
        let first_read = match (&ev.event_id, ev.position_key.take()) {
            (Some(_), _) => None,
            (None, Some(key)) => Some(key.strip_prefix(FORWARDED_KEY).map_or(key.clone(), str::to_owned)),
            // Read here, without an id to know it by: named after this record.
            (None, None) => Some(format!(
                "resolver:{:x}.{:x}",
                wall_ms(),
                self.next_resolver_seq(batch)?
            )),
        };
        let event = ResolverRecord::Event(ResolvedEvent {
            partition: self.partition_of(&canonical),
            resolved: Resolved {
                origin: resolution.origin.filter(|o| *o != canonical),
                canonical,
            },
            first_read,
            raw: raw.to_vec(),
        });
        self.keep_resolver_record(&event, batch)?;
        Ok(Ok(true))
    }

    /// The records of a merge the resolver decided: per absorbed customer a handover
    /// request to its partition, and a notice to the survivor's.
    fn keep_merge_records(
        &mut self,
        survivor: &Arc<str>,
        absorbed: &[Arc<str>],
        cause: &str,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        for customer in absorbed {
            let request = HandOverRequest {
                partition: self.partition_of(customer),
                absorbed: customer.clone(),
                survivor: survivor.clone(),
                cause: cause.to_owned(),
            };
            let notice = ResolverRecord::Merging(HandOverRequest {
                partition: self.partition_of(survivor),
                ..request.clone()
            });
            self.keep_resolver_record(&ResolverRecord::HandOver(request), batch)?;
            self.keep_resolver_record(&notice, batch)?;
        }
        Ok(())
    }

    pub(super) fn keep_resolver_record(
        &mut self,
        record: &ResolverRecord,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        let seq = self.next_resolver_seq(batch)?;
        self.next_resolved.set(seq + 1);
        self.identity_put(batch, record_key(seq), Some(record.encode()));
        Ok(())
    }

    /// The number the resolver's next record gets: after the last one the store holds
    /// (read once, then counted here).
    fn next_resolver_seq(&self, batch: &Batch) -> Result<u64, StoreError> {
        if self.next_resolved.get() == 0 {
            let mut next = 1;
            if let Some(item) = self
                .store
                .scan_back_from(CF_IDENTITIES, &record_key(u64::MAX))
                .next()
            {
                let (key, _) = item?;
                if let Some(seq) = seq_of(&key) {
                    next = seq + 1;
                }
            }
            for key in batch.identities.keys() {
                if let Some(seq) = seq_of(key) {
                    next = next.max(seq + 1);
                }
            }
            // Never below the records already sent and deleted: the outbox is read from
            // there ([`ReadHandle::resolver_outbox`]).
            next = next.max(
                self.published
                    .resolver_floor
                    .load(std::sync::atomic::Ordering::Acquire),
            );
            self.next_resolved.set(next);
        }
        Ok(self.next_resolved.get())
    }

    /// [`Engine::merge_customers`] on a group's resolver: the graph merged here, and a
    /// handover request kept for each absorbed customer — its partition's owner hands it
    /// over, the survivor's takes it, and the changes are made there (none here). The
    /// customers are not looked for: the resolver holds the graph, not them.
    pub(super) fn merge_as_resolver(
        &mut self,
        survivor: &str,
        others: &[String],
        by: Option<&str>,
    ) -> Result<Merged, EngineError> {
        let cause = by
            .map_or(Cause::Manual, |k| Cause::ManualBy(k.to_owned()))
            .as_string();
        self.merge_in_graph(survivor, others, cause, &[] as &[(&str, u64)])
    }

    /// A merge by hand a member sent to partition 0 for the group's resolver
    /// ([`crate::kafka::route::REQUEST_HEADER`]), made as [`Engine::merge_customers`] makes
    /// it there, with the partition's next offset (`positions`) in the same commit. One
    /// that cannot be made (its customers are one already: a request delivered twice) is
    /// left out, its position committed: `None`.
    pub fn merge_requested<S: AsRef<str>>(
        &mut self,
        survivor: &str,
        others: &[String],
        cause: &str,
        positions: &[(S, u64)],
    ) -> Result<Option<Merged>, EngineError> {
        self.settle();
        let merged = self.merge_in_graph(survivor, others, cause.to_owned(), positions);
        self.or_left_out(merged, positions)
    }

    fn merge_in_graph<S: AsRef<str>>(
        &mut self,
        survivor: &str,
        others: &[String],
        cause: String,
        positions: &[(S, u64)],
    ) -> Result<Merged, EngineError> {
        if !self.config.resolver || self.parked.partitions.contains(&0) {
            return Err(EngineError::Conflict(
                "the group's identity graph is partition 0's: merge on the node that owns it".into(),
            ));
        }
        let none = Batch::default();
        let canonical = |engine: &Engine, id: &str| -> Result<Arc<str>, EngineError> {
            let id: Arc<str> = Arc::from(rules::normalize(id).as_ref());
            if id.is_empty() {
                return Err(EngineError::NotFound("an empty customer id".into()));
            }
            Ok(engine.graph_canonical(id, &none)?)
        };
        let survivor = canonical(self, survivor)?;
        let absorbed = super::identity::to_absorb(&survivor, others.iter().map(|o| canonical(self, o)))?;
        let resolution = super::identity::Resolution {
            canonical: survivor.clone(),
            absorbed: absorbed.clone(),
            attach: Vec::new(),
            minted: false,
            origin: None,
        };
        self.transact(|engine, batch| {
            let arrival = engine.counters.next_arrival;
            engine.settle_graph(&resolution, arrival, batch)?;
            engine.keep_merge_records(&resolution.canonical, &resolution.absorbed, &cause, batch)?;
            engine.put_positions(batch, positions);
            Ok(())
        })?;
        Ok(Merged {
            survivor,
            absorbed,
            changes: Vec::new(),
        })
    }

    /// [`ReadHandle::resolver_outbox`], once the commit being written is in.
    pub fn resolver_outbox(&mut self) -> Result<Vec<PendingRecord>, EngineError> {
        self.settle();
        self.reader().resolver_outbox()
    }

    /// Records that the resolver's records under `keys` are on their way for good (the
    /// broker confirmed them): they are deleted.
    pub fn resolver_delivered(&mut self, keys: &[Vec<u8>]) -> Result<(), EngineError> {
        self.settle();
        if keys.is_empty() {
            return Ok(());
        }
        self.transact(|engine, batch| {
            for key in keys {
                if key.first() == Some(&b'r') {
                    engine.identity_put(batch, key.clone(), None);
                }
            }
            Ok(())
        })?;
        // Records are sent and deleted in order: the next to send is after these.
        if let Some(last) = keys.iter().filter_map(|key| seq_of(key)).max() {
            self.published
                .resolver_floor
                .fetch_max(last + 1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(())
    }
}

impl ReadHandle {
    /// The records the group's resolver made and has not yet sent for good, in the order
    /// they are to be sent.
    pub fn resolver_outbox(&self) -> Result<Vec<PendingRecord>, EngineError> {
        let mut pending = Vec::new();
        let floor = self
            .published
            .resolver_floor
            .load(std::sync::atomic::Ordering::Acquire);
        for item in self.store.scan_from(CF_IDENTITIES, &record_key(floor)) {
            let (key, value) = item?;
            if key.first() != Some(&b'r') {
                break;
            }
            let record = ResolverRecord::decode(&value).map_err(StoreError::from)?;
            pending.push(PendingRecord {
                key: key.into_vec(),
                record,
            });
        }
        Ok(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written_and_sort_in_the_order_made() {
        let records = [
            ResolverRecord::Event(ResolvedEvent {
                partition: 3,
                resolved: Resolved {
                    canonical: Arc::from("c1"),
                    origin: Some(Arc::from("phone:13800000001")),
                },
                first_read: Some("events:2:17".into()),
                raw: br#"{"type":"view"}"#.to_vec(),
            }),
            ResolverRecord::Event(ResolvedEvent {
                partition: 0,
                resolved: Resolved {
                    canonical: Arc::from("c2"),
                    origin: None,
                },
                first_read: None,
                raw: Vec::new(),
            }),
            ResolverRecord::HandOver(HandOverRequest {
                partition: 5,
                absorbed: Arc::from("c3"),
                survivor: Arc::from("c1"),
                cause: "event:e9".into(),
            }),
            ResolverRecord::Merging(HandOverRequest {
                partition: 1,
                absorbed: Arc::from("c3"),
                survivor: Arc::from("c1"),
                cause: "event:e9".into(),
            }),
            ResolverRecord::Split(SplitRequest {
                partition: 2,
                customer: Arc::from("c3"),
                at: Arc::from("c1"),
                members: vec![Arc::from("c3"), Arc::from("phone:13800000001")],
                cause: "manual:crm".into(),
                id: "split-19a2b-0".into(),
            }),
        ];
        for record in &records {
            assert_eq!(&ResolverRecord::decode(&record.encode()).unwrap(), record);
        }
        let mut bytes = records[2].encode();
        bytes.push(0);
        assert!(ResolverRecord::decode(&bytes).is_err());
        assert!(ResolverRecord::decode(&[9, 0]).is_err());
        assert!(record_key(255) < record_key(256));
        assert!(record_key(1) < record_key(u64::MAX));
    }
}
