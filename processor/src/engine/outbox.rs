//! The state changelog on the engine's side ([`crate::changelog`]): each commit's deltas put
//! into the `outbox` beside the state they describe, read back in commit order, and a
//! partition restored from deltas into this store.

use super::*;
use crate::changelog::{outbox_key, Checkpoint, Delta, DeltaBuilder, Family, Restore, CF_OUTBOX};
use crate::partition::partition_of;
use crate::writes::Writes;

/// Set while this store keeps the changelog, to the partition count its deltas are written
/// under: opened without the changelog, the store forgets it, so that turning it on again
/// starts with a baseline; opened with another partition count, it writes a new baseline.
const META_CHANGELOG_LIVE: &str = "changelog_live";
/// Per partition (the number follows), the highest commit the broker confirmed.
const META_CHANGELOG_PUBLISHED: &str = "changelog_published:";
/// Per partition (the number follows), the marker of its last confirmed checkpoint.
const META_CHANGELOG_MARKER: &str = "changelog_marker:";
/// Per partition (the number follows), the keys of the delta records a restore read, which
/// the partition's next checkpoint tombstones.
const META_CHANGELOG_ORPHANS: &str = "changelog_orphans:";

/// A baseline's delta is cut once it holds this many bytes of keys and values.
const BASELINE_DELTA_BYTES: usize = 512 << 10;
/// A baseline is written to the outbox in batches of about this many bytes.
const BASELINE_BATCH_BYTES: usize = 16 << 20;

/// A baseline delta being filled: its keys and values, and their bytes.
type Filling = (BTreeMap<(Family, Vec<u8>), Vec<u8>>, usize);

/// The baseline being written: per partition, the delta being filled and the commit of the
/// partition's first baseline delta.
struct Baseline {
    store: Arc<Store>,
    partitions: u32,
    /// Each partition's event clock and next `pseq`.
    clocks: Vec<Option<i64>>,
    next_pseq: Vec<Option<u64>>,
    next_commit: u64,
    filling: Vec<Filling>,
    first: Vec<Option<u64>>,
    positions: Vec<Vec<(String, u64)>>,
    wb: WriteBatch,
    deltas: u64,
}

/// Which commits' deltas the state publisher may send: with a changes topic, a delta goes
/// to the state topic only once every change made up to its commit is confirmed there.
/// Otherwise a node dying between the two confirmations would hand its successor a state
/// in which those changes are made (their events consumed, their `pseq` counted) while no
/// consumer of the changes topic ever sees them. The other order is the documented repeat:
/// changes confirmed whose state is not are made again, with the same `(partition, pseq)`.
#[derive(Debug, Default)]
pub(crate) struct ChangesGate {
    /// Set once a changes publisher runs; until then every delta may go.
    on: bool,
    /// The last `seq` the changes topic confirmed.
    confirmed: u64,
    /// Commits whose changes are not all confirmed, each with the last `seq` made by it or
    /// before it. Before the gate is on, one entry under commit 0 stands for every commit.
    pending: BTreeMap<u64, u64>,
}

impl ChangesGate {
    /// Commit `commit` is made, the change log's last `seq` then being `last_seq`.
    pub(crate) fn made(&mut self, commit: u64, last_seq: u64) {
        if self.on {
            self.pending.insert(commit, last_seq);
        } else {
            self.pending.clear();
            self.pending.insert(0, last_seq);
        }
        self.settle();
    }

    /// A changes publisher runs, the topic having confirmed every change up to `confirmed`.
    pub(crate) fn turn_on(&mut self, confirmed: u64) {
        self.on = true;
        self.confirm(confirmed);
    }

    /// The changes topic confirmed every change up to `seq`.
    pub(crate) fn confirm(&mut self, seq: u64) {
        self.confirmed = self.confirmed.max(seq);
        self.settle();
    }

    fn settle(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.get() > self.confirmed {
                break;
            }
            entry.remove();
        }
    }

    /// Whether the delta of `commit` may be published: every commit up to it has its
    /// changes confirmed (a commit not recorded, such as a restore's, made none).
    pub(crate) fn may_publish(&self, commit: u64) -> bool {
        !self.on || self.pending.range(..=commit).next().is_none()
    }
}

impl Baseline {
    fn add(&mut self, family: Family, key: &[u8], value: &[u8], partition: u32) -> Result<(), StoreError> {
        let (writes, bytes) = &mut self.filling[partition as usize];
        *bytes += key.len() + value.len();
        writes.insert((family, key.to_vec()), value.to_vec());
        if *bytes >= BASELINE_DELTA_BYTES {
            self.emit(partition, false)?;
        }
        Ok(())
    }

