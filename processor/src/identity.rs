//! Identity resolution: the typed identifiers an event carries (`ids`: phone, email, WeChat
//! openid and unionid, device ids, member numbers) are normalised and looked up in the
//! identity graph, so one person is one customer however many ids they arrive with.
//!
//! The graph lives in the `identities` column family:
//!
//! | key | value |
//! |---|---|
//! | `i` type `\0` normalised value | the canonical customer id that owns the identifier |
//! | `c` customer id | [`IdRecord`]: when the record was made and every identifier it owns |
//!
//! A customer only ever sent with `customer_id` has neither: its id is its own identifier
//! (type `customer_id`). A customer absorbed by a merge keeps resolving: its `customer_id`
//! identifier points at the survivor, and the engine keeps those aliases in memory so an
//! event with only `customer_id` needs no read of the graph.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::codec::{CodecError, Reader, Writer};

/// The identifier type every `customer_id` is.
pub const CUSTOMER_ID: &str = "customer_id";

/// How an identifier type's values are normalised, after the contract's normalisation of
/// every string (NFKC, invisible characters removed, trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Normaliser {
    /// Digits only (spaces, dashes, brackets dropped); a leading `+CC`, `00CC`, or a bare
    /// `CC` before a number of `national_digits` digits is dropped for the home
    /// `country_code`, so `+86 138-0000-0001`, `0086 13800000001` and `13800000001` are
    /// one phone. Numbers of other countries keep their country code. Fewer than 5 digits
    /// is not a phone number.
    Phone {
        country_code: String,
        national_digits: usize,
    },
    /// Lower-cased; must have one `@` with something either side. No provider-specific
    /// rules (dots in Gmail addresses are kept).
    Email,
    /// As sent (after the contract's normalisation): openids, unionids, device ids, member
    /// numbers.
    Exact,
}

impl Normaliser {
    /// The identifier's normal form, or `None` when nothing usable is left.
    pub fn apply(&self, raw: &str) -> Option<String> {
        let text = rules::normalize(raw);
        let text = text.trim();
        match self {
            Normaliser::Exact => (!text.is_empty()).then(|| text.to_owned()),
            Normaliser::Email => {
                let lower = text.to_lowercase();
                let (local, domain) = lower.split_once('@')?;
                let valid = !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !lower.chars().any(char::is_whitespace);
                valid.then_some(lower)
            }
            Normaliser::Phone {
                country_code,
                national_digits,
            } => {
                let international = text.starts_with('+') || text.starts_with("00");
                let mut digits: String = text.chars().filter(char::is_ascii_digit).collect();
                if text.starts_with("00") {
                    digits.drain(..2);
                }
                let home = digits.starts_with(country_code.as_str())
                    && digits.len() == country_code.len() + national_digits;
                if home && (international || digits.len() > *national_digits) {
                    digits.drain(..country_code.len());
                }
                (digits.len() >= 5).then_some(digits)
            }
        }
    }
}

/// One identifier type: how its values are normalised, how strongly it names a person
/// (`rank`: the survivor of a merge is the customer whose best identifier ranks highest),
/// and how many one customer may own (a shared family tablet's device id must not glue a
/// whole town together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdType {
    pub name: Arc<str>,
    pub rank: u32,
    pub normaliser: Normaliser,
    pub max_per_customer: Option<usize>,
}

/// The identifier types events may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    pub types: Vec<IdType>,
    /// Most identifier lookups kept in memory ([`OwnerCache`], about 100 bytes each).
    pub cache_entries: usize,
}

