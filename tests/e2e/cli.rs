//! The `tagstream` command line, run as a user would.

use std::process::Command;

use tests::{repo_root, TempDir};

fn tagstream() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tagstream"))
}

#[test]
fn check_rules_accepts_the_example_rules_and_prints_the_plan() {
    let out = tagstream()
        .args(["check-rules", "--plan"])
        .arg(repo_root().join("deploy/rules/example.trl"))
        .output()
        .expect("run tagstream");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok, 20 definitions"), "{stdout}");
    assert!(stdout.contains("payment -> "), "{stdout}");
}

#[test]
fn check_rules_reports_every_error_and_exits_1() {
    let dir = TempDir::new("check-rules");
    let file = dir.path().join("bad.trl");
    std::fs::write(&file, "trait engagement = count(video_watch, 30d)\ntag hot = engagment >= 10\ntag x = count(app_open) >= 1\n")
        .unwrap();
    let out = tagstream()
        .arg("check-rules")
        .arg(&file)
        .output()
        .expect("run tagstream");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error[E0202]: unknown name `engagment`"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `engagement`?"), "{stderr}");
    assert!(stderr.contains("error[E0205]"), "{stderr}");
    assert!(stderr.contains("bad.trl:2:11"), "{stderr}");
    assert!(stderr.contains("2 errors in"), "{stderr}");
}

#[test]
fn check_rules_names_a_missing_file() {
    let out = tagstream()
        .args(["check-rules", "/nonexistent/rules.trl"])
        .output()
        .expect("run tagstream");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading /nonexistent/rules.trl"));
}

/// `tagstream demo` on a store: waits for its address, lets it stream for a while, stops it
/// with SIGTERM and returns what `/metrics` said just before, and its stderr.
fn demo_run(data: &std::path::Path, extra: &[&str]) -> (String, String) {
    use std::io::{BufRead, BufReader, Read};
    let mut child = tagstream()
        .arg("demo")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--rate", "400", "--customers", "200"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tagstream demo");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("tagstream listening on http://")
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();
    // Drain stdout so the demo never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let accepted = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(r#"tagstream_events_total{result="accepted"} "#))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let metrics = loop {
        let m = tests::http::request(&addr, "GET", "/metrics", b"").text();
        if accepted(&m) >= 400.0 {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo streamed nothing:\n{m}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "demo exit {exit:?}");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (metrics, stderr)
}

