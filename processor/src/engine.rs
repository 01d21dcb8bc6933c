//! The synchronous core: `ingest(events)` and `advance_clock(now)` turn events and time into
//! tag and segment changes, with every batch committed atomically to RocksDB.
//!
//! Per event the engine re-evaluates only the tags and segments the event's type and the
//! profile attributes it sets can change (the compiled plan says which); per timer only the
//! definitions that can change with time. Each customer has at most one pending timer: the
//! earliest instant at which time alone could change one of their tags.

mod cache;
mod explain;
mod query;
mod read;
mod segments;

pub use explain::{Explained, Explanation, NextChange};
pub use query::{parse_cursor, Delta};
pub use read::ReadHandle;
pub use segments::{SavedSegment, SegmentUpdate};

use cache::CustomerCache;
use read::Published;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rocksdb::WriteBatch;
use rules::{CompiledRules, DefId, DefKind, Diagnostic, Facts, Value};

use crate::change::{Cause, Change, MemberKind, Op};
use crate::codec::{Reader, Writer};
use crate::event::{check_not_future, parse_event, EventLimits, Rejection, ValidEvent};
use crate::index::{number_key, ColumnLimits, IndexCommit, MembershipIndex, ProfileUpdate};
use crate::state::{CustomerState, EngineFacts, EventTagState, ManualTag, Membership};
use crate::store::{
    timer_key, Retention, Store, StoreError, StoredEvent, CF_CHANGES, CF_CUSTOMERS, CF_DEDUP, CF_DLQ,
    CF_INDEX, CF_META, CF_NUMBERS, CF_TIMERS,
};
use crate::window::WindowSet;
use crate::writes::SortedWrites;

/// Where `now` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockMode {
    /// `now` is the wall clock (production).
    Wall,
    /// `now` is the greatest event `ts` seen, or a later time set explicitly (replay, tests).
    Event,
}

/// Engine settings; every default lives in [`EngineConfig::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub clock: ClockMode,
    pub limits: EventLimits,
    /// An `event_id` first applied at most this long ago (clock time) is a duplicate.
    pub dedup_horizon_ms: i64,
    /// How long each customer's events are kept for windows, `lifetime` and backfill.
    pub retention_ms: i64,
    /// Most customers kept in memory between batches (least recently used go first).
    pub cache_customers: usize,
    /// Most bytes (estimated: records, window queues, histories loaded for the batch in
    /// flight) those customers may hold; with `cache_customers` this bounds the engine's
    /// memory whatever the data.
    pub cache_bytes: usize,
    /// RocksDB's block cache for the customer records, events and dedup keys, in bytes.
    pub block_cache_bytes: usize,
    /// RocksDB's memtables, all column families together, in bytes.
    pub memtable_bytes: usize,
    /// fsync the WAL on every commit (acknowledged means on disk).
    pub sync_writes: bool,
    /// Most profile attributes kept as in-memory columns for segment queries and SQL (4
    /// bytes per customer each for up to 65,536 distinct values); others are read from the
    /// customers' records.
    pub profile_columns: usize,
    /// Most traits that read aggregates whose values queries remember (each up to 16 bytes
    /// per customer, filled by the queries that read them).
    pub trait_columns: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            clock: ClockMode::Wall,
            limits: EventLimits::default(),
            dedup_horizon_ms: 7 * 86_400_000,
            retention_ms: rules::DEFAULT_RETENTION_MS,
            cache_customers: 1_000_000,
            cache_bytes: 2 << 30,
            block_cache_bytes: 256 << 20,
            memtable_bytes: 256 << 20,
            sync_writes: true,
            profile_columns: 64,
            trait_columns: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the rule set has {} error(s)", .0.len())]
    Rules(Vec<Diagnostic>),
    #[error("{0}")]
    Clock(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
}

/// One rejected event of a batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IngestError {
    pub index: usize,
    pub reason: String,
}

/// The answer to one ingest call.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct IngestOutcome {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub errors: Vec<IngestError>,
    #[serde(skip)]
    pub changes: Vec<Change>,
}

/// A customer as `GET /v1/customers/{id}` shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerView {
    pub customer_id: String,
    pub tags: BTreeMap<Arc<str>, Membership>,
    pub segments: BTreeMap<Arc<str>, Membership>,
    pub traits: BTreeMap<Arc<str>, Value>,
    pub profile: BTreeMap<Arc<str>, Value>,
}

/// Timers fired since [`Engine::take_fired_timers`] last ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FiredTimers {
    pub count: u64,
    /// Wall clock mode: the due instants of the first [`FiredTimers::MAX_DUE`] of them, for
    /// the caller to compare with the wall clock after the commit (lateness). Empty in event
    /// clock mode, where timers fire at their exact instant.
    pub due: Vec<i64>,
}

impl FiredTimers {
    /// Bounds the memory of a caller that never takes them (a file replay).
    pub const MAX_DUE: usize = 65_536;
}

/// Progress of the re-evaluation that follows a rule change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BackfillProgress {
    pub customers_done: u64,
    /// RocksDB's estimate of all customers when the sweep began (at least `customers_done`).
    pub customers_estimated: u64,
}

/// What a draft rule set would do: per definition with members, how many customers would
/// enter, exit and be members, with a few examples of each.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Preview {
    /// Customers evaluated.
    pub customers: u64,
    pub definitions: BTreeMap<String, PreviewCounts>,
    /// Tags and segments of the current rules that the draft drops: every member exits.
    pub removed: BTreeMap<String, PreviewCounts>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PreviewCounts {
    pub members: u64,
    pub enter: u64,
    pub exit: u64,
    pub sample_members: Vec<String>,
    pub sample_enter: Vec<String>,
    pub sample_exit: Vec<String>,
}

