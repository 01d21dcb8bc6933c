//! Kafka in and out against librdkafka's own mock broker (in process, real Kafka protocol on
//! a loopback socket): a generated stream produced to a 3-partition topic and consumed into
//! the engine ends in the same state as the same stream ingested directly; every change is
//! published to `tag-changes` and every rejected line to the dead-letter topic; a restart
//! resumes from the offsets stored with the state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use processor::kafka::{self, ApplyError, KafkaBatch, KafkaSettings, KafkaStatus};
use processor::{ClockMode, CustomerView, Engine, EngineConfig};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use tests::TempDir;

const RULES: &str = include_str!("../../deploy/rules/example.trl");

/// A dedup horizon longer than the stream: which re-sent line falls outside a 7-day horizon
/// depends on how far the clock had moved, which differs between arrival orders.
fn config() -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        dedup_horizon_ms: 400 * 86_400_000,
        ..Default::default()
    }
}

fn stream(events: u64) -> Vec<String> {
    let spec = bench::loadgen::StreamSpec {
        customers: 300,
        events,
        ..Default::default()
    };
    let mut out = Vec::new();
    bench::loadgen::generate(&spec, &mut out).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn produce(brokers: &str, topic: &str, lines: &[String]) {
    let producer = bench::kafka::producer(brokers).unwrap();
    bench::kafka::produce(&producer, topic, lines).unwrap();
}

/// Messages in the topic: the sum of its partitions' high watermarks.
fn topic_size(brokers: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .unwrap()
                .1
        })
        .sum()
}

/// Every customer's view, for comparing two stores that saw the same events in different
/// orders: everything but `since`, which the contract says depends on arrival order (with
/// three partitions, the event clock advances differently). Numbers compare by value
/// (`0.00 == 0`), as the API prints them.
fn state(engine: &Engine) -> BTreeMap<String, CustomerView> {
    engine
        .customer_ids()
        .unwrap()
        .into_iter()
        .map(|id| {
            let mut view = engine.customer(&id).unwrap().unwrap();
            for m in view.tags.values_mut().chain(view.segments.values_mut()) {
                m.since = 0;
            }
            (id, view)
        })
        .collect()
}

struct Running {
    engine: Arc<Mutex<Engine>>,
    seen: Arc<AtomicUsize>,
    status: Arc<KafkaStatus>,
    workers: kafka::KafkaWorkers,
}

fn run(dir: &std::path::Path, brokers: &str, group: &str) -> Running {
    run_with(dir, brokers, group, |_| {})
}

fn run_with(
    dir: &std::path::Path,
    brokers: &str,
    group: &str,
    adjust: impl FnOnce(&mut KafkaSettings),
) -> Running {
    run_engine(
        Engine::open(dir, Some(RULES), config()).unwrap(),
        brokers,
        group,
        adjust,
    )
}

fn run_engine(
    engine: Engine,
    brokers: &str,
    group: &str,
    adjust: impl FnOnce(&mut KafkaSettings),
) -> Running {
    let reader = engine.reader();
    let engine = Arc::new(Mutex::new(engine));
    let seen = Arc::new(AtomicUsize::new(0));
    let apply: kafka::Apply = {
        let (engine, seen) = (engine.clone(), seen.clone());
        Box::new(move |batch: Arc<KafkaBatch>| {
            let outcome = engine
                .lock()
                .unwrap()
                .ingest_from(&batch.events, &batch.positions)
                .map_err(|e| ApplyError::Failed(e.to_string()))?;
            seen.fetch_add(batch.events.len(), Ordering::SeqCst);
            Ok(outcome)
        })
    };
    let mut settings = KafkaSettings::new(brokers, "events", group);
    settings.max_batch = 500;
    // The mock broker keeps a closed member in the group until its session times out
    // (45 s by default), which the restart below would wait for.
    settings
        .client_options
        .insert("session.timeout.ms".into(), "6000".into());
    settings
        .client_options
        .insert("heartbeat.interval.ms".into(), "500".into());
    adjust(&mut settings);
    let status = Arc::new(KafkaStatus::default());
    let workers = kafka::start(settings, reader, apply, status.clone(), None).unwrap();
    Running {
        engine,
        seen,
        status,
        workers,
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A consumed record: key, payload, headers.
type Record = (Option<Vec<u8>>, Vec<u8>, Vec<(String, String)>);

/// Reads a whole topic from the beginning.
fn read_topic(brokers: &str, topic: &str, expected: usize) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                m.key().map(<[u8]>::to_vec),
                m.payload().unwrap_or_default().to_vec(),
                headers,
            ));
        }
    }
    out
}

#[test]
fn a_stream_consumed_from_kafka_ends_like_direct_ingest_and_every_change_is_published() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 3, 1).unwrap();
    cluster.create_topic("tag-changes", 3, 1).unwrap();
    cluster.create_topic("tagstream-dead-letters", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let lines = stream(3_000);
    produce(&brokers, "events", &lines[..2_000]);
    assert_eq!(topic_size(&brokers, "events", 3), 2_000);

    let dir = TempDir::new("kafka-consumed");
    let first = run(dir.path(), &brokers, "g1");
    wait_until("the consumer to be assigned", || first.status.ready().is_ok());
    wait_until("the first 2000 lines", || {
        first.seen.load(Ordering::SeqCst) == 2_000
    });
    // A restart: the stored offsets, not the group's, say where to resume.
    first.workers.stop(std::time::Duration::from_secs(10));
    drop(first.engine);
    produce(&brokers, "events", &lines[2_000..]);
    assert_eq!(topic_size(&brokers, "events", 3), lines.len() as i64);
    let second = run(dir.path(), &brokers, "g1");
    let rest = lines.len() - 2_000;
    wait_until("the remaining lines", || {
        second.seen.load(Ordering::SeqCst) == rest
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(second.seen.load(Ordering::SeqCst), rest, "nothing consumed twice");

    let direct_dir = TempDir::new("kafka-direct");
    let mut direct = Engine::open(direct_dir.path(), Some(RULES), config()).unwrap();
    direct.ingest(&lines).unwrap();
    let consumed = second.engine.lock().unwrap();
    let (a, b) = (state(&consumed), state(&direct));
    for (id, view) in &a {
        assert_eq!(Some(view), b.get(id), "customer {id}");
    }
    assert_eq!(a.len(), b.len());
    // (How many changes happened on the way depends on the order, so only the final state
    // is compared with the direct run.)
    let changes = consumed.next_seq() - 1;
    let rejected = consumed.dead_letters(None, usize::MAX).unwrap();
    assert_eq!(
        rejected.len(),
        direct.dead_letters(None, usize::MAX).unwrap().len()
    );
    assert!(!rejected.is_empty());

    // Every change on tag-changes (a change may be published twice across the restart:
    // dropping duplicate seq leaves exactly the change log), in seq order per customer.
    let published = read_topic(&brokers, "tag-changes", changes as usize);
    let mut by_seq: BTreeMap<u64, serde_json::Value> = BTreeMap::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for (key, payload, _) in &published {
        let change: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let seq = change["seq"].as_u64().unwrap();
        let customer = change["customer_id"].as_str().unwrap().to_owned();
        assert_eq!(key.as_deref(), Some(customer.as_bytes()), "keyed by customer");
        let last = last_seq.entry(customer).or_default();
        assert!(seq > *last || by_seq.contains_key(&seq), "seq order per customer");
        *last = (*last).max(seq);
        by_seq.insert(seq, change);
    }
    let log = consumed.changes(0, usize::MAX).unwrap();
    assert_eq!(by_seq.len(), log.len(), "every change published");
    for c in &log {
        assert_eq!(by_seq[&c.seq], serde_json::to_value(c).unwrap());
    }

    // Every dead letter, with its reason in a header and its original bytes.
    let letters = read_topic(&brokers, "tagstream-dead-letters", rejected.len());
    assert!(letters.len() >= rejected.len());
    for (d, (_, payload, headers)) in rejected.iter().zip(&letters) {
        assert_eq!(&d.raw, payload);
        assert!(
            headers.contains(&("tagstream-reason".to_owned(), d.reason.clone())),
            "{headers:?}"
        );
        assert!(
            headers.contains(&("tagstream-reason-code".to_owned(), d.code.clone())),
            "{headers:?}"
        );
        assert!(processor::Rejection::CODES.contains(&d.code.as_str()));
    }
    drop(consumed);
    second.workers.stop(std::time::Duration::from_secs(10));
}

/// Stopping lets the publishers send everything committed first: a store whose changes
/// and dead letters were never published (the first run had no output topics) is started
/// with them and stopped at once, and both topics end up holding every entry.
#[test]
fn stopping_publishes_everything_committed_first() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 3, 1).unwrap();
    cluster.create_topic("tag-changes", 3, 1).unwrap();
    cluster.create_topic("tagstream-dead-letters", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let lines = stream(2_000);
    produce(&brokers, "events", &lines);
    let dir = TempDir::new("kafka-drain");
    let first = run_with(dir.path(), &brokers, "g-drain", |s| {
        s.changes_topic = None;
        s.dlq_topic = None;
    });
    wait_until("the stream", || first.seen.load(Ordering::SeqCst) == lines.len());
    assert_eq!(first.workers.stop(Duration::from_secs(10)), 0);
    drop(first.engine);
    assert_eq!(topic_size(&brokers, "tag-changes", 3), 0);

    let second = run(dir.path(), &brokers, "g-drain");
    assert_eq!(
        second.workers.stop(Duration::from_secs(30)),
        0,
        "nothing cut short"
    );
    let engine = second.engine.lock().unwrap();
    let log = engine.changes(0, usize::MAX).unwrap();
    let letters = engine.dead_letters(None, usize::MAX).unwrap();
    assert!(log.len() > 100 && !letters.is_empty());
    // Everything is in the topics by the time stop returned: no reader waits for it.
    assert_eq!(topic_size(&brokers, "tag-changes", 3), log.len() as i64);
    assert_eq!(
        topic_size(&brokers, "tagstream-dead-letters", 1),
        letters.len() as i64
    );
    let published: std::collections::BTreeSet<u64> = read_topic(&brokers, "tag-changes", log.len())
        .iter()
        .map(|(_, payload, _)| {
            serde_json::from_slice::<serde_json::Value>(payload).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(published, log.iter().map(|c| c.seq).collect());
}

/// A run killed before the group's first auto-commit leaves the group without committed
/// offsets while the store knows exactly where each partition stands. On the next
/// assignment the stored offsets become the group's too — also for partitions with nothing
/// new to read, which no batch would ever commit — so lag tools tell the truth.
#[test]
fn offsets_kept_in_the_store_become_the_groups_committed_offsets_on_assignment() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 3, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "events", &stream(300));
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "after-a-crash")
        .create()
        .unwrap();
    let ends: Vec<i64> = (0..3)
        .map(|p| {
            probe
                .fetch_watermarks("events", p, Duration::from_secs(5))
                .unwrap()
                .1
        })
        .collect();
    assert!(
        ends.iter().all(|e| *e > 0),
        "every partition has messages: {ends:?}"
    );

    let dir = TempDir::new("kafka-group-offsets");
    {
        let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
        let positions: Vec<(String, u64)> = ends
            .iter()
            .enumerate()
            .map(|(p, end)| (kafka::source_name("events", p as i32), *end as u64))
            .collect();
        engine.ingest_from::<&str, String>(&[], &positions).unwrap();
    }
    let running = run_with(dir.path(), &brokers, "after-a-crash", |s| {
        s.client_options
            .insert("auto.commit.interval.ms".into(), "100".into());
    });
    wait_until("the consumer to be assigned", || running.status.ready().is_ok());
    let committed = || {
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition("events", p);
        }
        let done = probe.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
        (0..3)
            .map(|p| match done.find_partition("events", p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect::<Vec<i64>>()
    };
    wait_until("the group's committed offsets to reach the stored ones", || {
        committed() == ends
    });
    assert_eq!(running.seen.load(Ordering::SeqCst), 0, "nothing was read again");
    running.workers.stop(std::time::Duration::from_secs(10));
}

#[test]
fn a_second_member_in_the_group_is_reported_not_silently_split() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = TempDir::new("kafka-two-members");
    let first = run(dir.path(), &brokers, "shared");
    wait_until("the first member to own the topic", || {
        first.status.ready().is_ok()
    });
    assert_eq!(first.status.assigned_partitions(), 2);

    // Another process joins the same group and takes a partition.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (brokers, stop) = (brokers.clone(), stop.clone());
        std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "shared")
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "500")
                .create()
                .unwrap();
            consumer.subscribe(&["events"]).unwrap();
            while !stop.load(Ordering::SeqCst) {
                consumer.poll(Duration::from_millis(50));
            }
        })
    };
    wait_until("the split to be reported", || {
        first
            .status
            .ready()
            .is_err_and(|e| e.contains("another member joined the consumer group"))
    });
    assert_eq!(first.status.assigned_partitions(), 1);

    // When it leaves, this process owns the whole topic again and is ready.
    stop.store(true, Ordering::SeqCst);
    other.join().unwrap();
    wait_until("the topic to come back", || first.status.ready().is_ok());
    first.workers.stop(std::time::Duration::from_secs(10));
}

