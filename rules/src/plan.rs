//! The tracking plan: which event types a source may send, their properties and types,
//! the profile attributes and identifiers, and what happens to an event that breaks it.
//!
//! A plan is a TOML file beside the rules (see `docs/rules.md`, "Tracking plan"):
//!
//! ```toml
//! [defaults]
//! mode = "block"               # allow | strip | block, for planned types without their own
//! unplanned_events = "block"   # allow | block
//!
//! [events.payment]
//! additional_properties = false
//! properties.amount = { type = "decimal", required = true }
//! properties.currency = { type = "enum", values = ["CNY", "USD"] }
//!
//! [profile.attributes]
//! city = { type = "string", max_length = 64 }
//! ```
//!
//! [`TrackingPlan::check`] judges one event: every [`Violation`] it finds, with a
//! [`ViolationClass`] whose code is stable, and whether the event is kept (its offending
//! fields stripped in `strip` mode) or blocked.

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;
use serde::Deserialize;

use crate::event::{ProfileUpdate, Props};
use crate::normalize::normalize;
use crate::value::Value;

/// What a kind of violation is: a stable code for dead letters, the Kafka header, metric
/// labels and `GET /v1/quality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationClass {
    /// An event type the plan does not list.
    UnplannedEvent,
    /// A required property, attribute or identifier is absent (or null).
    RequiredMissing,
    /// A value of another type than planned.
    DatatypeMismatch,
    /// A property or attribute the plan does not list, where it allows none.
    AdditionalProperties,
    /// A value outside the planned enum.
    Enum,
    /// A string that does not match the planned pattern.
    Pattern,
    /// A string longer than the planned `max_length`.
    TooLong,
    /// An event older than the history retention: it cannot change a window.
    OutOfRetention,
    /// A top-level field other than those of the event format (`profle`).
    UnknownTopLevelField,
}

impl ViolationClass {
    pub const ALL: [ViolationClass; 9] = [
        ViolationClass::UnplannedEvent,
        ViolationClass::RequiredMissing,
        ViolationClass::DatatypeMismatch,
        ViolationClass::AdditionalProperties,
        ViolationClass::Enum,
        ViolationClass::Pattern,
        ViolationClass::TooLong,
        ViolationClass::OutOfRetention,
        ViolationClass::UnknownTopLevelField,
    ];

    pub fn code(self) -> &'static str {
        match self {
            ViolationClass::UnplannedEvent => "unplanned_event",
            ViolationClass::RequiredMissing => "required_missing",
            ViolationClass::DatatypeMismatch => "datatype_mismatch",
            ViolationClass::AdditionalProperties => "additional_properties",
            ViolationClass::Enum => "enum",
            ViolationClass::Pattern => "pattern",
            ViolationClass::TooLong => "too_long",
            ViolationClass::OutOfRetention => "out_of_retention",
            ViolationClass::UnknownTopLevelField => "unknown_top_level_field",
        }
    }

    pub fn from_code(code: &str) -> Option<ViolationClass> {
        ViolationClass::ALL.into_iter().find(|c| c.code() == code)
    }
}

impl fmt::Display for ViolationClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One way an event breaks the plan: its class, the field (`props.amount`,
/// `profile.city`, `customer_id`, the top-level name) and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub class: ViolationClass,
    pub field: Option<String>,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.detail)
    }
}

/// What happens to an event with a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Kept as sent; the violation is counted.
    #[default]
    Allow,
    /// Offending properties and attributes are dropped, the event kept; counted.
    Strip,
    /// The event is rejected into the dead letters with the violation as its reason.
    Block,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Allow => "allow",
            Mode::Strip => "strip",
            Mode::Block => "block",
        }
    }
}

/// The type a field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    /// Any number (kept exactly).
    Decimal,
    /// A number without a fractional part.
    Integer,
    Bool,
    /// Integer ms since the Unix epoch, or an RFC 3339 string with an offset.
    Timestamp,
    /// One of `values`.
    Enum,
    List,
    /// Anything but an object.
    Any,
}

