//! The RocksDB layout. One column family per kind of data; keys keep a customer's data
//! together and sort timers and the change log by time and sequence.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `customers` | customer id | [`CustomerState`] record (profile, memberships, event tags, timer, window header) |
//! | `windows` | id length (u32 BE), id, source (u16 BE), chunk (u64 BE) | a chunk of one source's window queue ([`crate::window`]) |
//! | `events` | id length (u32 BE), id, ts (sortable), arrival (BE) | type, props, event id |
//! | `timers` | due (sortable), customer id | empty |
//! | `changes` | seq (BE) | the change as JSON |
//! | `changes_by_name` | name length (u32 BE), name, seq (BE) | empty: the change log's index by definition |
//! | `dedup` | event id | clock instant it was first applied |
//! | `dlq` | number (BE) | received_at, reason, original bytes |
//! | `meta` | name | clock, sequences, rules text, source offsets |
//! | `numbers` | customer number (BE u32) | customer id: the membership index's dense numbers |
//! | `index` | `seq`, `ids:CHUNK`, `set:NAME` | the membership index's last checkpoint |
//! | `webhooks` | `sub:ID`, `dlq:ID:SEQ` | webhook subscriptions and their failed deliveries |
//! | `identities` | `i` type `\0` value; `c` customer id | the identity graph: an identifier's canonical customer; a customer's identifiers ([`crate::identity`]) |
//! | `outbox` | partition (u32 BE), commit (u64 BE) | a state changelog delta not yet published ([`crate::changelog`]) |
//!
//! Everything a batch changes goes into one `WriteBatch` with the WAL on, so state, change
//! log, dedup keys and offsets commit atomically.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};
use rules::{CompiledRules, Event, Props};

use crate::codec::{CodecError, Reader, Writer};
use crate::state::{CustomerState, StoredWindows};
use crate::window::WindowSet;
use crate::writes::{SortedWrites, Writes};

pub const CF_CUSTOMERS: &str = "customers";
pub const CF_EVENTS: &str = "events";
pub const CF_TIMERS: &str = "timers";
pub const CF_CHANGES: &str = "changes";
pub const CF_DEDUP: &str = "dedup";
pub const CF_DLQ: &str = "dlq";
pub const CF_META: &str = "meta";
pub const CF_NUMBERS: &str = "numbers";
pub const CF_INDEX: &str = "index";
pub const CF_WEBHOOKS: &str = "webhooks";
pub const CF_WINDOWS: &str = "windows";
pub const CF_CHANGES_BY_NAME: &str = "changes_by_name";
/// API keys (hashed) — written by the HTTP layer and the `keys` command, never the engine.
pub const CF_ACCESS: &str = "access";
/// The audit trail, append-only, keyed by its sequence number.
pub const CF_AUDIT: &str = "audit";
/// The identity graph ([`crate::identity`]).
pub const CF_IDENTITIES: &str = "identities";
/// The group's change log, as the changes topic holds it (`engine::group_log`).
pub const CF_GROUP_CHANGES: &str = "group_changes";
const ALL_CFS: [&str; 17] = [
    CF_ACCESS,
    CF_AUDIT,
    CF_CUSTOMERS,
    CF_EVENTS,
    CF_TIMERS,
    CF_CHANGES,
    CF_DEDUP,
    CF_DLQ,
    CF_META,
    CF_NUMBERS,
    CF_INDEX,
    CF_WEBHOOKS,
    CF_WINDOWS,
    CF_CHANGES_BY_NAME,
    CF_IDENTITIES,
    crate::changelog::CF_OUTBOX,
    CF_GROUP_CHANGES,
];

/// The oldest change `seq` retention left (meta key; 0 until it deleted any).
pub const META_CHANGES_FROM: &str = "changes_from";
/// Set once `changes_by_name` holds every change of the log (stores from before the index
/// get it built at open).
const META_CHANGES_BY_NAME: &str = "changes_by_name_built";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// What a customer is judged under: the window state stored in a record is used only when
/// it was kept under rules whose windows are shaped the same
/// ([`CompiledRules::window_layout`]) and the same retention.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    pub rules: &'a CompiledRules,
    pub retention_ms: i64,
}

/// A raw key and value read from a column family.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// An event as kept in the customer's history.
#[derive(Debug, Clone, PartialEq)]
/// One customer as [`Store::customers_with_history`] reads them.
pub struct CustomerExport<'a> {
    pub id: &'a str,
    pub record: &'a [u8],
    /// Each retained event: its key after the customer's prefix (`ts`, arrival), its value.
    pub events: Vec<(Vec<u8>, Vec<u8>)>,
    /// `(event_id, applied-at value)` of those events still remembered for dedup.
    pub dedup: Vec<(String, Vec<u8>)>,
}

#[derive(Clone)]
pub struct StoredEvent {
    pub event: Event,
    pub event_id: Option<String>,
    /// The customer the event belongs to when that is not the one it is stored under: an
    /// absorbed customer's (identity resolution), so an unmerge can give it back.
    pub origin: Option<String>,
    /// The profile attributes the event set (`None` deleted), for rebuilding the profiles
    /// of customers split apart again.
    pub profile: Vec<rules::ProfileUpdate>,
}

pub struct Store {
    db: DB,
    /// Tests: the next this many commits fail.
    #[cfg(test)]
    pub(crate) fail_writes: std::sync::atomic::AtomicU32,
    /// Tests: the next commit panics if this is set.
    #[cfg(test)]
    pub(crate) panic_writes: std::sync::atomic::AtomicBool,
    /// Tests: a retention step waits while this is set; `trims` counts those started.
    #[cfg(test)]
    pub(crate) hold_trims: std::sync::atomic::AtomicBool,
    #[cfg(test)]
    pub(crate) trims: std::sync::atomic::AtomicU32,
    /// Tests: commits wait while this is set.
    #[cfg(test)]
    pub(crate) hold_writes: std::sync::atomic::AtomicBool,
    sync: bool,
    /// The oldest change retention left, read by the compaction filter of
    /// `changes_by_name`, which drops index entries of deleted changes.
    changes_floor: Arc<AtomicU64>,
    /// The engine's clock at its last commit, read by the compaction filters; `i64::MIN`
    /// until the first commit (keep everything).
    clock: Arc<AtomicI64>,
    history_ms: i64,
}

/// How long the store keeps what only matters for a while. Compaction filters drop older
/// entries in the background, so data of customers who went quiet does not stay forever.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Dedup keys older than this (by the clock when the event was applied) are dropped.
    pub dedup_horizon_ms: i64,
    /// Retained events with a `ts` at or before `clock - history_ms` are dropped.
    pub history_ms: i64,
    /// RocksDB's block cache, shared by every column family.
    pub block_cache_bytes: usize,
    /// All memtables together.
    pub memtable_bytes: usize,
}

