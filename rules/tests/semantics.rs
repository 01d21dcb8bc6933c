//! The meaning of rules (contract section 3), checked on small hand-made histories.

use rules::{CompiledRules, CustomerHistory, Event, Props, Value, DEFAULT_RETENTION_MS};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

fn event(event_type: &str, ts: i64, arrival: u64, props: &str) -> Event {
    let json: serde_json::Value = serde_json::from_str(props).expect("props json");
    Event {
        event_type: event_type.into(),
        ts,
        arrival,
        props: Props::from_json(json.as_object().expect("props object")),
    }
}

struct Case {
    rules: CompiledRules,
    history: CustomerHistory,
}

impl Case {
    fn new(source: &str) -> Case {
        let rules = CompiledRules::compile(source)
            .unwrap_or_else(|d| panic!("{}", rules::render_all(&d, source, "case")));
        Case {
            rules,
            history: CustomerHistory::new(),
        }
    }

    fn push(&mut self, event_type: &str, ts: i64, props: &str) -> &mut Self {
        let arrival = self.history.events.len() as u64;
        self.history.push(event(event_type, ts, arrival, props), []);
        self
    }

    fn set_profile(&mut self, ts: i64, name: &str, value: Option<Value>) -> &mut Self {
        let arrival = self.history.events.len() as u64;
        self.history
            .push(event("profile_update", ts, arrival, "{}"), [(name.into(), value)]);
        self
    }

    fn value(&self, name: &str, now: i64) -> Value {
        let id = self
            .rules
            .lookup(name)
            .unwrap_or_else(|| panic!("no definition {name}"));
        let facts = self.history.facts(&self.rules, now, DEFAULT_RETENTION_MS);
        self.rules.evaluate_all(&facts)[id].clone()
    }

    fn next_change(&self, now: i64) -> Option<i64> {
        self.rules
            .next_change(&self.history.facts(&self.rules, now, DEFAULT_RETENTION_MS))
    }
}

fn num(s: &str) -> Value {
    Value::Num(s.parse().unwrap())
}

#[test]
fn a_window_holds_events_with_now_minus_w_below_ts_up_to_now() {
    let mut c = Case::new("trait n = count(app_open, 1d)");
    c.push("app_open", 10 * DAY, "{}");
    assert_eq!(c.value("n", 10 * DAY - 1), num("0"), "not yet happened");
    assert_eq!(c.value("n", 10 * DAY), num("1"));
    assert_eq!(c.value("n", 11 * DAY - 1), num("1"));
    assert_eq!(c.value("n", 11 * DAY), num("0"), "ts = now - W is outside");
    assert_eq!(
        c.next_change(10 * DAY - 5),
        Some(10 * DAY),
        "a future event enters at its ts"
    );
    assert_eq!(c.next_change(10 * DAY), Some(11 * DAY), "and leaves at ts + W");
}

#[test]
fn empty_aggregates_follow_the_null_rules() {
    let c = Case::new(
        "trait c = count(payment, 30d)
         trait s = sum(payment.amount, 30d)
         trait a = avg(payment.amount, 30d)
         trait lo = min(payment.amount, 30d)
         trait hi = max(payment.amount, 30d)
         trait d = distinct(payment.channel, 30d)
         trait l = last(payment.amount)
         trait f = first(payment.amount)
         trait q = since(payment)",
    );
    assert_eq!(c.value("c", DAY), num("0"));
    assert_eq!(c.value("s", DAY), num("0"));
    assert_eq!(c.value("d", DAY), num("0"));
    for name in ["a", "lo", "hi", "l", "f", "q"] {
        assert_eq!(c.value(name, DAY), Value::Null, "{name}");
    }
}

