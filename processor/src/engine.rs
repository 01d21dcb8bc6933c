//! The synchronous core: `ingest(events)` and `advance_clock(now)` turn events and time into
//! tag and segment changes, with every batch committed atomically to RocksDB.
//!
//! Per event the engine re-evaluates only the tags and segments the event's type and the
//! profile attributes it sets can change (the compiled plan says which); per timer only the
//! definitions that can change with time. Each customer has at most one pending timer: the
//! earliest instant at which time alone could change one of their tags.

mod cache;
mod commit;
mod deal;
mod evaluate;
mod explain;
mod group_log;
mod handover;
mod identity;
mod ingest;
mod manual;
mod outbox;
mod partitions;
mod pipeline;
mod query;
mod read;
mod resolver;
mod retention;
mod rule_change;
mod segments;
mod shard;
mod standby;
mod timers;
mod unmerge;
mod versions;

use cache::HeapBudget;
pub use cache::HeapProbe;
pub use explain::{Explained, Explanation, NextChange};
pub use group_log::{
    decode_group_cursor, encode_group_cursor, GroupAppend, GroupDelta, GroupPage, GroupRecord,
};
pub use handover::{frame_absorbed, Handed, HandedOver, PendingHandover};
pub use identity::Merged;
pub use partitions::{PartitionSummary, MAGIC as PARTITION_EXPORT_MAGIC};
pub use pipeline::{Answer, Finished};
pub use query::{parse_cursor, DefinitionSummary, Delta, HourActivity};
pub use read::ReadHandle;
pub use resolver::{HandOverRequest, PendingRecord, Resolved, ResolvedEvent, ResolverRecord, SplitRequest};
pub use retention::{Log, TrimPlan, Trimmed};
pub use rule_change::{Proposal, RuleChange};
pub use segments::{SavedSegment, SegmentUpdate};
pub use unmerge::{PendingSplit, Unmerged};
pub use versions::{DefChange, DefText, ReadVersions, RuleDiff, RuleEdit, RuleVersion, VersionSummary};

use cache::CustomerCache;
use deal::Dealer;
use ingest::Round;
use pipeline::{BackgroundWriter, Done, Pending};
use read::Published;
use shard::{in_parallel, shard_of, Ctx, Job, Place, Shard, Worker};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rocksdb::WriteBatch;
use rules::{
    CompiledRules, DefId, DefKind, Diagnostic, Facts, TrackingPlan, Value, Violation, ViolationClass,
};