impl Default for IdentityConfig {
    /// `customer_id` (rank 100), `member_no` (90, at most 1), `unionid` (80, 1), `phone`
    /// (70, 3; home country +86), `email` (60, 3), `openid` (50, 5), `device_id` (10, 5).
    fn default() -> Self {
        let t = |name: &str, rank, normaliser, max: Option<usize>| IdType {
            name: Arc::from(name),
            rank,
            normaliser,
            max_per_customer: max,
        };
        IdentityConfig {
            types: vec![
                t(CUSTOMER_ID, 100, Normaliser::Exact, None),
                t("member_no", 90, Normaliser::Exact, Some(1)),
                t("unionid", 80, Normaliser::Exact, Some(1)),
                t(
                    "phone",
                    70,
                    Normaliser::Phone {
                        country_code: "86".into(),
                        national_digits: 11,
                    },
                    Some(3),
                ),
                t("email", 60, Normaliser::Email, Some(3)),
                t("openid", 50, Normaliser::Exact, Some(5)),
                t("device_id", 10, Normaliser::Exact, Some(5)),
            ],
            cache_entries: 1_000_000,
        }
    }
}

/// An event's identifiers made ready for resolution: each type's normaliser applied, the
/// best-ranked first, one of each (done where the event is parsed, off the engine thread).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedIds {
    /// (type's position, normalised value); the event's own `customer_id` among them.
    pub ids: Vec<(usize, String)>,
    /// The types of identifiers that normalised to nothing (counted when the event is
    /// resolved).
    pub unusable: Vec<usize>,
}

impl IdentityConfig {
    /// Prepares `ids` (and the event's `customer_id`, if any) for resolution; an unknown
    /// identifier type rejects the event.
    pub fn prepare(
        &self,
        ids: &[(Arc<str>, String)],
        customer_id: &str,
    ) -> Result<PreparedIds, crate::event::Rejection> {
        let customer_id_type = self.position(CUSTOMER_ID).expect("customer_id is always a type");
        let mut prepared = PreparedIds {
            ids: Vec::with_capacity(ids.len() + 1),
            unusable: Vec::new(),
        };
        for (id_type, raw) in ids {
            let Some(i) = self.position(id_type) else {
                return Err(crate::event::Rejection::IdTypeUnknown {
                    id_type: id_type.to_string(),
                    known: self.names(),
                });
            };
            match self.types[i].normaliser.apply(raw) {
                Some(value) => prepared.ids.push((i, value)),
                None => prepared.unusable.push(i),
            }
        }
        if !customer_id.is_empty() {
            prepared.ids.push((customer_id_type, customer_id.to_owned()));
        }
        // Best-ranked first, the event's own customer_id first among its type (the
        // customer a merge's origin names); one of each.
        let own = |i: usize, v: &str| !(i == customer_id_type && v == customer_id);
        prepared.ids.sort_by(|a, b| {
            self.types[b.0]
                .rank
                .cmp(&self.types[a.0].rank)
                .then_with(|| a.0.cmp(&b.0))
                .then_with(|| own(a.0, &a.1).cmp(&own(b.0, &b.1)))
                .then_with(|| a.1.cmp(&b.1))
        });
        prepared.ids.dedup();
        Ok(prepared)
    }

    /// The customer id an event names: its `customer_id`, or without one the name a new
    /// customer is given after the event's best-ranked identifier (`phone:13800000001`).
    /// A member of a group sends the event to the owner of that customer's partition
    /// ([`crate::kafka::route`]), where no identifier of it names another customer of the
    /// partitions that node owns is exactly the customer resolution makes.
    pub fn named_customer<'a>(&self, customer_id: &'a str, prepared: &PreparedIds) -> Option<Cow<'a, str>> {
        if !customer_id.is_empty() {
            return Some(Cow::Borrowed(customer_id));
        }
        let (i, value) = prepared.ids.first()?;
        Some(Cow::Owned(minted(&self.types[*i].name, value)))
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.types.iter().position(|t| &*t.name == name)
    }

    /// The names of every type, for messages.
    pub fn names(&self) -> String {
        self.types.iter().map(|t| &*t.name).collect::<Vec<_>>().join(", ")
    }
}

/// The id of a customer made for an identifier no customer owned yet.
pub fn minted(id_type: &str, value: &str) -> String {
    format!("{id_type}:{value}")
}

/// The key naming an identifier's owner.
pub fn owner_key(id_type: &str, value: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + id_type.len() + value.len());
    key.push(b'i');
    key.extend_from_slice(id_type.as_bytes());
    key.push(0);
    key.extend_from_slice(value.as_bytes());
    key
}

