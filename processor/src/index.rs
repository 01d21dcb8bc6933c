//! The membership index: every tag's and segment's members as a compressed (roaring) bitmap
//! over dense customer numbers, kept current from the changes as the engine commits them.
//!
//! Each customer gets the next number the first time the engine sees them; the number is
//! kept in the customer's record, in the `numbers` column family (number → id) and in every
//! stored change, all in the engine's atomic commit. The index itself lives in memory:
//!
//! - an id table, number → customer id, in chunks of 65,536 ids (one byte buffer and one
//!   offset array each: 4 bytes per customer plus the id's bytes);
//! - one bitmap per tag or segment name.
//!
//! [`MembershipIndex::checkpoint`] writes the bitmaps changed since the last checkpoint, the
//! id chunks that filled up since, and the `seq` of the last change they reflect to the
//! `index` column family. At open, [`MembershipIndex::open`] loads the checkpoint and replays
//! the change log after its `seq`, so a restart costs reading the bitmaps, not a scan of
//! every customer. A store without a checkpoint (new, or written before numbers existed) is
//! indexed by one scan of the customer records, numbering customers who have no number yet.
//!
//! The index also holds the profile attributes as columns ([`crate::columns`]), checkpointed
//! alongside and caught up at open from the profile journal the engine writes with each
//! commit that changes a profile.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use roaring::RoaringBitmap;
use rocksdb::WriteBatch;

use rules::Value;

use crate::change::{Change, Op};
use crate::codec::{CodecError, Reader, Writer};
use crate::columns::{self, ColumnsDirty, ProfileColumns, TraitCache};
use crate::state::CustomerState;
use crate::store::{KeyValue, Store, StoreError, CF_CHANGES, CF_CUSTOMERS, CF_INDEX, CF_NUMBERS};

/// The number of a customer not numbered yet (records from before the index existed).
pub const NO_NUMBER: u32 = u32::MAX;

/// Ids per chunk of the id table; a full chunk never changes again.
const CHUNK: u32 = 1 << 16;

const KEY_SEQ: &[u8] = b"seq";
const KEY_IDS: &[u8] = b"ids:";
const KEY_SET: &[u8] = b"set:";
const KEY_ACTIVITY: &[u8] = b"activity:";

/// Hours of enters and exits kept per tag or segment, counted back from the newest hour any
/// change of it fell in.
pub const ACTIVITY_HOURS: i64 = 7 * 24;
const HOUR_MS: i64 = 3_600_000;

/// How many customers entered and left one tag or segment, per hour of the changes' `at`
/// (the event clock's or the wall clock's instant), for the last [`ACTIVITY_HOURS`] hours.
/// Counted as the index applies changes, so it is exact and checkpointed with the index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Activity {
    /// Hour start (ms) → (entered, left), oldest first.
    hours: std::collections::BTreeMap<i64, (u64, u64)>,
}

impl Activity {
    fn count(&mut self, change: &Change) {
        let hour = change.at.div_euclid(HOUR_MS) * HOUR_MS;
        let newest = self.hours.last_key_value().map_or(hour, |(h, _)| (*h).max(hour));
        if hour <= newest - ACTIVITY_HOURS * HOUR_MS {
            return; // older than what is kept (a late change under the event clock)
        }
        let counts = self.hours.entry(hour).or_default();
        match change.op {
            Op::Add => counts.0 += 1,
            _ => counts.1 += 1,
        }
        while let Some((&oldest, _)) = self.hours.first_key_value() {
            if oldest > newest - ACTIVITY_HOURS * HOUR_MS {
                break;
            }
            self.hours.pop_first();
        }
    }

    /// `(hour start in ms, entered, left)` for every hour with a change, oldest first.
    pub fn hours(&self) -> impl Iterator<Item = (i64, u64, u64)> + '_ {
        self.hours.iter().map(|(h, (e, l))| (*h, *e, *l))
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.hours.len() as u64);
        for (hour, (entered, left)) in &self.hours {
            w.i64(*hour);
            w.u64(*entered);
            w.u64(*left);
        }
        w.buf
    }

    fn decode(bytes: &[u8]) -> Result<Activity, CodecError> {
        let mut r = Reader::new(bytes);
        let n = r.len()?;
        let mut hours = std::collections::BTreeMap::new();
        for _ in 0..n {
            hours.insert(r.i64()?, (r.u64()?, r.u64()?));
        }
        Ok(Activity { hours })
    }
}

