//! One customer's state as the engine holds it, and the [`Facts`] it gives the rules.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use rules::{AggId, Band, CompiledRules, CustomerHistory, DefId, DefKind, Facts, ProfileEntry, Value};

use crate::codec::{CodecError, Reader, Writer};
use crate::window::{StoredChunks, WindowHeader, WindowSet};

/// Writes profile attributes with the event (`ts`, arrival) that set each; `None` deleted.
pub(crate) fn write_profile(w: &mut Writer, profile: &BTreeMap<Arc<str>, ProfileEntry>) {
    w.u64(profile.len() as u64);
    for (name, entry) in profile {
        w.str(name);
        w.i64(entry.ts);
        w.u64(entry.arrival);
        match &entry.value {
            None => w.u8(0),
            Some(v) => {
                w.u8(1);
                w.value(v);
            }
        }
    }
}

/// Reads what [`write_profile`] wrote.
pub(crate) fn read_profile(r: &mut Reader) -> Result<BTreeMap<Arc<str>, ProfileEntry>, CodecError> {
    let mut profile = BTreeMap::new();
    for _ in 0..r.len()? {
        let name = r.arc_str()?;
        let (ts, arrival) = (r.i64()?, r.u64()?);
        let value = match r.u8()? {
            0 => None,
            _ => Some(r.value()?),
        };
        profile.insert(name, ProfileEntry { ts, arrival, value });
    }
    Ok(profile)
}

/// Writes manual tags.
pub(crate) fn write_manual(w: &mut Writer, manual: &BTreeMap<Arc<str>, ManualTag>) {
    w.u64(manual.len() as u64);
    for (name, m) in manual {
        w.str(name);
        w.i64(m.since);
        w.opt_i64(m.expires_at);
    }
}

/// Reads what [`write_manual`] wrote.
pub(crate) fn read_manual(r: &mut Reader) -> Result<BTreeMap<Arc<str>, ManualTag>, CodecError> {
    let mut manual = BTreeMap::new();
    for _ in 0..r.len()? {
        let name = r.arc_str()?;
        let (since, expires_at) = (r.i64()?, r.opt_i64()?);
        manual.insert(name, ManualTag { since, expires_at });
    }
    Ok(manual)
}

/// A tag or segment the customer is a member of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub since: i64,
    pub expires_at: Option<i64>,
}

/// An event tag's matches: the newest matching `ts` at or before the clock when applied,
/// and matches stamped in the future (wall clock mode) that start later.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventTagState {
    pub last_ts: Option<i64>,
    pub future: Vec<i64>,
}

impl EventTagState {
    /// The newest match with `ts <= now`.
    pub fn latest(&self, now: i64) -> Option<i64> {
        self.future
            .iter()
            .copied()
            .filter(|t| *t <= now)
            .chain(self.last_ts)
            .max()
    }

    pub fn record(&mut self, ts: i64, now: i64) {
        if ts <= now {
            self.last_ts = Some(self.last_ts.map_or(ts, |l| l.max(ts)));
        } else if !self.future.contains(&ts) {
            self.future.push(ts);
        }
    }

    /// Folds future matches that have started into `last_ts`.
    pub fn settle(&mut self, now: i64) {
        self.last_ts = self.latest(now);
        self.future.retain(|t| *t > now);
    }
}

/// A tag set through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualTag {
    pub since: i64,
    pub expires_at: Option<i64>,
}

