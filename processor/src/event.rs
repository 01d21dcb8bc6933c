//! Parsing, validation and normalisation of incoming events (contract section 1).
//!
//! Every rejection is a [`Rejection`]: a stable code that dead letters, the Kafka header and
//! the metric label carry, and a message for people.

use std::borrow::Cow;
use std::sync::Arc;

use rules::{
    normalize, NumberError, ProfileUpdate, Props, TrackingPlan, Value, Verdict, Violation, ViolationClass,
};
use serde_json::value::RawValue;

mod json;

/// The earliest accepted event time: 2000-01-01T00:00:00Z.
pub const MIN_TS: i64 = 946_684_800_000;

/// Limits applied to every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    /// Largest accepted event, in bytes of its JSON text.
    pub max_event_bytes: usize,
    /// Deepest accepted nesting of objects and arrays.
    pub max_depth: usize,
    /// How far ahead of the later of the wall clock and the engine clock `ts` may be.
    pub future_tolerance_ms: i64,
    /// Most characters of `customer_id` and `event_id` (after normalisation).
    pub max_id_chars: usize,
    /// Most characters of `type`.
    pub max_type_chars: usize,
    /// Most characters of a property path (`device.os`) or profile attribute name.
    pub max_name_chars: usize,
    /// Most characters of a string value in `props` or `profile`.
    pub max_string_chars: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_event_bytes: 64 * 1024,
            max_depth: 16,
            future_tolerance_ms: 5 * 60_000,
            max_id_chars: 256,
            max_type_chars: 128,
            max_name_chars: 128,
            max_string_chars: 8192,
        }
    }
}

/// A valid event, normalised, before the engine assigns its arrival number.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    pub event_id: Option<String>,
    /// Normalised (NFKC, invisible characters removed, trimmed).
    pub customer_id: Arc<str>,
    pub event_type: Arc<str>,
    /// `None` when the event has no `ts`: the engine uses its clock.
    pub ts: Option<i64>,
    pub props: Props,
    /// Attributes to set; `None` deletes.
    pub profile: Vec<(Arc<str>, Option<Value>)>,
    /// Typed identifiers (`ids`): (type, value) after the contract's normalisation; the
    /// engine applies each type's own normaliser and resolves them to one customer
    /// ([`crate::identity`]). `customer_id` is empty when the event named the customer
    /// only by these.
    pub ids: Vec<(Arc<str>, String)>,
    /// `ids` with each type's normaliser applied, when the intake that parsed the event
    /// knew the identifier types (else the engine prepares them). The intake that prepares
    /// them empties `ids`.
    pub prepared: Option<crate::identity::PreparedIds>,
    /// For an event without `event_id` that a member of a group forwarded to its
    /// customer's partition ([`crate::kafka::route`]): the key it is deduplicated by
    /// instead, made from where it was first read, so a forward sent twice counts once.
    pub position_key: Option<String>,
    /// For an event a group's identity resolver sent to its customer's partition
    /// (`tagstream-resolved`, [`crate::kafka::route`]): the customer it is applied to,
    /// decided there — its identifiers are not resolved again.
    pub resolved: Option<crate::engine::Resolved>,
}

impl ValidEvent {
    /// True when the event carries identifiers (`ids`, raw or prepared) to resolve.
    pub fn carries_ids(&self) -> bool {
        !self.ids.is_empty() || self.prepared.is_some()
    }
}

/// Why an event was rejected: a stable `code` (dead letters, the Kafka header
/// `tagstream-reason-code`, the metric label `reason`) and a message for people, the
/// `reason` of the API and of dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    TooLarge {
        limit: usize,
    },
    NotUtf8,
    InvalidJson(String),
    TooDeep {
        limit: usize,
    },
    NotObject,
    CustomerIdMissing,
    CustomerIdEmpty,
    CustomerIdNotString,
    TypeMissing,
    TypeEmpty,
    TypeNotString,
    TsUnparsable,
    TsTooOld,
    TsInFuture,
    /// No `ts`, in event clock mode before the clock is known.
    TsMissingClockUnknown,
    EventIdNotString,
    PropsNotObject,
    ProfileNotObject,
    /// A string longer than its limit: `field` names it (`customer_id`, `props.note`).
    TooLong {
        field: String,
        limit: usize,
    },
    /// A number that cannot be held exactly (`1e300`, 30 significant digits).
    NumberNotExact {
        field: String,
        error: NumberError,
    },
    /// `ids` is not an object of identifier type to string (or array of strings): `field`
    /// names what was wrong (`ids`, `ids.phone`).
    IdsInvalid {
        field: String,
    },
    /// No `customer_id`, and every identifier in `ids` normalised to nothing.
    IdsUnusable,
    /// An identifier type the settings do not declare.
    IdTypeUnknown {
        id_type: String,
        known: String,
    },
    /// Blocked by the tracking plan: the first violation of a blocking mode. Its code is
    /// the violation class's.
    Plan(Violation),
    /// A record of the events topic marked (by its header) as one a node of the group sent
    /// another — a customer handed over (`kind` "handover") or a request ("request") — that
    /// cannot be read as one: written by something else, or by a build that writes another
    /// format.
    ControlRecordMalformed {
        kind: &'static str,
        error: String,
    },
}

