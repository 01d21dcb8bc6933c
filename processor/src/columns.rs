//! Profile attributes as columns over customer numbers: the columnar snapshot that segment
//! queries and SQL read instead of every candidate's stored record.
//!
//! A column holds one `u32` code per customer number: 0 when the customer has no value, 1
//! when the value is the number at the same position of the column's decimals, anything
//! else an entry of the column's dictionary (every distinct value, numbers included, up to
//! [`MAX_DISTINCT`]). Low-cardinality attributes (city, lead status, a score) cost 4 bytes
//! per customer; a numeric attribute with more distinct values than the dictionary takes
//! 16 more bytes per customer for the exact decimals. A column whose strings outgrow the
//! dictionary, or any attribute beyond the configured number of columns, is *spilled*: it
//! is dropped and queries read that attribute from the records, as before.
//!
//! The columns live inside the membership index, behind its lock, and are checkpointed with
//! it in chunks of 65,536 customers. Each engine commit that changes a profile also writes
//! a journal entry (the customer numbers it touched) in the same atomic batch; a checkpoint
//! deletes the entries it covers, and opening replays the rest from the customers' records.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rules::{CompiledRules, Value};
use rust_decimal::Decimal;

use crate::codec::{CodecError, Reader, Writer};

/// Distinct values a column's dictionary holds.
pub const MAX_DISTINCT: usize = 1 << 16;

/// Customers per checkpointed chunk of a column.
pub const CHUNK: u32 = 1 << 16;

const ABSENT: u32 = 0;
const DECIMAL: u32 = 1;
const FIRST_ENTRY: u32 = 2;

/// One profile attribute of every customer.
#[derive(Debug, Default)]
pub struct Column {
    codes: Vec<u32>,
    /// Numbers that did not fit the dictionary, at their customer's position (empty until
    /// the first one).
    decimals: Vec<Decimal>,
    dict: Vec<Value>,
    lookup: HashMap<Box<[u8]>, u32>,
    /// A value's encoding, the key of `lookup`; kept to spare an allocation per lookup.
    scratch: Writer,
}

/// A function over the values of one column of an export (a masking policy), remembering
/// what it gave for each dictionary entry: an export of 10M rows of 8 cities masks 8 cities.
/// The memo is bounded by the dictionary ([`MAX_DISTINCT`] entries).
pub struct ValueMap {
    f: Box<dyn Fn(&Value) -> Value + Send>,
    memo: Vec<Option<(Value, Value)>>,
}

impl ValueMap {
    pub fn new(f: impl Fn(&Value) -> Value + Send + 'static) -> ValueMap {
        ValueMap {
            f: Box::new(f),
            memo: Vec::new(),
        }
    }

    /// `f(value)`, not remembered (a value read from a record, not a column).
    pub fn apply(&self, value: &Value) -> Value {
        (self.f)(value)
    }
}

/// The same dictionary entry: one allocation for strings and lists, equal otherwise.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(a), Value::Str(b)) => Arc::ptr_eq(a, b),
        (Value::List(a), Value::List(b)) => Arc::ptr_eq(a, b),
        _ => a == b,
    }
}

impl std::fmt::Debug for ValueMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueMap")
            .field("remembered", &self.memo.len())
            .finish()
    }
}

/// A column's strings (or lists, or booleans) outgrew its dictionary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spilled;

impl Column {
    /// The value of customer `number` (`None`: no value).
    pub fn get(&self, number: u32) -> Option<Value> {
        self.value_of(self.code(number), number)
    }

    /// Customer `number`'s code: equal codes other than [`Column::DECIMAL`] are equal
    /// values, so what depends on the value alone can be worked out once per code.
    pub fn code(&self, number: u32) -> u32 {
        self.codes.get(number as usize).copied().unwrap_or(ABSENT)
    }

    /// The code of a value kept as a decimal, not in the dictionary.
    pub const DECIMAL: u32 = DECIMAL;

    /// The value `code` stands for (customer `number`'s, for [`Column::DECIMAL`]).
    pub fn value_of(&self, code: u32, number: u32) -> Option<Value> {
        match code {
            ABSENT => None,
            DECIMAL => Some(Value::Num(self.decimals[number as usize])),
            code => Some(self.dict[(code - FIRST_ENTRY) as usize].clone()),
        }
    }

