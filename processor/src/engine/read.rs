//! Reads that do not queue behind ingest: customer lookups served from RocksDB on the
//! caller's thread, against the rule set and clock of the last commit.
//!
//! The engine thread is the only writer. Every commit writes each changed customer's record
//! and events in one `WriteBatch`, so RocksDB always holds the state of the last commit, and
//! a lookup reading one snapshot sees exactly that (never half a batch). What a reader does
//! not see is the batch in flight, as with any read through the engine.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use rules::CompiledRules;

use super::retention::Log;
use super::*;
use super::{
    customer_view, wall_ms, ClockMode, CustomerView, DeadLetter, Engine, EngineError, META_CLOCK,
    META_OFFSET_PREFIX,
};
use crate::change::Change;
use crate::codec::{CodecError, Reader};
use crate::index::MembershipIndex;
use crate::store::{Current, Store, StoreError, CF_CHANGES, CF_DLQ, CF_META};

/// What the engine publishes for readers after each commit and rule change.
#[derive(Debug)]
pub(super) struct Published {
    rules: RwLock<Arc<CompiledRules>>,
    /// The event clock of the last commit; `i64::MIN` before the first event.
    clock: AtomicI64,
    /// Each partition's, with a clock per partition (else empty).
    partition_clocks: Vec<AtomicI64>,
    /// What readers need kept of the change log and the dead letters.
    pub(super) holds: super::retention::Holds,
    /// What readers need kept of the group's change log, per partition
    /// ([`ReadHandle::hold_group_log`]).
    pub(super) group_holds: super::group_log::GroupHolds,
    /// Counts the writes that took records into the group log (its readers wait on it).
    pub(super) group_log_appended: tokio::sync::watch::Sender<u64>,
    /// The rule-change backfill's (or a segment fill's) progress as of its last step.
    backfill: std::sync::Mutex<Option<BackfillProgress>>,
    /// Held by the state publisher for each round, and by whatever changes which
    /// partitions this store publishes (a release, a restore), which also counts up the
    /// epoch inside: the publisher then reads its position again.
    pub(super) changelog_gate: std::sync::Mutex<u64>,
    /// Which commits' deltas may be published before their changes are.
    changes_gate: std::sync::Mutex<super::outbox::ChangesGate>,
    /// Customer numbers by partition, for queries limited to some partitions
    /// ([`ReadHandle::query_partitions`]).
    pub(super) by_partition: std::sync::Mutex<super::query::PartitionNumbers>,
    /// Customers this store handed over to survivors of other partitions, and those
    /// survivors ([`super::handover`]): where events naming them go.
    pub(super) moved: RwLock<Arc<HashMap<Arc<str>, Arc<str>>>>,
    /// Commits made visible so far (what the state publisher waits on when idle).
    pub(super) commits: std::sync::atomic::AtomicU64,
    /// The lowest number a record of the group resolver's outbox not yet deleted may have
    /// ([`super::resolver`]): reads start there, not at the tombstones of those sent.
    pub(super) resolver_floor: std::sync::atomic::AtomicU64,
    /// Set whenever a handover's frame may be waiting to be sent (one made, a partition
    /// taken in); cleared by the reader that finds none ([`ReadHandle::pending_handovers`]),
    /// which then reads nothing — not the tombstones of every frame sent before.
    pub(super) handovers_maybe: std::sync::atomic::AtomicBool,
}

impl Published {
    pub(super) fn new(
        rules: Arc<CompiledRules>,
        clock: Option<i64>,
        partition_clocks: &[Option<i64>],
    ) -> Published {
        Published {
            rules: RwLock::new(rules),
            clock: AtomicI64::new(clock.unwrap_or(i64::MIN)),
            partition_clocks: partition_clocks
                .iter()
                .map(|c| AtomicI64::new(c.unwrap_or(i64::MIN)))
                .collect(),
            holds: Default::default(),
            group_holds: Default::default(),
            group_log_appended: tokio::sync::watch::channel(0).0,
            backfill: Default::default(),
            changelog_gate: Default::default(),
            changes_gate: Default::default(),
            by_partition: Default::default(),
            moved: Default::default(),
            resolver_floor: Default::default(),
            handovers_maybe: std::sync::atomic::AtomicBool::new(true),
            commits: Default::default(),
        }
    }