/// Everything the engine keeps for one customer. The retained events live in their own
/// column family; the rest is one record.
#[derive(Debug, Clone, Default)]
pub struct CustomerState {
    pub history: CustomerHistory,
    pub members: BTreeMap<Arc<str>, Membership>,
    pub event_tags: BTreeMap<Arc<str>, EventTagState>,
    pub manual: BTreeMap<Arc<str>, ManualTag>,
    /// The pending timer instant, if any.
    pub timer: Option<i64>,
    /// The rule-set generation this state was last fully evaluated under.
    pub generation: u64,
    /// Incremental state of every aggregate of the rule set: read with the record when it
    /// was stored under rules with the same windows, else built from the history.
    pub windows: Option<WindowSet>,
    /// The chunks of window state the store holds for this customer (whatever rules they
    /// were written under), so the next write deletes the ones no longer needed.
    pub window_chunks: StoredChunks,
    /// True when `history.events` holds the whole retained history. The engine's cache
    /// keeps customers without it (the windows hold what the aggregates need); it is read
    /// from the store (with the batch in flight's events) only when a profile change or a
    /// rule change needs it.
    pub history_loaded: bool,
    /// True once the customer has any retained event (as far as this process has seen).
    pub has_events: bool,
    /// The customer's dense number in the membership index ([`crate::index::NO_NUMBER`] in
    /// records written before numbers existed, until the index is rebuilt).
    pub number: u32,
    /// The engine batch that last touched this customer: among customers used equally often
    /// lately, the cache evicts the least recently used. Not stored.
    pub last_used: u64,
}

/// Version 4 keeps only the window state's header in the record, its queues in chunks of
/// their own; version 3 appends whether the customer has events and their window state
/// inline; version 2 appends the customer number; version 1 records decode without one.
const RECORD_VERSION: u8 = 4;

/// How a record's window state is kept: none, inline (version 3), or a header with the
/// queues in chunks (version 4): of [`crate::window::LEGACY_CHUNK_EVENTS`] positions, or of
/// the size the header names.
const WINDOWS_NONE: u8 = 0;
const WINDOWS_INLINE: u8 = 1;
const WINDOWS_CHUNKED: u8 = 2;
const WINDOWS_CHUNKED_SIZED: u8 = 3;

/// What a decoded record says about the customer's window state.
#[derive(Debug)]
pub enum StoredWindows {
    /// Nothing usable under the current rules: build it from the history.
    Missing,
    /// Read with the record (`CustomerState::windows`).
    Attached,
    /// Kept in chunks the header names, under rules with the same windows: read them.
    Chunked(WindowHeader),
}

