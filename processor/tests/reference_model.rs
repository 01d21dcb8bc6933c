//! The engine against a naive reference model, on random rule sets and random streams
//! (out of order, duplicates with altered content, malformed lines).
//!
//! The model keeps every event and recomputes every tag and segment of every customer from
//! scratch at every instant where anything could change. All times and durations in the
//! generated cases are whole seconds, so every change falls on a second or one millisecond
//! after it (`since(x) > D` first holds at `ts + D + 1ms`); the model evaluates at all of
//! those instants, in order, with no timers. The final state and the full change log, times
//! and causes included, must agree — and a shuffled stream must end in the same state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use processor::{parse_event, ClockMode, Engine, EngineConfig, EventLimits, IngestRequest, MemberKind, Op};
use proptest::prelude::*;
use rules::{CompiledRules, CustomerHistory, DefKind, Value, DEFAULT_RETENTION_MS};

const BASE: i64 = 1_740_000_000_000;
const SPAN_S: i64 = 240;
const FAR_FUTURE: i64 = BASE + 1_000_000_000_000;

// ---- random rule sets ----

fn duration_s() -> impl Strategy<Value = i64> {
    prop::sample::select(vec![10i64, 20, 30, 45, 60, 90, 120])
}

fn event_type() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["view", "payment", "call"])
}

fn filter() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "",
        " where p == \"x\"",
        " where amount >= 50",
        " where profile.city == \"杭州\"",
    ])
    .prop_map(str::to_owned)
}

/// One definition's text, given the names defined before it (so there are no cycles).
fn definition(index: usize, earlier: Vec<String>) -> impl Strategy<Value = String> {
    let name = format!("d{index}");
    let earlier_ref = if earlier.is_empty() {
        Just("true".to_owned()).boxed()
    } else {
        prop::sample::select(earlier).boxed()
    };
    (
        0u8..15,
        event_type(),
        filter(),
        duration_s(),
        1i64..4,
        earlier_ref,
        any::<bool>(),
    )
        .prop_map(move |(shape, t, f, d, k, other, flag)| match shape {
            0 => format!("tag {name} = count({t}{f}, {d}s) >= {k}"),
            1 => format!("tag {name} = since({t}{f}) > {d}s and count({t}, lifetime) >= 1"),
            2 if flag => format!("tag {name} on {t}{f} ttl {d}s"),
            2 => format!("tag {name} on {t}{f}"),
            3 => format!("tag {name} = sum({t}.amount{f}, {d}s) >= {}", k * 40),
            4 => format!("segment {name} = {other} and not (count({t}, {d}s) >= {k})"),
            5 => format!("tag {name} = last({t}.p) == \"x\" or max({t}.amount, {d}s) > 80"),
            6 => format!("tag {name} = distinct({t}.p, {d}s) >= 2 or avg({t}.amount, {d}s) < 20"),
            7 => format!("tag {name} = profile.city in [\"杭州\", \"上海\"] and since({t}) <= {d}s"),
            8 => format!("segment {name} = {other} or first({t}.p{f}) == \"y\""),
            // Counts and sums compared with numbers every way round, directly and through a
            // trait that is just the aggregate (timers wait for the comparison to turn).
            10 => format!(
                "trait {name}_n = count({t}{f}, {d}s)\ntag {name} = {k} > {name}_n or {name}_n == {}",
                k + 1
            ),
            11 => format!(
                "tag {name} = sum({t}.amount, {d}s) < {} and count({t}, lifetime) != {k}",
                k * 30
            ),
            // Weighted sums of counts compared with numbers, through a trait and inline,
            // weights of either sign (timers wait for the sum to cross).
            12 => format!(
                "trait {name}_e = count({t}{f}, {d}s) + 2 * count(view, 60s) + 3 * count(call, lifetime)\n\
                 tag {name} = {name}_e >= {}",
                k * 2 + 1
            ),
            13 => format!(
                "tag {name} = 10 - count({t}, {d}s) - 2 * count(payment{f}, 30s) > {}",
                3 + k
            ),
            14 if flag => format!(
                "trait {name}_e = 2 * count({t}{f}, {d}s) + count(view, 20s)\ntrait {name}_f = {name}_e - 1\n\
                 segment {name} = {name}_f != {k} and ({name}_e + 1) * 1 < {}",
                k * 3
            ),
            14 => format!("tag {name} = count({t}, {d}s) + count(call, 45s) == {k} or {other}"),
            _ => format!("tag {name} = since({t}) / 1s >= {d} and not has(profile.vip)"),
        })
}

