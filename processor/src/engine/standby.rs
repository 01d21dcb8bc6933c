//! A standby's copy of a partition another node owns (`--standby-replicas`, issue #21; the
//! reading side is [`crate::changelog::follow`]): the partition's keys as its changelog
//! says, kept up to date delta by delta while the partition stays parked here — its
//! customers unnumbered and unindexed, its timers asleep, nothing of it answered or
//! published. Promoted when the group gives this node the partition: the customers are
//! indexed, the timers fire, and the store owns it from the position read, as after a
//! restore, without reading the partition again.
//!
//! A copy is marked in `meta` (`standby:P`): a store reopened with one drops it (what the
//! copy was following is not kept across a restart).

use super::outbox::{Taking, Written};
use super::*;
use crate::changelog::follow::Promotion;
use crate::changelog::{Delta, DeltaWrite, Restore};
use crate::partition::partition_of;

/// Per partition (the number follows): this store holds a standby's copy of it.
pub(super) const META_STANDBY: &str = "standby:";

impl Engine {
    /// Starts a copy of `restore`'s partition, parked here: its keys written as a restore
    /// writes them, nothing else taken (commit numbers, clock, positions: the owner's).
    /// Refused for a partition this store owns or holds customers of.
    pub fn begin_standby(&mut self, restore: &Restore) -> Result<PartitionSummary, EngineError> {
        self.settle();
        let partition = restore.partition;
        self.check_partition_count(restore.partitions)?;
        restore
            .check()
            .map_err(|e| EngineError::Conflict(format!("{e}; nothing was copied")))?;
        self.check_parked(partition)?;
        self.check_holds_none(partition)?;
        let mut wb = WriteBatch::default();
        let mut written = Written::new(partition, self.config.partitions);
        for (family, key) in restore.deletes() {
            wb.delete_cf(self.store.cf(family.cf_name()), key);
        }
        for (family, key, value) in restore.values() {
            self.write_partition_key(&mut wb, &mut written, family, key, value)?;
        }
        wb.put_cf(self.store.cf(CF_META), standby_key(partition).as_bytes(), []);
        self.commit_copy(wb, &written)?;
        Ok(written.summary)
    }

    /// Applies `deltas` (complete, in commit order) to this store's copy of `partition`.
    pub fn apply_standby(
        &mut self,
        partition: u32,
        deltas: &[Delta],
    ) -> Result<PartitionSummary, EngineError> {
        self.settle();
        self.check_standby(partition)?;
        let mut wb = WriteBatch::default();
        let mut written = Written::new(partition, self.config.partitions);
        for delta in deltas {
            if delta.partition != partition || delta.partitions != self.config.partitions {
                return Err(EngineError::Conflict(format!(
                    "a delta of partition {} of {} cannot be applied to the copy of partition {partition}: nothing was applied",
                    delta.partition, delta.partitions
                )));
            }
            for write in &delta.writes {
                match &write.value {
                    Some(value) => {
                        self.write_partition_key(&mut wb, &mut written, write.family, &write.key, value)?
                    }
                    None => wb.delete_cf(self.store.cf(write.family.cf_name()), &write.key),
                }
            }
        }
        self.commit_copy(wb, &written)?;
        Ok(written.summary)
    }

