//! The state changelog's deltas (issue #21, step 2 of `docs/design/cluster.md`): what each
//! commit did to a partition's state, in a form another store restores the partition from.
//!
//! With [`crate::EngineConfig::changelog`] on, a commit that writes a partition's state puts
//! one [`Delta`] for that partition into the `outbox` column family, in the same
//! `WriteBatch` as the state: the partition, the commit's number, the input positions of
//! that partition after the commit (the `kafka:TOPIC:P` offsets of Kafka partition `P`), and
//! the last put or delete of every key of the partition the commit wrote in `customers`,
//! `events`, `timers`, `dedup` and `identities`. Commits are numbered by one counter per
//! store that a restore moves past the restored partition's numbers, so a partition's deltas
//! are numbered in the order they were committed, whichever store wrote them.
//!
//! What is derived is not carried: the window chunks (built exactly from the retained events
//! at a customer's first evaluation, as after a partition import), the customer numbers and
//! the membership index (each store's own), the change log and the dead letters (the
//! writing store's). Entries of the identity graph belong to the partition of the customer
//! they describe (`c`, `s`; `m` and `n`, a customer handed over to a survivor in another
//! store and its frame while undelivered; `t`, a handover its survivor took) or, for an owner entry (`i`), of its canonical customer
//! ([`Family::partition_of_write`]).
//!
//! Restoring ([`Restore`]) is order-free and idempotent: per key, the write of the highest
//! commit wins, so deltas read in any order, or read twice, give the same state.

use std::collections::BTreeMap;

use crate::codec::{CodecError, Reader, Writer};
use crate::partition::partition_of;
use crate::store::{Store, CF_CUSTOMERS, CF_DEDUP, CF_EVENTS, CF_IDENTITIES, CF_TIMERS};
use crate::writes::{cf_id, SortedWrites};

pub mod follow;

/// The column family the deltas wait in until they are published.
pub const CF_OUTBOX: &str = "outbox";

/// The delta encoding's version (its first byte).
const FORMAT: u8 = 1;

/// A column family whose keys are a partition's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Customers,
    Events,
    Timers,
    Dedup,
    Identities,
}

impl Family {
    pub const ALL: [Family; 5] = [
        Family::Customers,
        Family::Events,
        Family::Timers,
        Family::Dedup,
        Family::Identities,
    ];

    pub fn cf_name(self) -> &'static str {
        match self {
            Family::Customers => CF_CUSTOMERS,
            Family::Events => CF_EVENTS,
            Family::Timers => CF_TIMERS,
            Family::Dedup => CF_DEDUP,
            Family::Identities => CF_IDENTITIES,
        }
    }

    fn tag(self) -> u8 {
        match self {
            Family::Customers => 1,
            Family::Events => 2,
            Family::Timers => 3,
            Family::Dedup => 4,
            Family::Identities => 5,
        }
    }

    fn from_tag(tag: u8) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.tag() == tag)
    }

    /// The bytes a key's partition is the hash of: the customer id in the key, or for an
    /// identity graph owner entry the identifier. `None` for `dedup` keys (an event id: their
    /// partition is their event's customer's, which the writer names) and for keys of no
    /// known shape.
    pub fn owner(self, key: &[u8]) -> Option<&[u8]> {
        match self {
            Family::Customers => Some(key),
            Family::Events => {
                let len = u32::from_be_bytes(key.get(..4)?.try_into().ok()?) as usize;
                key.get(4..4 + len)
            }
            Family::Timers => key.get(8..),
            Family::Dedup => None,
            Family::Identities => match key.first()? {
                b'c' | b's' | b'i' | b'm' | b'n' => key.get(1..),
                // A handover a survivor took: `t` SURVIVOR NUL FRAME-ID; in a group, what a
                // merge kept for an unmerge: `u` SURVIVOR NUL ABSORBED; a split's frame not
                // yet delivered: `p` SURVIVOR NUL ID; a split request to send on from a
                // customer's store: `q` CUSTOMER NUL ID.
                b't' | b'u' | b'p' | b'q' => {
                    let rest = key.get(1..)?;
                    rest.get(..rest.iter().position(|b| *b == 0)?)
                }
                _ => None,
            },
        }
    }
}

impl Family {
    /// The partition a write of `key` belongs to: its owner's ([`Family::owner`]), except
    /// an identity graph owner entry (`i…`), which belongs with its canonical customer, so
    /// that it moves with that customer's partition: the customer named in `value`, or for
    /// a delete in the value it deletes (`deleted`, read from the store). With `resolver`
    /// (a group resolving identity in one partition, [`crate::EngineConfig::resolver`]) the
    /// whole graph — owners (`i`), records (`c`) and the resolver's outbox (`r`) — is
    /// partition 0's.
    pub fn partition_of_write(
        self,
        key: &[u8],
        value: Option<&[u8]>,
        deleted: impl FnOnce() -> Option<Vec<u8>>,
        (partitions, resolver): (u32, bool),
    ) -> Option<u32> {
        if resolver && self == Family::Identities && matches!(key.first(), Some(b'i' | b'c' | b'r')) {
            return Some(0);
        }
        if self == Family::Identities && key.first() == Some(&b'i') {
            let canonical = |value: &[u8]| {
                let (canonical, _) = crate::identity::parse_owner_value(value);
                partition_of(canonical.as_bytes(), partitions)
            };
            return match value {
                Some(value) => Some(canonical(value)),
                None => deleted().map(|old| canonical(&old)),
            };
        }
        self.owner(key).map(|owner| partition_of(owner, partitions))
    }
}

/// One put (`value` set) or delete of a partition's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaWrite {
    pub family: Family,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// What one commit did to one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    pub partition: u32,
    /// The store's partition count when it was written: a delta restores only into a
    /// store that hashes customers the same way.
    pub partitions: u32,
    pub commit: u64,
    /// The engine's clock after the commit: a restore starts no earlier.
    pub clock: Option<i64>,
    /// Input positions after the commit (`kafka:TOPIC:P` with `P` this partition).
    pub positions: Vec<(String, u64)>,
    /// In key order, one per key.
    pub writes: Vec<DeltaWrite>,
    /// Set on the last delta of a *baseline* (every key the partition held, written when
    /// the changelog was turned on for a store that already had data): the commit of the
    /// baseline's first delta. Everything before that commit is superseded: a key no delta
    /// from it on wrote is not the partition's.
    pub baseline_from: Option<u64>,
    /// The `pseq` the partition's next change gets ([`crate::Change::pseq`]), after the
    /// commit. (Written after everything else, and only when set: deltas of stores from
    /// before it read as they were.)
    pub next_pseq: Option<u64>,
}

/// What a delta says besides its writes.
struct Header<'a> {
    partition: u32,
    partitions: u32,
    commit: u64,
    clock: Option<i64>,
    positions: &'a [(String, u64)],
    baseline_from: Option<u64>,
    next_pseq: Option<u64>,
}