impl Rejection {
    /// Every code, for documentation and for tests that check it.
    pub const CODES: [&'static str; 32] = [
        "too_large",
        "not_utf8",
        "invalid_json",
        "too_deep",
        "not_object",
        "customer_id_missing",
        "customer_id_empty",
        "customer_id_not_string",
        "type_missing",
        "type_empty",
        "type_not_string",
        "ts_unparsable",
        "ts_too_old",
        "ts_in_future",
        "ts_missing_clock_unknown",
        "event_id_not_string",
        "props_not_object",
        "profile_not_object",
        "too_long",
        "number_not_exact",
        "unplanned_event",
        "required_missing",
        "datatype_mismatch",
        "additional_properties",
        "enum",
        "pattern",
        "out_of_retention",
        "unknown_top_level_field",
        "ids_invalid",
        "id_type_unknown",
        "ids_unusable",
        "control_record_malformed",
    ];

    /// The stable code: what dashboards, alerts and dead-letter filters key on.
    pub fn code(&self) -> &'static str {
        let i = match self {
            Rejection::TooLarge { .. } => 0,
            Rejection::NotUtf8 => 1,
            Rejection::InvalidJson(_) => 2,
            Rejection::TooDeep { .. } => 3,
            Rejection::NotObject => 4,
            Rejection::CustomerIdMissing => 5,
            Rejection::CustomerIdEmpty => 6,
            Rejection::CustomerIdNotString => 7,
            Rejection::TypeMissing => 8,
            Rejection::TypeEmpty => 9,
            Rejection::TypeNotString => 10,
            Rejection::TsUnparsable => 11,
            Rejection::TsTooOld => 12,
            Rejection::TsInFuture => 13,
            Rejection::TsMissingClockUnknown => 14,
            Rejection::EventIdNotString => 15,
            Rejection::PropsNotObject => 16,
            Rejection::ProfileNotObject => 17,
            Rejection::TooLong { .. } => 18,
            Rejection::NumberNotExact { .. } => 19,
            Rejection::IdsInvalid { .. } => 28,
            Rejection::IdTypeUnknown { .. } => 29,
            Rejection::IdsUnusable => 30,
            Rejection::ControlRecordMalformed { .. } => 31,
            Rejection::Plan(v) => return v.class.code(),
        };
        Self::CODES[i]
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::TooLarge { limit } => write!(f, "event larger than {limit} bytes"),
            Rejection::NotUtf8 => f.write_str("not valid UTF-8"),
            Rejection::InvalidJson(e) => write!(f, "invalid JSON: {e}"),
            Rejection::TooDeep { limit } => write!(f, "nested deeper than {limit} levels"),
            Rejection::NotObject => f.write_str("not a JSON object"),
            Rejection::CustomerIdMissing => f.write_str("missing customer_id"),
            Rejection::CustomerIdEmpty => f.write_str("empty customer_id"),
            Rejection::CustomerIdNotString => f.write_str("customer_id is not a string"),
            Rejection::TypeMissing => f.write_str("missing type"),
            Rejection::TypeEmpty => f.write_str("empty type"),
            Rejection::TypeNotString => f.write_str("type is not a string"),
            Rejection::TsUnparsable => f.write_str("ts unparsable"),
            Rejection::TsTooOld => f.write_str("ts before 2000-01-01"),
            Rejection::TsInFuture => f.write_str("ts too far in the future"),
            Rejection::TsMissingClockUnknown => f.write_str(
                "missing ts, and the event clock is not set yet (send events with ts, or POST /v1/clock)",
            ),
            Rejection::EventIdNotString => f.write_str("event_id is not a string"),
            Rejection::PropsNotObject => f.write_str("props is not an object"),
            Rejection::ProfileNotObject => f.write_str("profile is not an object"),
            Rejection::TooLong { field, limit } => write!(f, "{field} longer than {limit} characters"),
            Rejection::NumberNotExact { field, error } => write!(f, "{field}: the number {error}"),
            Rejection::IdsInvalid { field } => write!(
                f,
                "{field} is not valid: ids is an object of identifier type to a string or an array of strings"
            ),
            Rejection::IdsUnusable => {
                f.write_str("no customer_id, and no identifier in ids is usable (each normalises to nothing)")
            }
            Rejection::IdTypeUnknown { id_type, known } => {
                write!(f, "ids.{id_type}: unknown identifier type (known: {known})")
            }
            Rejection::Plan(v) => write!(f, "tracking plan, {}: {}", v.class, v.detail),
            Rejection::ControlRecordMalformed { kind, error } => {
                write!(f, "a record marked as a {kind} between nodes is not one: {error}")
            }
        }
    }
}