use crate::change::{Cause, Change, MemberKind, Op};
use crate::codec::{Reader, Writer};
use crate::event::{check_not_future, parse_event, EventLimits, Rejection, ValidEvent};
use crate::index::{number_key, ColumnLimits, IndexCommit, MembershipIndex, ProfileUpdate};
use crate::quality::{Intake, Quality, Sighting};
use crate::state::{CustomerState, EngineFacts, EventTagState, ManualTag, Membership};
use crate::store::{
    timer_key, Current, Retention, Store, StoreError, StoredEvent, CF_CHANGES, CF_CHANGES_BY_NAME,
    CF_CUSTOMERS, CF_DEDUP, CF_DLQ, CF_INDEX, CF_META, CF_NUMBERS, CF_TIMERS,
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
    /// Most customers kept in memory between batches (the least often used lately go first).
    pub cache_customers: usize,
    /// Most bytes (estimated: records, window queues, histories loaded for the batch in
    /// flight) those customers may hold; with `cache_customers` this bounds the engine's
    /// memory whatever the data. With [`EngineConfig::bound_heap`] it bounds the engine's
    /// whole heap as the allocator counts it, the cache getting what the rest leaves
    /// ([`HeapBudget`]).
    pub cache_bytes: usize,
    /// How to ask the process's allocator for its heap's size (the binary sets it), for the
    /// `tagstream_heap_bytes` gauge and [`EngineConfig::bound_heap`].
    pub heap_probe: Option<HeapProbe>,
    /// `cache_bytes` bounds the whole heap (with a probe), not only the cache's estimate:
    /// memory held to the budget at the price of a smaller cache (bench/RESULTS.md).
    pub bound_heap: bool,
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
    /// How long and how many changes the change log keeps ([`Engine::trim_logs`]).
    pub changes_retention: LogRetention,
    /// How long and how many dead letters are kept.
    pub dead_letters_retention: LogRetention,
    /// Engine workers evaluating in parallel, each owning the customers of some partitions.
    pub workers: usize,
    /// Partitions customers are hashed to (Kafka's default partitioner on the customer id):
    /// the unit a worker — and later a node — owns. Match the Kafka topic's partition count.
    pub partitions: u32,
    /// Set when a rule file is declared the source of truth (`rules_source = "file"`): the
    /// file's path. Runtime edits of the rule set are then refused.
    pub rules_file_authority: Option<String>,
    /// Who the first recorded version of the rule set is attributed to (`file:PATH`, ...).
    pub initial_author: String,
    /// Wall clock mode: most timers one worker fires in a round. A backlog of due timers (a
    /// restart after downtime, when every window has expired at once) is worked off round
    /// after round, each committed on its own, so memory stays bounded; each timer still
    /// fires at its own instant, and a customer met by an event first has theirs fired then.
    pub timers_per_round: usize,
    /// Wall clock mode: most timers one worker fires in a round while events wait — in a
    /// round that applies events (raised to the worker's number of events), and in a tick
    /// taken while ingest requests are queued. Time-driven changes keep up when timers come
    /// due at a rate the engine can carry (a few hundred a worker in each of ~100 rounds a
    /// second); when they come due faster, the backlog is shared with events instead of
    /// starving them.
    pub timers_beside_events: usize,
    /// The identifier types events may carry in `ids` ([`crate::identity`]).
    pub identity: crate::identity::IdentityConfig,
    /// Most customers a saved segment's change judges and commits in one round. A change
    /// that moves more customers than this (saving a segment that matches most of a large
    /// base, deleting one that holds it) commits its rule text first and then fills the
    /// segment round after round, each committed on its own, so memory stays bounded.
    pub segment_round: usize,
    /// Keep the state changelog ([`crate::changelog`]): each commit also puts, per partition
    /// it writes, a delta another store can restore the partition from, into the `outbox`
    /// column family. Off unless a node shares its partitions (issue #21).
    pub changelog: bool,
    /// Event clock mode: one clock per partition — the greatest `ts` of its own events (or
    /// a later time set for all) — instead of one for the store. What a partition's
    /// customers become then depends on that partition's events alone, not on how its
    /// events interleave with other partitions', so a partition judged on one node and
    /// taken over by another (with its clock, in the changelog) is judged as one node would
    /// have. On for a node of a consumer group ([`EngineConfig::changelog`]).
    pub clock_per_partition: bool,
    /// A group member resolving identity in one partition (issue #21,
    /// `docs/design/cluster.md` §6): the whole identity graph is partition 0's state; an
    /// event with `ids` is resolved by partition 0's owner, which keeps the graph's changes
    /// and, in that partition's outbox of records to send (`r`), the event named by its
    /// canonical customer ([`ResolvedEvent`]) and a handover request for each customer a
    /// merge absorbs; the owners of those customers' partitions apply them. Off on a node
    /// alone (every merge is made in its store).
    pub resolver: bool,
}

impl EngineConfig {
    /// Whether each partition keeps its own event clock ([`EngineConfig::clock_per_partition`]).
    pub(crate) fn partition_clocks(&self) -> bool {
        self.clock == ClockMode::Event && self.clock_per_partition
    }
}

/// Retention of a log (the change log, the dead letters): its oldest entries go once they
/// are older than `max_age_ms` (by the engine's clock for changes, the wall clock for dead
/// letters) or once the log holds more than `max_entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRetention {
    pub max_age_ms: i64,
    pub max_entries: u64,
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
            changes_retention: LogRetention {
                max_age_ms: rules::DEFAULT_RETENTION_MS,
                max_entries: 100_000_000,
            },
            dead_letters_retention: LogRetention {
                max_age_ms: 30 * 86_400_000,
                max_entries: 1_000_000,
            },
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            partitions: 12,
            rules_file_authority: None,
            initial_author: "initial".to_owned(),
            timers_per_round: 20_000,
            timers_beside_events: 256,
            segment_round: 50_000,
            changelog: false,
            resolver: false,
            clock_per_partition: false,
            identity: crate::identity::IdentityConfig::default(),
            heap_probe: None,
            bound_heap: false,
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
    /// A rule-set edit named a version (`If-Match`) that is no longer the current one.
    #[error("the rule set is at version {current}, not {expected}: read it again and reapply the edit")]
    Stale { expected: u64, current: u64 },
    /// A group commit failed; every request of the group gets this (nothing was applied).
    #[error("the commit failed, nothing was applied: {0}")]
    CommitFailed(String),
    /// A cursor points before what a log still holds: entries after it were deleted by
    /// retention, so reading on would skip them silently.
    #[error("{log} before {oldest} are past retention; start again from after={} or later", .oldest - 1)]
    Gone { log: &'static str, oldest: u64 },
}

/// One rejected event of a batch: its index, the message and the stable code of its
/// [`Rejection`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IngestError {
    pub index: usize,
    pub reason: String,
    pub code: &'static str,
}

/// One caller's events for [`Engine::ingest_group`]: the raw bytes (dead letters keep
/// them), each one's parse result, and where the caller's sources (a file, Kafka
/// partitions) stand after them.
#[derive(Debug, Default)]
pub struct IngestRequest {
    pub raw: Vec<Vec<u8>>,
    pub parsed: Vec<Result<ValidEvent, Rejection>>,
    pub positions: Vec<(String, u64)>,
    /// Where the events came from (`http`, `kafka`, `replay`, …), for the quality record.
    pub source: &'static str,
    /// Apply only the events of customers of partitions this store holds unparked: the
    /// others are handed back in [`IngestOutcome::moved`]. For a group member's HTTP
    /// ingest, whose view of what it owns may be a rebalance behind the engine's.
    pub owned_only: bool,
}