    /// Cuts partition `partition`'s delta (the last one of its baseline with `end`).
    fn emit(&mut self, partition: u32, end: bool) -> Result<(), StoreError> {
        let (writes, _) = std::mem::take(&mut self.filling[partition as usize]);
        let commit = self.next_commit;
        self.next_commit += 1;
        let first = *self.first[partition as usize].get_or_insert(commit);
        let delta = crate::changelog::Delta {
            partition,
            partitions: self.partitions,
            commit,
            clock: self.clocks[partition as usize],
            next_pseq: self.next_pseq[partition as usize],
            positions: if end {
                std::mem::take(&mut self.positions[partition as usize])
            } else {
                Vec::new()
            },
            writes: writes
                .into_iter()
                .map(|((family, key), value)| crate::changelog::DeltaWrite {
                    family,
                    key,
                    value: Some(value),
                })
                .collect(),
            baseline_from: end.then_some(first),
        };
        self.wb.put_cf(
            self.store.cf(CF_OUTBOX),
            outbox_key(partition, commit),
            delta.encode(),
        );
        self.deltas += 1;
        if self.wb.size_in_bytes() >= BASELINE_BATCH_BYTES {
            // The counter goes with each batch: a baseline cut short by a crash is written
            // again after it, with higher numbers.
            self.store
                .put_meta_u64(&mut self.wb, META_COMMIT, self.next_commit);
            self.store.commit(std::mem::take(&mut self.wb))?;
        }
        Ok(())
    }
}

impl Engine {
    /// At open: a store that keeps the changelog and did not keep it before writes a
    /// baseline first; one that no longer keeps it forgets that it did.
    pub(super) fn open_changelog(&mut self) -> Result<(), EngineError> {
        let live = self.store.get(CF_META, META_CHANGELOG_LIVE.as_bytes())?;
        // Kept under this partition count: nothing to do (a value of another length is
        // taken as another count).
        let current = live.as_deref() == Some(&u64::from(self.config.partitions).to_be_bytes()[..]);
        match (self.config.changelog, live.is_some() && current) {
            (true, false) => {
                let deltas = self.write_changelog_baseline()?;
                if deltas > 0 {
                    tracing::info!(
                        deltas,
                        "the state changelog starts with a baseline of every partition"
                    );
                }
            }
            (false, _) if live.is_some() => {
                let mut wb = WriteBatch::default();
                wb.delete_cf(self.store.cf(CF_META), META_CHANGELOG_LIVE.as_bytes());
                self.store.commit(wb)?;
            }
            _ => {}
        }
        if self.config.changelog {
            // Every commit so far: their deltas wait for the changes made until now.
            self.published.changes_gate().made(
                self.counters.next_commit,
                self.counters.next_seq.saturating_sub(1),
            );
        }
        Ok(())
    }

    /// Puts a baseline of every partition into the outbox: every key of its state, in
    /// deltas of at most about [`BASELINE_DELTA_BYTES`], the last one marked as ending the
    /// baseline with the partition's Kafka positions. A restore then needs nothing written
    /// before it. Returns the deltas written.
    fn write_changelog_baseline(&mut self) -> Result<u64, EngineError> {
        self.settle();
        let partitions = self.config.partitions;
        let empty = [CF_CUSTOMERS, CF_TIMERS, crate::store::CF_IDENTITIES]
            .iter()
            .all(|cf| self.store.scan_from(cf, &[]).next().is_none());
        if empty {
            // A new store: its first commits are the partitions' whole history. (Its empty
            // partitions must not supersede what another store published.)
            let mut wb = WriteBatch::default();
            wb.put_cf(
                self.store.cf(CF_META),
                META_CHANGELOG_LIVE.as_bytes(),
                u64::from(partitions).to_be_bytes(),
            );
            self.store.commit(wb)?;
            return Ok(0);
        }
        let mut positions = vec![Vec::new(); partitions as usize];
        for (source, offset) in super::read::source_offsets(&self.store)? {
            if let Some(p) = crate::changelog::position_partition(&source, partitions) {
                positions[p as usize].push((source, offset));
            }
        }
        let mut baseline = Baseline {
            store: self.store.clone(),
            partitions,
            clocks: (0..partitions).map(|p| self.counters.clock_of(p)).collect(),
            next_pseq: (0..partitions).map(|p| self.counters.next_pseq_of(p)).collect(),
            next_commit: self.counters.next_commit,
            filling: vec![Default::default(); partitions as usize],
            first: vec![None; partitions as usize],
            positions,
            wb: WriteBatch::default(),
            deltas: 0,
        };
        let store = self.store.clone();
        store.customers_with_history(
            |_| true,
            |c| {
                let p = partition_of(c.id.as_bytes(), partitions);
                baseline.add(Family::Customers, c.id.as_bytes(), c.record, p)?;
                for (rest, value) in &c.events {
                    let key = crate::store::event_key_from_rest(c.id, rest);
                    baseline.add(Family::Events, &key, value, p)?;
                }
                for (event_id, applied) in &c.dedup {
                    baseline.add(Family::Dedup, event_id.as_bytes(), applied, p)?;
                }
                Ok(())
            },
        )?;
        for family in [Family::Timers, Family::Identities] {
            for item in store.scan_from(family.cf_name(), &[]) {
                let (key, value) = item?;
                if let Some(p) =
                    family.partition_of_write(&key, Some(&value), || None, (partitions, self.config.resolver))
                {
                    baseline.add(family, &key, &value, p)?;
                }
            }
        }
        for p in 0..partitions {
            baseline.emit(p, true)?;
        }
        self.counters.next_commit = baseline.next_commit;
        let mut wb = std::mem::take(&mut baseline.wb);
        self.store
            .put_meta_u64(&mut wb, META_COMMIT, self.counters.next_commit);
        wb.put_cf(
            self.store.cf(CF_META),
            META_CHANGELOG_LIVE.as_bytes(),
            u64::from(partitions).to_be_bytes(),
        );
        self.store.commit(wb)?;
        Ok(baseline.deltas)
    }