/// The `numbers` column family's key of a customer number.
pub fn number_key(number: u32) -> [u8; 4] {
    number.to_be_bytes()
}

/// Customer ids by number, append-only.
#[derive(Debug, Default)]
pub struct IdTable {
    chunks: Vec<IdChunk>,
}

#[derive(Debug, Default)]
struct IdChunk {
    bytes: String,
    /// End offset in `bytes` of each id.
    ends: Vec<u32>,
}

impl IdChunk {
    fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.bytes.get(start..end)
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.ends.len() as u64);
        for e in &self.ends {
            w.u64(u64::from(*e));
        }
        w.str(&self.bytes);
        w.buf
    }

    fn decode(bytes: &[u8]) -> Result<IdChunk, CodecError> {
        let mut r = Reader::new(bytes);
        let n = r.len()?;
        let mut ends = Vec::with_capacity(n.min(CHUNK as usize));
        for _ in 0..n {
            ends.push(u32::try_from(r.u64()?).map_err(|_| CodecError("bad id chunk"))?);
        }
        let bytes = r.str()?.to_owned();
        if ends.windows(2).any(|w| w[0] > w[1]) || ends.last().is_some_and(|e| *e as usize > bytes.len()) {
            return Err(CodecError("bad id chunk"));
        }
        Ok(IdChunk { bytes, ends })
    }
}

impl IdTable {
    /// Customers numbered so far (the next number).
    pub fn len(&self) -> u32 {
        match self.chunks.last() {
            None => 0,
            Some(last) => (self.chunks.len() as u32 - 1) * CHUNK + last.ends.len() as u32,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends an id and returns its number.
    pub fn push(&mut self, id: &str) -> u32 {
        let number = self.len();
        if self.chunks.last().is_none_or(|c| c.ends.len() as u32 == CHUNK) {
            self.chunks.push(IdChunk::default());
        }
        let chunk = self.chunks.last_mut().expect("just ensured");
        chunk.bytes.push_str(id);
        chunk.ends.push(chunk.bytes.len() as u32);
        if chunk.ends.len() as u32 == CHUNK {
            // Full chunks never grow again: give back what doubling reserved.
            chunk.bytes.shrink_to_fit();
            chunk.ends.shrink_to_fit();
        }
        number
    }

    pub fn get(&self, number: u32) -> Option<&str> {
        self.chunks
            .get((number / CHUNK) as usize)?
            .get((number % CHUNK) as usize)
    }

    /// Bytes held: the ids and their offsets.
    pub fn heap_bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| c.bytes.capacity() + c.ends.capacity() * 4)
            .sum()
    }

    fn full_chunks(&self) -> usize {
        self.chunks
            .iter()
            .take_while(|c| c.ends.len() as u32 == CHUNK)
            .count()
    }
}

/// The index's contents; read through [`MembershipIndex::read`].
#[derive(Debug, Default)]
pub struct IndexState {
    ids: IdTable,
    sets: HashMap<Arc<str>, RoaringBitmap>,
    /// Enters and exits per hour of each tag and segment.
    activity: HashMap<Arc<str>, Activity>,
    /// The `seq` of the last change applied.
    applied_seq: u64,
    columns: ProfileColumns,
    /// The last profile journal entry applied to `columns`.
    journal_applied: u64,
    /// Per customer number, bumped by every commit that touches the customer (for the
    /// trait cache; not checkpointed).
    generations: Vec<u32>,
}

impl IndexState {
    /// Indexes one customer record (`key`, `value`): a number for one that has none (the
    /// record rewritten with it into `wb`), its memberships (their sets named in `dirty`),
    /// its profile columns. Returns whether it was numbered.
    fn index_record(
        &mut self,
        store: &Store,
        (key, value): (&[u8], &[u8]),
        wb: &mut WriteBatch,
        dirty: &mut HashSet<Arc<str>>,
        columns_dirty: &mut ColumnsDirty,
    ) -> Result<bool, StoreError> {
        let mut record = CustomerState::decode(value)?;
        let numbered = record.number == NO_NUMBER;
        if numbered {
            let id = std::str::from_utf8(key).map_err(|_| CodecError("bad customer id"))?;
            record.number = self.ids.push(id);
            wb.put_cf(store.cf(CF_NUMBERS), number_key(record.number), id.as_bytes());
            wb.put_cf(store.cf(CF_CUSTOMERS), key, record.encode(None));
        }
        for name in record.members.keys() {
            self.sets.entry(name.clone()).or_default().insert(record.number);
            if !dirty.contains(name) {
                dirty.insert(name.clone());
            }
        }
        for (attr, entry) in &record.history.profile {
            self.columns
                .set(record.number, attr, entry.value.as_ref(), columns_dirty);
        }
        Ok(numbered)
    }
}

