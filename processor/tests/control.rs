//! The rule set of a group of several, shared through the control topic (issue #21, §5 of
//! `docs/design/cluster.md`), on librdkafka's mock broker: the first node offers its store's
//! rule set to an empty topic; a node joining later, with another rule set of its own, runs
//! the group's; a change asked of either node is applied by both, under the same version
//! number and generation; of two changes made at once from the same version, exactly one
//! is accepted, the same one on every node; a saved segment put on one node has its members
//! computed from each node's own customers.

use std::time::{Duration, Instant};

use processor::kafka::control::{self, ControlRecord, Outcome};
use processor::kafka::{KafkaSettings, KafkaStatus};
use processor::{ClockMode, Engine, EngineConfig, EngineHandle, Proposal, RuleEdit, ServiceConfig};
use rdkafka::mocking::MockCluster;
use std::sync::Arc;
use tests::TempDir;

const FIRST: &str = "tag buyer on payment ttl 30d\n";
const OTHER: &str = "tag viewer on view ttl 7d\n";
const WAIT: Duration = Duration::from_secs(30);

struct Node {
    /// Both `None` only while the node is dropped.
    handle: Option<EngineHandle>,
    worker: Option<control::ControlWorker>,
    thread: Option<std::thread::JoinHandle<()>>,
    status: Arc<KafkaStatus>,
    _dir: TempDir,
}

