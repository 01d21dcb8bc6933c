//! Observability that is tested, not just shipped: a real Prometheus (Debian's package,
//! installed by scripts/test-all.sh) scrapes a running `tagstream serve` that consumes from a
//! real Kafka-protocol broker, fires timers in wall clock mode, delivers a webhook and
//! rejects an event; promtool checks the shipped Prometheus config and alert rules and runs
//! their unit tests; and every panel query of the shipped Grafana dashboard is evaluated
//! against that Prometheus: each must return data, so no panel reads a metric that does not
//! exist.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::http::request;
use tests::{repo_root, TempDir};

#[path = "support/broker.rs"]
mod broker;
use broker::{free_port, Broker};

/// A tool from Debian's `prometheus` package: `TAGSTREAM_PROMETHEUS_BIN` (a directory) or PATH.
fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("TAGSTREAM_PROMETHEUS_BIN").map(PathBuf::from);
    let found = dir
        .map(|d| d.join(name))
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .find(|f| f.is_file())
            })
        })
        .filter(|f| f.is_file());
    found.unwrap_or_else(|| {
        panic!("no `{name}`: run ./scripts/test-all.sh, which installs Debian's prometheus package")
    })
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn promtool(args: &[&str], dir: &Path) {
    let out = Command::new(tool("promtool"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Answers 200 to every request (a webhook receiver), until the test ends.
fn receiver() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        let mut body = vec![0; length];
                        let _ = reader.read_exact(&mut body);
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                        length = 0;
                    }
                }
            });
        }
    });
    port
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn every_dashboard_panel_returns_data_from_a_real_prometheus_and_the_alerts_hold() {
    let deploy = repo_root().join("deploy");
    // The shipped alert rules: valid, and each fires on the series it should (unit tests).
    promtool(&["check", "rules", "alerts.yml"], &deploy.join("prometheus"));
    promtool(&["test", "rules", "alerts_test.yml"], &deploy.join("prometheus"));
    promtool(
        &["check", "config", "--syntax-only", "prometheus.yml"],
        &deploy.join("prometheus"),
    );

    let broker = Broker::start();
    broker.create_topic("events", 3);
    let dir = TempDir::new("observability");
    let rules = dir.path().join("rules.trl");
    std::fs::write(
        &rules,
        "tag pinged = count(ping, 1s) >= 1\ntag buyer on payment ttl 2s\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tagstream"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--rules")
        .arg(&rules)
        .args([
            "--clock",
            "wall",
            "--listen",
            "127.0.0.1:0",
            "--sync-writes",
            "false",
        ])
        .args(["--kafka-brokers", &broker.addr, "--kafka-topic", "events"])
        .args(["--webhook-allow", "127.0.0.1"])
        .args(["--kafka-group", &format!("observability-{}", std::process::id())])
        .env("TAGSTREAM_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tagstream serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let tagstream = Killed(child);
    let addr = line
        .trim()
        .strip_prefix("tagstream listening on http://")
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();

    let hook = format!(
        r#"{{"url": "http://127.0.0.1:{}/hook", "name": "pinged", "secret": "a-secret-of-16-bytes"}}"#,
        receiver()
    );
    assert_eq!(
        request(&addr, "POST", "/v1/webhooks", hook.as_bytes()).status,
        201
    );
    let bad = request(&addr, "POST", "/v1/events", b"{not json\n");
    assert_eq!(bad.json()["rejected"], 1);

    // Traffic while Prometheus scrapes: pings over Kafka and HTTP from new customers (each
    // tag ends by a timer a second later), payments.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, brokers, addr) = (stop.clone(), broker.addr.clone(), addr.clone());
        std::thread::spawn(move || {
            let producer = bench::kafka::producer(&brokers).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let now = wall_ms();
                let ping = format!(r#"{{"customer_id":"k{n}","type":"ping","ts":{now}}}"#);
                bench::kafka::produce(&producer, "events", &[ping]).unwrap();
                let pay =
                    format!(r#"{{"customer_id":"h{n}","type":"payment","ts":{now},"props":{{"amount":5}}}}"#);
                request(&addr, "POST", "/v1/events", pay.as_bytes());
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let prom_dir = TempDir::new("observability-prometheus");
    let prom_port = free_port();
    let config = prom_dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: tagstream\n    static_configs:\n      - targets: [\"{addr}\"]\n",
            deploy.join("prometheus/alerts.yml").display()
        ),
    )
    .unwrap();
    let prometheus = Killed(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let prom = format!("127.0.0.1:{prom_port}");
    let query = |expr: &str| -> serde_json::Value {
        let mut encoded = String::new();
        for b in expr.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        request(&prom, "GET", &format!("/api/v1/query?query={encoded}"), b"").json()
    };

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/dashboards/tagstream.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"].as_array().unwrap().iter().map(move |t| {
                (
                    p["title"].as_str().unwrap().to_owned(),
                    t["expr"].as_str().unwrap().to_owned(),
                )
            })
        })
        .collect();
    assert!(exprs.len() >= 15, "the dashboard has its panels");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut missing: Vec<String>;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        missing = exprs
            .iter()
            .filter(|(_, expr)| {
                let r = query(expr);
                r["status"] != "success" || r["data"]["result"].as_array().is_none_or(|a| a.is_empty())
            })
            .map(|(title, expr)| format!("{title}: {expr}"))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    assert!(missing.is_empty(), "panels without data:\n{}", missing.join("\n"));

    // The alert rules loaded into that Prometheus evaluate without errors against the real
    // metrics (and none fires on a healthy node).
    let rules = request(&prom, "GET", "/api/v1/rules", b"").json();
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(loaded.len(), 8);
    for rule in loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_ne!(rule["state"], "firing", "{rule}");
    }
    drop(prometheus);
    drop(tagstream);
}
