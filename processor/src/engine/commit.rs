//! The one transaction helper and the commit: every state-changing call builds one batch
//! and either commits it atomically (customer records, counters, change log, index) or rolls
//! the in-memory state back as if it had never started.

use super::*;

impl Engine {
    /// Runs `work` on a fresh batch and commits it atomically, returning what `work`
    /// returned and the changes committed. If `work` or the commit fails, the counters,
    /// the caches and the timers roll back to the state of the last commit, as if the call
    /// had never started.
    pub(super) fn transact<R>(
        &mut self,
        work: impl FnOnce(&mut Engine, &mut Batch) -> Result<R, EngineError>,
    ) -> Result<(R, Vec<Change>), EngineError> {
        self.transact_placed(work).map(|(r, changes, _)| (r, changes))
    }

    /// [`Engine::transact`], with the step of each change (its event's index in the round).
    pub(super) fn transact_placed<R>(
        &mut self,
        work: impl FnOnce(&mut Engine, &mut Batch) -> Result<R, EngineError>,
    ) -> Result<(R, Vec<Change>, Vec<u64>), EngineError> {
        // A commit still being written comes first.
        self.settle();
        let saved = self.counters.clone();
        let mut batch = Batch::default();
        let result = work(self, &mut batch)
            .and_then(|r| self.commit(batch).map(|(changes, steps)| (r, changes, steps)));
        if result.is_err() {
            self.rollback(saved);
        }
        result
    }

    /// Runs `work` on the worker of the shard owning `customer`, at `step` of the round (a
    /// sweep's customers, a manual tag: work done one customer at a time on this thread).
    pub(super) fn with_worker<R>(
        &mut self,
        customer: &str,
        step: u64,
        work: impl FnOnce(&mut Worker<'_>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        self.with_worker_at(customer, Place::work(step), &[], work)
    }

    /// [`Engine::with_worker`] at any place of a round whose clock moved at `steps`.
    pub(super) fn with_worker_at<R>(
        &mut self,
        customer: &str,
        place: Place,
        steps: &[(u64, i64)],
        work: impl FnOnce(&mut Worker<'_>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        let i = self.shard_index(customer);
        let timers = self.config.timers_per_round;
        let (ctx, shards) = self.parts(steps, timers);
        work(&mut Worker::new(&ctx, &mut shards[i], place))
    }

    /// Runs `work` at `place` on the worker of the shard owning `customer`: in a dealt round
    /// queued on the shard's thread after the events dealt to it so far — with `early`,
    /// before them when none is the customer's — (not waited for: an error fails the
    /// round); otherwise here, now.
    pub(super) fn on_worker<'s>(
        &mut self,
        round: &mut Round<'s>,
        customer: &str,
        early: bool,
        place: Place,
        work: impl for<'w> FnOnce(&mut Worker<'w>) -> Result<(), EngineError> + Send + 's,
    ) -> Result<(), EngineError> {
        let shard = self.shard_index(customer);
        match &mut round.dealer {
            Some(dealer) => dealer.queue(
                shard,
                customer,
                early,
                &round.steps,
                Box::new(move |w| {
                    w.place = place;
                    work(w)
                }),
            ),
            None => {
                let steps = std::mem::take(&mut round.steps);
                let result = self.with_worker_at(customer, place, &steps, work);
                round.steps = steps;
                result
            }
        }
    }

    /// Writes the round: new customers numbered and changes given their `seq` in the order
    /// one thread would have made them, customer records, counters, and everything the
    /// shards queued, atomically. Returns the changes in `seq` order with their steps.
    fn commit(&mut self, batch: Batch) -> Result<(Vec<Change>, Vec<u64>), EngineError> {
        let (writes, _, visible) = self.prepare(batch)?;
        let writing = std::time::Instant::now();
        self.store.commit_sorted_parts(writes)?;
        metrics::histogram!("tagstream_commit_write_seconds").record(writing.elapsed().as_secs_f64());
        let changes = visible.show();
        self.complete(&[]);
        Ok(changes)
    }

