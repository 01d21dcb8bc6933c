//! The event as rules see it: a type, an event time, an arrival number (for ties) and
//! properties flattened to dotted paths (`{"device": {"os": "iOS"}}` → `device.os`).

use std::sync::Arc;

use crate::value::{NumberError, Value};

/// One accepted event, as aggregates and filters read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_type: Arc<str>,
    /// Event time, ms since the Unix epoch.
    pub ts: i64,
    /// Arrival order: breaks ties between events with the same `ts` (`last`, `first`).
    pub arrival: u64,
    pub props: Props,
}

/// One profile update of an event: the attribute and its new value (`None` deletes it).
pub type ProfileUpdate = (Arc<str>, Option<Value>);

/// Event properties, flattened and sorted by path for binary search.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Props(Vec<(Box<str>, Value)>);

impl Props {
    pub fn new(mut pairs: Vec<(Box<str>, Value)>) -> Props {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|a, b| a.0 == b.0);
        Props(pairs)
    }

    /// Flattens a JSON object known to be valid; nested objects become dotted paths.
    pub fn from_json(object: &serde_json::Map<String, serde_json::Value>) -> Props {
        let mut pairs = Vec::with_capacity(object.len());
        let lossless = flatten(object, &mut String::new(), &mut pairs, &mut |v| {
            Ok(Value::from_json(v))
        });
        debug_assert!(lossless.is_ok(), "this conversion cannot fail");
        Props::new(pairs)
    }

    /// Flattens a JSON object, or names the dotted path of a number that cannot be held
    /// exactly.
    pub fn try_from_json(
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Props, (String, NumberError)> {
        let mut pairs = Vec::with_capacity(object.len());
        flatten(object, &mut String::new(), &mut pairs, &mut Value::try_from_json)?;
        Ok(Props::new(pairs))
    }

    /// The value at a dotted path; null when absent.
    pub fn get(&self, path: &str) -> Value {
        match self.0.binary_search_by(|(k, _)| (**k).cmp(path)) {
            Ok(i) => self.0[i].1.clone(),
            Err(_) => Value::Null,
        }
    }

    /// Keeps the properties `keep` says yes to (a tracking plan's `strip`).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &Value) -> bool) {
        self.0.retain(|(k, v)| keep(k, v));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> + Clone {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn flatten(
    object: &serde_json::Map<String, serde_json::Value>,
    prefix: &mut String,
    out: &mut Vec<(Box<str>, Value)>,
    convert: &mut impl FnMut(&serde_json::Value) -> Result<Value, NumberError>,
) -> Result<(), (String, NumberError)> {
    for (key, value) in object {
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(key);
        match value {
            serde_json::Value::Object(inner) => flatten(inner, prefix, out, convert)?,
            other => {
                let value = convert(other).map_err(|e| (prefix.clone(), e))?;
                out.push((prefix.as_str().into(), value));
            }
        }
        prefix.truncate(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_props_are_read_by_dotted_path() {
        let json: serde_json::Value =
            serde_json::from_str(r#"{"device": {"os": "iOS", "model": "iPhone14"}, "app_version": "5.2.1"}"#)
                .unwrap();
        let props = Props::from_json(json.as_object().unwrap());
        assert!(props.get("device.os").rule_eq(&Value::str("iOS")));
        assert!(props.get("device").is_null());
        assert!(props.get("missing").is_null());
        assert_eq!(props.len(), 3);
    }
}
