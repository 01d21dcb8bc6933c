//! Incremental aggregates. For each customer there is one queue per aggregate source (an
//! event type with its `where`, see [`rules::AggSource`]) holding the matching events still
//! inside the longest window over it, and for each aggregate a range of that queue (the
//! events inside its own window) with running accumulators. An event or a timer costs
//! O(log n) per source and O(1) per aggregate instead of a scan of the customer's history,
//! and an event is held once, as `(ts, arrival)` and the properties the aggregates read,
//! however many aggregates read it.
//!
//! Windows only move forward (the clock never goes back), so an event that has left every
//! window over its source is dropped for good; a late event older than the longest window is
//! never added. The state is stored beside the customer's record, so a customer loaded from
//! the store costs one read of what their windows hold, not a scan of their history; it is
//! built from the retained history only when the rules that shape it changed, or when past
//! events must be judged again.
//!
//! What is stored is split so a commit writes what changed, not everything the windows hold:
//! the record carries a header of O(aggregates) ([`WindowSet::encode_header`]: each source's
//! first position and length, each aggregate's range), and each source's queue is stored in
//! chunks of [`CHUNK_EVENTS`] consecutive positions under keys of their own
//! ([`WindowSet::plan`], [`WindowSet::encode_chunk`]). Positions are absolute and events
//! leave only from the front, so an event at the back rewrites one chunk and events leaving
//! the windows delete whole chunks: a customer with 50,000 events in a 90-day window costs a
//! commit a few hundred bytes, not the whole window.

use std::collections::{BTreeMap, HashMap, VecDeque};

use rules::value::DistinctKey;
use rules::{filter_matches, AggFunc, AggSpec, Band, CompiledRules, Event, Value, Window};
use rust_decimal::prelude::ToPrimitive;

use crate::codec::{CodecError, Reader, Writer};
use rust_decimal::Decimal;

static NULL: Value = Value::Null;

/// How many changes of its events [`WindowSet::leaves`] follows an aggregate
/// through before asking to be asked again.
const LOOKAHEAD: usize = 32;

/// Positions of a source's queue per stored chunk: chunk `c` holds positions
/// `c * CHUNK_EVENTS ..` up to the next chunk (those still in the queue when it was written).
/// A commit rewrites the chunk an event joins, on average half a chunk for a customer with a
/// long queue, so the size is what a busy customer costs per commit; smaller chunks cost a
/// cache miss more keys to read (the queue's length / this), and a chunk's own bytes (key,
/// first position, length). 32 writes ~40% fewer window bytes than 128 under the demo's load
/// (bench/RESULTS.md, "Window chunks of 32 positions").
pub const CHUNK_EVENTS: u64 = 32;

/// The chunk size of headers written before the size was part of the header: 128.
pub const LEGACY_CHUNK_EVENTS: u64 = 128;

/// The largest chunk size a header may name (a corrupt one must not overflow the arithmetic).
const MAX_CHUNK_EVENTS: u64 = 1 << 20;

/// The chunks of each source's queue a customer has in the store: by source (its index in
/// the layout they were written under), the range `lo..hi` of chunk numbers.
pub type StoredChunks = Vec<Option<(u64, u64)>>;

/// The chunks of `size` positions that hold positions `base .. base + len`.
fn live_chunks(base: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    (len > 0).then(|| (base / size, (base + len - 1) / size + 1))
}

/// One source's part of [`WindowSet::plan`], in ascending chunk order: `write` gets each
/// chunk of `live` that is new (not in `old`) or holds a position at or past `clean_until`
/// (and before `end`); `delete` each chunk of `old` outside `live`. The work is proportional
/// to the chunks written and deleted, not to the queue: a busy customer's queue can span
/// thousands of chunks of which a commit rewrites one or two.
fn plan_source(
    old: Option<(u64, u64)>,
    live: Option<(u64, u64)>,
    clean_until: u64,
    end: u64,
    mut write: impl FnMut(u64),
    mut delete: impl FnMut(u64),
) {
    if let Some((lo, hi)) = old {
        match live {
            None => (lo..hi).for_each(&mut delete),
            // Below the live range, then above it.
            Some((live_lo, live_hi)) => (lo..hi.min(live_lo))
                .chain(lo.max(live_hi)..hi)
                .for_each(&mut delete),
        }
    }
    let Some((lo, hi)) = live else { return };
    let Some((old_lo, old_hi)) = old else {
        (lo..hi).for_each(&mut write);
        return;
    };
    let changed = |c: u64| clean_until.max(c * CHUNK_EVENTS) < ((c + 1) * CHUNK_EVENTS).min(end);
    // New below the stored range; stored and changed (none below `clean_until`'s chunk);
    // new above the stored range.
    (lo..hi.min(old_lo)).for_each(&mut write);
    (lo.max(old_lo).max(clean_until / CHUNK_EVENTS)..hi.min(old_hi))
        .filter(|&c| changed(c))
        .for_each(&mut write);
    (lo.max(old_hi)..hi).for_each(&mut write);
}

/// What storing a [`WindowSet`] takes: the chunks to write (changed or new) and to delete
/// (no longer holding any position of the queue), by `(source, chunk)`, and what the store
/// holds afterwards.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChunkPlan {
    pub writes: Vec<(usize, u64)>,
    pub deletes: Vec<(usize, u64)>,
    pub stored: StoredChunks,
}

/// A source as the record's header describes it: the queue's first position and length,
/// and each aggregate's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceHeader {
    base: u64,
    len: u64,
    ranges: Vec<(u64, u64)>,
}

/// The window state's header in a customer record ([`WindowSet::encode_header`]): enough to
/// know which chunks to read, and whether the state fits the current rules at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowHeader {
    /// The positions per chunk the queues were stored in ([`CHUNK_EVENTS`] when written now).
    chunk_events: u64,
    layout: u64,
    retention_ms: i64,
    at: i64,
    sources: Vec<Option<SourceHeader>>,
}

impl WindowHeader {
    /// Reads a header as [`WindowSet::encode_header`] writes it: the chunk size first.
    pub fn decode(r: &mut Reader<'_>) -> Result<WindowHeader, CodecError> {
        let chunk_events = r.u64()?;
        if !(1..=MAX_CHUNK_EVENTS).contains(&chunk_events) {
            return Err(CodecError("bad window chunk size"));
        }
        WindowHeader::decode_sized(r, chunk_events)
    }

    /// Reads a header written before it named its chunk size ([`LEGACY_CHUNK_EVENTS`]).
    pub fn decode_legacy(r: &mut Reader<'_>) -> Result<WindowHeader, CodecError> {
        WindowHeader::decode_sized(r, LEGACY_CHUNK_EVENTS)
    }

    /// The same header, as if stored in chunks of `chunk_events` positions.
    #[cfg(test)]
    pub fn with_chunk_events(self, chunk_events: u64) -> WindowHeader {
        WindowHeader { chunk_events, ..self }
    }

    fn decode_sized(r: &mut Reader<'_>, chunk_events: u64) -> Result<WindowHeader, CodecError> {
        let layout = r.u64()?;
        let retention_ms = r.i64()?;
        let at = r.i64()?;
        let n = r.len()?;
        let mut sources = Vec::with_capacity(n);
        for _ in 0..n {
            if r.u8()? == 0 {
                sources.push(None);
                continue;
            }
            let (base, len) = (r.u64()?, r.u64()?);
            base.checked_add(len).ok_or(CodecError("bad window queue"))?;
            let aggs = r.len()?;
            let mut ranges = Vec::with_capacity(aggs);
            for _ in 0..aggs {
                let (lo, hi) = (r.u64()?, r.u64()?);
                if lo > hi || hi > len {
                    return Err(CodecError("bad window range"));
                }
                ranges.push((lo, hi));
            }
            sources.push(Some(SourceHeader { base, len, ranges }));
        }
        Ok(WindowHeader {
            chunk_events,
            layout,
            retention_ms,
            at,
            sources,
        })
    }