/// Encodes a delta into `w`: `writes` in key order, `count` of them.
fn encode_into<'a>(
    w: &mut Writer,
    header: &Header<'_>,
    count: usize,
    writes: impl Iterator<Item = (Family, &'a [u8], Option<&'a [u8]>)>,
) {
    w.u8(FORMAT);
    w.u64(u64::from(header.partition));
    w.u64(u64::from(header.partitions));
    w.u64(header.commit);
    w.opt_i64(header.clock);
    w.u64(header.positions.len() as u64);
    for (source, offset) in header.positions {
        w.str(source);
        w.u64(*offset);
    }
    w.u64(count as u64);
    for (family, key, value) in writes {
        w.u8(family.tag());
        w.bytes(key);
        match value {
            Some(value) => {
                w.u8(1);
                w.bytes(value);
            }
            None => w.u8(0),
        }
    }
    match header.baseline_from {
        Some(from) => {
            w.u8(1);
            w.u64(from);
        }
        None => w.u8(0),
    }
    if let Some(next) = header.next_pseq {
        w.u8(1);
        w.u64(next);
    }
}

impl Delta {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        let header = Header {
            partition: self.partition,
            partitions: self.partitions,
            commit: self.commit,
            clock: self.clock,
            positions: &self.positions,
            baseline_from: self.baseline_from,
            next_pseq: self.next_pseq,
        };
        let writes = self
            .writes
            .iter()
            .map(|write| (write.family, &write.key[..], write.value.as_deref()));
        encode_into(&mut w, &header, self.writes.len(), writes);
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Delta, CodecError> {
        let mut r = Reader::new(bytes);
        if r.u8()? != FORMAT {
            return Err(CodecError("a changelog delta of an unknown format"));
        }
        let partition = u32::try_from(r.u64()?).map_err(|_| CodecError("bad partition"))?;
        let partitions = u32::try_from(r.u64()?).map_err(|_| CodecError("bad partition count"))?;
        if partition >= partitions {
            return Err(CodecError("a delta's partition is not below its partition count"));
        }
        let commit = r.u64()?;
        let clock = r.opt_i64()?;
        let mut positions = Vec::new();
        for _ in 0..r.len()? {
            positions.push((r.str()?.to_owned(), r.u64()?));
        }
        let mut writes = Vec::new();
        for _ in 0..r.len()? {
            let family = Family::from_tag(r.u8()?).ok_or(CodecError("a delta write of an unknown family"))?;
            let key = r.bytes()?.to_vec();
            let value = match r.u8()? {
                0 => None,
                1 => Some(r.bytes()?.to_vec()),
                _ => return Err(CodecError("a delta write neither put nor delete")),
            };
            writes.push(DeltaWrite { family, key, value });
        }
        let baseline_from = match r.u8()? {
            0 => None,
            1 => Some(r.u64()?),
            _ => return Err(CodecError("a delta's baseline flag is neither set nor unset")),
        };
        if baseline_from.is_some_and(|from| from > commit) {
            return Err(CodecError("a baseline that starts after its own end"));
        }
        let next_pseq = match r.is_empty() {
            true => None,
            false => match r.u8()? {
                1 => Some(r.u64()?),
                _ => return Err(CodecError("a delta's pseq flag is not set")),
            },
        };
        if !r.is_empty() {
            return Err(CodecError("bytes after a delta's end"));
        }
        Ok(Delta {
            partition,
            partitions,
            commit,
            clock,
            positions,
            writes,
            baseline_from,
            next_pseq,
        })
    }
}

/// The `outbox` key of a delta: partition and commit, big-endian, so a partition's deltas
/// are read in commit order.
pub fn outbox_key(partition: u32, commit: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&partition.to_be_bytes());
    key[4..].copy_from_slice(&commit.to_be_bytes());
    key
}

/// The partition of a `kafka:TOPIC:P` input position, when it is one of `partitions`.
pub fn position_partition(source: &str, partitions: u32) -> Option<u32> {
    let rest = source.strip_prefix("kafka:")?;
    let (_, partition) = rest.rsplit_once(':')?;
    partition.parse::<u32>().ok().filter(|p| *p < partitions)
}

/// A key of a partition's state: its column family and key.
type StateKey = (Family, Vec<u8>);

/// One write of a commit to a partition's key, borrowed from the commit's writes.
struct Borrowed<'w> {
    partition: u32,
    family: Family,
    key: &'w [u8],
    value: Option<&'w [u8]>,
}

/// Collects a commit's writes into one delta per partition written, borrowing them (no copy
/// of a key or value until the delta is encoded).
pub struct DeltaBuilder<'w> {
    partitions: u32,
    /// The graph is partition 0's ([`Family::partition_of_write`]).
    resolver: bool,
    /// The partition families' handles' identities.
    families: Vec<(usize, Family)>,
    /// The `meta` family's, where the commit's input positions are.
    meta: usize,
    writes: Vec<Borrowed<'w>>,
    positions: BTreeMap<u32, Vec<(String, u64)>>,
}

impl<'w> DeltaBuilder<'w> {
    pub fn new(store: &Store, (partitions, resolver): (u32, bool)) -> DeltaBuilder<'w> {
        DeltaBuilder {
            partitions,
            resolver,
            families: Family::ALL
                .into_iter()
                .map(|f| (cf_id(store.cf(f.cf_name())), f))
                .collect(),
            meta: cf_id(store.cf(crate::store::CF_META)),
            writes: Vec::new(),
            positions: BTreeMap::new(),
        }
    }

    /// Adds one part of the commit's writes (parts in the order the commit applies them:
    /// a later write to a key replaces an earlier one), and the input positions among them.
    /// `dedup_partition` names the partition of a `dedup` key's event; `identity_entry`
    /// reads an identity graph entry as the store holds it before the commit (whose
    /// customer a delete of it belongs with, [`Family::partition_of_write`]).
    pub fn add(
        &mut self,
        writes: &'w SortedWrites,
        dedup_partition: impl Fn(&[u8]) -> Option<u32>,
        identity_entry: impl Fn(&[u8]) -> Option<Vec<u8>>,
    ) {
        for (cf, key, value) in writes.ops() {
            if cf == self.meta {
                let source = key.strip_prefix(crate::engine::META_OFFSET_PREFIX.as_bytes());
                if let (Some(source), Some(value)) = (source, value) {
                    if let (Ok(source), Ok(offset)) = (std::str::from_utf8(source), Reader::new(value).u64())
                    {
                        self.position(source, offset);
                    }
                }
                continue;
            }
            let Some(&(_, family)) = self.families.iter().find(|(id, _)| *id == cf) else {
                continue;
            };
            let partition = match family {
                Family::Dedup => match dedup_partition(key) {
                    Some(p) => p,
                    None => continue,
                },
                _ => match family.partition_of_write(
                    key,
                    value,
                    || identity_entry(key),
                    (self.partitions, self.resolver),
                ) {
                    Some(p) => p,
                    None if family == Family::Identities && value.is_none() && key.first() == Some(&b'i') => {
                        // The delete of an entry the store does not hold yet (put earlier in
                        // this commit): whichever partition that put went to, this is the
                        // key's last write there.
                        for partition in 0..self.partitions {
                            self.writes.push(Borrowed {
                                partition,
                                family,
                                key,
                                value,
                            });
                        }
                        continue;
                    }
                    None => continue,
                },
            };
            self.writes.push(Borrowed {
                partition,
                family,
                key,
                value,
            });
        }
    }

    /// An input position the commit moved: a partition whose Kafka partition moved gets a
    /// delta even when none of its keys changed (its events were duplicates or rejected), so
    /// a restore resumes after them.
    fn position(&mut self, source: &str, offset: u64) {
        if let Some(p) = position_partition(source, self.partitions) {
            self.positions
                .entry(p)
                .or_default()
                .push((source.to_owned(), offset));
        }
    }

    /// Encodes the deltas, each numbered `commit` and written at `clock`: `encode(partition,
    /// writer)` is called once per partition with something to say, and fills `writer`
    /// with that partition's delta.
    pub fn finish(
        mut self,
        commit: u64,
        clock: impl Fn(u32) -> Option<i64>,
        next_pseq: impl Fn(u32) -> Option<u64>,
        mut emit: impl FnMut(u32, &dyn Fn(&mut Writer)),
    ) {
        // By partition, family and key; a key's writes stay in the order issued (stable).
        self.writes
            .sort_by(|a, b| (a.partition, a.family, a.key).cmp(&(b.partition, b.family, b.key)));
        // The last write of each key.
        let mut last: Vec<&Borrowed<'w>> = Vec::with_capacity(self.writes.len());
        for (i, write) in self.writes.iter().enumerate() {
            let next = self.writes.get(i + 1);
            if next
                .is_some_and(|n| (n.partition, n.family, n.key) == (write.partition, write.family, write.key))
            {
                continue;
            }
            last.push(write);
        }
        let mut partitions: Vec<u32> = last.iter().map(|w| w.partition).collect();
        partitions.extend(self.positions.keys());
        partitions.sort_unstable();
        partitions.dedup();
        let no_positions = Vec::new();
        for partition in partitions {
            let from = last.partition_point(|w| w.partition < partition);
            let to = last.partition_point(|w| w.partition <= partition);
            let writes = &last[from..to];
            let header = Header {
                partition,
                partitions: self.partitions,
                commit,
                clock: clock(partition),
                positions: self.positions.get(&partition).unwrap_or(&no_positions),
                baseline_from: None,
                next_pseq: next_pseq(partition),
            };
            emit(partition, &|w: &mut Writer| {
                encode_into(
                    w,
                    &header,
                    writes.len(),
                    writes.iter().map(|b| (b.family, b.key, b.value)),
                )
            });
        }
    }
}

