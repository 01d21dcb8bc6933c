//! Runtime values of the rule language and their semantics: the null rules, comparisons
//! of normalised strings, exact decimal arithmetic and the JSON mapping.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use rust_decimal::prelude::*;
use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;

use crate::normalize::normalize;

/// A value computed by a rule or read from an event or profile.
///
/// Numbers are exact decimals ([`Decimal`], 28 significant digits), so sums of money never
/// drift; durations are whole milliseconds. `PartialEq` is structural identity (for
/// tests and change detection); the language's `==` is [`Value::rule_eq`].
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Num(Decimal),
    Str(Arc<str>),
    Dur(i64),
    List(Arc<[Value]>),
}

/// The static type of an expression, as far as the checker can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Type {
    Bool,
    Num,
    Str,
    Dur,
    List,
    Null,
    /// Not known before run time: profile attributes, event properties, `last`/`first`.
    Any,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Bool => "bool",
            Type::Num => "number",
            Type::Str => "string",
            Type::Dur => "duration",
            Type::List => "list",
            Type::Null => "null",
            Type::Any => "any",
        })
    }
}

impl Value {
    pub fn str(s: &str) -> Value {
        Value::Str(Arc::from(s))
    }

    pub fn num(n: i64) -> Value {
        Value::Num(Decimal::from(n))
    }

    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn type_of(&self) -> Type {
        match self {
            Value::Null => Type::Null,
            Value::Bool(_) => Type::Bool,
            Value::Num(_) => Type::Num,
            Value::Str(_) => Type::Str,
            Value::Dur(_) => Type::Dur,
            Value::List(_) => Type::List,
        }
    }

    pub fn as_num(&self) -> Option<Decimal> {
        match self {
            Value::Num(n) => Some(*n),
            _ => None,
        }
    }

    /// `==` of the rule language: null equals nothing, values of different types are
    /// unequal, strings compare after normalisation.
    pub fn rule_eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Null, _) | (_, Value::Null) => false,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Num(a), Value::Num(b)) => a == b,
            (Value::Dur(a), Value::Dur(b)) => a == b,
            (Value::Str(a), Value::Str(b)) => a == b || normalize(a) == normalize(b),
            (Value::List(a), Value::List(b)) => {
                a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x.rule_eq(y))
            }
            _ => false,
        }
    }

    /// `!=`: false when either side is null, true for different types.
    pub fn rule_ne(&self, other: &Value) -> bool {
        if self.is_null() || other.is_null() {
            return false;
        }
        !self.rule_eq(other)
    }

    /// Ordering for `< <= > >=`: only numbers, durations and strings of the same type order.
    pub fn rule_cmp(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Num(a), Value::Num(b)) => Some(a.cmp(b)),
            (Value::Dur(a), Value::Dur(b)) => Some(a.cmp(b)),
            (Value::Str(a), Value::Str(b)) => Some(normalize(a).cmp(&normalize(b))),
            _ => None,
        }
    }

    /// A key that is equal for values `distinct` counts once (strings normalised).
    pub fn distinct_key(&self) -> Option<DistinctKey> {
        match self {
            Value::Null => None,
            Value::Bool(b) => Some(DistinctKey::Bool(*b)),
            Value::Num(n) => Some(DistinctKey::Num(n.normalize())),
            Value::Dur(d) => Some(DistinctKey::Dur(*d)),
            Value::Str(s) => Some(DistinctKey::Str(normalize(s).into_owned())),
            Value::List(_) => Some(DistinctKey::Str(self.to_string())),
        }
    }

    /// Converts a JSON value, or says why a number in it cannot be held exactly. Objects
    /// are not values of the language and become null (their leaves are reachable through
    /// dotted paths instead).
    pub fn try_from_json(v: &serde_json::Value) -> Result<Value, NumberError> {
        Ok(match v {
            serde_json::Value::Number(n) => Value::Num(number_from_json(n)?),
            serde_json::Value::Array(items) => {
                Value::List(items.iter().map(Value::try_from_json).collect::<Result<_, _>>()?)
            }
            other => Value::from_json(other),
        })
    }

    /// Converts a JSON value known to be valid (see [`Value::try_from_json`]); a number
    /// that cannot be held exactly becomes null.
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null | serde_json::Value::Object(_) => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => number_from_json(n).map_or(Value::Null, Value::Num),
            serde_json::Value::String(s) => Value::str(s),
            serde_json::Value::Array(items) => Value::List(items.iter().map(Value::from_json).collect()),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Equality key used by `distinct`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DistinctKey {
    Bool(bool),
    Num(Decimal),
    Dur(i64),
    Str(String),
}