impl FieldType {
    const NAMES: [(&'static str, FieldType); 8] = [
        ("string", FieldType::String),
        ("decimal", FieldType::Decimal),
        ("integer", FieldType::Integer),
        ("bool", FieldType::Bool),
        ("timestamp", FieldType::Timestamp),
        ("enum", FieldType::Enum),
        ("list", FieldType::List),
        ("any", FieldType::Any),
    ];

    pub fn name(self) -> &'static str {
        FieldType::NAMES
            .iter()
            .find(|(_, t)| *t == self)
            .map(|(n, _)| *n)
            .expect("every type is named")
    }

    fn parse(name: &str) -> Option<FieldType> {
        FieldType::NAMES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// The rule language's static type of a value of this field.
    pub fn rule_type(self) -> crate::value::Type {
        use crate::value::Type;
        match self {
            FieldType::String => Type::Str,
            FieldType::Decimal | FieldType::Integer => Type::Num,
            FieldType::Bool => Type::Bool,
            FieldType::List => Type::List,
            FieldType::Timestamp | FieldType::Enum | FieldType::Any => Type::Any,
        }
    }
}

/// What one property, attribute or identifier must be.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    pub kind: FieldType,
    pub required: bool,
    /// The allowed values of an `enum` (strings compare normalised).
    pub values: Vec<Value>,
    pub pattern: Option<Regex>,
    /// Most characters of a string.
    pub max_length: Option<usize>,
    pub description: Option<String>,
}

impl FieldSpec {
    /// The violation `value` makes, if any (`value` is not null), for the field
    /// `{prefix}{path}` (named only when there is one).
    fn judge(&self, prefix: &str, path: &str, value: &Value) -> Option<Violation> {
        let violation = |class, detail: &dyn Fn(&str) -> String| {
            let field = format!("{prefix}{path}");
            Some(Violation {
                class,
                detail: detail(&field),
                field: Some(field),
            })
        };
        let fits = match (self.kind, value) {
            (FieldType::Any, _) => true,
            (FieldType::String, Value::Str(_)) => true,
            (FieldType::Decimal, Value::Num(_)) => true,
            (FieldType::Integer, Value::Num(n)) => n.fract().is_zero(),
            (FieldType::Bool, Value::Bool(_)) => true,
            (FieldType::List, Value::List(_)) => true,
            (FieldType::Timestamp, Value::Num(n)) => n.fract().is_zero(),
            (FieldType::Timestamp, Value::Str(s)) => chrono_like_rfc3339(s),
            (FieldType::Enum, v) if self.values.iter().any(|allowed| allowed.rule_eq(v)) => true,
            (FieldType::Enum, _) => {
                let allowed: Vec<String> = self.values.iter().map(|v| v.to_string()).collect();
                return violation(ViolationClass::Enum, &|field| {
                    format!("{field} is {value}, not one of [{}]", allowed.join(", "))
                });
            }
            _ => false,
        };
        if !fits {
            return violation(ViolationClass::DatatypeMismatch, &|field| {
                format!(
                    "{field} is {}, the plan says {}",
                    describe(value),
                    self.kind.name()
                )
            });
        }
        if let Value::Str(s) = value {
            if let Some(max) = self.max_length {
                // Bytes bound characters from above: most strings are never counted.
                let chars = if s.len() > max { s.chars().count() } else { 0 };
                if chars > max {
                    return violation(ViolationClass::TooLong, &|field| {
                        format!("{field} has {chars} characters, the plan allows {max}")
                    });
                }
            }
            if let Some(pattern) = &self.pattern {
                if !pattern.is_match(&normalize(s)) {
                    return violation(ViolationClass::Pattern, &|field| {
                        format!("{field} {value} does not match /{}/", pattern.as_str())
                    });
                }
            }
        }
        None
    }
}

/// An RFC 3339 date-time with an offset, checked by shape (`2025-03-01T12:45:41.139+08:00`).
fn chrono_like_rfc3339(s: &str) -> bool {
    let b = s.trim().as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't' | b' ')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (b.ends_with(b"Z") || b.ends_with(b"z") || {
            let n = b.len();
            n >= 6 && matches!(b[n - 6], b'+' | b'-') && b[n - 3] == b':'
        })
}

