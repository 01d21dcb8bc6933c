//! A partition's state on its own: listed, exported to a file and imported into another
//! store (how a partition moves between machines), or dropped from this one.
//!
//! An export holds, per customer of the partition, the record (tags, event tags, manual tags,
//! profile, timer), the retained events and the dedup entries of their ids, read from one
//! snapshot. The window state is not carried: the importing store builds it from the events
//! on the customer's first evaluation, exactly (windows never reach past the retention).
//! The change log and the dead letters belong to the store that wrote them and stay.
//!
//! The file: [`MAGIC`], then frames of a `u32` length and a payload whose first byte says
//! what it is: the header (format, partition, partitions), a customer, one of its events,
//! one of its dedup entries, one of its identity graph entries (its identifiers' owners, its
//! record, what merges into it kept; format 2), and the trailer with the counts — a file cut
//! short has none and is refused whole. In a group whose graph is partition 0's (a
//! resolver, [`crate::EngineConfig::resolver`]) the graph's entries are not a customer's:
//! partition 0's export carries the whole graph after its customers (graph frames, format
//! 3), and each customer what merges into it kept, as one store keeps it — so a group's
//! partitions, all exported and imported into one store, make that store's graph. Formats
//! 1 (no identities) and 2 still import.

use std::io::{Read, Write};

use super::*;
use crate::codec::CodecError;
use crate::partition::partition_of;

/// The first bytes of a partition export.
pub const MAGIC: &[u8] = b"TAGSTREAM-PARTITION\n";
const FORMAT: u64 = 3;

const FRAME_HEADER: u8 = 1;
const FRAME_CUSTOMER: u8 = 2;
const FRAME_EVENT: u8 = 3;
const FRAME_DEDUP: u8 = 4;
const FRAME_END: u8 = 5;
const FRAME_IDENTITY: u8 = 6;
const FRAME_GRAPH: u8 = 7;

/// The largest frame a reader accepts: a customer record or one event.
const MAX_FRAME: usize = 64 << 20;

/// What an export holds, or what an import or a drop did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PartitionSummary {
    pub partition: u32,
    pub partitions: u32,
    pub customers: u64,
    pub events: u64,
    pub dedup_entries: u64,
    /// Identity graph entries ([`crate::identity`]) of the partition's customers.
    pub identity_entries: u64,
}

fn write_frame(out: &mut impl Write, frame: &Writer) -> std::io::Result<()> {
    out.write_all(&(frame.buf.len() as u32).to_be_bytes())?;
    out.write_all(&frame.buf)
}

fn bad(what: &str) -> EngineError {
    EngineError::Conflict(format!("not a partition export: {what}"))
}

/// Reads the next frame into `buf`; `false` at the end of the input.
fn read_frame(input: &mut impl Read, buf: &mut Vec<u8>) -> Result<bool, EngineError> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(EngineError::Conflict(format!("reading the export: {e}"))),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(bad("a frame of impossible length"));
    }
    buf.resize(len, 0);
    input
        .read_exact(buf)
        .map_err(|_| bad("it ends in the middle of a frame"))?;
    Ok(true)
}

impl ReadHandle {
    /// Customers per partition (`partitions` of them), from one scan of the records.
    pub fn partition_counts(&self, partitions: u32) -> Result<Vec<u64>, EngineError> {
        let mut counts = vec![0u64; partitions.max(1) as usize];
        for item in self.store.scan_from(CF_CUSTOMERS, &[]) {
            let (id, _) = item?;
            counts[partition_of(&id, partitions.max(1)) as usize] += 1;
        }
        Ok(counts)
    }