    /// Customer `number`'s value through `map`: a dictionary entry is mapped once per
    /// [`ValueMap`], a decimal every time.
    pub fn get_mapped(&self, number: u32, map: &mut ValueMap) -> Option<Value> {
        match self.code(number) {
            ABSENT => None,
            DECIMAL => Some((map.f)(&Value::Num(self.decimals[number as usize]))),
            code => {
                let i = (code - FIRST_ENTRY) as usize;
                let entry = &self.dict[i];
                if map.memo.len() <= i {
                    map.memo.resize(i + 1, None);
                }
                match &map.memo[i] {
                    // Codes are stable while the column lives; the check guards a column
                    // rebuilt under a long export.
                    Some((source, mapped)) if same(source, entry) => Some(mapped.clone()),
                    _ => {
                        let mapped = (map.f)(entry);
                        map.memo[i] = Some((entry.clone(), mapped.clone()));
                        Some(mapped)
                    }
                }
            }
        }
    }

    /// Sets customer `number`'s value.
    pub fn set(&mut self, number: u32, value: Option<&Value>) -> Result<(), Spilled> {
        let code = match value {
            None => ABSENT,
            Some(value) => match self.code_of(value) {
                Some(code) => code,
                None => match value {
                    Value::Num(n) => {
                        if self.decimals.len() <= number as usize {
                            self.decimals
                                .resize(self.codes.len().max(number as usize + 1), Decimal::ZERO);
                        }
                        self.decimals[number as usize] = *n;
                        DECIMAL
                    }
                    _ => return Err(Spilled),
                },
            },
        };
        let i = number as usize;
        if self.codes.len() <= i {
            if code == ABSENT {
                return Ok(());
            }
            self.codes.resize(i + 1, ABSENT);
        }
        self.codes[i] = code;
        Ok(())
    }

    /// The dictionary code of `value`, adding it while the dictionary has room.
    fn code_of(&mut self, value: &Value) -> Option<u32> {
        self.scratch.buf.clear();
        self.scratch.value(value);
        if let Some(code) = self.lookup.get(self.scratch.buf.as_slice()) {
            return Some(*code);
        }
        if self.dict.len() >= MAX_DISTINCT {
            return None;
        }
        let code = self.dict.len() as u32 + FIRST_ENTRY;
        self.dict.push(value.clone());
        self.lookup.insert(self.scratch.buf.as_slice().into(), code);
        Some(code)
    }

    /// Bytes held (the lookup table estimated).
    pub fn heap_bytes(&self) -> usize {
        self.codes.capacity() * 4
            + self.decimals.capacity() * 16
            + self.dict.capacity() * 24
            + self.lookup.len() * 48
    }

    fn encode_dict(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.dict.len() as u64);
        for v in &self.dict {
            w.value(v);
        }
        w.buf
    }

    fn decode_dict(bytes: &[u8]) -> Result<Column, CodecError> {
        let mut r = Reader::new(bytes);
        let n = r.len()?;
        let mut column = Column::default();
        for _ in 0..n {
            let value = r.value()?;
            if column.code_of(&value).is_none() {
                return Err(CodecError("a column dictionary is too large"));
            }
        }
        if column.dict.len() != n {
            return Err(CodecError("a column dictionary repeats a value"));
        }
        Ok(column)
    }

    /// Chunk `chunk` of the codes, with the decimals of the customers coded `DECIMAL`.
    fn encode_chunk(&self, chunk: u32) -> Vec<u8> {
        let start = (chunk * CHUNK) as usize;
        let codes = self.codes.get(start..).unwrap_or_default();
        let codes = &codes[..codes.len().min(CHUNK as usize)];
        let mut w = Writer::new();
        w.u64(codes.len() as u64);
        for code in codes {
            w.buf.extend_from_slice(&code.to_le_bytes());
        }
        for (i, code) in codes.iter().enumerate() {
            if *code == DECIMAL {
                w.buf.extend_from_slice(&self.decimals[start + i].serialize());
            }
        }
        w.buf
    }

    fn decode_chunk(&mut self, chunk: u32, bytes: &[u8]) -> Result<(), CodecError> {
        let mut r = Reader::new(bytes);
        let n = r.len()?;
        let raw = r.take(n * 4)?;
        let start = (chunk * CHUNK) as usize;
        if n > CHUNK as usize {
            return Err(CodecError("a column chunk is too long"));
        }
        if self.codes.len() < start + n {
            self.codes.resize(start + n, ABSENT);
        }
        for (i, code) in raw.chunks_exact(4).enumerate() {
            let code = u32::from_le_bytes(code.try_into().expect("4 bytes"));
            if code >= FIRST_ENTRY && (code - FIRST_ENTRY) as usize >= self.dict.len() {
                return Err(CodecError("a column code is not in its dictionary"));
            }
            if code == DECIMAL {
                let raw: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
                if self.decimals.len() <= start + i {
                    self.decimals.resize(self.codes.len(), Decimal::ZERO);
                }
                self.decimals[start + i] = Decimal::deserialize(raw);
            }
            self.codes[start + i] = code;
        }
        Ok(())
    }
}