/// An owner key's value: the canonical customer, and (after a NUL) the customer the
/// identifier first came with when that is another one (an unmerge gives it back there).
pub fn owner_value(canonical: &str, origin: &str) -> Vec<u8> {
    let mut value = canonical.as_bytes().to_vec();
    if origin != canonical {
        value.push(0);
        value.extend_from_slice(origin.as_bytes());
    }
    value
}

/// Reads an owner key's value back into (canonical, origin).
pub fn parse_owner_value(value: &[u8]) -> (&str, &str) {
    let text = std::str::from_utf8(value).unwrap_or_default();
    match text.split_once('\0') {
        Some((canonical, origin)) => (canonical, origin),
        None => (text, text),
    }
}

/// What the [`OwnerCache`] holds for a key of the graph, parsed once when it was read or
/// written (so a lookup allocates nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// The graph has no such key.
    Absent,
    /// An identifier's owner: the canonical customer, and the customer the identifier first
    /// came with (the same `Arc` when that is the canonical one).
    Owner { canonical: Arc<str>, origin: Arc<str> },
    /// Any other value (a customer's [`IdRecord`]), encoded.
    Bytes(Arc<[u8]>),
}

impl Cached {
    /// `value` of graph key `key`, parsed.
    pub fn of(key: &[u8], value: Option<&[u8]>) -> Cached {
        match value {
            None => Cached::Absent,
            Some(v) if key.first() == Some(&b'i') => {
                let (canonical, origin) = parse_owner_value(v);
                let canonical: Arc<str> = Arc::from(canonical);
                let origin = if origin == &*canonical {
                    canonical.clone()
                } else {
                    Arc::from(origin)
                };
                Cached::Owner { canonical, origin }
            }
            Some(v) => Cached::Bytes(Arc::from(v)),
        }
    }
}

/// Owner lookups and records the engine read or wrote lately, so an event's identifiers
/// rarely need a read of the store: two generations, the older dropped when the newer fills
/// half the capacity (recently used entries are carried into the newer one). Written through
/// on every write of the graph; cleared when a commit fails.
///
/// While the graph fits (loaded whole at open, or empty then) and nothing has been dropped,
/// the cache is **complete**: a key it does not hold is known absent, so an identifier
/// never seen before (one of most events' in a growing base) costs no read of the store.
#[derive(Debug, Default)]
pub struct OwnerCache {
    current: foldhash::HashMap<Box<[u8]>, Cached>,
    previous: foldhash::HashMap<Box<[u8]>, Cached>,
    capacity: usize,
    complete: bool,
}

impl OwnerCache {
    pub fn new(capacity: usize) -> OwnerCache {
        OwnerCache {
            capacity,
            ..OwnerCache::default()
        }
    }

    /// A cache holding `entries`, the whole graph's owners and records: complete when they
    /// fit in one generation, else holding as many as fit (lookups fill it as they go).
    pub fn whole(
        capacity: usize,
        entries: impl IntoIterator<Item = Result<(Box<[u8]>, Box<[u8]>), crate::store::StoreError>>,
    ) -> Result<OwnerCache, crate::store::StoreError> {
        let mut cache = OwnerCache::new(capacity);
        for entry in entries {
            let (key, value) = entry?;
            if cache.current.len() + 1 > capacity / 2 {
                return Ok(cache);
            }
            let cached = Cached::of(&key, Some(&value));
            cache.current.insert(key, cached);
        }
        cache.complete = capacity > 0;
        Ok(cache)
    }

    /// What the cache knows of `key`: held (or known absent, when complete), else `None`.
    pub fn get(&mut self, key: &[u8]) -> Option<Cached> {
        if let Some(held) = self.current.get(key) {
            return Some(held.clone());
        }
        match self.previous.remove_entry(key) {
            Some((key, held)) => {
                let found = held.clone();
                self.insert(key, held);
                Some(found)
            }
            None => self.complete.then_some(Cached::Absent),
        }
    }

    pub fn put(&mut self, key: &[u8], value: Option<&[u8]>) {
        self.hold(key, Cached::of(key, value));
    }