fn describe(value: &Value) -> String {
    let shown = value.to_string();
    let shown: String = if shown.chars().count() > 40 {
        shown.chars().take(40).chain("…".chars()).collect()
    } else {
        shown
    };
    format!("{} {shown}", value.type_of())
}

/// The planned fields of one event type, of the profile or of the identifiers.
#[derive(Debug, Clone)]
pub struct FieldSet {
    pub mode: Mode,
    pub additional_properties: bool,
    pub fields: BTreeMap<String, FieldSpec>,
    pub description: Option<String>,
}

impl FieldSet {
    /// Judges `fields` (path → value; null values are absent) into `out`; returns the paths
    /// to strip (those with a violation, in `strip` mode). Allocates nothing for a field
    /// that fits.
    fn judge<'a>(
        &self,
        prefix: &str,
        fields: impl Iterator<Item = (&'a str, Option<&'a Value>)> + Clone,
        out: &mut Vec<Violation>,
    ) -> Vec<String> {
        let mut strip = Vec::new();
        let mut required_seen = 0;
        for (path, value) in fields.clone() {
            match self.fields.get(path) {
                Some(spec) => {
                    required_seen += usize::from(spec.required);
                    let violation = value
                        .filter(|v| !v.is_null())
                        .and_then(|v| spec.judge(prefix, path, v));
                    if let Some(violation) = violation {
                        out.push(violation);
                        strip.push(path.to_owned());
                    }
                }
                None if self.additional_properties => {}
                None => {
                    out.push(unplanned(prefix, path));
                    strip.push(path.to_owned());
                }
            }
        }
        if required_seen < self.fields.values().filter(|s| s.required).count() {
            for (name, spec) in &self.fields {
                if spec.required && !fields.clone().any(|(path, _)| path == name) {
                    out.push(Violation {
                        class: ViolationClass::RequiredMissing,
                        field: Some(format!("{prefix}{name}")),
                        detail: format!("{prefix}{name} is required"),
                    });
                }
            }
        }
        strip
    }
}

/// A property or attribute the plan does not list, where it allows none.
fn unplanned(prefix: &str, path: &str) -> Violation {
    let field = format!("{prefix}{path}");
    Violation {
        class: ViolationClass::AdditionalProperties,
        detail: format!("{field} is not in the plan"),
        field: Some(field),
    }
}

/// A loaded tracking plan.
#[derive(Debug, Clone)]
pub struct TrackingPlan {
    /// For planned event types without a mode of their own, the profile and identifiers.
    pub mode: Mode,
    pub unplanned_events: Mode,
    pub unknown_top_level: Mode,
    pub out_of_retention: Mode,
    /// By normalised event type.
    pub events: BTreeMap<String, FieldSet>,
    pub profile: Option<FieldSet>,
    pub identifiers: Option<FieldSet>,
}

/// What [`TrackingPlan::check`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the event (stripped where its mode says so).
    Keep,
    /// Reject it: the first violation of a blocking mode.
    Block(Violation),
}

impl TrackingPlan {
    /// Reads a plan from its TOML text; an error names the place and what is wrong.
    pub fn parse(text: &str) -> Result<TrackingPlan, String> {
        let raw: RawPlan = toml::from_str(text).map_err(|e| e.to_string())?;
        raw.compile()
    }

    /// The planned event type, if any.
    pub fn event(&self, event_type: &str) -> Option<&FieldSet> {
        self.events.get(event_type)
    }

