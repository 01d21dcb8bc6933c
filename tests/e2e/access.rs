//! Access control end to end, on the real binary: keys made with `tagstream keys`, every
//! route walked with every role, the audit trail, the versioned rule set across restarts,
//! per-key rate limits, webhook targets, and refusing to serve open beyond loopback.

#[path = "support/server.rs"]
mod support;

use std::collections::BTreeMap;
use std::process::Command;

use query_api::access::{builtin_permissions, Need, BUILTIN_ROLES, ROUTES};
use serde_json::{json, Value};
use support::Server;
use tests::http::{request_with, Response};
use tests::TempDir;

const RULES: &str =
    "tag buyer = count(payment, 30d) >= 1\nsegment vip = buyer and profile.level == \"gold\"\n";

fn tagstream(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tagstream"))
        .args(args)
        .env("TAGSTREAM_LOG", "warn")
        .output()
        .expect("run tagstream")
}

/// Creates a key with the binary on a stopped store; returns the key.
fn create_key(data: &std::path::Path, role: &str, name: &str) -> String {
    create_key_with(data, role, name, &[])
}

/// [`create_key`] with more arguments (a settings file with custom roles).
fn create_key_with(data: &std::path::Path, role: &str, name: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "keys",
        "create",
        "--role",
        role,
        "--name",
        name,
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = tagstream(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn with_key(s: &Server, key: Option<&str>, method: &str, path: &str, body: &str) -> Response {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    request_with(&s.addr, method, path, &headers, body.as_bytes())
}

/// A store with one key per built-in role, and a server on it. Every failed authentication
/// is audited (no per-address budget: these tests make hundreds on purpose; the budget has
/// its own test).
fn keyed_server(extra: &[&str]) -> (Server, BTreeMap<&'static str, String>) {
    let dir = TempDir::new("access");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let keys = BUILTIN_ROLES
        .iter()
        .map(|role| (*role, create_key(&data, role, &format!("{role}-key"))))
        .collect();
    let config = dir.path().join("unbudgeted.toml");
    std::fs::write(&config, "[access.limits]\nfailed_auth_per_minute = 0\n").unwrap();
    let mut args = vec!["--config".to_owned(), config.display().to_string()];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Server::start_in(dir, RULES, &args), keys)
}

/// Kills the server; returns its directory for a restart.
fn stop(mut s: Server) -> TempDir {
    let dir = std::mem::replace(&mut s._dir, TempDir::new("access-moved"));
    drop(s);
    dir
}

fn concrete(path: &str) -> String {
    path.replace("{id}", "nosuch")
        .replace("{name}", "nosuch")
        .replace("{tag}", "t")
        .replace("{version}", "1")
        .replace("{id_type}", "phone")
        .replace("{value}", "13800000001")
}

#[test]
fn every_route_answers_each_role_as_its_permissions_say() {
    let (s, keys) = keyed_server(&[]);
    let mut checked = 0;
    for route in ROUTES {
        let path = concrete(route.path);
        let body = if route.method == "GET" || route.method == "DELETE" {
            ""
        } else {
            "{}"
        };
        let anonymous = with_key(&s, None, route.method, &path, body);
        let garbage = with_key(&s, Some("tsk_aaaaaaaaaa_nope"), route.method, &path, body);
        match route.need {
            Need::Open | Need::Metrics => {
                assert!(
                    ![401, 403].contains(&anonymous.status),
                    "{} {path}: {}",
                    route.method,
                    anonymous.status
                );
                continue;
            }
            Need::Key(permission) => {
                assert_eq!(
                    anonymous.status,
                    401,
                    "{} {path} without a key: {}",
                    route.method,
                    anonymous.text()
                );
                assert!(anonymous.header("www-authenticate").is_some());
                assert_eq!(garbage.status, 401, "{} {path} with a bad key", route.method);
                for role in BUILTIN_ROLES {
                    let r = with_key(&s, Some(&keys[role]), route.method, &path, body);
                    let allowed = builtin_permissions(role).unwrap().contains(&permission);
                    if allowed {
                        assert!(
                            ![401, 403, 500].contains(&r.status),
                            "{role} may {} {path}, got {}: {}",
                            route.method,
                            r.status,
                            r.text()
                        );
                    } else {
                        assert_eq!(
                            r.status,
                            403,
                            "{role} may not {} {path}: {}",
                            route.method,
                            r.text()
                        );
                        assert!(r.text().contains(&permission.name()), "{}", r.text());
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 200, "{checked}");
    // The health checks stay open.
    assert_eq!(with_key(&s, None, "GET", "/healthz", "").status, 200);
}

#[test]
fn keys_are_managed_over_the_api_and_revocation_is_immediate() {
    let (s, keys) = keyed_server(&[]);
    let admin = Some(keys["admin"].as_str());
    let made = with_key(
        &s,
        admin,
        "POST",
        "/v1/admin/keys",
        r#"{"name": "crm", "role": "reader"}"#,
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let key = made.json()["key"].as_str().unwrap().to_owned();
    let id = made.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(with_key(&s, Some(&key), "GET", "/v1/segments", "").status, 200);
    // The list never shows a key.
    let list = with_key(&s, admin, "GET", "/v1/admin/keys", "");
    assert!(!list.text().contains(&key[15..]), "{}", list.text());
    assert!(list.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["name"] == "crm"));
    // An unknown role, a duplicate name: refused with the reason.
    let bad = with_key(
        &s,
        admin,
        "POST",
        "/v1/admin/keys",
        r#"{"name": "x", "role": "wizard"}"#,
    );
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("no role `wizard`"), "{}", bad.text());
    assert_eq!(
        with_key(
            &s,
            admin,
            "POST",
            "/v1/admin/keys",
            r#"{"name": "crm", "role": "reader"}"#
        )
        .status,
        409
    );
    let revoked = with_key(&s, admin, "DELETE", &format!("/v1/admin/keys/{id}"), "");
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(with_key(&s, Some(&key), "GET", "/v1/segments", "").status, 401);
}

#[test]
fn every_audited_request_leaves_exactly_one_record() {
    let (s, keys) = keyed_server(&[]);
    let editor = Some(keys["editor"].as_str());
    let exporter = Some(keys["exporter"].as_str());
    let admin = Some(keys["admin"].as_str());
    let ingest = Some(keys["ingest"].as_str());
    let event = r#"{"customer_id":"c1","type":"payment","ts":1744000000000,"props":{"amount":5},"profile":{"level":"gold"}}"#;
    assert_eq!(with_key(&s, ingest, "POST", "/v1/events", event).status, 200);
    let extended = format!("{RULES}tag extra = count(view, 7d) >= 1\n");
    let steps: Vec<(Option<&str>, &str, &str, &str, u16)> = vec![
        (editor, "PUT", "/v1/rules", &extended, 200),
        (editor, "PUT", "/v1/rules", "tag broken = count(", 422),
        (
            editor,
            "PUT",
            "/v1/segments/gold",
            r#"{"expr": "profile.level == \"gold\""}"#,
            200,
        ),
        (editor, "DELETE", "/v1/segments/gold", "", 200),
        (
            editor,
            "PUT",
            "/v1/customers/c1/tags/called",
            r#"{"ttl": "7d"}"#,
            200,
        ),
        (exporter, "GET", "/v1/segments/buyer/members?format=csv", "", 200),
        (
            exporter,
            "POST",
            "/v1/sql",
            r#"{"sql": "SELECT count(*) AS n FROM customers"}"#,
            200,
        ),
        (Some("tsk_aaaaaaaaaa_wrong"), "PUT", "/v1/rules", RULES, 401),
        (exporter, "PUT", "/v1/rules", RULES, 403),
    ];
    for (key, method, path, body, status) in &steps {
        let r = with_key(&s, *key, method, path, body);
        assert_eq!(r.status, *status, "{method} {path}: {}", r.text());
    }
    // Reads that are not audited leave nothing.
    assert_eq!(with_key(&s, editor, "GET", "/v1/rules", "").status, 200);
    let records = with_key(&s, admin, "GET", "/v1/audit?after=0", "").json()["records"]
        .as_array()
        .unwrap()
        .clone();
    let got: Vec<(String, u16)> = records
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    let expected: Vec<(String, u16)> = [
        ("keys create", 0),
        ("keys create", 0),
        ("keys create", 0),
        ("keys create", 0),
        ("keys create", 0),
        ("keys create", 0),
        ("PUT /v1/rules", 200),
        ("PUT /v1/rules", 422),
        ("PUT /v1/segments/{name}", 200),
        ("DELETE /v1/segments/{name}", 200),
        ("PUT /v1/customers/{id}/tags/{tag}", 200),
        ("GET /v1/segments/{name}/members", 200),
        ("POST /v1/sql", 200),
        ("PUT /v1/rules", 401),
        ("PUT /v1/rules", 403),
    ]
    .iter()
    .map(|(a, s)| (a.to_string(), *s))
    .collect();
    assert_eq!(got, expected);
    let rule_change = &records[6];
    assert_eq!(rule_change["actor"], "editor-key");
    assert_eq!(rule_change["role"], "editor");
    assert_eq!(rule_change["outcome"], "ok");
    assert_eq!(rule_change["detail"]["diff"]["added"][0]["name"], "extra");
    assert_eq!(records[7]["outcome"], "failed");
    assert_eq!(records[11]["detail"]["format"], "csv");
    assert_eq!(records[11]["detail"]["rows"], 1);
    assert_eq!(
        records[12]["detail"]["sql"],
        "SELECT count(*) AS n FROM customers"
    );
    assert_eq!(records[13]["outcome"], "denied");
    assert_eq!(records[13]["actor"], "anonymous");
    assert!(records[13]["detail"]["reason"]
        .as_str()
        .unwrap()
        .contains("not valid"));
    assert_eq!(records[14]["actor"], "exporter-key");
    // Sequence numbers are gap-free and readable page by page.
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=15).collect::<Vec<_>>());
    let page = with_key(&s, admin, "GET", "/v1/audit?after=13&limit=1", "").json();
    assert_eq!(page["records"][0]["seq"], 14);
    assert_eq!(page["next_after"], 14);
}

#[test]
fn the_rule_set_is_one_versioned_document_across_restarts() {
    let s = Server::start(RULES, &[]);
    let etag = s.get("/v1/rules").header("etag").unwrap();
    assert_eq!(etag, "\"1\"");
    let saved = request_with(
        &s.addr,
        "PUT",
        "/v1/segments/gold",
        &[("If-Match", "\"1\"")],
        br#"{"expr": "profile.level == \"gold\""}"#,
    );
    assert_eq!(saved.status, 200, "{}", saved.text());
    assert_eq!(saved.json()["version"], 2);
    assert_eq!(saved.json()["diff"]["added"][0]["name"], "gold");
    // A writer still holding version 1 is refused, and told the current one.
    let stale = request_with(
        &s.addr,
        "PUT",
        "/v1/rules",
        &[("If-Match", "\"1\"")],
        RULES.as_bytes(),
    );
    assert_eq!(stale.status, 409, "{}", stale.text());
    assert_eq!(stale.json()["current_version"], 2);
    // Restart with the same, unchanged file: the saved segment is still there.
    let dir = stop(s);
    let s = Server::start_in(dir, RULES, &[]);
    assert!(
        s.get("/v1/rules").text().contains("segment gold"),
        "{}",
        s.get("/v1/rules").text()
    );
    assert_eq!(s.get("/v1/segments/gold").status, 200);
    // A replacing PUT names what it removes.
    let replaced = s.send("PUT", "/v1/rules", RULES);
    assert_eq!(
        replaced.json()["diff"]["removed"][0]["name"],
        "gold",
        "{}",
        replaced.text()
    );
    assert_eq!(replaced.json()["version"], 3);
    // Roll back to version 2: the segment returns, as version 4.
    let back = s.send("POST", "/v1/rules/rollback", r#"{"version": 2}"#);
    assert_eq!(back.status, 200, "{}", back.text());
    assert_eq!(back.json()["version"], 4);
    assert_eq!(back.json()["diff"]["added"][0]["name"], "gold");
    let versions = s.get("/v1/rules/versions").json();
    let actions: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["rollback to 2", "put_rules", "put_segment gold", "initial"]
    );
    let v1 = s.get("/v1/rules/versions/1").json();
    assert_eq!(v1["text"], RULES);
    assert_eq!(s.get("/v1/rules/versions/99").status, 404);

    // A file that changed is refused, with its diff; nothing changes. Without a file the
    // stored set serves.
    let dir = stop(s);
    let other = dir.path().join("other.trl");
    std::fs::write(&other, "tag buyer = count(payment, 30d) >= 2\n").unwrap();
    let data = dir.path().join("data");
    let refused = tagstream(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--rules",
        other.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("- segment gold"), "{stderr}");
    assert!(
        stderr.contains("+ tag buyer = count(payment, 30d) >= 2"),
        "{stderr}"
    );
    assert!(stderr.contains("--replace-rules"), "{stderr}");
    let s = Server::restart(dir, &[]);
    assert_eq!(
        s.get("/v1/rules/versions?limit=1").json()["versions"][0]["version"],
        4
    );
    let dir = stop(s);
    // Told to replace, it does, as a version of its own.
    let s = Server::start_in(
        dir,
        "tag buyer = count(payment, 30d) >= 2\n",
        &["--replace-rules"],
    );
    let latest = &s.get("/v1/rules/versions?limit=1").json()["versions"][0];
    assert_eq!(latest["version"], 5);
    assert!(
        latest["author"].as_str().unwrap().starts_with("file:"),
        "{latest}"
    );
    assert_eq!(latest["removed"], 2);
}

#[test]
fn a_rule_file_declared_the_source_of_truth_refuses_runtime_edits() {
    let dir = TempDir::new("access");
    let config = dir.path().join("settings.toml");
    std::fs::write(&config, "rules_source = \"file\"\n").unwrap();
    let s = Server::start_in(dir, RULES, &["--config", config.to_str().unwrap()]);
    let refused = s.send("PUT", "/v1/segments/gold", r#"{"expr": "buyer"}"#);
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert!(refused.text().contains("rules_source"), "{}", refused.text());
    assert_eq!(s.send("PUT", "/v1/rules", RULES).status, 409);
}

#[test]
fn a_key_over_its_rate_gets_429_with_retry_after() {
    let dir = TempDir::new("access");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let key = create_key(&data, "reader", "busy");
    let other = create_key(&data, "reader", "calm");
    let config = dir.path().join("settings.toml");
    std::fs::write(&config, "[access.limits]\nrequests_per_second = 0.5\nburst = 2\n").unwrap();
    let s = Server::start_in(dir, RULES, &["--config", config.to_str().unwrap()]);
    assert_eq!(with_key(&s, Some(&key), "GET", "/v1/segments", "").status, 200);
    assert_eq!(with_key(&s, Some(&key), "GET", "/v1/segments", "").status, 200);
    let limited = with_key(&s, Some(&key), "GET", "/v1/segments", "");
    assert_eq!(limited.status, 429, "{}", limited.text());
    let wait: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    // Another key is not slowed by it.
    assert_eq!(with_key(&s, Some(&other), "GET", "/v1/segments", "").status, 200);
}

/// A flood of bad keys from one address: each failure within the address's budget is
/// audited with the address; past it the answer is 429 with `Retry-After` and no record of
/// its own, and the next record from that address counts the failures that had none. A valid
/// key from the same address is served throughout.
#[test]
fn a_flood_of_bad_keys_is_throttled_per_address_and_summed_in_the_audit() {
    let dir = TempDir::new("access");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let admin = create_key(&data, "admin", "auditor");
    let config = dir.path().join("settings.toml");
    std::fs::write(&config, "[access.limits]\nfailed_auth_per_minute = 120\n").unwrap();
    let s = Server::start_in(dir, RULES, &["--config", config.to_str().unwrap()]);
    let audited_failures = |s: &Server| -> Vec<serde_json::Value> {
        let r = with_key(s, Some(&admin), "GET", "/v1/audit?limit=1000", "");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rec| rec["status"] == 401)
            .cloned()
            .collect()
    };
    let bad = "tsk_AAAAAAAAAA_not-a-real-secret-000000000000000000";
    let mut statuses = BTreeMap::new();
    let mut retry_after = None;
    for _ in 0..140 {
        let r = with_key(&s, Some(bad), "GET", "/v1/segments", "");
        *statuses.entry(r.status).or_insert(0) += 1;
        if r.status == 429 {
            retry_after = r.header("retry-after");
        }
    }
    // The burst is the minute's budget; the rest (less what refilled meanwhile) is refused.
    let unauthorized = statuses[&401];
    assert!((120..=125).contains(&unauthorized), "{statuses:?}");
    assert_eq!(statuses[&429], 140 - unauthorized, "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(with_key(&s, Some(&admin), "GET", "/v1/segments", "").status, 200);
    let records = audited_failures(&s);
    assert_eq!(records.len(), unauthorized, "one record per 401, none per 429");
    assert!(
        records.iter().all(|r| r["detail"]["client"] == "127.0.0.1"),
        "{:?}",
        records[0]
    );

    std::thread::sleep(std::time::Duration::from_millis(600));
    let r = with_key(&s, Some(bad), "GET", "/v1/segments", "");
    assert_eq!(r.status, 401, "{}", r.text());
    // Every refused attempt is summed into the next recorded one: the last record, or one
    // in between when the budget refilled mid-flood on a slow machine (429s, a 401, 429s).
    let records = audited_failures(&s);
    let last = records.last().unwrap();
    assert!(
        last["detail"]["unrecorded_failures_before"].as_u64().unwrap() > 0,
        "{last}"
    );
    let summed: u64 = records
        .iter()
        .filter_map(|r| r["detail"]["unrecorded_failures_before"].as_u64())
        .sum();
    assert_eq!(summed, 140 - unauthorized as u64, "{records:?}");
    let metrics = with_key(&s, Some(&admin), "GET", "/metrics", "").text();
    assert!(metrics.contains("tagstream_auth_failures_total 141"), "{metrics}");
}

/// `concurrent_exports = 1`: while an export of a key streams to a client that stopped
/// reading, that key's next export and SQL statement get 429; another key is not held up;
/// once the first export is read to its end, the key exports again.
#[test]
fn a_key_runs_at_most_its_concurrent_exports_and_sql_statements() {
    use std::io::{Read, Write};
    let dir = TempDir::new("access");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let busy = create_key(&data, "exporter", "busy-exporter");
    let other = create_key(&data, "exporter", "other-exporter");
    let ingest = create_key(&data, "ingest", "loader");
    let config = dir.path().join("settings.toml");
    std::fs::write(&config, "[access.limits]\nconcurrent_exports = 1\n").unwrap();
    let s = Server::start_in(dir, RULES, &["--config", config.to_str().unwrap()]);
    // 8,000 buyers with a 4 kB attribute: an export of 32 MB, far more than loopback's socket
    // buffers (up to ~10 MB between them) and the pages in flight hold, so it cannot finish
    // while its client does not read.
    let bio = "x".repeat(4000);
    for chunk in 0..16 {
        let body: Vec<String> = (0..500)
            .map(|i| {
                let n = chunk * 500 + i;
                format!(
                    r#"{{"customer_id":"c{n}","type":"payment","ts":{},"props":{{"amount":1}},"profile":{{"bio":"{bio}"}}}}"#,
                    1_744_000_000_000u64 + n
                )
            })
            .collect();
        let r = with_key(&s, Some(&ingest), "POST", "/v1/events", &body.join("\n"));
        assert_eq!(r.json()["accepted"], 500, "{}", r.text());
    }
    let export = "/v1/segments/buyer/members?format=ndjson&fields=profile.bio";
    let mut slow = std::net::TcpStream::connect(&s.addr).unwrap();
    write!(
        slow,
        "GET {export} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {busy}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 4096];
    let n = slow.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    std::thread::sleep(std::time::Duration::from_millis(300));

    let second = with_key(&s, Some(&busy), "GET", export, "");
    assert_eq!(second.status, 429, "{}", second.text());
    assert!(
        second.text().contains("already runs 1 exports"),
        "{}",
        second.text()
    );
    let sql = with_key(
        &s,
        Some(&busy),
        "POST",
        "/v1/sql",
        r#"{"sql":"select count(*) from customers"}"#,
    );
    assert_eq!(sql.status, 429, "{}", sql.text());
    let another = with_key(&s, Some(&other), "GET", export, "");
    assert_eq!(another.status, 200);
    assert_eq!(another.text().lines().count(), 8000);

    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).unwrap();
    assert!(
        rest.len() > 30_000_000,
        "the first export ran to its end: {} bytes",
        rest.len()
    );
    let again = with_key(&s, Some(&busy), "GET", export, "");
    assert_eq!(again.status, 200, "{}", again.text());
}

#[test]
fn webhooks_may_not_reach_internal_addresses_unless_allowed() {
    let s = Server::start(RULES, &[]);
    for url in [
        "http://169.254.169.254/latest/meta-data",
        "http://127.0.0.1:9/x",
        "http://localhost:9/x",
        "http://10.0.0.5:9200/",
        "http://[::ffff:169.254.169.254]/",
    ] {
        let body = json!({"url": url, "secret": "0123456789abcdef"}).to_string();
        let r = s.send("POST", "/v1/webhooks", &body);
        assert_eq!(r.status, 400, "{url}: {}", r.text());
        assert!(r.text().contains("allow_targets"), "{url}: {}", r.text());
    }
    drop(s);
    let dir = TempDir::new("access");
    let config = dir.path().join("settings.toml");
    std::fs::write(&config, "[webhooks]\nallow_targets = [\"127.0.0.1\"]\n").unwrap();
    let s = Server::start_in(dir, RULES, &["--config", config.to_str().unwrap()]);
    let ok = json!({"url": "http://127.0.0.1:9/x", "secret": "0123456789abcdef", "name": "vip"}).to_string();
    let made = s.send("POST", "/v1/webhooks", &ok);
    assert_eq!(made.status, 201, "{}", made.text());
    let id = made.json()["id"].as_u64().unwrap();
    let metadata = json!({"url": "http://169.254.169.254/", "secret": "0123456789abcdef"}).to_string();
    assert_eq!(s.send("POST", "/v1/webhooks", &metadata).status, 400);
    // Deleting the segment deletes its webhooks.
    s.send("PUT", "/v1/rules", "tag buyer = count(payment, 30d) >= 1\n");
    let put = s.send("PUT", "/v1/segments/vip", r#"{"expr": "buyer"}"#);
    assert_eq!(put.status, 200, "{}", put.text());
    let deleted = s.send("DELETE", "/v1/segments/vip", "");
    assert_eq!(
        deleted.json()["webhooks_deleted"],
        json!([id]),
        "{}",
        deleted.text()
    );
    let list: Value = s.get("/v1/webhooks").json();
    assert_eq!(list["webhooks"], json!([]));
}

#[test]
fn an_open_node_refuses_a_non_loopback_address_unless_told() {
    let dir = TempDir::new("access");
    let data = dir.path().join("data");
    let out = tagstream(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve") && stderr.contains("keys create"),
        "{stderr}"
    );
    // A key made by `keys generate`, given as the bootstrap key file: served, as admin.
    let generated = tagstream(&["keys", "generate"]);
    let boot = String::from_utf8(generated.stdout).unwrap().trim().to_owned();
    let key_file = dir.path().join("admin.key");
    std::fs::write(&key_file, format!("{boot}\n")).unwrap();
    let s = Server::restart(
        dir,
        &[
            "--listen",
            "0.0.0.0:0",
            "--bootstrap-key-file",
            key_file.to_str().unwrap(),
        ],
    );
    let port = s.addr.rsplit(':').next().unwrap().to_owned();
    let local = format!("127.0.0.1:{port}");
    assert_eq!(
        tests::http::request(&local, "GET", "/v1/admin/keys", b"").status,
        401
    );
    let auth = format!("Bearer {boot}");
    let keys = request_with(&local, "GET", "/v1/admin/keys", &[("Authorization", &auth)], b"");
    assert_eq!(keys.status, 200, "{}", keys.text());
    assert_eq!(keys.json()["keys"][0]["name"], "bootstrap");
    let dir = stop(s);
    // With a key, the same address is served (authentication on).
    create_key(&data, "admin", "ops");
    let s = Server::restart(dir, &["--listen", "0.0.0.0:0"]);
    let port = s.addr.rsplit(':').next().unwrap();
    let r = tests::http::request(&format!("127.0.0.1:{port}"), "GET", "/v1/segments", b"");
    assert_eq!(r.status, 401);
}

/// One field policy applied on every output path: customer views, timelines, explain,
/// segment queries, members in all four formats, SQL, the change log, deltas, SSE streams and
/// webhook deliveries.
#[test]
fn masking_applies_on_every_output_path() {
    use arrow_array::{Array, StringArray};
    let dir = TempDir::new("access");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.path().join("settings.toml");
    std::fs::write(
        &config,
        r#"
[access.fields]
phone = "mask"
openid = "hide"

[access.roles.reader]
fields = { customer_id = "mask" }

[access.roles.support]
permissions = ["customers_read"]
fields = { phone = "show" }

[access.roles.analyst]
permissions = ["segments_read", "members_export", "sql_query", "changes_read", "webhooks_manage"]
fields = { customer_id = "mask" }
"#,
    )
    .unwrap();
    let with = ["--config", config.to_str().unwrap()];
    let reader = create_key_with(&data, "reader", "marketing", &with);
    let support = create_key_with(&data, "support", "helpdesk", &with);
    let analyst = create_key_with(&data, "analyst", "bi", &with);
    let ingest = create_key_with(&data, "ingest", "shop", &with);
    let rules = "tag buyer = count(payment, 30d) >= 1\ntag mobile = profile.phone starts_with \"138\"\n";
    let s = Server::start_in(
        dir,
        rules,
        &[
            "--config",
            config.to_str().unwrap(),
            "--webhook-allow",
            "127.0.0.1",
        ],
    );
    // A receiver for the analyst's webhook: it keeps every body it is sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            stream
                .set_read_timeout(Some(std::time::Duration::from_millis(300)))
                .unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
            }
            kept.lock().unwrap().push_str(&String::from_utf8_lossy(&raw));
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let analyst_key = analyst.clone();
    let analyst = Some(analyst.as_str());
    let made = with_key(
        &s,
        analyst,
        "POST",
        "/v1/webhooks",
        &json!({"url": hook, "secret": "0123456789abcdef", "name": "buyer", "after": 0}).to_string(),
    );
    assert_eq!(made.status, 201, "{}", made.text());

    let event = r#"{"customer_id":"13800000001","type":"payment","ts":1744000000000,"event_id":"e1","props":{"amount":5},"profile":{"phone":"13800000001","openid":"o-secret-1","level":"gold"}}"#;
    let r = with_key(&s, Some(&ingest), "POST", "/v1/events", event);
    assert_eq!(r.json()["accepted"], 1, "{}", r.text());
    let id = "13800000001";
    let masked = "138****0001";

    // Customer view: the reader sees the id and phone masked, never the openid.
    let view = with_key(&s, Some(&reader), "GET", &format!("/v1/customers/{id}"), "").json();
    assert_eq!(view["customer_id"], masked);
    assert_eq!(view["profile"]["phone"], masked);
    assert_eq!(view["profile"]["level"], "gold");
    assert!(view["profile"].get("openid").is_none(), "{view}");
    // The support role shows the phone (its own policy) but still not the openid.
    let view = with_key(&s, Some(&support), "GET", &format!("/v1/customers/{id}"), "").json();
    assert_eq!(view["customer_id"], id);
    assert_eq!(view["profile"]["phone"], id);
    assert!(view["profile"].get("openid").is_none(), "{view}");
    // Timeline and explain.
    let timeline = with_key(
        &s,
        Some(&reader),
        "GET",
        &format!("/v1/customers/{id}/events"),
        "",
    )
    .json();
    assert_eq!(timeline["customer_id"], masked);
    let explained = with_key(
        &s,
        Some(&reader),
        "GET",
        &format!("/v1/customers/{id}/explain/mobile"),
        "",
    );
    assert!(
        explained.text().contains(masked) && !explained.text().contains(id),
        "{}",
        explained.text()
    );
    // Segment query.
    let q = with_key(
        &s,
        Some(&reader),
        "POST",
        "/v1/segments/query",
        r#"{"expr": "buyer"}"#,
    )
    .json();
    assert_eq!(q["customers"], json!([masked]));

    // Members, in every format.
    let ndjson = with_key(
        &s,
        analyst,
        "GET",
        "/v1/segments/buyer/members?fields=profile.phone",
        "",
    );
    assert_eq!(
        ndjson.json(),
        json!({"customer_id": masked, "profile.phone": masked}),
        "{}",
        ndjson.text()
    );
    let csv = with_key(
        &s,
        analyst,
        "GET",
        "/v1/segments/buyer/members?format=csv&fields=profile.phone",
        "",
    );
    assert_eq!(
        csv.text(),
        format!("customer_id,profile.phone\n{masked},{masked}\n")
    );
    let hidden = with_key(
        &s,
        analyst,
        "GET",
        "/v1/segments/buyer/members?fields=profile.openid",
        "",
    );
    assert_eq!(hidden.status, 403, "{}", hidden.text());
    let strings = |batches: &[arrow_array::RecordBatch], name: &str| -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| {
                let col = b.column_by_name(name).unwrap();
                let col = col.as_any().downcast_ref::<StringArray>().unwrap();
                (0..col.len())
                    .map(|i| col.value(i).to_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let arrow = with_key(
        &s,
        analyst,
        "GET",
        "/v1/segments/buyer/members?format=arrow&fields=profile.phone",
        "",
    );
    let batches = tests::exports::arrow_batches(&arrow.body);
    assert_eq!(strings(&batches, "customer_id"), [masked]);
    assert_eq!(strings(&batches, "profile.phone"), [masked]);
    let parquet = with_key(
        &s,
        analyst,
        "GET",
        "/v1/segments/buyer/members?format=parquet&fields=profile.phone",
        "",
    );
    let batches = tests::exports::parquet_batches(&parquet.body);
    assert_eq!(strings(&batches, "customer_id"), [masked]);
    assert_eq!(strings(&batches, "profile.phone"), [masked]);
    // A customer who arrives after a masked export is in the next one, masked too (ids are
    // masked once per customer and kept), whatever its characters.
    let second = r#"{"customer_id":"上海某某贸易有限公司","type":"payment","ts":1744000001000,"event_id":"e2","props":{"amount":5}}"#;
    let r = with_key(&s, Some(&ingest), "POST", "/v1/events", second);
    assert_eq!(r.json()["accepted"], 1, "{}", r.text());
    let second_masked = "上海某***有限公司";
    for format in ["parquet", "csv"] {
        let export = with_key(
            &s,
            analyst,
            "GET",
            &format!("/v1/segments/buyer/members?format={format}&fields=profile.level"),
            "",
        );
        assert_eq!(export.status, 200, "{}", export.text());
        let ids = if format == "csv" {
            export
                .text()
                .lines()
                .skip(1)
                .map(|l| l.split(',').next().unwrap().to_owned())
                .collect()
        } else {
            strings(&tests::exports::parquet_batches(&export.body), "customer_id")
        };
        assert_eq!(ids, [masked, second_masked], "{format}");
    }

    // SQL: masked before the statement runs; the hidden attribute is no column at all.
    let sql = with_key(
        &s,
        analyst,
        "POST",
        "/v1/sql",
        r#"{"sql": "SELECT customer_id, \"profile.phone\" FROM customers"}"#,
    );
    assert!(
        sql.text().contains(masked) && !sql.text().contains(id),
        "{}",
        sql.text()
    );
    let openid = with_key(
        &s,
        analyst,
        "POST",
        "/v1/sql",
        r#"{"sql": "SELECT \"profile.openid\" FROM customers"}"#,
    );
    assert_eq!(openid.status, 400, "{}", openid.text());
    let changes_sql = with_key(
        &s,
        analyst,
        "POST",
        "/v1/sql",
        r#"{"sql": "SELECT customer_id FROM changes"}"#,
    );
    assert!(
        changes_sql.text().contains(masked) && !changes_sql.text().contains(id),
        "{}",
        changes_sql.text()
    );

    // The change log, deltas and the SSE stream.
    let changes = with_key(&s, analyst, "GET", "/v1/changes?after=0", "");
    assert!(
        changes.text().contains(masked) && !changes.text().contains(id),
        "{}",
        changes.text()
    );
    let delta = with_key(&s, analyst, "GET", "/v1/segments/buyer/delta?after=0", "").json();
    assert_eq!(delta["entered"], json!([masked, second_masked]));
    let stream = stream_head(&s.addr, &analyst_key, "/v1/segments/buyer/stream?after=0");
    assert!(stream.contains(masked) && !stream.contains(id), "{stream}");

    // The webhook delivers as its creator's role sees data.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !bodies.lock().unwrap().contains("\"changes\"") {
        assert!(std::time::Instant::now() < deadline, "no delivery");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let delivered = bodies.lock().unwrap().clone();
    assert!(
        delivered.contains(masked) && !delivered.contains(id),
        "{delivered}"
    );
}

/// The first bytes of an SSE stream (read for half a second).
fn stream_head(addr: &str, key: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Editors racing on the same version: exactly one change is applied, every other one is
/// refused as stale, and the versions record only the one.
#[test]
fn concurrent_edits_of_one_version_apply_exactly_one() {
    let s = Server::start(RULES, &[]);
    let addr = s.addr.clone();
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let addr = addr.clone();
                scope.spawn(move || {
                    let body = format!(r#"{{"expr": "buyer and profile.level == \"l{i}\""}}"#);
                    request_with(
                        &addr,
                        "PUT",
                        &format!("/v1/segments/s{i}"),
                        &[("If-Match", "\"1\"")],
                        body.as_bytes(),
                    )
                    .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answers.iter().filter(|s| **s == 200).count(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|s| **s == 409).count(), 7, "{answers:?}");
    let versions = s.get("/v1/rules/versions").json();
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2, "{versions}");
    let text = s.get("/v1/rules").text();
    assert_eq!(text.matches("segment s").count(), 1, "{text}");
}

#[test]
fn merges_by_hand_need_their_permission_name_the_key_and_identifiers_are_masked() {
    let dir = TempDir::new("access");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.path().join("settings.toml");
    std::fs::write(
        &config,
        "[access.fields]\nphone = \"mask\"\n\n[access.roles.reader]\nfields = { customer_id = \"mask\" }\n",
    )
    .unwrap();
    let with = ["--config", config.to_str().unwrap()];
    let staff = create_key_with(&data, "editor", "crm-staff", &with);
    let marketing = create_key_with(&data, "reader", "marketing", &with);
    let shop = create_key_with(&data, "ingest", "shop", &with);
    let s = Server::start_in(dir, RULES, &with);
    let events = r#"{"type":"payment","ts":1744000000000,"ids":{"phone":"13800000001"}}
{"customer_id":"crm-7","type":"view","ts":1744000000001,"ids":{"email":"Ann@Example.com"}}"#;
    let r = with_key(&s, Some(&shop), "POST", "/v1/events", events);
    assert_eq!(r.json()["accepted"], 2, "{}", r.text());

    // A reader finds the customer by phone, but sees it (and the id) masked.
    let r = with_key(
        &s,
        Some(&marketing),
        "GET",
        "/v1/customers/by/phone/13800000001",
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    let phone = seen["identifiers"]["phone"][0].as_str().unwrap();
    assert_ne!(phone, "13800000001");
    assert_ne!(seen["customer_id"], "phone:13800000001");
    // Merging is not a reader's to do; the CRM staff's merge is recorded under their key.
    let body = r#"{"ids":["phone:13800000001"]}"#;
    assert_eq!(
        with_key(&s, Some(&marketing), "POST", "/v1/customers/crm-7/merge", body).status,
        403
    );
    let r = with_key(&s, Some(&staff), "POST", "/v1/customers/crm-7/merge", body);
    assert_eq!(r.status, 200, "{}", r.text());
    let changes = r.json()["changes"].as_array().unwrap().clone();
    assert!(
        changes.iter().all(|c| c["cause"] == "manual:crm-staff"),
        "{changes:?}"
    );
    assert_eq!(changes[0]["op"], "merge");
    let r = with_key(&s, Some(&marketing), "POST", "/v1/customers/crm-7/unmerge", body);
    assert_eq!(r.status, 403);
    let merged = with_key(&s, Some(&staff), "GET", "/v1/customers/crm-7", "").json();
    assert_eq!(merged["identifiers"]["email"], json!(["ann@example.com"]));
    assert_eq!(merged["identifiers"]["phone"].as_array().unwrap().len(), 1);
}
