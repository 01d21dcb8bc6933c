//! Every example in `docs/rules.md` is a test: each ```trl block compiles, and each
//! scenario behaves as the guide says.

use std::collections::BTreeMap;

use rules::{CompiledRules, CustomerHistory, Event, Props, Value, DEFAULT_RETENTION_MS};

const MIN: i64 = 60_000;
const DAY: i64 = 24 * 60 * MIN;
/// A start far from the epoch, so `lifetime` and retention behave as in production.
const T0: i64 = 1_740_000_000_000;

fn guide_examples() -> BTreeMap<String, String> {
    let guide = include_str!("../../docs/rules.md");
    let mut examples = BTreeMap::new();
    let mut rest = guide;
    while let Some(start) = rest.find("```trl\n") {
        let body = &rest[start + 7..];
        let end = body.find("```").expect("closed code block");
        let code = &body[..end];
        let name = code
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# example: "))
            .unwrap_or_else(|| panic!("a guide example lacks its `# example: NAME` line:\n{code}"));
        examples.insert(name.trim().to_owned(), code.to_owned());
        rest = &body[end + 3..];
    }
    examples
}

struct Customer {
    rules: CompiledRules,
    history: CustomerHistory,
}

impl Customer {
    fn new(source: &str) -> Customer {
        let rules = CompiledRules::compile(source)
            .unwrap_or_else(|d| panic!("{}", rules::render_all(&d, source, "docs/rules.md")));
        Customer {
            rules,
            history: CustomerHistory::new(),
        }
    }

    fn event(&mut self, event_type: &str, ts: i64, props: serde_json::Value, profile: serde_json::Value) {
        let arrival = self.history.events.len() as u64;
        let props = Props::from_json(props.as_object().expect("props object"));
        let profile: Vec<_> = profile
            .as_object()
            .expect("profile object")
            .iter()
            .map(|(k, v)| (k.as_str().into(), (!v.is_null()).then(|| Value::from_json(v))))
            .collect();
        self.history.push(
            Event {
                event_type: event_type.into(),
                ts,
                arrival,
                props,
            },
            profile,
        );
    }

    fn value(&self, name: &str, now: i64) -> Value {
        let id = self
            .rules
            .lookup(name)
            .unwrap_or_else(|| panic!("no definition {name}"));
        let facts = self.history.facts(&self.rules, now, DEFAULT_RETENTION_MS);
        self.rules.evaluate_all(&facts)[id].clone()
    }

    fn has(&self, name: &str, now: i64) -> bool {
        self.value(name, now).is_true()
    }

    fn next_change(&self, now: i64) -> Option<i64> {
        self.rules
            .next_change(&self.history.facts(&self.rules, now, DEFAULT_RETENTION_MS))
    }
}

use serde_json::json;

fn high_value_active(c: &mut Customer) {
    c.event(
        "profile_update",
        T0,
        json!({}),
        json!({"follows_official_account": true}),
    );
    c.event("payment", T0 + MIN, json!({"amount": 1500.5}), json!({}));
    c.event("payment", T0 + 2 * DAY, json!({"amount": 499.5}), json!({}));
    c.event("app_open", T0 + 2 * DAY, json!({}), json!({}));
    c.event("app_open", T0 + 3 * DAY, json!({}), json!({}));
    assert!(
        !c.has("high_value_active", T0 + 3 * DAY),
        "two app opens are not enough"
    );
    c.event("app_open", T0 + 4 * DAY, json!({}), json!({}));
    assert!(
        c.has("high_value_active", T0 + 4 * DAY),
        "the third app open makes it"
    );
    // The first payment leaves the 30-day window at T0 + 1m + 30d, with no event.
    let leaves = T0 + MIN + 30 * DAY;
    assert!(c.next_change(T0 + 4 * DAY).is_some_and(|t| t <= T0 + 9 * DAY));
    assert!(!c.has("high_value_active", leaves));
}

fn viewed_seafood(c: &mut Customer) {
    c.event("view", T0, json!({"category": "seafood"}), json!({}));
    c.event("view", T0 + DAY, json!({"category": "tea"}), json!({}));
    assert!(c.has("viewed_seafood", T0 + 7 * DAY - 1));
    assert!(
        !c.has("viewed_seafood", T0 + 7 * DAY),
        "held until 7 days after the last match"
    );
    assert_eq!(c.next_change(T0 + 2 * DAY), Some(T0 + 7 * DAY));
}

fn churn_risk(c: &mut Customer) {
    for i in 0..3 {
        c.event("payment", T0 + i * DAY, json!({"amount": 10}), json!({}));
    }
    assert!(!c.has("churn_risk", T0 + 2 * DAY));
    assert!(!c.has("churn_risk", T0 + 62 * DAY - 1));
    assert!(
        c.has("churn_risk", T0 + 62 * DAY),
        "60 days after the last payment"
    );
}