/// A partition's state gathered from its deltas, in any order: per key, the write of the
/// highest commit.
#[derive(Debug, Default)]
pub struct Restore {
    pub partition: u32,
    pub partitions: u32,
    /// The highest commit read.
    pub commit: u64,
    /// The latest clock a delta was written at.
    pub clock: Option<i64>,
    /// The greatest next `pseq` a delta carried.
    pub next_pseq: Option<u64>,
    /// Deltas counted, checkpoint markers read, keyed records read (tombstones too), and
    /// records read in all (deltas' tombstones and parts too).
    pub deltas: u64,
    pub checkpoints: u64,
    pub keyed: u64,
    pub records: u64,
    /// Per key, the highest commit that wrote it, what it wrote, and whether a delta (not a
    /// keyed record) did (hashed: a restore meets each key once per delta that wrote it,
    /// and reads them in order once).
    keys: foldhash::HashMap<StateKey, (u64, Option<Vec<u8>>, bool)>,
    /// The keys of the delta records read and not tombstoned: what a take-over folds.
    delta_records: std::collections::BTreeSet<String>,
    /// Per input, the position of the highest commit that named it.
    positions: BTreeMap<String, (u64, u64)>,
    /// The latest complete baseline read: its last commit and its first.
    baseline: Option<(u64, u64)>,
    /// Deltas left out because a store with another partition count wrote them.
    other_counts: u64,
}

impl Restore {
    pub fn new(partition: u32, partitions: u32) -> Restore {
        Restore {
            partition,
            partitions,
            ..Restore::default()
        }
    }

    /// Adds one delta; refuses one of another partition. One written under another
    /// partition count (before `[engine] partitions` changed) is left out: a baseline under
    /// this count supersedes it ([`Restore::check`]).
    pub fn add(&mut self, delta: Delta) -> Result<(), String> {
        self.take(delta, false)
    }

    /// Adds a checkpoint's marker ([`Restore::marker`]): a delta without writes, counted as
    /// a checkpoint.
    pub fn add_marker(&mut self, marker: Delta) -> Result<(), String> {
        self.take(marker, true)
    }

    fn take(&mut self, delta: Delta, marker: bool) -> Result<(), String> {
        if delta.partitions != self.partitions {
            self.other_counts += 1;
            return Ok(());
        }
        if delta.partition != self.partition {
            return Err(format!(
                "a delta of partition {} of {} cannot restore partition {} of {}",
                delta.partition, delta.partitions, self.partition, self.partitions
            ));
        }
        if marker {
            self.checkpoints += 1;
        } else {
            self.deltas += 1;
        }
        self.commit = self.commit.max(delta.commit);
        self.clock = self.clock.max(delta.clock);
        self.next_pseq = self.next_pseq.max(delta.next_pseq);
        if let Some(from) = delta.baseline_from {
            if self.baseline.is_none_or(|(end, _)| delta.commit > end) {
                self.baseline = Some((delta.commit, from));
            }
        }
        for (source, offset) in delta.positions {
            let kept = self.positions.entry(source).or_insert((delta.commit, offset));
            if delta.commit >= kept.0 {
                *kept = (delta.commit, offset);
            }
        }
        for write in delta.writes {
            let slot = self
                .keys
                .entry((write.family, write.key))
                .or_insert((delta.commit, None, true));
            if delta.commit >= slot.0 {
                *slot = (delta.commit, write.value, true);
            }
        }
        Ok(())
    }

    /// Whether what was read is the partition: deltas of another partition count were left
    /// out only if a baseline under this count followed them.
    pub fn check(&self) -> Result<(), String> {
        if self.other_counts > 0 && self.baseline.is_none() {
            return Err(format!(
                "{} deltas were written under another partition count and no baseline of {} partitions follows them: the partition cannot be restored from this topic",
                self.other_counts, self.partitions
            ));
        }
        Ok(())
    }

    /// The first commit that counts: the start of the latest complete baseline (0 without).
    fn from(&self) -> u64 {
        self.baseline.map_or(0, |(_, from)| from)
    }

    /// The keys the partition holds (deletes left out), in family and key order.
    pub fn values(&self) -> impl Iterator<Item = (Family, &[u8], &[u8])> {
        let from = self.from();
        let mut values: Vec<(Family, &[u8], &[u8])> = self
            .keys
            .iter()
            .filter_map(|((family, key), (commit, value, _))| {
                value
                    .as_deref()
                    .filter(|_| *commit >= from)
                    .map(|v| (*family, &key[..], v))
            })
            .collect();
        values.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        values.into_iter()
    }

    /// The keys the deltas last deleted, and those a later baseline left out, in family
    /// and key order.
    pub fn deletes(&self) -> impl Iterator<Item = (Family, &[u8])> {
        let from = self.from();
        let mut deletes: Vec<(Family, &[u8])> = self
            .keys
            .iter()
            .filter(|(_, (commit, value, _))| value.is_none() || *commit < from)
            .map(|((family, key), _)| (*family, &key[..]))
            .collect();
        deletes.sort_unstable();
        deletes.into_iter()
    }