#[test]
fn sums_are_exact_and_skip_non_numbers() {
    let mut c = Case::new(
        "trait s = sum(payment.amount, lifetime)
         trait a = avg(payment.amount, lifetime)
         trait lo = min(payment.amount, lifetime)
         trait hi = max(payment.amount, lifetime)",
    );
    for i in 0..1000 {
        c.push("payment", DAY + i, r#"{"amount": 0.1}"#);
    }
    c.push("payment", DAY, r#"{"amount": "100"}"#);
    c.push("payment", DAY, r#"{"amount": null}"#);
    c.push("payment", DAY, r#"{"currency": "CNY"}"#);
    c.push("payment", DAY, r#"{"amount": 0.000001}"#);
    assert_eq!(c.value("s", 2 * DAY), num("100.000001"));
    assert_eq!(c.value("lo", 2 * DAY), num("0.000001"));
    assert_eq!(c.value("hi", 2 * DAY), num("0.1"));
    assert_eq!(
        c.value("a", 2 * DAY),
        Value::Num(num_dec("100.000001") / num_dec("1001"))
    );
    assert_eq!(
        serde_json::to_string(&c.value("s", 2 * DAY)).unwrap(),
        "100.000001"
    );
}

fn num_dec(s: &str) -> rust_decimal::Decimal {
    s.parse().unwrap()
}

#[test]
fn last_and_first_break_ties_by_arrival() {
    let mut c = Case::new("trait l = last(call.outcome)\ntrait f = first(call.outcome)");
    c.push("call", 5 * HOUR, r#"{"outcome": "a"}"#);
    c.push("call", 5 * HOUR, r#"{"outcome": "b"}"#);
    c.push("call", HOUR, r#"{"outcome": "c"}"#);
    c.push("call", HOUR, r#"{"outcome": "d"}"#);
    c.push("call", 9 * HOUR, r#"{"other": 1}"#);
    assert_eq!(
        c.value("l", 6 * HOUR),
        Value::str("b"),
        "same ts: the later arrival is newest"
    );
    assert_eq!(
        c.value("f", 6 * HOUR),
        Value::str("c"),
        "same ts: the earlier arrival is oldest"
    );
    assert_eq!(
        c.value("l", 10 * HOUR),
        Value::Null,
        "the newest event lacks the property"
    );
}

#[test]
fn distinct_skips_nulls_and_compares_normalised_strings() {
    let mut c = Case::new("trait d = distinct(view.category, 30d)");
    for cat in [
        r#""seafood""#,
        r#""seafood\u200b""#,
        r#"" ｓｅａｆｏｏｄ ""#,
        "null",
        r#""tea""#,
        "3",
        "3.0",
    ] {
        c.push("view", DAY, &format!(r#"{{"category": {cat}}}"#));
    }
    assert_eq!(c.value("d", DAY), num("3"));
}

#[test]
fn null_and_type_rules() {
    let mut c = Case::new(
        r#"tag ne_unset = profile.city != "杭州"
           tag not_unset = not profile.follows
           trait plus_null = profile.score + 1
           trait div_zero = 10 / count(payment, 1d)
           tag num_vs_str = profile.level == "3"
           tag num_vs_str_ne = profile.level != "3"
           tag normalised = profile.city2 in ["杭州", "上海"]
           tag has_level = has(profile.level)
           tag contains_sub = profile.name contains "小"
           tag list_contains = ["a", "b"] contains "b"
           tag prefix = profile.phone starts_with "138"
           tag ordered_strings = "abc" < "abd""#,
    );
    c.set_profile(1, "level", Some(Value::num(3)));
    c.set_profile(1, "city2", Some(Value::str("杭州\u{200b}")));
    c.set_profile(1, "name", Some(Value::str("王小明")));
    c.set_profile(1, "phone", Some(Value::str("１３８00001111")));
    let now = DAY;
    assert_eq!(
        c.value("ne_unset", now),
        Value::Bool(false),
        "!= with null is false"
    );
    assert_eq!(c.value("not_unset", now), Value::Bool(true));
    assert_eq!(c.value("plus_null", now), Value::Null);
    assert_eq!(c.value("div_zero", now), Value::Null);
    assert_eq!(c.value("num_vs_str", now), Value::Bool(false));
    assert_eq!(
        c.value("num_vs_str_ne", now),
        Value::Bool(true),
        "different types are unequal"
    );
    assert_eq!(c.value("normalised", now), Value::Bool(true));
    assert_eq!(c.value("has_level", now), Value::Bool(true));
    assert_eq!(c.value("contains_sub", now), Value::Bool(true));
    assert_eq!(c.value("list_contains", now), Value::Bool(true));
    assert_eq!(
        c.value("prefix", now),
        Value::Bool(true),
        "full-width digits normalise"
    );
    assert_eq!(c.value("ordered_strings", now), Value::Bool(true));
    c.set_profile(2, "level", None);
    assert_eq!(
        c.value("has_level", now),
        Value::Bool(false),
        "null deletes the attribute"
    );
}

#[test]
fn profile_keeps_the_value_with_the_greatest_ts() {
    let mut c = Case::new(r#"tag vip = profile.level == "gold""#);
    c.set_profile(10, "level", Some(Value::str("gold")));
    c.set_profile(5, "level", Some(Value::str("silver")));
    assert_eq!(
        c.value("vip", DAY),
        Value::Bool(true),
        "an older update arriving late loses"
    );
    c.set_profile(10, "level", Some(Value::str("bronze")));
    assert_eq!(
        c.value("vip", DAY),
        Value::Bool(false),
        "a tie goes to the later arrival"
    );
}

#[test]
fn event_tags_hold_until_last_match_plus_ttl() {
    let mut c = Case::new(
        r#"tag viewed_seafood on view where category == "seafood" ttl 7d
           tag ever_paid on payment"#,
    );
    c.push("view", DAY, r#"{"category": "seafood"}"#);
    c.push("view", 3 * DAY, r#"{"category": "tea"}"#);
    c.push("view", 2 * DAY, r#"{"category": "seafood"}"#);
    c.push("payment", DAY, r#"{"amount": 1}"#);
    assert_eq!(c.value("viewed_seafood", DAY - 1), Value::Bool(false));
    assert_eq!(c.value("viewed_seafood", DAY), Value::Bool(true));
    assert_eq!(c.value("viewed_seafood", 9 * DAY - 1), Value::Bool(true));
    assert_eq!(c.value("viewed_seafood", 9 * DAY), Value::Bool(false));
    assert_eq!(
        c.next_change(5 * DAY),
        Some(8 * DAY),
        "ttl of the first view passes (early is allowed)"
    );
    assert_eq!(c.next_change(8 * DAY), Some(9 * DAY));
    assert_eq!(
        c.value("ever_paid", 900 * DAY),
        Value::Bool(true),
        "no ttl: held, retention ignored"
    );
}

#[test]
fn since_thresholds_are_exact_through_traits_and_arithmetic() {
    let mut c = Case::new(
        "trait hours_quiet = since(call) / 1h
         tag quiet_3h = hours_quiet > 3
         tag stale = since(call) - 1d >= 2d
         tag exactly_1h = since(call) == 1h",
    );
    c.push("call", 0, "{}");
    assert_eq!(c.next_change(1), Some(HOUR), "== holds at exactly 1h");
    assert_eq!(c.value("exactly_1h", HOUR), Value::Bool(true));
    assert_eq!(c.next_change(HOUR), Some(HOUR + 1), "and stops 1ms later");
    assert_eq!(c.next_change(HOUR + 1), Some(3 * HOUR + 1));
    assert_eq!(c.value("quiet_3h", 3 * HOUR), Value::Bool(false));
    assert_eq!(c.value("quiet_3h", 3 * HOUR + 1), Value::Bool(true));
    assert_eq!(c.next_change(3 * HOUR + 1), Some(3 * DAY));
    assert_eq!(c.value("stale", 3 * DAY - 1), Value::Bool(false));
    assert_eq!(c.value("stale", 3 * DAY), Value::Bool(true));
}

#[test]
fn lifetime_sees_only_retained_events() {
    let mut c = Case::new("trait n = count(payment, lifetime)");
    c.push("payment", DAY, "{}");
    let retention_end = DAY + DEFAULT_RETENTION_MS;
    assert_eq!(c.value("n", retention_end - 1), num("1"));
    assert_eq!(c.value("n", retention_end), num("0"));
    assert_eq!(c.next_change(retention_end - 10), Some(retention_end));
}

#[test]
fn where_reads_event_properties_and_the_profile() {
    let mut c = Case::new(
        r#"trait ios = count(app_open where device.os == "iOS", 7d)
           trait gold_spend = sum(payment.amount where profile.level == "gold", 30d)"#,
    );
    c.push("app_open", DAY, r#"{"device": {"os": "iOS"}}"#);
    c.push("app_open", DAY, r#"{"device": {"os": "Android"}}"#);
    c.push("payment", DAY, r#"{"amount": 50}"#);
    assert_eq!(c.value("ios", DAY), num("1"));
    assert_eq!(c.value("gold_spend", DAY), num("0"));
    c.set_profile(DAY, "level", Some(Value::str("gold")));
    assert_eq!(
        c.value("gold_spend", DAY),
        num("50"),
        "the filter reads the current profile"
    );
}

#[test]
fn the_plan_lists_what_each_event_type_can_change() {
    let rules = CompiledRules::compile(
        "trait engagement = count(video_watch, 30d) + 2 * count(doc_download, 30d)
         tag hot_lead = engagement >= 10 and not churn_risk
         tag churn_risk = count(payment, 60d) == 0 and count(payment, lifetime) >= 3
         tag ios_fan = count(app_open, 7d) >= 1 and profile.os == \"iOS\"",
    )
    .unwrap();
    let names = |ids: &[usize]| {
        ids.iter()
            .map(|&i| rules.def(i).name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(rules.affected_by_event_type("payment")),
        ["churn_risk", "hot_lead"]
    );
    assert_eq!(
        names(rules.affected_by_event_type("doc_download")),
        ["engagement", "hot_lead"]
    );
    assert!(rules.affected_by_event_type("view").is_empty());
    assert_eq!(names(rules.affected_by_profile_attr("os")), ["ios_fan"]);
    let order = names(rules.evaluation_order());
    let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
    assert!(pos("engagement") < pos("hot_lead") && pos("churn_risk") < pos("hot_lead"));
    assert_eq!(rules.aggregates().len(), 5);
}
