//! A tracking plan accepts every event generated from it, and each mutation of one field
//! of such an event is found with the right violation class — through the event parser,
//! from JSON text, as every edge parses.

use processor::event::{parse_event_planned, EventLimits};
use processor::Rejection;
use proptest::prelude::*;
use rules::{TrackingPlan, Violation};
use serde_json::{json, Map, Value};

#[derive(Debug, Clone)]
enum Kind {
    Str { pattern: bool, max: Option<usize> },
    Decimal,
    Integer,
    Bool,
    Enum(Vec<String>),
    Timestamp,
}

#[derive(Debug, Clone)]
struct Prop {
    name: String,
    kind: Kind,
    required: bool,
}

#[derive(Debug, Clone)]
struct EventType {
    name: String,
    props: Vec<Prop>,
    closed: bool,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (any::<bool>(), proptest::option::of(3usize..12))
            .prop_map(|(pattern, max)| Kind::Str { pattern, max }),
        Just(Kind::Decimal),
        Just(Kind::Integer),
        Just(Kind::Bool),
        proptest::collection::btree_set("[a-z]{2,5}", 1..4).prop_map(|v| Kind::Enum(v.into_iter().collect())),
        Just(Kind::Timestamp),
    ]
}

fn event_types() -> impl Strategy<Value = Vec<EventType>> {
    proptest::collection::vec(
        (
            proptest::collection::vec((kind(), any::<bool>()), 1..5),
            any::<bool>(),
        ),
        1..4,
    )
    .prop_map(|types| {
        types
            .into_iter()
            .enumerate()
            .map(|(i, (props, closed))| EventType {
                name: format!("type_{i}"),
                props: props
                    .into_iter()
                    .enumerate()
                    .map(|(j, (kind, required))| Prop {
                        name: if j == 3 {
                            "device.os".into()
                        } else {
                            format!("p{j}")
                        },
                        kind,
                        required,
                    })
                    .collect(),
                closed,
            })
            .collect()
    })
}

fn plan_text(types: &[EventType]) -> String {
    let mut out = String::from("[defaults]\nmode = \"block\"\nunplanned_events = \"block\"\n");
    for t in types {
        out += &format!("\n[events.{}]\nadditional_properties = {}\n", t.name, !t.closed);
        for p in &t.props {
            let spec = match &p.kind {
                Kind::Str { pattern, max } => format!(
                    "type = \"string\"{}{}",
                    if *pattern { ", pattern = \"[a-z]+\"" } else { "" },
                    max.map(|m| format!(", max_length = {m}")).unwrap_or_default()
                ),
                Kind::Decimal => "type = \"decimal\"".into(),
                Kind::Integer => "type = \"integer\"".into(),
                Kind::Bool => "type = \"bool\"".into(),
                Kind::Enum(values) => format!("type = \"enum\", values = {values:?}"),
                Kind::Timestamp => "type = \"timestamp\"".into(),
            };
            out += &format!(
                "properties.\"{}\" = {{ {spec}, required = {} }}\n",
                p.name, p.required
            );
        }
    }
    out
}

/// A value the plan accepts for the property, chosen by `seed`.
fn valid(kind: &Kind, seed: u32) -> Value {
    match kind {
        Kind::Str { max, .. } => {
            let len = max.unwrap_or(8).clamp(1, 3);
            Value::String(
                "abcxyz"
                    .chars()
                    .cycle()
                    .skip(seed as usize % 6)
                    .take(len)
                    .collect(),
            )
        }
        Kind::Decimal => serde_json::from_str(&format!("{}.{}", seed % 1000, seed % 97)).unwrap(),
        Kind::Integer => json!(seed),
        Kind::Bool => json!(seed.is_multiple_of(2)),
        Kind::Enum(values) => json!(values[seed as usize % values.len()]),
        Kind::Timestamp => {
            if seed.is_multiple_of(2) {
                json!(1_744_000_000_000i64 + i64::from(seed))
            } else {
                json!("2025-03-01T12:45:41.139+08:00")
            }
        }
    }
}

/// A mutation of one field, and the class it must be found as.
#[derive(Debug, Clone, Copy)]
enum Mutation {
    WrongType,
    OutsideEnum,
    BreakPattern,
    TooLong,
    DropRequired,
    AddUnplanned,
    UnplannedType,
}