/// A profile value one commit set (`None`: deleted), for the columns.
pub type ProfileUpdate = (u32, Arc<str>, Option<Value>);

/// What one engine commit brings the index.
#[derive(Debug, Default, Clone, Copy)]
pub struct IndexCommit<'a> {
    /// Customers numbered in the commit, in number order.
    pub new_ids: &'a [(u32, Arc<str>)],
    pub changes: &'a [Change],
    /// The customer number of each change.
    pub numbers: &'a [u32],
    pub profiles: &'a [ProfileUpdate],
    /// The profile journal entry the commit wrote.
    pub journal: Option<u64>,
    /// Every customer the commit wrote.
    pub touched: &'a [u32],
}

impl IndexState {
    /// The members of a tag or segment; `None` for a name that never had one.
    pub fn set(&self, name: &str) -> Option<&RoaringBitmap> {
        self.sets.get(name)
    }

    /// The id of a customer number.
    pub fn id(&self, number: u32) -> Option<&str> {
        self.ids.get(number)
    }

    /// Every customer number: `0..customers()`.
    pub fn customers(&self) -> u32 {
        self.ids.len()
    }

    /// Every numbered customer, as a bitmap.
    pub fn all(&self) -> RoaringBitmap {
        let mut all = RoaringBitmap::new();
        all.insert_range(0..self.ids.len());
        all
    }

    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    /// The profile attributes as columns.
    pub fn columns(&self) -> &ProfileColumns {
        &self.columns
    }

    /// How many commits have touched customer `number` since the index was opened.
    pub fn generation(&self, number: u32) -> u32 {
        self.generations.get(number as usize).copied().unwrap_or(0)
    }

    /// Names with at least one member.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.sets.iter().filter(|(_, s)| !s.is_empty()).map(|(n, _)| n)
    }

    /// Bytes of the id table and of the bitmaps (serialized size, close to their memory).
    pub fn memory(&self) -> IndexMemory {
        IndexMemory {
            customers: self.ids.len() as u64,
            id_bytes: self.ids.heap_bytes() as u64,
            bitmap_bytes: self.sets.values().map(|s| s.serialized_size() as u64).sum(),
            sets: self.sets.values().filter(|s| !s.is_empty()).count() as u64,
            column_bytes: self.columns.heap_bytes() as u64,
        }
    }

    /// Copies the ids of `numbers` into one buffer, so they can be used without the lock.
    pub fn ids_of(&self, numbers: impl IntoIterator<Item = u32>) -> IdPage {
        let mut page = IdPage::default();
        for n in numbers {
            if let Some(id) = self.ids.get(n) {
                page.push(n, id);
            }
        }
        page
    }

    /// Enters and exits per hour of `name` (`None`: no change of it applied or kept).
    pub fn activity(&self, name: &str) -> Option<&Activity> {
        self.activity.get(name)
    }

    fn apply(&mut self, number: u32, change: &Change) {
        let set = match change.op {
            Op::Merge | Op::Unmerge => return,
            _ => self.sets.entry(change.name.clone()).or_default(),
        };
        match change.op {
            Op::Add => set.insert(number),
            _ => set.remove(number),
        };
        match self.activity.get_mut(&change.name) {
            Some(activity) => activity.count(change),
            None => self
                .activity
                .entry(change.name.clone())
                .or_default()
                .count(change),
        }
    }
}

/// The index's size, for metrics and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IndexMemory {
    pub customers: u64,
    pub id_bytes: u64,
    pub bitmap_bytes: u64,
    pub sets: u64,
    /// The profile columns.
    pub column_bytes: u64,
}

/// Customer ids copied out of the index, with their numbers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IdPage {
    bytes: String,
    ends: Vec<usize>,
    numbers: Vec<u32>,
}

