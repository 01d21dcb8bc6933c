//! The engine's write batch, handed to RocksDB in key order.
//!
//! A batch's keys arrive in no useful order: customer records and dedup keys by client-chosen
//! id, events by customer, timers by due instant. RocksDB inserts each key into a memtable
//! skip list, and an insert right after the previous key is several times cheaper than one
//! anywhere else (the skip list keeps the last insert position). Sorting each column family's
//! writes by key before building the `WriteBatch` turns most inserts into the cheap kind.
//! Writes to the same key keep the order they were issued in, so the batch means exactly what
//! it would unsorted; and as a batch is applied whole, only the last of them is handed on (a
//! customer's identity record rewritten by several events of a batch reaches the memtable and
//! the WAL once). Range deletes, which would not commute with the puts they cover, are not
//! offered.

use rocksdb::{AsColumnFamilyRef, ColumnFamily, WriteBatch};

use crate::codec::Writer;

/// Something a `put` or `delete` can be written into: a plain `WriteBatch`, or
/// [`SortedWrites`].
pub trait Writes {
    fn put(&mut self, cf: &ColumnFamily, key: &[u8], value: &[u8]);
    fn delete(&mut self, cf: &ColumnFamily, key: &[u8]);

    /// A put whose value `encode` writes: [`SortedWrites`] lets it write straight into the
    /// batch's buffer, with no value buffer of its own to grow and copy.
    fn put_with(&mut self, cf: &ColumnFamily, key: &[u8], encode: impl FnOnce(&mut Writer)) {
        let mut w = Writer::new();
        encode(&mut w);
        self.put(cf, key, &w.buf);
    }
}

impl Writes for WriteBatch {
    fn put(&mut self, cf: &ColumnFamily, key: &[u8], value: &[u8]) {
        self.put_cf(cf, key, value);
    }

    fn delete(&mut self, cf: &ColumnFamily, key: &[u8]) {
        self.delete_cf(cf, key);
    }
}

/// One write: its column family (by handle identity), and where its key and value lie in
/// the shared buffer (the value follows the key).
#[derive(Clone, Copy)]
struct Op {
    cf: usize,
    key_start: usize,
    key_end: usize,
    value_end: usize,
    delete: bool,
}

/// Puts and deletes collected in one buffer; [`SortedWrites::into_batch`] orders them.
#[derive(Default)]
pub struct SortedWrites {
    bytes: Vec<u8>,
    ops: Vec<Op>,
}

/// A column family handle's identity: the address of RocksDB's handle, never dereferenced.
pub fn cf_id(cf: &ColumnFamily) -> usize {
    cf.inner() as usize
}

impl SortedWrites {
    pub fn put_cf(&mut self, cf: &ColumnFamily, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.push(cf, key.as_ref(), value.as_ref(), false);
    }

    pub fn delete_cf(&mut self, cf: &ColumnFamily, key: impl AsRef<[u8]>) {
        self.push(cf, key.as_ref(), &[], true);
    }

    fn push(&mut self, cf: &ColumnFamily, key: &[u8], value: &[u8], delete: bool) {
        let key_start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ops.push(Op {
            cf: cf_id(cf),
            key_start,
            key_end,
            value_end: self.bytes.len(),
            delete,
        });
    }

