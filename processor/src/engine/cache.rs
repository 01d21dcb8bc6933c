//! The customers kept in memory between batches: bounded by a count and by an estimate of
//! their bytes, least recently used evicted first.
//!
//! The byte estimate is what makes memory bounded by configuration rather than by data: a
//! cached customer holds their retained history and the per-window queues, so with Zipf
//! activity a few head customers can weigh more than the whole tail. Estimating costs O(1)
//! per customer (counts, not a walk over the events).

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

#[derive(Default)]
pub struct CustomerCache {
    /// Keyed by client-chosen ids: foldhash is several times faster than SipHash here and
    /// still seeded per process.
    /// A customer's state is boxed: the table's slots (sized by the most customers it ever
    /// held, kept after evictions) then cost a pointer each, not a whole state.
    map: foldhash::HashMap<Arc<str>, (Box<CustomerState>, usize)>,
    bytes: usize,
}

impl CustomerCache {
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

    /// When over `max_customers` or `max_bytes`, evicts the least recently used customers
    /// down to 90% of both (so eviction runs once in many batches, not on every one).
    /// Customers in `pinned` stay whatever their age (their new state is not durable yet).
    /// Customers of the same age (touched by the same batch) are kept as far as the budgets
    /// allow, not evicted together: a batch whose customers alone outweigh the budget would
    /// otherwise empty the cache.
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
        let mut by_age: Vec<(u64, usize, &Arc<str>)> = self
            .map
            .iter()
            .map(|(id, (s, b))| (s.last_used, *b, id))
            .collect();
        by_age.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        // Keep the most recently used while both budgets allow; everything older goes.
        let (mut kept, mut bytes) = (0usize, 0usize);
        let mut cut = by_age.len();
        for (i, &(_, b, _)) in by_age.iter().enumerate() {
            if kept + 1 > keep_customers || bytes + b > keep_bytes {
                cut = i;
                break;
            }
            kept += 1;
            bytes += b;
        }
        let evicted: Vec<Arc<str>> = by_age[cut..]
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