    /// Judges one event against the plan: pushes every violation to `out`, strips what a
    /// `strip` mode drops from `props` and `profile`, and says whether it is kept.
    /// `identifiers` are the event's `ids` (type, value); `customer_id` is empty when the
    /// event named the customer only by those.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &self,
        customer_id: &str,
        identifiers: &[(std::sync::Arc<str>, String)],
        event_type: &str,
        props: &mut Props,
        profile: &mut Vec<ProfileUpdate>,
        out: &mut Vec<Violation>,
    ) -> Verdict {
        let mut block: Option<Violation> = None;
        let mut note = |mode: Mode, from: usize, out: &Vec<Violation>| {
            if mode == Mode::Block && block.is_none() {
                block = out.get(from).cloned();
            }
        };
        if let Some(ids) = &self.identifiers {
            let from = out.len();
            let values: Vec<(&str, Value)> = (!customer_id.is_empty())
                .then(|| ("customer_id", Value::str(customer_id)))
                .into_iter()
                .chain(identifiers.iter().map(|(t, v)| (&**t, Value::str(v))))
                .collect();
            ids.judge("", values.iter().map(|(t, v)| (*t, Some(v))), out);
            note(ids.mode, from, out);
        }
        match self.events.get(event_type) {
            None => {
                let from = out.len();
                out.push(Violation {
                    class: ViolationClass::UnplannedEvent,
                    field: None,
                    detail: format!(
                        "event type {event_type:?} is not in the plan{}",
                        self.suggest(event_type)
                    ),
                });
                note(self.unplanned_events, from, out);
            }
            Some(set) => {
                let from = out.len();
                let strip = set.judge("props.", props.iter().map(|(k, v)| (k, Some(v))), out);
                note(set.mode, from, out);
                if set.mode == Mode::Strip && !strip.is_empty() {
                    props.retain(|path, _| !strip.iter().any(|s| s == path));
                }
            }
        }
        if let Some(set) = &self.profile {
            let from = out.len();
            let strip = judge_profile(set, profile, out);
            note(set.mode, from, out);
            if set.mode == Mode::Strip && !strip.is_empty() {
                profile.retain(|(k, _)| !strip.iter().any(|s| **s == **k));
            }
        }
        match block {
            Some(v) => Verdict::Block(v),
            None => Verdict::Keep,
        }
    }

    /// ", did you mean \"view\"?" for the nearest planned type, or nothing.
    fn suggest(&self, event_type: &str) -> String {
        crate::diagnostic::did_you_mean(event_type, self.events.keys().map(String::as_str))
            .map(|s| format!(", did you mean {s:?}?"))
            .unwrap_or_default()
    }
}

