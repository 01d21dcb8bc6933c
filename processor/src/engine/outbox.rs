//! The state changelog on the engine's side ([`crate::changelog`]): each commit's deltas put
//! into the `outbox` beside the state they describe, read back in commit order, and a
//! partition restored from deltas into this store.

use super::*;
use crate::changelog::{outbox_key, DeltaBuilder, Family, Restore, CF_OUTBOX};
use crate::partition::partition_of;
use crate::writes::cf_id;

impl Engine {
    /// The outbox writes of a commit whose writes are `writes` (in the order they apply):
    /// one delta per partition written or whose Kafka position moved, numbered with the
    /// next commit number, which is counted in the same writes. Empty when there is none.
    pub(super) fn changelog_deltas(
        &mut self,
        writes: &[SortedWrites],
        dedup_partitions: &foldhash::HashMap<String, u32>,
    ) -> SortedWrites {
        let mut builder = DeltaBuilder::new(&self.store, self.config.partitions);
        let meta = cf_id(self.store.cf(CF_META));
        for part in writes {
            builder.add(part, |event_id| {
                std::str::from_utf8(event_id)
                    .ok()
                    .and_then(|id| dedup_partitions.get(id).copied())
            });
            for (cf, key, value) in part.ops() {
                let source = key.strip_prefix(META_OFFSET_PREFIX.as_bytes());
                if let (true, Some(source), Some(value)) = (cf == meta, source, value) {
                    if let (Ok(source), Ok(offset)) = (std::str::from_utf8(source), Reader::new(value).u64())
                    {
                        builder.position(source, offset);
                    }
                }
            }
        }
        let mut out = SortedWrites::default();
        let deltas = builder.finish(self.counters.next_commit, self.counters.clock);
        if deltas.is_empty() {
            return out;
        }
        let cf = self.store.cf(CF_OUTBOX);
        for delta in &deltas {
            out.put_cf(cf, outbox_key(delta.partition, delta.commit), delta.encode());
        }
        self.counters.next_commit += 1;
        self.store
            .put_meta_u64(&mut out, META_COMMIT, self.counters.next_commit);
        out
    }

    /// Restores a partition of another store (or of this one, after it was dropped) from
    /// its changelog deltas: its customers' records, retained events, timers, dedup entries
    /// and identity graph entries as the highest commit read left them, and the input
    /// positions to resume from. Refused whole if this store already holds a customer of
    /// that partition, or hashes customers to another number of partitions. Commits made
    /// here afterwards are numbered after the restored ones.
    pub fn restore_partition(&mut self, restore: &Restore) -> Result<PartitionSummary, EngineError> {
        self.settle();
        let (partition, partitions) = (restore.partition, self.config.partitions);
        if restore.partitions != partitions {
            return Err(EngineError::Conflict(format!(
                "the changelog is of a store with {} partitions; this one has {partitions}: nothing was restored",
                restore.partitions
            )));
        }
        let counts = self.reader().partition_counts(partitions)?;
        if counts.get(partition as usize).copied().unwrap_or(0) > 0 {
            return Err(EngineError::Conflict(format!(
                "this store already holds {} customers of partition {partition}: drop them first; nothing was restored",
                counts[partition as usize]
            )));
        }
        let mut summary = PartitionSummary {
            partition,
            partitions,
            ..Default::default()
        };
        let mut wb = WriteBatch::default();
        MembershipIndex::forget_checkpoint(&self.store, &mut wb);
        let mut timers = Vec::new();
        let mut max_arrival = None;
        for (family, key) in restore.deletes() {
            wb.delete_cf(self.store.cf(family.cf_name()), key);
        }
        for (family, key, value) in restore.values() {
            let cf = self.store.cf(family.cf_name());
            match family {
                Family::Customers => {
                    let id = std::str::from_utf8(key)
                        .map_err(|_| EngineError::Conflict("a changelog customer id is not UTF-8".into()))?;
                    if partition_of(key, partitions) != partition {
                        return Err(EngineError::Conflict(format!(
                            "customer `{id}` in the changelog of partition {partition} is not of that partition"
                        )));
                    }
                    let mut state = CustomerState::decode(value).map_err(StoreError::from)?;
                    // Numbered by the index rebuild below; the window state is built from the
                    // events on the first evaluation.
                    state.number = crate::index::NO_NUMBER;
                    wb.put_cf(cf, key, state.encode(None));
                    summary.customers += 1;
                }
                Family::Events => {
                    let (customer, arrival) =
                        crate::store::decode_event_key(key).map_err(StoreError::from)?;
                    if partition_of(customer.as_bytes(), partitions) != partition {
                        return Err(EngineError::Conflict(format!(
                            "an event of `{customer}` in the changelog of partition {partition} is not of that partition"
                        )));
                    }
                    max_arrival = max_arrival.max(Some(arrival));
                    wb.put_cf(cf, key, value);
                    summary.events += 1;
                }
                Family::Timers => {
                    let (due, customer) = crate::store::decode_timer_key(key).map_err(StoreError::from)?;
                    timers.push((due, Arc::<str>::from(customer)));
                    wb.put_cf(cf, key, value);
                }
                Family::Dedup => {
                    Reader::new(value).i64().map_err(StoreError::from)?;
                    wb.put_cf(cf, key, value);
                    summary.dedup_entries += 1;
                }
                Family::Identities => {
                    wb.put_cf(cf, key, value);
                    summary.identity_entries += 1;
                }
            }
        }
        if let Some(arrival) = max_arrival {
            // Later events of these customers arrive after the restored ones.
            self.counters.next_arrival = self.counters.next_arrival.max(arrival + 1);
        }
        self.counters.next_commit = self.counters.next_commit.max(restore.commit + 1);
        // The clock never moves backwards, and the partition was judged up to its own.
        if self.config.clock == ClockMode::Event && restore.clock > self.counters.clock {
            self.counters.clock = restore.clock;
            if let Some(clock) = restore.clock {
                self.store.put_meta_i64(&mut wb, META_CLOCK, clock);
            }
        }
        self.store
            .put_meta_u64(&mut wb, META_ARRIVAL, self.counters.next_arrival);
        self.store
            .put_meta_u64(&mut wb, META_COMMIT, self.counters.next_commit);
        for (source, offset) in restore.positions() {
            let key = format!("{META_OFFSET_PREFIX}{source}");
            self.store.put_meta_u64(&mut wb, &key, offset);
        }
        self.store.commit(wb)?;
        self.published.set_clock(self.counters.clock);
        for (due, customer) in timers {
            let i = self.shard_index(&customer);
            self.shards[i].timers.insert((due, customer));
        }
        self.aliases = identity::Aliases::load(&self.store)?;
        *self.owner_cache.borrow_mut() =
            identity::load_owner_cache(&self.store, self.config.identity.cache_entries)?;
        self.reindex()?;
        Ok(summary)
    }
}

