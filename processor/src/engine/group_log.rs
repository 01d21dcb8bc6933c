//! The group's change log (issue #21): on a member of a consumer group, every node's changes
//! as the `tag-changes` topic holds them, read back into this store by
//! [`crate::kafka::group_log`], one entry per `(partition, pseq)` — a change made again by a
//! node that took its partition over lands on the entry its first copy made. Any node
//! answers `GET /v1/changes?cursor=` from it: each partition's changes in their order, the
//! partitions merged by `at`, resumable by a cursor of each partition's last `pseq`.
//!
//! The topic must have the engine's partition count, so that partition P of the topic
//! holds exactly engine partition P's changes, in the order they were numbered (one
//! producer at a time per partition; after a take-over the new owner's first numbers
//! repeat the dead node's last ones). A partition's entries run without a gap from the
//! first the topic still held when this node began reading it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::*;
use crate::store::CF_GROUP_CHANGES;

/// Per partition (the number follows): the last `pseq` held (the partition's entries run
/// from its first to it without a gap).
const META_LAST: &str = "group_log_last:";
/// Per partition: the first `pseq` held (retention or the topic's own start went before).
const META_FIRST: &str = "group_log_first:";
/// Per partition of the topic: the next offset to read.
const META_OFFSET: &str = "group_log_offset:";

/// Positions readers of the group log need kept (a webhook subscription delivered from it):
/// by reader name, each partition's last `pseq` consumed.
#[derive(Debug, Default)]
pub(crate) struct GroupHolds(std::sync::Mutex<std::collections::HashMap<String, Vec<u64>>>);

impl GroupHolds {
    /// The lowest cursor any reader holds at, per partition (`None`: no reader holds).
    fn lowest(&self, partitions: u32) -> Option<Vec<u64>> {
        let holds = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut lowest: Option<Vec<u64>> = None;
        for cursor in holds.values().filter(|c| c.len() == partitions as usize) {
            match &mut lowest {
                None => lowest = Some(cursor.clone()),
                Some(low) => low.iter_mut().zip(cursor).for_each(|(l, c)| *l = (*l).min(*c)),
            }
        }
        lowest
    }
}

/// A record of the changes topic, as the group log keeps it.
#[derive(Debug, Clone)]
pub struct GroupRecord {
    /// The change's partition (the topic's, which is the engine's).
    pub partition: u32,
    pub pseq: u64,
    pub at: i64,
    /// The change as published (JSON).
    pub json: Vec<u8>,
}

/// What [`ReadHandle::group_log_append`] did with a batch of records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupAppend {
    pub added: usize,
    /// A `pseq` already held: a change made again after a take-over.
    pub repeated: usize,
    /// Of those, the ones that are another change than the one held under their number
    /// (another customer, definition, op or `rules_version`): a rule change that reached
    /// a partition's old and new owner at different points of its input
    /// (docs/cluster.md). The first stays; each is logged.
    pub conflicting: usize,
    /// Records whose `pseq` skipped numbers after the partition's last: changes the topic
    /// never got (kept, and logged — they should not exist).
    pub gaps: usize,
}

/// Whether two changes as published (JSON) are one change made twice: the same customer,
/// definition, op and rules version (`seq` is each node's; `at` may differ in wall-clock
/// mode, `cause` where a node took the partition over).
fn same_change(a: &[u8], b: &[u8]) -> bool {
    const FIELDS: [&str; 7] = [
        "customer_id",
        "tag",
        "segment",
        "absorbed",
        "split",
        "op",
        "rules_version",
    ];
    let fields = |json: &[u8]| {
        let value: serde_json::Value = serde_json::from_slice(json).ok()?;
        Some(FIELDS.map(|f| value.get(f).cloned()))
    };
    match (fields(a), fields(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// A page of the group log.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupPage {
    /// The changes (JSON, as published) after the cursor, and the cursor after them.
    Changes { changes: Vec<Vec<u8>>, cursor: Vec<u64> },
    /// The cursor points before what retention (or the topic) left of a partition: the
    /// cursor to start again from, the oldest held.
    Gone { partition: u32, oldest: Vec<u64> },
}

/// The net change of a tag's or segment's members in the group log
/// ([`ReadHandle::group_log_delta`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDelta {
    pub entered: Vec<String>,
    pub exited: Vec<String>,
    /// The cursor of the group log's end the delta runs to.
    pub until: Vec<u64>,
}

/// The fields of a change the group log's readers look at.
#[derive(serde::Deserialize)]
struct Named<'a> {
    #[serde(borrow)]
    tag: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    segment: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    customer_id: Option<std::borrow::Cow<'a, str>>,
    op: Option<std::borrow::Cow<'a, str>>,
}