    /// True when the state was kept under rules whose windows are shaped like `rules'`,
    /// under the same retention and in chunks of today's size: it can be read back instead
    /// of built from the history. (A state in chunks of another size is built again once;
    /// its chunks are still found for deletion, by [`WindowHeader::stored_chunks`].)
    pub fn fits(&self, rules: &CompiledRules, retention_ms: i64) -> bool {
        self.chunk_events == CHUNK_EVENTS
            && self.layout == rules.window_layout()
            && self.retention_ms == retention_ms
            && self.sources.len() == rules.aggregate_sources().len()
            && self
                .sources
                .iter()
                .zip(rules.aggregate_sources())
                .all(|(s, source)| {
                    s.as_ref()
                        .is_none_or(|s| s.ranges.len() == source.aggregates.len())
                })
    }

    /// The chunks this header's queues are stored in.
    pub fn stored_chunks(&self) -> StoredChunks {
        self.sources
            .iter()
            .map(|s| {
                s.as_ref()
                    .and_then(|s| live_chunks(s.base, s.len, self.chunk_events))
            })
            .collect()
    }

    /// The chunks to read: `(source, chunk)` for each source, in key order.
    pub fn wanted(&self, source: usize, chunk: u64) -> bool {
        self.sources
            .get(source)
            .and_then(|s| s.as_ref())
            .and_then(|s| live_chunks(s.base, s.len, self.chunk_events))
            .is_some_and(|(lo, hi)| (lo..hi).contains(&chunk))
    }
}

/// How long an event stays in aggregate `spec`'s window: the window, capped by the retention.
fn span_ms(spec: &AggSpec, retention_ms: i64) -> i64 {
    match spec.window {
        Some(Window::Span(w)) => w.min(retention_ms),
        Some(Window::Lifetime) | None => retention_ms,
    }
}

/// The longest window over source `id`: its events at or before `at - span` are dropped.
fn source_span_ms(rules: &CompiledRules, id: usize, retention_ms: i64) -> i64 {
    rules.aggregate_sources()[id]
        .aggregates
        .iter()
        .map(|&a| span_ms(&rules.aggregates()[a], retention_ms))
        .max()
        .unwrap_or(0)
}

/// The matching events of one source, sorted by `(ts, arrival)`. Positions are absolute:
/// `base` is the position of the front, so popping the front leaves the aggregates' ranges
/// valid.
#[derive(Debug, Clone, Default)]
struct Queue {
    keys: VecDeque<(i64, u64)>,
    /// One column per property of the source, aligned with `keys`.
    inputs: Vec<VecDeque<Value>>,
    base: u64,
}

impl Queue {
    fn ts(&self, pos: u64) -> i64 {
        self.keys[(pos - self.base) as usize].0
    }

    fn end(&self) -> u64 {
        self.base + self.keys.len() as u64
    }

    fn input(&self, slot: Option<usize>, pos: u64) -> &Value {
        match slot {
            Some(s) => &self.inputs[s][(pos - self.base) as usize],
            None => &NULL,
        }
    }

    /// Room for one more event. A full queue grows by a quarter (at least 8 slots), not
    /// twofold as `VecDeque` would: a customer's queue is read from the store at its exact
    /// length and then, being loaded for an event, gets one — doubling there would hold twice
    /// the queue's bytes for as long as the customer stays cached. Still geometric, so an
    /// insert stays amortised O(1).
    fn reserve_one(&mut self) {
        let len = self.keys.len();
        if len < self.keys.capacity() {
            return;
        }
        let more = len / 4 + 8;
        self.keys.reserve_exact(more);
        for column in &mut self.inputs {
            column.reserve_exact(more);
        }
    }

    /// After events left from the front: a queue using under half its room gives back all
    /// but a quarter of its length (a realloc once per halving: amortised O(1) per event).
    fn trim(&mut self) {
        let (len, room) = (self.keys.len(), self.keys.capacity());
        if room <= 32 || len >= room / 2 {
            return;
        }
        let keep = len + len / 4 + 8;
        self.keys.shrink_to(keep);
        for column in &mut self.inputs {
            column.shrink_to(keep);
        }
    }

    /// The slots the queue holds room for (its columns have at least as many).
    fn room(&self) -> usize {
        self.keys.capacity()
    }
}

/// A source with events inside its windows: the queue and the state of each aggregate over
/// it (in the order of [`rules::AggSource::aggregates`]).
#[derive(Debug, Clone)]
struct Source {
    queue: Queue,
    aggs: Vec<AggState>,
    /// Positions below this are as the store holds them (written, or read from it); an
    /// event inserted at a position lowers it. Chunks at or above it are written again.
    clean_until: u64,
}

impl Source {
    fn new(rules: &CompiledRules, id: usize) -> Source {
        Source {
            queue: Queue {
                inputs: vec![VecDeque::new(); rules.aggregate_sources()[id].properties.len()],
                ..Queue::default()
            },
            aggs: rules.aggregate_sources()[id]
                .aggregates
                .iter()
                .map(|&a| AggState::new(rules.aggregates()[a].func, 0))
                .collect(),
            clean_until: 0,
        }
    }
}

impl Source {
    /// A source read back from the store: its queue, and each aggregate's range of it,
    /// folded again. Nothing of it needs writing (until an event is inserted).
    fn assemble(
        rules: &CompiledRules,
        id: usize,
        queue: Queue,
        ranges: impl IntoIterator<Item = (u64, u64)>,
    ) -> Source {
        let aggs = rules.aggregate_sources()[id]
            .aggregates
            .iter()
            .zip(ranges)
            .map(|(&a, (lo, hi))| {
                let spec = &rules.aggregates()[a];
                let mut agg = AggState::new(spec.func, lo);
                for pos in lo..hi {
                    agg.include(queue.input(spec.slot, pos));
                    agg.hi = pos + 1;
                }
                agg
            })
            .collect();
        Source {
            clean_until: queue.end(),
            queue,
            aggs,
        }
    }
}

/// What an aggregate folds beyond its range of events.
#[derive(Debug, Clone)]
enum Acc {
    /// `count`, `last`, `first`, `since`: the range says it all.
    Range,
    Sum {
        sum: Decimal,
        numeric: u64,
        /// Sums that overflowed make `sum`/`avg` null until the window drains.
        overflowed: u64,
    },
    Extremes(BTreeMap<Decimal, u32>),
    Distinct(HashMap<DistinctKey, u32>),
}

/// One aggregate: the events at positions `lo..hi` of its queue are the ones inside its
/// window (`at - span < ts <= at`), folded into `acc`.
#[derive(Debug, Clone)]
struct AggState {
    lo: u64,
    hi: u64,
    acc: Acc,
}

impl AggState {
    fn new(func: AggFunc, pos: u64) -> AggState {
        let acc = match func {
            AggFunc::Sum | AggFunc::Avg => Acc::Sum {
                sum: Decimal::ZERO,
                numeric: 0,
                overflowed: 0,
            },
            AggFunc::Min | AggFunc::Max => Acc::Extremes(BTreeMap::new()),
            AggFunc::Distinct => Acc::Distinct(HashMap::new()),
            AggFunc::Count | AggFunc::Last | AggFunc::First | AggFunc::Since => Acc::Range,
        };
        AggState {
            lo: pos,
            hi: pos,
            acc,
        }
    }

