//! The customers kept in memory between batches: bounded by a count and by an estimate of
//! their bytes; the least often used lately are evicted first, the least recently used
//! among equals.
//!
//! The byte estimate is what makes memory bounded by configuration rather than by data: a
//! cached customer holds their retained history and the per-window queues, so with Zipf
//! activity a few head customers can weigh more than the whole tail. Estimating costs O(1)
//! per customer (counts, not a walk over the events).
//!
//! Why frequency and not recency alone: when the cache holds a small part of the customers,
//! most of those it loads are used once in a long while (a new customer, the tail of a Zipf
//! population), and under least-recently-used each of them pushes out a customer used in
//! every batch, which must then be read back from the store. How often each customer was
//! used lately, cached or not, is counted in a small sketch ([`UseSketch`]), so a customer
//! evicted while busy is known busy when it comes back.

use std::hash::BuildHasher;
use std::sync::Arc;

use crate::state::CustomerState;

/// Bytes of one event held in memory with its props (while a customer's history is loaded,
/// in the batch that loaded it): the `Event`, its property names and values on the heap, and
/// the vector slot. Measured on the scenario mix (3–4 properties per event), rounded up.
const EVENT_BYTES: usize = 320;
/// The record itself: profile, memberships, maps, the cache slot.
const BASE_BYTES: usize = 1024;

/// An estimate of what `state` holds in memory.
pub fn estimate_bytes(state: &CustomerState) -> usize {
    BASE_BYTES
        + state.history.events.len() * EVENT_BYTES
        + state.history.profile.len() * 96
        + (state.members.len() + state.event_tags.len() + state.manual.len()) * 96
        + state.windows.as_ref().map_or(0, |w| w.approx_bytes())
}

/// Asks the process's allocator how many bytes it holds for the heap (the binary's allocator
/// knows; a library does not). See [`HeapBudget`].
#[derive(Clone, Copy)]
pub struct HeapProbe(pub fn() -> usize);

impl PartialEq for HeapProbe {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::fn_addr_eq(self.0, other.0)
    }
}

impl Eq for HeapProbe {}

impl std::fmt::Debug for HeapProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeapProbe")
    }
}

/// Holds the engine's whole heap, as the allocator counts it, within the cache's byte
/// budget: the cache gets what the rest of the heap leaves — the membership index, pending
/// timers, batches in flight, and the allocator's own slack (pages partly filled after
/// evictions) — but never less than a quarter of the budget, so a heap full of something
/// else makes the engine read more from the store instead of stopping it.
///
/// The rest is the least of the last [`HeapBudget::SAMPLES`] commits' `heap − cache`: an
/// eviction frees blocks inside pages the allocator keeps (its heap does not shrink at
/// once, the holes are filled by the next loads), and counting those holes as the rest
/// would evict again at every commit until the cache reached its floor.
#[derive(Debug, Default)]
pub struct HeapBudget {
    rest: std::collections::VecDeque<usize>,
}

impl HeapBudget {
    pub const SAMPLES: usize = 64;

    /// The cache's share of `budget` bytes, given the allocator's `heap` bytes now and the
    /// cache's estimate of its own.
    pub fn cache_share(&mut self, budget: usize, heap: usize, cache: usize) -> usize {
        if self.rest.len() == Self::SAMPLES {
            self.rest.pop_front();
        }
        self.rest.push_back(heap.saturating_sub(cache));
        let rest = self.rest.iter().copied().min().unwrap_or(0);
        budget.saturating_sub(rest).max(budget / 4)
    }
}

/// How often each customer was used lately: a count-min sketch (TinyLFU's frequency filter)
/// of one-byte counters, four per customer, halved every [`UseSketch::PERIOD`] uses so that
/// old popularity fades. An estimate is never below the true count of the period (other
/// customers sharing a counter can only raise it); with [`UseSketch::WIDTH`] counters the
/// error stays a few uses, small beside the counts of the customers worth caching. Fixed
/// size (256 KiB a shard), allocated on first use.
#[derive(Default)]
pub struct UseSketch {
    counters: Vec<u8>,
    hasher: foldhash::fast::RandomState,
    uses: usize,
}

impl UseSketch {
    pub const WIDTH: usize = 1 << 18;
    pub const PERIOD: usize = 4 * Self::WIDTH;