/// Profile updates against the profile's plan: a deletion (`null`) of a planned attribute
/// is always fine; attributes are never required on every event.
fn judge_profile(set: &FieldSet, profile: &[ProfileUpdate], out: &mut Vec<Violation>) -> Vec<String> {
    let mut strip = Vec::new();
    for (name, value) in profile {
        let violation = match set.fields.get(&**name) {
            Some(spec) => value
                .as_ref()
                .filter(|v| !v.is_null())
                .and_then(|v| spec.judge("profile.", name, v)),
            None if set.additional_properties => None,
            None => Some(unplanned("profile.", name)),
        };
        if let Some(violation) = violation {
            out.push(violation);
            strip.push(name.to_string());
        }
    }
    strip
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    events: BTreeMap<String, RawSet>,
    profile: Option<RawSet>,
    identifiers: Option<RawSet>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    mode: Option<Mode>,
    unplanned_events: Option<Mode>,
    unknown_top_level: Option<Mode>,
    out_of_retention: Option<Mode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSet {
    mode: Option<Mode>,
    additional_properties: Option<bool>,
    description: Option<String>,
    /// Events name them `properties`, the profile `attributes`, identifiers `ids`.
    #[serde(default, alias = "attributes", alias = "ids")]
    properties: BTreeMap<String, RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    values: Vec<toml::Value>,
    pattern: Option<String>,
    max_length: Option<usize>,
    description: Option<String>,
}

impl RawPlan {
    fn compile(self) -> Result<TrackingPlan, String> {
        let mode = self.defaults.mode.unwrap_or(Mode::Block);
        let gate = |m: Option<Mode>, name: &str, default: Mode| match m.unwrap_or(default) {
            Mode::Strip => Err(format!(
                "defaults.{name}: \"strip\" does not apply to a whole event; use \"allow\" or \"block\""
            )),
            m => Ok(m),
        };
        let mut events = BTreeMap::new();
        for (name, set) in self.events {
            let key = normalize(&name).into_owned();
            if key.is_empty() {
                return Err("events: an empty event type".into());
            }
            let compiled = set.compile(&format!("events.{name}"), mode)?;
            if events.insert(key, compiled).is_some() {
                return Err(format!("events.{name}: planned twice (names compare normalised)"));
            }
        }
        let identifiers = self
            .identifiers
            .map(|s| s.compile("identifiers", mode))
            .transpose()?;
        if let Some(ids) = &identifiers {
            if ids.mode == Mode::Strip {
                return Err(
                    "identifiers.mode: an identifier cannot be stripped; use \"allow\" or \"block\"".into(),
                );
            }
        }
        Ok(TrackingPlan {
            mode,
            unplanned_events: gate(self.defaults.unplanned_events, "unplanned_events", mode)?,
            unknown_top_level: gate(self.defaults.unknown_top_level, "unknown_top_level", Mode::Allow)?,
            out_of_retention: gate(self.defaults.out_of_retention, "out_of_retention", Mode::Allow)?,
            events,
            profile: self.profile.map(|s| s.compile("profile", mode)).transpose()?,
            identifiers,
        })
    }
}

impl RawSet {
    fn compile(self, at: &str, default_mode: Mode) -> Result<FieldSet, String> {
        let mut fields = BTreeMap::new();
        for (name, raw) in self.properties {
            let spec = raw.compile(&format!("{at}.{name}"))?;
            fields.insert(name, spec);
        }
        Ok(FieldSet {
            mode: self.mode.unwrap_or(default_mode),
            additional_properties: self.additional_properties.unwrap_or(true),
            fields,
            description: self.description,
        })
    }
}

impl RawField {
    fn compile(self, at: &str) -> Result<FieldSpec, String> {
        let kind = FieldType::parse(&self.kind).ok_or_else(|| {
            let names: Vec<&str> = FieldType::NAMES.iter().map(|(n, _)| *n).collect();
            format!("{at}: unknown type {:?} (one of {})", self.kind, names.join(", "))
        })?;
        let values = self
            .values
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(Value::str(s)),
                toml::Value::Integer(i) => Ok(Value::num(*i)),
                toml::Value::Float(f) => crate::value::parse_exact_decimal(&f.to_string())
                    .map(Value::Num)
                    .map_err(|e| format!("{at}: the value {f} {e}")),
                toml::Value::Boolean(b) => Ok(Value::Bool(*b)),
                other => Err(format!(
                    "{at}: enum values are strings, numbers or bools, not {}",
                    other.type_str()
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if kind == FieldType::Enum && values.is_empty() {
            return Err(format!("{at}: an enum needs `values = [...]`"));
        }
        if kind != FieldType::Enum && !values.is_empty() {
            return Err(format!("{at}: `values` belong to type = \"enum\""));
        }
        let pattern = self
            .pattern
            .map(|p| Regex::new(&format!("^(?:{p})$")).map_err(|e| format!("{at}: pattern: {e}")))
            .transpose()?;
        if (pattern.is_some() || self.max_length.is_some())
            && !matches!(kind, FieldType::String | FieldType::Any)
        {
            return Err(format!("{at}: `pattern` and `max_length` apply to strings"));
        }
        Ok(FieldSpec {
            kind,
            required: self.required,
            values,
            pattern,
            max_length: self.max_length,
            description: self.description,
        })
    }
}

/// The type name `infer` writes for a value seen.
pub fn inferred_type(value: &Value) -> &'static str {
    match value {
        Value::Str(_) => "string",
        Value::Num(n) if n.fract().is_zero() => "integer",
        Value::Num(_) => "decimal",
        Value::Bool(_) => "bool",
        Value::List(_) => "list",
        Value::Null | Value::Dur(_) => "any",
    }
}

impl FieldSpec {
    /// The planned enum values as decimals/strings, for checking rule literals.
    pub fn allows(&self, value: &Value) -> bool {
        self.kind != FieldType::Enum || self.values.iter().any(|v| v.rule_eq(value))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const PLAN: &str = r#"
[defaults]
mode = "block"

[events.payment]
additional_properties = false
properties.amount = { type = "decimal", required = true }
properties.currency = { type = "enum", values = ["CNY", "USD"] }
properties.order_id = { type = "string", pattern = "o[0-9]+", max_length = 12 }
properties.items = { type = "integer" }
properties.paid_at = { type = "timestamp" }
properties."device.os" = { type = "string" }

[events.view]
mode = "strip"
additional_properties = false
properties.category = { type = "string" }

[profile]
mode = "allow"
additional_properties = false
attributes.city = { type = "string" }
attributes.vip = { type = "bool" }

[identifiers]
ids.customer_id = { type = "string", pattern = "c[0-9]+" }
"#;

    fn check(
        plan: &TrackingPlan,
        id: &str,
        ty: &str,
        props: serde_json::Value,
        profile: serde_json::Value,
    ) -> (Verdict, Vec<Violation>, Props, usize) {
        let mut props = Props::from_json(props.as_object().unwrap());
        let mut profile: Vec<(Arc<str>, Option<Value>)> = profile
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (Arc::from(k.as_str()), (!v.is_null()).then(|| Value::from_json(v))))
            .collect();
        let mut out = Vec::new();
        let verdict = plan.check(id, &[], ty, &mut props, &mut profile, &mut out);
        (verdict, out, props, profile.len())
    }

    #[test]
    fn identifiers_in_ids_are_planned_like_customer_id() {
        let plan = TrackingPlan::parse(
            "[events.view]\n\n[identifiers]\nmode = \"block\"\n\
             ids.customer_id = { type = \"string\", pattern = \"c[0-9]+\" }\n\
             ids.phone = { type = \"string\", pattern = \"1[0-9]{10}\" }\n",
        )
        .unwrap();
        let judge = |id: &str, ids: &[(&str, &str)]| {
            let ids: Vec<(Arc<str>, String)> =
                ids.iter().map(|(t, v)| (Arc::from(*t), v.to_string())).collect();
            let mut out = Vec::new();
            let verdict = plan.check(id, &ids, "view", &mut Props::default(), &mut Vec::new(), &mut out);
            (matches!(verdict, Verdict::Block(_)), out)
        };
        // An event named only by its phone does not break the customer_id pattern.
        assert_eq!(judge("", &[("phone", "13800000001")]).1, []);
        assert!(judge("c1", &[("phone", "13800000001")]).1.is_empty());
        let (blocked, out) = judge("", &[("phone", "13800000001"), ("phone", "555")]);
        assert!(blocked);
        assert_eq!(classes(&out), ["pattern"]);
        assert_eq!(out[0].field.as_deref(), Some("phone"));
    }

    fn classes(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(|v| v.class.code()).collect()
    }

    #[test]
    fn every_class_is_found_with_its_field() {
        let plan = TrackingPlan::parse(PLAN).unwrap();
        let (verdict, v, _, _) = check(
            &plan,
            "c1",
            "payment",
            serde_json::json!({"amount": "12.5"}),
            serde_json::json!({}),
        );
        assert_eq!(classes(&v), ["datatype_mismatch"]);
        assert_eq!(v[0].field.as_deref(), Some("props.amount"));
        assert!(matches!(verdict, Verdict::Block(_)));
        let (_, v, _, _) = check(
            &plan,
            "c1",
            "payment",
            serde_json::json!({"currency": "EUR", "items": 1.5}),
            serde_json::json!({}),
        );
        assert_eq!(classes(&v), ["enum", "datatype_mismatch", "required_missing"]);
        let (_, v, _, _) = check(
            &plan,
            "c1",
            "payment",
            serde_json::json!({"amount": 1, "order_id": "x1"}),
            serde_json::json!({}),
        );
        assert_eq!(classes(&v), ["pattern"]);
        let (_, v, _, _) = check(
            &plan,
            "c1",
            "payment",
            serde_json::json!({"amount": 1, "order_id": "o1234567890123"}),
            serde_json::json!({}),
        );
        assert_eq!(classes(&v), ["too_long"]);
        let (_, v, _, _) = check(
            &plan,
            "c1",
            "payment",
            serde_json::json!({"amount": 1, "coupon": "x", "device": {"os": "iOS"}}),
            serde_json::json!({}),
        );
        assert_eq!(classes(&v), ["additional_properties"]);
        assert_eq!(v[0].field.as_deref(), Some("props.coupon"));
        let (verdict, v, _, _) = check(&plan, "c1", "veiw", serde_json::json!({}), serde_json::json!({}));
        assert_eq!(classes(&v), ["unplanned_event"]);
        assert!(v[0].detail.contains("did you mean \"view\""), "{}", v[0].detail);
        assert!(matches!(verdict, Verdict::Block(_)));
        let (verdict, v, _, _) = check(
            &plan,
            "x9",
            "payment",
            serde_json::json!({"amount": 1, "paid_at": "2025-03-01T12:45:41+08:00"}),
            serde_json::json!({}),
        );
        assert_eq!(classes(&v), ["pattern"]);
        assert_eq!(v[0].field.as_deref(), Some("customer_id"));
        assert!(matches!(verdict, Verdict::Block(_)));
        let (verdict, v, _, _) = check(
            &plan,
            "c1",
            "payment",
            serde_json::json!({"amount": 1, "paid_at": "yesterday"}),
            serde_json::json!({}),
        );
        assert_eq!(classes(&v), ["datatype_mismatch"]);
        assert!(matches!(verdict, Verdict::Block(_)));
    }

    #[test]
    fn modes_keep_strip_or_block() {
        let plan = TrackingPlan::parse(PLAN).unwrap();
        let (verdict, v, props, _) = check(
            &plan,
            "c1",
            "view",
            serde_json::json!({"category": 3, "colour": "red", "page": "p"}),
            serde_json::json!({}),
        );
        assert_eq!(verdict, Verdict::Keep);
        assert_eq!(
            classes(&v),
            [
                "datatype_mismatch",
                "additional_properties",
                "additional_properties"
            ]
        );
        assert!(props.is_empty(), "every offending property stripped");
        let (verdict, v, _, profile) = check(
            &plan,
            "c1",
            "view",
            serde_json::json!({"category": "fish"}),
            serde_json::json!({"vip": "yes", "city": null, "age": 3}),
        );
        assert_eq!(verdict, Verdict::Keep, "profile mode allow");
        assert_eq!(
            classes(&v),
            ["additional_properties", "datatype_mismatch"],
            "age, then vip"
        );
        assert_eq!(profile, 3, "allow keeps what was sent");
        let (verdict, v, _, _) = check(
            &plan,
            "c1",
            "payment",
            serde_json::json!({"amount": 2000}),
            serde_json::json!({"city": "杭州"}),
        );
        assert_eq!((verdict, v.len()), (Verdict::Keep, 0));
    }

    #[test]
    fn plan_errors_name_the_place() {
        let bad = [
            (
                "[events.a]\nproperties.x = { type = \"money\" }",
                "events.a.x: unknown type \"money\"",
            ),
            (
                "[events.a]\nproperties.x = { type = \"enum\" }",
                "events.a.x: an enum needs",
            ),
            (
                "[events.a]\nproperties.x = { type = \"string\", pattern = \"(\" }",
                "events.a.x: pattern",
            ),
            (
                "[events.a]\nproperties.x = { type = \"bool\", max_length = 3 }",
                "apply to strings",
            ),
            (
                "[defaults]\nunplanned_events = \"strip\"",
                "defaults.unplanned_events",
            ),
            ("[events.a]\nmode = \"drop\"", "unknown variant `drop`"),
            ("[evnets.a]", "unknown field `evnets`"),
        ];
        for (text, expected) in bad {
            let err = TrackingPlan::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