/// The compaction filter of the `dedup` column family.
fn dedup_filter(clock: Arc<AtomicI64>, horizon_ms: i64) -> impl FnMut(u32, &[u8], &[u8]) -> Decision {
    move |_level, _key, value| {
        let now = clock.load(Ordering::Relaxed);
        match Reader::new(value).i64() {
            Ok(applied_at) if now != i64::MIN && now.saturating_sub(applied_at) > horizon_ms => {
                Decision::Remove
            }
            _ => Decision::Keep,
        }
    }
}

/// The compaction filter of the `events` column family.
fn history_filter(clock: Arc<AtomicI64>, retention_ms: i64) -> impl FnMut(u32, &[u8], &[u8]) -> Decision {
    move |_level, key, _value| {
        let now = clock.load(Ordering::Relaxed);
        match event_key_ts(key) {
            Some(ts) if now != i64::MIN && ts <= now.saturating_sub(retention_ms) => Decision::Remove,
            _ => Decision::Keep,
        }
    }
}

/// The `ts` of an `events` key.
fn event_key_ts(key: &[u8]) -> Option<i64> {
    let len = u32::from_be_bytes(key.get(..4)?.try_into().ok()?) as usize;
    let ts = key.get(4 + len..4 + len + 8)?;
    Some(from_sortable_i64(ts))
}

/// Maps an i64 to bytes that sort like the number.
pub fn sortable_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn from_sortable_i64(b: &[u8]) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(raw) ^ (1 << 63)) as i64
}

/// The `ts` and arrival of an `events` key after the customer's prefix.
fn event_key_suffix(rest: &[u8]) -> Result<(i64, u64), CodecError> {
    if rest.len() != 16 {
        return Err(CodecError("bad event key"));
    }
    let arrival = u64::from_be_bytes(rest[8..16].try_into().expect("8 bytes"));
    Ok((from_sortable_i64(&rest[..8]), arrival))
}

fn event_prefix(customer: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + customer.len() + 16);
    key.extend_from_slice(&(customer.len() as u32).to_be_bytes());
    key.extend_from_slice(customer.as_bytes());
    key
}

/// The key of a chunk of a customer's window state: the customer's `prefix` (as for
/// events), the source and the chunk number.
fn window_key(prefix: &[u8], source: usize, chunk: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 10);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&(source as u16).to_be_bytes());
    key.extend_from_slice(&chunk.to_be_bytes());
    key
}

/// A definition's (or manual tag's) prefix in `changes_by_name`.
fn name_prefix(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + name.len() + 8);
    key.extend_from_slice(&(name.len() as u32).to_be_bytes());
    key.extend_from_slice(name.as_bytes());
    key
}

/// The `changes_by_name` key of change `seq` of `name`.
pub fn change_name_key(name: &str, seq: u64) -> Vec<u8> {
    let mut key = name_prefix(name);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// An `events` key from its customer and the part after the customer's prefix (as
/// [`Store::customers_with_history`] gives it).
pub fn event_key_from_rest(customer: &str, rest: &[u8]) -> Vec<u8> {
    let mut key = event_prefix(customer);
    key.extend_from_slice(rest);
    key
}

pub fn event_key(customer: &str, ts: i64, arrival: u64) -> Vec<u8> {
    let mut key = event_prefix(customer);
    key.extend_from_slice(&sortable_i64(ts));
    key.extend_from_slice(&arrival.to_be_bytes());
    key
}

/// A `timers` key read back: the due instant and the customer.
pub fn decode_timer_key(key: &[u8]) -> Result<(i64, &str), CodecError> {
    if key.len() < 8 {
        return Err(CodecError("bad timer key"));
    }
    let id = std::str::from_utf8(&key[8..]).map_err(|_| CodecError("bad timer key"))?;
    Ok((from_sortable_i64(key), id))
}

/// A retained event as another store wrote it (an `events` key and value), checked to read
/// back as one: its customer and arrival number.
pub fn check_event_entry<'k>(key: &'k [u8], value: &[u8]) -> Result<(&'k str, u64), CodecError> {
    let len = u32::from_be_bytes(
        key.get(..4)
            .ok_or(CodecError("bad event key"))?
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    let customer = key.get(4..4 + len).ok_or(CodecError("bad event key"))?;
    let customer = std::str::from_utf8(customer).map_err(|_| CodecError("bad event key"))?;
    let (ts, arrival) = event_key_suffix(&key[4 + len..])?;
    decode_event(ts, arrival, value)?;
    Ok((customer, arrival))
}

pub fn timer_key(due: i64, customer: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + customer.len());
    key.extend_from_slice(&sortable_i64(due));
    key.extend_from_slice(customer.as_bytes());
    key
}