/// Every columnar profile attribute, and the attributes that are not.
#[derive(Debug, Default)]
pub struct ProfileColumns {
    columns: HashMap<Arc<str>, Column>,
    spilled: BTreeSet<Arc<str>>,
    max_columns: usize,
}

/// What changed since the last checkpoint.
#[derive(Debug, Default)]
pub struct ColumnsDirty {
    chunks: HashMap<Arc<str>, BTreeSet<u32>>,
    dicts: HashSet<Arc<str>>,
    spilled: bool,
}

impl ColumnsDirty {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.dicts.is_empty() && !self.spilled
    }

    pub fn merge(&mut self, other: ColumnsDirty) {
        for (name, chunks) in other.chunks {
            self.chunks.entry(name).or_default().extend(chunks);
        }
        self.dicts.extend(other.dicts);
        self.spilled |= other.spilled;
    }
}

impl ProfileColumns {
    pub fn new(max_columns: usize) -> ProfileColumns {
        ProfileColumns {
            max_columns,
            ..Default::default()
        }
    }

    /// The column of `attr`, if it is columnar. An attribute nobody has set yet is
    /// columnar (every value absent) while there is room for it.
    pub fn column(&self, attr: &str) -> Option<&Column> {
        self.columns.get(attr)
    }

    /// Whether `attr` is answered by a column (one that exists or would be created).
    pub fn is_columnar(&self, attr: &str) -> bool {
        self.columns.contains_key(attr)
            || (!self.spilled.contains(attr) && self.columns.len() < self.max_columns)
    }

    /// Whether some attribute is not a column.
    pub fn any_spilled(&self) -> bool {
        !self.spilled.is_empty()
    }

    /// The value of `attr` for customer `number` when `attr` is columnar.
    pub fn get(&self, attr: &str, number: u32) -> Option<Value> {
        self.columns.get(attr).and_then(|c| c.get(number))
    }

    /// Sets one customer's value of one attribute, spilling the attribute when it does not
    /// fit; records what the next checkpoint must write in `dirty`.
    pub fn set(&mut self, number: u32, attr: &Arc<str>, value: Option<&Value>, dirty: &mut ColumnsDirty) {
        if self.spilled.contains(attr) {
            return;
        }
        if !self.columns.contains_key(attr) {
            if value.is_none() {
                return;
            }
            if self.columns.len() >= self.max_columns {
                self.spill(attr, dirty);
                return;
            }
            self.columns.insert(attr.clone(), Column::default());
        }
        let column = self.columns.get_mut(attr).expect("just ensured");
        let dict_len = column.dict.len();
        match column.set(number, value) {
            Ok(()) => {
                if column.dict.len() != dict_len && !dirty.dicts.contains(attr) {
                    dirty.dicts.insert(attr.clone());
                }
                match dirty.chunks.get_mut(attr) {
                    Some(chunks) => {
                        chunks.insert(number / CHUNK);
                    }
                    None => {
                        dirty
                            .chunks
                            .insert(attr.clone(), BTreeSet::from([number / CHUNK]));
                    }
                }
            }
            Err(Spilled) => self.spill(attr, dirty),
        }
    }