    /// Numbers of customers dropped with a partition ([`super::query::PartitionNumbers`]).
    pub(super) fn numbers_gone(&self) -> roaring::RoaringBitmap {
        self.by_partition
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gone
            .clone()
    }

    pub(super) fn set_numbers_gone(&self, gone: roaring::RoaringBitmap) {
        self.by_partition.lock().unwrap_or_else(|e| e.into_inner()).gone = gone;
    }

    pub(super) fn changes_gate(&self) -> std::sync::MutexGuard<'_, super::outbox::ChangesGate> {
        self.changes_gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_backfill(&self, progress: Option<BackfillProgress>) {
        *self.backfill.lock().unwrap_or_else(|e| e.into_inner()) = progress;
    }

    /// Counts a commit made visible ([`ReadHandle::commits_made`]).
    pub(super) fn commit_shown(&self) {
        self.commits.fetch_add(1, Ordering::Release);
    }

    pub(super) fn set_clock(&self, clock: Option<i64>) {
        self.clock.store(clock.unwrap_or(i64::MIN), Ordering::Release);
    }

    pub(super) fn set_partition_clocks(&self, clocks: &[Option<i64>]) {
        for (published, clock) in self.partition_clocks.iter().zip(clocks) {
            published.store(clock.unwrap_or(i64::MIN), Ordering::Release);
        }
    }

    pub(super) fn set_rules(&self, rules: Arc<CompiledRules>) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    pub(super) fn rules(&self) -> Arc<CompiledRules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn clock(&self) -> Option<i64> {
        Some(self.clock.load(Ordering::Acquire)).filter(|c| *c != i64::MIN)
    }

    /// `partition`'s clock with a clock per partition, else the store's.
    fn clock_of(&self, partition: u32) -> Option<i64> {
        match self.partition_clocks.get(partition as usize) {
            Some(clock) => Some(clock.load(Ordering::Acquire)).filter(|c| *c != i64::MIN),
            None => self.clock(),
        }
    }
}

/// A cheap, cloneable handle for lookups from any thread.
#[derive(Clone)]
pub struct ReadHandle {
    pub(super) store: Arc<Store>,
    pub(super) published: Arc<Published>,
    pub(super) index: Arc<MembershipIndex>,
    clock_mode: ClockMode,
    pub(super) retention_ms: i64,
    /// How long the change log is kept (also the group's, [`ReadHandle::group_log_trim`]).
    pub changes_retention: LogRetention,
    /// `[engine] partitions`: what customers are hashed to.
    pub(super) partitions: u32,
    /// [`EngineConfig::resolver`].
    pub(super) resolver: bool,
    intake: Intake,
    pub(super) identity: Arc<crate::identity::IdentityConfig>,
    pub(super) identity_counts: Arc<crate::identity::IdentityCounts>,
}

impl ReadHandle {
    /// Commits made visible since the engine started: a reader waiting for new state (the
    /// state publisher) looks for this to move.
    pub fn commits_made(&self) -> u64 {
        self.published.commits.load(Ordering::Acquire)
    }

