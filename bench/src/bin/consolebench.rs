//! Count latency in the console (issue #22): a real headless Chromium types segment
//! expressions into the console's segment builder, key by key at a person's pace, against a
//! running `tagstream serve`, and reads back the console's own User Timing measures
//! (`tagstream:count`: from the keystroke that made an expression to its count on screen).
//! Prints p50 / p95 / max over every count shown.
//!
//! ```text
//! consolebench --url http://127.0.0.1:8080/ [--key KEY] [--rounds 3] [--key-gap-ms 150]
//!              EXPRESSION...
//! ```
//!
//! Needs `chromedriver` and `chromium` (`TAGSTREAM_CHROMEDRIVER`, `TAGSTREAM_CHROMIUM`
//! override `/usr/bin/...`), as the console's browser tests do.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

struct Args {
    url: String,
    key: Option<String>,
    rounds: usize,
    key_gap: Duration,
    expressions: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: "http://127.0.0.1:8080/".into(),
        key: None,
        rounds: 3,
        key_gap: Duration::from_millis(150),
        expressions: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if !arg.starts_with("--") {
            args.expressions.push(arg);
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{arg} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{arg}: not a number: {value}"))
        };
        match arg.as_str() {
            "--url" => args.url = value.clone(),
            "--key" => args.key = Some(value.clone()),
            "--rounds" => args.rounds = number()?.max(1) as usize,
            "--key-gap-ms" => args.key_gap = Duration::from_millis(number()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.expressions.is_empty() {
        return Err("give at least one expression to type".into());
    }
    Ok(args)
}

/// chromedriver on a free port, killed on drop.
struct Driver(Child, u16);

impl Driver {
    fn start() -> Driver {
        let binary =
            std::env::var("TAGSTREAM_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver(child, port)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(port: u16) -> Client {
    let chromium = std::env::var("TAGSTREAM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let profile = std::env::temp_dir().join(format!("consolebench-{}", std::process::id()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--window-size=1280,800",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session")
}

/// The durations (ms) of the console's count measures so far.
async fn measures(c: &Client) -> Vec<f64> {
    let got = c
        .execute(
            "return performance.getEntriesByName('tagstream:count').map(e => e.duration)",
            vec![],
        )
        .await
        .expect("read the measures");
    got.as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default()
}

async fn run(args: &Args, c: &Client) -> Vec<f64> {
    c.goto(&args.url).await.expect("open the console");
    if let Some(key) = &args.key {
        let field = c
            .wait()
            .for_element(Locator::Css("#api-key"))
            .await
            .expect("login");
        field.send_keys(key).await.unwrap();
        c.find(Locator::Css("#login"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }
    let input = c
        .wait()
        .for_element(Locator::Css("#expression"))
        .await
        .expect("the segment builder");
    for round in 0..args.rounds {
        for expr in &args.expressions {
            input.clear().await.unwrap();
            for ch in expr.chars() {
                input.send_keys(&ch.to_string()).await.unwrap();
                tokio::time::sleep(args.key_gap).await;
            }
            // The last count lands: no new measure for a while.
            let mut seen = measures(c).await.len();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = measures(c).await.len();
                if now == seen {
                    break;
                }
                seen = now;
            }
            let count = c
                .find(Locator::Css("#count"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            eprintln!("round {round}: {expr} → {count}");
        }
    }
    measures(c).await
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("consolebench: {e}");
        std::process::exit(2);
    });
    let driver = Driver::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut ms = runtime.block_on(async {
        let c = browser(driver.1).await;
        let ms = run(&args, &c).await;
        c.close().await.unwrap();
        ms
    });
    assert!(!ms.is_empty(), "no count was shown");
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    println!(
        "counts shown: {}, keystroke → count p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        ms.len(),
        at(0.50),
        at(0.95),
        ms[ms.len() - 1]
    );
}