/// Parses and validates one event's JSON bytes. `latest_known_ms` is the later of the wall
/// clock and the engine clock, for the future-tolerance check.
pub fn parse_event(raw: &[u8], limits: &EventLimits, latest_known_ms: i64) -> Result<ValidEvent, Rejection> {
    parse_event_planned(raw, limits, None, latest_known_ms, &mut Vec::new())
}

/// Like [`parse_event`], judged against a tracking plan (if any): every violation found
/// is pushed to `violations` (also those of an event kept, and unknown top-level fields
/// without a plan), fields a `strip` mode drops are dropped, and a blocking violation
/// rejects the event.
pub fn parse_event_planned(
    raw: &[u8],
    limits: &EventLimits,
    plan: Option<&TrackingPlan>,
    latest_known_ms: i64,
    violations: &mut Vec<Violation>,
) -> Result<ValidEvent, Rejection> {
    if raw.len() > limits.max_event_bytes {
        return Err(Rejection::TooLarge {
            limit: limits.max_event_bytes,
        });
    }
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(_) => return Err(Rejection::NotUtf8),
    };
    if let Some(rejection) = lone_surrogate(text, limits) {
        return Err(rejection);
    }
    let Some(b'{') = text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .as_bytes()
        .first()
    else {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Err(e) => Rejection::InvalidJson(e.to_string()),
            Ok(_) if json::depth(text) > limits.max_depth => Rejection::TooDeep {
                limit: limits.max_depth,
            },
            Ok(_) => Rejection::NotObject,
        });
    };
    let members = match serde_json::from_str::<json::Members>(text) {
        Ok(members) => members,
        Err(e) => return Err(Rejection::InvalidJson(e.to_string())),
    };
    validate_planned(members, limits, plan, latest_known_ms, violations)
}

/// serde_json's first pass skips strings without decoding their `\u` escapes, so a lone
/// surrogate (`"\ud800"`) passes it, and the readers of [`json`] decode strings trusting
/// that pass. Text that may hold one is read once through a tree, which rejects it as invalid
/// JSON, as the whole event (so a surrogate in a member nothing reads is rejected too). Text
/// nested deeper than the limit is left to be rejected as too deep: the tree reading would
/// stop at serde_json's recursion limit, and nothing is decoded before the depth check.
fn lone_surrogate(text: &str, limits: &EventLimits) -> Option<Rejection> {
    if !json::may_hold_surrogate_escape(text) || json::depth(text) > limits.max_depth {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(text)
        .err()
        .map(|e| Rejection::InvalidJson(e.to_string()))
}

/// The top-level fields of the event format.
pub const TOP_LEVEL_FIELDS: [&str; 7] = ["event_id", "customer_id", "ids", "type", "ts", "props", "profile"];

/// Most identifiers one event may carry in `ids`.
pub const MAX_IDS_PER_EVENT: usize = 32;

/// The top-level members of an event, each as its raw JSON (`None` when absent or null).
#[derive(Default)]
struct TopLevel<'a> {
    event_id: Option<&'a RawValue>,
    customer_id: Option<&'a RawValue>,
    ids: Option<&'a RawValue>,
    event_type: Option<&'a RawValue>,
    ts: Option<&'a RawValue>,
    props: Option<&'a RawValue>,
    profile: Option<&'a RawValue>,
    /// Names that are not fields of the format, by name.
    unknown: Vec<Cow<'a, str>>,
}