    /// How far the rule-change backfill (or a saved segment's fill) has come, as of its last
    /// step: read beside the engine, so `/readyz` answers while the engine is busy.
    pub fn backfill_progress(&self) -> Option<BackfillProgress> {
        *self.published.backfill.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `[engine] partitions`: how many partitions customers are hashed to.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Whether identity is resolved in partition 0 for the group ([`EngineConfig::resolver`]).
    pub fn resolver(&self) -> bool {
        self.resolver
    }

    /// The limits, tracking plan and quality record events are parsed with.
    pub fn intake(&self) -> &Intake {
        &self.intake
    }

    /// The evaluation instant, as [`Engine::now`] would answer after the last commit.
    pub fn now(&self) -> i64 {
        self.now_at(self.published.clock())
    }

    /// The evaluation instant for `customer`, as [`Engine::now_for`] would answer after the
    /// last commit.
    pub fn now_for(&self, customer: &str) -> i64 {
        match self.published.partition_clocks.is_empty() {
            true => self.now(),
            false => {
                let partition = crate::partition::partition_of(customer.as_bytes(), self.partitions);
                self.now_at(self.published.clock_of(partition))
            }
        }
    }

    /// With a clock per partition, each partition's evaluation instant (else `None`: one
    /// for all, [`ReadHandle::now`]).
    pub(super) fn partition_nows(&self) -> Option<Vec<i64>> {
        if self.published.partition_clocks.is_empty() {
            return None;
        }
        Some(
            (0..self.partitions)
                .map(|p| self.now_at(self.published.clock_of(p)))
                .collect(),
        )
    }

    /// The meta key of the clock `customer` is judged by.
    fn clock_key(&self, customer: &str) -> String {
        match self.published.partition_clocks.is_empty() {
            true => META_CLOCK.to_owned(),
            false => partition_clock_key(crate::partition::partition_of(
                customer.as_bytes(),
                self.partitions,
            )),
        }
    }

    /// The evaluation instant given the event clock of a commit.
    fn now_at(&self, clock: Option<i64>) -> i64 {
        match self.clock_mode {
            ClockMode::Event => clock.unwrap_or(0),
            ClockMode::Wall => wall_ms().max(clock.unwrap_or(i64::MIN)),
        }
    }

    /// A customer as of the last commit, traits evaluated now; see [`Engine::customer`].
    pub fn customer(&self, customer_id: &str) -> Result<Option<CustomerView>, EngineError> {
        let id = rules::normalize(customer_id).into_owned();
        // The clock of the same commit as the state: evaluating a commit's events at an
        // earlier clock would leave its newest events out of the traits.
        let rules = self.published.rules();
        let current = self.current(&rules);
        let (state, clock) = self
            .store
            .load_customer_consistent(&id, &self.clock_key(&id), current)?;
        let (id, state, clock) = match state {
            Some(state) => (id, state, clock),
            // Absorbed by a merge: the survivor answers.
            None => match self.identify(crate::identity::CUSTOMER_ID, &id)? {
                Some(survivor) if *survivor != *id => {
                    let (state, clock) = self.store.load_customer_consistent(
                        &survivor,
                        &self.clock_key(&survivor),
                        current,
                    )?;
                    match state {
                        Some(state) => (survivor.to_string(), state, clock),
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            },
        };
        let mut state = state;
        let clock = match clock {
            Some(bytes) => Some(Reader::new(&bytes).i64().map_err(StoreError::from)?),
            None => None,
        };
        let now = self.now_at(clock);
        Ok(Some(customer_view(
            &rules,
            id,
            &mut state,
            now,
            self.retention_ms,
        )))
    }

    /// What customers are judged under, for loading them with their stored windows.
    pub(super) fn current<'a>(&self, rules: &'a CompiledRules) -> Current<'a> {
        Current {
            rules,
            retention_ms: self.retention_ms,
        }
    }

    /// The membership index (for metrics and checkpoints).
    pub fn index(&self) -> &Arc<MembershipIndex> {
        &self.index
    }

    /// The store, for the index checkpoint.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The rule set of the last commit.
    pub fn rules(&self) -> Arc<CompiledRules> {
        self.published.rules()
    }

    /// The `seq` of the last committed change (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.index.read().applied_seq()
    }

    /// Committed changes with `seq > after`, in `seq` order, at most `limit`.
    pub fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>, EngineError> {
        changes(&self.store, after, limit)
    }

    /// Committed changes of `name` (a tag, a segment) with `seq > after`, in `seq` order,
    /// at most `limit`, from the change log's index by definition.
    pub fn changes_of(&self, name: &str, after: u64, limit: usize) -> Result<Vec<Change>, EngineError> {
        Ok(changes_of(&self.store, name, after, limit)?
            .into_iter()
            .map(|(_, c)| c)
            .collect())
    }

    /// Dead letters with id `> after` (all when `None`), oldest first, at most `limit`.
    pub fn dead_letters(&self, after: Option<u64>, limit: usize) -> Result<Vec<DeadLetter>, EngineError> {
        dead_letters(&self.store, after, limit)
    }

    /// The `limit` newest dead letters, newest first.
    pub fn newest_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, EngineError> {
        newest_dead_letters(&self.store, limit)
    }

    /// Where `source` stood after the last committed batch from it.
    pub fn source_offset(&self, source: &str) -> Result<Option<u64>, EngineError> {
        source_offset(&self.store, source)
    }

