//! A customer as the list of their events and profile updates, evaluated by brute force.
//!
//! This is the reference semantics of the contract: the engine's incremental state must
//! always agree with it. It also serves previews and docs examples, where simplicity beats
//! speed.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::compile::{AggId, CompiledRules, DefId, DefKind};
use crate::eval::{filter_matches, Facts};
use crate::event::Event;
use crate::value::Value;

/// The default history retention: 400 days.
pub const DEFAULT_RETENTION_MS: i64 = 400 * 86_400_000;

/// One profile attribute with the event that last set (or deleted) it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileEntry {
    pub ts: i64,
    pub arrival: u64,
    /// `None` once deleted by a `null`.
    pub value: Option<Value>,
}

/// Every event of one customer, and their profile.
#[derive(Debug, Clone, Default)]
pub struct CustomerHistory {
    pub events: Vec<Event>,
    pub profile: BTreeMap<Arc<str>, ProfileEntry>,
}

impl CustomerHistory {
    pub fn new() -> CustomerHistory {
        CustomerHistory::default()
    }

    /// Adds an event; `profile` holds the attributes it sets (`None` deletes). The
    /// attribute keeps the value of the greatest `ts` (ties: the later arrival).
    pub fn push(&mut self, event: Event, profile: impl IntoIterator<Item = (Arc<str>, Option<Value>)>) {
        self.apply_profile(&event, profile);
        self.events.push(event);
    }

    /// The profile part of [`CustomerHistory::push`]: sets the attributes `event` carries
    /// where it is the newest to set them.
    pub fn apply_profile(
        &mut self,
        event: &Event,
        profile: impl IntoIterator<Item = (Arc<str>, Option<Value>)>,
    ) {
        for (name, value) in profile {
            let newer = self
                .profile
                .get(&name)
                .is_none_or(|cur| (event.ts, event.arrival) >= (cur.ts, cur.arrival));
            if newer {
                self.profile.insert(
                    name,
                    ProfileEntry {
                        ts: event.ts,
                        arrival: event.arrival,
                        value,
                    },
                );
            }
        }
    }

    pub fn profile_value(&self, name: &str) -> Option<Value> {
        self.profile.get(name).and_then(|e| e.value.clone())
    }

    /// The facts of this customer at `now`.
    pub fn facts<'a>(&'a self, rules: &'a CompiledRules, now: i64, retention_ms: i64) -> HistoryFacts<'a> {
        HistoryFacts {
            history: self,
            rules,
            now,
            retention_ms,
        }
    }
}

/// [`Facts`] computed from a [`CustomerHistory`] on demand.
pub struct HistoryFacts<'a> {
    history: &'a CustomerHistory,
    rules: &'a CompiledRules,
    now: i64,
    retention_ms: i64,
}

impl HistoryFacts<'_> {
    fn profile_fn(&self) -> impl Fn(&str) -> Option<Value> + Copy + '_ {
        move |name: &str| self.history.profile_value(name)
    }

    fn event_tag_matches<'e>(&'e self, id: DefId) -> impl Iterator<Item = &'e Event> + 'e {
        let spec = self.rules.def(id).event_tag.as_ref().expect("event tag");
        let profile = self.profile_fn();
        self.history.events.iter().filter(move |e| {
            *e.event_type == *spec.event_type && filter_matches(spec.filter.as_ref(), e, profile)
        })
    }

    /// When the event tag was set and until when it holds, if it holds at `now`.
    pub fn event_tag_state(&self, id: DefId) -> Option<(i64, Option<i64>)> {
        let ttl = self.rules.def(id).event_tag.as_ref()?.ttl_ms;
        let now = self.now;
        let mut latest: Option<i64> = None;
        for e in self.event_tag_matches(id) {
            let live = e.ts <= now && ttl.is_none_or(|t| now < e.ts.saturating_add(t));
            if live {
                latest = Some(latest.map_or(e.ts, |l| l.max(e.ts)));
            }
        }
        latest.map(|ts| (ts, ttl.map(|t| ts.saturating_add(t))))
    }
}

impl Facts for HistoryFacts<'_> {
    fn now(&self) -> i64 {
        self.now
    }

    fn aggregate(&self, id: AggId) -> Value {
        self.rules.aggregates()[id].compute(
            &self.history.events,
            self.now,
            self.retention_ms,
            self.profile_fn(),
        )
    }

    fn profile(&self, name: &str) -> Option<Value> {
        self.history.profile_value(name)
    }

    fn definition(&self, id: DefId) -> Value {
        match self.rules.def(id).kind {
            DefKind::EventTag => Value::Bool(self.event_tag_state(id).is_some()),
            _ => self.rules.evaluate(id, self),
        }
    }

    fn aggregate_next_change(&self, id: AggId) -> Option<i64> {
        self.rules.aggregates()[id].next_change(
            &self.history.events,
            self.now,
            self.retention_ms,
            self.profile_fn(),
        )
    }

    fn event_tag_next_change(&self, id: DefId) -> Option<i64> {
        let ttl = self.rules.def(id).event_tag.as_ref()?.ttl_ms;
        let now = self.now;
        self.event_tag_matches(id)
            .flat_map(|e| [Some(e.ts), ttl.map(|t| e.ts.saturating_add(t))])
            .flatten()
            .filter(|t| *t > now)
            .min()
    }
}