    /// Moves the range to `now`: events that left the window go, events whose `ts` has come
    /// (inserted in the future, or skipped over) enter.
    fn advance(&mut self, slot: Option<usize>, span_ms: i64, q: &Queue, now: i64) {
        let floor = now.saturating_sub(span_ms);
        while self.lo < self.hi && q.ts(self.lo) <= floor {
            let pos = self.lo;
            self.lo += 1;
            self.exclude(slot, q, pos);
        }
        let end = q.end();
        while self.hi < end && q.ts(self.hi) <= now {
            if q.ts(self.hi) > floor {
                self.include(q.input(slot, self.hi));
                self.hi += 1;
            } else {
                // Entered and left within the jump: never counted. Nothing is counted yet
                // (the range is empty), since the queue is sorted.
                self.hi += 1;
                self.lo = self.hi;
            }
        }
    }

    fn include(&mut self, input: &Value) {
        match &mut self.acc {
            Acc::Range => {}
            Acc::Sum {
                sum,
                numeric,
                overflowed,
            } => {
                if let Value::Num(n) = input {
                    *numeric += 1;
                    match rules::exact_add(*sum, *n) {
                        Some(s) => *sum = s,
                        None => *overflowed += 1,
                    }
                }
            }
            Acc::Extremes(extremes) => {
                if let Value::Num(n) = input {
                    *extremes.entry(*n).or_default() += 1;
                }
            }
            Acc::Distinct(distinct) => {
                if let Some(k) = input.distinct_key() {
                    *distinct.entry(k).or_default() += 1;
                }
            }
        }
    }

    /// Takes the event at `pos` (already out of `lo..hi`) out of the accumulator.
    fn exclude(&mut self, slot: Option<usize>, q: &Queue, pos: u64) {
        let input = q.input(slot, pos);
        let (lo, hi) = (self.lo, self.hi);
        match &mut self.acc {
            Acc::Range => {}
            Acc::Sum {
                sum,
                numeric,
                overflowed,
            } => {
                if let Value::Num(n) = input {
                    *numeric -= 1;
                    match rules::exact_add(*sum, -*n).filter(|_| *overflowed == 0) {
                        Some(s) => *sum = s,
                        None => {
                            // Recount what is left (in window order, as a fresh fold
                            // would): sums that cannot be held exactly stay overflowed.
                            *sum = Decimal::ZERO;
                            *overflowed = 0;
                            for n in (lo..hi).filter_map(|p| q.input(slot, p).as_num()) {
                                match rules::exact_add(*sum, n) {
                                    Some(s) => *sum = s,
                                    None => *overflowed += 1,
                                }
                            }
                        }
                    }
                }
            }
            Acc::Extremes(extremes) => {
                if let Value::Num(n) = input {
                    if let Some(c) = extremes.get_mut(n) {
                        *c -= 1;
                        if *c == 0 {
                            extremes.remove(n);
                        }
                    }
                }
            }
            Acc::Distinct(distinct) => {
                if let Some(k) = input.distinct_key() {
                    if let Some(c) = distinct.get_mut(&k) {
                        *c -= 1;
                        if *c == 0 {
                            distinct.remove(&k);
                        }
                    }
                }
            }
        }
    }

    fn entries(&self) -> usize {
        match &self.acc {
            Acc::Extremes(e) => e.len(),
            Acc::Distinct(d) => d.len(),
            Acc::Range | Acc::Sum { .. } => 0,
        }
    }
}

/// Incremental state of every aggregate of the rule set for one customer.
#[derive(Debug, Clone, Default)]
pub struct WindowSet {
    /// The instant the state was last advanced to.
    at: i64,
    retention_ms: i64,
    /// One per aggregate source; `None` while none of its events is inside its windows
    /// (most customers touch a few event types: the others cost a pointer).
    sources: Vec<Option<Box<Source>>>,
}

impl WindowSet {
    /// Builds the state at `now` from a customer's events (any order).
    pub fn build(
        rules: &CompiledRules,
        retention_ms: i64,
        now: i64,
        events: &[Event],
        profile: impl Fn(&str) -> Option<Value> + Copy,
    ) -> WindowSet {
        let mut set = WindowSet {
            at: now,
            retention_ms,
            sources: vec![None; rules.aggregate_sources().len()],
        };
        for id in 0..set.sources.len() {
            set.refill(rules, id, events, profile);
        }
        set
    }

    /// Rebuilds the queues of the sources whose filter reads one of `attrs` (the profile
    /// changed), from the customer's events, at the current instant.
    pub fn rebuild_for_profile(
        &mut self,
        rules: &CompiledRules,
        attrs: &[std::sync::Arc<str>],
        events: &[Event],
        profile: impl Fn(&str) -> Option<Value> + Copy,
    ) {
        for (id, source) in rules.aggregate_sources().iter().enumerate() {
            if source.profile_reads.iter().any(|r| attrs.contains(r)) {
                self.refill(rules, id, events, profile);
            }
        }
    }

    /// True when some source's filter reads one of `attrs`.
    pub fn reads_profile(rules: &CompiledRules, attrs: &[std::sync::Arc<str>]) -> bool {
        rules
            .aggregate_sources()
            .iter()
            .any(|s| s.profile_reads.iter().any(|r| attrs.contains(r)))
    }

    /// Fills source `id`'s queue from `events` and brings its aggregates to `at`.
    fn refill(
        &mut self,
        rules: &CompiledRules,
        id: usize,
        events: &[Event],
        profile: impl Fn(&str) -> Option<Value> + Copy,
    ) {
        let source = &rules.aggregate_sources()[id];
        let floor = self
            .at
            .saturating_sub(source_span_ms(rules, id, self.retention_ms));
        let mut matching: Vec<&Event> = events
            .iter()
            .filter(|e| {
                e.ts > floor
                    && *e.event_type == *source.event_type
                    && filter_matches(source.filter.as_ref(), e, profile)
            })
            .collect();
        if matching.is_empty() {
            self.sources[id] = None;
            return;
        }
        matching.sort_by_key(|e| (e.ts, e.arrival));
        let mut src = Source::new(rules, id);
        src.queue.keys = matching.iter().map(|e| (e.ts, e.arrival)).collect();
        for (column, property) in src.queue.inputs.iter_mut().zip(&source.properties) {
            *column = matching.iter().map(|e| e.props.get(property)).collect();
        }
        for (agg, &a) in src.aggs.iter_mut().zip(&source.aggregates) {
            let spec = &rules.aggregates()[a];
            agg.advance(spec.slot, span_ms(spec, self.retention_ms), &src.queue, self.at);
        }
        self.sources[id] = Some(Box::new(src));
    }

    /// Adds an event applied at the current instant (its `ts` may be late or in the future)
    /// to the queues of the sources it matches.
    pub fn insert(
        &mut self,
        rules: &CompiledRules,
        event: &Event,
        profile: impl Fn(&str) -> Option<Value> + Copy,
    ) {
        for &id in rules.sources_for_event_type(&event.event_type) {
            let source = &rules.aggregate_sources()[id];
            let floor = self
                .at
                .saturating_sub(source_span_ms(rules, id, self.retention_ms));
            if event.ts <= floor || !filter_matches(source.filter.as_ref(), event, profile) {
                continue;
            }
            let src = self.sources[id].get_or_insert_with(|| Box::new(Source::new(rules, id)));
            let q = &mut src.queue;
            let key = (event.ts, event.arrival);
            // Most events arrive in time order: they go at the back without a search.
            let index = match q.keys.back() {
                Some(last) if *last > key => q.keys.partition_point(|k| *k < key),
                _ => q.keys.len(),
            };
            q.reserve_one();
            q.keys.insert(index, key);
            for (column, property) in q.inputs.iter_mut().zip(&source.properties) {
                column.insert(index, event.props.get(property));
            }
            src.clean_until = src.clean_until.min(q.base + index as u64);
            if event.ts > self.at {
                // Stamped in the future: enters when the clock reaches it (after every `hi`).
                continue;
            }
            let pos = q.base + index as u64;
            for (agg, &a) in src.aggs.iter_mut().zip(&source.aggregates) {
                let spec = &rules.aggregates()[a];
                if event.ts <= self.at.saturating_sub(span_ms(spec, self.retention_ms)) {
                    // Already out of this window: it sits before the range.
                    agg.lo += 1;
                    agg.hi += 1;
                } else {
                    agg.hi += 1;
                    agg.include(q.input(spec.slot, pos));
                }
            }
        }
    }

