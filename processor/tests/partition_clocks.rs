//! A clock per partition (`EngineConfig::clock_per_partition`, issue #21): in event clock
//! mode each partition's customers are judged by the greatest `ts` of that partition's own
//! events, so what they become depends on their partition's events in order and on nothing
//! else — not on how other partitions' events interleave with them, not on which store
//! judged which part. That is what lets a partition move between nodes mid-stream and carry
//! on as one store would have.

use std::collections::BTreeMap;

use processor::changelog::{Delta, Restore};
use processor::partition::partition_of;
use processor::{ClockMode, Engine, EngineConfig};
use tests::TempDir;

#[path = "support/moves.rs"]
#[allow(dead_code)]
mod moves;
use moves::{changes_by_customer, ingest_all, rules_text, views};

const PARTITIONS: u32 = 4;

fn config(workers: usize, per_partition: bool) -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        workers,
        partitions: PARTITIONS,
        changelog: true,
        clock_per_partition: per_partition,
        ..Default::default()
    }
}

/// The conformance stream in its own order (late events and all), with each event's
/// partition.
fn stream() -> Vec<(u32, String)> {
    let raw = std::fs::read(tests::conformance_dir().join("events.ndjson")).unwrap();
    raw.split(|b| *b == b'\n')
        .filter_map(|line| {
            // (Its lines that are not UTF-8 are rejected wherever they go: left out.)
            let line = std::str::from_utf8(line).ok()?;
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let customer = rules::normalize(v.get("customer_id")?.as_str()?).into_owned();
            (!customer.is_empty()).then(|| (partition_of(customer.as_bytes(), PARTITIONS), line.to_owned()))
        })
        .collect()
}

/// An instant after every event's `ts` and every ttl the rules name.
fn the_end(stream: &[(u32, String)]) -> i64 {
    let last = stream
        .iter()
        .filter_map(|(_, l)| serde_json::from_str::<serde_json::Value>(l).ok()?["ts"].as_i64())
        .max()
        .unwrap();
    last + 400 * 86_400_000
}

/// The same events, each partition's in their order, the partitions one after another
/// (last first): as far from the stream's own interleaving as it gets.
fn partition_after_partition(stream: &[(u32, String)]) -> Vec<(u32, String)> {
    let mut out = Vec::with_capacity(stream.len());
    for p in (0..PARTITIONS).rev() {
        out.extend(stream.iter().filter(|(q, _)| *q == p).cloned());
    }
    out
}

/// Every customer's view and changes after the stream, read at `end`.
type Outcome = (
    BTreeMap<String, processor::CustomerView>,
    BTreeMap<String, Vec<String>>,
);

fn run(dir: &std::path::Path, config: EngineConfig, lines: &[(u32, String)], end: i64) -> Outcome {
    let mut engine = Engine::open(dir, Some(&rules_text()), config).unwrap();
    ingest_all(&mut engine, lines.iter().map(|(_, l)| l));
    engine.advance_clock(end).unwrap();
    let ids = engine.customer_ids().unwrap();
    (views(&engine, &ids), changes_by_customer(&engine, 0))
}

#[test]
fn each_partition_is_judged_by_its_own_clock_whatever_the_interleaving() {
    let stream = stream();
    let end = the_end(&stream);
    let reordered = partition_after_partition(&stream);
    let dir = TempDir::new("partition-clocks");
    let as_sent = run(&dir.path().join("a"), config(1, true), &stream, end);
    let apart = run(&dir.path().join("b"), config(2, true), &reordered, end);
    assert!(as_sent.1.len() > 20, "{} customers changed", as_sent.1.len());
    assert_eq!(as_sent.1, apart.1, "each customer's changes");
    assert_eq!(as_sent.0, apart.0, "each customer's view");

    // With one clock for the store the order matters: the test's stream is one where it
    // does (every partition's events but the first are late in the second order).
    let one_clock = run(&dir.path().join("c"), config(1, false), &stream, end);
    let one_clock_apart = run(&dir.path().join("d"), config(1, false), &reordered, end);
    assert_ne!(one_clock.1, one_clock_apart.1);
}