impl IngestRequest {
    /// Parses `raw` (on the caller's thread, so the engine thread only applies). The
    /// future-`ts` check is left to the engine, which knows its clock.
    pub fn parse(raw: Vec<Vec<u8>>, limits: &EventLimits) -> IngestRequest {
        let parsed = raw.iter().map(|r| parse_event(r, limits, i64::MAX)).collect();
        IngestRequest {
            raw,
            parsed,
            positions: Vec::new(),
            source: "api",
            owned_only: false,
        }
    }

    /// Parses `raw` from `source` with an [`Intake`]: against its tracking plan, recording
    /// violations and what the events carry.
    pub fn parse_with(raw: Vec<Vec<u8>>, intake: &Intake, source: &'static str) -> IngestRequest {
        let parsed = intake.parse_batch(&raw, source);
        IngestRequest {
            raw,
            parsed,
            positions: Vec::new(),
            source,
            owned_only: false,
        }
    }

    /// Where each source stands after these events, committed with them.
    pub fn with_positions(mut self, positions: Vec<(String, u64)>) -> IngestRequest {
        self.positions = positions;
        self
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
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
    /// With [`IngestRequest::owned_only`], the events not applied because their customer's
    /// partition is parked here (another node owns it, or it is being restored).
    #[serde(skip)]
    pub moved: Vec<MovedEvent>,
}

/// An event handed back unapplied ([`IngestOutcome::moved`]): its index in the request,
/// its bytes and what they parsed to.
#[derive(Debug, Clone)]
pub struct MovedEvent {
    pub index: usize,
    pub raw: Vec<u8>,
    pub event: ValidEvent,
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

/// The file in a backup directory that says what the backup holds.
pub const BACKUP_MANIFEST: &str = "BACKUP.json";

/// What a backup holds ([`Engine::backup`]), as its `BACKUP.json` says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupManifest {
    pub format: u32,
    /// The tagstream version that wrote it.
    pub version: String,
    pub created_at_ms: i64,
    /// The `seq` of the last change it holds (0: none).
    pub last_seq: u64,
    /// The event clock it holds.
    pub clock: Option<i64>,
    pub customers: u32,
    /// Where each source (`kafka:TOPIC:PARTITION`, a file) stands: the next offset to read.
    pub source_offsets: BTreeMap<String, u64>,
    /// Bytes of the backup's files.
    pub bytes: u64,
    pub took_ms: u64,
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
    /// `ids.TYPE`: the customer's identifiers of a type (identity resolution), comma
    /// separated in the order they came (the phone numbers an SMS platform needs).
    Identifier(Arc<str>),
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
    /// The [`Rejection`] code (`unknown` for dead letters written before codes existed).
    pub code: String,
    pub raw: Vec<u8>,
}

/// One page of an ad-hoc segment query.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueryPage {
    pub count: usize,
    pub customers: Vec<String>,
    pub next_cursor: Option<String>,
}

/// One page of an ad-hoc segment query over some partitions, in customer id order (what
/// the nodes of a cluster answer, to be merged: [`ReadHandle::query_partitions`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionsPage {
    /// Customers of those partitions the expression holds for.
    pub count: usize,
    /// The first ids after the cursor, ascending.
    pub customers: Vec<String>,
    /// Whether more follow `customers`.
    pub more: bool,
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
    /// Changes made, their `seq` given at the commit in the order of their places.
    changes: Vec<Change>,
    places: Vec<Place>,
    /// Customers new in this batch, numbered at the commit in the order of their places.
    new_ids: Vec<(Place, Arc<str>)>,
    /// Customers whose profile an event of this batch changed, for the profile columns.
    profiles: Vec<Arc<str>>,
    dirty: foldhash::HashSet<Arc<str>>,
    dedup: foldhash::HashMap<String, i64>,
    /// With the changelog on: the partition of each event id `dedup` holds.
    dedup_partitions: foldhash::HashMap<String, u32>,
    /// Events applied to customers whose history was not loaded, by customer: not in the
    /// store until the batch commits. (By customer, so a merge finds its customers' events
    /// without a pass over the whole batch's.)
    events: foldhash::HashMap<Arc<str>, Vec<rules::Event>>,
    /// Identity graph writes of the batch (`None` deletes), read before the store's.
    identities: foldhash::HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// In a round whose events carry identifiers: the events this batch writes, by
    /// customer (`None`: a customer it deletes), so the next group's merges read a
    /// customer's history without waiting for this batch's write, and a merge later in this
    /// round moves the ids of the absorbed customer's events applied before it
    /// ([`Written`]).
    written: Option<Written>,
    /// Dirty customers whose records a shard encoded into its writes at the end of a dealt
    /// round ([`Worker::encode_numbered`]), and their numbers: the commit encodes the rest.
    encoded: foldhash::HashSet<Arc<str>>,
    touched: Vec<u32>,
    /// Customers a merge absorbed in this batch, with their numbers (their changes keep
    /// them: the customers are in no cache any more).
    gone: foldhash::HashMap<Arc<str>, u32>,
    /// The profile attributes of absorbed customers, cleared from the profile columns.
    cleared: Vec<(u32, Vec<Arc<str>>)>,
    /// True when changes were made in another order than their places (a merge, made as
    /// its event is accepted, before earlier events of the round are applied): the commit
    /// sorts them even with one worker.
    placed_out_of_order: bool,
}