impl ReadHandle {
    /// Every input's position (files, Kafka partitions) as of the last commit.
    pub fn source_offsets(&self) -> Result<std::collections::BTreeMap<String, u64>, EngineError> {
        super::read::source_offsets(&self.store)
    }

    /// The first `limit` deltas in the outbox, of any partition: `(partition, commit,
    /// encoded delta)`, each partition's in commit order.
    pub fn changelog_head(&self, limit: usize) -> Result<Vec<(u32, u64, Vec<u8>)>, EngineError> {
        let mut out = Vec::new();
        for item in self.store.scan_from(CF_OUTBOX, &[]) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item?;
            let (partition, commit) = parse_outbox_key(&key)?;
            out.push((partition, commit, value.into_vec()));
        }
        Ok(out)
    }

    /// Deletes deltas the broker confirmed (`(partition, commit)`).
    pub fn changelog_published(&self, published: &[(u32, u64)]) -> Result<(), EngineError> {
        let mut wb = WriteBatch::default();
        for &(partition, commit) in published {
            wb.delete_cf(self.store.cf(CF_OUTBOX), outbox_key(partition, commit));
        }
        Ok(self.store.commit(wb)?)
    }

    /// Up to `limit` changelog deltas of `partition` still in the outbox, after commit
    /// `after`, in commit order: `(commit, encoded delta)`.
    pub fn changelog_deltas(
        &self,
        partition: u32,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, EngineError> {
        let mut out = Vec::new();
        let from = outbox_key(partition, after.saturating_add(1));
        for item in self.store.scan_from(CF_OUTBOX, &from) {
            let (key, value) = item?;
            if out.len() >= limit || key.get(..4) != Some(&partition.to_be_bytes()[..]) {
                break;
            }
            let (_, commit) = parse_outbox_key(&key)?;
            out.push((commit, value.into_vec()));
        }
        Ok(out)
    }
}

fn parse_outbox_key(key: &[u8]) -> Result<(u32, u64), EngineError> {
    if key.len() != 12 {
        return Err(StoreError::Corrupt("an outbox key of the wrong length".into()).into());
    }
    let partition = u32::from_be_bytes(key[..4].try_into().expect("4 bytes"));
    Ok((
        partition,
        u64::from_be_bytes(key[4..].try_into().expect("8 bytes")),
    ))
}