/// Examples kept per list in a preview.
const PREVIEW_SAMPLE: usize = 5;

impl PreviewCounts {
    fn record(&mut self, member: bool, was: bool, id: &str) {
        let sample = |list: &mut Vec<String>| {
            if list.len() < PREVIEW_SAMPLE {
                list.push(id.to_owned());
            }
        };
        if member {
            self.members += 1;
            sample(&mut self.sample_members);
        }
        if member && !was {
            self.enter += 1;
            sample(&mut self.sample_enter);
        }
        if !member && was {
            self.exit += 1;
            sample(&mut self.sample_exit);
        }
    }
}

/// A column of a members export besides the customer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportField {
    /// When the customer became a member (ms).
    Since,
    /// When the membership ends by itself (ms), if it does.
    ExpiresAt,
    Trait(DefId),
    Profile(Arc<str>),
}

/// A page of members of a tag or segment, with the requested fields of each in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MembersPage {
    pub ids: crate::index::IdPage,
    /// One entry per id when fields were requested, else empty.
    pub fields: Vec<Vec<Option<Value>>>,
    /// Where the next page starts; `None` after the last member.
    pub next_cursor: Option<String>,
}

/// A dead letter: an event that was rejected, with its original bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: u64,
    pub received_at: i64,
    pub reason: String,
    pub raw: Vec<u8>,
}