impl CustomerState {
    /// Encodes everything but the events; the window state (built under `rules`) too, so the
    /// next load needs no scan of the history.
    pub fn encode(&self, rules: Option<&CompiledRules>) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode_into(rules, &mut w);
        w.buf
    }

    /// [`CustomerState::encode`], appended to `w`.
    pub fn encode_into(&self, rules: Option<&CompiledRules>, w: &mut Writer) {
        w.u8(RECORD_VERSION);
        w.u64(self.generation);
        w.opt_i64(self.timer);
        write_profile(w, &self.history.profile);
        w.u64(self.members.len() as u64);
        for (name, m) in &self.members {
            w.str(name);
            w.i64(m.since);
            w.opt_i64(m.expires_at);
        }
        w.u64(self.event_tags.len() as u64);
        for (name, t) in &self.event_tags {
            w.str(name);
            w.opt_i64(t.last_ts);
            w.u64(t.future.len() as u64);
            for f in &t.future {
                w.i64(*f);
            }
        }
        write_manual(w, &self.manual);
        w.u64(u64::from(self.number));
        w.u8(u8::from(self.has_events));
        match (&self.windows, rules) {
            (Some(windows), Some(rules)) => {
                w.u8(WINDOWS_CHUNKED_SIZED);
                windows.encode_header(rules, w);
            }
            _ => w.u8(WINDOWS_NONE),
        }
    }

    /// Decodes a record without its window state (the caller loads the history).
    pub fn decode(bytes: &[u8]) -> Result<CustomerState, CodecError> {
        Self::decode_with_windows(bytes, None).map(|(state, _)| state)
    }

    /// Decodes a record, and what it says of the window state under `current` (rules and
    /// retention): attached, in chunks to read, or missing (the caller loads the history).
    pub fn decode_with_windows(
        bytes: &[u8],
        current: Option<(&CompiledRules, i64)>,
    ) -> Result<(CustomerState, StoredWindows), CodecError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if !(1..=RECORD_VERSION).contains(&version) {
            return Err(CodecError("unknown customer record version"));
        }
        let mut state = CustomerState {
            generation: r.u64()?,
            timer: r.opt_i64()?,
            ..Default::default()
        };
        state.history.profile = read_profile(&mut r)?;
        // A definition's name is shared with the rule set where it names one: a cached
        // customer's memberships then hold no string of their own.
        let rules = current.map(|(rules, _)| rules);
        let name = |r: &mut Reader<'_>| -> Result<Arc<str>, CodecError> {
            let name = r.str()?;
            let shared = rules.and_then(|rules| Some(rules.def(rules.lookup(name)?).name.clone()));
            Ok(shared.unwrap_or_else(|| name.into()))
        };
        for _ in 0..r.len()? {
            let name = name(&mut r)?;
            state.members.insert(
                name,
                Membership {
                    since: r.i64()?,
                    expires_at: r.opt_i64()?,
                },
            );
        }
        for _ in 0..r.len()? {
            let name = name(&mut r)?;
            let last_ts = r.opt_i64()?;
            let mut future = Vec::new();
            for _ in 0..r.len()? {
                future.push(r.i64()?);
            }
            state.event_tags.insert(name, EventTagState { last_ts, future });
        }
        state.manual = read_manual(&mut r)?;
        state.number = if version >= 2 {
            u32::try_from(r.u64()?).map_err(|_| CodecError("bad customer number"))?
        } else {
            crate::index::NO_NUMBER
        };
        if version < 3 {
            return Ok((state, StoredWindows::Missing));
        }
        state.has_events = r.u8()? != 0;
        match r.u8()? {
            WINDOWS_NONE => Ok((state, StoredWindows::Missing)),
            WINDOWS_INLINE => {
                let Some((rules, retention_ms)) = current else {
                    return Ok((state, StoredWindows::Missing));
                };
                state.windows = WindowSet::decode_inline(&mut r, rules, retention_ms)?;
                let found = match state.windows {
                    Some(_) => StoredWindows::Attached,
                    None => StoredWindows::Missing,
                };
                Ok((state, found))
            }
            tag @ (WINDOWS_CHUNKED | WINDOWS_CHUNKED_SIZED) => {
                // Whether or not it fits, the chunks it names are in the store.
                let header = if tag == WINDOWS_CHUNKED {
                    WindowHeader::decode_legacy(&mut r)?
                } else {
                    WindowHeader::decode(&mut r)?
                };
                state.window_chunks = header.stored_chunks();
                match current {
                    Some((rules, retention_ms)) if header.fits(rules, retention_ms) => {
                        Ok((state, StoredWindows::Chunked(header)))
                    }
                    _ => Ok((state, StoredWindows::Missing)),
                }
            }
            _ => Err(CodecError("unknown window state encoding")),
        }
    }

    /// Builds the incremental aggregates if needed (from the loaded history) and moves them
    /// to `now`.
    pub fn advance_windows(&mut self, rules: &CompiledRules, now: i64, retention_ms: i64) {
        match &mut self.windows {
            Some(windows) => windows.advance(rules, now),
            None => {
                let history = &self.history;
                let profile = |n: &str| history.profile_value(n);
                self.windows = Some(WindowSet::build(
                    rules,
                    retention_ms,
                    now,
                    &history.events,
                    profile,
                ));
            }
        }
    }

    /// Adds an event applied now (its profile already applied) to the aggregates over its
    /// type, and to the history if it is loaded; else gives the event back.
    pub fn push_event(&mut self, rules: &CompiledRules, event: rules::Event) -> Option<rules::Event> {
        if let Some(windows) = &mut self.windows {
            let history = &self.history;
            windows.insert(rules, &event, |n| history.profile_value(n));
        }
        self.has_events = true;
        if self.history_loaded {
            self.history.events.push(event);
            None
        } else {
            Some(event)
        }
    }

    /// Rebuilds the aggregates whose filter reads one of `attrs` (the profile changed).
    /// The history must be loaded.
    pub fn window_rebuild(&mut self, rules: &CompiledRules, attrs: &[Arc<str>]) {
        let Some(windows) = &mut self.windows else { return };
        debug_assert!(self.history_loaded);
        let history = &self.history;
        windows.rebuild_for_profile(rules, attrs, &history.events, |n| history.profile_value(n));
    }

    /// Drops the loaded history (it is in the store once the batch commits).
    pub fn unload_history(&mut self) {
        self.history.events = Vec::new();
        self.history_loaded = false;
    }

    pub fn manual_present(&self, name: &str, now: i64) -> bool {
        self.manual
            .get(name)
            .is_some_and(|m| m.expires_at.is_none_or(|e| now < e))
    }
}

