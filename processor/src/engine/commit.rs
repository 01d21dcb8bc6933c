//! The one transaction helper and the commit: every state-changing call builds one batch
//! and either commits it atomically (customer records, counters, change log, index) or rolls
//! the in-memory state back as if it had never started.

use super::*;

impl Engine {
    /// Runs `work` on a fresh batch and commits it atomically, returning what `work`
    /// returned and the changes committed. If `work` or the commit fails, the counters,
    /// the cache and the timers roll back to the state of the last commit, as if the call
    /// had never started.
    pub(super) fn transact<R>(
        &mut self,
        work: impl FnOnce(&mut Engine, &mut Batch) -> Result<R, EngineError>,
    ) -> Result<(R, Vec<Change>), EngineError> {
        let saved = self.counters;
        let mut batch = Batch::default();
        let result = work(self, &mut batch).and_then(|r| self.commit(batch).map(|changes| (r, changes)));
        if result.is_err() {
            self.rollback(saved);
        }
        result
    }

    /// Writes the batch: customer records, counters, and everything queued, atomically.
    fn commit(&mut self, mut batch: Batch) -> Result<Vec<Change>, EngineError> {
        let mut touched = Vec::with_capacity(batch.dirty.len());
        let (now, retention_ms) = (self.now(), self.config.retention_ms);
        for customer in &batch.dirty {
            self.cache.update(customer, |state| {
                if state.windows.is_none() && state.history_loaded {
                    // Loaded with its history but not judged (a segment swap touches only
                    // memberships): the windows are built before the history goes, since
                    // the cache and the record keep the windows, not the history.
                    state.advance_windows(&self.rules, now, retention_ms);
                }
                self.store
                    .put_customer(&mut batch.wb, customer, state, &self.rules);
                touched.push(state.number);
                // Its events are in this batch: the cache keeps only the windows (a failed
                // commit clears the cache).
                state.unload_history();
            });
        }
        if let Some(clock) = self.counters.clock {
            self.store.put_meta_i64(&mut batch.wb, META_CLOCK, clock);
        }
        self.store
            .put_meta_u64(&mut batch.wb, META_SEQ, self.counters.next_seq);
        self.store
            .put_meta_u64(&mut batch.wb, META_ARRIVAL, self.counters.next_arrival);
        self.store
            .put_meta_u64(&mut batch.wb, META_DLQ, self.counters.next_dlq);
        let (profiles, journal) = self.profile_updates(&mut batch);
        self.store.commit_sorted(batch.wb)?;
        self.index.apply(IndexCommit {
            new_ids: &batch.new_ids,
            changes: &batch.changes,
            numbers: &batch.numbers,
            profiles: &profiles,
            journal,
            touched: &touched,
        });
        if self.config.clock == ClockMode::Wall || self.counters.clock.is_some() {
            self.store.set_clock(self.now());
        }
        self.published.set_clock(self.counters.clock);
        self.batches += 1;
        self.evict();
        self.count_changes(&batch.changes);
        Ok(batch.changes)
    }

    /// The profile values of the customers whose profile this batch changed, for the
    /// columns, and the journal entry naming them, put in the batch.
    fn profile_updates(&self, batch: &mut Batch) -> (Vec<ProfileUpdate>, Option<u64>) {
        if batch.profiles.is_empty() {
            return (Vec::new(), None);
        }
        batch.profiles.sort_unstable_by_key(|(number, _)| *number);
        batch.profiles.dedup_by_key(|(number, _)| *number);
        let mut updates = Vec::new();
        for (number, customer) in &batch.profiles {
            if let Some(state) = self.cache.get(customer) {
                for (attr, entry) in &state.history.profile {
                    updates.push((*number, attr.clone(), entry.value.clone()));
                }
            }
        }
        let numbers: Vec<u32> = batch.profiles.iter().map(|(number, _)| *number).collect();
        let (entry, key, value) = self.index.journal_entry(&numbers);
        batch.wb.put_cf(self.store.cf(CF_INDEX), key, value);
        (updates, Some(entry))
    }

    /// `tagstream_changes_total{kind,cause,definition,op}`, counted per commit. Names the
    /// rules do not define (tags set by hand, any string a client chose) share the label
    /// `(manual)`, so the label set stays as small as the rule set.
    fn count_changes(&self, changes: &[Change]) {
        let mut counts: HashMap<(MemberKind, &'static str, Option<DefId>, Op), u64> = HashMap::new();
        for c in changes {
            *counts
                .entry((c.kind, c.cause.label(), self.rules.lookup(&c.name), c.op))
                .or_default() += 1;
        }
        for ((kind, cause, def, op), n) in counts {
            let definition =
                def.map_or_else(|| "(manual)".to_owned(), |id| self.rules.def(id).name.to_string());
            let kind = match kind {
                MemberKind::Tag => "tag",
                MemberKind::Segment => "segment",
            };
            let op = match op {
                Op::Add => "add",
                Op::Remove => "remove",
            };
            metrics::counter!("tagstream_changes_total", "kind" => kind, "cause" => cause, "definition" => definition, "op" => op)
                .increment(n);
        }
    }

    /// Keeps the cache within its configured size: when it grows past it, the least
    /// recently used customers are dropped down to 90% of it, so eviction work is amortised
    /// over many batches and hot customers stay.
    fn evict(&mut self) {
        self.cache
            .evict(self.config.cache_customers, self.config.cache_bytes);
        metrics::gauge!("tagstream_cache_customers").set(self.cache.len() as f64);
        metrics::gauge!("tagstream_cache_bytes").set(self.cache.bytes() as f64);
    }

    fn rollback(&mut self, saved: Counters) {
        self.counters = saved;
        self.cache.clear();
        // Timers of the failed batch were not fired: they are pending again (reloaded below).
        self.fired = FiredTimers::default();
        self.timers = self
            .store
            .timers()
            .map(|t| t.into_iter().collect())
            .unwrap_or_default();
    }
}