/// Checks and converts the event's members in a fixed order, so that of several things
/// wrong with an event the same one is always reported.
fn validate_planned(
    members: json::Members<'_>,
    limits: &EventLimits,
    plan: Option<&TrackingPlan>,
    latest_known_ms: i64,
    violations: &mut Vec<Violation>,
) -> Result<ValidEvent, Rejection> {
    let mut top = TopLevel::default();
    // The object itself is one level; only members that are objects or arrays go deeper.
    let mut deepest = 1;
    for (name, value) in members.0 {
        if matches!(json::kind(value), json::Kind::Object | json::Kind::Array) {
            deepest = deepest.max(1 + json::depth(value.get()));
        }
        let value = (json::kind(value) != json::Kind::Null).then_some(value);
        let slot = match &*name {
            "event_id" => &mut top.event_id,
            "customer_id" => &mut top.customer_id,
            "ids" => &mut top.ids,
            "type" => &mut top.event_type,
            "ts" => &mut top.ts,
            "props" => &mut top.props,
            "profile" => &mut top.profile,
            _ => {
                top.unknown.push(name);
                continue;
            }
        };
        *slot = value;
    }
    if deepest > limits.max_depth {
        return Err(Rejection::TooDeep {
            limit: limits.max_depth,
        });
    }
    let ids = match top.ids {
        None => Vec::new(),
        Some(v) => identifiers(json::tree(v), limits)?,
    };
    let customer_id = match top.customer_id {
        None if !ids.is_empty() => Arc::from(""),
        None => return Err(Rejection::CustomerIdMissing),
        Some(v) if json::kind(v) == json::Kind::String => {
            let text = json::text(v);
            let id = normalize(&text);
            if id.is_empty() {
                return Err(Rejection::CustomerIdEmpty);
            }
            check_length("customer_id", &id, limits.max_id_chars)?;
            Arc::<str>::from(id.as_ref())
        }
        Some(_) => return Err(Rejection::CustomerIdNotString),
    };
    let event_type = match top.event_type {
        None => return Err(Rejection::TypeMissing),
        Some(v) if json::kind(v) == json::Kind::String => {
            let text = json::text(v);
            let t = normalize(&text);
            if t.is_empty() {
                return Err(Rejection::TypeEmpty);
            }
            check_length("type", &t, limits.max_type_chars)?;
            Arc::<str>::from(t.as_ref())
        }
        Some(_) => return Err(Rejection::TypeNotString),
    };
    let ts = match top.ts {
        None => None,
        Some(v) => {
            let ts = parse_raw_ts(v).ok_or(Rejection::TsUnparsable)?;
            if ts < MIN_TS {
                return Err(Rejection::TsTooOld);
            }
            check_not_future(ts, limits, latest_known_ms)?;
            Some(ts)
        }
    };
    let event_id = match top.event_id {
        None => None,
        Some(v) if json::kind(v) == json::Kind::String => {
            let id = json::text(v).into_owned();
            check_length("event_id", &id, limits.max_id_chars)?;
            Some(id)
        }
        Some(_) => return Err(Rejection::EventIdNotString),
    };
    let mut props = match top.props {
        None => Props::default(),
        Some(v) if json::kind(v) == json::Kind::Object => {
            let members = json::members(v);
            let mut pairs = Vec::with_capacity(members.0.len());
            json::flatten(members, &mut String::new(), &mut pairs).map_err(|(path, error)| {
                Rejection::NumberNotExact {
                    field: format!("props.{path}"),
                    error,
                }
            })?;
            let props = Props::new(pairs);
            for (path, value) in props.iter() {
                check_field("props.", path, value, limits)?;
            }
            props
        }
        Some(_) => return Err(Rejection::PropsNotObject),
    };
    let mut profile = match top.profile {
        None => Vec::new(),
        Some(v) if json::kind(v) == json::Kind::Object => profile_updates(json::members(v), limits)?,
        Some(_) => return Err(Rejection::ProfileNotObject),
    };
    let violations_before = violations.len();
    for name in &top.unknown {
        violations.push(Violation {
            class: ViolationClass::UnknownTopLevelField,
            field: Some(name.to_string()),
            detail: format!(
                "{name:?} is not a field of the event format ({}){}",
                TOP_LEVEL_FIELDS.join(", "),
                rules::diagnostic::did_you_mean(name, TOP_LEVEL_FIELDS)
                    .map(|s| format!(", did you mean {s:?}?"))
                    .unwrap_or_default()
            ),
        });
    }
    if let Some(plan) = plan {
        if plan.unknown_top_level == rules::Mode::Block {
            if let Some(v) = violations.get(violations_before) {
                return Err(Rejection::Plan(v.clone()));
            }
        }
        if let Verdict::Block(v) = plan.check(
            &customer_id,
            &ids,
            &event_type,
            &mut props,
            &mut profile,
            violations,
        ) {
            return Err(Rejection::Plan(v));
        }
    }
    Ok(ValidEvent {
        event_id,
        customer_id,
        event_type,
        ts,
        props,
        profile,
        ids,
        prepared: None,
        position_key: None,
        resolved: None,
    })
}