impl Store {
    pub fn open(path: &Path, sync: bool, retention: Retention) -> Result<Store, StoreError> {
        let clock = Arc::new(AtomicI64::new(i64::MIN));
        let changes_floor = Arc::new(AtomicU64::new(0));
        let cache = Cache::new_lru_cache(retention.block_cache_bytes);
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(DBCompressionType::Lz4);
        opts.increase_parallelism(2);
        // Memtables of all column families together stay within this; with the block cache
        // and the customer cache it bounds memory by configuration, not by data size.
        opts.set_db_write_buffer_size(retention.memtable_bytes);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(DBCompressionType::Lz4);
            cf.set_write_buffer_size(retention.memtable_bytes / 4);
            if [CF_CUSTOMERS, CF_DEDUP, CF_IDENTITIES].contains(name) {
                // Point lookups, most of them for keys that are not there (new customers,
                // new event ids): a bloom filter answers those without reading a block.
                // Filters and indexes stay in the table readers' memory (about 10 bits a key),
                // not in the block cache, where a small cache would evict and re-read them.
                let mut table = BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                table.set_block_cache(&cache);
                cf.set_block_based_table_factory(&table);
                // The same for the memtables, where a miss otherwise walks the skip list
                // (a few hundred thousand keys deep between flushes): a whole-key filter of
                // 2% of the memtable's size answers most misses with two cache lines.
                cf.set_memtable_whole_key_filtering(true);
                cf.set_memtable_prefix_bloom_ratio(0.02);
            } else {
                let mut table = BlockBasedOptions::default();
                table.set_block_cache(&cache);
                cf.set_block_based_table_factory(&table);
            }
            if *name == CF_DEDUP {
                cf.set_compaction_filter(
                    "dedup-horizon",
                    dedup_filter(clock.clone(), retention.dedup_horizon_ms),
                );
            }
            if *name == CF_EVENTS {
                cf.set_compaction_filter(
                    "history-retention",
                    history_filter(clock.clone(), retention.history_ms),
                );
            }
            if *name == CF_CHANGES_BY_NAME {
                let floor = changes_floor.clone();
                cf.set_compaction_filter(
                    "changes-retention",
                    move |_level: u32, key: &[u8], _value: &[u8]| match key
                        .len()
                        .checked_sub(8)
                        .map(|at| u64::from_be_bytes(key[at..].try_into().unwrap()))
                    {
                        Some(seq) if seq < floor.load(Ordering::Relaxed) => Decision::Remove,
                        _ => Decision::Keep,
                    },
                );
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let store = Store {
            db,
            sync,
            changes_floor,
            clock,
            history_ms: retention.history_ms,
            #[cfg(test)]
            fail_writes: Default::default(),
            #[cfg(test)]
            panic_writes: Default::default(),
            #[cfg(test)]
            hold_trims: Default::default(),
            #[cfg(test)]
            trims: Default::default(),
            #[cfg(test)]
            hold_writes: Default::default(),
        };
        store.set_changes_floor(store.meta_u64(META_CHANGES_FROM)?);
        store.index_changes_by_name()?;
        Ok(store)
    }

    /// Tells the compaction filter of `changes_by_name` the oldest change left.
    pub fn set_changes_floor(&self, floor: u64) {
        self.changes_floor.store(floor, Ordering::Relaxed);
    }

    /// Builds `changes_by_name` from the change log once, for stores written before it
    /// existed (every commit since writes both).
    fn index_changes_by_name(&self) -> Result<(), StoreError> {
        if self.get(CF_META, META_CHANGES_BY_NAME.as_bytes())?.is_some() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let mut indexed = 0u64;
        for item in self.scan_from(CF_CHANGES, &[]) {
            let (key, value) = item?;
            let seq = u64::from_be_bytes(key[..].try_into().map_err(|_| CodecError("bad change key"))?);
            let (_, change) = crate::Change::decode_stored(&value).ok_or(CodecError("bad stored change"))?;
            batch.put_cf(
                self.cf(CF_CHANGES_BY_NAME),
                change_name_key(&change.name, seq),
                [],
            );
            indexed += 1;
            if batch.len() >= 10_000 {
                self.commit(std::mem::take(&mut batch))?;
            }
        }
        batch.put_cf(self.cf(CF_META), META_CHANGES_BY_NAME, []);
        self.commit(batch)?;
        if indexed > 0 {
            tracing::info!(changes = indexed, "indexed the change log by definition");
        }
        Ok(())
    }

    /// The `seq`s of the changes of `name` after `after`, in order, at most `limit`.
    pub fn change_seqs_of(&self, name: &str, after: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let prefix = name_prefix(name);
        let start = change_name_key(name, after.saturating_add(1));
        let mut seqs = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_CHANGES_BY_NAME),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (key, _) = item?;
            let Some(rest) = key.strip_prefix(prefix.as_slice()) else {
                break;
            };
            if seqs.len() == limit {
                break;
            }
            seqs.push(u64::from_be_bytes(
                rest.try_into().map_err(|_| CodecError("bad change index key"))?,
            ));
        }
        Ok(seqs)
    }

    /// The stored changes at `seqs` (`None` where retention deleted one).
    pub fn changes_at(&self, seqs: &[u64]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let keys: Vec<[u8; 8]> = seqs.iter().map(|s| s.to_be_bytes()).collect();
        self.db
            .batched_multi_get_cf(self.cf(CF_CHANGES), keys.iter(), true)
            .into_iter()
            .map(|r| Ok(r?.map(|v| v.to_vec())))
            .collect()
    }

    /// Tells the compaction filters the clock of the last commit.
    pub fn set_clock(&self, now: i64) {
        self.clock.store(now, Ordering::Relaxed);
    }

    /// Retained events have a `ts` after this: older ones are out of the history, whether
    /// compaction has dropped them yet or not.
    fn history_cutoff(&self) -> i64 {
        match self.clock.load(Ordering::Relaxed) {
            i64::MIN => i64::MIN,
            now => now.saturating_sub(self.history_ms),
        }
    }

    /// Compacts a whole column family now (tests and maintenance), its bottommost level
    /// included: RocksDB's default leaves that level alone unless the family has a
    /// compaction filter, and with it the tombstones of deleted keys (timers that moved).
    pub fn compact(&self, cf: &str) {
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(self.cf(cf), None::<&[u8]>, None::<&[u8]>, &opts);
    }

    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    /// Tests: counts a retention step and waits while `hold_trims` is set.
    #[cfg(test)]
    pub(crate) fn hold_trims(&self) {
        self.trims.fetch_add(1, Ordering::AcqRel);
        while self.hold_trims.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    pub fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        #[cfg(test)]
        if self
            .fail_writes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Codec(CodecError("injected write failure")));
        }
        #[cfg(test)]
        if self.panic_writes.swap(false, Ordering::AcqRel) {
            panic!("injected write panic");
        }
        #[cfg(test)]
        while self.hold_writes.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(self.sync);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Commits the engine's batch, sorted by key within each column family.
    pub fn commit_sorted(&self, writes: SortedWrites) -> Result<(), StoreError> {
        self.commit_sorted_parts(vec![writes])
    }

    /// Several batches' writes, sorted together, as one atomic commit.
    pub fn commit_sorted_parts(&self, parts: Vec<SortedWrites>) -> Result<(), StoreError> {
        self.commit(SortedWrites::into_one_batch(
            parts,
            ALL_CFS.iter().map(|name| self.cf(name)),
        ))
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    pub fn meta_u64(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self
            .get(CF_META, name.as_bytes())?
            .map_or(0, |b| Reader::new(&b).u64().unwrap_or(0)))
    }

    pub fn meta_i64(&self, name: &str) -> Result<Option<i64>, StoreError> {
        match self.get(CF_META, name.as_bytes())? {
            None => Ok(None),
            Some(b) => Ok(Some(Reader::new(&b).i64()?)),
        }
    }

    pub fn put_meta_u64(&self, batch: &mut impl Writes, name: &str, v: u64) {
        let mut w = Writer::new();
        w.u64(v);
        batch.put(self.cf(CF_META), name.as_bytes(), &w.buf);
    }

    /// Writes one key on its own, outside any engine batch (data the engine never writes,
    /// such as webhook subscriptions).
    pub fn put_now(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(cf), key, value);
        self.commit(batch)
    }

    /// Writes keys of a column family the engine never writes in one write, fsynced whatever
    /// `sync_writes` says (API keys and the audit trail must survive a power cut).
    pub fn put_durable(&self, cf: &str, entries: &[(&[u8], &[u8])]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (key, value) in entries {
            batch.put_cf(self.cf(cf), key, value);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Deletes `keys` from a column family the engine never writes, in one write; returns
    /// how many.
    pub fn delete_now(
        &self,
        cf: &str,
        keys: impl IntoIterator<Item = impl AsRef<[u8]>>,
    ) -> Result<usize, StoreError> {
        let mut batch = WriteBatch::default();
        for key in keys {
            batch.delete_cf(self.cf(cf), key);
        }
        let n = batch.len();
        self.commit(batch)?;
        Ok(n)
    }

    /// Deletes every key starting with `prefix` from a column family the engine never writes.
    pub fn delete_prefix_now(&self, cf: &str, prefix: &[u8]) -> Result<usize, StoreError> {
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for item in self.scan_from(cf, prefix) {
            let (key, _) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            batch.delete_cf(self.cf(cf), &key);
            n += 1;
        }
        self.commit(batch)?;
        Ok(n)
    }

    /// Writes one meta counter on its own (WAL on, synced when the store syncs).
    pub fn put_meta_u64_now(&self, name: &str, v: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        self.put_meta_u64(&mut batch, name, v);
        self.commit(batch)
    }

    pub fn put_meta_i64(&self, batch: &mut impl Writes, name: &str, v: i64) {
        let mut w = Writer::new();
        w.i64(v);
        batch.put(self.cf(CF_META), name.as_bytes(), &w.buf);
    }

    /// Loads a customer's record without the retained events.
    pub fn load_record(&self, customer: &str) -> Result<Option<CustomerState>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_CUSTOMERS), customer.as_bytes())?
        {
            Some(bytes) => Ok(Some(CustomerState::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Loads many customers' records (without events) in one batched read.
    pub fn load_records<'k>(
        &self,
        customers: impl IntoIterator<Item = &'k str>,
    ) -> Result<Vec<Option<CustomerState>>, StoreError> {
        self.db
            .batched_multi_get_cf(self.cf(CF_CUSTOMERS), customers, false)
            .into_iter()
            .map(|r| match r? {
                Some(bytes) => Ok(Some(CustomerState::decode(&bytes)?)),
                None => Ok(None),
            })
            .collect()
    }

    /// Loads a customer's record and retained events.
    pub fn load_customer(&self, customer: &str) -> Result<Option<CustomerState>, StoreError> {
        self.load_customer_with(customer, None, ReadOptions::default)
    }

    /// Loads a customer to be judged under `current` (the rules and the retention): the record with its stored window state when that was kept under these
    /// rules — one read, whatever the history holds — else the record and the retained
    /// events (`history_loaded`).
    pub fn load_customer_current(
        &self,
        customer: &str,
        current: Current<'_>,
    ) -> Result<Option<CustomerState>, StoreError> {
        self.load_customer_with(customer, Some(current), ReadOptions::default)
    }

    /// Like [`Store::load_customer_current`] for readers on other threads than the writer:
    /// the record, the events and the meta value `meta` (the clock) come from one snapshot,
    /// so they always belong to the same commit.
    pub fn load_customer_consistent(
        &self,
        customer: &str,
        meta: &str,
        current: Current<'_>,
    ) -> Result<(Option<CustomerState>, Option<Vec<u8>>), StoreError> {
        let snapshot = self.db.snapshot();
        let read_options = || {
            let mut opts = ReadOptions::default();
            opts.set_snapshot(&snapshot);
            opts
        };
        let meta = self
            .db
            .get_cf_opt(self.cf(CF_META), meta.as_bytes(), &read_options())?;
        Ok((
            self.load_customer_with(customer, Some(current), read_options)?,
            meta,
        ))
    }

    fn load_customer_with(
        &self,
        customer: &str,
        current: Option<Current<'_>>,
        read_options: impl Fn() -> ReadOptions,
    ) -> Result<Option<CustomerState>, StoreError> {
        let Some(bytes) =
            self.db
                .get_pinned_cf_opt(self.cf(CF_CUSTOMERS), customer.as_bytes(), &read_options())?
        else {
            return Ok(None);
        };
        let (mut state, windows) =
            CustomerState::decode_with_windows(&bytes, current.map(|c| (c.rules, c.retention_ms)))?;
        match (windows, current) {
            (StoredWindows::Attached, _) => return Ok(Some(state)),
            (StoredWindows::Chunked(header), Some(current)) => {
                // The header names every chunk to read: point reads of exactly those keys, in
                // one batched call, not an iterator over the customer's prefix — which opens
                // an iterator on every memtable and table, steps over the tombstones of chunks
                // the windows left, and reads on into the next customer's keys.
                let prefix = event_prefix(customer);
                let wanted: Vec<(usize, u64)> = header
                    .stored_chunks()
                    .iter()
                    .enumerate()
                    .filter_map(|(source, range)| range.map(|(lo, hi)| (source, lo, hi)))
                    .flat_map(|(source, lo, hi)| (lo..hi).map(move |chunk| (source, chunk)))
                    .collect();
                let keys: Vec<Vec<u8>> = wanted
                    .iter()
                    .map(|&(source, chunk)| window_key(&prefix, source, chunk))
                    .collect();
                // In key order: by source, then chunk, as `window_key` lays them out.
                let values =
                    self.db
                        .batched_multi_get_cf_opt(self.cf(CF_WINDOWS), &keys, true, &read_options());
                let mut chunks = Vec::with_capacity(wanted.len());
                for ((source, chunk), value) in wanted.into_iter().zip(values) {
                    // A chunk the header names and the store lacks: `from_chunks` says so.
                    if let Some(value) = value? {
                        chunks.push((source, chunk, value));
                    }
                }
                let windows = WindowSet::from_chunks(
                    &header,
                    current.rules,
                    chunks
                        .iter()
                        .map(|(source, chunk, value)| (*source, *chunk, &value[..])),
                )?;
                state.windows = Some(windows);
                return Ok(Some(state));
            }
            _ => {}
        }
        state.history.events = self
            .events_with(customer, read_options())?
            .into_iter()
            .map(|e| e.event)
            .collect();
        state.history_loaded = true;
        state.has_events |= !state.history.events.is_empty();
        Ok(Some(state))
    }

    /// A customer's retained events in `ts` order.
    pub fn customer_events(&self, customer: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.events_with(customer, ReadOptions::default())
    }

    fn events_with(&self, customer: &str, read_options: ReadOptions) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events = Vec::new();
        self.scan_events(customer, read_options, |ts, arrival, _, value| {
            events.push(decode_event(ts, arrival, value)?);
            Ok(())
        })?;
        Ok(events)
    }

    /// Calls `each` with the `ts`, arrival, key after the customer's prefix and value of
    /// each of the customer's retained events, in `ts` order.
    fn scan_events(
        &self,
        customer: &str,
        read_options: ReadOptions,
        mut each: impl FnMut(i64, u64, &[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let prefix = event_prefix(customer);
        let cutoff = self.history_cutoff();
        // Every event key of the customer is its prefix and 16 bytes: RocksDB stops at the
        // last one instead of reading on into the next customer's.
        let mut read_options = read_options;
        let mut upper = prefix.clone();
        upper.extend_from_slice(&[0xff; 17]);
        read_options.set_iterate_upper_bound(upper);
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_EVENTS),
            read_options,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let rest = &key[prefix.len()..];
            let (ts, arrival) = event_key_suffix(rest)?;
            if ts > cutoff {
                each(ts, arrival, rest, &value)?;
            }
        }
        Ok(())
    }

    /// A customer's retained events newest first, starting below `before` (a `(ts, arrival)`
    /// position, exclusive), at most `limit`.
    pub fn customer_events_newest_first(
        &self,
        customer: &str,
        before: Option<(i64, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let prefix = event_prefix(customer);
        let upper = match before {
            Some((ts, arrival)) => event_key(customer, ts, arrival),
            None => {
                let mut end = prefix.clone();
                end.extend_from_slice(&[0xff; 16]);
                end
            }
        };
        let cutoff = self.history_cutoff();
        let mut events = Vec::new();
        let iter = self
            .db
            .iterator_cf(self.cf(CF_EVENTS), IteratorMode::From(&upper, Direction::Reverse));
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(&prefix) || events.len() >= limit {
                break;
            }
            if *key == *upper {
                continue;
            }
            let rest = &key[prefix.len()..];
            if rest.len() != 16 {
                return Err(CodecError("bad event key").into());
            }
            let ts = from_sortable_i64(&rest[..8]);
            if ts <= cutoff {
                // Older ones are out of retention too.
                break;
            }
            let arrival = u64::from_be_bytes(rest[8..16].try_into().expect("8 bytes"));
            events.push(decode_event(ts, arrival, &value)?);
        }
        Ok(events)
    }

    /// Writes a customer's record, with their window state as built under `rules`: the
    /// header in the record, and the chunks of the queues that changed since they were
    /// last written (chunks no longer needed are deleted).
    pub fn put_customer(
        &self,
        batch: &mut impl Writes,
        customer: &str,
        state: &mut CustomerState,
        rules: &CompiledRules,
    ) {
        batch.put_with(self.cf(CF_CUSTOMERS), customer.as_bytes(), |w| {
            state.encode_into(Some(rules), w)
        });
        let plan = match &state.windows {
            Some(windows) => windows.plan(&state.window_chunks),
            None => WindowSet::default().plan(&state.window_chunks),
        };
        let prefix = event_prefix(customer);
        let cf = self.cf(CF_WINDOWS);
        for &(source, chunk) in &plan.deletes {
            batch.delete(cf, &window_key(&prefix, source, chunk));
        }
        if let Some(windows) = &mut state.windows {
            for &(source, chunk) in &plan.writes {
                batch.put_with(cf, &window_key(&prefix, source, chunk), |w| {
                    windows.encode_chunk(source, chunk, w)
                });
            }
            windows.mark_stored();
        }
        state.window_chunks = plan.stored;
    }

    /// Writes a retained event: its type, props and id; then, only when there are any, the
    /// customer it belongs to if not `customer` (`origin`) and the profile attributes it set.
    pub fn put_event(
        &self,
        batch: &mut impl Writes,
        customer: &str,
        event: &Event,
        event_id: Option<&str>,
        origin: Option<&str>,
        profile: &[rules::ProfileUpdate],
    ) {
        batch.put_with(
            self.cf(CF_EVENTS),
            &event_key(customer, event.ts, event.arrival),
            |w| write_event_value(w, event, event_id, origin, profile),
        );
    }

    /// Every pending timer, in due order.
    pub fn timers(&self) -> Result<Vec<(i64, Arc<str>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_TIMERS), IteratorMode::Start) {
            let (key, _) = item?;
            let (due, id) = decode_timer_key(&key)?;
            out.push((due, Arc::from(id)));
        }
        Ok(out)
    }

    /// The customers `keep` selects (by id), each with what a move to another store takes,
    /// read from one snapshot: the record, the retained events (their keys after the
    /// customer's prefix, and values) and the dedup entries of those events' ids.
    pub fn customers_with_history(
        &self,
        keep: impl Fn(&[u8]) -> bool,
        mut each: impl FnMut(CustomerExport<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let snapshot = self.db.snapshot();
        let opts = || {
            let mut o = ReadOptions::default();
            o.set_snapshot(&snapshot);
            o
        };
        let customers = self
            .db
            .iterator_cf_opt(self.cf(CF_CUSTOMERS), opts(), IteratorMode::Start);
        for item in customers {
            let (id, record) = item?;
            if !keep(&id) {
                continue;
            }
            let customer = std::str::from_utf8(&id).map_err(|_| CodecError("bad customer id"))?;
            let mut events = Vec::new();
            let mut dedup = Vec::new();
            self.scan_events(customer, opts(), |ts, arrival, rest, value| {
                if let Some(event_id) = decode_event(ts, arrival, value)?.event_id {
                    if let Some(applied) =
                        self.db
                            .get_cf_opt(self.cf(CF_DEDUP), event_id.as_bytes(), &opts())?
                    {
                        dedup.push((event_id, applied));
                    }
                }
                events.push((rest.to_vec(), value.to_vec()));
                Ok(())
            })?;
            each(CustomerExport {
                id: customer,
                record: &record,
                events,
                dedup,
            })?;
        }
        Ok(())
    }

    /// Puts an imported customer's events (keys after the customer's prefix, as
    /// [`Store::customers_with_history`] gives them); returns the greatest arrival number.
    pub fn put_imported_events(
        &self,
        batch: &mut impl Writes,
        customer: &str,
        events: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        let prefix = event_prefix(customer);
        let mut max_arrival = 0;
        for (rest, value) in events {
            let (ts, arrival) = event_key_suffix(rest)?;
            decode_event(ts, arrival, value)?;
            max_arrival = max_arrival.max(arrival);
            let mut key = prefix.clone();
            key.extend_from_slice(rest);
            batch.put(self.cf(CF_EVENTS), &key, value);
        }
        Ok(max_arrival)
    }

    /// Deletes one retained event of `customer` (it moved to another customer).
    pub fn delete_event(&self, batch: &mut impl Writes, customer: &str, ts: i64, arrival: u64) {
        batch.delete(self.cf(CF_EVENTS), &event_key(customer, ts, arrival));
    }

    /// Deletes a customer absorbed by a merge, key by key (so the deletes follow, in the
    /// same batch, the puts of the round that wrote them): the record, the `events` of their
    /// history the caller moved, and the window chunks the record names. The timer is the
    /// caller's (it unschedules it).
    pub fn forget_customer(&self, batch: &mut impl Writes, customer: &str, state: &CustomerState) {
        batch.delete(self.cf(CF_CUSTOMERS), customer.as_bytes());
        for event in &state.history.events {
            batch.delete(self.cf(CF_EVENTS), &event_key(customer, event.ts, event.arrival));
        }
        let prefix = event_prefix(customer);
        let plan = WindowSet::default().plan(&state.window_chunks);
        for &(source, chunk) in &plan.deletes {
            batch.delete(self.cf(CF_WINDOWS), &window_key(&prefix, source, chunk));
        }
    }

    /// Deletes everything a customer holds: the record, the events, the window chunks and
    /// the timer `timer`.
    /// Deletes the dedup entries of `customer`'s retained events (a partition leaving the
    /// store: were they kept, the partition's events consumed again here after a restore
    /// would be dropped as duplicates of what this store no longer holds); returns how many.
    pub fn delete_dedup_of(&self, batch: &mut WriteBatch, customer: &str) -> Result<u64, StoreError> {
        let mut deleted = 0;
        self.scan_events(customer, ReadOptions::default(), |ts, arrival, _, value| {
            if let Some(event_id) = decode_event(ts, arrival, value)?.event_id {
                batch.delete_cf(self.cf(CF_DEDUP), event_id.as_bytes());
                deleted += 1;
            }
            Ok(())
        })?;
        Ok(deleted)
    }

    pub fn delete_customer(&self, batch: &mut WriteBatch, customer: &str, timer: Option<i64>) {
        batch.delete_cf(self.cf(CF_CUSTOMERS), customer.as_bytes());
        let prefix = event_prefix(customer);
        let mut end = prefix.clone();
        end.extend_from_slice(&[0xff; 24]);
        batch.delete_range_cf(self.cf(CF_EVENTS), &prefix, &end);
        batch.delete_range_cf(self.cf(CF_WINDOWS), &prefix, &end);
        if let Some(due) = timer {
            batch.delete_cf(self.cf(CF_TIMERS), timer_key(due, customer));
        }
    }

    /// Keys and values of a column family from `start`, in key order.
    pub fn scan_from<'s>(
        &'s self,
        cf: &str,
        start: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, StoreError>> + 's {
        self.db
            .iterator_cf(self.cf(cf), IteratorMode::From(start, Direction::Forward))
            .map(|r| r.map_err(StoreError::from))
    }

    /// Keys and values of a column family from the last key at or before `start`, in
    /// reverse key order.
    pub fn scan_back_from<'s>(
        &'s self,
        cf: &str,
        start: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, StoreError>> + 's {
        self.db
            .iterator_cf(self.cf(cf), IteratorMode::From(start, Direction::Reverse))
            .map(|r| r.map_err(StoreError::from))
    }

    /// Keys and values of a column family, newest (largest key) first.
    pub fn scan_reverse<'s>(&'s self, cf: &str) -> impl Iterator<Item = Result<KeyValue, StoreError>> + 's {
        self.db
            .iterator_cf(self.cf(cf), IteratorMode::End)
            .map(|r| r.map_err(StoreError::from))
    }

    /// Live SST bytes of each column family (after a flush, everything on disk).
    pub fn cf_sizes(&self) -> Vec<(&'static str, u64)> {
        ALL_CFS
            .iter()
            .map(|cf| (*cf, self.int_property(cf, "rocksdb.total-sst-files-size")))
            .collect()
    }

    /// An integer RocksDB property of one column family (0 when RocksDB has none).
    fn int_property(&self, cf: &str, name: &str) -> u64 {
        self.db
            .property_int_value_cf(self.cf(cf), name)
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// An integer RocksDB property summed over every column family.
    fn int_property_sum(&self, name: &str) -> u64 {
        ALL_CFS.iter().map(|cf| self.int_property(cf, name)).sum()
    }

    /// Bytes compaction still has to rewrite to bring every level under its target: the
    /// backlog that grows when writes outpace compaction (and ends in write stalls).
    pub fn pending_compaction_bytes(&self) -> u64 {
        self.int_property_sum("rocksdb.estimate-pending-compaction-bytes")
    }

    /// Compactions running now, over every column family.
    pub fn running_compactions(&self) -> u64 {
        // A DB-wide property: reading it through any one column family gives the total.
        self.int_property(ALL_CFS[0], "rocksdb.num-running-compactions")
    }

    /// Bytes in memtables (active and immutable, not yet flushed), over every column family.
    pub fn memtable_bytes(&self) -> u64 {
        self.int_property_sum("rocksdb.cur-size-all-mem-tables")
    }

    /// Bytes RocksDB's table readers hold outside the block cache (the bloom filters and
    /// indexes of `customers` and `dedup` are kept there on purpose), over every column
    /// family: grows with the keys kept on disk.
    pub fn table_readers_bytes(&self) -> u64 {
        self.int_property_sum("rocksdb.estimate-table-readers-mem")
    }

    /// Bytes in the block cache (one cache shared by every column family).
    pub fn block_cache_bytes(&self) -> u64 {
        self.int_property(CF_META, "rocksdb.block-cache-usage")
    }

    /// RocksDB's estimate of the number of keys in a column family (cheap).
    pub fn estimate_keys(&self, cf: &str) -> u64 {
        self.db
            .property_int_value_cf(self.cf(cf), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Counts the keys of a column family by scanning it.
    pub fn count_keys(&self, cf: &str) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Free and total bytes of the file system the store lives on (`None` if unknown).
    pub fn disk_space(&self) -> Option<(u64, u64)> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.db.path().as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs writes into the zeroed struct it is given; the path is a valid C string.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return None;
        }
        let block = stat.f_frsize as u64;
        Some((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
    }

    pub fn approximate_size(&self) -> u64 {
        self.cf_sizes().iter().map(|(_, bytes)| bytes).sum()
    }

    /// A consistent copy of every column family in `dir` (which must not exist), as of the
    /// last commit: RocksDB's checkpoint (memtables flushed; files hard-linked when `dir` is on
    /// the same file system, copied otherwise).
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(dir)?;
        Ok(())
    }

    /// Every key of column family `cf` starting with `prefix`, with its value.
    pub fn scan_prefix(&self, cf: &str, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        for item in self.scan_from(cf, prefix) {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key, value));
        }
        Ok(out)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in ALL_CFS {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }
}

