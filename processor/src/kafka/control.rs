//! The rule set of a group of several, kept the same on every node (issue #21,
//! `docs/design/cluster.md` §5): a change asked of any node — `PUT /v1/rules`, a rollback, a
//! saved segment put or deleted — is checked there ([`crate::Engine::propose_rules`] and its
//! kin), then produced to the **control topic**; every node reads the topic in order and
//! applies each accepted change ([`crate::Engine::apply_proposal`]), the asking node
//! included, which answers once it has applied its own.
//!
//! Which changes are accepted is decided by the topic alone, so every node decides alike: a
//! change proposes version `N + 1` of the version `N` it read, and is accepted when version
//! `N` is the last accepted one; the other of two changes made at once from the same version
//! is refused (409 with the current version to its caller, which retries on the new version when it did not ask for
//! one with `If-Match`). The first record of an empty topic starts the chain: a node whose
//! store already has a rule set offers it when it finds the topic empty. Every node thus runs
//! the same versions under the same numbers and generations, and a partition's state moves
//! between nodes judged under the generation both understand.
//!
//! The topic has one partition; its records are never replaced (each key is unique), so a
//! node that joins later reads the chain from the start and applies its last version.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde::{Deserialize, Serialize};

use super::{KafkaSettings, KafkaStatus};
use crate::{EngineHandle, Proposal, SegmentUpdate};

/// What the control topic carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum ControlRecord {
    /// A change of the rule set, from the version just before the one it proposes.
    Change { proposal: Proposal },
    /// The rule set a node found its store running when the topic was empty: accepted only
    /// as the chain's first record.
    Start { proposal: Proposal },
    /// A node marks where the topic ended when it started reading (it has read everything
    /// before once it reads this).
    Mark,
    /// A setting every node keeps a copy of (an API key, a webhook subscription): not part
    /// of the chain; each node merges it by the rule of its kind ([`Control::on_shared`]).
    Shared { shared: Shared },
}

/// A record of a setting the group shares, as written: its kind (`key`, `webhook`), its id
/// within the kind and its whole state. Every node merges the records of one id by a rule
/// that gives the same result in any order (a revocation or a deletion wins), so the
/// topic's order need not be agreed and a node that was away merges what it missed.
///
/// A record marked `latest` (a position that only moves on, such as a webhook's delivery
/// cursor) replaces the one before it of the same kind and id: its Kafka key is the kind and
/// id alone, so that compaction keeps only the last, and a sink registered late is given
/// only the last one read.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shared {
    pub kind: String,
    pub id: String,
    pub body: serde_json::Value,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latest: bool,
}

impl std::fmt::Debug for Shared {
    /// Without the body: a webhook's signing secret is in it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Takes in the shared records of one kind, on the thread that reads the control topic.
pub type SharedSink = Box<dyn Fn(&Shared) + Send + Sync>;

/// The shared records read so far (a sink registered late is given them first) and who
/// takes them in.
#[derive(Default)]
struct SharedRecords {
    read: Vec<Shared>,
    sinks: Vec<(String, SharedSink)>,
}

/// Which records the chain accepts: decided from the topic alone, in its order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// The last accepted version.
    last: Option<u64>,
}

impl Chain {
    /// Whether `record` is accepted after the records seen so far (and takes it in).
    pub fn accept(&mut self, record: &ControlRecord) -> bool {
        let (version, start) = match record {
            ControlRecord::Change { proposal } => (proposal.version.version, false),
            ControlRecord::Start { proposal } => (proposal.version.version, true),
            ControlRecord::Mark | ControlRecord::Shared { .. } => return false,
        };
        let accepted = match self.last {
            // A topic whose first records were deleted (by a retention set on it) starts at
            // the first one left.
            None => true,
            Some(_) if start => false,
            Some(last) => version == last + 1,
        };
        if accepted {
            self.last = Some(version);
        }
        accepted
    }

    /// The last accepted version.
    pub fn last(&self) -> Option<u64> {
        self.last
    }
}

/// What became of a change this node proposed.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Accepted and applied here.
    Applied(SegmentUpdate, crate::RuleVersion),
    /// Another change from the same version was accepted first; `current` runs now.
    Refused { current: u64 },
    /// Accepted, but applying it here failed (the log says more).
    Failed(String),
}

/// Why a proposal got no outcome.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control topic `{topic}` could not take the change: {reason}")]
    Produce { topic: String, reason: String },
    #[error(
        "the change was sent to the control topic but not read back within {0:?}; it may still be applied"
    )]
    Timeout(Duration),
}

/// This node's end of the control topic.
pub struct Control {
    topic: String,
    /// This node's name among the group's (in the keys of the records it writes).
    node: String,
    producer: BaseProducer,
    outcomes: Mutex<HashMap<String, Outcome>>,
    arrived: Condvar,
    stopping: AtomicBool,
    shared: Mutex<SharedRecords>,
}

