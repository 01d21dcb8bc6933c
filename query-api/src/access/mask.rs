//! Field-level masking: per role, a profile attribute or the customer id is shown, masked
//! (`138****0001`) or hidden. One [`Masking`] is resolved per request from its key's role and
//! applied by every output path: customer views, timelines, explain, segment queries,
//! members and exports in every format, SQL results, the change log and its streams, and
//! webhook deliveries (with the masking of the role that created the webhook).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use processor::index::{IdPage, IdTable};
use processor::ReadHandle;

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

/// [`mask_text`] appended to `out`: no allocation of its own, and three copies.
pub fn mask_into(text: &str, out: &mut String) {
    let parts = MaskParts::of(text.as_bytes());
    out.push_str(&text[..parts.head_end]);
    push_stars(out, parts.stars);
    out.push_str(&text[parts.tail_start..]);
}

/// Where a masked text's parts lie, in bytes of the UTF-8 text: it keeps `..head_end`,
/// then `stars` stars stand for its middle, then it keeps `tail_start..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskParts {
    pub head_end: usize,
    pub stars: usize,
    pub tail_start: usize,
}

impl MaskParts {
    /// The parts of the UTF-8 `text`. An ASCII text is measured in bytes; any other has its
    /// characters counted without decoding them (the bytes that do not continue one, in
    /// byte lanes the compiler vectorises) and its kept ends found by walking a few bytes
    /// in from each end.
    pub fn of(text: &[u8]) -> MaskParts {
        let len = text.len();
        let chars = if text.is_ascii() { len } else { char_count(text) };
        let (head, tail) = kept_ends(chars);
        let (head_end, tail_start) = if chars == len {
            (head, len - tail)
        } else {
            (nth_char_start(text, head), nth_char_start_from_end(text, tail))
        };
        MaskParts {
            head_end,
            stars: chars - head - tail,
            tail_start,
        }
    }

    /// The masked text's length in bytes.
    pub fn masked_len(&self, len: usize) -> usize {
        self.head_end + self.stars + (len - self.tail_start)
    }
}

fn starts_char(b: u8) -> bool {
    (b as i8) >= -0x40
}

/// How many characters the UTF-8 `text` holds, counted 255 bytes at a time in byte lanes.
fn char_count(text: &[u8]) -> usize {
    text.chunks(255)
        .map(|chunk| usize::from(chunk.iter().fold(0u8, |n, &b| n + u8::from(starts_char(b)))))
        .sum()
}

/// Where the `n`th character of the UTF-8 `text` starts (its length when it has `n`).
fn nth_char_start(text: &[u8], n: usize) -> usize {
    text.iter()
        .enumerate()
        .filter(|(_, &b)| starts_char(b))
        .nth(n)
        .map_or(text.len(), |(i, _)| i)
}

/// Where the last `n` characters of the UTF-8 `text` start (its length when `n` is 0).
fn nth_char_start_from_end(text: &[u8], n: usize) -> usize {
    match n {
        0 => text.len(),
        n => text
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, &b)| starts_char(b))
            .nth(n - 1)
            .map_or(0, |(i, _)| i),
    }
}

/// How many characters a masked text of `n` characters keeps at its start and at its end.
fn kept_ends(n: usize) -> (usize, usize) {
    match n {
        8.. => (3, 4),
        3..=7 => (1, 1),
        _ => (0, 0),
    }
}

/// Appends `n` stars, 64 at a time.
fn push_stars(out: &mut String, mut n: usize) {
    const STARS: &str = "****************************************************************";
    while n > 0 {
        let run = n.min(STARS.len());
        out.push_str(&STARS[..run]);
        n -= run;
    }
}

/// Every customer's id masked, by customer number: computed once per customer — on the
/// first masked export that reaches it, then for each customer numbered since — so a masked
/// export copies its ids as an open one does instead of masking every id of every export
/// again. A customer's number names one id for good (numbers are never reused), so an
/// entry never goes stale. Empty until a masked export runs; then about the ids' own size
/// (masked ids are no longer than the ids).
#[derive(Debug, Default)]
pub struct MaskedIds(RwLock<IdTable>);

