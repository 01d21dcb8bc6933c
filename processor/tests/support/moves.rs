//! What the tests of moving partitions between stores share (`partitions.rs`,
//! `changelog.rs`): the conformance stream in `ts` order, and the views and change log per
//! customer to compare two stores by.

use std::collections::BTreeMap;

use processor::{CustomerView, Engine};
use tests::conformance_dir;

/// The conformance stream's events in `ts` order (an event's `at` is then its own `ts` in
/// any store, whatever else that store has seen), with the customer each belongs to.
pub fn ordered_stream() -> Vec<(String, String)> {
    let raw = std::fs::read(conformance_dir().join("events.ndjson")).unwrap();
    let mut events: Vec<(i64, String, String)> = raw
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let line = std::str::from_utf8(line).ok()?;
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let ts = v.get("ts")?.as_i64()?;
            let customer = rules::normalize(v.get("customer_id")?.as_str()?).into_owned();
            (!customer.is_empty()).then(|| (ts, customer, line.to_owned()))
        })
        .collect();
    events.sort_by_key(|e| e.0);
    events.into_iter().map(|(_, c, l)| (c, l)).collect()
}

pub fn rules_text() -> String {
    std::fs::read_to_string(conformance_dir().join("example.trl")).unwrap()
}

/// The lines in batches of 97, each its own commit.
pub fn ingest_all<'a>(engine: &mut Engine, lines: impl IntoIterator<Item = &'a String>) {
    let lines: Vec<&String> = lines.into_iter().collect();
    for chunk in lines.chunks(97) {
        engine.ingest(chunk).unwrap();
    }
}

/// Each customer's view; every one must be in `engine`.
pub fn views(engine: &Engine, ids: &[String]) -> BTreeMap<String, CustomerView> {
    ids.iter()
        .map(|id| {
            let view = engine
                .customer(id)
                .unwrap()
                .unwrap_or_else(|| panic!("{id} is here"));
            (id.clone(), view)
        })
        .collect()
}

/// Changes after `after`, per customer, without `seq`.
pub fn changes_by_customer(engine: &Engine, after: u64) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in engine.changes(after, usize::MAX).unwrap() {
        out.entry(c.customer_id.to_string()).or_default().push(format!(
            "{:?} {} {:?} {} {}",
            c.kind,
            c.name,
            c.op,
            c.at,
            c.cause.as_string()
        ));
    }
    out
}