    /// The outbox writes of a commit whose writes are `writes` (in the order they apply):
    /// one delta per partition written or whose Kafka position moved, numbered with the
    /// next commit number, which is counted in the same writes. Empty when there is none.
    pub(super) fn changelog_deltas(
        &mut self,
        writes: &[SortedWrites],
        dedup_partitions: &foldhash::HashMap<String, u32>,
    ) -> SortedWrites {
        let mut builder = DeltaBuilder::new(&self.store, (self.config.partitions, self.config.resolver));
        // An identity entry as it stands before this commit: a commit being written, then
        // the store.
        let pending = self.pending.as_ref().map(|p| &p.done.identities);
        let store = &self.store;
        let identity_entry = |key: &[u8]| match pending.and_then(|p| p.get(key)) {
            Some(entry) => entry.clone(),
            None => store.get(crate::store::CF_IDENTITIES, key).ok().flatten(),
        };
        for part in writes {
            builder.add(
                part,
                |event_id| {
                    std::str::from_utf8(event_id)
                        .ok()
                        .and_then(|id| dedup_partitions.get(id).copied())
                },
                identity_entry,
            );
        }
        let mut out = SortedWrites::default();
        let (commit, cf) = (self.counters.next_commit, self.store.cf(CF_OUTBOX));
        self.published
            .changes_gate()
            .made(commit, self.counters.next_seq.saturating_sub(1));
        let counters = &self.counters;
        builder.finish(
            commit,
            |p| counters.clock_of(p),
            |p| counters.next_pseq_of(p),
            |partition, encode| {
                out.put_with(cf, &outbox_key(partition, commit), encode);
            },
        );
        if out.is_empty() {
            return out;
        }
        self.counters.next_commit += 1;
        self.store
            .put_meta_u64(&mut out, META_COMMIT, self.counters.next_commit);
        out
    }

    /// Restores a partition of another store (or of this one, after it was dropped) from
    /// its changelog deltas: its customers' records, retained events, timers, dedup entries
    /// and identity graph entries as the highest commit read left them, and the input
    /// positions to resume from. Refused whole if this store already holds a customer of
    /// that partition, or hashes customers to another number of partitions. Commits made
    /// here afterwards are numbered after the restored ones.
    pub fn restore_partition(&mut self, restore: &Restore) -> Result<PartitionSummary, EngineError> {
        self.settle();
        let published = self.published.clone();
        let mut epoch = published.changelog_gate.lock().unwrap_or_else(|e| e.into_inner());
        *epoch += 1;
        let partition = restore.partition;
        self.check_partition_count(restore.partitions)?;
        restore
            .check()
            .map_err(|e| EngineError::Conflict(format!("{e}; nothing was restored")))?;
        // A standby's copy of it is superseded by what was read whole.
        self.drop_standby_copy(partition)?;
        self.check_holds_none(partition)?;
        let mut wb = WriteBatch::default();
        MembershipIndex::forget_checkpoint(&self.store, &mut wb);
        let mut written = Written::new(partition, self.config.partitions);
        for (family, key) in restore.deletes() {
            wb.delete_cf(self.store.cf(family.cf_name()), key);
        }
        for (family, key, value) in restore.values() {
            self.write_partition_key(&mut wb, &mut written, family, key, value)?;
        }
        let (take_over, orphans) = restore.take_over_writes();
        let taking = Taking {
            partition,
            commit: restore.commit,
            clock: restore.clock,
            next_pseq: restore.next_pseq,
            positions: restore.positions().map(|(s, o)| (s.to_owned(), o)).collect(),
            marker: restore.marker(),
            take_over,
            orphans,
        };
        self.take_partition(wb, taking, written)
    }

    /// Refuses a changelog written under another partition count than this store's.
    pub(super) fn check_partition_count(&self, partitions: u32) -> Result<(), EngineError> {
        if partitions != self.config.partitions {
            return Err(EngineError::Conflict(format!(
                "the changelog is of a store with {partitions} partitions; this one has {}: nothing was restored",
                self.config.partitions
            )));
        }
        Ok(())
    }

