//! Data quality end to end over HTTP: a real `tagstream serve --tracking-plan`, every
//! violation class in every mode it has, in one batch with valid events that go through
//! untouched; what each mode did is visible in the answer, the timeline, the dead letters
//! and `GET /v1/quality`; the observed schema and the inferred plan; rules checked
//! against the plan and, without one, against what was received.

use serde_json::{json, Value};
use tests::TempDir;

#[path = "support/server.rs"]
mod support;
use support::Server;

const T0: i64 = 1_744_000_000_000;
const DAY: i64 = 86_400_000;

const RULES: &str = "tag payer = count(pay_allow, 30d) >= 1\n";

/// Three event types alike but for their mode, and the gates for whole events.
fn plan(gates: &str) -> String {
    let mut plan = format!(
        "[defaults]\nmode = \"block\"\nunplanned_events = \"{gates}\"\nunknown_top_level = \"{gates}\"\nout_of_retention = \"{gates}\"\n"
    );
    for mode in ["allow", "strip", "block"] {
        plan += &format!(
            "\n[events.pay_{mode}]\nmode = \"{mode}\"\nadditional_properties = false\n\
             properties.amount = {{ type = \"decimal\", required = true }}\n\
             properties.channel = {{ type = \"enum\", values = [\"app\", \"shop\"] }}\n\
             properties.order_id = {{ type = \"string\", pattern = \"o[0-9]+\", max_length = 8 }}\n"
        );
    }
    plan
}

fn start(gates: &str) -> Server {
    let dir = TempDir::new("quality");
    let path = dir.path().join("plan.toml");
    std::fs::write(&path, plan(gates)).unwrap();
    let path = path.to_str().unwrap().to_owned();
    Server::start_in(dir, RULES, &["--tracking-plan", &path])
}

/// The property-level classes: the props that break the plan, and the prop each one
/// concerns (`None`: the event as a whole).
fn property_cases() -> Vec<(&'static str, Value, Option<&'static str>)> {
    vec![
        ("datatype_mismatch", json!({"amount": "12.5"}), Some("amount")),
        ("enum", json!({"amount": 1, "channel": "wechat"}), Some("channel")),
        (
            "pattern",
            json!({"amount": 1, "order_id": "x1"}),
            Some("order_id"),
        ),
        (
            "too_long",
            json!({"amount": 1, "order_id": "o12345678"}),
            Some("order_id"),
        ),
        (
            "additional_properties",
            json!({"amount": 1, "coupon": "c"}),
            Some("coupon"),
        ),
        ("required_missing", json!({"channel": "app"}), None),
    ]
}

fn line(customer: &str, event_type: &str, ts: i64, props: &Value) -> String {
    json!({"customer_id": customer, "type": event_type, "ts": ts, "props": props}).to_string()
}