    /// The input positions to resume from.
    pub fn positions(&self) -> impl Iterator<Item = (&str, u64)> {
        let from = self.from();
        self.positions
            .iter()
            .filter(move |(_, (commit, _))| *commit >= from)
            .map(|(source, (_, offset))| (source.as_str(), *offset))
    }

    /// One key as a checkpoint's keyed record carries it ([`Checkpoint`]).
    pub fn add_keyed(&mut self, record: Keyed) {
        self.keyed += 1;
        if record.partitions != self.partitions {
            self.other_counts += 1;
            return;
        }
        self.commit = self.commit.max(record.commit);
        let slot = self
            .keys
            .entry((record.family, record.key))
            .or_insert((record.commit, None, false));
        if record.commit >= slot.0 {
            *slot = (record.commit, record.value, false);
        }
    }

    /// A commit read only in part (its writer died producing it): no longer counted, but
    /// its number is used, so the store restored here numbers its own commits after it.
    fn saw_incomplete(&mut self, commit: u64) {
        self.commit = self.commit.max(commit);
    }

    /// Every key read, with the commit that last wrote it and what it holds: `None` when
    /// deleted, or left out by a later baseline (then counted as deleted at the baseline's
    /// start). In no particular order.
    pub fn keyed(&self) -> impl Iterator<Item = Keyed> + '_ {
        let from = self.from();
        self.keys.iter().map(move |((family, key), (commit, value, _))| {
            let superseded = *commit < from;
            Keyed {
                partitions: self.partitions,
                family: *family,
                key: key.clone(),
                commit: if superseded { from } else { *commit },
                value: if superseded { None } else { value.clone() },
            }
        })
    }

    /// What a store that takes the partition over (restored it to own it from now on)
    /// keeps so that its first checkpoint can tombstone the delta records it read — which
    /// are in no store's outbox any more: every key whose last write came from a delta
    /// record (a deleted or superseded one as a delete), in key order, and those records'
    /// keys ([`take_over_deltas`] numbers the writes). Keys last written by keyed records
    /// are in the topic already.
    pub fn take_over_writes(&self) -> (Vec<DeltaWrite>, Vec<String>) {
        let from = self.from();
        let mut writes: Vec<DeltaWrite> = self
            .keys
            .iter()
            .filter(|(_, (_, _, from_delta))| *from_delta)
            .map(|((family, key), (written, value, _))| DeltaWrite {
                family: *family,
                key: key.clone(),
                value: value.clone().filter(|_| *written >= from),
            })
            .collect();
        writes.sort_unstable_by(|a, b| (a.family, &a.key).cmp(&(b.family, &b.key)));
        (writes, self.delta_records.iter().cloned().collect())
    }

    /// The checkpoint marker of what was read: the highest commit, the clock, the input
    /// positions and the baseline, as a delta without writes.
    pub fn marker(&self) -> Delta {
        Delta {
            partition: self.partition,
            partitions: self.partitions,
            commit: self.commit,
            clock: self.clock,
            positions: self.positions().map(|(s, o)| (s.to_owned(), o)).collect(),
            writes: Vec::new(),
            baseline_from: self.baseline.map(|(_, from)| from),
            next_pseq: self.next_pseq,
        }
    }
}

/// `writes` (in key order) as deltas numbered from `first_commit`, each of about
/// `max_bytes` at most, otherwise like `template`: what a store taking a partition over
/// keeps in its outbox for its first checkpoint ([`Restore::take_over_writes`]).
pub fn take_over_deltas(
    writes: Vec<DeltaWrite>,
    first_commit: u64,
    max_bytes: usize,
    template: &Delta,
) -> Vec<Delta> {
    let mut chunks: Vec<Vec<DeltaWrite>> = vec![Vec::new()];
    let mut bytes = 0;
    for write in writes {
        let size = write.key.len() + write.value.as_ref().map_or(0, Vec::len);
        if bytes + size > max_bytes && !chunks.last().is_some_and(Vec::is_empty) {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        chunks.last_mut().expect("one at least").push(write);
    }
    chunks
        .into_iter()
        .zip(first_commit..)
        .map(|(writes, commit)| Delta {
            commit,
            writes,
            baseline_from: None,
            ..template.clone()
        })
        .collect()
}

/// The keyed record format's version (the first byte of its value).
const KEYED_FORMAT: u8 = 2;

/// The header a keyed tombstone carries its commit in (a tombstone has no value).
pub const COMMIT_HEADER: &str = "tagstream-commit";

/// The key of the checkpoint marker: one per topic partition, the latest kept.
pub const MARKER_KEY: &[u8] = b"c";

/// One key of a partition's state as a checkpoint publishes it: a Kafka record keyed
/// `k/` + the partition count (`u32`, big-endian) + the family + the key, so that
/// compaction keeps its latest value; a delete is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    pub partitions: u32,
    pub family: Family,
    pub key: Vec<u8>,
    pub commit: u64,
    pub value: Option<Vec<u8>>,
}

impl Keyed {
    pub fn record_key(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(7 + self.key.len());
        key.extend_from_slice(b"k/");
        key.extend_from_slice(&self.partitions.to_be_bytes());
        key.push(self.family.tag());
        key.extend_from_slice(&self.key);
        key
    }

    /// The record's value: `None` for a tombstone (its commit then goes in
    /// [`COMMIT_HEADER`]).
    pub fn record_value(&self) -> Option<Vec<u8>> {
        let value = self.value.as_ref()?;
        let mut w = Writer::new();
        w.u8(KEYED_FORMAT);
        w.u64(self.commit);
        w.bytes(value);
        Some(w.buf)
    }

    /// Reads a keyed record back: `key` without its `k/`, the value (or the tombstone's
    /// commit header).
    fn decode(key: &[u8], value: Option<&[u8]>, commit_header: Option<u64>) -> Result<Keyed, CodecError> {
        let partitions = u32::from_be_bytes(
            key.get(..4)
                .ok_or(CodecError("a keyed record's key is too short"))?
                .try_into()
                .expect("4 bytes"),
        );
        let family = key
            .get(4)
            .and_then(|t| Family::from_tag(*t))
            .ok_or(CodecError("a keyed record of an unknown family"))?;
        let (commit, value) = match value {
            Some(value) => {
                let mut r = Reader::new(value);
                if r.u8()? != KEYED_FORMAT {
                    return Err(CodecError("a keyed record of an unknown format"));
                }
                let commit = r.u64()?;
                let value = r.bytes()?.to_vec();
                if !r.is_empty() {
                    return Err(CodecError("bytes after a keyed record's end"));
                }
                (commit, Some(value))
            }
            None => (
                commit_header.ok_or(CodecError("a keyed tombstone without its commit header"))?,
                None,
            ),
        };
        Ok(Keyed {
            partitions,
            family,
            key: key[5..].to_vec(),
            commit,
            value,
        })
    }
}