/// `processor::partition::partition_of` is the partition Kafka's default partitioner picks
/// for a key: checked against librdkafka's `murmur2` partitioner on a real (mock) broker.
#[test]
fn the_engine_partition_of_a_customer_is_the_kafka_partition_of_its_key() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("keyed", 6, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("partitioner", "murmur2")
        .create()
        .unwrap();
    let keys: Vec<String> = (0..300)
        .map(|i| format!("13800{i:06}"))
        .chain(["杭州-会员-7".to_owned()])
        .collect();
    for key in &keys {
        producer
            .send(BaseRecord::to("keyed").key(key.as_bytes()).payload("x"))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "keyed-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["keyed"]).unwrap();
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen < keys.len() && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let key = m.key().unwrap();
            assert_eq!(
                m.partition() as u32,
                processor::partition::partition_of(key, 6),
                "{}",
                String::from_utf8_lossy(key)
            );
            seen += 1;
        }
    }
    assert_eq!(seen, keys.len());
}

/// A tracking plan judges events from Kafka as it does over HTTP: every property-level
/// class in each mode, consumed through the service's Kafka edge — `allow` keeps the
/// event as sent, `strip` drops the offending property, `block` dead-letters it (the class
/// as its code, on the dead-letter topic too) — with the valid events of the same batches
/// applied, and each violation counted under the source `kafka`; the whole-event gates
/// (unplanned type, unknown top-level field, out of retention) in both of their modes.
#[test]
fn plan_violations_from_kafka_are_kept_stripped_or_blocked_and_counted() {
    plan_over_kafka("allow");
    plan_over_kafka("block");
}

fn plan_over_kafka(gates: &str) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 1, 1).unwrap();
    cluster.create_topic("tag-changes", 1, 1).unwrap();
    cluster.create_topic("tagstream-dead-letters", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let mut plan = format!(
        "[defaults]\nmode = \"block\"\nunplanned_events = \"{gates}\"\nunknown_top_level = \"{gates}\"\nout_of_retention = \"{gates}\"\n"
    );
    for mode in ["allow", "strip", "block"] {
        plan += &format!(
            "[events.pay_{mode}]\nmode = \"{mode}\"\nadditional_properties = false\n\
             properties.amount = {{ type = \"decimal\", required = true }}\n\
             properties.channel = {{ type = \"enum\", values = [\"app\"] }}\n\
             properties.order_id = {{ type = \"string\", pattern = \"o[0-9]+\", max_length = 4 }}\n"
        );
    }
    let cases = [
        (
            "datatype_mismatch",
            serde_json::json!({"amount": "1"}),
            Some("amount"),
        ),
        (
            "enum",
            serde_json::json!({"amount": 1, "channel": "web"}),
            Some("channel"),
        ),
        (
            "pattern",
            serde_json::json!({"amount": 1, "order_id": "x1"}),
            Some("order_id"),
        ),
        (
            "too_long",
            serde_json::json!({"amount": 1, "order_id": "o1234"}),
            Some("order_id"),
        ),
        (
            "additional_properties",
            serde_json::json!({"amount": 1, "coupon": "c"}),
            Some("coupon"),
        ),
        ("required_missing", serde_json::json!({"channel": "app"}), None),
    ];
    let mut lines = Vec::new();
    for mode in ["allow", "strip", "block"] {
        for (class, props, _) in &cases {
            lines.push(
                serde_json::json!({"customer_id": format!("{mode}-{class}"), "type": format!("pay_{mode}"),
                                   "ts": 1_744_000_000_000i64, "props": props})
                .to_string(),
            );
            lines.push(
                serde_json::json!({"customer_id": format!("ok-{mode}-{class}"), "type": format!("pay_{mode}"),
                                   "ts": 1_744_000_000_000i64, "props": {"amount": 3}})
                .to_string(),
            );
        }
    }
    // The whole-event gates: an unplanned type, an unknown top-level field and an event
    // older than the retention.
    lines.push(
        r#"{"customer_id": "gate-1", "type": "pay_blok", "ts": 1744000000000, "props": {"amount": 1}}"#
            .into(),
    );
    lines.push(r#"{"customer_id": "gate-2", "type": "pay_allow", "ts": 1744000000000, "props": {"amount": 1}, "profle": {}}"#.into());
    lines.push(
        r#"{"customer_id": "gate-3", "type": "pay_allow", "ts": 1700000000000, "props": {"amount": 1}}"#
            .into(),
    );
    produce(&brokers, "events", &lines);
    let gate_classes = ["unplanned_event", "unknown_top_level_field", "out_of_retention"];
    let blocked_gates = if gates == "block" { gate_classes.len() } else { 0 };

    let dir = TempDir::new(&format!("kafka-plan-{gates}"));
    let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
    engine.set_plan(Some(Arc::new(rules::TrackingPlan::parse(&plan).unwrap())));
    let (handle, thread) = processor::EngineHandle::spawn(engine, processor::ServiceConfig::default());
    let mut settings = KafkaSettings::new(&brokers, "events", format!("g-plan-{gates}"));
    settings
        .client_options
        .insert("session.timeout.ms".into(), "6000".into());
    let status = Arc::new(KafkaStatus::default());
    let workers = kafka::start(
        settings,
        handle.reader().clone(),
        handle.kafka_apply(),
        status.clone(),
        None,
    )
    .unwrap();
    let letters = read_topic(&brokers, "tagstream-dead-letters", cases.len() + blocked_gates);
    let mut codes: Vec<String> = letters
        .iter()
        .map(|(_, _, headers)| {
            headers
                .iter()
                .find(|(k, _)| k == "tagstream-reason-code")
                .map(|(_, v)| v.clone())
                .unwrap()
        })
        .collect();
    codes.sort();
    let mut want: Vec<&str> = cases.iter().map(|(c, _, _)| *c).collect();
    if gates == "block" {
        want.extend(gate_classes);
    }
    want.sort();
    assert_eq!(codes, want);
    wait_until("every line applied", || {
        handle.call_blocking(|e| e.customer_ids().unwrap().len()).unwrap()
            == lines.len() - cases.len() - blocked_gates
    });
    workers.stop(Duration::from_secs(10));
    for (class, props, concerned) in &cases {
        let (kept, stripped, blocked) = handle
            .call_blocking({
                let class = *class;
                move |e| {
                    let props = |id: &str| {
                        e.timeline(id, None, 1).unwrap().map(|events| {
                            events[0]
                                .event
                                .props
                                .iter()
                                .map(|(k, _)| k.to_owned())
                                .collect::<Vec<_>>()
                        })
                    };
                    (
                        props(&format!("allow-{class}")),
                        props(&format!("strip-{class}")),
                        props(&format!("block-{class}")),
                    )
                }
            })
            .unwrap();
        let sent: Vec<String> = props.as_object().unwrap().keys().cloned().collect();
        assert_eq!(kept.as_ref(), Some(&sent), "allow keeps {class}");
        let without: Vec<String> = sent
            .iter()
            .filter(|k| Some(k.as_str()) != *concerned)
            .cloned()
            .collect();
        assert_eq!(stripped.as_ref(), Some(&without), "strip drops {class}");
        assert_eq!(blocked, None, "block rejects {class}");
    }
    let report = handle
        .reader()
        .intake()
        .quality
        .violations(i64::MIN, &processor::quality::ViolationFilter::default());
    assert_eq!(report.violations.len(), cases.len() * 3 + 3);
    for row in &report.violations {
        assert_eq!((row.key.source.as_str(), row.count), ("kafka", 1), "{row:?}");
        let blocked = if gate_classes.contains(&row.key.class.as_str()) {
            gates == "block"
        } else {
            row.key.event_type == "pay_block"
        };
        assert_eq!(row.blocked, u64::from(blocked), "{row:?}");
    }
    for class in gate_classes {
        assert_eq!(report.by_class[class], 1, "{class}");
    }
    drop(handle);
    thread.join().unwrap();
}

/// A mock broker with the events, changes, dead-letter and state topics, `partitions` each
/// (one for the dead letters).
fn state_cluster(partitions: u32) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", partitions as i32, 1).unwrap();
    cluster.create_topic("tag-changes", partitions as i32, 1).unwrap();
    cluster.create_topic("tagstream-dead-letters", 1, 1).unwrap();
    cluster.create_topic("state", partitions as i32, 1).unwrap();
    cluster
}

/// The tests' engine settings, keeping the state changelog of `partitions`.
fn keeping(partitions: u32) -> EngineConfig {
    EngineConfig {
        partitions,
        changelog: true,
        ..config()
    }
}

