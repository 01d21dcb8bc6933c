//! Parsing, validation and normalisation of incoming events (contract section 1).
//!
//! Every rejection is a [`Rejection`]: a stable code that dead letters, the Kafka header and
//! the metric label carry, and a message for people.

use std::sync::Arc;

use rules::{normalize, Props, Value};
use serde_json::Map;

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
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_event_bytes: 64 * 1024,
            max_depth: 16,
            future_tolerance_ms: 5 * 60_000,
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
}

impl Rejection {
    /// Every code, for documentation and for tests that check it.
    pub const CODES: [&'static str; 18] = [
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
        }
    }
}

/// Parses and validates one event's JSON bytes. `latest_known_ms` is the later of the wall
/// clock and the engine clock, for the future-tolerance check.
pub fn parse_event(raw: &[u8], limits: &EventLimits, latest_known_ms: i64) -> Result<ValidEvent, Rejection> {
    if raw.len() > limits.max_event_bytes {
        return Err(Rejection::TooLarge {
            limit: limits.max_event_bytes,
        });
    }
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(_) => return Err(Rejection::NotUtf8),
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Err(Rejection::InvalidJson(e.to_string())),
    };
    validate_value(value, limits, latest_known_ms)
}

/// Validates an already parsed JSON value (an element of a JSON array body).
pub fn validate_value(
    value: serde_json::Value,
    limits: &EventLimits,
    latest_known_ms: i64,
) -> Result<ValidEvent, Rejection> {
    if depth(&value) > limits.max_depth {
        return Err(Rejection::TooDeep {
            limit: limits.max_depth,
        });
    }
    let serde_json::Value::Object(mut object) = value else {
        return Err(Rejection::NotObject);
    };
    let customer_id = match object.remove("customer_id") {
        None | Some(serde_json::Value::Null) => return Err(Rejection::CustomerIdMissing),
        Some(serde_json::Value::String(s)) => {
            let id = normalize(&s);
            if id.is_empty() {
                return Err(Rejection::CustomerIdEmpty);
            }
            Arc::<str>::from(id.as_ref())
        }
        Some(_) => return Err(Rejection::CustomerIdNotString),
    };
    let event_type = match object.remove("type") {
        None | Some(serde_json::Value::Null) => return Err(Rejection::TypeMissing),
        Some(serde_json::Value::String(s)) => {
            let t = normalize(&s);
            if t.is_empty() {
                return Err(Rejection::TypeEmpty);
            }
            Arc::<str>::from(t.as_ref())
        }
        Some(_) => return Err(Rejection::TypeNotString),
    };
    let ts = match object.remove("ts") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let ts = parse_ts(&v).ok_or(Rejection::TsUnparsable)?;
            if ts < MIN_TS {
                return Err(Rejection::TsTooOld);
            }
            check_not_future(ts, limits, latest_known_ms)?;
            Some(ts)
        }
    };
    let event_id = match object.remove("event_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return Err(Rejection::EventIdNotString),
    };
    let props = match object.remove("props") {
        None | Some(serde_json::Value::Null) => Props::default(),
        Some(serde_json::Value::Object(p)) => Props::from_json(&p),
        Some(_) => return Err(Rejection::PropsNotObject),
    };
    let profile = match object.remove("profile") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Object(p)) => profile_updates(p),
        Some(_) => return Err(Rejection::ProfileNotObject),
    };
    Ok(ValidEvent {
        event_id,
        customer_id,
        event_type,
        ts,
        props,
        profile,
    })
}

/// Rejects a `ts` further ahead of `latest_known_ms` than the tolerance. Parsing on another
/// thread passes `i64::MAX` to [`parse_event`] and the engine checks this against its clock.
pub fn check_not_future(ts: i64, limits: &EventLimits, latest_known_ms: i64) -> Result<(), Rejection> {
    if ts > latest_known_ms.saturating_add(limits.future_tolerance_ms) {
        return Err(Rejection::TsInFuture);
    }
    Ok(())
}

fn profile_updates(object: Map<String, serde_json::Value>) -> Vec<(Arc<str>, Option<Value>)> {
    object
        .into_iter()
        .map(|(k, v)| {
            let value = (!v.is_null()).then(|| Value::from_json(&v));
            (Arc::from(k.as_str()), value)
        })
        .collect()
}

/// Nesting depth: a scalar is 0, an object or array is one more than its deepest member.
fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// `ts` as integer milliseconds, or an RFC 3339 string with an offset.
pub fn parse_ts(value: &serde_json::Value) -> Option<i64> {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                return Some(i);
            }
            let f = n.as_f64()?;
            (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
        }
        serde_json::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s.trim())
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

    #[test]
    fn sixteen_levels_are_accepted() {
        let ok = format!(
            r#"{{"customer_id": "c", "type": "v", "props": {{"a": {}1{}}}}}"#,
            "[".repeat(14),
            "]".repeat(14)
        );
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn profile_null_deletes() {
        let e =
            parse(r#"{"customer_id": "c", "type": "v", "profile": {"city": "杭州", "vip": null}}"#).unwrap();
        assert_eq!(e.profile.len(), 2);
        assert!(e.profile.iter().any(|(k, v)| &**k == "vip" && v.is_none()));
    }
}
