//! A merge across stores (issue #21, `docs/design/cluster.md` §6): the absorbed customer
//! leaves in the store that holds it and is handed over, as one frame, to the store that
//! holds its survivor. On one store a merge does both halves in one commit
//! ([`super::identity`]); in a group the two customers may live in partitions two nodes own,
//! so each half is a commit of its own store:
//!
//! 1. [`Engine::hand_over`], where the absorbed customer is held: it leaves every tag and
//!    segment (`remove` changes) and is deleted with its identity graph entries; its
//!    retained events (with the id, origin and profile kept beside each), profile, manual
//!    tags, event tag matches older than the history, graph record and the snapshots of
//!    customers merged into it before go into a frame, kept in the graph under `n` + its
//!    id until [`Engine::handover_delivered`] says it is on its way for good (the broker
//!    confirmed it in the survivor's partition). Beside it, `m` + its id (the *moved*
//!    entry) names the survivor, for good: the absorbed id resolves to it here, as an alias
//!    does on one store. Both belong to the absorbed customer's partition and move with it,
//!    so whoever owns that partition next sends a frame still pending.
//! 2. [`Engine::take_handover`], where the survivor is held: the frame's events are
//!    numbered after this store's (arrival numbers are each store's own), in event clock
//!    mode the survivor's partition clock moved up to the newest of them (the partition
//!    holds them now, as one store that had seen them would be), the identifiers
//!    re-pointed to the survivor, the merge recorded in the change log, the survivor
//!    rebuilt over the union of the histories and what an unmerge needs kept — what a
//!    merge on one store does on the survivor's side. Each frame has an id, and the
//!    survivor's store keeps the ids it took (`t` + survivor + NUL + id, in the survivor's
//!    partition): a frame delivered twice counts once, even after an unmerge between.
//!
//! Between the two, the person is briefly two customers' worth of state in flight: the
//! absorbed customer is gone from every count, the survivor not yet judged over the union.
//! Ties between events of the two customers at the same `ts` are ordered by the survivor's
//! store (its events first), where one store would order them by arrival.

use super::identity::{
    group_snapshot_key, read_old_matches, snapshot_key, write_old_matches, Handover, Moved,
};
use super::*;
use crate::codec::{CodecError, Reader, Writer};
use crate::identity::{owner_key, record_key, IdRecord, CUSTOMER_ID};
use crate::state::{read_manual, read_profile, write_manual, write_profile};
use crate::store::CF_IDENTITIES;

/// The frame encoding's version (its first byte): a merge's frame.
const FRAME_FORMAT: u8 = 1;

/// The first byte of a split's frame ([`super::unmerge`]): the same encoding, handing the
/// events of a customer split off back to its own partition.
const SPLIT_FORMAT: u8 = 2;

/// The graph key naming the survivor a customer was handed over to: `m` + its id.
pub(super) fn moved_key(customer: &str) -> Vec<u8> {
    prefixed(b'm', customer)
}

/// The graph key of a handover's frame not yet delivered: `n` + the absorbed id.
fn pending_key(customer: &str) -> Vec<u8> {
    prefixed(b'n', customer)
}

fn prefixed(prefix: u8, customer: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + customer.len());
    key.push(prefix);
    key.extend_from_slice(customer.as_bytes());
    key
}

/// The graph key of a split's frame not yet delivered: `p` + the store's customer it was
/// split from + NUL + the split's id (a key of that customer's partition).
pub(super) fn split_pending_key(from: &str, id: &str) -> Vec<u8> {
    let mut key = taken_key(from, id);
    key[0] = b'p';
    key
}

