//! A tansu broker (a real Kafka-protocol broker, installed by scripts/test-all.sh) on a free
//! loopback port with in-memory storage, for the end-to-end tests.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn tansu_binary() -> PathBuf {
    let path = std::env::var_os("TAGSTREAM_TANSU")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tagstream-tools/tansu")))
        .expect("HOME or TAGSTREAM_TANSU");
    assert!(
        path.exists(),
        "no tansu broker at {}: run ./scripts/test-all.sh, which installs it, or set TAGSTREAM_TANSU",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tansu broker with in-memory storage, stopped on drop.
pub struct Broker {
    child: Child,
    pub addr: String,
}

/// How a test broker is started beyond the defaults.
#[derive(Default)]
pub struct BrokerOptions {
    /// Where clients are told the broker is (`host:port`), e.g. a TLS terminator in front
    /// of it; the broker's own address when `None`.
    pub advertised: Option<String>,
    /// Require SASL (`--authentication`).
    pub authentication: bool,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(BrokerOptions::default())
    }

    pub fn start_with(options: BrokerOptions) -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = options
            .advertised
            .map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
        let mut command = Command::new(tansu_binary());
        command.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ]);
        if options.authentication {
            command.arg("--authentication");
        }
        let child = command
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { child, addr }
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.create_topic_with(name, partitions, &[]);
    }

    /// A topic with topic configuration entries (`cleanup.policy=compact`, ...).
    pub fn create_topic_with(&self, name: &str, partitions: u32, config: &[&str]) {
        let mut command = Command::new(tansu_binary());
        command
            .args(["topic", "create", name, "--broker"])
            .arg(format!("tcp://{}", self.addr))
            .args(["--partitions", &partitions.to_string()]);
        for entry in config {
            command.args(["--config", entry]);
        }
        let status = command
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "creating topic {name}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
