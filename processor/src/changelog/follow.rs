//! A warm copy of a partition another node owns (a *standby*, `--standby-replicas`, issue
//! #21): read from the state topic once like a restore ([`super::Assembler`]), then kept up
//! to date record by record, each complete delta applied to the copy in the store as it
//! arrives. A take-over then reads only the records after the copy's position.
//!
//! Following applies deltas in the topic's order, which is their commit order: one owner
//! publishes its partition's deltas in commit order, and a new owner numbers its commits
//! after every commit it restored. A delta that breaks that order (or a new baseline, or a
//! delta of another partition count) is not followed: [`Follower::add`] says so, and the
//! copy is read again from the start.
//!
//! Keyed records (a checkpoint) fold deltas the copy has already applied, so their values
//! are not applied again (a fold published after a later delta would put an older value
//! back); they only tell which keys a checkpoint covers. What a take-over of the partition
//! needs beyond the copy's state — the keys last written by delta records, which its first
//! checkpoint publishes as keyed records, and the delta records still in the topic, which
//! it tombstones — is kept here, bounded by a checkpoint's worth of deltas.

use std::collections::{BTreeMap, BTreeSet};

use super::{Assembler, Delta, Family, Fence, Keyed, Restore, MARKER_KEY};

/// Why a copy cannot follow on and is read again from the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartOver(pub String);

impl std::fmt::Display for StartOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A partition's copy being followed: what was read of its topic partition beyond the
/// values the store holds.
#[derive(Debug)]
pub struct Follower {
    pub partition: u32,
    pub partitions: u32,
    /// The topic offset of the next record to read.
    pub next_offset: i64,
    /// The highest commit read (complete or not).
    commit: u64,
    /// The highest commit applied: a complete delta must come after it.
    applied: u64,
    clock: Option<i64>,
    next_pseq: Option<u64>,
    /// Per input, the position of the highest commit that named it.
    positions: BTreeMap<String, (u64, u64)>,
    /// The start of the baseline the copy was read under, if any.
    baseline_from: Option<u64>,
    /// Keys whose last write came from a delta record (not folded by a checkpoint since),
    /// with that delta's commit.
    from_deltas: foldhash::HashMap<(Family, Vec<u8>), u64>,
    /// The delta records read and not tombstoned.
    delta_records: BTreeSet<String>,
    /// Deltas in parts not all read yet: per commit, the part count and the parts read.
    parts: BTreeMap<u64, (usize, BTreeMap<usize, Vec<u8>>)>,
    /// Complete deltas not applied to the copy yet, in order.
    pending: Vec<Delta>,
    /// Which records count: a zombie's after another store's owner mark do not.
    fence: Fence,
}

/// What a take-over of a followed partition starts from, besides the copy's values.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub partition: u32,
    pub partitions: u32,
    /// Deltas in parts whose commit is the highest read count too: the new owner numbers
    /// its commits after them.
    pub commit: u64,
    pub clock: Option<i64>,
    pub next_pseq: Option<u64>,
    pub positions: Vec<(String, u64)>,
    /// The keys last written by delta records, for the new owner's first checkpoint.
    pub from_deltas: Vec<(Family, Vec<u8>)>,
    /// The delta records still in the topic, for that checkpoint to tombstone.
    pub delta_records: Vec<String>,
    /// The checkpoint marker of what was read.
    pub marker: Delta,
}

impl Assembler {
    /// The partition as read so far, and a follower that goes on from `next_offset` (parts
    /// of a delta still being read stay with the follower).
    pub fn into_follower(self, next_offset: i64) -> (Restore, Follower) {
        let restore = self.restore;
        let from = restore.from();
        let follower = Follower {
            partition: restore.partition,
            partitions: restore.partitions,
            next_offset,
            commit: restore.commit,
            applied: restore.commit,
            clock: restore.clock,
            next_pseq: restore.next_pseq,
            positions: restore
                .positions
                .iter()
                .filter(|(_, (commit, _))| *commit >= from)
                .map(|(source, kept)| (source.clone(), *kept))
                .collect(),
            baseline_from: restore.baseline.map(|(_, from)| from),
            from_deltas: restore
                .keys
                .iter()
                .filter(|(_, (_, _, from_delta))| *from_delta)
                .map(|(key, (commit, _, _))| (key.clone(), *commit))
                .collect(),
            delta_records: restore.delta_records.clone(),
            parts: self.parts,
            pending: Vec::new(),
            fence: self.fence,
        };
        (restore, follower)
    }
}