/// The facts of one customer at `now`, computed lazily: each aggregate and definition at
/// most once per evaluation, and only if some definition being evaluated reads it.
pub struct EngineFacts<'a> {
    pub rules: &'a CompiledRules,
    pub state: &'a CustomerState,
    pub now: i64,
    pub retention_ms: i64,
    aggregates: RefCell<Vec<Option<Value>>>,
    definitions: RefCell<Vec<Option<Value>>>,
}

impl<'a> EngineFacts<'a> {
    pub fn new(rules: &'a CompiledRules, state: &'a CustomerState, now: i64, retention_ms: i64) -> Self {
        EngineFacts {
            rules,
            state,
            now,
            retention_ms,
            aggregates: RefCell::new(vec![None; rules.aggregates().len()]),
            definitions: RefCell::new(vec![None; rules.defs().len()]),
        }
    }

    /// The incremental state of the aggregates, if it is current at `now`.
    fn windows(&self) -> Option<&WindowSet> {
        self.state.windows.as_ref().filter(|w| w.at() == self.now)
    }

    fn profile_fn(&self) -> impl Fn(&str) -> Option<Value> + Copy + '_ {
        move |name: &str| self.state.history.profile_value(name)
    }

    /// An event tag's state at `now`: present, and until when.
    pub fn event_tag(&self, id: DefId) -> (bool, Option<i64>) {
        let def = self.rules.def(id);
        let ttl = def.event_tag.as_ref().and_then(|s| s.ttl_ms);
        let from_events = self
            .state
            .event_tags
            .get(&def.name)
            .and_then(|t| t.latest(self.now))
            .and_then(|last| {
                let until = ttl.map(|t| last.saturating_add(t));
                until.is_none_or(|u| self.now < u).then_some(until)
            });
        let manual = self
            .state
            .manual
            .get(&def.name)
            .filter(|m| m.expires_at.is_none_or(|e| self.now < e))
            .map(|m| m.expires_at);
        match (from_events, manual) {
            (None, None) => (false, None),
            (Some(u), None) | (None, Some(u)) => (true, u),
            (Some(a), Some(b)) => (true, a.zip(b).map(|(a, b)| a.max(b))),
        }
    }
}