    /// Moves every window to `now` (never backwards).
    pub fn advance(&mut self, rules: &CompiledRules, now: i64) {
        if now <= self.at {
            return;
        }
        for (slot, source) in self.sources.iter_mut().zip(rules.aggregate_sources()) {
            let Some(src) = slot else { continue };
            let mut keep_from = src.queue.end();
            for (agg, &a) in src.aggs.iter_mut().zip(&source.aggregates) {
                let spec = &rules.aggregates()[a];
                agg.advance(spec.slot, span_ms(spec, self.retention_ms), &src.queue, now);
                keep_from = keep_from.min(agg.lo);
            }
            let q = &mut src.queue;
            while q.base < keep_from {
                q.keys.pop_front();
                for column in &mut q.inputs {
                    column.pop_front();
                }
                q.base += 1;
            }
            if q.keys.is_empty() {
                // Every window over it is empty, and so is every accumulator.
                *slot = None;
            } else {
                q.trim();
            }
        }
        self.at = now;
    }

    /// Appends the state's header to a customer record ([`WindowHeader`]): the chunk size
    /// of its queues, the layout and retention it was built under, its instant, and per source the queue's first position
    /// and length and each aggregate's range. The queues go in chunks ([`WindowSet::plan`]);
    /// accumulators are not stored: reading folds them again from the ranges.
    pub fn encode_header(&self, rules: &CompiledRules, w: &mut Writer) {
        w.u64(CHUNK_EVENTS);
        w.u64(rules.window_layout());
        w.i64(self.retention_ms);
        w.i64(self.at);
        w.u64(self.sources.len() as u64);
        for source in &self.sources {
            let Some(src) = source else {
                w.u8(0);
                continue;
            };
            w.u8(1);
            let q = &src.queue;
            w.u64(q.base);
            w.u64(q.keys.len() as u64);
            w.u64(src.aggs.len() as u64);
            for agg in &src.aggs {
                w.u64(agg.lo - q.base);
                w.u64(agg.hi - q.base);
            }
        }
    }

    /// What storing the state takes, given the chunks the store holds: chunks with an
    /// event inserted since they were stored, and new ones, are written; chunks no position
    /// of the queues lies in any more are deleted.
    pub fn plan(&self, stored: &StoredChunks) -> ChunkPlan {
        let mut plan = ChunkPlan::default();
        for id in 0..self.sources.len().max(stored.len()) {
            let src = self.sources.get(id).and_then(|s| s.as_deref());
            let live = src.and_then(|s| live_chunks(s.queue.base, s.queue.keys.len() as u64, CHUNK_EVENTS));
            let old = stored.get(id).copied().flatten();
            let (clean_until, end) = src.map_or((0, 0), |s| (s.clean_until, s.queue.end()));
            plan_source(
                old,
                live,
                clean_until,
                end,
                |c| plan.writes.push((id, c)),
                |c| plan.deletes.push((id, c)),
            );
            plan.stored.push(live);
        }
        while plan.stored.last() == Some(&None) {
            plan.stored.pop();
        }
        plan
    }

    /// Writes chunk `chunk` of source `id`'s queue (one of [`WindowSet::plan`]'s writes):
    /// its first position, then each event's `(ts, arrival)` delta-encoded from the one
    /// before and the property values the aggregates read.
    pub fn encode_chunk(&self, id: usize, chunk: u64, w: &mut Writer) {
        let q = &self.sources[id].as_ref().expect("a planned chunk's source").queue;
        let from = (chunk * CHUNK_EVENTS).max(q.base);
        let to = ((chunk + 1) * CHUNK_EVENTS).min(q.end());
        let range = (from - q.base) as usize..(to - q.base) as usize;
        w.u64(from);
        w.u64(to - from);
        let (mut ts, mut arrival) = (0i64, 0i64);
        for &(t, a) in q.keys.range(range.clone()) {
            w.i64(t.wrapping_sub(ts));
            w.i64((a as i64).wrapping_sub(arrival));
            (ts, arrival) = (t, a as i64);
        }
        w.u64(q.inputs.len() as u64);
        for column in &q.inputs {
            for v in column.range(range.clone()) {
                w.value(v);
            }
        }
    }

    /// Records that the store now holds the queues as they are (after a commit that wrote
    /// [`WindowSet::plan`]'s chunks).
    pub fn mark_stored(&mut self) {
        for src in self.sources.iter_mut().flatten() {
            src.clean_until = src.queue.end();
        }
    }

    /// Reads back the state a header (which [`WindowHeader::fits`] the rules) and its
    /// chunks describe. `chunks` yields `(source, chunk, bytes)` in key order; chunks the
    /// header does not name are skipped (the caller may pass them all). Every position of
    /// every queue must be found, else the record is corrupt.
    pub fn from_chunks<'a>(
        header: &WindowHeader,
        rules: &CompiledRules,
        chunks: impl IntoIterator<Item = (usize, u64, &'a [u8])>,
    ) -> Result<WindowSet, CodecError> {
        let mut queues: Vec<Option<Queue>> = header
            .sources
            .iter()
            .zip(rules.aggregate_sources())
            .map(|(h, source)| {
                h.as_ref().map(|h| Queue {
                    keys: VecDeque::with_capacity(h.len as usize),
                    inputs: vec![VecDeque::with_capacity(h.len as usize); source.properties.len()],
                    base: h.base,
                })
            })
            .collect();
        for (id, chunk, bytes) in chunks {
            if !header.wanted(id, chunk) {
                continue;
            }
            let (h, q) = match (&header.sources[id], &mut queues[id]) {
                (Some(h), Some(q)) => (h, q),
                _ => continue,
            };
            let mut r = Reader::new(bytes);
            let from = r.u64()?;
            let n = r.len()?;
            let next = q.base + q.keys.len() as u64;
            // The positions of the chunk still in the queue, from where the queue is filled.
            let end = h.base + h.len;
            let skip = next.saturating_sub(from) as usize;
            let take = (end.min(from + n as u64).saturating_sub(next.max(from))) as usize;
            if from > next || skip > n {
                return Err(CodecError("window chunks missing"));
            }
            let (mut ts, mut arrival) = (0i64, 0i64);
            for i in 0..n {
                ts = ts.wrapping_add(r.i64()?);
                arrival = arrival.wrapping_add(r.i64()?);
                if (skip..skip + take).contains(&i) {
                    q.keys.push_back((ts, arrival as u64));
                }
            }
            if r.len()? != q.inputs.len() {
                return Err(CodecError("window chunk does not match its layout"));
            }
            for column in &mut q.inputs {
                for i in 0..n {
                    let v = r.value()?;
                    if (skip..skip + take).contains(&i) {
                        column.push_back(v);
                    }
                }
            }
        }
        let mut set = WindowSet {
            at: header.at,
            retention_ms: header.retention_ms,
            sources: Vec::with_capacity(queues.len()),
        };
        for (id, (h, queue)) in header.sources.iter().zip(queues).enumerate() {
            let (Some(h), Some(queue)) = (h, queue) else {
                set.sources.push(None);
                continue;
            };
            if queue.keys.len() as u64 != h.len {
                return Err(CodecError("window chunks missing"));
            }
            let ranges = h.ranges.iter().map(|(lo, hi)| (h.base + lo, h.base + hi));
            set.sources
                .push(Some(Box::new(Source::assemble(rules, id, queue, ranges))));
        }
        Ok(set)
    }

