//! What an aggregate means over a customer's events: the reference semantics, computed by
//! scanning the events. The engine keeps incremental state for the hot path and must agree
//! with this.

use rust_decimal::Decimal;
use std::collections::HashSet;

use crate::ast::{AggFunc, Window};
use crate::compile::AggSpec;
use crate::eval::filter_matches;
use crate::event::Event;
use crate::value::Value;

impl AggSpec {
    /// True when `event` is of this aggregate's type and passes its `where`.
    pub fn matches(&self, event: &Event, profile: impl Fn(&str) -> Option<Value>) -> bool {
        *event.event_type == *self.event_type && filter_matches(self.filter.as_ref(), event, profile)
    }

    /// True when an event at `ts` is inside the window at `now` (`now - W < ts <= now`);
    /// `retention_ms` bounds `lifetime` and the windowless aggregates.
    pub fn in_window(&self, ts: i64, now: i64, retention_ms: i64) -> bool {
        if ts > now || ts <= now.saturating_sub(retention_ms) {
            return false;
        }
        match self.window {
            Some(Window::Span(w)) => ts > now.saturating_sub(w),
            Some(Window::Lifetime) | None => true,
        }
    }

    /// The property this aggregate reads from `event` (null without a property).
    pub fn input(&self, event: &Event) -> Value {
        match &self.property {
            Some(path) => event.props.get(path),
            None => Value::Null,
        }
    }

    /// The aggregate's value at `now` over `events` (any order), by brute force.
    pub fn compute<'e>(
        &self,
        events: impl IntoIterator<Item = &'e Event>,
        now: i64,
        retention_ms: i64,
        profile: impl Fn(&str) -> Option<Value> + Copy,
    ) -> Value {
        let mut acc = Accumulator::new(self.func);
        for e in events {
            if self.in_window(e.ts, now, retention_ms) && self.matches(e, profile) {
                acc.add(e, self.input(e));
            }
        }
        acc.finish(now)
    }

    /// The earliest instant after `now` at which the set of events this aggregate sees
    /// changes by time alone: an event leaving the window or retention, or an event
    /// stamped after `now` entering.
    pub fn next_change<'e>(
        &self,
        events: impl IntoIterator<Item = &'e Event>,
        now: i64,
        retention_ms: i64,
        profile: impl Fn(&str) -> Option<Value> + Copy,
    ) -> Option<i64> {
        let mut next: Option<i64> = None;
        let mut consider = |t: i64| {
            if t > now {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for e in events {
            if !self.matches(e, profile) {
                continue;
            }
            consider(e.ts);
            consider(e.ts.saturating_add(retention_ms));
            if let Some(Window::Span(w)) = self.window {
                consider(e.ts.saturating_add(w));
            }
        }
        next
    }
}

/// Folds matching events into an aggregate value. Sums are exact decimals.
#[derive(Debug, Clone)]
pub struct Accumulator {
    func: AggFunc,
    count: u64,
    numeric: u64,
    sum: Option<Decimal>,
    min: Option<Decimal>,
    max: Option<Decimal>,
    distinct: HashSet<crate::value::DistinctKey>,
    /// (ts, arrival, value) of the newest / oldest event.
    newest: Option<(i64, u64, Value)>,
    oldest: Option<(i64, u64, Value)>,
}

impl Accumulator {
    pub fn new(func: AggFunc) -> Accumulator {
        Accumulator {
            func,
            count: 0,
            numeric: 0,
            sum: Some(Decimal::ZERO),
            min: None,
            max: None,
            distinct: HashSet::new(),
            newest: None,
            oldest: None,
        }
    }

    pub fn add(&mut self, event: &Event, input: Value) {
        self.count += 1;
        match self.func {
            AggFunc::Count => {}
            AggFunc::Sum | AggFunc::Avg | AggFunc::Min | AggFunc::Max => {
                if let Value::Num(n) = input {
                    self.numeric += 1;
                    self.sum = self.sum.and_then(|s| crate::value::exact_add(s, n));
                    self.min = Some(self.min.map_or(n, |m| m.min(n)));
                    self.max = Some(self.max.map_or(n, |m| m.max(n)));
                }
            }
            AggFunc::Distinct => {
                if let Some(key) = input.distinct_key() {
                    self.distinct.insert(key);
                }
            }
            AggFunc::Last | AggFunc::Since => {
                let key = (event.ts, event.arrival);
                if self.newest.as_ref().is_none_or(|(t, a, _)| key > (*t, *a)) {
                    self.newest = Some((event.ts, event.arrival, input));
                }
            }
            AggFunc::First => {
                let key = (event.ts, event.arrival);
                if self.oldest.as_ref().is_none_or(|(t, a, _)| key < (*t, *a)) {
                    self.oldest = Some((event.ts, event.arrival, input));
                }
            }
        }
    }

    pub fn finish(self, now: i64) -> Value {
        match self.func {
            AggFunc::Count => Value::Num(Decimal::from(self.count)),
            AggFunc::Sum => self.sum.map_or(Value::Null, Value::Num),
            AggFunc::Avg => match (self.sum, self.numeric) {
                (Some(sum), n) if n > 0 => sum.checked_div(Decimal::from(n)).map_or(Value::Null, Value::Num),
                _ => Value::Null,
            },
            AggFunc::Min => self.min.map_or(Value::Null, Value::Num),
            AggFunc::Max => self.max.map_or(Value::Null, Value::Num),
            AggFunc::Distinct => Value::Num(Decimal::from(self.distinct.len())),
            AggFunc::Last => self.newest.map_or(Value::Null, |(_, _, v)| v),
            AggFunc::First => self.oldest.map_or(Value::Null, |(_, _, v)| v),
            AggFunc::Since => self.newest.map_or(Value::Null, |(ts, _, _)| Value::Dur(now - ts)),
        }
    }
}
