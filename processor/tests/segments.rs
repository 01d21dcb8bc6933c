//! Ad-hoc segment queries through the membership index against brute force: every customer
//! looked at one by one, the expression judged on what `GET /v1/customers/{id}` shows
//! (tags, segments, traits, profile). Random streams, random expressions mixing tags,
//! segments, `not`, trait comparisons and profile conditions, answered from the profile
//! columns or (attributes beyond the column limit) the records, before and after a restart.
//! Also: the index and its columns survive a restart from an old checkpoint (replaying the
//! change log and the profile journal) and from no checkpoint at all.

use std::collections::BTreeSet;

use processor::{ClockMode, CustomerView, Engine, EngineConfig, EngineError};
use proptest::prelude::*;
use rules::Value;
use tests::TempDir;

const BASE: i64 = 1_740_000_000_000;

const RULES: &str = r#"
trait views = count(view, 60s)
trait spend = sum(payment.amount, 120s)
tag viewer = views >= 1
tag buyer = count(payment, lifetime) >= 1
tag big = spend >= 100
tag seafood on view where p == "x" ttl 30s
segment vip_buyers = buyer and profile.vip == true
trait home = profile.city
"#;

fn config() -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        ..Default::default()
    }
}

fn config_with_columns(profile_columns: usize) -> EngineConfig {
    EngineConfig {
        profile_columns,
        ..config()
    }
}

/// An expression as text and as a tree the brute force judges.
#[derive(Debug, Clone)]
enum Expr {
    Member(&'static str),
    ViewsAtLeast(u8),
    SpendBelow(u16),
    City(&'static str),
    Home(&'static str),
    HasVip,
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

impl Expr {
    fn text(&self) -> String {
        match self {
            Expr::Member(n) => (*n).to_owned(),
            Expr::ViewsAtLeast(k) => format!("views >= {k}"),
            Expr::SpendBelow(k) => format!("spend < {k}"),
            Expr::City(c) => format!("profile.city == \"{c}\""),
            Expr::Home(c) => format!("home == \"{c}\""),
            Expr::HasVip => "has(profile.vip)".to_owned(),
            Expr::Not(e) => format!("not ({})", e.text()),
            Expr::And(a, b) => format!("({}) and ({})", a.text(), b.text()),
            Expr::Or(a, b) => format!("({}) or ({})", a.text(), b.text()),
        }
    }

    fn holds(&self, c: &CustomerView) -> bool {
        let number = |name: &str| match c.traits.get(name) {
            Some(Value::Num(n)) => Some(*n),
            _ => None,
        };
        match self {
            Expr::Member(n) => c.tags.contains_key(*n) || c.segments.contains_key(*n),
            Expr::ViewsAtLeast(k) => number("views").is_some_and(|v| v >= (*k).into()),
            Expr::SpendBelow(k) => number("spend").is_some_and(|v| v < (*k).into()),
            Expr::City(city) => c.profile.get("city") == Some(&Value::str(city)),
            Expr::Home(city) => c.traits.get("home") == Some(&Value::str(city)),
            Expr::HasVip => c.profile.contains_key("vip"),
            Expr::Not(e) => !e.holds(c),
            Expr::And(a, b) => a.holds(c) && b.holds(c),
            Expr::Or(a, b) => a.holds(c) || b.holds(c),
        }
    }
}

fn expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        4 => prop::sample::select(vec!["viewer", "buyer", "big", "seafood", "vip_buyers"]).prop_map(Expr::Member),
        1 => (0u8..4).prop_map(Expr::ViewsAtLeast),
        1 => (0u16..200).prop_map(Expr::SpendBelow),
        1 => prop::sample::select(vec!["杭州", "上海"]).prop_map(Expr::City),
        1 => prop::sample::select(vec!["杭州", "北京"]).prop_map(Expr::Home),
        1 => Just(Expr::HasVip),
    ];
    leaf.prop_recursive(4, 16, 2, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Expr::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner).prop_map(|(a, b)| Expr::Or(Box::new(a), Box::new(b))),
        ]
    })
}