fn engagement(c: &mut Customer) {
    c.event("video_watch", T0, json!({"duration_s": 75}), json!({}));
    c.event("video_watch", T0, json!({"duration_s": 20}), json!({}));
    c.event("doc_download", T0, json!({}), json!({}));
    c.event("demo_booked", T0, json!({}), json!({}));
    assert_eq!(c.value("engagement", T0), Value::num(8));
    assert!(!c.has("hot_lead", T0));
    c.event("doc_download", T0 + MIN, json!({}), json!({}));
    assert_eq!(c.value("engagement", T0 + MIN), Value::num(10));
    assert!(c.has("hot_lead", T0 + MIN));
}

fn lead_sla_breach(c: &mut Customer) {
    c.event(
        "lead_created",
        T0,
        json!({"source": "转介绍"}),
        json!({"lead_status": "new"}),
    );
    assert!(!c.has("lead_sla_breach", T0 + 45 * MIN));
    assert_eq!(c.next_change(T0), Some(T0 + 45 * MIN + 1));
    assert!(c.has("lead_sla_breach", T0 + 45 * MIN + 1));
    c.event(
        "call",
        T0 + 50 * MIN,
        json!({}),
        json!({"lead_status": "contacted"}),
    );
    assert!(!c.has("lead_sla_breach", T0 + 50 * MIN));
}

fn spring_promo(c: &mut Customer) {
    c.event("profile_update", T0, json!({}), json!({"city": "杭州\u{200b}"}));
    c.event("payment", T0, json!({"amount": 2000}), json!({}));
    for i in 0..3 {
        c.event("app_open", T0 + i, json!({}), json!({}));
    }
    assert!(
        c.has("spring_promo", T0 + 10),
        "the city compares after normalisation"
    );
    c.event("profile_update", T0 + 20, json!({}), json!({"city": "北京"}));
    assert!(!c.has("spring_promo", T0 + 20));
}

fn aggregates(c: &mut Customer) {
    c.event("payment", T0, json!({"amount": 0.1, "channel": "app"}), json!({}));
    c.event(
        "payment",
        T0 + 1,
        json!({"amount": 0.2, "channel": "wechat"}),
        json!({}),
    );
    c.event(
        "view",
        T0,
        json!({"category": "tea", "item": {"id": "SKU1"}}),
        json!({}),
    );
    c.event(
        "view",
        T0 + 2,
        json!({"category": "tea\u{200b}", "item": {"id": "SKU2"}}),
        json!({}),
    );
    c.event("app_open", T0, json!({"device": {"os": "iOS"}}), json!({}));
    let now = T0 + 10;
    assert_eq!(c.value("orders_90d", now), Value::num(2));
    assert_eq!(c.value("spend_lifetime", now), Value::Num("0.3".parse().unwrap()));
    assert_eq!(c.value("avg_order", now), Value::Num("0.15".parse().unwrap()));
    assert_eq!(c.value("smallest_order", now), Value::Num("0.1".parse().unwrap()));
    assert_eq!(c.value("largest_order", now), Value::Num("0.2".parse().unwrap()));
    assert_eq!(c.value("categories_seen", now), Value::num(1));
    assert_eq!(c.value("last_channel", now), Value::str("wechat"));
    assert_eq!(c.value("first_product", now), Value::str("SKU1"));
    assert_eq!(c.value("quiet_for", now), Value::Dur(10));
}

fn operators(c: &mut Customer) {
    c.event(
        "profile_update",
        T0,
        json!({}),
        json!({"city": "上海", "phone": "13800001111", "email": "a@b.cn"}),
    );
    c.event("view", T0, json!({"category": "green tea"}), json!({}));
    c.event("call", T0, json!({}), json!({}));
    let now = T0 + 3 * 60 * MIN + 1;
    for tag in [
        "vip_city",
        "wants_tea",
        "mobile_138",
        "has_email",
        "quiet_3h",
        "not_follower",
    ] {
        assert!(c.has(tag, now), "{tag}");
    }
    assert!(!c.has("quiet_3h", T0 + 3 * 60 * MIN));
}

type Check = fn(&mut Customer);

#[test]
fn every_guide_example_compiles_and_behaves_as_described() {
    let checks: BTreeMap<&str, Check> = BTreeMap::from([
        ("high_value_active", high_value_active as Check),
        ("viewed_seafood", viewed_seafood),
        ("churn_risk", churn_risk),
        ("engagement", engagement),
        ("lead_sla_breach", lead_sla_breach),
        ("spring_promo", spring_promo),
        ("aggregates", aggregates),
        ("operators", operators),
    ]);
    let examples = guide_examples();
    assert!(examples.len() >= 8, "found only {} examples", examples.len());
    for (name, code) in &examples {
        let check = checks
            .get(name.as_str())
            .unwrap_or_else(|| panic!("guide example `{name}` has no behaviour test"));
        check(&mut Customer::new(code));
    }
    for name in checks.keys() {
        assert!(examples.contains_key(*name), "the guide lost example `{name}`");
    }
}

#[test]
fn the_deployed_example_rules_compile() {
    let source = include_str!("../../deploy/rules/example.trl");
    let rules = CompiledRules::compile(source)
        .unwrap_or_else(|d| panic!("{}", rules::render_all(&d, source, "example.trl")));
    assert_eq!(rules.defs().len(), 20);
}