fn rule_set() -> impl Strategy<Value = String> {
    (2usize..6).prop_flat_map(|n| {
        let mut strategy: BoxedStrategy<Vec<String>> = Just(Vec::new()).boxed();
        for i in 0..n {
            strategy = strategy
                .prop_flat_map(move |defs: Vec<String>| {
                    let names: Vec<String> = (0..i).map(|j| format!("d{j}")).collect();
                    definition(i, names).prop_map(move |d| {
                        let mut defs = defs.clone();
                        defs.push(d);
                        defs
                    })
                })
                .boxed();
        }
        strategy.prop_map(|defs| defs.join("\n"))
    })
}

// ---- random streams ----

#[derive(Debug, Clone)]
struct Gen {
    customer: u8,
    event_type: &'static str,
    second: i64,
    p: &'static str,
    amount: u8,
    city: Option<&'static str>,
    vip: Option<bool>,
}

fn gen_event() -> impl Strategy<Value = Gen> {
    (
        0u8..3,
        event_type(),
        0..SPAN_S,
        prop::sample::select(vec!["x", "y", "z"]),
        0u8..100,
        prop::option::of(prop::sample::select(vec!["杭州", "北京", "杭州\u{200b}"])),
        prop::option::weighted(0.2, any::<bool>()),
    )
        .prop_map(|(customer, event_type, second, p, amount, city, vip)| Gen {
            customer,
            event_type,
            second,
            p,
            amount,
            city,
            vip,
        })
}

fn customer_spelling(n: u8, variant: bool) -> String {
    match (n, variant) {
        (0, false) => "13800000000".into(),
        (0, true) => "１３８00000000\u{200b}".into(),
        (1, false) => "上海优选#1".into(),
        (1, true) => " 上海优选#1 ".into(),
        _ => "ent-00002".into(),
    }
}

fn render(g: &Gen, id: usize, variant: bool) -> String {
    let mut profile = serde_json::Map::new();
    if let Some(c) = g.city {
        profile.insert("city".into(), c.into());
    }
    if let Some(v) = g.vip {
        profile.insert(
            "vip".into(),
            if v { true.into() } else { serde_json::Value::Null },
        );
    }
    serde_json::json!({
        "event_id": format!("e{id}"),
        "customer_id": customer_spelling(g.customer, variant),
        "type": g.event_type,
        "ts": BASE + g.second * 1000,
        "props": {"p": g.p, "amount": g.amount as f64 / 2.0},
        "profile": profile,
    })
    .to_string()
}

/// A stream: events mostly in time order, some late, some re-sent (a few altered), some
/// malformed.
fn stream() -> impl Strategy<Value = Vec<String>> {
    (prop::collection::vec((gen_event(), any::<bool>(), 0u8..20), 1..30)).prop_map(|items| {
        let mut sorted = items.clone();
        sorted.sort_by_key(|(g, _, _)| g.second);
        let mut out = Vec::new();
        for (id, (g, variant, roll)) in sorted.iter().enumerate() {
            match roll {
                0 => out.push("{\"customer_id\": \"c\", \"type\": ".to_owned()),
                1 => out.push(format!(
                    "{{\"customer_id\": \"\", \"type\": \"view\", \"ts\": {BASE}}}"
                )),
                _ => {}
            }
            let line = render(g, id, *variant);
            if *roll == 2 && !out.is_empty() {
                // Arrives late: swap with the previous line.
                let prev = out.pop().unwrap();
                out.push(line.clone());
                out.push(prev);
            } else {
                out.push(line.clone());
            }
            if *roll == 3 {
                out.push(line.clone());
            }
            if *roll == 4 {
                let mut altered = g.clone();
                altered.amount = 99;
                altered.p = "z";
                out.push(render(&altered, id, *variant));
            }
        }
        out
    })
}

// ---- the naive model ----

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ModelChange {
    customer: String,
    kind: &'static str,
    name: String,
    op: &'static str,
    at: i64,
    cause: String,
}

struct Model {
    rules: CompiledRules,
    customers: BTreeMap<String, CustomerHistory>,
    members: BTreeMap<(String, String), i64>,
    seen_ids: HashMap<String, i64>,
    clock: Option<i64>,
    arrival: u64,
    changes: Vec<ModelChange>,
    rejected: usize,
    duplicates: usize,
}

