//! Kafka in and out: events consumed from a topic in a consumer group with exactly-once
//! state, changes and dead letters published to topics.
//!
//! **Exactly-once state.** Each partition's next offset is written in the same RocksDB batch
//! as the state its events produced (`kafka:TOPIC:PARTITION` source positions). On every
//! assignment the consumer seeks each partition to the stored offset, ignoring the group's
//! committed offsets, so a crash or a rebalance neither loses nor double-counts an event. The
//! group's offsets are still committed (after the batch is durable) so lag monitoring works.
//! One batch is in flight at a time: the consumer polls the next only once the engine has
//! committed the last, which is the backpressure (librdkafka prefetches meanwhile).
//!
//! **At-least-once publishing, deduplicable.** The publisher reads the durable change log and
//! dead letters from RocksDB, produces them with the idempotent producer (order kept per
//! partition, so per customer), and only after the broker confirmed every record of a batch
//! moves its own cursor. After a crash it resumes from the last confirmed position: a change
//! may be published twice, never lost; consumers drop duplicates by `seq`.
//!
//! **One processor per group, or several with the state topic.** State lives in this
//! process's RocksDB. Without a state topic a second member taking some partitions would
//! split customers' state between stores: when an assignment covers fewer partitions than
//! the topic has, this is logged as an error and `/readyz` reports it. With one (and a
//! [`PartitionHost`]), partitions move between members with their state ([`group`]).

pub mod control;
mod group;
pub mod group_log;
pub mod lease;
pub mod members;
pub mod route;
pub mod standby;
pub use group::{EngineWork, PartitionHost};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::engine::ReadHandle;
use crate::IngestOutcome;

/// Where tagstream meets Kafka. `client_options` are passed to librdkafka as they are
/// (`security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`,
/// `ssl.ca.location`, ...); they are never logged, and `Debug` shows their names only.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    pub brokers: String,
    /// The events topic, keyed by `customer_id`.
    pub topic: String,
    pub group_id: String,
    /// Where every change of the change log is published; `None` publishes nothing.
    pub changes_topic: Option<String>,
    /// Where every rejected event is published with its reason; `None` publishes nothing.
    pub dlq_topic: Option<String>,
    /// Where the state changelog's deltas are published (partition P's to partition P; the
    /// engine must keep them: `EngineConfig::changelog`); `None` publishes none.
    pub state_topic: Option<String>,
    /// A partition's confirmed deltas are folded into a checkpoint (keyed records, so that a
    /// compacted topic stays bounded) once they hold this many bytes.
    pub state_checkpoint_bytes: u64,
    /// With the state topic: where the members of the group put their cards
    /// ([`members`]); `None` keeps no cards (the node finds no other).
    pub members_topic: Option<String>,
    /// With the members topic: where rule-set changes go to every node ([`control`]);
    /// `None` keeps each node's rule set its own.
    pub control_topic: Option<String>,
    /// With the members topic: how many other members keep a warm copy of each partition
    /// ([`standby`]); 0 keeps none.
    pub standby_replicas: u32,
    /// In a group of several: a partition this store kept (from when it owned it) that
    /// another member owns, is not copied here as a standby and has not been assigned here
    /// for this long is dropped, as Kafka Streams' `state.cleanup.delay.ms` does (one the
    /// group consumed past what is here is dropped at once).
    pub state_cleanup_delay: Duration,
    pub client_options: BTreeMap<String, String>,
    /// Events per engine batch, at most.
    pub max_batch: usize,
    /// How long a batch waits to fill before it is applied anyway.
    pub max_wait: Duration,
}

impl std::fmt::Debug for KafkaSettings {
    /// The client options by name only: their values include `sasl.password` and
    /// `ssl.key.password`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("group_id", &self.group_id)
            .field("changes_topic", &self.changes_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("state_topic", &self.state_topic)
            .field("state_checkpoint_bytes", &self.state_checkpoint_bytes)
            .field("members_topic", &self.members_topic)
            .field("control_topic", &self.control_topic)
            .field("standby_replicas", &self.standby_replicas)
            .field("state_cleanup_delay", &self.state_cleanup_delay)
            .field("client_options", &self.client_options.keys().collect::<Vec<_>>())
            .field("max_batch", &self.max_batch)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>, group_id: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            topic: topic.into(),
            group_id: group_id.into(),
            changes_topic: Some("tag-changes".into()),
            dlq_topic: Some("tagstream-dead-letters".into()),
            state_topic: None,
            state_checkpoint_bytes: 64 << 20,
            members_topic: None,
            control_topic: None,
            standby_replicas: 0,
            state_cleanup_delay: Duration::from_secs(600),
            client_options: BTreeMap::new(),
            max_batch: 5_000,
            max_wait: Duration::from_millis(50),
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.client_options {
            config.set(key, value);
        }
        config
    }
}

/// The source name under which a partition's next offset is stored.
pub fn source_name(topic: &str, partition: i32) -> String {
    format!("kafka:{topic}:{partition}")
}

/// What `/readyz` and the metrics need to know about the Kafka side.
#[derive(Debug, Default)]
pub struct KafkaStatus {
    assigned: AtomicUsize,
    /// Partitions of the topic when last assigned (0: unknown).
    partitions: AtomicUsize,
    /// The last error the client reported since partitions were last assigned (a refused
    /// login, a certificate that did not verify, brokers down): `/readyz` says why the
    /// consumer is not getting anywhere instead of only that it is not.
    last_error: std::sync::Mutex<Option<String>>,
    /// A member of a group of several ([`group`]): owning part of the topic is expected.
    group: AtomicBool,
    /// In a group: the partitions this node owns and holds (what its state publisher
    /// publishes, and whose customers it may write outside Kafka).
    owned: Arc<Mutex<std::collections::BTreeSet<u32>>>,
    /// Partitions being restored from the state topic (in a group), and which.
    restoring: AtomicUsize,
    restoring_set: Mutex<std::collections::BTreeSet<u32>>,
    /// Of each partition being read from the state topic, the records read so far.
    restore_progress: Mutex<BTreeMap<u32, u64>>,
    /// The partitions this node keeps a followed standby copy of ([`standby`]).
    standby: Mutex<Vec<u32>>,
    /// The rule-set version this node runs (its card tells the others).
    rules_version: std::sync::atomic::AtomicU64,
    /// Whether the group's change log is read ([`group_log`]): `None` outside a group (or
    /// without a changes topic), the reason when it could not start.
    group_log: Mutex<Option<Result<(), String>>>,
    /// In a group of several: the producer that sends events to the owners of their
    /// customers' partitions ([`route`]).
    router: Mutex<Option<Arc<route::Router>>>,
}

impl KafkaStatus {
    /// `Ok` when this node reads the group's change log; else why not.
    pub fn group_log(&self) -> Result<(), String> {
        self.group_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| {
                Err("the group's change log is kept only by the members of a group (`state_topic`) that publish a changes topic".into())
            })
    }

    /// `Err` with the reason while the consumer owns no partition, or fewer than all (alone
    /// in its group), or restores some (in a group of several).
    pub fn ready(&self) -> Result<(), String> {
        let assigned = self.assigned.load(Ordering::Acquire);
        let partitions = self.partitions.load(Ordering::Acquire);
        let restoring = self.restoring.load(Ordering::Acquire);
        if restoring > 0 {
            let progress = self.restore_progress.lock().unwrap_or_else(|e| e.into_inner());
            let read: Vec<String> = progress
                .iter()
                .map(|(partition, records)| format!("partition {partition}: {records} records read"))
                .collect();
            return Err(format!(
                "restoring {restoring} of the {assigned} partitions this node owns from the state topic ({})",
                read.join(", ")
            ));
        }
        if assigned == 0 {
            let last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            return Err(match last.as_deref() {
                Some(error) => {
                    format!("the Kafka consumer has no partition assigned yet; last client error: {error}")
                }
                None => "the Kafka consumer has no partition assigned yet".into(),
            });
        }
        if partitions > assigned && !self.group.load(Ordering::Acquire) {
            return Err(format!(
                "the Kafka consumer owns {assigned} of {partitions} partitions: another member \
                 joined the consumer group (one processor per group is supported)"
            ));
        }
        Ok(())
    }

    pub fn assigned_partitions(&self) -> usize {
        self.assigned.load(Ordering::Acquire)
    }

    /// Whether this node is a member of a consumer group of several (the state topic
    /// set): it owns the partitions the group gives it, not all.
    pub fn group_member(&self) -> bool {
        self.group.load(Ordering::Acquire)
    }

    /// In a group of several: what sends events to the owners of their customers'
    /// partitions, for HTTP ingest on a node that owns only some ([`route`]).
    pub fn router(&self) -> Option<Arc<route::Router>> {
        self.router.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn rules_version(&self) -> u64 {
        self.rules_version.load(Ordering::Acquire)
    }

    pub fn set_rules_version(&self, version: u64) {
        self.rules_version.store(version, Ordering::Release);
    }

    /// Whether this node owns and holds `partition` (always, alone in its group).
    pub fn owns(&self, partition: u32) -> bool {
        !self.group_member()
            || self
                .owned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&partition)
    }

    /// In a group, the partitions this node owns and holds.
    pub fn owned_partitions(&self) -> Vec<u32> {
        listed(&self.owned)
    }

    /// Partitions being restored from the state topic.
    pub fn restoring_partitions(&self) -> usize {
        self.restoring.load(Ordering::Acquire)
    }

    /// Whether `partition` is being restored from the state topic here: what this node
    /// holds of it is not to be served yet.
    pub fn restoring(&self, partition: u32) -> bool {
        self.restoring_set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&partition)
    }

    /// In a group: the partitions being restored, in order.
    pub fn restoring_list(&self) -> Vec<u32> {
        listed(&self.restoring_set)
    }

    /// In a group: the partitions this node keeps a followed standby copy of, in order.
    pub fn standby_list(&self) -> Vec<u32> {
        self.standby.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_standby(&self, partitions: Vec<u32>) {
        *self.standby.lock().unwrap_or_else(|e| e.into_inner()) = partitions;
    }

    /// In a group: which partitions are restoring.
    fn set_restoring(&self, partitions: std::collections::BTreeSet<u32>) {
        self.set_group(
            self.owned.lock().unwrap_or_else(|e| e.into_inner()).len() + partitions.len(),
            partitions.len(),
        );
        *self.restoring_set.lock().unwrap_or_else(|e| e.into_inner()) = partitions;
    }

    /// In a group: the partitions owned (restoring ones included) and those restoring.
    fn set_group(&self, assigned: usize, restoring: usize) {
        self.assigned.store(assigned, Ordering::Release);
        self.restoring.store(restoring, Ordering::Release);
        metrics::gauge!("tagstream_kafka_partitions_assigned").set(assigned as f64);
    }

    /// Records read so far of `partition`'s part of the state topic; `None` once its read
    /// ended.
    fn restore_read(&self, partition: u32, records: Option<u64>) {
        let mut progress = self.restore_progress.lock().unwrap_or_else(|e| e.into_inner());
        match records {
            Some(records) => progress.insert(partition, records),
            None => progress.remove(&partition),
        };
        let label = partition.to_string();
        metrics::gauge!("tagstream_kafka_restore_records_read", "partition" => label)
            .set(records.unwrap_or(0) as f64);
    }

    fn note_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    fn client_error(&self, error: &KafkaError, reason: &str) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        // "All brokers down" follows every refused login or failed handshake: the cause
        // before it is what an operator needs to read.
        let follow_up = matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown));
        if !follow_up || last.is_none() {
            *last = Some(format!("{error}: {reason}"));
        }
    }
}

