//! Field-level masking: per role, a profile attribute or the customer id is shown, masked
//! (`138****0001`) or hidden. One [`Masking`] is resolved per request from its key's role and
//! applied by every output path: customer views, timelines, explain, segment queries,
//! members and exports in every format, SQL results, the change log and its streams, and
//! webhook deliveries (with the masking of the role that created the webhook).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The field name that stands for the customer id.
pub const CUSTOMER_ID: &str = "customer_id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FieldPolicy {
    #[default]
    Show,
    /// Keeps a few characters at each end: `13800000001` → `138****0001`.
    Mask,
    /// The field is left out (a column is dropped; a customer id becomes `***`).
    Hide,
}

/// Masks `text`: 8 characters or more keep the first 3 and the last 4, 3 to 7 keep the first
/// and the last, shorter ones keep nothing. Characters, not bytes: `张三丰` → `张*丰`.
pub fn mask_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    mask_into(text, &mut out);
    out
}

/// [`mask_text`] appended to `out`: no allocation of its own (exports mask every row), and
/// three copies for an ASCII text (ids and phone numbers are).
pub fn mask_into(text: &str, out: &mut String) {
    const STARS: &str = "****************************************************************";
    let ascii = text.is_ascii();
    let n = if ascii { text.len() } else { text.chars().count() };
    let (head, tail) = match n {
        8.. => (3, 4),
        3..=7 => (1, 1),
        _ => (0, 0),
    };
    if ascii {
        out.push_str(&text[..head]);
        let mut stars = n - head - tail;
        while stars > 0 {
            let run = stars.min(STARS.len());
            out.push_str(&STARS[..run]);
            stars -= run;
        }
        out.push_str(&text[n - tail..]);
    } else {
        let mut chars = text.chars();
        out.extend(chars.by_ref().take(head));
        let stars = n - head - tail;
        out.extend(std::iter::repeat_n('*', stars));
        out.extend(chars.skip(stars));
    }
}

/// How one request's outputs are masked. Cheap to clone; empty (everything shown) for roles
/// without policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Masking(Arc<BTreeMap<String, FieldPolicy>>);

impl Masking {
    pub fn new(fields: BTreeMap<String, FieldPolicy>) -> Masking {
        let fields = fields
            .into_iter()
            .filter(|(_, p)| *p != FieldPolicy::Show)
            .collect();
        Masking(Arc::new(fields))
    }

    /// True when nothing is masked: outputs can skip the work.
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    pub fn policy(&self, field: &str) -> FieldPolicy {
        self.0.get(field).copied().unwrap_or_default()
    }

    /// The customer id as this role may see it.
    pub fn id<'a>(&self, id: &'a str) -> Cow<'a, str> {
        match self.policy(CUSTOMER_ID) {
            FieldPolicy::Show => Cow::Borrowed(id),
            FieldPolicy::Mask => Cow::Owned(mask_text(id)),
            FieldPolicy::Hide => Cow::Borrowed("***"),
        }
    }

    /// A profile attribute's value as this role may see it; `None` when hidden.
    pub fn value(&self, attribute: &str, value: &Value) -> Option<Value> {
        match self.policy(attribute) {
            FieldPolicy::Show => Some(value.clone()),
            FieldPolicy::Hide => None,
            FieldPolicy::Mask => Some(mask_value(value)),
        }
    }

    /// Masks or drops the attributes of a JSON object of profile attributes in place.
    pub fn profile(&self, profile: &mut serde_json::Map<String, Value>) {
        if self.is_open() {
            return;
        }
        profile.retain(|name, value| match self.policy(name) {
            FieldPolicy::Show => true,
            FieldPolicy::Hide => false,
            FieldPolicy::Mask => {
                *value = mask_value(value);
                true
            }
        });
    }

    /// Appends the customer id as this role may see it to `out`.
    pub fn id_into(&self, id: &str, out: &mut String) {
        self.id_writer()(id, out)
    }

    /// [`Masking::id_into`] with the policy looked up once, for masking a page of ids.
    pub fn id_writer(&self) -> fn(&str, &mut String) {
        match self.policy(CUSTOMER_ID) {
            FieldPolicy::Show => |id, out| out.push_str(id),
            FieldPolicy::Mask => mask_into,
            FieldPolicy::Hide => |_, out| out.push_str("***"),
        }
    }

    /// Masks the `customer_id` member of a JSON object in place (a change, a member row).
    pub fn id_field(&self, object: &mut Value) {
        if self.policy(CUSTOMER_ID) == FieldPolicy::Show {
            return;
        }
        if let Some(Value::String(id)) = object.get_mut(CUSTOMER_ID) {
            *id = self.id(id).into_owned();
        }
    }
}

impl Masking {
    /// A stored value of profile attribute `attribute` as this role may see it: masked
    /// values become strings; `None` when hidden.
    pub fn stored(&self, attribute: &str, value: &rules::Value) -> Option<rules::Value> {
        match self.policy(attribute) {
            FieldPolicy::Show => Some(value.clone()),
            FieldPolicy::Hide => None,
            FieldPolicy::Mask => Some(mask_stored(value)),
        }
    }

    /// Masks an explain tree in place: a node that reads a profile attribute (`profile.x`)
    /// shows its value as the role may see it.
    pub fn explain_tree(&self, node: &mut Value) {
        if self.is_open() {
            return;
        }
        if let Some(attr) = node["expr"]
            .as_str()
            .and_then(|e| e.strip_prefix("profile."))
            .map(str::to_owned)
        {
            let shown = self
                .value(&attr, &node["value"])
                .unwrap_or_else(|| Value::String("***".into()));
            node["value"] = shown;
        }
        if let Some(children) = node.get_mut("children").and_then(Value::as_array_mut) {
            children.iter_mut().for_each(|c| self.explain_tree(c));
        }
    }
}