impl IdPage {
    /// A page of the given customers (numbers and ids), as [`ReadHandle::ids_of`] would
    /// copy them out of the index.
    ///
    /// [`ReadHandle::ids_of`]: crate::ReadHandle::ids_of
    pub fn from_ids<'a>(ids: impl IntoIterator<Item = (u32, &'a str)>) -> IdPage {
        let mut page = IdPage::default();
        ids.into_iter().for_each(|(number, id)| page.push(number, id));
        page
    }

    fn push(&mut self, number: u32, id: &str) {
        self.bytes.push_str(id);
        self.ends.push(self.bytes.len());
        self.numbers.push(number);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    pub fn numbers(&self) -> &[u32] {
        &self.numbers
    }

    /// Every id of the page, one after the other (an Arrow column's values as they are).
    pub fn text(&self) -> &str {
        &self.bytes
    }

    /// Where each id ends in [`IdPage::text`].
    pub fn ends(&self) -> &[usize] {
        &self.ends
    }

    /// [`IdPage::text`] and [`IdPage::ends`], taken: an Arrow column is made of them
    /// without a copy.
    pub fn into_text(self) -> (String, Vec<usize>) {
        (self.bytes, self.ends)
    }
}

/// What a checkpoint wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub sets_written: usize,
    pub chunks_written: usize,
    pub bytes: usize,
    pub column_chunks_written: usize,
}

/// The membership index, shared by the engine (the only writer) and readers.
#[derive(Debug, Default)]
pub struct MembershipIndex {
    state: RwLock<IndexState>,
    /// Sets changed since the last checkpoint. Changed only under `state`'s write lock or
    /// taken under its read lock, so a checkpoint's sets and `seq` agree.
    dirty: Mutex<HashSet<Arc<str>>>,
    /// Full id chunks already in the checkpoint.
    saved_chunks: Mutex<usize>,
    /// Column chunks and dictionaries changed since the last checkpoint, under the same
    /// rules as `dirty`.
    columns_dirty: Mutex<ColumnsDirty>,
    traits: RwLock<TraitCache>,
}

/// How many attributes and traits the index keeps as columns.
#[derive(Debug, Clone, Copy)]
pub struct ColumnLimits {
    pub profile_attributes: usize,
    pub traits: usize,
}

impl MembershipIndex {
    /// Makes the next open rebuild the index from the customer records. Written in the batch
    /// that changes customers behind the change log's back (a partition imported or
    /// dropped), so a crash before [`MembershipIndex::rebuild_in_place`] checkpoints again
    /// cannot leave an index that misses them.
    pub fn forget_checkpoint(store: &Store, batch: &mut WriteBatch) {
        batch.delete_cf(store.cf(CF_INDEX), KEY_SEQ);
        batch.delete_range_cf(store.cf(CF_INDEX), KEY_SET, &[KEY_SET, &[0xff]].concat());
        // A rebuilt index counts activity afresh (it is not rebuilt from the change log).
        batch.delete_range_cf(
            store.cf(CF_INDEX),
            KEY_ACTIVITY,
            &[KEY_ACTIVITY, &[0xff]].concat(),
        );
    }

    /// Rebuilds the index from the customer records, in place so every handle sees it (new
    /// customers, those without a number, are numbered on the way). The next checkpoint
    /// writes all of it.
    pub fn rebuild_in_place(
        &self,
        store: &Store,
        last_seq: u64,
        limits: ColumnLimits,
        skip: &dyn Fn(&[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let fresh = Self::rebuild(store, last_seq, limits.profile_attributes, skip)?;
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        *state = fresh.state.into_inner().unwrap_or_else(|e| e.into_inner());
        *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) =
            fresh.dirty.into_inner().unwrap_or_else(|e| e.into_inner());
        *self.saved_chunks.lock().unwrap_or_else(|e| e.into_inner()) = 0;
        *self.columns_dirty.lock().unwrap_or_else(|e| e.into_inner()) = fresh
            .columns_dirty
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        *self.traits.write().unwrap_or_else(|e| e.into_inner()) = TraitCache::new(limits.traits);
        Ok(())
    }

    /// Adds customers written to the store without changes in the log (a restored
    /// partition's): numbers those that have none and indexes their memberships and profile
    /// columns, as a rebuild would, reading only their records. Checkpoint afterwards.
    pub fn add_customers(&self, store: &Store, ids: &[&str]) -> Result<(), StoreError> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let mut columns_dirty = self.columns_dirty.lock().unwrap_or_else(|e| e.into_inner());
        let mut wb = WriteBatch::default();
        for id in ids {
            let Some(value) = store.get(CF_CUSTOMERS, id.as_bytes())? else {
                continue;
            };
            state.index_record(
                store,
                (id.as_bytes(), &value),
                &mut wb,
                &mut dirty,
                &mut columns_dirty,
            )?;
        }
        store.commit(wb)
    }

