//! Unmerge: a customer merged into another is split off again by hand. What goes back is
//! what came with it: the identifiers first attached to it (or to customers merged into it
//! before), and the retained events they brought, before the merge and since — each event
//! keeps the customer it belongs to. Both customers are rebuilt from their histories; their
//! profiles from what the merge kept of each side and the attributes their events set since.
//! The two are kept apart from then on: an event naming both goes to its best identifier's
//! customer and merges nothing (a merge by hand joins them again).
//!
//! In a group resolving identity in one partition (`docs/design/cluster.md` §6) the halves
//! are commits of different stores: partition 0's owner splits the graph
//! ([`Engine::unmerge_requested`]) and sends a [`SplitRequest`] per customer split off, which
//! follows the customer's events — its own partition first, then along the handovers that
//! took them ([`Engine::split_requested`]) — to the store holding them, which splits them off
//! and hands them back to the customer's partition in a split frame
//! ([`Engine::take_split_frame`]).

use super::handover::{moved_key, split_pending_key, taken_key, Frame, Handed};
use super::identity::{
    apply_updates, fold_profile, group_snapshot_key, snapshot_key, Handover, Moved, Snapshot,
};
use super::resolver::{ResolverRecord, SplitRequest};
use super::*;
use crate::identity::{owner_key, owner_value, record_key, IdEntry, IdRecord, CUSTOMER_ID};
use crate::store::CF_IDENTITIES;

/// An unmerge made by hand: the customer split, those split off it, the changes.
#[derive(Debug)]
pub struct Unmerged {
    pub customer: Arc<str>,
    pub split: Vec<Arc<str>>,
    pub changes: Vec<Change>,
}

/// A split request a store sends on along the handovers that took the split customer's
/// events ([`Engine::split_requested`]), waiting under `key` until the broker confirmed it
/// ([`Engine::frame_delivered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSplit {
    pub key: Vec<u8>,
    pub request: SplitRequest,
}

/// The key a split request to send on waits under: `q` + the customer whose store sends
/// it + NUL + the split's id (a key of that customer's partition).
fn onward_key(at: &str, id: &str) -> Vec<u8> {
    let mut key = taken_key(at, id);
    key[0] = b'q';
    key
}

/// What a customer split off gets back besides its events.
struct Restored {
    profile: BTreeMap<Arc<str>, rules::ProfileEntry>,
    manual: BTreeMap<Arc<str>, ManualTag>,
    old_matches: Vec<(Arc<str>, i64)>,
}

/// The profile a customer split off had: as the merge kept it, with what its events set
/// since (`events` numbered as in the store the merge was made in).
fn split_profile(snapshot: &Snapshot, events: &[Moved]) -> BTreeMap<Arc<str>, rules::ProfileEntry> {
    let mut profile = snapshot.profile.clone();
    for moved in events.iter().filter(|m| m.event.arrival >= snapshot.merged_at) {
        apply_updates(&mut profile, moved.event.ts, moved.event.arrival, &moved.profile);
    }
    profile
}

impl Engine {
    /// Splits `ids` (customers merged into `customer`, by their own ids) off `customer`
    /// again, recomputing both from their histories; the change log records an `unmerge`
    /// per customer split off, with `by` (the API key's name) as the cause. In a group
    /// resolving identity in one partition this is the graph's half, made by partition 0's
    /// owner ([`Engine::unmerge_requested`]): no changes here.
    pub fn unmerge_customers(
        &mut self,
        customer: &str,
        ids: &[String],
        by: Option<&str>,
    ) -> Result<Unmerged, EngineError> {
        self.settle();
        let cause = by.map_or(Cause::Manual, |k| Cause::ManualBy(k.to_owned()));
        if self.config.resolver {
            let id = format!("{:x}-{:x}", wall_ms(), self.counters.next_arrival);
            return self.unmerge_in_graph(customer, ids, cause.as_string(), &id, &[] as &[(&str, u64)]);
        }
        let survivor = self.existing_customer(customer)?;
        let split = self.to_split(&survivor, ids)?;
        let (_, changes) = self.transact(|engine, batch| {
            for (part, id) in split.iter().enumerate() {
                // One merged into another of those named went with it already.
                if engine
                    .id_record(&survivor, batch)?
                    .absorbed
                    .iter()
                    .any(|(a, _)| a == id)
                {
                    engine.split_off(&survivor, id, part, &cause, batch)?;
                }
            }
            Ok(())
        })?;
        Ok(self.counted(survivor, split, changes))
    }