/// The graph key recording that `survivor` took the handover frame `id`.
pub(super) fn taken_key(survivor: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + survivor.len() + id.len());
    key.push(b't');
    key.extend_from_slice(survivor.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

/// The absorbed customer a frame hands over.
pub fn frame_absorbed(frame: &[u8]) -> Option<String> {
    frame_names(frame).map(|(absorbed, _)| absorbed)
}

fn frame_names(frame: &[u8]) -> Option<(String, String)> {
    let mut r = Reader::new(frame);
    if !matches!(r.u8().ok()?, FRAME_FORMAT | SPLIT_FORMAT) {
        return None;
    }
    r.str().ok()?;
    let absorbed = r.str().ok()?.to_owned();
    Some((absorbed, r.str().ok()?.to_owned()))
}

/// A customer handed over by [`Engine::hand_over`].
#[derive(Debug)]
pub struct HandedOver {
    pub absorbed: Arc<str>,
    pub survivor: Arc<str>,
    /// What the survivor's store takes ([`Engine::take_handover`]).
    pub frame: Vec<u8>,
    /// The absorbed customer leaving its tags and segments.
    pub changes: Vec<Change>,
}

/// What became of a handover frame read from a Kafka partition
/// ([`Engine::take_handover_at`]).
#[derive(Debug)]
pub enum Handed {
    /// Taken (no changes when it was taken before).
    Taken(Merged),
    /// The survivor went to this customer of another store since: send the frame there —
    /// this one, which names it as the survivor (the store holding it may not know yet
    /// that the one the frame first named is it).
    Elsewhere(Arc<str>, Vec<u8>),
    /// A split's frame ([`Engine::split_requested`]): the customer split off took back its
    /// events (no changes when it was taken before).
    SplitOff(super::unmerge::Unmerged),
    /// Not a frame: kept as a dead letter (code `control_record_malformed`), its position
    /// committed with it.
    Malformed(crate::IngestOutcome),
}

/// A handover made here whose frame the survivor's store has not yet been known to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingHandover {
    /// The customer handed over; for a split's frame, the one it was split from.
    pub absorbed: String,
    /// The customer the frame goes to.
    pub survivor: String,
    pub frame: Vec<u8>,
    /// Where it waits ([`Engine::frame_delivered`] drops it).
    pub key: Vec<u8>,
}

/// What one store hands another: everything of the absorbed customer a merge moves — or,
/// for a split (`split`), everything of a customer split off that goes back to it.
pub(super) struct Frame {
    pub(super) split: bool,
    /// Unique to this handover: the survivor's store takes each frame once.
    pub(super) id: String,
    pub(super) absorbed: Arc<str>,
    pub(super) survivor: Arc<str>,
    pub(super) cause: Cause,
    /// The absorbed customer's graph record (its implicit one when it had none).
    pub(super) record: IdRecord,
    /// Snapshots kept for customers merged into the absorbed one before: (id, value).
    pub(super) snapshots: Vec<(Arc<str>, Vec<u8>)>,
    pub(super) handover: Handover,
}

impl Frame {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(if self.split { SPLIT_FORMAT } else { FRAME_FORMAT });
        w.str(&self.id);
        w.str(&self.absorbed);
        w.str(&self.survivor);
        w.str(&self.cause.as_string());
        w.bytes(&self.record.encode());
        w.u64(self.snapshots.len() as u64);
        for (customer, value) in &self.snapshots {
            w.str(customer);
            w.bytes(value);
        }
        let handover = &self.handover;
        w.u64(handover.events.len() as u64);
        for moved in &handover.events {
            // The store's own encoding of a retained event, its `ts` and arrival before it.
            let event = &moved.event;
            w.i64(event.ts);
            w.u64(event.arrival);
            let mut value = Writer::new();
            crate::store::write_event_value(
                &mut value,
                event,
                moved.event_id.as_deref(),
                Some(&moved.origin),
                &moved.profile,
            );
            w.bytes(&value.buf);
        }
        write_profile(&mut w, &handover.profile);
        write_manual(&mut w, &handover.manual);
        write_old_matches(&mut w, &handover.old_matches);
        w.buf
    }

    fn decode(bytes: &[u8]) -> Result<Frame, CodecError> {
        let mut r = Reader::new(bytes);
        let split = match r.u8()? {
            FRAME_FORMAT => false,
            SPLIT_FORMAT => true,
            _ => return Err(CodecError("a handover frame of an unknown format")),
        };
        let id = r.str()?.to_owned();
        let absorbed = r.arc_str()?;
        let survivor = r.arc_str()?;
        let cause = Cause::parse(r.str()?).ok_or(CodecError("a handover frame's cause"))?;
        let record = IdRecord::decode(r.bytes()?)?;
        let mut snapshots = Vec::new();
        for _ in 0..r.len()? {
            snapshots.push((r.arc_str()?, r.bytes()?.to_vec()));
        }
        let mut events = Vec::new();
        for _ in 0..r.len()? {
            let (ts, arrival) = (r.i64()?, r.u64()?);
            let stored = crate::store::decode_event(ts, arrival, r.bytes()?)?;
            events.push(Moved {
                event: stored.event,
                event_id: stored.event_id,
                origin: stored
                    .origin
                    .map_or_else(|| absorbed.clone(), |o| Arc::from(o.as_str())),
                profile: stored.profile,
            });
        }
        let profile = read_profile(&mut r)?;
        let manual = read_manual(&mut r)?;
        let old_matches = read_old_matches(&mut r)?;
        if !r.is_empty() {
            return Err(CodecError("bytes after a handover frame's end"));
        }
        Ok(Frame {
            split,
            id,
            absorbed,
            survivor,
            cause,
            record,
            snapshots,
            handover: Handover {
                events,
                profile,
                manual,
                old_matches,
            },
        })
    }
}

