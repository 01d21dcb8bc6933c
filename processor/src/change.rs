//! Tag and segment changes: the change log's records (contract section 4).

use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

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
/// `{seq, customer_id, split, op: "unmerge", at, cause}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub customer_id: Arc<str>,
    pub kind: MemberKind,
    pub name: Arc<str>,
    pub op: Op,
    pub at: i64,
    pub cause: Cause,
}

impl Serialize for Change {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(6))?;
        map.serialize_entry("seq", &self.seq)?;
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
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let field = |name: &str| v.get(name).and_then(|n| n.as_str());
        let (kind, name) = if let Some(t) = field("tag") {
            (MemberKind::Tag, t)
        } else if let Some(s) = field("segment") {
            (MemberKind::Segment, s)
        } else {
            (
                MemberKind::Customer,
                field("absorbed").or_else(|| field("split"))?,
            )
        };
        Some(Change {
            seq: v.get("seq")?.as_u64()?,
            customer_id: Arc::from(v.get("customer_id")?.as_str()?),
            kind,
            name: Arc::from(name),
            op: match v.get("op")?.as_str()? {
                "add" => Op::Add,
                "remove" => Op::Remove,
                "merge" => Op::Merge,
                "unmerge" => Op::Unmerge,
                _ => return None,
            },
            at: v.get("at")?.as_i64()?,
            cause: Cause::parse(v.get("cause")?.as_str()?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_print_as_the_contract_says_and_read_back() {
        let c = Change {
            seq: 7,
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
}