/// A server whose event clock is 500 days after `T0`, so an event at `T0` is out of
/// retention when it arrives.
fn start_late(gates: &str) -> (Server, i64) {
    let s = start(gates);
    let now = T0 + 500 * DAY;
    let r = s.send("POST", "/v1/clock", &json!({ "now": now }).to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    (s, now)
}

fn props_of(s: &Server, customer: &str) -> Option<Value> {
    let r = s.get(&format!("/v1/customers/{customer}/events"));
    (r.status == 200).then(|| r.json()["events"][0]["props"].clone())
}

#[test]
fn every_class_in_every_mode_through_http_with_the_rest_of_the_batch_untouched() {
    let (s, now) = start_late("block");
    let mut lines = vec![line(
        "valid-1",
        "pay_block",
        now,
        &json!({"amount": 5, "channel": "app"}),
    )];
    let mut expected = Vec::new();
    for mode in ["allow", "strip", "block"] {
        for (class, props, _) in property_cases() {
            lines.push(line(
                &format!("{mode}-{class}"),
                &format!("pay_{mode}"),
                now,
                &props,
            ));
            expected.push((mode, class));
        }
    }
    lines.push(line("gate-unplanned", "pay_blok", now, &json!({"amount": 1})));
    lines.push(
        json!({"customer_id": "gate-top", "type": "pay_allow", "ts": now, "props": {"amount": 1}, "profle": {"city": "x"}})
            .to_string(),
    );
    lines.push(line("gate-old", "pay_allow", T0, &json!({"amount": 1})));
    let exact: Value = serde_json::from_str("1234567890123456789.12345").unwrap();
    lines.push(line("valid-2", "pay_allow", now, &json!({ "amount": exact })));
    lines.push(line("valid-3", "pay_allow", now, &json!({"amount": 2})));
    let body = lines.join("\n");
    let answer = s.send("POST", "/v1/events", &body).json();

    // Blocked: the block type's six and the three gates.
    let codes: Vec<(u64, String)> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut want: Vec<(u64, String)> = expected
        .iter()
        .enumerate()
        .filter(|(_, (mode, _))| *mode == "block")
        .map(|(i, (_, class))| (i as u64 + 1, (*class).to_owned()))
        .collect();
    let gates = 1 + expected.len() as u64;
    want.push((gates, "unplanned_event".into()));
    want.push((gates + 1, "unknown_top_level_field".into()));
    want.push((gates + 2, "out_of_retention".into()));
    assert_eq!(codes, want, "{answer}");
    assert_eq!(answer["accepted"], lines.len() - want.len());
    let reason = answer["errors"][6]["reason"].as_str().unwrap();
    assert!(
        reason.contains("pay_blok") && reason.contains("did you mean \"pay_block\""),
        "{reason}"
    );

    // What each mode kept.
    for (class, props, concerned) in property_cases() {
        let allowed = props_of(&s, &format!("allow-{class}")).expect("allow keeps the event");
        assert_eq!(allowed, props, "allow keeps what was sent: {class}");
        let stripped = props_of(&s, &format!("strip-{class}")).expect("strip keeps the event");
        let mut without = props.as_object().unwrap().clone();
        if let Some(p) = concerned {
            without.remove(p);
        }
        assert_eq!(
            stripped,
            Value::Object(without),
            "strip drops the offending property: {class}"
        );
        assert_eq!(
            s.get(&format!("/v1/customers/block-{class}")).status,
            404,
            "{class}"
        );
    }
    for valid in ["valid-1", "valid-3"] {
        assert_eq!(s.get(&format!("/v1/customers/{valid}")).status, 200, "{valid}");
    }
    let stored = props_of(&s, "valid-2").unwrap();
    assert_eq!(
        stored["amount"].to_string(),
        "1234567890123456789.12345",
        "every digit kept"
    );

    // Dead letters carry the class as their code and the line as sent.
    let dlq = s.get("/v1/dlq").json();
    let dead: Vec<&str> = dlq["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    assert_eq!(dead, want.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>());
    assert_eq!(dlq["dead_letters"][0]["raw"], lines[want[0].0 as usize]);
    // The newest few, newest first (the console's live view), following on from the newest.
    let newest = s.get("/v1/dlq?last=2").json();
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_u64().unwrap())
            .collect()
    };
    let all = ids(&dlq);
    assert_eq!(
        ids(&newest),
        all.iter().rev().take(2).copied().collect::<Vec<_>>()
    );
    assert_eq!(newest["next_after"], *all.last().unwrap());
    assert_eq!(
        newest["dead_letters"][0]["raw"],
        lines[want.last().unwrap().0 as usize]
    );
    for bad in ["last=0", "last=1001", "last=2&after=1", "last=2&limit=5"] {
        assert_eq!(s.get(&format!("/v1/dlq?{bad}")).status, 400, "{bad}");
    }

    // The quality record: by class, type and field, blocked or kept, with samples.
    let q = s.get("/v1/quality").json();
    assert_eq!(q["plan"]["unplanned_events"], "block");
    let rows = q["violations"].as_array().unwrap();
    let row = |class: &str, event_type: &str| {
        rows.iter()
            .find(|r| r["class"] == class && r["event_type"] == event_type)
            .unwrap_or_else(|| panic!("no {class} row for {event_type}: {q}"))
    };
    for (class, _, concerned) in property_cases() {
        for mode in ["allow", "strip", "block"] {
            let r = row(class, &format!("pay_{mode}"));
            assert_eq!(r["source"], "http");
            assert_eq!(r["count"], 1, "{class} {mode}");
            assert_eq!(r["blocked"], u64::from(mode == "block"), "{class} {mode}");
            assert_eq!(
                r["field"],
                concerned.map_or("props.amount".to_owned(), |p| format!("props.{p}"))
            );
            assert!(r["samples"][0]["line"]
                .as_str()
                .unwrap()
                .contains(&format!("{mode}-{class}")));
        }
    }
    assert_eq!(row("unplanned_event", "pay_blok")["blocked"], 1);
    assert_eq!(row("unknown_top_level_field", "pay_allow")["field"], "profle");
    assert_eq!(row("out_of_retention", "pay_allow")["blocked"], 1);
    assert_eq!(q["by_class"]["required_missing"], 3);
    // The metric, its labels bounded by the plan: unplanned types and fields are "-".
    let metrics = s.get("/metrics").text();
    for line in [
        r#"tagstream_quality_violations_total{source="http",class="enum",event_type="pay_block",field="props.channel",outcome="blocked"} 1"#,
        r#"tagstream_quality_violations_total{source="http",class="enum",event_type="pay_strip",field="props.channel",outcome="kept"} 1"#,
        r#"tagstream_quality_violations_total{source="http",class="additional_properties",event_type="pay_allow",field="-",outcome="kept"} 1"#,
        r#"tagstream_quality_violations_total{source="http",class="unplanned_event",event_type="-",field="-",outcome="blocked"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    assert!(
        !metrics.contains("pay_blok") && !metrics.contains("coupon"),
        "no client-chosen names as labels"
    );
    let only = s.get("/v1/quality?class=enum&event_type=pay_strip").json();
    assert_eq!(only["violations"].as_array().unwrap().len(), 1);
    assert_eq!(s.get("/v1/quality?class=typo").status, 400);
    assert!(s.get("/v1/quality?since=32503680000000").json()["violations"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn allowed_gates_count_and_keep_whole_events() {
    let (s, now) = start_late("allow");
    let lines = [
        line("a", "pay_blok", now, &json!({"amount": 1})),
        json!({"customer_id": "b", "type": "pay_allow", "ts": now, "props": {"amount": 1}, "profle": {"city": "x"}}).to_string(),
        line("c", "pay_allow", T0, &json!({"amount": 1})),
    ];
    let answer = s.send("POST", "/v1/events", &lines.join("\n")).json();
    assert_eq!(
        (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
        (Some(3), Some(0)),
        "{answer}"
    );
    let q = s.get("/v1/quality").json();
    let mut classes: Vec<(&str, u64)> = q["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["class"].as_str().unwrap(), r["blocked"].as_u64().unwrap()))
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            ("out_of_retention", 0),
            ("unknown_top_level_field", 0),
            ("unplanned_event", 0)
        ]
    );
}

#[test]
fn rules_are_checked_against_the_plan_or_against_what_was_received() {
    let s = start("block");
    let typo = "tag t on pay_alow where chanel == \"app\"\n";
    let r = s.send("PUT", "/v1/rules", typo);
    assert_eq!(r.status, 422, "{}", r.text());
    let d = &r.json()["diagnostics"][0];
    assert_eq!(
        (d["code"].as_str(), d["line"].as_u64(), d["column"].as_u64()),
        (Some("E0401"), Some(1), Some(10))
    );
    assert_eq!(d["hint"], "did you mean `pay_allow`?");
    let wrong = "tag t on pay_allow where channel == \"wechat\" or amount == \"x\"\n";
    let codes: Vec<String> = s.send("PUT", "/v1/rules", wrong).json()["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(codes, ["E0405", "E0404"]);
    assert_eq!(
        s.send("PUT", "/v1/rules", "tag t on pay_allow where channel == \"app\"")
            .status,
        200
    );

    // Segment expressions too: saved or ad hoc.
    let query = json!({"expr": "count(pay_alow, 7d) > 0"}).to_string();
    let r = s.send("POST", "/v1/segments/query", &query);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["diagnostics"][0]["code"], "E0401");
    assert_eq!(r.json()["diagnostics"][0]["column"], 7);
    assert_eq!(s.send("PUT", "/v1/segments/typo", &query).status, 422);

    // Without a plan: warnings about what was never received, the rules still applied.
    let open = Server::start(RULES, &[]);
    let sent = line("c1", "view", T0, &json!({"category": "fish"}));
    assert_eq!(open.send("POST", "/v1/events", &sent).json()["accepted"], 1);
    let r = open.send(
        "PUT",
        "/v1/rules",
        "tag t on veiw\ntag u on view where categroy == \"fish\"\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let warnings = r.json()["warnings"].clone();
    assert_eq!(warnings[0]["code"], "W0501");
    assert_eq!(warnings[0]["severity"], "warning");
    assert_eq!(warnings[0]["hint"], "did you mean `view`?");
    assert_eq!(warnings[1]["code"], "W0502");
    assert_eq!(warnings[1]["hint"], "did you mean `category`?");
    let query = json!({"expr": "profile.cty == \"杭州\""}).to_string();
    let r = open.send("POST", "/v1/segments/query", &query);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["warnings"][0]["code"], "W0503");

    // The observed schema, and a plan inferred from it that accepts what was received.
    let observed = open.get("/v1/schema/observed").json();
    assert_eq!(observed["events"]["view"]["count"], 1);
    assert_eq!(
        observed["events"]["view"]["properties"]["category"]["examples"][0],
        "fish"
    );
    assert_eq!(observed["identifiers"]["customer_id"]["count"], 1);
    let inferred = open.get("/v1/schema/observed?format=plan");
    assert_eq!(inferred.status, 200);
    let plan = rules::TrackingPlan::parse(&inferred.text()).expect("the inferred plan parses");
    assert!(plan.event("view").unwrap().fields.contains_key("category"));
    assert_eq!(open.get("/v1/schema/observed?format=xml").status, 400);
}

/// Numbers keep every digit from the request to the sum and the answer; one that cannot
/// be held exactly is refused by name, the rest of the batch applied.
#[test]
fn sums_keep_every_digit_and_numbers_that_cannot_be_held_are_refused() {
    let s = Server::start("trait total = sum(pay.amount, lifetime)\n", &[]);
    let body = [
        r#"{"customer_id": "c1", "type": "pay", "ts": 1744000000000, "props": {"amount": 1234567890123456789.12345}}"#,
        r#"{"customer_id": "c1", "type": "pay", "ts": 1744000000001, "props": {"amount": 1e300}}"#,
        r#"{"customer_id": "c1", "type": "pay", "ts": 1744000000002, "props": {"amount": 1234567890123456789.12345}}"#,
        r#"{"customer_id": "c1", "type": "pay", "ts": 1744000000003, "props": {"amount": 0.000001}}"#,
    ]
    .join("\n");
    let answer = s.send("POST", "/v1/events", &body).json();
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(answer["errors"][0]["code"], "number_not_exact");
    assert!(answer["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("props.amount: "));
    let text = s.get("/v1/customers/c1").text();
    assert!(text.contains(r#""total":2469135780246913578.246901"#), "{text}");
}

/// Exports keep every digit too: NDJSON and CSV print the decimal as it is, Arrow and
/// Parquet carry it as `Decimal128(38, 9)`.
#[test]
fn exports_carry_exact_decimals_in_every_format() {
    let s = Server::start(
        "trait total = sum(pay.amount, lifetime)\ntag payer = total > 0\n",
        &[],
    );
    let body = r#"{"customer_id": "c1", "type": "pay", "ts": 1744000000000, "props": {"amount": 1234567890123456789.12345}}
{"customer_id": "c1", "type": "pay", "ts": 1744000000001, "props": {"amount": 0.000000001}}"#;
    assert_eq!(s.send("POST", "/v1/events", body).json()["accepted"], 2);
    let exact = "1234567890123456789.123450001";
    let ndjson = s
        .get("/v1/segments/payer/members?format=ndjson&fields=total")
        .text();
    assert!(ndjson.contains(&format!(r#""total":{exact}"#)), "{ndjson}");
    let csv = s.get("/v1/segments/payer/members?format=csv&fields=total").text();
    assert!(csv.contains(exact), "{csv}");
    let arrow = s.get("/v1/segments/payer/members?format=arrow&fields=total");
    assert_eq!(
        first_decimal(tests::exports::arrow_batches(&arrow.body), "total"),
        exact
    );
    let parquet = s.get("/v1/segments/payer/members?format=parquet&fields=total");
    assert_eq!(
        first_decimal(tests::exports::parquet_batches(&parquet.body), "total"),
        exact
    );
}

/// The first value of a decimal column, as text.
fn first_decimal(batches: impl IntoIterator<Item = arrow_array::RecordBatch>, name: &str) -> String {
    let batch = batches.into_iter().next().expect("a batch");
    let column = batch.column_by_name(name).expect("the column");
    let decimals = column
        .as_any()
        .downcast_ref::<arrow_array::Decimal128Array>()
        .expect("a decimal column");
    decimals.value_as_string(0)
}
