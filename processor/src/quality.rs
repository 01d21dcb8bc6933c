//! Data quality: what arrives, and how it breaks the tracking plan.
//!
//! [`Intake`] is what every edge (HTTP, Kafka, file replay, the demo) parses events with:
//! the limits, the tracking plan if one is loaded, and the [`Quality`] record it writes
//! to. That record keeps
//! - violations by source, class, event type and field, per minute for the last day, with
//!   a few sample lines each (`GET /v1/quality`), and
//! - the observed schema: every event type, property, profile attribute and identifier
//!   received, with the types seen, examples, counts and first/last seen
//!   (`GET /v1/schema/observed`, `tagstream plan infer`).
//!
//! Both are bounded (a client inventing property names cannot grow them without end) and
//! saved in the store with the engine's commits every few seconds, so they survive a
//! restart; after a crash the last seconds' counts may be missing (the events are not).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use rules::plan::inferred_type;
use rules::{TrackingPlan, Value, Violation, ViolationClass};
use serde::{Deserialize, Serialize};

use crate::event::{parse_event_planned, EventLimits, Rejection, ValidEvent};

/// Most distinct (source, class, event type, field) keys of violations kept.
const MAX_VIOLATION_KEYS: usize = 5_000;
/// Per key: minutes of counts kept (a day) and sample lines.
const MAX_MINUTES: usize = 24 * 60;
const MAX_SAMPLES: usize = 3;
/// Sample lines are cut to this many bytes.
const SAMPLE_BYTES: usize = 1024;
/// Most event types, properties per type, profile attributes and examples observed.
const MAX_TYPES: usize = 1_000;
const MAX_FIELDS: usize = 500;
const MAX_EXAMPLES: usize = 3;
const EXAMPLE_SIGHTINGS: u64 = 100;
/// How often the record is saved with a commit, at most.
pub const SAVE_EVERY_MS: i64 = 5_000;

/// The limits, the tracking plan and where violations and observations go: what edges
/// parse events with.
#[derive(Clone, Debug)]
pub struct Intake {
    pub limits: EventLimits,
    pub plan: Option<Arc<TrackingPlan>>,
    pub quality: Arc<Quality>,
    /// The identifier types: events' `ids` are normalised and ranked here, on the parsing
    /// thread, not on the engine's.
    pub identity: Option<Arc<crate::identity::IdentityConfig>>,
}

impl Intake {
    /// Parses a batch from `source` (`http`, `kafka`, `replay`, …), recording violations
    /// and what valid events carry. The future-`ts` check is left to the engine.
    pub fn parse_batch<B: AsRef<[u8]>>(&self, raw: &[B], source: &str) -> Vec<Result<ValidEvent, Rejection>> {
        let (parsed, sightings) = self.parse_unrecorded(raw);
        self.record(source, &parsed, sightings, |_| true);
        parsed
    }

    /// Parses a batch as [`Intake::parse_batch`] does without recording anything yet: the
    /// events, and the violations of each event that had some (by its index), for
    /// [`Intake::record`] — which a Kafka consumer calls only for the events it applies,
    /// not those it forwards to another member ([`crate::kafka::route`]).
    pub fn parse_unrecorded<B: AsRef<[u8]>>(
        &self,
        raw: &[B],
    ) -> (Vec<Result<ValidEvent, Rejection>>, Sightings) {
        let mut found: Vec<Violation> = Vec::new();
        let mut sightings = Vec::new();
        let parsed = raw
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let r = r.as_ref();
                let from = found.len();
                let mut result =
                    parse_event_planned(r, &self.limits, self.plan.as_deref(), i64::MAX, &mut found);
                if let (Ok(ev), Some(identity)) = (&mut result, &self.identity) {
                    if !ev.ids.is_empty() {
                        match identity.prepare(&ev.ids, &ev.customer_id) {
                            Ok(prepared) => {
                                ev.prepared = Some(prepared);
                                // Freed here, on the thread that made them (the engine
                                // reads only the prepared ones).
                                ev.ids = Vec::new();
                            }
                            Err(rejection) => result = Err(rejection),
                        }
                    }
                }
                let blocked = match &result {
                    Err(Rejection::Plan(v)) => Some(v.class),
                    _ => None,
                };
                if found.len() > from {
                    let event_type = match &result {
                        Ok(ev) => ev.event_type.to_string(),
                        Err(_) => event_type_of(r),
                    };
                    sightings.push((
                        index,
                        Sighting {
                            event_type,
                            violations: found.drain(from..).collect(),
                            blocked,
                            line: sample_line(r),
                        },
                    ));
                }
                result
            })
            .collect::<Vec<_>>();
        (parsed, sightings)
    }

    /// Records the violations and what the valid events carry, of the events of a batch
    /// [`Intake::parse_unrecorded`] parsed whose index `applied` keeps.
    pub fn record(
        &self,
        source: &str,
        parsed: &[Result<ValidEvent, Rejection>],
        sightings: Sightings,
        applied: impl Fn(usize) -> bool,
    ) {
        let now = crate::engine::wall_ms();
        let sightings = sightings
            .into_iter()
            .filter(|(index, _)| applied(*index))
            .map(|(_, sighting)| sighting)
            .collect();
        self.quality.record(source, now, sightings, self.plan.as_deref());
        let valid = parsed.iter().enumerate().filter(|(index, _)| applied(*index));
        self.quality
            .observe(now, valid.filter_map(|(_, r)| r.as_ref().ok()));
    }
}

