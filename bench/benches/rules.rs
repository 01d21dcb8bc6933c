//! Micro-benchmarks of the rule language's hot paths.
//!
//! - `compile/1000_definitions`: compiling a generated 1,000-definition rule set (goal < 50 ms).
//! - `evaluate/example_20_definitions`: evaluating every definition of
//!   `deploy/rules/example.trl` for one customer whose aggregates the engine already holds
//!   (goal < 2 µs).
//! - `next_change/example_20_definitions`: finding the customer's next timer instant.
//!
//! Run: `cargo bench -p bench --bench rules`. Results: `bench/RESULTS.md`.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use rules::{AggFunc, AggId, CompiledRules, DefId, Facts, Value};

/// A generated rule set of `n` definitions in the shapes real rule sets have: windowed
/// aggregates over a dozen event types, traits feeding tags, event tags and segments.
fn generated_rules(n: usize) -> String {
    let types = [
        "payment",
        "app_open",
        "view",
        "call",
        "lead_created",
        "video_watch",
        "doc_download",
        "demo_booked",
        "contact_attempt",
        "coupon_used",
        "share",
        "review",
    ];
    let windows = ["1d", "7d", "30d", "90d", "lifetime"];
    let mut out = String::new();
    for i in 0..n {
        let t = types[i % types.len()];
        let w = windows[i % windows.len()];
        let line = match i % 5 {
            0 => format!("trait t{i} = sum({t}.amount where channel == \"app\", {w}) + count({t}, 7d)\n"),
            1 => format!(
                "tag g{i} = t{} >= {} and profile.city in [\"杭州\", \"上海\"]\n",
                i - 1,
                i % 100
            ),
            2 => format!("tag e{i} on {t} where category == \"c{}\" ttl 7d\n", i % 17),
            3 => format!("tag s{i} = since({t}) > 45m and not g{} or e{}\n", i - 2, i - 1),
            _ => format!("segment seg{i} = g{} and not s{}\n", i - 3, i - 1),
        };
        out.push_str(&line);
    }
    out
}

/// Facts as the engine holds them: aggregate values precomputed, profile in a map.
struct HeldFacts {
    now: i64,
    aggregates: Vec<Value>,
    profile: HashMap<&'static str, Value>,
    definitions: Vec<Value>,
}

impl Facts for HeldFacts {
    fn now(&self) -> i64 {
        self.now
    }
    fn aggregate(&self, id: AggId) -> Value {
        self.aggregates[id].clone()
    }
    fn profile(&self, name: &str) -> Option<Value> {
        self.profile.get(name).cloned()
    }
    fn definition(&self, id: DefId) -> Value {
        self.definitions[id].clone()
    }
    fn aggregate_next_change(&self, id: AggId) -> Option<i64> {
        Some(self.now + 3_600_000 + id as i64)
    }
    fn event_tag_next_change(&self, id: DefId) -> Option<i64> {
        Some(self.now + 7_200_000 + id as i64)
    }
}

fn example_facts(rules: &CompiledRules) -> HeldFacts {
    let now = 1_744_732_800_000;
    let aggregates = rules
        .aggregates()
        .iter()
        .map(|a| match a.func {
            AggFunc::Since => Value::Dur(3 * 3_600_000),
            AggFunc::Last | AggFunc::First => Value::str("no_answer"),
            _ => Value::Num("2350.75".parse().unwrap()),
        })
        .collect();
    let profile = HashMap::from([
        ("city", Value::str("杭州")),
        ("follows_official_account", Value::Bool(true)),
        ("lead_status", Value::str("new")),
    ]);
    let definitions = vec![Value::Bool(true); rules.defs().len()];
    HeldFacts {
        now,
        aggregates,
        profile,
        definitions,
    }
}

fn benches(c: &mut Criterion) {
    let source = generated_rules(1000);
    c.bench_function("compile/1000_definitions", |b| {
        b.iter(|| CompiledRules::compile(black_box(&source)).expect("generated rules compile"))
    });

    let example = include_str!("../../deploy/rules/example.trl");
    let rules = CompiledRules::compile(example).expect("example rules compile");
    assert_eq!(rules.defs().len(), 20);
    let facts = example_facts(&rules);
    c.bench_function("evaluate/example_20_definitions", |b| {
        b.iter(|| rules.evaluate_all(black_box(&facts)))
    });
    c.bench_function("next_change/example_20_definitions", |b| {
        b.iter(|| rules.next_change(black_box(&facts)))
    });
}

criterion_group!(rule_benches, benches);
criterion_main!(rule_benches);