/// The `ids` object: identifier type → a string (a number is taken as its digits) or an
/// array of them, each normalised as every string of the contract is; empty ones dropped.
fn identifiers(value: serde_json::Value, limits: &EventLimits) -> Result<Vec<(Arc<str>, String)>, Rejection> {
    let serde_json::Value::Object(object) = value else {
        return Err(Rejection::IdsInvalid { field: "ids".into() });
    };
    let mut ids = Vec::new();
    for (id_type, values) in object {
        let name = normalize(&id_type);
        check_length(
            "the name of an identifier type in ids",
            &name,
            limits.max_name_chars,
        )?;
        let field = || format!("ids.{name}");
        let one = |v: serde_json::Value| -> Result<Option<String>, Rejection> {
            let text = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) if n.is_u64() => n.to_string(),
                serde_json::Value::Null => return Ok(None),
                _ => return Err(Rejection::IdsInvalid { field: field() }),
            };
            let text = normalize(&text);
            if text.len() > limits.max_id_chars {
                check_length(&field(), &text, limits.max_id_chars)?;
            }
            Ok((!text.is_empty()).then(|| text.into_owned()))
        };
        let found = match values {
            serde_json::Value::Array(items) => items
                .into_iter()
                .map(one)
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .collect(),
            v => one(v)?.into_iter().collect::<Vec<_>>(),
        };
        let name: Arc<str> = Arc::from(name.as_ref());
        ids.extend(found.into_iter().map(|v| (name.clone(), v)));
        if ids.len() > MAX_IDS_PER_EVENT {
            return Err(Rejection::IdsInvalid {
                field: format!("ids (more than {MAX_IDS_PER_EVENT} identifiers)"),
            });
        }
    }
    Ok(ids)
}

fn check_length(field: &str, text: &str, limit: usize) -> Result<(), Rejection> {
    // Bytes bound characters from above: most strings never need counting.
    if text.len() > limit && text.chars().count() > limit {
        return Err(Rejection::TooLong {
            field: field.to_owned(),
            limit,
        });
    }
    Ok(())
}

/// A property or attribute: its name and (string) value within the limits.
fn check_field(prefix: &str, name: &str, value: &Value, limits: &EventLimits) -> Result<(), Rejection> {
    if name.len() > limits.max_name_chars && name.chars().count() > limits.max_name_chars {
        let shown: String = name.chars().take(32).collect();
        return Err(Rejection::TooLong {
            field: format!("the name of {prefix}{shown}…"),
            limit: limits.max_name_chars,
        });
    }
    match value {
        Value::Str(s) if s.len() > limits.max_string_chars => {
            check_length(&format!("{prefix}{name}"), s, limits.max_string_chars)
        }
        Value::List(items) => items
            .iter()
            .try_for_each(|item| check_field(prefix, name, item, limits)),
        _ => Ok(()),
    }
}

/// Rejects a `ts` further ahead of `latest_known_ms` than the tolerance. Parsing on another
/// thread passes `i64::MAX` to [`parse_event`] and the engine checks this against its clock.
pub fn check_not_future(ts: i64, limits: &EventLimits, latest_known_ms: i64) -> Result<(), Rejection> {
    if ts > latest_known_ms.saturating_add(limits.future_tolerance_ms) {
        return Err(Rejection::TsInFuture);
    }
    Ok(())
}

fn profile_updates(
    members: json::Members<'_>,
    limits: &EventLimits,
) -> Result<Vec<ProfileUpdate>, Rejection> {
    members
        .0
        .into_iter()
        .map(|(k, v)| {
            let value = match json::kind(v) {
                json::Kind::Null => None,
                _ => Some(json::value(v).map_err(|error| Rejection::NumberNotExact {
                    field: format!("profile.{k}"),
                    error,
                })?),
            };
            check_field("profile.", &k, value.as_ref().unwrap_or(&Value::Null), limits)?;
            Ok((Arc::from(&*k), value))
        })
        .collect()
}

