//! Incremental aggregates: each aggregate of each customer keeps the matching events still
//! inside its window (or retention) and running accumulators over them, so an event or a
//! timer costs O(log n) per aggregate instead of a scan of the customer's history.
//!
//! Windows only move forward (the clock never goes back), so an event that has left a
//! window is dropped for good; a late event older than the window is never added. The state
//! is derived from the retained history when a customer is loaded and is never stored.

use std::collections::{BTreeMap, HashMap, VecDeque};

use rules::value::DistinctKey;
use rules::{AggFunc, AggSpec, Event, Value, Window};
use rust_decimal::Decimal;

/// One matching event as an aggregate needs it.
#[derive(Debug, Clone)]
struct Entry {
    ts: i64,
    arrival: u64,
    input: Value,
}

/// Incremental state of one aggregate for one customer.
#[derive(Debug, Clone)]
pub struct WindowState {
    func: AggFunc,
    /// How long an event stays: the window, capped by the retention.
    span_ms: i64,
    /// Matching events with `ts > at - span`, sorted by `(ts, arrival)`; the first
    /// `counted` of them have `ts <= at` and are in the accumulators.
    entries: VecDeque<Entry>,
    counted: usize,
    /// The instant the state was last advanced to.
    at: i64,
    sum: Decimal,
    numeric: u64,
    /// Sums that overflowed make `sum`/`avg` null until the window drains.
    overflowed: u64,
    extremes: BTreeMap<Decimal, u32>,
    distinct: HashMap<DistinctKey, u32>,
}

impl WindowState {
    pub fn new(spec: &AggSpec, retention_ms: i64, now: i64) -> WindowState {
        let span_ms = match spec.window {
            Some(Window::Span(w)) => w.min(retention_ms),
            Some(Window::Lifetime) | None => retention_ms,
        };
        WindowState {
            func: spec.func,
            span_ms,
            entries: VecDeque::new(),
            counted: 0,
            at: now,
            sum: Decimal::ZERO,
            numeric: 0,
            overflowed: 0,
            extremes: BTreeMap::new(),
            distinct: HashMap::new(),
        }
    }