/// Events over 40 customers and five minutes: views, payments, profile changes (a city of
/// "" deletes the attribute).
fn stream() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        (
            0u8..40,
            prop::sample::select(vec!["view", "payment", "call"]),
            0i64..300,
            prop::sample::select(vec!["x", "y"]),
            0u8..120,
            prop::option::weighted(0.3, prop::sample::select(vec!["杭州", "上海", "北京", ""])),
            prop::option::weighted(0.2, any::<bool>()),
        ),
        1..150,
    )
    .prop_map(|items| {
        items
            .into_iter()
            .map(|(c, t, s, p, amount, city, vip)| {
                let mut profile = serde_json::Map::new();
                match city {
                    Some("") => {
                        profile.insert("city".into(), serde_json::Value::Null);
                    }
                    Some(city) => {
                        profile.insert("city".into(), city.into());
                    }
                    None => {}
                }
                if let Some(vip) = vip {
                    profile.insert("vip".into(), vip.into());
                }
                serde_json::json!({
                    "customer_id": format!("cust-{c:02}"),
                    "type": t,
                    "ts": BASE + s * 1000,
                    "props": {"p": p, "amount": amount},
                    "profile": profile,
                })
                .to_string()
            })
            .collect()
    })
}

/// Every member of a query, paging with a small limit, and the count it reported.
fn query_all(engine: &Engine, expr: &str) -> (usize, Vec<String>) {
    let mut all = Vec::new();
    let mut cursor = None;
    let mut count = None;
    loop {
        let page = engine.query(expr, 7, cursor.as_deref()).expect("the query runs");
        assert!(page.customers.len() <= 7);
        assert!(
            count.is_none_or(|c| c == page.count),
            "the count stays put while paging"
        );
        count = Some(page.count);
        all.extend(page.customers);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    all.sort();
    (count.unwrap_or(0), all)
}

/// [`query_all`] over some partitions only, as a node of a cluster answers: pages in id
/// order, each cursor the last id.
fn query_partitions_all(engine: &Engine, expr: &str, partitions: &[u32]) -> (usize, Vec<String>) {
    let reader = engine.reader();
    let mut all: Vec<String> = Vec::new();
    let mut count = None;
    loop {
        let page = reader
            .query_partitions(expr, 5, all.last().map(String::as_str), partitions)
            .expect("the query runs");
        assert!(page.customers.len() <= 5);
        assert!(
            count.is_none_or(|c| c == page.count),
            "the count stays put while paging"
        );
        count = Some(page.count);
        all.extend(page.customers);
        if !page.more {
            break;
        }
    }
    (count.unwrap_or(0), all)
}

fn brute_force(engine: &Engine, expr: &Expr) -> Vec<String> {
    engine
        .customer_ids()
        .unwrap()
        .into_iter()
        .filter(|id| expr.holds(&engine.customer(id).unwrap().unwrap()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn queries_equal_brute_force(
        events in stream(),
        exprs in prop::collection::vec(expr(), 6),
        later in 0i64..200,
        profile_columns in 0usize..4,
        restart in any::<bool>(),
    ) {
        let dir = TempDir::new("segments");
        let config = config_with_columns(profile_columns);
        let mut engine = Engine::open(dir.path(), Some(RULES), config.clone()).unwrap();
        let (first, second) = events.split_at(events.len() / 2);
        engine.ingest(first).unwrap();
        if restart {
            // The columns come back from the checkpoint written at close.
            drop(engine);
            engine = Engine::open(dir.path(), None, config).unwrap();
        }
        // Queries fill the trait cache; later events (new generations) and time alone (past
        // a value's next change) must void what they filled.
        let check = |engine: &Engine| -> Result<(), TestCaseError> {
            let partitions = engine.reader().partitions();
            let some: Vec<u32> = (0..partitions).filter(|p| !(p + later as u32).is_multiple_of(3)).collect();
            for e in &exprs {
                let (count, members) = query_all(engine, &e.text());
                let expected = brute_force(engine, e);
                prop_assert_eq!(&members, &expected, "{}", e.text());
                prop_assert_eq!(count, expected.len(), "{}", e.text());
                // Over some partitions, in id order (brute force's order: ids sorted).
                let (count, members) = query_partitions_all(engine, &e.text(), &some);
                let expected: Vec<String> = expected
                    .into_iter()
                    .filter(|id| some.contains(&processor::partition::partition_of(id.as_bytes(), partitions)))
                    .collect();
                prop_assert_eq!(&members, &expected, "{} over {:?}", e.text(), some);
                prop_assert_eq!(count, expected.len(), "{} over {:?}", e.text(), some);
            }
            // A tag's or segment's members over some partitions, in id order, in pages.
            for name in ["viewer", "buyer", "vip_buyers"] {
                let set = engine.reader().member_set(name).unwrap();
                let mut members: Vec<String> = Vec::new();
                loop {
                    let (page, more) = engine.reader().members_in_partitions(&set, members.last().map(String::as_str), 3, &some);
                    prop_assert!(page.len() <= 3);
                    members.extend(page.iter().map(str::to_owned));
                    if !more {
                        break;
                    }
                }
                let mut expected: Vec<String> = engine
                    .customer_ids()
                    .unwrap()
                    .into_iter()
                    .filter(|id| {
                        let view = engine.customer(id).unwrap().unwrap();
                        view.tags.contains_key(name) || view.segments.contains_key(name)
                    })
                    .filter(|id| some.contains(&processor::partition::partition_of(id.as_bytes(), partitions)))
                    .collect();
                expected.sort();
                prop_assert_eq!(&members, &expected, "{} over {:?}", name, some);
            }
            Ok(())
        };
        check(&engine)?;
        engine.ingest(second).unwrap();
        check(&engine)?;
        // Time alone moves some customers out of windows and ttls.
        engine.advance_clock(BASE + (300 + later) * 1000).unwrap();
        check(&engine)?;
        // Exports follow the same bitmaps.
        for name in ["viewer", "buyer", "big", "seafood", "vip_buyers"] {
            let members = member_ids(&engine, name);
            let expected: BTreeSet<String> = brute_force(&engine, &Expr::Member(name)).into_iter().collect();
            prop_assert_eq!(members, expected, "{}", name);
        }
    }
}

#[test]
fn remembered_trait_values_end_with_the_rules_that_computed_them() {
    let dir = TempDir::new("trait-cache");
    let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
    let views: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"customer_id":"c{i}","type":"view","ts":{},"props":{{"p":"y"}}}}"#,
                BASE + i * 1000
            )
        })
        .collect();
    engine.ingest(&views).unwrap();
    // Within 60 s of the last view (19 s) every view counts; twice, the second from the cache.
    assert_eq!(engine.query("views >= 1", 100, None).unwrap().count, 20);
    assert_eq!(engine.query("views >= 1", 100, None).unwrap().count, 20);
    // The same trait over 5 s: only the views of the last five seconds, at once (before
    // the backfill touches anyone) and after it.
    engine
        .replace_rules(&RULES.replace("count(view, 60s)", "count(view, 5s)"))
        .unwrap();
    assert_eq!(engine.query("views >= 1", 100, None).unwrap().count, 5);
    while engine.backfill_pending() {
        engine.backfill_step(1_000).unwrap();
    }
    assert_eq!(engine.query("views >= 1", 100, None).unwrap().count, 5);
}