    fn spill(&mut self, attr: &Arc<str>, dirty: &mut ColumnsDirty) {
        tracing::info!(attribute = %attr, "profile attribute too varied for a column; queries read it from the records");
        self.columns.remove(attr);
        self.spilled.insert(attr.clone());
        dirty.chunks.remove(attr);
        dirty.dicts.remove(attr);
        dirty.spilled = true;
    }

    /// Bytes held by every column.
    pub fn heap_bytes(&self) -> usize {
        self.columns.values().map(Column::heap_bytes).sum()
    }

    /// The columnar attributes, in name order.
    pub fn names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self.columns.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// Marks everything dirty (after a rebuild).
    pub fn all_dirty(&self) -> ColumnsDirty {
        ColumnsDirty {
            chunks: self
                .columns
                .iter()
                .map(|(name, c)| {
                    (
                        name.clone(),
                        (0..(c.codes.len() as u32).div_ceil(CHUNK)).collect(),
                    )
                })
                .collect(),
            dicts: self.columns.keys().cloned().collect(),
            spilled: true,
        }
    }
}

/// Keys of the checkpoint in the `index` column family.
pub mod keys {
    /// The last journal entry the checkpointed columns reflect.
    pub const APPLIED: &[u8] = b"cj";
    /// The spilled attributes.
    pub const SPILLED: &[u8] = b"cs";
    pub const DICT: &[u8] = b"cd:";
    pub const CHUNK: &[u8] = b"cc:";
    pub const JOURNAL: &[u8] = b"pj:";

    pub fn dict(attr: &str) -> Vec<u8> {
        [DICT, attr.as_bytes()].concat()
    }

    /// `cc:` + the attribute's length + the attribute + the chunk number.
    pub fn chunk(attr: &str, chunk: u32) -> Vec<u8> {
        [
            CHUNK,
            &(attr.len() as u32).to_be_bytes(),
            attr.as_bytes(),
            &chunk.to_be_bytes(),
        ]
        .concat()
    }

    pub fn journal(entry: u64) -> Vec<u8> {
        [JOURNAL, &entry.to_be_bytes()].concat()
    }
}