    /// Refuses a partition this store holds customers of.
    pub(super) fn check_holds_none(&self, partition: u32) -> Result<(), EngineError> {
        let counts = self.reader().partition_counts(self.config.partitions)?;
        if counts.get(partition as usize).copied().unwrap_or(0) > 0 {
            return Err(EngineError::Conflict(format!(
                "this store already holds {} customers of partition {partition}: drop them first; nothing was restored",
                counts[partition as usize]
            )));
        }
        Ok(())
    }

    /// Puts one key of a partition read from its changelog into `wb`, checked: a customer's
    /// record unnumbered (numbered when the index takes the partition in), an event or a
    /// timer of a customer of that partition.
    pub(super) fn write_partition_key(
        &mut self,
        wb: &mut WriteBatch,
        written: &mut Written,
        family: Family,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), EngineError> {
        let (partition, partitions) = (written.summary.partition, written.summary.partitions);
        let cf = self.store.cf(family.cf_name());
        match family {
            Family::Customers => {
                let id = std::str::from_utf8(key)
                    .map_err(|_| EngineError::Conflict("a changelog customer id is not UTF-8".into()))?;
                if partition_of(key, partitions) != partition {
                    return Err(EngineError::Conflict(format!(
                        "customer `{id}` in the changelog of partition {partition} is not of that partition"
                    )));
                }
                let mut state = CustomerState::decode(value).map_err(StoreError::from)?;
                // Numbered when the index takes the restored customers in; the window state
                // is built from the events on the first evaluation.
                state.number = crate::index::NO_NUMBER;
                if state.generation != self.generation {
                    written.other_generation += 1;
                }
                wb.put_cf(cf, key, state.encode(None));
                written.summary.customers += 1;
                written.customers.push(id.to_owned());
            }
            Family::Events => {
                let (customer, arrival) =
                    crate::store::check_event_entry(key, value).map_err(StoreError::from)?;
                if partition_of(customer.as_bytes(), partitions) != partition {
                    return Err(EngineError::Conflict(format!(
                        "an event of `{customer}` in the changelog of partition {partition} is not of that partition"
                    )));
                }
                written.max_arrival = written.max_arrival.max(Some(arrival));
                wb.put_cf(cf, key, value);
                written.summary.events += 1;
            }
            Family::Timers => {
                let (due, customer) = crate::store::decode_timer_key(key).map_err(StoreError::from)?;
                written.timers.push((due, Arc::<str>::from(customer)));
                wb.put_cf(cf, key, value);
            }
            Family::Dedup => {
                Reader::new(value).i64().map_err(StoreError::from)?;
                wb.put_cf(cf, key, value);
                written.summary.dedup_entries += 1;
            }
            Family::Identities => {
                wb.put_cf(cf, key, value);
                written.summary.identity_entries += 1;
            }
        }
        Ok(())
    }

