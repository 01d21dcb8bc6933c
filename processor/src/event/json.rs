//! An event's JSON read in one pass, without a `serde_json::Value` tree: an object is read as
//! its members' raw text (borrowed from the input), and each member is decoded only into what
//! the event keeps. Strings without escapes are never copied until the event owns them.
//!
//! serde_json's first pass checks every string's escapes except what `\u` ones encode: the
//! caller rejects text holding a lone surrogate before these readers decode anything
//! (`event::lone_surrogate`), so the decoding here cannot fail on text that passed.
//!
//! What it yields is exactly what reading through `serde_json::Value` yields: members in the
//! order a `serde_json::Map` iterates them (by name, the last of duplicate names kept), and
//! numbers read from their text as written (the workspace builds serde_json with
//! `arbitrary_precision`).

use std::borrow::Cow;
use std::fmt;

use rules::{parse_exact_decimal, NumberError, Value};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON string, decoded; borrowed from the input when it holds no escapes.
pub(super) struct Text<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// A JSON object's members, by name, the last of duplicate names kept.
pub(super) struct Members<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members<'de>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Text(name), value)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    members.push((name, value));
                }
                // Stable: of equal names the later one ends last, and is the one kept.
                members.sort_by(|a: &(Cow<str>, _), b| a.0.cmp(&b.0));
                members.dedup_by(|later, kept| {
                    let same = later.0 == kept.0;
                    if same {
                        std::mem::swap(later, kept);
                    }
                    same
                });
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// What a raw JSON value is, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

pub(super) fn kind(raw: &RawValue) -> Kind {
    match raw.get().as_bytes().first() {
        Some(b'n') => Kind::Null,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'"') => Kind::String,
        Some(b'[') => Kind::Array,
        Some(b'{') => Kind::Object,
        _ => Kind::Number,
    }
}

/// The members of a raw value that is an object (callers check [`kind`] first).
pub(super) fn members(raw: &RawValue) -> Members<'_> {
    serde_json::from_str(raw.get()).expect("an object the parser has already read")
}

/// The text of a raw value that is a string (callers check [`kind`] first).
pub(super) fn text(raw: &RawValue) -> Cow<'_, str> {
    serde_json::from_str::<Text>(raw.get())
        .expect("a string the parser has already read")
        .0
}

/// The raw value as a `serde_json::Value`, for the members read rarely (`ids`, lists).
pub(super) fn tree(raw: &RawValue) -> serde_json::Value {
    serde_json::from_str(raw.get()).expect("a value the parser has already read")
}

/// A value of the rule language, as `Value::try_from_json` makes it from the same JSON: an
/// object (not flattened here) is null.
pub(super) fn value(raw: &RawValue) -> Result<Value, NumberError> {
    Ok(match kind(raw) {
        Kind::Null | Kind::Object => Value::Null,
        Kind::Bool => Value::Bool(raw.get() == "true"),
        Kind::Number => Value::Num(parse_exact_decimal(raw.get())?),
        Kind::String => Value::str(&text(raw)),
        Kind::Array => Value::try_from_json(&tree(raw))?,
    })
}

/// Flattens an object's members to dotted paths, as `Props::try_from_json` does: nested
/// objects become `outer.inner`; the first number that cannot be held exactly is named
/// by its path.
pub(super) fn flatten(
    members: Members<'_>,
    prefix: &mut String,
    out: &mut Vec<(Box<str>, Value)>,
) -> Result<(), (String, NumberError)> {
    for (name, raw) in members.0 {
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(&name);
        if kind(raw) == Kind::Object {
            flatten(self::members(raw), prefix, out)?;
        } else {
            let value = value(raw).map_err(|e| (prefix.clone(), e))?;
            out.push((prefix.as_str().into(), value));
        }
        prefix.truncate(len);
    }
    Ok(())
}

/// True when the text holds `\u` followed by a surrogate's first two hex digits (`d8`–`df`):
/// cheap, and never false for text that holds a surrogate escape (an escaped backslash
/// before `u` makes it answer true for text that holds none, which costs only a second read).
pub(super) fn may_hold_surrogate_escape(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find('\\') {
        let i = from + at;
        if let [b'u', b'd' | b'D', b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F', ..] = bytes[i + 1..] {
            return true;
        }
        from = i + 1;
    }
    false
}

/// The deepest nesting of objects and arrays in valid JSON text: a scalar is 0.
pub(super) fn depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut bytes = text.as_bytes().iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'"' => {
                // Skip the string: an escape takes the byte after it along.
                while let Some(&c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_depth(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Object(m) => 1 + m.values().map(tree_depth).max().unwrap_or(0),
            serde_json::Value::Array(a) => 1 + a.iter().map(tree_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        for text in [
            "1",
            "\"[{\"",
            "[]",
            "{}",
            r#"{"a": [1, {"b": "]}\"[["}], "c": {"d": {"e": []}}}"#,
            r#"[[["\\"], "\\\""]]"#,
            r#"{"k\"{": "v\\", "l": [[]]}"#,
        ] {
            let tree: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(depth(text), tree_depth(&tree), "{text}");
        }
    }

    #[test]
    fn members_are_by_name_and_the_last_duplicate_wins() {
        let text = r#"{"b": 1, "a": "x\u0041", "b": 2, "c": {"z": 1}, "a": "y"}"#;
        let Members(members) = serde_json::from_str(text).unwrap();
        let seen: Vec<(&str, &str)> = members.iter().map(|(k, v)| (&**k, v.get())).collect();
        assert_eq!(seen, vec![("a", "\"y\""), ("b", "2"), ("c", r#"{"z": 1}"#)]);
        let tree: serde_json::Value = serde_json::from_str(text).unwrap();
        let keys: Vec<&String> = tree.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let plain = serde_json::value::to_raw_value("plain").unwrap();
        assert!(matches!(text(&plain), Cow::Borrowed("plain")));
        let escaped: Box<RawValue> = serde_json::from_str(r#""tab\there\u00e9""#).unwrap();
        assert_eq!(text(&escaped), "tab\there\u{e9}");
    }

    #[test]
    fn values_match_the_tree_conversion() {
        for text in [
            "null",
            "true",
            "false",
            "12",
            "-0.50",
            "1.5e3",
            "2E-4",
            "\"s\"",
            "[1, \"a\", [true, null], {\"x\": 1}]",
            "{\"x\": 1}",
            "1e300",
            "123456789012345678901234567890.5",
        ] {
            let raw: Box<RawValue> = serde_json::from_str(text).unwrap();
            let tree: serde_json::Value = serde_json::from_str(text).unwrap();
            let ours = value(&raw);
            let theirs = Value::try_from_json(&tree);
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{text}"),
                (Err(a), Err(b)) => assert_eq!(a, b, "{text}"),
                _ => panic!("{text}: {ours:?} vs {theirs:?}"),
            }
        }
    }
}
