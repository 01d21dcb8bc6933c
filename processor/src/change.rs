//! Tag and segment changes: the change log's records (contract section 4).

use std::borrow::Cow;
use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// What a change is about: a tag or segment membership, or (identity resolution) the
/// customer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberKind {
    Tag,
    Segment,
    /// A merge or unmerge: `name` is the other customer (absorbed, or split off).
    Customer,
}

impl MemberKind {
    /// The JSON field that carries `name` (for a customer change, by its op).
    pub fn field(self, op: Op) -> &'static str {
        match (self, op) {
            (MemberKind::Tag, _) => "tag",
            (MemberKind::Segment, _) => "segment",
            (MemberKind::Customer, Op::Unmerge) => "split",
            (MemberKind::Customer, _) => "absorbed",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            MemberKind::Tag => "tag",
            MemberKind::Segment => "segment",
            MemberKind::Customer => "customer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Add,
    Remove,
    /// `customer_id` absorbed the customer `name` (identity resolution).
    Merge,
    /// The customer `name` was split off `customer_id` again.
    Unmerge,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Merge => "merge",
            Op::Unmerge => "unmerge",
        }
    }
}

/// What caused a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// An event, with its `event_id` if it had one.
    Event(Option<String>),
    Timer,
    RuleChange,
    Manual,
    /// A request made with an API key: the key's name (a manual merge or unmerge).
    ManualBy(String),
}

impl Cause {
    /// The kind of cause, without the event id: a metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Cause::Event(_) => "event",
            Cause::Timer => "timer",
            Cause::RuleChange => "rule_change",
            Cause::Manual | Cause::ManualBy(_) => "manual",
        }
    }

    pub fn as_string(&self) -> String {
        match self {
            Cause::Event(Some(id)) => format!("event:{id}"),
            Cause::Event(None) => "event:".to_owned(),
            Cause::Timer => "timer".to_owned(),
            Cause::RuleChange => "rule_change".to_owned(),
            Cause::Manual => "manual".to_owned(),
            Cause::ManualBy(key) => format!("manual:{key}"),
        }
    }

    pub fn parse(s: &str) -> Option<Cause> {
        Some(match s {
            "timer" => Cause::Timer,
            "rule_change" => Cause::RuleChange,
            "manual" => Cause::Manual,
            "event:" => Cause::Event(None),
            other => match other.strip_prefix("manual:") {
                Some(key) => Cause::ManualBy(key.to_owned()),
                None => Cause::Event(Some(other.strip_prefix("event:")?.to_owned())),
            },
        })
    }
}

/// The first byte of a stored change with the customer's number (JSON starts with `{`).
const STORED_WITH_NUMBER: u8 = 1;

/// `{seq, customer_id, tag|segment, op, at, cause}`; a merge is
/// `{seq, customer_id, absorbed, op: "merge", at, cause}` and an unmerge
/// `{seq, customer_id, split, op: "unmerge", at, cause}`. On a member of a consumer group
/// each also carries `partition` and `pseq` after `seq` ([`Change::pseq`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    /// On a member of a consumer group (the state changelog on): the customer's partition
    /// and the change's number among that partition's changes. Counted in the partition's
    /// state and moved with it, so the node that takes a partition over and judges again
    /// events its last owner had judged makes their changes again with the same numbers: a
    /// consumer of the `tag-changes` topic drops a change whose `(partition, pseq)` it has
    /// seen.
    pub pseq: Option<(u32, u64)>,
    /// Beside `pseq`: the version of the rule set the change was made under. Two changes
    /// with one `(partition, pseq)` and different versions are the two sides of a rule
    /// change that reached the partition's old and new owner at different points of its
    /// input (docs/cluster.md says when one number names one change).
    pub rules_version: Option<u64>,
    pub customer_id: Arc<str>,
    pub kind: MemberKind,
    pub name: Arc<str>,
    pub op: Op,
    pub at: i64,
    pub cause: Cause,
}

impl Serialize for Change {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let numbered = 2 * usize::from(self.pseq.is_some()) + usize::from(self.rules_version.is_some());
        let mut map = serializer.serialize_map(Some(6 + numbered))?;
        map.serialize_entry("seq", &self.seq)?;
        if let Some((partition, pseq)) = self.pseq {
            map.serialize_entry("partition", &partition)?;
            map.serialize_entry("pseq", &pseq)?;
        }
        if let Some(version) = self.rules_version {
            map.serialize_entry("rules_version", &version)?;
        }
        map.serialize_entry("customer_id", &*self.customer_id)?;
        map.serialize_entry(self.kind.field(self.op), &*self.name)?;
        map.serialize_entry("op", self.op.label())?;
        map.serialize_entry("at", &self.at)?;
        map.serialize_entry("cause", &self.cause.as_string())?;
        map.end()
    }
}