    /// Ids of `partition`'s customers after `after`, in id order, at most `limit`.
    pub fn partition_customers(
        &self,
        partition: u32,
        partitions: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, EngineError> {
        let start = after.map_or_else(Vec::new, |a| {
            let mut k = a.as_bytes().to_vec();
            k.push(0);
            k
        });
        let mut out = Vec::new();
        for item in self.store.scan_from(CF_CUSTOMERS, &start) {
            if out.len() >= limit {
                break;
            }
            let (id, _) = item?;
            if partition_of(&id, partitions) == partition {
                out.push(String::from_utf8_lossy(&id).into_owned());
            }
        }
        Ok(out)
    }

    /// Writes `partition`'s state (of `partitions`) to `out`, from one snapshot.
    pub fn export_partition(
        &self,
        partition: u32,
        partitions: u32,
        out: &mut impl Write,
    ) -> Result<PartitionSummary, EngineError> {
        if partition >= partitions {
            return Err(EngineError::NotFound(format!(
                "partition {partition} does not exist: there are {partitions} (0 to {})",
                partitions - 1
            )));
        }
        let io = |e: std::io::Error| EngineError::Conflict(format!("writing the export: {e}"));
        out.write_all(MAGIC).map_err(io)?;
        let mut frame = Writer::new();
        frame.u8(FRAME_HEADER);
        frame.u64(FORMAT);
        frame.u64(u64::from(partition));
        frame.u64(u64::from(partitions));
        write_frame(out, &frame).map_err(io)?;
        let mut summary = PartitionSummary {
            partition,
            partitions,
            ..Default::default()
        };
        let mut failed = None;
        self.store
            .customers_with_history(
                |id| partition_of(id, partitions) == partition,
                |customer| {
                    let identities = match self.resolver {
                        true => identity::group_snapshots_of(&self.store, customer.id)?,
                        false => identity::entries_of(&self.store, customer.id)?,
                    };
                    let mut written = || -> std::io::Result<()> {
                        let mut frame = Writer::new();
                        frame.u8(FRAME_CUSTOMER);
                        frame.str(customer.id);
                        frame.bytes(customer.record);
                        write_frame(out, &frame)?;
                        for (key, value) in &customer.events {
                            let mut frame = Writer::new();
                            frame.u8(FRAME_EVENT);
                            frame.bytes(key);
                            frame.bytes(value);
                            write_frame(out, &frame)?;
                        }
                        for (event_id, applied) in &customer.dedup {
                            let mut frame = Writer::new();
                            frame.u8(FRAME_DEDUP);
                            frame.str(event_id);
                            frame.bytes(applied);
                            write_frame(out, &frame)?;
                        }
                        for (key, value) in &identities {
                            let mut frame = Writer::new();
                            frame.u8(FRAME_IDENTITY);
                            frame.bytes(key);
                            frame.bytes(value);
                            write_frame(out, &frame)?;
                        }
                        Ok(())
                    };
                    if let Err(e) = written() {
                        failed = Some(e);
                        return Err(StoreError::from(CodecError("the export could not be written")));
                    }
                    summary.customers += 1;
                    summary.events += customer.events.len() as u64;
                    summary.dedup_entries += customer.dedup.len() as u64;
                    summary.identity_entries += identities.len() as u64;
                    Ok(())
                },
            )
            .map_err(|e| failed.take().map_or(EngineError::from(e), io))?;
        if self.resolver && partition == 0 {
            for (key, value) in identity::whole_graph(&self.store)? {
                let mut frame = Writer::new();
                frame.u8(FRAME_GRAPH);
                frame.bytes(&key);
                frame.bytes(&value);
                write_frame(out, &frame).map_err(io)?;
                summary.identity_entries += 1;
            }
        }
        let mut frame = Writer::new();
        frame.u8(FRAME_END);
        frame.u64(summary.customers);
        frame.u64(summary.events);
        frame.u64(summary.dedup_entries);
        frame.u64(summary.identity_entries);
        write_frame(out, &frame).map_err(io)?;
        out.flush().map_err(io)?;
        Ok(summary)
    }
}

/// One customer read back from an export.
#[derive(Default)]
struct Imported {
    id: String,
    record: Vec<u8>,
    events: Vec<(Vec<u8>, Vec<u8>)>,
    dedup: Vec<(String, Vec<u8>)>,
    identities: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Engine {
    /// Imports a partition exported by [`ReadHandle::export_partition`] from a store with the
    /// same number of partitions, as one atomic commit. Refused whole when the file is not a
    /// complete export, when the partition counts differ, or when any of its customers is
    /// already here (the partition is owned by this store already), and in a store that
    /// keeps the state changelog (the import would not be in it).
    pub fn import_partition(&mut self, input: &mut impl Read) -> Result<PartitionSummary, EngineError> {
        self.settle();
        if self.config.changelog {
            return Err(EngineError::Conflict(
                "this store keeps the state changelog, which an import would not be in: restore the partition from the state topic (`tagstream partitions restore`), or import with `state_topic` unset and let the next start with it write a baseline".into(),
            ));
        }
        let mut magic = vec![0u8; MAGIC.len()];
        input
            .read_exact(&mut magic)
            .map_err(|_| bad("it does not begin like one"))?;
        if magic != MAGIC {
            return Err(bad("it does not begin like one"));
        }
        let mut buf = Vec::new();
        if !read_frame(input, &mut buf)? {
            return Err(bad("it has no header"));
        }
        let mut r = Reader::new(&buf);
        let codec = |_: CodecError| bad("a frame does not decode");
        if r.u8().map_err(codec)? != FRAME_HEADER {
            return Err(bad("it has no header"));
        }
        let format = r.u64().map_err(codec)?;
        if !(1..=FORMAT).contains(&format) {
            return Err(EngineError::Conflict(format!(
                "the export has format {format}; this version reads formats 1 to {FORMAT}"
            )));
        }
        let partition = r.u64().map_err(codec)? as u32;
        let partitions = r.u64().map_err(codec)? as u32;
        if partitions != self.config.partitions {
            return Err(EngineError::Conflict(format!(
                "the export is partition {partition} of {partitions}; this store hashes customers to {} partitions",
                self.config.partitions
            )));
        }
        let mut customers: Vec<Imported> = Vec::new();
        let mut graph: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut end = None;
        while read_frame(input, &mut buf)? {
            let mut r = Reader::new(&buf);
            match r.u8().map_err(codec)? {
                FRAME_CUSTOMER => {
                    let id = r.str().map_err(codec)?.to_owned();
                    if partition_of(id.as_bytes(), partitions) != partition {
                        return Err(bad(&format!("customer `{id}` is not in partition {partition}")));
                    }
                    customers.push(Imported {
                        id,
                        record: r.bytes().map_err(codec)?.to_vec(),
                        ..Default::default()
                    });
                }
                FRAME_EVENT => {
                    let customer = customers
                        .last_mut()
                        .ok_or_else(|| bad("an event before any customer"))?;
                    let key = r.bytes().map_err(codec)?.to_vec();
                    customer.events.push((key, r.bytes().map_err(codec)?.to_vec()));
                }
                FRAME_DEDUP => {
                    let customer = customers
                        .last_mut()
                        .ok_or_else(|| bad("a dedup entry before any customer"))?;
                    let id = r.str().map_err(codec)?.to_owned();
                    customer.dedup.push((id, r.bytes().map_err(codec)?.to_vec()));
                }
                FRAME_IDENTITY => {
                    let customer = customers
                        .last_mut()
                        .ok_or_else(|| bad("an identity entry before any customer"))?;
                    let key = r.bytes().map_err(codec)?.to_vec();
                    customer
                        .identities
                        .push((key, r.bytes().map_err(codec)?.to_vec()));
                }
                FRAME_GRAPH => {
                    let key = r.bytes().map_err(codec)?.to_vec();
                    graph.push((key, r.bytes().map_err(codec)?.to_vec()));
                }
                FRAME_END => {
                    end = Some((
                        r.u64().map_err(codec)?,
                        r.u64().map_err(codec)?,
                        r.u64().map_err(codec)?,
                        if format == 1 { 0 } else { r.u64().map_err(codec)? },
                    ));
                    break;
                }
                _ => return Err(bad("a frame of an unknown kind")),
            }
        }
        let summary = PartitionSummary {
            partition,
            partitions,
            customers: customers.len() as u64,
            events: customers.iter().map(|c| c.events.len() as u64).sum(),
            dedup_entries: customers.iter().map(|c| c.dedup.len() as u64).sum(),
            identity_entries: customers.iter().map(|c| c.identities.len() as u64).sum::<u64>()
                + graph.len() as u64,
        };
        let counts = (
            summary.customers,
            summary.events,
            summary.dedup_entries,
            summary.identity_entries,
        );
        if end != Some(counts) {
            return Err(bad(
                "it is cut short (its trailer is missing or does not match what it holds)",
            ));
        }
        for c in &customers {
            let cached = self.shards[self.shard_index(&c.id)].cache.contains_key(&c.id);
            if cached || self.store.get(CF_CUSTOMERS, c.id.as_bytes())?.is_some() {
                return Err(EngineError::Conflict(format!(
                    "customer `{}` of partition {partition} is already in this store: nothing was imported",
                    c.id
                )));
            }
        }
        for (key, _) in &graph {
            if !matches!(key.first(), Some(b'i' | b'c')) {
                return Err(bad("a graph entry of an unknown kind"));
            }
            if self.store.get(crate::store::CF_IDENTITIES, key)?.is_some() {
                return Err(EngineError::Conflict(format!(
                    "the identity graph of partition {partition}'s export names `{}`, which this store's graph has already: nothing was imported",
                    String::from_utf8_lossy(&key[1..])
                )));
            }
        }
        // One batch: the customers, and the index checkpoint forgotten (a crash before the
        // rebuild below rebuilds it at the next open).
        let mut wb = WriteBatch::default();
        for (key, value) in &graph {
            wb.put_cf(self.store.cf(crate::store::CF_IDENTITIES), key, value);
        }
        MembershipIndex::forget_checkpoint(&self.store, &mut wb);
        let mut timers = Vec::new();
        let mut max_arrival = None;
        for c in &customers {
            let mut state = CustomerState::decode(&c.record).map_err(StoreError::from)?;
            // Numbered here by the index rebuild below; the window state is built from the
            // events on the first evaluation.
            state.number = crate::index::NO_NUMBER;
            wb.put_cf(self.store.cf(CF_CUSTOMERS), c.id.as_bytes(), state.encode(None));
            let arrival = self.store.put_imported_events(&mut wb, &c.id, &c.events)?;
            if !c.events.is_empty() {
                max_arrival = max_arrival.max(Some(arrival));
            }
            for (event_id, applied) in &c.dedup {
                Reader::new(applied).i64().map_err(StoreError::from)?;
                wb.put_cf(self.store.cf(CF_DEDUP), event_id.as_bytes(), applied);
            }
            for (key, value) in &c.identities {
                if !matches!(key.first(), Some(b'i' | b'c' | b's')) {
                    return Err(bad("an identity entry of an unknown kind"));
                }
                wb.put_cf(self.store.cf(crate::store::CF_IDENTITIES), key, value);
            }
            if let Some(due) = state.timer {
                wb.put_cf(self.store.cf(CF_TIMERS), timer_key(due, &c.id), []);
                timers.push((due, Arc::<str>::from(c.id.as_str())));
            }
        }
        if let Some(arrival) = max_arrival {
            // Later events of these customers arrive after the imported ones.
            self.counters.next_arrival = self.counters.next_arrival.max(arrival + 1);
        }
        self.store
            .put_meta_u64(&mut wb, META_ARRIVAL, self.counters.next_arrival);
        self.store.commit(wb)?;
        for (due, customer) in timers {
            let i = self.shard_index(&customer);
            self.shards[i].timers.insert((due, customer));
        }
        // The imported customers' absorbed ids name them here now.
        self.reload_aliases()?;
        *self.owner_cache.borrow_mut() =
            identity::load_owner_cache(&self.store, self.config.identity.cache_entries)?;
        self.reindex()?;
        Ok(summary)
    }

    /// Deletes every customer of `partition` from this store (after it moved elsewhere):
    /// records, events, window state, timers and identity graph entries. The change log
    /// keeps their changes.
    pub fn drop_partition(&mut self, partition: u32) -> Result<PartitionSummary, EngineError> {
        self.drop_partition_with(partition, |_, _| Ok(()))
    }

    /// [`Engine::drop_partition`], with `also`'s writes in the same batch.
    pub(super) fn drop_partition_with(
        &mut self,
        partition: u32,
        also: impl FnOnce(&crate::store::Store, &mut WriteBatch) -> Result<(), EngineError>,
    ) -> Result<PartitionSummary, EngineError> {
        self.settle();
        let partitions = self.config.partitions;
        if partition >= partitions {
            return Err(EngineError::NotFound(format!(
                "partition {partition} does not exist: there are {partitions} (0 to {})",
                partitions - 1
            )));
        }
        let mut summary = PartitionSummary {
            partition,
            partitions,
            ..Default::default()
        };
        let mut wb = WriteBatch::default();
        MembershipIndex::forget_checkpoint(&self.store, &mut wb);
        let mut dropped = Vec::new();
        let mut gone = self.published.numbers_gone();
        for item in self.store.scan_from(CF_CUSTOMERS, &[]) {
            let (id, record) = item?;
            if partition_of(&id, partitions) != partition {
                continue;
            }
            let state = CustomerState::decode(&record).map_err(StoreError::from)?;
            let id: Arc<str> = Arc::from(String::from_utf8_lossy(&id).as_ref());
            if state.number != crate::index::NO_NUMBER {
                gone.insert(state.number);
            }
            summary.dedup_entries += self.store.delete_dedup_of(&mut wb, &id)?;
            self.store.delete_customer(&mut wb, &id, state.timer);
            // A group's resolver keeps the whole graph as partition 0's (below).
            if !self.config.resolver {
                for (key, _) in identity::entries_of(&self.store, &id)? {
                    wb.delete_cf(self.store.cf(crate::store::CF_IDENTITIES), key);
                }
            }
            summary.customers += 1;
            dropped.push((id, state.timer));
        }
        if self.config.resolver && partition == 0 {
            for prefix in [b"c", b"i", b"r"] {
                for (key, _) in self.store.scan_prefix(crate::store::CF_IDENTITIES, prefix)? {
                    wb.delete_cf(self.store.cf(crate::store::CF_IDENTITIES), key);
                }
            }
        }
        // Customers handed over from this partition to another store's survivors, frames
        // its survivors took, and splits: what they kept, and what waits to be sent.
        for prefix in [b"m", b"n", b"p", b"q", b"t", b"u"] {
            for (key, _) in self.store.scan_prefix(crate::store::CF_IDENTITIES, prefix)? {
                let owner = crate::changelog::Family::Identities.owner(&key);
                if owner.is_some_and(|owner| partition_of(owner, partitions) == partition) {
                    wb.delete_cf(self.store.cf(crate::store::CF_IDENTITIES), key);
                }
            }
        }
        also(&self.store, &mut wb)?;
        // A partition's own clock goes with it: whoever holds it next brings theirs.
        let clock_key = partition_clock_key(partition);
        wb.delete_cf(self.store.cf(CF_META), clock_key.as_bytes());
        let mut bytes = Vec::with_capacity(gone.serialized_size());
        gone.serialize_into(&mut bytes).expect("writing to a Vec");
        wb.put_cf(self.store.cf(CF_META), META_NUMBERS_GONE.as_bytes(), bytes);
        self.store.commit(wb)?;
        self.published.set_numbers_gone(gone);
        if let Some(clock) = self.counters.partition_clocks.get_mut(partition as usize) {
            *clock = None;
            self.published
                .set_partition_clocks(&self.counters.partition_clocks);
        }
        self.reload_aliases()?;
        *self.owner_cache.borrow_mut() =
            identity::load_owner_cache(&self.store, self.config.identity.cache_entries)?;
        for (id, timer) in dropped {
            let i = self.shard_index(&id);
            let shard = &mut self.shards[i];
            shard.cache.remove(&id);
            if let Some(due) = timer {
                shard.timers.remove(&(due, id));
            }
        }
        self.reindex()?;
        Ok(summary)
    }

    /// Rebuilds the membership index from the records after customers came or went
    /// without changes in the log, and checkpoints it.
    pub(super) fn reindex(&mut self) -> Result<(), EngineError> {
        let copies = self.reader().standby_copies()?;
        let partitions = self.config.partitions;
        let limits = ColumnLimits {
            profile_attributes: self.config.profile_columns,
            traits: self.config.trait_columns,
        };
        self.index
            .rebuild_in_place(&self.store, self.counters.next_seq - 1, limits, &|id| {
                // A standby's copy is numbered and indexed once it is promoted.
                !copies.is_empty() && copies.contains(&partition_of(id, partitions))
            })?;
        self.checkpoint_index()?;
        Ok(())
    }
}