impl Control {
    /// Sends `proposal` to every node and waits (up to `timeout`) until this node has read
    /// it back and applied it, or found it refused. Blocking.
    pub fn propose(&self, proposal: Proposal, timeout: Duration) -> Result<Outcome, ControlError> {
        let key = self.key(proposal.version.version);
        self.send(&key, &ControlRecord::Change { proposal })?;
        let deadline = Instant::now() + timeout;
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(outcome) = outcomes.remove(&key) {
                return Ok(outcome);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(ControlError::Timeout(timeout));
            };
            outcomes = self
                .arrived
                .wait_timeout(outcomes, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A key no other record has: the version, this node's name and the moment.
    fn key(&self, version: u64) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{version}|{}|{nanos}", self.node)
    }

    /// Sends a shared setting to every node (this one included, which has it already and
    /// merges it again to no effect); returns once the broker has it.
    pub fn share(&self, shared: &Shared) -> Result<(), ControlError> {
        let key = if shared.latest {
            format!("shared|{}|{}", shared.kind, shared.id)
        } else {
            format!("shared|{}|{}|{}", shared.kind, shared.id, self.key(0))
        };
        self.send(
            &key,
            &ControlRecord::Shared {
                shared: shared.clone(),
            },
        )
    }

    /// From now on, every shared record of `kind` read from the topic goes to `sink`, on
    /// the reading thread; those read before are given to it first, here, in their order.
    pub fn on_shared(&self, kind: &str, sink: SharedSink) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        for record in shared.read.iter().filter(|r| r.kind == kind) {
            sink(record);
        }
        shared.sinks.push((kind.to_owned(), sink));
    }

    /// A shared record read from the topic: kept for sinks to come, given to those there.
    fn take_shared(&self, record: Shared) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        for (kind, sink) in &shared.sinks {
            if *kind == record.kind {
                sink(&record);
            }
        }
        if record.latest {
            if let Some(before) = shared
                .read
                .iter_mut()
                .find(|r| r.latest && r.kind == record.kind && r.id == record.id)
            {
                *before = record;
                return;
            }
        }
        shared.read.push(record);
    }

    fn mine(&self, key: &str) -> bool {
        key.split('|').nth(1) == Some(self.node.as_str())
    }

    fn send(&self, key: &str, record: &ControlRecord) -> Result<(), ControlError> {
        let body = serde_json::to_vec(record).expect("a control record serialises");
        let failed = |reason: String| ControlError::Produce {
            topic: self.topic.clone(),
            reason,
        };
        self.producer
            .send(BaseRecord::<str, [u8]>::to(&self.topic).key(key).payload(&body))
            .map_err(|(e, _)| failed(e.to_string()))?;
        self.producer
            .flush(Duration::from_secs(10))
            .map_err(|e| failed(e.to_string()))
    }

    fn settle(&self, key: &str, outcome: Outcome) {
        if self.mine(key) {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            outcomes.insert(key.to_owned(), outcome);
            self.arrived.notify_all();
        }
    }
}

