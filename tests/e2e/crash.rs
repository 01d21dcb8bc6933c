//! Crash safety: a `tagstream replay` killed with SIGKILL at random moments and started
//! again must end exactly where an uninterrupted run ends — same change log (seq included),
//! same customers, same dead letters. Nothing acknowledged is lost, nothing counted twice.
//! Each restart runs another number of engine workers (1, 2, 4) and the result is still the
//! one-worker run's, `seq` for `seq`. And a store written by an earlier build, restored and
//! continued by this one, ends the same way.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{conformance_dir, TempDir};

#[path = "support/snapshot.rs"]
mod support;
use support::snapshot;

const FINAL_CLOCK: &str = "1744732800000";

fn replay(data: &Path, batch_size: usize, workers: usize) -> Command {
    let conformance = conformance_dir();
    replay_of(
        &conformance.join("events.ndjson"),
        &conformance.join("example.trl"),
        data,
        batch_size,
        workers,
    )
}

/// `tagstream replay EVENTS` into `data` with `rules`, event clock, quiet.
fn replay_base(events: &Path, rules: &Path, data: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tagstream"));
    cmd.arg("replay")
        .arg(events)
        .arg("--data-dir")
        .arg(data)
        .arg("--rules")
        .arg(rules)
        .args(["--clock", "event", "--quiet"]);
    cmd
}

fn replay_of(events: &Path, rules: &Path, data: &Path, batch_size: usize, workers: usize) -> Command {
    let mut cmd = replay_base(events, rules, data);
    cmd.args(["--advance-to", FINAL_CLOCK])
        .arg("--batch-size")
        .arg(batch_size.to_string())
        .arg("--workers")
        .arg(workers.to_string());
    cmd
}

#[test]
fn replay_killed_at_random_moments_ends_like_an_uninterrupted_run() {
    killed_at_random_moments(&replay);
}