    /// Takes in a partition whose keys `wb` writes (`written`): from now on this store
    /// owns it, numbering its commits after the ones read, its changes after the `pseq`
    /// read, judging it at the clock read and resuming its input at the positions read;
    /// its first checkpoint folds `taking`'s take-over writes and tombstones the delta
    /// records read. Its timers fire here, its customers are indexed.
    pub(super) fn take_partition(
        &mut self,
        mut wb: WriteBatch,
        taking: Taking,
        written: Written,
    ) -> Result<PartitionSummary, EngineError> {
        let partition = taking.partition;
        if let Some(arrival) = written.max_arrival {
            // Later events of these customers arrive after the restored ones.
            self.counters.next_arrival = self.counters.next_arrival.max(arrival + 1);
        }
        self.counters.next_commit = self.counters.next_commit.max(taking.commit + 1);
        if self.config.changelog {
            // This store owns the partition in the topic from now on: its first checkpoint
            // of it folds onto what was restored and tombstones the delta records read
            // (the keys they last wrote go into the outbox for that fold).
            let template = Delta {
                partition,
                partitions: self.config.partitions,
                clock: taking.clock,
                positions: taking.positions.clone(),
                next_pseq: taking.next_pseq,
                ..Delta::default()
            };
            let deltas = crate::changelog::take_over_deltas(
                taking.take_over,
                self.counters.next_commit,
                BASELINE_DELTA_BYTES,
                &template,
            );
            let mut commit = self.counters.next_commit;
            for delta in deltas {
                commit = delta.commit;
                wb.put_cf(
                    self.store.cf(CF_OUTBOX),
                    outbox_key(partition, commit),
                    delta.encode(),
                );
            }
            self.counters.next_commit = commit + 1;
            // Not published: what it says is in the topic already, in the records its fold
            // tombstones only after the keyed records that replace them.
            let published = format!("{META_CHANGELOG_PUBLISHED}{partition}");
            self.store.put_meta_u64(&mut wb, &published, commit);
            let meta = self.store.cf(CF_META);
            let marker = format!("{META_CHANGELOG_MARKER}{partition}");
            wb.put_cf(meta, marker.as_bytes(), taking.marker.encode());
            let mut w = crate::codec::Writer::new();
            w.u64(taking.orphans.len() as u64);
            for key in &taking.orphans {
                w.str(key);
            }
            let name = format!("{META_CHANGELOG_ORPHANS}{partition}");
            wb.put_cf(meta, name.as_bytes(), w.buf);
        }
        if let (Some(next), Some(restored)) = (
            self.counters.next_pseq.get_mut(partition as usize),
            taking.next_pseq,
        ) {
            // Its changes numbered on from where its last owner's stopped.
            *next = restored;
            self.store
                .put_meta_u64(&mut wb, &next_pseq_key(partition), restored);
        }
        if self.config.partition_clocks() {
            // The partition's own clock, as its last owner left it.
            self.counters.partition_clocks[partition as usize] = taking.clock;
            let key = partition_clock_key(partition);
            match taking.clock {
                Some(clock) => self.store.put_meta_i64(&mut wb, &key, clock),
                None => wb.delete_cf(self.store.cf(CF_META), key.as_bytes()),
            }
        }
        // The clock never moves backwards, and the partition was judged up to its own.
        if self.config.clock == ClockMode::Event && taking.clock > self.counters.clock {
            self.counters.clock = taking.clock;
            if let Some(clock) = taking.clock {
                self.store.put_meta_i64(&mut wb, META_CLOCK, clock);
            }
        }
        self.store
            .put_meta_u64(&mut wb, META_ARRIVAL, self.counters.next_arrival);
        self.store
            .put_meta_u64(&mut wb, META_COMMIT, self.counters.next_commit);
        for (source, offset) in &taking.positions {
            let key = format!("{META_OFFSET_PREFIX}{source}");
            self.store.put_meta_u64(&mut wb, &key, *offset);
        }
        if written.other_generation > 0 {
            wb.put_cf(self.store.cf(CF_META), META_BACKFILL.as_bytes(), []);
        }
        self.store.commit(wb)?;
        if written.other_generation > 0 {
            // The sweep (from the first customer: one under way may have passed these)
            // brings them up to this node's rules; each is also upgraded when touched.
            tracing::info!(
                partition,
                customers = written.other_generation,
                "restored customers judged under another rule-set generation; re-evaluating them"
            );
            self.start_backfill();
        }
        self.published.set_clock(self.counters.clock);
        self.published
            .set_partition_clocks(&self.counters.partition_clocks);
        // Restored to be owned: its timers fire here.
        self.activate_partition(partition);
        for (due, customer) in written.timers {
            let i = self.shard_index(&customer);
            self.shards[i].timers.insert((due, customer));
        }
        self.reload_aliases()?;
        *self.owner_cache.borrow_mut() =
            identity::load_owner_cache(&self.store, self.config.identity.cache_entries)?;
        // Only the restored customers are indexed: a node restoring several partitions does
        // not rescan the ones it already holds.
        let customers: Vec<&str> = written.customers.iter().map(String::as_str).collect();
        self.index.add_customers(&self.store, &customers)?;
        self.checkpoint_index()?;
        Ok(written.summary)
    }
}

/// What a partition read from its changelog put into a store's write batch.
pub(super) struct Written {
    pub summary: PartitionSummary,
    /// The customers whose records were written.
    pub customers: Vec<String>,
    pub timers: Vec<(i64, Arc<str>)>,
    /// The latest arrival of an event written.
    pub max_arrival: Option<u64>,
    /// Customers judged under another generation of the rule set than this node runs (the
    /// node that wrote them was ahead or behind, or in the middle of a backfill).
    pub other_generation: u64,
}

impl Written {
    pub fn new(partition: u32, partitions: u32) -> Written {
        Written {
            summary: PartitionSummary {
                partition,
                partitions,
                ..Default::default()
            },
            customers: Vec::new(),
            timers: Vec::new(),
            max_arrival: None,
            other_generation: 0,
        }
    }
}

/// What a store taking a partition over starts from, besides its keys.
pub(super) struct Taking {
    pub partition: u32,
    /// The highest commit read.
    pub commit: u64,
    pub clock: Option<i64>,
    pub next_pseq: Option<u64>,
    /// The input positions to resume from.
    pub positions: Vec<(String, u64)>,
    /// The checkpoint marker of what was read.
    pub marker: Delta,
    /// The keys last written by delta records, as they stand, and those records' keys.
    pub take_over: Vec<crate::changelog::DeltaWrite>,
    pub orphans: Vec<String>,
}

impl Engine {
    /// Lets partition `partition` go, for another store to restore it from the state
    /// changelog (its new owner): its customers, its deltas in the outbox, its checkpoint
    /// and its Kafka offsets leave this store. Refused while the broker has not confirmed
    /// every delta of it (the new owner would miss them): try again once it has.
    pub fn release_partition(&mut self, partition: u32) -> Result<PartitionSummary, EngineError> {
        self.settle();
        let published = self.published.clone();
        let mut epoch = published.changelog_gate.lock().unwrap_or_else(|e| e.into_inner());
        let unconfirmed = self.unconfirmed_deltas(partition)?;
        if unconfirmed > 0 {
            return Err(EngineError::Conflict(format!(
                "{unconfirmed} state changelog deltas of partition {partition} are not confirmed by the broker yet: nothing was released"
            )));
        }
        let summary = self.forget_partition(partition)?;
        *epoch += 1;
        Ok(summary)
    }