    /// Everything of a commit but the write: numbers, `seq`s, the customer records encoded
    /// (by the shards, in parallel), counters; the writes, what the engine keeps of the
    /// commit until they are durable, and what makes them visible once they are.
    pub(super) fn prepare(
        &mut self,
        mut batch: Batch,
    ) -> Result<(Vec<SortedWrites>, Done, Visible), EngineError> {
        if let Some(snapshot) = self.quality.snapshot_due(wall_ms()) {
            batch
                .wb
                .put_cf(self.store.cf(CF_META), META_QUALITY.as_bytes(), snapshot);
        }
        if let Some(stats) = self.identity_counts.take_dirty() {
            batch
                .wb
                .put_cf(self.store.cf(CF_META), META_IDENTITY.as_bytes(), stats);
        }
        let mut parts: Vec<Batch> = self
            .shards
            .iter_mut()
            .map(|s| {
                let next = Batch {
                    wb: crate::writes::SortedWrites::sized_like(&s.batch.wb),
                    ..Batch::default()
                };
                std::mem::replace(&mut s.batch, next)
            })
            .collect();
        let new_ids = self.number_new_customers(&mut parts, &mut batch);
        let (changes, steps, numbers) = self.sequence_changes(&mut parts, &mut batch);
        let now = self.now();
        let instants = Instants::new(&self.config, &self.counters, now);
        let retention_ms = self.config.retention_ms;
        let rules = &self.rules;
        let store = &*self.store;
        let mut touched: Vec<Vec<u32>> = parts.iter_mut().map(|p| std::mem::take(&mut p.touched)).collect();
        let inputs: Vec<(&mut Batch, &mut Vec<u32>)> = parts.iter_mut().zip(touched.iter_mut()).collect();
        in_parallel(&mut self.shards, inputs, |shard, (part, touched)| {
            touched.reserve(part.dirty.len() - part.encoded.len());
            for customer in part.dirty.iter().filter(|c| !part.encoded.contains(*c)) {
                shard.cache.update(customer, |state| {
                    if state.windows.is_none() && state.history_loaded {
                        // Loaded with its history but not judged (a segment swap touches only
                        // memberships): the windows are built before the history goes, since
                        // the cache and the record keep the windows, not the history.
                        state.advance_windows(rules, instants.of(customer), retention_ms);
                    }
                    store.put_customer(&mut part.wb, customer, state, rules);
                    touched.push(state.number);
                    // Its events are in this batch: the cache keeps only the windows (a failed
                    // commit clears the cache).
                    state.unload_history();
                });
            }
            Ok(())
        })?;
        if let Some(clock) = self.counters.clock {
            self.store.put_meta_i64(&mut batch.wb, META_CLOCK, clock);
        }
        for partition in 0..self.counters.moved.len() as u32 {
            if !std::mem::take(&mut self.counters.moved[partition as usize]) {
                continue;
            }
            if let Some(clock) = self
                .counters
                .partition_clocks
                .get(partition as usize)
                .copied()
                .flatten()
            {
                let key = partition_clock_key(partition);
                self.store.put_meta_i64(&mut batch.wb, &key, clock);
            }
            if let Some(next) = self.counters.next_pseq_of(partition) {
                let key = next_pseq_key(partition);
                self.store.put_meta_u64(&mut batch.wb, &key, next);
            }
        }
        self.store
            .put_meta_u64(&mut batch.wb, META_SEQ, self.counters.next_seq);
        self.store
            .put_meta_u64(&mut batch.wb, META_ARRIVAL, self.counters.next_arrival);
        self.store
            .put_meta_u64(&mut batch.wb, META_DLQ, self.counters.next_dlq);
        // Customers a merge absorbed keep their numbers (numbers are never reused) but are
        // gone: queries over the whole base and SQL's rows leave them out from now on.
        let absorbed: Vec<u32> = parts
            .iter()
            .flat_map(|p| p.gone.values().copied())
            .filter(|n| *n != crate::index::NO_NUMBER)
            .collect();
        if !absorbed.is_empty() {
            let mut gone = self.published.numbers_gone();
            gone.extend(absorbed);
            let mut bytes = Vec::with_capacity(gone.serialized_size());
            gone.serialize_into(&mut bytes).expect("writing to a Vec");
            batch
                .wb
                .put_cf(self.store.cf(CF_META), META_NUMBERS_GONE.as_bytes(), bytes);
            self.published.set_numbers_gone(gone);
        }
        let (profiles, journal) = self.profile_updates(&parts, &mut batch);
        let mut writes = Vec::with_capacity(parts.len() + 1);
        writes.push(std::mem::take(&mut batch.wb));
        let mut dirty = Vec::with_capacity(parts.len());
        let mut written = Some(Vec::with_capacity(parts.len()));
        for (part, touched) in parts.iter().zip(&mut touched) {
            touched.extend(part.gone.values().filter(|n| **n != crate::index::NO_NUMBER));
        }
        for part in parts {
            writes.push(part.wb);
            // The customers it deletes are written too (their events go).
            let mut customers = part.dirty;
            customers.extend(part.gone.into_keys());
            dirty.push(customers);
            written = written.zip(part.written).map(|(mut all, shard)| {
                all.push(shard);
                all
            });
        }
        if self.config.changelog {
            let outbox = self.changelog_deltas(&writes, &batch.dedup_partitions);
            writes.push(outbox);
        }
        let next_number = new_ids.last().map_or(0, |(number, _)| number + 1);
        let done = Done {
            next_number,
            journal,
            dedup: batch.dedup,
            identities: batch.identities,
            dirty: Arc::new(dirty),
            written: written.map(Arc::new),
        };
        let visible = Visible {
            new_ids,
            changes,
            steps,
            numbers,
            profiles,
            journal,
            touched: touched.concat(),
            clock: self.counters.clock,
            partition_clocks: self.counters.partition_clocks.clone(),
            now: Instants::new(&self.config, &self.counters, now).floor(),
            wall: self.config.clock == ClockMode::Wall,
            index: self.index.clone(),
            store: self.store.clone(),
            published: self.published.clone(),
            durable: self.durable_seq.clone(),
            rules: self.rules.clone(),
        };
        Ok((writes, done, visible))
    }