impl Engine {
    /// The first half of a merge across stores: `absorbed`, held here, leaves every tag
    /// and segment and is deleted, and is handed to `survivor` (held by another store) as
    /// a frame, kept here until [`Engine::handover_delivered`]. The change log records the
    /// leaving with `by` (the API key's name) as the cause; the survivor's store records
    /// the merge.
    pub fn hand_over(
        &mut self,
        absorbed: &str,
        survivor: &str,
        by: Option<&str>,
    ) -> Result<HandedOver, EngineError> {
        self.settle();
        let absorbed = self.existing_customer(absorbed)?;
        let survivor: Arc<str> = Arc::from(rules::normalize(survivor).as_ref());
        if survivor.is_empty() || survivor == absorbed {
            return Err(EngineError::Conflict(format!(
                "`{absorbed}` cannot be handed over to `{survivor}`"
            )));
        }
        if self.read_customer(&self.canonical_id(&survivor))?.is_some() {
            return Err(EngineError::Conflict(format!(
                "`{survivor}` is held here too: merge the two here"
            )));
        }
        if self.config.resolver {
            return Err(EngineError::Conflict(format!(
                "`{absorbed}` is handed over when the group's identity resolver (partition 0's owner) merges it: merge there"
            )));
        }
        // The ids of customers merged into it before name the survivor from now on, in
        // the partitions they belong to: only this one's are kept here.
        let record = self.id_record(&absorbed, &Batch::default())?;
        let partition = self.partition_of(&absorbed);
        let ids: Vec<Arc<str>> = record
            .ids
            .iter()
            .filter(|e| &*e.id_type == CUSTOMER_ID)
            .map(|e| Arc::from(e.value.as_str()))
            .chain(std::iter::once(absorbed.clone()))
            .collect();
        let elsewhere: Vec<&Arc<str>> = ids
            .iter()
            .filter(|id| self.partition_of(id) != partition)
            .collect();
        if !elsewhere.is_empty() {
            return Err(EngineError::Conflict(format!(
                "`{absorbed}` holds customers merged into it from other partitions ({}): they cannot follow it to another node's partition yet; merge `{survivor}` into `{absorbed}` instead, or on a node that owns all of their partitions",
                elsewhere.iter().map(|id| format!("`{id}`")).collect::<Vec<_>>().join(", ")
            )));
        }
        let cause = by.map_or(Cause::Manual, |k| Cause::ManualBy(k.to_owned()));
        self.hand_over_with(absorbed, survivor, ids, cause, &[] as &[(&str, u64)])
    }

