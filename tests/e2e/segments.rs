//! Membership streams against the real server: Server-Sent Events resume without gaps or
//! duplicates, the delta export nets out what happened since a `seq`, and webhooks deliver
//! every enter and exit exactly once, in order, signed, through injected failures — with
//! batches that never get through in the dead-letter list.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/server.rs"]
mod server;
use server::Server;
#[path = "support/receiver.rs"]
mod receiver;
use receiver::{receiver, slow_receiver};
use tests::sse::Sse;

const T0: i64 = 1_744_000_000_000;
const RULES: &str = "tag viewer = count(view, 30s) >= 1\ntag buyer = count(payment, 60s) >= 1";

/// Views by `customers` customers at `T0 + second`.
fn views(customers: std::ops::Range<usize>, second: i64) -> String {
    customers
        .map(|i| {
            format!(
                r#"{{"customer_id":"c{i:03}","type":"view","ts":{}}}"#,
                T0 + second * 1000
            ) + "\n"
        })
        .collect()
}

/// The change log's changes of `name`, in order.
fn log_of(s: &Server, name: &str) -> Vec<Value> {
    let all = s.get("/v1/changes?limit=100000").json();
    all["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["tag"] == name || c["segment"] == name)
        .cloned()
        .collect()
}

/// Some enters, some exits by time, more enters: the stream every test follows.
fn churn(s: &Server, round: i64) {
    let base = round * 100;
    assert_eq!(s.send("POST", "/v1/events", &views(0..15, base)).status, 200);
    assert_eq!(
        s.send("POST", "/v1/events", &views(10..25, base + 20)).status,
        200
    );
    // c000..c009 leave at base + 30 s; the others stay until base + 50 s.
    let clock = format!(r#"{{"now": {}}}"#, T0 + (base + 40) * 1000);
    assert_eq!(s.send("POST", "/v1/clock", &clock).status, 200);
}

#[test]
fn server_sent_events_resume_after_last_event_id_without_gaps_or_duplicates() {
    let s = Server::start(RULES, &[]);
    churn(&s, 0);
    let expected_first = log_of(&s, "viewer");
    assert_eq!(expected_first.len(), 35, "25 enters and 10 exits");

    // From the start of the log; drop the connection part way.
    let mut sse = Sse::connect(&s.addr, "/v1/segments/viewer/stream?after=0", None);
    let mut got = Vec::new();
    for _ in 0..12 {
        let (id, event, data) = sse.next_event();
        assert_eq!(data["seq"].to_string(), id);
        assert_eq!(event, if data["op"] == "add" { "enter" } else { "exit" });
        got.push(data);
    }
    drop(sse);

    // Reconnect with Last-Event-ID; new changes arrive while connected.
    let last = got.last().unwrap()["seq"].as_u64().unwrap();
    let mut sse = Sse::connect(&s.addr, "/v1/segments/viewer/stream", Some(&last.to_string()));
    churn(&s, 1);
    let expected = log_of(&s, "viewer");
    while got.len() < expected.len() {
        got.push(sse.next_event().2);
    }
    assert_eq!(got, expected);

    // The live stream carries what is committed after it connects, and only that name.
    let mut live = Sse::connect(&s.addr, "/v1/segments/buyer/stream", None);
    let pay = format!(
        r#"{{"customer_id":"c500","type":"payment","ts":{}}}"#,
        T0 + 240_000
    );
    assert_eq!(s.send("POST", "/v1/events", &pay).status, 200);
    let (_, event, data) = live.next_event();
    assert_eq!(
        (event.as_str(), data["customer_id"].as_str()),
        ("enter", Some("c500"))
    );

    assert_eq!(s.get("/v1/segments/nothing/stream").status, 404);
    let bad = tests::http::request(&s.addr, "GET", "/v1/segments/viewer/stream?after=x", b"");
    assert_eq!(bad.status, 400);
}

#[test]
fn the_delta_export_nets_out_who_entered_and_exited_since_a_seq() {
    let s = Server::start(RULES, &[]);
    assert_eq!(s.send("POST", "/v1/events", &views(0..10, 0)).status, 200);
    let first = s.get("/v1/segments/viewer/delta?after=0").json();
    assert_eq!(first["entered"].as_array().unwrap().len(), 10);
    assert_eq!(first["exited"], serde_json::json!([]));
    let mark = first["until"].as_u64().unwrap();

    // c000..c004 view again (stay), c010 and c011 arrive; at 35 s c005..c009 have left.
    assert_eq!(s.send("POST", "/v1/events", &views(0..5, 20)).status, 200);
    assert_eq!(s.send("POST", "/v1/events", &views(10..12, 20)).status, 200);
    let clock = format!(r#"{{"now": {}}}"#, T0 + 35_000);
    assert_eq!(s.send("POST", "/v1/clock", &clock).status, 200);
    // c012 enters and leaves in between: in neither list.
    assert_eq!(s.send("POST", "/v1/events", &views(12..13, 35)).status, 200);
    let clock = format!(r#"{{"now": {}}}"#, T0 + 66_000);
    assert_eq!(s.send("POST", "/v1/clock", &clock).status, 200);
    assert_eq!(s.send("POST", "/v1/events", &views(0..5, 66)).status, 200);

    let delta = s.get(&format!("/v1/segments/viewer/delta?after={mark}")).json();
    let ids = |v: &Value| -> Vec<String> {
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    // At 66 s: c000..c004 viewed at 66 s (members, as at the mark); c010, c011 left at 50 s.
    assert_eq!(ids(&delta["entered"]), Vec::<String>::new());
    assert_eq!(ids(&delta["exited"]), ["c005", "c006", "c007", "c008", "c009"]);
    let later = s
        .get(&format!("/v1/segments/viewer/delta?after={}", delta["until"]))
        .json();
    assert_eq!(later["entered"], serde_json::json!([]));

    assert_eq!(s.get("/v1/segments/viewer/delta").status, 400);
    assert_eq!(s.get("/v1/segments/viewer/delta?after=999999").status, 400);
    assert_eq!(s.get("/v1/segments/nothing/delta?after=0").status, 404);
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn webhooks_deliver_every_change_once_in_order_through_failures_and_dead_letter_the_rest() {
    let s = Server::start(RULES, &["--webhook-allow", "127.0.0.1"]);
    const SECRET: &str = "a-secret-of-16-bytes-or-more";
    // Every third request fails: each delivery that fails is retried and then accepted.
    let (url, seen) = receiver(SECRET, |n| n % 3 == 1);
    let body = format!(r#"{{"url":"{url}","name":"viewer","secret":"{SECRET}","after":0}}"#);
    let created = s.send("POST", "/v1/webhooks", &body);
    assert_eq!(created.status, 201, "{}", created.text());
    let id = created.json()["id"].as_u64().unwrap();
    assert!(!created.text().contains(SECRET), "the secret is never shown");

    churn(&s, 0);
    churn(&s, 1);
    let expected = log_of(&s, "viewer");
    wait_for("every viewer change", || {
        seen.lock().unwrap().changes.len() >= expected.len()
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = seen.lock().unwrap();
    assert_eq!(got.changes, expected, "every change exactly once, in order");
    assert_eq!(got.bad_signatures, 0);
    assert!(got.requests > 1, "failures were injected and retried");
    drop(got);
    let listed = s.get("/v1/webhooks").json();
    assert!(!listed.to_string().contains(SECRET));
    assert_eq!(listed["webhooks"][0]["id"], id);
    wait_for("the cursor to be saved", || {
        s.get("/v1/webhooks").json()["webhooks"][0]["delivered_through"].as_u64()
            >= expected.last().unwrap()["seq"].as_u64()
    });

    // A receiver that always fails: each batch is tried twice, then dead-lettered, and
    // delivery moves on.
    // (It recovers from its third request on: a redelivery then succeeds.)
    let (dead_url, dead_seen) = receiver(SECRET, |n| n < 2);
    let body = format!(r#"{{"url":"{dead_url}","name":"buyer","secret":"{SECRET}","max_attempts":2}}"#);
    let dead = s.send("POST", "/v1/webhooks", &body).json()["id"]
        .as_u64()
        .unwrap();
    let pay = format!(
        r#"{{"customer_id":"c900","type":"payment","ts":{}}}"#,
        T0 + 300_000
    );
    assert_eq!(s.send("POST", "/v1/events", &pay).status, 200);
    let letters = format!("/v1/webhooks/{dead}/dead_letters");
    wait_for("a dead letter", || {
        !s.get(&letters).json()["dead_letters"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    let letter = &s.get(&letters).json()["dead_letters"][0];
    assert_eq!(letter["attempts"], 2);
    assert_eq!(letter["changes"][0]["customer_id"], "c900");
    assert!(letter["last_error"].as_str().unwrap().contains("500"), "{letter}");
    assert_eq!(dead_seen.lock().unwrap().requests, 2);
    // The receiver is back: redelivery sends the batch again and it leaves the dead letters.
    let redeliver = s.send("POST", &format!("{letters}/redeliver"), "");
    assert_eq!(redeliver.status, 200, "{}", redeliver.text());
    assert_eq!(redeliver.json()["redelivered"], 1, "{}", redeliver.text());
    assert_eq!(redeliver.json()["remaining"], 0);
    assert!(s.get(&letters).json()["dead_letters"]
        .as_array()
        .unwrap()
        .is_empty());
    let got = dead_seen.lock().unwrap();
    assert_eq!(got.requests, 3);
    assert_eq!(got.changes.len(), 1, "the dead-lettered change arrived once");
    assert_eq!(got.changes[0]["customer_id"], "c900");
    assert_eq!(got.bad_signatures, 0);
    drop(got);
    assert_eq!(
        s.send("DELETE", &letters, "").json()["purged"],
        0,
        "nothing left to purge"
    );
    assert_eq!(s.send("DELETE", &format!("/v1/webhooks/{dead}"), "").status, 200);
    assert_eq!(s.get(&letters).status, 404);

    // Bad subscriptions are refused with a reason.
    let bad = |body: &str, needle: &str| {
        let r = s.send("POST", "/v1/webhooks", body);
        assert_eq!(r.status / 100, 4, "{body}");
        assert!(r.text().contains(needle), "{}", r.text());
    };
    bad(
        r#"{"url":"ftp://x.example/h","secret":"0123456789abcdef"}"#,
        "https://",
    );
    bad(r#"{"url":"http://x.example/h","secret":"short"}"#, "16 bytes");
    bad(
        r#"{"url":"http://x.example/h","secret":"0123456789abcdef","name":"nope"}"#,
        "nope",
    );
    bad(r#"{"url":"x","secret":"0123456789abcdef"}"#, "url");
}

#[test]
fn saved_segments_are_created_updated_and_deleted_through_the_api() {
    let s = Server::start(RULES, &[]);
    churn(&s, 0);
    let created = s.send(
        "PUT",
        "/v1/segments/active_buyers",
        r#"{"expr": "viewer and not buyer"}"#,
    );
    assert_eq!(created.status, 200, "{}", created.text());
    let created = created.json();
    assert_eq!(created["applied"], "immediate");
    // c010..c024 viewed at 20 s and are still in the window at 40 s.
    assert_eq!(created["members"], 15);
    assert_eq!(created["entered"], 15);
    let members = s.get("/v1/segments/active_buyers/members?format=csv").text();
    assert_eq!(members.lines().count(), 16);
    // Every enter is a `rule_change` change in the log.
    let log = log_of(&s, "active_buyers");
    assert_eq!(log.len(), 15);
    assert!(log
        .iter()
        .all(|c| c["cause"] == "rule_change" && c["op"] == "add"));

    let updated = s
        .send(
            "PUT",
            "/v1/segments/active_buyers",
            r#"{"expr": "viewer and profile.vip == true"}"#,
        )
        .json();
    assert_eq!(
        (updated["members"].as_u64(), updated["exited"].as_u64()),
        (Some(0), Some(15))
    );
    let listed = s.get("/v1/segments").json();
    assert_eq!(listed["segments"][0]["expr"], "viewer and profile.vip == true");
    assert_eq!(s.get("/v1/segments/active_buyers").json()["members"], 0);
    assert!(s
        .get("/v1/rules")
        .text()
        .contains("tag buyer = count(payment, 60s) >= 1"));

    let bad = s.send("PUT", "/v1/segments/x", r#"{"expr": "viewer and"}"#);
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(bad.json()["diagnostics"][0]["line"], 1);
    assert_eq!(
        s.send("PUT", "/v1/segments/viewer", r#"{"expr": "buyer"}"#)
            .status,
        409
    );
    assert_eq!(s.send("PUT", "/v1/segments/x", r#"{"exp": "buyer"}"#).status, 400);
    assert_eq!(s.send("DELETE", "/v1/segments/active_buyers", "").status, 200);
    assert_eq!(s.get("/v1/segments/active_buyers").status, 404);
    assert_eq!(s.send("DELETE", "/v1/segments/active_buyers", "").status, 404);
}

fn sql(s: &Server, body: serde_json::Value) -> tests::http::Response {
    s.send("POST", "/v1/sql", &body.to_string())
}

#[test]
fn sql_reads_customers_and_changes_refuses_writes_and_keeps_its_limits() {
    let rules = format!("{RULES}\ntrait views = count(view, 30s)");
    let s = Server::start(&rules, &[]);
    let events: String = (0..12)
        .map(|i| {
            let city = if i % 3 == 0 { "杭州" } else { "上海" };
            let t = if i % 4 == 0 { "payment" } else { "view" };
            format!(
                r#"{{"customer_id":"c{i:03}","type":"{t}","ts":{},"profile":{{"city":"{city}","age":{}}}}}"#,
                T0 + i * 1000,
                20 + i
            ) + "\n"
        })
        .collect();
    assert_eq!(s.send("POST", "/v1/events", &events).status, 200);
    assert_eq!(s.send("POST", "/v1/events", &views(0..3, 15)).status, 200);

    // Tags from the bitmaps.
    let r = sql(
        &s,
        serde_json::json!({"sql": "select count(*) as n from customers where viewer and not buyer"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let viewers = s.get("/v1/segments/viewer/members").text().lines().count();
    assert_eq!(r.json()["rows"][0]["n"], viewers - 1, "c000 is both");

    // Traits and profile attributes, compared with GET /v1/customers/{id}.
    let r = sql(
        &s,
        serde_json::json!({
            "sql": "select customer_id, views, \"profile.city\" as city, \"profile.age\" + 1 as next_age from customers where \"profile.city\" = '杭州' order by customer_id"
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rows = r.json()["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 4);
    for row in &rows {
        let id = row["customer_id"].as_str().unwrap();
        let c = s.get(&format!("/v1/customers/{id}")).json();
        assert_eq!(row["views"].as_f64(), c["traits"]["views"].as_f64(), "{id}");
        assert_eq!(row["city"], "杭州");
        assert_eq!(
            row["next_age"].as_f64(),
            Some(c["profile"]["age"].as_f64().unwrap() + 1.0)
        );
    }

    // Profile attributes alone come from the index's columns: the same values.
    let r = sql(
        &s,
        serde_json::json!({
            "sql": "select customer_id, \"profile.city\" as city, \"profile.age\" as age from customers order by customer_id"
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rows = r.json()["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 12);
    for row in &rows {
        let id = row["customer_id"].as_str().unwrap();
        let c = s.get(&format!("/v1/customers/{id}")).json();
        assert_eq!(row["city"], c["profile"]["city"], "{id}");
        assert_eq!(row["age"].as_f64(), c["profile"]["age"].as_f64(), "{id}");
    }

    // The change log.
    let r = sql(
        &s,
        serde_json::json!({
            "sql": "select name, count(*) as n from changes where op = 'add' group by name order by name"
        }),
    );
    let by_sql: Vec<(String, u64)> = r.json()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_owned(), r["n"].as_u64().unwrap()))
        .collect();
    let mut by_log: std::collections::BTreeMap<String, u64> = Default::default();
    for c in s.get("/v1/changes?limit=100000").json()["changes"]
        .as_array()
        .unwrap()
    {
        if c["op"] == "add" {
            *by_log.entry(c["tag"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    assert_eq!(by_sql, by_log.into_iter().collect::<Vec<_>>());

    // Formats and the row limit.
    let r = sql(
        &s,
        serde_json::json!({"sql": "select customer_id from customers order by customer_id", "max_rows": 3}),
    );
    assert_eq!(r.json()["rows"].as_array().unwrap().len(), 3);
    assert_eq!(r.json()["truncated"], true);
    let r = sql(
        &s,
        serde_json::json!({"sql": "select customer_id from customers order by customer_id", "format": "csv", "max_rows": 2}),
    );
    assert_eq!(r.text(), "customer_id\nc000\nc001\n");
    assert_eq!(r.header("x-truncated").as_deref(), Some("true"));

    // Read-only, and every refusal names what was wrong.
    for statement in [
        "create table x as select 1",
        "insert into customers (customer_id) values ('x')",
        "drop table customers",
        "set datafusion.execution.batch_size = 1",
        "select nope from customers",
        "selec 1",
    ] {
        let r = sql(&s, serde_json::json!({ "sql": statement }));
        assert_eq!(r.status, 400, "{statement}: {}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().starts_with("SQL: "),
            "{}",
            r.text()
        );
    }
    let slow = "select sum(a.seq + b.seq + c.seq + d.seq + e.seq + f.seq) \
                from changes a, changes b, changes c, changes d, changes e, changes f";
    let r = sql(&s, serde_json::json!({ "sql": slow, "timeout_ms": 1 }));
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(
        sql(&s, serde_json::json!({"sql": "select 1", "format": "xml"})).status,
        400
    );
    assert_eq!(
        sql(&s, serde_json::json!({"sql": "select 1", "max_rows": 0})).status,
        400
    );
    // The server is still fine.
    assert_eq!(
        sql(&s, serde_json::json!({"sql": "select 1 as one"})).json()["rows"][0]["one"],
        1
    );
}

/// The change log keeps `[retention] changes_max_count` changes: the service deletes the
/// oldest (after its index checkpoint, every 10 s), and every cursor before what is left —
/// `GET /v1/changes`, an SSE stream, a new webhook — answers 410 Gone with the oldest seq,
/// while SQL's `changes` table and cursors after the floor read what is left.
#[test]
fn the_change_log_keeps_its_retention_and_an_older_cursor_is_gone() {
    let dir = tests::TempDir::new("retention");
    let config = dir.path().join("tagstream.toml");
    std::fs::write(&config, "[retention]\nchanges_max_count = 5\n").unwrap();
    let s = Server::start(
        RULES,
        &[
            "--config",
            config.to_str().unwrap(),
            "--webhook-allow",
            "127.0.0.1",
        ],
    );
    assert_eq!(s.send("POST", "/v1/events", &views(0..20, 1)).status, 200);
    assert_eq!(
        s.get("/v1/changes?after=0&limit=100").json()["changes"]
            .as_array()
            .unwrap()
            .len(),
        20
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let gone = loop {
        let r = s.get("/v1/changes?after=0");
        if r.status == 410 {
            break r.json();
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(Instant::now() < deadline, "retention never ran");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(gone["log"], "changes");
    assert_eq!(gone["oldest_seq"], 16, "the last five changes are kept");
    assert!(gone["error"].as_str().unwrap().contains("after=15"), "{gone}");
    let left = s.get("/v1/changes?after=15").json();
    let seqs: Vec<u64> = left["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [16, 17, 18, 19, 20]);
    assert_eq!(s.get("/v1/changes?after=14").status, 410);
    assert_eq!(s.get("/v1/segments/viewer/stream?after=3").status, 410);
    let r = s.send(
        "POST",
        "/v1/webhooks",
        r#"{"url": "http://127.0.0.1:9/hook", "name": "viewer", "secret": "a-secret-of-16-bytes-or-more", "after": 3}"#,
    );
    assert_eq!(
        (r.status, r.json()["oldest_seq"].as_u64()),
        (410, Some(16)),
        "{}",
        r.text()
    );
    assert_eq!(s.get("/v1/segments/viewer/delta?after=3").status, 410);
    let r = sql(
        &s,
        serde_json::json!({"sql": "select min(seq) as lo, count(*) as n from changes"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (
            r.json()["rows"][0]["lo"].as_u64(),
            r.json()["rows"][0]["n"].as_u64()
        ),
        (Some(16), Some(5))
    );
    let metrics = s.get("/metrics").text();
    assert!(
        metrics.contains("tagstream_log_oldest{log=\"changes\"} 16"),
        "{metrics}"
    );
    assert!(metrics.contains("tagstream_log_trimmed_total{log=\"changes\"} 15"));
}

/// SIGTERM with a webhook behind: the server stops taking requests, then delivers what is
/// committed before it exits (within its drain grace), so the receiver has every change.
#[test]
fn sigterm_delivers_what_is_committed_to_webhooks_before_exiting() {
    let s = Server::start(RULES, &["--webhook-allow", "127.0.0.1"]);
    const SECRET: &str = "a-secret-of-16-bytes-or-more";
    let (url, seen) = slow_receiver(SECRET, |_| false, Duration::from_millis(400));
    let body = format!(r#"{{"url":"{url}","name":"viewer","secret":"{SECRET}","after":0}}"#);
    assert_eq!(s.send("POST", "/v1/webhooks", &body).status, 201);
    for second in 0..6 {
        assert_eq!(
            s.send(
                "POST",
                "/v1/events",
                &views(second * 10..second * 10 + 10, second as i64)
            )
            .status,
            200
        );
    }
    let last = s.get("/v1/changes?after=0&limit=1000").json()["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        seen.lock().unwrap().changes.len() < 60,
        "still delivering at SIGTERM"
    );
    let started = Instant::now();
    let mut server = s;
    assert!(Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the drain is bounded"
    );
    let seen = seen.lock().unwrap();
    let mut seqs: Vec<u64> = seen.changes.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "every committed change of `viewer` was delivered"
    );
    assert_eq!(seen.bad_signatures, 0);
}

#[test]
fn definitions_list_members_and_enters_and_exits_per_hour_also_after_a_crash() {
    let s = Server::start(RULES, &[]);
    churn(&s, 0);
    let hour = T0.div_euclid(3_600_000) * 3_600_000;
    let check = |s: &Server, members: u64, left: u64| {
        let listed = s.get("/v1/definitions?hours=24");
        assert_eq!(listed.status, 200, "{}", listed.text());
        let listed = listed.json();
        assert_eq!(listed["hours"], 24);
        let defs = listed["definitions"].as_array().unwrap();
        let names: Vec<&str> = defs.iter().map(|d| d["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["viewer", "buyer"]);
        assert_eq!(defs[0]["kind"], "tag");
        assert_eq!(defs[0]["source"], "tag viewer = count(view, 30s) >= 1");
        assert_eq!(defs[0]["members"], members);
        assert_eq!(
            defs[0]["activity"],
            serde_json::json!([{"hour": hour, "entered": 25, "left": left}])
        );
        assert_eq!(defs[1]["members"], 0);
        assert_eq!(defs[1]["activity"], serde_json::json!([]));
    };
    // 25 viewers entered, 10 left when their window ended; 15 are members.
    check(&s, 15, 10);
    // Killed and restarted: the counts come back from the index checkpoint and the change
    // log after it, each change once.
    let mut s = s;
    let dir = std::mem::replace(&mut s._dir, tests::TempDir::new("definitions-moved"));
    drop(s);
    let s = Server::restart(dir, &[]);
    check(&s, 15, 10);
    // Two hours later (event clock) the other 15 have left too, in the hour their window
    // ended; a day's window still holds that hour, the last hour does not.
    let clock = format!(r#"{{"now": {}}}"#, hour + 2 * 3_600_000);
    assert_eq!(s.send("POST", "/v1/clock", &clock).status, 200);
    check(&s, 0, 25);
    let recent = s.get("/v1/definitions?hours=1").json();
    assert_eq!(recent["definitions"][0]["activity"], serde_json::json!([]));
    for bad in ["hours=0", "hours=169", "hours=x", "days=1"] {
        let answer = s.get(&format!("/v1/definitions?{bad}"));
        assert_eq!(answer.status, 400, "{bad}: {}", answer.text());
    }
}