impl Facts for EngineFacts<'_> {
    fn now(&self) -> i64 {
        self.now
    }

    fn aggregate(&self, id: AggId) -> Value {
        if let Some(v) = &self.aggregates.borrow()[id] {
            return v.clone();
        }
        if let Some(w) = self.windows() {
            return w.value(self.rules, id);
        }
        let spec = &self.rules.aggregates()[id];
        let v = spec.compute(
            &self.state.history.events,
            self.now,
            self.retention_ms,
            self.profile_fn(),
        );
        self.aggregates.borrow_mut()[id] = Some(v.clone());
        v
    }

    fn profile(&self, name: &str) -> Option<Value> {
        self.state.history.profile_value(name)
    }

    fn definition(&self, id: DefId) -> Value {
        if let Some(v) = &self.definitions.borrow()[id] {
            return v.clone();
        }
        let v = match self.rules.def(id).kind {
            DefKind::EventTag => Value::Bool(self.event_tag(id).0),
            _ => self.rules.evaluate(id, self),
        };
        self.definitions.borrow_mut()[id] = Some(v.clone());
        v
    }

    fn aggregate_next_change(&self, id: AggId) -> Option<i64> {
        if let Some(w) = self.windows() {
            return w.next_change(self.rules, id);
        }
        let spec = &self.rules.aggregates()[id];
        spec.next_change(
            &self.state.history.events,
            self.now,
            self.retention_ms,
            self.profile_fn(),
        )
    }

    fn aggregate_leaves(&self, id: AggId, band: &Band) -> Option<i64> {
        match self.windows() {
            Some(w) => w.leaves(self.rules, id, band),
            None => self.aggregate_next_change(id),
        }
    }

    fn falling_count(&self, id: AggId) -> Option<u64> {
        self.windows()?.falling_count(self.rules, id)
    }

    fn count_exit(&self, id: AggId, k: u64) -> Option<i64> {
        Some(self.windows()?.count_exit(self.rules, id, k))
    }

    fn event_tag_next_change(&self, id: DefId) -> Option<i64> {
        let def = self.rules.def(id);
        let ttl = def.event_tag.as_ref().and_then(|s| s.ttl_ms);
        let now = self.now;
        let state = self.state.event_tags.get(&def.name)?;
        let expiry = state.latest(now).zip(ttl).map(|(l, t)| l.saturating_add(t));
        state
            .future
            .iter()
            .copied()
            .chain(expiry)
            .filter(|t| *t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_records_round_trip() {
        let mut s = CustomerState {
            generation: 3,
            timer: Some(99),
            ..Default::default()
        };
        s.history.profile.insert(
            "city".into(),
            ProfileEntry {
                ts: 5,
                arrival: 2,
                value: Some(Value::str("杭州")),
            },
        );
        s.history.profile.insert(
            "vip".into(),
            ProfileEntry {
                ts: 6,
                arrival: 3,
                value: None,
            },
        );
        s.members.insert(
            "hot".into(),
            Membership {
                since: 10,
                expires_at: Some(20),
            },
        );
        s.event_tags.insert(
            "seen".into(),
            EventTagState {
                last_ts: Some(4),
                future: vec![8, 9],
            },
        );
        s.manual.insert(
            "vip_tag".into(),
            ManualTag {
                since: 1,
                expires_at: None,
            },
        );
        let back = CustomerState::decode(&s.encode(None)).unwrap();
        assert_eq!(back.generation, 3);
        assert_eq!(back.timer, Some(99));
        assert_eq!(back.history.profile, s.history.profile);
        assert_eq!(back.members, s.members);
        assert_eq!(back.event_tags, s.event_tags);
        assert_eq!(back.manual, s.manual);
    }

    #[test]
    fn decoded_definition_names_are_the_rule_sets_own() {
        let rules = CompiledRules::compile(
            "tag payer = count(pay, 10ms) >= 1
             tag seen on view ttl 10ms",
        )
        .unwrap();
        let mut s = CustomerState::default();
        for name in ["payer", "gone"] {
            s.members.insert(
                name.into(),
                Membership {
                    since: 1,
                    expires_at: None,
                },
            );
        }
        s.event_tags.insert("seen".into(), EventTagState::default());
        let bytes = s.encode(Some(&rules));
        let (back, _) = CustomerState::decode_with_windows(&bytes, Some((&rules, 1_000))).unwrap();
        let own = |name: &str| rules.def(rules.lookup(name).unwrap()).name.clone();
        let (payer, _) = back.members.get_key_value("payer").unwrap();
        assert!(
            Arc::ptr_eq(payer, &own("payer")),
            "a member's name is shared, not copied"
        );
        let (seen, _) = back.event_tags.get_key_value("seen").unwrap();
        assert!(Arc::ptr_eq(seen, &own("seen")));
        assert!(
            back.members.contains_key("gone"),
            "a name no rule defines any more is kept"
        );
        assert_eq!(back.members.len(), 2);
    }
}
