//! A real `tagstream serve` process on a free port, with a fresh data directory (event
//! clock unless the test chooses), for the end-to-end HTTP tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use tests::http::request;
use tests::TempDir;

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub _dir: TempDir,
}

impl Server {
    pub fn start(rules: &str, extra: &[&str]) -> Server {
        Server::start_in(TempDir::new("http"), rules, extra)
    }

    /// Starts on an existing directory (its `data` store is reused: a restart) with the rule
    /// file `rules` (a store whose rule set differs refuses it unless `--replace-rules`).
    pub fn start_in(dir: TempDir, rules: &str, extra: &[&str]) -> Server {
        let rules_path = dir.path().join("rules.trl");
        std::fs::write(&rules_path, rules).unwrap();
        let rules_arg = ["--rules".to_owned(), rules_path.display().to_string()];
        Server::launch(dir, &rules_arg, extra)
    }

    /// Restarts on an existing directory with the rule set the store holds (no rule file).
    #[allow(dead_code)] // not every test binary restarts
    pub fn restart(dir: TempDir, extra: &[&str]) -> Server {
        Server::launch(dir, &[], extra)
    }

    fn launch(dir: TempDir, rules: &[String], extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tagstream"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(rules)
            .args(if extra.contains(&"--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .args(["--sync-writes", "false"])
            // The event clock unless the test chooses.
            .args(if extra.contains(&"--clock") {
                &[][..]
            } else {
                &["--clock", "event"][..]
            })
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
            .or_else(|| line.trim().strip_prefix("tagstream listening on https://"))
            .unwrap_or_else(|| panic!("{line}"))
            .to_owned();
        Server {
            child,
            addr,
            _dir: dir,
        }
    }

    pub fn get(&self, path: &str) -> tests::http::Response {
        request(&self.addr, "GET", path, b"")
    }

    pub fn send(&self, method: &str, path: &str, body: &str) -> tests::http::Response {
        request(&self.addr, method, path, body.as_bytes())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