    /// [`OwnerCache::put`] with the value parsed already.
    pub fn hold(&mut self, key: &[u8], value: Cached) {
        self.previous.remove(key);
        if self.complete && value == Cached::Absent {
            // Known absent by not being held.
            self.current.remove(key);
            return;
        }
        self.insert(key.into(), value);
    }

    fn insert(&mut self, key: Box<[u8]>, value: Cached) {
        if self.capacity == 0 {
            return;
        }
        if self.current.len() >= self.capacity / 2 {
            if !self.previous.is_empty() {
                // Entries are dropped: from now on a key not held may be in the store.
                self.complete = false;
            }
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, value);
    }

    /// Forgets everything (the store changed beside the cache): lookups read the store again.
    pub fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
        self.complete = false;
    }

    /// True while a key the cache does not hold is known absent.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key of a customer's [`IdRecord`].
pub fn record_key(customer: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + customer.len());
    key.push(b'c');
    key.extend_from_slice(customer.as_bytes());
    key
}

/// Reads an owner key back into its type and value.
pub fn parse_owner_key(key: &[u8]) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(b"i")?;
    let split = rest.iter().position(|b| *b == 0)?;
    let id_type = std::str::from_utf8(&rest[..split]).ok()?;
    let value = std::str::from_utf8(&rest[split + 1..]).ok()?;
    Some((id_type, value))
}

/// One identifier a customer owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdEntry {
    pub id_type: Arc<str>,
    /// Normalised.
    pub value: String,
    /// The customer it was first attached to (kept through merges, so an unmerge knows
    /// which identifiers go back).
    pub origin: Arc<str>,
}

/// What the graph knows of one canonical customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdRecord {
    /// The arrival number of the event that made the record (0 for a customer that had
    /// events under its `customer_id` before any identifier came): older customers survive
    /// a merge between equally ranked ones.
    pub created: u64,
    /// Every identifier the customer owns, in the order they came.
    pub ids: Vec<IdEntry>,
    /// Every customer merged into this one, with the customer it was merged into then
    /// (this one, or one merged into it later): `(absorbed, into)`.
    pub absorbed: Vec<(Arc<str>, Arc<str>)>,
    /// Customers split off this one by hand: never merged with it again by an event.
    pub apart: Vec<Arc<str>>,
}

impl IdRecord {
    /// The record of a customer only ever named by its `customer_id`.
    pub fn implicit(customer: &str) -> IdRecord {
        IdRecord {
            created: 0,
            ids: vec![IdEntry {
                id_type: Arc::from(CUSTOMER_ID),
                value: customer.to_owned(),
                origin: Arc::from(customer),
            }],
            ..IdRecord::default()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.created);
        w.u64(self.ids.len() as u64);
        for e in &self.ids {
            w.str(&e.id_type);
            w.str(&e.value);
            w.str(&e.origin);
        }
        w.u64(self.absorbed.len() as u64);
        for (absorbed, into) in &self.absorbed {
            w.str(absorbed);
            w.str(into);
        }
        w.u64(self.apart.len() as u64);
        for other in &self.apart {
            w.str(other);
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<IdRecord, CodecError> {
        let mut r = Reader::new(bytes);
        let created = r.u64()?;
        let n = r.u64()? as usize;
        let mut ids = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            ids.push(IdEntry {
                id_type: r.arc_str()?,
                value: r.str()?.to_owned(),
                origin: r.arc_str()?,
            });
        }
        let n = r.u64()? as usize;
        let mut absorbed = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            absorbed.push((r.arc_str()?, r.arc_str()?));
        }
        let n = r.u64()? as usize;
        let mut apart = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            apart.push(r.arc_str()?);
        }
        Ok(IdRecord {
            created,
            ids,
            absorbed,
            apart,
        })
    }

    /// How many identifiers of `id_type` the customer owns.
    pub fn count(&self, id_type: &str) -> usize {
        self.ids.iter().filter(|e| &*e.id_type == id_type).count()
    }

    pub fn entry(&self, id_type: &str, value: &str) -> Option<&IdEntry> {
        self.ids
            .iter()
            .find(|e| &*e.id_type == id_type && e.value == value)
    }

    pub fn owns(&self, id_type: &str, value: &str) -> bool {
        self.entry(id_type, value).is_some()
    }

    /// The rank of the customer's best identifier.
    pub fn best_rank(&self, config: &IdentityConfig) -> u32 {
        self.ids
            .iter()
            .filter_map(|e| config.position(&e.id_type).map(|i| config.types[i].rank))
            .max()
            .unwrap_or(0)
    }

    /// `customer` and every customer merged into it before it was merged into this one.
    pub fn subtree(&self, customer: &str) -> Vec<Arc<str>> {
        let mut members: Vec<Arc<str>> = vec![Arc::from(customer)];
        loop {
            let before = members.len();
            for (absorbed, into) in &self.absorbed {
                if members.contains(into) && !members.contains(absorbed) {
                    members.push(absorbed.clone());
                }
            }
            if members.len() == before {
                return members;
            }
        }
    }
}