    /// What follows a durable write on the engine's side, once it is visible: the cache's
    /// clock and budget (never evicting the customers of `pinned`, the shards' dirty
    /// customers of a commit still to be written).
    pub(super) fn complete(&mut self, pinned: &[foldhash::HashSet<Arc<str>>]) {
        self.batches += 1;
        self.evict(pinned);
    }

    /// Numbers the customers new in this round in the order one thread would have met them,
    /// after every customer numbered before.
    fn number_new_customers(&mut self, parts: &mut [Batch], batch: &mut Batch) -> Vec<(u32, Arc<str>)> {
        let mut new: Vec<(Place, usize, Arc<str>)> = Vec::new();
        for (shard, part) in parts.iter_mut().enumerate() {
            new.extend(part.new_ids.drain(..).map(|(place, id)| (place, shard, id)));
        }
        if new.is_empty() {
            return Vec::new();
        }
        if parts.len() > 1 || parts.iter().any(|p| p.placed_out_of_order) {
            new.sort_by(|a, b| a.0.cmp(&b.0));
        }
        // After every customer numbered before, also by a commit still being written (whose
        // numbers the index may or may not show yet: it is updated where the write ends).
        let first = self
            .index
            .read()
            .customers()
            .max(self.pending.as_ref().map_or(0, |p| p.done.next_number));
        let cf = self.store.cf(CF_NUMBERS);
        new.into_iter()
            .enumerate()
            .map(|(i, (_, shard, id))| {
                let number = first + i as u32;
                self.shards[shard]
                    .cache
                    .update(&id, |state| state.number = number);
                if let Some(gone) = parts[shard].gone.get_mut(&id) {
                    // New in this round and absorbed in it too.
                    *gone = number;
                }
                batch.wb.put_cf(cf, number_key(number), id.as_bytes());
                (number, id)
            })
            .collect()
    }