/// Why a JSON number is not a value of the language: it cannot be held exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberError {
    /// Larger in magnitude than a decimal holds (about 7.9 × 10²⁸).
    OutOfRange,
    /// More significant digits (or a smaller fraction) than the 28 a decimal keeps: it
    /// would have to be rounded.
    TooPrecise,
}

impl fmt::Display for NumberError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NumberError::OutOfRange => {
                "out of the decimal range (magnitude at most 79228162514264337593543950335)"
            }
            NumberError::TooPrecise => {
                "has more digits than a decimal keeps (28 significant) and would be rounded"
            }
        })
    }
}

/// Exact decimal from a JSON number, from its text as sent: `1234567890123456789.12345`
/// stays exactly that, `330.12` is exactly 330.12. A number that cannot be held exactly
/// (`1e300`, 29 significant digits) is an error, never a rounded value.
pub fn number_from_json(n: &serde_json::Number) -> Result<Decimal, NumberError> {
    parse_exact_decimal(n.as_str())
}

/// Parses a JSON number's text (`-12.5`, `1.5e3`, `2E-4`) into the decimal it denotes, or
/// says why it cannot be held exactly.
pub fn parse_exact_decimal(text: &str) -> Result<Decimal, NumberError> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (
            &text[..i],
            text[i + 1..]
                .parse::<i64>()
                .map_err(|_| NumberError::OutOfRange)?,
        ),
        None => (text, 0),
    };
    let base = Decimal::from_str_exact(mantissa).map_err(|_| {
        // Too large, or too many digits to keep: it is the integer part that decides.
        let integer = mantissa.trim_start_matches('-').split('.').next().unwrap_or("");
        let integer = integer.trim_start_matches('0');
        let max = "79228162514264337593543950335";
        if integer.len() > max.len() || (integer.len() == max.len() && integer > max) {
            NumberError::OutOfRange
        } else {
            NumberError::TooPrecise
        }
    })?;
    if exponent == 0 || base.is_zero() {
        return Ok(if exponent == 0 { base } else { Decimal::ZERO });
    }
    let base = base.normalize();
    let scale = i64::from(base.scale()) - exponent;
    if scale >= 0 {
        if scale > i64::from(Decimal::MAX_SCALE) {
            return Err(NumberError::TooPrecise);
        }
        let mut out = base;
        out.set_scale(scale as u32).map_err(|_| NumberError::TooPrecise)?;
        return Ok(out);
    }
    // A positive exponent beyond the fraction: multiply by the power of ten left.
    let mut out = base;
    out.set_scale(0).map_err(|_| NumberError::OutOfRange)?;
    let mut left = -scale;
    while left > 0 {
        let step = left.min(18);
        let factor = Decimal::from(10i64.pow(step as u32));
        out = out.checked_mul(factor).ok_or(NumberError::OutOfRange)?;
        left -= step;
    }
    Ok(out)
}

/// `a + b` when the sum is exact; `None` when it overflows or would have to be rounded
/// (more than 28 significant digits), so a sum never drifts silently.
pub fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    let sum = a.checked_add(b)?;
    (sum.scale() >= a.scale().max(b.scale())).then_some(sum)
}

impl fmt::Display for Value {
    /// The rule-language spelling of the value (strings quoted).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Num(n) => write!(f, "{}", n.normalize()),
            Value::Str(s) => write!(f, "{}", crate::ast::quote(s)),
            Value::Dur(ms) => f.write_str(&crate::ast::format_duration(*ms)),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

impl Serialize for Value {
    /// JSON as the contract prints values: exact decimals without float noise, durations
    /// as integer milliseconds.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Num(n) => serialize_decimal(n, serializer),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Dur(ms) => serializer.serialize_i64(*ms),
            Value::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items.iter() {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
        }
    }
}