/// The violations of the events of a batch that had some, by the event's index.
pub type Sightings = Vec<(usize, Sighting)>;

/// An event's violations, as [`Quality::record`] takes them.
#[derive(Debug, Clone)]
pub struct Sighting {
    pub event_type: String,
    pub violations: Vec<Violation>,
    /// The class that blocked it, if it was rejected.
    pub blocked: Option<ViolationClass>,
    pub line: String,
}

/// The event type of a line that did not parse into an event, for grouping.
fn event_type_of(raw: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| {
            v.get("type")
                .and_then(|t| t.as_str())
                .map(|t| rules::normalize(t).into_owned())
        })
        .map(|t| t.chars().take(128).collect())
        .unwrap_or_default()
}

/// The line as a sample: valid UTF-8, cut to `SAMPLE_BYTES` (1 KiB).
pub fn sample_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(&raw[..raw.len().min(SAMPLE_BYTES)]).into_owned();
    if raw.len() > SAMPLE_BYTES {
        text + "…"
    } else {
        text
    }
}

/// Violations and the observed schema, shared by the edges, the engine and readers.
#[derive(Debug, Default)]
pub struct Quality {
    violations: Mutex<Violations>,
    observed: Mutex<Observed>,
    saved: Mutex<SaveState>,
    /// [`Quality::seen`] as last built, with the number of names it was built from (names
    /// are only ever added, so the count says whether it is current).
    seen: Mutex<Option<(usize, Arc<Seen>)>>,
}

/// The event types received with the properties seen of each, and the profile attributes
/// seen: what rules are checked against without a plan.
pub type Seen = (BTreeMap<String, Vec<String>>, Vec<String>);

#[derive(Debug, Default)]
struct SaveState {
    dirty: bool,
    last_saved_ms: i64,
}

/// Where a violation was seen.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ViolationKey {
    pub source: String,
    pub class: String,
    pub event_type: String,
    /// The field (`props.amount`, `profile.city`, `customer_id`, a top-level name); empty
    /// when the violation is about the whole event.
    pub field: String,
}

/// Counts of one key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ViolationStats {
    pub count: u64,
    /// Of `count`, events rejected for it.
    pub blocked: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    /// `(minute start in ms, count)`, oldest first, for the last day.
    pub per_minute: VecDeque<(i64, u64)>,
    pub samples: VecDeque<Sample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub at: i64,
    pub detail: String,
    pub line: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Violations {
    keys: BTreeMap<ViolationKey, ViolationStats>,
    /// Violations not kept because [`MAX_VIOLATION_KEYS`] keys exist.
    dropped: u64,
}

/// What was received of one field: the types seen and a few examples.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FieldStats {
    pub count: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    /// Type name (`string`, `integer`, `decimal`, `bool`, `list`, `null`) → count.
    pub types: BTreeMap<String, u64>,
    pub examples: Vec<serde_json::Value>,
}

impl FieldStats {
    fn see(&mut self, now: i64, value: Option<&Value>) {
        if self.count == 0 {
            self.first_seen = now;
        }
        self.count += 1;
        self.last_seen = now;
        let type_name = value.map_or("null", inferred_type);
        match self.types.get_mut(type_name) {
            Some(n) => *n += 1,
            None => {
                self.types.insert(type_name.to_owned(), 1);
            }
        }
        if let Some(v) = value {
            // Examples come from the first sightings: later ones cost nothing.
            if self.examples.len() < MAX_EXAMPLES && self.count <= EXAMPLE_SIGHTINGS {
                let example = serde_json::to_value(v).unwrap_or_default();
                if !self.examples.contains(&example) {
                    self.examples.push(example);
                }
            }
        }
    }
}

