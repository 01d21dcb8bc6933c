//! The conformance sample (`tests/conformance/`): a generated CRM stream and the exact
//! outputs the contract requires, computed by an independent reference implementation.
//!
//! `--clock event`, ingest `events.ndjson` in file order, then set the clock to the final
//! instant; rejections, counts, the change log (per customer, in order) and the final state
//! must all match.

use std::collections::BTreeMap;
use std::path::PathBuf;

use processor::{ClockMode, Engine, EngineConfig};
use serde_json::{json, Value as Json};

fn read_ndjson(path: &PathBuf) -> Vec<Json> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("expected-output line"))
        .collect()
}

/// The rule-language value as the conformance files print it.
fn conformance_value(v: &rules::Value) -> Json {
    match v {
        rules::Value::Dur(ms) => json!({ "duration_ms": ms }),
        other => serde_json::to_value(other).expect("value serialises"),
    }
}

fn run(rules_name: &str, cache_customers: usize) {
    run_with_memory(rules_name, cache_customers, EngineConfig::default().cache_bytes);
}

fn run_with_memory(rules_name: &str, cache_customers: usize, cache_bytes: usize) {
    run_sharded(rules_name, cache_customers, cache_bytes, 1, 1);
}

fn run_sharded(
    rules_name: &str,
    cache_customers: usize,
    cache_bytes: usize,
    workers: usize,
    partitions: u32,
) {
    let dir = tests::conformance_dir();
    let rules = std::fs::read_to_string(dir.join(format!("{rules_name}.trl"))).expect("rules");
    let expected_dir = dir.join(format!("expected-{rules_name}"));
    let expected_final: Json =
        serde_json::from_str(&std::fs::read_to_string(expected_dir.join("final.json")).expect("final.json"))
            .expect("final.json parses");

    let data = tests::TempDir::new(&format!("conformance-{rules_name}"));
    let config = EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        cache_customers,
        cache_bytes,
        workers,
        partitions,
        ..Default::default()
    };
    let mut engine = Engine::open(data.path(), Some(&rules), config).expect("open engine");

    let raw = std::fs::read(dir.join("events.ndjson")).expect("events");
    let mut lines: Vec<&[u8]> = raw.split(|b| *b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let (mut accepted, mut duplicates) = (0, 0);
    let mut rejected = Vec::new();
    for (chunk_no, chunk) in lines.chunks(317).enumerate() {
        let outcome = engine.ingest(chunk).expect("ingest");
        accepted += outcome.accepted;
        duplicates += outcome.duplicates;
        for e in outcome.errors {
            rejected.push((chunk_no * 317 + e.index, e.reason));
        }
    }
    let now = expected_final["now"].as_i64().expect("now");
    engine.advance_clock(now).expect("advance clock");

    // Rejections: same lines, same reasons (the JSON parser's own wording may differ).
    let expected_rejected: Vec<(usize, String)> = read_ndjson(&expected_dir.join("rejected.ndjson"))
        .into_iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap() as usize,
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(rejected.len(), expected_rejected.len(), "rejected count");
    for ((i, ours), (j, theirs)) in rejected.iter().zip(&expected_rejected) {
        assert_eq!(i, j, "rejected line");
        if theirs.starts_with("invalid JSON") {
            assert!(ours.starts_with("invalid JSON: "), "line {i}: {ours}");
        } else {
            assert_eq!(ours, theirs, "line {i}");
        }
    }
    let counts = &expected_final["counts"];
    assert_eq!(accepted as u64, counts["accepted"].as_u64().unwrap(), "accepted");
    assert_eq!(
        duplicates as u64,
        counts["duplicates"].as_u64().unwrap(),
        "duplicates"
    );

    // The change log, per customer, in order (different customers may interleave).
    let changes = engine.changes(0, usize::MAX).expect("changes");
    for (i, c) in changes.iter().enumerate() {
        assert_eq!(c.seq, i as u64 + 1, "seq is gap-free from 1");
    }
    let mut ours: BTreeMap<String, Vec<Json>> = BTreeMap::new();
    for c in &changes {
        let (field, op) = (c.kind.field(c.op), c.op.label());
        ours.entry(c.customer_id.to_string()).or_default().push(json!({
            "customer_id": &*c.customer_id, field: &*c.name, "op": op, "at": c.at, "cause": c.cause.as_string()
        }));
    }
    let mut theirs: BTreeMap<String, Vec<Json>> = BTreeMap::new();
    for c in read_ndjson(&expected_dir.join("changes.ndjson")) {
        theirs
            .entry(c["customer_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(c);
    }
    let mut mismatches = Vec::new();
    for customer in ours
        .keys()
        .chain(theirs.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (a, b) = (ours.get(customer), theirs.get(customer));
        if a != b {
            mismatches.push(format!(
                "{customer}:\n  ours:   {}\n  theirs: {}",
                serde_json::to_string(&a).unwrap(),
                serde_json::to_string(&b).unwrap()
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} customers' changes differ:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(5)].join("\n")
    );

    // Final state of every customer.
    let expected_customers = expected_final["customers"].as_object().expect("customers");
    let mut ids = engine.customer_ids().expect("ids");
    ids.sort();
    let mut expected_ids: Vec<&String> = expected_customers.keys().collect();
    expected_ids.sort();
    assert_eq!(ids.iter().collect::<Vec<_>>(), expected_ids, "customer ids");
    let mut differ = Vec::new();
    for (id, expected) in expected_customers {
        let view = engine.customer(id).expect("read").expect("customer exists");
        let tags: serde_json::Map<String, Json> = view
            .tags
            .iter()
            .map(|(n, m)| {
                (
                    n.to_string(),
                    json!({ "since": m.since, "expires_at": m.expires_at }),
                )
            })
            .collect();
        let traits: serde_json::Map<String, Json> = view
            .traits
            .iter()
            .map(|(n, v)| (n.to_string(), conformance_value(v)))
            .collect();
        let profile: serde_json::Map<String, Json> = view
            .profile
            .iter()
            .map(|(n, v)| (n.to_string(), conformance_value(v)))
            .collect();
        let ours = json!({ "tags": tags, "traits": traits, "profile": profile });
        if &ours != expected {
            differ.push(format!("{id}:\n  ours:   {ours}\n  theirs: {expected}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{} customers differ:\n{}",
        differ.len(),
        differ[..differ.len().min(5)].join("\n")
    );

    for (segment, members) in expected_final["segments"].as_object().expect("segments") {
        let mut ours: Vec<String> = engine
            .members(segment)
            .expect("members")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ours.sort();
        let theirs: Vec<String> = members
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ours, theirs, "members of {segment}");
    }
}

#[test]
fn example_rules_match_the_reference_outputs() {
    run("example", 100_000);
}

/// Customers evicted from the cache and loaded back from RocksDB between batches give the
/// same outputs.
#[test]
fn example_rules_match_with_a_customer_cache_of_three() {
    run("example", 3);
}

/// A memory budget of 64 KiB: customers with a long history are evicted after every batch
/// and read back from RocksDB, which must not change a thing.
#[test]
fn example_rules_match_with_a_tiny_memory_budget() {
    run_with_memory("example", 100_000, 64 << 10);
}

#[test]
fn lead_scoring_rules_match_the_reference_outputs() {
    run("lead_scoring", 100_000);
}

/// Customers spread over partitions and shards evaluated in parallel: the same outputs.
#[test]
fn both_rule_sets_match_with_two_and_four_workers() {
    for (workers, partitions) in [(2, 12), (4, 6), (4, 16)] {
        run_sharded(
            "example",
            100_000,
            EngineConfig::default().cache_bytes,
            workers,
            partitions,
        );
        run_sharded(
            "lead_scoring",
            3,
            EngineConfig::default().cache_bytes,
            workers,
            partitions,
        );
    }
}