/// The tag or segment a change (JSON) is of.
fn change_name(json: &[u8]) -> Option<String> {
    let named: Named = serde_json::from_slice(json).ok()?;
    named.tag.or(named.segment).map(|n| n.into_owned())
}

/// A membership change's customer and whether it made them a member.
fn membership_of(json: &[u8]) -> Option<(String, bool)> {
    let named: Named = serde_json::from_slice(json).ok()?;
    Some((named.customer_id?.into_owned(), named.op? == "add"))
}

fn entry_key(partition: u32, pseq: u64) -> [u8; 12] {
    crate::changelog::outbox_key(partition, pseq)
}

fn parse_key(key: &[u8]) -> Option<(u32, u64)> {
    let partition = u32::from_be_bytes(key.get(..4)?.try_into().ok()?);
    let pseq = u64::from_be_bytes(key.get(4..12)?.try_into().ok()?);
    Some((partition, pseq))
}

/// A cursor as the API shows it: `p1.` and each partition's last `pseq`, dot-separated.
pub fn encode_group_cursor(cursor: &[u64]) -> String {
    let numbers: Vec<String> = cursor.iter().map(u64::to_string).collect();
    format!("p1.{}", numbers.join("."))
}

/// Reads a cursor of [`encode_group_cursor`] for a store of `partitions` partitions; `0`
/// is the start of every partition.
pub fn decode_group_cursor(text: &str, partitions: u32) -> Result<Vec<u64>, String> {
    if text == "0" {
        return Ok(vec![0; partitions as usize]);
    }
    let bad = || format!("bad cursor `{text}`: pass back the `cursor` an answer gave, or 0 for the start");
    let numbers = text.strip_prefix("p1.").ok_or_else(bad)?;
    let cursor: Vec<u64> = numbers
        .split('.')
        .map(|n| n.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if cursor.len() != partitions as usize {
        return Err(format!(
            "the cursor names {} partitions and the group has {partitions}",
            cursor.len()
        ));
    }
    Ok(cursor)
}

impl ReadHandle {
    /// Keeps the group log's changes after `cursor` (each partition's last `pseq` consumed)
    /// past retention while `name` has not consumed them; a later call moves the hold.
    pub fn hold_group_log(&self, name: &str, cursor: &[u64]) {
        self.published
            .group_holds
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), cursor.to_vec());
    }

    /// Changes each time records are taken into the group log: a reader waits on it rather
    /// than look again and again.
    pub fn group_log_appended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.group_log_appended.subscribe()
    }

    /// Drops `name`'s hold on the group log.
    pub fn release_group_log(&self, name: &str) {
        self.published
            .group_holds
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    fn group_meta(&self, name: &str, partition: impl std::fmt::Display) -> Result<u64, EngineError> {
        Ok(self.store.meta_u64(&format!("{name}{partition}"))?)
    }

    /// Where the reader of the changes topic goes on from: per topic partition, the next
    /// offset (absent: the topic's start).
    pub fn group_log_offsets(&self) -> Result<BTreeMap<i32, i64>, EngineError> {
        let mut out = BTreeMap::new();
        for partition in 0..self.partitions {
            let next = self.group_meta(META_OFFSET, partition)?;
            if next > 0 {
                out.insert(partition as i32, next as i64);
            }
        }
        Ok(out)
    }

    /// Takes records read from the changes topic, in the topic's order per partition, and
    /// the offsets read up to (per topic partition, the next to read), in one write: a
    /// `pseq` already held is a repeat and goes; the others are kept.
    pub fn group_log_append(
        &self,
        records: &[GroupRecord],
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<GroupAppend, EngineError> {
        let mut wb = WriteBatch::default();
        let mut outcome = GroupAppend::default();
        let mut last: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        let cf = self.store.cf(CF_GROUP_CHANGES);
        for record in records {
            if record.partition >= self.partitions {
                return Err(EngineError::Conflict(format!(
                    "a change of partition {} in a group of {} partitions",
                    record.partition, self.partitions
                )));
            }
            let (first, held) = match last.get(&record.partition) {
                Some(known) => *known,
                None => (
                    self.group_meta(META_FIRST, record.partition)?,
                    self.group_meta(META_LAST, record.partition)?,
                ),
            };
            if held > 0 && record.pseq <= held {
                outcome.repeated += 1;
                let key = entry_key(record.partition, record.pseq);
                // (Compared with the entry held, when retention left it.)
                if let Some(kept) = self.store.get(CF_GROUP_CHANGES, &key)? {
                    let kept = kept.get(8..).unwrap_or_default();
                    if !same_change(kept, &record.json) {
                        outcome.conflicting += 1;
                        tracing::warn!(
                            partition = record.partition,
                            pseq = record.pseq,
                            kept = %String::from_utf8_lossy(kept),
                            left_out = %String::from_utf8_lossy(&record.json),
                            "two different changes carry one number of a partition (a rule change while the partition moved between nodes); the group log keeps the first"
                        );
                    }
                }
                last.insert(record.partition, (first, held));
                continue;
            }
            if held > 0 && record.pseq > held + 1 {
                outcome.gaps += 1;
                tracing::error!(
                    partition = record.partition,
                    after = held,
                    got = record.pseq,
                    "the changes topic skips numbers of a partition: changes were lost before it"
                );
            }
            let mut value = Vec::with_capacity(8 + record.json.len());
            value.extend_from_slice(&record.at.to_be_bytes());
            value.extend_from_slice(&record.json);
            wb.put_cf(cf, entry_key(record.partition, record.pseq), value);
            outcome.added += 1;
            let first = if held == 0 { record.pseq } else { first };
            last.insert(record.partition, (first, record.pseq));
        }
        for (partition, (first, held)) in &last {
            self.store
                .put_meta_u64(&mut wb, &format!("{META_FIRST}{partition}"), *first);
            self.store
                .put_meta_u64(&mut wb, &format!("{META_LAST}{partition}"), *held);
        }
        for (partition, next) in offsets {
            self.store.put_meta_u64(
                &mut wb,
                &format!("{META_OFFSET}{partition}"),
                (*next).max(0) as u64,
            );
        }
        self.store.commit(wb)?;
        if outcome.added > 0 {
            self.published.group_log_appended.send_modify(|n| *n += 1);
        }
        Ok(outcome)
    }

    /// The cursor before the oldest change the group log holds of each partition.
    pub fn group_log_start(&self) -> Result<Vec<u64>, EngineError> {
        (0..self.partitions)
            .map(|p| Ok(self.group_meta(META_FIRST, p)?.saturating_sub(1)))
            .collect()
    }

    /// Up to `limit` changes of the group log after `cursor` (each partition's last `pseq`
    /// seen): each partition's in `pseq` order, the partitions merged by `at` (then
    /// partition), and the cursor after them.
    pub fn group_log_page(&self, cursor: &[u64], limit: usize) -> Result<GroupPage, EngineError> {
        let mut changes = Vec::new();
        let walked = self.group_log_walk(cursor, limit, |json, _| changes.push(json.to_vec()))?;
        Ok(match walked {
            Ok(cursor) => GroupPage::Changes { changes, cursor },
            Err(gone) => gone,
        })
    }

    /// The changes of tag or segment `name` among the next `scan` changes of the group log
    /// after `cursor`, each with the cursor just after it, and the cursor after the scan
    /// (past changes of other names too).
    #[allow(clippy::type_complexity)]
    pub fn group_log_of(
        &self,
        name: &str,
        cursor: &[u64],
        scan: usize,
    ) -> Result<Result<(Vec<(Vec<u8>, Vec<u64>)>, Vec<u64>), GroupPage>, EngineError> {
        let mut matches = Vec::new();
        let walked = self.group_log_walk(cursor, scan, |json, after| {
            if change_name(json).as_deref() == Some(name) {
                matches.push((json.to_vec(), after.to_vec()));
            }
        })?;
        Ok(walked.map(|cursor| (matches, cursor)))
    }

    /// The net change of tag or segment `name`'s members in the group log from `cursor` to
    /// its end: who entered, who exited (by their first and last change after it), and the
    /// cursor of the end.
    pub fn group_log_delta(
        &self,
        name: &str,
        cursor: &[u64],
    ) -> Result<Result<GroupDelta, GroupPage>, EngineError> {
        // Per customer: member before, member after.
        let mut net: BTreeMap<String, (bool, bool)> = BTreeMap::new();
        let mut at = cursor.to_vec();
        loop {
            let (matches, next) = match self.group_log_of(name, &at, 10_000)? {
                Ok(found) => found,
                Err(gone) => return Ok(Err(gone)),
            };
            if next == at {
                break;
            }
            at = next;
            for (json, _) in matches {
                let Some((customer, member)) = membership_of(&json) else {
                    continue;
                };
                net.entry(customer).or_insert((!member, member)).1 = member;
            }
        }
        let (mut entered, mut exited) = (Vec::new(), Vec::new());
        for (customer, (before, after)) in net {
            match (before, after) {
                (false, true) => entered.push(customer),
                (true, false) => exited.push(customer),
                _ => {}
            }
        }
        Ok(Ok(GroupDelta {
            entered,
            exited,
            until: at,
        }))
    }

    /// The cursor of the group log's end: every partition's last change.
    pub fn group_log_end(&self) -> Result<Vec<u64>, EngineError> {
        (0..self.partitions)
            .map(|p| self.group_meta(META_LAST, p))
            .collect()
    }

    /// Walks up to `limit` changes of the group log after `cursor` in the merged order,
    /// giving `visit` each with the cursor just after it; the cursor after the walk, or
    /// [`GroupPage::Gone`].
    fn group_log_walk(
        &self,
        cursor: &[u64],
        limit: usize,
        mut visit: impl FnMut(&[u8], &[u64]),
    ) -> Result<Result<Vec<u64>, GroupPage>, EngineError> {
        if cursor.len() != self.partitions as usize {
            return Err(EngineError::Conflict(format!(
                "a cursor of {} partitions for a group of {}",
                cursor.len(),
                self.partitions
            )));
        }
        let mut firsts = Vec::with_capacity(cursor.len());
        for partition in 0..self.partitions {
            firsts.push(self.group_meta(META_FIRST, partition)?);
        }
        if let Some(partition) = (0..self.partitions).find(|p| {
            let first = firsts[*p as usize];
            first > 1 && cursor[*p as usize] + 1 < first
        }) {
            let oldest = firsts.iter().map(|f| f.saturating_sub(1)).collect();
            return Ok(Err(GroupPage::Gone { partition, oldest }));
        }
        // Each partition's next entries, merged by (at, partition).
        let mut heads = BinaryHeap::new();
        let mut scans: Vec<_> = (0..self.partitions)
            .map(|p| {
                self.store
                    .scan_from(CF_GROUP_CHANGES, &entry_key(p, cursor[p as usize] + 1))
            })
            .collect();
        let mut next_of = |p: u32| -> Result<Option<(i64, u64, Vec<u8>)>, EngineError> {
            let Some(item) = scans[p as usize].next() else {
                return Ok(None);
            };
            let (key, value) = item?;
            match parse_key(&key) {
                Some((partition, pseq)) if partition == p && value.len() >= 8 => {
                    let at = i64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
                    Ok(Some((at, pseq, value[8..].to_vec())))
                }
                _ => Ok(None),
            }
        };
        for p in 0..self.partitions {
            if let Some((at, pseq, json)) = next_of(p)? {
                heads.push(Reverse((at, p, pseq, json)));
            }
        }
        let mut cursor = cursor.to_vec();
        let mut walked = 0;
        while walked < limit {
            let Some(Reverse((_, p, pseq, json))) = heads.pop() else {
                break;
            };
            cursor[p as usize] = pseq;
            visit(&json, &cursor);
            walked += 1;
            if let Some((at, pseq, json)) = next_of(p)? {
                heads.push(Reverse((at, p, pseq, json)));
            }
        }
        Ok(Ok(cursor))
    }

    /// Drops, per partition, the group log's entries older than `retention` allows: by
    /// age, at the node's clock, and past `max_entries` spread over the partitions — never
    /// one a reader holds ([`ReadHandle::hold_group_log`]). Returns the entries deleted.
    pub fn group_log_trim(&self, retention: LogRetention) -> Result<u64, EngineError> {
        let age_floor = self.now().saturating_sub(retention.max_age_ms);
        let per_partition = retention.max_entries.div_ceil(u64::from(self.partitions.max(1)));
        let held = self.published.group_holds.lowest(self.partitions);
        let mut deleted = 0;
        for partition in 0..self.partitions {
            // The first change a reader still needs.
            let needed = held.as_ref().map_or(u64::MAX, |h| h[partition as usize] + 1);
            let first = self.group_meta(META_FIRST, partition)?;
            let last = self.group_meta(META_LAST, partition)?;
            if last == 0 {
                continue;
            }
            let by_count = (last + 1).saturating_sub(per_partition);
            let mut until = first;
            for item in self
                .store
                .scan_from(CF_GROUP_CHANGES, &entry_key(partition, first))
            {
                let (key, value) = item?;
                let Some((p, pseq)) = parse_key(&key) else { break };
                if p != partition || pseq >= last || pseq >= needed {
                    // The last entry stays: it is where the partition's numbers go on.
                    break;
                }
                let at = value
                    .get(..8)
                    .map_or(i64::MAX, |b| i64::from_be_bytes(b.try_into().expect("8")));
                if pseq >= by_count && at >= age_floor {
                    break;
                }
                until = pseq + 1;
            }
            if until > first {
                let mut wb = WriteBatch::default();
                let cf = self.store.cf(CF_GROUP_CHANGES);
                wb.delete_range_cf(cf, entry_key(partition, first), entry_key(partition, until));
                self.store
                    .put_meta_u64(&mut wb, &format!("{META_FIRST}{partition}"), until);
                self.store.commit(wb)?;
                deleted += until - first;
            }
        }
        Ok(deleted)
    }
}