/// A set of partitions as a list, in order.
fn listed(set: &Mutex<std::collections::BTreeSet<u32>>) -> Vec<u32> {
    set.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect()
}

/// One batch for the engine: the raw events and where each partition stands after them.
#[derive(Debug, Default)]
pub struct KafkaBatch {
    pub events: Vec<Vec<u8>>,
    pub positions: Vec<(String, u64)>,
    /// Where each event was read.
    pub origins: Vec<route::Origin>,
    /// In a group of several: what sends events read outside their customer's partition
    /// there ([`route`]).
    pub router: Option<Arc<route::Router>>,
    /// Instead of events: a customer handed over to a survivor of the partition, the
    /// frame of a record with [`route::HANDOVER_HEADER`] (`positions` its partition's
    /// offset after it). It is applied alone, after the events read before it.
    pub handover: Option<Vec<u8>>,
    /// Instead of events: a [`route::Request`]'s record value ([`route::REQUEST_HEADER`]),
    /// applied alone as a handover is.
    pub request: Option<Vec<u8>>,
}

/// Why a batch was not applied. `Busy` is retried soon; `Failed` after a back-off.
#[derive(Debug)]
pub enum ApplyError {
    Busy,
    Failed(String),
}

impl From<crate::ServiceError> for ApplyError {
    /// A full queue is retried soon; anything else after a back-off.
    fn from(e: crate::ServiceError) -> ApplyError {
        match e {
            crate::ServiceError::Busy => ApplyError::Busy,
            other => ApplyError::Failed(other.to_string()),
        }
    }
}

/// Applies a batch to the engine and returns once it is committed.
pub type Apply = Box<dyn FnMut(Arc<KafkaBatch>) -> Result<IngestOutcome, ApplyError> + Send>;

/// The running consumer and publisher threads.
pub struct KafkaWorkers {
    stop: Arc<AtomicBool>,
    consumer: JoinHandle<()>,
    /// The reader of the group's change log.
    follower: Option<JoinHandle<()>>,
    /// In a group: the standby copies this node may keep, and the thread that keeps them.
    copies: Option<Arc<standby::Copies>>,
    standby: Option<JoinHandle<()>>,
    /// Set once nothing more is consumed: each publisher sends what is committed and ends.
    drain: Arc<AtomicBool>,
    /// Publishers stop where they are (after the grace).
    publishers_stop: Arc<AtomicBool>,
    publishers: Vec<JoinHandle<()>>,
}

impl KafkaWorkers {
    /// In a group of several with `settings.standby_replicas` set: starts keeping standby
    /// copies of partitions other members own, as the cards `members` reads say
    /// ([`standby`]). Nothing outside a group or without replicas.
    pub fn start_standby(
        &mut self,
        settings: &KafkaSettings,
        members: Arc<members::Members>,
        host: Arc<dyn PartitionHost>,
        status: Arc<KafkaStatus>,
    ) -> Result<(), String> {
        let (Some(copies), Some(topic)) = (&self.copies, &settings.state_topic) else {
            return Ok(());
        };
        if settings.standby_replicas == 0 {
            return Ok(());
        }
        let started = standby::start(
            settings,
            topic,
            members,
            host,
            copies.clone(),
            status,
            self.stop.clone(),
        )?;
        self.standby = Some(started.thread);
        Ok(())
    }

    /// Stops consuming (the batch in flight is applied), then lets the publishers send
    /// what is committed — the change log and dead letters, flushed to the brokers — for
    /// at most `grace`, and stops them where they are after it (their cursors are durable:
    /// a restart publishes the rest). Returns how many publishers had to be cut short.
    pub fn stop(self, grace: Duration) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.consumer.join();
        if let Some(follower) = self.follower {
            let _ = follower.join();
        }
        if let Some(standby) = self.standby {
            let _ = standby.join();
        }
        self.drain.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + grace;
        while self.publishers.iter().any(|t| !t.is_finished()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let cut = self.publishers.iter().filter(|t| !t.is_finished()).count();
        self.publishers_stop.store(true, Ordering::SeqCst);
        for t in self.publishers {
            let _ = t.join();
        }
        cut
    }
}

/// Starts consuming `settings.topic` into the engine through `apply`, and publishing the
/// change log and dead letters read through `reader`. With `host` and a state topic, this
/// node shares the group with others: it owns the partitions the group gives it, restores
/// those it does not hold from the state topic and releases those taken from it
/// ([`group`]); without, it owns every partition.
pub fn start(
    settings: KafkaSettings,
    reader: ReadHandle,
    apply: Apply,
    status: Arc<KafkaStatus>,
    host: Option<Arc<dyn PartitionHost>>,
) -> Result<KafkaWorkers, KafkaError> {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = match &settings.state_topic {
        Some(_) => state_writer(&reader)
            .map_err(|e| KafkaError::Subscription(format!("reading this store's writer id: {e}")))?,
        None => 0,
    };
    let membership = match (host, &settings.state_topic) {
        (Some(host), Some(state_topic)) => Some(group::Membership::new(
            host,
            &settings,
            state_topic.clone(),
            reader.clone(),
            stop.clone(),
            status.clone(),
            writer,
        )),
        _ => None,
    };
    if let Some(membership) = &membership {
        // Nothing is owned until the group says so.
        membership
            .park_all()
            .map_err(|e| KafkaError::Subscription(format!("parking the partitions: {e}")))?;
    }
    let owned = membership.as_ref().map(|m| m.owned.clone());
    let lease = membership.as_ref().map(|m| m.lease.clone());
    let copies = membership.as_ref().map(|m| m.copies.clone());
    status.group.store(membership.is_some(), Ordering::Release);
    let follower = match (&membership, &settings.changes_topic) {
        (Some(_), Some(topic)) => match group_log::follow(&settings, topic, reader.clone(), stop.clone()) {
            Ok(thread) => {
                *status.group_log.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ok(()));
                Some(thread)
            }
            Err(reason) => {
                tracing::warn!("the group's change log is not kept: {reason}");
                *status.group_log.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(reason));
                None
            }
        },
        _ => None,
    };
    // A member of several moves only what must move, and goes on consuming the rest.
    let strategy = if membership.is_some() {
        "cooperative-sticky"
    } else {
        "range,roundrobin"
    };
    let context = ConsumerCtx {
        reader: reader.clone(),
        topic: settings.topic.clone(),
        group: settings.group_id.clone(),
        status,
        generation: AtomicU64::new(0),
        membership,
    };
    let consumer: BaseConsumer<ConsumerCtx> = settings
        .client_config()
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", strategy)
        .create_with_context(context)?;
    consumer.subscribe(&[&settings.topic])?;
    let router = match consumer.context().membership.is_some() {
        true => Some(Arc::new(route::Router::new(
            producer(&settings, Feed::Forward)?,
            settings.topic.clone(),
            reader.clone(),
            stop.clone(),
        ))),
        false => None,
    };
    *consumer
        .context()
        .status
        .router
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = router.clone();
    let consumer = {
        let (stop, settings) = (stop.clone(), settings.clone());
        std::thread::Builder::new()
            .name("tagstream-kafka-in".into())
            .spawn(move || consume(consumer, settings, apply, router, &stop))
            .expect("spawn the Kafka consumer thread")
    };
    let (drain, publishers_stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let mut publishers = Vec::new();
    let feeds = [
        (settings.changes_topic.clone(), Feed::Changes),
        (settings.dlq_topic.clone(), Feed::DeadLetters),
        (settings.state_topic.clone(), Feed::State),
    ];
    for (topic, feed) in feeds {
        let Some(topic) = topic else { continue };
        let producer = producer(&settings, feed)?;
        let (stop, drain, reader) = (publishers_stop.clone(), drain.clone(), reader.clone());
        let (checkpoint_bytes, owned, lease) =
            (settings.state_checkpoint_bytes, owned.clone(), lease.clone());
        // Held before the thread starts, so no trim runs in between.
        match hold_unpublished(&reader, feed, &publish_cursor(feed, &topic)) {
            Ok(confirmed) if matches!(feed, Feed::Changes) => reader.gate_state_on_changes(confirmed),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, feed = feed.label(), "reading the publish cursor failed");
                if let Feed::Changes = feed {
                    // Nothing taken as confirmed: the publisher confirms as it goes.
                    reader.gate_state_on_changes(0);
                }
            }
        }
        publishers.push(
            std::thread::Builder::new()
                .name(format!("tagstream-kafka-{}", feed.label()))
                .spawn(move || match feed {
                    Feed::State => {
                        let scope = StateScope {
                            checkpoint_bytes,
                            owned,
                            lease,
                            writer: writer_label(writer),
                        };
                        publish_state(producer, topic, reader, scope, &stop, &drain)
                    }
                    _ => publish(producer, topic, feed, reader, &stop, &drain),
                })
                .expect("spawn a Kafka publisher thread"),
        );
    }
    Ok(KafkaWorkers {
        stop,
        consumer,
        follower,
        copies,
        standby: None,
        drain,
        publishers_stop,
        publishers,
    })
}