/// The ids of `name`'s members, from the engine.
fn member_ids(engine: &Engine, name: &str) -> BTreeSet<String> {
    engine
        .members(name)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// The members of `name` by folding its changes in the change log.
fn members_from_log(engine: &Engine, name: &str) -> BTreeSet<String> {
    let mut members = BTreeSet::new();
    for c in engine.changes(0, usize::MAX).unwrap() {
        if *c.name == *name {
            match c.op {
                processor::Op::Add => assert!(
                    members.insert(c.customer_id.to_string()),
                    "adds and removes alternate"
                ),
                processor::Op::Remove => {
                    assert!(members.remove(&*c.customer_id), "adds and removes alternate")
                }
                op => panic!("no identity changes in these streams: {op:?}"),
            }
        }
    }
    members
}

fn settle(engine: &mut Engine) {
    while engine.backfill_pending() {
        engine.backfill_step(1000).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// A segment saved at runtime holds exactly the customers its expression selects, at
    /// once and after more events and time; every enter and exit is in the change log.
    #[test]
    fn saved_segments_follow_their_expression(
        before in stream(),
        after in stream(),
        first in expr(),
        second in expr(),
        segment_round in prop_oneof![Just(1usize), Just(3), Just(50_000)],
    ) {
        let dir = TempDir::new("saved-segments");
        let config = EngineConfig { segment_round, ..config() };
        let mut engine = Engine::open(dir.path(), Some(RULES), config).unwrap();
        engine.ingest(&before).unwrap();
        engine.advance_clock(BASE + 300_000).unwrap();
        for (step, e) in [&first, &second].into_iter().enumerate() {
            engine.put_segment("audience", &e.text()).unwrap();
            settle(&mut engine);
            let members = member_ids(&engine, "audience");
            let expected: BTreeSet<String> = brute_force(&engine, e).into_iter().collect();
            prop_assert_eq!(&members, &expected, "step {}: {}", step, e.text());
            prop_assert_eq!(members_from_log(&engine, "audience"), expected);
        }
        // Maintained as events and time go on.
        // Late events (before the clock) and time.
        engine.ingest(&after).unwrap();
        engine.advance_clock(BASE + 900_000).unwrap();
        let members = member_ids(&engine, "audience");
        let expected: BTreeSet<String> = brute_force(&engine, &second).into_iter().collect();
        prop_assert_eq!(&members, &expected, "{}", second.text());
        prop_assert_eq!(members_from_log(&engine, "audience"), expected);
        // Deleting it: everyone exits.
        engine.delete_segment("audience").unwrap();
        settle(&mut engine);
        prop_assert!(engine.members("audience").unwrap().is_empty());
        prop_assert!(members_from_log(&engine, "audience").is_empty());
    }
}

/// A saved segment that moves more customers than a round holds commits its rule text
/// first and fills round by round, each round judging its customers as they are then:
/// events applied between rounds count, a restart resumes where the last round committed,
/// and every customer's enter or exit is in the change log once. Segments are edited one at
/// a time meanwhile; a full rule change takes the fill over.
#[test]
fn a_segment_moving_more_customers_than_a_round_fills_round_by_round() {
    let dir = TempDir::new("saved-segments-rounds");
    let config = || EngineConfig {
        segment_round: 4,
        ..config()
    };
    let profile = |i: usize, level: &str, second: i64| {
        format!(
            r#"{{"customer_id":"c{i:02}","type":"view","ts":{},"profile":{{"level":"{level}"}}}}"#,
            BASE + second * 1000
        )
    };
    let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
    // c00..c19, every other one gold.
    let first: Vec<String> = (0..20)
        .map(|i| profile(i, if i % 2 == 0 { "gold" } else { "silver" }, 1))
        .collect();
    engine.ingest(&first).unwrap();

    let update = engine.put_segment("gold", r#"profile.level == "gold""#).unwrap();
    assert_eq!(
        update,
        processor::SegmentUpdate::Backfill,
        "10 enter, rounds of 4"
    );
    assert!(
        engine.members("gold").unwrap().is_empty(),
        "nobody before the first round"
    );
    let progress = engine.backfill_progress().unwrap();
    assert_eq!((progress.customers_done, progress.customers_estimated), (0, 20));
    let refused = engine.put_segment("other", "buyer").unwrap_err().to_string();
    assert!(refused.contains("still being filled"), "{refused}");
    assert!(engine
        .delete_segment("gold")
        .unwrap_err()
        .to_string()
        .contains("still being filled"));

    assert_eq!(engine.backfill_step(1_000).unwrap(), 2, "c00..c03: two enter");
    // Between rounds: c16 (not judged yet) leaves gold, c17 becomes gold, c00 (judged)
    // leaves it.
    let moved = [
        profile(16, "silver", 2),
        profile(17, "gold", 2),
        profile(0, "silver", 2),
    ];
    engine.ingest(&moved).unwrap();
    engine.backfill_step(1_000).unwrap();
    // A restart between rounds resumes at the next one.
    drop(engine);
    let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
    assert!(engine.backfill_pending());
    assert_eq!(engine.backfill_progress().unwrap().customers_done, 8);
    settle(&mut engine);
    assert!(engine.backfill_progress().is_none());

    let gold: BTreeSet<String> = [2, 4, 6, 8, 10, 12, 14, 17, 18]
        .iter()
        .map(|i| format!("c{i:02}"))
        .collect();
    let members = member_ids(&engine, "gold");
    assert_eq!(members, gold);
    assert_eq!(
        members_from_log(&engine, "gold"),
        gold,
        "each enter and exit logged once"
    );
    assert_eq!(engine.query("gold", 100, None).unwrap().count, gold.len());

    // Deleting it moves 9 customers: rounds again, then everyone is out.
    assert_eq!(
        engine.delete_segment("gold").unwrap(),
        processor::SegmentUpdate::Backfill
    );
    settle(&mut engine);
    assert!(engine.members("gold").unwrap().is_empty());
    assert!(members_from_log(&engine, "gold").is_empty());

    // A full rule change while a segment fills takes it over: the sweep judges everyone.
    engine
        .put_segment("silver", r#"profile.level == "silver""#)
        .unwrap();
    assert!(engine.backfill_progress().is_some());
    let text = format!("{RULES}segment silver = profile.level == \"silver\"\n");
    engine.replace_rules(&text).unwrap();
    settle(&mut engine);
    let silver = member_ids(&engine, "silver");
    assert_eq!(silver.len(), 11, "{silver:?}");
    assert_eq!(members_from_log(&engine, "silver"), silver);
    engine.put_segment("other", "buyer").unwrap();
}

#[test]
fn saved_segments_refuse_what_they_cannot_do() {
    let dir = TempDir::new("saved-segments-errors");
    let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
    let err = |r: Result<processor::SegmentUpdate, processor::QueryError>| r.unwrap_err().to_string();
    assert!(err(engine.put_segment("viewer", "buyer")).contains("is a tag"));
    assert!(err(engine.put_segment("9lives", "buyer")).contains("not a valid name"));
    match engine.put_segment("x", "buyer and nope").unwrap_err() {
        processor::QueryError::Invalid(d) => assert!(d[0].message.contains("nope"), "{d:?}"),
        other => panic!("{other}"),
    }
    engine.put_segment("base", "buyer").unwrap();
    engine.put_segment("uses_base", "base and viewer").unwrap();
    assert!(engine
        .delete_segment("base")
        .unwrap_err()
        .to_string()
        .contains("used by uses_base"));
    assert!(matches!(
        engine.delete_segment("nothing"),
        Err(EngineError::NotFound(_))
    ));
    // The rules text keeps every other definition as written.
    assert!(engine
        .rules()
        .source()
        .contains("tag seafood on view where p == \"x\" ttl 30s"));
    assert_eq!(engine.saved_segments().len(), 3);
}

fn snapshot_of(engine: &Engine) -> Vec<(String, Vec<String>)> {
    ["viewer", "buyer", "big", "seafood", "vip_buyers"]
        .iter()
        .map(|n| {
            let mut ids: Vec<String> = engine.members(n).unwrap().into_iter().map(|(id, _)| id).collect();
            ids.sort();
            (n.to_string(), ids)
        })
        .collect()
}

fn batch(from: usize, to: usize, second: i64) -> Vec<String> {
    (from..to)
        .map(|i| {
            let t = if i % 3 == 0 { "payment" } else { "view" };
            format!(
                r#"{{"customer_id":"c{i}","type":"{t}","ts":{},"props":{{"p":"x","amount":150}},"profile":{{"vip":true}}}}"#,
                BASE + second * 1000
            )
        })
        .collect()
}

#[test]
fn the_index_comes_back_from_an_old_checkpoint_and_from_none() {
    let dir = TempDir::new("index-restart");
    let mut old_checkpoint;
    {
        let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
        engine.ingest(&batch(0, 50, 0)).unwrap();
        engine.checkpoint_index().unwrap();
        old_checkpoint = dump_index(&engine);
        engine.ingest(&batch(30, 90, 10)).unwrap();
        // Profile changes after the checkpoint reach the columns through the journal.
        let demoted: Vec<String> = (0..10)
            .map(|i| {
                format!(
                    r#"{{"customer_id":"c{i}","type":"call","ts":{},"profile":{{"vip":false,"tier":{i}}}}}"#,
                    BASE + 20_000
                )
            })
            .collect();
        engine.ingest(&demoted).unwrap();
        engine.advance_clock(BASE + 30_000).unwrap();
        // What a crash here would leave: the old checkpoint and the profile journal written
        // since (closing checkpoints, and so clears the journal).
        let journal = processor::columns::keys::JOURNAL;
        old_checkpoint.retain(|(k, _)| !k.starts_with(journal));
        old_checkpoint.extend(
            dump_index(&engine)
                .into_iter()
                .filter(|(k, _)| k.starts_with(journal)),
        );
        assert!(old_checkpoint.iter().any(|(k, _)| k.starts_with(journal)));
    }
    let profile_counts = |engine: &Engine| {
        [
            "profile.vip == false",
            "has(profile.vip)",
            "profile.tier >= 5",
            "buyer and profile.tier < 3",
        ]
        .map(|q| engine.query(q, 1, None).unwrap().count)
    };
    let expected = {
        let engine = Engine::open(dir.path(), None, config()).unwrap();
        let activity = activity_of(&engine);
        assert!(activity.values().any(|(_, left)| *left > 0), "{activity:?}");
        assert_eq!(activity, activity_from_log(&engine));
        let snapshot = snapshot_of(&engine);
        assert!(snapshot.iter().all(|(_, ids)| !ids.is_empty()), "{snapshot:?}");
        assert_eq!(
            engine
                .query("vip_buyers and not seafood", 100, None)
                .unwrap()
                .count,
            26
        );
        assert_eq!(profile_counts(&engine), [10, 90, 5, 1]);
        snapshot
    };

    // Put the first checkpoint back: opening replays every change made after it.
    {
        let store = processor::store::Store::open(dir.path(), false, retention()).unwrap();
        restore_index(&store, &old_checkpoint);
    }
    let engine = Engine::open(dir.path(), None, config()).unwrap();
    assert_eq!(snapshot_of(&engine), expected);
    assert_eq!(profile_counts(&engine), [10, 90, 5, 1]);
    // Enters and exits per hour: the checkpoint's plus the replayed changes', each once.
    assert_eq!(activity_of(&engine), activity_from_log(&engine));
    drop(engine);

    // No checkpoint at all (a store from before the index): one scan rebuilds it.
    {
        let store = processor::store::Store::open(dir.path(), false, retention()).unwrap();
        restore_index(&store, &[]);
    }
    let mut engine = Engine::open(dir.path(), None, config()).unwrap();
    assert_eq!(snapshot_of(&engine), expected);
    assert_eq!(profile_counts(&engine), [10, 90, 5, 1]);
    // A rebuilt index counts activity afresh, from the changes after it.
    assert!(activity_of(&engine).is_empty());
    // New customers keep getting fresh numbers after a rebuild.
    engine.ingest(&batch(90, 95, 60)).unwrap();
    let viewers = engine.members("viewer").unwrap();
    assert!(viewers.iter().any(|(id, _)| id == "c94"));
    assert_eq!(engine.reader().index().read().customers(), 95);
}

type Activity = std::collections::BTreeMap<(String, i64), (u64, u64)>;

/// Enters and exits per definition and hour, as `GET /v1/definitions` lists them.
fn activity_of(engine: &Engine) -> Activity {
    let mut out = Activity::new();
    for def in engine.reader().definitions(processor::index::ACTIVITY_HOURS) {
        for h in def.activity {
            out.insert((def.name.clone(), h.hour), (h.entered, h.left));
        }
    }
    out
}

/// The same counted from the change log.
fn activity_from_log(engine: &Engine) -> Activity {
    let mut out = Activity::new();
    for c in engine.changes(0, usize::MAX).unwrap() {
        let counts = out
            .entry((c.name.to_string(), c.at.div_euclid(3_600_000) * 3_600_000))
            .or_default();
        match c.op {
            processor::Op::Add => counts.0 += 1,
            processor::Op::Remove => counts.1 += 1,
            op => panic!("no identity changes in these streams: {op:?}"),
        }
    }
    out
}

fn retention() -> processor::store::Retention {
    processor::store::Retention {
        dedup_horizon_ms: i64::MAX,
        history_ms: i64::MAX,
        block_cache_bytes: 8 << 20,
        memtable_bytes: 8 << 20,
    }
}

type Raw = Vec<processor::store::KeyValue>;

fn dump_index(engine: &Engine) -> Raw {
    engine
        .store()
        .scan_from(processor::store::CF_INDEX, &[])
        .map(Result::unwrap)
        .collect()
}

/// Replaces the `index` column family's contents with `raw`.
fn restore_index(store: &processor::store::Store, raw: &[processor::store::KeyValue]) {
    let cf = processor::store::CF_INDEX;
    let mut wb = rocksdb::WriteBatch::default();
    for item in store.scan_from(cf, &[]) {
        wb.delete_cf(store.cf(cf), item.unwrap().0);
    }
    for (k, v) in raw {
        wb.put_cf(store.cf(cf), k, v);
    }
    store.commit(wb).unwrap();
}

/// Queries that read profile attributes are judged on the columns a block of 65,536
/// customers at a time, split over the machine's cores by candidate rank: 140,000 customers
/// span three blocks, and the candidates come as one long run (every customer), as every
/// other customer (a tag's members), and as nothing at all.
#[test]
fn column_scans_agree_across_blocks_and_threads() {
    const N: usize = 140_000;
    let dir = TempDir::new("column-blocks");
    let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
    let city = |i: usize| (!i.is_multiple_of(7)).then(|| ["a", "b", "c"][i % 3]);
    let lines: Vec<String> = (0..N)
        .map(|i| {
            let t = if i.is_multiple_of(2) { "payment" } else { "view" };
            let mut profile = serde_json::json!({ "tier": i % 10 });
            if let Some(c) = city(i) {
                profile["city"] = c.into();
            }
            serde_json::json!({
                "customer_id": format!("c{i}"), "type": t, "ts": BASE,
                "props": {"amount": 5}, "profile": profile,
            })
            .to_string()
        })
        .collect();
    for chunk in lines.chunks(20_000) {
        engine.ingest(chunk).unwrap();
    }
    let expect = |holds: &dyn Fn(usize) -> bool| -> BTreeSet<String> {
        (0..N).filter(|&i| holds(i)).map(|i| format!("c{i}")).collect()
    };
    let buyer = |i: usize| i.is_multiple_of(2);
    let cases: [(&str, BTreeSet<String>); 6] = [
        ("profile.city == \"a\"", expect(&|i| city(i) == Some("a"))),
        (
            "profile.city in [\"a\", \"b\"]",
            expect(&|i| matches!(city(i), Some("a" | "b"))),
        ),
        ("not profile.city == \"b\"", expect(&|i| city(i) != Some("b"))),
        (
            "buyer and profile.city == \"a\"",
            expect(&|i| buyer(i) && city(i) == Some("a")),
        ),
        (
            "profile.tier >= 5 and profile.city == \"c\" and not big",
            expect(&|i| i % 10 >= 5 && city(i) == Some("c")),
        ),
        ("big and profile.city == \"a\"", BTreeSet::new()),
    ];
    for (expr, expected) in cases {
        let page = engine.query(expr, N, None).unwrap();
        assert_eq!(page.count, expected.len(), "{expr}");
        let got: BTreeSet<String> = page.customers.into_iter().collect();
        assert!(
            got == expected,
            "{expr}: {} customers differ",
            got.symmetric_difference(&expected).count()
        );
    }
}