impl Batch {
    /// Keeps the event at `ts`, `arrival` this batch has just written for `customer` (its
    /// last write), if the batch keeps them.
    fn keep_written(&mut self, customer: &Arc<str>, ts: i64, arrival: u64) {
        if let Some(written) = &mut self.written {
            written.keep(customer, ts, arrival, self.wb.last_value());
        }
    }
}

/// The events a batch writes, by customer (`None`: a customer it deletes), as they are
/// written: each event's encoded value, copied into one buffer. Keeping them costs a copy
/// of bytes rather than of the events; only a merge that reads one decodes it.
#[derive(Default)]
struct Written {
    customers: foldhash::HashMap<Arc<str>, Option<Vec<Kept>>>,
    bytes: Vec<u8>,
}

/// One kept event: its key's `ts` and arrival, and where its value lies in
/// [`Written::bytes`].
struct Kept {
    ts: i64,
    arrival: u64,
    value: std::ops::Range<usize>,
}

impl Written {
    /// Empty, with room for as much as `other` keeps.
    fn sized_like(other: &Written) -> Written {
        Written {
            customers: foldhash::HashMap::with_capacity_and_hasher(other.customers.len(), Default::default()),
            bytes: Vec::with_capacity(other.bytes.len()),
        }
    }

    fn keep(&mut self, customer: &Arc<str>, ts: i64, arrival: u64, value: &[u8]) {
        let start = self.bytes.len();
        let Some(events) = self
            .customers
            .entry(customer.clone())
            .or_insert_with(|| Some(Vec::new()))
        else {
            return;
        };
        self.bytes.extend_from_slice(value);
        events.push(Kept {
            ts,
            arrival,
            value: start..self.bytes.len(),
        });
    }

    /// The batch deletes `customer`: whatever it wrote for it before is gone too.
    fn forget(&mut self, customer: &Arc<str>) {
        self.customers.insert(customer.clone(), None);
    }

    /// What the batch did to `customer`: nothing (`None`), deleted it (`Some(None)`), or
    /// wrote these events.
    fn get(&self, customer: &str) -> Option<Option<&[Kept]>> {
        self.customers.get(customer).map(Option::as_deref)
    }

    fn decode(&self, kept: &Kept) -> Result<StoredEvent, crate::codec::CodecError> {
        crate::store::decode_event(kept.ts, kept.arrival, &self.bytes[kept.value.clone()])
    }
}

/// Counters that a failed commit must roll back.
#[derive(Clone)]
struct Counters {
    /// The event clock: with a clock per partition, the greatest of theirs.
    clock: Option<i64>,
    /// Each partition's event clock ([`EngineConfig::clock_per_partition`]; empty without).
    partition_clocks: Vec<Option<i64>>,
    /// Each partition's next `pseq` ([`crate::Change::pseq`]; with the changelog on, else
    /// empty).
    next_pseq: Vec<u64>,
    /// By partition: whether its clock or next `pseq` moved since the last commit wrote
    /// them (empty when it has neither).
    moved: Vec<bool>,
    next_seq: u64,
    next_arrival: u64,
    next_dlq: u64,
    /// The number the next commit that writes a changelog delta gets.
    next_commit: u64,
}

impl Counters {
    /// The event clock `partition`'s customers are judged by.
    fn clock_of(&self, partition: u32) -> Option<i64> {
        match self.partition_clocks.get(partition as usize) {
            Some(clock) => *clock,
            None => self.clock,
        }
    }

    /// Moves `partition`'s event clock (and the store's) forward to `ts`; whether it moved.
    fn advance(&mut self, partition: u32, ts: i64) -> bool {
        if let Some(clock) = self.partition_clocks.get_mut(partition as usize) {
            if clock.is_some_and(|c| c >= ts) {
                return false;
            }
            *clock = Some(ts);
            self.moved[partition as usize] = true;
        } else if self.clock.is_some_and(|c| c >= ts) {
            return false;
        }
        self.clock = self.clock.max(Some(ts));
        true
    }