/// The checkpoint writes for `dirty`, as (key, value) puts and key deletes.
pub struct ColumnWrites {
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
    pub deletes: Vec<Vec<u8>>,
    /// `[start, end)` key ranges to delete: chunks of spilled columns.
    pub delete_ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ProfileColumns {
    /// What a checkpoint of `dirty` writes.
    pub fn checkpoint_writes(&self, dirty: &ColumnsDirty) -> ColumnWrites {
        let mut out = ColumnWrites {
            puts: Vec::new(),
            deletes: Vec::new(),
            delete_ranges: Vec::new(),
        };
        for name in &dirty.dicts {
            if let Some(column) = self.columns.get(name) {
                out.puts.push((keys::dict(name), column.encode_dict()));
            }
        }
        for (name, chunks) in &dirty.chunks {
            let Some(column) = self.columns.get(name) else {
                continue;
            };
            for &chunk in chunks {
                out.puts
                    .push((keys::chunk(name, chunk), column.encode_chunk(chunk)));
            }
        }
        if dirty.spilled {
            let mut w = Writer::new();
            w.u64(self.spilled.len() as u64);
            for name in &self.spilled {
                w.str(name);
                out.deletes.push(keys::dict(name));
                out.delete_ranges
                    .push((keys::chunk(name, 0), keys::chunk(name, u32::MAX)));
                out.deletes.push(keys::chunk(name, u32::MAX));
            }
            out.puts.push((keys::SPILLED.to_vec(), w.buf));
        }
        out
    }

    /// Loads the checkpointed columns from the `index` column family's entries: the
    /// spilled list, every dictionary, then every chunk (`items` in key order).
    pub fn load(
        max_columns: usize,
        spilled: Option<&[u8]>,
        dicts: impl IntoIterator<Item = (Box<[u8]>, Box<[u8]>)>,
        chunks: impl IntoIterator<Item = (Box<[u8]>, Box<[u8]>)>,
    ) -> Result<ProfileColumns, CodecError> {
        let mut columns = ProfileColumns::new(max_columns);
        if let Some(bytes) = spilled {
            let mut r = Reader::new(bytes);
            for _ in 0..r.len()? {
                columns.spilled.insert(r.arc_str()?);
            }
        }
        for (key, value) in dicts {
            let name =
                std::str::from_utf8(&key[keys::DICT.len()..]).map_err(|_| CodecError("bad column name"))?;
            columns
                .columns
                .insert(Arc::from(name), Column::decode_dict(&value)?);
        }
        for (key, value) in chunks {
            let rest = &key[keys::CHUNK.len()..];
            let bad = || CodecError("bad column chunk key");
            let len =
                u32::from_be_bytes(rest.get(..4).ok_or_else(bad)?.try_into().expect("4 bytes")) as usize;
            let name = rest.get(4..4 + len).ok_or_else(bad)?;
            let chunk = rest.get(4 + len..).filter(|c| c.len() == 4).ok_or_else(bad)?;
            let name = std::str::from_utf8(name).map_err(|_| bad())?;
            let chunk = u32::from_be_bytes(chunk.try_into().expect("4 bytes"));
            let column = columns
                .columns
                .get_mut(name)
                .ok_or(CodecError("a column chunk without its dictionary"))?;
            column.decode_chunk(chunk, &value)?;
        }
        Ok(columns)
    }
}

/// Values of traits that read aggregates, remembered from the queries that computed them:
/// a read-through cache beside the profile columns. An entry holds while the customer's
/// generation (bumped by every commit that touches the customer) is the one it was computed
/// at and the clock is before the instant time alone could change it, so a hit is exactly
/// what reading the customer's events would give. Not checkpointed: after a restart the
/// first queries fill it again. Cleared when the rules change; at most `max_traits` traits
/// are kept, the least recently used going first.
#[derive(Debug, Default)]
pub struct TraitCache {
    /// The rule set the values were computed with.
    rules: Option<Arc<CompiledRules>>,
    traits: HashMap<Arc<str>, TraitColumn>,
    /// Traits whose values outgrew a column's dictionary: not cached.
    uncacheable: HashSet<Arc<str>>,
    max_traits: usize,
    uses: AtomicU64,
}

#[derive(Debug, Default)]
struct TraitColumn {
    values: Column,
    generations: Vec<u32>,
    /// Until when each value holds; 0 for no value.
    valid_until: Vec<i64>,
    last_used: AtomicU64,
}

/// One computed trait value to remember.
pub struct TraitValue {
    pub number: u32,
    pub generation: u32,
    pub value: Value,
    pub valid_until: i64,
}

impl TraitCache {
    pub fn new(max_traits: usize) -> TraitCache {
        TraitCache {
            max_traits,
            ..Default::default()
        }
    }

    /// Whether the cache holds values computed with `rules`.
    pub fn is_for(&self, rules: &Arc<CompiledRules>) -> bool {
        self.rules.as_ref().is_some_and(|r| Arc::ptr_eq(r, rules))
    }

    /// Forgets everything and starts caching values computed with `rules`.
    pub fn reset(&mut self, rules: &Arc<CompiledRules>) {
        self.rules = Some(rules.clone());
        self.traits.clear();
        self.uncacheable.clear();
    }

    /// Trait `name`'s value for customer `number` at generation `generation` and instant
    /// `now`; `None` when not cached or no longer valid.
    pub fn get(&self, name: &str, number: u32, generation: u32, now: i64) -> Option<Value> {
        let column = self.traits.get(name)?;
        let i = number as usize;
        let valid = column.generations.get(i) == Some(&generation)
            && column.valid_until.get(i).is_some_and(|v| now < *v);
        valid.then(|| column.values.get(number).unwrap_or(Value::Null))
    }