    /// Drops partition `partition` like [`Engine::release_partition`] whatever the broker
    /// confirmed: for a partition this store holds but another store owned since (its state
    /// here is stale, and its unpublished deltas must never reach the topic after the
    /// owner's).
    pub fn discard_partition(&mut self, partition: u32) -> Result<PartitionSummary, EngineError> {
        self.settle();
        let published = self.published.clone();
        let mut epoch = published.changelog_gate.lock().unwrap_or_else(|e| e.into_inner());
        let summary = self.forget_partition(partition)?;
        *epoch += 1;
        Ok(summary)
    }

    /// How many of partition `partition`'s deltas in the outbox the broker has not
    /// confirmed.
    pub fn unconfirmed_deltas(&self, partition: u32) -> Result<u64, EngineError> {
        let confirmed = self
            .store
            .meta_u64(&format!("{META_CHANGELOG_PUBLISHED}{partition}"))?;
        let mut unconfirmed = 0;
        for item in self.store.scan_from(CF_OUTBOX, &outbox_key(partition, 0)) {
            let (key, _) = item?;
            let (p, commit) = parse_outbox_key(&key)?;
            if p != partition {
                break;
            }
            unconfirmed += u64::from(commit > confirmed);
        }
        Ok(unconfirmed)
    }

    /// The customers, outbox deltas, changelog position and Kafka offsets of `partition`
    /// leave the store (the caller holds the changelog gate).
    pub(super) fn forget_partition(&mut self, partition: u32) -> Result<PartitionSummary, EngineError> {
        let partitions = self.config.partitions;
        // Its customers go: so do their timers waiting apart. Not owned here any more, it
        // stays parked (a standby may copy it) until a restore takes it in.
        self.parked.timers.remove(&partition);
        self.parked.partitions.insert(partition);
        // One batch with the customers': a crash in between would leave the offsets of
        // customers gone, and a restart resume from them.
        self.drop_partition_with(partition, |store, wb| {
            // `drop_partition` refuses a partition past the count: `partition + 1` fits.
            wb.delete_range_cf(
                store.cf(CF_OUTBOX),
                outbox_key(partition, 0),
                outbox_key(partition + 1, 0),
            );
            let meta = store.cf(CF_META);
            for name in [
                META_CHANGELOG_PUBLISHED,
                META_CHANGELOG_MARKER,
                META_CHANGELOG_ORPHANS,
                super::standby::META_STANDBY,
            ] {
                wb.delete_cf(meta, format!("{name}{partition}").as_bytes());
            }
            for source in super::read::source_offsets(store)?.into_keys() {
                if crate::changelog::position_partition(&source, partitions) == Some(partition) {
                    wb.delete_cf(meta, format!("{META_OFFSET_PREFIX}{source}").as_bytes());
                }
            }
            Ok(())
        })
    }
}

impl ReadHandle {
    /// The state publisher's round: held while it publishes, with the epoch a release or a
    /// restore counts up (then its position is read again).
    pub(crate) fn changelog_gate(&self) -> std::sync::MutexGuard<'_, u64> {
        self.published
            .changelog_gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A changes publisher runs and has confirmed every change up to `confirmed`: from now
    /// on a delta is published only once the changes up to its commit are confirmed.
    pub fn gate_state_on_changes(&self, confirmed: u64) {
        self.published.changes_gate().turn_on(confirmed);
    }

    /// The changes topic confirmed every change up to `seq`.
    pub fn changes_confirmed(&self, seq: u64) {
        self.published.changes_gate().confirm(seq);
    }

    /// Whether the delta of `commit` may be published ([`ChangesGate`]).
    pub fn delta_may_go(&self, commit: u64) -> bool {
        self.published.changes_gate().may_publish(commit)
    }

    /// Whether this store holds partition `partition` of the state changelog: it has a
    /// confirmed position of it, deltas of it in the outbox, or a Kafka offset of it. A
    /// released partition, or one this store never wrote, is not held.
    pub fn holds_partition(&self, partition: u32) -> Result<bool, EngineError> {
        let published = format!("{META_CHANGELOG_PUBLISHED}{partition}");
        if self.store.get(CF_META, published.as_bytes())?.is_some() {
            return Ok(true);
        }
        if let Some(item) = self.store.scan_from(CF_OUTBOX, &outbox_key(partition, 0)).next() {
            let (key, _) = item?;
            if parse_outbox_key(&key)?.0 == partition {
                return Ok(true);
            }
        }
        Ok(super::read::source_offsets(&self.store)?
            .keys()
            .any(|source| crate::changelog::position_partition(source, self.partitions) == Some(partition)))
    }