/// The state changelog on a broker (issue #21): a store keeping it publishes each
/// partition's deltas to that partition of the state topic; a new
/// store restored from the topic alone is the same store, and consuming the events topic
/// from there (in another group) reads nothing twice and loses nothing: its end is a direct
/// run's.
#[test]
fn a_store_restored_from_the_state_topic_resumes_from_kafka_without_loss() {
    const PARTITIONS: u32 = 4;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(3_000);
    produce(&brokers, "events", &lines[..2_000]);

    // A state topic with fewer partitions than the engine's is refused, naming both.
    cluster.create_topic("state-too-small", 2, 1).unwrap();
    let mut small = KafkaSettings::new(&brokers, "events", "g-check");
    small.state_topic = Some("state-too-small".into());
    let err = kafka::check_state_topic(&small, PARTITIONS, Duration::from_secs(10)).unwrap_err();
    assert!(
        err.contains("has 2 partitions") && err.contains("at least 4"),
        "{err}"
    );
    small.state_topic = Some("state".into());
    kafka::check_state_topic(&small, PARTITIONS, Duration::from_secs(10)).unwrap();
    // So is an events topic whose partitions are not the engine's: members of a group own
    // engine partitions as Kafka assigns the topic's.
    cluster.create_topic("events-of-3", 3, 1).unwrap();
    small.topic = "events-of-3".into();
    let err = kafka::check_state_topic(&small, PARTITIONS, Duration::from_secs(10)).unwrap_err();
    assert!(
        err.contains("`events-of-3` has 3 partitions and [engine] partitions is 4"),
        "{err}"
    );

    let dir = TempDir::new("kafka-state-source");
    let first = run_engine(
        Engine::open(dir.path(), Some(RULES), keeping(PARTITIONS)).unwrap(),
        &brokers,
        "g-state",
        |s| s.state_topic = Some("state".into()),
    );
    wait_until("the first 2000 lines", || {
        first.seen.load(Ordering::SeqCst) == 2_000
    });
    let reader = first.engine.lock().unwrap().reader();
    wait_until("the outbox to be published", || {
        reader.changelog_unconfirmed(1).unwrap() == 0
    });
    first.workers.stop(Duration::from_secs(10));
    let source = first.engine.lock().unwrap();
    let offsets = source.reader().source_offsets().unwrap();
    assert_eq!(offsets.len(), PARTITIONS as usize, "{offsets:?}");

    let settings = KafkaSettings::new(&brokers, "events", "g-state-restore");
    let restored_dir = TempDir::new("kafka-state-restored");
    let mut restored = Engine::open(restored_dir.path(), Some(RULES), keeping(PARTITIONS)).unwrap();
    for p in 0..PARTITIONS {
        let heard = std::cell::Cell::new(0);
        // Odd partitions read as a member taking them over does: marked as the restoring
        // store's own, read to the mark; even ones to the end the broker names, as an
        // offline restore does.
        let writer = kafka::state_writer(&restored.reader()).unwrap();
        let owner = (p % 2 == 1).then_some(writer);
        let kafka::StateRead {
            restore,
            incomplete,
            next_offset,
        } = kafka::read_state_partition(
            &settings,
            "state",
            p,
            PARTITIONS,
            owner,
            Duration::from_secs(10),
            &|records| heard.set(records),
        )
        .unwrap();
        assert_eq!(incomplete, 0);
        assert!(restore.deltas > 0, "partition {p}");
        // Every record read, the mark too when one was written: the next offset is the
        // partition's end.
        assert_eq!(
            next_offset as u64, restore.records,
            "partition {p}: the offset after the last record"
        );
        assert_eq!(
            heard.get(),
            restore.records,
            "the progress ends at every record read"
        );
        restored.restore_partition(&restore).unwrap();
    }
    assert_eq!(state(&restored), state(&source));
    assert_eq!(restored.reader().source_offsets().unwrap(), offsets);
    assert_eq!(restored.clock(), source.clock());
    drop(source);
    drop(first.engine);

    produce(&brokers, "events", &lines[2_000..]);
    let second = run_engine(restored, &brokers, "g-state-2", |_| {});
    let rest = lines.len() - 2_000;
    wait_until("the remaining lines", || {
        second.seen.load(Ordering::SeqCst) == rest
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(second.seen.load(Ordering::SeqCst), rest, "nothing consumed twice");
    let direct_dir = TempDir::new("kafka-state-direct");
    let mut direct = Engine::open(direct_dir.path(), Some(RULES), config()).unwrap();
    direct.ingest(&lines).unwrap();
    assert_eq!(state(&second.engine.lock().unwrap()), state(&direct));
    second.workers.stop(Duration::from_secs(10));
}

/// The state topic never runs ahead of the changes topic (issue #21): a node that died
/// after its state was confirmed but before the changes that state counts would leave its
/// successor nothing to make them again from, and consumers of `tag-changes` would never
/// see them. While the changes topic takes nothing, the state topic gets nothing either;
/// once it takes them, both are published whole.
#[test]
fn the_state_topic_waits_for_the_changes_its_commits_made() {
    const PARTITIONS: u32 = 2;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(600);
    cluster
        .topic_error(
            "tag-changes",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        )
        .unwrap();
    produce(&brokers, "events", &lines);
    let dir = TempDir::new("kafka-state-after-changes");
    let running = run_engine(
        Engine::open(dir.path(), Some(RULES), keeping(PARTITIONS)).unwrap(),
        &brokers,
        "g-state-after-changes",
        |s| s.state_topic = Some("state".into()),
    );
    wait_until("the stream", || {
        running.seen.load(Ordering::SeqCst) == lines.len()
    });
    let reader = running.engine.lock().unwrap().reader();
    let made = reader.changes(0, usize::MAX).unwrap().len();
    assert!(made > 100, "{made} changes");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        topic_size(&brokers, "state", PARTITIONS as i32),
        0,
        "no delta published before the changes of its commit"
    );
    assert!(reader.changelog_unconfirmed(1).unwrap() > 0);

    cluster
        .topic_error(
            "tag-changes",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        )
        .unwrap();
    wait_until("the outbox to be published", || {
        reader.changelog_unconfirmed(1).unwrap() == 0
    });
    assert_eq!(
        topic_size(&brokers, "tag-changes", PARTITIONS as i32),
        made as i64,
        "every change published by the time the last delta was"
    );
    assert!(topic_size(&brokers, "state", PARTITIONS as i32) > 0);
    running.workers.stop(Duration::from_secs(10));
}

/// Produces `records` (partition, JSON) to `topic`, each to the partition named.
fn produce_to(brokers: &str, topic: &str, records: &[(i32, String)]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for (partition, json) in records {
        producer
            .send(
                BaseRecord::<(), str>::to(topic)
                    .partition(*partition)
                    .payload(json),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

fn numbered(partition: u32, pseq: u64, at: i64, cause: &str) -> (i32, String) {
    let json = serde_json::json!({
        "seq": pseq, "partition": partition, "pseq": pseq, "customer_id": format!("c{partition}"),
        "tag": "t", "op": "add", "at": at, "cause": cause,
    });
    (partition as i32, json.to_string())
}

/// Reads the whole group log from `cursor`, `limit` at a time: each change's
/// `(partition, pseq, cause)` in the order given, and the cursor at the end.
fn group_log(
    reader: &processor::ReadHandle,
    mut cursor: Vec<u64>,
    limit: usize,
) -> (Vec<(u64, u64, String)>, Vec<u64>) {
    let mut out = Vec::new();
    loop {
        match reader.group_log_page(&cursor, limit).unwrap() {
            processor::GroupPage::Changes {
                changes,
                cursor: next,
            } => {
                assert!(changes.len() <= limit);
                if changes.is_empty() {
                    return (out, cursor);
                }
                for json in changes {
                    let c: serde_json::Value = serde_json::from_slice(&json).unwrap();
                    out.push((
                        c["partition"].as_u64().unwrap(),
                        c["pseq"].as_u64().unwrap(),
                        c["cause"].as_str().unwrap().to_owned(),
                    ));
                }
                cursor = next;
            }
            gone => panic!("{gone:?}"),
        }
    }
}

/// The group's change log (issue #21): every node reads the changes topic into its store,
/// one entry per `(partition, pseq)` — a change a node made again after a take-over is the
/// entry its first copy made — and pages it by a cursor of each partition's last number:
/// each partition's changes in order, partitions merged by `at`. The reader resumes from
/// the offsets kept with the entries, and retention answers an old cursor with the oldest.
#[test]
fn the_group_log_holds_each_numbered_change_once_in_order_and_resumes() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("tag-changes", 2, 1).unwrap();
    cluster.create_topic("tag-changes-of-3", 3, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = TempDir::new("kafka-group-log");
    let engine = Engine::open(dir.path(), Some(RULES), keeping(2)).unwrap();
    let reader = engine.reader();
    let settings = KafkaSettings::new(&brokers, "events", "g-group-log");
    let err =
        kafka::group_log::follow(&settings, "tag-changes-of-3", reader.clone(), Arc::default()).unwrap_err();
    assert!(
        err.contains("has 3 partitions and [engine] partitions is 2"),
        "{err}"
    );

    produce_to(
        &brokers,
        "tag-changes",
        &[
            numbered(0, 1, 100, "event"),
            numbered(0, 2, 300, "event"),
            numbered(0, 3, 500, "event"),
            // Partition 0 taken over after its state at pseq 1: 2 and 3 made again.
            numbered(0, 2, 300, "again"),
            numbered(0, 3, 500, "again"),
            numbered(0, 4, 600, "event"),
            numbered(1, 1, 200, "event"),
            numbered(1, 2, 400, "event"),
            // A change of a node outside a group: no number, not the group's.
            (
                1,
                r#"{"seq":9,"customer_id":"x","tag":"t","op":"add","at":1,"cause":"event"}"#.into(),
            ),
        ],
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = kafka::group_log::follow(&settings, "tag-changes", reader.clone(), stop.clone()).unwrap();
    let expected = vec![
        (0, 1, "event".to_owned()),
        (1, 1, "event".to_owned()),
        (0, 2, "event".to_owned()),
        (1, 2, "event".to_owned()),
        (0, 3, "event".to_owned()),
        (0, 4, "event".to_owned()),
    ];
    wait_until("the group log", || {
        group_log(&reader, vec![0, 0], 100).0.len() == expected.len()
    });
    for limit in [1, 2, 5, 100] {
        let (log, end) = group_log(&reader, vec![0, 0], limit);
        assert_eq!(log, expected, "pages of {limit}");
        assert_eq!(end, vec![4, 2]);
    }
    let (rest, _) = group_log(&reader, vec![2, 1], 100);
    assert_eq!(
        rest,
        expected[3..],
        "from a cursor: what follows it in each partition"
    );
    let text = processor::encode_group_cursor(&[2, 1]);
    assert_eq!(processor::decode_group_cursor(&text, 2), Ok(vec![2, 1]));
    assert!(processor::decode_group_cursor(&text, 3).is_err());
    assert!(processor::decode_group_cursor("2.1", 2)
        .unwrap_err()
        .contains("bad cursor"));
    stop.store(true, Ordering::SeqCst);
    follower.join().unwrap();
    assert_eq!(
        reader.group_log_offsets().unwrap(),
        BTreeMap::from([(0, 6), (1, 3)])
    );

    // Read on from the kept offsets: only what is new.
    produce_to(&brokers, "tag-changes", &[numbered(1, 3, 700, "event")]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = kafka::group_log::follow(&settings, "tag-changes", reader.clone(), stop.clone()).unwrap();
    wait_until("the new change", || {
        group_log(&reader, vec![4, 2], 100).0.len() == 1
    });
    stop.store(true, Ordering::SeqCst);
    follower.join().unwrap();
    assert_eq!(
        reader.group_log_offsets().unwrap(),
        BTreeMap::from([(0, 6), (1, 4)])
    );

    // Retention by count (two entries over two partitions: one each, the last).
    let retention = processor::LogRetention {
        max_age_ms: i64::MAX / 2,
        max_entries: 2,
    };
    // A reader holding the log at [1, 2] (a webhook delivering from it) keeps what follows.
    reader.hold_group_log("a reader", &[1, 2]);
    assert_eq!(reader.group_log_trim(retention).unwrap(), 3);
    assert_eq!(reader.group_log_start().unwrap(), vec![1, 2]);
    let (held, _) = group_log(&reader, vec![1, 2], 10);
    assert_eq!(held.len(), 4, "everything after the hold: {held:?}");
    reader.release_group_log("a reader");
    assert_eq!(reader.group_log_trim(retention).unwrap(), 2);
    assert_eq!(reader.group_log_start().unwrap(), vec![3, 2]);
    match reader.group_log_page(&[1, 2], 10).unwrap() {
        processor::GroupPage::Gone { partition, oldest } => {
            assert_eq!((partition, oldest), (0, vec![3, 2]))
        }
        page => panic!("{page:?}"),
    }
    let (log, _) = group_log(&reader, vec![3, 2], 10);
    assert_eq!(log, vec![(0, 4, "event".to_owned()), (1, 3, "event".to_owned())]);

    // Under a number held: the same change made again (its cause and `at` aside), and
    // other changes — made under other rules, or of another customer — counted apart; the
    // first stays.
    let record = |customer: &str, version: Option<u64>, at: i64, cause: &str| {
        let mut json = serde_json::json!({
            "seq": 99, "partition": 1, "pseq": 3, "customer_id": customer,
            "tag": "t", "op": "add", "at": at, "cause": cause,
        });
        if let Some(version) = version {
            json["rules_version"] = version.into();
        }
        processor::GroupRecord {
            partition: 1,
            pseq: 3,
            at,
            json: json.to_string().into_bytes(),
        }
    };
    let outcome = reader
        .group_log_append(
            &[
                record("c1", None, 701, "again"),
                record("c1", Some(2), 700, "event"),
                record("c9", None, 700, "event"),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
    assert_eq!((outcome.added, outcome.repeated, outcome.conflicting), (0, 3, 2));
    let (log, _) = group_log(&reader, vec![3, 2], 10);
    assert_eq!(log, vec![(0, 4, "event".to_owned()), (1, 3, "event".to_owned())]);
}

/// Partition `partition` of `topic`, every record in offset order (up to the end the broker
/// names: the mock broker's is exact), with the state changelog's commit header.
fn read_partition(brokers: &str, topic: &str, partition: i32) -> Vec<tests::LogRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{topic}-{partition}"))
        .create()
        .unwrap();
    let (_, end) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(5))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (out.len() as i64) < end {
        assert!(Instant::now() < deadline, "read {} of {end} records", out.len());
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            let commit = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == processor::changelog::COMMIT_HEADER)
                    .map(|h| String::from_utf8_lossy(h.value.unwrap()).parse::<u64>().unwrap())
            });
            out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().map(<[u8]>::to_vec),
                commit,
            ));
        }
    }
    out
}