/// One page of an ad-hoc segment query.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueryPage {
    pub count: usize,
    pub customers: Vec<String>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the expression has {} error(s)", .0.len())]
    Invalid(Vec<rules::LocatedDiagnostic>),
    #[error("{0}")]
    Cursor(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Which definitions an evaluation looks at.
enum Scope<'a> {
    Defs(&'a [DefId]),
    All,
}

#[derive(Default)]
struct Batch {
    wb: SortedWrites,
    changes: Vec<Change>,
    /// The customer number of each change, for the membership index.
    numbers: Vec<u32>,
    /// Customers numbered in this batch, in number order.
    new_ids: Vec<(u32, Arc<str>)>,
    /// Customers whose profile an event of this batch changed, for the profile columns.
    profiles: Vec<(u32, Arc<str>)>,
    dirty: foldhash::HashSet<Arc<str>>,
    dedup: foldhash::HashMap<String, i64>,
    /// Events applied to customers whose history was not loaded: not in the store until
    /// the batch commits.
    events: Vec<(Arc<str>, rules::Event)>,
}

/// Counters that a failed commit must roll back.
#[derive(Clone, Copy)]
struct Counters {
    clock: Option<i64>,
    next_seq: u64,
    next_arrival: u64,
    next_dlq: u64,
}

const META_CLOCK: &str = "clock";
const META_SEQ: &str = "next_seq";
const META_ARRIVAL: &str = "next_arrival";
const META_DLQ: &str = "next_dlq";
const META_RULES: &str = "rules";
const META_GENERATION: &str = "generation";
const META_BACKFILL: &str = "backfill_cursor";
const META_OFFSET_PREFIX: &str = "offset:";

pub struct Engine {
    store: Arc<Store>,
    /// Members of every tag and segment, updated after each commit.
    index: Arc<MembershipIndex>,
    rules: Arc<CompiledRules>,
    /// The rule set and clock as of the last commit, for [`ReadHandle`]s on other threads.
    published: Arc<Published>,
    generation: u64,
    config: EngineConfig,
    counters: Counters,
    timers: BTreeSet<(i64, Arc<str>)>,
    /// Timers fired since [`Engine::take_fired_timers`] last ran.
    fired: FiredTimers,
    cache: CustomerCache,
    /// Batches committed since open; the cache's clock for eviction.
    batches: u64,
    backfill_cursor: Option<Vec<u8>>,
    /// Customers the current backfill sweep has passed (since this process started it or
    /// resumed it), and the store's estimate of all customers when it began.
    backfill_done: u64,
    backfill_total: u64,
    /// Position of each definition in evaluation order.
    order_pos: Vec<usize>,
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An event tag's matches among the customer's retained events, judged with the current
/// profile.
fn match_history(
    spec: &rules::EventTagSpec,
    state: &CustomerState,
    now: i64,
    retention_ms: i64,
) -> EventTagState {
    let mut tag = EventTagState::default();
    let cutoff = now.saturating_sub(retention_ms);
    for e in &state.history.events {
        if e.ts > cutoff
            && *e.event_type == *spec.event_type
            && rules::filter_matches(spec.filter.as_ref(), e, |n| state.history.profile_value(n))
        {
            tag.record(e.ts, now);
        }
    }
    tag
}

/// The customer as `GET /v1/customers/{id}` shows them: memberships as stored, traits
/// evaluated at `now`.
fn customer_view(
    rules: &CompiledRules,
    customer_id: String,
    state: &mut CustomerState,
    now: i64,
    retention_ms: i64,
) -> CustomerView {
    state.advance_windows(rules, now, retention_ms);
    let facts = EngineFacts::new(rules, state, now, retention_ms);
    let mut view = CustomerView {
        customer_id,
        tags: BTreeMap::new(),
        segments: BTreeMap::new(),
        traits: BTreeMap::new(),
        profile: BTreeMap::new(),
    };
    for (name, m) in &state.members {
        let is_segment = rules
            .lookup(name)
            .is_some_and(|id| rules.def(id).kind == DefKind::Segment);
        let target = if is_segment {
            &mut view.segments
        } else {
            &mut view.tags
        };
        target.insert(name.clone(), m.clone());
    }
    for def in rules.defs().iter().filter(|d| d.kind == DefKind::Trait) {
        view.traits.insert(def.name.clone(), facts.definition(def.id));
    }
    for (name, entry) in &state.history.profile {
        if let Some(v) = &entry.value {
            view.profile.insert(name.clone(), v.clone());
        }
    }
    view
}

fn positions(rules: &CompiledRules) -> Vec<usize> {
    let mut pos = vec![0; rules.defs().len()];
    for (i, &id) in rules.evaluation_order().iter().enumerate() {
        pos[id] = i;
    }
    pos
}

impl Engine {
    /// Opens (or creates) the store at `path`. `rules_text` is used when the store has no
    /// rule set yet, or replaces the stored one when it differs (a rule change).
    pub fn open(path: &Path, rules_text: Option<&str>, config: EngineConfig) -> Result<Engine, EngineError> {
        let retention = Retention {
            dedup_horizon_ms: config.dedup_horizon_ms,
            history_ms: config.retention_ms,
            block_cache_bytes: config.block_cache_bytes,
            memtable_bytes: config.memtable_bytes,
        };
        let store = Store::open(path, config.sync_writes, retention)?;
        let stored_rules = store
            .get(CF_META, META_RULES.as_bytes())?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let text = stored_rules
            .clone()
            .or_else(|| rules_text.map(str::to_owned))
            .unwrap_or_default();
        let rules = Arc::new(CompiledRules::compile(&text).map_err(EngineError::Rules)?);
        let counters = Counters {
            clock: store.meta_i64(META_CLOCK)?,
            next_seq: store.meta_u64(META_SEQ)?.max(1),
            next_arrival: store.meta_u64(META_ARRIVAL)?,
            next_dlq: store.meta_u64(META_DLQ)?,
        };
        let generation = store.meta_u64(META_GENERATION)?.max(1);
        let backfill_cursor = store.get(CF_META, META_BACKFILL.as_bytes())?;
        let timers = store.timers()?.into_iter().collect();
        let order_pos = positions(&rules);
        let index = MembershipIndex::open(
            &store,
            counters.next_seq - 1,
            ColumnLimits {
                profile_attributes: config.profile_columns,
                traits: config.trait_columns,
            },
        )?;
        let mut engine = Engine {
            store: Arc::new(store),
            index: Arc::new(index),
            published: Arc::new(Published::new(rules.clone(), counters.clock)),
            rules,
            generation,
            config,
            counters,
            timers,
            fired: FiredTimers::default(),
            cache: CustomerCache::default(),
            batches: 0,
            backfill_cursor,
            backfill_done: 0,
            backfill_total: 0,
            order_pos,
        };
        if stored_rules.is_none() {
            let mut wb = WriteBatch::default();
            wb.put_cf(engine.store.cf(CF_META), META_RULES.as_bytes(), text.as_bytes());
            engine.store.put_meta_u64(&mut wb, META_GENERATION, generation);
            engine.store.commit(wb)?;
        } else if let Some(new) = rules_text.filter(|t| Some(*t) != stored_rules.as_deref()) {
            engine.replace_rules(new)?;
        }
        Ok(engine)
    }

    pub fn rules(&self) -> &Arc<CompiledRules> {
        &self.rules
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The evaluation instant now: the event clock, or the wall clock.
    pub fn now(&self) -> i64 {
        match self.config.clock {
            ClockMode::Event => self.counters.clock.unwrap_or(0),
            ClockMode::Wall => wall_ms().max(self.counters.clock.unwrap_or(i64::MIN)),
        }
    }

    /// The wall clock in ms, in wall clock mode (`None` in event clock mode, where time is
    /// what the events and `advance_clock` say).
    pub fn wall_clock_ms(&self) -> Option<i64> {
        (self.config.clock == ClockMode::Wall).then(wall_ms)
    }

    /// The event clock, if known.
    pub fn clock(&self) -> Option<i64> {
        self.counters.clock
    }

    /// The timers fired since the last call, for metrics.
    pub fn take_fired_timers(&mut self) -> FiredTimers {
        std::mem::take(&mut self.fired)
    }

    /// Customers in the in-memory cache, and the estimate of their bytes (`[cache]`).
    pub fn cache_usage(&self) -> (usize, usize) {
        (self.cache.len(), self.cache.bytes())
    }

    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    pub fn next_seq(&self) -> u64 {
        self.counters.next_seq
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Ingests raw events (one JSON object each) in order, and answers once they are
    /// durably applied. Bad events are rejected with a reason and kept as dead letters;
    /// nothing else of the batch is lost.
    pub fn ingest<B: AsRef<[u8]>>(&mut self, raw_events: &[B]) -> Result<IngestOutcome, EngineError> {
        self.ingest_from::<B, &str>(raw_events, &[])
    }

    /// Like [`Engine::ingest`], and records `positions` (where each source — a file, a Kafka
    /// partition — stands after these events) in the same atomic commit, so a restart
    /// resumes exactly after the last committed batch: no event lost, none counted twice.
    pub fn ingest_from<B: AsRef<[u8]>, S: AsRef<str>>(
        &mut self,
        raw_events: &[B],
        positions: &[(S, u64)],
    ) -> Result<IngestOutcome, EngineError> {
        let parsed = raw_events
            .iter()
            .map(|raw| parse_event(raw.as_ref(), &self.config.limits, i64::MAX))
            .collect();
        self.ingest_parsed(raw_events, parsed, positions)
    }

    /// Like [`Engine::ingest_from`] for events already parsed (on another thread) with
    /// [`parse_event`]: `parsed[i]` is the result for `raw_events[i]`. Parsing may skip the
    /// future-`ts` check (pass `i64::MAX`); it is made here against the engine's clock.
    pub fn ingest_parsed<B: AsRef<[u8]>, S: AsRef<str>>(
        &mut self,
        raw_events: &[B],
        parsed: Vec<Result<ValidEvent, Rejection>>,
        positions: &[(S, u64)],
    ) -> Result<IngestOutcome, EngineError> {
        assert_eq!(raw_events.len(), parsed.len(), "one parse result per event");
        let saved = self.counters;
        let mut batch = Batch::default();
        let mut outcome = IngestOutcome::default();
        let result = (|| {
            let wall = wall_ms();
            if self.config.clock == ClockMode::Wall {
                self.fire_timers(self.now(), &mut batch)?;
            }
            for (index, (raw, parsed)) in raw_events.iter().zip(parsed).enumerate() {
                let raw = raw.as_ref();
                let latest = wall.max(self.counters.clock.unwrap_or(i64::MIN));
                let parsed = parsed.and_then(|ev| match ev.ts {
                    Some(ts) => check_not_future(ts, &self.config.limits, latest).map(|()| ev),
                    None => Ok(ev),
                });
                let result = parsed.map_err(|r| r.0).and_then(|ev| self.accept(ev, &mut batch));
                match result {
                    Ok(true) => outcome.accepted += 1,
                    Ok(false) => outcome.duplicates += 1,
                    Err(reason) => {
                        self.dead_letter(&mut batch, raw, &reason, wall);
                        outcome.rejected += 1;
                        outcome.errors.push(IngestError { index, reason });
                    }
                }
            }
            for (source, offset) in positions {
                let key = format!("{META_OFFSET_PREFIX}{}", source.as_ref());
                self.store.put_meta_u64(&mut batch.wb, &key, *offset);
            }
            Ok::<(), EngineError>(())
        })();
        match result.and_then(|()| self.commit(batch)) {
            Ok(changes) => {
                outcome.changes = changes;
                Ok(outcome)
            }
            Err(e) => {
                self.rollback(saved);
                Err(e)
            }
        }
    }

    /// Moves the event clock forward to `now`, firing every timer due on the way, in time
    /// order. Event clock mode only.
    pub fn advance_clock(&mut self, now: i64) -> Result<Vec<Change>, EngineError> {
        if self.config.clock != ClockMode::Event {
            return Err(EngineError::Clock(
                "the clock can only be set in `event` clock mode".into(),
            ));
        }
        if let Some(current) = self.counters.clock.filter(|c| now < *c) {
            return Err(EngineError::Clock(format!(
                "the clock never moves backwards: it is at {current}, {now} is earlier"
            )));
        }
        let saved = self.counters;
        let mut batch = Batch::default();
        let result = self
            .fire_timers(now, &mut batch)
            .map(|()| self.counters.clock = Some(now));
        match result.and_then(|()| self.commit(batch)) {
            Ok(changes) => Ok(changes),
            Err(e) => {
                self.rollback(saved);
                Err(e)
            }
        }
    }

    /// Wall clock mode: fires every timer due by now. Call at least once a second.
    pub fn tick(&mut self) -> Result<Vec<Change>, EngineError> {
        let now = self.now();
        if self.timers.first().is_none_or(|(due, _)| *due > now) {
            return Ok(Vec::new());
        }
        let saved = self.counters;
        let mut batch = Batch::default();
        let result = self.fire_timers(now, &mut batch);
        match result.and_then(|()| self.commit(batch)) {
            Ok(changes) => Ok(changes),
            Err(e) => {
                self.rollback(saved);
                Err(e)
            }
        }
    }

    /// Applies one valid event. `Ok(false)` for a duplicate; `Err` with a reason rejects it.
    fn accept(&mut self, mut ev: ValidEvent, batch: &mut Batch) -> Result<bool, String> {
        let ts =
            match (ev.ts, self.config.clock, self.counters.clock) {
                (Some(ts), _, _) => ts,
                (None, ClockMode::Event, Some(clock)) => clock,
                (None, ClockMode::Event, None) => return Err(
                    "missing ts, and the event clock is not set yet (send events with ts, or POST /v1/clock)"
                        .into(),
                ),
                (None, ClockMode::Wall, _) => self.now(),
            };
        if let Some(id) = &ev.event_id {
            if self.is_duplicate(id, batch).map_err(|e| e.to_string())? {
                return Ok(false);
            }
        }
        if self.config.clock == ClockMode::Event && self.counters.clock.is_none_or(|c| ts > c) {
            self.fire_timers(ts, batch).map_err(|e| e.to_string())?;
            self.counters.clock = Some(ts);
        }
        let now = self.now();
        let event_id = ev.event_id.take();
        self.apply_event(ev, event_id.as_deref(), ts, now, batch)
            .map_err(|e| e.to_string())?;
        if let Some(id) = event_id {
            let mut w = Writer::new();
            w.i64(now);
            batch.wb.put_cf(self.store.cf(CF_DEDUP), id.as_bytes(), w.buf);
            batch.dedup.insert(id, now);
        }
        Ok(true)
    }

    fn is_duplicate(&self, event_id: &str, batch: &Batch) -> Result<bool, StoreError> {
        let now = self.now();
        let applied_at = match batch.dedup.get(event_id) {
            Some(t) => Some(*t),
            None => match self.store.get(CF_DEDUP, event_id.as_bytes())? {
                Some(b) => Some(Reader::new(&b).i64()?),
                None => None,
            },
        };
        Ok(applied_at.is_some_and(|t| now.saturating_sub(t) <= self.config.dedup_horizon_ms))
    }

    fn apply_event(
        &mut self,
        ev: ValidEvent,
        event_id: Option<&str>,
        ts: i64,
        now: i64,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        let customer = ev.customer_id.clone();
        let mut state = self.take_customer(&customer, now, batch)?;
        // A customer's first event establishes every membership, including those that hold
        // without any event (`not churn_risk`).
        let first_event = !state.has_events && state.members.is_empty() && state.history.profile.is_empty();
        let arrival = self.counters.next_arrival;
        self.counters.next_arrival += 1;
        let event = rules::Event {
            event_type: ev.event_type.clone(),
            ts,
            arrival,
            props: ev.props,
        };
        let rules = self.rules.clone();
        let changed_attrs: Vec<Arc<str>> = ev.profile.iter().map(|(k, _)| k.clone()).collect();
        let rejudged: Vec<DefId> = changed_attrs
            .iter()
            .flat_map(|attr| rules.affected_by_profile_attr(attr))
            .copied()
            .filter(|&id| rules.def(id).kind == DefKind::EventTag)
            .collect();
        let rebuild = WindowSet::reads_profile(&rules, &changed_attrs);
        if !changed_attrs.is_empty() {
            batch.profiles.push((state.number, customer.clone()));
        }
        if rebuild || !rejudged.is_empty() {
            // Past events are judged again with the new profile.
            self.load_history(&customer, &mut state, now, batch)?;
        }
        self.store.put_event(&mut batch.wb, &customer, &event, event_id);
        state.history.apply_profile(&event, ev.profile);
        for &id in rules.event_tags_for_type(&ev.event_type) {
            let spec = rules.def(id).event_tag.as_ref().expect("event tag");
            let matches =
                rules::filter_matches(spec.filter.as_ref(), &event, |n| state.history.profile_value(n));
            if matches {
                state
                    .event_tags
                    .entry(rules.def(id).name.clone())
                    .or_default()
                    .record(ts, now);
            }
        }
        if let Some(event) = state.push_event(&rules, event) {
            batch.events.push((customer.clone(), event));
        }
        if rebuild {
            state.window_rebuild(&rules, &changed_attrs);
        }
        for &id in &rejudged {
            self.rejudge_event_tag(id, &mut state, now);
        }
        let mut scope: Vec<DefId> = rules.affected_by_event_type(&ev.event_type).to_vec();
        for attr in &changed_attrs {
            scope.extend_from_slice(rules.affected_by_profile_attr(attr));
        }
        scope.sort_by_key(|&id| self.order_pos[id]);
        scope.dedup();
        let cause = Cause::Event(event_id.map(str::to_owned));
        let scope = if first_event {
            Scope::All
        } else {
            Scope::Defs(&scope)
        };
        self.evaluate(&customer, &mut state, now, ts.max(now), scope, &cause, batch);
        self.put_back(customer, state, batch);
        Ok(())
    }

    /// Judges an event tag's matches again over the retained history, with the current
    /// profile (its filter reads a profile attribute that just changed). Matches older than
    /// the retained history cannot be judged again and are kept.
    fn rejudge_event_tag(&self, id: DefId, state: &mut CustomerState, now: i64) {
        let def = self.rules.def(id);
        let spec = def.event_tag.as_ref().expect("event tag");
        let mut tag = match_history(spec, state, now, self.config.retention_ms);
        let cutoff = now.saturating_sub(self.config.retention_ms);
        if let Some(old) = state
            .event_tags
            .get(&def.name)
            .and_then(|t| t.last_ts)
            .filter(|l| *l <= cutoff)
        {
            tag.last_ts = Some(tag.last_ts.map_or(old, |l| l.max(old)));
        }
        if tag.last_ts.is_some() || !tag.future.is_empty() {
            state.event_tags.insert(def.name.clone(), tag);
        } else {
            state.event_tags.remove(&def.name);
        }
    }

    /// Makes the customer's whole retained history resident: the committed events from the
    /// store and those of the batch in flight, older than the retention left out.
    fn load_history(
        &self,
        customer: &str,
        state: &mut CustomerState,
        now: i64,
        batch: &Batch,
    ) -> Result<(), EngineError> {
        if state.history_loaded {
            return Ok(());
        }
        let cutoff = now.saturating_sub(self.config.retention_ms);
        let mut events: Vec<rules::Event> = self
            .store
            .customer_events(customer)?
            .into_iter()
            .map(|e| e.event)
            .filter(|e| e.ts > cutoff)
            .collect();
        events.extend(
            batch
                .events
                .iter()
                .filter(|(c, e)| **c == *customer && e.ts > cutoff)
                .map(|(_, e)| e.clone()),
        );
        state.history.events = events;
        state.history_loaded = true;
        Ok(())
    }

    /// Fires every timer due at or before `until`, in time order.
    fn fire_timers(&mut self, until: i64, batch: &mut Batch) -> Result<(), EngineError> {
        while let Some((due, customer)) = self.timers.first().cloned() {
            if due > until {
                break;
            }
            // Out of the set first, so loading the customer does not fire it again.
            self.timers.remove(&(due, customer.clone()));
            let mut state = self.take_customer(&customer, due, batch)?;
            self.fire_timer(&customer, &mut state, due, batch)?;
            self.put_back(customer, state, batch);
        }
        Ok(())
    }

    /// Fires `customer`'s timer due at `due`: every definition is judged at that instant.
    fn fire_timer(
        &mut self,
        customer: &Arc<str>,
        state: &mut CustomerState,
        due: i64,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        self.timers.remove(&(due, customer.clone()));
        self.fired.count += 1;
        if self.config.clock == ClockMode::Wall && self.fired.due.len() < FiredTimers::MAX_DUE {
            self.fired.due.push(due);
        }
        batch
            .wb
            .delete_cf(self.store.cf(CF_TIMERS), timer_key(due, customer));
        if state.timer == Some(due) {
            // (A rule change judged on loading may have set a newer one: that one stays.)
            state.timer = None;
        }
        for tag in state.event_tags.values_mut() {
            tag.settle(due);
        }
        self.windows_not_after(customer, state, due, batch)?;
        self.evaluate(customer, state, due, due, Scope::All, &Cause::Timer, batch);
        Ok(())
    }

    /// Makes the customer's windows usable at `now`: windows never move back, so if they are
    /// past it they are built again from the history.
    fn windows_not_after(
        &self,
        customer: &str,
        state: &mut CustomerState,
        now: i64,
        batch: &Batch,
    ) -> Result<(), EngineError> {
        if state.windows.as_ref().is_some_and(|w| w.at() > now) {
            self.load_history(customer, state, now, batch)?;
            state.windows = None;
        }
        Ok(())
    }

    /// Loads a customer (cache, then store, else new), bringing them up to the current rule
    /// set first if they were last evaluated under an older one.
    fn take_customer(
        &mut self,
        customer: &Arc<str>,
        now: i64,
        batch: &mut Batch,
    ) -> Result<CustomerState, EngineError> {
        let state = match self.cache.remove(customer) {
            Some(s) => Some(s),
            None => self.store.load_customer(customer)?.map(|mut s| {
                // The store leaves out what is past retention as of the last commit; the
                // clock may have moved since.
                let cutoff = now.saturating_sub(self.config.retention_ms);
                s.history.events.retain(|e| e.ts > cutoff);
                s.has_events = !s.history.events.is_empty();
                s
            }),
        };
        let mut state = match state {
            Some(s) => s,
            None => {
                let number = self.index.read().customers() + batch.new_ids.len() as u32;
                batch.new_ids.push((number, customer.clone()));
                batch
                    .wb
                    .put_cf(self.store.cf(CF_NUMBERS), number_key(number), customer.as_bytes());
                return Ok(CustomerState {
                    generation: self.generation,
                    number,
                    history_loaded: true,
                    ..Default::default()
                });
            }
        };
        if state.generation < self.generation {
            self.load_history(customer, &mut state, now, batch)?;
            self.upgrade(customer, &mut state, now, batch);
        } else {
            // In wall clock mode the clock moves while a batch is built, so a customer's timer
            // can fall due before the tick fires it. It fires first: judging the customer at
            // `now` reschedules the timer, and the changes it stands for would be lost. A
            // timer may be early (an event judged only the definitions it can change and kept
            // the sooner timer), so firing it can schedule another one that is also due:
            // each fires in turn, each later than the one before.
            let mut fired = i64::MIN;
            while let Some(due) = state
                .timer
                .filter(|t| *t > fired && *t <= now && self.timers.contains(&(*t, customer.clone())))
            {
                self.fire_timer(customer, &mut state, due, batch)?;
                fired = due;
            }
        }
        self.windows_not_after(customer, &mut state, now, batch)?;
        Ok(state)
    }

    fn put_back(&mut self, customer: Arc<str>, mut state: CustomerState, batch: &mut Batch) {
        state.last_used = self.batches;
        batch.dirty.insert(customer.clone());
        self.cache.insert(customer, state);
    }

    /// Re-evaluates a customer under a new rule set: event tags new to the rules are
    /// computed from the retained history, every tag and segment is re-evaluated, and the
    /// differences are `rule_change` changes.
    fn upgrade(&mut self, customer: &Arc<str>, state: &mut CustomerState, now: i64, batch: &mut Batch) {
        let rules = self.rules.clone();
        state.windows = None;
        let defined: HashSet<&str> = rules
            .defs()
            .iter()
            .filter(|d| d.kind == DefKind::EventTag)
            .map(|d| &*d.name)
            .collect();
        state.event_tags.retain(|name, _| defined.contains(&**name));
        for def in rules.defs().iter().filter(|d| d.kind == DefKind::EventTag) {
            if state.event_tags.contains_key(&def.name) {
                continue;
            }
            let tag = match_history(
                def.event_tag.as_ref().expect("event tag"),
                state,
                now,
                self.config.retention_ms,
            );
            if tag.last_ts.is_some() || !tag.future.is_empty() {
                state.event_tags.insert(def.name.clone(), tag);
            }
        }
        self.evaluate(customer, state, now, now, Scope::All, &Cause::RuleChange, batch);
        state.generation = self.generation;
    }

    /// Evaluates the definitions in `scope` for one customer at `now`, records every net
    /// membership change `at` the given instant, and reschedules the customer's timer.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &mut self,
        customer: &Arc<str>,
        state: &mut CustomerState,
        now: i64,
        at: i64,
        scope: Scope,
        cause: &Cause,
        batch: &mut Batch,
    ) {
        let rules = self.rules.clone();
        state.advance_windows(&rules, now, self.config.retention_ms);
        let mut desired: Vec<(Arc<str>, MemberKind, Option<Option<i64>>)> = Vec::new();
        let next_timer;
        {
            let facts = EngineFacts::new(&rules, state, now, self.config.retention_ms);
            let mut judge = |id: DefId| {
                let def = rules.def(id);
                let kind = if def.kind == DefKind::Segment {
                    MemberKind::Segment
                } else {
                    MemberKind::Tag
                };
                let present = match def.kind {
                    DefKind::Trait => return,
                    DefKind::EventTag => {
                        let (present, until) = facts.event_tag(id);
                        present.then_some(until)
                    }
                    _ => facts.definition(id).is_true().then_some(None),
                };
                desired.push((def.name.clone(), kind, present));
            };
            match scope {
                Scope::Defs(ids) => ids.iter().copied().for_each(&mut judge),
                Scope::All => rules.evaluation_order().iter().copied().for_each(&mut judge),
            }
            let manual_expiry = state
                .manual
                .values()
                .filter_map(|m| m.expires_at)
                .filter(|e| *e > now)
                .min();
            next_timer = [rules.next_membership_change(&facts), manual_expiry]
                .into_iter()
                .flatten()
                .min();
        }
        // Manual tags on names the rules do not define.
        let manual: Vec<(Arc<str>, Option<Option<i64>>)> = state
            .manual
            .iter()
            .filter(|(name, _)| rules.lookup(name).is_none())
            .map(|(name, m)| {
                (
                    name.clone(),
                    m.expires_at.is_none_or(|e| now < e).then_some(m.expires_at),
                )
            })
            .collect();
        for (name, present) in manual {
            desired.push((name, MemberKind::Tag, present));
        }
        state.manual.retain(|_, m| m.expires_at.is_none_or(|e| now < e));
        // Memberships of names that are neither defined nor set by hand end (a manual tag
        // removed or expired, or a definition dropped by a rule change).
        let stale: Vec<Arc<str>> = state
            .members
            .keys()
            .filter(|n| rules.lookup(n).is_none() && !state.manual.contains_key(*n))
            .cloned()
            .collect();
        for name in stale {
            desired.push((name, MemberKind::Tag, None));
        }
        for (name, kind, present) in desired {
            match (state.members.get_mut(&name), present) {
                (None, Some(expires_at)) => {
                    state.members.insert(
                        name.clone(),
                        Membership {
                            since: at,
                            expires_at,
                        },
                    );
                    self.record_change(customer, state.number, kind, name, Op::Add, at, cause, batch);
                }
                (Some(_), None) => {
                    state.members.remove(&name);
                    self.record_change(customer, state.number, kind, name, Op::Remove, at, cause, batch);
                }
                (Some(m), Some(expires_at)) => m.expires_at = expires_at,
                (None, None) => {}
            }
        }
        self.schedule(customer, state, next_timer, batch);
    }

    #[allow(clippy::too_many_arguments)]
    fn record_change(
        &mut self,
        customer: &Arc<str>,
        number: u32,
        kind: MemberKind,
        name: Arc<str>,
        op: Op,
        at: i64,
        cause: &Cause,
        batch: &mut Batch,
    ) {
        let seq = self.counters.next_seq;
        self.counters.next_seq += 1;
        let change = Change {
            seq,
            customer_id: customer.clone(),
            kind,
            name,
            op,
            at,
            cause: cause.clone(),
        };
        batch.wb.put_cf(
            self.store.cf(CF_CHANGES),
            seq.to_be_bytes(),
            change.encode_stored(number),
        );
        batch.changes.push(change);
        batch.numbers.push(number);
    }

    fn schedule(
        &mut self,
        customer: &Arc<str>,
        state: &mut CustomerState,
        next: Option<i64>,
        batch: &mut Batch,
    ) {
        if state.timer == next {
            return;
        }
        if let Some(old) = state.timer {
            self.timers.remove(&(old, customer.clone()));
            batch
                .wb
                .delete_cf(self.store.cf(CF_TIMERS), timer_key(old, customer));
        }
        if let Some(due) = next {
            self.timers.insert((due, customer.clone()));
            batch
                .wb
                .put_cf(self.store.cf(CF_TIMERS), timer_key(due, customer), []);
        }
        state.timer = next;
    }

    fn dead_letter(&mut self, batch: &mut Batch, raw: &[u8], reason: &str, received_at: i64) {
        let id = self.counters.next_dlq;
        self.counters.next_dlq += 1;
        let mut w = Writer::new();
        w.i64(received_at);
        w.str(reason);
        w.bytes(raw);
        batch.wb.put_cf(self.store.cf(CF_DLQ), id.to_be_bytes(), w.buf);
    }

    /// Writes the batch: customer records, counters, and everything queued, atomically.
    fn commit(&mut self, mut batch: Batch) -> Result<Vec<Change>, EngineError> {
        let mut touched = Vec::with_capacity(batch.dirty.len());
        for customer in &batch.dirty {
            self.cache.update(customer, |state| {
                self.store.put_customer(&mut batch.wb, customer, state);
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

    /// Replaces the rule set. Invalid rules are refused with every diagnostic and the old
    /// set stays. Customers are re-evaluated over their retained history: lazily when
    /// touched, and by [`Engine::backfill_step`] for everyone else.
    pub fn replace_rules(&mut self, text: &str) -> Result<(), EngineError> {
        let compiled = CompiledRules::compile(text).map_err(EngineError::Rules)?;
        self.generation += 1;
        self.rules = Arc::new(compiled);
        self.published.set_rules(self.rules.clone());
        self.order_pos = positions(&self.rules);
        self.backfill_cursor = Some(Vec::new());
        self.backfill_done = 0;
        self.backfill_total = self.store.estimate_keys(CF_CUSTOMERS);
        let mut wb = WriteBatch::default();
        wb.put_cf(self.store.cf(CF_META), META_RULES.as_bytes(), text.as_bytes());
        self.store.put_meta_u64(&mut wb, META_GENERATION, self.generation);
        wb.put_cf(self.store.cf(CF_META), META_BACKFILL.as_bytes(), []);
        self.store.commit(wb)?;
        Ok(())
    }

    /// True while customers remain to be re-evaluated after a rule change.
    pub fn backfill_pending(&self) -> bool {
        self.backfill_cursor.is_some()
    }

    /// How far the rule-change backfill has come, while one runs.
    pub fn backfill_progress(&self) -> Option<BackfillProgress> {
        self.backfill_cursor.as_ref().map(|_| BackfillProgress {
            customers_done: self.backfill_done,
            customers_estimated: self.backfill_total.max(self.backfill_done),
        })
    }

    /// Re-evaluates up to `max_customers` customers still on an older rule set, committing
    /// them as one batch. Returns how many were re-evaluated.
    pub fn backfill_step(&mut self, max_customers: usize) -> Result<usize, EngineError> {
        let Some(cursor) = self.backfill_cursor.clone() else {
            return Ok(0);
        };
        if self.backfill_total == 0 {
            // Resumed after a restart.
            self.backfill_total = self.store.estimate_keys(CF_CUSTOMERS);
        }
        let mut ids = Vec::new();
        let mut next_cursor = None;
        let mut passed = 0;
        for item in self.store.scan_from(CF_CUSTOMERS, &cursor) {
            let (key, value) = item?;
            if ids.len() == max_customers {
                next_cursor = Some(key.to_vec());
                break;
            }
            passed += 1;
            let generation = Reader::new(&value)
                .u8()
                .and_then(|_| Reader::new(&value[1..]).u64())
                .map_err(StoreError::from)?;
            if generation < self.generation {
                ids.push(Arc::<str>::from(String::from_utf8_lossy(&key).as_ref()));
            }
        }
        let saved = self.counters;
        let mut batch = Batch::default();
        let now = self.now();
        let result = (|| {
            for id in &ids {
                // Brought up to the current rules on the way.
                let state = self.take_customer(id, now, &mut batch)?;
                self.put_back(id.clone(), state, &mut batch);
            }
            match &next_cursor {
                Some(c) => batch
                    .wb
                    .put_cf(self.store.cf(CF_META), META_BACKFILL.as_bytes(), c),
                None => batch
                    .wb
                    .delete_cf(self.store.cf(CF_META), META_BACKFILL.as_bytes()),
            }
            Ok::<(), EngineError>(())
        })();
        match result.and_then(|()| self.commit(batch)) {
            Ok(_) => {
                self.backfill_cursor = next_cursor;
                self.backfill_done += passed;
                Ok(ids.len())
            }
            Err(e) => {
                self.rollback(saved);
                Err(e)
            }
        }
    }

    /// Sets a manual tag, held for `ttl_ms` (or until removed). Condition tags and segments
    /// are computed and cannot be set by hand.
    pub fn set_manual_tag(
        &mut self,
        customer_id: &str,
        tag: &str,
        ttl_ms: Option<i64>,
    ) -> Result<Vec<Change>, EngineError> {
        self.manual_tag(customer_id, tag, Some(ttl_ms))
    }

    pub fn remove_manual_tag(&mut self, customer_id: &str, tag: &str) -> Result<Vec<Change>, EngineError> {
        self.manual_tag(customer_id, tag, None)
    }

    fn manual_tag(
        &mut self,
        customer_id: &str,
        tag: &str,
        set: Option<Option<i64>>,
    ) -> Result<Vec<Change>, EngineError> {
        if let Some(id) = self.rules.lookup(tag) {
            let kind = self.rules.def(id).kind;
            if kind != DefKind::EventTag {
                let what = match kind {
                    DefKind::Segment => "a segment",
                    DefKind::Trait => "a trait",
                    _ => "a condition tag",
                };
                return Err(EngineError::Conflict(format!(
                    "`{tag}` is {what}: it is computed by its rule and cannot be set or removed by hand"
                )));
            }
        }
        let customer: Arc<str> = Arc::from(rules::normalize(customer_id).as_ref());
        if customer.is_empty() {
            return Err(EngineError::Conflict("empty customer id".into()));
        }
        let saved = self.counters;
        let mut batch = Batch::default();
        let now = self.now();
        let result = (|| {
            let mut state = self.take_customer(&customer, now, &mut batch)?;
            let name: Arc<str> = Arc::from(tag);
            match set {
                Some(ttl) => {
                    let expires_at = ttl.map(|t| now.saturating_add(t));
                    state.manual.insert(
                        name.clone(),
                        ManualTag {
                            since: now,
                            expires_at,
                        },
                    );
                }
                None => {
                    state.manual.remove(&name);
                    state.event_tags.remove(&name);
                }
            }
            let scope: Vec<DefId> = self.rules.lookup(tag).into_iter().collect();
            self.evaluate(
                &customer,
                &mut state,
                now,
                now,
                Scope::Defs(&scope),
                &Cause::Manual,
                &mut batch,
            );
            self.put_back(customer.clone(), state, &mut batch);
            Ok::<(), EngineError>(())
        })();
        match result.and_then(|()| self.commit(batch)) {
            Ok(changes) => Ok(changes),
            Err(e) => {
                self.rollback(saved);
                Err(e)
            }
        }
    }

    /// A customer as of the last commit, for reading: from the cache (windows, no history)
    /// when their windows can serve `now`, else from the store (record and history).
    fn read_customer(&self, customer: &str) -> Result<Option<CustomerState>, EngineError> {
        let now = self.now();
        Ok(match self.cache.get(customer) {
            Some(s) if s.windows.as_ref().is_some_and(|w| w.at() <= now) => Some(s.clone()),
            _ => self.store.load_customer(customer)?,
        })
    }

    /// A customer's tags, segments, traits (evaluated now) and profile.
    pub fn customer(&self, customer_id: &str) -> Result<Option<CustomerView>, EngineError> {
        let id = rules::normalize(customer_id).into_owned();
        let Some(mut state) = self.read_customer(&id)? else {
            return Ok(None);
        };
        Ok(Some(customer_view(
            &self.rules,
            id,
            &mut state,
            self.now(),
            self.config.retention_ms,
        )))
    }

    /// Every customer id, in key order.
    pub fn customer_ids(&self) -> Result<Vec<String>, EngineError> {
        let mut out = Vec::new();
        for item in self.store.scan_from(CF_CUSTOMERS, &[]) {
            let (key, _) = item?;
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
        if !self.cache.contains_key(&id) && self.store.get(CF_CUSTOMERS, id.as_bytes())?.is_none() {
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
        let now = self.now();
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

    /// The instant of the earliest pending timer.
    pub fn next_timer(&self) -> Option<i64> {
        self.timers.first().map(|(t, _)| *t)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint_index() {
            tracing::warn!(error = %e, "membership index checkpoint at close failed; the next open replays the change log");
        }
    }
}