#[test]
fn the_demo_makes_new_events_when_run_again_on_its_kept_store() {
    let dir = TempDir::new("demo-twice");
    let data = dir.path().join("demo-data");
    let (_, first_log) = demo_run(&data, &[]);
    let (second, _) = demo_run(&data, &[]);
    let duplicates = second
        .lines()
        .find_map(|l| l.strip_prefix(r#"tagstream_events_total{result="duplicate"} "#))
        .map_or(0.0, |v| v.trim().parse::<f64>().unwrap());
    assert_eq!(
        duplicates, 0.0,
        "the second run re-sent the first run's event ids"
    );
    // Logs to a pipe carry no terminal colour codes.
    assert!(
        !first_log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{first_log}"
    );
    assert!(first_log.contains("stopped cleanly"), "{first_log}");
}

#[test]
fn json_logs_are_one_object_a_line() {
    let dir = TempDir::new("demo-json-logs");
    let (_, log) = demo_run(&dir.path().join("demo-data"), &["--log-format", "json"]);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }
}

#[test]
fn every_default_in_the_serve_help_is_the_real_default() {
    let out = tagstream().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let defaults = tagstream().arg("default-config").output().unwrap();
    let defaults = String::from_utf8_lossy(&defaults.stdout);
    let customers = defaults
        .lines()
        .find_map(|l| l.trim().strip_prefix("customers = "))
        .and_then(|v| v.split('#').next())
        .map(str::trim)
        .expect("[cache] customers in default-config");
    let shown = help
        .split("--cache-customers")
        .nth(1)
        .and_then(|s| s.split("[default: ").nth(1))
        .and_then(|s| s.split(']').next())
        .expect("--cache-customers states its default");
    assert_eq!(
        shown.replace(['_', ','], ""),
        customers.replace('_', ""),
        "{help}"
    );
}

/// `tagstream partitions`: a partition listed, exported, imported into a second store and
/// dropped from the first, on stopped stores.
#[test]
fn a_partition_moves_between_stores_with_the_command_line() {
    let conformance = tests::conformance_dir();
    let (from, to) = (
        TempDir::new("cli-partitions-from"),
        TempDir::new("cli-partitions-to"),
    );
    let rules = conformance.join("example.trl");
    let run = |args: &[&str], data: &std::path::Path| {
        let out = tagstream()
            .args(args)
            .arg("--data-dir")
            .arg(data)
            .arg("--rules")
            .arg(&rules)
            .args(["--clock", "event"])
            .output()
            .expect("run tagstream");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    let events = conformance.join("events.ndjson");
    let (ok, _, stderr) = run(
        &["replay", events.to_str().unwrap(), "--quiet", "--workers", "2"],
        from.path(),
    );
    assert!(ok, "{stderr}");
    let counts = |data: &std::path::Path| -> Vec<u64> {
        let (ok, stdout, stderr) = run(&["partitions", "list"], data);
        assert!(ok, "{stderr}");
        stdout
            .lines()
            .skip(1)
            .map(|l| l.split('\t').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    let before = counts(from.path());
    assert_eq!(before.len(), 12, "the default partition count");
    assert!(before[5] > 0);

    let file = from.path().with_extension("partition-5");
    let export = [
        "partitions",
        "export",
        "--partition",
        "5",
        "--out",
        file.to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = run(&export, from.path());
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("{} customers", before[5])), "{stdout}");
    // The file is not overwritten by a second export.
    let (ok, _, stderr) = run(&export, from.path());
    assert!(!ok && stderr.contains("creating"), "{stderr}");

    let (ok, _, stderr) = run(&["partitions", "import", file.to_str().unwrap()], to.path());
    assert!(ok, "{stderr}");
    let moved = counts(to.path());
    assert_eq!(moved[5], before[5]);
    assert_eq!(moved.iter().sum::<u64>(), before[5]);
    let (ok, _, stderr) = run(&["partitions", "import", file.to_str().unwrap()], to.path());
    assert!(!ok && stderr.contains("already in this store"), "{stderr}");

    let (ok, stdout, stderr) = run(&["partitions", "drop", "--partition", "5"], from.path());
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("{} customers", before[5])), "{stdout}");
    let after = counts(from.path());
    assert_eq!(after[5], 0);
    assert_eq!(after.iter().sum::<u64>(), before.iter().sum::<u64>() - before[5]);
    let _ = std::fs::remove_file(&file);
}

/// `check-rules --tracking-plan`: the example rules fit the example plan; a typo in an
/// event type or property is an error at its line and column with a suggestion; a bad
/// plan file is named with what is wrong in it.
#[test]
fn check_rules_against_the_tracking_plan_and_plan_files_checked() {
    let plan = repo_root().join("deploy/rules/example-plan.toml");
    let out = tagstream()
        .arg("check-rules")
        .arg("--tracking-plan")
        .arg(&plan)
        .arg(repo_root().join("deploy/rules/example.trl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = TempDir::new("check-plan");
    let rules = dir.path().join("typo.trl");
    std::fs::write(&rules, "tag t on veiw where categroy == \"seafood\"\ntag p = count(payment where channel == \"cash\", 7d) > 0\n").unwrap();
    let out = tagstream()
        .arg("check-rules")
        .arg("--tracking-plan")
        .arg(&plan)
        .arg(&rules)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error[E0401]: event type `veiw` is not in the tracking plan"),
        "{stderr}"
    );
    assert!(stderr.contains("typo.trl:1:10"), "{stderr}");
    assert!(stderr.contains("hint: did you mean `view`?"), "{stderr}");
    assert!(
        stderr.contains("error[E0405]: \"cash\" is not one of the planned values"),
        "{stderr}"
    );
    assert!(stderr.contains("2 errors in"), "{stderr}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[events.pay]\nproperties.amount = { type = \"money\" }\n").unwrap();
    let out = tagstream().args(["plan", "check"]).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("events.pay.amount: unknown type \"money\""),
        "{stderr}"
    );
    let out = tagstream().args(["plan", "check"]).arg(&plan).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok, 20 event types"));
}

/// `plan infer` on a stopped store prints a plan that accepts every line it received, and
/// a replay with it in block mode rejects only what was malformed anyway.
#[test]
fn a_plan_inferred_from_a_store_accepts_what_it_received() {
    let dir = TempDir::new("plan-infer");
    let stream = dir.path().join("events.ndjson");
    let spec = bench::loadgen::StreamSpec {
        customers: 200,
        events: 2_000,
        ..Default::default()
    };
    bench::loadgen::generate(&spec, &mut std::fs::File::create(&stream).unwrap()).unwrap();
    let replay = |data: &str, extra: &[&std::ffi::OsStr]| {
        let out = tagstream()
            .arg("replay")
            .arg(&stream)
            .arg("--data-dir")
            .arg(dir.path().join(data))
            .args(["--clock", "event", "--quiet"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = replay("a", &[]);
    let out = tagstream()
        .args(["plan", "infer", "--data-dir"])
        .arg(dir.path().join("a"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inferred = String::from_utf8(out.stdout).unwrap().replace(
        "mode = \"allow\"\nunplanned_events = \"allow\"",
        "mode = \"block\"\nunknown_top_level = \"block\"",
    );
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, &inferred).unwrap();
    let second = replay("b", &["--tracking-plan".as_ref(), plan.as_os_str()]);
    let counts = |text: &str| text.split(" in ").next().unwrap().to_owned();
    assert_eq!(counts(&second), counts(&first), "{inferred}");
}