    /// The state as records of version 3 kept it, inline: each source's queue whole.
    #[cfg(test)]
    pub fn encode_inline(&self, rules: &CompiledRules, w: &mut Writer) {
        w.u64(rules.window_layout());
        w.i64(self.retention_ms);
        w.i64(self.at);
        w.u64(self.sources.len() as u64);
        for source in &self.sources {
            let Some(src) = source else {
                w.u8(0);
                continue;
            };
            w.u8(1);
            let q = &src.queue;
            w.u64(q.keys.len() as u64);
            let (mut ts, mut arrival) = (self.at, 0i64);
            for &(t, a) in &q.keys {
                w.i64(t - ts);
                w.i64(a as i64 - arrival);
                (ts, arrival) = (t, a as i64);
            }
            w.u64(q.inputs.len() as u64);
            for column in &q.inputs {
                for v in column {
                    w.value(v);
                }
            }
            w.u64(src.aggs.len() as u64);
            for agg in &src.aggs {
                w.u64(agg.lo - q.base);
                w.u64(agg.hi - q.base);
            }
        }
    }

    /// Reads the inline state of a version 3 record. `Ok(None)` when it was written under
    /// rules whose windows are shaped otherwise, or another retention: the caller builds the
    /// state from the history instead.
    pub fn decode_inline(
        r: &mut Reader<'_>,
        rules: &CompiledRules,
        retention_ms: i64,
    ) -> Result<Option<WindowSet>, CodecError> {
        let layout = r.u64()?;
        let stored_retention = r.i64()?;
        let at = r.i64()?;
        let n = r.len()?;
        let fits = layout == rules.window_layout()
            && stored_retention == retention_ms
            && n == rules.aggregate_sources().len();
        let mut set = WindowSet {
            at,
            retention_ms,
            sources: Vec::with_capacity(n),
        };
        for id in 0..n {
            if r.u8()? == 0 {
                set.sources.push(None);
                continue;
            }
            let len = r.len()?;
            let mut keys = VecDeque::with_capacity(len);
            let (mut ts, mut arrival) = (at, 0i64);
            for _ in 0..len {
                ts += r.i64()?;
                arrival += r.i64()?;
                keys.push_back((ts, arrival as u64));
            }
            let columns = r.len()?;
            let mut inputs = Vec::with_capacity(columns);
            for _ in 0..columns {
                let mut column = VecDeque::with_capacity(len);
                for _ in 0..len {
                    column.push_back(r.value()?);
                }
                inputs.push(column);
            }
            let aggs = r.len()?;
            let mut ranges = Vec::with_capacity(aggs);
            for _ in 0..aggs {
                let (lo, hi) = (r.u64()?, r.u64()?);
                if lo > hi || hi > len as u64 {
                    return Err(CodecError("bad window range"));
                }
                ranges.push((lo, hi));
            }
            if !fits {
                continue;
            }
            let source = &rules.aggregate_sources()[id];
            if columns != source.properties.len() || aggs != source.aggregates.len() {
                return Err(CodecError("window state does not match its layout"));
            }
            let queue = Queue {
                keys,
                inputs,
                base: 0,
            };
            set.sources
                .push(Some(Box::new(Source::assemble(rules, id, queue, ranges))));
        }
        Ok(fits.then_some(set))
    }

    /// The instant the state was last advanced to.
    pub fn at(&self) -> i64 {
        self.at
    }

    /// Events held in the queues, for memory accounting: `(events, property values)`.
    pub fn held(&self) -> (usize, usize) {
        self.sources.iter().flatten().fold((0, 0), |(events, values), s| {
            let n = s.queue.keys.len();
            (events + n, values + n * s.queue.inputs.len())
        })
    }

    /// An estimate of the bytes this holds, in O(sources + aggregates): the fixed parts by
    /// their sizes, the queues by the room they hold (not only their events), accumulator
    /// entries at a hash or tree slot each. A string value's own allocation is not counted.
    pub fn approx_bytes(&self) -> usize {
        use std::mem::size_of;
        const ENTRY_BYTES: usize = 64;
        let mut bytes = size_of::<WindowSet>() + self.sources.len() * size_of::<Option<Box<Source>>>();
        for s in self.sources.iter().flatten() {
            let room = s.queue.room();
            let queued = room * (size_of::<(i64, u64)>() + s.queue.inputs.len() * size_of::<Value>());
            bytes += size_of::<Source>()
                + s.queue.inputs.len() * size_of::<VecDeque<Value>>()
                + s.aggs.len() * size_of::<AggState>()
                + queued
                + s.aggs.iter().map(AggState::entries).sum::<usize>() * ENTRY_BYTES;
        }
        bytes
    }

    /// Aggregate `id`'s value at the instant the state was advanced to.
    pub fn value(&self, rules: &CompiledRules, id: usize) -> Value {
        let spec = &rules.aggregates()[id];
        let Some(src) = &self.sources[spec.source] else {
            return empty_value(spec.func);
        };
        let agg = &src.aggs[spec.position];
        let q = &src.queue;
        let counted = agg.hi - agg.lo;
        match (&agg.acc, spec.func) {
            (_, AggFunc::Count) => Value::Num(Decimal::from(counted)),
            (Acc::Sum { overflowed, .. }, AggFunc::Sum) if *overflowed > 0 => Value::Null,
            (Acc::Sum { sum, .. }, AggFunc::Sum) => Value::Num(*sum),
            (
                Acc::Sum {
                    sum,
                    numeric,
                    overflowed,
                },
                AggFunc::Avg,
            ) => {
                if *overflowed > 0 || *numeric == 0 {
                    Value::Null
                } else {
                    sum.checked_div(Decimal::from(*numeric))
                        .map_or(Value::Null, Value::Num)
                }
            }
            (Acc::Extremes(e), AggFunc::Min) => e.keys().next().map_or(Value::Null, |n| Value::Num(*n)),
            (Acc::Extremes(e), AggFunc::Max) => e.keys().next_back().map_or(Value::Null, |n| Value::Num(*n)),
            (Acc::Distinct(d), _) => Value::Num(Decimal::from(d.len() as u64)),
            (_, AggFunc::Last) if counted > 0 => q.input(spec.slot, agg.hi - 1).clone(),
            (_, AggFunc::First) if counted > 0 => q.input(spec.slot, agg.lo).clone(),
            (_, AggFunc::Since) if counted > 0 => Value::Dur(self.at - q.ts(agg.hi - 1)),
            _ => Value::Null,
        }
    }

    /// The earliest instant after the current one at which aggregate `id`'s value could
    /// change by time alone: an event leaves, or the next future one enters. `last` and
    /// `since` read only the newest event, so only its leaving (after every older one) or
    /// a newer one entering changes them; `first` reads the oldest, so a future event
    /// entering changes it only while nothing is counted. (`since` also grows with the
    /// clock in between: that is a comparison's crossing, not a change of its events.)
    pub fn next_change(&self, rules: &CompiledRules, id: usize) -> Option<i64> {
        let spec = &rules.aggregates()[id];
        let src = self.sources[spec.source].as_ref()?;
        let agg = &src.aggs[spec.position];
        let q = &src.queue;
        let span = span_ms(spec, self.retention_ms);
        let counted = agg.hi > agg.lo;
        let leaves = counted.then(|| match spec.func {
            AggFunc::Last | AggFunc::Since => q.ts(agg.hi - 1).saturating_add(span),
            _ => q.ts(agg.lo).saturating_add(span),
        });
        let enters = (agg.hi < q.end() && (!counted || spec.func != AggFunc::First)).then(|| q.ts(agg.hi));
        [leaves, enters]
            .into_iter()
            .flatten()
            .filter(|t| *t > self.at)
            .min()
    }