    /// A counter kept by a reader-side process (a publisher's confirmed position), written
    /// on its own: the engine never writes these keys, so there is no race with commits.
    pub fn set_cursor(&self, name: &str, value: u64) -> Result<(), EngineError> {
        Ok(self.store.put_meta_u64_now(&cursor_key(name), value)?)
    }

    /// Sets several counters in one write.
    pub fn set_cursors(&self, cursors: &[(String, u64)]) -> Result<(), EngineError> {
        if cursors.is_empty() {
            return Ok(());
        }
        let mut batch = rocksdb::WriteBatch::default();
        for (name, value) in cursors {
            self.store.put_meta_u64(&mut batch, &cursor_key(name), *value);
        }
        Ok(self.store.commit(batch)?)
    }

    /// A counter written by [`ReadHandle::set_cursor`]; 0 when never written.
    pub fn cursor(&self, name: &str) -> Result<u64, EngineError> {
        Ok(self.store.meta_u64(&cursor_key(name))?)
    }

    /// Keeps `log`'s entries from `first_needed` on past retention while `name` (a
    /// publisher, a webhook) has not consumed them; a later call moves the hold.
    pub fn hold(&self, name: &str, log: Log, first_needed: u64) {
        self.published.holds.set(name, log, first_needed);
    }

    /// Drops `name`'s hold (the reader is gone).
    pub fn release(&self, name: &str) {
        self.published.holds.release(name);
    }

    /// The oldest entry `log` may still hold: 0 until retention deleted any.
    pub fn log_floor(&self, log: Log) -> Result<u64, EngineError> {
        Ok(super::retention::floor(&self.store, log)?)
    }

    /// `Ok` when reading the change log after `after` skips nothing retention deleted,
    /// else [`EngineError::Gone`] with the oldest `seq` left.
    pub fn check_changes_cursor(&self, after: u64) -> Result<(), EngineError> {
        super::retention::check_cursor(&self.store, Log::Changes, after.saturating_add(1))
    }
}

fn cursor_key(name: &str) -> String {
    format!("cursor:{name}")
}

pub(super) fn changes(store: &Store, after: u64, limit: usize) -> Result<Vec<Change>, EngineError> {
    Ok(changes_with_numbers(store, after, limit)?
        .into_iter()
        .map(|(_, c)| c)
        .collect())
}

/// Changes after `after` with their customer numbers (`NO_NUMBER` for changes written
/// before customers had numbers).
pub(super) fn changes_with_numbers(
    store: &Store,
    after: u64,
    limit: usize,
) -> Result<Vec<(u32, Change)>, EngineError> {
    let mut out = Vec::new();
    for item in store.scan_from(CF_CHANGES, &(after.saturating_add(1)).to_be_bytes()) {
        if out.len() == limit {
            break;
        }
        let (_, value) = item?;
        let (number, change) =
            Change::decode_stored(&value).ok_or(StoreError::Codec(CodecError("bad change")))?;
        out.push((number.unwrap_or(crate::index::NO_NUMBER), change));
    }
    // Checked after the scan: retention deletes a prefix and moves the floor in one write,
    // so a scan that began before it saw everything, and one after it sees the new floor.
    super::retention::check_cursor(store, Log::Changes, after.saturating_add(1))?;
    Ok(out)
}