    /// A handover the group's identity resolver asked for ([`super::resolver`]), read
    /// from the absorbed customer's partition with its next offset (`positions`, committed
    /// with it): `absorbed` handed over to `survivor` — whose store may be this one — as
    /// [`Engine::hand_over`] does, leaving the graph to the resolver. A customer not held
    /// here — no event of it applied yet (the one that named it went to the survivor), or
    /// handed over already (a request delivered twice) — has nothing to hand over (`None`),
    /// but its id names the survivor from now on here too, so that events naming it
    /// follow.
    pub fn hand_over_requested<S: AsRef<str>>(
        &mut self,
        absorbed: &str,
        survivor: &str,
        cause: &str,
        positions: &[(S, u64)],
    ) -> Result<Option<HandedOver>, EngineError> {
        self.settle();
        let absorbed: Arc<str> = Arc::from(rules::normalize(absorbed).as_ref());
        let survivor: Arc<str> = Arc::from(rules::normalize(survivor).as_ref());
        let cause = Cause::parse(cause).unwrap_or(Cause::Event(None));
        if absorbed.is_empty() || survivor.is_empty() || survivor == absorbed {
            self.commit_positions(positions)?;
            return Ok(None);
        }
        if self.read_customer(&absorbed)?.is_none() {
            let key = moved_key(&absorbed);
            let known = self.store.get(CF_IDENTITIES, &key)?.is_some();
            self.transact(|engine, batch| {
                if !known {
                    engine.identity_put(batch, key, Some(survivor.as_bytes().to_vec()));
                    engine.aliases.insert(absorbed.clone(), survivor.clone());
                }
                engine.put_positions(batch, positions);
                Ok(())
            })?;
            if !known {
                self.publish_moved(std::slice::from_ref(&absorbed), &survivor);
            }
            return Ok(None);
        }
        let ids = vec![absorbed.clone()];
        self.hand_over_with(absorbed, survivor, ids, cause, positions)
            .map(Some)
    }

    /// Hands `absorbed` over to `survivor` in one commit (with `positions`): `ids` (its own
    /// and those of customers merged into it before) name the survivor from now on.
    fn hand_over_with<S: AsRef<str>>(
        &mut self,
        absorbed: Arc<str>,
        survivor: Arc<str>,
        ids: Vec<Arc<str>>,
        cause: Cause,
        positions: &[(S, u64)],
    ) -> Result<HandedOver, EngineError> {
        let (frame, changes) = self.transact(|engine, batch| {
            // A group's resolver keeps the graph: the record handed over is the implicit one.
            let record = match engine.config.resolver {
                true => IdRecord::implicit(&absorbed),
                false => engine.id_record(&absorbed, batch)?,
            };
            let mut snapshots = Vec::new();
            for (customer, _) in &record.absorbed {
                let key = snapshot_key(customer);
                if let Some(value) = engine.identity_get(&key, batch)? {
                    snapshots.push((customer.clone(), value.to_vec()));
                    engine.identity_put(batch, key, None);
                }
            }
            if engine.config.resolver {
                // What merges into it kept for an unmerge is kept where it goes.
                let prefix = group_snapshot_key(&absorbed, "");
                for (key, value) in engine.store.scan_prefix(CF_IDENTITIES, &prefix)? {
                    let customer = String::from_utf8_lossy(&key[prefix.len()..]);
                    snapshots.push((Arc::from(customer.as_ref()), value.into_vec()));
                    engine.identity_put(batch, key.into_vec(), None);
                }
            }
            if !engine.config.resolver {
                for entry in &record.ids {
                    engine.identity_put(batch, owner_key(&entry.id_type, &entry.value), None);
                }
                engine.identity_put(batch, record_key(&absorbed), None);
            }
            engine.put_positions(batch, positions);
            for id in &ids {
                engine.aliases.insert(id.clone(), survivor.clone());
                if *id != absorbed {
                    engine.identity_put(batch, moved_key(id), Some(survivor.as_bytes().to_vec()));
                }
            }
            let now = engine.now_for(&absorbed);
            let (leaving, why) = (absorbed.clone(), cause.clone());
            let handover = engine.with_worker(&absorbed, 0, move |w| w.depart(&leaving, now, &why))?;
            let frame = Frame {
                split: false,
                // Two customers handed over at one instant between the same two events
                // differ by their ids.
                id: format!("{:x}.{:x}.{absorbed}", wall_ms(), engine.counters.next_arrival),
                absorbed: absorbed.clone(),
                survivor: survivor.clone(),
                cause: cause.clone(),
                record,
                snapshots,
                handover,
            }
            .encode();
            engine.identity_put(batch, moved_key(&absorbed), Some(survivor.as_bytes().to_vec()));
            engine.identity_put(batch, pending_key(&absorbed), Some(frame.clone()));
            Ok(frame)
        })?;
        self.publish_moved(&ids, &survivor);
        self.published
            .handovers_maybe
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(HandedOver {
            absorbed,
            survivor,
            frame,
            changes,
        })
    }

