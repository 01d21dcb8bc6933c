//! Identity resolution: events that carry overlapping identifiers (`ids`) end up on one
//! customer, and a merged customer is exactly what the same stream gives with every alias
//! renamed to the survivor — whatever the order of merges, the batching and the workers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use processor::{ClockMode, CustomerView, Engine, EngineConfig};
use proptest::prelude::*;
use tests::TempDir;

const BASE: i64 = 1_740_000_000_000;
const HOUR: i64 = 3_600_000;

const RULES: &str = r#"
tag big_spender = sum(payment.amount, 30d) >= 2000
tag active = count(app_open, 7d) >= 3
tag seafood on view where p == "seafood" ttl 2d
tag lapsed = since(payment) > 3d and count(payment, lifetime) >= 1
tag hangzhou = profile.city == "杭州"
trait spend = sum(payment.amount, lifetime)
trait last_viewed = last(view.p)
trait first_viewed = first(view.p)
segment vip = big_spender and active
segment quiet = not active
"#;

fn config(workers: usize) -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        workers,
        ..Default::default()
    }
}

fn open(dir: &TempDir, workers: usize) -> Engine {
    Engine::open(dir.path(), Some(RULES), config(workers)).unwrap()
}

/// [`open`] with the identity graph's cache holding at most `entries`: none, a few (so it
/// drops what it held and must read the store), or the default (the whole graph, so a key
/// it does not hold is known absent).
fn open_with_cache(dir: &TempDir, workers: usize, entries: usize) -> Engine {
    let mut config = config(workers);
    config.identity.cache_entries = entries;
    Engine::open(dir.path(), Some(RULES), config).unwrap()
}

/// One person's identifiers, each in two spellings that normalise alike.
fn identifiers(person: usize) -> Vec<(&'static str, [String; 2])> {
    let phone = format!("1380000{person:04}");
    let full_width: String = phone
        .chars()
        .map(|c| char::from_u32(c as u32 - '0' as u32 + '０' as u32).unwrap())
        .collect();
    vec![
        ("customer_id", [format!("c{person}"), format!("c{person}")]),
        ("phone", [format!("+86 {phone}"), format!("\u{200b}{full_width}")]),
        (
            "email",
            [
                format!("p{person}@example.com"),
                format!(" P{person}@Example.COM "),
            ],
        ),
        ("device_id", [format!("dev-{person}"), format!("dev-{person}")]),
        ("openid", [format!("o-{person}"), format!("o-{person}")]),
    ]
}

#[derive(Debug, Clone)]
struct Gen {
    person: usize,
    /// Which identifiers the event carries (bits over [`identifiers`]) and which spelling.
    carried: u8,
    spelling: bool,
    kind: u8,
    amount: u32,
    dt_minutes: i64,
    city: Option<bool>,
}

fn gen_event(persons: usize) -> impl Strategy<Value = Gen> {
    (
        0..persons,
        1u8..32,
        any::<bool>(),
        0u8..3,
        1u32..900,
        -600i64..1_500,
        prop::option::weighted(0.15, any::<bool>()),
    )
        .prop_map(
            |(person, carried, spelling, kind, amount, dt_minutes, city)| Gen {
                person,
                carried,
                spelling,
                kind,
                amount,
                dt_minutes,
                city,
            },
        )
}