impl Change {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a change always serialises")
    }

    /// The change as the `changes` column family keeps it: a format byte, the customer's
    /// number in the membership index, then the change as JSON.
    pub fn encode_stored(&self, number: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.push(STORED_WITH_NUMBER);
        out.extend_from_slice(&number.to_be_bytes());
        serde_json::to_writer(&mut out, self).expect("a change always serialises");
        out
    }

    /// Reads back what [`Change::encode_stored`] wrote, or the bare JSON of stores written
    /// before customers had numbers (number `None`).
    pub fn decode_stored(bytes: &[u8]) -> Option<(Option<u32>, Change)> {
        match bytes.split_first()? {
            (&STORED_WITH_NUMBER, rest) if rest.len() >= 4 => {
                let number = u32::from_be_bytes(rest[..4].try_into().ok()?);
                Some((Some(number), Change::from_json(&rest[4..])?))
            }
            _ => Some((None, Change::from_json(bytes)?)),
        }
    }

    /// Reads a change back from its JSON.
    pub fn from_json(bytes: &[u8]) -> Option<Change> {
        let f: ChangeFields = serde_json::from_slice(bytes).ok()?;
        let (kind, name) = match (f.tag, f.segment, f.absorbed, f.split) {
            (Some(t), ..) => (MemberKind::Tag, t),
            (None, Some(s), ..) => (MemberKind::Segment, s),
            (None, None, Some(a), _) => (MemberKind::Customer, a),
            (None, None, None, Some(s)) => (MemberKind::Customer, s),
            (None, None, None, None) => return None,
        };
        Some(Change {
            seq: f.seq,
            pseq: f.partition.zip(f.pseq),
            rules_version: f.rules_version,
            customer_id: Arc::from(&*f.customer_id),
            kind,
            name: Arc::from(&*name),
            op: match &*f.op {
                "add" => Op::Add,
                "remove" => Op::Remove,
                "merge" => Op::Merge,
                "unmerge" => Op::Unmerge,
                _ => return None,
            },
            at: f.at,
            cause: Cause::parse(&f.cause)?,
        })
    }

    /// The `at` of a stored change ([`Change::encode_stored`], or bare JSON), read without
    /// building the change: retention reads tens of thousands of them a step for this alone.
    pub fn stored_at(bytes: &[u8]) -> Option<i64> {
        #[derive(Deserialize)]
        struct At {
            at: i64,
        }
        let json = match bytes.split_first()? {
            (&STORED_WITH_NUMBER, rest) if rest.len() >= 4 => &rest[4..],
            _ => bytes,
        };
        serde_json::from_slice::<At>(json).ok().map(|a| a.at)
    }
}