/// Checkpoints keep the state topic bounded (issue #21): with a small checkpoint size, the
/// publisher folds each partition's confirmed deltas into one keyed record per key and a
/// marker, then tombstones the deltas, and the outbox keeps only what follows the last
/// checkpoint. The topic read whole, or as a compacting broker leaves it (tombstones kept,
/// or gone), restores the source store exactly: customers, input offsets, clock.
#[test]
fn checkpoints_bound_the_state_topic_which_restores_whole_or_compacted() {
    const PARTITIONS: u32 = 4;
    const CHECKPOINT: u64 = 8 << 10;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let all = stream(4_000);
    let (lines, more) = all.split_at(3_000);
    // Too few to fill a checkpoint: deltas the first store leaves unfolded.
    let (tail, more) = more.split_at(30);
    let dir = TempDir::new("kafka-checkpoints");
    let running = run_engine(
        Engine::open(dir.path(), Some(RULES), keeping(PARTITIONS)).unwrap(),
        &brokers,
        "g-checkpoints",
        |s| {
            s.state_topic = Some("state".into());
            s.state_checkpoint_bytes = CHECKPOINT;
            // Small commits: many deltas per partition between checkpoints.
            s.max_batch = 50;
        },
    );
    let reader = running.engine.lock().unwrap().reader();
    // In three parts, each published and checkpointed before the next: three checkpoints
    // of each partition at least.
    for part in lines.chunks(1_000) {
        let seen = running.seen.load(Ordering::SeqCst);
        produce(&brokers, "events", part);
        wait_until("the part", || {
            running.seen.load(Ordering::SeqCst) == seen + part.len()
        });
        wait_until("every delta confirmed and checkpointed down to the size", || {
            reader.changelog_unconfirmed(1).unwrap() == 0
                && reader
                    .changelog_publisher_state()
                    .unwrap()
                    .values()
                    .all(|(_, kept)| *kept < CHECKPOINT)
        });
    }
    produce(&brokers, "events", tail);
    wait_until("the tail", || {
        running.seen.load(Ordering::SeqCst) == lines.len() + tail.len()
    });
    wait_until("the tail's deltas confirmed", || {
        reader.changelog_unconfirmed(1).unwrap() == 0
    });
    running.workers.stop(Duration::from_secs(10));
    let source = running.engine.lock().unwrap();
    let offsets = source.reader().source_offsets().unwrap();
    assert_eq!(offsets.len(), PARTITIONS as usize, "{offsets:?}");

    let topic: Vec<Vec<tests::LogRecord>> = (0..PARTITIONS as i32)
        .map(|p| read_partition(&brokers, "state", p))
        .collect();
    for (p, records) in topic.iter().enumerate() {
        let markers = records.iter().filter(|r| r.0 == b"c").count();
        let deltas = records
            .iter()
            .filter(|r| r.0.starts_with(b"d/") && r.1.is_some())
            .count();
        let compacted = tests::compacted(records, false);
        let live_deltas = compacted.iter().filter(|r| r.0.starts_with(b"d/")).count();
        assert!(markers >= 3, "partition {p}: {markers} checkpoints");
        // Each checkpoint folds deltas of its own, at least its size of them.
        let commits: Vec<u64> = records
            .iter()
            .filter(|r| r.0 == b"c")
            .map(|r| {
                processor::changelog::Delta::decode(r.1.as_ref().unwrap())
                    .unwrap()
                    .commit
            })
            .collect();
        assert!(
            commits.windows(2).all(|w| w[0] < w[1]),
            "partition {p}: {commits:?}"
        );
        let delta_bytes: usize = records
            .iter()
            .filter(|r| r.0.starts_with(b"d/"))
            .filter_map(|r| r.1.as_ref().map(Vec::len))
            .sum();
        assert!(
            markers as u64 <= delta_bytes as u64 / CHECKPOINT,
            "partition {p}: {markers} checkpoints of {delta_bytes} bytes of deltas"
        );
        // Compacted, the topic holds a record per key and only the deltas after the last
        // checkpoint (those the outbox still keeps).
        let kept = source
            .reader()
            .changelog_deltas(p as u32, 0, usize::MAX)
            .unwrap()
            .len();
        assert_eq!(live_deltas, kept, "partition {p}");
        assert!(
            live_deltas * 4 < deltas,
            "partition {p}: {live_deltas} of {deltas} deltas left"
        );
    }
    type View = fn(&[tests::LogRecord]) -> Vec<tests::LogRecord>;
    let views: [(&str, View); 3] = [
        ("whole", |r| r.to_vec()),
        ("compacted", |r| tests::compacted(r, true)),
        ("compacted, tombstones gone", |r| tests::compacted(r, false)),
    ];
    let restore_all = |name: &str, topic: &[Vec<tests::LogRecord>], view: View| {
        let dir = TempDir::new("kafka-checkpoints-restored");
        let mut restored = Engine::open(dir.path(), Some(RULES), keeping(PARTITIONS)).unwrap();
        for (p, records) in topic.iter().enumerate() {
            let mut assembler = processor::changelog::Assembler::new(p as u32, PARTITIONS);
            for (key, value, commit) in view(records) {
                assembler.add(&key, value.as_deref(), commit).unwrap();
            }
            let (restore, incomplete) = assembler.finish();
            assert_eq!(incomplete, 0, "{name}");
            restored.restore_partition(&restore).unwrap();
        }
        (dir, restored)
    };
    let mut taken_over = None;
    for (name, view) in views {
        let (dir, restored) = restore_all(name, &topic, view);
        assert_eq!(state(&restored), state(&source), "{name}");
        assert_eq!(restored.reader().source_offsets().unwrap(), offsets, "{name}");
        assert_eq!(restored.clock(), source.clock(), "{name}");
        taken_over.get_or_insert((dir, restored));
    }
    drop(source);
    drop(running.engine);

    // The store restored from the whole topic takes the partitions over and consumes on. Its
    // checkpoints fold what it restored, so the delta records the first store left after
    // its last checkpoints (in no outbox now) are tombstoned too: compacted, the topic then
    // holds only the new owner's deltas after its own last checkpoint.
    let (_dir, restored) = taken_over.unwrap();
    let first_owners: Vec<Vec<u8>> = topic
        .iter()
        .flat_map(|records| tests::compacted(records, false))
        .filter(|r| r.0.starts_with(b"d/"))
        .map(|r| r.0)
        .collect();
    assert!(
        !first_owners.is_empty(),
        "the first store left deltas after its checkpoints"
    );
    let second = run_engine(restored, &brokers, "g-checkpoints-2", |s| {
        s.state_topic = Some("state".into());
        s.state_checkpoint_bytes = CHECKPOINT / 4;
        s.max_batch = 50;
    });
    produce(&brokers, "events", more);
    wait_until("the new lines", || {
        second.seen.load(Ordering::SeqCst) == more.len()
    });
    let reader = second.engine.lock().unwrap().reader();
    wait_until("every first owner's delta tombstoned", || {
        reader.changelog_unconfirmed(1).unwrap() == 0 && {
            let live: Vec<Vec<u8>> = (0..PARTITIONS as i32)
                .flat_map(|p| tests::compacted(&read_partition(&brokers, "state", p), false))
                .map(|r| r.0)
                .collect();
            first_owners.iter().all(|key| !live.contains(key))
        }
    });
    second.workers.stop(Duration::from_secs(10));
    let owner = second.engine.lock().unwrap();
    let topic: Vec<Vec<tests::LogRecord>> = (0..PARTITIONS as i32)
        .map(|p| read_partition(&brokers, "state", p))
        .collect();
    for (p, records) in topic.iter().enumerate() {
        let live_deltas = tests::compacted(records, false)
            .iter()
            .filter(|r| r.0.starts_with(b"d/"))
            .count();
        let kept = owner
            .reader()
            .changelog_deltas(p as u32, 0, usize::MAX)
            .unwrap()
            .len();
        assert_eq!(
            live_deltas, kept,
            "partition {p}: only the new owner's unfolded deltas"
        );
    }
    let (_dir, again) = restore_all("after the take-over", &topic, views[2].1);
    assert_eq!(state(&again), state(&owner));
    assert_eq!(
        again.reader().source_offsets().unwrap(),
        owner.reader().source_offsets().unwrap()
    );
}