    /// The instant `customer` is judged at after `events` moved into its store: in event
    /// clock mode its partition has now seen them (its clock is the newest `ts` of what it
    /// holds), as one store that had seen them would have.
    pub(super) fn clock_moved_in(&mut self, customer: &str, events: &[Moved]) -> i64 {
        let now = self.now_for(customer);
        let newest = events.iter().map(|m| m.event.ts).max();
        if let (ClockMode::Event, Some(newest)) = (self.config.clock, newest) {
            let partition = self.partition_of(customer);
            if self.counters.advance(partition, newest) {
                return now.max(newest);
            }
        }
        now
    }

    /// Tells readers ([`ReadHandle::moved_to`]) that `customer` names itself again.
    pub(super) fn unpublish_moved(&self, customer: &str) {
        let mut moved = self.published.moved.write().unwrap_or_else(|e| e.into_inner());
        if moved.contains_key(customer) {
            Arc::make_mut(&mut moved).remove(customer);
        }
    }

    /// Tells readers ([`ReadHandle::moved_to`]) that `ids` name `survivor` from now on.
    fn publish_moved(&self, ids: &[Arc<str>], survivor: &Arc<str>) {
        let mut moved = self.published.moved.write().unwrap_or_else(|e| e.into_inner());
        // In place: readers hold the map only under the lock.
        let moved = Arc::make_mut(&mut moved);
        for id in ids {
            moved.insert(id.clone(), survivor.clone());
        }
    }

    /// The second half of a merge across stores: the survivor named in `frame` (made by
    /// [`Engine::hand_over`] in another store) takes the absorbed customer over, as a merge
    /// on one store does. A frame the survivor took already changes nothing.
    pub fn take_handover(&mut self, frame: &[u8]) -> Result<Merged, EngineError> {
        self.settle();
        let frame =
            Frame::decode(frame).map_err(|e| EngineError::Conflict(format!("not a handover frame: {e}")))?;
        if frame.split {
            return Err(EngineError::Conflict(
                "a split's frame is taken from its customer's partition (Engine::take_handover_at)".into(),
            ));
        }
        let survivor = self.existing_customer(&frame.survivor)?;
        self.take_frame(survivor, frame, &[] as &[(&str, u64)])
    }

    /// [`Engine::take_handover`] of a frame read from a Kafka partition, with the
    /// partition's next offset (`positions`) in the same commit. A survivor this store does
    /// not hold is made from the frame (nothing handed over is dropped), unless a handover
    /// took the survivor itself to another store's customer since: then nothing is
    /// committed and the frame is to be sent on there ([`Handed::Elsewhere`]). A frame
    /// that does not decode is left out, its position committed.
    pub fn take_handover_at<S: AsRef<str>>(
        &mut self,
        frame: &[u8],
        positions: &[(S, u64)],
    ) -> Result<Handed, EngineError> {
        self.settle();
        let frame = match Frame::decode(frame) {
            Ok(frame) => frame,
            Err(e) => {
                let rejection = Rejection::ControlRecordMalformed {
                    kind: "handover",
                    error: e.to_string(),
                };
                return self
                    .dead_letter_at(frame, rejection, positions)
                    .map(Handed::Malformed);
            }
        };
        if frame.split {
            return self.take_split_frame(frame, positions);
        }
        let survivor = self.canonical_id(&rules::normalize(&frame.survivor));
        if *survivor != *frame.survivor && self.read_customer(&survivor)?.is_none() {
            let frame = Frame {
                survivor: survivor.clone(),
                ..frame
            };
            return Ok(Handed::Elsewhere(survivor, frame.encode()));
        }
        self.take_frame(survivor, frame, positions).map(Handed::Taken)
    }