    /// The four counters of `customer`.
    fn slots(&self, customer: &str) -> [usize; 4] {
        let h = self.hasher.hash_one(customer);
        // Double hashing: the i-th index is h1 + i·h2 (h2 odd, so the four differ).
        let (h1, h2) = (h as usize, ((h >> 32) as usize) | 1);
        std::array::from_fn(|i| h1.wrapping_add(i.wrapping_mul(h2)) & (Self::WIDTH - 1))
    }

    /// Counts one use of `customer` (conservative update: only the counters at the least
    /// are raised, which keeps the others' overestimates from growing).
    pub fn add(&mut self, customer: &str) {
        if self.counters.is_empty() {
            self.counters = vec![0; Self::WIDTH];
        }
        let slots = self.slots(customer);
        let least = slots.iter().map(|&i| self.counters[i]).min().unwrap_or(0);
        if least < u8::MAX {
            for i in slots {
                if self.counters[i] == least {
                    self.counters[i] = least + 1;
                }
            }
        }
        self.uses += 1;
        if self.uses == Self::PERIOD {
            self.uses = 0;
            for c in &mut self.counters {
                *c >>= 1;
            }
        }
    }

    /// How often `customer` was used lately (at least the true count since the last halving).
    pub fn estimate(&self, customer: &str) -> u8 {
        if self.counters.is_empty() {
            return 0;
        }
        self.slots(customer)
            .iter()
            .map(|&i| self.counters[i])
            .min()
            .unwrap_or(0)
    }
}

#[derive(Default)]
pub struct CustomerCache {
    /// Keyed by client-chosen ids: foldhash is several times faster than SipHash here and
    /// still seeded per process.
    /// A customer's state is boxed: the table's slots (sized by the most customers it ever
    /// held, kept after evictions) then cost a pointer each, not a whole state.
    map: foldhash::HashMap<Arc<str>, (Box<CustomerState>, usize)>,
    bytes: usize,
    uses: UseSketch,
    /// Uses found in the cache and not, since open (see [`CustomerCache::take`]).
    hits: u64,
    misses: u64,
    /// What [`CustomerCache::unreported`] has handed on.
    reported: (u64, u64),
}

impl CustomerCache {
    /// Takes a customer out to be used (judged, changed): counts the use, found or not. The
    /// caller puts the customer back, or loads them from the store when this finds nothing.
    pub fn take(&mut self, customer: &str) -> Option<Box<CustomerState>> {
        self.uses.add(customer);
        let state = self.remove(customer);
        if state.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        state
    }

