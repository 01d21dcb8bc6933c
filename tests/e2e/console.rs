//! The console in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
//! `./scripts/test-all.sh` installs; driven over WebDriver with fantoccini) against a real
//! `tagstream serve`: log in with a key, build a segment and watch its exact count follow the
//! expression, see a diagnostic underlined, save it, open a customer and ask why it has a
//! tag, watch the live view count events, switch to Chinese; and a key whose role may not
//! query segments is told so. The tags-and-rules page: definitions with members and
//! enters/exits per hour, a typo underlined, a change previewed, applied and backfilled.
//! With `TAGSTREAM_SCREENSHOTS=docs/console` the tests also take the screenshots the README
//! shows.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use support::Server;
use tests::http::{request_with, Response};
use tests::TempDir;

#[allow(dead_code)]
#[path = "support/server.rs"]
mod support;

const RULES: &str =
    "tag buyer = count(payment, 30d) >= 1\nsegment vip = buyer and profile.level == \"gold\"\n";

fn create_key(data: &std::path::Path, role: &str, name: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tagstream"))
        .args(["keys", "create", "--role", role, "--name", name, "--data-dir"])
        .arg(data)
        .env("TAGSTREAM_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn post(s: &Server, key: &str, path: &str, body: &str) -> Response {
    let auth = format!("Bearer {key}");
    request_with(
        &s.addr,
        "POST",
        path,
        &[("Authorization", &auth)],
        body.as_bytes(),
    )
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let binary =
            std::env::var("TAGSTREAM_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        assert!(
            std::path::Path::new(&binary).exists(),
            "no chromedriver at {binary}: ./scripts/test-all.sh installs chromium and chromium-driver"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let chromium = std::env::var("TAGSTREAM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1280,800",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session")
}

/// Waits until the element's text satisfies `ok`; returns it.
async fn text_until(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(text) = e.text().await {
                if ok(&text) {
                    return text;
                }
                last = text;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let error = match c.find(Locator::Css(".error, #diagnostics")).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    panic!("{css}: still `{last}` (the page says: `{error}`)");
}

/// Empties the field as a person would (an `input` event the page sees: WebDriver's own
/// clear fires none, so a re-render could put the old text back under the new keys), then
/// types `text`.
async fn type_into(c: &Client, css: &str, text: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    let element = serde_json::to_value(&e).unwrap();
    c.execute(
        "arguments[0].value = ''; arguments[0].dispatchEvent(new Event('input', { bubbles: true }));",
        vec![element],
    )
    .await
    .unwrap();
    e.send_keys(text).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css)).await.unwrap().click().await.unwrap();
}

/// Opens `url` (the login form shows while no key is held) and logs in with `key`.
async fn log_in(c: &Client, url: &str, key: &str) {
    c.goto(url).await.unwrap();
    c.wait().for_element(Locator::Css("#api-key")).await.unwrap();
    type_into(c, "#api-key", key).await;
    click(c, "#login").await;
}

/// A server with an editor and an ingest key (returned in that order) holding `customers`
/// customers: c0..c29 bought (c0..c9 gold, the others silver), the rest only viewed.
fn started(name: &str, customers: u64) -> (Server, String, String) {
    let (s, editor, ingest, _) = started_with_admin(name, customers);
    (s, editor, ingest)
}

/// [`started`], with an admin key as well.
fn started_with_admin(name: &str, customers: u64) -> (Server, String, String, String) {
    let dir = TempDir::new(name);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let editor = create_key(&data, "editor", "marketer");
    let ingest = create_key(&data, "ingest", "loader");
    let admin = create_key(&data, "admin", "it");
    let s = Server::start_in(dir, RULES, &[]);
    let events: Vec<String> = (0..customers)
        .map(|n| {
            let kind = if n < 30 { "payment" } else { "view" };
            let level = if n < 10 { "gold" } else { "silver" };
            format!(
                r#"{{"customer_id":"c{n}","type":"{kind}","ts":{},"props":{{"amount":10}},"profile":{{"level":"{level}"}}}}"#,
                1_744_000_000_000u64 + n
            )
        })
        .collect();
    assert_eq!(
        post(&s, &ingest, "/v1/events", &events.join("\n")).json()["accepted"],
        customers
    );
    (s, editor, ingest, admin)
}

/// Asserts that the page fits a laptop's window (the browser's is 1280×800): nothing
/// reaches past its right edge, so nothing needs a sideways scroll.
async fn fits_the_window(c: &Client, page: &str) {
    let widths = c
        .execute(
            "const d = document.documentElement; return [d.scrollWidth, d.clientWidth];",
            vec![],
        )
        .await
        .unwrap();
    let (scroll, client) = (widths[0].as_u64().unwrap(), widths[1].as_u64().unwrap());
    assert!(
        scroll <= client,
        "{page}: {scroll} px wide in a {client}-px window"
    );
}

/// Makes the page keep every file it hands to the browser as a download, to be read back
/// with [`downloaded`].
async fn keep_downloads(c: &Client) {
    c.execute(
        "window.__downloads = []; const make = URL.createObjectURL; \
         URL.createObjectURL = (blob) => { window.__downloads.push(blob); return make(blob); };",
        vec![],
    )
    .await
    .unwrap();
}

/// The text of the `n`th file downloaded since [`keep_downloads`], once there is one.
async fn downloaded(c: &Client, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let count = c
            .execute("return window.__downloads.length;", vec![])
            .await
            .unwrap();
        if count.as_u64().unwrap() as usize > n {
            break;
        }
        assert!(Instant::now() < deadline, "no download {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = c
        .execute_async(
            "const done = arguments[arguments.length - 1]; window.__downloads[arguments[0]].text().then(done);",
            vec![serde_json::json!(n)],
        )
        .await
        .unwrap();
    text.as_str().unwrap().to_owned()
}

/// Runs `f` with a WebDriver session of a fresh headless Chromium.
fn in_browser(f: impl AsyncFnOnce(Client)) {
    let profile = TempDir::new("chromium-profile");
    let driver = Driver::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let c = browser(&driver, profile.path()).await;
        f(c).await
    });
}

#[test]
fn the_console_builds_segments_with_exact_counts_explains_customers_and_shows_the_engine_live() {
    let (s, editor, ingest) = started("console", 35);
    in_browser(async |c: Client| {
        log_in(&c, &format!("http://{}/", s.addr), &editor).await;

        // Built by clicking the pickers: the count shown is the API's for the same text.
        c.wait().for_element(Locator::Css("#expression")).await.unwrap();
        let chip = |text: &str| format!("//button[contains(@class, 'chip') and normalize-space(.)='{text}']");
        let click_chip = async |text: &str| {
            let button = c.wait().for_element(Locator::XPath(&chip(text))).await.unwrap();
            button.click().await.unwrap();
        };
        click_chip("buyer").await;
        text_until(&c, "#count", |t| t == "30").await;
        click_chip("profile.level").await;
        let built = c
            .find(Locator::Css("#expression"))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(built, "buyer and has(profile.level)");
        let body = serde_json::json!({ "expr": built }).to_string();
        let api_count = post(&s, &editor, "/v1/segments/query", &body).json()["count"]
            .as_u64()
            .unwrap();
        assert_eq!(api_count, 30);
        let shown = api_count.to_string();
        text_until(&c, "#count", |t| t == shown).await;

        // The exact count follows the expression as it is typed.
        type_into(&c, "#expression", "buyer").await;
        text_until(&c, "#count", |t| t == "30").await;
        type_into(&c, "#expression", "buyer and profile.level == \"gold\"").await;
        text_until(&c, "#count", |t| t == "10").await;
        text_until(&c, "#sample", |t| t.contains("c0")).await;
        // Overlap with another segment.
        click(&c, "#overlap option[value='vip']").await;
        text_until(&c, "#overlap-count", |t| t.trim() == "10").await;
        screenshot(&c, "segments").await;
        fits_the_window(&c, "segments").await;
        // A mistake is underlined where it is.
        type_into(&c, "#expression", "buyer and profile.level ==").await;
        let diagnostic = text_until(&c, "#diagnostics", |t| t.contains("1:")).await;
        assert!(diagnostic.contains("buyer and profile.level =="), "{diagnostic}");
        // Saved as a segment: the rule set's next version.
        type_into(&c, "#expression", "buyer and not vip").await;
        text_until(&c, "#count", |t| t == "20").await;
        type_into(&c, "#save-name", "buyers_not_vip").await;
        click(&c, "#save").await;
        text_until(&c, "#saved", |t| t.contains('2')).await;
        // Listed with the rule set's tags and segments from then on.
        c.wait()
            .for_element(Locator::XPath(&chip("buyers_not_vip")))
            .await
            .unwrap();

        // A customer, and why it has a tag.
        c.goto(&format!("http://{}/#/customers/c3", s.addr))
            .await
            .unwrap();
        text_until(&c, "#customer-id", |t| t == "c3").await;
        text_until(&c, "#customer-tags", |t| t.contains("buyer")).await;
        text_until(&c, "#customer-profile", |t| t.contains("gold")).await;
        click(&c, "#customer-tags button.why").await;
        text_until(&c, "#explain", |t| t.contains("count(payment, 30d)")).await;
        screenshot(&c, "customer").await;
        fits_the_window(&c, "customer").await;

        // The live view counts what arrives.
        click(&c, "#nav-live").await;
        let feeding = std::thread::spawn({
            let (addr, ingest) = (s.addr.clone(), ingest.clone());
            move || {
                for round in 0..40u64 {
                    let line = format!(
                        r#"{{"customer_id":"live{round}","type":"view","ts":{}}}"#,
                        1_744_100_000_000u64 + round
                    );
                    let auth = format!("Bearer {ingest}");
                    request_with(
                        &addr,
                        "POST",
                        "/v1/events",
                        &[("Authorization", &auth)],
                        line.as_bytes(),
                    );
                    std::thread::sleep(Duration::from_millis(150));
                }
            }
        });
        text_until(&c, "#events-rate", |t| t.parse::<u64>().is_ok_and(|n| n > 0)).await;
        feeding.join().unwrap();
        screenshot(&c, "live").await;
        fits_the_window(&c, "live").await;

        // 中文.
        click(&c, "#lang").await;
        text_until(&c, "#nav-segments", |t| t == "人群圈选").await;
        click(&c, "#lang").await;
        text_until(&c, "#nav-segments", |t| t == "Segment builder").await;

        // A key whose role may not query segments is told so, and sees no count.
        click(&c, "#logout").await;
        log_in(&c, &format!("http://{}/#/segments", s.addr), &ingest).await;
        c.wait().for_element(Locator::Css("#expression")).await.unwrap();
        type_into(&c, "#expression", "buyer").await;
        text_until(&c, ".error", |t| t.contains("may not")).await;
        text_until(&c, "#count", |t| t == "–").await;
        // A wrong key is refused at the login.
        click(&c, "#logout").await;
        log_in(&c, &format!("http://{}/", s.addr), "tsk_AAAAAAAAAA_wrong").await;
        text_until(&c, ".login .error", |t| !t.is_empty()).await;
        c.close().await.unwrap();
    });
}

/// Saves a screenshot of the page as `docs/console/NAME.png` when `TAGSTREAM_SCREENSHOTS`
/// names the directory to write to (how the README's screenshots are taken).
async fn screenshot(c: &Client, name: &str) {
    if let Ok(dir) = std::env::var("TAGSTREAM_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

#[test]
fn the_console_lists_the_rules_by_tag_previews_a_change_and_applies_it() {
    let (s, editor, _) = started("console-rules", 30);
    in_browser(async |c: Client| {
        log_in(&c, &format!("http://{}/#/rules", s.addr), &editor).await;

        // Every definition with its members and its enters per hour.
        let members = |name: &str| format!("tr.definition[data-name='{name}'] td.members");
        text_until(&c, &members("buyer"), |t| t == "30").await;
        text_until(&c, &members("vip"), |t| t == "10").await;
        let entered = c
            .find(Locator::Css("tr.definition[data-name='buyer'] polyline.entered"))
            .await
            .unwrap();
        let points = entered.attr("points").await.unwrap().unwrap_or_default();
        assert!(
            points.split(' ').any(|p| p.ends_with(",2")),
            "a full-height hour: {points}"
        );
        click(&c, "tr.definition[data-name='vip']").await;
        text_until(&c, ".source", |t| t.contains("profile.level == \"gold\"")).await;
        screenshot(&c, "rules").await;
        fits_the_window(&c, "rules").await;

        // A typo is underlined where it is; nothing can be applied.
        type_into(&c, "#rules-text", "tag buyer = count(payment, 30d) >=\n").await;
        click(&c, "#rules-preview").await;
        let diagnostic = text_until(&c, "#diagnostics", |t| t.contains("1:")).await;
        assert!(diagnostic.contains("count(payment, 30d)"), "{diagnostic}");
        assert!(!c
            .find(Locator::Css("#rules-apply"))
            .await
            .unwrap()
            .is_enabled()
            .await
            .unwrap());

        // Silver instead of gold: 20 would enter vip and 10 would leave it.
        let silver = RULES.replace("gold", "silver");
        type_into(&c, "#rules-text", &silver).await;
        click(&c, "#rules-preview").await;
        text_until(&c, "#preview-enter", |t| t == "20").await;
        text_until(&c, "#preview-exit", |t| t == "10").await;
        screenshot(&c, "rules-preview").await;
        fits_the_window(&c, "rules-preview").await;
        click(&c, "#rules-apply").await;
        text_until(&c, "#backfill-done", |t| !t.is_empty()).await;
        text_until(&c, &members("vip"), |t| t == "20").await;
        c.close().await.unwrap();
    });
    // Applied as the rule set's next version, with the previewed outcome.
    let auth = format!("Bearer {editor}");
    let rules = request_with(&s.addr, "GET", "/v1/rules", &[("Authorization", &auth)], b"");
    assert!(rules.text().contains("silver"), "{}", rules.text());
    let vip = request_with(
        &s.addr,
        "POST",
        "/v1/segments/query",
        &[("Authorization", &auth)],
        br#"{"expr":"vip"}"#,
    );
    assert_eq!(vip.json()["count"], 20);
}

/// A saved segment is exported from the builder as CSV and as Parquet: the file the browser
/// gets is the API's export. A key whose role may not export is told so.
#[test]
fn the_console_exports_a_saved_segment_as_its_role_allows() {
    let (s, editor, _, admin) = started_with_admin("console-export", 35);
    in_browser(async |c: Client| {
        let url = format!("http://{}/#/segments", s.addr);
        let export = |format: &str| format!("//button[normalize-space(.)='Export {format}']");
        let click_export = async |format: &str| {
            let button = c.find(Locator::XPath(&export(format))).await.unwrap();
            button.click().await.unwrap();
        };
        // Logged in with `key`: `expr` counted and saved as `name`, the rule set's `version`;
        // then its CSV export clicked.
        let save_and_export = async |key: &str, expr: &str, count: &str, name: &str, version: char| {
            log_in(&c, &url, key).await;
            c.wait().for_element(Locator::Css("#expression")).await.unwrap();
            type_into(&c, "#expression", expr).await;
            text_until(&c, "#count", |t| t == count).await;
            type_into(&c, "#save-name", name).await;
            click(&c, "#save").await;
            text_until(&c, "#saved", |t| t.contains(version)).await;
            keep_downloads(&c).await;
            click_export("CSV").await;
        };
        save_and_export(&admin, "buyer and not vip", "20", "buyers_not_vip", '2').await;
        let csv = downloaded(&c, 0).await;
        let auth = format!("Bearer {admin}");
        let api = request_with(
            &s.addr,
            "GET",
            "/v1/segments/buyers_not_vip/members?format=csv",
            &[("Authorization", &auth)],
            b"",
        );
        assert_eq!(api.status, 200);
        assert_eq!(csv, api.text());
        assert_eq!(csv.lines().count(), 21, "a header and 20 customers: {csv}");
        click_export("Parquet").await;
        let parquet = downloaded(&c, 1).await;
        assert!(
            parquet.starts_with("PAR1") && parquet.ends_with("PAR1"),
            "a Parquet file"
        );

        // The editor may save segments but not export their members.
        click(&c, "#logout").await;
        save_and_export(&editor, "buyer and vip", "10", "vip_buyers", '3').await;
        text_until(&c, ".error", |t| t.contains("may not")).await;
        let count = c
            .execute("return window.__downloads.length;", vec![])
            .await
            .unwrap();
        assert_eq!(count, 0, "nothing downloaded");
        c.close().await.unwrap();
    });
}