/// A checkpoint of a partition: the deltas a publisher has had confirmed since its last
/// checkpoint, folded (with that checkpoint's marker) into one value per key. Published as
/// keyed records, then the marker ([`Restore::marker`]); once the broker confirmed those,
/// tombstones for the folded deltas' records, so a compacted topic keeps one record per key
/// plus the deltas after the last checkpoint.
pub struct Checkpoint {
    pub fold: Restore,
    /// The folded deltas' record keys (`d/COMMIT` or its parts), to tombstone.
    pub delta_records: Vec<String>,
    /// The highest commit folded: the outbox keeps only the deltas after it.
    pub upto: u64,
}

impl Checkpoint {
    /// Starts from the previous checkpoint's marker, if any.
    pub fn new(partition: u32, partitions: u32, previous: Option<Delta>) -> Checkpoint {
        let mut fold = Restore::new(partition, partitions);
        if let Some(marker) = previous {
            // A marker of this partition's count never fails; one of another is left out.
            let _ = fold.add_marker(marker);
        }
        Checkpoint {
            fold,
            delta_records: Vec::new(),
            upto: 0,
        }
    }

    /// Folds in a published delta (`bytes`, commit `commit`). Deltas of another partition
    /// count are only tombstoned: a baseline of this count supersedes them.
    pub fn add(&mut self, commit: u64, bytes: &[u8]) -> Result<(), CodecError> {
        let delta = Delta::decode(bytes)?;
        self.delta_records.extend(
            records(commit, bytes, MAX_RECORD_BYTES)
                .into_iter()
                .map(|(key, _)| key),
        );
        self.upto = self.upto.max(commit);
        // A delta of another partition count is left out by the fold; none of another
        // partition is in this one's outbox.
        let _ = self.fold.add(delta);
        Ok(())
    }
}

/// The largest record value a delta is published in; a larger delta is split into parts
/// (Kafka's default `message.max.bytes` is 1 MiB).
pub const MAX_RECORD_BYTES: usize = 900 << 10;

/// The Kafka records of commit `commit`'s delta `bytes`: one keyed `d/COMMIT`, or, larger
/// than `max` bytes, parts keyed `d/COMMIT/I/N` (I from 0 to N - 1).
pub fn records(commit: u64, bytes: &[u8], max: usize) -> Vec<(String, &[u8])> {
    if bytes.len() <= max {
        return vec![(format!("d/{commit}"), bytes)];
    }
    let parts: Vec<&[u8]> = bytes.chunks(max.max(1)).collect();
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| (format!("d/{commit}/{i}/{n}"), part))
        .collect()
}

/// The key prefix of an owner mark: a record a store writes to a partition of the state
/// topic when it starts owning the partition, before it reads the partition, naming itself
/// (its writer id, in the writer header) as the partition's only writer from there on
/// ([`Fence`]). Keys are unique (`o/WRITER/NONCE`), so compaction keeps every mark.
pub const OWNER_MARK_PREFIX: &[u8] = b"o/";

/// Which records of a state topic partition count, read in offset order: after an owner
/// mark, only those its writer wrote. Another store's records there were written by a
/// member that no longer owned the partition — a *zombie*, paused past its session while
/// its records were on their way — and are left out, wherever a reader meets them; the
/// topic's order alone decides, as the broker wrote it.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    owner: Option<Vec<u8>>,
    fenced: u64,
}

impl Fence {
    /// Whether the record keyed `key`, written by `writer` (its writer header), is state to
    /// read: not a mark (a mark makes its writer the owner), and not written by another
    /// store than the last mark's.
    pub fn admits(&mut self, key: &[u8], writer: Option<&[u8]>) -> bool {
        if key.starts_with(OWNER_MARK_PREFIX) {
            self.owner = Some(writer.unwrap_or_default().to_vec());
            return false;
        }
        match &self.owner {
            Some(owner) if writer != Some(&owner[..]) => {
                self.fenced += 1;
                metrics::counter!("tagstream_kafka_state_records_fenced_total").increment(1);
                false
            }
            _ => true,
        }
    }

    /// How many records were left out as a zombie's.
    pub fn fenced(&self) -> u64 {
        self.fenced
    }
}

/// Reads a changelog topic partition's records into a [`Restore`]: a delta in parts counts
/// once all of them are read; one whose parts were not all published (its writer died
/// midway) is left out, so its input is consumed again. Records fed through
/// [`Assembler::add_written`] in offset order pass its [`Fence`] first; [`Assembler::add`]
/// takes them in any order.
pub struct Assembler {
    restore: Restore,
    fence: Fence,
    /// Deltas in parts not all read yet: per commit, the part count and the parts read.
    parts: BTreeMap<u64, (usize, BTreeMap<usize, Vec<u8>>)>,
    assembled: std::collections::BTreeSet<u64>,
}

impl Assembler {
    pub fn new(partition: u32, partitions: u32) -> Assembler {
        Assembler {
            restore: Restore::new(partition, partitions),
            fence: Fence::default(),
            parts: BTreeMap::new(),
            assembled: Default::default(),
        }
    }

    /// The next record in the topic's order, with the writer its header names: left out
    /// when the [`Fence`] does not admit it, otherwise [`Assembler::add`].
    pub fn add_written(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        commit_header: Option<u64>,
        writer: Option<&[u8]>,
    ) -> Result<(), String> {
        if self.fence.admits(key, writer) {
            return self.add(key, value, commit_header);
        }
        self.restore.records += 1;
        if key.starts_with(b"d/") && value.is_some() {
            // A zombie's delta record: the owner's next checkpoint tombstones it too.
            self.restore
                .delta_records
                .insert(String::from_utf8_lossy(key).into_owned());
        }
        Ok(())
    }

    /// How many records the fence left out as a zombie's.
    pub fn fenced(&self) -> u64 {
        self.fence.fenced()
    }

    /// One record: its key, value, and the commit in its [`COMMIT_HEADER`] if it has one.
    /// A delta's or marker's tombstone is skipped; a keyed record's is a delete; an owner
    /// mark is not state.
    pub fn add(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        commit_header: Option<u64>,
    ) -> Result<(), String> {
        self.restore.records += 1;
        if key.starts_with(OWNER_MARK_PREFIX) {
            return Ok(());
        }
        let shown = String::from_utf8_lossy(key).into_owned();
        if let Some(keyed) = key.strip_prefix(b"k/") {
            let keyed = Keyed::decode(keyed, value, commit_header)
                .map_err(|e| format!("changelog record `{shown}`: {e}"))?;
            self.restore.add_keyed(keyed);
            return Ok(());
        }
        let bad = || format!("changelog record `{shown}` is neither a delta, a keyed record nor a marker");
        let Some(value) = value else {
            // A delta record tombstoned by a checkpoint: nothing for a take-over to fold.
            self.restore.delta_records.remove(shown.as_str());
            return Ok(());
        };
        if key == MARKER_KEY {
            let marker = Delta::decode(value).map_err(|e| format!("changelog marker: {e}"))?;
            return self.restore.add_marker(marker);
        }
        let key = std::str::from_utf8(key).map_err(|_| bad())?;
        let fields: Vec<&str> = key.strip_prefix("d/").ok_or_else(bad)?.split('/').collect();
        self.restore.delta_records.insert(key.to_owned());
        let decode =
            |bytes: &[u8]| Delta::decode(bytes).map_err(|e| format!("changelog record `{shown}`: {e}"));
        match fields[..] {
            [commit] => {
                commit.parse::<u64>().map_err(|_| bad())?;
                self.restore.add(decode(value)?)
            }
            [commit, i, n] => {
                let (commit, i, n) = (
                    commit.parse::<u64>().map_err(|_| bad())?,
                    i.parse::<usize>().map_err(|_| bad())?,
                    n.parse::<usize>().map_err(|_| bad())?,
                );
                if i >= n {
                    return Err(bad());
                }
                if self.assembled.contains(&commit) {
                    // A part sent again: its delta is already in.
                    return Ok(());
                }
                let (count, parts) = self.parts.entry(commit).or_insert((n, BTreeMap::new()));
                if *count != n {
                    return Err(format!(
                        "changelog record `{shown}`: parts of commit {commit} disagree on their count"
                    ));
                }
                parts.insert(i, value.to_vec());
                if parts.len() == n {
                    let (_, parts) = self.parts.remove(&commit).expect("just filled");
                    let whole: Vec<u8> = parts.into_values().flatten().collect();
                    self.restore.add(decode(&whole)?)?;
                    self.assembled.insert(commit);
                }
                Ok(())
            }
            _ => Err(bad()),
        }
    }