    /// An unmerge made: counted ([`crate::identity::IdentityStats::unmerges`]).
    fn counted(&self, customer: Arc<str>, split: Vec<Arc<str>>, changes: Vec<Change>) -> Unmerged {
        for _ in &split {
            self.identity_counts.unmerged();
        }
        Unmerged {
            customer,
            split,
            changes,
        }
    }

    /// The customers `ids` name, each merged into `survivor` (else a conflict naming it).
    fn to_split(&self, survivor: &Arc<str>, ids: &[String]) -> Result<Vec<Arc<str>>, EngineError> {
        let record = self.id_record(survivor, &Batch::default())?;
        let mut split: Vec<Arc<str>> = Vec::new();
        for id in ids {
            let id: Arc<str> = Arc::from(rules::normalize(id).as_ref());
            if !record.absorbed.iter().any(|(a, _)| *a == id) {
                return Err(EngineError::Conflict(format!(
                    "`{id}` was not merged into `{survivor}`: there is nothing to split off"
                )));
            }
            if !split.contains(&id) {
                split.push(id);
            }
        }
        if split.is_empty() {
            return Err(EngineError::Conflict(
                "name at least one customer to split off in `ids`".into(),
            ));
        }
        Ok(split)
    }

    /// An unmerge a member sent to partition 0 for the group's resolver
    /// ([`crate::kafka::route::Request::Unmerge`]), made there with the partition's next
    /// offset (`positions`) in the same commit; `id` names it (unique: the split customers'
    /// stores act on it once). One that cannot be made (not merged, or split already: a
    /// request delivered twice) is left out, its position committed: `None`.
    pub fn unmerge_requested<S: AsRef<str>>(
        &mut self,
        survivor: &str,
        ids: &[String],
        cause: &str,
        id: &str,
        positions: &[(S, u64)],
    ) -> Result<Option<Unmerged>, EngineError> {
        self.settle();
        let unmerged = self.unmerge_in_graph(survivor, ids, cause.to_owned(), id, positions);
        self.or_left_out(unmerged, positions)
    }

    /// The graph's half of an unmerge on the group's resolver: the identifiers split as one
    /// store splits them, and for each customer split off a [`SplitRequest`] kept to be
    /// sent to its partition (whose owner sends it on to where its events are).
    fn unmerge_in_graph<S: AsRef<str>>(
        &mut self,
        survivor: &str,
        ids: &[String],
        cause: String,
        id: &str,
        positions: &[(S, u64)],
    ) -> Result<Unmerged, EngineError> {
        if !self.config.resolver || self.parked.partitions.contains(&0) {
            return Err(EngineError::Conflict(
                "the group's identity graph is partition 0's: unmerge on the node that owns it".into(),
            ));
        }
        let survivor: Arc<str> = Arc::from(rules::normalize(survivor).as_ref());
        let survivor = self.graph_canonical(survivor, &Batch::default())?;
        let split = self.to_split(&survivor, ids)?;
        self.transact(|engine, batch| {
            for (part, customer) in split.iter().enumerate() {
                if !engine
                    .id_record(&survivor, batch)?
                    .absorbed
                    .iter()
                    .any(|(a, _)| a == customer)
                {
                    continue;
                }
                let members = engine.split_graph(&survivor, customer, batch)?;
                let request = ResolverRecord::Split(SplitRequest {
                    partition: engine.partition_of(customer),
                    customer: customer.clone(),
                    at: customer.clone(),
                    members,
                    cause: cause.clone(),
                    id: format!("split-{id}-{part}"),
                });
                engine.keep_resolver_record(&request, batch)?;
            }
            engine.put_positions(batch, positions);
            Ok(())
        })?;
        Ok(self.counted(survivor, split, Vec::new()))
    }