/// The engine thread is joined before the store's directory goes: one still closing its
/// store when the process exits aborts it ("pthread lock: Invalid argument").
impl Drop for Node {
    fn drop(&mut self) {
        drop(self.worker.take());
        drop(self.handle.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Node {
    fn start(brokers: &str, name: &str, rules: &str, customers: std::ops::Range<u32>) -> Node {
        let dir = TempDir::new(name);
        let config = EngineConfig {
            clock: ClockMode::Event,
            sync_writes: false,
            ..Default::default()
        };
        let mut engine = Engine::open(dir.path(), Some(rules), config).unwrap();
        let events: Vec<String> = customers
            .map(|c| {
                let kind = if c % 2 == 0 { "payment" } else { "view" };
                format!(
                    r#"{{"customer_id":"c{c}","type":"{kind}","ts":{},"props":{{"amount":5}}}}"#,
                    1_700_000_000_000u64 + u64::from(c)
                )
            })
            .collect();
        engine.ingest(&events).unwrap();
        let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
        let status = Arc::new(KafkaStatus::default());
        let settings = KafkaSettings::new(brokers, "events", "group");
        let worker =
            control::start(&settings, "control", name, handle.clone(), status.clone(), WAIT).unwrap();
        Node {
            handle: Some(handle),
            worker: Some(worker),
            thread: Some(thread),
            status,
            _dir: dir,
        }
    }

    fn handle(&self) -> &EngineHandle {
        self.handle.as_ref().expect("a node being dropped")
    }

    fn control(&self) -> &Arc<control::Control> {
        self.worker.as_ref().expect("a node being dropped").control()
    }

    /// The rule text, version and generation running.
    fn running(&self) -> (String, u64, u64) {
        self.handle()
            .call_blocking(|e| (e.rules().source().to_owned(), e.rules_version(), e.generation()))
            .unwrap()
    }

    fn propose(&self, make: impl FnOnce(&Engine) -> Proposal + Send + 'static) -> Proposal {
        self.handle().call_blocking(move |e| make(e)).unwrap()
    }

    fn wait_for_version(&self, version: u64) {
        let deadline = Instant::now() + WAIT;
        while self.running().1 != version {
            assert!(
                Instant::now() < deadline,
                "version {version} never ran here: {:?}",
                self.running()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The members of `name`, judged: the backfill after a full change done first.
    fn members(&self, name: &'static str) -> Vec<String> {
        self.handle()
            .call_blocking(move |e| {
                while e.backfill_pending() {
                    e.backfill_step(1000).unwrap();
                }
                let mut ids: Vec<String> = e
                    .customer_ids()
                    .unwrap()
                    .into_iter()
                    .filter(|id| {
                        let view = e.customer(id).unwrap().unwrap();
                        view.tags.contains_key(name) || view.segments.contains_key(name)
                    })
                    .collect();
                ids.sort();
                ids
            })
            .unwrap()
    }
}

#[test]
fn every_node_runs_the_groups_rule_set_and_each_change_once_in_one_order() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("control", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();

    // The first node finds the topic empty and offers its rule set.
    let a = Node::start(&brokers, "control-a", FIRST, 0..10);
    let (text, version, generation) = a.running();
    assert_eq!((text.as_str(), version), (FIRST, 1));
    assert_eq!(a.status.rules_version(), 1);

    // A node whose store has a rule set of its own runs the group's instead.
    let b = Node::start(&brokers, "control-b", OTHER, 10..20);
    assert_eq!(
        b.running(),
        (FIRST.to_owned(), 1, generation),
        "B runs the chain's start"
    );
    assert_eq!(b.members("buyer"), ["c10", "c12", "c14", "c16", "c18"]);
    assert!(b.members("viewer").is_empty(), "its own rule set is gone");

    // A change asked of A is applied by both, under one number and generation.
    let two = "tag buyer on payment ttl 30d\ntag viewer on view ttl 7d\n";
    let proposal = a.propose(|e| {
        e.propose_rules(two, &RuleEdit::by("ann"), "put_rules".into())
            .unwrap()
    });
    assert_eq!(proposal.version.version, 2);
    match a.control().propose(proposal, WAIT).unwrap() {
        Outcome::Applied(_, version) => assert_eq!((version.version, version.author.as_str()), (2, "ann")),
        other => panic!("not applied: {other:?}"),
    }
    b.wait_for_version(2);
    assert_eq!(a.running(), b.running());
    assert_ne!(a.running().2, generation, "a full change moves the generation on");
    assert_eq!(b.members("viewer"), ["c11", "c13", "c15", "c17", "c19"]);
    assert_eq!(b.status.rules_version(), 2);

    // Two changes made at once from version 2: the first in the topic wins everywhere.
    let three_a = a.propose(|e| {
        e.propose_rules(FIRST, &RuleEdit::by("ann"), "put_rules".into())
            .unwrap()
    });
    let three_b = b.propose(|e| {
        e.propose_put_segment("both", "buyer or viewer", &RuleEdit::by("bob"))
            .unwrap()
    });
    let (from_a, from_b) = std::thread::scope(|s| {
        let sent_a = s.spawn(|| a.control().propose(three_a, WAIT).unwrap());
        let sent_b = s.spawn(|| b.control().propose(three_b, WAIT).unwrap());
        (sent_a.join().unwrap(), sent_b.join().unwrap())
    });
    let winner = match (&from_a, &from_b) {
        (Outcome::Applied(_, v), Outcome::Refused { current: 3 }) => {
            assert_eq!(v.author, "ann");
            "ann"
        }
        (Outcome::Refused { current: 3 }, Outcome::Applied(_, v)) => {
            assert_eq!(v.author, "bob");
            "bob"
        }
        other => panic!("exactly one change is accepted: {other:?}"),
    };
    a.wait_for_version(3);
    b.wait_for_version(3);
    assert_eq!(a.running(), b.running(), "both run the winner ({winner})");

    // A saved segment put on one node: its members from each node's own customers.
    let (_, current, _) = b.running();
    let segment = b.propose(|e| {
        e.propose_put_segment("payers", "buyer", &RuleEdit::by("bob"))
            .unwrap()
    });
    assert_eq!(segment.version.version, current + 1);
    let Outcome::Applied(update, _) = b.control().propose(segment, WAIT).unwrap() else {
        panic!("a segment put from the current version is accepted");
    };
    assert_eq!(
        serde_json::to_value(update).unwrap(),
        serde_json::json!({"applied": "immediate", "members": 5, "entered": 5, "exited": 0})
    );
    a.wait_for_version(current + 1);
    assert_eq!(a.running(), b.running());
    assert_eq!(a.members("payers"), ["c0", "c2", "c4", "c6", "c8"]);
    assert_eq!(b.members("payers"), ["c10", "c12", "c14", "c16", "c18"]);

    // A third node, starting after all this, reads the chain and runs its last version —
    // also when the broker drops every connection as it starts and takes them again a
    // moment later (the client reconnects; only the start's deadline bounds the wait).
    cluster.broker_down(-1).unwrap();
    let starting = std::thread::spawn({
        let brokers = brokers.clone();
        move || Node::start(&brokers, "control-c", OTHER, 20..22)
    });
    std::thread::sleep(Duration::from_millis(1500));
    cluster.broker_up(-1).unwrap();
    let c = starting.join().unwrap();
    assert_eq!(c.running(), a.running());
    assert_eq!(c.members("payers"), ["c20"]);
}

/// The chain is decided from the topic alone: a start only on an empty chain, then each
/// change only from the last accepted version.
#[test]
fn the_chain_accepts_a_start_then_each_next_version_once() {
    let proposal = |version: u64| Proposal {
        change: processor::RuleChange::Rules,
        version: processor::RuleVersion {
            version,
            author: "t".into(),
            at: 0,
            action: "put_rules".into(),
            diff: Default::default(),
            text: String::new(),
        },
        generation: version,
    };
    let mut chain = control::Chain::default();
    assert!(!chain.accept(&ControlRecord::Mark));
    assert!(chain.accept(&ControlRecord::Start {
        proposal: proposal(4)
    }));
    assert!(
        !chain.accept(&ControlRecord::Start {
            proposal: proposal(1)
        }),
        "a second start"
    );
    assert!(
        !chain.accept(&ControlRecord::Change {
            proposal: proposal(4)
        }),
        "not after 4"
    );
    assert!(
        !chain.accept(&ControlRecord::Change {
            proposal: proposal(6)
        }),
        "skips 5"
    );
    assert!(chain.accept(&ControlRecord::Change {
        proposal: proposal(5)
    }));
    assert!(
        !chain.accept(&ControlRecord::Change {
            proposal: proposal(5)
        }),
        "5 again, from 4"
    );
    assert_eq!(chain.last(), Some(5));
}

/// Shared settings (API keys, webhook subscriptions) ride the control topic beside the
/// chain: every node's sink of a kind gets every record of that kind in the topic's order —
/// those written before the node started or before the sink was registered first, then the
/// rest as they are read — and none of them moves the rule-set chain.
#[test]
fn shared_records_reach_every_nodes_sink_in_order_without_touching_the_chain() {
    use std::sync::Mutex;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("control", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let record = |kind: &str, id: &str, n: u64| control::Shared {
        kind: kind.into(),
        id: id.into(),
        body: serde_json::json!({ "n": n, "secret": "never printed" }),
        latest: false,
    };
    let collect = |node: &Node, kind: &str| {
        let got = Arc::new(Mutex::new(Vec::new()));
        let into = got.clone();
        node.control().on_shared(
            kind,
            Box::new(move |r: &control::Shared| {
                into.lock().unwrap().push((r.id.clone(), r.body["n"].clone()))
            }),
        );
        got
    };
    let a = Node::start(&brokers, "shared-a", FIRST, 0..2);
    let on_a = collect(&a, "key");
    for (id, n) in [("k1", 1), ("k2", 2)] {
        a.control().share(&record("key", id, n)).unwrap();
    }
    a.control().share(&record("webhook", "w1", 3)).unwrap();
    let b = Node::start(&brokers, "shared-b", OTHER, 2..4);
    assert_eq!(
        b.running().1,
        1,
        "the chain's start is A's, shared records between"
    );
    // Registered after B read the topic: given what came before, in order, of its kind.
    let keys_b = collect(&b, "key");
    let hooks_b = collect(&b, "webhook");
    let expected = |pairs: &[(&str, u64)]| -> Vec<(String, serde_json::Value)> {
        pairs
            .iter()
            .map(|(id, n)| (id.to_string(), serde_json::json!(n)))
            .collect()
    };
    assert_eq!(*keys_b.lock().unwrap(), expected(&[("k1", 1), ("k2", 2)]));
    assert_eq!(*hooks_b.lock().unwrap(), expected(&[("w1", 3)]));
    // Written by B: read by both as it comes, after what was there.
    b.control().share(&record("key", "k1", 4)).unwrap();
    let deadline = Instant::now() + WAIT;
    let all = expected(&[("k1", 1), ("k2", 2), ("k1", 4)]);
    while *on_a.lock().unwrap() != all || *keys_b.lock().unwrap() != all {
        assert!(Instant::now() < deadline, "A: {:?}", on_a.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The chain goes on from where it was: a change from version 1 is version 2.
    let proposal = b.propose(|e| {
        e.propose_rules(OTHER, &RuleEdit::by("bob"), "put_rules".into())
            .unwrap()
    });
    assert_eq!(proposal.version.version, 2);
    assert!(matches!(
        b.control().propose(proposal, WAIT).unwrap(),
        Outcome::Applied(..)
    ));
    a.wait_for_version(2);
    // A position that only moves on replaces its last: a sink registered later is given
    // only the newest of each id.
    for n in [5, 6, 7] {
        let position = control::Shared {
            latest: true,
            ..record("cursor", "c1", n)
        };
        a.control().share(&position).unwrap();
    }
    let as_read = collect(&b, "cursor");
    let deadline = Instant::now() + WAIT;
    while as_read.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "B: {:?}", as_read.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        *as_read.lock().unwrap(),
        expected(&[("c1", 5), ("c1", 6), ("c1", 7)]),
        "a sink there gets each as it is read"
    );
    assert_eq!(*collect(&b, "cursor").lock().unwrap(), expected(&[("c1", 7)]));
    // What a log line would show of a shared record: never its body.
    assert!(!format!("{:?}", record("webhook", "w1", 3)).contains("never printed"));
    assert!(!format!(
        "{:?}",
        ControlRecord::Shared {
            shared: record("webhook", "w1", 3)
        }
    )
    .contains("never printed"));
}