/// A retained event's value in the `events` column family (its `ts` and arrival are in the
/// key), as [`decode_event`] reads it back; handover frames carry events the same way.
pub(crate) fn write_event_value(
    w: &mut Writer,
    event: &Event,
    event_id: Option<&str>,
    origin: Option<&str>,
    profile: &[rules::ProfileUpdate],
) {
    w.str(&event.event_type);
    w.props(&event.props);
    match event_id {
        None => w.u8(0),
        Some(id) => {
            w.u8(1);
            w.str(id);
        }
    }
    if origin.is_none() && profile.is_empty() {
        return;
    }
    match origin {
        None => w.u8(0),
        Some(o) => {
            w.u8(1);
            w.str(o);
        }
    }
    write_profile_updates(w, profile);
}

/// The profile attributes an event set (`None`: deleted).
fn write_profile_updates(w: &mut Writer, profile: &[rules::ProfileUpdate]) {
    w.u64(profile.len() as u64);
    for (name, value) in profile {
        w.str(name);
        match value {
            None => w.u8(0),
            Some(v) => {
                w.u8(1);
                w.value(v);
            }
        }
    }
}

/// Reads what [`write_profile_updates`] wrote.
fn read_profile_updates(r: &mut Reader) -> Result<Vec<rules::ProfileUpdate>, CodecError> {
    let n = r.u64()? as usize;
    let mut profile = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        let name = r.arc_str()?;
        let value = match r.u8()? {
            0 => None,
            _ => Some(r.value()?),
        };
        profile.push((name, value));
    }
    Ok(profile)
}