impl Model {
    fn new(rules: &str) -> Model {
        Model {
            rules: CompiledRules::compile(rules).expect("rules compile"),
            customers: BTreeMap::new(),
            members: BTreeMap::new(),
            seen_ids: HashMap::new(),
            clock: None,
            arrival: 0,
            changes: Vec::new(),
            rejected: 0,
            duplicates: 0,
        }
    }

    /// Every tag and segment of one customer at `now`, from scratch.
    fn memberships(&self, history: &CustomerHistory, now: i64) -> BTreeMap<String, (bool, &'static str)> {
        let facts = history.facts(&self.rules, now, DEFAULT_RETENTION_MS);
        let values = self.rules.evaluate_all(&facts);
        self.rules
            .defs()
            .iter()
            .filter(|d| d.kind.has_members())
            .map(|d| {
                let kind = if d.kind == DefKind::Segment {
                    "segment"
                } else {
                    "tag"
                };
                (d.name.to_string(), (values[d.id].is_true(), kind))
            })
            .collect()
    }

    fn evaluate(&mut self, customer: &str, now: i64, at: i64, cause: &str) {
        let history = &self.customers[customer];
        let members = self.memberships(history, now);
        for (name, (present, kind)) in members {
            let key = (customer.to_owned(), name.clone());
            let was = self.members.contains_key(&key);
            if present != was {
                let op = if present { "add" } else { "remove" };
                if present {
                    self.members.insert(key, at);
                } else {
                    self.members.remove(&key);
                }
                self.changes.push(ModelChange {
                    customer: customer.to_owned(),
                    kind,
                    name,
                    op,
                    at,
                    cause: cause.to_owned(),
                });
            }
        }
    }

    /// Steps through every instant in `(from, to]` where a change could fall.
    fn pass_time(&mut self, from: i64, to: i64) {
        let mut second = from.div_euclid(1000) * 1000;
        while second <= to {
            for t in [second, second + 1] {
                if t > from && t <= to {
                    let customers: Vec<String> = self.customers.keys().cloned().collect();
                    for c in customers {
                        self.evaluate(&c, t, t, "timer");
                    }
                }
            }
            second += 1000;
        }
    }

    fn ingest(&mut self, line: &str) {
        let Ok(ev) = parse_event(line.as_bytes(), &EventLimits::default(), FAR_FUTURE) else {
            self.rejected += 1;
            return;
        };
        let ts = ev.ts.expect("generated events carry ts");
        if let Some(id) = &ev.event_id {
            if self.seen_ids.contains_key(id) {
                self.duplicates += 1;
                return;
            }
        }
        if self.clock.is_none_or(|c| ts > c) {
            if let Some(c) = self.clock {
                // Timers due at or before the event's ts fire first.
                self.pass_time(c, ts);
            }
            self.clock = Some(ts);
        }
        let now = self.clock.unwrap();
        if let Some(id) = &ev.event_id {
            self.seen_ids.insert(id.clone(), now);
        }
        let customer = ev.customer_id.to_string();
        let event = rules::Event {
            event_type: ev.event_type.clone(),
            ts,
            arrival: self.arrival,
            props: ev.props,
        };
        self.arrival += 1;
        self.customers
            .entry(customer.clone())
            .or_default()
            .push(event, ev.profile);
        let cause = format!("event:{}", ev.event_id.unwrap_or_default());
        self.evaluate(&customer, now, ts.max(now), &cause);
    }

    fn finish(&mut self, now: i64) {
        if let Some(c) = self.clock {
            self.pass_time(c, now);
        }
        self.clock = Some(now);
    }

    fn final_state(&self, now: i64) -> FinalState {
        self.customers
            .iter()
            .map(|(id, h)| {
                let facts = h.facts(&self.rules, now, DEFAULT_RETENTION_MS);
                let values = self.rules.evaluate_all(&facts);
                let members = self
                    .memberships(h, now)
                    .into_iter()
                    .filter(|(_, (p, _))| *p)
                    .map(|(n, _)| (n, true))
                    .collect();
                let traits = self
                    .rules
                    .defs()
                    .iter()
                    .filter(|d| d.kind == DefKind::Trait)
                    .map(|d| (d.name.to_string(), values[d.id].clone()))
                    .collect();
                let profile = h
                    .profile
                    .iter()
                    .filter_map(|(k, e)| e.value.clone().map(|v| (k.to_string(), v)))
                    .collect();
                (id.clone(), (members, traits, profile))
            })
            .collect()
    }
}