impl Follower {
    /// One record at `offset`, the next in the topic's order: its key, value, the commit in
    /// its header if it has one, and the writer its header names (a record the [`Fence`]
    /// does not admit is passed over). A complete delta joins [`Follower::take_pending`];
    /// `Err` when the copy cannot follow on.
    pub fn add(
        &mut self,
        offset: i64,
        key: &[u8],
        value: Option<&[u8]>,
        commit_header: Option<u64>,
        writer: Option<&[u8]>,
    ) -> Result<(), StartOver> {
        self.next_offset = self.next_offset.max(offset + 1);
        if !self.fence.admits(key, writer) {
            if key.starts_with(b"d/") && value.is_some() {
                // A zombie's delta record: the owner's next checkpoint tombstones it too.
                self.delta_records
                    .insert(String::from_utf8_lossy(key).into_owned());
            }
            return Ok(());
        }
        let shown = || String::from_utf8_lossy(key).into_owned();
        if let Some(keyed) = key.strip_prefix(b"k/") {
            let keyed = Keyed::decode(keyed, value, commit_header)
                .map_err(|e| StartOver(format!("changelog record `{}`: {e}", shown())))?;
            let slot = (keyed.family, keyed.key);
            if self.from_deltas.get(&slot).is_some_and(|&c| c <= keyed.commit) {
                self.from_deltas.remove(&slot);
            }
            self.commit = self.commit.max(keyed.commit);
            return Ok(());
        }
        let Some(value) = value else {
            self.delta_records.remove(shown().as_str());
            return Ok(());
        };
        if key == MARKER_KEY {
            let marker = Delta::decode(value).map_err(|e| StartOver(format!("changelog marker: {e}")))?;
            self.note(&marker);
            return Ok(());
        }
        let bad = || {
            StartOver(format!(
                "changelog record `{}` is neither a delta, a keyed record nor a marker",
                shown()
            ))
        };
        let name = std::str::from_utf8(key).map_err(|_| bad())?;
        let fields: Vec<&str> = name.strip_prefix("d/").ok_or_else(bad)?.split('/').collect();
        let whole = match fields[..] {
            [commit] => {
                commit.parse::<u64>().map_err(|_| bad())?;
                Some(value.to_vec())
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
                if commit <= self.applied {
                    // A part sent again of a delta already applied.
                    return Ok(());
                }
                self.commit = self.commit.max(commit);
                let (count, parts) = self.parts.entry(commit).or_insert((n, BTreeMap::new()));
                if *count != n {
                    return Err(StartOver(format!(
                        "changelog record `{name}`: parts of commit {commit} disagree on their count"
                    )));
                }
                parts.insert(i, value.to_vec());
                (parts.len() == n).then(|| {
                    let (_, parts) = self.parts.remove(&commit).expect("just filled");
                    parts.into_values().flatten().collect()
                })
            }
            _ => return Err(bad()),
        };
        self.delta_records.insert(name.to_owned());
        let Some(whole) = whole else { return Ok(()) };
        let delta =
            Delta::decode(&whole).map_err(|e| StartOver(format!("changelog record `{name}`: {e}")))?;
        if delta.partitions != self.partitions || delta.partition != self.partition {
            return Err(StartOver(format!(
                "a delta of partition {} of {} in the topic partition of {} of {}",
                delta.partition, delta.partitions, self.partition, self.partitions
            )));
        }
        if delta.baseline_from.is_some() {
            return Err(StartOver(format!(
                "a new baseline ends at commit {}",
                delta.commit
            )));
        }
        if delta.commit <= self.applied {
            return Err(StartOver(format!(
                "delta {} follows delta {}: not in commit order",
                delta.commit, self.applied
            )));
        }
        self.applied = delta.commit;
        self.note(&delta);
        for write in &delta.writes {
            self.from_deltas
                .insert((write.family, write.key.clone()), delta.commit);
        }
        self.pending.push(delta);
        Ok(())
    }

    /// Takes in what a delta or marker says besides its writes.
    fn note(&mut self, delta: &Delta) {
        self.commit = self.commit.max(delta.commit);
        self.clock = self.clock.max(delta.clock);
        self.next_pseq = self.next_pseq.max(delta.next_pseq);
        for (source, offset) in &delta.positions {
            let kept = self
                .positions
                .entry(source.clone())
                .or_insert((delta.commit, *offset));
            if delta.commit >= kept.0 {
                *kept = (delta.commit, *offset);
            }
        }
    }

    /// The complete deltas read since the last call, in order.
    pub fn take_pending(&mut self) -> Vec<Delta> {
        std::mem::take(&mut self.pending)
    }

    /// How many records the fence passed over as a zombie's.
    pub fn fenced(&self) -> u64 {
        self.fence.fenced()
    }

    /// How many complete deltas wait to be applied.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// What a take-over starts from, once every pending delta was applied.
    pub fn promotion(&self) -> Promotion {
        let positions: Vec<(String, u64)> = self
            .positions
            .iter()
            .map(|(source, (_, offset))| (source.clone(), *offset))
            .collect();
        let mut from_deltas: Vec<(Family, Vec<u8>)> = self.from_deltas.keys().cloned().collect();
        from_deltas.sort_unstable();
        Promotion {
            partition: self.partition,
            partitions: self.partitions,
            commit: self.commit,
            clock: self.clock,
            next_pseq: self.next_pseq,
            positions: positions.clone(),
            from_deltas,
            delta_records: self.delta_records.iter().cloned().collect(),
            marker: Delta {
                partition: self.partition,
                partitions: self.partitions,
                commit: self.commit,
                clock: self.clock,
                positions,
                writes: Vec::new(),
                baseline_from: self.baseline_from,
                next_pseq: self.next_pseq,
            },
        }
    }
}