/// The changes of `name` with `seq > after`, in `seq` order, at most `limit`, with their
/// customer numbers: read through the change log's index by definition, so a rare name
/// costs what it has, not a scan of the log.
pub(super) fn changes_of(
    store: &Store,
    name: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<(u32, Change)>, EngineError> {
    let seqs = store.change_seqs_of(name, after, limit)?;
    let mut out = Vec::with_capacity(seqs.len());
    // An index entry whose change retention deleted is skipped (compaction drops it).
    for value in store.changes_at(&seqs)?.into_iter().flatten() {
        let (number, change) =
            Change::decode_stored(&value).ok_or(StoreError::Codec(CodecError("bad change")))?;
        out.push((number.unwrap_or(crate::index::NO_NUMBER), change));
    }
    super::retention::check_cursor(store, Log::Changes, after.saturating_add(1))?;
    Ok(out)
}

pub(super) fn dead_letters(
    store: &Store,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<DeadLetter>, EngineError> {
    // Without a cursor the list starts at the oldest dead letter retention left.
    let start = match after {
        Some(a) => a.saturating_add(1),
        None => super::retention::floor(store, Log::DeadLetters)?,
    };
    let mut out = Vec::new();
    for item in store.scan_from(CF_DLQ, &start.to_be_bytes()) {
        if out.len() == limit {
            break;
        }
        let (key, value) = item?;
        out.push(decode_dead_letter(&key, &value)?);
    }
    super::retention::check_cursor(store, Log::DeadLetters, start)?;
    Ok(out)
}

/// The `limit` newest dead letters retention keeps, newest first.
pub(super) fn newest_dead_letters(store: &Store, limit: usize) -> Result<Vec<DeadLetter>, EngineError> {
    let floor = super::retention::floor(store, Log::DeadLetters)?;
    let mut out = Vec::new();
    for item in store.scan_reverse(CF_DLQ) {
        if out.len() == limit {
            break;
        }
        let (key, value) = item?;
        let letter = decode_dead_letter(&key, &value)?;
        if letter.id < floor {
            break;
        }
        out.push(letter);
    }
    Ok(out)
}

fn decode_dead_letter(key: &[u8], value: &[u8]) -> Result<DeadLetter, StoreError> {
    let id = u64::from_be_bytes(
        key.get(..8)
            .and_then(|k| k.try_into().ok())
            .ok_or(StoreError::Codec(CodecError("bad dlq key")))?,
    );
    let mut r = Reader::new(value);
    let received_at = r.i64()?;
    let reason = r.str()?.to_owned();
    let raw = r.bytes()?.to_vec();
    let code = if r.is_empty() {
        "unknown".to_owned()
    } else {
        r.str()?.to_owned()
    };
    Ok(DeadLetter {
        id,
        received_at,
        reason,
        code,
        raw,
    })
}

/// Every source's position (file, Kafka partitions) as of the last commit.
pub(super) fn source_offsets(store: &Store) -> Result<std::collections::BTreeMap<String, u64>, EngineError> {
    let mut out = std::collections::BTreeMap::new();
    for (key, value) in store.scan_prefix(CF_META, META_OFFSET_PREFIX.as_bytes())? {
        let source = String::from_utf8_lossy(&key[META_OFFSET_PREFIX.len()..]).into_owned();
        out.insert(source, Reader::new(&value).u64().map_err(StoreError::from)?);
    }
    Ok(out)
}

pub(super) fn source_offset(store: &Store, source: &str) -> Result<Option<u64>, EngineError> {
    let key = format!("{META_OFFSET_PREFIX}{source}");
    match store.get(CF_META, key.as_bytes())? {
        None => Ok(None),
        Some(b) => Ok(Some(Reader::new(&b).u64().map_err(StoreError::from)?)),
    }
}

impl Engine {
    /// A handle for lookups that run on the caller's thread, concurrently with ingest.
    pub fn reader(&self) -> ReadHandle {
        ReadHandle {
            store: self.store.clone(),
            published: self.published.clone(),
            index: self.index.clone(),
            clock_mode: self.config.clock,
            retention_ms: self.config.retention_ms,
            changes_retention: self.config.changes_retention,
            partitions: self.config.partitions,
            resolver: self.config.resolver,
            intake: self.intake(),
            identity: Arc::new(self.config.identity.clone()),
            identity_counts: self.identity_counts.clone(),
        }
    }

    /// A customer as of the last commit, for reading: from the cache (windows, no history)
    /// when their windows can serve `now`, else from the store (record and history).
    pub(super) fn read_customer(&self, customer: &str) -> Result<Option<CustomerState>, EngineError> {
        let now = self.now_for(customer);
        Ok(
            match self.shards[self.shard_index(customer)].cache.get(customer) {
                // Not one still on an older rule set (a backfill is running): its windows may be
                // shaped by the old rules; the store's record says whether they fit.
                Some(s)
                    if s.generation == self.generation
                        && s.windows.as_ref().is_some_and(|w| w.at() <= now) =>
                {
                    Some(s.clone())
                }
                _ => self.store.load_customer_current(customer, self.current())?,
            },
        )
    }

    /// A customer's tags, segments, traits (evaluated now) and profile.
    /// An id a merge absorbed answers the survivor (the view's `customer_id` says who).
    pub fn customer(&self, customer_id: &str) -> Result<Option<CustomerView>, EngineError> {
        let id = rules::normalize(customer_id).into_owned();
        let (id, state) = match self.read_customer(&id)? {
            Some(state) => (id, state),
            None => {
                let survivor = self.canonical_id(&id);
                match (*survivor != *id)
                    .then(|| self.read_customer(&survivor))
                    .transpose()?
                {
                    Some(Some(state)) => (survivor.to_string(), state),
                    _ => return Ok(None),
                }
            }
        };
        let mut state = state;
        let now = self.now_for(&id);
        Ok(Some(customer_view(
            &self.rules,
            id,
            &mut state,
            now,
            self.config.retention_ms,
        )))
    }

    /// Every customer id this store holds (not those of a standby's copies), in key order.
    pub fn customer_ids(&self) -> Result<Vec<String>, EngineError> {
        // A standby's copy of a partition another node owns is not this store's.
        let copies = self.reader().standby_copies()?;
        let partitions = self.config.partitions;
        let mut out = Vec::new();
        for item in self.store.scan_from(CF_CUSTOMERS, &[]) {
            let (key, _) = item?;
            if !copies.is_empty() && copies.contains(&crate::partition::partition_of(&key, partitions)) {
                continue;
            }
            out.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(out)
    }

    /// Members of a tag or segment with their membership, in customer id order.
    /// A customer's retained events, newest first: at most `limit`, older than `before`
    /// (the `(ts, arrival)` of the last event of the previous page). `None` for a customer
    /// never seen. Events of the batch in flight are not visible until it commits.
    pub fn timeline(
        &self,
        customer_id: &str,
        before: Option<(i64, u64)>,
        limit: usize,
    ) -> Result<Option<Vec<StoredEvent>>, EngineError> {
        let id = rules::normalize(customer_id);
        if !self.shards[self.shard_index(&id)].cache.contains_key(&id)
            && self.store.get(CF_CUSTOMERS, id.as_bytes())?.is_none()
        {
            return Ok(None);
        }
        Ok(Some(self.store.customer_events_newest_first(&id, before, limit)?))
    }

    /// Evaluates a draft rule set for the customers after `after` (exclusive, in id order),
    /// at most `budget` of them, without changing anything, and adds what would happen to
    /// `preview`. Returns where the next call starts, `None` once every customer is done.
    /// Each customer is judged from scratch over their retained history, as a rule change
    /// would.
    pub fn preview_step(
        &self,
        draft: &CompiledRules,
        after: Option<&str>,
        budget: usize,
        preview: &mut Preview,
    ) -> Result<Option<String>, EngineError> {
        let start = after.map_or_else(Vec::new, |a| {
            let mut key = a.as_bytes().to_vec();
            key.push(0);
            key
        });
        let defined: Vec<&rules::CompiledDef> =
            draft.defs().iter().filter(|d| d.kind.has_members()).collect();
        let current: HashSet<&str> = self
            .rules
            .defs()
            .iter()
            .filter(|d| d.kind.has_members())
            .map(|d| &*d.name)
            .collect();
        let mut last = None;
        for (seen, item) in self.store.scan_from(CF_CUSTOMERS, &start).enumerate() {
            if seen >= budget {
                return Ok(last);
            }
            let (key, _) = item?;
            let id = String::from_utf8_lossy(&key).into_owned();
            // The whole history, as of the last commit.
            let Some(state) = self.store.load_customer(&id)? else {
                continue;
            };
            let now = self.now_for(&id);
            let facts = state.history.facts(draft, now, self.config.retention_ms);
            preview.customers += 1;
            for def in &defined {
                let member = facts.definition(def.id) == Value::Bool(true);
                let was = state.members.contains_key(&def.name);
                let entry = preview.definitions.entry(def.name.to_string()).or_default();
                entry.record(member, was, &id);
            }
            for name in state.members.keys().filter(|n| current.contains(&***n)) {
                if draft
                    .lookup(name)
                    .is_none_or(|d| !draft.def(d).kind.has_members())
                {
                    preview
                        .removed
                        .entry(name.to_string())
                        .or_default()
                        .record(false, true, &id);
                }
            }
            last = Some(id);
        }
        Ok(None)
    }

    /// Every member of a tag or segment with their membership, in customer-number order
    /// (small stores and tests; exports page through [`ReadHandle::members_page`]).
    pub fn members(&self, name: &str) -> Result<Vec<(String, Membership)>, EngineError> {
        let reader = self.reader();
        let Some(set) = reader.member_set(name) else {
            return Ok(Vec::new());
        };
        let page = reader.members_page(
            name,
            &set,
            None,
            usize::MAX,
            &[ExportField::Since, ExportField::ExpiresAt],
            &mut [],
        )?;
        let ms = |v: &Option<Value>| match v {
            Some(Value::Dur(ms)) => Some(*ms),
            _ => None,
        };
        Ok(page
            .ids
            .iter()
            .zip(&page.fields)
            .map(|(id, fields)| {
                let membership = Membership {
                    since: ms(&fields[0]).unwrap_or_default(),
                    expires_at: ms(&fields[1]),
                };
                (id.to_owned(), membership)
            })
            .collect())
    }

    /// An ad-hoc segment query; see [`ReadHandle::query`].
    pub fn query(&self, expr: &str, limit: usize, cursor: Option<&str>) -> Result<QueryPage, QueryError> {
        self.reader().query(expr, limit, cursor)
    }

    /// The change log after `after`, at most `limit` changes, in `seq` order.
    pub fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>, EngineError> {
        read::changes(&self.store, after, limit)
    }

    /// Dead letters from `after` on, oldest first.
    pub fn dead_letters(&self, after: Option<u64>, limit: usize) -> Result<Vec<DeadLetter>, EngineError> {
        read::dead_letters(&self.store, after, limit)
    }

    /// Deletes every dead letter; returns how many there were.
    pub fn purge_dead_letters(&mut self) -> Result<usize, EngineError> {
        let n = self.dead_letters(None, usize::MAX)?.len();
        let mut wb = WriteBatch::default();
        wb.delete_range_cf(self.store.cf(CF_DLQ), 0u64.to_be_bytes(), u64::MAX.to_be_bytes());
        self.store.commit(wb)?;
        Ok(n)
    }

    /// Where `source` stood after the last committed batch from it.
    pub fn source_offset(&self, source: &str) -> Result<Option<u64>, EngineError> {
        read::source_offset(&self.store, source)
    }

    /// A consistent backup of the whole store in `dir` (which must not exist), taken between
    /// two commits: customers, events, timers, the change log, dead letters, the membership
    /// index (checkpointed first, so a restore opens without replaying), and the sources'
    /// positions, so a restored store resumes exactly after the last event it holds. A
    /// `BACKUP.json` manifest beside the files says what it holds.
    pub fn backup(&self, dir: &Path) -> Result<BackupManifest, EngineError> {
        if dir.exists() {
            return Err(EngineError::Conflict(format!(
                "{} exists: a backup goes to a new directory",
                dir.display()
            )));
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| EngineError::Conflict(format!("creating {}: {e}", parent.display())))?;
        }
        self.checkpoint_index()?;
        let started = std::time::Instant::now();
        self.store.checkpoint(dir)?;
        let bytes = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let manifest = BackupManifest {
            format: 1,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            created_at_ms: wall_ms(),
            last_seq: self.counters.next_seq - 1,
            clock: self.counters.clock,
            customers: self.index.read().customers(),
            source_offsets: read::source_offsets(&self.store)?,
            bytes,
            took_ms: started.elapsed().as_millis() as u64,
        };
        let text = serde_json::to_string_pretty(&manifest).expect("a manifest serializes");
        std::fs::write(dir.join(BACKUP_MANIFEST), text + "\n")
            .map_err(|e| EngineError::Conflict(format!("writing the backup manifest: {e}")))?;
        Ok(manifest)
    }

    /// Writes the membership index's checkpoint (what changed since the last one), so a
    /// restart replays only the changes after it. Also done when the engine is dropped.
    pub fn checkpoint_index(&self) -> Result<crate::index::Checkpoint, EngineError> {
        let started = std::time::Instant::now();
        let done = self.index.checkpoint(&self.store)?;
        if done.sets_written + done.chunks_written > 0 {
            metrics::histogram!("tagstream_index_checkpoint_seconds").record(started.elapsed().as_secs_f64());
            metrics::counter!("tagstream_index_checkpoint_bytes_total").increment(done.bytes as u64);
        }
        Ok(done)
    }
}