    /// A count whose events only leave from the current instant on (none stamped later is
    /// waiting to enter): its value. `None` for other aggregates.
    pub fn falling_count(&self, rules: &CompiledRules, id: usize) -> Option<u64> {
        let spec = &rules.aggregates()[id];
        if spec.func != AggFunc::Count {
            return None;
        }
        let Some(src) = self.sources[spec.source].as_ref() else {
            return Some(0);
        };
        let agg = &src.aggs[spec.position];
        (agg.hi == src.queue.end()).then_some(agg.hi - agg.lo)
    }

    /// The instant the `k`-th (from 1, oldest first) of a falling count's events leaves it;
    /// `k` is at most the count [`WindowSet::falling_count`] gave.
    pub fn count_exit(&self, rules: &CompiledRules, id: usize, k: u64) -> i64 {
        let spec = &rules.aggregates()[id];
        let Some(src) = self.sources[spec.source].as_ref() else {
            return i64::MAX;
        };
        let agg = &src.aggs[spec.position];
        debug_assert!(
            k >= 1 && agg.lo + k <= agg.hi,
            "exit {k} of a count of {}",
            agg.hi - agg.lo
        );
        src.queue
            .ts(agg.lo + k - 1)
            .saturating_add(span_ms(spec, self.retention_ms))
    }

    /// The earliest instant after the current one at which aggregate `id`'s value, moved by
    /// time alone, leaves `band`. A count whose events only leave finds it at once; counts
    /// and sums otherwise follow their events for at most `LOOKAHEAD` (32) changes (then that
    /// instant is returned: early, never late); other aggregates stop at their next change.
    pub fn leaves(&self, rules: &CompiledRules, id: usize, band: &Band) -> Option<i64> {
        let spec = &rules.aggregates()[id];
        let src = self.sources[spec.source].as_ref()?;
        let agg = &src.aggs[spec.position];
        let q = &src.queue;
        let span = span_ms(spec, self.retention_ms);
        match (&agg.acc, spec.func) {
            (_, AggFunc::Count) if agg.hi == q.end() => {
                // Only leaving: the count falls by one at each exit, and leaves the band when
                // it falls below its lowest value inside.
                let (low, inclusive) = band.low?;
                let lowest = if inclusive {
                    low.ceil()
                } else {
                    low.floor() + Decimal::ONE
                };
                let lowest = lowest.to_u64().filter(|l| *l >= 1)?;
                let exits = (agg.hi - agg.lo).checked_sub(lowest)? + 1;
                return Some(q.ts(agg.lo + exits - 1).saturating_add(span));
            }
            (_, AggFunc::Count) | (Acc::Sum { overflowed: 0, .. }, AggFunc::Sum) => {}
            _ => return self.next_change(rules, id),
        }
        // Otherwise a copy of the aggregate's state is moved from one change of its events
        // to the next.
        let mut probe = agg.clone();
        let mut looked = None;
        for _ in 0..LOOKAHEAD {
            let leaves = (probe.lo < probe.hi).then(|| q.ts(probe.lo).saturating_add(span));
            let enters = (probe.hi < q.end()).then(|| q.ts(probe.hi));
            let t = leaves.into_iter().chain(enters).min()?;
            probe.advance(spec.slot, span, q, t);
            let value = match &probe.acc {
                Acc::Sum {
                    sum, overflowed: 0, ..
                } => *sum,
                Acc::Sum { .. } => return Some(t), // overflowed: judged there
                _ => Decimal::from(probe.hi - probe.lo),
            };
            if !band.contains(value) {
                return Some(t);
            }
            if probe.lo == probe.hi && probe.hi == q.end() {
                return None; // every event has left: the value holds from here on
            }
            looked = Some(t);
        }
        // Looked far enough: ask again at the last instant looked at.
        looked
    }
}