/// A stream whose events name 300 people by overlapping identifiers (phones spelled
/// several ways, emails, openids, a CRM id for some), so that merges happen all along it.
fn dirty_stream(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut lines = String::new();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for i in 0..3000u64 {
        let p = next(300);
        let ts = 1_744_000_000_000 + i as i64 * 60_000;
        let mut ids = Vec::new();
        let mut customer = String::new();
        while ids.is_empty() && customer.is_empty() {
            if next(3) == 0 {
                let phone = format!("1380000{p:04}");
                ids.push(format!(
                    r#""phone":"{}""#,
                    if next(2) == 0 {
                        format!("+86 {phone}")
                    } else {
                        phone
                    }
                ));
            }
            if next(3) == 0 {
                ids.push(format!(r#""email":"P{p}@Example.com""#));
            }
            if next(3) == 0 {
                ids.push(format!(r#""openid":"o-{p}""#));
            }
            if p % 4 == 0 && next(4) == 0 {
                customer = format!(r#","customer_id":"crm-{p}""#);
            }
        }
        let (kind, props) = match next(3) {
            0 => ("payment", format!(r#"{{"amount":{}}}"#, 1 + next(900))),
            1 => ("app_open", "{}".to_owned()),
            _ => ("view", r#"{"category":"seafood"}"#.to_owned()),
        };
        let ids = if ids.is_empty() {
            String::new()
        } else {
            format!(r#","ids":{{{}}}"#, ids.join(","))
        };
        lines.push_str(&format!(
            r#"{{"event_id":"e{i}","type":"{kind}","ts":{ts}{customer}{ids},"props":{props}}}"#
        ));
        lines.push('\n');
    }
    let events = dir.join("dirty.ndjson");
    std::fs::write(&events, lines).unwrap();
    let rules = dir.join("dirty.trl");
    std::fs::write(
        &rules,
        "tag big_spender = sum(payment.amount, 30d) >= 2000\n\
         tag active = count(app_open, 1d) >= 2\n\
         tag seafood on view where category == \"seafood\" ttl 2h\n\
         trait spend = sum(payment.amount, lifetime)\n\
         segment quiet = not active\n",
    )
    .unwrap();
    (events, rules)
}

/// Merges (and the graph, the moved histories, the absorbed customers' removal) commit
/// with the events that cause them: killed at any moment, a replay of a stream full of
/// merges ends exactly as an uninterrupted one — the change log seq for seq, every
/// customer, every customer's identifiers — whatever the workers and the batches.
#[test]
fn identity_merges_killed_at_random_moments_end_like_an_uninterrupted_run() {
    let files = TempDir::new("crash-dirty");
    let (events, rules) = dirty_stream(files.path());
    let run = |data: &Path, batch: usize, workers: usize| replay_of(&events, &rules, data, batch, workers);
    let merges = killed_at_random_moments(&run);
    assert!(merges > 50, "the stream merges customers: {merges}");
}

/// Kills `replay` (data dir, batch size, workers) at random moments until one run
/// finishes, and compares the store with an uninterrupted run's. Returns the number of
/// merges in the change log.
fn killed_at_random_moments(replay: &dyn Fn(&Path, usize, usize) -> Command) -> usize {
    let clean = TempDir::new("crash-clean");
    let status = replay(clean.path(), 40, 1).status().expect("run replay");
    assert!(status.success());
    let expected = snapshot(clean.path());
    assert!(expected.0.len() > 100, "the stream produces changes");

    // A fixed number of kills at random moments (startup included), then a run left to
    // finish: the test does not depend on how fast this machine gets through the stream.
    const KILLS: u32 = 12;
    let crashed = TempDir::new("crash-killed");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut kills = 0;
    while kills < KILLS {
        let workers = [1, 2, 4][kills as usize % 3];
        let mut child = replay(crashed.path(), 40, workers).spawn().expect("start replay");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 150));
        match child.try_wait().expect("poll replay") {
            Some(status) => {
                assert!(status.success(), "replay failed: {status}");
                break;
            }
            None => {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
            }
        }
    }
    if kills == KILLS {
        let status = replay(crashed.path(), 40, 2).status().expect("run replay");
        assert!(status.success(), "replay failed after {kills} kills: {status}");
    }
    assert!(
        kills >= 3,
        "only {kills} kills: the test did not interrupt the replay"
    );
    let actual = snapshot(crashed.path());
    assert_eq!(
        actual.0.len(),
        expected.0.len(),
        "change count after {kills} kills"
    );
    if let Some(i) = (0..expected.0.len()).find(|&i| actual.0[i] != expected.0[i]) {
        let around = |log: &[serde_json::Value]| log[i.saturating_sub(3)..(i + 3).min(log.len())].to_vec();
        panic!(
            "change log after {kills} kills differs at {i}:\n got  {:?}\n want {:?}",
            around(&actual.0),
            around(&expected.0)
        );
    }
    assert_eq!(actual.1, expected.1, "customers after {kills} kills");
    assert_eq!(actual.2, expected.2, "dead letters after {kills} kills");
    expected.0.iter().filter(|c| c["op"] == "merge").count()
}

/// The line of the conformance stream where the store fixtures stop
/// (`scripts/make-store-fixture.sh`).
const FIXTURE_LINES: usize = 2600;

fn replay_lines(events: &Path, data: &Path, advance: bool) -> Command {
    let mut cmd = replay_base(events, &conformance_dir().join("example.trl"), data);
    if advance {
        cmd.args(["--advance-to", FINAL_CLOCK]);
    }
    cmd
}

/// Backups written by earlier builds (`tests/fixtures/backup-COMMIT`, made by
/// `scripts/make-store-fixture.sh` from the first 2,600 lines of the conformance stream):
/// this build restores each, reads it exactly as it reads the same lines replayed by itself
/// (change log, customers with their traits and tags, dead letters), and, given the rest
/// of the stream, ends seq for seq where its own uninterrupted run ends — whatever the
/// store format the earlier build wrote (window state converted as it is used).
#[test]
fn a_backup_from_an_earlier_build_restores_and_goes_on_like_an_uninterrupted_run() {
    let fixtures: Vec<_> = std::fs::read_dir(tests::repo_root().join("tests/fixtures"))
        .expect("tests/fixtures")
        .map(|e| e.expect("fixture entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("backup-"))
        })
        .collect();
    assert!(!fixtures.is_empty(), "no store fixture under tests/fixtures");

    let files = TempDir::new("upgrade-files");
    // Bytes, not text: some lines of the stream are not UTF-8 on purpose.
    let stream = std::fs::read(conformance_dir().join("events.ndjson")).expect("events");
    let split = stream
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(FIXTURE_LINES - 1)
        .map(|(i, _)| i + 1)
        .expect("the stream is longer than the fixtures");
    let (first, rest) = (
        files.path().join("first.ndjson"),
        files.path().join("rest.ndjson"),
    );
    std::fs::write(&first, &stream[..split]).unwrap();
    std::fs::write(&rest, &stream[split..]).unwrap();

    let ours_first = TempDir::new("upgrade-first");
    assert!(replay_lines(&first, ours_first.path(), false)
        .status()
        .unwrap()
        .success());
    let at_fixture = snapshot(ours_first.path());
    assert!(at_fixture.0.len() > 100, "the first lines make changes");
    let whole = TempDir::new("upgrade-whole");
    let all = conformance_dir().join("events.ndjson");
    assert!(replay_lines(&all, whole.path(), true).status().unwrap().success());
    let at_end = snapshot(whole.path());

    for fixture in fixtures {
        let name = fixture.file_name().unwrap().to_string_lossy().into_owned();
        let restored = TempDir::new("upgrade-restored");
        let data = restored.path().join("data");
        let out = Command::new(env!("CARGO_BIN_EXE_tagstream"))
            .args(["restore", "--from"])
            .arg(&fixture)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .expect("run restore");
        assert!(
            out.status.success(),
            "{name}: restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read = snapshot(&data);
        assert_eq!(read.0, at_fixture.0, "{name}: the change log as restored");
        assert_eq!(read.1, at_fixture.1, "{name}: the customers as restored");
        assert_eq!(read.2, at_fixture.2, "{name}: the dead letters as restored");

        assert!(replay_lines(&rest, &data, true).status().unwrap().success());
        let continued = snapshot(&data);
        assert_eq!(
            continued.0.len(),
            at_end.0.len(),
            "{name}: change count at the end"
        );
        if let Some(i) = (0..at_end.0.len()).find(|&i| continued.0[i] != at_end.0[i]) {
            panic!(
                "{name}: the change log differs at {i}: got {:?}, want {:?}",
                continued.0[i], at_end.0[i]
            );
        }
        assert_eq!(continued.1, at_end.1, "{name}: the customers at the end");
        assert_eq!(continued.2, at_end.2, "{name}: the dead letters at the end");
    }
}