/// A partition let go and taken back (issue #21, the two halves of a move on one store): a
/// store publishing its changelog is refused the release while the broker has not confirmed
/// every delta of the partition; once it has, the customers, outbox, checkpoint and Kafka
/// offsets of the partition leave the store, and its publisher, running on, publishes
/// nothing for it meanwhile. Restored from the state topic, the partition is back as it
/// was; the store consumes on and ends like a direct run, and the topic restores it whole.
#[test]
fn a_released_partition_restored_from_the_state_topic_rejoins_without_loss() {
    const PARTITIONS: u32 = 4;
    const MOVED: u32 = 1;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(3_000);
    let dir = TempDir::new("kafka-release");
    let mut engine = Engine::open(dir.path(), Some(RULES), keeping(PARTITIONS)).unwrap();
    // Nothing published yet: the release is refused, and nothing leaves.
    engine.ingest(&lines[..10]).unwrap();
    let held = engine.reader().partition_counts(PARTITIONS).unwrap();
    let err = engine.release_partition(MOVED).unwrap_err().to_string();
    assert!(err.contains("not confirmed"), "{err}");
    assert_eq!(engine.reader().partition_counts(PARTITIONS).unwrap(), held);

    let running = run_engine(engine, &brokers, "g-release", |s| {
        s.state_topic = Some("state".into());
        s.state_checkpoint_bytes = 8 << 10;
        s.max_batch = 50;
    });
    produce(&brokers, "events", &lines[10..2_000]);
    wait_until("the first lines", || running.seen.load(Ordering::SeqCst) == 1_990);
    let reader = running.engine.lock().unwrap().reader();
    wait_until("every delta confirmed", || {
        reader.changelog_unconfirmed(1).unwrap() == 0
    });
    let before = state(&running.engine.lock().unwrap());
    let summary = running.engine.lock().unwrap().release_partition(MOVED).unwrap();
    assert!(summary.customers > 0);
    {
        let engine = running.engine.lock().unwrap();
        assert_eq!(
            engine.reader().partition_counts(PARTITIONS).unwrap()[MOVED as usize],
            0
        );
        assert!(engine
            .reader()
            .changelog_deltas(MOVED, 0, usize::MAX)
            .unwrap()
            .is_empty());
        let offsets = engine.reader().source_offsets().unwrap();
        assert!(
            !offsets.contains_key(&format!("kafka:events:{MOVED}")),
            "{offsets:?}"
        );
        assert_eq!(offsets.len(), PARTITIONS as usize - 1, "{offsets:?}");
    }
    // The publisher runs on: nothing more of the released partition reaches the topic.
    let published = read_partition(&brokers, "state", MOVED as i32);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_partition(&brokers, "state", MOVED as i32).len(),
        published.len()
    );

    let mut assembler = processor::changelog::Assembler::new(MOVED, PARTITIONS);
    for (key, value, commit) in &published {
        assembler.add(key, value.as_deref(), *commit).unwrap();
    }
    let (restore, _) = assembler.finish();
    running
        .engine
        .lock()
        .unwrap()
        .restore_partition(&restore)
        .unwrap();
    assert_eq!(state(&running.engine.lock().unwrap()), before);
    // What the restore put into the outbox for its take-over is in the topic already: the
    // publisher, reading its position again, sends none of it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_partition(&brokers, "state", MOVED as i32).len(),
        published.len()
    );

    produce(&brokers, "events", &lines[2_000..]);
    wait_until("the rest", || {
        running.seen.load(Ordering::SeqCst) == lines.len() - 10
    });
    wait_until("every delta confirmed again", || {
        reader.changelog_unconfirmed(1).unwrap() == 0
    });
    running.workers.stop(Duration::from_secs(10));
    let direct_dir = TempDir::new("kafka-release-direct");
    let mut direct = Engine::open(direct_dir.path(), Some(RULES), config()).unwrap();
    direct.ingest(&lines).unwrap();
    let store = running.engine.lock().unwrap();
    assert_eq!(state(&store), state(&direct));

    let again_dir = TempDir::new("kafka-release-again");
    let mut again = Engine::open(again_dir.path(), Some(RULES), keeping(PARTITIONS)).unwrap();
    for p in 0..PARTITIONS {
        let mut assembler = processor::changelog::Assembler::new(p, PARTITIONS);
        for (key, value, commit) in tests::compacted(&read_partition(&brokers, "state", p as i32), false) {
            assembler.add(&key, value.as_deref(), commit).unwrap();
        }
        again.restore_partition(&assembler.finish().0).unwrap();
    }
    assert_eq!(state(&again), state(&store));
    assert_eq!(
        again.reader().source_offsets().unwrap(),
        store.reader().source_offsets().unwrap()
    );
}

/// A member of a consumer group of several (issue #21): an engine service with the state
/// topic and its partition host.
struct Member {
    handle: processor::EngineHandle,
    thread: std::thread::JoinHandle<()>,
    status: Arc<KafkaStatus>,
    workers: kafka::KafkaWorkers,
}

impl Member {
    fn join(dir: &std::path::Path, brokers: &str, group: &str, partitions: u32) -> Member {
        Member::join_with(dir, brokers, group, keeping(partitions))
    }

    /// [`Member::join`] with the engine's settings `config`.
    fn join_with(dir: &std::path::Path, brokers: &str, group: &str, config: EngineConfig) -> Member {
        let engine = Engine::open(dir, Some(RULES), config).unwrap();
        let (handle, thread) = processor::EngineHandle::spawn(engine, processor::ServiceConfig::default());
        let mut settings = KafkaSettings::new(brokers, "events", group);
        settings.state_topic = Some("state".into());
        settings.state_checkpoint_bytes = 8 << 10;
        settings.max_batch = 100;
        // The group's committed offsets tell a returning member its copy is stale: they
        // follow the stores closely here.
        for (key, value) in [
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
            ("auto.commit.interval.ms", "200"),
        ] {
            settings.client_options.insert(key.into(), value.into());
        }
        let status = Arc::new(KafkaStatus::default());
        let workers = kafka::start(
            settings,
            handle.reader().clone(),
            handle.kafka_apply(),
            status.clone(),
            Some(handle.partition_host()),
        )
        .unwrap();
        Member {
            handle,
            thread,
            status,
            workers,
        }
    }

    /// Events of the topic this store has taken in: the sum of its stored offsets.
    fn consumed(&self) -> u64 {
        self.handle.reader().source_offsets().unwrap().values().sum()
    }

    /// Customers held, per partition.
    fn counts(&self, partitions: u32) -> Vec<u64> {
        self.handle.reader().partition_counts(partitions).unwrap()
    }

    /// Every customer's view with the clock advanced to `now` first (each store's event
    /// clock is the greatest `ts` of its own partitions).
    fn state_at(&self, now: i64) -> BTreeMap<String, CustomerView> {
        self.handle
            .call_blocking(move |engine| {
                engine.advance_clock(now).unwrap();
                state(engine)
            })
            .unwrap()
    }

    /// Leaves the group; the customers it holds afterwards, per partition.
    fn leave(self, partitions: u32) -> Vec<u64> {
        let Member {
            handle,
            thread,
            workers,
            ..
        } = self;
        workers.stop(Duration::from_secs(10));
        let held = handle.reader().partition_counts(partitions).unwrap();
        drop(handle);
        thread.join().unwrap();
        held
    }
}

/// What one store makes of `lines`: its clock at the end and every customer's view.
fn direct_run(lines: &[String], name: &str) -> (i64, BTreeMap<String, CustomerView>) {
    let dir = TempDir::new(name);
    let mut direct = Engine::open(dir.path(), Some(RULES), config()).unwrap();
    direct.ingest(lines).unwrap();
    (direct.now(), state(&direct))
}

/// Waits until `a` and `b` own half of the `partitions` each, `b`'s restored; then each
/// partition must be held by exactly one of the two stores.
fn wait_split(a: &Member, b: &Member, partitions: u32) {
    let half = partitions as usize / 2;
    wait_until("the partitions split and restored", || {
        a.status.assigned_partitions() == half
            && b.status.assigned_partitions() == half
            && b.status.ready().is_ok()
    });
    let (held_a, held_b) = (a.counts(partitions), b.counts(partitions));
    for p in 0..partitions as usize {
        assert!(
            (held_a[p] == 0) != (held_b[p] == 0),
            "partition {p} must be held by exactly one store: {held_a:?} {held_b:?}"
        );
    }
}

/// Two members share a consumer group (issue #21): when the second joins, the first gives
/// up half of the partitions (cooperative-sticky: only those), each released once the
/// broker confirmed its deltas and restored by the second from the state topic before it
/// consumes them; each store then holds only its own partitions, and together they end
/// like one store that ingested the whole stream. When the second leaves, it keeps its
/// partitions (a shutdown is not a release), and the first restores them and ends alone
/// like the direct run.
#[test]
fn members_of_a_group_split_the_partitions_and_each_moves_with_its_state() {
    const PARTITIONS: u32 = 6;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(4_000);
    let (now, expected) = direct_run(&lines, "kafka-group-direct");

    produce(&brokers, "events", &lines[..2_000]);
    let (dir_a, dir_b) = (TempDir::new("kafka-group-a"), TempDir::new("kafka-group-b"));
    let a = Member::join(dir_a.path(), &brokers, "g-members", PARTITIONS);
    wait_until("the first member consumed the first half", || {
        a.consumed() == 2_000
    });
    assert_eq!(a.status.assigned_partitions(), PARTITIONS as usize);
    assert_eq!(a.status.ready(), Ok(()));

    let b = Member::join(dir_b.path(), &brokers, "g-members", PARTITIONS);
    wait_split(&a, &b, PARTITIONS);
    assert_eq!(a.consumed() + b.consumed(), 2_000);

    produce(&brokers, "events", &lines[2_000..]);
    wait_until("both consumed the rest", || {
        a.consumed() + b.consumed() == lines.len() as u64
    });
    let mut together = a.state_at(now);
    let of_b = b.state_at(now);
    assert!(of_b.keys().all(|id| !together.contains_key(id)));
    together.extend(of_b);
    assert_eq!(together, expected);

    // The second leaves: its store keeps its partitions; the first takes them back from
    // the state topic.
    let kept = b.counts(PARTITIONS);
    assert_eq!(b.leave(PARTITIONS), kept);
    wait_until("the first member owns every partition again", || {
        a.status.assigned_partitions() == PARTITIONS as usize && a.status.ready().is_ok()
    });
    wait_until("every offset back", || a.consumed() == lines.len() as u64);
    assert_eq!(a.state_at(now), expected);
    a.leave(PARTITIONS);
}