/// One event type as received.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TypeStats {
    pub count: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    pub properties: BTreeMap<String, FieldStats>,
    /// Properties not kept because `MAX_FIELDS` (500) exist.
    pub properties_dropped: u64,
}

/// The observed schema: `GET /v1/schema/observed`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Observed {
    pub events: BTreeMap<String, TypeStats>,
    pub profile: BTreeMap<String, FieldStats>,
    pub identifiers: BTreeMap<String, FieldStats>,
    /// Events of types not kept because `MAX_TYPES` (1,000) types exist, and profile attributes
    /// not kept because `MAX_FIELDS` (500) exist.
    pub events_dropped: u64,
    pub profile_dropped: u64,
}

/// What the store keeps of the record.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    violations: Violations,
    observed: Observed,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The record is counts: one a panicking thread left half-updated is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Quality {
    /// A record restored from what [`Quality::snapshot_due`] saved (an unreadable one,
    /// from another version, starts empty).
    pub fn restore(saved: Option<&[u8]>) -> Quality {
        let quality = Quality::default();
        if let Some(snapshot) = saved.and_then(|b| serde_json::from_slice::<Snapshot>(b).ok()) {
            *lock(&quality.violations) = snapshot.violations;
            *lock(&quality.observed) = snapshot.observed;
        }
        quality
    }

    /// The record to save, if it changed and was last saved [`SAVE_EVERY_MS`] ago or more.
    pub fn snapshot_due(&self, now: i64) -> Option<Vec<u8>> {
        let mut saved = lock(&self.saved);
        if !saved.dirty || now - saved.last_saved_ms < SAVE_EVERY_MS {
            return None;
        }
        saved.dirty = false;
        saved.last_saved_ms = now;
        drop(saved);
        Some(self.snapshot())
    }

    /// The whole record as the store keeps it.
    pub fn snapshot(&self) -> Vec<u8> {
        let violations = lock(&self.violations);
        let observed = lock(&self.observed);
        // Serialised by reference: the locks are held only while writing.
        #[derive(Serialize)]
        struct View<'a> {
            violations: &'a Violations,
            observed: &'a Observed,
        }
        serde_json::to_vec(&View {
            violations: &violations,
            observed: &observed,
        })
        .unwrap_or_default()
    }

    fn touch(&self) {
        lock(&self.saved).dirty = true;
    }

    /// Records the violations of a batch from `source`; metrics count them too.
    pub fn record(&self, source: &str, now: i64, sightings: Vec<Sighting>, plan: Option<&TrackingPlan>) {
        if sightings.is_empty() {
            return;
        }
        let minute = now - now.rem_euclid(60_000);
        let mut violations = lock(&self.violations);
        for sighting in sightings {
            let planned = plan.is_some_and(|p| p.event(&sighting.event_type).is_some());
            for v in &sighting.violations {
                let blocked = sighting.blocked == Some(v.class);
                // Labels stay bounded: a type or field the plan lists, or "-".
                let field = match (&v.field, plan) {
                    (Some(f), Some(p)) if planned && planned_field(p, &sighting.event_type, f) => f.clone(),
                    _ => "-".to_owned(),
                };
                metrics::counter!(
                    "tagstream_quality_violations_total",
                    "source" => source.to_owned(),
                    "class" => v.class.code(),
                    "event_type" => if planned { sighting.event_type.clone() } else { "-".to_owned() },
                    "field" => field,
                    "outcome" => if blocked { "blocked" } else { "kept" },
                )
                .increment(1);
                let key = ViolationKey {
                    source: source.to_owned(),
                    class: v.class.code().to_owned(),
                    event_type: sighting.event_type.clone(),
                    field: v.field.clone().unwrap_or_default(),
                };
                if !violations.keys.contains_key(&key) && violations.keys.len() >= MAX_VIOLATION_KEYS {
                    violations.dropped += 1;
                    continue;
                }
                let stats = violations.keys.entry(key).or_default();
                if stats.count == 0 {
                    stats.first_seen = now;
                }
                stats.count += 1;
                stats.blocked += u64::from(blocked);
                stats.last_seen = now;
                match stats.per_minute.back_mut() {
                    Some((m, n)) if *m == minute => *n += 1,
                    _ => stats.per_minute.push_back((minute, 1)),
                }
                while stats
                    .per_minute
                    .front()
                    .is_some_and(|(m, _)| *m <= minute - MAX_MINUTES as i64 * 60_000)
                {
                    stats.per_minute.pop_front();
                }
                if stats.samples.len() == MAX_SAMPLES {
                    stats.samples.pop_front();
                }
                stats.samples.push_back(Sample {
                    at: now,
                    detail: v.detail.clone(),
                    line: sighting.line.clone(),
                });
            }
        }
        drop(violations);
        self.touch();
    }

    /// Records what valid events carry: their types, properties, profile attributes and
    /// identifiers.
    pub fn observe<'a>(&self, now: i64, events: impl Iterator<Item = &'a ValidEvent>) {
        let mut guard = lock(&self.observed);
        let observed = &mut *guard;
        let mut any = false;
        for ev in events {
            any = true;
            let mut none = 0;
            if let Some(id) = bounded(&mut observed.identifiers, "customer_id", &mut none) {
                id.see(now, Some(&Value::Str(ev.customer_id.clone())));
            }
            let known = observed.events.contains_key(&*ev.event_type);
            if !known && observed.events.len() >= MAX_TYPES {
                observed.events_dropped += 1;
            } else if !known {
                observed
                    .events
                    .insert(ev.event_type.to_string(), TypeStats::default());
            }
            let stats = observed.events.get_mut(&*ev.event_type);
            if let Some(stats) = stats {
                if stats.count == 0 {
                    stats.first_seen = now;
                }
                stats.count += 1;
                stats.last_seen = now;
                for (path, value) in ev.props.iter() {
                    if let Some(field) = bounded(&mut stats.properties, path, &mut stats.properties_dropped) {
                        field.see(now, (!value.is_null()).then_some(value));
                    }
                }
            }
            for (name, value) in &ev.profile {
                if let Some(field) = bounded(&mut observed.profile, name, &mut observed.profile_dropped) {
                    field.see(now, value.as_ref());
                }
            }
        }
        drop(guard);
        if any {
            self.touch();
        }
    }

    /// The observed schema as of now.
    pub fn observed(&self) -> Observed {
        lock(&self.observed).clone()
    }

    /// The names received (see [`Seen`]); built again only when new names arrived, so a
    /// query checked against it costs no copy of the schema.
    pub fn seen(&self) -> Arc<Seen> {
        let observed = lock(&self.observed);
        let names = observed.events.len()
            + observed
                .events
                .values()
                .map(|t| t.properties.len())
                .sum::<usize>()
            + observed.profile.len();
        let mut cached = lock(&self.seen);
        if let Some((count, seen)) = &*cached {
            if *count == names {
                return seen.clone();
            }
        }
        let types = observed
            .events
            .iter()
            .map(|(t, s)| (t.clone(), s.properties.keys().cloned().collect()))
            .collect();
        let seen = Arc::new((types, observed.profile.keys().cloned().collect()));
        *cached = Some((names, seen.clone()));
        seen
    }

    /// Violations with their last sighting at or after `since`, filtered.
    pub fn violations(&self, since: i64, filter: &ViolationFilter) -> QualityReport {
        let violations = lock(&self.violations);
        let mut by_class: BTreeMap<String, u64> = BTreeMap::new();
        let rows: Vec<ViolationRow> = violations
            .keys
            .iter()
            .filter(|(k, s)| s.last_seen >= since && filter.admits(k))
            .map(|(k, s)| {
                let in_range: u64 = s
                    .per_minute
                    .iter()
                    .filter(|(m, _)| *m + 60_000 > since)
                    .map(|(_, n)| n)
                    .sum();
                let count = if since == i64::MIN { s.count } else { in_range };
                *by_class.entry(k.class.clone()).or_default() += count;
                ViolationRow {
                    key: k.clone(),
                    count,
                    total: s.count,
                    blocked: s.blocked,
                    first_seen: s.first_seen,
                    last_seen: s.last_seen,
                    per_minute: s
                        .per_minute
                        .iter()
                        .filter(|(m, _)| *m + 60_000 > since)
                        .copied()
                        .collect(),
                    samples: s.samples.iter().cloned().collect(),
                }
            })
            .collect();
        QualityReport {
            by_class,
            violations: rows,
            dropped: violations.dropped,
        }
    }
}

