//! The real `tagstream serve` over HTTP: ingest, move the clock, read customers, changes,
//! segments and exports; every class of bad request gets a JSON error with the right status.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use tests::http::request;
use tests::{repo_root, TempDir};

struct Server {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Server {
    fn start(rules: &str, extra: &[&str]) -> Server {
        let dir = TempDir::new("http");
        let rules_path = dir.path().join("rules.trl");
        std::fs::write(&rules_path, rules).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tagstream"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--rules")
            .arg(&rules_path)
            .args([
                "--clock",
                "event",
                "--listen",
                "127.0.0.1:0",
                "--sync-writes",
                "false",
            ])
            .args(extra)
            .env("TAGSTREAM_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tagstream serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("tagstream listening on http://")
            .unwrap_or_else(|| panic!("{line}"))
            .to_owned();
        Server {
            child,
            addr,
            _dir: dir,
        }
    }

    fn get(&self, path: &str) -> tests::http::Response {
        request(&self.addr, "GET", path, b"")
    }

    fn send(&self, method: &str, path: &str, body: &str) -> tests::http::Response {
        request(&self.addr, method, path, body.as_bytes())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    assert!(csv.starts_with("customer_id,since,expires_at\n\"c2\","), "{csv}");

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

#[test]
fn every_bad_request_gets_a_json_error_with_the_right_status() {
    let s = Server::start(
        "tag big = sum(payment.amount, 30d) >= 100",
        &["--max-request-bytes", "2048"],
    );
    let check = |r: tests::http::Response, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let error = r.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {}", r.text()))
            .to_owned();
        assert!(error.contains(needle), "{error:?} lacks {needle:?}");
    };
    check(s.send("POST", "/v1/clock", r#"{"now": 17"#), 400, "line 1 column");
    check(
        s.send("POST", "/v1/events", r#"[{"customer_id": "c1", "type": "view"}"#),
        400,
        "malformed JSON array",
    );
    check(s.send("POST", "/v1/events", &"x".repeat(4096)), 413, "2048 bytes");
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
    check(s.get("/v1/nothing/here"), 404, "no route");
    check(s.send("DELETE", "/v1/changes", ""), 405, "not allowed");
    check(s.get("/v1/changes?after=abc"), 400, "after");
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
    check(
        s.send("POST", "/v1/clock", &format!(r#"{{"now": {T0}}}"#))
            .and_back(&s, T0 - 1),
        409,
        "backwards",
    );
    check(
        s.send("PUT", "/v1/customers/c1/tags/big", ""),
        409,
        "condition tag",
    );
    check(
        s.send("PUT", "/v1/customers/c1/tags/x", r#"{"ttl": "7 weeks"}"#),
        400,
        "ttl",
    );
    check(s.get("/v1/segments/nope/members"), 404, "no tag or segment");
    check(
        s.get("/v1/segments/big/members?format=xml"),
        400,
        "unknown format",
    );
    check(s.send("POST", "/v1/events", ""), 400, "no events");
    // After all that, the server still ingests.
    let ok = s.send(
        "POST",
        "/v1/events",
        &format!(r#"{{"customer_id":"c1","type":"payment","ts":{T0},"props":{{"amount":150}}}}"#),
    );
    assert_eq!(ok.json()["accepted"], 1);
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