/// Customers masked per hold of the index's lock while the table catches up.
const MASK_BATCH: u32 = 65_536;

impl MaskedIds {
    /// The masked ids of `numbers` (ascending, as a page of members is), from `reader`'s
    /// index.
    pub fn page(&self, reader: &ReadHandle, numbers: &[u32]) -> IdPage {
        if let Some(&last) = numbers.last() {
            self.catch_up(reader, last + 1);
        }
        let table = self.0.read().unwrap_or_else(|e| e.into_inner());
        IdPage::from_ids(numbers.iter().filter_map(|&n| Some((n, table.get(n)?))))
    }

    /// Masks the ids of every customer numbered below `upto` not masked yet.
    fn catch_up(&self, reader: &ReadHandle, upto: u32) {
        if self.0.read().unwrap_or_else(|e| e.into_inner()).len() >= upto {
            return;
        }
        let mut table = self.0.write().unwrap_or_else(|e| e.into_inner());
        let mut masked = String::new();
        while table.len() < upto {
            let from = table.len();
            let ids = reader.ids_of(from..upto.min(from + MASK_BATCH));
            if ids.is_empty() {
                return;
            }
            for (&number, id) in ids.numbers().iter().zip(ids.iter()) {
                if number != table.len() {
                    return; // numbers have no gaps; never masked out of place
                }
                masked.clear();
                mask_into(id, &mut masked);
                table.push(&masked);
            }
        }
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

    /// Masks the `customer_id` member of a JSON object in place (a change, a member row).
    pub fn id_field(&self, object: &mut Value) {
        if self.policy(CUSTOMER_ID) == FieldPolicy::Show {
            return;
        }
        // A merge's change names the other customer too.
        for field in [CUSTOMER_ID, "absorbed", "split"] {
            if let Some(Value::String(id)) = object.get_mut(field) {
                *id = self.id(id).into_owned();
            }
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
pub fn mask_stored(value: &rules::Value) -> rules::Value {
    match value {
        rules::Value::Null => rules::Value::Null,
        rules::Value::Str(s) => rules::Value::Str(mask_text(s).into()),
        other => rules::Value::Str(mask_text(&other.to_json().to_string()).into()),
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

    proptest::proptest! {
        /// Masking by bytes agrees with masking character by character.
        #[test]
        fn masking_by_bytes_is_masking_by_characters(text in "[0-9a-z\u{e9}\u{5f20}\u{1f600}]{0,24}") {
            let chars: Vec<char> = text.chars().collect();
            let (head, tail) = kept_ends(chars.len());
            let expected: String = chars[..head]
                .iter()
                .chain(std::iter::repeat_n(&'*', chars.len() - head - tail))
                .chain(&chars[chars.len() - tail..])
                .collect();
            proptest::prop_assert_eq!(mask_text(&text), expected);
        }
    }

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

    /// Character by character, as the rule reads: what `mask_into`'s slicing must equal.
    fn reference_mask(text: &str) -> String {
        let n = text.chars().count();
        let (head, tail) = match n {
            8.. => (3, 4),
            3..=7 => (1, 1),
            _ => (0, 0),
        };
        text.chars()
            .enumerate()
            .map(|(i, c)| if i < head || i >= n - tail { c } else { '*' })
            .collect()
    }

    #[test]
    fn non_ascii_texts_keep_whole_characters_at_the_ends() {
        assert_eq!(mask_text("上海市浦东新区张江路"), "上海市***区张江路");
        assert_eq!(mask_text("ab张"), "a*张");
        assert_eq!(mask_text("张三"), "**");
        assert_eq!(mask_text("𝒜bcdefgh𝒵"), "𝒜bc**fgh𝒵");
        // Every length from 0 to 80 over characters of 1 to 4 bytes.
        let alphabet = ['a', 'é', '张', '𝒜', '1', '　'];
        for len in 0..80 {
            let text: String = (0..len)
                .map(|i| alphabet[(i * 7 + len) % alphabet.len()])
                .collect();
            assert_eq!(mask_text(&text), reference_mask(&text), "{text:?}");
        }
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