/// Whether the plan lists `field` (`props.PATH`, `profile.NAME`, `customer_id`, `ts`) for
/// `event_type`.
fn planned_field(plan: &TrackingPlan, event_type: &str, field: &str) -> bool {
    if let Some(path) = field.strip_prefix("props.") {
        return plan
            .event(event_type)
            .is_some_and(|set| set.fields.contains_key(path));
    }
    if let Some(name) = field.strip_prefix("profile.") {
        return plan
            .profile
            .as_ref()
            .is_some_and(|set| set.fields.contains_key(name));
    }
    matches!(field, "customer_id" | "ts")
}

fn bounded<'a>(
    map: &'a mut BTreeMap<String, FieldStats>,
    name: &str,
    dropped: &mut u64,
) -> Option<&'a mut FieldStats> {
    if !map.contains_key(name) {
        if map.len() >= MAX_FIELDS {
            *dropped += 1;
            return None;
        }
        map.insert(name.to_owned(), FieldStats::default());
    }
    map.get_mut(name)
}

/// Which violations a report shows (`None`: all).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ViolationFilter {
    pub source: Option<String>,
    pub class: Option<String>,
    pub event_type: Option<String>,
}

impl ViolationFilter {
    fn admits(&self, key: &ViolationKey) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.source, &key.source) && eq(&self.class, &key.class) && eq(&self.event_type, &key.event_type)
    }
}