    /// Loads the index: its checkpoint plus the change log after it, or (no checkpoint) one
    /// scan of the customer records, which also numbers customers who have none and writes
    /// a first checkpoint. `last_seq` is the last committed change's `seq`.
    pub fn open(store: &Store, last_seq: u64, limits: ColumnLimits) -> Result<MembershipIndex, StoreError> {
        let mut index = match store.get(CF_INDEX, KEY_SEQ)? {
            Some(seq) => Self::load(store, Reader::new(&seq).u64()?, limits.profile_attributes)?,
            None => Self::rebuild(store, last_seq, limits.profile_attributes, &|_| false)?,
        };
        index.traits = RwLock::new(TraitCache::new(limits.traits));
        index.catch_up(store)?;
        Ok(index)
    }

    /// The cache of aggregate traits' values.
    pub fn traits(&self) -> &RwLock<TraitCache> {
        &self.traits
    }

    fn load(store: &Store, seq: u64, max_columns: usize) -> Result<MembershipIndex, StoreError> {
        let mut state = IndexState {
            applied_seq: seq,
            columns: ProfileColumns::new(max_columns),
            ..Default::default()
        };
        for item in store.scan_from(CF_INDEX, KEY_IDS) {
            let (key, value) = item?;
            if !key.starts_with(KEY_IDS) {
                break;
            }
            state.ids.chunks.push(IdChunk::decode(&value)?);
        }
        let saved_chunks = state.ids.chunks.len();
        if state.ids.full_chunks() != saved_chunks {
            return Err(CodecError("the index checkpoint holds a partial id chunk").into());
        }
        Self::load_numbers(store, &mut state.ids)?;
        for item in store.scan_from(CF_INDEX, KEY_SET) {
            let (key, value) = item?;
            let Some(name) = key.strip_prefix(KEY_SET) else {
                break;
            };
            let name = std::str::from_utf8(name).map_err(|_| CodecError("bad index set name"))?;
            let set =
                RoaringBitmap::deserialize_from(&value[..]).map_err(|_| CodecError("bad index bitmap"))?;
            state.sets.insert(Arc::from(name), set);
        }
        for (key, value) in Self::scan_prefix(store, KEY_ACTIVITY)? {
            let name = std::str::from_utf8(&key[KEY_ACTIVITY.len()..])
                .map_err(|_| CodecError("bad index activity name"))?;
            state.activity.insert(Arc::from(name), Activity::decode(&value)?);
        }
        let columns_dirty = match store.get(CF_INDEX, columns::keys::APPLIED)? {
            Some(applied) => {
                state.journal_applied = Reader::new(&applied).u64()?;
                state.columns = ProfileColumns::load(
                    max_columns,
                    store.get(CF_INDEX, columns::keys::SPILLED)?.as_deref(),
                    Self::scan_prefix(store, columns::keys::DICT)?,
                    Self::scan_prefix(store, columns::keys::CHUNK)?,
                )?;
                let journal = Self::scan_prefix(store, columns::keys::JOURNAL)?;
                let mut dirty = ColumnsDirty::default();
                Self::replay_journal(store, &mut state, journal, &mut dirty)?;
                dirty
            }
            // A checkpoint from before the columns: build them once from the records.
            None => Self::build_columns(store, &mut state)?,
        };
        Ok(MembershipIndex {
            state: RwLock::new(state),
            dirty: Mutex::default(),
            saved_chunks: Mutex::new(saved_chunks),
            columns_dirty: Mutex::new(columns_dirty),
            traits: RwLock::default(),
        })
    }

