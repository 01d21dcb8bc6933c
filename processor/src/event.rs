//! Parsing, validation and normalisation of incoming events (contract section 1).
//!
//! Every rejection has its own reason; the reasons are stable strings that users filter
//! dead letters by.

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

/// Why an event was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn reject<T>(reason: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection(reason.into()))
}

/// Parses and validates one event's JSON bytes. `latest_known_ms` is the later of the wall
/// clock and the engine clock, for the future-tolerance check.
pub fn parse_event(raw: &[u8], limits: &EventLimits, latest_known_ms: i64) -> Result<ValidEvent, Rejection> {
    if raw.len() > limits.max_event_bytes {
        return reject(format!("event larger than {} bytes", limits.max_event_bytes));
    }
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(_) => return reject("not valid UTF-8"),
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return reject(format!("invalid JSON: {e}")),
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
        return reject(format!("nested deeper than {} levels", limits.max_depth));
    }
    let serde_json::Value::Object(mut object) = value else {
        return reject("not a JSON object");
    };
    let customer_id = match object.remove("customer_id") {
        None | Some(serde_json::Value::Null) => return reject("missing customer_id"),
        Some(serde_json::Value::String(s)) => {
            let id = normalize(&s);
            if id.is_empty() {
                return reject("empty customer_id");
            }
            Arc::<str>::from(id.as_ref())
        }
        Some(_) => return reject("customer_id is not a string"),
    };
    let event_type = match object.remove("type") {
        None | Some(serde_json::Value::Null) => return reject("missing type"),
        Some(serde_json::Value::String(s)) => {
            let t = normalize(&s);
            if t.is_empty() {
                return reject("empty type");
            }
            Arc::<str>::from(t.as_ref())
        }
        Some(_) => return reject("type is not a string"),
    };
    let ts = match object.remove("ts") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let ts = parse_ts(&v).ok_or_else(|| Rejection("ts unparsable".into()))?;
            if ts < MIN_TS {
                return reject("ts before 2000-01-01");
            }
            check_not_future(ts, limits, latest_known_ms)?;
            Some(ts)
        }
    };
    let event_id = match object.remove("event_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return reject("event_id is not a string"),
    };
    let props = match object.remove("props") {
        None | Some(serde_json::Value::Null) => Props::default(),
        Some(serde_json::Value::Object(p)) => Props::from_json(&p),
        Some(_) => return reject("props is not an object"),
    };
    let profile = match object.remove("profile") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Object(p)) => profile_updates(p),
        Some(_) => return reject("profile is not an object"),
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
        return reject("ts too far in the future");
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

    fn reason(text: &str) -> String {
        parse(text).expect_err("should be rejected").0
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
    fn every_rejection_class_has_its_reason() {
        assert_eq!(
            parse_event(b"\xff\xfe", &EventLimits::default(), NOW)
                .unwrap_err()
                .0,
            "not valid UTF-8"
        );
        assert!(reason(r#"{"a": NaN}"#).starts_with("invalid JSON: "));
        assert_eq!(reason("42"), "not a JSON object");
        assert_eq!(reason(r#"{"type": "view"}"#), "missing customer_id");
        assert_eq!(
            reason(r#"{"customer_id": null, "type": "view"}"#),
            "missing customer_id"
        );
        assert_eq!(
            reason(r#"{"customer_id": "\u200b ", "type": "view"}"#),
            "empty customer_id"
        );
        assert_eq!(
            reason(r#"{"customer_id": 7, "type": "view"}"#),
            "customer_id is not a string"
        );
        assert_eq!(reason(r#"{"customer_id": "c"}"#), "missing type");
        assert_eq!(reason(r#"{"customer_id": "c", "type": ""}"#), "empty type");
        assert_eq!(
            reason(r#"{"customer_id": "c", "type": "v", "ts": true}"#),
            "ts unparsable"
        );
        assert_eq!(
            reason(r#"{"customer_id": "c", "type": "v", "ts": "yesterday"}"#),
            "ts unparsable"
        );
        assert_eq!(
            reason(r#"{"customer_id": "c", "type": "v", "ts": 915148800000}"#),
            "ts before 2000-01-01"
        );
        assert_eq!(
            reason(r#"{"customer_id": "c", "type": "v", "ts": 32503680000000}"#),
            "ts too far in the future"
        );
        assert_eq!(
            reason(r#"{"customer_id": "c", "type": "v", "props": [1]}"#),
            "props is not an object"
        );
        let deep = format!(
            r#"{{"customer_id": "c", "type": "v", "props": {}1{}}}"#,
            "[".repeat(16),
            "]".repeat(16)
        );
        assert_eq!(reason(&deep), "nested deeper than 16 levels");
        let big = format!(
            r#"{{"customer_id": "c", "type": "v", "props": {{"blob": "{}"}}}}"#,
            "x".repeat(70_000)
        );
        assert_eq!(reason(&big), "event larger than 65536 bytes");
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