/// `GET /v1/quality`.
#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    /// Violations per class in the range.
    pub by_class: BTreeMap<String, u64>,
    pub violations: Vec<ViolationRow>,
    /// Violations not kept by key because the record is full.
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ViolationRow {
    #[serde(flatten)]
    pub key: ViolationKey,
    /// In the range asked for.
    pub count: u64,
    /// Since the record began.
    pub total: u64,
    pub blocked: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    pub per_minute: Vec<(i64, u64)>,
    pub samples: Vec<Sample>,
}

impl Observed {
    /// A tracking plan that accepts what was received: every type and property seen, with
    /// the type seen most (integers and decimals together are `decimal`), required when
    /// every event of its type carried it. A starting point to edit, in `allow` mode.
    pub fn infer_plan(&self) -> String {
        let mut out = String::from(
            "# Tracking plan inferred by tagstream from the events received.\n\
             # Review it, tighten it (enums, patterns, required), then switch modes to strip or block.\n\
             # See docs/rules.md, \"Tracking plan\".\n\n\
             [defaults]\nmode = \"allow\"\nunplanned_events = \"allow\"\n",
        );
        for (name, stats) in &self.events {
            let _ = write!(out, "\n[events.{}]\n", toml_key(name));
            let _ = writeln!(out, "# {} events seen", stats.count);
            out.push_str("additional_properties = false\n");
            for (path, field) in &stats.properties {
                let required = field.count == stats.count && !field.types.contains_key("null");
                let _ = writeln!(
                    out,
                    "properties.{} = {{ type = \"{}\"{} }}{}",
                    toml_key(path),
                    planned_type(field),
                    if required { ", required = true" } else { "" },
                    examples_comment(field)
                );
            }
        }
        if !self.profile.is_empty() {
            out.push_str("\n[profile]\nadditional_properties = false\n");
            for (name, field) in &self.profile {
                let _ = writeln!(
                    out,
                    "attributes.{} = {{ type = \"{}\" }}{}",
                    toml_key(name),
                    planned_type(field),
                    examples_comment(field)
                );
            }
        }
        out
    }
}

/// The type a plan gives a field: the one seen most, numbers together as decimal when
/// both kinds were seen.
fn planned_type(field: &FieldStats) -> &'static str {
    let count = |t: &str| field.types.get(t).copied().unwrap_or(0);
    let numbers = count("integer") + count("decimal");
    let best = [
        ("string", count("string")),
        ("bool", count("bool")),
        ("list", count("list")),
        (
            if count("decimal") > 0 {
                "decimal"
            } else {
                "integer"
            },
            numbers,
        ),
    ]
    .into_iter()
    .max_by_key(|(_, n)| *n);
    match best {
        Some((t, n)) if n > 0 => t,
        _ => "any",
    }
}

fn examples_comment(field: &FieldStats) -> String {
    if field.examples.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = field.examples.iter().map(|e| e.to_string()).collect();
    let text = shown.join(", ");
    let text: String = text.chars().take(80).collect();
    format!("   # e.g. {}", text.replace('\n', " "))
}