    fn take_frame<S: AsRef<str>>(
        &mut self,
        survivor: Arc<str>,
        frame: Frame,
        positions: &[(S, u64)],
    ) -> Result<Merged, EngineError> {
        let absorbed = frame.absorbed.clone();
        let taken = taken_key(&survivor, &frame.id);
        if self.identity_get(&taken, &Batch::default())?.is_some() {
            self.commit_positions(positions)?;
            return Ok(Merged {
                survivor,
                absorbed: vec![absorbed],
                changes: Vec::new(),
            });
        }
        let Frame {
            cause,
            record: theirs,
            snapshots,
            mut handover,
            ..
        } = frame;
        let (_, changes) = self.transact(|engine, batch| {
            // Arrival numbers are each store's own: the moved events are numbered after
            // this store's, in their order.
            handover.events.sort_by_key(|m| (m.event.ts, m.event.arrival));
            for moved in &mut handover.events {
                moved.event.arrival = engine.counters.next_arrival;
                engine.counters.next_arrival += 1;
            }
            if engine.config.resolver {
                // The graph is the resolver's; the survivor keeps the profile its events set
                // from now on, as one that absorbed another does, and what merges into the
                // absorbed one kept for an unmerge.
                engine.aliases.insert(absorbed.clone(), survivor.clone());
                for (customer, value) in snapshots {
                    engine.identity_put(batch, group_snapshot_key(&survivor, &customer), Some(value));
                }
            } else {
                let mut record = engine.id_record(&survivor, batch)?;
                engine.adopt(&survivor, &mut record, &absorbed, theirs, batch)?;
                engine.identity_put(batch, record_key(&survivor), Some(record.encode()));
                for (customer, value) in snapshots {
                    engine.identity_put(batch, snapshot_key(&customer), Some(value));
                }
                engine.identity_counts.merged(1);
            }
            engine.identity_put(batch, taken, Some(Vec::new()));
            engine.put_positions(batch, positions);
            let arrival = engine.counters.next_arrival;
            let now = engine.clock_moved_in(&survivor, &handover.events);
            let (into, gone) = (survivor.clone(), absorbed.clone());
            engine.with_worker(&survivor, 0, move |w| {
                w.shard.batch.placed_out_of_order = true;
                w.record_change(&into, MemberKind::Customer, gone.clone(), Op::Merge, now, &cause);
                w.take_over(&into, &[gone], vec![handover], (arrival, now), &cause)
            })
        })?;
        Ok(Merged {
            survivor,
            absorbed: vec![absorbed],
            changes,
        })
    }

    /// Records that the frame of `absorbed`'s handover is on its way for good (the broker
    /// confirmed it in the survivor's partition, or the survivor's store took it): the
    /// frame is dropped; the moved entry naming the survivor stays.
    pub fn handover_delivered(&mut self, absorbed: &str) -> Result<(), EngineError> {
        self.settle();
        if self.store.get(CF_IDENTITIES, &moved_key(absorbed))?.is_none() {
            return Err(EngineError::NotFound(format!(
                "no customer `{absorbed}` was handed over from here"
            )));
        }
        self.frame_delivered(&pending_key(absorbed))
    }

    /// Records that what waits under `key` ([`PendingHandover::key`], or a split request's
    /// [`super::unmerge::PendingSplit::key`]) is on its way for good: it is dropped.
    pub fn frame_delivered(&mut self, key: &[u8]) -> Result<(), EngineError> {
        self.settle();
        if !matches!(key.first(), Some(b'n' | b'p' | b'q')) {
            return Err(EngineError::NotFound(
                "not a key of something waiting to be sent".into(),
            ));
        }
        let key = key.to_vec();
        if self.store.get(CF_IDENTITIES, &key)?.is_none() {
            return Ok(());
        }
        self.transact(|engine, batch| {
            engine.identity_put(batch, key, None);
            Ok(())
        })?;
        Ok(())
    }
}