    /// The restore, and how many deltas were left out because parts were missing.
    pub fn finish(mut self) -> (Restore, usize) {
        for &commit in self.parts.keys() {
            self.restore.saw_incomplete(commit);
        }
        (self.restore, self.parts.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(family: Family, key: &[u8], value: &[u8]) -> DeltaWrite {
        DeltaWrite {
            family,
            key: key.to_vec(),
            value: Some(value.to_vec()),
        }
    }

    #[test]
    fn a_delta_reads_back_as_written_and_refuses_what_is_not_one() {
        let delta = Delta {
            partition: 2,
            partitions: 4,
            commit: 17,
            clock: Some(-5),
            positions: vec![("kafka:events:2".into(), 1234)],
            writes: vec![
                put(Family::Customers, b"alice", b"record"),
                DeltaWrite {
                    family: Family::Timers,
                    key: b"\x80\0\0\0\0\0\0\x01alice".to_vec(),
                    value: None,
                },
            ],
            baseline_from: Some(15),
            next_pseq: None,
        };
        let bytes = delta.encode();
        assert_eq!(Delta::decode(&bytes).unwrap(), delta);
        assert!(Delta::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Delta::decode(&longer).is_err());
        let mut other_format = bytes;
        other_format[0] = 9;
        assert!(Delta::decode(&other_format).is_err());
    }

    #[test]
    fn keys_name_their_owner() {
        let event_key = crate::store::event_key("bob", 5, 7);
        assert_eq!(Family::Events.owner(&event_key), Some(&b"bob"[..]));
        let timer_key = crate::store::timer_key(-3, "carol");
        assert_eq!(Family::Timers.owner(&timer_key), Some(&b"carol"[..]));
        assert_eq!(Family::Customers.owner(b"dave"), Some(&b"dave"[..]));
        assert_eq!(Family::Identities.owner(b"cerin"), Some(&b"erin"[..]));
        assert_eq!(Family::Identities.owner(b"x"), None);
        for prefix in [b't', b'u', b'p', b'q'] {
            let key = [&[prefix][..], b"frank\0split-1"].concat();
            assert_eq!(Family::Identities.owner(&key), Some(&b"frank"[..]));
        }
        assert_eq!(Family::Identities.owner(b"ufrank"), None);
        assert_eq!(Family::Dedup.owner(b"event-1"), None);
        assert_eq!(Family::Events.owner(b"\0\0\0\x09ab"), None);
    }

    #[test]
    fn positions_name_kafka_partitions_only() {
        assert_eq!(position_partition("kafka:events:3", 4), Some(3));
        assert_eq!(position_partition("kafka:a:b:1", 4), Some(1));
        assert_eq!(position_partition("kafka:events:4", 4), None);
        assert_eq!(position_partition("file:events.ndjson", 4), None);
    }

    /// A record of a state topic partition: key, value, writer.
    type TopicRecord = (String, Option<Vec<u8>>, Vec<u8>);

    /// After an owner mark, only its writer's records count, for a restore and for a copy
    /// followed record by record alike: a zombie's later records (the same commit numbers
    /// as the new owner's, other values) are left out, wherever they fall.
    #[test]
    fn after_an_owner_mark_only_its_writers_records_count() {
        let delta = |commit, value: &[u8], offset| {
            Delta {
                partition: 0,
                partitions: 1,
                commit,
                clock: Some(commit as i64),
                positions: vec![("kafka:t:0".into(), offset)],
                writes: vec![put(Family::Customers, b"a", value)],
                baseline_from: None,
                next_pseq: None,
            }
            .encode()
        };
        let mark = |writer: &[u8]| {
            (
                format!("o/{}/1", String::from_utf8_lossy(writer)),
                None,
                writer.to_vec(),
            )
        };
        let record = |commit, value: &[u8], offset, writer: &[u8]| {
            (
                format!("d/{commit}"),
                Some(delta(commit, value, offset)),
                writer.to_vec(),
            )
        };
        // `a` owns and writes 1; `b` takes over at its mark and writes 2 and 3 while `a`,
        // paused past its session, still sends its 2; `a` takes the partition back and
        // writes 4 while `b` still sends a 4 of its own.
        let topic: Vec<TopicRecord> = vec![
            record(1, b"a1", 10, b"a"),
            mark(b"b"),
            record(2, b"b2", 20, b"b"),
            record(2, b"zombie", 15, b"a"),
            record(3, b"b3", 30, b"b"),
            mark(b"a"),
            record(4, b"a4", 40, b"a"),
            record(4, b"zombie", 35, b"b"),
            record(9, b"zombie", 45, b"b"),
        ];
        let restored = |records: &[TopicRecord]| {
            let mut assembler = Assembler::new(0, 1);
            for (key, value, writer) in records {
                assembler
                    .add_written(key.as_bytes(), value.as_deref(), None, Some(writer))
                    .unwrap();
            }
            let fenced = assembler.fenced();
            let (restore, _) = assembler.finish();
            // The new owner's first checkpoint tombstones the zombie's delta records too.
            let tombstoned = restore.take_over_writes().1;
            assert_eq!(
                tombstoned.contains(&"d/9".to_owned()),
                records.iter().any(|r| r.0 == "d/9"),
                "{tombstoned:?}"
            );
            let value = restore.values().map(|(_, _, v)| v.to_vec()).collect::<Vec<_>>();
            let positions: Vec<u64> = restore.positions().map(|(_, o)| o).collect();
            (value, positions, restore.commit, fenced)
        };
        assert_eq!(restored(&topic), (vec![b"a4".to_vec()], vec![40], 4, 3));
        assert_eq!(
            restored(&topic[..5]),
            (vec![b"b3".to_vec()], vec![30], 3, 1),
            "before the take-back"
        );
        // Without a mark (a topic written before marks existed), every record counts.
        let unmarked: Vec<_> = topic.iter().filter(|r| !r.0.starts_with("o/")).cloned().collect();
        assert_eq!(restored(&unmarked[..3]).0, vec![b"zombie".to_vec()]);

        // A copy read up to `b`'s mark and followed from there skips the same records.
        let mut assembler = Assembler::new(0, 1);
        for (key, value, writer) in &topic[..2] {
            assembler
                .add_written(key.as_bytes(), value.as_deref(), None, Some(writer))
                .unwrap();
        }
        let (_, mut follower) = assembler.into_follower(2);
        let mut applied = Vec::new();
        for (i, (key, value, writer)) in topic.iter().enumerate().skip(2) {
            follower
                .add(i as i64, key.as_bytes(), value.as_deref(), None, Some(writer))
                .unwrap();
            applied.extend(follower.take_pending().into_iter().map(|d| d.commit));
        }
        assert_eq!(applied, vec![2, 3, 4], "each commit once, the owner's");
        assert_eq!((follower.fenced(), follower.next_offset), (3, topic.len() as i64));
        assert!(follower.promotion().delta_records.contains(&"d/9".to_owned()));
    }

    /// Whatever the order the deltas come in, and read twice, each key ends as its highest
    /// commit left it; positions too.
    #[test]
    fn a_restore_is_order_free_and_idempotent() {
        let delta = |commit, writes: Vec<DeltaWrite>, offset| Delta {
            partition: 0,
            partitions: 1,
            commit,
            clock: Some(commit as i64 * 10),
            positions: vec![("kafka:t:0".into(), offset)],
            writes,
            baseline_from: None,
            next_pseq: None,
        };
        let deltas = [
            delta(
                1,
                vec![
                    put(Family::Customers, b"a", b"a1"),
                    put(Family::Dedup, b"e1", b"t"),
                ],
                10,
            ),
            delta(
                2,
                vec![
                    put(Family::Customers, b"a", b"a2"),
                    put(Family::Customers, b"b", b"b2"),
                ],
                20,
            ),
            delta(
                3,
                vec![DeltaWrite {
                    family: Family::Customers,
                    key: b"b".to_vec(),
                    value: None,
                }],
                30,
            ),
        ];
        let orders: [&[usize]; 4] = [&[0, 1, 2], &[2, 1, 0], &[1, 2, 0, 1], &[2, 0, 2, 1, 0]];
        for order in orders {
            let mut restore = Restore::new(0, 1);
            for &i in order {
                restore.add(deltas[i].clone()).unwrap();
            }
            let values: Vec<_> = restore
                .values()
                .map(|(f, k, v)| (f, k.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(
                values,
                vec![
                    (Family::Customers, b"a".to_vec(), b"a2".to_vec()),
                    (Family::Dedup, b"e1".to_vec(), b"t".to_vec()),
                ],
                "order {order:?}"
            );
            assert_eq!(restore.deletes().count(), 1);
            assert_eq!(restore.positions().collect::<Vec<_>>(), vec![("kafka:t:0", 30)]);
            assert_eq!((restore.commit, restore.clock), (3, Some(30)));
        }
        // Another partition: refused. Another partition count: left out, and without a
        // baseline of this count after it, the restore says it is not whole.
        let mut other = Restore::new(1, 2);
        assert!(other
            .add(Delta {
                partitions: 2,
                ..deltas[0].clone()
            })
            .is_err());
        other.add(deltas[0].clone()).unwrap();
        assert!(other.check().unwrap_err().contains("another partition count"));

        // A baseline (commits 5 and 6) supersedes what came before it: `a` and `e1`, not in
        // it, are no longer the partition's; its positions win; a delta after it counts.
        let mut baseline = vec![
            delta(5, vec![put(Family::Customers, b"c", b"c5")], 50),
            delta(6, vec![put(Family::Customers, b"d", b"d6")], 60),
            delta(7, vec![put(Family::Customers, b"c", b"c7")], 70),
        ];
        baseline[1].baseline_from = Some(5);
        let all: Vec<Delta> = deltas.iter().chain(&baseline).cloned().collect();
        for order in [[0usize, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]] {
            let mut restore = Restore::new(0, 1);
            for i in order {
                restore.add(all[i].clone()).unwrap();
            }
            let values: Vec<_> = restore
                .values()
                .map(|(_, k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(
                values,
                vec![(b"c".to_vec(), b"c7".to_vec()), (b"d".to_vec(), b"d6".to_vec())]
            );
            let deletes: Vec<_> = restore.deletes().map(|(_, k)| k.to_vec()).collect();
            assert_eq!(deletes, vec![b"a".to_vec(), b"b".to_vec(), b"e1".to_vec()]);
            assert_eq!(restore.positions().collect::<Vec<_>>(), vec![("kafka:t:0", 70)]);
        }
        // Without its last delta, a baseline is not one: what came before still counts.
        let mut restore = Restore::new(0, 1);
        for d in deltas.iter().chain(&baseline[..1]) {
            restore.add(d.clone()).unwrap();
        }
        assert_eq!(restore.values().count(), 3);
    }

    /// A delta larger than a record goes in parts, counted once all are read (in any order,
    /// some twice); a delta missing a part is left out.
    #[test]
    fn deltas_in_parts_count_once_whole() {
        let big = Delta {
            partition: 1,
            partitions: 2,
            commit: 7,
            clock: None,
            positions: vec![("kafka:t:1".into(), 99)],
            writes: (0..50)
                .map(|i| put(Family::Events, format!("k{i}").as_bytes(), &[i as u8; 40]))
                .collect(),
            baseline_from: None,
            next_pseq: None,
        };
        let small = Delta {
            commit: 8,
            writes: vec![put(Family::Customers, b"z", b"zz")],
            positions: vec![],
            ..big.clone()
        };
        let backwards = Delta {
            baseline_from: Some(9),
            next_pseq: None,
            ..small.clone()
        };
        assert!(Delta::decode(&backwards.encode()).is_err());
        let big_bytes = big.encode();
        let parts = records(7, &big_bytes, 500);
        assert!(parts.len() > 3, "{}", parts.len());
        assert_eq!(parts[0].0, format!("d/7/0/{}", parts.len()));
        let small_bytes = small.encode();
        assert_eq!(
            records(8, &small_bytes, 500),
            vec![("d/8".to_owned(), &small_bytes[..])]
        );

        let mut assembler = Assembler::new(1, 2);
        for (key, value) in parts.iter().rev().chain(parts.iter().take(2)) {
            assembler.add(key.as_bytes(), Some(value), None).unwrap();
        }
        assembler.add(b"d/8", Some(&small_bytes), None).unwrap();
        assembler.add(b"d/8", None, None).unwrap();
        let (restore, incomplete) = assembler.finish();
        assert_eq!((restore.deltas, incomplete), (2, 0));
        assert_eq!(restore.values().count(), 51);

        // Every part but one: the delta is left out.
        let mut assembler = Assembler::new(1, 2);
        for (key, value) in &parts[1..] {
            assembler.add(key.as_bytes(), Some(value), None).unwrap();
        }
        let (restore, incomplete) = assembler.finish();
        assert_eq!((restore.deltas, incomplete), (0, 1));
        assert_eq!(restore.values().count(), 0);

        let mut assembler = Assembler::new(1, 2);
        for bad in [&b"x/1"[..], b"d/notanumber", b"d/1/3/3", b"d/1/2"] {
            assert!(assembler.add(bad, Some(&small_bytes), None).is_err(), "{bad:?}");
        }
    }

    use ::tests::compacted;

    /// A topic partition as a publisher leaves it.
    type Topic = Vec<::tests::LogRecord>;

    /// Publishes a checkpoint of `outbox` (drained) onto `previous`, as the publisher does.
    fn checkpoint(topic: &mut Topic, outbox: &mut Vec<Delta>, previous: Option<Delta>) -> Delta {
        let mut checkpoint = Checkpoint::new(0, 1, previous);
        for delta in outbox.drain(..) {
            checkpoint.add(delta.commit, &delta.encode()).unwrap();
        }
        for keyed in checkpoint.fold.keyed() {
            let header = keyed.value.is_none().then_some(keyed.commit);
            topic.push((keyed.record_key(), keyed.record_value(), header));
        }
        let marker = checkpoint.fold.marker();
        topic.push((MARKER_KEY.to_vec(), Some(marker.encode()), None));
        for key in checkpoint.delta_records {
            topic.push((key.into_bytes(), None, None));
        }
        marker
    }

    /// What a topic restores: the keys held, the positions to resume from, the commit.
    /// Keys and values, input positions, and the highest commit.
    type Restored = (Vec<(Vec<u8>, Vec<u8>)>, Vec<(String, u64)>, u64);

    fn restored(topic: &Topic) -> Restored {
        let mut assembler = Assembler::new(0, 1);
        for (key, value, commit) in topic {
            assembler.add(key, value.as_deref(), *commit).unwrap();
        }
        let (restore, _) = assembler.finish();
        restore.check().unwrap();
        (
            restore
                .values()
                .map(|(_, k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
            restore.positions().map(|(s, o)| (s.to_owned(), o)).collect(),
            restore.commit,
        )
    }

    /// Checkpoints fold deltas into keyed records and a marker; the topic they leave —
    /// whole, or compacted with or without its tombstones — restores what the deltas alone
    /// do. A checkpoint of deltas that name no input position, or no baseline, keeps the
    /// previous marker's; a delta whose parts were not all published is not counted, but
    /// its number is passed.
    #[test]
    fn checkpoints_restore_like_the_deltas_they_fold_whole_or_compacted() {
        let delete = |key: &[u8]| DeltaWrite {
            family: Family::Customers,
            key: key.to_vec(),
            value: None,
        };
        let delta = |commit, writes, offset: Option<u64>| Delta {
            partition: 0,
            partitions: 1,
            commit,
            clock: Some(commit as i64),
            positions: offset.map(|o| ("kafka:t:0".to_owned(), o)).into_iter().collect(),
            writes,
            baseline_from: None,
            next_pseq: None,
        };
        // Left by an earlier time the changelog was on: superseded by the baseline below.
        let old = Keyed {
            partitions: 1,
            family: Family::Customers,
            key: b"old".to_vec(),
            commit: 0,
            value: Some(b"o".to_vec()),
        };
        let mut topic: Topic = vec![(old.record_key(), old.record_value(), None)];
        let mut every: Vec<Delta> = Vec::new();
        let mut outbox: Vec<Delta> = Vec::new();
        let publish = |topic: &mut Topic, outbox: &mut Vec<Delta>, every: &mut Vec<Delta>, delta: Delta| {
            for (key, value) in records(delta.commit, &delta.encode(), MAX_RECORD_BYTES) {
                topic.push((key.into_bytes(), Some(value.to_vec()), None));
            }
            every.push(delta.clone());
            outbox.push(delta);
        };
        let baseline = Delta {
            baseline_from: Some(1),
            next_pseq: None,
            ..delta(
                1,
                vec![
                    put(Family::Customers, b"a", b"a1"),
                    put(Family::Customers, b"x", b"x1"),
                ],
                Some(10),
            )
        };
        // Committed while the changelog was off, after that earlier time: the outbox kept
        // it, and the baseline that starts the changelog again leaves its key out.
        publish(
            &mut topic,
            &mut outbox,
            &mut every,
            delta(0, vec![put(Family::Customers, b"gone", b"g")], None),
        );
        publish(&mut topic, &mut outbox, &mut every, baseline);
        publish(
            &mut topic,
            &mut outbox,
            &mut every,
            delta(
                2,
                vec![
                    put(Family::Customers, b"a", b"a2"),
                    put(Family::Customers, b"b", b"b2"),
                ],
                Some(20),
            ),
        );
        let first = checkpoint(&mut topic, &mut outbox, None);
        assert_eq!((first.commit, first.baseline_from), (2, Some(1)));
        // Written through HTTP: no input position.
        publish(
            &mut topic,
            &mut outbox,
            &mut every,
            delta(3, vec![delete(b"x"), put(Family::Customers, b"c", b"c3")], None),
        );
        publish(
            &mut topic,
            &mut outbox,
            &mut every,
            delta(4, vec![put(Family::Customers, b"a", b"a4")], None),
        );
        let second = checkpoint(&mut topic, &mut outbox, Some(first));
        assert_eq!(second.positions, vec![("kafka:t:0".to_owned(), 20)]);
        assert_eq!((second.commit, second.baseline_from), (4, Some(1)));

        let expected = |every: &[Delta]| {
            let mut restore = Restore::new(0, 1);
            for d in every {
                restore.add(d.clone()).unwrap();
            }
            let values: Vec<_> = restore
                .values()
                .map(|(_, k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            let positions: Vec<_> = restore.positions().map(|(s, o)| (s.to_owned(), o)).collect();
            (values, positions)
        };
        let check = |topic: &Topic, every: &[Delta], commit: u64| {
            let (values, positions) = expected(every);
            assert_eq!(values.len(), 3, "{values:?}");
            let backwards: Topic = topic.iter().rev().cloned().collect();
            for (name, view) in [
                ("whole", topic.clone()),
                ("whole, read backwards", backwards),
                ("compacted", compacted(topic, true)),
                ("compacted without tombstones", compacted(topic, false)),
            ] {
                assert_eq!(
                    restored(&view),
                    (values.clone(), positions.clone(), commit),
                    "{name}"
                );
            }
        };
        check(&topic, &every, 4);

        // A delta after the last checkpoint; then one in parts of which only some were
        // published (its writer died).
        publish(
            &mut topic,
            &mut outbox,
            &mut every,
            delta(
                5,
                vec![delete(b"b"), put(Family::Customers, b"d", b"d5")],
                Some(50),
            ),
        );
        let big = delta(
            6,
            (0..40)
                .map(|i| put(Family::Customers, format!("big{i}").as_bytes(), &[7; 64]))
                .collect(),
            Some(60),
        );
        let big_bytes = big.encode();
        let parts = records(6, &big_bytes, 1000);
        assert!(parts.len() > 2);
        for (key, value) in &parts[..parts.len() - 1] {
            topic.push((key.clone().into_bytes(), Some(value.to_vec()), None));
        }
        check(&topic, &every, 6);
        // Compacted, the topic holds a record per key written before the last checkpoint
        // (`old`, `a`, `b`, `c`; `x` deleted, `gone` superseded), the marker, and what
        // follows the checkpoint.
        assert_eq!(compacted(&topic, false).len(), 4 + 1 + 1 + parts.len() - 1);
    }
}