    /// The graph's half of splitting `customer` off `survivor`: the identifiers that came
    /// with it (and with customers merged into it before) name it again, the two records
    /// keep each other apart. Returns the customers whose events go back with it.
    fn split_graph(
        &mut self,
        survivor: &Arc<str>,
        customer: &Arc<str>,
        batch: &mut Batch,
    ) -> Result<Vec<Arc<str>>, EngineError> {
        let mut record = self.id_record(survivor, batch)?;
        let members = record.subtree(customer);
        let (theirs, ours): (Vec<IdEntry>, Vec<IdEntry>) =
            record.ids.drain(..).partition(|e| members.contains(&e.origin));
        record.ids = ours;
        let (moved, kept): (Vec<_>, Vec<_>) =
            record.absorbed.drain(..).partition(|(a, _)| members.contains(a));
        record.absorbed = kept;
        record.apart.push(customer.clone());
        let split_record = IdRecord {
            created: self.counters.next_arrival,
            ids: theirs,
            absorbed: moved.into_iter().filter(|(a, _)| a != customer).collect(),
            apart: vec![survivor.clone()],
        };
        // A resolver's aliases are the customers handed over from its partitions alone.
        let aliases = !self.config.resolver;
        for e in &split_record.ids {
            let key = owner_key(&e.id_type, &e.value);
            if &*e.id_type == CUSTOMER_ID && e.value == **customer {
                // It names itself again.
                self.identity_put(batch, key, None);
                if aliases {
                    self.aliases.remove(customer);
                }
            } else {
                self.identity_put(batch, key, Some(owner_value(customer, &e.origin)));
                if &*e.id_type == CUSTOMER_ID && aliases {
                    self.aliases.insert(Arc::from(e.value.as_str()), customer.clone());
                }
            }
        }
        self.identity_put(batch, record_key(survivor), Some(record.encode()));
        self.identity_put(batch, record_key(customer), Some(split_record.encode()));
        Ok(members)
    }

    fn split_off(
        &mut self,
        survivor: &Arc<str>,
        customer: &Arc<str>,
        part: usize,
        cause: &Cause,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        let now = self.now_for(survivor);
        let members = self.split_graph(survivor, customer, batch)?;
        let snapshot = match self.identity_get(&snapshot_key(customer), batch)? {
            Some(bytes) => Snapshot::decode(&bytes).map_err(StoreError::from)?,
            None => Snapshot::default(),
        };
        // Customers merged into the survivor after this one, or with it in one merge, keep
        // what they brought.
        let mut later = Vec::new();
        for (absorbed, _) in &self.id_record(survivor, batch)?.absorbed {
            if let Some(bytes) = self.identity_get(&snapshot_key(absorbed), batch)? {
                let theirs = Snapshot::decode(&bytes).map_err(StoreError::from)?;
                if theirs.merged_at >= snapshot.merged_at {
                    later.push(theirs.profile);
                }
            }
        }
        self.identity_put(batch, snapshot_key(customer), None);
        let place = Place::merge(0, 2 * part);
        let events = self.with_worker_at(survivor, place, &[], |w| {
            w.split_events(survivor, customer, &members, &snapshot, &later, now, cause)
        })?;
        let restored = Restored {
            profile: split_profile(&snapshot, &events),
            manual: snapshot.manual,
            old_matches: snapshot.old_matches,
        };
        let place = Place::merge(0, 2 * part + 1);
        self.with_worker_at(customer, place, &[], |w| {
            w.take_split(customer, events, restored, now, cause)
        })
    }