    /// The `(partition, pseq)` of the next change of a customer of `partition`, counted;
    /// `None` without the changelog.
    fn take_pseq(&mut self, partition: u32) -> Option<(u32, u64)> {
        let next = self.next_pseq.get_mut(partition as usize)?;
        let pseq = *next;
        *next += 1;
        self.moved[partition as usize] = true;
        Some((partition, pseq))
    }

    /// `partition`'s next `pseq`, with the changelog on.
    fn next_pseq_of(&self, partition: u32) -> Option<u64> {
        self.next_pseq.get(partition as usize).copied()
    }

    /// Moves every clock forward to `now` (none moves back).
    fn advance_all(&mut self, now: i64) {
        for p in 0..self.partition_clocks.len() as u32 {
            self.advance(p, now);
        }
        self.clock = self.clock.max(Some(now));
    }
}

/// The evaluation instant of each partition's customers as of one moment, for work off the
/// engine thread (see [`Engine::now_for`]).
#[derive(Clone, Copy)]
pub(super) struct Instants<'a> {
    now: i64,
    partitions: u32,
    /// Each partition's event clock, with a clock per partition.
    clocks: Option<&'a [Option<i64>]>,
}

impl<'a> Instants<'a> {
    fn new(config: &EngineConfig, counters: &'a Counters, now: i64) -> Instants<'a> {
        Instants {
            now,
            partitions: config.partitions.max(1),
            clocks: config
                .partition_clocks()
                .then_some(&counters.partition_clocks[..]),
        }
    }

    /// The instant `customer` is judged at.
    pub(super) fn of(&self, customer: &str) -> i64 {
        match self.clocks {
            Some(clocks) => {
                let p = crate::partition::partition_of(customer.as_bytes(), self.partitions);
                clocks.get(p as usize).copied().flatten().unwrap_or(0)
            }
            None => self.now,
        }
    }

    /// The earliest instant any customer is judged at: what compaction may drop by.
    fn floor(&self) -> i64 {
        match self.clocks {
            Some(clocks) => clocks.iter().flatten().copied().min().unwrap_or(self.now),
            None => self.now,
        }
    }
}

fn partition_clock_key(partition: u32) -> String {
    format!("{META_PARTITION_CLOCK}{partition}")
}

fn next_pseq_key(partition: u32) -> String {
    format!("{META_NEXT_PSEQ}{partition}")
}

const META_CLOCK: &str = "clock";
/// A partition's event clock ([`EngineConfig::clock_per_partition`]), by partition number.
const META_PARTITION_CLOCK: &str = "clock:";
/// A partition's next `pseq` ([`crate::Change::pseq`]), by partition number.
const META_NEXT_PSEQ: &str = "next_pseq:";
const META_SEQ: &str = "next_seq";
const META_ARRIVAL: &str = "next_arrival";
const META_DLQ: &str = "next_dlq";
const META_COMMIT: &str = "next_changelog_commit";
/// Numbers of the customers dropped with a partition (a roaring bitmap).
const META_NUMBERS_GONE: &str = "numbers_gone";
const META_RULES: &str = "rules";
const META_GENERATION: &str = "generation";
const META_BACKFILL: &str = "backfill_cursor";
/// A saved segment being filled round by round: the next customer number, then its name.
const META_SEGMENT_FILL: &str = "segment_fill";
/// Each input's next position (`offset:SOURCE`), written with the state it produced.
pub(crate) const META_OFFSET_PREFIX: &str = "offset:";
/// The data-quality record ([`crate::quality`]), saved with commits every few seconds.
const META_QUALITY: &str = "quality";
/// What identity resolution has done ([`crate::identity::IdentityStats`]), as JSON.
const META_IDENTITY: &str = "identity_stats";

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
    /// The workers' customers, timers and batches in flight.
    shards: Vec<Shard>,
    /// Writes [`Engine::submit_group`]'s batches while the next group is evaluated.
    writer: Option<BackgroundWriter>,
    /// The group being written, if any.
    pending: Option<Pending>,
    /// Groups finished (durable or failed) and not yet taken.
    finished: Vec<pipeline::Finished>,
    next_ticket: u64,
    /// The `seq` of the last durable change, set where a commit becomes visible.
    durable_seq: Arc<std::sync::atomic::AtomicU64>,
    /// Batches committed since open; the cache's clock for eviction.
    batches: u64,
    /// The cache's share of the heap's budget, with a heap probe.
    heap_budget: HeapBudget,
    backfill_cursor: Option<Vec<u8>>,
    /// Customers the current backfill sweep has passed (since this process started it or
    /// resumed it), and the store's estimate of all customers when it began.
    backfill_done: u64,
    backfill_total: u64,
    /// A saved segment whose change is committed round by round (see
    /// [`EngineConfig::segment_round`]).
    segment_fill: Option<segments::SegmentFill>,
    /// Position of each definition in evaluation order.
    order_pos: Vec<usize>,
    /// The rule set's version ([`versions`]).
    rules_version: u64,
    /// The tracking plan events are judged against, if one is loaded.
    plan: Option<Arc<TrackingPlan>>,
    /// Violations and the observed schema, shared with the edges and readers.
    quality: Arc<Quality>,
    /// Every `customer_id` a merge absorbed, and its survivor ([`identity`]).
    aliases: identity::Aliases,
    identity_counts: Arc<crate::identity::IdentityCounts>,
    /// Identifier lookups kept in memory ([`crate::identity::OwnerCache`]).
    owner_cache: std::cell::RefCell<crate::identity::OwnerCache>,
    /// The number of the group resolver's next record (0: not read yet).
    next_resolved: std::cell::Cell<u64>,
    /// `config.identity`, shared with the intakes that prepare events' identifiers.
    identity_types: Arc<crate::identity::IdentityConfig>,
    /// Partitions whose timers wait, and their timers ([`Engine::park_partitions`]).
    parked: Parked,
}