/// The stream as JSON lines, each with the (type, normalised value) pairs it carried.
fn render(gens: &[Gen]) -> Vec<(String, Vec<(&'static str, String)>)> {
    let mut ts = BASE;
    let mut out = Vec::new();
    for (n, g) in gens.iter().enumerate() {
        // Mostly forward, sometimes late (out of order).
        ts = (ts + g.dt_minutes * 60_000).max(BASE);
        let all = identifiers(g.person);
        let mut ids = serde_json::Map::new();
        let mut customer_id = None;
        let mut carried = Vec::new();
        for (bit, (id_type, spellings)) in all.iter().enumerate() {
            if g.carried & (1 << bit) == 0 {
                continue;
            }
            let value = spellings[g.spelling as usize].clone();
            carried.push((*id_type, identifiers(g.person)[bit].1[0].clone()));
            if *id_type == "customer_id" {
                customer_id = Some(value);
            } else {
                ids.insert(id_type.to_string(), value.into());
            }
        }
        let (event_type, props) = match g.kind {
            0 => ("payment", serde_json::json!({"amount": g.amount})),
            1 => ("app_open", serde_json::json!({})),
            _ => (
                "view",
                serde_json::json!({"p": if g.amount % 3 == 0 { "seafood" } else { "shoes" }}),
            ),
        };
        let mut event = serde_json::json!({
            "event_id": format!("e{n}"),
            "type": event_type,
            "ts": ts,
            "props": props,
        });
        if !ids.is_empty() {
            event["ids"] = ids.into();
        }
        if let Some(c) = customer_id {
            event["customer_id"] = c.into();
        }
        if let Some(hz) = g.city {
            event["profile"] = serde_json::json!({"city": if hz { "杭州" } else { "上海" }});
        }
        out.push((event.to_string(), carried));
    }
    out
}

/// What the contract makes of a customer, without the instants memberships began (a merge
/// judges the survivor anew at the merge, so `since` is the merge's instant).
fn summary(view: &CustomerView) -> (BTreeSet<Arc<str>>, BTreeSet<Arc<str>>, String, String) {
    (
        view.tags.keys().cloned().collect(),
        view.segments.keys().cloned().collect(),
        format!("{:?}", view.traits),
        format!("{:?}", view.profile),
    )
}

fn ingest_in_batches(engine: &mut Engine, lines: &[String], cuts: &[usize]) {
    let mut start = 0;
    for &cut in cuts.iter().chain([&lines.len()]) {
        let end = cut.clamp(start, lines.len());
        if end > start {
            let outcome = engine.ingest(&lines[start..end]).unwrap();
            assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        }
        start = end;
    }
}

/// The normalised values of the stream's identifiers, for asking the graph.
fn ask(engine: &Engine, id_type: &str, value: &str) -> Arc<str> {
    engine
        .identify(id_type, value)
        .unwrap()
        .unwrap_or_else(|| panic!("{id_type} {value} is known"))
}

fn normalised(id_type: &str, value: &str) -> String {
    let config = processor::identity::IdentityConfig::default();
    let i = config.position(id_type).unwrap();
    config.types[i].normaliser.apply(value).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn merged_customers_are_the_stream_renamed_to_the_survivor(
        (gens, order) in prop::collection::vec(gen_event(4), 1..60).prop_flat_map(|gens| {
            let n = gens.len();
            (Just(gens), Just((0..n).collect::<Vec<usize>>()).prop_shuffle())
        }),
        shuffled in any::<bool>(),
        cuts in prop::collection::vec(0usize..60, 0..6),
        workers in 1usize..3,
        late_clock in prop::sample::select(vec![0i64, 5 * 24 * HOUR, 40 * 24 * HOUR]),
        cache_entries in prop::sample::select(vec![0usize, 6, 1_000_000]),
        reopen_at in prop::option::of(0usize..60),
    ) {
        // The same events, in the order made or delivered in another.
        let mut stream = render(&gens);
        if shuffled {
            stream = order.iter().map(|&i| stream[i].clone()).collect();
        }
        let lines: Vec<String> = stream.iter().map(|(l, _)| l.clone()).collect();
        let mut cuts = cuts;
        cuts.sort_unstable();
        let dir = TempDir::new("identity");
        let mut engine = open_with_cache(&dir, workers, cache_entries);
        match reopen_at {
            // Reopened mid-stream: the graph so far is read back (loaded into the cache).
            Some(at) => {
                let at = at.min(lines.len());
                ingest_in_batches(&mut engine, &lines[..at], &cuts);
                drop(engine);
                engine = open_with_cache(&dir, workers, cache_entries);
                ingest_in_batches(&mut engine, &lines[at..], &[]);
            }
            None => ingest_in_batches(&mut engine, &lines, &cuts),
        }

        // Every identifier of an event ends with one customer.
        let mut owner_of_event = Vec::new();
        for (_, carried) in &stream {
            let owners: BTreeSet<Arc<str>> = carried
                .iter()
                .map(|(t, v)| ask(&engine, t, &normalised(t, v)))
                .collect();
            prop_assert_eq!(owners.len(), 1, "one event's identifiers on several customers: {:?}", owners);
            owner_of_event.push(owners.into_iter().next().unwrap());
        }

        // The reference: the same stream, each event renamed to where its identifiers ended.
        let renamed: Vec<String> = lines
            .iter()
            .zip(&owner_of_event)
            .map(|(line, owner)| {
                let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("ids");
                o.insert("customer_id".into(), owner.to_string().into());
                v.to_string()
            })
            .collect();
        let ref_dir = TempDir::new("identity-reference");
        let mut reference = open(&ref_dir, 1);
        ingest_in_batches(&mut reference, &renamed, &[]);
        if late_clock > 0 {
            let end = BASE + 200 * 24 * HOUR + late_clock;
            engine.advance_clock(end).unwrap();
            reference.advance_clock(end).unwrap();
        }

        let survivors: BTreeSet<&Arc<str>> = owner_of_event.iter().collect();
        // No customer owns more identifiers of a type than its limit allows.
        let config = processor::identity::IdentityConfig::default();
        for customer in &survivors {
            for t in &config.types {
                let owned = engine.identifiers(customer).unwrap().iter().filter(|(ty, _)| *ty == t.name).count();
                prop_assert!(t.max_per_customer.is_none_or(|max| owned <= max), "{} owns {} {}", customer, owned, t.name);
            }
        }
        for customer in &survivors {
            let got = engine.customer(customer).unwrap().expect("the survivor exists");
            let want = reference.customer(customer).unwrap().expect("the reference has them");
            prop_assert_eq!(summary(&got), summary(&want), "customer {}", customer);
        }
        // Absorbed customers are gone, and their ids resolve to the survivor.
        for ((line, _), owner) in stream.iter().zip(&owner_of_event) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(id) = v["customer_id"].as_str() {
                prop_assert_eq!(&engine.canonical_id(id), owner);
                if id != &**owner {
                    // Absorbed: its id answers the survivor.
                    let view = engine.customer(id).unwrap().expect("the survivor answers");
                    prop_assert_eq!(&view.customer_id, &owner.to_string(), "{} was absorbed", id);
                }
            }
        }
        // The same members, per definition, as the reference.
        for name in ["big_spender", "active", "seafood", "lapsed", "hangzhou", "vip", "quiet"] {
            let got: BTreeSet<String> = engine.members(name).unwrap().into_iter().map(|(id, _)| id).collect();
            let want: BTreeSet<String> = reference.members(name).unwrap().into_iter().map(|(id, _)| id).collect();
            prop_assert_eq!(got, want, "members of {}", name);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Identifiers are normalised and ranked where events are parsed (the intake knows the
    /// types); events parsed without them are prepared by the engine. Both resolve alike.
    #[test]
    fn identifiers_prepared_at_parse_or_by_the_engine_resolve_alike(
        gens in prop::collection::vec(gen_event(4), 1..40),
        cut in 0usize..40,
    ) {
        let mut lines: Vec<String> = render(&gens).into_iter().map(|(l, _)| l).collect();
        // And the identifiers an engine must reject or drop, wherever they are prepared.
        lines.push(r#"{"type":"view","ts":1740000000000,"ids":{"fax":"123"}}"#.into());
        lines.push(r#"{"type":"view","ts":1740000000000,"ids":{"phone":"n/a"}}"#.into());
        lines.push(r#"{"customer_id":"c-9","type":"view","ts":1740000000000,"ids":{"email":"x","customer_id":"c-9"}}"#.into());
        let cut = cut.min(lines.len());
        let (dir_a, dir_b) = (TempDir::new("identity-parse"), TempDir::new("identity-engine"));
        let (mut a, mut b) = (open(&dir_a, 1), open(&dir_b, 1));
        let limits = processor::EventLimits::default();
        let mut codes = (Vec::new(), Vec::new());
        for part in [&lines[..cut], &lines[cut..]] {
            let prepared = a.ingest(part).unwrap();
            let parsed: Vec<_> = part
                .iter()
                .map(|l| processor::event::parse_event(l.as_bytes(), &limits, i64::MAX))
                .collect();
            prop_assert!(parsed.iter().flatten().all(|ev| ev.prepared.is_none()));
            let none: [(&str, u64); 0] = [];
            let unprepared = b.ingest_parsed(part, parsed, &none).unwrap();
            prop_assert_eq!(prepared.accepted, unprepared.accepted);
            codes.0.extend(prepared.errors.iter().map(|e| (e.index, e.code, e.reason.clone())));
            codes.1.extend(unprepared.errors.iter().map(|e| (e.index, e.code, e.reason.clone())));
        }
        prop_assert_eq!(&codes.0, &codes.1);
        prop_assert_eq!(codes.0.iter().map(|c| c.1).collect::<Vec<_>>(), ["id_type_unknown", "ids_unusable"]);
        prop_assert_eq!(a.reader().identity_stats(), b.reader().identity_stats());
        prop_assert_eq!(
            format!("{:?}", a.changes(0, 100_000).unwrap()),
            format!("{:?}", b.changes(0, 100_000).unwrap())
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Merges in pipelined groups — each group's events dealt to the shards while the group
    /// before is written, a merge's customers often written by that group, a leaving
    /// customer taken out of turn — write the change log and reach the state that ingesting
    /// the events one at a time does, whatever the workers and the cache.
    #[test]
    fn pipelined_groups_with_merges_write_the_same_change_log(
        gens in prop::collection::vec(gen_event(4), 1..60),
        sizes in prop::collection::vec(1usize..8, 1..4),
        workers in 1usize..4,
        cache_customers in prop_oneof![Just(0usize), Just(2), Just(100_000)],
    ) {
        let stream = render(&gens);
        let lines: Vec<String> = stream.iter().map(|(l, _)| l.clone()).collect();
        let mut cuts = Vec::new();
        let mut at = 0;
        for size in sizes.iter().cycle() {
            at += size;
            if at >= lines.len() {
                break;
            }
            cuts.push(at);
        }
        // The reference: one event at a time, so nothing is reordered within a round.
        let sync_dir = TempDir::new("identity-sync");
        let mut sync = open(&sync_dir, 1);
        let every: Vec<usize> = (1..lines.len()).collect();
        ingest_in_batches(&mut sync, &lines, &every);

        let dir = TempDir::new("identity-pipelined");
        let config = EngineConfig { cache_customers, ..config(workers) };
        let mut engine = Engine::open(dir.path(), Some(RULES), config).unwrap();
        let limits = processor::EventLimits::default();
        let mut start = 0;
        for &end in cuts.iter().chain([&lines.len()]) {
            let raw = lines[start..end].iter().map(|l| l.clone().into_bytes()).collect();
            engine.submit_group(vec![processor::IngestRequest::parse(raw, &limits)]);
            start = end;
        }
        engine.settle();
        prop_assert!(engine.take_finished().iter().all(|f| f.result.is_ok()));
        prop_assert_eq!(
            format!("{:?}", sync.changes(0, 100_000).unwrap()),
            format!("{:?}", engine.changes(0, 100_000).unwrap())
        );
        prop_assert_eq!(sync.reader().identity_stats(), engine.reader().identity_stats());
        for (_, carried) in &stream {
            let (t, v) = &carried[0];
            let customer = ask(&sync, t, &normalised(t, v));
            prop_assert_eq!(&customer, &ask(&engine, t, &normalised(t, v)));
            let got = engine.customer(&customer).unwrap().expect("the customer exists");
            let want = sync.customer(&customer).unwrap().expect("the customer exists");
            prop_assert_eq!(summary(&got), summary(&want), "customer {}", customer);
            let timeline = |e: &Engine| -> Vec<String> {
                e.timeline(&customer, None, 1000)
                    .unwrap()
                    .unwrap_or_default()
                    .iter()
                    .map(|s| format!("{} {} {} {:?} {:?}", s.event.ts, s.event.arrival, s.event.event_type, s.event_id, s.origin))
                    .collect()
            };
            prop_assert_eq!(timeline(&engine), timeline(&sync));
        }
    }
}

fn view_tags(engine: &Engine, customer: &str) -> BTreeMap<String, ()> {
    engine
        .customer(customer)
        .unwrap()
        .map(|v| v.tags.keys().map(|k| (k.to_string(), ())).collect())
        .unwrap_or_default()
}

#[test]
fn a_spend_split_over_three_ids_of_one_person_is_one_big_spender() {
    let dir = TempDir::new("identity");
    let mut engine = open(&dir, 2);
    let events = [
        // The shop knows a phone, the mini-program an openid, the app a device id.
        r#"{"type":"payment","ts":1740000000000,"ids":{"phone":"+86 138-0000-0001"},"props":{"amount":900}}"#,
        r#"{"type":"payment","ts":1740000060000,"ids":{"openid":"oAbC"},"props":{"amount":700}}"#,
        r#"{"type":"payment","ts":1740000120000,"ids":{"device_id":"d-42"},"props":{"amount":600}}"#,
    ];
    engine.ingest(&events).unwrap();
    assert_eq!(&*ask(&engine, "phone", "13800000001"), "phone:13800000001");
    assert_eq!(&*ask(&engine, "openid", "oAbC"), "openid:oAbC");
    assert!(view_tags(&engine, "phone:13800000001").is_empty());
    // The member number links them: one customer, named by the best identifier's customer.
    let link = r#"{"customer_id":"m-1","type":"app_open","ts":1740000180000,
        "ids":{"phone":"１３８０００００００１","openid":"oAbC","device_id":"d-42"}}"#;
    let outcome = engine.ingest(&[link]).unwrap();
    assert_eq!(outcome.accepted, 1);
    for (t, v) in [
        ("phone", "13800000001"),
        ("openid", "oAbC"),
        ("device_id", "d-42"),
        ("customer_id", "m-1"),
    ] {
        assert_eq!(&*ask(&engine, t, v), "m-1", "{t}");
    }
    assert!(view_tags(&engine, "m-1").contains_key("big_spender"));
    for gone in ["phone:13800000001", "openid:oAbC", "device_id:d-42"] {
        assert_eq!(
            engine.customer(gone).unwrap().unwrap().customer_id,
            "m-1",
            "{gone}"
        );
        assert_eq!(&*engine.canonical_id(gone), "m-1");
    }
    assert_eq!(
        engine.customer("m-1").unwrap().unwrap().traits["spend"].to_string(),
        "2200"
    );
    // The change log: the absorbed leave, the survivor becomes a big spender.
    let log = engine.changes(0, 100).unwrap();
    // One merge record per absorbed customer, caused by the linking event, before the
    // changes the merge made.
    let merges: Vec<&processor::Change> = log.iter().filter(|c| c.op == processor::Op::Merge).collect();
    let absorbed: BTreeSet<&str> = merges.iter().map(|c| &*c.name).collect();
    assert_eq!(
        absorbed,
        BTreeSet::from(["device_id:d-42", "openid:oAbC", "phone:13800000001"])
    );
    assert!(merges
        .iter()
        .all(|c| &*c.customer_id == "m-1" && c.cause == processor::Cause::Event(None)));
    let first_merge = log.iter().position(|c| c.op == processor::Op::Merge).unwrap();
    assert!(log[first_merge..].iter().any(|c| &*c.name == "big_spender"));
    assert!(log
        .iter()
        .any(|c| &*c.customer_id == "m-1" && &*c.name == "big_spender" && c.op == processor::Op::Add));
    assert!(log.iter().any(|c| &*c.customer_id == "phone:13800000001"
        && &*c.name == "quiet"
        && c.op == processor::Op::Remove));
    // An event naming an absorbed id is applied to the survivor, also after a restart.
    drop(engine);
    let mut engine = open(&dir, 1);
    engine
        .ingest(&[
            r#"{"customer_id":"openid:oAbC","type":"payment","ts":1740000240000,"props":{"amount":5}}"#,
        ])
        .unwrap();
    assert_eq!(
        engine.customer("m-1").unwrap().unwrap().traits["spend"].to_string(),
        "2205"
    );
    assert_eq!(
        engine.customer("openid:oAbC").unwrap().unwrap().customer_id,
        "m-1"
    );
}

#[test]
fn a_shared_device_does_not_glue_customers_past_its_limit() {
    let dir = TempDir::new("identity");
    let mut engine = open(&dir, 1);
    // Six family members each open the app on their own phone, then on the family tablet.
    for n in 0..6 {
        let own = format!(
            r#"{{"type":"app_open","ts":{},"ids":{{"phone":"1390000000{n}"}}}}"#,
            BASE + n * 1000
        );
        let tablet = format!(
            r#"{{"type":"app_open","ts":{},"ids":{{"phone":"1390000000{n}","device_id":"tablet"}}}}"#,
            BASE + n * 1000 + 500
        );
        engine.ingest(&[own, tablet]).unwrap();
    }
    // The tablet belongs to the first; the others were merged into them only while the
    // phone limit (3) allowed: three phones on one customer, the rest stay apart.
    let first = ask(&engine, "device_id", "tablet");
    let on_first = (0..6)
        .filter(|n| ask(&engine, "phone", &format!("1390000000{n}")) == first)
        .count();
    assert_eq!(on_first, 3);
    let ids = engine.identifiers(&first).unwrap();
    assert_eq!(ids.iter().filter(|(t, _)| &**t == "phone").count(), 3);
    let apart: BTreeSet<Arc<str>> = (0..6)
        .map(|n| ask(&engine, "phone", &format!("1390000000{n}")))
        .filter(|o| *o != first)
        .collect();
    assert_eq!(apart.len(), 3, "{apart:?}");
    // The tablet's customer has the merged three's six app opens; each one kept apart has
    // their own two (and the limit hits are counted).
    assert!(view_tags(&engine, &first).contains_key("active"));
    for customer in &apart {
        assert!(!view_tags(&engine, customer).contains_key("active"), "{customer}");
        assert!(engine.customer(customer).unwrap().is_some());
    }
}

#[test]
fn bad_identifiers_are_rejected_with_a_reason_or_dropped() {
    let dir = TempDir::new("identity");
    let mut engine = open(&dir, 1);
    let outcome = engine
        .ingest(&[
            r#"{"type":"view","ts":1740000000000,"ids":{"fax":"123"}}"#,
            r#"{"type":"view","ts":1740000000000,"ids":"13800000001"}"#,
            r#"{"type":"view","ts":1740000000000,"ids":{"phone":{"n":1}}}"#,
            r#"{"type":"view","ts":1740000000000,"ids":{"phone":"n/a"}}"#,
            r#"{"type":"view","ts":1740000000000,"ids":{}}"#,
            r#"{"customer_id":"c-1","type":"view","ts":1740000000000,"ids":{"email":"not an email"}}"#,
        ])
        .unwrap();
    let codes: Vec<&str> = outcome.errors.iter().map(|e| e.code).collect();
    assert_eq!(
        codes,
        [
            "id_type_unknown",
            "ids_invalid",
            "ids_invalid",
            "ids_unusable",
            "customer_id_missing"
        ]
    );
    assert!(
        outcome.errors[0].reason.contains("fax"),
        "{}",
        outcome.errors[0].reason
    );
    assert!(
        outcome.errors[2].reason.contains("ids.phone"),
        "{}",
        outcome.errors[2].reason
    );
    // The unusable email is dropped; the event is kept on its customer_id.
    assert_eq!(outcome.accepted, 1);
    assert!(engine.customer("c-1").unwrap().is_some());
    assert!(engine.identify("email", "not an email").is_err());
}

/// One event of a two-person story: `who` 0 is the CRM customer `s` (phone 139…), 1 the
/// shop customer known by phone 138… (and sometimes an email or openid); `link` names both.
#[derive(Debug, Clone)]
struct Story {
    who: u8,
    link: bool,
    kind: u8,
    amount: u32,
    dt_minutes: i64,
    city: Option<bool>,
    extra_ids: bool,
}

fn story_event() -> impl Strategy<Value = Story> {
    (
        0u8..2,
        prop::bool::weighted(0.1),
        0u8..3,
        1u32..900,
        -300i64..1_500,
        prop::option::weighted(0.25, any::<bool>()),
        any::<bool>(),
    )
        .prop_map(|(who, link, kind, amount, dt_minutes, city, extra_ids)| Story {
            who,
            link,
            kind,
            amount,
            dt_minutes,
            city,
            extra_ids,
        })
}

/// The story as lines for the engine (identifiers) and for the reference (each event named
/// by the customer it belongs to: a link event by `s`, whose `customer_id` ranks first).
fn tell(stories: &[Story], first_id: usize, ts: &mut i64) -> (Vec<String>, Vec<String>) {
    let (mut lines, mut reference) = (Vec::new(), Vec::new());
    for (n, s) in stories.iter().enumerate() {
        *ts = (*ts + s.dt_minutes * 60_000).max(BASE);
        let (event_type, props) = match s.kind {
            0 => ("payment", serde_json::json!({"amount": s.amount})),
            1 => ("app_open", serde_json::json!({})),
            _ => (
                "view",
                serde_json::json!({"p": if s.amount % 3 == 0 { "seafood" } else { "shoes" }}),
            ),
        };
        let mut event = serde_json::json!({
            "event_id": format!("s{}", first_id + n), "type": event_type, "ts": *ts, "props": props,
        });
        if let Some(hz) = s.city {
            event["profile"] = serde_json::json!({"city": if hz { "杭州" } else { "上海" }});
        }
        let mut named = event.clone();
        if s.link || s.who == 0 {
            event["customer_id"] = "s".into();
            named["customer_id"] = "s".into();
        } else {
            named["customer_id"] = "phone:13800000001".into();
        }
        if s.link || s.who == 1 {
            let mut ids = serde_json::json!({"phone": "+86 138 0000 0001"});
            if s.extra_ids {
                ids["email"] = "ann@example.com".into();
                ids["openid"] = "o-ann".into();
            }
            event["ids"] = ids;
        }
        lines.push(event.to_string());
        reference.push(named.to_string());
    }
    (lines, reference)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Merged (by an event or by hand), then split again: both customers are what their own
    /// events alone make, and events naming both no longer join them.
    #[test]
    fn an_unmerge_leaves_both_as_if_never_merged(
        before in prop::collection::vec(story_event(), 1..25),
        during in prop::collection::vec(story_event(), 0..25),
        after in prop::collection::vec(story_event(), 0..15),
        by_hand in any::<bool>(),
        cuts in prop::collection::vec(0usize..25, 0..4),
        workers in 1usize..3,
    ) {
        let dir = TempDir::new("identity-unmerge");
        let mut engine = open(&dir, workers);
        let ref_dir = TempDir::new("identity-unmerge-reference");
        let mut reference = open(&ref_dir, 1);
        let mut cuts = cuts;
        cuts.sort_unstable();
        let mut ts = BASE;
        // Both exist before they are joined.
        let mut before = before;
        before.push(Story { who: 0, link: false, kind: 1, amount: 1, dt_minutes: 1, city: None, extra_ids: false });
        before.push(Story { who: 1, link: false, kind: 1, amount: 1, dt_minutes: 1, city: None, extra_ids: false });
        let before: Vec<Story> = before.into_iter().map(|s| Story { link: false, ..s }).collect();
        let (lines, named) = tell(&before, 0, &mut ts);
        ingest_in_batches(&mut engine, &lines, &cuts);
        ingest_in_batches(&mut reference, &named, &[]);
        if by_hand {
            engine.merge_customers("s", &["phone:13800000001".to_owned()], None).unwrap();
        } else {
            let link = Story { who: 0, link: true, kind: 1, amount: 1, dt_minutes: 1, city: None, extra_ids: false };
            let (lines, named) = tell(&[link], 1000, &mut ts);
            ingest_in_batches(&mut engine, &lines, &[]);
            ingest_in_batches(&mut reference, &named, &[]);
        }
        prop_assert_eq!(&*engine.canonical_id("phone:13800000001"), "s");
        let (lines, named) = tell(&during, 2000, &mut ts);
        ingest_in_batches(&mut engine, &lines, &cuts);
        ingest_in_batches(&mut reference, &named, &[]);
        let split = engine.unmerge_customers("s", &["phone:13800000001".to_owned()], None).unwrap();
        prop_assert!(split.changes.iter().any(|c| c.op == processor::Op::Unmerge));
        let (lines, named) = tell(&after, 3000, &mut ts);
        ingest_in_batches(&mut engine, &lines, &cuts);
        ingest_in_batches(&mut reference, &named, &[]);
        prop_assert_eq!(ask(&engine, "phone", "13800000001"), Arc::from("phone:13800000001"));
        for end in [None, Some(BASE + 200 * 24 * HOUR)] {
            if let Some(end) = end {
                engine.advance_clock(end).unwrap();
                reference.advance_clock(end).unwrap();
            }
            for customer in ["s", "phone:13800000001"] {
                let got = engine.customer(customer).unwrap().expect("both exist");
                let want = reference.customer(customer).unwrap().expect("the reference has them");
                prop_assert_eq!(summary(&got), summary(&want), "customer {} at {:?}", customer, end);
            }
        }
        // Each event naming both since (a link, or identifiers the link attached to `s`)
        // merged nothing.
        let links_after = after.iter().filter(|s| s.link).count() as u64;
        prop_assert!(engine.reader().identity_stats().blocked >= links_after);
    }
}

#[test]
fn unmerging_what_was_not_merged_is_refused() {
    let dir = TempDir::new("identity");
    let mut engine = open(&dir, 1);
    engine
        .ingest(&[
            r#"{"customer_id":"a","type":"view","ts":1740000000000}"#,
            r#"{"customer_id":"b","type":"view","ts":1740000000000}"#,
        ])
        .unwrap();
    let err = engine
        .unmerge_customers("a", &["b".to_owned()], None)
        .unwrap_err();
    assert!(err.to_string().contains("was not merged into"), "{err}");
    assert!(engine
        .unmerge_customers("nosuch", &["b".to_owned()], None)
        .is_err());
    engine
        .merge_customers("a", &["b".to_owned()], Some("crm-staff"))
        .unwrap();
    assert!(engine.customer("b").unwrap().unwrap().customer_id == "a");
    let split = engine
        .unmerge_customers("a", &["b".to_owned()], Some("crm-staff"))
        .unwrap();
    assert_eq!(
        split.changes[0].cause,
        processor::Cause::ManualBy("crm-staff".into())
    );
    assert_eq!(engine.customer("b").unwrap().unwrap().customer_id, "b");
    // Split apart, an event naming both joins them no more; a merge by hand does.
    let outcome = engine
        .ingest(&[r#"{"customer_id":"a","type":"view","ts":1740000000001,"ids":{"customer_id":"b"}}"#])
        .unwrap();
    assert_eq!(outcome.accepted, 1);
    assert_eq!(&*engine.canonical_id("b"), "b");
    assert_eq!(engine.reader().identity_stats().blocked, 1);
    engine.merge_customers("a", &["b".to_owned()], None).unwrap();
    assert_eq!(&*engine.canonical_id("b"), "a");
    let stats = engine.reader().identity_stats();
    assert_eq!((stats.merges, stats.unmerges), (2, 1));
}

#[test]
fn an_event_absorbed_in_its_own_batch_keeps_its_id_and_profile() {
    let dir = TempDir::new("identity");
    let mut engine = open(&dir, 2);
    // One batch: the phone's first event, then the member number that claims the phone.
    engine
        .ingest(&[
            r#"{"event_id":"x1","type":"view","ts":1740000000000,"ids":{"phone":"13800000001"},
                "props":{"p":"seafood"},"profile":{"city":"杭州"}}"#,
            r#"{"event_id":"x2","customer_id":"m-1","type":"app_open","ts":1740000060000,
                "ids":{"phone":"13800000001"}}"#,
        ])
        .unwrap();
    assert_eq!(&*engine.canonical_id("phone:13800000001"), "m-1");
    let ids = |engine: &Engine, customer: &str| -> BTreeSet<Option<String>> {
        let events = engine.timeline(customer, None, 100).unwrap().unwrap();
        events.into_iter().map(|e| e.event_id).collect()
    };
    assert_eq!(
        ids(&engine, "m-1"),
        BTreeSet::from([Some("x1".to_owned()), Some("x2".to_owned())])
    );
    // Split off again, the phone's customer gets its event back with its id and the
    // profile it set.
    engine
        .unmerge_customers("m-1", &["phone:13800000001".to_owned()], None)
        .unwrap();
    assert_eq!(
        ids(&engine, "phone:13800000001"),
        BTreeSet::from([Some("x1".to_owned())])
    );
    let phone = engine.customer("phone:13800000001").unwrap().unwrap();
    assert!(phone.tags.contains_key("hangzhou"), "{:?}", phone.tags);
    let member = engine.customer("m-1").unwrap().unwrap();
    assert!(!member.tags.contains_key("hangzhou"), "{:?}", member.tags);
}

#[test]
fn identifiers_of_imported_customers_resolve_to_them_and_those_of_dropped_ones_are_new_again() {
    // Person 1 under a phone and an email, in one store.
    let from_dir = TempDir::new("identity-export");
    let mut from = open(&from_dir, 1);
    from.ingest(&[
        r#"{"event_id":"p1","type":"view","ts":1740000000000,"ids":{"phone":"13800000001","email":"a@example.com"}}"#,
    ])
    .unwrap();
    let person = ask(&from, "phone", "13800000001");
    let partitions = from.config().partitions;
    let mut files = Vec::new();
    for p in 0..partitions {
        let mut file = Vec::new();
        from.reader().export_partition(p, partitions, &mut file).unwrap();
        files.push(file);
    }

    // Another store, empty when opened (its identity cache holds the whole graph: nothing),
    // imports them and goes on without a restart.
    let to_dir = TempDir::new("identity-import");
    let mut to = open(&to_dir, 2);
    for file in &files {
        to.import_partition(&mut &file[..]).unwrap();
    }
    to.ingest(&[r#"{"event_id":"p2","type":"view","ts":1740000060000,"ids":{"email":"A@example.com","device_id":"d-1"}}"#])
        .unwrap();
    assert_eq!(
        ask(&to, "email", "a@example.com"),
        person,
        "the imported customer's email"
    );
    assert_eq!(
        ask(&to, "device_id", "d-1"),
        person,
        "attached to the imported customer"
    );
    assert_eq!(to.customer_ids().unwrap(), vec![person.to_string()]);

    // Dropped, its identifiers name nobody: the next event with the phone makes a customer.
    let partition = processor::partition::partition_of(person.as_bytes(), partitions);
    to.drop_partition(partition).unwrap();
    assert_eq!(to.identify("phone", "13800000001").unwrap(), None);
    to.ingest(&[r#"{"event_id":"p3","type":"view","ts":1740000120000,"ids":{"phone":"13800000001"}}"#])
        .unwrap();
    let again = ask(&to, "phone", "13800000001");
    assert_eq!(to.customer_ids().unwrap(), vec![again.to_string()]);
    assert_eq!(
        to.timeline(&again, None, 100).unwrap().unwrap().len(),
        1,
        "a new customer"
    );
}

/// In a group each node answers a lookup by identifier for the partitions it owns: the
/// node holding the customer the identifier names (its entry is kept with the customer's
/// partition, not the identifier's own hash), also for a customer id no one absorbed.
#[test]
fn a_lookup_in_some_partitions_is_answered_by_the_customers_partition() {
    const PARTITIONS: u32 = 8;
    let dir = TempDir::new("identity-lookup-in");
    let mut engine = Engine::open(
        dir.path(),
        Some(RULES),
        EngineConfig {
            partitions: PARTITIONS,
            ..config(1)
        },
    )
    .unwrap();
    let partition = |bytes: &[u8]| processor::partition::partition_of(bytes, PARTITIONS);
    // A phone whose entry lives in another partition than its customer.
    let (customer, phone) = (0..100)
        .map(|i| (format!("c-{i}"), format!("1380000{i:04}")))
        .find(|(c, p)| partition(format!("phone\0{p}").as_bytes()) != partition(c.as_bytes()))
        .unwrap();
    let line = format!(
        r#"{{"event_id":"e1","customer_id":"{customer}","type":"view","ts":1740000000000,"ids":{{"phone":"{phone}"}}}}"#
    );
    engine.ingest(&[line]).unwrap();
    let reader = engine.reader();
    let (of_phone, of_customer) = (
        partition(format!("phone\0{phone}").as_bytes()),
        partition(customer.as_bytes()),
    );
    let found = |id_type: &str, value: &str, owned: &[u32]| {
        reader
            .identify_in(id_type, value, owned)
            .unwrap()
            .map(|c| c.to_string())
    };
    assert_eq!(found("phone", &phone, &[of_customer]), Some(customer.clone()));
    assert_eq!(
        found("phone", &phone, &[of_phone]),
        None,
        "not where the identifier hashes"
    );
    let everywhere: Vec<u32> = (0..PARTITIONS).collect();
    assert_eq!(found("phone", &phone, &everywhere), Some(customer.clone()));
    assert_eq!(
        found("customer_id", &customer, &[of_customer]),
        Some(customer.clone())
    );
    let elsewhere: Vec<u32> = everywhere.iter().copied().filter(|p| *p != of_customer).collect();
    assert_eq!(found("customer_id", &customer, &elsewhere), None);
    assert_eq!(found("phone", "13999999999", &everywhere), None);
}

/// A customer a merge absorbed is gone from everything that counts the whole base: an
/// ad-hoc `not` query, SQL's `customers` table (the live numbers) — also after a reopen —
/// and comes back when it is split off again.
#[test]
fn a_customer_absorbed_by_a_merge_is_not_counted_until_split_off() {
    let dir = TempDir::new("identity");
    let mut engine = open(&dir, 2);
    engine
        .ingest(&[
            r#"{"customer_id":"a","type":"app_open","ts":1740000000000}"#,
            r#"{"customer_id":"b","type":"view","ts":1740000000000}"#,
            r#"{"customer_id":"c","type":"view","ts":1740000000000}"#,
        ])
        .unwrap();
    let quiet_ids = |engine: &Engine| -> (usize, Vec<String>, usize) {
        let page = engine.reader().query("not active", 100, None).unwrap();
        (
            page.count,
            page.customers,
            engine.reader().live_numbers().len() as usize,
        )
    };
    assert_eq!(
        quiet_ids(&engine),
        (3, vec!["a".into(), "b".into(), "c".into()], 3)
    );
    engine.merge_customers("a", &["b".to_owned()], None).unwrap();
    assert_eq!(quiet_ids(&engine), (2, vec!["a".into(), "c".into()], 2));
    // An event naming two customers merges them too.
    engine
        .ingest(&[r#"{"customer_id":"a","type":"view","ts":1740000000001,"ids":{"customer_id":"c"}}"#])
        .unwrap();
    assert_eq!(quiet_ids(&engine), (1, vec!["a".into()], 1));
    drop(engine);
    let mut engine = open(&dir, 1);
    assert_eq!(quiet_ids(&engine), (1, vec!["a".into()], 1), "after a reopen");
    engine.unmerge_customers("a", &["b".to_owned()], None).unwrap();
    assert_eq!(
        quiet_ids(&engine),
        (2, vec!["a".into(), "b".into()], 2),
        "b split off again"
    );
}

/// A member of a group sends an event read from another customer's partition to the
/// partition of the customer it names before resolution
/// ([`processor::kafka::route::named_customer`]): for an event whose
/// identifiers no customer owns yet, whichever it carries and however spelt, that is the
/// customer resolution makes of it; with a `customer_id`, that one.
#[test]
fn the_customer_an_event_names_before_resolution_is_the_one_made_of_it() {
    let dir = TempDir::new("identity-named");
    let mut engine = open(&dir, 1);
    let intake = engine.intake();
    let identity = intake.identity.clone().expect("identity types are configured");
    let mut person = 0;
    for carried in 1u8..32 {
        for spelling in [false, true] {
            person += 1;
            let mut ids = serde_json::Map::new();
            let mut customer_id = None;
            for (bit, (id_type, spellings)) in identifiers(person).into_iter().enumerate() {
                if carried & (1 << bit) == 0 {
                    continue;
                }
                let value = spellings[spelling as usize].clone();
                match id_type {
                    "customer_id" => customer_id = Some(value),
                    _ => drop(ids.insert(id_type.to_string(), value.into())),
                }
            }
            let mut event = serde_json::json!({"type": "view", "ts": BASE, "props": {"p": "shoes"}});
            if !ids.is_empty() {
                event["ids"] = ids.into();
            }
            if let Some(c) = &customer_id {
                event["customer_id"] = c.clone().into();
            }
            let line = event.to_string();
            let parsed = intake.parse_batch(&[line.as_bytes()], "test");
            let ev = parsed[0].as_ref().unwrap();
            let named = processor::kafka::route::named_customer(ev, Some(&identity))
                .unwrap()
                .into_owned();
            let before: BTreeSet<String> = engine.customer_ids().unwrap().into_iter().collect();
            assert_eq!(
                engine.ingest(std::slice::from_ref(&line)).unwrap().accepted,
                1,
                "{line}"
            );
            let made: Vec<String> = engine
                .customer_ids()
                .unwrap()
                .into_iter()
                .filter(|id| !before.contains(id))
                .collect();
            assert_eq!(made, vec![named], "{line}");
        }
    }
}

/// With a clock per partition (a member of a consumer group), an event named only by
/// `ids` is judged on the clock of the partition of the customer it names — the one it is
/// applied in — not on that of the partition an empty `customer_id` hashes to: an event
/// without `ts` takes that customer's partition's clock.
#[test]
fn an_event_named_only_by_ids_takes_the_clock_of_its_customers_partition() {
    const PARTITIONS: u32 = 4;
    let dir = TempDir::new("identity-partition-clock");
    let config = EngineConfig {
        partitions: PARTITIONS,
        clock_per_partition: true,
        ..config(1)
    };
    let mut engine = Engine::open(dir.path(), Some(RULES), config).unwrap();
    let partition = |id: &str| processor::partition::partition_of(id.as_bytes(), PARTITIONS);
    let nameless = partition("");
    let phone = (0..)
        .map(|n| format!("1390000{n:04}"))
        .find(|p| partition(&format!("phone:{}", normalised("phone", p))) != nameless)
        .unwrap();
    let home = partition(&format!("phone:{}", normalised("phone", &phone)));
    let in_partition = |p: u32, name: &str| {
        (0..)
            .map(|n| format!("{name}-{n}"))
            .find(|c| partition(c) == p)
            .unwrap()
    };
    let (ahead, behind) = (in_partition(nameless, "ahead"), in_partition(home, "behind"));
    let day = 24 * HOUR;
    let lines = [
        format!(r#"{{"customer_id":"{behind}","type":"view","ts":{BASE},"props":{{"p":"tea"}}}}"#),
        format!(
            r#"{{"customer_id":"{ahead}","type":"view","ts":{},"props":{{"p":"tea"}}}}"#,
            BASE + 30 * day
        ),
        format!(r#"{{"ids":{{"phone":"{phone}"}},"type":"view","props":{{"p":"fish"}}}}"#),
    ];
    let outcome = engine.ingest(&lines).unwrap();
    assert_eq!(outcome.accepted, 3, "{:?}", outcome.errors);
    let customer = ask(&engine, "phone", &phone);
    let events = engine.timeline(&customer, None, 10).unwrap().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].event.ts, BASE,
        "the clock of partition {home}, not of partition {nameless}"
    );
}

/// [`tell`], each event's `ts` made unique (kept within its second, by its place in the
/// story): two stores order events of the same `ts` by their own arrival numbers.
fn tell_unique(stories: &[Story], first_id: usize, ts: &mut i64) -> (Vec<String>, Vec<String>) {
    let (lines, named) = tell(stories, first_id, ts);
    let unique = |lines: Vec<String>| -> Vec<String> {
        lines
            .into_iter()
            .enumerate()
            .map(|(n, line)| {
                let mut event: serde_json::Value = serde_json::from_str(&line).unwrap();
                let ts = event["ts"].as_i64().unwrap();
                event["ts"] = (ts / 1000 * 1000 + (first_id + n) as i64 % 1000).into();
                event.to_string()
            })
            .collect()
    };
    (unique(lines), unique(named))
}

/// A change as two stores can agree on it: without `seq`.
fn change_key(c: &processor::Change) -> (String, String, String, String, i64, String) {
    (
        c.customer_id.to_string(),
        format!("{:?}", c.kind),
        c.name.to_string(),
        format!("{:?}", c.op),
        c.at,
        c.cause.as_string(),
    )
}

fn sorted_changes(changes: &[processor::Change]) -> Vec<(String, String, String, String, i64, String)> {
    let mut keys: Vec<_> = changes.iter().map(change_key).collect();
    keys.sort();
    keys
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A merge across two stores — the absorbed customer handed over by the store holding
    /// it, taken by the store holding the survivor — ends where a merge in one store holding
    /// both ends: the same changes, the same survivor as later events go on, and the same
    /// two customers when it is undone.
    #[test]
    fn a_merge_handed_over_between_stores_ends_like_one_in_one_store(
        before in prop::collection::vec(story_event(), 1..25),
        during in prop::collection::vec(story_event(), 0..20),
        workers in 1usize..3,
    ) {
        let (one_dir, held_dir, survivor_dir) = (
            TempDir::new("handover-one"),
            TempDir::new("handover-absorbed"),
            TempDir::new("handover-survivor"),
        );
        let mut one = open(&one_dir, workers);
        let mut held = open(&held_dir, workers);
        let mut kept = open(&survivor_dir, workers);
        let mut before: Vec<Story> = before.into_iter().map(|s| Story { link: false, ..s }).collect();
        before.push(Story { who: 0, link: false, kind: 1, amount: 1, dt_minutes: 1, city: None, extra_ids: true });
        before.push(Story { who: 1, link: false, kind: 2, amount: 3, dt_minutes: 1, city: Some(true), extra_ids: true });
        let mut ts = BASE;
        let (lines, _) = tell_unique(&before, 0, &mut ts);
        let (mine, theirs): (Vec<_>, Vec<_>) = before.iter().zip(&lines).partition(|(s, _)| s.who == 1);
        let mine: Vec<String> = mine.into_iter().map(|(_, l)| l.clone()).collect();
        let theirs: Vec<String> = theirs.into_iter().map(|(_, l)| l.clone()).collect();
        ingest_in_batches(&mut one, &lines, &[]);
        ingest_in_batches(&mut held, &mine, &[]);
        ingest_in_batches(&mut kept, &theirs, &[]);
        let absorbed = "phone:13800000001";
        for engine in [&mut one, &mut held] {
            engine.set_manual_tag(absorbed, "seafood", None).unwrap();
        }
        // The three clocks at one instant, so that every change is made at the same `at`.
        let clock = lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ts"].as_i64().unwrap())
            .max()
            .unwrap();
        for engine in [&mut one, &mut held, &mut kept] {
            engine.advance_clock(clock).unwrap();
        }

        let merged = one.merge_customers("s", &[absorbed.to_owned()], None).unwrap();
        let handed = held.hand_over(absorbed, "s", None).unwrap();
        let taken = kept.take_handover(&handed.frame).unwrap();
        prop_assert!(taken.changes.iter().any(|c| c.op == processor::Op::Merge));
        let mut split: Vec<processor::Change> = handed.changes.clone();
        split.extend(taken.changes.iter().cloned());
        prop_assert_eq!(sorted_changes(&split), sorted_changes(&merged.changes));
        // Delivered twice, taken once.
        prop_assert!(kept.take_handover(&handed.frame).unwrap().changes.is_empty());
        // Gone from the store that held it, which still knows where it went.
        prop_assert!(held.customer(absorbed).unwrap().is_none());
        prop_assert_eq!(&*held.canonical_id(absorbed), "s");
        prop_assert_eq!(held.identify("phone", "13800000001").unwrap(), None);
        prop_assert_eq!(ask(&kept, "phone", "13800000001"), Arc::from("s"));

        let (lines, _) = tell_unique(&during, 1000, &mut ts);
        ingest_in_batches(&mut one, &lines, &[]);
        ingest_in_batches(&mut kept, &lines, &[]);
        let end = BASE + 200 * 24 * HOUR;
        for at in [None, Some(end)] {
            if let Some(at) = at {
                one.advance_clock(at).unwrap();
                kept.advance_clock(at).unwrap();
            }
            let got = kept.customer("s").unwrap().expect("the survivor");
            let want = one.customer("s").unwrap().expect("the survivor");
            prop_assert_eq!(summary(&got), summary(&want), "at {:?}", at);
            // The absorbed id names the survivor in both.
            let by_alias = kept.customer(absorbed).unwrap().expect("the alias");
            prop_assert_eq!(summary(&by_alias), summary(&want));
        }
        prop_assert_eq!(kept.identifiers("s").unwrap(), one.identifiers("s").unwrap());

        // What an unmerge needs came with the handover.
        one.unmerge_customers("s", &[absorbed.to_owned()], None).unwrap();
        kept.unmerge_customers("s", &[absorbed.to_owned()], None).unwrap();
        for customer in ["s", absorbed] {
            let got = kept.customer(customer).unwrap().expect("both again");
            let want = one.customer(customer).unwrap().expect("both again");
            prop_assert_eq!(summary(&got), summary(&want), "customer {} after the unmerge", customer);
        }
    }
}

#[test]
fn a_handover_waits_in_its_store_until_delivered_and_is_refused_where_it_cannot_be() {
    let (held_dir, kept_dir) = (TempDir::new("handover-pending"), TempDir::new("handover-kept"));
    let mut held = open(&held_dir, 1);
    let mut kept = open(&kept_dir, 1);
    let event = |customer: &str, n: i64| {
        serde_json::json!({"customer_id": customer, "type": "payment", "ts": BASE + n, "props": {"amount": 2500}})
            .to_string()
    };
    // `a` and `s` paid at the same instant, each the first event of its store (the same
    // arrival number there); `x` was merged into `a` before.
    // `x` of `a`'s partition (what a node owning it merged there); `y` of another.
    let partitions = processor::EngineConfig::default().partitions;
    let of = |id: &str| processor::partition::partition_of(id.as_bytes(), partitions);
    let x = (0..)
        .map(|n| format!("x{n}"))
        .find(|id| of(id) == of("a"))
        .unwrap();
    let y = (0..)
        .map(|n| format!("y{n}"))
        .find(|id| of(id) != of("c"))
        .unwrap();
    held.ingest(&[
        event("a", 1),
        event("b", 2),
        event(&x, 4),
        event("c", 5),
        event(&y, 6),
    ])
    .unwrap();
    kept.ingest(&[event("s", 1)]).unwrap();
    held.set_manual_tag(&x, "seafood", None).unwrap();
    held.merge_customers("a", std::slice::from_ref(&x), None).unwrap();
    held.merge_customers("c", std::slice::from_ref(&y), None).unwrap();
    let spend = |engine: &Engine, customer: &str| {
        let view = engine.customer(customer).unwrap().expect("the customer");
        view.traits.get("spend").map(|v| v.to_string())
    };

    // Both held here: a merge here, not a handover. Nothing here by that name: not found.
    assert!(matches!(
        held.hand_over("a", "b", None),
        Err(processor::EngineError::Conflict(_))
    ));
    assert!(matches!(
        held.hand_over("a", "a", None),
        Err(processor::EngineError::Conflict(_))
    ));
    assert!(matches!(
        held.hand_over("nosuch", "s", None),
        Err(processor::EngineError::NotFound(_))
    ));
    assert!(matches!(
        kept.take_handover(b"not a frame"),
        Err(processor::EngineError::Conflict(_))
    ));
    // A customer holding one merged in from another partition does not move (its id would
    // have to name the survivor in that partition): refused, nothing changed.
    match held.hand_over("c", "s", None) {
        Err(processor::EngineError::Conflict(why)) => assert!(why.contains(y.as_str()), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(held.customer("c").unwrap().is_some());

    let handed = held.hand_over("a", "s", Some("crm-staff")).unwrap();
    assert!(handed.changes.iter().all(|c| &*c.customer_id == "a"
        && c.op == processor::Op::Remove
        && c.cause.as_string() == "manual:crm-staff"));
    assert!(!handed.changes.is_empty(), "a big spender leaves its tag");
    // Handed over once: the id now names the survivor, held elsewhere.
    assert!(matches!(
        held.hand_over("a", "s", None),
        Err(processor::EngineError::NotFound(_))
    ));
    let pending = held.pending_handovers().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].absorbed.as_str(), pending[0].survivor.as_str()),
        ("a", "s")
    );
    assert_eq!(pending[0].frame, handed.frame);

    // The frame and the aliases (of `a`, and of `x` merged into it) outlive a restart.
    drop(held);
    let mut held = open(&held_dir, 1);
    assert_eq!(held.pending_handovers().unwrap().len(), 1);
    assert_eq!(&*held.canonical_id("a"), "s");
    assert_eq!(&*held.canonical_id(&x), "s");
    assert_eq!(held.reader().moved_to(&x).as_deref(), Some("s"));

    // A store without the survivor cannot take it.
    let (other_dir, _) = (TempDir::new("handover-other"), ());
    let mut other = open(&other_dir, 1);
    assert!(matches!(
        other.take_handover(&handed.frame),
        Err(processor::EngineError::NotFound(_))
    ));

    let taken = kept.take_handover(&handed.frame).unwrap();
    assert_eq!(
        taken
            .changes
            .iter()
            .filter(|c| c.op == processor::Op::Merge)
            .count(),
        1
    );
    assert_eq!(&*kept.canonical_id("a"), "s");
    assert_eq!(&*kept.canonical_id(&x), "s");
    // `x`'s payment was ahead of the survivor's clock: the clock moved to it, as one store
    // that had seen it would be. Every payment of the three, none written over another of
    // the same instant.
    assert_eq!(spend(&kept, "s").as_deref(), Some("7500"));
    // What was merged into `a` before can be split off where `a` went.
    kept.unmerge_customers("s", std::slice::from_ref(&x), None)
        .unwrap();
    assert_eq!(spend(&kept, &x).as_deref(), Some("2500"));
    let view = kept.customer(&x).unwrap().unwrap();
    assert!(view.tags.contains_key("seafood"), "its manual tag back: {view:?}");
    // And `a` itself; the frame delivered again after that merges nothing again.
    kept.unmerge_customers("s", &["a".to_owned()], None).unwrap();
    assert!(kept.take_handover(&handed.frame).unwrap().changes.is_empty());
    assert_eq!(spend(&kept, "s").as_deref(), Some("2500"));
    assert_eq!(spend(&kept, "a").as_deref(), Some("2500"));
    held.handover_delivered("a").unwrap();
    assert!(held.pending_handovers().unwrap().is_empty());
    held.handover_delivered("a").unwrap();
    assert!(matches!(
        held.handover_delivered("nosuch"),
        Err(processor::EngineError::NotFound(_))
    ));
    drop(held);
    let mut held = open(&held_dir, 1);
    assert_eq!(&*held.canonical_id("a"), "s");
    assert!(held.pending_handovers().unwrap().is_empty());
}

/// Two stores of a group, each owning two of four partitions, resolving identity in
/// partition 0 ([`EngineConfig::resolver`]); what the members' Kafka paths do
/// (`processor::kafka::route` and the group's consumer) is done here by hand: an event with
/// `ids` goes to partition 0's owner, any other to its customer's (on to its survivor's when
/// that customer was handed over), and the resolver's records and the handovers' frames are
/// delivered to the partitions they name.
struct Group {
    stores: Vec<Engine>,
    /// The store owning each partition.
    owner: [usize; 4],
}

impl Group {
    const PARTITIONS: u32 = 4;

    fn open(dirs: &[TempDir; 2], workers: usize) -> Group {
        let owner = [0, 1, 1, 0];
        let stores = dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                let mut engine = Engine::open(dir.path(), Some(RULES), grouped(workers, true)).unwrap();
                engine.park_partitions((0..Self::PARTITIONS).filter(|&p| owner[p as usize] != i));
                engine
            })
            .collect();
        Group { stores, owner }
    }

    fn store_of(&self, customer: &str) -> usize {
        self.owner[processor::partition::partition_of(customer.as_bytes(), Self::PARTITIONS) as usize]
    }

    /// An event as a member reading it would route it.
    fn send(&mut self, line: &str) {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        if event.get("ids").is_some() {
            let outcome = self.stores[self.owner[0]].ingest(&[line]).unwrap();
            assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
            return;
        }
        let customer = event["customer_id"].as_str().unwrap().to_owned();
        let resolved = processor::Resolved {
            canonical: Arc::from(customer.as_str()),
            origin: None,
        };
        self.apply(line.as_bytes(), resolved, false);
    }

    /// `raw` applied to the customer `resolved` names, or, when that one was handed over,
    /// to its survivor (as the router sends it on).
    fn apply(&mut self, raw: &[u8], mut resolved: processor::Resolved, mut named: bool) {
        loop {
            let store = self.store_of(&resolved.canonical);
            let Some(survivor) = self.stores[store].reader().moved_to(&resolved.canonical) else {
                break;
            };
            resolved.origin.get_or_insert_with(|| resolved.canonical.clone());
            resolved.canonical = survivor;
            named = true;
        }
        let store = self.store_of(&resolved.canonical);
        let engine = &mut self.stores[store];
        let mut parsed = engine.intake().parse_batch(&[raw], "kafka");
        if named {
            if let Ok(event) = &mut parsed[0] {
                event.resolved = Some(resolved);
            }
        }
        let outcome = engine
            .ingest_parsed(&[raw], parsed, &[] as &[(&str, u64)])
            .unwrap();
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    }

    /// What waits to be sent under `key` waits in a partition of store `i` (whose owner
    /// sends it, as a member sends only what its partitions hold).
    fn assert_home(&self, key: &[u8], i: usize) {
        let owner = processor::changelog::Family::Identities
            .owner(key)
            .expect("a key naming its customer");
        let partition = processor::partition::partition_of(owner, Self::PARTITIONS);
        assert_eq!(
            self.owner[partition as usize],
            i,
            "{}",
            String::from_utf8_lossy(key)
        );
    }

    /// A split request delivered to the owner of the partition it names.
    fn split(&mut self, request: &processor::SplitRequest) {
        let store = self.owner[request.partition as usize];
        self.stores[store]
            .split_requested(request, &[] as &[(&str, u64)])
            .unwrap();
    }

    /// Delivers what the stores have to send, until nothing is left; at most `rounds`
    /// passes over the stores (`usize::MAX`: until quiet).
    fn pump(&mut self, rounds: usize) {
        for _ in 0..rounds {
            let mut sent = false;
            for i in 0..self.stores.len() {
                let outbox = self.stores[i].resolver_outbox().unwrap();
                let keys: Vec<Vec<u8>> = outbox.iter().map(|p| p.key.clone()).collect();
                for pending in outbox {
                    sent = true;
                    assert_eq!(self.owner[0], i, "only partition 0's owner resolves");
                    match pending.record {
                        processor::ResolverRecord::Event(e) => {
                            assert!(e.first_read.is_none(), "every event has an id");
                            self.apply(&e.raw, e.resolved, true);
                        }
                        processor::ResolverRecord::HandOver(h) => {
                            let store = self.owner[h.partition as usize];
                            self.stores[store]
                                .hand_over_requested(
                                    &h.absorbed,
                                    &h.survivor,
                                    &h.cause,
                                    &[] as &[(&str, u64)],
                                )
                                .unwrap();
                        }
                        processor::ResolverRecord::Merging(m) => {
                            let store = self.owner[m.partition as usize];
                            self.stores[store]
                                .merge_noticed(&m.survivor, &m.absorbed, &[] as &[(&str, u64)])
                                .unwrap();
                        }
                        processor::ResolverRecord::Split(split) => self.split(&split),
                    }
                }
                self.stores[i].resolver_delivered(&keys).unwrap();
                // Frames first, then the splits sent on after them (as a member sends).
                for handover in self.stores[i].pending_handovers().unwrap() {
                    sent = true;
                    self.assert_home(&handover.key, i);
                    let mut survivor: Arc<str> = Arc::from(handover.survivor.as_str());
                    let mut frame = handover.frame.clone();
                    loop {
                        let store = self.store_of(&survivor);
                        match self.stores[store]
                            .take_handover_at(&frame, &[] as &[(&str, u64)])
                            .unwrap()
                        {
                            processor::Handed::Taken(_) | processor::Handed::SplitOff(_) => break,
                            processor::Handed::Elsewhere(next, sent_on) => {
                                (survivor, frame) = (next, sent_on)
                            }
                            processor::Handed::Malformed(letter) => panic!("{letter:?}"),
                        }
                    }
                    self.stores[i].frame_delivered(&handover.key).unwrap();
                }
                for pending in self.stores[i].reader().pending_splits().unwrap() {
                    sent = true;
                    self.assert_home(&pending.key, i);
                    self.split(&pending.request);
                    self.stores[i].frame_delivered(&pending.key).unwrap();
                }
            }
            if !sent {
                return;
            }
        }
    }
}

/// [`config`] as a member of a group: a clock per partition, four partitions, and
/// identity resolved in partition 0 (`resolver`), or a store alone.
fn grouped(workers: usize, resolver: bool) -> EngineConfig {
    EngineConfig {
        partitions: Group::PARTITIONS,
        clock_per_partition: true,
        resolver,
        retention_ms: 400 * 24 * HOUR,
        ..config(workers)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Identity resolved by a group's resolver — the graph in partition 0's owner, events
    /// sent on named by their customers, merges made by handovers between the owners of
    /// the customers' partitions — ends where one store resolving everything ends: the
    /// same customers with the same tags, segments, traits and profiles, the same
    /// identifiers, the same members; whenever the records in flight are delivered.
    #[test]
    fn a_group_resolving_identity_in_one_partition_ends_like_one_store(
        gens in prop::collection::vec(gen_event(5), 1..50),
        pump_after in prop::collection::vec(0usize..3, 50),
        workers in 1usize..3,
        reopen_at in prop::option::of(0usize..50),
        merge_at in prop::option::of(0usize..50),
        unmerge_at in prop::option::of(0usize..50),
    ) {
        group_ends_like_one_store(&gens, &pump_after, workers, reopen_at, merge_at, unmerge_at)?;
    }
}

/// Splits the first customer (by person, by identifier) merged into another off it again in
/// `one`: (its survivor, it).
fn first_unmerge(one: &mut Engine) -> Option<(String, String)> {
    for person in 0..5 {
        for (id_type, spellings) in identifiers(person) {
            let name = match id_type {
                "customer_id" => spellings[0].clone(),
                _ => format!("{id_type}:{}", normalised(id_type, &spellings[0])),
            };
            let survivor = one.canonical_id(&name).to_string();
            if survivor != name
                && one
                    .unmerge_customers(&survivor, std::slice::from_ref(&name), None)
                    .is_ok()
            {
                return Some((survivor, name));
            }
        }
    }
    None
}

/// The property of [`a_group_resolving_identity_in_one_partition_ends_like_one_store`].
fn group_ends_like_one_store(
    gens: &[Gen],
    pump_after: &[usize],
    workers: usize,
    reopen_at: Option<usize>,
    merge_at: Option<usize>,
    unmerge_at: Option<usize>,
) -> Result<(), TestCaseError> {
    // Each at an instant of its own: events of two customers at one `ts` are ordered by
    // arrival, which a handover renumbers in the survivor's store (module doc of
    // `processor/src/engine/handover.rs`).
    let stream: Vec<(String, Vec<(&str, String)>)> = render(gens)
        .into_iter()
        .enumerate()
        .map(|(n, (line, carried))| {
            let mut event: serde_json::Value = serde_json::from_str(&line).unwrap();
            let ts = event["ts"].as_i64().unwrap();
            event["ts"] = (ts / 1000 * 1000 + n as i64).into();
            (event.to_string(), carried)
        })
        .collect();
    let lines: Vec<String> = stream.iter().map(|(l, _)| l.clone()).collect();
    let one_dir = TempDir::new("resolver-one");
    let mut one = Engine::open(one_dir.path(), Some(RULES), grouped(1, false)).unwrap();
    let dirs = [TempDir::new("resolver-a"), TempDir::new("resolver-b")];
    let mut group = Group::open(&dirs, workers);
    for (n, (line, rounds)) in lines.iter().zip(pump_after).enumerate() {
        if reopen_at == Some(n) {
            // Restarted with records and frames in flight: they are kept.
            drop(group);
            group = Group::open(&dirs, workers);
        }
        // Two customers merged by hand, on the resolver, where one store can.
        if merge_at == Some(n) && one.merge_customers("c0", &["c1".into()], None).is_ok() {
            let resolver = group.owner[0];
            let merged = group.stores[resolver]
                .merge_customers("c0", &["c1".into()], None)
                .unwrap();
            prop_assert!(merged.changes.is_empty(), "made where the customers are");
        }
        // The first customer merged into another split off again, where one store can.
        if unmerge_at == Some(n) {
            if let Some((survivor, split)) = first_unmerge(&mut one) {
                let resolver = group.owner[0];
                let unmerged = group.stores[resolver]
                    .unmerge_customers(&survivor, std::slice::from_ref(&split), None)
                    .unwrap();
                prop_assert!(unmerged.changes.is_empty(), "made where the customers are");
                prop_assert_eq!(&*unmerged.customer, survivor.as_str());
            }
        }
        one.ingest(&[line]).unwrap();
        group.send(line);
        // Sometimes at once, sometimes a step behind, sometimes later.
        group.pump(*rounds);
    }
    group.pump(usize::MAX);

    let end = BASE + 200 * 24 * HOUR;
    one.advance_clock(end).unwrap();
    for store in &mut group.stores {
        store.advance_clock(end).unwrap();
    }
    // Each store holds only customers of its partitions, and together the same ones.
    let mut held = BTreeSet::new();
    for (i, store) in group.stores.iter().enumerate() {
        for p in 0..Group::PARTITIONS {
            let customers = store
                .reader()
                .partition_customers(p, Group::PARTITIONS, None, 1000)
                .unwrap();
            prop_assert!(
                customers.is_empty() || group.owner[p as usize] == i,
                "store {} holds partition {}: {:?}",
                i,
                p,
                customers
            );
            held.extend(customers);
        }
    }
    let mut want = BTreeSet::new();
    for p in 0..Group::PARTITIONS {
        want.extend(
            one.reader()
                .partition_customers(p, Group::PARTITIONS, None, 1000)
                .unwrap(),
        );
    }
    prop_assert_eq!(&held, &want);
    for customer in &want {
        let store = &group.stores[group.store_of(customer)];
        let got = store
            .customer(customer)
            .unwrap()
            .expect("held by its partition's owner");
        let expected = one.customer(customer).unwrap().unwrap();
        prop_assert_eq!(summary(&got), summary(&expected), "customer {}", customer);
    }
    // The graph is the resolver's, and says what one store's says.
    let resolver = &group.stores[group.owner[0]];
    for (_, carried) in &stream {
        for (t, v) in carried {
            let v = normalised(t, v);
            prop_assert_eq!(
                resolver.identify(t, &v).unwrap(),
                one.identify(t, &v).unwrap(),
                "{} {}",
                t,
                v
            );
            // Nowhere else.
            if *t != "customer_id" {
                let elsewhere = &group.stores[1 - group.owner[0]];
                prop_assert_eq!(elsewhere.identify(t, &v).unwrap(), None);
            }
        }
    }
    for customer in &want {
        prop_assert_eq!(
            resolver.identifiers(customer).unwrap(),
            one.identifiers(customer).unwrap(),
            "ids of {}",
            customer
        );
    }
    for name in [
        "big_spender",
        "active",
        "seafood",
        "lapsed",
        "hangzhou",
        "vip",
        "quiet",
    ] {
        let mut got = BTreeSet::new();
        for store in &group.stores {
            got.extend(store.members(name).unwrap().into_iter().map(|(id, _)| id));
        }
        let want: BTreeSet<String> = one.members(name).unwrap().into_iter().map(|(id, _)| id).collect();
        prop_assert_eq!(got, want, "members of {}", name);
    }

    // Every partition exported from its owner and imported into one store alone: the graph
    // goes with partition 0, what merges kept for an unmerge with their survivors, and that
    // store says what one store's says — an unmerge there included.
    let whole_dir = TempDir::new("resolver-imported");
    let mut whole = Engine::open(whole_dir.path(), Some(RULES), grouped(1, false)).unwrap();
    // As many graph entries as one store's exports carry: records, owners, and what each
    // merge kept.
    let mut entries = (0, 0);
    for p in 0..Group::PARTITIONS {
        let mut file = Vec::new();
        let exported = group.stores[group.owner[p as usize]]
            .reader()
            .export_partition(p, Group::PARTITIONS, &mut file)
            .unwrap();
        entries.0 += exported.identity_entries;
        let imported = whole.import_partition(&mut file.as_slice()).unwrap();
        prop_assert_eq!(&imported, &exported);
        entries.1 += one
            .reader()
            .export_partition(p, Group::PARTITIONS, &mut std::io::sink())
            .unwrap()
            .identity_entries;
    }
    prop_assert_eq!(entries.0, entries.1, "identity entries exported");
    whole.advance_clock(end).unwrap();
    let same = |whole: &Engine, one: &Engine, what: &str| -> Result<(), TestCaseError> {
        let customers = one.customer_ids().unwrap();
        prop_assert_eq!(&whole.customer_ids().unwrap(), &customers, "{} customers", what);
        for customer in &customers {
            let got = whole.customer(customer).unwrap().map(|v| summary(&v));
            let expected = one.customer(customer).unwrap().map(|v| summary(&v));
            prop_assert_eq!(got, expected, "{} customer {}", what, customer);
            prop_assert_eq!(
                whole.identifiers(customer).unwrap(),
                one.identifiers(customer).unwrap(),
                "{} ids of {}",
                what,
                customer
            );
        }
        for (_, carried) in &stream {
            for (t, v) in carried {
                let v = normalised(t, v);
                prop_assert_eq!(
                    whole.identify(t, &v).unwrap(),
                    one.identify(t, &v).unwrap(),
                    "{} {} {}",
                    what,
                    t,
                    v
                );
            }
        }
        Ok(())
    };
    same(&whole, &one, "imported")?;
    // And an unmerge once everything has settled, in all three.
    if let Some((survivor, split)) = first_unmerge(&mut one) {
        whole
            .unmerge_customers(&survivor, std::slice::from_ref(&split), None)
            .unwrap();
        same(&whole, &one, "imported, then unmerged")?;
        group.stores[group.owner[0]]
            .unmerge_customers(&survivor, std::slice::from_ref(&split), None)
            .unwrap();
        group.pump(usize::MAX);
        for customer in one.customer_ids().unwrap() {
            let store = &group.stores[group.store_of(&customer)];
            let got = store.customer(&customer).unwrap().map(|v| summary(&v));
            let expected = one.customer(&customer).unwrap().map(|v| summary(&v));
            prop_assert_eq!(got, expected, "unmerged at the end: customer {}", customer);
        }
    }
    Ok(())
}