    /// Makes this store's copy of `promotion.partition` the partition's state here, owned
    /// from now on: as [`Engine::restore_partition`] leaves a partition read whole.
    pub fn promote_standby(&mut self, promotion: &Promotion) -> Result<PartitionSummary, EngineError> {
        self.settle();
        let published = self.published.clone();
        let mut epoch = published.changelog_gate.lock().unwrap_or_else(|e| e.into_inner());
        *epoch += 1;
        let partition = promotion.partition;
        self.check_partition_count(promotion.partitions)?;
        self.check_standby(partition)?;
        let partitions = self.config.partitions;
        let mut written = Written::new(partition, partitions);
        for item in self.store.scan_from(CF_CUSTOMERS, &[]) {
            let (id, record) = item?;
            if partition_of(&id, partitions) != partition {
                continue;
            }
            let state = CustomerState::decode(&record).map_err(StoreError::from)?;
            if state.generation != self.generation {
                written.other_generation += 1;
            }
            written.summary.customers += 1;
            written.customers.push(String::from_utf8_lossy(&id).into_owned());
        }
        for item in self.store.scan_from(CF_TIMERS, &[]) {
            let (key, _) = item?;
            let (due, customer) = crate::store::decode_timer_key(&key).map_err(StoreError::from)?;
            if partition_of(customer.as_bytes(), partitions) == partition {
                written.timers.push((due, Arc::from(customer)));
            }
        }
        // The keys last written by delta records, as they stand in the copy.
        let mut take_over = Vec::with_capacity(promotion.from_deltas.len());
        for (family, key) in &promotion.from_deltas {
            take_over.push(DeltaWrite {
                family: *family,
                key: key.clone(),
                value: self.store.get(family.cf_name(), key)?,
            });
        }
        let mut wb = WriteBatch::default();
        MembershipIndex::forget_checkpoint(&self.store, &mut wb);
        wb.delete_cf(self.store.cf(CF_META), standby_key(partition).as_bytes());
        let taking = Taking {
            partition,
            commit: promotion.commit,
            clock: promotion.clock,
            next_pseq: promotion.next_pseq,
            positions: promotion.positions.clone(),
            marker: promotion.marker.clone(),
            take_over,
            orphans: promotion.delta_records.clone(),
        };
        self.take_partition(wb, taking, written)
    }

    /// Drops this store's copy of `partition`, if it holds one (whether it does).
    pub fn drop_standby_copy(&mut self, partition: u32) -> Result<bool, EngineError> {
        if self
            .store
            .get(CF_META, standby_key(partition).as_bytes())?
            .is_none()
        {
            return Ok(false);
        }
        self.forget_partition(partition)?;
        Ok(true)
    }

    /// Refuses a partition this store owns: a copy is only of a parked one.
    fn check_parked(&self, partition: u32) -> Result<(), EngineError> {
        if !self.parked.partitions.contains(&partition) {
            return Err(EngineError::Conflict(format!(
                "partition {partition} is owned here: a standby copies only partitions it does not own"
            )));
        }
        Ok(())
    }

    /// Refuses a partition this store holds no copy of (or owns).
    fn check_standby(&self, partition: u32) -> Result<(), EngineError> {
        if self
            .store
            .get(CF_META, standby_key(partition).as_bytes())?
            .is_none()
        {
            return Err(EngineError::Conflict(format!(
                "this store holds no standby copy of partition {partition}"
            )));
        }
        self.check_parked(partition)
    }

    /// Commits a copy's writes: later events here arrive after the ones it holds.
    fn commit_copy(&mut self, mut wb: WriteBatch, written: &Written) -> Result<(), EngineError> {
        if let Some(arrival) = written.max_arrival {
            self.counters.next_arrival = self.counters.next_arrival.max(arrival + 1);
            self.store
                .put_meta_u64(&mut wb, META_ARRIVAL, self.counters.next_arrival);
        }
        self.store.commit(wb)?;
        Ok(())
    }
}

impl ReadHandle {
    /// The partitions this store holds a standby's copy of.
    pub fn standby_copies(&self) -> Result<Vec<u32>, EngineError> {
        let mut copies = Vec::new();
        for item in self.store.scan_from(CF_META, META_STANDBY.as_bytes()) {
            let (key, _) = item?;
            let Some(partition) = key.strip_prefix(META_STANDBY.as_bytes()) else {
                break;
            };
            if let Some(p) = std::str::from_utf8(partition).ok().and_then(|p| p.parse().ok()) {
                copies.push(p);
            }
        }
        Ok(copies)
    }
}

fn standby_key(partition: u32) -> String {
    format!("{META_STANDBY}{partition}")
}
