//! Unmerge: a customer merged into another is split off again by hand. What goes back is
//! what came with it: the identifiers first attached to it (or to customers merged into it
//! before), and the retained events they brought, before the merge and since — each event
//! keeps the customer it belongs to. Both customers are rebuilt from their histories; their
//! profiles from what the merge kept of each side and the attributes their events set since.
//! The two are kept apart from then on: an event naming both goes to its best identifier's
//! customer and merges nothing (a merge by hand joins them again).

use super::identity::{apply_updates, fold_profile, snapshot_key, Moved, Snapshot};
use super::*;
use crate::identity::{owner_key, owner_value, record_key, IdEntry, IdRecord, CUSTOMER_ID};

/// An unmerge made by hand: the customer split, those split off it, the changes.
#[derive(Debug)]
pub struct Unmerged {
    pub customer: Arc<str>,
    pub split: Vec<Arc<str>>,
    pub changes: Vec<Change>,
}

impl Engine {
    /// Splits `ids` (customers merged into `customer`, by their own ids) off `customer`
    /// again, recomputing both from their histories; the change log records an `unmerge`
    /// per customer split off, with `by` (the API key's name) as the cause.
    pub fn unmerge_customers(
        &mut self,
        customer: &str,
        ids: &[String],
        by: Option<&str>,
    ) -> Result<Unmerged, EngineError> {
        self.settle();
        if self.config.resolver {
            return Err(EngineError::Conflict(
                "an unmerge is not made in a group that resolves identity in one partition yet (docs/cluster.md, known gaps)".into(),
            ));
        }
        let survivor = self.existing_customer(customer)?;
        let record = self.id_record(&survivor, &Batch::default())?;
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
        let cause = by.map_or(Cause::Manual, |k| Cause::ManualBy(k.to_owned()));
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
        for _ in &split {
            self.identity_counts.unmerged();
        }
        Ok(Unmerged {
            customer: survivor,
            split,
            changes,
        })
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
        for e in &split_record.ids {
            let key = owner_key(&e.id_type, &e.value);
            if &*e.id_type == CUSTOMER_ID && e.value == **customer {
                // It names itself again.
                self.identity_put(batch, key, None);
                self.aliases.remove(customer);
            } else {
                self.identity_put(batch, key, Some(owner_value(customer, &e.origin)));
                if &*e.id_type == CUSTOMER_ID {
                    self.aliases.insert(Arc::from(e.value.as_str()), customer.clone());
                }
            }
        }
        let snapshot = match self.identity_get(&snapshot_key(customer), batch)? {
            Some(bytes) => Snapshot::decode(&bytes).map_err(StoreError::from)?,
            None => Snapshot::default(),
        };
        // Customers merged into the survivor after this one keep what they brought.
        let mut later = Vec::new();
        for (absorbed, _) in &record.absorbed {
            if let Some(bytes) = self.identity_get(&snapshot_key(absorbed), batch)? {
                let theirs = Snapshot::decode(&bytes).map_err(StoreError::from)?;
                if theirs.merged_at > snapshot.merged_at {
                    later.push(theirs.profile);
                }
            }
        }
        self.identity_put(batch, snapshot_key(customer), None);
        self.identity_put(batch, record_key(survivor), Some(record.encode()));
        self.identity_put(batch, record_key(customer), Some(split_record.encode()));
        let place = Place::merge(0, 2 * part);
        let events = self.with_worker_at(survivor, place, &[], |w| {
            w.split_events(survivor, customer, &members, &snapshot, &later, now, cause)
        })?;
        let place = Place::merge(0, 2 * part + 1);
        self.with_worker_at(customer, place, &[], |w| {
            w.take_split(customer, events, snapshot, now, cause)
        })
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
    /// with what its events set since, its manual tags, judged anew.
    fn take_split(
        &mut self,
        customer: &Arc<str>,
        events: Vec<Moved>,
        snapshot: Snapshot,
        now: i64,
        cause: &Cause,
    ) -> Result<(), EngineError> {
        let mut state = self.take_customer(customer, now)?;
        self.load_history(customer, &mut state, now)?;
        let mut profile = snapshot.profile;
        let store = self.ctx.store;
        for moved in events {
            if moved.event.arrival >= snapshot.merged_at {
                apply_updates(&mut profile, moved.event.ts, moved.event.arrival, &moved.profile);
            }
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
        state.manual = snapshot.manual;
        self.rebuild(customer, state, snapshot.old_matches, now, cause);
        Ok(())
    }
}