/// What identity resolution has done, for `GET /v1/identities/stats`: kept in the store
/// with the commits that made it (so a restart or a failed commit leaves it exact).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityStats {
    /// Merges made (one per event or request that joined customers).
    pub merges: u64,
    /// Customers absorbed by those merges.
    pub customers_absorbed: u64,
    /// Customers split off again.
    pub unmerges: u64,
    /// Identifiers attached to customers, per type.
    pub identifiers: std::collections::BTreeMap<String, u64>,
    /// Identifiers not attached, or merges not made, because a type's limit would break,
    /// per type.
    pub limit_hits: std::collections::BTreeMap<String, u64>,
    /// Identifiers that normalised to nothing (dropped, the event kept), per type.
    pub unusable: std::collections::BTreeMap<String, u64>,
    /// Merges not made because the customers were split apart by hand before.
    pub blocked: u64,
}

/// [`IdentityStats`] shared between the engine, which counts, and readers.
#[derive(Debug, Default)]
pub struct IdentityCounts {
    stats: std::sync::Mutex<IdentityStats>,
    /// Changed since the last commit wrote it.
    dirty: std::sync::atomic::AtomicBool,
}

impl IdentityCounts {
    pub fn snapshot(&self) -> IdentityStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the counts with what the store holds (at open, after a failed commit).
    pub fn restore(&self, stored: Option<&[u8]>) {
        let stats = stored
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default();
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        self.dirty.store(false, Ordering::Relaxed);
    }

    /// The counts to write with a commit, if they changed.
    pub fn take_dirty(&self) -> Option<Vec<u8>> {
        self.dirty
            .swap(false, Ordering::Relaxed)
            .then(|| serde_json::to_vec(&self.snapshot()).expect("stats serialise"))
    }