/// A producer for `feed`: idempotent, each customer's records to the partition Kafka's
/// default partitioner gives its id.
fn producer(settings: &KafkaSettings, feed: Feed) -> Result<BaseProducer<PublishCtx>, KafkaError> {
    let mut config = settings.client_config();
    config.set("enable.idempotence", "true").set("linger.ms", "5");
    if !settings.client_options.contains_key("partitioner") {
        // Kafka's default partitioner (the Java client's), not librdkafka's CRC32 one: a
        // customer's changes go to the partition its events come from, which in a group
        // is the partition the changes are numbered in (the group log reads them so).
        config.set("partitioner", "murmur2_random");
    }
    if let Feed::State = feed {
        // Deltas repeat their keys and records' field names: LZ4 takes most of the bytes
        // off the wire and the broker's disk (a client option can still set another).
        if !settings.client_options.contains_key("compression.type") {
            config.set("compression.type", "lz4");
        }
    }
    config.create_with_context(PublishCtx::default())
}

struct ConsumerCtx {
    reader: ReadHandle,
    topic: String,
    group: String,
    status: Arc<KafkaStatus>,
    /// Bumped on every rebalance: a batch collected across one is dropped (its partitions
    /// are re-read from the stored offsets).
    generation: AtomicU64,
    /// In a group of several: what this node owns and restores.
    membership: Option<group::Membership>,
}

impl ClientContext for ConsumerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka consumer");
        self.status.client_error(&error, reason);
    }
}

impl ConsumerContext for ConsumerCtx {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(membership) = &self.membership {
            match err {
                RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => membership.assigned(consumer, tpl),
                RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => membership.revoked(consumer, tpl),
                other => {
                    let code: RDKafkaErrorCode = other.into();
                    tracing::error!(error = %code, "Kafka rebalance failed");
                }
            }
            return;
        }
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let owned: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                // Where the store says each partition stands, also stored for the group's
                // commit: a partition with nothing new after a restart would otherwise never
                // get a committed group offset, and lag tools would read it as unconsumed.
                let mut resume = TopicPartitionList::new();
                for (topic, partition) in &owned {
                    let offset = match self.reader.source_offset(&source_name(topic, *partition)) {
                        Ok(Some(next)) => {
                            let _ =
                                resume.add_partition_offset(topic, *partition, Offset::Offset(next as i64));
                            Offset::Offset(next as i64)
                        }
                        Ok(None) => Offset::Beginning,
                        Err(e) => {
                            // Without the stored offset the partition cannot be read safely.
                            tracing::error!(error = %e, topic, partition, "reading the stored offset failed");
                            continue;
                        }
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(error = %e, topic, partition, "setting the start offset failed");
                    }
                }
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assigning partitions failed");
                    return;
                }
                if resume.count() > 0 {
                    if let Err(e) = consumer.store_offsets(&resume) {
                        tracing::debug!(error = %e, "storing the resumed offsets for the group commit");
                    }
                }
                let partitions = consumer
                    .fetch_metadata(Some(&self.topic), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
                    .unwrap_or(0);
                self.status.partitions.store(partitions, Ordering::Release);
                self.status.assigned.store(owned.len(), Ordering::Release);
                *self.status.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                metrics::gauge!("tagstream_kafka_partitions_assigned").set(owned.len() as f64);
                if partitions > owned.len() {
                    tracing::error!(
                        group = %self.group,
                        assigned = owned.len(),
                        partitions,
                        "another member joined the consumer group: this processor now owns only part \
                         of the topic, and customers' state would be split between stores; one \
                         processor per consumer group is supported — stop the other member"
                    );
                } else {
                    tracing::info!(topic = %self.topic, partitions = owned.len(), "Kafka partitions assigned");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
                self.status.assigned.store(0, Ordering::Release);
                metrics::gauge!("tagstream_kafka_partitions_assigned").set(0.0);
                tracing::info!(topic = %self.topic, "Kafka partitions revoked");
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(error = %code, "Kafka rebalance failed");
            }
        }
    }
}

fn consume(
    consumer: BaseConsumer<ConsumerCtx>,
    settings: KafkaSettings,
    mut apply: Apply,
    router: Option<Arc<route::Router>>,
    stop: &AtomicBool,
) {
    let mut last_lag = Instant::now();
    let membership = consumer.context().membership.as_ref();
    while !stop.load(Ordering::SeqCst) {
        // Between batches: the partitions whose state was read are taken in and resumed.
        if let Some(membership) = membership {
            membership.finish_restores(&consumer);
            membership.sweep_leftovers(&consumer);
            membership.renew_lease(&consumer);
        }
        let generation = consumer.context().generation.load(Ordering::SeqCst);
        let restoring = membership.map(group::Membership::restoring).unwrap_or_default();
        let mut batch = KafkaBatch {
            router: router.clone(),
            ..KafkaBatch::default()
        };
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut first: HashMap<i32, i64> = HashMap::new();
        // A handover or a request ends the batch: it is applied after the events before it.
        let mut control: Option<(i32, i64, Control, Vec<u8>)> = None;
        let started = Instant::now();
        // The first poll waits (and serves rebalances and errors); the rest fill the batch
        // until it is full or `max_wait` has passed.
        let mut wait = Duration::from_millis(100);
        while batch.events.len() < settings.max_batch && !stop.load(Ordering::SeqCst) {
            match consumer.poll(wait) {
                None if batch.events.is_empty() => break,
                None => {}
                // Paused while they restore; one fetched before the pause is not theirs yet.
                Some(Ok(message))
                    if message.topic() == settings.topic
                        && !restoring.contains(&(message.partition() as u32))
                        && control_of(&message).is_some() =>
                {
                    first.entry(message.partition()).or_insert(message.offset());
                    control = control_of(&message).map(|kind| {
                        (
                            message.partition(),
                            message.offset(),
                            kind,
                            message.payload().unwrap_or_default().to_vec(),
                        )
                    });
                    break;
                }
                Some(Ok(message))
                    if message.topic() == settings.topic
                        && !restoring.contains(&(message.partition() as u32)) =>
                {
                    batch.events.push(message.payload().unwrap_or_default().to_vec());
                    batch.origins.push(route::Origin {
                        partition: message.partition(),
                        offset: message.offset(),
                        forwarded: header(&message, route::FORWARDED_HEADER)
                            .map(|v| String::from_utf8_lossy(v).into_owned()),
                        resolved: header(&message, route::RESOLVED_HEADER).and_then(route::parse_resolved),
                    });
                    next.insert(message.partition(), message.offset() + 1);
                    first.entry(message.partition()).or_insert(message.offset());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Kafka consumer poll");
                    // Whatever the error, do not spin on it.
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
            let left = settings.max_wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            wait = left;
        }
        if consumer.context().generation.load(Ordering::SeqCst) != generation {
            // A rebalance happened while collecting: what was collected is read again (or
            // by the new owner). Alone in the group every partition was assigned again at
            // its stored offset; in a group, the partitions kept go on from where they
            // were fetched, so they are sought back to the batch's first message.
            if let Some(membership) = membership {
                let owned = membership.owned();
                for (partition, offset) in first {
                    if owned.contains(&(partition as u32)) {
                        if let Err(e) = consumer.seek(
                            &settings.topic,
                            partition,
                            Offset::Offset(offset),
                            Duration::from_secs(10),
                        ) {
                            tracing::error!(error = %e, partition, "seeking back after a rebalance failed");
                        }
                    }
                }
            }
            continue;
        }
        if !batch.events.is_empty() {
            batch.positions = next
                .iter()
                .map(|(p, o)| (source_name(&settings.topic, *p), *o as u64))
                .collect();
            let batch = Arc::new(batch);
            if !apply_until_done(&mut apply, &batch, stop) {
                break;
            }
            // The batch is durable: tell the group too, for lag monitoring.
            store_offsets(&consumer, &settings.topic, &next);
        }
        if let Some((partition, offset, kind, value)) = control {
            let mut batch = KafkaBatch {
                positions: vec![(source_name(&settings.topic, partition), offset as u64 + 1)],
                router: router.clone(),
                ..KafkaBatch::default()
            };
            match kind {
                Control::Handover => batch.handover = Some(value),
                Control::Request => batch.request = Some(value),
            }
            let batch = Arc::new(batch);
            if !apply_until_done(&mut apply, &batch, stop) {
                break;
            }
            store_offsets(
                &consumer,
                &settings.topic,
                &HashMap::from([(partition, offset + 1)]),
            );
        }
        if let (Some(membership), Some(router)) = (membership, &router) {
            membership.send_resolved(router);
            membership.send_handovers(router);
        }
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            record_consumer_lag(&consumer, &settings.topic);
        }
    }
    if let Some(membership) = membership {
        // Its state goes out while it is still a member (after it leaves, another member
        // may take the partitions over at once), then the group learns how far this node
        // got: a partition it keeps is found stale later only if another member consumed
        // it past that.
        membership.publish_before_leaving(&consumer);
        if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(error = %e, "committing the group's offsets at shutdown");
        }
    }
    // Dropping the consumer leaves the group (revoking the partitions) before it returns.
    drop(consumer);
}