/// An aggregate's value over no events.
fn empty_value(func: AggFunc) -> Value {
    match func {
        AggFunc::Count | AggFunc::Sum | AggFunc::Distinct => Value::Num(Decimal::ZERO),
        AggFunc::Avg | AggFunc::Min | AggFunc::Max | AggFunc::Last | AggFunc::First | AggFunc::Since => {
            Value::Null
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `plan_source` against the plan it replaced, which looked at every chunk of both
    /// ranges: the same writes and deletes, in the same order, over every arrangement of
    /// small ranges and clean marks.
    #[test]
    fn a_sources_plan_looks_only_at_what_it_writes_and_deletes() {
        let naive = |old: Option<(u64, u64)>, live: Option<(u64, u64)>, clean_until: u64, end: u64| {
            let held =
                |range: Option<(u64, u64)>, c: u64| range.is_some_and(|(lo, hi)| (lo..hi).contains(&c));
            let deletes: Vec<u64> =
                old.map_or(vec![], |(lo, hi)| (lo..hi).filter(|c| !held(live, *c)).collect());
            let changed = |c: u64| clean_until.max(c * CHUNK_EVENTS) < ((c + 1) * CHUNK_EVENTS).min(end);
            let writes: Vec<u64> = live.map_or(vec![], |(lo, hi)| {
                (lo..hi).filter(|c| !held(old, *c) || changed(*c)).collect()
            });
            (writes, deletes)
        };
        let ranges: Vec<Option<(u64, u64)>> = std::iter::once(None)
            .chain((0..6).flat_map(|lo| (lo + 1..7).map(move |hi| Some((lo, hi)))))
            .collect();
        let mut compared = 0;
        for &old in &ranges {
            for &live in &ranges {
                // The queue ends inside its last live chunk; nothing is clean past the end.
                let ends: Vec<u64> = match live {
                    None => vec![0],
                    Some((_, hi)) => vec![(hi - 1) * CHUNK_EVENTS + 1, hi * CHUNK_EVENTS],
                };
                for end in ends {
                    for clean_until in (0..=end).step_by(37).chain([end]) {
                        let (mut writes, mut deletes) = (vec![], vec![]);
                        plan_source(
                            old,
                            live,
                            clean_until,
                            end,
                            |c| writes.push(c),
                            |c| deletes.push(c),
                        );
                        assert_eq!(
                            (writes, deletes),
                            naive(old, live, clean_until, end),
                            "old {old:?}, live {live:?}, clean until {clean_until}, end {end}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 1000, "{compared} arrangements");
    }
    use rules::Props;

    fn events(spec: &[(i64, f64)]) -> Vec<Event> {
        spec.iter()
            .enumerate()
            .map(|(i, (ts, amount))| {
                let json = serde_json::json!({ "amount": amount, "p": format!("v{}", *amount as i64 % 3) });
                Event {
                    event_type: "pay".into(),
                    ts: *ts,
                    arrival: i as u64,
                    props: Props::from_json(json.as_object().unwrap()),
                }
            })
            .collect()
    }

    /// The incremental state of every aggregate, sharing queues, agrees with the reference
    /// computation at every instant, with events applied in a scrambled order.
    #[test]
    fn incremental_matches_reference_at_every_step() {
        let rules = CompiledRules::compile(
            "trait a = sum(pay.amount, 10ms) + count(pay, 10ms)
             trait b = avg(pay.amount, 7ms)
             trait c = min(pay.amount, 5ms)
             trait d = max(pay.amount, lifetime)
             trait e = distinct(pay.p, 6ms)
             trait f = last(pay.amount)
             trait g = first(pay.amount)
             trait h = since(pay)
             trait i = count(pay where amount > 3, 4ms) + last(pay.p where amount > 3)",
        )
        .unwrap();
        assert_eq!(rules.aggregate_sources().len(), 2, "shared queues under test");
        let all = events(&[
            (3, 1.5),
            (1, 2.0),
            (8, 0.1),
            (2, 9.0),
            (15, 4.0),
            (9, 4.0),
            (30, 7.0),
            (12, 1.0),
            (40, 5.0),
            (26, 8.0),
        ]);
        let retention = 20;
        let mut set = WindowSet::build(&rules, retention, 0, &[], |_| None);
        let mut applied: Vec<Event> = Vec::new();
        let mut pending = all.clone();
        let (mut store, mut stored) = (Chunks::default(), StoredChunks::new());
        for now in 0..70 {
            // Apply the events "arriving" at this instant: one every other step, in list order.
            if !pending.is_empty() && now % 2 == 0 {
                let e = pending.remove(0);
                set.insert(&rules, &e, |_| None);
                applied.push(e);
            }
            if now == 64 {
                // Every queue has drained by now: a new event starts them again.
                assert_eq!(set.held(), (0, 0));
                let mut e = events(&[(63, 6.0)]).remove(0);
                e.arrival = 99;
                set.insert(&rules, &e, |_| None);
                applied.push(e);
            }
            set.advance(&rules, now);
            // Stored and read back (a cache miss), the state is the same — and it carries on
            // from there every third step.
            let (header, _) = store.store(&mut set, &rules, &mut stored);
            let decoded = store.load(&header, &rules, retention).unwrap();
            for id in 0..rules.aggregates().len() {
                assert_eq!(
                    decoded.value(&rules, id),
                    set.value(&rules, id),
                    "decoded at {now}"
                );
                assert_eq!(decoded.next_change(&rules, id), set.next_change(&rules, id));
            }
            assert_eq!(decoded.held(), set.held());
            if now % 3 == 0 {
                set = decoded;
            }
            let rebuilt = WindowSet::build(&rules, retention, now, &applied, |_| None);
            for (id, spec) in rules.aggregates().iter().enumerate() {
                let expected = spec.compute(&applied, now, retention, |_| None);
                assert_eq!(set.value(&rules, id), expected, "{} at {now}", spec.text);
                assert_eq!(
                    rebuilt.value(&rules, id),
                    expected,
                    "{} rebuilt at {now}",
                    spec.text
                );
                assert_eq!(
                    set.next_change(&rules, id),
                    rebuilt.next_change(&rules, id),
                    "{} at {now}",
                    spec.text
                );
                // Never late: with no new event, nothing changes before `next_change`.
                let horizon = set.next_change(&rules, id).unwrap_or(now + 100);
                let value_now = spec.compute(&applied, now, retention, |_| None);
                for t in now + 1..horizon.min(now + 100) {
                    if !matches!(spec.func, AggFunc::Since) {
                        assert_eq!(
                            spec.compute(&applied, t, retention, |_| None),
                            value_now,
                            "{} changed at {t} before {horizon}",
                            spec.text
                        );
                    }
                }
            }
        }
        assert_eq!(set.held(), (2, 3), "only the last event is held, once per source");
    }

    /// A store of window chunks, as RocksDB would hold them under one customer's prefix.
    #[derive(Default)]
    struct Chunks(BTreeMap<(usize, u64), Vec<u8>>);

    impl Chunks {
        /// Writes `set` as the engine's commit does; returns the header and how many chunks
        /// were written.
        fn store(
            &mut self,
            set: &mut WindowSet,
            rules: &CompiledRules,
            stored: &mut StoredChunks,
        ) -> (Vec<u8>, usize) {
            let plan = set.plan(stored);
            for key in &plan.deletes {
                assert!(
                    self.0.remove(key).is_some(),
                    "deletes only chunks it wrote: {key:?}"
                );
            }
            for &(id, chunk) in &plan.writes {
                let mut w = Writer::new();
                set.encode_chunk(id, chunk, &mut w);
                self.0.insert((id, chunk), w.buf);
            }
            set.mark_stored();
            *stored = plan.stored;
            let mut header = Writer::new();
            set.encode_header(rules, &mut header);
            (header.buf, plan.writes.len())
        }

        fn load(
            &self,
            header: &[u8],
            rules: &CompiledRules,
            retention: i64,
        ) -> Result<WindowSet, CodecError> {
            let header = WindowHeader::decode(&mut Reader::new(header))?;
            assert!(header.fits(rules, retention));
            assert_eq!(
                header
                    .stored_chunks()
                    .iter()
                    .flatten()
                    .map(|(lo, hi)| hi - lo)
                    .sum::<u64>() as usize,
                self.0.len(),
                "the store holds exactly the chunks the header names"
            );
            WindowSet::from_chunks(
                &header,
                rules,
                self.0.iter().map(|((id, c), b)| (*id, *c, &b[..])),
            )
        }
    }

    /// Stored in chunks after every step (events in order, late events in the middle, time
    /// passing, a queue emptying and starting again), the state reads back equal, every
    /// aggregate with the same value; an event at the back rewrites one chunk whatever the
    /// queue holds, and chunks the windows left are deleted.
    #[test]
    fn chunked_state_reads_back_equal_and_writes_what_changed() {
        let rules = CompiledRules::compile(
            "trait n = count(pay, 1000ms)\ntrait s = sum(pay.amount, 500ms)\ntrait d = distinct(pay.p, 1000ms)",
        )
        .unwrap();
        let mut set = WindowSet::build(&rules, 100_000, 0, &[], |_| None);
        let mut store = Chunks::default();
        let mut stored = StoredChunks::new();
        let check = |set: &WindowSet, header: &[u8], store: &Chunks| {
            let back = store.load(header, &rules, 100_000).unwrap();
            assert_eq!(back.held(), set.held());
            for id in 0..rules.aggregates().len() {
                assert_eq!(back.value(&rules, id), set.value(&rules, id), "aggregate {id}");
            }
        };
        let mut arrival = 0;
        let mut event = |ts: i64, amount: f64| {
            arrival += 1;
            let mut e = events(&[(ts, amount)]).pop().unwrap();
            e.arrival = arrival;
            e
        };
        // 600 events in order, one per ms: each stored after it is applied.
        for t in 1..=600 {
            set.advance(&rules, t);
            set.insert(&rules, &event(t, t as f64), |_| None);
            let (header, written) = store.store(&mut set, &rules, &mut stored);
            assert!(
                written <= 2,
                "an event at the back rewrites its chunk, not the queue ({written} at {t})"
            );
            if t % 97 == 0 {
                check(&set, &header, &store);
            }
        }
        let chunks = 600_u64.div_ceil(CHUNK_EVENTS) as usize;
        assert_eq!(store.0.len(), chunks, "600 events in chunks of {CHUNK_EVENTS}");
        // A late event lands in the middle (position 250, after the event of the same `ts`):
        // its chunk and those after it are written again.
        set.insert(&rules, &event(250, 7.0), |_| None);
        let (header, written) = store.store(&mut set, &rules, &mut stored);
        assert_eq!(written, chunks - (250 / CHUNK_EVENTS) as usize);
        check(&set, &header, &store);
        // Time passes: events leave the windows and their chunks are deleted.
        set.advance(&rules, 1_400);
        let (header, written) = store.store(&mut set, &rules, &mut stored);
        assert_eq!(written, 0);
        assert!(store.0.len() < chunks, "chunks the windows left are deleted");
        check(&set, &header, &store);
        set.advance(&rules, 5_000);
        let (header, _) = store.store(&mut set, &rules, &mut stored);
        assert!(
            store.0.is_empty() && stored.is_empty(),
            "empty windows leave nothing stored"
        );
        check(&set, &header, &store);
        // The queue starts again from position 0.
        set.insert(&rules, &event(5_000, 1.0), |_| None);
        let (header, written) = store.store(&mut set, &rules, &mut stored);
        assert_eq!(written, 1);
        check(&set, &header, &store);
        // A damaged chunk is an error, never a panic; so is a missing one.
        let (key, bytes) = store.0.iter().next().map(|(k, v)| (*k, v.clone())).unwrap();
        for cut in 0..bytes.len() {
            store.0.insert(key, bytes[..cut].to_vec());
            assert!(store.load(&header, &rules, 100_000).is_err());
        }
        store.0.clear();
        let header = WindowHeader::decode(&mut Reader::new(&header)).unwrap();
        assert!(WindowSet::from_chunks(&header, &rules, []).is_err());
    }

    /// A queue read back at its exact length and then given an event grows by a quarter,
    /// not twofold; when most of its events have left its windows it gives the room back;
    /// and the cache's estimate counts the room, not only the events.
    #[test]
    fn queues_hold_little_more_room_than_their_events() {
        let rules = CompiledRules::compile("trait s = sum(pay.amount, 10000ms)").unwrap();
        let mut arrival = 0;
        let mut event = |ts: i64| {
            arrival += 1;
            let mut e = events(&[(ts, 1.0)]).pop().unwrap();
            e.arrival = arrival;
            e
        };
        let mut set = WindowSet::build(&rules, 100_000, 0, &[], |_| None);
        for t in 1..=1_000 {
            set.advance(&rules, t);
            set.insert(&rules, &event(t), |_| None);
        }
        let room = |set: &WindowSet| set.sources[0].as_ref().unwrap().queue.room();
        let columns_room = |set: &WindowSet| {
            let q = &set.sources[0].as_ref().unwrap().queue;
            q.inputs.iter().map(|c| c.capacity()).min().unwrap()
        };
        assert!(
            room(&set) <= 1_000 + 1_000 / 4 + 8,
            "grown by quarters: {}",
            room(&set)
        );
        let mut store = Chunks::default();
        let mut stored = StoredChunks::new();
        let (header, _) = store.store(&mut set, &rules, &mut stored);
        let mut back = store.load(&header, &rules, 100_000).unwrap();
        assert_eq!(room(&back), 1_000, "read back at its length");
        let before = back.approx_bytes();
        back.advance(&rules, 1_001);
        back.insert(&rules, &event(1_001), |_| None);
        assert_eq!(
            room(&back),
            1_000 + 1_000 / 4 + 8,
            "one more event: a quarter more room"
        );
        assert!(
            columns_room(&back) >= room(&back),
            "the columns have room with the keys"
        );
        assert!(back.approx_bytes() > before, "the estimate counts the room");
        // 900 of the 1,001 events leave the window: the room shrinks with them.
        back.advance(&rules, 10_900);
        let q = &back.sources[0].as_ref().unwrap().queue;
        assert_eq!(q.keys.len(), 101);
        assert!(room(&back) < 200, "room given back: {}", room(&back));
        assert_eq!(back.value(&rules, 0), Value::Num(Decimal::from(101)));
    }

    /// State kept under rules whose windows are shaped otherwise, or under another
    /// retention, is not used (the caller rebuilds it from the history); a damaged record is
    /// an error, never a panic. Both for the header of version 4 records and the inline
    /// state of version 3.
    #[test]
    fn stored_state_is_used_only_under_the_same_layout() {
        let rules =
            CompiledRules::compile("trait n = count(pay, 10ms)\ntrait s = sum(pay.amount, 10ms)").unwrap();
        let set = WindowSet::build(&rules, 100, 20, &events(&[(12, 1.5), (15, 2.0)]), |_| None);
        let mut inline = Writer::new();
        set.encode_inline(&rules, &mut inline);
        let mut header = Writer::new();
        set.encode_header(&rules, &mut header);
        let read = |r: &CompiledRules, retention| {
            let fits = WindowHeader::decode(&mut Reader::new(&header.buf))
                .unwrap()
                .fits(r, retention);
            let inline = WindowSet::decode_inline(&mut Reader::new(&inline.buf), r, retention).unwrap();
            assert_eq!(fits, inline.is_some());
            fits
        };
        assert!(read(&rules, 100));
        assert!(!read(&rules, 99), "another retention");
        let same = CompiledRules::compile(
            "trait n = count(pay, 10ms)\ntrait s = sum(pay.amount, 10ms)\ntag t = n > 1",
        )
        .unwrap();
        assert_eq!(same.window_layout(), rules.window_layout(), "the same windows");
        let wider =
            CompiledRules::compile("trait n = count(pay, 11ms)\ntrait s = sum(pay.amount, 10ms)").unwrap();
        assert!(!read(&wider, 100), "another window");
        let filtered = CompiledRules::compile(
            "trait n = count(pay where amount > 1, 10ms)\ntrait s = sum(pay.amount, 10ms)",
        )
        .unwrap();
        assert!(!read(&filtered, 100), "another filter");
        let back = WindowSet::decode_inline(&mut Reader::new(&inline.buf), &rules, 100)
            .unwrap()
            .unwrap();
        assert_eq!(back.value(&rules, 1), set.value(&rules, 1));
        for cut in 0..inline.buf.len() {
            assert!(WindowSet::decode_inline(&mut Reader::new(&inline.buf[..cut]), &rules, 100).is_err());
        }
        for cut in 0..header.buf.len() {
            assert!(WindowHeader::decode(&mut Reader::new(&header.buf[..cut])).is_err());
        }
    }

    /// `leaves` finds the first instant a count or sum, moved by time alone (events leaving
    /// and future ones entering), is outside a band around its value — exactly, with fewer
    /// changes than the look-ahead — and `None` when it never is.
    #[test]
    fn leaving_a_band_is_found_at_its_exact_instant() {
        let rules = CompiledRules::compile(
            "trait n = count(pay, 10ms)
             trait s = sum(pay.amount, 7ms)
             trait l = count(pay, lifetime)",
        )
        .unwrap();
        let all = events(&[
            (3, 1.5),
            (1, 2.0),
            (8, -3.0),
            (2, 9.0),
            (15, 4.0),
            (9, 4.0),
            (30, 7.0),
            (12, 1.0),
            (26, 8.0),
            (26, 0.5),
        ]);
        let retention = 20;
        let mut checked = 0;
        for now in 0..45 {
            // Every event known at once, some stamped after `now` (they enter later).
            let set = WindowSet::build(&rules, retention, now, &all, |_| None);
            for (id, spec) in rules.aggregates().iter().enumerate() {
                let Value::Num(v) = spec.compute(&all, now, retention, |_| None) else {
                    panic!("{} is a number", spec.text);
                };
                let one = Decimal::ONE;
                let bands = [
                    Band::default(),
                    Band {
                        low: Some((v, true)),
                        high: None,
                    },
                    Band {
                        low: Some((v - one, false)),
                        high: Some((v + one, false)),
                    },
                    Band {
                        low: Some((v, true)),
                        high: Some((v, true)),
                    },
                    Band {
                        low: Some((v - Decimal::TWO, true)),
                        high: Some((v + Decimal::new(5, 1), true)),
                    },
                    Band {
                        low: None,
                        high: Some((v, true)),
                    },
                ];
                for band in bands {
                    let expected =
                        (now + 1..now + 200).find(|t| match spec.compute(&all, *t, retention, |_| None) {
                            Value::Num(x) => !band.contains(x),
                            _ => true,
                        });
                    assert_eq!(
                        set.leaves(&rules, id, &band),
                        expected,
                        "{} at {now} leaving {band:?}",
                        spec.text
                    );
                    checked += usize::from(expected.is_some());
                }
            }
        }
        assert!(checked > 100, "the bands are left often: {checked}");
    }

    #[test]
    fn an_event_is_held_once_however_many_aggregates_read_it() {
        let rules = CompiledRules::compile(
            "trait a = sum(pay.amount, 30d) + avg(pay.amount, 90d) + count(pay, lifetime) + count(pay, 7d)",
        )
        .unwrap();
        let set = WindowSet::build(
            &rules,
            400 * 86_400_000,
            100,
            &events(&[(1, 1.0), (2, 2.0), (3, 3.0)]),
            |_| None,
        );
        assert_eq!(set.held(), (3, 3), "three events, one `amount` column");
    }
}