/// `ts` as integer milliseconds (a number with no fraction), or an RFC 3339 string with an
/// offset.
fn parse_raw_ts(value: &RawValue) -> Option<i64> {
    match json::kind(value) {
        json::Kind::Number => {
            let text = value.get();
            if let Ok(i) = text.parse::<i64>() {
                return Some(i);
            }
            let f = text.parse::<f64>().ok()?;
            (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
        }
        json::Kind::String => chrono::DateTime::parse_from_rfc3339(json::text(value).trim())
            .ok()
            .map(|dt| dt.timestamp_millis()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_744_732_800_000;

    fn parse(text: &str) -> Result<ValidEvent, Rejection> {
        parse_event(text.as_bytes(), &EventLimits::default(), NOW)
    }

    /// The rejection's code and message.
    fn rejected(text: &[u8]) -> (&'static str, String) {
        let r = parse_event(text, &EventLimits::default(), NOW).expect_err("should be rejected");
        (r.code(), r.to_string())
    }

    #[test]
    fn ids_are_normalised() {
        let e = parse(r#"{"customer_id": " １３８\u200b ", "type": "view", "ts": 1744000000000}"#).unwrap();
        assert_eq!(&*e.customer_id, "138");
    }

    #[test]
    fn rfc3339_ts_with_offset() {
        let e =
            parse(r#"{"customer_id": "c", "type": "view", "ts": "2025-03-01T12:45:41.139+08:00"}"#).unwrap();
        assert_eq!(e.ts, Some(1_740_804_341_139));
    }

    #[test]
    fn every_rejection_class_has_its_code_and_reason() {
        let deep = format!(
            r#"{{"customer_id": "c", "type": "v", "props": {}1{}}}"#,
            "[".repeat(16),
            "]".repeat(16)
        );
        let big = format!(
            r#"{{"customer_id": "c", "type": "v", "props": {{"blob": "{}"}}}}"#,
            "x".repeat(70_000)
        );
        let long_id = format!(r#"{{"customer_id": "{}", "type": "v"}}"#, "７".repeat(257));
        let long_type = format!(r#"{{"customer_id": "c", "type": "{}"}}"#, "看".repeat(129));
        let long_value = format!(
            r#"{{"customer_id": "c", "type": "v", "props": {{"note": "{}"}}}}"#,
            "x".repeat(8193)
        );
        let long_name = format!(
            r#"{{"customer_id": "c", "type": "v", "profile": {{"{}": 1}}}}"#,
            "n".repeat(129)
        );
        let cases: Vec<(&[u8], &str, &str)> = vec![
            (b"\xff\xfe", "not_utf8", "not valid UTF-8"),
            (b"42", "not_object", "not a JSON object"),
            (
                br#"{"type": "view"}"#,
                "customer_id_missing",
                "missing customer_id",
            ),
            (
                br#"{"customer_id": null, "type": "view"}"#,
                "customer_id_missing",
                "missing customer_id",
            ),
            (
                "{\"customer_id\": \"\u{200b} \", \"type\": \"view\"}".as_bytes(),
                "customer_id_empty",
                "empty customer_id",
            ),
            (
                br#"{"customer_id": 7, "type": "view"}"#,
                "customer_id_not_string",
                "customer_id is not a string",
            ),
            (br#"{"customer_id": "c"}"#, "type_missing", "missing type"),
            (br#"{"customer_id": "c", "type": ""}"#, "type_empty", "empty type"),
            (
                br#"{"customer_id": "c", "type": 1}"#,
                "type_not_string",
                "type is not a string",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "ts": true}"#,
                "ts_unparsable",
                "ts unparsable",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "ts": "yesterday"}"#,
                "ts_unparsable",
                "ts unparsable",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "ts": 915148800000}"#,
                "ts_too_old",
                "ts before 2000-01-01",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "ts": 32503680000000}"#,
                "ts_in_future",
                "ts too far in the future",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "event_id": 5}"#,
                "event_id_not_string",
                "event_id is not a string",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "props": [1]}"#,
                "props_not_object",
                "props is not an object",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "profile": 1}"#,
                "profile_not_object",
                "profile is not an object",
            ),
            (
                long_id.as_bytes(),
                "too_long",
                "customer_id longer than 256 characters",
            ),
            (
                long_type.as_bytes(),
                "too_long",
                "type longer than 128 characters",
            ),
            (
                long_value.as_bytes(),
                "too_long",
                "props.note longer than 8192 characters",
            ),
            (
                long_name.as_bytes(),
                "too_long",
                "the name of profile.nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn… longer than 128 characters",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "props": {"a": {"b": 1e300}}}"#,
                "number_not_exact",
                "props.a.b: the number out of the decimal range (magnitude at most 79228162514264337593543950335)",
            ),
            (
                br#"{"customer_id": "c", "type": "v", "profile": {"ltv": 9.2345678901234567890123456789}}"#,
                "number_not_exact",
                "profile.ltv: the number has more digits than a decimal keeps (28 significant) and would be rounded",
            ),
            (
                br#"{"type": "v", "ids": ["13800000001"]}"#,
                "ids_invalid",
                "ids is not valid: ids is an object of identifier type to a string or an array of strings",
            ),
            (
                br#"{"type": "v", "ids": {"phone": [true]}}"#,
                "ids_invalid",
                "ids.phone is not valid: ids is an object of identifier type to a string or an array of strings",
            ),
            (br#"{"type": "v", "ids": {}}"#, "customer_id_missing", "missing customer_id"),
            (deep.as_bytes(), "too_deep", "nested deeper than 16 levels"),
            (big.as_bytes(), "too_large", "event larger than 65536 bytes"),
        ];
        for (input, code, message) in cases {
            let shown = String::from_utf8_lossy(&input[..input.len().min(60)]).into_owned();
            assert_eq!(rejected(input), (code, message.to_owned()), "{shown}");
            assert!(Rejection::CODES.contains(&code));
        }
        let (code, message) = rejected(br#"{"a": NaN}"#);
        assert_eq!(code, "invalid_json");
        assert!(message.starts_with("invalid JSON: "), "{message}");
    }

    #[test]
    fn codes_are_distinct() {
        let mut codes = Rejection::CODES.to_vec();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Rejection::CODES.len());
    }

    /// An event whose props hold `levels` nested lists: 2 + `levels` levels deep.
    fn list_in_props(levels: usize) -> String {
        format!(
            r#"{{"customer_id": "c", "type": "v", "props": {{"a": {}1{}}}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    }

    #[test]
    fn sixteen_levels_are_accepted() {
        assert!(parse(&list_in_props(14)).is_ok());
    }

    #[test]
    fn profile_null_deletes() {
        let e =
            parse(r#"{"customer_id": "c", "type": "v", "profile": {"city": "杭州", "vip": null}}"#).unwrap();
        assert_eq!(e.profile.len(), 2);
        assert!(e.profile.iter().any(|(k, v)| &**k == "vip" && v.is_none()));
    }

    /// Ids, types, names and strings at their limits are accepted; numbers keep every
    /// digit they were sent with.
    #[test]
    fn limits_are_inclusive_and_numbers_exact() {
        let at_limit = format!(
            r#"{{"customer_id": "{}", "type": "{}", "props": {{"note": "{}", "amount": 1234567890123456789.12345}}}}"#,
            "７".repeat(256),
            "看".repeat(128),
            "x".repeat(8192)
        );
        let e = parse(&at_limit).unwrap();
        assert_eq!(e.customer_id.chars().count(), 256);
        assert_eq!(e.props.get("amount").to_string(), "1234567890123456789.12345");
    }

    #[test]
    fn the_last_of_duplicate_fields_counts_and_unknown_fields_are_named_by_name() {
        let mut violations = Vec::new();
        let e = parse_event_planned(
            br#"{"zz": 1, "type": "a", "customer_id": "c", "type": "b", "Type": 2, "zz": 3}"#,
            &EventLimits::default(),
            None,
            NOW,
            &mut violations,
        )
        .unwrap();
        assert_eq!(&*e.event_type, "b");
        let named: Vec<_> = violations.iter().filter_map(|v| v.field.as_deref()).collect();
        assert_eq!(named, ["Type", "zz"]);
    }

    /// Nesting far past the limit (and past serde_json's recursion limit) is "too deep",
    /// whatever the top level is.
    #[test]
    fn very_deep_nesting_is_too_deep_not_invalid() {
        assert_eq!(parse(&list_in_props(500)).unwrap_err().code(), "too_deep");
        let deep_array = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(parse(&deep_array).unwrap_err().code(), "too_deep");
        assert_eq!(parse("[[1]]").unwrap_err().code(), "not_object");
        assert_eq!(parse(r#"{"a": [1,}"#).unwrap_err().code(), "invalid_json");
        assert_eq!(
            parse(r#"{"customer_id": "c", "type": "v"} x"#)
                .unwrap_err()
                .code(),
            "invalid_json"
        );
    }

    /// The first pass over the text does not decode `\u` escapes: a lone surrogate
    /// anywhere — a field, a nested name, a member the event does not know — is invalid
    /// JSON, never a panic; a pair is the character it encodes.
    #[test]
    fn lone_surrogates_are_invalid_json_wherever_they_are() {
        for text in [
            r#"{"customer_id": "\ud800", "type": "v"}"#,
            r#"{"customer_id": "c", "type": "v\uDC00"}"#,
            r#"{"customer_id": "c", "type": "v", "event_id": "\ud800x"}"#,
            r#"{"customer_id": "c", "type": "v", "ts": "\ud800"}"#,
            r#"{"customer_id": "c", "type": "v", "props": {"a": {"\ud800": 1}}}"#,
            r#"{"customer_id": "c", "type": "v", "props": {"a": ["\udbff"]}}"#,
            r#"{"customer_id": "c", "type": "v", "profile": {"city": "\ud800"}}"#,
            r#"{"customer_id": "c", "type": "v", "ids": {"phone": "\ud800"}}"#,
            r#"{"customer_id": "c", "type": "v", "extra": "\ud800"}"#,
            r#"{"type": "\ud800"}"#,
            r#""\ud800""#,
        ] {
            let (code, message) = rejected(text.as_bytes());
            assert_eq!(code, "invalid_json", "{text}: {message}");
            assert!(message.contains("escape"), "{text}: {message}");
        }
        let e = parse(r#"{"customer_id": "c\ud83d\ude00", "type": "v", "props": {"e": "\ud83d\ude00"}}"#)
            .unwrap();
        assert_eq!(&*e.customer_id, "c\u{1f600}");
        assert!(e.props.get("e").rule_eq(&Value::str("\u{1f600}")));
        // Deeper than the limit, a surrogate in a value is never decoded: the depth is what
        // is reported. One in a top-level name is decoded (and refused) by the first pass.
        for (head, code) in [
            (r#""customer_id": "\ud800""#, "too_deep"),
            (r#""\ud800": 1, "customer_id": "c""#, "invalid_json"),
        ] {
            let deep = format!(
                r#"{{{head}, "type": "v", "props": {{"a": {}1{}}}}}"#,
                "[".repeat(40),
                "]".repeat(40)
            );
            assert_eq!(rejected(deep.as_bytes()).0, code, "{deep}");
        }
        // An escaped backslash before `u` is no escape at all.
        let e = parse(r#"{"customer_id": "c", "type": "v", "props": {"p": "\\ud800"}}"#).unwrap();
        assert!(e.props.get("p").rule_eq(&Value::str(r"\ud800")));
    }

    #[test]
    fn ts_is_read_from_its_text() {
        let ts = |t: &str| parse(&format!(r#"{{"customer_id": "c", "type": "v", "ts": {t}}}"#)).map(|e| e.ts);
        assert_eq!(ts("1744000000000"), Ok(Some(1_744_000_000_000)));
        assert_eq!(ts("1744000000000.0"), Ok(Some(1_744_000_000_000)));
        assert_eq!(ts("1.744e12"), Ok(Some(1_744_000_000_000)));
        assert_eq!(ts("null"), Ok(None));
        assert_eq!(
            ts(r#"" 2025-03-01T12:45:41.139+08:00 ""#),
            Ok(Some(1_740_804_341_139))
        );
        assert_eq!(ts("1744000000000.5").unwrap_err().code(), "ts_unparsable");
        assert_eq!(ts("true").unwrap_err().code(), "ts_unparsable");
        assert_eq!(ts(r#""yesterday""#).unwrap_err().code(), "ts_unparsable");
    }

    /// JSON text of a value: scalars written every way JSON allows, names with escapes and
    /// duplicates, lists and nested objects.
    fn json_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let scalar = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            prop::sample::select(vec![
                "0",
                "-0",
                "12.50",
                "1.5e3",
                "2E-4",
                "-7.25E+2",
                "1e300",
                "1e-300",
                "0.000",
                "123456789012345678901234567890.5",
                "79228162514264337593543950335",
            ])
            .prop_map(str::to_owned),
            prop::sample::select(vec![
                r#""a""#,
                r#""tab\there""#,
                r#""\u00e9x""#,
                r#""\ud83d\ude00""#,
                r#""\"q\"""#,
                r#""日本""#,
                r#""""#,
            ])
            .prop_map(str::to_owned),
        ];
        scalar.prop_recursive(4, 24, 4, |inner| {
            let name = prop::sample::select(vec![
                r#""a""#,
                r#""b""#,
                r#""a.b""#,
                r#""é""#,
                r#""x\u0041""#,
                r#""xA""#,
            ]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                prop::collection::vec((name, inner), 0..5).prop_map(|members| {
                    let members: Vec<String> =
                        members.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!("{{{}}}", members.join(", "))
                }),
            ]
        })
    }

    proptest::proptest! {
        /// Props read in one pass are exactly what reading through a `serde_json::Value`
        /// tree gives (`Props::try_from_json`), and so is a number that cannot be held.
        #[test]
        fn props_read_in_one_pass_match_the_tree_reading(value in json_value()) {
            let text = format!(r#"{{"customer_id": "c", "type": "v", "props": {value}}}"#);
            let ours = parse(&text);
            let tree: serde_json::Value = serde_json::from_str(&value).unwrap();
            match tree.as_object() {
                None if tree.is_null() => proptest::prop_assert_eq!(ours.map(|e| e.props), Ok(Props::default())),
                None => proptest::prop_assert_eq!(ours.map(|e| e.props), Err(Rejection::PropsNotObject)),
                Some(object) => {
                    let expected = Props::try_from_json(object).map_err(|(path, error)| {
                        Rejection::NumberNotExact { field: format!("props.{path}"), error }
                    });
                    proptest::prop_assert_eq!(ours.map(|e| e.props), expected);
                }
            }
        }
    }
}