type FinalState = BTreeMap<
    String,
    (
        BTreeMap<String, bool>,
        BTreeMap<String, Value>,
        BTreeMap<String, Value>,
    ),
>;

fn engine_final_state(engine: &Engine) -> FinalState {
    engine
        .customer_ids()
        .unwrap()
        .into_iter()
        .map(|id| {
            let view = engine.customer(&id).unwrap().unwrap();
            let members = view
                .tags
                .keys()
                .chain(view.segments.keys())
                .map(|n| (n.to_string(), true))
                .collect();
            let traits = view.traits.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let profile = view
                .profile
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            (id, (members, traits, profile))
        })
        .collect()
}

/// How the engine under test is set up: its customer cache and its shards.
#[derive(Debug, Clone, Copy)]
struct Setup {
    cache_customers: usize,
    workers: usize,
    partitions: u32,
}

impl Setup {
    fn config(self) -> EngineConfig {
        EngineConfig {
            clock: ClockMode::Event,
            sync_writes: false,
            cache_customers: self.cache_customers,
            workers: self.workers,
            partitions: self.partitions,
            ..Default::default()
        }
    }
}

fn setup(cache_customers: usize) -> Setup {
    Setup {
        cache_customers,
        workers: 1,
        partitions: 1,
    }
}

/// Ingests `lines` in batches of the given sizes, then moves the clock to `end`.
fn feed(engine: &mut Engine, lines: &[String], batch_sizes: &[usize]) {
    let mut rest = lines;
    let mut sizes = batch_sizes.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        engine.ingest(&rest[..n]).unwrap();
        rest = &rest[n..];
    }
}

fn run_engine(
    rules: &str,
    lines: &[String],
    batch_sizes: &[usize],
    end: i64,
    setup: Setup,
) -> (Engine, tests::TempDir) {
    let dir = tests::TempDir::new("model");
    let mut engine = Engine::open(dir.path(), Some(rules), setup.config()).unwrap();
    feed(&mut engine, lines, batch_sizes);
    engine.advance_clock(end).unwrap();
    (engine, dir)
}

/// `tail_s` seconds after the stream's latest `ts`.
fn stream_end(lines: &[String], tail_s: i64) -> i64 {
    let latest = lines
        .iter()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("ts")?
                .as_i64()
        })
        .max();
    latest.unwrap_or(BASE) + tail_s * 1000
}

/// The whole change log with `seq`, as stored.
fn change_log(engine: &Engine) -> Vec<String> {
    let changes = engine.changes(0, usize::MAX).unwrap();
    changes
        .iter()
        .map(|c| {
            format!(
                "{} {} {:?} {} {:?} {} {}",
                c.seq,
                c.customer_id,
                c.kind,
                c.name,
                c.op,
                c.at,
                c.cause.as_string()
            )
        })
        .collect()
}

fn engine_changes(engine: &Engine) -> Vec<ModelChange> {
    engine
        .changes(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|c| ModelChange {
            customer: c.customer_id.to_string(),
            kind: if c.kind == MemberKind::Segment {
                "segment"
            } else {
                "tag"
            },
            name: c.name.to_string(),
            op: if c.op == Op::Add { "add" } else { "remove" },
            at: c.at,
            cause: c.cause.as_string(),
        })
        .collect()
}