/// Writes a decimal as a JSON number with exactly its decimal digits.
pub fn serialize_decimal<S: Serializer>(n: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
    let n = n.normalize();
    if n.scale() == 0 {
        if let Some(i) = n.to_i64() {
            return serializer.serialize_i64(i);
        }
    }
    match serde_json::value::RawValue::from_string(n.to_string()) {
        Ok(raw) => raw.serialize(serializer),
        Err(_) => serializer.serialize_f64(n.to_f64().unwrap_or(0.0)),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn null_is_never_equal_nor_unequal() {
        assert!(!Value::Null.rule_eq(&Value::Null));
        assert!(!Value::Null.rule_ne(&Value::num(1)));
        assert!(Value::num(1).rule_ne(&Value::str("1")));
        assert!(!Value::num(1).rule_eq(&Value::str("1")));
    }

    #[test]
    fn strings_compare_normalised() {
        assert!(Value::str("杭州\u{200b}").rule_eq(&Value::str("杭州")));
        assert!(Value::str("１３８").rule_eq(&Value::str("138")));
    }

    #[test]
    fn floats_from_json_are_exact_decimals() {
        let v: serde_json::Value = serde_json::from_str("[0.1, 0.2, 330.12, 7, 1e3]").unwrap();
        let vals: Vec<Decimal> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| Value::from_json(x).as_num().unwrap())
            .collect();
        assert_eq!(vals[0] + vals[1], Decimal::from_str("0.3").unwrap());
        assert_eq!(vals[2].to_string(), "330.12");
        assert_eq!(vals[4], Decimal::from(1000));
    }

    #[test]
    fn json_prints_exact_decimals() {
        let sum = Decimal::from_str("0.1").unwrap() + Decimal::from_str("0.2").unwrap();
        let text = serde_json::to_string(&Value::Num(sum)).unwrap();
        assert_eq!(text, "0.3");
        assert_eq!(serde_json::to_string(&Value::num(2000)).unwrap(), "2000");
        assert_eq!(serde_json::to_string(&Value::Dur(2_700_000)).unwrap(), "2700000");
    }

    fn exact(text: &str) -> Result<String, NumberError> {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let serde_json::Value::Number(n) = v else {
            panic!("{text} is not a number")
        };
        number_from_json(&n).map(|d| serde_json::to_string(&Value::Num(d)).unwrap())
    }

    /// Numbers keep every digit they were sent with, up to 28 significant digits and
    /// the decimal range; beyond that they are an error, never rounded or null.
    #[test]
    fn json_numbers_are_exact_to_28_digits_or_refused() {
        assert_eq!(
            exact("1234567890123456789.12345").unwrap(),
            "1234567890123456789.12345"
        );
        assert_eq!(exact("9007199254740993").unwrap(), "9007199254740993");
        assert_eq!(exact("18446744073709551616").unwrap(), "18446744073709551616");
        assert_eq!(
            exact("1.234567890123456789012345678").unwrap(),
            "1.234567890123456789012345678"
        );
        assert_eq!(
            exact("0.0000000000000000000000000001").unwrap(),
            "0.0000000000000000000000000001"
        );
        assert_eq!(
            exact("79228162514264337593543950335").unwrap(),
            "79228162514264337593543950335"
        );
        assert_eq!(
            exact("-79228162514264337593543950335").unwrap(),
            "-79228162514264337593543950335"
        );
        assert_eq!(exact("1.5e3").unwrap(), "1500");
        assert_eq!(exact("1.25E+2").unwrap(), "125");
        assert_eq!(exact("25e-3").unwrap(), "0.025");
        assert_eq!(exact("1e28").unwrap(), "10000000000000000000000000000");
        assert_eq!(exact("0e400").unwrap(), "0");
        assert_eq!(exact("-0.0").unwrap(), "0");
        assert_eq!(
            exact("79228162514264337593543950336"),
            Err(NumberError::OutOfRange)
        );
        assert_eq!(exact("1e300"), Err(NumberError::OutOfRange));
        assert_eq!(exact("-1e29"), Err(NumberError::OutOfRange));
        assert_eq!(exact("1e-29"), Err(NumberError::TooPrecise));
        assert_eq!(exact("1e-300"), Err(NumberError::TooPrecise));
        assert_eq!(
            exact("1.2345678901234567890123456789").unwrap(),
            "1.2345678901234567890123456789"
        );
        assert_eq!(
            exact("9.2345678901234567890123456789"),
            Err(NumberError::TooPrecise)
        );
    }

    #[test]
    fn sums_that_would_round_are_refused() {
        let big = Decimal::from_str("10000000000000000000000000000").unwrap();
        let tenth = Decimal::from_str("0.1").unwrap();
        assert_eq!(exact_add(big, tenth), None, "30 significant digits");
        assert_eq!(exact_add(Decimal::MAX, Decimal::ONE), None, "overflow");
        assert_eq!(exact_add(tenth, tenth), Some(Decimal::from_str("0.2").unwrap()));
        assert_eq!(exact_add(big, -big), Some(Decimal::ZERO));
    }
}