/// Partitions a member of a consumer group of several holds but does not own (yet): their
/// timers wait here, so time alone changes none of their customers on this node.
#[derive(Default)]
struct Parked {
    partitions: std::collections::BTreeSet<u32>,
    timers: BTreeMap<u32, Vec<(i64, Arc<str>)>>,
    /// Parked partitions a rule change's sweep passed by: it runs again once one of them
    /// is activated.
    swept_past: std::collections::BTreeSet<u32>,
}

pub(crate) fn wall_ms() -> i64 {
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
    /// Opens (or creates) the store at `path`. `rules_text` is the rule set of a store that has
    /// none yet; a store that has one keeps it (replace it with [`Engine::replace_rules_as`],
    /// after [`Engine::diff_rules`] showed what that changes).
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
        let partition_clocks = match config.partition_clocks() {
            true => (0..config.partitions)
                .map(|p| store.meta_i64(&partition_clock_key(p)))
                .collect::<Result<_, _>>()?,
            false => Vec::new(),
        };
        let next_pseq = match config.changelog {
            true => (0..config.partitions)
                .map(|p| Ok(store.meta_u64(&next_pseq_key(p))?.max(1)))
                .collect::<Result<_, StoreError>>()?,
            false => Vec::new(),
        };
        let counters = Counters {
            clock: store.meta_i64(META_CLOCK)?,
            partition_clocks,
            next_pseq,
            moved: match config.partition_clocks() || config.changelog {
                true => vec![false; config.partitions.max(1) as usize],
                false => Vec::new(),
            },
            next_seq: store.meta_u64(META_SEQ)?.max(1),
            next_arrival: store.meta_u64(META_ARRIVAL)?,
            next_dlq: store.meta_u64(META_DLQ)?,
            next_commit: store.meta_u64(META_COMMIT)?.max(1),
        };
        let recorded_generation = store.meta_u64(META_GENERATION)?;
        let generation = match recorded_generation {
            // Stores made before generations were recorded judged everyone under 1.
            0 if stored_rules.is_some() => 1,
            0 => versions::generation_of(rules.source(), None),
            g => g,
        };
        let rules_version = versions::current_version(&store)?;
        let backfill_cursor = store.get(CF_META, META_BACKFILL.as_bytes())?;
        let segment_fill = store
            .get(CF_META, META_SEGMENT_FILL.as_bytes())?
            .map(|raw| segments::SegmentFill::decode(&raw))
            .transpose()?;
        let timers = store.timers()?;
        let order_pos = positions(&rules);
        let quality = Arc::new(Quality::restore(
            store.get(CF_META, META_QUALITY.as_bytes())?.as_deref(),
        ));
        let index = MembershipIndex::open(
            &store,
            counters.next_seq - 1,
            ColumnLimits {
                profile_attributes: config.profile_columns,
                traits: config.trait_columns,
            },
        )?;
        let next_seq = counters.next_seq;
        let published = Arc::new(Published::new(
            rules.clone(),
            counters.clock,
            &counters.partition_clocks,
        ));
        if let Some(bytes) = store.get(CF_META, META_NUMBERS_GONE.as_bytes())? {
            let gone = roaring::RoaringBitmap::deserialize_from(&bytes[..])
                .map_err(|_| StoreError::Codec(crate::codec::CodecError("bad gone customer numbers")))?;
            published.set_numbers_gone(gone);
        }
        let mut engine = Engine {
            store: Arc::new(store),
            index: Arc::new(index),
            published,
            rules,
            generation,
            config,
            counters,
            shards: Vec::new(),
            writer: None,
            pending: None,
            finished: Vec::new(),
            next_ticket: 0,
            durable_seq: Arc::new(std::sync::atomic::AtomicU64::new(next_seq - 1)),
            batches: 0,
            heap_budget: HeapBudget::default(),
            backfill_cursor,
            backfill_done: 0,
            backfill_total: 0,
            segment_fill,
            order_pos,
            rules_version,
            plan: None,
            quality,
            aliases: identity::Aliases::default(),
            identity_counts: Arc::default(),
            owner_cache: Default::default(),
            next_resolved: Default::default(),
            identity_types: Default::default(),
            parked: Parked::default(),
        };
        if engine
            .config
            .identity
            .position(crate::identity::CUSTOMER_ID)
            .is_none()
        {
            engine.config.identity.types.push(crate::identity::IdType {
                name: Arc::from(crate::identity::CUSTOMER_ID),
                rank: 100,
                normaliser: crate::identity::Normaliser::Exact,
                max_per_customer: None,
            });
        }
        engine.identity_types = Arc::new(engine.config.identity.clone());
        engine.reload_aliases()?;
        engine.owner_cache = std::cell::RefCell::new(identity::load_owner_cache(
            &engine.store,
            engine.config.identity.cache_entries,
        )?);
        engine
            .identity_counts
            .restore(engine.store.get(CF_META, META_IDENTITY.as_bytes())?.as_deref());
        engine.config.partitions = engine.config.partitions.max(1);
        let per_partition = engine
            .config
            .partition_clocks()
            .then_some(engine.config.partitions);
        engine.shards = (0..engine.config.workers.max(1))
            .map(|_| Shard {
                timers: timers::Timers::new(per_partition),
                ..Shard::default()
            })
            .collect();
        // A standby's copy of a partition another node owns stays parked: nothing of it
        // fires or is swept here until it is promoted.
        let copies = engine.reader().standby_copies()?;
        engine.parked.partitions.extend(copies);
        engine.deal_timers(timers);
        if stored_rules.is_none() || recorded_generation == 0 {
            let mut wb = WriteBatch::default();
            engine.store.put_meta_u64(&mut wb, META_GENERATION, generation);
            engine.store.commit(wb)?;
        }
        if engine.rules_version == 0 {
            let action = if stored_rules.is_some() {
                "recorded (kept before versions)"
            } else {
                "initial"
            };
            engine.record_first_version(&engine.config.initial_author.clone(), action)?;
        }
        engine.open_changelog()?;
        engine.publish_backfill();
        Ok(engine)
    }

    pub fn rules(&self) -> &Arc<CompiledRules> {
        &self.rules
    }

    /// Shows [`ReadHandle::backfill_progress`] where the backfill (or a segment's fill) now
    /// is: called wherever it starts, moves or ends.
    fn publish_backfill(&self) {
        self.published.set_backfill(self.backfill_progress());
    }

    /// Judges events against `plan` from now on (`None`: no plan, behaviour as without).
    pub fn set_plan(&mut self, plan: Option<Arc<TrackingPlan>>) {
        self.plan = plan;
    }

    pub fn plan(&self) -> Option<&Arc<TrackingPlan>> {
        self.plan.as_ref()
    }

    /// What edges parse events with: the limits, the plan and the quality record.
    pub fn intake(&self) -> Intake {
        Intake {
            limits: self.config.limits,
            plan: self.plan.clone(),
            quality: self.quality.clone(),
            identity: Some(self.identity_types.clone()),
        }
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

    /// The evaluation instant now for `partition`'s customers: its own event clock with a
    /// clock per partition ([`EngineConfig::clock_per_partition`]), else [`Engine::now`].
    pub fn now_in(&self, partition: u32) -> i64 {
        match self.config.clock {
            ClockMode::Event => self.counters.clock_of(partition).unwrap_or(0),
            ClockMode::Wall => self.now(),
        }
    }

    /// The evaluation instant now for `customer` (see [`Engine::now_in`]).
    pub(crate) fn now_for(&self, customer: &str) -> i64 {
        match self.config.partition_clocks() {
            true => self.now_in(self.partition_of(customer)),
            false => self.now(),
        }
    }

    /// The partition `customer` is hashed to.
    fn partition_of(&self, customer: &str) -> u32 {
        crate::partition::partition_of(customer.as_bytes(), self.config.partitions)
    }

    /// `partition`'s event clock, if known (the store's, without a clock per partition).
    pub fn clock_of(&self, partition: u32) -> Option<i64> {
        self.counters.clock_of(partition)
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
        let mut all = FiredTimers::default();
        for shard in &mut self.shards {
            let fired = std::mem::take(&mut shard.fired);
            all.count += fired.count;
            let room = FiredTimers::MAX_DUE - all.due.len().min(FiredTimers::MAX_DUE);
            all.due.extend(fired.due.into_iter().take(room));
        }
        all
    }

    /// Customers in the in-memory cache, and the estimate of their bytes (`[cache]`).
    pub fn cache_usage(&self) -> (usize, usize) {
        self.shards
            .iter()
            .fold((0, 0), |(n, b), s| (n + s.cache.len(), b + s.cache.bytes()))
    }

    /// Customers used and found in the cache, and used and not found (read from the store,
    /// or new), since open.
    pub fn cache_lookups(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(h, m), s| {
            let (sh, sm) = s.cache.lookups();
            (h + sh, m + sm)
        })
    }

    pub fn pending_timers(&self) -> usize {
        self.shards.iter().map(|s| s.timers.len()).sum()
    }

    /// The number of engine workers (shards).
    pub fn workers(&self) -> usize {
        self.shards.len()
    }

    /// The shard that owns `customer`.
    fn shard_index(&self, customer: &str) -> usize {
        // The shards' count from the config: during a dealt round they are on their threads.
        shard_of(customer, self.config.partitions, self.config.workers.max(1))
    }

    /// Gives each shard the stored timers of its customers (those of parked partitions
    /// wait apart).
    fn deal_timers(&mut self, timers: Vec<(i64, Arc<str>)>) {
        for shard in &mut self.shards {
            shard.timers.clear();
        }
        self.parked.timers.clear();
        for (due, customer) in timers {
            let partition = self.partition_of(&customer);
            if self.parked.partitions.contains(&partition) {
                self.parked
                    .timers
                    .entry(partition)
                    .or_default()
                    .push((due, customer));
                continue;
            }
            let i = self.shard_index(&customer);
            self.shards[i].timers.insert((due, customer));
        }
    }

    /// Parks `partitions`: their customers' timers wait until [`Engine::activate_partition`]
    /// (a member of a consumer group of several parks every partition at start and
    /// activates those the group gives it, so a partition it keeps from an earlier run but
    /// does not own fires nothing). A parked timer past due fires, at its instant, once
    /// its partition is active again.
    pub fn park_partitions(&mut self, partitions: impl IntoIterator<Item = u32>) {
        self.settle();
        self.parked.partitions.extend(partitions);
        let count = self.config.partitions;
        for shard in &mut self.shards {
            let parked: Vec<(i64, Arc<str>)> = shard
                .timers
                .iter()
                .filter(|(_, customer)| {
                    let partition = crate::partition::partition_of(customer.as_bytes(), count);
                    self.parked.partitions.contains(&partition)
                })
                .cloned()
                .collect();
            for timer in parked {
                shard.timers.remove(&timer);
                let partition = crate::partition::partition_of(timer.1.as_bytes(), count);
                self.parked.timers.entry(partition).or_default().push(timer);
            }
        }
    }

    /// Lets `partition`'s timers fire again ([`Engine::park_partitions`]).
    pub fn activate_partition(&mut self, partition: u32) {
        self.settle();
        self.parked.partitions.remove(&partition);
        for (due, customer) in self.parked.timers.remove(&partition).unwrap_or_default() {
            let i = self.shard_index(&customer);
            self.shards[i].timers.insert((due, customer));
        }
        if self.parked.swept_past.remove(&partition) {
            // Its customers are brought up to the rules the sweep brought the others to.
            self.start_backfill();
        }
    }

    /// The partitions parked ([`Engine::park_partitions`]).
    pub fn parked_partitions(&self) -> Vec<u32> {
        self.parked.partitions.iter().copied().collect()
    }

    /// The shared half of the engine for a round's workers, and the shards.
    fn parts<'a>(&'a mut self, steps: &'a [(u64, i64)], timers: usize) -> (Ctx<'a>, &'a mut [Shard]) {
        (
            Ctx {
                store: &self.store,
                rules: &self.rules,
                config: &self.config,
                generation: self.generation,
                order_pos: &self.order_pos,
                batches: self.batches,
                steps,
                pending: self.pending.as_ref().map(|p| &*p.signal),
                pending_dirty: self.pending.as_ref().map(|p| &p.done.dirty[..]),
                pending_written: self
                    .pending
                    .as_ref()
                    .and_then(|p| p.done.written.as_deref())
                    .map(|w| &w[..]),
                timers,
            },
            &mut self.shards,
        )
    }

    /// What customers are judged under, for loading them with their stored windows.
    fn current(&self) -> Current<'_> {
        Current {
            rules: &self.rules,
            retention_ms: self.config.retention_ms,
        }
    }

    /// Commits made since the store was opened.
    pub fn commits(&self) -> u64 {
        self.batches
    }

    pub fn next_seq(&self) -> u64 {
        self.counters.next_seq
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.settle();
        if let Err(e) = self.checkpoint_index() {
            tracing::warn!(error = %e, "membership index checkpoint at close failed; the next open replays the change log");
        }
        if let Err(e) = self.save_quality() {
            tracing::warn!(error = %e, "saving the data-quality record at close failed; the last seconds' counts are lost");
        }
    }
}

impl Engine {
    /// Saves the data-quality record now (commits save it every few seconds).
    pub fn save_quality(&self) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        wb.put_cf(
            self.store.cf(CF_META),
            META_QUALITY.as_bytes(),
            self.quality.snapshot(),
        );
        self.store.commit(wb)
    }
}