/// Changes per customer, in order (different customers may interleave differently).
fn per_customer(changes: &[ModelChange]) -> BTreeMap<String, Vec<ModelChange>> {
    let mut out: BTreeMap<String, Vec<ModelChange>> = BTreeMap::new();
    for c in changes {
        out.entry(c.customer.clone()).or_default().push(c.clone());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_agrees_with_the_naive_model(
        rules in rule_set(),
        lines in stream(),
        batch_sizes in prop::collection::vec(1usize..8, 1..4),
        tail_s in 0i64..200,
        cache_customers in prop_oneof![Just(0usize), Just(2), Just(100_000)],
        workers in prop_oneof![Just(1usize), Just(2), Just(4)],
        partitions in prop_oneof![Just(1u32), Just(3), Just(12)],
    ) {
        let mut model = Model::new(&rules);
        for line in &lines {
            model.ingest(line);
        }
        let end = model.clock.unwrap_or(BASE) + tail_s * 1000;
        model.finish(end);

        let setup = Setup { cache_customers, workers, partitions };
        let (engine, _dir) = run_engine(&rules, &lines, &batch_sizes, end, setup);
        let ours = engine_changes(&engine);
        for pair in ours.windows(2) {
            prop_assert!(pair[0].at <= pair[1].at || pair[1].cause.starts_with("event:"), "timer changes in time order");
        }
        prop_assert_eq!(per_customer(&ours), per_customer(&model.changes), "rules:\n{}\nstream:\n{}", rules, lines.join("\n"));
        prop_assert_eq!(engine_final_state(&engine), model.final_state(end), "rules:\n{}", rules);
    }

    #[test]
    fn a_shuffled_stream_ends_in_the_same_state(
        rules in rule_set(),
        events in prop::collection::vec(gen_event(), 1..25),
        seed in any::<u64>(),
    ) {
        // Profile updates of one customer at the same ts are settled by arrival order (the
        // contract's tie rule), so a shuffle may legitimately change them: keep one event per
        // (customer, ts).
        let mut seen = std::collections::HashSet::new();
        let events: Vec<Gen> = events.into_iter().filter(|g| seen.insert((g.customer, g.second))).collect();
        let lines: Vec<String> = events.iter().enumerate().map(|(i, g)| render(g, i, i % 2 == 0)).collect();
        let mut shuffled = lines.clone();
        // A deterministic Fisher-Yates from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let end = BASE + (SPAN_S + 30) * 1000;
        let (a, _da) = run_engine(&rules, &lines, &[5], end, setup(100_000));
        let (b, _db) = run_engine(&rules, &shuffled, &[3], end, Setup { workers: 3, partitions: 5, ..setup(1) });
        prop_assert_eq!(engine_final_state(&a), engine_final_state(&b), "rules:\n{}", rules);
    }

    /// Pipelined group commits — each group evaluated while the one before it is written —
    /// write the change log and reach the state synchronous commits do, whatever the cache
    /// (customers of the group in flight are never evicted and re-read stale).
    #[test]
    fn pipelined_groups_write_the_same_change_log(
        rules in rule_set(),
        lines in stream(),
        batch_sizes in prop::collection::vec(1usize..12, 1..4),
        tail_s in 0i64..200,
        cache_customers in prop_oneof![Just(0usize), Just(3), Just(100_000)],
        workers in prop_oneof![Just(1usize), Just(2), Just(4)],
    ) {
        let end = stream_end(&lines, tail_s);
        // Each event sent again right after the next one: the resend often lands in the
        // group after its original, while that one is still being written.
        let lines: Vec<String> = lines
            .iter()
            .enumerate()
            .flat_map(|(i, l)| std::iter::once(l.clone()).chain(i.checked_sub(1).map(|p| lines[p].clone())))
            .collect();
        let (sync, _d1) = run_engine(&rules, &lines, &batch_sizes, end, setup(cache_customers));
        let dir = tests::TempDir::new("model-pipelined");
        let config = Setup { cache_customers, workers, partitions: 5 }.config();
        let mut engine = Engine::open(dir.path(), Some(&rules), config).unwrap();
        let mut rest = &lines[..];
        let mut sizes = batch_sizes.iter().cycle();
        let mut tickets = Vec::new();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).clamp(1, rest.len());
            let raw = rest[..n].iter().map(|l| l.clone().into_bytes()).collect();
            tickets.push(engine.submit_group(vec![IngestRequest::parse(raw, &EventLimits::default())]));
            rest = &rest[n..];
        }
        engine.settle();
        let finished = engine.take_finished();
        prop_assert_eq!(finished.iter().map(|f| f.ticket).collect::<Vec<_>>(), tickets);
        prop_assert!(finished.iter().all(|f| f.result.is_ok()));
        engine.advance_clock(end).unwrap();
        prop_assert_eq!(change_log(&sync), change_log(&engine), "rules:\n{}\nstream:\n{}", rules, lines.join("\n"));
        prop_assert_eq!(engine_final_state(&sync), engine_final_state(&engine));
    }

    /// Shards change nothing anyone can see: with any number of workers and partitions the
    /// change log is the one a single worker writes — the same changes with the same `seq`
    /// — and so is the final state, also when the engine restarts with another number of
    /// workers half way.
    #[test]
    fn any_number_of_workers_writes_the_same_change_log(
        rules in rule_set(),
        lines in stream(),
        batch_sizes in prop::collection::vec(1usize..12, 1..4),
        tail_s in 0i64..200,
        cache_customers in prop_oneof![Just(0usize), Just(3), Just(100_000)],
        workers in prop_oneof![Just(2usize), Just(3), Just(4)],
        partitions in prop_oneof![Just(2u32), Just(7), Just(12)],
        restart_workers in prop_oneof![Just(1usize), Just(2), Just(4)],
        cut in 0usize..=100,
    ) {
        let end = stream_end(&lines, tail_s);
        let (one, _d1) = run_engine(&rules, &lines, &batch_sizes, end, setup(cache_customers));
        let sharded = Setup { cache_customers, workers, partitions };
        let (many, _d2) = run_engine(&rules, &lines, &batch_sizes, end, sharded);
        prop_assert_eq!(change_log(&one), change_log(&many), "rules:\n{}\nstream:\n{}", rules, lines.join("\n"));
        prop_assert_eq!(engine_final_state(&one), engine_final_state(&many));

        // Half the stream with `workers`, the rest after a restart with `restart_workers`.
        let cut = lines.len() * cut / 100;
        let dir = tests::TempDir::new("model-restart");
        {
            let mut engine = Engine::open(dir.path(), Some(&rules), sharded.config()).unwrap();
            feed(&mut engine, &lines[..cut], &batch_sizes);
        }
        let restarted = Setup { workers: restart_workers, ..sharded };
        let mut engine = Engine::open(dir.path(), Some(&rules), restarted.config()).unwrap();
        feed(&mut engine, &lines[cut..], &batch_sizes);
        engine.advance_clock(end).unwrap();
        prop_assert_eq!(engine_final_state(&one), engine_final_state(&engine));
        prop_assert_eq!(per_customer(&engine_changes(&one)), per_customer(&engine_changes(&engine)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// With a clock per partition (a member of a consumer group), each partition's customers
    /// are what the naive model makes of that partition's events alone — its own clock, late
    /// events judged by it — whatever the other partitions' events and however many workers.
    #[test]
    fn with_a_clock_per_partition_each_partition_is_the_model_of_its_own_events(
        rules in rule_set(),
        lines in stream(),
        batch_sizes in prop::collection::vec(1usize..8, 1..4),
        tail_s in 0i64..200,
        cache_customers in prop_oneof![Just(0usize), Just(100_000)],
        workers in prop_oneof![Just(1usize), Just(2), Just(3)],
        partitions in prop_oneof![Just(2u32), Just(3), Just(5)],
    ) {
        let partition = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("customer_id")?.as_str().map(|c| rules::normalize(c).into_owned()))
                .map_or(0, |c| processor::partition::partition_of(c.as_bytes(), partitions))
        };
        let mut models: Vec<Model> = (0..partitions).map(|_| Model::new(&rules)).collect();
        for line in &lines {
            models[partition(line) as usize].ingest(line);
        }
        let end = models.iter().filter_map(|m| m.clock).max().unwrap_or(BASE) + tail_s * 1000;
        let mut expected_changes = Vec::new();
        let mut expected_state = FinalState::new();
        for model in &mut models {
            model.finish(end);
            expected_changes.extend(model.changes.iter().cloned());
            expected_state.extend(model.final_state(end));
        }

        let dir = tests::TempDir::new("model-partition-clocks");
        let config = EngineConfig {
            clock_per_partition: true,
            ..Setup { cache_customers, workers, partitions }.config()
        };
        let mut engine = Engine::open(dir.path(), Some(&rules), config).unwrap();
        feed(&mut engine, &lines, &batch_sizes);
        engine.advance_clock(end).unwrap();
        prop_assert_eq!(
            per_customer(&engine_changes(&engine)),
            per_customer(&expected_changes),
            "rules:\n{}\nstream:\n{}", rules, lines.join("\n")
        );
        prop_assert_eq!(engine_final_state(&engine), expected_state, "rules:\n{}", rules);
    }
}

#[test]
fn arc_names_are_cheap_to_compare() {
    // Guard for the test's own helpers: customer spellings normalise to three ids.
    let ids: std::collections::BTreeSet<Arc<str>> = (0..3)
        .flat_map(|n| [false, true].map(|v| customer_spelling(n, v)))
        .map(|s| Arc::from(rules::normalize(&s).as_ref()))
        .collect();
    assert_eq!(ids.len(), 3);
}