/// An event of the `events` column family from its key's `ts` and arrival and its value.
pub(crate) fn decode_event(ts: i64, arrival: u64, value: &[u8]) -> Result<StoredEvent, CodecError> {
    let mut r = Reader::new(value);
    let event_type = r.arc_str()?;
    let props: Props = r.props()?;
    let event_id = match r.u8()? {
        0 => None,
        _ => Some(r.str()?.to_owned()),
    };
    let (mut origin, mut profile) = (None, Vec::new());
    if !r.is_empty() {
        if r.u8()? != 0 {
            origin = Some(r.str()?.to_owned());
        }
        profile = read_profile_updates(&mut r)?;
    }
    Ok(StoredEvent {
        event: Event {
            event_type,
            ts,
            arrival,
            props,
        },
        event_id,
        origin,
        profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::Value;

    #[test]
    fn sortable_i64_sorts_like_the_number() {
        let values = [i64::MIN, -5, -1, 0, 1, 946_684_800_000, i64::MAX];
        for pair in values.windows(2) {
            assert!(sortable_i64(pair[0]) < sortable_i64(pair[1]));
            assert_eq!(from_sortable_i64(&sortable_i64(pair[0])), pair[0]);
        }
    }

    const RETENTION: Retention = Retention {
        dedup_horizon_ms: 1_000,
        history_ms: 10_000,
        block_cache_bytes: 1 << 20,
        memtable_bytes: 8 << 20,
    };

    #[test]
    fn compaction_drops_dedup_keys_past_the_horizon_and_events_past_retention() {
        let dir = ::tests::TempDir::new("store-retention");
        let store = Store::open(dir.path(), false, RETENTION).unwrap();
        let mut batch = WriteBatch::default();
        for (id, applied_at) in [("old", 100), ("edge", 1_000), ("new", 1_900)] {
            let mut w = Writer::new();
            w.i64(applied_at);
            batch.put_cf(store.cf(CF_DEDUP), id, w.buf);
        }
        let ev = |ts| Event {
            event_type: "view".into(),
            ts,
            arrival: ts as u64,
            props: Props::default(),
        };
        for ts in [-8_500, -8_000, -7_999, 5_000] {
            store.put_event(&mut batch, "c1", &ev(ts), None, None, &[]);
        }
        store.commit(batch).unwrap();
        store.set_clock(2_000);
        store.flush().unwrap();
        store.compact(CF_DEDUP);
        store.compact(CF_EVENTS);
        let kept: Vec<_> = ["old", "edge", "new"]
            .into_iter()
            .filter(|id| store.get(CF_DEDUP, id.as_bytes()).unwrap().is_some())
            .collect();
        assert_eq!(kept, ["edge", "new"]);
        let ts: Vec<i64> = store
            .customer_events("c1")
            .unwrap()
            .iter()
            .map(|e| e.event.ts)
            .collect();
        assert_eq!(
            ts,
            [-7_999, 5_000],
            "events at or before clock - retention are dropped"
        );
    }

    /// A customer's window state goes to the store as a header in the record and chunks
    /// beside it, and comes back equal without reading the history (also for `ab`, whose id
    /// prefixes `abc`'s); a record of version 3, its windows inline, still loads, and its
    /// next write moves them into chunks.
    #[test]
    fn window_state_round_trips_in_chunks_and_version_3_records_still_load() {
        let rules =
            CompiledRules::compile("trait n = count(view, 5000ms)\ntrait d = distinct(view.page, 5000ms)")
                .unwrap();
        let current = Current {
            rules: &rules,
            retention_ms: 10_000,
        };
        let dir = ::tests::TempDir::new("store-windows");
        let store = Store::open(dir.path(), false, RETENTION).unwrap();
        let events: Vec<Event> = (0..300)
            .map(|i| Event {
                event_type: "view".into(),
                ts: i * 10,
                arrival: i as u64,
                props: Props::from_json(
                    serde_json::json!({ "page": format!("p{}", i % 7) })
                        .as_object()
                        .unwrap(),
                ),
            })
            .collect();
        let state_of = |n: usize| CustomerState {
            windows: Some(WindowSet::build(&rules, 10_000, 3_000, &events[..n], |_| None)),
            has_events: true,
            ..Default::default()
        };
        let values = |state: &CustomerState| {
            let w = state.windows.as_ref().expect("windows loaded with the record");
            (w.value(&rules, 0), w.value(&rules, 1))
        };
        for (customer, n) in [("ab", 300), ("abc", 5)] {
            let mut batch = WriteBatch::default();
            store.put_customer(&mut batch, customer, &mut state_of(n), &rules);
            store.commit(batch).unwrap();
        }
        let load = |customer: &str| store.load_customer_current(customer, current).unwrap().unwrap();
        let ab = load("ab");
        assert!(!ab.history_loaded, "no scan of the history");
        assert_eq!(values(&ab), (Value::num(300), Value::num(7)));
        assert_eq!(values(&load("abc")), (Value::num(5), Value::num(5)));
        let chunks = |events: u64| events.div_ceil(crate::window::CHUNK_EVENTS) as usize;
        assert_eq!(
            store.scan_from(CF_WINDOWS, &[]).count(),
            chunks(300) + chunks(5),
            "300 events in their chunks, 5 in one"
        );

        // A version 3 record: the same fields, the windows inline after the flag 1.
        let old = state_of(40);
        let mut v3 = old.encode(None);
        v3[0] = 3;
        *v3.last_mut().unwrap() = 1;
        let mut inline = Writer::new();
        old.windows.as_ref().unwrap().encode_inline(&rules, &mut inline);
        v3.extend_from_slice(&inline.buf);
        store.put_now(CF_CUSTOMERS, b"old", &v3).unwrap();
        let mut loaded = load("old");
        assert!(!loaded.history_loaded);
        assert_eq!(values(&loaded), (Value::num(40), Value::num(7)));
        let mut batch = WriteBatch::default();
        store.put_customer(&mut batch, "old", &mut loaded, &rules);
        store.commit(batch).unwrap();
        assert_eq!(
            store.get(CF_CUSTOMERS, b"old").unwrap().unwrap()[0],
            4,
            "written as version 4"
        );
        assert_eq!(values(&load("old")), (Value::num(40), Value::num(7)));
        assert_eq!(
            store.scan_from(CF_WINDOWS, &[]).count(),
            chunks(300) + chunks(5) + chunks(40)
        );
    }

    /// A record whose window header is of the kind written before headers named their chunk
    /// size (chunks of 128 positions) is not read in today's chunks: the windows are built
    /// again from the history, exactly, and the next write replaces every old chunk — none is
    /// left behind, none of today's is missing.
    #[test]
    fn windows_kept_in_chunks_of_another_size_are_built_again_and_their_chunks_replaced() {
        use crate::window::{WindowHeader, CHUNK_EVENTS, LEGACY_CHUNK_EVENTS};
        let rules = CompiledRules::compile("trait n = count(view, 5000ms)").unwrap();
        let current = Current {
            rules: &rules,
            retention_ms: 10_000,
        };
        let dir = ::tests::TempDir::new("store-legacy-chunks");
        let store = Store::open(dir.path(), false, RETENTION).unwrap();
        // 3,000 events, 10 ms apart; at 30,000 ms the window holds those after 25,000 ms, 499
        // of them at positions 2,501..3,000 of the queue: legacy chunks 19..24, past the
        // chunks the rebuilt queue (from position 0) is written in, so they must be deleted.
        let events: Vec<Event> = (0..3000)
            .map(|i| Event {
                event_type: "view".into(),
                ts: i * 10,
                arrival: i as u64,
                props: Props::default(),
            })
            .collect();
        let mut batch = WriteBatch::default();
        for e in &events {
            store.put_event(&mut batch, "c", e, None, None, &[]);
        }
        let mut windows = WindowSet::build(&rules, 10_000, 0, &[], |_| None);
        for e in &events {
            windows.advance(&rules, e.ts);
            windows.insert(&rules, e, |_| None);
        }
        windows.advance(&rules, 30_000);
        assert_eq!(windows.value(&rules, 0), Value::num(499));
        // The record as such a store kept it: the legacy tag (2) and a header without its
        // size, and chunks of 128 positions under the customer's prefix.
        let state = CustomerState {
            windows: Some(windows),
            has_events: true,
            ..Default::default()
        };
        let mut record = state.encode(Some(&rules));
        let mut header = Writer::new();
        state.windows.as_ref().unwrap().encode_header(&rules, &mut header);
        let tag = record.len() - header.buf.len() - 1;
        assert_eq!(record[tag], 3, "today's tag: a header with its chunk size");
        record[tag] = 2;
        let mut size = Writer::new();
        size.u64(CHUNK_EVENTS);
        assert_eq!(record[tag + 1..tag + 1 + size.buf.len()], size.buf[..]);
        record.drain(tag + 1..tag + 1 + size.buf.len());
        assert_eq!(
            WindowHeader::decode_legacy(&mut Reader::new(&record[tag + 1..])).unwrap(),
            WindowHeader::decode(&mut Reader::new(&header.buf))
                .unwrap()
                .with_chunk_events(LEGACY_CHUNK_EVENTS),
            "the legacy record holds the same header, of chunks of 128"
        );
        batch.put_cf(store.cf(CF_CUSTOMERS), b"c", &record);
        let legacy: Vec<u64> = (2501 / LEGACY_CHUNK_EVENTS..3000_u64.div_ceil(LEGACY_CHUNK_EVENTS)).collect();
        for &chunk in &legacy {
            batch.put_cf(
                store.cf(CF_WINDOWS),
                window_key(&event_prefix("c"), 0, chunk),
                b"legacy",
            );
        }
        store.commit(batch).unwrap();

        let mut loaded = store.load_customer_current("c", current).unwrap().unwrap();
        assert!(loaded.history_loaded, "chunks of another size are not read");
        assert!(loaded.windows.is_none());
        loaded.advance_windows(&rules, 30_000, 10_000);
        assert_eq!(loaded.windows.as_ref().unwrap().value(&rules, 0), Value::num(499));
        let mut batch = WriteBatch::default();
        store.put_customer(&mut batch, "c", &mut loaded, &rules);
        store.commit(batch).unwrap();

        let stored: Vec<Box<[u8]>> = store
            .scan_prefix(CF_WINDOWS, &event_prefix("c"))
            .unwrap()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let again = store.load_customer_current("c", current).unwrap().unwrap();
        assert!(!again.history_loaded, "read back from today's chunks");
        assert_eq!(again.windows.as_ref().unwrap().value(&rules, 0), Value::num(499));
        let named: Vec<Box<[u8]>> = again
            .window_chunks
            .iter()
            .enumerate()
            .filter_map(|(source, range)| range.map(|(lo, hi)| (source, lo, hi)))
            .flat_map(|(source, lo, hi)| {
                (lo..hi).map(move |chunk| window_key(&event_prefix("c"), source, chunk).into())
            })
            .collect();
        assert_eq!(
            stored, named,
            "the store holds exactly the chunks the header names"
        );
        let least = 499_u64.div_ceil(CHUNK_EVENTS) as usize;
        assert!(
            (least..=least + 1).contains(&stored.len()),
            "499 positions in chunks of {CHUNK_EVENTS}: {} chunks",
            stored.len()
        );
        let legacy_values = store
            .scan_prefix(CF_WINDOWS, &event_prefix("c"))
            .unwrap()
            .into_iter()
            .filter(|(_, value)| &value[..] == b"legacy")
            .count();
        assert_eq!(legacy_values, 0, "every legacy chunk rewritten or deleted");
    }

    #[test]
    fn events_of_one_customer_stay_apart_from_a_longer_id_sharing_its_prefix() {
        let dir = ::tests::TempDir::new("store");
        let store = Store::open(dir.path(), false, RETENTION).unwrap();
        let mut batch = WriteBatch::default();
        let ev = |ts, arrival| Event {
            event_type: "view".into(),
            ts,
            arrival,
            props: Props::default(),
        };
        let city = [
            (Arc::<str>::from("city"), Some(Value::str("杭州"))),
            (Arc::from("vip"), None),
        ];
        store.put_event(&mut batch, "ab", &ev(20, 1), Some("e1"), None, &[]);
        store.put_event(&mut batch, "ab", &ev(10, 2), None, Some("b"), &city);
        store.put_event(&mut batch, "abc", &ev(5, 3), None, None, &[]);
        store.commit(batch).unwrap();
        let events = store.customer_events("ab").unwrap();
        assert_eq!(events.iter().map(|e| e.event.ts).collect::<Vec<_>>(), [10, 20]);
        assert_eq!(events[1].event_id.as_deref(), Some("e1"));
        // What a merge keeps with an event reads back; an event without it reads as before.
        assert_eq!(
            (events[0].origin.as_deref(), &events[0].profile[..]),
            (Some("b"), &city[..])
        );
        assert_eq!((events[1].origin.as_deref(), events[1].profile.len()), (None, 0));
        assert_eq!(store.customer_events("abc").unwrap().len(), 1);
    }
}