    /// Empty writes with room for as many as `other` holds (the next batch is usually the
    /// size of the last: no buffer grows write by write).
    pub fn sized_like(other: &SortedWrites) -> SortedWrites {
        SortedWrites {
            bytes: Vec::with_capacity(other.bytes.len()),
            ops: Vec::with_capacity(other.ops.len()),
        }
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// The value of the last write (empty for a delete, or when there is none).
    pub fn last_value(&self) -> &[u8] {
        self.ops
            .last()
            .map_or(&[][..], |op| &self.bytes[op.key_end..op.value_end])
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The writes in the order they were issued: the column family's [`cf_id`], the key, and
    /// the value (`None` for a delete).
    pub fn ops(&self) -> impl Iterator<Item = (usize, &[u8], Option<&[u8]>)> {
        self.ops.iter().map(|op| {
            let key = &self.bytes[op.key_start..op.key_end];
            let value = (!op.delete).then(|| &self.bytes[op.key_end..op.value_end]);
            (op.cf, key, value)
        })
    }

    /// The writes as a `WriteBatch`, sorted by column family and key; writes to one key keep
    /// their order. `families` are the store's column families (every one a write named).
    pub fn into_batch<'a>(self, families: impl IntoIterator<Item = &'a ColumnFamily>) -> WriteBatch {
        SortedWrites::into_one_batch(vec![self], families)
    }

    /// Several batches' writes (a round's shards) as one `WriteBatch`, sorted by column
    /// family and key; writes to one key keep their order, earlier parts first.
    pub fn into_one_batch<'a>(
        parts: Vec<SortedWrites>,
        families: impl IntoIterator<Item = &'a ColumnFamily>,
    ) -> WriteBatch {
        let families: Vec<(usize, &ColumnFamily)> = families.into_iter().map(|cf| (cf_id(cf), cf)).collect();
        let mut ops: Vec<(&[u8], Op)> = Vec::with_capacity(parts.iter().map(|p| p.ops.len()).sum());
        for part in &parts {
            ops.extend(part.ops.iter().map(|op| (&part.bytes[..], *op)));
        }
        // A stable sort: equal keys stay in issue order.
        ops.sort_by(|(a_bytes, a), (b_bytes, b)| {
            a.cf.cmp(&b.cf)
                .then_with(|| a_bytes[a.key_start..a.key_end].cmp(&b_bytes[b.key_start..b.key_end]))
        });
        let bytes: usize = parts.iter().map(|p| p.bytes.len()).sum();
        // Each record carries a few bytes of framing beside its key and value.
        let mut batch = WriteBatch::with_capacity_bytes(bytes + 16 * ops.len() + 64);
        let mut current: Option<(usize, &ColumnFamily)> = None;
        fn key_of<'b>((bytes, op): &(&'b [u8], Op)) -> (usize, &'b [u8]) {
            (op.cf, &bytes[op.key_start..op.key_end])
        }
        for (i, write) in ops.iter().enumerate() {
            if ops.get(i + 1).is_some_and(|next| key_of(next) == key_of(write)) {
                // A later write to the same key replaces this one within the batch.
                continue;
            }
            let (bytes, op) = write;
            let cf = match current {
                Some((id, cf)) if id == op.cf => cf,
                _ => {
                    let found = *families
                        .iter()
                        .find(|(id, _)| *id == op.cf)
                        .expect("a write to a column family of this store");
                    current = Some(found);
                    found.1
                }
            };
            let key = &bytes[op.key_start..op.key_end];
            if op.delete {
                batch.delete_cf(cf, key);
            } else {
                batch.put_cf(cf, key, &bytes[op.key_end..op.value_end]);
            }
        }
        batch
    }
}

impl Writes for SortedWrites {
    fn put(&mut self, cf: &ColumnFamily, key: &[u8], value: &[u8]) {
        self.push(cf, key, value, false);
    }

    fn delete(&mut self, cf: &ColumnFamily, key: &[u8]) {
        self.push(cf, key, &[], true);
    }

    fn put_with(&mut self, cf: &ColumnFamily, key: &[u8], encode: impl FnOnce(&mut Writer)) {
        let key_start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        let mut w = Writer {
            buf: std::mem::take(&mut self.bytes),
        };
        encode(&mut w);
        self.bytes = w.buf;
        self.ops.push(Op {
            cf: cf_id(cf),
            key_start,
            key_end,
            value_end: self.bytes.len(),
            delete: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocksdb::{Options, DB};

    /// Sorted or not, a batch leaves the same data: later writes to a key win, deletes
    /// after puts remove, puts after deletes restore, across column families.
    #[test]
    fn sorting_keeps_the_meaning_of_the_batch() {
        let dir = ::tests::TempDir::new("sorted-writes");
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf(&opts, dir.path(), ["a", "b"]).unwrap();
        let (a, b) = (db.cf_handle("a").unwrap(), db.cf_handle("b").unwrap());
        let mut writes = SortedWrites::default();
        writes.put_cf(a, "k2", "first");
        writes.put_cf(b, "k1", "b-only");
        writes.put_cf(a, "k1", "one");
        writes.put_cf(a, "k2", "second");
        writes.delete_cf(a, "k1");
        writes.put_cf(a, "k3", "x");
        writes.delete_cf(a, "k3");
        writes.put_cf(a, "k3", "back");
        writes.delete_cf(b, "missing");
        writes.put_with(b, b"k4", |w| w.str("encoded in place"));
        writes.put_cf(b, "k5", "after");
        assert_eq!(writes.len(), 11);
        let batch = writes.into_batch([a, b]);
        // Only the last write of each key is kept: k2, k1 and k3 of `a` once each.
        assert_eq!(batch.len(), 7);
        db.write(batch).unwrap();
        assert_eq!(db.get_cf(a, "k1").unwrap(), None);
        assert_eq!(db.get_cf(a, "k2").unwrap().as_deref(), Some(&b"second"[..]));
        assert_eq!(db.get_cf(a, "k3").unwrap().as_deref(), Some(&b"back"[..]));
        assert_eq!(db.get_cf(b, "k1").unwrap().as_deref(), Some(&b"b-only"[..]));
        assert_eq!(db.get_cf(a, "k0").unwrap(), None);
        let mut expected = Writer::new();
        expected.str("encoded in place");
        assert_eq!(db.get_cf(b, "k4").unwrap(), Some(expected.buf));
        assert_eq!(db.get_cf(b, "k5").unwrap().as_deref(), Some(&b"after"[..]));
    }
}