    /// Every entry of the `index` column family under `prefix`, in key order.
    fn scan_prefix(store: &Store, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        for item in store.scan_from(CF_INDEX, prefix) {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key, value));
        }
        Ok(out)
    }

    /// Applies the profile journal entries after the column checkpoint: each customer they
    /// name gets every attribute of their stored profile.
    fn replay_journal(
        store: &Store,
        state: &mut IndexState,
        journal: Vec<KeyValue>,
        dirty: &mut ColumnsDirty,
    ) -> Result<(), StoreError> {
        let mut numbers = Vec::new();
        for (key, value) in &journal {
            let entry: [u8; 8] = key[columns::keys::JOURNAL.len()..]
                .try_into()
                .map_err(|_| CodecError("bad journal key"))?;
            let entry = u64::from_be_bytes(entry);
            if entry > state.journal_applied {
                numbers.extend(columns::decode_journal(value)?);
                state.journal_applied = entry;
            }
        }
        numbers.sort_unstable();
        numbers.dedup();
        for part in numbers.chunks(1024) {
            let ids = state.ids_of(part.iter().copied());
            let records = store.load_records(ids.iter())?;
            for (number, record) in ids.numbers().iter().zip(records) {
                let Some(record) = record else {
                    // Absorbed by a merge: in no column any more.
                    for attr in state.columns.names() {
                        state.columns.set(*number, &attr, None, dirty);
                    }
                    continue;
                };
                for (attr, entry) in &record.history.profile {
                    state.columns.set(*number, attr, entry.value.as_ref(), dirty);
                }
            }
        }
        Ok(())
    }

    /// Builds the columns from every customer record.
    fn build_columns(store: &Store, state: &mut IndexState) -> Result<ColumnsDirty, StoreError> {
        let mut dirty = ColumnsDirty::default();
        for item in store.scan_from(CF_CUSTOMERS, &[]) {
            let (_, value) = item?;
            let record = CustomerState::decode(&value)?;
            if record.number == NO_NUMBER {
                return Err(CodecError("a customer without a number follows the index checkpoint").into());
            }
            for (attr, entry) in &record.history.profile {
                state
                    .columns
                    .set(record.number, attr, entry.value.as_ref(), &mut dirty);
            }
        }
        state.journal_applied = Self::last_journal_entry(store)?;
        let mut all = state.columns.all_dirty();
        all.merge(dirty);
        Ok(all)
    }

    fn last_journal_entry(store: &Store) -> Result<u64, StoreError> {
        Ok(Self::scan_prefix(store, columns::keys::JOURNAL)?
            .last()
            .and_then(|(key, _)| key[columns::keys::JOURNAL.len()..].try_into().ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Appends the ids numbered after the table's end from the `numbers` column family.
    fn load_numbers(store: &Store, ids: &mut IdTable) -> Result<(), StoreError> {
        for item in store.scan_from(CF_NUMBERS, &number_key(ids.len())) {
            let (key, value) = item?;
            let number = u32::from_be_bytes(key[..].try_into().map_err(|_| CodecError("bad number key"))?);
            if number != ids.len() {
                return Err(CodecError("customer numbers have a gap").into());
            }
            let id = std::str::from_utf8(&value).map_err(|_| CodecError("bad customer id"))?;
            ids.push(id);
        }
        Ok(())
    }

    /// The index of every customer record but those `skip` names (by id).
    fn rebuild(
        store: &Store,
        last_seq: u64,
        max_columns: usize,
        skip: &dyn Fn(&[u8]) -> bool,
    ) -> Result<MembershipIndex, StoreError> {
        let mut state = IndexState {
            applied_seq: last_seq,
            columns: ProfileColumns::new(max_columns),
            journal_applied: Self::last_journal_entry(store)?,
            ..Default::default()
        };
        let mut columns_dirty = ColumnsDirty::default();
        // Every set is written by the first checkpoint.
        let mut dirty = HashSet::new();
        Self::load_numbers(store, &mut state.ids)?;
        let mut wb = WriteBatch::default();
        let mut pending = 0;
        for item in store.scan_from(CF_CUSTOMERS, &[]) {
            let (key, value) = item?;
            if skip(&key) {
                continue;
            }
            if state.index_record(store, (&key, &value), &mut wb, &mut dirty, &mut columns_dirty)? {
                pending += 1;
                if pending == 10_000 {
                    store.commit(std::mem::take(&mut wb))?;
                    pending = 0;
                }
            }
        }
        store.commit(wb)?;
        let mut all_columns = state.columns.all_dirty();
        all_columns.merge(columns_dirty);
        let index = MembershipIndex {
            state: RwLock::new(state),
            dirty: Mutex::new(dirty),
            saved_chunks: Mutex::new(0),
            columns_dirty: Mutex::new(all_columns),
            traits: RwLock::default(),
        };
        index.checkpoint(store)?;
        Ok(index)
    }

    /// Applies the committed changes the index has not seen (after a checkpoint).
    fn catch_up(&self, store: &Store) -> Result<(), StoreError> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let start = state.applied_seq.saturating_add(1);
        for item in store.scan_from(CF_CHANGES, &start.to_be_bytes()) {
            let (_, value) = item?;
            let (number, change) = Change::decode_stored(&value).ok_or(CodecError("bad stored change"))?;
            let Some(number) = number else {
                return Err(
                    CodecError("a change without a customer number follows the index checkpoint").into(),
                );
            };
            state.apply(number, &change);
            state.applied_seq = change.seq;
            dirty.insert(change.name.clone());
        }
        Ok(())
    }

    /// The index for reading. Hold the guard briefly: the engine waits for it to apply the
    /// next commit.
    pub fn read(&self) -> RwLockReadGuard<'_, IndexState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The profile journal entry the next commit that changes a profile writes, with its
    /// key and value (the customer numbers whose profile it changes).
    pub fn journal_entry(&self, numbers: &[u32], pending: Option<u64>) -> (u64, Vec<u8>, Vec<u8>) {
        // After the last applied entry, and after one of a commit still being written.
        let entry = self.read().journal_applied.max(pending.unwrap_or(0)) + 1;
        (
            entry,
            columns::keys::journal(entry),
            columns::encode_journal(numbers),
        )
    }

    /// Applies one commit: customers numbered in it (in number order), then its changes,
    /// `numbers[i]` being the number of `changes[i]`'s customer, then the profile values it
    /// set, written to the journal as entry `journal`. `touched` are the numbers of every
    /// customer the commit wrote.
    pub fn apply(&self, commit: IndexCommit<'_>) {
        let IndexCommit {
            new_ids,
            changes,
            numbers,
            profiles,
            journal,
            touched,
        } = commit;
        if new_ids.is_empty() && changes.is_empty() && profiles.is_empty() && touched.is_empty() {
            return;
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        for &number in touched {
            let i = number as usize;
            if state.generations.len() <= i {
                let len = (i + 1).max(state.ids.len() as usize);
                state.generations.resize(len, 0);
            }
            state.generations[i] = state.generations[i].wrapping_add(1);
        }
        if !profiles.is_empty() {
            let mut columns_dirty = self.columns_dirty.lock().unwrap_or_else(|e| e.into_inner());
            for (number, attr, value) in profiles {
                state
                    .columns
                    .set(*number, attr, value.as_ref(), &mut columns_dirty);
            }
        }
        if let Some(entry) = journal {
            state.journal_applied = entry;
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        for (number, id) in new_ids {
            let got = state.ids.push(id);
            debug_assert_eq!(got, *number, "customer numbers are assigned in order");
        }
        for (change, &number) in changes.iter().zip(numbers) {
            state.apply(number, change);
            state.applied_seq = change.seq;
            if !dirty.contains(&change.name) {
                dirty.insert(change.name.clone());
            }
        }
    }

    /// Writes what changed since the last checkpoint. Serialises under the read lock (the
    /// engine's next apply waits for it), writes to RocksDB without it.
    pub fn checkpoint(&self, store: &Store) -> Result<Checkpoint, StoreError> {
        let mut wb = WriteBatch::default();
        let mut done = Checkpoint::default();
        let taken: HashSet<Arc<str>>;
        let columns_taken: ColumnsDirty;
        let new_chunks;
        {
            let state = self.read();
            taken = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
            columns_taken =
                std::mem::take(&mut *self.columns_dirty.lock().unwrap_or_else(|e| e.into_inner()));
            let saved = *self.saved_chunks.lock().unwrap_or_else(|e| e.into_inner());
            new_chunks = state.ids.full_chunks();
            let unchanged = taken.is_empty() && columns_taken.is_empty() && new_chunks == saved;
            if unchanged && store.get(CF_INDEX, columns::keys::APPLIED)?.is_some() {
                return Ok(Checkpoint {
                    seq: state.applied_seq,
                    ..done
                });
            }
            for (i, chunk) in state.ids.chunks.iter().enumerate().take(new_chunks).skip(saved) {
                let value = chunk.encode();
                done.bytes += value.len();
                wb.put_cf(store.cf(CF_INDEX), chunk_key(i), value);
                done.chunks_written += 1;
            }
            for name in &taken {
                let key = [KEY_SET, name.as_bytes()].concat();
                match state.sets.get(name).filter(|s| !s.is_empty()) {
                    Some(set) => {
                        let mut value = Vec::with_capacity(set.serialized_size());
                        set.serialize_into(&mut value).expect("writing to a Vec");
                        done.bytes += value.len();
                        wb.put_cf(store.cf(CF_INDEX), key, value);
                    }
                    None => wb.delete_cf(store.cf(CF_INDEX), key),
                }
                let key = [KEY_ACTIVITY, name.as_bytes()].concat();
                match state.activity.get(name) {
                    Some(activity) => wb.put_cf(store.cf(CF_INDEX), key, activity.encode()),
                    None => wb.delete_cf(store.cf(CF_INDEX), key),
                }
                done.sets_written += 1;
            }
            let writes = state.columns.checkpoint_writes(&columns_taken);
            for (key, value) in writes.puts {
                done.bytes += value.len();
                done.column_chunks_written += usize::from(key.starts_with(columns::keys::CHUNK));
                wb.put_cf(store.cf(CF_INDEX), key, value);
            }
            for key in writes.deletes {
                wb.delete_cf(store.cf(CF_INDEX), key);
            }
            for (start, end) in writes.delete_ranges {
                wb.delete_range_cf(store.cf(CF_INDEX), start, end);
            }
            // The journal entries the columns now reflect are no longer needed.
            wb.delete_range_cf(
                store.cf(CF_INDEX),
                columns::keys::journal(0),
                columns::keys::journal(state.journal_applied + 1),
            );
            let mut w = Writer::new();
            w.u64(state.journal_applied);
            wb.put_cf(store.cf(CF_INDEX), columns::keys::APPLIED, w.buf);
            let mut w = Writer::new();
            w.u64(state.applied_seq);
            wb.put_cf(store.cf(CF_INDEX), KEY_SEQ, w.buf);
            done.seq = state.applied_seq;
        }
        if let Err(e) = store.commit(wb) {
            self.dirty.lock().unwrap_or_else(|e| e.into_inner()).extend(taken);
            self.columns_dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .merge(columns_taken);
            return Err(e);
        }
        *self.saved_chunks.lock().unwrap_or_else(|e| e.into_inner()) = new_chunks;
        Ok(done)
    }
}

fn chunk_key(i: usize) -> Vec<u8> {
    [KEY_IDS, &(i as u32).to_be_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(op: Op, at: i64) -> Change {
        Change {
            seq: 1,
            pseq: None,
            rules_version: None,
            customer_id: Arc::from("c"),
            kind: crate::change::MemberKind::Tag,
            name: Arc::from("vip"),
            op,
            at,
            cause: crate::change::Cause::Timer,
        }
    }

    #[test]
    fn activity_counts_per_hour_and_keeps_the_last_week() {
        let hour = 3_600_000;
        let mut a = Activity::default();
        a.count(&change(Op::Add, 10 * hour + 5));
        a.count(&change(Op::Add, 10 * hour + hour - 1));
        a.count(&change(Op::Remove, 11 * hour));
        assert_eq!(
            a.hours().collect::<Vec<_>>(),
            [(10 * hour, 2, 0), (11 * hour, 0, 1)]
        );
        // A week after hour 10, hour 10 is dropped; hour 11 stays.
        a.count(&change(Op::Add, (10 + ACTIVITY_HOURS) * hour));
        assert_eq!(
            a.hours().collect::<Vec<_>>(),
            [(11 * hour, 0, 1), ((10 + ACTIVITY_HOURS) * hour, 1, 0)]
        );
        // A late change older than what is kept is not counted.
        a.count(&change(Op::Remove, 9 * hour));
        assert_eq!(a.hours().count(), 2);
        assert_eq!(Activity::decode(&a.encode()).unwrap(), a);
    }

    #[test]
    fn id_table_numbers_ids_densely_across_chunks() {
        let mut t = IdTable::default();
        for i in 0..(CHUNK + 10) {
            assert_eq!(t.push(&format!("c{i}")), i);
        }
        assert_eq!(t.len(), CHUNK + 10);
        assert_eq!(t.get(0), Some("c0"));
        assert_eq!(t.get(CHUNK - 1), Some(format!("c{}", CHUNK - 1).as_str()));
        assert_eq!(t.get(CHUNK + 9), Some(format!("c{}", CHUNK + 9).as_str()));
        assert_eq!(t.get(CHUNK + 10), None);
        assert_eq!(t.full_chunks(), 1);
        let chunk = IdChunk::decode(&t.chunks[0].encode()).unwrap();
        assert_eq!(chunk.get(5), Some("c5"));
        assert!(IdChunk::decode(&[3, 1]).is_err());
    }
}