/// A TOML key: bare when it can be, quoted otherwise.
fn toml_key(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_owned()
    } else {
        serde_json::to_string(name).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intake(plan: Option<&str>) -> Intake {
        Intake {
            limits: EventLimits::default(),
            plan: plan.map(|p| Arc::new(TrackingPlan::parse(p).unwrap())),
            quality: Arc::new(Quality::default()),
            identity: None,
        }
    }

    #[test]
    fn violations_are_recorded_by_source_class_type_and_field() {
        let intake = intake(Some(
            "[events.payment]\nproperties.amount = { type = \"decimal\", required = true }\n\
             [events.view]\nmode = \"allow\"\nproperties.category = { type = \"string\" }",
        ));
        let raw = [
            r#"{"customer_id": "c1", "type": "payment", "props": {"amount": "12.5"}}"#,
            r#"{"customer_id": "c1", "type": "veiw"}"#,
            r#"{"customer_id": "c1", "type": "view", "props": {"category": 5}, "profle": {}}"#,
            r#"{"customer_id": "c1", "type": "payment", "props": {"amount": 12.5}}"#,
        ];
        let parsed = intake.parse_batch(&raw, "http");
        let codes: Vec<&str> = parsed
            .iter()
            .map(|r| r.as_ref().map_or_else(|e| e.code(), |_| "ok"))
            .collect();
        assert_eq!(codes, ["datatype_mismatch", "unplanned_event", "ok", "ok"]);
        let report = intake.quality.violations(i64::MIN, &ViolationFilter::default());
        let rows: Vec<(&str, &str, &str, u64, u64)> = report
            .violations
            .iter()
            .map(|r| {
                (
                    &*r.key.class,
                    &*r.key.event_type,
                    &*r.key.field,
                    r.count,
                    r.blocked,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("datatype_mismatch", "payment", "props.amount", 1, 1),
                ("datatype_mismatch", "view", "props.category", 1, 0),
                ("unknown_top_level_field", "view", "profle", 1, 0),
                ("unplanned_event", "veiw", "", 1, 1),
            ]
        );
        assert_eq!(report.by_class["datatype_mismatch"], 2);
        let sample = &report.violations[2].samples[0];
        assert!(
            sample.detail.contains("did you mean \"profile\""),
            "{}",
            sample.detail
        );
        assert_eq!(sample.line, raw[2]);
        let only_http_view = ViolationFilter {
            event_type: Some("view".into()),
            ..Default::default()
        };
        assert_eq!(
            intake
                .quality
                .violations(i64::MIN, &only_http_view)
                .violations
                .len(),
            2
        );
    }

    #[test]
    fn the_observed_schema_survives_a_snapshot_and_infers_a_plan_that_accepts_it() {
        let intake = intake(None);
        let raw = [
            r#"{"customer_id": "c1", "type": "payment", "props": {"amount": 12.5, "currency": "CNY"}, "profile": {"city": "杭州"}}"#,
            r#"{"customer_id": "c2", "type": "payment", "props": {"amount": 3}}"#,
            r#"{"customer_id": "c2", "type": "app open", "props": {"device": {"os": "iOS"}}}"#,
        ];
        assert!(intake.parse_batch(&raw, "replay").iter().all(Result::is_ok));
        let restored = Quality::restore(Some(&intake.quality.snapshot()));
        let observed = restored.observed();
        let payment = &observed.events["payment"];
        assert_eq!(payment.count, 2);
        assert_eq!(payment.properties["amount"].types.len(), 2, "integer and decimal");
        assert_eq!(observed.identifiers["customer_id"].count, 3);
        let plan = observed.infer_plan();
        assert!(
            plan.contains("properties.amount = { type = \"decimal\", required = true }"),
            "{plan}"
        );
        assert!(
            plan.contains("properties.currency = { type = \"string\" }"),
            "{plan}"
        );
        assert!(plan.contains("[events.\"app open\"]"), "{plan}");
        assert!(plan.contains("properties.\"device.os\""), "{plan}");
        let strict = plan.replace(
            "mode = \"allow\"\nunplanned_events = \"allow\"",
            "mode = \"block\"",
        );
        let checked = super::Intake {
            plan: Some(Arc::new(
                TrackingPlan::parse(&strict).expect("the inferred plan parses"),
            )),
            ..intake.clone()
        };
        assert!(
            checked.parse_batch(&raw, "replay").iter().all(Result::is_ok),
            "{strict}"
        );
    }
}