#[test]
fn a_partition_moves_with_its_clock_and_keeps_it_across_restarts() {
    let stream = stream();
    let end = the_end(&stream);
    let moved = 2u32;
    let (first, second) = stream.split_at(stream.len() / 2);
    let dir = TempDir::new("partition-clock-moves");

    // The source judges the first half; its other partitions' clocks are its own.
    let mut source = Engine::open(&dir.path().join("source"), Some(&rules_text()), config(2, true)).unwrap();
    ingest_all(&mut source, first.iter().map(|(_, l)| l));
    let clocks: Vec<Option<i64>> = (0..PARTITIONS).map(|p| source.clock_of(p)).collect();
    let greatest = |p: u32, lines: &[(u32, String)]| {
        lines
            .iter()
            .filter(|(q, _)| *q == p)
            .filter_map(|(_, l)| serde_json::from_str::<serde_json::Value>(l).ok()?["ts"].as_i64())
            .max()
    };
    for p in 0..PARTITIONS {
        assert_eq!(clocks[p as usize], greatest(p, first), "partition {p}'s clock");
    }
    assert_eq!(source.clock(), clocks.iter().flatten().copied().max());
    assert!(
        clocks.iter().flatten().any(|c| Some(*c) < source.clock()),
        "the partitions' clocks differ: {clocks:?}"
    );
    let mut restore = Restore::new(moved, PARTITIONS);
    for (_, bytes) in source.reader().changelog_deltas(moved, 0, usize::MAX).unwrap() {
        restore.add(Delta::decode(&bytes).unwrap()).unwrap();
    }

    // Another store, its clock far ahead of the moved partition's (it judged every other
    // partition's events of the whole stream), restores the partition and judges the rest
    // of its events: at the partition's clock, as the source does.
    let mut there = Engine::open(&dir.path().join("there"), Some(&rules_text()), config(1, true)).unwrap();
    ingest_all(
        &mut there,
        stream.iter().filter(|(p, _)| *p != moved).map(|(_, l)| l),
    );
    assert!(there.clock() > clocks[moved as usize], "the store is ahead");
    there.restore_partition(&restore).unwrap();
    assert_eq!(there.clock_of(moved), clocks[moved as usize]);
    let seq = there.next_seq() - 1;
    let rest: Vec<&String> = second
        .iter()
        .filter(|(p, _)| *p == moved)
        .map(|(_, l)| l)
        .collect();
    assert!(rest.len() > 20, "{} events after the move", rest.len());
    // Some of the rest before a restart, the others after.
    let (before_restart, after_restart) = rest.split_at(rest.len() / 3);
    ingest_all(&mut there, before_restart.iter().copied());
    // Reopened: every clock as it was.
    let before: Vec<Option<i64>> = (0..PARTITIONS).map(|p| there.clock_of(p)).collect();
    drop(there);
    let mut there = Engine::open(&dir.path().join("there"), None, config(2, true)).unwrap();
    assert_eq!(
        (0..PARTITIONS).map(|p| there.clock_of(p)).collect::<Vec<_>>(),
        before
    );
    ingest_all(&mut there, after_restart.iter().copied());
    ingest_all(&mut source, second.iter().map(|(_, l)| l));
    source.advance_clock(end).unwrap();
    there.advance_clock(end).unwrap();

    let of_moved = |id: &String| partition_of(id.as_bytes(), PARTITIONS) == moved;
    let ids: Vec<String> = source
        .customer_ids()
        .unwrap()
        .into_iter()
        .filter(of_moved)
        .collect();
    assert_eq!(views(&there, &ids), views(&source, &ids));
    let mut expected = changes_by_customer(&source, 0);
    expected.retain(|id, _| of_moved(id));
    let mut theirs = changes_by_customer(&there, seq);
    theirs.retain(|id, _| of_moved(id));
    // After the move, the moved customers' changes there are the source's last ones.
    assert!(!theirs.is_empty());
    for (id, changes) in &theirs {
        let all = &expected[id];
        assert!(
            all.ends_with(changes),
            "{id}: after the move {changes:#?}\nthe source: {all:#?}"
        );
    }

    // Each change carries its partition and its number among that partition's changes,
    // which the partition's state carries: the moved customers' changes after the move
    // have the numbers the source gave the same changes, and the source's run 1, 2, … with
    // no gap.
    let numbered = |engine: &Engine, after: u64| -> BTreeMap<(u32, u64), String> {
        engine
            .changes(after, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|c| of_moved(&c.customer_id.to_string()))
            .map(|c| {
                let change = format!("{} {:?} {} {:?} {}", c.customer_id, c.kind, c.name, c.op, c.at);
                (c.pseq.expect("numbered in its partition"), change)
            })
            .collect()
    };
    let ours = numbered(&source, 0);
    let pseqs: Vec<u64> = ours
        .keys()
        .map(|(p, n)| {
            assert_eq!(*p, moved);
            *n
        })
        .collect();
    assert_eq!(pseqs, (1..=pseqs.len() as u64).collect::<Vec<_>>());
    let after_move = numbered(&there, seq);
    assert!(after_move.len() > 5, "{after_move:?}");
    for (pseq, change) in &after_move {
        assert_eq!(ours.get(pseq), Some(change), "{pseq:?}");
    }

    // Dropped, the partition's clock goes with it; the others stay.
    there.drop_partition(moved).unwrap();
    assert_eq!(there.clock_of(moved), None);
    assert_eq!(there.clock_of(moved ^ 1), Some(end));
}

/// Ad-hoc queries — and so a saved segment's first fill and the group's counts — judge a
/// time-dependent condition for each partition's customers at that partition's clock: what
/// a query finds in a store with a clock per partition is what it finds in stores holding
/// one partition each, with their one clock.
#[test]
fn a_query_judges_each_partition_at_its_own_clock() {
    let stream = stream();
    let dir = TempDir::new("partition-clocks-query");
    let mut engine = Engine::open(dir.path(), Some(&rules_text()), config(2, true)).unwrap();
    ingest_all(&mut engine, stream.iter().map(|(_, l)| l));
    let clocks: std::collections::BTreeSet<Option<i64>> =
        (0..PARTITIONS).map(|p| engine.clock_of(p)).collect();
    assert!(clocks.len() > 1, "the partitions' clocks differ: {clocks:?}");
    let alone: Vec<(Engine, TempDir)> = (0..PARTITIONS)
        .map(|p| {
            let dir = TempDir::new(&format!("partition-clocks-query-{p}"));
            let mut one = Engine::open(dir.path(), Some(&rules_text()), config(1, false)).unwrap();
            ingest_all(&mut one, stream.iter().filter(|(q, _)| *q == p).map(|(_, l)| l));
            (one, dir)
        })
        .collect();
    for expr in [
        "count(view, 1d) >= 1",
        "count(app_open, 7d) >= 2 and not count(payment, 30d) >= 1",
    ] {
        let found: std::collections::BTreeSet<String> = engine
            .reader()
            .query(expr, 100_000, None)
            .unwrap()
            .customers
            .into_iter()
            .collect();
        let expected: std::collections::BTreeSet<String> = alone
            .iter()
            .flat_map(|(one, _)| one.reader().query(expr, 100_000, None).unwrap().customers)
            .collect();
        assert!(!expected.is_empty(), "{expr} finds someone");
        assert_eq!(found, expected, "{expr}");
    }
}