/// Applies `mutation` to the property at `index` (or the event), if it applies there; the
/// class it must be found as.
fn mutate(
    t: &EventType,
    event: &mut Map<String, Value>,
    index: usize,
    mutation: Mutation,
) -> Option<&'static str> {
    let p = &t.props[index % t.props.len()];
    let props = event.get_mut("props").and_then(Value::as_object_mut).unwrap();
    let (head, tail) = p
        .name
        .split_once('.')
        .map_or((p.name.as_str(), None), |(h, t)| (h, Some(t)));
    let mut set = |v: Value| match tail {
        None => {
            props.insert(head.to_owned(), v);
        }
        Some(leaf) => {
            props.insert(head.to_owned(), json!({ leaf: v }));
        }
    };
    match (mutation, &p.kind) {
        (Mutation::WrongType, Kind::Str { .. }) => set(json!(12)),
        (Mutation::WrongType, Kind::Enum(_)) => {
            set(json!(12));
            return Some("enum");
        }
        (Mutation::WrongType, Kind::Decimal | Kind::Bool) => set(json!("12")),
        (Mutation::WrongType, Kind::Integer) => set(json!(1.5)),
        (Mutation::WrongType, Kind::Timestamp) => set(json!("soon")),
        (Mutation::OutsideEnum, Kind::Enum(_)) => {
            set(json!("NOT-A-VALUE"));
            return Some("enum");
        }
        (Mutation::BreakPattern, Kind::Str { pattern: true, .. }) => {
            set(json!("A1"));
            return Some("pattern");
        }
        (Mutation::TooLong, Kind::Str { max: Some(m), .. }) => {
            set(json!("a".repeat(m + 1)));
            return Some("too_long");
        }
        (Mutation::DropRequired, _) if p.required => {
            props.remove(head);
            return Some("required_missing");
        }
        (Mutation::AddUnplanned, _) if t.closed => {
            props.insert("unplanned_extra".into(), json!(1));
            return Some("additional_properties");
        }
        (Mutation::UnplannedType, _) => {
            event.insert("type".into(), json!("not_planned"));
            return Some("unplanned_event");
        }
        _ => return None,
    }
    Some("datatype_mismatch")
}

fn event(t: &EventType, seed: u32, optional_mask: u32) -> Map<String, Value> {
    let mut props = Map::new();
    for (i, p) in t.props.iter().enumerate() {
        if !p.required && optional_mask & (1 << i) == 0 {
            continue;
        }
        let v = valid(&p.kind, seed.wrapping_add(i as u32));
        match p.name.split_once('.') {
            None => {
                props.insert(p.name.clone(), v);
            }
            Some((h, leaf)) => {
                props.insert(h.to_owned(), json!({ leaf: v }));
            }
        }
    }
    let mut e = Map::new();
    e.insert("customer_id".into(), json!(format!("c{seed}")));
    e.insert("type".into(), json!(t.name));
    e.insert("ts".into(), json!(1_744_000_000_000i64));
    e.insert("props".into(), Value::Object(props));
    e
}

fn judge(plan: &TrackingPlan, e: &Map<String, Value>) -> (Result<(), Rejection>, Vec<Violation>) {
    let text = serde_json::to_vec(e).unwrap();
    let mut found = Vec::new();
    let result =
        parse_event_planned(&text, &EventLimits::default(), Some(plan), i64::MAX, &mut found).map(|_| ());
    (result, found)
}

const MUTATIONS: [Mutation; 7] = [
    Mutation::WrongType,
    Mutation::OutsideEnum,
    Mutation::BreakPattern,
    Mutation::TooLong,
    Mutation::DropRequired,
    Mutation::AddUnplanned,
    Mutation::UnplannedType,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn a_plan_accepts_what_it_describes_and_finds_each_mutation(
        types in event_types(),
        seed in any::<u32>(),
        mask in any::<u32>(),
        which in 0usize..16,
        mutation in 0usize..MUTATIONS.len(),
    ) {
        let text = plan_text(&types);
        let plan = TrackingPlan::parse(&text).unwrap();
        let t = &types[seed as usize % types.len()];
        let mut e = event(t, seed, mask);
        let (result, found) = judge(&plan, &e);
        prop_assert!(result.is_ok() && found.is_empty(), "{text}\n{e:?}\n{result:?} {found:?}");
        if let Some(class) = mutate(t, &mut e, which, MUTATIONS[mutation]) {
            let (result, found) = judge(&plan, &e);
            let codes: Vec<&str> = found.iter().map(|v| v.class.code()).collect();
            prop_assert_eq!(&codes, &[class], "{}\n{:?}", text, e);
            match result {
                Err(Rejection::Plan(v)) => prop_assert_eq!(v.class.code(), class),
                other => prop_assert!(false, "blocked expected, got {other:?}"),
            }
        }
    }
}
