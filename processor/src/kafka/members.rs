//! How the members of a group of several find each other (issue #21,
//! `docs/design/cluster.md` §4): each node puts a card on the members topic — its
//! advertised HTTP address and the partitions it owns and restores — when that changes and
//! every [`REFRESH`], and reads everyone's cards from the topic. A node whose card is older
//! than [`GONE_AFTER`] is presumed gone; one that stops cleanly withdraws its card (a
//! tombstone). The topic is one partition, keyed by node, compacted: operators can read it
//! too (`kcat -C -t GROUP-members -K'\t'`).
//!
//! The cards route a request for a customer to the node that owns the customer's partition,
//! and tell a fan-out which nodes to ask.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::{KafkaSettings, KafkaStatus};

/// How often a node puts its card on the topic when nothing changed.
pub const REFRESH: Duration = Duration::from_secs(5);

/// A card older than this is a node presumed gone (three refreshes missed, and some room
/// for clocks that differ between machines).
pub const GONE_AFTER: Duration = Duration::from_secs(20);

/// How often the node looks whether what it owns changed (and reads others' cards).
const LOOK_EVERY: Duration = Duration::from_millis(200);

/// What a node says of itself on the members topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCard {
    /// Where its HTTP API answers (`[cluster] advertise`), which also names the node.
    pub url: String,
    /// The partitions it owns and serves.
    pub owned: Vec<u32>,
    /// The partitions it owns and is still restoring from the state topic.
    pub restoring: Vec<u32>,
    /// The partitions others own that it keeps a standby copy of.
    #[serde(default)]
    pub standby: Vec<u32>,
    /// `[engine] partitions` as it runs them.
    pub partitions: u32,
    /// When the card was written (the node's wall clock, ms since the epoch).
    pub at: i64,
    /// The rule-set version it runs.
    #[serde(default)]
    pub rules_version: u64,
    /// A fingerprint of the settings that decide how it judges events and requests (the
    /// tracking plan, identity, limits, horizons, roles), which every node of a group
    /// should share: nodes that differ judge a customer by whichever owns it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub settings: String,
}

/// Who answers for a partition, as far as this node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node owns it and has restored it.
    Here,
    /// This node owns it and is restoring it.
    Restoring,
    /// Another node owns it (its advertised address), and holds it.
    Node(String),
    /// Another node owns it and is restoring it.
    NodeRestoring(String),
    /// No live card claims it: between owners, or its owner is gone.
    Unknown,
}

/// The cards this node has read, its own included.
pub struct Members {
    url: String,
    partitions: u32,
    /// This node's [`MemberCard::settings`].
    settings: String,
    status: Arc<KafkaStatus>,
    cards: Mutex<BTreeMap<String, MemberCard>>,
    stopping: AtomicBool,
}

impl Members {
    /// The registry of a node advertising `url` and running `partitions`, before anything
    /// was read: it knows only itself (what `status` says it owns).
    pub fn new(url: impl Into<String>, partitions: u32, status: Arc<KafkaStatus>) -> Members {
        Members {
            url: url.into(),
            partitions,
            settings: String::new(),
            status,
            cards: Mutex::new(BTreeMap::new()),
            stopping: AtomicBool::new(false),
        }
    }

    /// This node's advertised address.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The live nodes whose settings fingerprint is not this node's (a node of a version
    /// that writes none is not counted).
    pub fn settings_differ(&self) -> Vec<String> {
        let now = wall_ms();
        let cards = self.cards.lock().unwrap_or_else(|e| e.into_inner());
        cards
            .values()
            .filter(|card| card.url != self.url && alive(card, now))
            .filter(|card| !card.settings.is_empty() && card.settings != self.settings)
            .map(|card| card.url.clone())
            .collect()
    }