impl ReadHandle {
    /// The survivor `customer` (normalised) was handed over to, when this store handed it
    /// over. A lookup in memory: nothing when no customer was.
    pub fn moved_to(&self, customer: &str) -> Option<Arc<str>> {
        let moved = self.published.moved.read().unwrap_or_else(|e| e.into_inner());
        if moved.is_empty() {
            return None;
        }
        moved.get(customer).cloned()
    }

    /// [`ReadHandle::pending_handovers`] and [`ReadHandle::pending_splits`] for the one
    /// loop that sends them (a member's consumer): read only while one may be waiting —
    /// once none was found, not again until one is made or a partition taken in
    /// (otherwise every loop would walk the tombstones of every one sent before).
    #[allow(clippy::type_complexity)]
    pub(crate) fn handovers_to_send(
        &self,
    ) -> Result<(Vec<PendingHandover>, Vec<super::unmerge::PendingSplit>), EngineError> {
        use std::sync::atomic::Ordering;
        // Cleared before the read: one made meanwhile sets it again.
        if !self.published.handovers_maybe.swap(false, Ordering::AcqRel) {
            return Ok((Vec::new(), Vec::new()));
        }
        let pending = self
            .pending_handovers()
            .and_then(|frames| Ok((frames, self.pending_splits()?)));
        if !matches!(&pending, Ok((frames, splits)) if frames.is_empty() && splits.is_empty()) {
            self.published.handovers_maybe.store(true, Ordering::Release);
        }
        pending
    }

    /// The handovers made here whose frames are not yet delivered, by absorbed id, then
    /// the frames of splits made here.
    pub fn pending_handovers(&self) -> Result<Vec<PendingHandover>, EngineError> {
        let mut pending = Vec::new();
        for prefix in [b"n", b"p"] {
            for (key, frame) in self.store.scan_prefix(CF_IDENTITIES, prefix)? {
                let (absorbed, survivor) = frame_names(&frame)
                    .ok_or_else(|| StoreError::from(CodecError("a pending handover's frame")))?;
                pending.push(PendingHandover {
                    absorbed,
                    survivor,
                    frame: frame.into_vec(),
                    key: key.into_vec(),
                });
            }
        }
        Ok(pending)
    }
}

impl ReadHandle {
    /// Whether this store's `survivor` took a frame handing `absorbed` over (a frame's id
    /// ends with the customer it hands over).
    pub fn has_taken(&self, survivor: &str, absorbed: &str) -> Result<bool, EngineError> {
        let prefix = taken_key(survivor, "");
        let suffix = format!(".{absorbed}");
        Ok(self
            .store
            .scan_prefix(CF_IDENTITIES, &prefix)?
            .iter()
            .any(|(key, _)| key.ends_with(suffix.as_bytes())))
    }
}

impl ReadHandle {
    /// Whether this store's `customer` acted on the split `id` (the store holding its
    /// events split them off, [`Engine::split_requested`]).
    pub fn has_acted_on(&self, customer: &str, id: &str) -> Result<bool, EngineError> {
        Ok(self.store.get(CF_IDENTITIES, &taken_key(customer, id))?.is_some())
    }
}

impl Engine {
    /// [`ReadHandle::pending_handovers`], once the commit being written is in.
    pub fn pending_handovers(&mut self) -> Result<Vec<PendingHandover>, EngineError> {
        self.settle();
        self.reader().pending_handovers()
    }
}

/// Every customer handed over from `store`, and its survivor.
fn moved_in(store: &Store) -> Result<HashMap<Arc<str>, Arc<str>>, StoreError> {
    let mut moved = HashMap::new();
    for (key, survivor) in store.scan_prefix(CF_IDENTITIES, b"m")? {
        moved.insert(
            Arc::from(String::from_utf8_lossy(&key[1..]).as_ref()),
            Arc::from(String::from_utf8_lossy(&survivor).as_ref()),
        );
    }
    Ok(moved)
}