    /// Gives the round's changes their `seq`, in the order one thread would have made them,
    /// and writes them to the change log. Returns them in that order with their steps and
    /// their customers' numbers.
    fn sequence_changes(
        &mut self,
        parts: &mut [Batch],
        batch: &mut Batch,
    ) -> (Vec<Change>, Vec<u64>, Vec<u32>) {
        let total: usize = parts.iter().map(|p| p.changes.len()).sum();
        let mut placed: Vec<(Place, usize, Change)> = Vec::with_capacity(total);
        for (shard, part) in parts.iter_mut().enumerate() {
            let changes = std::mem::take(&mut part.changes);
            placed.extend(
                std::mem::take(&mut part.places)
                    .into_iter()
                    .zip(changes)
                    .map(|(p, c)| (p, shard, c)),
            );
        }
        if parts.len() > 1 || parts.iter().any(|p| p.placed_out_of_order) {
            // Stable: the changes of one place come from one customer, in the order made.
            placed.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let (mut changes, mut steps, mut numbers) = (
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
        );
        let (log, by_name) = (self.store.cf(CF_CHANGES), self.store.cf(CF_CHANGES_BY_NAME));
        let partitions = self.config.partitions;
        let changelog = self.config.changelog;
        for (place, shard, mut change) in placed {
            change.seq = self.counters.next_seq;
            self.counters.next_seq += 1;
            if changelog {
                let partition = crate::partition::partition_of(change.customer_id.as_bytes(), partitions);
                change.pseq = self.counters.take_pseq(partition);
                change.rules_version = Some(self.rules_version);
            }
            let number = match self.shards[shard].cache.get(&change.customer_id) {
                Some(state) => state.number,
                None => parts[shard]
                    .gone
                    .get(&change.customer_id)
                    .copied()
                    .unwrap_or(crate::index::NO_NUMBER),
            };
            batch
                .wb
                .put_cf(log, change.seq.to_be_bytes(), change.encode_stored(number));
            if change.kind != MemberKind::Customer {
                batch.wb.put_cf(
                    by_name,
                    crate::store::change_name_key(&change.name, change.seq),
                    [],
                );
            }
            changes.push(change);
            steps.push(place.step());
            numbers.push(number);
        }
        (changes, steps, numbers)
    }

    /// The profile values of the customers whose profile this batch changed, for the
    /// columns, and the journal entry naming them, put in the batch.
    fn profile_updates(&self, parts: &[Batch], batch: &mut Batch) -> (Vec<ProfileUpdate>, Option<u64>) {
        let mut customers: Vec<(u32, &CustomerState)> = Vec::new();
        let mut updates = Vec::new();
        let mut numbers: Vec<u32> = Vec::new();
        for (shard, part) in self.shards.iter().zip(parts) {
            for customer in &part.profiles {
                if let Some(state) = shard.cache.get(customer) {
                    customers.push((state.number, state));
                }
            }
            for (number, attrs) in &part.cleared {
                updates.extend(attrs.iter().map(|attr| (*number, attr.clone(), None)));
                numbers.push(*number);
            }
        }
        if customers.is_empty() && updates.is_empty() {
            return (Vec::new(), None);
        }
        customers.sort_unstable_by_key(|(number, _)| *number);
        customers.dedup_by_key(|(number, _)| *number);
        for (number, state) in &customers {
            for (attr, entry) in &state.history.profile {
                updates.push((*number, attr.clone(), entry.value.clone()));
            }
        }
        numbers.extend(customers.iter().map(|(number, _)| *number));
        numbers.sort_unstable();
        numbers.dedup();
        let pending = self.pending.as_ref().and_then(|p| p.done.journal);
        let (entry, key, value) = self.index.journal_entry(&numbers, pending);
        batch.wb.put_cf(self.store.cf(CF_INDEX), key, value);
        (updates, Some(entry))
    }

    /// Keeps the cache within its configured size: when it grows past it, the least often
    /// (then least recently) used customers are dropped down to 90% of it, so eviction work
    /// is amortised over many batches and hot customers stay.
    fn evict(&mut self, pinned: &[foldhash::HashSet<Arc<str>>]) {
        let heap = self.config.heap_probe.map(|HeapProbe(heap_bytes)| heap_bytes());
        if let Some(heap) = heap {
            metrics::gauge!("tagstream_heap_bytes").set(heap as f64);
        }
        let budget = match heap {
            Some(heap) if self.config.bound_heap => {
                self.heap_budget
                    .cache_share(self.config.cache_bytes, heap, self.cache_usage().1)
            }
            _ => self.config.cache_bytes,
        };
        metrics::gauge!("tagstream_cache_budget_bytes").set(budget as f64);
        // Each shard keeps its share of the budgets.
        let n = self.shards.len();
        let (customers, bytes) = (self.config.cache_customers / n, budget / n);
        let (mut hits, mut misses) = (0, 0);
        for (i, shard) in self.shards.iter_mut().enumerate() {
            shard.cache.evict(customers.max(1), bytes.max(1), pinned.get(i));
            let (h, m) = shard.cache.unreported();
            (hits, misses) = (hits + h, misses + m);
        }
        metrics::counter!("tagstream_cache_lookups_total", "result" => "hit").increment(hits);
        metrics::counter!("tagstream_cache_lookups_total", "result" => "miss").increment(misses);
        let (len, bytes) = self.cache_usage();
        metrics::gauge!("tagstream_cache_customers").set(len as f64);
        metrics::gauge!("tagstream_cache_bytes").set(bytes as f64);
        let owners = self.owner_cache.borrow();
        metrics::gauge!("tagstream_identity_cache_entries").set(owners.len() as f64);
        metrics::gauge!("tagstream_identity_cache_complete").set(if owners.is_complete() {
            1.0
        } else {
            0.0
        });
    }

    pub(super) fn rollback(&mut self, saved: Counters) {
        self.counters = saved;
        for shard in &mut self.shards {
            shard.cache.clear();
            shard.batch = Batch::default();
            // Timers of the failed batch were not fired: they are pending again (reloaded
            // below).
            shard.fired = FiredTimers::default();
        }
        let timers = self.store.timers().unwrap_or_default();
        self.deal_timers(timers);
        // Merges of the failed batch were not made, nor counted, nor its identifiers kept.
        let capacity = self.config.identity.cache_entries;
        *self.owner_cache.borrow_mut() = identity::load_owner_cache(&self.store, capacity)
            .unwrap_or_else(|_| crate::identity::OwnerCache::new(capacity));
        let _ = self.reload_aliases();
        let stats = self.store.get(CF_META, META_IDENTITY.as_bytes()).ok().flatten();
        self.identity_counts.restore(stats.as_deref());
    }
}

/// What makes a durable commit visible: the membership index's update, the published clock,
/// the durable `seq`, the change counts. Shown where the write ended — on the writer thread
/// for a pipelined group — so that a group is answered once durable and visible, not after
/// the next group's evaluation; never before the write, so a reader never counts a change
/// that could still be lost, and an answered change is always in the counts.
pub(super) struct Visible {
    new_ids: Vec<(u32, Arc<str>)>,
    changes: Vec<Change>,
    steps: Vec<u64>,
    numbers: Vec<u32>,
    profiles: Vec<ProfileUpdate>,
    journal: Option<u64>,
    touched: Vec<u32>,
    /// The event clock the commit writes (and each partition's, with a clock per
    /// partition), and the earliest instant it judged anyone at.
    clock: Option<i64>,
    partition_clocks: Vec<Option<i64>>,
    now: i64,
    wall: bool,
    index: Arc<MembershipIndex>,
    store: Arc<Store>,
    published: Arc<Published>,
    durable: Arc<std::sync::atomic::AtomicU64>,
    rules: Arc<CompiledRules>,
}

impl Visible {
    /// Shows the commit; returns its changes with their steps.
    pub(super) fn show(self) -> (Vec<Change>, Vec<u64>) {
        self.index.apply(IndexCommit {
            new_ids: &self.new_ids,
            changes: &self.changes,
            numbers: &self.numbers,
            profiles: &self.profiles,
            journal: self.journal,
            touched: &self.touched,
        });
        if self.wall || self.clock.is_some() {
            self.store.set_clock(self.now);
        }
        self.published.set_clock(self.clock);
        self.published.set_partition_clocks(&self.partition_clocks);
        self.published.commit_shown();
        if let Some(last) = self.changes.last() {
            self.durable
                .fetch_max(last.seq, std::sync::atomic::Ordering::AcqRel);
        }
        count_changes(&self.rules, &self.changes);
        (self.changes, self.steps)
    }
}

/// `tagstream_changes_total{kind,cause,definition,op}`, counted per commit. Names the
/// rules do not define (tags set by hand, any string a client chose) share the label
/// `(manual)`, so the label set stays as small as the rule set.
fn count_changes(rules: &CompiledRules, changes: &[Change]) {
    let mut counts: HashMap<(MemberKind, &'static str, Option<DefId>, Op), u64> = HashMap::new();
    for c in changes {
        *counts
            .entry((c.kind, c.cause.label(), rules.lookup(&c.name), c.op))
            .or_default() += 1;
    }
    for ((kind, cause, def, op), n) in counts {
        let definition = match (kind, def) {
            (MemberKind::Customer, _) => "(identity)".to_owned(),
            (_, Some(id)) => rules.def(id).name.to_string(),
            (_, None) => "(manual)".to_owned(),
        };
        metrics::counter!("tagstream_changes_total", "kind" => kind.label(), "cause" => cause, "definition" => definition, "op" => op.label())
            .increment(n);
    }
}