/// A change's JSON fields as written by its `Serialize`, read in one pass with the strings
/// borrowed from the bytes where they hold no escapes (no JSON value tree).
#[derive(Deserialize)]
struct ChangeFields<'a> {
    seq: u64,
    partition: Option<u32>,
    pseq: Option<u64>,
    rules_version: Option<u64>,
    #[serde(borrow)]
    customer_id: Cow<'a, str>,
    #[serde(borrow)]
    tag: Option<Cow<'a, str>>,
    #[serde(borrow)]
    segment: Option<Cow<'a, str>>,
    #[serde(borrow)]
    absorbed: Option<Cow<'a, str>>,
    #[serde(borrow)]
    split: Option<Cow<'a, str>>,
    #[serde(borrow)]
    op: Cow<'a, str>,
    at: i64,
    #[serde(borrow)]
    cause: Cow<'a, str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_print_as_the_contract_says_and_read_back() {
        let c = Change {
            seq: 7,
            pseq: None,
            rules_version: None,
            customer_id: "13800000000".into(),
            kind: MemberKind::Segment,
            name: "spring_promo".into(),
            op: Op::Add,
            at: 1_744_000_000_000,
            cause: Cause::Event(None),
        };
        let json = String::from_utf8(c.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"seq":7,"customer_id":"13800000000","segment":"spring_promo","op":"add","at":1744000000000,"cause":"event:"}"#
        );
        assert_eq!(Change::from_json(json.as_bytes()), Some(c.clone()));
        assert_eq!(
            Change::decode_stored(&c.encode_stored(42)),
            Some((Some(42), c.clone()))
        );
        assert_eq!(Change::decode_stored(json.as_bytes()), Some((None, c)));
    }

    #[test]
    fn a_change_of_a_group_member_prints_its_number_and_rules_version_and_reads_back() {
        let c = Change {
            seq: 31,
            pseq: Some((2, 7)),
            rules_version: Some(3),
            customer_id: "c-9".into(),
            kind: MemberKind::Tag,
            name: "vip".into(),
            op: Op::Add,
            at: 1_767_228_300_001,
            cause: Cause::Event(Some("e-1".into())),
        };
        let json = String::from_utf8(c.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"seq":31,"partition":2,"pseq":7,"rules_version":3,"customer_id":"c-9","tag":"vip","op":"add","at":1767228300001,"cause":"event:e-1"}"#
        );
        assert_eq!(Change::from_json(json.as_bytes()), Some(c.clone()));
        assert_eq!(Change::decode_stored(&c.encode_stored(5)), Some((Some(5), c)));
    }

    #[test]
    fn merges_print_the_absorbed_customer_and_read_back() {
        for (op, json) in [
            (
                Op::Merge,
                r#"{"seq":8,"customer_id":"m-1","absorbed":"phone:13800000001","op":"merge","at":5,"cause":"event:e9"}"#,
            ),
            (
                Op::Unmerge,
                r#"{"seq":8,"customer_id":"m-1","split":"phone:13800000001","op":"unmerge","at":5,"cause":"event:e9"}"#,
            ),
        ] {
            let c = Change {
                seq: 8,
                pseq: None,
                rules_version: None,
                customer_id: "m-1".into(),
                kind: MemberKind::Customer,
                name: "phone:13800000001".into(),
                op,
                at: 5,
                cause: Cause::Event(Some("e9".into())),
            };
            assert_eq!(String::from_utf8(c.to_json()).unwrap(), json);
            assert_eq!(Change::from_json(json.as_bytes()), Some(c));
        }
    }

    #[test]
    fn strings_with_escapes_read_back_and_at_is_read_alone() {
        let c = Change {
            seq: u64::MAX,
            pseq: None,
            rules_version: None,
            customer_id: "a \"quoted\" \\ id\n上海\u{200b}".into(),
            kind: MemberKind::Tag,
            name: "vip/\t tab".into(),
            op: Op::Remove,
            at: -1,
            cause: Cause::ManualBy("key \"ops\"".into()),
        };
        let json = c.to_json();
        assert!(
            String::from_utf8_lossy(&json).contains("\\\""),
            "escaped quotes in {json:?}"
        );
        assert_eq!(Change::from_json(&json), Some(c.clone()));
        assert_eq!(
            Change::decode_stored(&c.encode_stored(3)),
            Some((Some(3), c.clone()))
        );
        assert_eq!(Change::stored_at(&c.encode_stored(3)), Some(-1));
        assert_eq!(Change::stored_at(&json), Some(-1));
        for at in [0, 1_744_000_000_000, i64::MIN, i64::MAX] {
            let c = Change { at, ..c.clone() };
            assert_eq!(Change::stored_at(&c.encode_stored(9)), Some(at));
            assert_eq!(Change::decode_stored(&c.encode_stored(9)).unwrap().1.at, at);
        }
    }

    #[test]
    fn what_is_not_a_change_reads_as_none() {
        let ok = r#"{"seq":1,"customer_id":"c","tag":"t","op":"add","at":5,"cause":"timer"}"#;
        assert!(Change::from_json(ok.as_bytes()).is_some());
        for bad in [
            "",
            "[]",
            "{",
            r#"{"seq":1,"customer_id":"c","op":"add","at":5,"cause":"timer"}"#,
            r#"{"seq":-1,"customer_id":"c","tag":"t","op":"add","at":5,"cause":"timer"}"#,
            r#"{"seq":1,"customer_id":"c","tag":"t","op":"toggle","at":5,"cause":"timer"}"#,
            r#"{"seq":1,"customer_id":"c","tag":"t","op":"add","at":5.5,"cause":"timer"}"#,
            r#"{"seq":1,"customer_id":"c","tag":"t","op":"add","at":"5","cause":"timer"}"#,
            r#"{"seq":1,"customer_id":"c","tag":"t","op":"add","at":5,"cause":"sunshine"}"#,
            r#"{"seq":1,"customer_id":7,"tag":"t","op":"add","at":5,"cause":"timer"}"#,
        ] {
            assert_eq!(Change::from_json(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(Change::stored_at(b""), None);
        assert_eq!(Change::stored_at(br#"{"seq":1}"#), None);
        assert_eq!(Change::stored_at(br#"{"at":"soon"}"#), None);
        // A field this version does not know is passed over, as before.
        let newer =
            r#"{"seq":1,"customer_id":"c","tag":"t","op":"add","at":5,"cause":"timer","why":{"x":[1]}}"#;
        assert_eq!(Change::from_json(newer.as_bytes()).map(|c| c.at), Some(5));
        assert_eq!(Change::stored_at(newer.as_bytes()), Some(5));
    }
}
