//! Crash safety: a `tagstream replay` killed with SIGKILL at random moments and started
//! again must end exactly where an uninterrupted run ends — same change log (seq included),
//! same customers, same dead letters. Nothing acknowledged is lost, nothing counted twice.
//! Each restart runs another number of engine workers (1, 2, 4) and the result is still the
//! one-worker run's, `seq` for `seq`.

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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tagstream"));
    cmd.arg("replay")
        .arg(conformance.join("events.ndjson"))
        .arg("--data-dir")
        .arg(data)
        .arg("--rules")
        .arg(conformance.join("example.trl"))
        .args(["--clock", "event", "--quiet", "--advance-to", FINAL_CLOCK])
        .arg("--batch-size")
        .arg(batch_size.to_string())
        .arg("--workers")
        .arg(workers.to_string());
    cmd
}

#[test]
fn replay_killed_at_random_moments_ends_like_an_uninterrupted_run() {
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
    assert_eq!(actual.0, expected.0, "change log after {kills} kills");
    assert_eq!(actual.1, expected.1, "customers after {kills} kills");
    assert_eq!(actual.2, expected.2, "dead letters after {kills} kills");
}