    /// `[engine] partitions` as this node runs them.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Who answers for `partition`: this node when its consumer owns it, else the live card
    /// that claims it (the newest, when two do while it moves).
    pub fn owner_of(&self, partition: u32) -> Owner {
        if self.status.owns(partition) {
            return Owner::Here;
        }
        if self.status.restoring(partition) {
            return Owner::Restoring;
        }
        let now = wall_ms();
        let cards = self.cards.lock().unwrap_or_else(|e| e.into_inner());
        cards
            .values()
            .filter(|card| card.url != self.url && alive(card, now))
            .filter(|card| card.owned.contains(&partition))
            .max_by_key(|card| card.at)
            .map_or(Owner::Unknown, |card| {
                if card.restoring.contains(&partition) {
                    Owner::NodeRestoring(card.url.clone())
                } else {
                    Owner::Node(card.url.clone())
                }
            })
    }

    /// The live cards, this node's own first (written now), then the others by address.
    pub fn cards(&self) -> Vec<MemberCard> {
        let now = wall_ms();
        let mine = self.my_card();
        let cards = self.cards.lock().unwrap_or_else(|e| e.into_inner());
        std::iter::once(mine)
            .chain(
                cards
                    .values()
                    .filter(|card| card.url != self.url && alive(card, now))
                    .cloned(),
            )
            .collect()
    }

    fn my_card(&self) -> MemberCard {
        let restoring = self.status.restoring_list();
        let mut owned = self.status.owned_partitions();
        owned.extend(&restoring);
        owned.sort_unstable();
        MemberCard {
            url: self.url.clone(),
            owned,
            restoring,
            standby: self.status.standby_list(),
            partitions: self.partitions,
            at: wall_ms(),
            rules_version: self.status.rules_version(),
            settings: self.settings.clone(),
        }
    }

    /// Takes in a card read from the topic (`None`: the node withdrew it).
    fn read(&self, node: &str, card: Option<MemberCard>) {
        let mut cards = self.cards.lock().unwrap_or_else(|e| e.into_inner());
        match card {
            Some(card) => {
                cards.insert(node.to_owned(), card);
            }
            None => {
                cards.remove(node);
            }
        }
    }
}

/// A node's rank for a piece of work named by `key` (a partition to copy, a webhook
/// subscription to deliver): FNV-1a of its address and the key, the same on every node, so
/// that every node picks the same highest-ranked ones from the same cards (rendezvous
/// hashing).
pub fn rank(url: &str, key: &[u8]) -> u64 {
    crate::partition::fnv1a(url.bytes().chain(key.iter().copied()))
}