/// Every partition of the state topic restored into a new store: the state the topic holds.
fn restored_from_topic(brokers: &str, partitions: u32, now: i64) -> BTreeMap<String, CustomerView> {
    let dir = TempDir::new("kafka-group-topic");
    let mut store = Engine::open(dir.path(), Some(RULES), keeping(partitions)).unwrap();
    for p in 0..partitions {
        let mut assembler = processor::changelog::Assembler::new(p, partitions);
        for (key, value, commit) in read_partition(brokers, "state", p as i32) {
            assembler.add(&key, value.as_deref(), commit).unwrap();
        }
        store.restore_partition(&assembler.finish().0).unwrap();
    }
    store.advance_clock(now).unwrap();
    state(&store)
}

/// A member that left keeping its partitions, and comes back after another member consumed
/// them further, finds its copy stale (the group's committed offsets are past its own):
/// it drops the copy and restores the partitions from the state topic instead of resuming
/// from its old offsets, so nothing it publishes afterwards goes behind the other member's
/// deltas. Both stores and the state topic end like the direct run.
#[test]
fn a_member_returning_to_partitions_consumed_meanwhile_restores_them() {
    const PARTITIONS: u32 = 6;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(4_000);
    let (now, expected) = direct_run(&lines, "kafka-stale-direct");

    produce(&brokers, "events", &lines[..1_500]);
    let (dir_a, dir_b) = (TempDir::new("kafka-stale-a"), TempDir::new("kafka-stale-b"));
    let a = Member::join(dir_a.path(), &brokers, "g-stale", PARTITIONS);
    wait_until("the first member consumed the first part", || {
        a.consumed() == 1_500
    });
    let b = Member::join(dir_b.path(), &brokers, "g-stale", PARTITIONS);
    wait_split(&a, &b, PARTITIONS);
    b.leave(PARTITIONS);
    wait_until("the first member owns every partition again", || {
        a.status.assigned_partitions() == PARTITIONS as usize && a.status.ready().is_ok()
    });
    produce(&brokers, "events", &lines[1_500..2_800]);
    wait_until("the first member consumed the second part", || {
        a.consumed() == 2_800
    });
    // Its offsets reached the group (auto-commit every 200 ms).
    std::thread::sleep(Duration::from_millis(1_000));

    let b = Member::join(dir_b.path(), &brokers, "g-stale", PARTITIONS);
    // Whichever partitions it got back, none of its old copies is left beside the first
    // member's.
    wait_split(&a, &b, PARTITIONS);
    // Ready means restored: its offsets are the first member's, not those it left with.
    assert_eq!(a.consumed() + b.consumed(), 2_800);

    produce(&brokers, "events", &lines[2_800..]);
    wait_until("both consumed the rest", || {
        a.consumed() + b.consumed() == lines.len() as u64
    });
    let mut together = a.state_at(now);
    together.extend(b.state_at(now));
    assert_eq!(together, expected);
    a.leave(PARTITIONS);
    b.leave(PARTITIONS);
    assert_eq!(restored_from_topic(&brokers, PARTITIONS, now), expected);

    // The first comes back alone: the partitions it kept are resumed (nobody consumed
    // them since) and their timers fire again — none stays parked — and the others are
    // restored.
    let a = Member::join(dir_a.path(), &brokers, "g-stale", PARTITIONS);
    wait_until("the first member owns every partition", || {
        a.status.assigned_partitions() == PARTITIONS as usize && a.status.ready().is_ok()
    });
    assert_eq!(
        a.handle
            .call_blocking(|engine| engine.parked_partitions())
            .unwrap(),
        Vec::<u32>::new()
    );
    assert_eq!(a.consumed(), lines.len() as u64);
    assert_eq!(a.state_at(now), expected);
    a.leave(PARTITIONS);
}

/// Has the mock broker refuse every offset commit with `error` (until the test clears it),
/// so that `member`'s lease (two thirds of its 6 s session) runs out; then `more` is
/// produced and consumed, and its deltas stay unpublished.
fn run_out_the_lease(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    error: rdkafka::types::RDKafkaRespErr,
    member: &Member,
    more: &[String],
) {
    cluster.request_errors(rdkafka::types::RDKafkaApiKey::OffsetCommit, &[error; 20_000]);
    std::thread::sleep(Duration::from_millis(4_500));
    let before = member.consumed();
    produce(&cluster.bootstrap_servers(), "events", more);
    wait_until("the member consumed what followed", || {
        member.consumed() == before + more.len() as u64
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        member.handle.reader().changelog_unconfirmed(1).unwrap() > 0,
        "the lease ran out: what followed is not published"
    );
}

/// A rebalance that outlasts a member's lease (the coordinator refuses its renewing
/// commits: here the mock broker fails every offset commit for a while): its state
/// publisher stops, so a partition revoked from it can never have its last deltas
/// confirmed before the revocation returns. It is given up unreleased at once instead of
/// after the 30 s a release waits for each — which held the consumer, and the group's
/// rebalance, up for a minute and more — and its next owner restores what the state topic
/// has and consumes the rest again: the two stores end like one, and so does the topic.
#[test]
fn a_partition_revoked_after_the_lease_ran_out_is_handed_over_at_once() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    const PARTITIONS: u32 = 6;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(3_000);
    let (now, expected) = direct_run(&lines, "kafka-unleased-direct");

    produce(&brokers, "events", &lines[..1_000]);
    let (dir_a, dir_b) = (TempDir::new("kafka-unleased-a"), TempDir::new("kafka-unleased-b"));
    let a = Member::join(dir_a.path(), &brokers, "g-unleased", PARTITIONS);
    let reader = a.handle.reader().clone();
    wait_until("the first member consumed and published the first part", || {
        a.consumed() == 1_000 && reader.changelog_unconfirmed(1).unwrap() == 0
    });
    // Every commit refused from now on (until cleared below).
    run_out_the_lease(
        &cluster,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_COMMIT_OFFSET_SIZE,
        &a,
        &lines[1_000..2_000],
    );

    let joined = Instant::now();
    let b = Member::join(dir_b.path(), &brokers, "g-unleased", PARTITIONS);
    let half = PARTITIONS as usize / 2;
    wait_until("the partitions split and restored", || {
        a.status.assigned_partitions() == half
            && b.status.assigned_partitions() == half
            && b.status.ready().is_ok()
    });
    let took = joined.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the revoked partitions waited for deltas that could not be sent: split after {took:?}"
    );
    // The first member kept what it gave up (its copies are stale: the state topic lacks
    // their last deltas), and the new owner consumes on from what the topic has.
    let (held_a, held_b) = (a.counts(PARTITIONS), b.counts(PARTITIONS));
    assert!(
        (0..PARTITIONS as usize).any(|p| held_a[p] > 0 && held_b[p] > 0),
        "{held_a:?} {held_b:?}"
    );

    cluster.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    produce(&brokers, "events", &lines[2_000..]);
    // Once the new owner consumed them further (the group's offsets say so), the first
    // member drops the copies it kept.
    wait_until("both consumed the rest, and the kept copies are dropped", || {
        let (held_a, held_b) = (a.counts(PARTITIONS), b.counts(PARTITIONS));
        a.consumed() + b.consumed() == lines.len() as u64
            && (0..PARTITIONS as usize).all(|p| (held_a[p] == 0) != (held_b[p] == 0))
    });
    let mut together = a.state_at(now);
    let of_b = b.state_at(now);
    assert!(of_b.keys().all(|id| !together.contains_key(id)));
    together.extend(of_b);
    assert_eq!(together, expected);
    a.leave(PARTITIONS);
    b.leave(PARTITIONS);
    assert_eq!(restored_from_topic(&brokers, PARTITIONS, now), expected);
}

/// A member stopping while the coordinator refuses its commits as "rebalance in progress"
/// (here the mock broker, for every commit) and its lease has run out: it cannot publish
/// what is left before it rejoins, and it will not rejoin (its consumer polls no more), so
/// it leaves at once instead of waiting the 10 s a leave gives the publisher. What it did
/// not publish stays in its store: back in the group, it resumes from there, and the
/// store and the state topic end like one uninterrupted store.
#[test]
fn a_member_leaving_during_a_rebalance_that_outlasted_its_lease_does_not_wait() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    const PARTITIONS: u32 = 6;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(2_000);
    let (now, expected) = direct_run(&lines, "kafka-leave-direct");

    produce(&brokers, "events", &lines[..800]);
    let dir = TempDir::new("kafka-leave");
    let a = Member::join(dir.path(), &brokers, "g-leave", PARTITIONS);
    let reader = a.handle.reader().clone();
    wait_until("the member consumed and published the first part", || {
        a.consumed() == 800 && reader.changelog_unconfirmed(1).unwrap() == 0
    });
    run_out_the_lease(
        &cluster,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
        &a,
        &lines[800..1_400],
    );
    drop(reader);
    let stopping = Instant::now();
    let held = a.leave(PARTITIONS);
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the leave waited for deltas that could not be sent: {took:?}"
    );
    assert!(held.iter().all(|&n| n > 0), "every partition kept: {held:?}");

    cluster.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    let a = Member::join(dir.path(), &brokers, "g-leave", PARTITIONS);
    produce(&brokers, "events", &lines[1_400..]);
    let reader = a.handle.reader().clone();
    wait_until("the member consumed and published the rest", || {
        a.consumed() == lines.len() as u64 && reader.changelog_unconfirmed(1).unwrap() == 0
    });
    assert_eq!(a.state_at(now), expected);
    drop(reader);
    a.leave(PARTITIONS);
    assert_eq!(restored_from_topic(&brokers, PARTITIONS, now), expected);
}