    /// A merge the group's resolver decided, noticed in the survivor's partition
    /// ([`ResolverRecord::Merging`]) with that partition's next offset (`positions`, in the
    /// same commit): where the survivor stands now — its profile, and the arrival number
    /// the events after the merge start from — is what an unmerge gives back to it, kept
    /// under the merge's snapshot key until the absorbed customer's frame fills in the
    /// rest. Events the resolver sent the survivor after the merge may precede the frame;
    /// noted here, before them, they count as after the merge, as on one store. A notice
    /// that finds the snapshot there (delivered twice, or after the frame) changes nothing.
    pub fn merge_noticed<S: AsRef<str>>(
        &mut self,
        survivor: &str,
        absorbed: &str,
        positions: &[(S, u64)],
    ) -> Result<bool, EngineError> {
        self.settle();
        let survivor: Arc<str> = Arc::from(rules::normalize(survivor).as_ref());
        let absorbed = rules::normalize(absorbed);
        let key = group_snapshot_key(&survivor, &absorbed);
        if self.identity_get(&key, &Batch::default())?.is_some() {
            self.commit_positions(positions)?;
            return Ok(false);
        }
        let held = self.read_customer(&survivor)?.is_some();
        let now = self.now_for(&survivor);
        self.transact(|engine, batch| {
            let survivor_profile = match held {
                true => engine.with_worker(&survivor, 0, |w| {
                    let state = w.take_customer(&survivor, now)?;
                    let profile = state.history.profile.clone();
                    w.put_back(survivor.clone(), state);
                    Ok(profile)
                })?,
                false => BTreeMap::new(),
            };
            let snapshot = Snapshot {
                merged_at: engine.counters.next_arrival,
                survivor_profile,
                ..Snapshot::default()
            };
            engine.identity_put(batch, key, Some(snapshot.encode()));
            engine.put_positions(batch, positions);
            Ok(())
        })?;
        Ok(true)
    }