/// A record of the events topic that is not an event.
enum Control {
    /// A handover's frame ([`route::HANDOVER_HEADER`]).
    Handover,
    /// A [`route::Request`] ([`route::REQUEST_HEADER`]).
    Request,
}

/// What `message` is when not an event.
fn control_of(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<Control> {
    let headers = message.headers()?;
    headers.iter().find_map(|h| match h.key {
        route::HANDOVER_HEADER => Some(Control::Handover),
        route::REQUEST_HEADER => Some(Control::Request),
        _ => None,
    })
}

/// The value of `message`'s header `key`.
fn header<'m>(message: &'m rdkafka::message::BorrowedMessage<'_>, key: &str) -> Option<&'m [u8]> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
}

/// Tells the group how far a durable batch got (for lag monitoring).
fn store_offsets(consumer: &BaseConsumer<ConsumerCtx>, topic: &str, next: &HashMap<i32, i64>) {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(error = %e, "storing offsets for the group commit");
    }
}

/// Applies a batch, retrying while the engine is busy or failing; `false` when asked to
/// stop before it could be applied (it was not committed, and will be read again).
fn apply_until_done(apply: &mut Apply, batch: &Arc<KafkaBatch>, stop: &AtomicBool) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        match apply(batch.clone()) {
            Ok(_) => return true,
            Err(ApplyError::Busy) => std::thread::sleep(Duration::from_millis(20)),
            Err(ApplyError::Failed(e)) => {
                tracing::error!(error = %e, "applying a Kafka batch failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        if stop.load(Ordering::SeqCst) {
            return false;
        }
    }
}

fn record_consumer_lag(consumer: &BaseConsumer<ConsumerCtx>, topic: &str) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    // Per partition (few, and what an operator needs to find a stuck one).
    for e in positions.elements() {
        let Offset::Offset(position) = e.offset() else {
            continue;
        };
        if let Ok((_, high)) = consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(1)) {
            let partition = e.partition().to_string();
            metrics::gauge!("tagstream_kafka_consumer_lag", "partition" => partition)
                .set((high - position).max(0) as f64);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Feed {
    Changes,
    DeadLetters,
    /// The state changelog's deltas ([`crate::changelog`]), read from the outbox.
    State,
    /// Events forwarded to the member owning their customer ([`route`]), sent by the
    /// consumer's thread before it commits the batch that read them.
    Forward,
}

impl Feed {
    fn label(self) -> &'static str {
        match self {
            Feed::Changes => "changes",
            Feed::DeadLetters => "dlq",
            Feed::State => "state",
            Feed::Forward => "forward",
        }
    }
}

/// Delivery reports of the records in flight.
#[derive(Default)]
struct PublishCtx {
    failure: Mutex<Option<String>>,
    /// Per partition, the highest offset the broker confirmed since it was last taken
    /// ([`PublishCtx::take_delivered`]): the state publisher records how far the state
    /// topic holds its own records.
    delivered: Mutex<BTreeMap<i32, i64>>,
}