    /// Marks `name` as used by a query now (for eviction).
    pub fn touch(&self, name: &str) {
        if let Some(column) = self.traits.get(name) {
            let now = self.uses.fetch_add(1, Ordering::Relaxed) + 1;
            column.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// Remembers computed values of trait `name`.
    pub fn put(&mut self, name: &Arc<str>, values: &[TraitValue]) {
        if self.max_traits == 0 || self.uncacheable.contains(name) || values.is_empty() {
            return;
        }
        let now = self.uses.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.traits.contains_key(name) && self.traits.len() >= self.max_traits {
            let oldest = self
                .traits
                .iter()
                .min_by_key(|(_, c)| c.last_used.load(Ordering::Relaxed))
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                self.traits.remove(&oldest);
            }
        }
        let column = self.traits.entry(name.clone()).or_default();
        column.last_used.store(now, Ordering::Relaxed);
        for v in values {
            let i = v.number as usize;
            let value = Some(&v.value).filter(|v| !v.is_null());
            if column.values.set(v.number, value).is_err() {
                self.traits.remove(name);
                self.uncacheable.insert(name.clone());
                return;
            }
            if column.generations.len() <= i {
                column.generations.resize(i + 1, 0);
                column.valid_until.resize(i + 1, 0);
            }
            column.generations[i] = v.generation;
            column.valid_until[i] = v.valid_until;
        }
    }

    /// Bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.traits
            .values()
            .map(|c| c.values.heap_bytes() + c.generations.capacity() * 4 + c.valid_until.capacity() * 8)
            .sum()
    }
}

/// A journal entry: the customer numbers whose profile one commit changed.
pub fn encode_journal(numbers: &[u32]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(numbers.len() as u64);
    for n in numbers {
        w.u64(u64::from(*n));
    }
    w.buf
}

pub fn decode_journal(bytes: &[u8]) -> Result<Vec<u32>, CodecError> {
    let mut r = Reader::new(bytes);
    let n = r.len()?;
    (0..n)
        .map(|_| u32::try_from(r.u64()?).map_err(|_| CodecError("bad journal entry")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: i64) -> Value {
        Value::Num(Decimal::from(n))
    }

    #[test]
    fn a_value_map_maps_each_dictionary_entry_once_and_each_decimal_every_time() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let mut map = ValueMap::new(move |v| {
            counted.fetch_add(1, Ordering::Relaxed);
            match v {
                Value::Str(s) => Value::Str(Arc::from(format!("<{s}>"))),
                other => other.clone(),
            }
        });
        let mut c = Column::default();
        for n in 0..100u32 {
            let city = ["杭州", "上海", "北京"][n as usize % 3];
            c.set(n, Some(&Value::Str(Arc::from(city)))).unwrap();
        }
        c.set(100, Some(&num(5))).unwrap();
        let mapped: Vec<Option<Value>> = (0..102).map(|n| c.get_mapped(n, &mut map)).collect();
        for n in 0..100 {
            let Some(Value::Str(s)) = &mapped[n] else {
                panic!("{:?}", mapped[n])
            };
            assert_eq!(&**s, format!("<{}>", ["杭州", "上海", "北京"][n % 3]));
        }
        assert_eq!(mapped[100], Some(num(5)));
        assert_eq!(mapped[101], None, "absent stays absent");
        assert_eq!(calls.load(Ordering::Relaxed), 4, "three cities and one number");
        // A full dictionary: numbers beyond it are decimals, mapped each time they are read.
        for i in 0..MAX_DISTINCT as i64 {
            c.set(200, Some(&num(1_000_000 + i))).unwrap();
        }
        let precise = Value::Num(Decimal::new(123_456_789, 4));
        c.set(201, Some(&precise)).unwrap();
        let before = calls.load(Ordering::Relaxed);
        assert_eq!(c.get_mapped(201, &mut map), Some(precise.clone()));
        assert_eq!(c.get_mapped(201, &mut map), Some(precise));
        assert_eq!(calls.load(Ordering::Relaxed), before + 2);
        // A map kept across a column rebuilt with other entries at the same codes is not
        // fooled by its memo.
        let mut rebuilt = Column::default();
        rebuilt.set(0, Some(&Value::Str(Arc::from("广州")))).unwrap();
        assert_eq!(
            rebuilt.get_mapped(0, &mut map),
            Some(Value::Str(Arc::from("<广州>")))
        );
    }

    #[test]
    fn columns_keep_values_absent_values_and_overflowing_numbers_exactly() {
        let mut c = Column::default();
        let city = Value::Str(Arc::from("杭州"));
        c.set(3, Some(&city)).unwrap();
        c.set(10, Some(&num(7))).unwrap();
        assert_eq!(c.get(3), Some(city.clone()));
        assert_eq!(c.get(10), Some(num(7)));
        assert_eq!(c.get(4), None);
        assert_eq!(c.get(1_000), None);
        c.set(3, None).unwrap();
        assert_eq!(c.get(3), None);
        for i in 0..MAX_DISTINCT as i64 {
            c.set(20, Some(&num(1_000_000 + i))).unwrap();
        }
        // The dictionary is full: new numbers become decimals, new strings spill.
        let precise = Value::Num(Decimal::new(123_456_789, 4));
        c.set(21, Some(&precise)).unwrap();
        assert_eq!(c.get(21), Some(precise));
        assert_eq!(c.set(22, Some(&Value::Str(Arc::from("new")))), Err(Spilled));
        assert_eq!(c.get(10), Some(num(7)));

        let mut copy = Column::decode_dict(&c.encode_dict()).unwrap();
        copy.decode_chunk(0, &c.encode_chunk(0)).unwrap();
        for n in 0..30 {
            assert_eq!(copy.get(n), c.get(n), "customer {n}");
        }
    }

    #[test]
    fn attributes_beyond_the_column_limit_spill_and_checkpoints_round_trip() {
        let mut columns = ProfileColumns::new(2);
        let mut dirty = ColumnsDirty::default();
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        columns.set(1, &a, Some(&num(1)), &mut dirty);
        columns.set(70_000, &b, Some(&Value::Bool(true)), &mut dirty);
        assert!(!columns.is_columnar("c"), "no room for a third column");
        columns.set(2, &c, Some(&num(3)), &mut dirty);
        assert!(!columns.is_columnar("c"));
        assert!(columns.is_columnar("a"));
        assert_eq!(columns.get("b", 70_000), Some(Value::Bool(true)));

        let writes = columns.checkpoint_writes(&dirty);
        let get = |k: &[u8]| {
            writes
                .puts
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let mut dicts = Vec::new();
        let mut chunks = Vec::new();
        for (k, v) in &writes.puts {
            if k.starts_with(keys::DICT) {
                dicts.push((k.clone().into_boxed_slice(), v.clone().into_boxed_slice()));
            } else if k.starts_with(keys::CHUNK) {
                chunks.push((k.clone().into_boxed_slice(), v.clone().into_boxed_slice()));
            }
        }
        let loaded = ProfileColumns::load(2, get(keys::SPILLED).as_deref(), dicts, chunks).unwrap();
        assert_eq!(loaded.get("a", 1), Some(num(1)));
        assert_eq!(loaded.get("b", 70_000), Some(Value::Bool(true)));
        assert_eq!(loaded.get("b", 1), None);
        assert!(!loaded.is_columnar("c"));
        assert_eq!(decode_journal(&encode_journal(&[4, 9])).unwrap(), vec![4, 9]);
    }

    #[test]
    fn the_trait_cache_answers_only_valid_entries_and_evicts_the_least_recently_used() {
        let rules = Arc::new(CompiledRules::compile("trait a = count(x, 1d)").unwrap());
        let mut cache = TraitCache::new(2);
        cache.reset(&rules);
        assert!(cache.is_for(&rules));
        let value = |number, generation, valid_until| TraitValue {
            number,
            generation,
            value: num(i64::from(number)),
            valid_until,
        };
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        cache.put(&a, &[value(1, 7, 100), value(2, 0, 50)]);
        assert_eq!(cache.get("a", 1, 7, 99), Some(num(1)));
        assert_eq!(cache.get("a", 1, 7, 100), None, "past its next change");
        assert_eq!(
            cache.get("a", 1, 8, 10),
            None,
            "a later commit touched the customer"
        );
        assert_eq!(cache.get("a", 3, 0, 10), None, "never computed");
        cache.put(&b, &[value(1, 7, 100)]);
        cache.touch("a");
        cache.put(&c, &[value(1, 7, 100)]);
        assert_eq!(cache.get("b", 1, 7, 10), None, "evicted");
        assert_eq!(cache.get("a", 1, 7, 10), Some(num(1)));
        assert_eq!(cache.get("c", 1, 7, 10), Some(num(1)));
        let other = Arc::new(CompiledRules::compile("trait a = count(x, 2d)").unwrap());
        assert!(!cache.is_for(&other));
        cache.reset(&other);
        assert_eq!(cache.get("a", 1, 7, 10), None, "a new rule set starts empty");
    }
}