    /// A split the group's resolver decided ([`SplitRequest`]), read from the partition of
    /// `request.at` with its next offset (`positions`, committed with it). Where `at` was
    /// handed over (its moved entry), the request goes on to its survivor's store — kept to
    /// be sent after the frame that took its events, which leaves this partition first; in
    /// the split customer's own partition its id names it again from here on. Where `at`
    /// is held and was not handed over, its store holds the events: the split is made
    /// here, and the customer's events, profile, manual tags and what merges into it kept
    /// go back to it in a split frame ([`Engine::take_handover_at`] in its partition).
    /// A request this store acted on before changes nothing (`false`).
    pub fn split_requested<S: AsRef<str>>(
        &mut self,
        request: &SplitRequest,
        positions: &[(S, u64)],
    ) -> Result<bool, EngineError> {
        self.settle();
        let at = request.at.clone();
        let taken = taken_key(&at, &request.id);
        if self.identity_get(&taken, &Batch::default())?.is_some() {
            self.commit_positions(positions)?;
            return Ok(false);
        }
        let first = at == request.customer;
        match self.moved_entry(&at)? {
            Some(next) => {
                self.transact(|engine, batch| {
                    engine.identity_put(batch, taken, Some(Vec::new()));
                    engine.put_positions(batch, positions);
                    if first {
                        // Events naming it are its own again from here on.
                        engine.identity_put(batch, moved_key(&at), None);
                        engine.aliases.remove(&at);
                    }
                    let onward = SplitRequest {
                        partition: engine.partition_of(&next),
                        at: next.clone(),
                        ..request.clone()
                    };
                    let key = onward_key(&at, &request.id);
                    engine.identity_put(batch, key, Some(ResolverRecord::Split(onward).encode()));
                    Ok(())
                })?;
                if first {
                    self.unpublish_moved(&at);
                }
                self.published
                    .handovers_maybe
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            // Its own partition, and never handed over from here: nothing to take back.
            None if first => {
                self.transact(|engine, batch| {
                    engine.identity_put(batch, taken, Some(Vec::new()));
                    engine.put_positions(batch, positions);
                    Ok(())
                })?;
            }
            None => self.split_here(request, taken, positions)?,
        }
        Ok(true)
    }

    /// The data's half of a split in a group, where `request.at` holds the events.
    fn split_here<S: AsRef<str>>(
        &mut self,
        request: &SplitRequest,
        taken: Vec<u8>,
        positions: &[(S, u64)],
    ) -> Result<(), EngineError> {
        let (survivor, customer) = (request.at.clone(), request.customer.clone());
        let cause = Cause::parse(&request.cause).unwrap_or(Cause::Manual);
        let held = self.read_customer(&survivor)?.is_some();
        let now = self.now_for(&survivor);
        self.transact(|engine, batch| {
            engine.identity_put(batch, taken, Some(Vec::new()));
            engine.put_positions(batch, positions);
            let own = group_snapshot_key(&survivor, &customer);
            let snapshot = match engine.identity_get(&own, batch)? {
                Some(bytes) => Snapshot::decode(&bytes).map_err(StoreError::from)?,
                None => Snapshot::default(),
            };
            engine.identity_put(batch, own, None);
            // Customers merged into the survivor after this one, or with it in one merge,
            // keep what they brought; what merges into those going back kept goes with them.
            let (mut later, mut carried) = (Vec::new(), Vec::new());
            let prefix = group_snapshot_key(&survivor, "");
            for (key, value) in engine.store.scan_prefix(CF_IDENTITIES, &prefix)? {
                let other: Arc<str> = Arc::from(String::from_utf8_lossy(&key[prefix.len()..]).as_ref());
                if other == customer {
                    continue;
                }
                if request.members.contains(&other) {
                    carried.push((other, value.into_vec()));
                    engine.identity_put(batch, key.into_vec(), None);
                } else {
                    let theirs = Snapshot::decode(&value).map_err(StoreError::from)?;
                    if theirs.merged_at >= snapshot.merged_at {
                        later.push(theirs.profile);
                    }
                }
            }
            let events = match held {
                true => engine.with_worker(&survivor, 0, |w| {
                    w.split_events(
                        &survivor,
                        &customer,
                        &request.members,
                        &snapshot,
                        &later,
                        now,
                        &cause,
                    )
                })?,
                false => Vec::new(),
            };
            let frame = Frame {
                split: true,
                id: format!("{}-frame", request.id),
                absorbed: survivor.clone(),
                survivor: customer.clone(),
                cause: cause.clone(),
                record: IdRecord::implicit(&customer),
                snapshots: carried,
                handover: Handover {
                    profile: split_profile(&snapshot, &events),
                    events,
                    manual: snapshot.manual,
                    old_matches: snapshot.old_matches,
                },
            };
            engine.identity_put(
                batch,
                split_pending_key(&survivor, &request.id),
                Some(frame.encode()),
            );
            Ok(())
        })?;
        self.published
            .handovers_maybe
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// A split's frame, read from the split customer's partition: the customer takes back
    /// its events, profile, manual tags and event tag matches, and is judged anew over them
    /// and whatever it got since the unmerge. One merged again since (its moved entry is
    /// back) is sent on to its survivor as a merge's frame.
    pub(super) fn take_split_frame<S: AsRef<str>>(
        &mut self,
        frame: Frame,
        positions: &[(S, u64)],
    ) -> Result<Handed, EngineError> {
        let (from, customer) = (frame.absorbed.clone(), frame.survivor.clone());
        let taken = taken_key(&customer, &frame.id);
        let unmerged = |changes| Unmerged {
            customer: from.clone(),
            split: vec![customer.clone()],
            changes,
        };
        if self.identity_get(&taken, &Batch::default())?.is_some() {
            self.commit_positions(positions)?;
            return Ok(Handed::SplitOff(unmerged(Vec::new())));
        }
        if let Some(next) = self.moved_entry(&customer)? {
            let onward = Frame {
                split: false,
                absorbed: customer.clone(),
                survivor: next.clone(),
                ..frame
            };
            return Ok(Handed::Elsewhere(next, onward.encode()));
        }
        let Frame {
            cause,
            snapshots,
            handover,
            ..
        } = frame;
        let Handover {
            mut events,
            profile,
            manual,
            old_matches,
        } = handover;
        let (_, changes) = self.transact(|engine, batch| {
            engine.identity_put(batch, taken, Some(Vec::new()));
            engine.put_positions(batch, positions);
            for (other, value) in snapshots {
                engine.identity_put(batch, group_snapshot_key(&customer, &other), Some(value));
            }
            // Numbered after this store's events, in their order.
            events.sort_by_key(|m| (m.event.ts, m.event.arrival));
            for moved in &mut events {
                moved.event.arrival = engine.counters.next_arrival;
                engine.counters.next_arrival += 1;
            }
            let now = engine.clock_moved_in(&customer, &events);
            let restored = Restored {
                profile,
                manual,
                old_matches,
            };
            engine.with_worker(&customer, 0, |w| {
                w.shard.batch.placed_out_of_order = true;
                w.take_split(&customer, events, restored, now, &cause)
            })
        })?;
        Ok(Handed::SplitOff(unmerged(changes)))
    }
}

impl ReadHandle {
    /// The split requests to send on from here ([`Engine::split_requested`]), in the order
    /// made.
    pub fn pending_splits(&self) -> Result<Vec<PendingSplit>, EngineError> {
        let mut pending = Vec::new();
        for (key, value) in self.store.scan_prefix(CF_IDENTITIES, b"q")? {
            let ResolverRecord::Split(request) = ResolverRecord::decode(&value).map_err(StoreError::from)?
            else {
                return Err(StoreError::from(crate::codec::CodecError("a pending split request")).into());
            };
            pending.push(PendingSplit {
                key: key.into_vec(),
                request,
            });
        }
        Ok(pending)
    }
}

impl Worker<'_> {
    /// The survivor's side of an unmerge: the events that belong to `members` leave its
    /// history (returned), its profile is what it had before the merge with what came since
    /// from its own side, and it is judged anew.
    #[allow(clippy::too_many_arguments)]
    fn split_events(
        &mut self,
        survivor: &Arc<str>,
        customer: &Arc<str>,
        members: &[Arc<str>],
        snapshot: &Snapshot,
        later: &[BTreeMap<Arc<str>, rules::ProfileEntry>],
        now: i64,
        cause: &Cause,
    ) -> Result<Vec<Moved>, EngineError> {
        self.record_change(
            survivor,
            MemberKind::Customer,
            customer.clone(),
            Op::Unmerge,
            now,
            cause,
        );
        let mut stored = self.stored_events(survivor)?;
        let mut state = self.take_customer(survivor, now)?;
        self.load_history(survivor, &mut state, now)?;
        let belongs = |origin: Option<&str>| origin.is_some_and(|o| members.iter().any(|m| **m == *o));
        let (theirs, ours): (Vec<rules::Event>, Vec<rules::Event>) =
            std::mem::take(&mut state.history.events)
                .into_iter()
                .partition(|e| belongs(stored.get(&e.arrival).and_then(|s| s.origin.as_deref())));
        let mut profile = snapshot.survivor_profile.clone();
        for other in later {
            fold_profile(&mut profile, other);
        }
        for e in ours.iter().filter(|e| e.arrival >= snapshot.merged_at) {
            if let Some(kept) = stored.get(&e.arrival) {
                apply_updates(&mut profile, e.ts, e.arrival, &kept.profile);
            }
        }
        state.history.events = ours;
        state.history.profile = profile;
        let store = self.ctx.store;
        let mut moved = Vec::with_capacity(theirs.len());
        for event in theirs {
            store.delete_event(&mut self.shard.batch.wb, survivor, event.ts, event.arrival);
            let kept = stored
                .remove(&event.arrival)
                .expect("partitioned by what the store keeps");
            moved.push(Moved {
                origin: kept
                    .origin
                    .map_or_else(|| customer.clone(), |o| Arc::from(o.as_str())),
                event_id: kept.event_id,
                profile: kept.profile,
                event,
            });
        }
        self.rebuild(survivor, state, Vec::new(), now, cause);
        Ok(moved)
    }

    /// The split-off customer's side: its events back, its profile as the merge kept it
    /// with what its events set since, its manual tags, judged anew. (In a group it may
    /// have events of its own by then — those after the unmerge that reached it before
    /// this: what they set wins where newer, and manual tags set since stay.)
    fn take_split(
        &mut self,
        customer: &Arc<str>,
        events: Vec<Moved>,
        restored: Restored,
        now: i64,
        cause: &Cause,
    ) -> Result<(), EngineError> {
        let mut state = self.take_customer(customer, now)?;
        self.load_history(customer, &mut state, now)?;
        let mut profile = restored.profile;
        fold_profile(&mut profile, &state.history.profile);
        let store = self.ctx.store;
        for moved in events {
            let origin = Some(&*moved.origin).filter(|o| **o != **customer);
            store.put_event(
                &mut self.shard.batch.wb,
                customer,
                &moved.event,
                moved.event_id.as_deref(),
                origin,
                &moved.profile,
            );
            state.history.events.push(moved.event);
            state.has_events = true;
        }
        state.history.profile = profile;
        for (name, tag) in restored.manual {
            state.manual.entry(name).or_insert(tag);
        }
        self.rebuild(customer, state, restored.old_matches, now, cause);
        Ok(())
    }
}