    /// Waits until the broker has confirmed every delta of `partitions` this store has
    /// committed so far (the state changelog on), at most `within`; whether it did. What a
    /// member of a group answers a write over HTTP after: acknowledged, the write is in the
    /// state topic, so a node taking the partition over has it even if this one never
    /// comes back.
    pub fn wait_changelog_confirmed(
        &self,
        partitions: &[u32],
        within: std::time::Duration,
    ) -> Result<bool, EngineError> {
        let mut targets = Vec::new();
        for &partition in partitions {
            let last = self
                .store
                .scan_back_from(CF_OUTBOX, &outbox_key(partition, u64::MAX))
                .next()
                .transpose()?;
            if let Some((key, _)) = last {
                let (of, commit) = parse_outbox_key(&key)?;
                if of == partition {
                    targets.push((partition, commit));
                }
            }
        }
        let deadline = std::time::Instant::now() + within;
        loop {
            let mut behind = false;
            for &(partition, commit) in &targets {
                let name = format!("{META_CHANGELOG_PUBLISHED}{partition}");
                let confirmed = match self.store.get(CF_META, name.as_bytes())? {
                    Some(value) => Reader::new(&value).u64().map_err(StoreError::from)?,
                    None => 0,
                };
                behind |= confirmed < commit;
            }
            if !behind {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Every input's position (files, Kafka partitions) as of the last commit.
    pub fn source_offsets(&self) -> Result<std::collections::BTreeMap<String, u64>, EngineError> {
        super::read::source_offsets(&self.store)
    }

    /// Up to `limit` deltas in the outbox not yet published: of each partition, those after
    /// its entry in `published` (its highest confirmed commit), in commit order, partition
    /// after partition: `(partition, commit, encoded delta)`.
    pub fn changelog_unpublished(
        &self,
        published: &BTreeMap<u32, u64>,
        limit: usize,
    ) -> Result<Vec<(u32, u64, Vec<u8>)>, EngineError> {
        let mut out = Vec::new();
        let mut from = outbox_key(0, 0);
        'seek: loop {
            for item in self.store.scan_from(CF_OUTBOX, &from) {
                let (key, value) = item?;
                let (partition, commit) = parse_outbox_key(&key)?;
                let done = published.get(&partition).copied().unwrap_or(0);
                if commit <= done {
                    // Published: on to the first delta after the confirmed ones.
                    from = match done.checked_add(1) {
                        Some(next) => outbox_key(partition, next),
                        None => match partition.checked_add(1) {
                            Some(p) => outbox_key(p, 0),
                            None => break 'seek,
                        },
                    };
                    continue 'seek;
                }
                if out.len() >= limit {
                    break 'seek;
                }
                out.push((partition, commit, value.into_vec()));
            }
            break;
        }
        Ok(out)
    }

    /// How many deltas (up to `limit`) the broker has not confirmed yet.
    pub fn changelog_unconfirmed(&self, limit: usize) -> Result<usize, EngineError> {
        let published = self
            .changelog_publisher_state()?
            .into_iter()
            .map(|(partition, (commit, _))| (partition, commit))
            .collect();
        Ok(self.changelog_unpublished(&published, limit)?.len())
    }

    /// Where the state publisher stands, per partition with deltas in the outbox or a
    /// confirmed position: the highest commit the broker confirmed, and the bytes of the
    /// confirmed deltas the outbox keeps for the next checkpoint.
    pub fn changelog_publisher_state(&self) -> Result<BTreeMap<u32, (u64, u64)>, EngineError> {
        let mut state: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for item in self.store.scan_from(CF_META, META_CHANGELOG_PUBLISHED.as_bytes()) {
            let (key, value) = item?;
            let Some(partition) = key.strip_prefix(META_CHANGELOG_PUBLISHED.as_bytes()) else {
                break;
            };
            let partition = std::str::from_utf8(partition)
                .ok()
                .and_then(|p| p.parse::<u32>().ok())
                .ok_or_else(|| {
                    StoreError::Corrupt("a changelog publisher position of no partition".into())
                })?;
            let commit = Reader::new(&value).u64().map_err(StoreError::from)?;
            state.entry(partition).or_default().0 = commit;
        }
        for item in self.store.scan_from(CF_OUTBOX, &[]) {
            let (key, value) = item?;
            let (partition, commit) = parse_outbox_key(&key)?;
            let (published, kept) = state.entry(partition).or_default();
            if commit <= *published {
                *kept += value.len() as u64;
            }
        }
        Ok(state)
    }

    /// Records what the broker confirmed: per partition, the highest commit (`(partition,
    /// commit)` pairs, in any order). The deltas stay for the partition's next checkpoint.
    pub fn changelog_published(&self, published: &[(u32, u64)]) -> Result<(), EngineError> {
        let mut highest: BTreeMap<u32, u64> = BTreeMap::new();
        for &(partition, commit) in published {
            let h = highest.entry(partition).or_default();
            *h = (*h).max(commit);
        }
        let mut wb = WriteBatch::default();
        for (partition, commit) in highest {
            let name = format!("{META_CHANGELOG_PUBLISHED}{partition}");
            self.store.put_meta_u64(&mut wb, &name, commit);
        }
        Ok(self.store.commit(wb)?)
    }

    /// The checkpoint of `partition` up to commit `upto` (its confirmed deltas), folded
    /// onto its previous checkpoint's marker.
    pub fn changelog_checkpoint(&self, partition: u32, upto: u64) -> Result<Checkpoint, EngineError> {
        let name = format!("{META_CHANGELOG_MARKER}{partition}");
        let previous = match self.store.get(CF_META, name.as_bytes())? {
            Some(bytes) => Some(Delta::decode(&bytes).map_err(StoreError::from)?),
            None => None,
        };
        let mut checkpoint = Checkpoint::new(partition, self.partitions, previous);
        let orphans = format!("{META_CHANGELOG_ORPHANS}{partition}");
        if let Some(bytes) = self.store.get(CF_META, orphans.as_bytes())? {
            let mut r = Reader::new(&bytes);
            for _ in 0..r.len().map_err(StoreError::from)? {
                let key = r.str().map_err(StoreError::from)?;
                checkpoint.delta_records.push(key.to_owned());
            }
        }
        for item in self.store.scan_from(CF_OUTBOX, &outbox_key(partition, 0)) {
            let (key, value) = item?;
            let (p, commit) = parse_outbox_key(&key)?;
            if p != partition || commit > upto {
                break;
            }
            checkpoint.add(commit, &value).map_err(StoreError::from)?;
        }
        Ok(checkpoint)
    }

    /// A checkpoint of `partition` is confirmed with its tombstones: the deltas it folded
    /// leave the outbox and its marker is the next checkpoint's start.
    pub fn changelog_checkpointed(
        &self,
        partition: u32,
        upto: u64,
        marker: &Delta,
    ) -> Result<(), EngineError> {
        let mut wb = WriteBatch::default();
        let cf = self.store.cf(CF_OUTBOX);
        match upto.checked_add(1) {
            Some(next) => wb.delete_range_cf(cf, outbox_key(partition, 0), outbox_key(partition, next)),
            None => wb.delete_range_cf(cf, outbox_key(partition, 0), outbox_key(partition + 1, 0)),
        }
        let name = format!("{META_CHANGELOG_MARKER}{partition}");
        wb.put_cf(self.store.cf(CF_META), name.as_bytes(), marker.encode());
        let orphans = format!("{META_CHANGELOG_ORPHANS}{partition}");
        wb.delete_cf(self.store.cf(CF_META), orphans.as_bytes());
        Ok(self.store.commit(wb)?)
    }

    /// Up to `limit` changelog deltas of `partition` still in the outbox, after commit
    /// `after`, in commit order: `(commit, encoded delta)`.
    pub fn changelog_deltas(
        &self,
        partition: u32,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, EngineError> {
        let mut out = Vec::new();
        let from = outbox_key(partition, after.saturating_add(1));
        for item in self.store.scan_from(CF_OUTBOX, &from) {
            let (key, value) = item?;
            if out.len() >= limit || key.get(..4) != Some(&partition.to_be_bytes()[..]) {
                break;
            }
            let (_, commit) = parse_outbox_key(&key)?;
            out.push((commit, value.into_vec()));
        }
        Ok(out)
    }
}

fn parse_outbox_key(key: &[u8]) -> Result<(u32, u64), EngineError> {
    if key.len() != 12 {
        return Err(StoreError::Corrupt("an outbox key of the wrong length".into()).into());
    }
    let partition = u32::from_be_bytes(key[..4].try_into().expect("4 bytes"));
    Ok((
        partition,
        u64::from_be_bytes(key[4..].try_into().expect("8 bytes")),
    ))
}

#[cfg(test)]
mod tests {
    use super::ChangesGate;

    #[test]
    fn a_delta_waits_for_the_changes_of_its_commit_and_of_every_commit_before() {
        let mut gate = ChangesGate::default();
        // Off (no changes publisher): everything may go, and one commit stands for all.
        gate.made(1, 10);
        gate.made(2, 12);
        assert!(gate.may_publish(2));
        gate.turn_on(9);
        assert!(
            !gate.may_publish(1),
            "changes 1..=12 made up to commit 2, 9 confirmed"
        );
        assert!(!gate.may_publish(2));
        gate.made(3, 12); // no change of its own
        gate.made(4, 20);
        gate.confirm(12);
        assert!(gate.may_publish(1) && gate.may_publish(2) && gate.may_publish(3));
        assert!(!gate.may_publish(4) && !gate.may_publish(5), "4 made 13..=20");
        gate.confirm(19);
        assert!(!gate.may_publish(4));
        gate.confirm(20);
        assert!(gate.may_publish(4), "every change confirmed");
        assert!(gate.may_publish(5), "a commit not recorded made no change");
        gate.confirm(3);
        assert!(gate.may_publish(4), "a confirmation never goes back");
    }
}