fn alive(card: &MemberCard, now: i64) -> bool {
    now.saturating_sub(card.at) < GONE_AFTER.as_millis() as i64
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The running exchange of cards; [`MembersWorker::stop`] withdraws this node's card.
pub struct MembersWorker {
    members: Arc<Members>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MembersWorker {
    /// The registry the worker keeps.
    pub fn members(&self) -> &Arc<Members> {
        &self.members
    }

    /// Withdraws this node's card (so others stop routing to it at once rather than after
    /// [`GONE_AFTER`]) and stops, within about `timeout`.
    pub fn stop(mut self, timeout: Duration) {
        self.members.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + timeout;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for MembersWorker {
    fn drop(&mut self) {
        self.members.stopping.store(true, Ordering::SeqCst);
    }
}

/// Checks that the members `topic` exists (one partition is enough; a node reads only
/// partition 0), then starts putting this node's card on it and reading everyone's.
pub fn start(
    settings: &KafkaSettings,
    topic: &str,
    url: &str,
    partitions: u32,
    fingerprint: &str,
    status: Arc<KafkaStatus>,
    timeout: Duration,
) -> Result<MembersWorker, String> {
    let consumer = single_partition_reader(settings, topic, "members", timeout)?;
    let producer: BaseProducer = settings
        .client_config()
        .set("linger.ms", "0")
        .create()
        .map_err(|e| format!("connecting to write the members topic `{topic}`: {e}"))?;
    let mut members = Members::new(url, partitions, status);
    members.settings = fingerprint.to_owned();
    let members = Arc::new(members);
    let worker = members.clone();
    let topic = topic.to_owned();
    let thread = std::thread::Builder::new()
        .name("tagstream-members".into())
        .spawn(move || exchange(&worker, &topic, &consumer, &producer))
        .map_err(|e| e.to_string())?;
    Ok(MembersWorker {
        members,
        thread: Some(thread),
    })
}

/// A reader of partition 0 of `topic` (a members or control topic, named `role` in errors)
/// from its start, once the topic is found to exist.
pub(super) fn single_partition_reader(
    settings: &KafkaSettings,
    topic: &str,
    role: &str,
    timeout: Duration,
) -> Result<BaseConsumer, String> {
    let consumer: BaseConsumer = settings
        .client_config()
        // Assigned, not subscribed: the group id is never joined nor committed to.
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("connecting to read the {role} topic `{topic}`: {e}"))?;
    let found =
        super::partition_count(&consumer, topic, timeout).map_err(|e| format!("the {role} topic: {e}"))?;
    if found == 0 {
        return Err(format!(
            "the {role} topic `{topic}` does not exist: create it with one partition and cleanup.policy=compact ([kafka] {role}_topic, docs/cluster.md)"
        ));
    }
    let mut from = TopicPartitionList::new();
    from.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| e.to_string())?;
    consumer
        .assign(&from)
        .map_err(|e| format!("reading the {role} topic `{topic}`: {e}"))?;
    Ok(consumer)
}

/// The worker's loop: read cards, put ours when it changed or is due, withdraw it at the end.
fn exchange(members: &Members, topic: &str, consumer: &BaseConsumer, producer: &BaseProducer) {
    let mut last: Option<(MemberCard, Instant)> = None;
    let mut differ: Vec<String> = Vec::new();
    while !members.stopping.load(Ordering::SeqCst) {
        let now_differ = members.settings_differ();
        if now_differ != differ {
            metrics::gauge!("tagstream_cluster_settings_differ").set(now_differ.len() as f64);
            if !now_differ.is_empty() {
                tracing::warn!(
                    nodes = ?now_differ,
                    "nodes of this group run other settings (tracking plan, identity, limits, horizons or roles): a customer is judged by whichever node owns it; give every node the same settings file"
                );
            }
            differ = now_differ;
        }
        let card = members.my_card();
        let due = last.as_ref().is_none_or(|(sent, when)| {
            sent.owned != card.owned
                || sent.restoring != card.restoring
                || sent.standby != card.standby
                || sent.rules_version != card.rules_version
                || when.elapsed() >= REFRESH
        });
        if due {
            let body = serde_json::to_vec(&card).expect("a card serialises");
            let record = BaseRecord::<str, [u8]>::to(topic)
                .key(members.url())
                .payload(&body);
            match producer.send(record) {
                Ok(()) => last = Some((card, Instant::now())),
                Err((e, _)) => {
                    tracing::warn!(error = %e, topic, "could not put this node's card on the members topic")
                }
            }
        }
        producer.poll(Duration::ZERO);
        // Read what arrived, up to the next look.
        let until = Instant::now() + LOOK_EVERY;
        while let Some(remaining) = until.checked_duration_since(Instant::now()) {
            match consumer.poll(remaining) {
                Some(Ok(message)) => {
                    let Some(Ok(node)) = message.key_view::<str>() else {
                        continue;
                    };
                    let card = match message.payload() {
                        None => None,
                        Some(bytes) => match serde_json::from_slice::<MemberCard>(bytes) {
                            Ok(card) => Some(card),
                            Err(e) => {
                                tracing::warn!(error = %e, node, "a card on the members topic is not one tagstream wrote; ignored");
                                continue;
                            }
                        },
                    };
                    members.read(node, card);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic, "reading the members topic");
                    std::thread::sleep(remaining.min(LOOK_EVERY));
                }
                None => break,
            }
        }
    }
    // Withdrawn: a tombstone under our key.
    let record = BaseRecord::<str, [u8]>::to(topic).key(members.url());
    if producer.send(record).is_ok() {
        let _ = producer.flush(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(url: &str, owned: &[u32], restoring: &[u32], age: Duration) -> MemberCard {
        MemberCard {
            url: url.into(),
            owned: owned.to_vec(),
            restoring: restoring.to_vec(),
            standby: Vec::new(),
            partitions: 6,
            at: wall_ms() - age.as_millis() as i64,
            rules_version: 1,
            settings: String::new(),
        }
    }

    /// A partition's owner is this node when its consumer owns it, else the newest live card
    /// that claims it; a card past [`GONE_AFTER`] or withdrawn claims nothing.
    #[test]
    fn the_owner_of_a_partition_is_the_newest_live_card_that_claims_it() {
        let status = Arc::new(KafkaStatus::default());
        status.group.store(true, Ordering::SeqCst);
        status.owned.lock().unwrap().insert(0);
        status.set_restoring([1].into());
        let members = Members::new("http://a:1", 6, status);
        members.read(
            "http://b:1",
            Some(card("http://b:1", &[2, 3], &[3], Duration::ZERO)),
        );
        members.read("http://c:1", Some(card("http://c:1", &[4], &[], GONE_AFTER * 2)));
        // Moving: the old owner's card is older than the new owner's.
        members.read(
            "http://d:1",
            Some(card("http://d:1", &[5], &[], Duration::from_secs(3))),
        );
        members.read(
            "http://e:1",
            Some(card("http://e:1", &[5], &[], Duration::from_secs(1))),
        );
        assert_eq!(members.owner_of(0), Owner::Here);
        assert_eq!(members.owner_of(1), Owner::Restoring);
        assert_eq!(members.owner_of(2), Owner::Node("http://b:1".into()));
        assert_eq!(members.owner_of(3), Owner::NodeRestoring("http://b:1".into()));
        assert_eq!(members.owner_of(4), Owner::Unknown, "gone");
        assert_eq!(members.owner_of(5), Owner::Node("http://e:1".into()));
        members.read("http://b:1", None);
        assert_eq!(members.owner_of(2), Owner::Unknown, "withdrawn");
        let urls: Vec<String> = members.cards().into_iter().map(|c| c.url).collect();
        assert_eq!(urls, ["http://a:1", "http://d:1", "http://e:1"]);
        // A stale card of this node's own (from before a restart) is not another owner.
        members.read("http://a:1", Some(card("http://a:1", &[2], &[], Duration::ZERO)));
        members.read(
            "http://b:1",
            Some(card("http://b:1", &[2], &[], Duration::from_secs(2))),
        );
        assert_eq!(members.owner_of(2), Owner::Node("http://b:1".into()));
    }

    /// Nodes whose cards carry another settings fingerprint are named; a card without one
    /// (an older version) and a node gone are not.
    #[test]
    fn nodes_running_other_settings_are_named() {
        let mut members = Members::new("http://a:1", 6, Arc::new(KafkaStatus::default()));
        members.settings = "same".into();
        let with = |url: &str, settings: &str, age: Duration| {
            let mut c = card(url, &[1], &[], age);
            c.settings = settings.into();
            Some(c)
        };
        members.read("http://b:1", with("http://b:1", "same", Duration::ZERO));
        members.read("http://c:1", with("http://c:1", "other", Duration::ZERO));
        members.read("http://d:1", with("http://d:1", "", Duration::ZERO));
        members.read("http://e:1", with("http://e:1", "other", GONE_AFTER * 2));
        assert_eq!(members.settings_differ(), ["http://c:1"]);
        assert_eq!(members.my_card().settings, "same");
    }
}