impl Engine {
    /// The survivor `customer` was handed over to from here (its moved entry), if it was.
    pub(super) fn moved_entry(&self, customer: &str) -> Result<Option<Arc<str>>, StoreError> {
        Ok(self
            .store
            .get(CF_IDENTITIES, &moved_key(customer))?
            .map(|survivor| Arc::from(String::from_utf8_lossy(&survivor).as_ref())))
    }

    /// The aliases as the store has them (after a restore, an import, a drop, a failed
    /// batch): the graph's absorbed `customer_id`s and the customers handed over from
    /// here, which readers learn too ([`ReadHandle::moved_to`]).
    pub(super) fn reload_aliases(&mut self) -> Result<(), StoreError> {
        // A group's resolver asks the graph ([`Engine::graph_canonical`]); its aliases are
        // the customers handed over from its partitions alone.
        let mut aliases = match self.config.resolver {
            true => super::identity::Aliases::default(),
            false => super::identity::Aliases::load(&self.store)?,
        };
        if self.config.resolver {
            // The customers merged into survivors held here, as taking their frames named
            // them ([`super::identity::group_snapshot_key`]): the survivors' events keep the
            // profile they set, for an unmerge.
            for (key, _) in self.store.scan_prefix(CF_IDENTITIES, b"u")? {
                if let Some(survivor) = crate::changelog::Family::Identities.owner(&key) {
                    let absorbed = &key[2 + survivor.len()..];
                    aliases.insert(
                        Arc::from(String::from_utf8_lossy(absorbed).as_ref()),
                        Arc::from(String::from_utf8_lossy(survivor).as_ref()),
                    );
                }
            }
        }
        self.next_resolved.set(0);
        self.published
            .resolver_floor
            .store(0, std::sync::atomic::Ordering::Release);
        self.published
            .handovers_maybe
            .store(true, std::sync::atomic::Ordering::Release);
        let moved = moved_in(&self.store)?;
        for (customer, survivor) in &moved {
            aliases.insert(customer.clone(), survivor.clone());
        }
        self.aliases = aliases;
        *self.published.moved.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(moved);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_reads_back_as_written_and_refuses_what_is_not_one() {
        let frame = Frame {
            split: false,
            id: "19a2b.7".into(),
            absorbed: Arc::from("phone:13800000001"),
            survivor: Arc::from("s"),
            cause: Cause::ManualBy("crm-staff".into()),
            record: IdRecord::implicit("phone:13800000001"),
            snapshots: vec![(Arc::from("x"), vec![1, 2, 3])],
            handover: Handover {
                events: vec![Moved {
                    event: rules::Event {
                        event_type: Arc::from("payment"),
                        ts: 1_740_000_000_000,
                        arrival: 7,
                        props: rules::Props::default(),
                    },
                    event_id: Some("e1".into()),
                    origin: Arc::from("x"),
                    profile: vec![
                        (Arc::from("city"), Some(rules::Value::Str(Arc::from("杭州")))),
                        (Arc::from("tier"), None),
                    ],
                }],
                profile: BTreeMap::new(),
                manual: BTreeMap::from([(
                    Arc::from("called"),
                    ManualTag {
                        since: 5,
                        expires_at: Some(9),
                    },
                )]),
                old_matches: vec![(Arc::from("seafood"), 3)],
            },
        };
        let bytes = frame.encode();
        let back = Frame::decode(&bytes).unwrap();
        assert_eq!(back.encode(), bytes);
        assert_eq!(&*back.survivor, "s");
        assert_eq!(back.cause, Cause::ManualBy("crm-staff".into()));
        assert_eq!(back.handover.events[0].event.arrival, 7);
        assert_eq!(back.handover.events[0].profile.len(), 2);
        assert!(Frame::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Frame::decode(&longer).is_err());
        assert!(Frame::decode(&[9]).is_err());
        assert_eq!(frame_names(&bytes).map(|(_, s)| s).as_deref(), Some("s"));
        assert_eq!(frame_names(b"x"), None);
        let split = Frame { split: true, ..back }.encode();
        assert_eq!(split[0], SPLIT_FORMAT);
        assert!(Frame::decode(&split).unwrap().split);
        assert_eq!(frame_names(&split).map(|(_, s)| s).as_deref(), Some("s"));
    }
}