impl PublishCtx {
    fn take_delivered(&self) -> BTreeMap<i32, i64> {
        std::mem::take(&mut *self.delivered.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ClientContext for PublishCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka producer");
    }
}

impl ProducerContext for PublishCtx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                let mut delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
                let highest = delivered.entry(m.partition()).or_insert(m.offset());
                *highest = (*highest).max(m.offset());
            }
            Err((e, _)) => {
                let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
                failure.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// A record to publish: key, payload and headers, and its partition when the feed chooses
/// it (otherwise the key's hash does).
struct Outgoing {
    key: Option<Vec<u8>>,
    /// `None`: a tombstone.
    payload: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
    partition: Option<i32>,
}

const PUBLISH_BATCH: usize = 10_000;

/// Where the publisher of `feed` to `topic` keeps its confirmed position.
fn publish_cursor(feed: Feed, topic: &str) -> String {
    format!("kafka-published-{}:{topic}", feed.label())
}

/// Reads the publisher's confirmed position and has retention keep what follows it (the
/// changes after it; the dead letters from it, the cursor being the next id to publish).
fn hold_unpublished(reader: &ReadHandle, feed: Feed, cursor: &str) -> Result<u64, crate::EngineError> {
    let confirmed = reader.cursor(cursor)?;
    match feed {
        Feed::Changes => reader.hold(cursor, crate::Log::Changes, confirmed + 1),
        Feed::DeadLetters => reader.hold(cursor, crate::Log::DeadLetters, confirmed),
        // The outbox is its own queue ([`publish_state`]); forwards are sent as they come.
        Feed::State | Feed::Forward => {}
    }
    Ok(confirmed)
}

fn publish(
    producer: BaseProducer<PublishCtx>,
    topic: String,
    feed: Feed,
    reader: ReadHandle,
    stop: &AtomicBool,
    drain: &AtomicBool,
) {
    let cursor = publish_cursor(feed, &topic);
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::SeqCst) {
        let confirmed = match hold_unpublished(&reader, feed, &cursor) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reading the publish cursor failed");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let (records, next) = match next_records(&reader, feed, confirmed) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, feed = feed.label(), "reading what to publish failed");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if records.is_empty() {
            if let Feed::Changes = feed {
                metrics::gauge!("tagstream_kafka_publish_lag_changes").set(0.0);
            }
            if drain.load(Ordering::SeqCst) {
                // Shutting down, and everything committed is published.
                return;
            }
            idle(&reader, feed);
            continue;
        }
        match send_all(&producer, &topic, &records, stop) {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                if let Err(e) = reader.set_cursor(&cursor, next) {
                    tracing::error!(error = %e, feed = feed.label(), "saving what was published failed");
                }
                if let Feed::Changes = feed {
                    reader.changes_confirmed(next);
                }
                metrics::counter!("tagstream_kafka_published_total", "feed" => feed.label())
                    .increment(records.len() as u64);
                if let Feed::Changes = feed {
                    let behind = reader.changes(next, PUBLISH_BATCH).map_or(0, |c| c.len());
                    metrics::gauge!("tagstream_kafka_publish_lag_changes").set(behind as f64);
                }
            }
            Err(e) => {
                // Nothing confirmed moves the cursor: the whole batch is sent again.
                tracing::warn!(error = %e, topic, "publishing failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
}

/// A publisher with nothing to send waits up to 50 ms; the changes publisher goes on as
/// soon as a commit made changes (it looks every 2 ms: the webhooks of a group and every
/// consumer of the changes topic wait on it).
fn idle(reader: &ReadHandle, feed: Feed) {
    const IDLE: Duration = Duration::from_millis(50);
    const LOOK: Duration = Duration::from_millis(2);
    let Feed::Changes = feed else {
        return std::thread::sleep(IDLE);
    };
    let (seen, since) = (reader.last_seq(), std::time::Instant::now());
    while since.elapsed() < IDLE && reader.last_seq() == seen {
        std::thread::sleep(LOOK);
    }
}

/// The next records of `feed` after cursor `confirmed`, and the cursor once they are
/// confirmed.
fn next_records(
    reader: &ReadHandle,
    feed: Feed,
    confirmed: u64,
) -> Result<(Vec<Outgoing>, u64), crate::EngineError> {
    match feed {
        Feed::Changes => {
            let changes = reader.changes(confirmed, PUBLISH_BATCH)?;
            let last = changes.last().map_or(confirmed, |c| c.seq);
            let records = changes
                .iter()
                .map(|c| Outgoing {
                    key: Some(c.customer_id.as_bytes().to_vec()),
                    payload: Some(serde_json::to_vec(c).expect("a change serializes")),
                    headers: None,
                    partition: None,
                })
                .collect();
            Ok((records, last))
        }
        // Published by [`publish_state`] and [`route`], never through here.
        Feed::State | Feed::Forward => Ok((Vec::new(), confirmed)),
        Feed::DeadLetters => {
            // The cursor is the next dead letter id to publish.
            let letters = reader.dead_letters(confirmed.checked_sub(1), PUBLISH_BATCH)?;
            let last = letters.last().map_or(confirmed, |d| d.id + 1);
            let records = letters
                .into_iter()
                .map(|d| {
                    let received_at = d.received_at.to_string();
                    let headers = OwnedHeaders::new()
                        .insert(Header {
                            key: "tagstream-reason",
                            value: Some(d.reason.as_str()),
                        })
                        .insert(Header {
                            key: "tagstream-reason-code",
                            value: Some(d.code.as_str()),
                        })
                        .insert(Header {
                            key: "tagstream-received-at",
                            value: Some(received_at.as_str()),
                        });
                    Outgoing {
                        key: None,
                        payload: Some(d.raw),
                        headers: Some(headers),
                        partition: None,
                    }
                })
                .collect();
            Ok((records, last))
        }
    }
}

/// Publishes the state changelog: the outbox's deltas in commit order (partition P's to
/// partition P), and for each partition whose confirmed deltas reached `checkpoint_bytes`,
/// a checkpoint ([`publish_checkpoint`]). What was confirmed is recorded in the store, so a
/// restart sends nothing twice but what was in flight. Each round holds the changelog gate,
/// so a partition is released or restored between rounds, never during one.
fn publish_state(
    producer: BaseProducer<PublishCtx>,
    topic: String,
    reader: ReadHandle,
    scope: StateScope,
    stop: &AtomicBool,
    drain: &AtomicBool,
) {
    // Per partition: the highest commit confirmed, and the bytes of confirmed deltas the
    // outbox keeps for the next checkpoint; read again whenever the gate's epoch moved.
    let mut state = PublisherState::default();
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::SeqCst) {
        let round = {
            let gate = reader.changelog_gate();
            state_round(&producer, &topic, &reader, &mut state, *gate, &scope, stop)
        };
        match round {
            Round::Sent => backoff = Duration::from_millis(100),
            Round::Idle if drain.load(Ordering::SeqCst) => {
                // Shutting down, and everything committed is published.
                return;
            }
            // Nothing to send: until the next commit (looked for every 2 ms), at most 50 ms,
            // so that a write waiting for its state to be confirmed waits little.
            Round::Idle => {
                let (seen, since) = (reader.commits_made(), Instant::now());
                while since.elapsed() < Duration::from_millis(50) && reader.commits_made() == seen {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            // Shutting down, and the consumer has left the group: what was not published
            // before it left stays in the outbox (the partitions are kept here, and their
            // next owner consumes on from what the topic has).
            Round::Unleased if drain.load(Ordering::SeqCst) => return,
            // The changes publisher is behind: it confirms more every few milliseconds.
            Round::Waiting | Round::Unleased => std::thread::sleep(Duration::from_millis(10)),
            Round::Failed(e) => {
                tracing::warn!(error = %e, topic, "publishing the state changelog failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
}

/// What the state publisher publishes.
struct StateScope {
    /// A partition's confirmed deltas are folded into a checkpoint past this many bytes.
    checkpoint_bytes: u64,
    /// In a group of several, the partitions this node owns: only theirs are published
    /// (a stale partition's deltas, left from before a crash, never reach the topic after
    /// its new owner's). `None`: every partition.
    owned: Option<Arc<Mutex<std::collections::BTreeSet<u32>>>>,
    /// In a group of several, whether this member may still count itself the owner of
    /// those: nothing is sent once the lease ran out ([`lease`]).
    lease: Option<Arc<lease::Lease>>,
    /// This store's [`state_writer`], in every record's [`WRITER_HEADER`].
    writer: String,
}

/// The state publisher's position ([`publish_state`]) and the gate epoch it was read at.
#[derive(Default)]
struct PublisherState {
    epoch: Option<u64>,
    partitions: BTreeMap<u32, (u64, u64)>,
}

/// How a round of the state publisher ended.
enum Round {
    Sent,
    Idle,
    /// Deltas are due whose commits' changes the changes topic has not confirmed yet.
    Waiting,
    /// The member's lease does not hold ([`lease`]): nothing may be sent now.
    Unleased,
    Failed(String),
}

/// One round of [`publish_state`], under the changelog gate at `epoch`: the checkpoints due,
/// then the next deltas.
fn state_round(
    producer: &BaseProducer<PublishCtx>,
    topic: &str,
    reader: &ReadHandle,
    state: &mut PublisherState,
    epoch: u64,
    scope: &StateScope,
    stop: &AtomicBool,
) -> Round {
    if state.epoch != Some(epoch) {
        match reader.changelog_publisher_state() {
            Ok(partitions) => {
                *state = PublisherState {
                    epoch: Some(epoch),
                    partitions,
                }
            }
            Err(e) => return Round::Failed(format!("reading the publisher's position: {e}")),
        }
    }
    if scope.lease.as_ref().is_some_and(|lease| !lease.held()) {
        // Maybe expelled from the group, and no longer the owner: waits until a commit of
        // the current generation renews the lease (or the partitions are found lost).
        return Round::Unleased;
    }
    let owned = scope
        .owned
        .as_ref()
        .map(|owned| owned.lock().unwrap_or_else(|e| e.into_inner()).clone());
    let ours = |p: &u32| owned.as_ref().is_none_or(|owned| owned.contains(p));
    let due: Vec<(u32, u64)> = state
        .partitions
        .iter()
        .filter(|(p, (_, kept))| *kept > 0 && *kept >= scope.checkpoint_bytes && ours(p))
        .map(|(p, (published, _))| (*p, *published))
        .collect();
    let mut failed = None;
    for (partition, upto) in due {
        match publish_checkpoint(producer, topic, reader, partition, upto, &scope.writer, stop) {
            Ok(()) => state.partitions.entry(partition).or_default().1 = 0,
            // The deltas go on: a checkpoint only bounds the topic.
            Err(e) => failed = Some(format!("a checkpoint of partition {partition}: {e}")),
        }
    }
    let mut published: BTreeMap<u32, u64> = state.partitions.iter().map(|(p, (c, _))| (*p, *c)).collect();
    if owned.is_some() {
        // A partition not ours counts as published to the end: none of its deltas is read.
        for partition in 0..reader.partitions() {
            if !ours(&partition) {
                published.insert(partition, u64::MAX);
            }
        }
    }
    // Fewer deltas than records of the other feeds: a delta can be large.
    let mut deltas = match reader.changelog_unpublished(&published, PUBLISH_BATCH / 10) {
        Ok(deltas) => deltas,
        Err(e) => return Round::Failed(format!("reading the outbox: {e}")),
    };
    metrics::gauge!("tagstream_kafka_publish_lag_state").set(deltas.len() as f64);
    metrics::gauge!("tagstream_kafka_state_outbox_bytes")
        .set(state.partitions.values().map(|(_, kept)| *kept).sum::<u64>() as f64);
    let due = deltas.len();
    // Of each partition, the deltas up to the first whose changes are not confirmed (the
    // gate opens in commit order, so what stays is a prefix of each partition's).
    deltas.retain(|(_, commit, _)| reader.delta_may_go(*commit));
    if deltas.is_empty() {
        let idle = if due > 0 { Round::Waiting } else { Round::Idle };
        return failed.map_or(idle, Round::Failed);
    }
    let mut records = Vec::with_capacity(deltas.len());
    for (partition, commit, bytes) in &deltas {
        for (key, value) in crate::changelog::records(*commit, bytes, crate::changelog::MAX_RECORD_BYTES) {
            records.push(Outgoing {
                key: Some(key.into_bytes()),
                payload: Some(value.to_vec()),
                headers: Some(writer_headers(&scope.writer, None)),
                partition: Some(*partition as i32),
            });
        }
    }
    // Unconfirmed, nothing is recorded: the whole batch is sent again.
    if let Err(e) = send_all(producer, topic, &records, stop) {
        return Round::Failed(e);
    }
    record_positions(producer, topic, reader);
    let confirmed: Vec<(u32, u64)> = deltas.iter().map(|(p, c, _)| (*p, *c)).collect();
    if let Err(e) = reader.changelog_published(&confirmed) {
        tracing::error!(error = %e, "saving what was published failed");
    }
    for (partition, commit, bytes) in &deltas {
        let (published, kept) = state.partitions.entry(*partition).or_default();
        *published = (*published).max(*commit);
        *kept += bytes.len() as u64;
    }
    metrics::counter!("tagstream_kafka_published_total", "feed" => Feed::State.label())
        .increment(records.len() as u64);
    failed.map_or(Round::Sent, Round::Failed)
}

/// Publishes a checkpoint of `partition` folding its confirmed deltas up to commit `upto`
/// ([`crate::changelog::Checkpoint`]): one keyed record per key (a delete as a tombstone with
/// its commit in a header) and the marker; once the broker confirmed those, tombstones for
/// the folded deltas' records; then the outbox lets the folded deltas go.
fn publish_checkpoint(
    producer: &BaseProducer<PublishCtx>,
    topic: &str,
    reader: &ReadHandle,
    partition: u32,
    upto: u64,
    writer: &str,
    stop: &AtomicBool,
) -> Result<(), String> {
    let checkpoint = reader
        .changelog_checkpoint(partition, upto)
        .map_err(|e| format!("reading partition {partition}'s deltas: {e}"))?;
    if checkpoint.delta_records.is_empty() {
        // Nothing to fold (the outbox no longer holds the partition's deltas): a marker of
        // nothing must not replace the partition's last one.
        return Ok(());
    }
    let to_partition = Some(partition as i32);
    let mut records: Vec<Outgoing> = checkpoint
        .fold
        .keyed()
        .map(|keyed| {
            let payload = keyed.record_value();
            // A delete's commit goes in a header (a tombstone has no value to carry it).
            let commit = payload.is_none().then(|| keyed.commit.to_string());
            Outgoing {
                key: Some(keyed.record_key()),
                payload,
                headers: Some(writer_headers(writer, commit.as_deref())),
                partition: to_partition,
            }
        })
        .collect();
    let keyed = records.len();
    let marker = checkpoint.fold.marker();
    records.push(Outgoing {
        key: Some(crate::changelog::MARKER_KEY.to_vec()),
        payload: Some(marker.encode()),
        headers: Some(writer_headers(writer, None)),
        partition: to_partition,
    });
    send_all(producer, topic, &records, stop)?;
    record_positions(producer, topic, reader);
    let tombstones: Vec<Outgoing> = checkpoint
        .delta_records
        .iter()
        .map(|key| Outgoing {
            key: Some(key.clone().into_bytes()),
            payload: None,
            headers: Some(writer_headers(writer, None)),
            partition: to_partition,
        })
        .collect();
    send_all(producer, topic, &tombstones, stop)?;
    record_positions(producer, topic, reader);
    reader
        .changelog_checkpointed(partition, checkpoint.upto, &marker)
        .map_err(|e| format!("recording partition {partition}'s checkpoint: {e}"))?;
    metrics::counter!("tagstream_kafka_state_checkpoints_total").increment(1);
    metrics::counter!("tagstream_kafka_published_total", "feed" => Feed::State.label())
        .increment((records.len() + tombstones.len()) as u64);
    tracing::debug!(
        partition,
        keys = keyed,
        deltas = tombstones.len(),
        commit = marker.commit,
        "state checkpoint published"
    );
    Ok(())
}

/// How many partitions `topic` has, as the broker's metadata says (0: it does not exist).
pub(crate) fn partition_count<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<usize, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("reading the topic `{topic}`'s metadata: {e}"))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len()))
}

/// Checks that the state changelog topic exists with a partition for each of the engine's
/// `partitions` (a delta of partition P goes to partition P): said at start, rather than
/// every delta failing to publish while the outbox grows; that the events topic has exactly
/// `partitions` (a group's members own engine partitions as Kafka assigns the topic's).
/// Also that it keeps its records
/// ([`judge_state_topic`]): refused when the broker would delete them by age, warned about
/// when it would only grow or cannot tell.
pub fn check_state_topic(settings: &KafkaSettings, partitions: u32, timeout: Duration) -> Result<(), String> {
    let Some(topic) = &settings.state_topic else {
        return Ok(());
    };
    let consumer: BaseConsumer = settings
        .client_config()
        .create()
        .map_err(|e| format!("connecting to check the state topic `{topic}`: {e}"))?;
    let partitions_of = |topic: &str| partition_count(&consumer, topic, timeout);
    let found = partitions_of(topic)?;
    if found < partitions as usize {
        return Err(format!(
            "the state topic `{topic}` has {found} partitions; it needs at least {partitions}, one per engine partition ([engine] partitions): create it with {partitions}"
        ));
    }
    // A member of a group of several owns engine partitions as the group assigns Kafka
    // partitions: they must be the same.
    let events = partitions_of(&settings.topic)?;
    if events != partitions as usize {
        return Err(format!(
            "the events topic `{}` has {events} partitions and [engine] partitions is {partitions}: with a state topic the members of a group own engine partitions as Kafka assigns the topic's, so they must be equal (create the topic first, or set [engine] partitions = {events})",
            settings.topic
        ));
    }
    // Brokers answer at once; one that does not implement it (librdkafka's mock) is not
    // waited for long.
    let config_timeout = timeout.min(Duration::from_secs(3));
    match topic_config(
        settings,
        topic,
        &["cleanup.policy", "retention.ms"],
        config_timeout,
    ) {
        Ok(config) => {
            let (policy, retention) = (config[0].as_deref(), config[1].as_deref());
            if let Some(warning) = judge_state_topic(topic, policy, retention)? {
                tracing::warn!("{warning}");
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            topic,
            "could not read the state topic's configuration: make sure it has cleanup.policy=compact and retention.ms=-1"
        ),
    }
    Ok(())
}

/// Whether a state topic with this `cleanup.policy` and `retention.ms` (as the broker names
/// them; `None` when it names none, leaving its default) keeps what a restore needs: an
/// error when records would be deleted by age (a restore would miss the keys only they
/// wrote), a warning when it would only grow without bound or the broker's default decides.
fn judge_state_topic(
    topic: &str,
    policy: Option<&str>,
    retention_ms: Option<&str>,
) -> Result<Option<String>, String> {
    let fix = "create it with cleanup.policy=compact and retention.ms=-1 (docs/kafka.md)";
    let Some(policy) = policy else {
        return Ok(Some(format!(
            "the broker names no cleanup.policy for the state topic `{topic}`, so its default applies (Kafka's is delete, which deletes the state after retention.ms): {fix}"
        )));
    };
    let deletes = policy.split(',').any(|p| p.trim() == "delete");
    let compacts = policy.split(',').any(|p| p.trim() == "compact");
    let forever = retention_ms.is_some_and(|r| r.trim() == "-1");
    match (compacts, deletes, forever) {
        (_, true, false) => Err(format!(
            "the state topic `{topic}` has cleanup.policy={policy} and retention.ms={}: its oldest records would be deleted and a restore from it would miss the keys only they wrote; {fix}",
            retention_ms.unwrap_or("(the broker's default)")
        )),
        (false, _, _) => Ok(Some(format!(
            "the state topic `{topic}` has cleanup.policy={policy}: it keeps every record and grows with the history; {fix}"
        ))),
        _ => Ok(None),
    }
}

/// The broker's value of each of `names` in `topic`'s configuration (`None` when it names
/// none).
fn topic_config(
    settings: &KafkaSettings,
    topic: &str,
    names: &[&str],
    timeout: Duration,
) -> Result<Vec<Option<String>>, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        settings.client_config().create().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let answers = runtime
        .block_on(admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options))
        .map_err(|e| e.to_string())?;
    let resource = answers
        .into_iter()
        .next()
        .ok_or("no answer")?
        .map_err(|e| format!("{e:?}"))?;
    Ok(names
        .iter()
        .map(|name| resource.get(name).and_then(|entry| entry.value.clone()))
        .collect())
}

/// Reads partition `partition` of the state changelog topic `topic` from its start into the
/// partition's state as its last complete delta left it ([`crate::changelog::Assembler`]);
/// also returns how many deltas were left out incomplete. With `owner` (this store's
/// [`state_writer`], when it takes the partition over), the partition is first marked as
/// that writer's ([`mark_owner`]) and read up to the mark: the end is where this store's
/// own record landed, not what the broker names (tansu names one past the last batch's
/// base offset), and after every record an earlier owner's client delivered before it.
/// Without, to the end the broker names and what follows it without a pause. Records a
/// fenced zombie wrote are left out either way ([`crate::changelog::Fence`]). Fails when no record arrives for `stall` while some are
/// still to read. `progress` hears the records read so far, every thousand and at the end.
pub fn read_state_partition(
    settings: &KafkaSettings,
    topic: &str,
    partition: u32,
    partitions: u32,
    owner: Option<u64>,
    stall: Duration,
    progress: &dyn Fn(u64),
) -> Result<StateRead, String> {
    let mut assembler = crate::changelog::Assembler::new(partition, partitions);
    let (mut read, mut next_offset) = (0u64, 0i64);
    let mut take = |m: &rdkafka::message::BorrowedMessage<'_>| {
        next_offset = next_offset.max(m.offset() + 1);
        assembler
            .add_written(
                m.key().unwrap_or_default(),
                m.payload(),
                commit_header(m),
                writer_of(m),
            )
            .map_err(|e| {
                format!(
                    "{e} (offset {} of partition {partition} of `{topic}`)",
                    m.offset()
                )
            })?;
        read += 1;
        if read.is_multiple_of(1_000) {
            progress(read);
        }
        Ok(())
    };
    match owner {
        Some(writer) => {
            read_to_own_mark(settings, topic, partition, 0, writer, stall, &mut take)?;
        }
        None => read_state(settings, topic, partition, 0, stall, true, &mut take)?,
    }
    progress(read);
    if assembler.fenced() > 0 {
        tracing::warn!(
            partition,
            fenced = assembler.fenced(),
            "the state topic holds records a member wrote after another had taken the partition over: left out"
        );
    }
    let (restore, incomplete) = assembler.finish();
    Ok(StateRead {
        restore,
        incomplete,
        next_offset,
    })
}

/// A partition of the state topic read whole ([`read_state_partition`]).
pub struct StateRead {
    pub restore: crate::changelog::Restore,
    /// Deltas left out because some of their parts were missing.
    pub incomplete: usize,
    /// The offset after the last record read.
    pub next_offset: i64,
}

/// Hands `take` each record of partition `partition` of the state topic `topic` from offset
/// `from` to the end the broker names when the read begins, and those that follow it
/// without a pause (some brokers, tansu, name an end short of the last record); with
/// `past_end`, a read from at or past the end named still waits a moment for records
/// beyond it. Fails when no record arrives for `stall` before that end, or when `take`
/// fails.
fn read_state(
    settings: &KafkaSettings,
    topic: &str,
    partition: u32,
    from: i64,
    stall: Duration,
    past_end: bool,
    take: &mut dyn FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), String>,
) -> Result<(), String> {
    const SETTLE: Duration = Duration::from_millis(300);
    let failed = |what: &str, e: KafkaError| format!("{what} partition {partition} of `{topic}`: {e}");
    let consumer = state_reader(settings).map_err(|e| failed("connecting to read", e))?;
    let asked = Instant::now();
    let mut end = loop {
        match consumer.fetch_watermarks(topic, partition as i32, stall) {
            Ok((_, end)) => break end,
            Err(e) if passing(&e) && asked.elapsed() < stall => {
                tracing::warn!(error = %e, topic, partition, "finding the end of a state partition, retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(failed("finding the end of", e)),
        }
    };
    if from >= end && !past_end {
        return Ok(());
    }
    assign_from(&consumer, topic, partition, from).map_err(|e| failed("reading", e))?;
    let (mut last, mut reached) = (Instant::now(), from >= end);
    // The last error the client reported since a record arrived: a broker connection that
    // drops is reconnected by the client, and only a read that stalls on it fails.
    let mut trouble: Option<KafkaError> = None;
    loop {
        match next_state_record(&consumer, topic, partition, &mut trouble)? {
            Some(m) => {
                last = Instant::now();
                take(&m)?;
                reached |= m.offset() + 1 >= end;
            }
            // An error since the last record may have hidden records past the end: the
            // read ends once the broker answers again and names no later end.
            None if reached && last.elapsed() >= SETTLE && trouble.is_some() => {
                if let Ok((_, now)) = consumer.fetch_watermarks(topic, partition as i32, SETTLE) {
                    trouble = None;
                    if now > end {
                        (end, reached) = (now, false);
                    }
                    last = Instant::now();
                }
            }
            None if reached && last.elapsed() >= SETTLE => return Ok(()),
            None => {}
        }
        if last.elapsed() > stall && (!reached || trouble.is_some()) {
            let cause = trouble.map(|e| format!(", last error: {e}")).unwrap_or_default();
            let when = if reached { "after" } else { "before" };
            return Err(format!(
                "reading partition {partition} of `{topic}`: nothing arrived for {stall:?} {when} its end (offset {end}){cause}"
            ));
        }
    }
}

/// Marks partition `partition` of the state topic `topic` as `writer`'s ([`mark_owner`]) and
/// hands `take` each record from offset `from` up to and including the mark; returns the
/// mark's offset. The reading consumer is assigned before the mark is written, so the two
/// clients connect at once. Fails when no record arrives for `stall` before the mark.
pub(crate) fn read_to_own_mark(
    settings: &KafkaSettings,
    topic: &str,
    partition: u32,
    from: i64,
    writer: u64,
    stall: Duration,
    take: &mut dyn FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), String>,
) -> Result<i64, String> {
    let failed = |what: &str, e: KafkaError| format!("{what} partition {partition} of `{topic}`: {e}");
    let consumer = state_reader(settings).map_err(|e| failed("connecting to read", e))?;
    assign_from(&consumer, topic, partition, from).map_err(|e| failed("reading", e))?;
    let mark = mark_owner(settings, topic, partition, writer, stall)?;
    let mut last = Instant::now();
    let mut trouble: Option<KafkaError> = None;
    loop {
        if let Some(m) = next_state_record(&consumer, topic, partition, &mut trouble)? {
            last = Instant::now();
            take(&m)?;
            if m.offset() >= mark {
                return Ok(mark);
            }
        }
        if last.elapsed() > stall {
            let cause = trouble.map(|e| format!(", last error: {e}")).unwrap_or_default();
            return Err(format!(
                "reading partition {partition} of `{topic}`: nothing arrived for {stall:?} before this node's owner mark (offset {mark}){cause}"
            ));
        }
    }
}

/// One poll of a state topic reader: the next record, if one came. An error the client
/// retries is kept in `trouble` (cleared by a record) for the caller's stall message; any
/// other fails the read.
fn next_state_record<'c>(
    consumer: &'c BaseConsumer,
    topic: &str,
    partition: u32,
    trouble: &mut Option<KafkaError>,
) -> Result<Option<rdkafka::message::BorrowedMessage<'c>>, String> {
    match consumer.poll(Duration::from_millis(100)) {
        Some(Ok(m)) => {
            *trouble = None;
            Ok(Some(m))
        }
        Some(Err(e)) if !passing(&e) => Err(format!("reading partition {partition} of `{topic}`: {e}")),
        Some(Err(e)) => {
            tracing::warn!(error = %e, topic, partition, "reading a state partition, the client retries");
            *trouble = Some(e);
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Assigns `consumer` partition `partition` of `topic` from offset `from`.
fn assign_from(consumer: &BaseConsumer, topic: &str, partition: u32, from: i64) -> Result<(), KafkaError> {
    let start = match from {
        0 => Offset::Beginning,
        from => Offset::Offset(from),
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, start)?;
    consumer.assign(&tpl)
}

/// A consumer that reads the state topic by assignment (no group membership, no commits).
/// A fetch that finds nothing new is answered after 20 ms rather than librdkafka's 500: a
/// take-over's read waits for its own mark, written as the read starts.
fn state_reader(settings: &KafkaSettings) -> Result<BaseConsumer, KafkaError> {
    let mut config = settings.client_config();
    config
        .set("group.id", format!("{}-restore", settings.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    if !settings.client_options.contains_key("fetch.wait.max.ms") {
        config.set("fetch.wait.max.ms", "20");
    }
    config.create()
}

/// Writes an owner mark ([`crate::changelog::OWNER_MARK_PREFIX`]) to partition `partition`
/// of the state topic `topic`, naming `writer` (this store's [`state_writer`]) as the only
/// store whose later records there count ([`crate::changelog::Fence`]), and returns the
/// offset the broker gave it. A member writes one whenever it starts owning a partition,
/// before it reads the partition: every reader then leaves out what an earlier owner still
/// wrote after it (a zombie's records), and the mark's offset is where the read ends.
pub(crate) fn mark_owner(
    settings: &KafkaSettings,
    topic: &str,
    partition: u32,
    writer: u64,
    stall: Duration,
) -> Result<i64, String> {
    let failed = |what: &str, e: String| format!("{what} partition {partition} of `{topic}`: {e}");
    // Not idempotent: one record, and a client that is starts with a round trip for its
    // producer id (half a second on tansu, on every take-over); a mark written twice by a
    // retry is the same mark, and the read goes to the later one.
    let producer: BaseProducer<PublishCtx> = settings
        .client_config()
        .set("enable.idempotence", "false")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create_with_context(PublishCtx::default())
        .map_err(|e| failed("connecting to mark", e.to_string()))?;
    let label = writer_label(writer);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let key = format!("o/{label}/{nonce:x}");
    let record = Outgoing {
        key: Some(key.into_bytes()),
        payload: Some(label.clone().into_bytes()),
        headers: Some(writer_headers(&label, None)),
        partition: Some(partition as i32),
    };
    let stop = AtomicBool::new(false);
    let began = Instant::now();
    loop {
        match send_all(&producer, topic, std::slice::from_ref(&record), &stop) {
            Ok(()) => break,
            Err(e) if began.elapsed() < stall => {
                tracing::warn!(error = %e, topic, partition, "writing an owner mark, retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(failed("marking", e)),
        }
    }
    producer
        .context()
        .take_delivered()
        .get(&(partition as i32))
        .copied()
        .ok_or_else(|| {
            failed(
                "marking",
                "the broker confirmed the mark without its offset".into(),
            )
        })
}

/// The writer a state topic record's [`WRITER_HEADER`] names, if any.
pub(crate) fn writer_of<'a>(m: &'a rdkafka::message::BorrowedMessage<'_>) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .find(|h| h.key == WRITER_HEADER)
        .and_then(|h| h.value)
}

/// Whether an error of a client reading the state topic can pass as the client retries
/// (a broker restarting, a connection dropped, a request timing out) rather than stay until
/// someone changes something (no such topic or partition, no right to read it, a refused
/// login).
pub(crate) fn passing(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    !matches!(
        error.rdkafka_error_code(),
        Some(
            Code::UnknownTopicOrPartition
                | Code::UnknownTopic
                | Code::UnknownPartition
                | Code::TopicAuthorizationFailed
                | Code::GroupAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::SaslAuthenticationFailed
                | Code::Authentication
                | Code::Fatal
                | Code::InvalidArgument
        )
    )
}

/// The commit a state topic record names in its [`crate::changelog::COMMIT_HEADER`], if any.
fn commit_header(m: &impl Message) -> Option<u64> {
    m.headers()?
        .iter()
        .find(|h| h.key == crate::changelog::COMMIT_HEADER)
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<u64>().ok())
}

/// The header naming the store that wrote a state topic record ([`state_writer`]).
pub const WRITER_HEADER: &str = "tagstream-writer";

/// The cursor holding this store's id as a writer of the state topic.
const STATE_WRITER: &str = "kafka-state-writer";

/// This store's id as a writer of the state topic, made the first time it is asked for
/// and kept in the store: every record it publishes there names it ([`WRITER_HEADER`]), so
/// that a member taking back a partition it kept can tell whether another store wrote to
/// the partition since ([`foreign_records`]).
pub fn state_writer(reader: &ReadHandle) -> Result<u64, crate::EngineError> {
    let id = reader.cursor(STATE_WRITER)?;
    if id != 0 {
        return Ok(id);
    }
    use std::hash::BuildHasher;
    let id = std::collections::hash_map::RandomState::new()
        .hash_one((std::process::id(), std::time::SystemTime::now()))
        .max(1);
    reader.set_cursor(STATE_WRITER, id)?;
    Ok(id)
}

/// A writer id as the records' [`WRITER_HEADER`] carries it.
fn writer_label(writer: u64) -> String {
    format!("{writer:016x}")
}

/// The value of a [`state_position_cursor`] for a position: the offset of the next record,
/// plus one (0 stands for "not known").
fn position_value(next_offset: i64) -> u64 {
    next_offset.max(0) as u64 + 1
}

/// Makes this store take a new writer id at its next start ([`state_writer`]): a store
/// restored from a backup is not the store that went on writing after the backup, and
/// the records that one wrote must read as another store's.
pub fn renew_state_writer(reader: &ReadHandle) -> Result<(), crate::EngineError> {
    reader.set_cursor(STATE_WRITER, 0)
}

/// The cursor holding how far partition `partition` of the state topic `topic` is known
/// to this store: 1 + the offset of the next record after those it wrote or read (0: not
/// known).
fn state_position_cursor(topic: &str, partition: u32) -> String {
    format!("kafka-state-position:{topic}:{partition}")
}

/// Records that this store knows partition `partition` of the state topic `topic` up to
/// (not including) `next_offset`: it restored the partition from there, or published the
/// record before it.
pub fn set_state_position(
    reader: &ReadHandle,
    topic: &str,
    partition: u32,
    next_offset: i64,
) -> Result<(), crate::EngineError> {
    reader.set_cursor(
        &state_position_cursor(topic, partition),
        position_value(next_offset),
    )
}

/// How far this store knows partition `partition` of the state topic ([`set_state_position`]),
/// if it does.
pub(crate) fn state_position(
    reader: &ReadHandle,
    topic: &str,
    partition: u32,
) -> Result<Option<i64>, crate::EngineError> {
    let cursor = reader.cursor(&state_position_cursor(topic, partition))?;
    Ok(cursor.checked_sub(1).map(|next| next as i64))
}

/// Forgets how far this store knows the partition (it no longer holds it).
pub(crate) fn forget_state_position(
    reader: &ReadHandle,
    topic: &str,
    partition: u32,
) -> Result<(), crate::EngineError> {
    reader.set_cursor(&state_position_cursor(topic, partition), 0)
}

/// Records, for each partition the broker confirmed records of since the last call, that
/// the state topic is known to this store up to them.
fn record_positions(producer: &BaseProducer<PublishCtx>, topic: &str, reader: &ReadHandle) {
    let positions: Vec<(String, u64)> = producer
        .context()
        .take_delivered()
        .into_iter()
        .map(|(partition, offset)| {
            (
                state_position_cursor(topic, partition as u32),
                position_value(offset + 1),
            )
        })
        .collect();
    if let Err(e) = reader.set_cursors(&positions) {
        tracing::error!(error = %e, "saving how far the state topic was written failed");
    }
}

/// Headers of a state topic record: its writer, and the commit of a deleted key's tombstone.
fn writer_headers(writer: &str, commit: Option<&str>) -> OwnedHeaders {
    let headers = OwnedHeaders::new().insert(Header {
        key: WRITER_HEADER,
        value: Some(writer),
    });
    match commit {
        Some(commit) => headers.insert(Header {
            key: crate::changelog::COMMIT_HEADER,
            value: Some(commit),
        }),
        None => headers,
    }
}

/// What a check of a kept partition found in the state topic after the store's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TailCheck {
    /// Records another store wrote (or one that names no writer).
    pub foreign: u64,
    /// Records this store wrote (published before a crash, not recorded as confirmed).
    pub own: u64,
    /// The offset after the last record read (`from` when there was none).
    pub next_offset: i64,
}

/// Marks partition `partition` of the state topic as `writer`'s ([`mark_owner`]), reads it
/// from offset `from` up to the mark, and counts the records `writer` did not write.
pub(crate) fn foreign_records(
    settings: &KafkaSettings,
    topic: &str,
    partition: u32,
    from: i64,
    writer: u64,
    stall: Duration,
) -> Result<TailCheck, String> {
    let ours = writer_label(writer);
    let mut check = TailCheck {
        foreign: 0,
        own: 0,
        next_offset: from,
    };
    read_to_own_mark(settings, topic, partition, from, writer, stall, &mut |m| {
        if writer_of(m) == Some(ours.as_bytes()) {
            check.own += 1;
        } else {
            check.foreign += 1;
        }
        check.next_offset = check.next_offset.max(m.offset() + 1);
        Ok(())
    })?;
    Ok(check)
}

/// Produces every record and waits for the broker to confirm all of them.
fn send_all(
    producer: &BaseProducer<PublishCtx>,
    topic: &str,
    records: &[Outgoing],
    stop: &AtomicBool,
) -> Result<(), String> {
    *producer
        .context()
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    for r in records {
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
            if let Some(payload) = &r.payload {
                record = record.payload(&payload[..]);
            }
            if let Some(key) = &r.key {
                record = record.key(&key[..]);
            }
            if let Some(headers) = &r.headers {
                record = record.headers(headers.clone());
            }
            if let Some(partition) = r.partition {
                record = record.partition(partition);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    producer.poll(Duration::from_millis(100));
                    if stop.load(Ordering::SeqCst) {
                        return Err("stopping".into());
                    }
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
    }
    // Flushed in slices, so a stop after the shutdown grace is not held up for long.
    let flushing = std::time::Instant::now();
    loop {
        match producer.flush(Duration::from_millis(250)) {
            Ok(()) => break,
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                if !stop.load(Ordering::SeqCst) && flushing.elapsed() < Duration::from_secs(30) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    match producer
        .context()
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state topic that deletes records by age is refused; one that only grows, or whose
    /// policy the broker leaves to its default, is warned about.
    #[test]
    fn a_state_topic_must_keep_its_records() {
        let judge = |policy, retention| judge_state_topic("s", policy, retention);
        assert_eq!(judge(Some("compact"), None), Ok(None));
        assert_eq!(judge(Some("compact"), Some("604800000")), Ok(None));
        assert_eq!(judge(Some("compact,delete"), Some("-1")), Ok(None));
        for (policy, retention) in [
            (Some("delete"), Some("604800000")),
            (Some("delete"), None),
            (Some("compact, delete"), Some("86400000")),
        ] {
            let refused = judge(policy, retention).unwrap_err();
            assert!(
                refused.contains("would be deleted") && refused.contains("cleanup.policy=compact"),
                "{refused}"
            );
        }
        let grows = judge(Some("delete"), Some("-1")).unwrap().unwrap();
        assert!(grows.contains("grows with the history"), "{grows}");
        let unknown = judge(None, None).unwrap().unwrap();
        assert!(unknown.contains("names no cleanup.policy"), "{unknown}");
    }

    /// A member restoring partitions is not ready, and says how far each read has come.
    #[test]
    fn readiness_names_the_partitions_restoring_and_their_progress() {
        let status = KafkaStatus::default();
        status.group.store(true, Ordering::Release);
        status.partitions.store(6, Ordering::Release);
        status.owned.lock().unwrap().insert(0);
        status.set_restoring([4, 5].into());
        assert!(status.restoring(4) && !status.owns(4) && status.owns(0) && !status.restoring(0));
        status.restore_read(4, Some(12_000));
        status.restore_read(5, Some(0));
        let said = status.ready().unwrap_err();
        assert!(
            said.contains("restoring 2 of the 3 partitions")
                && said.contains("partition 4: 12000 records read, partition 5: 0 records read"),
            "{said}"
        );
        status.restore_read(4, None);
        status.restore_read(5, None);
        status.set_restoring([].into());
        // Owning part of the topic is what a member of several does.
        assert_eq!(status.ready(), Ok(()));
    }

    /// A read of the state topic outlasts a broker that drops every connection mid-read and
    /// takes them again a moment later (what failed a restore on a loaded machine): every
    /// record is read once, in order. One that stays away past the stall fails, naming the
    /// client's last error.
    #[test]
    fn a_state_read_outlasts_a_broker_that_goes_away_and_comes_back() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        const RECORDS: i64 = 200;
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("state", 1, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "0")
            // One batch per record, so that the reader fetches a few at a time.
            .set("batch.num.messages", "1")
            .create()
            .unwrap();
        for i in 0..RECORDS {
            let key = i.to_string();
            producer
                .send(BaseRecord::to("state").key(&key).payload(&key))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let mut settings = KafkaSettings::new(&brokers, "events", "g-outlast");
        for (option, value) in [
            ("fetch.message.max.bytes", "1"),
            ("queued.min.messages", "1"),
            ("fetch.queue.backoff.ms", "10"),
            ("reconnect.backoff.max.ms", "200"),
        ] {
            settings.client_options.insert(option.into(), value.into());
        }

        let read =
            |stall: Duration, first: std::sync::mpsc::Sender<()>, go: std::sync::mpsc::Receiver<()>| {
                let settings = settings.clone();
                std::thread::spawn(move || {
                    let mut offsets = Vec::new();
                    let read = read_state(&settings, "state", 0, 0, stall, false, &mut |m| {
                        if offsets.is_empty() {
                            // The broker goes down between this record and the next.
                            first.send(()).unwrap();
                            go.recv().unwrap();
                        }
                        offsets.push(m.offset());
                        Ok(())
                    });
                    read.map(|()| offsets)
                })
            };
        let (first, heard) = std::sync::mpsc::channel();
        let (go, waiting) = std::sync::mpsc::channel();
        let reader = read(Duration::from_secs(20), first, waiting);
        heard.recv().unwrap();
        cluster.broker_down(-1).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        go.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        cluster.broker_up(-1).unwrap();
        let offsets = reader.join().unwrap().unwrap();
        assert_eq!(offsets, (0..RECORDS).collect::<Vec<_>>());

        let (first, heard) = std::sync::mpsc::channel();
        let (go, waiting) = std::sync::mpsc::channel();
        let reader = read(Duration::from_secs(2), first, waiting);
        heard.recv().unwrap();
        cluster.broker_down(-1).unwrap();
        go.send(()).unwrap();
        let failed = reader.join().unwrap().unwrap_err();
        cluster.broker_up(-1).unwrap();
        assert!(
            failed.contains("nothing arrived for 2s before its end (offset 200), last error:"),
            "{failed}"
        );
    }

    #[test]
    fn debug_output_names_client_options_but_never_their_values() {
        let mut settings = KafkaSettings::new("b:9092", "events", "g");
        settings
            .client_options
            .insert("sasl.password".into(), "hunter2-secret".into());
        let shown = format!("{settings:?}");
        assert!(shown.contains("sasl.password"), "{shown}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
    }
}