    /// Builds the state at `now` from a customer's events (any order).
    pub fn build<'e>(
        spec: &AggSpec,
        retention_ms: i64,
        now: i64,
        events: impl IntoIterator<Item = &'e Event>,
        profile: impl Fn(&str) -> Option<Value> + Copy,
    ) -> WindowState {
        let mut state = WindowState::new(spec, retention_ms, now);
        let mut entries: Vec<Entry> = events
            .into_iter()
            .filter(|e| e.ts > now.saturating_sub(state.span_ms) && spec.matches(e, profile))
            .map(|e| Entry {
                ts: e.ts,
                arrival: e.arrival,
                input: spec.input(e),
            })
            .collect();
        entries.sort_by_key(|e| (e.ts, e.arrival));
        state.entries = entries.into();
        while state.counted < state.entries.len() && state.entries[state.counted].ts <= now {
            let input = state.entries[state.counted].input.clone();
            state.include(&input);
            state.counted += 1;
        }
        state
    }

    /// Adds a matching event applied at `now` (its `ts` may be late or in the future).
    pub fn insert(&mut self, event: &Event, input: Value) {
        if event.ts <= self.at.saturating_sub(self.span_ms) {
            return;
        }
        let key = (event.ts, event.arrival);
        // Most events arrive in time order: they go at the back without a search.
        let pos = match self.entries.back() {
            Some(last) if (last.ts, last.arrival) > key => {
                self.entries.partition_point(|e| (e.ts, e.arrival) < key)
            }
            _ => self.entries.len(),
        };
        let counted = event.ts <= self.at;
        if counted {
            self.include(&input);
            self.counted += 1;
        }
        self.entries.insert(
            pos,
            Entry {
                ts: event.ts,
                arrival: event.arrival,
                input,
            },
        );
    }

    /// Moves the window to `now` (never backwards).
    pub fn advance(&mut self, now: i64) {
        if now <= self.at {
            return;
        }
        let floor = now.saturating_sub(self.span_ms);
        while let Some(front) = self.entries.front() {
            if front.ts > floor {
                break;
            }
            let entry = self.entries.pop_front().expect("front exists");
            if self.counted > 0 {
                self.exclude(&entry.input);
                self.counted -= 1;
            }
        }
        while self.counted < self.entries.len() && self.entries[self.counted].ts <= now {
            let input = self.entries[self.counted].input.clone();
            self.include(&input);
            self.counted += 1;
        }
        self.at = now;
    }

    fn include(&mut self, input: &Value) {
        match self.func {
            AggFunc::Sum | AggFunc::Avg | AggFunc::Min | AggFunc::Max => {
                if let Value::Num(n) = input {
                    self.numeric += 1;
                    match self.sum.checked_add(*n) {
                        Some(s) => self.sum = s,
                        None => self.overflowed += 1,
                    }
                    if matches!(self.func, AggFunc::Min | AggFunc::Max) {
                        *self.extremes.entry(*n).or_default() += 1;
                    }
                }
            }
            AggFunc::Distinct => {
                if let Some(k) = input.distinct_key() {
                    *self.distinct.entry(k).or_default() += 1;
                }
            }
            _ => {}
        }
    }

    fn exclude(&mut self, input: &Value) {
        match self.func {
            AggFunc::Sum | AggFunc::Avg | AggFunc::Min | AggFunc::Max => {
                if let Value::Num(n) = input {
                    self.numeric -= 1;
                    if self.overflowed > 0 {
                        self.overflowed -= 1;
                        self.sum = self.recount_sum();
                    } else {
                        self.sum -= *n;
                    }
                    if let Some(c) = self.extremes.get_mut(n) {
                        *c -= 1;
                        if *c == 0 {
                            self.extremes.remove(n);
                        }
                    }
                }
            }
            AggFunc::Distinct => {
                if let Some(k) = input.distinct_key() {
                    if let Some(c) = self.distinct.get_mut(&k) {
                        *c -= 1;
                        if *c == 0 {
                            self.distinct.remove(&k);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// After an overflow, the sum of what is still counted (excluding the front entry being
    /// removed, which the caller has popped already).
    fn recount_sum(&self) -> Decimal {
        self.entries
            .iter()
            .take(self.counted.saturating_sub(1))
            .filter_map(|e| e.input.as_num())
            .fold(Decimal::ZERO, |acc, n| acc.checked_add(n).unwrap_or(acc))
    }

    /// The instant the state was last advanced to.
    /// Events held in the queue (for memory accounting).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn at(&self) -> i64 {
        self.at
    }

    /// The aggregate's value at the instant the state was advanced to.
    pub fn value(&self) -> Value {
        let counted = &self.entries.range(..self.counted);
        match self.func {
            AggFunc::Count => Value::Num(Decimal::from(self.counted as u64)),
            AggFunc::Sum if self.overflowed > 0 => Value::Null,
            AggFunc::Sum => Value::Num(self.sum),
            AggFunc::Avg if self.overflowed > 0 || self.numeric == 0 => Value::Null,
            AggFunc::Avg => self
                .sum
                .checked_div(Decimal::from(self.numeric))
                .map_or(Value::Null, Value::Num),
            AggFunc::Min => self
                .extremes
                .keys()
                .next()
                .map_or(Value::Null, |n| Value::Num(*n)),
            AggFunc::Max => self
                .extremes
                .keys()
                .next_back()
                .map_or(Value::Null, |n| Value::Num(*n)),
            AggFunc::Distinct => Value::Num(Decimal::from(self.distinct.len() as u64)),
            AggFunc::Last => counted
                .clone()
                .next_back()
                .map_or(Value::Null, |e| e.input.clone()),
            AggFunc::First => counted.clone().next().map_or(Value::Null, |e| e.input.clone()),
            AggFunc::Since => counted
                .clone()
                .next_back()
                .map_or(Value::Null, |e| Value::Dur(self.at - e.ts)),
        }
    }

    /// The earliest instant after the current one at which the set of counted events
    /// changes: the oldest leaves, or the next future one enters.
    pub fn next_change(&self) -> Option<i64> {
        let leaves = (self.counted > 0).then(|| self.entries[0].ts.saturating_add(self.span_ms));
        let enters = self.entries.get(self.counted).map(|e| e.ts);
        [leaves, enters]
            .into_iter()
            .flatten()
            .filter(|t| *t > self.at)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::{CompiledRules, Props};

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

    /// Incremental state agrees with the reference computation at every instant, with
    /// events applied in a scrambled order.
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
             trait h = since(pay)",
        )
        .unwrap();
        let all = events(&[
            (3, 1.5),
            (1, 2.0),
            (8, 0.1),
            (2, 9.0),
            (15, 4.0),
            (9, 4.0),
            (30, 7.0),
            (12, 1.0),
        ]);
        let retention = 20;
        for spec in rules.aggregates() {
            let mut state = WindowState::new(spec, retention, 0);
            let mut applied: Vec<Event> = Vec::new();
            let mut pending = all.clone();
            for now in 0..45 {
                // Apply the events "arriving" at this instant: one per step, in list order.
                if !pending.is_empty() && now % 2 == 0 {
                    let e = pending.remove(0);
                    state.insert(&e, spec.input(&e));
                    applied.push(e);
                }
                state.advance(now);
                let expected = spec.compute(&applied, now, retention, |_| None);
                assert_eq!(state.value(), expected, "{} at {now}", spec.text);
                // Never late: with no new event, nothing changes before `next_change`.
                let horizon = state.next_change().unwrap_or(now + 100);
                for t in now + 1..horizon.min(now + 100) {
                    let value_then = spec.compute(&applied, t, retention, |_| None);
                    let value_now = spec.compute(&applied, now, retention, |_| None);
                    if !matches!(spec.func, AggFunc::Since) {
                        assert_eq!(
                            value_then, value_now,
                            "{} changed at {t} before {horizon}",
                            spec.text
                        );
                    }
                }
            }
        }
    }
}