/// A masked stored value: a string, by its text (numbers and the rest by their JSON text);
/// null stays null.
fn mask_stored(value: &rules::Value) -> rules::Value {
    match value {
        rules::Value::Null => rules::Value::Null,
        rules::Value::Str(s) => rules::Value::Str(mask_text(s).into()),
        other => rules::Value::Str(mask_text(&other.to_json().to_string()).into()),
    }
}

/// Masks the values of one masked column of an export, each distinct string once: the
/// values come from the attribute's column dictionary, where equal values share one
/// allocation, so the memo is keyed by that allocation. It holds a clone of each key's
/// `Arc`, so no other string can take that address while it is a key. Bounded: past
/// [`ColumnMasker::MAX_MEMO`] distinct strings (phone numbers, say) the rest are masked
/// one by one.
#[derive(Default)]
pub struct ColumnMasker {
    memo: std::collections::HashMap<usize, (Arc<str>, rules::Value)>,
}

impl ColumnMasker {
    pub const MAX_MEMO: usize = 1 << 16;

    /// Replaces `value` by its masked form.
    pub fn mask(&mut self, value: &mut rules::Value) {
        let rules::Value::Str(text) = value else {
            *value = mask_stored(value);
            return;
        };
        let key = Arc::as_ptr(text).cast::<u8>() as usize;
        if let Some((held, masked)) = self.memo.get(&key) {
            debug_assert!(Arc::ptr_eq(held, text));
            *value = masked.clone();
            return;
        }
        let masked = rules::Value::Str(mask_text(text).into());
        if self.memo.len() < Self::MAX_MEMO {
            self.memo.insert(key, (text.clone(), masked.clone()));
        }
        *value = masked;
    }
}

/// A masked value: strings and numbers by their text; `null` stays; lists and objects
/// become `"***"`.
fn mask_value(value: &Value) -> Value {
    match value {
        Value::Null => Value::Null,
        Value::String(s) => Value::String(mask_text(s)),
        Value::Number(n) => Value::String(mask_text(&n.to_string())),
        Value::Bool(_) | Value::Array(_) | Value::Object(_) => Value::String("***".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn masks_keep_the_ends() {
        assert_eq!(mask_text("13800000001"), "138****0001");
        assert_eq!(mask_text("alice@example.com"), "ali**********.com");
        assert_eq!(mask_text("张三丰"), "张*丰");
        assert_eq!(mask_text("ab"), "**");
        assert_eq!(mask_text(""), "");
        assert_eq!(mask_text("1234567"), "1*****7");
    }

    #[test]
    fn long_ascii_texts_are_masked_whole() {
        let long = "x".repeat(150);
        assert_eq!(mask_text(&long), format!("xxx{}xxxx", "*".repeat(143)));
    }

    #[test]
    fn a_column_masker_gives_what_the_policy_gives_for_shared_and_distinct_strings() {
        let masking = Masking::new(BTreeMap::from([("city".to_owned(), FieldPolicy::Mask)]));
        let shared: Arc<str> = Arc::from("Shanghai-Pudong");
        let mut masker = ColumnMasker::default();
        let column = [
            rules::Value::Str(shared.clone()),
            rules::Value::Str(Arc::from("Shanghai-Pudong")), // equal text, another allocation
            rules::Value::Str(shared.clone()),
            rules::Value::Str(Arc::from("北京")),
            rules::Value::Num(rust_decimal::Decimal::from(13800000001u64)),
            rules::Value::Null,
        ];
        for value in column {
            let expected = masking.stored("city", &value).unwrap();
            let mut masked = value.clone();
            masker.mask(&mut masked);
            assert_eq!(masked, expected, "{value:?}");
        }
        // Past the bound, values are still masked (only not remembered).
        let mut full = ColumnMasker::default();
        let strings: Vec<Arc<str>> = (0..ColumnMasker::MAX_MEMO + 3)
            .map(|i| Arc::from(format!("value-{i:08}")))
            .collect();
        for s in &strings {
            let mut v = rules::Value::Str(s.clone());
            full.mask(&mut v);
            assert_eq!(v, masking.stored("city", &rules::Value::Str(s.clone())).unwrap());
        }
        assert_eq!(full.memo.len(), ColumnMasker::MAX_MEMO);
    }

    #[test]
    fn a_policy_masks_hides_and_shows() {
        let masking = Masking::new(BTreeMap::from([
            ("phone".to_owned(), FieldPolicy::Mask),
            ("openid".to_owned(), FieldPolicy::Hide),
            ("city".to_owned(), FieldPolicy::Show),
            (CUSTOMER_ID.to_owned(), FieldPolicy::Mask),
        ]));
        let mut profile = json!({"phone": 13800000001u64, "openid": "o-1", "city": "上海"})
            .as_object()
            .unwrap()
            .clone();
        masking.profile(&mut profile);
        assert_eq!(
            Value::Object(profile),
            json!({"phone": "138****0001", "city": "上海"})
        );
        assert_eq!(masking.id("13800000001"), "138****0001");
        let mut change = json!({"customer_id": "13800000001", "seq": 1});
        masking.id_field(&mut change);
        assert_eq!(change["customer_id"], "138****0001");
        assert!(Masking::default().is_open());
        assert_eq!(Masking::default().id("x"), "x");
    }
}