/// Events produced to any partition — by a producer that keys them by something else than
/// their customer, or not at all (issue #21): a member of a group does not apply an event
/// whose customer is of a partition it does not own; it forwards it to that partition,
/// where its owner applies it. Each store then holds only the customers of the partitions it
/// owns, and together they end like one store that ingested the stream. A forward sent
/// twice (its batch read again before it was committed) is applied once, by the position
/// it was first read at, also without an `event_id`.
#[test]
fn events_read_from_another_customers_partition_are_applied_by_its_owner() {
    const PARTITIONS: u32 = 6;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(3_000);
    let (now, expected) = direct_run(&lines, "kafka-route-direct");

    let (dir_a, dir_b) = (TempDir::new("kafka-route-a"), TempDir::new("kafka-route-b"));
    let a = Member::join(dir_a.path(), &brokers, "g-route", PARTITIONS);
    let b = Member::join(dir_b.path(), &brokers, "g-route", PARTITIONS);
    let half = PARTITIONS as usize / 2;
    wait_until("the partitions split", || {
        a.status.assigned_partitions() == half
            && b.status.assigned_partitions() == half
            && a.status.ready().is_ok()
            && b.status.ready().is_ok()
    });
    // Every event in the partition after its customer's (a customer's events stay in order:
    // the stream re-sends some with altered content, and the first applied wins): each is
    // forwarded, also where its reader owns its customer's partition too.
    let spread: Vec<(i32, String)> = lines
        .iter()
        .map(|line| {
            let customer = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["customer_id"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let own = processor::partition::partition_of(customer.as_bytes(), PARTITIONS);
            (((own + 1) % PARTITIONS) as i32, line.clone())
        })
        .collect();
    produce_to(&brokers, "events", &spread);
    let settled = |a: &Member, b: &Member| {
        let size = topic_size(&brokers, "events", PARTITIONS as i32) as u64;
        // A batch's forwards are in the topic before the batch is committed.
        a.consumed() + b.consumed() == size
    };
    wait_until("every event and every forward consumed", || settled(&a, &b));

    let (held_a, held_b) = (a.counts(PARTITIONS), b.counts(PARTITIONS));
    let (owned_a, owned_b) = (a.status.owned_partitions(), b.status.owned_partitions());
    for p in 0..PARTITIONS {
        let (mine, theirs) = match owned_a.contains(&p) {
            true => (held_a[p as usize], held_b[p as usize]),
            false => (held_b[p as usize], held_a[p as usize]),
        };
        assert!(
            mine > 0 && theirs == 0,
            "partition {p} must be held by its owner only: {held_a:?} (owns {owned_a:?}) {held_b:?} (owns {owned_b:?})"
        );
    }
    let forwarded = topic_size(&brokers, "events", PARTITIONS as i32) as usize - lines.len();
    // All but the lines rejected where they are read, and those whose id normalises to
    // one of the partition they were put in.
    assert!(
        forwarded > lines.len() * 9 / 10,
        "{forwarded} of {} forwarded",
        lines.len()
    );
    let mut together = a.state_at(now);
    together.extend(b.state_at(now));
    assert_eq!(together, expected);

    // The same forward twice, of an event without an event_id.
    let customer = "forwarded-twice";
    let partition = processor::partition::partition_of(customer.as_bytes(), PARTITIONS) as i32;
    let line =
        format!(r#"{{"customer_id":"{customer}","type":"payment","ts":{now},"props":{{"amount":5}}}}"#);
    produce_forwarded(&brokers, partition, &line, "events:0:424242", 2);
    wait_until("the forwards consumed", || settled(&a, &b));
    let owner = match owned_a.contains(&(partition as u32)) {
        true => &a,
        false => &b,
    };
    let events = owner
        .handle
        .call_blocking(move |engine| engine.timeline(customer, None, 10).unwrap())
        .unwrap()
        .expect("the owner holds the forwarded customer");
    assert_eq!(events.len(), 1, "the forward sent twice is applied once");

    // An event without an event_id read outside its customer's partition by the member
    // that owns both is forwarded too; a forward of it made before (by a reader that died
    // before committing its batch) is the same event: once.
    let (owned, elsewhere) = match owned_a.len() > 1 {
        true => (&owned_a, &owned_b),
        false => (&owned_b, &owned_a),
    };
    let owner = if owned == &owned_a { &a } else { &b };
    let customer = (0..)
        .map(|n| format!("read-and-forwarded-{n}"))
        .find(|c| owned.contains(&processor::partition::partition_of(c.as_bytes(), PARTITIONS)))
        .unwrap();
    let own = processor::partition::partition_of(customer.as_bytes(), PARTITIONS);
    let read_in = *owned.iter().find(|p| **p != own).unwrap() as i32;
    assert!(!elsewhere.contains(&(read_in as u32)));
    let line =
        format!(r#"{{"customer_id":"{customer}","type":"payment","ts":{now},"props":{{"amount":7}}}}"#);
    let offset = high_watermark(&brokers, "events", read_in);
    produce_forwarded(
        &brokers,
        own as i32,
        &line,
        &format!("events:{read_in}:{offset}"),
        1,
    );
    produce_to(&brokers, "events", &[(read_in, line.clone())]);
    wait_until("the event and its forward consumed", || settled(&a, &b));
    let events = owner
        .handle
        .call_blocking(move |engine| engine.timeline(&customer, None, 10).unwrap())
        .unwrap()
        .expect("the owner holds the customer");
    assert_eq!(events.len(), 1, "forwarded again after a crash: applied once");

    // HTTP ingest decides what its node owns before the engine applies: a partition
    // released in between is parked there by then, and its events are handed back, not
    // applied — then sent to their partition like the others.
    let pick = |owned: &[u32], name: &str| {
        (0..)
            .map(|n| format!("{name}-{n}"))
            .find(|c| owned.contains(&processor::partition::partition_of(c.as_bytes(), PARTITIONS)))
            .unwrap()
    };
    let (mine, theirs) = (pick(&owned_a, "posted-mine"), pick(&owned_b, "posted-theirs"));
    let raw: Vec<Vec<u8>> = [&mine, &theirs]
        .iter()
        .map(|c| {
            format!(r#"{{"customer_id":"{c}","type":"payment","ts":{now},"props":{{"amount":3}}}}"#)
                .into_bytes()
        })
        .collect();
    let mut request = processor::IngestRequest::parse_with(raw, a.handle.intake(), "http");
    request.owned_only = true;
    let outcome = a
        .handle
        .call_blocking(move |engine| engine.ingest_group(vec![request]).unwrap().remove(0))
        .unwrap();
    assert_eq!((outcome.accepted, outcome.rejected), (1, 0));
    let moved: Vec<usize> = outcome.moved.iter().map(|m| m.index).collect();
    assert_eq!(moved, [1], "the event of the partition another member owns");
    let timeline = |member: &Member, customer: &str| {
        let customer = customer.to_owned();
        member
            .handle
            .call_blocking(move |engine| engine.timeline(&customer, None, 10).unwrap())
            .unwrap()
            .map_or(0, |events| events.len())
    };
    assert_eq!(timeline(&a, &mine), 1);
    assert_eq!(timeline(&a, &theirs), 0, "not applied where it was posted");
    let router = a.status.router().expect("a member of a group of two forwards");
    router.forward_moved(&outcome.moved, None).unwrap();
    wait_until("the moved event applied by its owner", || {
        timeline(&b, &theirs) == 1
    });
    a.leave(PARTITIONS);
    b.leave(PARTITIONS);
}

/// The offset the next message produced to `partition` of `topic` gets.
fn high_watermark(brokers: &str, topic: &str, partition: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(5))
        .unwrap()
        .1
}

/// Produces `line` `times` to `partition` of `events` as a member forwards it.
fn produce_forwarded(brokers: &str, partition: i32, line: &str, first_read: &str, times: usize) {
    produce_marked(
        brokers,
        partition,
        (kafka::route::FORWARDED_HEADER, first_read),
        line.as_bytes(),
        times,
    );
}

/// Produces `payload` `times` to `partition` of `events` with the header `name: value`.
fn produce_marked(brokers: &str, partition: i32, (name, value): (&str, &str), payload: &[u8], times: usize) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for _ in 0..times {
        let headers = OwnedHeaders::new().insert(Header {
            key: name,
            value: Some(value),
        });
        producer
            .send(
                BaseRecord::<(), [u8]>::to("events")
                    .partition(partition)
                    .payload(payload)
                    .headers(headers),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// Sends `frame` to the events topic as a handover of `absorbed` would be sent, `times`.
fn produce_handover(brokers: &str, partition: i32, absorbed: &str, frame: &[u8], times: usize) {
    produce_marked(
        brokers,
        partition,
        (kafka::route::HANDOVER_HEADER, absorbed),
        frame,
        times,
    );
}

/// A merge by hand of customers of two members' partitions (issue #21): the member owning
/// the absorbed customer's partition hands it over; its frame goes through the events topic
/// to the survivor's partition, where its owner takes it in that partition's order (events
/// before it first), once — a frame sent again merges nothing, one that is not a frame is
/// kept as a dead letter; and the members go on consuming. The survivor then holds both customers'
/// events, exactly as one store merging them holds them.
#[test]
fn a_customer_handed_over_between_members_is_taken_once_in_its_survivors_partition() {
    const PARTITIONS: u32 = 6;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let lines = stream(2_000);
    produce(&brokers, "events", &lines);
    let (dir_a, dir_b) = (TempDir::new("kafka-handover-a"), TempDir::new("kafka-handover-b"));
    let a = Member::join(dir_a.path(), &brokers, "g-handover", PARTITIONS);
    wait_until("the stream consumed", || a.consumed() == lines.len() as u64);
    let b = Member::join(dir_b.path(), &brokers, "g-handover", PARTITIONS);
    wait_split(&a, &b, PARTITIONS);
    let (owned_a, owned_b) = (a.status.owned_partitions(), b.status.owned_partitions());
    let customers = |m: &Member, owned: &[u32]| -> Vec<String> {
        let held = m.handle.call_blocking(|engine| state(engine)).unwrap();
        held.into_keys()
            .filter(|id| owned.contains(&processor::partition::partition_of(id.as_bytes(), PARTITIONS)))
            .collect()
    };
    let absorbed = customers(&a, &owned_a).remove(0);
    let survivor = customers(&b, &owned_b).remove(0);

    // One store holding both, merged there: what the survivor must end as.
    let (one_dir, _) = (TempDir::new("kafka-handover-one"), ());
    let mut one = Engine::open(one_dir.path(), Some(RULES), config()).unwrap();
    one.ingest(&lines).unwrap();
    let merged = one
        .merge_customers(&survivor, std::slice::from_ref(&absorbed), Some("crm"))
        .unwrap();

    let (gone, to) = (absorbed.clone(), survivor.clone());
    let handed = a
        .handle
        .call_blocking(move |engine| engine.hand_over(&gone, &to, Some("crm")))
        .unwrap()
        .unwrap();
    assert!(!handed.changes.is_empty());
    let took = |m: &Member, absorbed: &str, survivor: &str| {
        let (absorbed, survivor) = (absorbed.to_owned(), survivor.to_owned());
        m.handle
            .call_blocking(move |engine| {
                engine
                    .identifiers(&survivor)
                    .unwrap()
                    .iter()
                    .any(|(t, v)| &**t == "customer_id" && *v == absorbed)
            })
            .unwrap()
    };
    wait_until("the survivor's owner took the handover", || {
        took(&b, &absorbed, &survivor)
    });
    wait_until("the frame recorded delivered", || {
        a.handle.reader().pending_handovers().unwrap().is_empty()
    });
    let gone = absorbed.clone();
    let (alias, held) = a
        .handle
        .call_blocking(move |engine| (engine.canonical_id(&gone), engine.customer(&gone).unwrap()))
        .unwrap();
    assert_eq!((&*alias, held.is_none()), (survivor.as_str(), true));
    assert_eq!(merges(&b), 1);
    // An event naming the absorbed id, read where it was: applied to the survivor by the
    // survivor's owner, as one store applies it to the survivor.
    let now = one.now();
    let after = serde_json::json!({
        "event_id": "after-the-merge", "customer_id": absorbed, "type": "payment",
        "ts": now, "props": {"amount": 777},
    })
    .to_string();
    let own = processor::partition::partition_of(absorbed.as_bytes(), PARTITIONS) as i32;
    produce_to(&brokers, "events", &[(own, after.clone())]);
    one.ingest(&[after]).unwrap();
    wait_until("the event and its forward consumed", || {
        let size = topic_size(&brokers, "events", PARTITIONS as i32) as u64;
        a.consumed() + b.consumed() == size
    });
    assert_eq!(b.state_at(now).remove(&survivor), state(&one).remove(&survivor));
    assert_eq!(
        a.handle
            .call_blocking(|engine| state(engine))
            .unwrap()
            .get(&survivor),
        None
    );
    let want: Vec<_> = merged
        .changes
        .iter()
        .filter(|c| c.op == processor::Op::Merge)
        .collect();
    assert_eq!(want.len(), 1);

    // The same frame again, and records marked as a handover or a request that are not
    // one: the first merges nothing, the others are kept as dead letters (their bytes, the
    // code `control_record_malformed`); what follows is consumed as ever.
    let partition = processor::partition::partition_of(survivor.as_bytes(), PARTITIONS) as i32;
    produce_handover(&brokers, partition, &absorbed, &handed.frame, 2);
    produce_handover(&brokers, partition, &absorbed, b"not a frame", 1);
    let not_a_request: &[u8] = br#"{"Merge": {"survivor": 7}}"#;
    produce_marked(
        &brokers,
        partition,
        (kafka::route::REQUEST_HEADER, &survivor),
        not_a_request,
        1,
    );
    let more = stream(2_100);
    produce(&brokers, "events", &more[2_000..]);
    wait_until("everything consumed", || {
        let size = topic_size(&brokers, "events", PARTITIONS as i32) as u64;
        a.consumed() + b.consumed() == size
    });
    assert_eq!(merges(&b), 1);
    assert!(took(&b, &absorbed, &survivor));
    let letters = b.handle.reader().dead_letters(None, 1_000).unwrap();
    let malformed: Vec<(&str, &[u8])> = letters
        .iter()
        .filter(|d| d.code == "control_record_malformed")
        .map(|d| (d.reason.as_str(), &d.raw[..]))
        .collect();
    assert_eq!(malformed.len(), 2, "{letters:?}");
    assert_eq!(malformed[0].1, b"not a frame");
    assert!(
        malformed[0]
            .0
            .starts_with("a record marked as a handover between nodes is not one: "),
        "{}",
        malformed[0].0
    );
    assert_eq!(malformed[1].1, not_a_request);
    assert!(
        malformed[1]
            .0
            .starts_with("a record marked as a request between nodes is not one: "),
        "{}",
        malformed[1].0
    );
    a.leave(PARTITIONS);
    b.leave(PARTITIONS);
}

/// The merges in a member's change log.
fn merges(m: &Member) -> usize {
    m.handle
        .reader()
        .changes(0, 1_000_000)
        .unwrap()
        .into_iter()
        .filter(|c| c.op == processor::Op::Merge)
        .count()
}

/// A stream of `events` events of `persons` people, each named by a random choice of the
/// person's identifiers (`customer_id`, phone in two spellings, email, openid) — the same
/// person arriving as several customers until an event joins them — a fifth without
/// `event_id`; each at an instant of its own.
fn identified_stream(persons: u64, events: u64, seed: u64) -> Vec<String> {
    let mut rng = seed.max(1);
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let base = 1_740_000_000_000_i64;
    (0..events)
        .map(|n| {
            let person = next(persons);
            let mut event = match next(3) {
                0 => serde_json::json!({"type": "payment", "props": {"amount": 100 + next(1500)}}),
                1 => serde_json::json!({"type": "app_open", "props": {}}),
                _ => serde_json::json!({"type": "view", "props": {"category": if next(2) == 0 { "seafood" } else { "shoes" }}}),
            };
            event["ts"] = (base + n as i64 * 60_000 + next(30) as i64 * 1000).into();
            if next(5) > 0 {
                event["event_id"] = format!("i{n}").into();
            }
            let carried = 1 + next(15);
            let mut ids = serde_json::Map::new();
            if carried & 1 != 0 {
                // Two customer ids of one person: a second system's.
                let system = if next(3) == 0 { "q" } else { "p" };
                event["customer_id"] = format!("{system}{person}").into();
            }
            if carried & 2 != 0 {
                let phone = format!("1390000{person:04}");
                let spelled = match next(2) {
                    0 => format!("+86 {phone}"),
                    _ => phone.chars().map(|c| char::from_u32(c as u32 - '0' as u32 + '０' as u32).unwrap()).collect(),
                };
                ids.insert("phone".into(), spelled.into());
            }
            if carried & 4 != 0 {
                ids.insert("email".into(), format!("P{person}@Example.com").into());
            }
            if carried & 8 != 0 {
                ids.insert("openid".into(), format!("o{person}").into());
            }
            if !ids.is_empty() {
                event["ids"] = ids.into();
            }
            if next(10) == 0 {
                event["profile"] = serde_json::json!({"city": if next(2) == 0 { "杭州" } else { "上海" }, "follows_official_account": true});
            }
            event.to_string()
        })
        .collect()
}

/// Identity resolved for a group in one partition (issue #21, `docs/design/cluster.md` §6):
/// two members split six partitions; every event with identifiers is sent to partition 0,
/// whose owner resolves it against the whole graph and sends it on named by its customer,
/// and asks the owners of the customers a merge absorbs to hand them over. The members end
/// holding exactly the customers one store resolving the same stream holds, each with the
/// same tags, segments, traits and profile; the graph is partition 0's owner's alone.
#[test]
fn a_group_resolves_identity_in_partition_0_as_one_store_does() {
    const PARTITIONS: u32 = 6;
    let cluster = state_cluster(PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let resolving = || EngineConfig {
        resolver: true,
        clock_per_partition: true,
        ..keeping(PARTITIONS)
    };
    let (dir_a, dir_b) = (TempDir::new("kafka-resolver-a"), TempDir::new("kafka-resolver-b"));
    let a = Member::join_with(dir_a.path(), &brokers, "g-resolver", resolving());
    wait_until("partitions assigned", || {
        a.status.assigned_partitions() == PARTITIONS as usize
    });
    let b = Member::join_with(dir_b.path(), &brokers, "g-resolver", resolving());
    wait_until("the partitions split", || {
        a.status.assigned_partitions() == 3 && b.status.assigned_partitions() == 3 && b.status.ready().is_ok()
    });
    // Keyed by customer_id where there is one, else unkeyed: events with identifiers land
    // anywhere, and travel.
    let lines = identified_stream(60, 1_500, 7);
    let producer = bench::kafka::producer(&brokers).unwrap();
    bench::kafka::produce_keyed(&producer, "events", &lines[..1_000], true).unwrap();

    let one_dir = TempDir::new("kafka-resolver-one");
    let mut one = Engine::open(
        one_dir.path(),
        Some(RULES),
        EngineConfig {
            partitions: PARTITIONS,
            clock_per_partition: true,
            ..config()
        },
    )
    .unwrap();
    let outcome = one.ingest(&lines).unwrap();
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    let settled = |m: &Member| {
        m.handle.reader().resolver_outbox().unwrap().is_empty()
            && m.handle.reader().pending_handovers().unwrap().is_empty()
    };
    let quiet = || {
        let mut last = 0;
        wait_until("every event, forward, record and frame consumed", || {
            let size = topic_size(&brokers, "events", PARTITIONS as i32) as u64;
            let done = a.consumed() + b.consumed() == size && settled(&a) && settled(&b) && size == last;
            last = size;
            std::thread::sleep(Duration::from_millis(200));
            done
        });
    };
    quiet();
    // The rest once the merges so far are made: events naming customers handed over
    // follow them to their survivors.
    bench::kafka::produce_keyed(&producer, "events", &lines[1_000..], true).unwrap();
    quiet();
    assert!(merges(&a) + merges(&b) > 0, "the stream merges customers");

    let end = 1_740_000_000_000_i64 + 400 * 86_400_000;
    one.advance_clock(end).unwrap();
    let want = state(&one);
    let mut got = a.state_at(end);
    let of_b = b.state_at(end);
    for id in of_b.keys() {
        assert!(!got.contains_key(id), "`{id}` is held by both members");
    }
    got.extend(of_b);
    // Which of a person's two customer ids survives a merge of the two is decided by which
    // record the resolver made first — by the order it read events of different
    // partitions in, which no consumer of several partitions shares with the file. So
    // customers are compared per person, without their names.
    let people = |customers: &BTreeMap<String, CustomerView>| {
        let mut people: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (id, view) in customers {
            let digits: String = match id.strip_prefix("phone:") {
                Some(phone) => phone[phone.len() - 4..].to_owned(),
                None => id.chars().filter(char::is_ascii_digit).collect(),
            };
            let mut view = view.clone();
            view.customer_id = String::new();
            people
                .entry(digits.parse().unwrap())
                .or_default()
                .push(format!("{view:?}"));
        }
        for views in people.values_mut() {
            views.sort();
        }
        people
    };
    let (got_people, want_people) = (people(&got), people(&want));
    assert_eq!(got_people.len(), want_people.len());
    for (person, views) in &want_people {
        assert_eq!(&got_people[person], views, "person {person}");
    }
    // The graph answers as one store's does, on partition 0's owner.
    let resolver = match a.status.owned_partitions().contains(&0) {
        true => &a,
        false => &b,
    };
    for person in 0..60 {
        let email = format!("p{person}@example.com");
        let owner = resolver.handle.reader().identify("email", &email).unwrap();
        assert_eq!(
            owner.is_some(),
            one.identify("email", &email).unwrap().is_some(),
            "{email}"
        );
        if let Some(owner) = owner {
            assert!(
                got.contains_key(&*owner),
                "{email} names `{owner}`, a customer held"
            );
        }
    }
    a.leave(PARTITIONS);
    b.leave(PARTITIONS);
}