/// The running reader of the control topic; dropping it stops the reader.
pub struct ControlWorker {
    control: Arc<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlWorker {
    /// Where proposals are sent.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }
}

impl Drop for ControlWorker {
    fn drop(&mut self) {
        self.control.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Nothing is read any more: the sinks go, and with them what they hold (a sink may
        // hold what holds this control, such as the server's state).
        self.control
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sinks
            .clear();
    }
}

/// Reads the control topic to its end and brings this node to the group's rule set — its
/// last accepted version, or, on an empty topic, the rule set of this node's store, offered
/// as the chain's start — then keeps applying changes as they come. Returns once the node
/// runs the group's version (within `timeout`), so that no event is judged under another.
pub fn start(
    settings: &KafkaSettings,
    topic: &str,
    node: &str,
    engine: EngineHandle,
    status: Arc<KafkaStatus>,
    timeout: Duration,
) -> Result<ControlWorker, String> {
    let consumer = super::members::single_partition_reader(settings, topic, "control", timeout)?;
    let producer: BaseProducer = settings
        .client_config()
        .set("linger.ms", "0")
        .create()
        .map_err(|e| format!("connecting to write the control topic `{topic}`: {e}"))?;
    let control = Arc::new(Control {
        topic: topic.to_owned(),
        node: node.to_owned(),
        producer,
        outcomes: Mutex::new(HashMap::new()),
        arrived: Condvar::new(),
        stopping: AtomicBool::new(false),
        shared: Mutex::default(),
    });
    // Where the topic ends now: everything before the mark is the chain so far.
    let mark = format!("mark|{}", control.key(0));
    control
        .send(&mark, &ControlRecord::Mark)
        .map_err(|e| e.to_string())?;
    let mut reader = Reader {
        control: control.clone(),
        consumer,
        engine,
        status,
        chain: Chain::default(),
    };
    reader
        .catch_up(&mark, timeout)
        .map_err(|e| format!("reading the control topic `{topic}`: {e}"))?;
    let thread = std::thread::Builder::new()
        .name("tagstream-control".into())
        .spawn(move || reader.follow())
        .map_err(|e| e.to_string())?;
    Ok(ControlWorker {
        control,
        thread: Some(thread),
    })
}

struct Reader {
    control: Arc<Control>,
    consumer: BaseConsumer,
    engine: EngineHandle,
    status: Arc<KafkaStatus>,
    chain: Chain,
}

impl Reader {
    /// Reads up to `mark`, then runs the last accepted version; on an empty chain, offers
    /// the store's rule set as its start and runs what the chain accepts first (its own
    /// start, or another node's that came before it).
    fn catch_up(&mut self, mark: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut latest: Option<Proposal> = None;
        let mut offered: Option<String> = None;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| format!("not read to its end within {timeout:?}"))?;
            let Some(message) = self.consumer.poll(left.min(Duration::from_millis(200))) else {
                continue;
            };
            let message = match message {
                Ok(message) => message,
                // A connection dropped: the client reconnects, the deadline bounds the wait.
                Err(e) if super::passing(&e) => {
                    tracing::warn!(error = %e, topic = %self.control.topic, "reading the control topic, the client retries");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let Some((key, record)) = decode(&message) else {
                continue;
            };
            let record = match record {
                ControlRecord::Shared { shared } => {
                    self.control.take_shared(shared);
                    continue;
                }
                record => record,
            };
            if self.chain.accept(&record) {
                if let ControlRecord::Change { proposal } | ControlRecord::Start { proposal } = record {
                    latest = Some(proposal);
                }
            }
            if offered.as_deref() == Some(key.as_str()) {
                break;
            }
            if key == mark {
                if latest.is_some() {
                    break;
                }
                match self.offer_start()? {
                    Some(key) => offered = Some(key),
                    None => return Ok(()),
                }
            }
        }
        match latest.map(|proposal| self.apply(proposal)).transpose()? {
            Some(Outcome::Failed(e)) => Err(format!("applying the group's rule set: {e}")),
            _ => Ok(()),
        }
    }

    /// Offers this store's current rule set as the chain's start; `None` when the store has
    /// none (the first change made anywhere starts the chain).
    fn offer_start(&self) -> Result<Option<String>, String> {
        let current = self
            .engine
            .call_blocking(|engine| engine.current_proposal())
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(proposal) = current else {
            return Ok(None);
        };
        let key = self.control.key(proposal.version.version);
        tracing::info!(
            version = proposal.version.version,
            "the control topic is empty: offering this store's rule set to the group"
        );
        self.control
            .send(&key, &ControlRecord::Start { proposal })
            .map_err(|e| e.to_string())?;
        Ok(Some(key))
    }

    fn apply(&self, proposal: Proposal) -> Result<Outcome, String> {
        let version = proposal.version.version;
        let applied = self
            .engine
            .call_blocking(move |engine| engine.apply_proposal(proposal))
            .map_err(|e| e.to_string())?;
        Ok(match applied {
            Ok((update, version)) => {
                self.status.set_rules_version(version.version);
                Outcome::Applied(update, version)
            }
            Err(e) => {
                tracing::error!(version, error = %e, "could not apply the group's rule-set version");
                Outcome::Failed(e.to_string())
            }
        })
    }

    /// Applies each accepted change as it is read; tells proposers of this node what became
    /// of theirs.
    fn follow(mut self) {
        while !self.control.stopping.load(Ordering::SeqCst) {
            let Some(message) = self.consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    tracing::warn!(error = %e, topic = %self.control.topic, "reading the control topic");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            let Some((key, record)) = decode(&message) else {
                continue;
            };
            let record = match record {
                ControlRecord::Shared { shared } => {
                    self.control.take_shared(shared);
                    continue;
                }
                record => record,
            };
            let before = self.chain.last();
            if !self.chain.accept(&record) {
                if !matches!(record, ControlRecord::Mark) {
                    self.control.settle(
                        &key,
                        Outcome::Refused {
                            current: before.unwrap_or(0),
                        },
                    );
                }
                continue;
            }
            let (ControlRecord::Change { proposal } | ControlRecord::Start { proposal }) = record else {
                continue;
            };
            let outcome = match self.apply(proposal) {
                Ok(outcome) => outcome,
                // The engine stopped: so does the node.
                Err(_) => return,
            };
            self.control.settle(&key, outcome);
        }
    }
}

/// A record read from the topic with its key, or `None` (logged) when it is not one
/// tagstream wrote.
fn decode(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<(String, ControlRecord)> {
    let key = message
        .key_view::<str>()
        .and_then(Result::ok)
        .unwrap_or_default()
        .to_owned();
    match serde_json::from_slice(message.payload()?) {
        Ok(record) => Some((key, record)),
        Err(e) => {
            tracing::warn!(error = %e, key, "a record on the control topic is not one tagstream wrote; ignored");
            None
        }
    }
}
