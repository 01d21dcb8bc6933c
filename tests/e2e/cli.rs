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
