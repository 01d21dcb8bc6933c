//! The real `tagstream serve` over HTTP: ingest, move the clock, read customers, changes,
//! segments and exports; every class of bad request gets a JSON error with the right status.

use std::process::Command;

use tests::{repo_root, TempDir};

#[path = "support/server.rs"]
mod server;
use server::Server;

const T0: i64 = 1_744_000_000_000;

#[test]
fn ingest_move_the_clock_and_read_everything_back() {
    let rules = std::fs::read_to_string(repo_root().join("deploy/rules/example.trl")).unwrap();
    let s = Server::start(&rules, &[]);
    let events = [
        format!(r#"{{"event_id":"l1","customer_id":"１３８00000000\u200b","type":"lead_created","ts":{T0},"profile":{{"lead_status":"new","city":"杭州"}}}}"#),
        format!(r#"{{"event_id":"p1","customer_id":"13800000000","type":"payment","ts":{},"props":{{"amount":0.1}}}}"#, T0 + 1),
        format!(r#"{{"event_id":"p2","customer_id":"13800000000","type":"payment","ts":{},"props":{{"amount":0.2}}}}"#, T0 + 2),
        format!(r#"{{"event_id":"v1","customer_id":"c2","type":"view","ts":{},"props":{{"category":"seafood"}}}}"#, T0 + 3),
        "not json".to_owned(),
    ]
    .join("\n");
    let r = s.send("POST", "/v1/events", &events);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(body["errors"][0]["index"], 4);

    // A JSON array body is accepted too, and a re-sent id is a duplicate.
    let r = s.send(
        "POST",
        "/v1/events",
        &format!(
            r#"[{{"event_id":"p2","customer_id":"13800000000","type":"payment","ts":{}}}]"#,
            T0 + 5
        ),
    );
    assert_eq!(r.json()["duplicates"], 1);

    let r = s.send(
        "POST",
        "/v1/clock",
        &format!(r#"{{"now": {}}}"#, T0 + 45 * 60_000 + 1),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let customer = s.get("/v1/customers/13800000000");
    assert_eq!(customer.status, 200);
    let text = customer.text();
    assert!(
        text.contains(r#""spend_30d":0.3"#),
        "exact decimals, no float noise: {text}"
    );
    let c = customer.json();
    assert_eq!(c["tags"]["lead_sla_breach"]["since"], T0 + 45 * 60_000 + 1);
    assert_eq!(c["profile"]["city"], "杭州");
    assert_eq!(
        s.get("/v1/customers/%EF%BC%91%EF%BC%93%EF%BC%9800000000").json()["customer_id"],
        "13800000000"
    );
    assert_eq!(s.get("/v1/customers/nobody").status, 404);

    let changes = s.get("/v1/changes?after=0&limit=100").json();
    let list = changes["changes"].as_array().unwrap();
    assert!(list
        .iter()
        .any(|c| c["tag"] == "lead_sla_breach" && c["cause"] == "timer"));
    let seqs: Vec<u64> = list.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let after_two = s.get("/v1/changes?after=2&limit=1").json();
    assert_eq!(after_two["changes"][0]["seq"], 3);

    let q = s.send(
        "POST",
        "/v1/segments/query",
        r#"{"expr": "viewed_seafood and not big_ticket", "limit": 10}"#,
    );
    assert_eq!(q.json()["count"], 1);
    assert_eq!(q.json()["customers"][0], "c2");

    let ndjson = s.get("/v1/segments/seafood_retarget/members?format=ndjson");
    assert_eq!(ndjson.status, 200);
    assert!(ndjson.text().contains(r#""customer_id":"c2""#));
    let csv = s.get("/v1/segments/seafood_retarget/members?format=csv").text();
    assert_eq!(csv, "customer_id\nc2\n");
    let csv = s
        .get("/v1/segments/seafood_retarget/members?format=csv&fields=since,expires_at")
        .text();
    assert!(csv.starts_with("customer_id,since,expires_at\nc2,"), "{csv}");

    let manual = s.send("PUT", "/v1/customers/c2/tags/called_back", r#"{"ttl": "7d"}"#);
    assert_eq!(manual.status, 200, "{}", manual.text());
    assert_eq!(manual.json()["changes"][0]["cause"], "manual");
    assert_eq!(
        s.send("DELETE", "/v1/customers/c2/tags/called_back", "").json()["changes"][0]["op"],
        "remove"
    );

    assert_eq!(s.get("/v1/rules").text(), rules);
    let metrics = s.get("/metrics").text();
    assert!(metrics.contains("tagstream_events_total"), "{metrics}");
    assert!(!metrics.contains("13800000000"), "no customer ids in metrics");
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(s.get("/readyz").json()["ready"], true);
    let dlq = s.get("/v1/dlq").json();
    assert_eq!(dlq["dead_letters"][0]["raw"], "not json");
}

/// A server with a small request limit for the bad-request tests, holding one accepted
/// event that no bad request may lose.
fn bad_request_server() -> Server {
    let s = Server::start(
        "tag big = sum(payment.amount, 30d) >= 100",
        &["--max-request-bytes", "2048"],
    );
    let ok = s.send(
        "POST",
        "/v1/events",
        &format!(r#"{{"customer_id":"c1","type":"payment","ts":{T0},"props":{{"amount":150}}}}"#),
    );
    assert_eq!(ok.json()["accepted"], 1);
    s
}

/// Asserts a JSON error with `status` whose message contains `needle`.
fn check(r: tests::http::Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let error = r.json()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {}", r.text()))
        .to_owned();
    assert!(error.contains(needle), "{error:?} lacks {needle:?}");
}

/// After the bad requests: the accepted event is still there and the server still ingests.
fn still_serving(s: &Server) {
    assert_eq!(s.get("/v1/customers/c1").json()["tags"]["big"]["since"], T0);
    let ok = s.send(
        "POST",
        "/v1/events",
        &format!(r#"{{"customer_id":"c2","type":"payment","ts":{T0},"props":{{"amount":150}}}}"#),
    );
    assert_eq!(ok.json()["accepted"], 1);
}

#[test]
fn malformed_json_is_400_with_its_position() {
    let s = bad_request_server();
    check(s.send("POST", "/v1/clock", r#"{"now": 17"#), 400, "line 1 column");
    check(
        s.send("POST", "/v1/events", r#"[{"customer_id": "c1", "type": "view"}"#),
        400,
        "malformed JSON array",
    );
    check(s.send("POST", "/v1/events", ""), 400, "no events");
    check(s.get("/v1/changes?after=abc"), 400, "after");
    check(s.get("/v1/changes?after=1&cursor=0"), 400, "not both");
    check(
        s.get("/v1/changes?cursor=0"),
        409,
        "not in one: page with `after`",
    );
    check(
        s.send("PUT", "/v1/customers/c1/tags/x", r#"{"ttl": "7 weeks"}"#),
        400,
        "ttl",
    );
    check(
        s.get("/v1/segments/big/members?format=xml"),
        400,
        "unknown format",
    );
    still_serving(&s);
}

#[test]
fn a_body_over_the_limit_is_413() {
    let s = bad_request_server();
    check(s.send("POST", "/v1/events", &"x".repeat(4096)), 413, "2048 bytes");
    check(s.send("PUT", "/v1/rules", &"#".repeat(4096)), 413, "2048 bytes");
    still_serving(&s);
}

#[test]
fn unknown_fields_are_400_naming_the_field() {
    let s = bad_request_server();
    check(
        s.send("POST", "/v1/clock", r#"{"now": 17, "later": true}"#),
        400,
        "unknown field `later`",
    );
    check(
        s.send("POST", "/v1/segments/query", r#"{"expr": "big", "limt": 5}"#),
        400,
        "unknown field",
    );
    still_serving(&s);
}

#[test]
fn unknown_routes_and_names_are_404_json_and_wrong_methods_405() {
    let s = bad_request_server();
    check(s.get("/v1/nothing/here"), 404, "no route");
    check(s.get("/v1/segments/nope/members"), 404, "no tag or segment");
    check(s.send("DELETE", "/v1/changes", ""), 405, "not allowed");
    still_serving(&s);
}

#[test]
fn a_rule_set_with_errors_is_422_with_every_diagnostic_and_the_old_rules_stay() {
    let s = bad_request_server();
    check(
        s.send("PUT", "/v1/rules", "tag a = count(view) >= 1\ntag b = nope"),
        422,
        "2 error(s)",
    );
    let r = s.send("PUT", "/v1/rules", "tag a = count(view) >= 1\ntag b = nope");
    let d = &r.json()["diagnostics"];
    assert_eq!(
        (d[0]["line"].as_u64(), d[0]["code"].as_str()),
        (Some(1), Some("E0205"))
    );
    assert_eq!(
        (d[1]["line"].as_u64(), d[1]["column"].as_u64()),
        (Some(2), Some(9))
    );
    assert_eq!(
        s.get("/v1/rules").text(),
        "tag big = sum(payment.amount, 30d) >= 100",
        "the old rules stay"
    );
    check(
        s.send("POST", "/v1/segments/query", r#"{"expr": "big and"}"#),
        422,
        "error",
    );
    still_serving(&s);
}

#[test]
fn conflicts_are_409() {
    let s = bad_request_server();
    check(
        s.send("POST", "/v1/clock", &format!(r#"{{"now": {}}}"#, T0 + 1))
            .and_back(&s, T0),
        409,
        "backwards",
    );
    check(
        s.send("PUT", "/v1/customers/c1/tags/big", ""),
        409,
        "condition tag",
    );
    still_serving(&s);
}

trait AndBack {
    fn and_back(self, s: &Server, to: i64) -> tests::http::Response;
}

impl AndBack for tests::http::Response {
    /// Sets the clock forward (this response), then tries to move it back.
    fn and_back(self, s: &Server, to: i64) -> tests::http::Response {
        assert_eq!(self.status, 200, "{}", self.text());
        s.send("POST", "/v1/clock", &format!(r#"{{"now": {to}}}"#))
    }
}

/// Column `name` of every batch, as strings (ids) or via `get` for other types.
fn column<T>(
    batches: &[arrow_array::RecordBatch],
    name: &str,
    get: impl Fn(&dyn arrow_array::Array, usize) -> T,
) -> Vec<T> {
    batches
        .iter()
        .flat_map(|b| {
            let col = b
                .column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"))
                .clone();
            (0..b.num_rows())
                .map(|i| get(col.as_ref(), i))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn str_at(a: &dyn arrow_array::Array, i: usize) -> Option<String> {
    let a = a
        .as_any()
        .downcast_ref::<arrow_array::StringArray>()
        .expect("a string column");
    (!arrow_array::Array::is_null(a, i)).then(|| a.value(i).to_owned())
}

fn customer_ids(batches: &[arrow_array::RecordBatch]) -> Vec<String> {
    column(batches, "customer_id", str_at)
        .into_iter()
        .flatten()
        .collect()
}

/// A number column's value as text: exports carry exact decimals (`Decimal128(38, 9)`).
fn decimal_at(a: &dyn arrow_array::Array, i: usize) -> Option<String> {
    let a = a
        .as_any()
        .downcast_ref::<arrow_array::Decimal128Array>()
        .expect("a decimal column");
    (!arrow_array::Array::is_null(a, i)).then(|| a.value_as_string(i))
}

#[test]
fn exports_stream_every_member_in_every_format_and_pages_stay_correct_while_membership_changes() {
    let s = Server::start(
        "trait views_30d = count(view, 30d)\ntag viewer = views_30d >= 1\ntag loyal = views_30d >= 2",
        &[],
    );
    // More members than one export page (8,192), so the stream spans several pages.
    const N: usize = 9_000;
    let body: String = (0..N)
        .map(|i| {
            let city = if i % 2 == 0 { "杭州" } else { "上海, \\\"浦东\\\"" };
            format!(
                r#"{{"event_id":"v{i}","customer_id":"c{i:05}","type":"view","ts":{},"profile":{{"city":"{city}"}}}}"#,
                T0 + i as i64
            ) + "\n"
        })
        .collect();
    let r = s.send("POST", "/v1/events", &body);
    assert_eq!(r.json()["accepted"], N, "{}", r.text());
    let ids: Vec<String> = (0..N).map(|i| format!("c{i:05}")).collect();

    let ndjson = s.get("/v1/segments/viewer/members?fields=since,views_30d,profile.city");
    assert_eq!(ndjson.status, 200);
    let rows: Vec<serde_json::Value> = ndjson
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows.iter()
            .map(|r| r["customer_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(rows[0]["views_30d"], 1);
    assert_eq!(rows[0]["profile.city"], "杭州");
    assert_eq!(rows[1]["since"], T0 + 1);
    // Without fields a row is the id alone: the index answers, the store is not read.
    let plain = s.get("/v1/segments/viewer/members").text();
    assert_eq!(plain.lines().next(), Some(r#"{"customer_id":"c00000"}"#));
    assert_eq!(plain.lines().count(), N);

    let csv = s
        .get("/v1/segments/viewer/members?format=csv&fields=since,expires_at,profile.city")
        .text();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), N + 1);
    assert_eq!(lines[0], "customer_id,since,expires_at,profile.city");
    assert_eq!(lines[2], format!(r#"c00001,{},,"上海, ""浦东""""#, T0 + 1));

    // Profile fields alone are read from the index's profile columns: the same values.
    let csv = s
        .get("/v1/segments/viewer/members?format=csv&fields=profile.city")
        .text();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), N + 1);
    assert_eq!(lines[0], "customer_id,profile.city");
    assert_eq!(lines[1], "c00000,杭州");
    assert_eq!(lines[2], r#"c00001,"上海, ""浦东""""#);

    let parquet = s.get("/v1/segments/viewer/members?format=parquet&fields=views_30d,profile.city");
    assert_eq!(parquet.status, 200);
    let batches = tests::exports::parquet_batches(&parquet.body);
    assert_eq!(customer_ids(&batches), ids);
    assert!(column(&batches, "views_30d", decimal_at)
        .iter()
        .all(|v| v.as_deref() == Some("1.000000000")));
    assert_eq!(
        column(&batches, "profile.city", str_at)[0].as_deref(),
        Some("杭州")
    );

    let arrow = s.get("/v1/segments/viewer/members?format=arrow&fields=views_30d");
    assert_eq!(arrow.status, 200);
    let batches = tests::exports::arrow_batches(&arrow.body);
    assert_eq!(customer_ids(&batches), ids);

    // Cursor paging while membership changes: customers who are members throughout appear
    // exactly once; pages follow customer numbers, so customers new to the store join at
    // the end and are seen.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/v1/segments/viewer/members?limit=4000".to_owned(),
            Some(c) => format!("/v1/segments/viewer/members?limit=4000&cursor={c}"),
        };
        let page = s.get(&path);
        assert_eq!(page.status, 200);
        seen.extend(page.text().lines().map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["customer_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
        pages += 1;
        if pages == 1 {
            let late = format!(
                "{{\"customer_id\":\"a-before\",\"type\":\"view\",\"ts\":{t}}}\n{{\"customer_id\":\"z-after\",\"type\":\"view\",\"ts\":{t}}}\n{{\"customer_id\":\"上海 #1&2\",\"type\":\"view\",\"ts\":{t}}}\n{{\"customer_id\":\"上海 #1&3\",\"type\":\"view\",\"ts\":{t}}}",
                t = T0 + N as i64
            );
            assert_eq!(s.send("POST", "/v1/events", &late).json()["accepted"], 4);
        }
        cursor = page.header("x-next-cursor");
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    let mut expected = ids.clone();
    expected.extend(["a-before", "z-after", "上海 #1&2", "上海 #1&3"].map(String::from));
    assert_eq!(seen, expected);
    // The cursor is the last customer number of the page (N + 1 is `z-after`).
    let page = s.get(&format!("/v1/segments/viewer/members?limit=1&cursor={}", N + 1));
    assert!(page.text().contains("上海 #1&2"), "{}", page.text());
    let cursor = page.header("x-next-cursor").expect("a next page");
    assert_eq!(cursor, (N + 2).to_string());
    let next = s.get(&format!("/v1/segments/viewer/members?limit=1&cursor={cursor}"));
    assert!(next.text().contains("上海 #1&3"), "{}", next.text());
    assert_eq!(next.header("x-next-cursor"), None);
    let bad = s.get("/v1/segments/viewer/members?limit=1&cursor=z-after");
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("bad cursor `z-after`"), "{}", bad.text());

    let bad = s.get("/v1/segments/viewer/members?fields=nope");
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]
        .as_str()
        .unwrap()
        .contains("unknown field `nope`"));
    assert_eq!(s.get("/v1/segments/viewer/members?fields=viewer").status, 400);
    assert_eq!(s.get("/v1/segments/viewer/members?format=xlsx").status, 400);
    assert_eq!(s.get("/v1/segments/nothing/members").status, 404);
}

#[test]
fn a_settings_file_sets_limits_and_flags_override_it() {
    let dir = TempDir::new("settings");
    let path = dir.path().join("tagstream.toml");
    std::fs::write(
        &path,
        "clock = \"wall\"\n[limits]\nmax_request_bytes = 1500\nmax_event_bytes = 300\n",
    )
    .unwrap();
    // `--clock event` on the command line wins over the file's `wall`.
    let s = Server::start(
        "tag viewer = count(view, 30d) >= 1",
        &["--config", path.to_str().unwrap()],
    );
    let r = s.send("POST", "/v1/events", &"x".repeat(2000));
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["limit_bytes"], 1500);
    let big = format!(
        r#"{{"customer_id":"c1","type":"view","ts":{T0},"props":{{"note":"{}"}}}}"#,
        "y".repeat(400)
    );
    let r = s.send("POST", "/v1/events", &big);
    assert_eq!(r.json()["errors"][0]["reason"], "event larger than 300 bytes");
    let clock = s.send("POST", "/v1/clock", &format!(r#"{{"now": {T0}}}"#));
    assert_eq!(clock.status, 200, "event clock from the flag: {}", clock.text());

    std::fs::write(&path, "[cache]\ncustomer = 5\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tagstream"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `customer`"), "{stderr}");
}

#[test]
fn a_customers_timeline_pages_newest_first() {
    let s = Server::start("tag viewer = count(view, 30d) >= 1", &[]);
    // Out of order on arrival; the timeline is by `ts`.
    let body: String = [3, 1, 4, 0, 2]
        .iter()
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i}","customer_id":"c1","type":"view","ts":{},"props":{{"n":{i},"item":{{"sku":"A{i}"}}}}}}"#,
                T0 + i * 1000
            ) + "\n"
        })
        .collect();
    assert_eq!(s.send("POST", "/v1/events", &body).json()["accepted"], 5);
    let mut ids = Vec::new();
    let mut path = "/v1/customers/c1/events?limit=2".to_owned();
    loop {
        let page = s.get(&path).json();
        for e in page["events"].as_array().unwrap() {
            ids.push(e["event_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/customers/c1/events?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(ids, ["e4", "e3", "e2", "e1", "e0"]);
    let first = &s.get("/v1/customers/c1/events?limit=1").json()["events"][0];
    assert_eq!(first["ts"], T0 + 4000);
    assert_eq!(first["type"], "view");
    assert_eq!(first["props"]["n"], 4);
    assert_eq!(first["props"]["item.sku"], "A4");
    assert_eq!(s.get("/v1/customers/nobody/events").status, 404);
    assert_eq!(s.get("/v1/customers/c1/events?cursor=zzz").status, 400);
    assert_eq!(s.get("/v1/customers/c1/events?limit=0").status, 400);
}

#[test]
fn the_openapi_document_describes_every_route_the_server_answers() {
    let s = Server::start("tag viewer = count(view, 30d) >= 1", &[]);
    let doc = s.get("/openapi.json");
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort();
    let mut served = [
        "/v1/events",
        "/v1/clock",
        "/v1/rules",
        "/v1/rules/preview",
        "/v1/rules/versions",
        "/v1/rules/versions/{version}",
        "/v1/rules/rollback",
        "/v1/admin/keys",
        "/v1/admin/keys/{id}",
        "/v1/audit",
        "/v1/customers/{id}",
        "/v1/customers/{id}/events",
        "/v1/customers/{id}/explain/{name}",
        "/v1/customers/{id}/tags/{tag}",
        "/v1/customers/by/{id_type}/{value}",
        "/v1/customers/{id}/merge",
        "/v1/customers/{id}/handover",
        "/v1/customers/{id}/unmerge",
        "/v1/identities/stats",
        "/v1/identities/customers/{customer}",
        "/v1/definitions",
        "/v1/segments",
        "/v1/segments/{name}",
        "/v1/segments/query",
        "/v1/segments/{name}/members",
        "/v1/segments/{name}/delta",
        "/v1/segments/{name}/stream",
        "/v1/sql",
        "/v1/webhooks",
        "/v1/webhooks/{id}",
        "/v1/webhooks/{id}/dead_letters",
        "/v1/webhooks/{id}/dead_letters/redeliver",
        "/v1/changes",
        "/v1/dlq",
        "/v1/cluster",
        "/v1/admin/backup",
        "/v1/quality",
        "/v1/schema/observed",
        "/metrics",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/",
        "/console/",
        "/console/assets/{file}",
    ];
    served.sort();
    assert_eq!(documented, served);
    for (path, ops) in paths {
        let concrete = path
            .replace("{id}", "c1")
            .replace("{tag}", "manual_vip")
            .replace("{name}", "viewer")
            .replace("{version}", "1")
            .replace("{id_type}", "phone")
            .replace("{value}", "13800000001");
        for (method, op) in ops.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            assert!(op["responses"].is_object(), "{method} {path} has responses");
            if op["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some()
            {
                // An endless stream; its statuses are checked by the segments tests.
                continue;
            }
            // Every documented operation is routed: never 405, never the unknown-route 404.
            let r = s.send(&method, &concrete, "");
            assert_ne!(r.status, 405, "{method} {path}");
            if r.status == 404 {
                assert!(!r.text().contains("no route"), "{method} {path}: {}", r.text());
            }
            // Every status it answers with is documented.
            assert!(
                op["responses"].get(r.status.to_string()).is_some(),
                "{method} {path} answered {} which is not documented: {}",
                r.status,
                r.text()
            );
        }
    }
}

#[test]
fn a_rules_preview_counts_who_would_enter_and_exit_and_changes_nothing() {
    let rules = "tag viewer = count(view, 30d) >= 1";
    let s = Server::start(rules, &[]);
    let ev = |id: &str, customer: &str, ty: &str, dt: i64| {
        format!(
            r#"{{"event_id":"{id}","customer_id":"{customer}","type":"{ty}","ts":{}}}"#,
            T0 + dt
        ) + "\n"
    };
    let body = ev("a", "c1", "view", 0)
        + &ev("b", "c2", "view", 1)
        + &ev("c", "c2", "view", 2)
        + &ev("d", "c3", "payment", 3);
    assert_eq!(s.send("POST", "/v1/events", &body).json()["accepted"], 4);

    let draft = "tag viewer = count(view, 30d) >= 2\ntag payer = count(payment, 30d) >= 1\ntrait views = count(view, 30d)";
    let r = s.send("POST", "/v1/rules/preview", draft);
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json();
    assert_eq!(p["customers"], 3);
    let viewer = &p["definitions"]["viewer"];
    assert_eq!(
        (
            viewer["members"].as_u64(),
            viewer["enter"].as_u64(),
            viewer["exit"].as_u64()
        ),
        (Some(1), Some(0), Some(1))
    );
    assert_eq!(viewer["sample_exit"], serde_json::json!(["c1"]));
    assert_eq!(viewer["sample_members"], serde_json::json!(["c2"]));
    let payer = &p["definitions"]["payer"];
    assert_eq!(
        (payer["members"].as_u64(), payer["enter"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(payer["sample_enter"], serde_json::json!(["c3"]));
    assert!(p["definitions"].get("views").is_none(), "traits have no members");

    let dropped = s
        .send(
            "POST",
            "/v1/rules/preview",
            "tag payer = count(payment, 30d) >= 1",
        )
        .json();
    assert_eq!(dropped["removed"]["viewer"]["exit"], 2);

    let bad = s.send("POST", "/v1/rules/preview", "tag broken = count(view, 30d) >=");
    assert_eq!(bad.status, 422);
    assert!(bad.json()["diagnostics"]
        .as_array()
        .is_some_and(|d| !d.is_empty()));

    // Nothing changed.
    assert_eq!(s.get("/v1/rules").text(), rules);
    assert!(s.get("/v1/customers/c1").json()["tags"].get("viewer").is_some());
    assert_eq!(
        s.get("/v1/changes?after=0").json()["changes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn explain_shows_every_sub_expression_its_window_and_the_next_change_by_time() {
    let s = Server::start(
        "trait spend_30d = sum(payment.amount, 30d)\n\
         tag big_spender = spend_30d >= 2000 and profile.city == \"上海\"\n\
         tag viewed_seafood on view where category == \"seafood\" ttl 7d\n\
         tag lead_waiting = since(lead_created) > 45m\n",
        &[],
    );
    const DAY: i64 = 86_400_000;
    let events = [
        format!(
            r#"{{"customer_id":"c1","type":"payment","ts":{T0},"props":{{"amount":300}},"profile":{{"city":"上海"}}}}"#
        ),
        format!(
            r#"{{"customer_id":"c1","type":"payment","ts":{},"props":{{"amount":1500}}}}"#,
            T0 + DAY
        ),
        format!(
            r#"{{"customer_id":"c1","type":"payment","ts":{},"props":{{"amount":700}}}}"#,
            T0 + DAY
        ),
        format!(
            r#"{{"customer_id":"c1","type":"view","ts":{},"props":{{"category":"seafood"}}}}"#,
            T0 + DAY
        ),
        format!(
            r#"{{"customer_id":"c1","type":"lead_created","ts":{}}}"#,
            T0 + 2 * DAY
        ),
    ];
    let body = events.join("\n");
    assert_eq!(s.send("POST", "/v1/events", &body).json()["accepted"], 5);
    let now = T0 + 2 * DAY;

    let e = s.get("/v1/customers/c1/explain/big_spender").json();
    assert_eq!(e["kind"], "tag");
    assert_eq!(e["now"], now);
    assert_eq!(e["value"], true);
    assert_eq!(e["membership"]["since"], T0 + DAY);
    let and = &e["explain"]["children"][0];
    assert_eq!(and["expr"], "spend_30d >= 2000 and profile.city == \"上海\"");
    let spend = &and["children"][0]["children"][0];
    assert_eq!(spend["expr"], "spend_30d");
    assert_eq!(spend["value"], 2500);
    let sum = &spend["children"][0];
    assert_eq!(sum["expr"], "sum(payment.amount, 30d)");
    assert_eq!(sum["window"]["event_type"], "payment");
    assert_eq!(sum["window"]["from_exclusive"], now - 30 * DAY);
    assert_eq!(sum["window"]["to_inclusive"], now);
    assert_eq!(and["children"][1]["children"][0]["value"], "上海");
    // The 300 payment leaves the 30-day window at T0 + 30d, but 2200 is still enough: the
    // value changes when the other two leave, at T0 + 31d.
    assert_eq!(e["next_change"]["at"], T0 + 31 * DAY);
    assert_eq!(e["next_change"]["value"], false);

    let e = s.get("/v1/customers/c1/explain/viewed_seafood").json();
    assert_eq!(
        (e["kind"].as_str(), &e["value"]),
        (Some("event_tag"), &true.into())
    );
    assert_eq!(e["explain"]["window"]["where"], "category == \"seafood\"");
    assert_eq!(e["explain"]["window"]["from_exclusive"], now - 7 * DAY);
    assert_eq!(e["next_change"]["at"], T0 + 8 * DAY);

    let e = s.get("/v1/customers/c1/explain/lead_waiting").json();
    assert_eq!(e["value"], false);
    assert_eq!(
        e["explain"]["children"][0]["children"][0]["value"], 0,
        "since is 0 ms"
    );
    assert_eq!(e["next_change"]["at"], now + 45 * 60_000 + 1);
    assert_eq!(e["next_change"]["value"], true);

    // A trait: its value, no membership, and its next value.
    let e = s.get("/v1/customers/c1/explain/spend_30d").json();
    assert_eq!((e["kind"].as_str(), &e["value"]), (Some("trait"), &2500.into()));
    assert!(e["membership"].is_null());
    assert_eq!(e["next_change"]["at"], T0 + 30 * DAY);
    assert_eq!(e["next_change"]["value"], 2200);

    // Move the clock: the explanation follows.
    s.send("POST", "/v1/clock", &format!(r#"{{"now":{}}}"#, T0 + 31 * DAY));
    let e = s.get("/v1/customers/c1/explain/big_spender").json();
    assert_eq!(e["value"], false);
    assert!(e["membership"].is_null());

    // Manual tags: explained by their expiry.
    assert_eq!(
        s.send("PUT", "/v1/customers/c1/tags/vip", r#"{"ttl":"1d"}"#)
            .status,
        200
    );
    let e = s.get("/v1/customers/c1/explain/vip").json();
    assert_eq!(
        (e["kind"].as_str(), &e["value"]),
        (Some("manual_tag"), &true.into())
    );
    assert_eq!(e["manual"]["expires_at"], T0 + 32 * DAY);
    assert_eq!(e["next_change"]["at"], T0 + 32 * DAY);
    assert!(e["explain"].is_null());

    // Normalised ids; unknown customers and names are 404 with a reason.
    assert_eq!(s.get("/v1/customers/%E2%80%8Bc1/explain/vip").status, 200);
    let r = s.get("/v1/customers/nobody/explain/big_spender");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("nobody"));
    let r = s.get("/v1/customers/c1/explain/big_spendr");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("big_spendr"), "{}", r.text());
}

/// The value of an unlabelled Prometheus sample, e.g. `tagstream_timers_fired_total 3`.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn metrics_report_event_to_change_latency_timers_and_compaction() {
    let s = Server::start("tag pinged = count(ping, 2s) >= 1", &["--clock", "wall"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let r = s.send(
        "POST",
        "/v1/events",
        &format!(r#"{{"customer_id":"c1","type":"ping","ts":{}}}"#, now - 1500),
    );
    assert_eq!(r.json()["accepted"], 1, "{}", r.text());
    // The ping leaves its 2 s window about 0.5 s from now; the wall clock fires the timer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let metrics = loop {
        let m = s.get("/metrics").text();
        if sample(&m, "tagstream_timers_fired_total").unwrap_or(0.0) >= 1.0 {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "no timer fired:\n{m}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(s.get("/v1/customers/c1").json()["tags"]["pinged"].is_null());
    assert_eq!(
        sample(&metrics, "tagstream_timer_lateness_seconds_count"),
        Some(1.0)
    );
    let lateness = sample(&metrics, "tagstream_timer_lateness_seconds_sum").unwrap();
    assert!(
        (0.0..1.0).contains(&lateness),
        "the contract's one second: {lateness}"
    );
    // One change (the tag added) caused by the event.
    assert_eq!(
        sample(&metrics, "tagstream_event_to_change_seconds_count"),
        Some(1.0)
    );
    assert_eq!(sample(&metrics, "tagstream_timers_pending"), Some(0.0));
    for gauge in [
        "tagstream_rocksdb_sst_bytes",
        "tagstream_rocksdb_pending_compaction_bytes",
        "tagstream_rocksdb_running_compactions",
        "tagstream_rocksdb_memtable_bytes",
        "tagstream_rocksdb_table_readers_bytes",
        "tagstream_rocksdb_block_cache_bytes",
    ] {
        assert!(sample(&metrics, gauge).is_some(), "{gauge} missing:\n{metrics}");
    }
    // Changes by definition; names only set by hand share one label.
    assert_eq!(s.send("PUT", "/v1/customers/c1/tags/vip-2026", "").status, 200);
    let metrics = s.get("/metrics").text();
    for line in [
        r#"tagstream_changes_total{kind="tag",cause="event",definition="pinged",op="add"} 1"#,
        r#"tagstream_changes_total{kind="tag",cause="timer",definition="pinged",op="remove"} 1"#,
        r#"tagstream_changes_total{kind="tag",cause="manual",definition="(manual)",op="add"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    assert!(!metrics.contains("vip-2026"), "no client-chosen names as labels");
    // Every metric has HELP and TYPE lines and is one the code documents; build and process
    // metrics are there.
    let known: Vec<&str> = processor::telemetry::METRICS.iter().map(|m| m.0).collect();
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            known.contains(&name),
            "{name} is not in processor::telemetry::METRICS"
        );
        assert!(metrics.contains(&format!("# HELP {name} ")), "no HELP for {name}");
    }
    for name in [
        "tagstream_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "tagstream_engine_queue_capacity",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{metrics}"
        );
    }
    let rss = sample(&metrics, "process_resident_memory_bytes").unwrap();
    assert!(rss > 1e6, "a resident size in bytes: {rss}");
}

#[test]
fn sigterm_finishes_the_work_in_flight_closes_streams_and_exits_zero() {
    let mut s = Server::start("tag big = sum(payment.amount, 30d) >= 100", &[]);
    let body: String = (0..2000)
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i}","customer_id":"c{}","type":"payment","ts":{},"props":{{"amount":60}}}}"#,
                i % 100,
                T0 + i
            ) + "\n"
        })
        .collect();
    assert_eq!(s.send("POST", "/v1/events", &body).json()["accepted"], 2000);
    // A client following a change stream must not hold the shutdown up.
    let mut stream = std::net::TcpStream::connect(&s.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    let request = format!(
        "GET /v1/segments/big/stream?after=0 HTTP/1.1\r\nHost: {}\r\n\r\n",
        s.addr
    );
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("retry: 1000") {
        let n = std::io::Read::read(&mut stream, &mut buf).unwrap();
        assert!(n > 0, "the stream closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    let status = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = s.child.try_wait().unwrap() {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "no exit 20 s after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    // The stream was ended by the server, not left to time out.
    loop {
        match std::io::Read::read(&mut stream, &mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => panic!("the stream was not closed at shutdown: {e}"),
        }
    }
    // Everything accepted is there after a restart on the same store.
    let dir = std::mem::replace(&mut s._dir, TempDir::new("http-moved"));
    let again = Server::start_in(dir, "tag big = sum(payment.amount, 30d) >= 100", &[]);
    let c = again.get("/v1/customers/c7").json();
    assert_eq!(c["tags"]["big"]["since"], T0 + 107);
    let changes = again.get("/v1/changes?after=0&limit=1000").json();
    assert_eq!(changes["changes"].as_array().unwrap().len(), 100);
}

#[test]
fn identities_are_resolved_looked_up_by_any_identifier_and_merged_by_hand() {
    let rules = "tag big_spender = sum(payment.amount, 30d) >= 2000\nsegment quiet = not big_spender\n";
    let s = Server::start(rules, &[]);
    let events = [
        format!(r#"{{"event_id":"a","type":"payment","ts":{T0},"ids":{{"phone":"+86 138-0000-0001"}},"props":{{"amount":900}}}}"#),
        format!(r#"{{"event_id":"b","type":"payment","ts":{},"ids":{{"openid":"oAbC","phone":"１３８０００００００１"}},"props":{{"amount":700}}}}"#, T0 + 1),
        format!(r#"{{"event_id":"c","customer_id":"crm-7","type":"payment","ts":{},"props":{{"amount":600}}}}"#, T0 + 2),
        format!(r#"{{"event_id":"d","type":"view","ts":{},"ids":{{"fax":"1"}}}}"#, T0 + 3),
    ]
    .join("\n");
    let r = s.send("POST", "/v1/events", &events);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["accepted"], 3);
    assert_eq!(body["errors"][0]["code"], "id_type_unknown");

    // Any identifier, in any spelling, finds the customer, with what it owns.
    let r = s.get("/v1/customers/by/phone/0086%2013800000001");
    assert_eq!(r.status, 200, "{}", r.text());
    let customer = r.json();
    assert_eq!(customer["customer_id"], "phone:13800000001");
    assert_eq!(
        customer["identifiers"]["phone"],
        serde_json::json!(["13800000001"])
    );
    assert_eq!(customer["identifiers"]["openid"], serde_json::json!(["oAbC"]));
    assert_eq!(customer["traits"], serde_json::json!({}));
    assert_eq!(
        s.get("/v1/customers/by/openid/oAbC").json()["customer_id"],
        "phone:13800000001"
    );
    assert_eq!(s.get("/v1/customers/by/phone/13900000000").status, 404);
    assert_eq!(s.get("/v1/customers/by/fax/1").status, 404);
    assert_eq!(s.get("/v1/customers/by/email/nobody").status, 409);

    // The CRM's record and the shop's are one person: merged by hand.
    let r = s.send(
        "POST",
        "/v1/customers/crm-7/merge",
        r#"{"ids":["phone:13800000001"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let merged = r.json();
    assert_eq!(merged["customer_id"], "crm-7");
    assert_eq!(merged["absorbed"], serde_json::json!(["phone:13800000001"]));
    let ops: Vec<(String, String, String)> = merged["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = ["tag", "segment", "absorbed"]
                .iter()
                .find_map(|f| c[f].as_str())
                .unwrap();
            (
                c["customer_id"].as_str().unwrap().into(),
                name.into(),
                c["op"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected = [
        ("crm-7", "phone:13800000001", "merge"),
        ("phone:13800000001", "quiet", "remove"),
        ("crm-7", "big_spender", "add"),
        ("crm-7", "quiet", "remove"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(ops, expected);
    assert!(merged["changes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["cause"] == "manual"));
    // The absorbed id and every identifier answer the survivor; the log has the merge.
    let survivor = s.get("/v1/customers/phone:13800000001").json();
    assert_eq!(survivor["customer_id"], "crm-7");
    assert!(survivor["tags"]["big_spender"].is_object());
    assert_eq!(
        survivor["identifiers"]["customer_id"],
        serde_json::json!(["crm-7", "phone:13800000001"])
    );
    assert_eq!(
        s.get("/v1/customers/by/phone/13800000001").json()["customer_id"],
        "crm-7"
    );
    // The same identifiers on their own.
    let own = s.get("/v1/identities/customers/crm-7").json();
    assert_eq!(own["customer_id"], "crm-7");
    assert_eq!(own["identifiers"], survivor["identifiers"]);
    let log = s.get("/v1/changes?after=0").json();
    assert!(log["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["op"] == "merge" && c["absorbed"] == "phone:13800000001"));
    // An event under any of the ids lands on the survivor.
    let r = s.send(
        "POST",
        "/v1/events",
        &format!(
            r#"{{"type":"payment","ts":{},"ids":{{"openid":"oAbC"}},"props":{{"amount":1}}}}"#,
            T0 + 4
        ),
    );
    assert_eq!(r.json()["accepted"], 1);
    let stats = s.get("/v1/identities/stats").json();
    assert_eq!(
        (stats["merges"].as_u64(), stats["customers_absorbed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(stats["identifiers"]["phone"], 1);
    assert_eq!(stats["identifiers"]["openid"], 1);

    // Bad merges are refused with a reason.
    for (body, status) in [
        (r#"{"ids":[]}"#, 400),
        (r#"{"ids":["nosuch"]}"#, 404),
        (r#"{"ids":["phone:13800000001"]}"#, 409),
        (r#"{"id":["x"]}"#, 400),
    ] {
        let r = s.send("POST", "/v1/customers/crm-7/merge", body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.json()["error"].is_string());
    }
    assert_eq!(
        s.send("POST", "/v1/customers/nosuch/merge", r#"{"ids":["crm-7"]}"#)
            .status,
        404
    );

    // The merge was wrong after all: split the shop's customer off again. It takes back its
    // identifiers and its events, the one its openid brought since the merge too.
    let r = s.send(
        "POST",
        "/v1/customers/crm-7/unmerge",
        r#"{"ids":["phone:13800000001"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let split = r.json();
    assert_eq!(split["split"], serde_json::json!(["phone:13800000001"]));
    assert_eq!(split["changes"][0]["op"], "unmerge");
    assert_eq!(split["changes"][0]["split"], "phone:13800000001");
    let shop = s.get("/v1/customers/by/openid/oAbC").json();
    assert_eq!(shop["customer_id"], "phone:13800000001");
    assert_eq!(shop["identifiers"]["phone"], serde_json::json!(["13800000001"]));
    let events = s.get("/v1/customers/phone:13800000001/events").json();
    assert_eq!(events["events"].as_array().unwrap().len(), 3, "{events}");
    let crm = s.get("/v1/customers/crm-7").json();
    assert!(crm["tags"].get("big_spender").is_none(), "{crm}");
    assert_eq!(crm["identifiers"]["customer_id"], serde_json::json!(["crm-7"]));
    assert_eq!(s.get("/v1/identities/stats").json()["unmerges"], 1);
    let metrics = s.get("/metrics").text();
    for line in [
        "tagstream_identity_merges_total 1",
        "tagstream_identity_unmerges_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in /metrics");
    }
    let cached = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tagstream_identity_cache_entries "))
        .expect("the identity cache gauge");
    assert!(cached.parse::<f64>().unwrap() >= 2.0, "{cached}");
    // A small graph: held whole.
    assert!(
        metrics
            .lines()
            .any(|l| l == "tagstream_identity_cache_complete 1"),
        "the identity cache holds the whole graph"
    );
    // An SMS audience: the members with their phone numbers.
    let r = s.get("/v1/segments/quiet/members?fields=ids.phone,ids.customer_id");
    assert_eq!(r.status, 200, "{}", r.text());
    let rows: Vec<serde_json::Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let shop_row = rows
        .iter()
        .find(|row| row["customer_id"] == "phone:13800000001")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(shop_row["ids.phone"], "13800000001");
    assert_eq!(shop_row["ids.customer_id"], "phone:13800000001");
    let crm_row = rows.iter().find(|row| row["customer_id"] == "crm-7").unwrap();
    assert_eq!(crm_row["ids.phone"], serde_json::Value::Null);
    assert_eq!(s.get("/v1/segments/quiet/members?fields=ids.fax").status, 400);
    for (body, status) in [(r#"{"ids":["phone:13800000001"]}"#, 409), (r#"{"ids":[]}"#, 400)] {
        let r = s.send("POST", "/v1/customers/crm-7/unmerge", body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
    }
}