    /// Uses found in the cache and uses that were not, since the cache was made.
    pub fn lookups(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// [`CustomerCache::lookups`] made since the last call (for counters kept elsewhere).
    pub fn unreported(&mut self) -> (u64, u64) {
        let now = (self.hits, self.misses);
        let new = (now.0 - self.reported.0, now.1 - self.reported.1);
        self.reported = now;
        new
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The estimated bytes of every cached customer.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn get(&self, customer: &str) -> Option<&CustomerState> {
        self.map.get(customer).map(|(s, _)| &**s)
    }

    pub fn contains_key(&self, customer: &str) -> bool {
        self.map.contains_key(customer)
    }

    pub fn remove(&mut self, customer: &str) -> Option<Box<CustomerState>> {
        let (state, bytes) = self.map.remove(customer)?;
        self.bytes -= bytes;
        Some(state)
    }

    pub fn insert(&mut self, customer: Arc<str>, state: Box<CustomerState>) {
        let bytes = estimate_bytes(&state);
        self.bytes += bytes;
        if let Some((_, old)) = self.map.insert(customer, (state, bytes)) {
            self.bytes -= old;
        }
    }

    /// Changes a cached customer in place, keeping the byte estimate right.
    pub fn update(&mut self, customer: &str, change: impl FnOnce(&mut CustomerState)) {
        if let Some((state, bytes)) = self.map.get_mut(customer) {
            change(state);
            let now = estimate_bytes(state);
            self.bytes = self.bytes - *bytes + now;
            *bytes = now;
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    /// When over `max_customers` or `max_bytes`, evicts down to 90% of both (so eviction
    /// runs once in many batches, not on every one): the customers used most often lately
    /// stay, and among equally often used the most recently used. Customers in `pinned` stay
    /// whatever their rank (their new state is not durable yet). Customers of the same rank
    /// (say, touched once by the same batch) are kept as far as the budgets allow, not
    /// evicted together: a batch whose customers alone outweigh the budget would otherwise
    /// empty the cache.
    pub fn evict(
        &mut self,
        max_customers: usize,
        max_bytes: usize,
        pinned: Option<&foldhash::HashSet<Arc<str>>>,
    ) {
        if self.map.len() <= max_customers && self.bytes <= max_bytes {
            return;
        }
        let keep_customers = max_customers - max_customers / 10;
        let keep_bytes = max_bytes - max_bytes / 10;
        let uses = &self.uses;
        let mut by_rank: Vec<((u8, u64), usize, &Arc<str>)> = self
            .map
            .iter()
            .map(|(id, (s, b))| ((uses.estimate(id), s.last_used), *b, id))
            .collect();
        by_rank.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        // Keep the best ranked while both budgets allow; everything after goes.
        let (mut kept, mut bytes) = (0usize, 0usize);
        let mut cut = by_rank.len();
        for (i, &(_, b, _)) in by_rank.iter().enumerate() {
            if kept + 1 > keep_customers || bytes + b > keep_bytes {
                cut = i;
                break;
            }
            kept += 1;
            bytes += b;
        }
        let evicted: Vec<Arc<str>> = by_rank[cut..]
            .iter()
            .filter(|(_, _, id)| !pinned.is_some_and(|p| p.contains(*id)))
            .map(|(_, _, id)| Arc::clone(id))
            .collect();
        for id in evicted {
            if let Some((_, b)) = self.map.remove(&id) {
                self.bytes -= b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_gets_what_the_rest_of_the_heap_leaves() {
        const MIB: usize = 1 << 20;
        let mut budget = HeapBudget::default();
        // 60 MiB of index, timers and slack beside a 150 MiB cache: 196 MiB are the cache's.
        assert_eq!(budget.cache_share(256 * MIB, 210 * MIB, 150 * MIB), 196 * MIB);
        // The cache evicts 40 MiB; the allocator keeps the pages (holes): not counted as rest.
        assert_eq!(budget.cache_share(256 * MIB, 210 * MIB, 110 * MIB), 196 * MIB);
        // The rest really grows (the index, say): once it has for every recent commit, the
        // cache's share shrinks by as much.
        for _ in 0..HeapBudget::SAMPLES {
            budget.cache_share(256 * MIB, 240 * MIB, 150 * MIB);
        }
        assert_eq!(budget.cache_share(256 * MIB, 240 * MIB, 150 * MIB), 166 * MIB);
        // However large the rest, the cache keeps a quarter.
        for _ in 0..HeapBudget::SAMPLES {
            budget.cache_share(256 * MIB, 900 * MIB, 100 * MIB);
        }
        assert_eq!(budget.cache_share(256 * MIB, 900 * MIB, 100 * MIB), 64 * MIB);
        // An allocator reporting less than the cache's estimate leaves the whole budget.
        let mut budget = HeapBudget::default();
        assert_eq!(budget.cache_share(256 * MIB, 100 * MIB, 150 * MIB), 256 * MIB);
    }

    fn customer(last_used: u64, events: usize) -> Box<CustomerState> {
        let mut state = CustomerState {
            last_used,
            ..Default::default()
        };
        for i in 0..events {
            state.history.events.push(rules::Event {
                event_type: "view".into(),
                ts: i as i64,
                arrival: i as u64,
                props: Default::default(),
            });
        }
        Box::new(state)
    }

    #[test]
    fn evicts_least_recently_used_to_stay_under_both_budgets() {
        let mut cache = CustomerCache::default();
        for i in 0..10u64 {
            cache.insert(format!("c{i}").into(), customer(i, 10));
        }
        let each = estimate_bytes(&customer(0, 10));
        assert_eq!(cache.bytes(), 10 * each);
        // Under both budgets: nothing happens.
        cache.evict(10, 10 * each, None);
        assert_eq!(cache.len(), 10);
        // Over the byte budget: the oldest go until 90% of it is met.
        cache.evict(100, 5 * each, None);
        assert!(cache.bytes() <= 5 * each - 5 * each / 10, "{}", cache.bytes());
        assert!(cache.contains_key("c9") && cache.contains_key("c8"));
        assert!(!cache.contains_key("c0"));
        let bytes: usize = (0..10).filter(|i| cache.contains_key(&format!("c{i}"))).count() * each;
        assert_eq!(cache.bytes(), bytes, "the running total matches what is left");
        // Over the count budget.
        cache.evict(2, usize::MAX, None);
        assert!(cache.len() <= 2);
        assert!(cache.contains_key("c9"));
    }

    /// One batch touched every customer (one age): the budget keeps as many as fit.
    #[test]
    fn customers_of_one_batch_are_kept_as_far_as_the_budget_allows() {
        let mut cache = CustomerCache::default();
        for i in 0..10u64 {
            cache.insert(format!("c{i}").into(), customer(7, 10));
        }
        let each = estimate_bytes(&customer(0, 10));
        cache.evict(100, 5 * each, None);
        assert_eq!(cache.len(), 4, "90% of five customers' bytes: four stay");
        assert_eq!(cache.bytes(), 4 * each);
        let pinned: foldhash::HashSet<Arc<str>> = (0..10).map(|i| format!("c{i}").into()).collect();
        cache.evict(100, each, Some(&pinned));
        assert_eq!(cache.len(), 4, "pinned customers stay whatever the budget");
    }

    /// The sketch never counts less than the uses since its last halving, and its
    /// overestimates stay small beside them.
    #[test]
    fn the_use_sketch_counts_at_least_every_use_and_forgets_by_halves() {
        let mut sketch = UseSketch::default();
        assert_eq!(sketch.estimate("nobody"), 0);
        let mut uses = 0;
        let mut add = |sketch: &mut UseSketch, id: &str, times: usize| {
            for _ in 0..times {
                sketch.add(id);
            }
            uses += times;
        };
        // 20,000 customers used once, beside three busy ones.
        for i in 0..20_000 {
            add(&mut sketch, &format!("tail{i}"), 1);
        }
        add(&mut sketch, "busy", 40);
        add(&mut sketch, "seven", 7);
        add(&mut sketch, "saturated", 300);
        assert!(
            (40..=42).contains(&sketch.estimate("busy")),
            "{}",
            sketch.estimate("busy")
        );
        assert!(
            (7..=9).contains(&sketch.estimate("seven")),
            "{}",
            sketch.estimate("seven")
        );
        assert_eq!(
            sketch.estimate("saturated"),
            u8::MAX,
            "counters saturate, never wrap"
        );
        let over: usize = (0..20_000)
            .map(|i| sketch.estimate(&format!("tail{i}")) as usize - 1)
            .sum();
        assert!(
            over < 200,
            "20,000 customers used once overestimated by {over} in all"
        );
        // A period's worth of other uses halves every count: old popularity fades.
        let before = sketch.estimate("busy");
        for i in 0..(UseSketch::PERIOD - uses) {
            sketch.add(&format!("later{}", i % 1000));
        }
        assert_eq!(sketch.estimate("busy"), before / 2);
    }

    /// Customers used often stay over customers used once since, however recent those are;
    /// among equally used ones, the most recent stay.
    #[test]
    fn eviction_keeps_the_often_used_over_the_recently_used_once() {
        let mut cache = CustomerCache::default();
        let each = estimate_bytes(&customer(0, 10));
        // Two regulars, used in batches 1 to 10.
        for batch in 1..=10u64 {
            for id in ["regular1", "regular2"] {
                let mut state = cache.take(id).unwrap_or_else(|| customer(0, 10));
                state.last_used = batch;
                cache.insert(id.into(), state);
            }
        }
        // Then eight customers seen once each, in batches 11 to 18.
        for batch in 11..=18u64 {
            let id = format!("once{batch}");
            assert!(cache.take(&id).is_none());
            cache.insert(id.into(), customer(batch, 10));
        }
        assert_eq!(cache.lookups(), (18, 10), "18 uses found, 2 + 8 first uses not");
        // Room for five (90% of six's bytes): the regulars, then the three latest of the rest.
        cache.evict(100, 6 * each, None);
        assert_eq!(cache.len(), 5);
        for id in ["regular1", "regular2", "once18", "once17", "once16"] {
            assert!(cache.contains_key(id), "{id} should stay");
        }
        assert_eq!(cache.unreported(), (18, 10));
        assert_eq!(cache.unreported(), (0, 0), "handed on once");
        // Under least-recently-used alone the regulars (last used in batch 10) would have gone.
    }

    #[test]
    fn one_heavy_customer_weighs_as_much_as_its_history() {
        let mut cache = CustomerCache::default();
        cache.insert("light".into(), customer(1, 1));
        cache.insert("heavy".into(), customer(0, 100_000));
        assert!(cache.bytes() > 100_000 * EVENT_BYTES);
        cache.evict(100, 10 << 20, None);
        assert!(!cache.contains_key("heavy") && cache.contains_key("light"));
        assert!(cache.remove("light").is_some());
        assert_eq!(cache.bytes(), 0);
    }
}