    fn update(&self, change: impl FnOnce(&mut IdentityStats)) {
        change(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn limit_hit(&self, id_type: &str) {
        self.update(|s| *s.limit_hits.entry(id_type.to_owned()).or_default() += 1);
        metrics::counter!("tagstream_identity_limit_hits_total", "type" => id_type.to_owned()).increment(1);
    }

    pub fn unusable(&self, id_type: &str) {
        self.update(|s| *s.unusable.entry(id_type.to_owned()).or_default() += 1);
        metrics::counter!("tagstream_identity_unusable_total", "type" => id_type.to_owned()).increment(1);
    }

    pub fn attached(&self, id_type: &str) {
        self.update(|s| *s.identifiers.entry(id_type.to_owned()).or_default() += 1);
    }

    pub fn merged(&self, absorbed: usize) {
        self.update(|s| {
            s.merges += 1;
            s.customers_absorbed += absorbed as u64;
        });
        metrics::counter!("tagstream_identity_merges_total").increment(1);
    }

    pub fn unmerged(&self) {
        self.update(|s| s.unmerges += 1);
        metrics::counter!("tagstream_identity_unmerges_total").increment(1);
    }

    pub fn blocked(&self) {
        self.update(|s| s.blocked += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phone(raw: &str) -> Option<String> {
        IdentityConfig::default().types[3].normaliser.apply(raw)
    }

    #[test]
    fn one_phone_however_it_is_written() {
        for raw in [
            "13800000001",
            "+86 138 0000 0001",
            "+86-138-0000-0001",
            "0086 13800000001",
            "8613800000001",
            "１３８００００００01",        // full-width digits
            "138\u{200b}0000\u{200b}0001", // zero-width spaces
            " (138) 0000-0001 ",
        ] {
            assert_eq!(phone(raw).as_deref(), Some("13800000001"), "{raw:?}");
        }
        // Another country keeps its code; a home number that merely starts with 86 too.
        assert_eq!(phone("+1 415 555 0100").as_deref(), Some("14155550100"));
        assert_eq!(phone("86123456").as_deref(), Some("86123456"));
        assert_eq!(phone("+86 12"), None);
        assert_eq!(phone("n/a"), None);
    }

    fn bytes(v: &[u8]) -> Option<Cached> {
        Some(Cached::Bytes(Arc::from(v)))
    }

    #[test]
    fn the_owner_cache_keeps_what_was_used_lately_within_its_capacity() {
        let mut cache = OwnerCache::new(4);
        cache.put(b"ca", Some(b"1"));
        cache.put(b"cb", None);
        assert_eq!(cache.get(b"ca"), bytes(b"1"));
        assert_eq!(cache.get(b"cb"), Some(Cached::Absent));
        cache.put(b"cc", Some(b"3"));
        cache.put(b"cd", Some(b"4"));
        // "a" was used last before the newer generation filled: still there, "b" is gone.
        assert_eq!(cache.get(b"ca"), bytes(b"1"));
        cache.put(b"ce", Some(b"5"));
        assert_eq!(cache.get(b"cb"), None);
        assert!(cache.len() <= 4);
        assert!(!cache.is_complete());
        cache.clear();
        assert_eq!(cache.get(b"ca"), None);
    }

    #[test]
    fn owners_are_held_parsed() {
        let mut cache = OwnerCache::new(8);
        cache.put(&owner_key("phone", "138"), Some(&owner_value("a", "b")));
        cache.put(&owner_key("phone", "139"), Some(&owner_value("a", "a")));
        let Some(Cached::Owner { canonical, origin }) = cache.get(&owner_key("phone", "138")) else {
            panic!("an owner")
        };
        assert_eq!((&*canonical, &*origin), ("a", "b"));
        let Some(Cached::Owner { canonical, origin }) = cache.get(&owner_key("phone", "139")) else {
            panic!("an owner")
        };
        assert!(Arc::ptr_eq(&canonical, &origin), "one name, one allocation");
    }

    #[test]
    fn a_whole_graph_that_fits_makes_a_complete_cache_until_something_is_dropped() {
        let entries = |n: usize| {
            (0..n).map(|i| {
                Ok((
                    record_key(&format!("k{i}")).into_boxed_slice(),
                    Box::from(&b"v"[..]),
                ))
            })
        };
        // Too big for one generation: what fits is kept, nothing is known absent.
        let mut cache = OwnerCache::whole(4, entries(3)).unwrap();
        assert!(!cache.is_complete());
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&record_key("k1")), bytes(b"v"));
        assert_eq!(cache.get(b"cnew"), None);

        let mut cache = OwnerCache::whole(8, entries(3)).unwrap();
        assert!(cache.is_complete());
        assert_eq!(cache.get(&record_key("k1")), bytes(b"v"));
        // Not held: known absent, without asking the store.
        assert_eq!(cache.get(b"cnew"), Some(Cached::Absent));
        // A deletion leaves nothing behind.
        cache.put(&record_key("k1"), None);
        assert_eq!(cache.get(&record_key("k1")), Some(Cached::Absent));
        assert_eq!(cache.len(), 2);
        // One rotation keeps everything (the older generation is still asked) ...
        cache.put(b"c1", Some(b"1"));
        cache.put(b"c2", Some(b"2"));
        cache.put(b"c3", Some(b"3"));
        assert!(cache.is_complete());
        assert_eq!(cache.get(&record_key("k2")), bytes(b"v"));
        // ... the next drops what was not used since: no longer complete.
        for key in [&b"c4"[..], b"c5", b"c6", b"c7"] {
            cache.put(key, Some(b"x"));
        }
        assert!(!cache.is_complete());
        assert_eq!(cache.get(b"cnew"), None);
        // An empty graph is complete too; clearing ends it.
        let mut cache = OwnerCache::whole(8, entries(0)).unwrap();
        assert_eq!(cache.get(b"cnew"), Some(Cached::Absent));
        cache.clear();
        assert_eq!(cache.get(b"cnew"), None);
        // No capacity: nothing is ever known.
        let mut cache = OwnerCache::whole(0, entries(0)).unwrap();
        assert_eq!(cache.get(b"cnew"), None);
    }

    #[test]
    fn prepared_identifiers_are_normalised_ranked_and_unique() {
        let config = IdentityConfig::default();
        let ids: Vec<(Arc<str>, String)> = [
            ("device_id", "d-1"),
            ("phone", "+86 138 0000 0001"),
            ("customer_id", "a-2"),
            ("phone", "13800000001"),
            ("email", "n/a"),
            ("customer_id", "a-1"),
        ]
        .into_iter()
        .map(|(t, v)| (Arc::from(t), v.to_owned()))
        .collect();
        let prepared = config.prepare(&ids, "a-9").unwrap();
        let names: Vec<(&str, &str)> = prepared
            .ids
            .iter()
            .map(|(i, v)| (&*config.types[*i].name, v.as_str()))
            .collect();
        // The event's own customer_id first among its type; the phone once; the unusable
        // email left out and named.
        assert_eq!(
            names,
            [
                ("customer_id", "a-9"),
                ("customer_id", "a-1"),
                ("customer_id", "a-2"),
                ("phone", "13800000001"),
                ("device_id", "d-1"),
            ]
        );
        assert_eq!(prepared.unusable, [config.position("email").unwrap()]);
        let unknown = [(Arc::from("fax"), "1".to_owned())];
        assert_eq!(
            config.prepare(&unknown, "").unwrap_err().code(),
            "id_type_unknown"
        );
        assert!(config.prepare(&ids[4..5], "").unwrap().ids.is_empty());
    }

    #[test]
    fn emails_are_lower_cased_and_checked() {
        let email = &IdentityConfig::default().types[4].normaliser;
        assert_eq!(
            email.apply("  Ann.Lee@Example.COM ").as_deref(),
            Some("ann.lee@example.com")
        );
        assert_eq!(
            email.apply("ａｎｎ@example.com").as_deref(),
            Some("ann@example.com")
        );
        for bad in ["ann", "@example.com", "ann@", "a@b@c", "a b@c.d", ""] {
            assert_eq!(email.apply(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn records_and_keys_read_back() {
        let mut record = IdRecord::implicit("c-1");
        record.created = 42;
        record.ids.push(IdEntry {
            id_type: Arc::from("phone"),
            value: "13800000001".into(),
            origin: Arc::from("phone:13800000001"),
        });
        record.absorbed = vec![
            (Arc::from("b"), Arc::from("a")),
            (Arc::from("a"), Arc::from("c-1")),
        ];
        record.apart = vec![Arc::from("z")];
        assert_eq!(IdRecord::decode(&record.encode()).unwrap(), record);
        assert_eq!(record.subtree("a"), [Arc::from("a"), Arc::from("b")]);
        assert_eq!(record.subtree("b"), [Arc::from("b")]);
        assert_eq!(record.count("phone"), 1);
        assert_eq!(record.best_rank(&IdentityConfig::default()), 100);
        assert_eq!(parse_owner_value(&owner_value("a", "a")), ("a", "a"));
        assert_eq!(parse_owner_value(&owner_value("a", "phone:1")), ("a", "phone:1"));
        let key = owner_key("phone", "13800000001");
        assert_eq!(parse_owner_key(&key), Some(("phone", "13800000001")));
        assert_ne!(record_key("x")[0], key[0]);
    }
}
