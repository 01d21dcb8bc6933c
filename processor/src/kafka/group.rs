//! A node's share of a consumer group of several (issue #21, `docs/design/cluster.md` §1):
//! with the state topic set, the group decides which partitions this node owns, and
//! their state moves with them through the topic.
//!
//! - **Assigned** (cooperative-sticky: only what moves is named): a partition this store
//!   holds is resumed from its stored offset once this store's owner mark is in the state
//!   topic and no other store's record precedes it past this store's position, unless the
//!   group's committed offset is past it — another member consumed it since, so what is
//!   here is stale: it is discarded and restored like one this store does not hold. A
//!   partition to restore is paused, marked, read from the state topic up to the mark on a
//!   thread of its own (the group is not held up meanwhile), applied on the consumer's
//!   thread between batches, sought to the restored offset and resumed.
//! - **Revoked**: once the broker confirmed every delta of the partition, it is released
//!   (its customers, outbox and offsets leave the store), for its next owner to restore.
//!   At shutdown the partitions are kept instead (a restart resumes them from the local
//!   store), and the group's offsets are committed first.
//! - **Published**: the state publisher sends deltas of owned partitions only, so a store
//!   coming back after a crash never appends its stale deltas after the new owner's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::lease::Lease;
use super::standby::Copies;
use super::{source_name, ConsumerCtx, KafkaSettings, KafkaStatus};
use crate::changelog::follow::Follower;
use crate::changelog::Restore;
use crate::engine::ReadHandle;

/// What a member of a group of several needs of its engine to take partitions and give
/// them up ([`crate::service::EngineHandle`] runs each on the engine thread).
pub trait PartitionHost: Send + Sync {
    /// Lets `partition` go once the broker confirmed all of its deltas; `Ok(false)` while it
    /// has not (nothing was released).
    fn release(&self, partition: u32) -> Result<bool, String>;
    /// Drops `partition` whatever was confirmed: its state here is stale.
    fn discard(&self, partition: u32) -> Result<(), String>;
    /// Takes in a partition read from the state topic.
    fn restore(&self, restore: Restore) -> Result<(), String>;
    /// Parks `partitions`: their timers wait (a member owns none until the group gives it
    /// some, so what its store keeps from an earlier run, or could not release, fires
    /// nothing).
    fn park(&self, partitions: Vec<u32>) -> Result<(), String>;
    /// Lets an owned partition's timers fire.
    fn activate(&self, partition: u32) -> Result<(), String>;
    /// Runs `work` on the engine, between batches (a standby copy's writes,
    /// [`super::standby`]).
    fn run(&self, work: EngineWork) -> Result<(), String>;
}

/// Work a [`PartitionHost`] runs on its engine.
pub type EngineWork = Box<dyn FnOnce(&mut crate::engine::Engine) -> Result<(), String> + Send>;

/// How long a member stopping waits for the broker to confirm its owned partitions'
/// deltas before it leaves the group.
const LEAVE_WAIT: Duration = Duration::from_secs(10);

/// Deltas (up to 1,000) of `owned` partitions in the outbox the broker has not confirmed.
fn unpublished_of(reader: &ReadHandle, owned: &BTreeSet<u32>) -> Result<usize, crate::EngineError> {
    let mut published: BTreeMap<u32, u64> = reader
        .changelog_publisher_state()?
        .into_iter()
        .map(|(partition, (commit, _))| (partition, commit))
        .collect();
    for partition in 0..reader.partitions() {
        if !owned.contains(&partition) {
            published.insert(partition, u64::MAX);
        }
    }
    Ok(reader.changelog_unpublished(&published, 1_000)?.len())
}

/// How long a revoked partition waits for the broker to confirm its deltas before it is
/// given up unreleased (its next owner restores what the topic has and consumes on from
/// there; the stale copy here is discarded when it comes back).
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// How long a restore's read waits for a record before it fails (and is tried again).
const READ_STALL: Duration = Duration::from_secs(30);

/// How often the partitions this store kept and another member owns are looked at
/// ([`Membership::sweep_leftovers`]).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// A finished read of a partition of the state topic, for the assignment `ticket`.
struct Read {
    partition: u32,
    ticket: u64,
    result: Result<Taken, String>,
    /// How long the read took.
    took: Duration,
}

/// What a read of an assigned partition gives.
enum Taken {
    /// The partition read whole.
    Whole(super::StateRead),
    /// The tail after this store's standby copy.
    Copy(Follower),
    /// A partition this store kept: what the state topic holds after the store's position.
    Checked(super::TailCheck),
}

pub(super) struct Membership {
    host: Arc<dyn PartitionHost>,
    settings: KafkaSettings,
    state_topic: String,
    reader: ReadHandle,
    /// Set when the consumer stops: a revocation then keeps the partitions.
    closing: Arc<AtomicBool>,
    /// The partitions the state publisher publishes: owned and held here (shared with
    /// [`KafkaStatus`], which tells the HTTP edge).
    pub(super) owned: Arc<Mutex<BTreeSet<u32>>>,
    /// Partitions being read from the state topic (paused meanwhile), by the ticket of the
    /// assignment that asked: a read whose partition was revoked since is dropped.
    restoring: Mutex<BTreeMap<u32, u64>>,
    tickets: AtomicU64,
    done: mpsc::Sender<Read>,
    reads: Mutex<mpsc::Receiver<Read>>,
    status: Arc<KafkaStatus>,
    /// Standby copies of partitions others own: an assigned one is promoted.
    pub(super) copies: Arc<Copies>,
    /// This store's id in the state topic's records ([`super::state_writer`]).
    writer: u64,
    /// Partitions this store kept that another member owns: since when this node has seen
    /// them so.
    leftovers: Mutex<BTreeMap<u32, Instant>>,
    /// When [`Membership::sweep_leftovers`] last looked.
    swept: Mutex<Instant>,
    /// Whether this member may still count itself the owner: the state publisher sends
    /// nothing once it ran out ([`super::lease`]).
    pub(super) lease: Arc<Lease>,
}

impl Membership {
    pub(super) fn new(
        host: Arc<dyn PartitionHost>,
        settings: &KafkaSettings,
        state_topic: String,
        reader: ReadHandle,
        closing: Arc<AtomicBool>,
        status: Arc<KafkaStatus>,
        writer: u64,
    ) -> Membership {
        let (done, reads) = mpsc::channel();
        Membership {
            host,
            settings: settings.clone(),
            state_topic,
            reader,
            closing,
            owned: status.owned.clone(),
            restoring: Mutex::default(),
            tickets: AtomicU64::new(0),
            done,
            reads: Mutex::new(reads),
            status,
            copies: Arc::default(),
            writer,
            leftovers: Mutex::default(),
            swept: Mutex::new(Instant::now()),
            lease: Arc::new(Lease::new(settings)),
        }
    }

    /// Renews the lease when due, between batches: a synchronous commit of where the owned
    /// partitions stand (everything before is applied), which the coordinator refuses to a
    /// member of an older generation or one it expelled.
    ///
    /// Whether the coordinator refused it because this member must rejoin the group (a
    /// rebalance is on, or its generation or membership is gone): only a poll does that.
    pub(super) fn renew_lease(&self, consumer: &BaseConsumer<ConsumerCtx>) -> bool {
        if !self.lease.due() {
            return false;
        }
        let owned = self.owned();
        let sent = Instant::now();
        if owned.is_empty() {
            // Nothing to publish for: nothing to fence.
            self.lease.renewal(sent, false);
            return false;
        }
        // Where each owned partition stands in the store (everything before is applied),
        // else where the consumer stands in it (nothing of it applied yet). No other
        // request than the commit: this runs on the consumer's thread.
        let topic = &self.settings.topic;
        let positions = consumer.position().ok();
        let mut tpl = TopicPartitionList::new();
        for &p in &owned {
            let stored = match self.reader.source_offset(&source_name(topic, p as i32)) {
                Ok(stored) => stored.map(|next| next as i64),
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "reading a partition's stored offset to renew the lease");
                    None
                }
            };
            let at = stored.or_else(
                || match positions.as_ref()?.find_partition(topic, p as i32)?.offset() {
                    Offset::Offset(at) => Some(at),
                    _ => None,
                },
            );
            if let Some(at) = at {
                let _ = tpl.add_partition_offset(topic, p as i32, Offset::Offset(at));
            }
        }
        if tpl.count() == 0 {
            // Partitions nothing was consumed from (their events, if any, came over HTTP):
            // the group's committed offset, committed again unchanged, else the earliest
            // offset the broker keeps — a check of membership that moves nothing back.
            tpl = self.unmoved_positions(consumer, &owned);
        }
        if tpl.count() == 0 {
            // Not known yet (the first fetch sets the positions): tried again shortly.
            self.lease.renewal(sent, false);
            return false;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.lease.renewal(sent, true);
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "the lease was not renewed");
                self.lease.renewal(sent, false);
                matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::RebalanceInProgress
                            | RDKafkaErrorCode::IllegalGeneration
                            | RDKafkaErrorCode::UnknownMemberId
                            | RDKafkaErrorCode::FencedInstanceId
                    )
                )
            }
        }
    }

    /// For [`Membership::renew_lease`] when no owned partition has a position yet: each
    /// one's committed offset in the group, or, without one, the earliest the broker keeps.
    fn unmoved_positions(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        owned: &BTreeSet<u32>,
    ) -> TopicPartitionList {
        const ASK: Duration = Duration::from_secs(2);
        let topic = &self.settings.topic;
        let mut asked = TopicPartitionList::new();
        for &p in owned {
            asked.add_partition(topic, p as i32);
        }
        let committed = consumer.committed_offsets(asked, ASK).ok();
        let mut tpl = TopicPartitionList::new();
        for &p in owned {
            let at = match committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, p as i32))
                .map(|e| e.offset())
            {
                Some(Offset::Offset(at)) => Some(at),
                _ => consumer
                    .fetch_watermarks(topic, p as i32, ASK)
                    .ok()
                    .map(|(low, _)| low),
            };
            if let Some(at) = at {
                let _ = tpl.add_partition_offset(topic, p as i32, Offset::Offset(at));
            }
        }
        tpl
    }

    /// At shutdown, before the consumer leaves the group: waits (up to [`LEAVE_WAIT`],
    /// renewing the lease meanwhile) until the broker confirmed every delta of the owned
    /// partitions, then ends the lease — after the consumer leaves, another member may own
    /// them at once, so nothing of them is published from here any more. It does not wait
    /// once the lease ran out and the coordinator wants this member to rejoin first: the
    /// consumer polls no more, so the lease cannot come back.
    pub(super) fn publish_before_leaving(&self, consumer: &BaseConsumer<ConsumerCtx>) {
        let deadline = Instant::now() + LEAVE_WAIT;
        let mut rejoin = false;
        loop {
            match unpublished_of(&self.reader, &self.owned()) {
                Ok(0) => break,
                Ok(left) if rejoin && !self.lease.held() => {
                    tracing::warn!(
                        deltas = left,
                        "leaving the group during a rebalance that outlasted the lease, with state deltas the broker has not confirmed: they stay here (the partitions are kept), and their next owner consumes on from what the state topic has"
                    );
                    break;
                }
                Ok(_) if Instant::now() < deadline => {
                    rejoin |= self.renew_lease(consumer);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(left) => {
                    tracing::warn!(
                        deltas = left,
                        "leaving the group with state deltas the broker has not confirmed: they stay here (the partitions are kept), and their next owner consumes on from what the state topic has"
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading what is left to publish before leaving the group");
                    break;
                }
            }
        }
        self.lease.end();
    }

    /// Parks every partition until the group gives this node some, and drops the standby
    /// copies an earlier run left (what they followed is not kept across a restart).
    pub(super) fn park_all(&self) -> Result<(), String> {
        self.host.park((0..self.reader.partitions()).collect())?;
        for partition in self.reader.standby_copies().map_err(|e| e.to_string())? {
            self.discard(partition)?;
            tracing::info!(partition, "dropped a standby copy left by an earlier run");
        }
        Ok(())
    }

    /// The partitions owned and held (restoring ones not among them).
    pub(super) fn owned(&self) -> BTreeSet<u32> {
        lock(&self.owned).clone()
    }

    /// The partitions being restored.
    pub(super) fn restoring(&self) -> BTreeSet<u32> {
        lock(&self.restoring).keys().copied().collect()
    }

    /// An incremental assignment: each partition resumed from the store or restored.
    pub(super) fn assigned(&self, consumer: &BaseConsumer<ConsumerCtx>, tpl: &mut TopicPartitionList) {
        let topic = self.settings.topic.clone();
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        // The group's view of how far each partition was consumed, for the staleness
        // checks: of those assigned, and of those this store kept but another member owns.
        let mut all = TopicPartitionList::new();
        for p in 0..self.reader.partitions() {
            all.add_partition(&topic, p as i32);
        }
        // Leaving (the client assigns nothing on its way out), nothing kept is judged now:
        // the coordinator may not answer a member that is leaving, and the read would hold
        // the close up for its whole timeout.
        let leaving = partitions.is_empty() && self.closing.load(Ordering::SeqCst);
        let committed = if leaving {
            None
        } else {
            consumer
                .committed_offsets(all, Duration::from_secs(10))
                .map_err(|e| tracing::warn!(error = %e, "reading the group's committed offsets failed"))
                .ok()
        };
        let mut restore = Vec::new();
        let (mut promote, mut check) = (Vec::new(), Vec::new());
        for &partition in &partitions {
            let p = partition as u32;
            if let Some(copy) = self.copies.claim(p) {
                // A standby copy is here: only its tail is read.
                promote.push(copy);
                continue;
            }
            match self.resume_at(&topic, p, committed.as_ref()) {
                Ok(Some(offset)) => {
                    // Kept here: resumed once the state topic shows no other store wrote
                    // to the partition since (the group's offsets cannot tell a member
                    // that took over and died before committing), and once this store's
                    // owner mark is in (after another store's mark, its records would not
                    // count). A store that does not know its position there (an earlier
                    // version's) is checked from the topic's start.
                    let _ = tpl.set_partition_offset(&topic, partition, offset);
                    check.push(p);
                }
                Ok(None) => restore.push(partition),
                Err(e) => {
                    // Neither resumed nor restored: read it again from the topic.
                    tracing::error!(error = %e, partition, "checking the local state of an assigned partition failed");
                    restore.push(partition);
                }
            }
        }
        let assigned: BTreeSet<u32> = partitions.iter().map(|p| *p as u32).collect();
        self.drop_leftovers(&topic, &self.leftovers(&assigned), committed.as_ref());
        if let Err(e) = consumer.incremental_assign(tpl) {
            tracing::error!(error = %e, "assigning partitions failed");
            return;
        }
        if !restore.is_empty() || !promote.is_empty() || !check.is_empty() {
            let mut paused = TopicPartitionList::new();
            for partition in restore
                .iter()
                .copied()
                .chain(promote.iter().map(|c| c.partition as i32))
                .chain(check.iter().map(|p| *p as i32))
            {
                paused.add_partition(&topic, partition);
            }
            if let Err(e) = consumer.pause(&paused) {
                tracing::error!(error = %e, "pausing the partitions to restore failed");
            }
            for partition in restore {
                self.read(partition as u32, Duration::ZERO);
            }
            for copy in promote {
                self.read_tail(copy);
            }
            for partition in check {
                self.check(partition);
            }
        }
        tracing::info!(topic, ?partitions, restoring = ?self.restoring(), "Kafka partitions assigned");
        self.report();
    }

    /// The partitions this store holds that another member owns: neither owned, assigned
    /// (`assigned`), restoring nor copied here as a standby.
    fn leftovers(&self, assigned: &BTreeSet<u32>) -> Vec<u32> {
        let (owned, restoring) = (self.owned(), self.restoring());
        let mut copies: BTreeSet<u32> = self.copies.partitions().into_iter().collect();
        match self.reader.standby_copies() {
            Ok(marked) => copies.extend(marked),
            Err(e) => {
                tracing::warn!(error = %e, "reading the standby copies failed");
                return Vec::new();
            }
        }
        let mut leftovers = Vec::new();
        for p in 0..self.reader.partitions() {
            let elsewhere = !owned.contains(&p)
                && !assigned.contains(&p)
                && !restoring.contains(&p)
                && !copies.contains(&p);
            match elsewhere.then(|| self.reader.holds_partition(p)) {
                Some(Ok(true)) => leftovers.push(p),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, partition = p, "looking at a kept partition failed")
                }
                _ => {
                    lock(&self.leftovers).remove(&p);
                }
            }
        }
        leftovers
    }

    /// Drops those of `leftovers` the group consumed past what is here (the copy is
    /// stale: this node's answers must never count their customers), and those another
    /// member has owned for `state_cleanup_delay` (as Kafka Streams'
    /// `state.cleanup.delay.ms`: a node's disk does not keep every partition it ever
    /// owned). Others are kept: they may come back, and are then checked and resumed.
    fn drop_leftovers(&self, topic: &str, leftovers: &[u32], committed: Option<&TopicPartitionList>) {
        for &p in leftovers {
            let since = *lock(&self.leftovers).entry(p).or_insert_with(Instant::now);
            let why = match self.is_stale(topic, p, committed) {
                Ok(true) => "another member consumed it past what this store holds",
                Ok(false) if since.elapsed() >= self.settings.state_cleanup_delay => {
                    "another member has owned it for longer than state_cleanup_delay"
                }
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "checking a kept partition failed");
                    continue;
                }
            };
            match self.discard(p) {
                Ok(()) => {
                    lock(&self.leftovers).remove(&p);
                    metrics::counter!("tagstream_kafka_kept_partitions_dropped_total").increment(1);
                    tracing::info!(
                        partition = p,
                        reason = why,
                        "dropped what this store kept of a partition"
                    );
                }
                Err(e) => tracing::error!(error = %e, partition = p, "dropping a kept partition failed"),
            }
        }
    }

    /// Between batches, on the owner of partition 0 (the group's identity resolver,
    /// [`crate::EngineConfig::resolver`]): sends the records it made — events named by
    /// their customers, handover requests — in order to their partitions, and deletes them
    /// once the broker confirmed them all. A crash between the two sends them again (their
    /// receivers count each once); nothing is sent without the lease.
    pub(super) fn send_resolved(&self, router: &super::route::Router) {
        if !self.reader.resolver() || !self.owned().contains(&0) {
            return;
        }
        let pending = match self.reader.resolver_outbox() {
            Ok(pending) if pending.is_empty() => return,
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(error = %e, "reading the identity resolver's records to send");
                return;
            }
        };
        if !self.lease.held() {
            tracing::debug!(
                pending = pending.len(),
                "the identity resolver's records wait for the lease"
            );
            return;
        }
        if let Err(e) = router.send_resolved(&pending) {
            tracing::warn!(error = %e, "sending the identity resolver's records; they are sent again later");
            return;
        }
        let keys: Vec<Vec<u8>> = pending.into_iter().map(|p| p.key).collect();
        let delivered = self.host.run(Box::new(move |engine| {
            engine.resolver_delivered(&keys).map_err(|e| e.to_string())
        }));
        if let Err(e) = delivered {
            tracing::warn!(error = %e, "recording the identity resolver's records sent; they are sent again later");
        }
    }

    /// Between batches: sends the frames of handovers made in partitions this member owns
    /// (a merge across partitions, [`crate::engine::Engine::hand_over`], and the splits of
    /// unmerges, [`crate::engine::Engine::split_requested`]) to the partitions they go to,
    /// then the split requests sent on from here — after the frames, so that a request
    /// following a customer's events reaches their partition after the frame that took
    /// them — and records each delivered once the broker confirmed it. One is sent again
    /// after a crash between the two (its receiver acts on it once), and by whoever owns
    /// the partition next when this member loses it first. Nothing is sent without the
    /// lease: a member that may no longer own the partition leaves them to the one that
    /// does.
    pub(super) fn send_handovers(&self, router: &super::route::Router) {
        let (frames, splits) = match self.reader.handovers_to_send() {
            Ok((frames, splits)) if frames.is_empty() && splits.is_empty() => return,
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(error = %e, "reading the handovers to send");
                return;
            }
        };
        if !self.lease.held() {
            tracing::debug!(
                pending = frames.len() + splits.len(),
                "handovers wait for the lease"
            );
            return;
        }
        let owned = self.owned();
        let partitions = self.reader.partitions();
        // Each waits under a key of the partition it leaves from.
        let home = |key: &[u8]| {
            crate::changelog::Family::Identities
                .owner(key)
                .map(|owner| crate::partition::partition_of(owner, partitions))
        };
        for handover in frames {
            let partition = home(&handover.key);
            if !partition.is_some_and(|p| owned.contains(&p)) {
                tracing::debug!(absorbed = %handover.absorbed, ?partition, "a handover of a partition not owned here waits for its owner");
                continue;
            }
            if let Err(e) = router.send_handover(&handover.absorbed, &handover.survivor, &handover.frame) {
                tracing::warn!(error = %e, "sending a handover; it is sent again later");
                return;
            }
            if self.delivered(handover.key.clone(), "a handover") {
                tracing::info!(
                    absorbed = %handover.absorbed,
                    survivor = %handover.survivor,
                    "handed a customer over to its partition"
                );
            }
        }
        for split in splits {
            let partition = home(&split.key);
            if !partition.is_some_and(|p| owned.contains(&p)) {
                continue;
            }
            if let Err(e) = router.send_split(&split.request) {
                tracing::warn!(error = %e, "sending a split on; it is sent again later");
                return;
            }
            if self.delivered(split.key.clone(), "a split request sent on") {
                tracing::info!(customer = %split.request.customer, at = %split.request.at, "sent a split on to where the customer's events are");
            }
        }
    }

    /// Records what waited under `key` delivered ([`crate::Engine::frame_delivered`]).
    fn delivered(&self, key: Vec<u8>, what: &str) -> bool {
        let delivered = self.host.run(Box::new(move |engine| {
            engine.frame_delivered(&key).map_err(|e| e.to_string())
        }));
        match delivered {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "recording {what} delivered; it is sent again later");
                false
            }
        }
    }

    /// Between batches, every [`SWEEP_EVERY`]: [`Membership::drop_leftovers`] of what the
    /// consumer is not assigned (as at each assignment).
    pub(super) fn sweep_leftovers(&self, consumer: &BaseConsumer<ConsumerCtx>) {
        {
            let mut swept = lock(&self.swept);
            if swept.elapsed() < SWEEP_EVERY {
                return;
            }
            *swept = Instant::now();
        }
        let topic = self.settings.topic.clone();
        let assigned: BTreeSet<u32> = match consumer.assignment() {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .filter(|e| e.topic() == topic)
                .map(|e| e.partition() as u32)
                .collect(),
            Err(e) => {
                return tracing::warn!(error = %e, "reading the assignment to look at kept partitions failed");
            }
        };
        let leftovers = self.leftovers(&assigned);
        if leftovers.is_empty() {
            return;
        }
        let mut asked = TopicPartitionList::new();
        for &p in &leftovers {
            asked.add_partition(&topic, p as i32);
        }
        let committed = consumer
            .committed_offsets(asked, Duration::from_secs(10))
            .map_err(|e| tracing::warn!(error = %e, "reading the group's committed offsets failed"))
            .ok();
        self.drop_leftovers(&topic, &leftovers, committed.as_ref());
    }

    /// Whether this store holds `partition` and the group consumed it past the store's
    /// offset.
    fn is_stale(
        &self,
        topic: &str,
        partition: u32,
        committed: Option<&TopicPartitionList>,
    ) -> Result<bool, String> {
        if !self
            .reader
            .holds_partition(partition)
            .map_err(|e| e.to_string())?
        {
            return Ok(false);
        }
        let stored = self
            .reader
            .source_offset(&source_name(topic, partition as i32))
            .map_err(|e| e.to_string())?;
        Ok(group_offset(committed, topic, partition).is_some_and(|group| group > stored.unwrap_or(0)))
    }

    /// Where to resume an assigned partition held here (`None`: restore it instead, after
    /// dropping a stale copy).
    fn resume_at(
        &self,
        topic: &str,
        partition: u32,
        committed: Option<&TopicPartitionList>,
    ) -> Result<Option<Offset>, String> {
        if !self
            .reader
            .holds_partition(partition)
            .map_err(|e| e.to_string())?
        {
            return Ok(None);
        }
        if self.is_stale(topic, partition, committed)? {
            tracing::warn!(
                partition,
                "another member consumed this partition past what this store holds: its state here is stale and is restored from the state topic"
            );
            self.discard(partition)?;
            return Ok(None);
        }
        let stored = self
            .reader
            .source_offset(&source_name(topic, partition as i32))
            .map_err(|e| e.to_string())?;
        Ok(Some(
            stored.map_or(Offset::Beginning, |o| Offset::Offset(o as i64)),
        ))
    }

    /// Drops `partition` from the store, and with it how far the store knew the state topic.
    fn discard(&self, partition: u32) -> Result<(), String> {
        self.host.discard(partition)?;
        self.forget_position(partition);
        Ok(())
    }

    /// How far this store knows `partition` of the state topic (`None`: not known, as in a
    /// store an earlier version wrote, which is checked from the topic's start).
    fn position(&self, partition: u32) -> Option<i64> {
        super::state_position(&self.reader, &self.state_topic, partition)
            .map_err(
                |e| tracing::warn!(error = %e, partition, "reading how far the state topic is known failed"),
            )
            .ok()
            .flatten()
    }

    fn forget_position(&self, partition: u32) {
        if let Err(e) = super::forget_state_position(&self.reader, &self.state_topic, partition) {
            tracing::warn!(error = %e, partition, "forgetting how far the state topic was known failed");
        }
    }

    /// Reads `partition` of the state topic on a thread of its own (after `delay`).
    fn read(&self, partition: u32, delay: Duration) {
        let (settings, topic) = (self.settings.clone(), self.state_topic.clone());
        let (partitions, status) = (self.reader.partitions(), self.status.clone());
        let owner = Some(self.writer);
        self.read_with(partition, "restore", move || {
            std::thread::sleep(delay);
            let progress = |records| status.restore_read(partition, Some(records));
            super::read_state_partition(
                &settings, &topic, partition, partitions, owner, READ_STALL, &progress,
            )
            .map(Taken::Whole)
        });
    }

    /// Reads what the state topic holds of a kept `partition` after this store's position,
    /// on a thread of its own.
    fn check(&self, partition: u32) {
        let (settings, topic, writer) = (self.settings.clone(), self.state_topic.clone(), self.writer);
        let from = self.position(partition).unwrap_or(0);
        self.read_with(partition, "check", move || {
            super::foreign_records(&settings, &topic, partition, from, writer, READ_STALL).map(Taken::Checked)
        });
    }

    /// Reads what followed a standby copy on a thread of its own, to promote it.
    fn read_tail(&self, copy: Follower) {
        let (settings, topic, writer) = (self.settings.clone(), self.state_topic.clone(), self.writer);
        self.read_with(copy.partition, "promote", move || {
            super::standby::read_tail(&settings, &topic, copy, writer, READ_STALL).map(Taken::Copy)
        });
    }

    /// Runs `read` for an assigned `partition` on a thread of its own (named after `what`);
    /// its result is applied by [`Membership::finish_restores`] unless the partition was
    /// revoked meanwhile.
    fn read_with(
        &self,
        partition: u32,
        what: &str,
        read: impl FnOnce() -> Result<Taken, String> + Send + 'static,
    ) {
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst);
        lock(&self.restoring).insert(partition, ticket);
        self.status.restore_read(partition, Some(0));
        let done = self.done.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tagstream-{what}-{partition}"))
            .spawn(move || {
                let began = Instant::now();
                let result = read();
                let _ = done.send(Read {
                    partition,
                    ticket,
                    result,
                    took: began.elapsed(),
                });
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, partition, "starting a {what} failed");
        }
    }

    /// Applies the reads that finished, between batches: each restored partition is sought
    /// to its restored offset and resumed.
    pub(super) fn finish_restores(&self, consumer: &BaseConsumer<ConsumerCtx>) {
        let topic = self.settings.topic.clone();
        loop {
            let read = match lock(&self.reads).try_recv() {
                Ok(read) => read,
                Err(_) => return,
            };
            let p = read.partition;
            if lock(&self.restoring).get(&p) != Some(&read.ticket) {
                continue; // revoked (and perhaps assigned again) since it began
            }
            self.status.restore_read(p, None);
            let started = Instant::now();
            let how = match &read.result {
                Ok(Taken::Whole(_)) => "read",
                Ok(Taken::Copy(_)) => "standby",
                Ok(Taken::Checked(_)) | Err(_) => "kept",
            };
            if let Ok(Taken::Checked(check)) = &read.result {
                if check.foreign > 0 {
                    // Another store owned the partition since this one last wrote to it,
                    // and wrote its state on: what is here is stale.
                    tracing::warn!(
                        partition = p,
                        foreign = check.foreign,
                        own = check.own,
                        "the state topic holds another store's records of this kept partition: its state here is stale and is restored from the state topic"
                    );
                    metrics::counter!("tagstream_kafka_partitions_fenced_total").increment(1);
                    if let Err(e) = self.discard(p) {
                        tracing::error!(error = %e, partition = p, "dropping a stale partition failed");
                    }
                    self.read(p, Duration::ZERO);
                    self.report();
                    continue;
                }
            }
            let applied = read.result.and_then(|taken| match taken {
                Taken::Whole(read) => {
                    let (records, next_offset) = (read.restore.records, read.next_offset);
                    self.host.restore(read.restore)?;
                    Ok((records, next_offset))
                }
                Taken::Copy(mut copy) => {
                    let next_offset = copy.next_offset;
                    self.host
                        .run(Box::new(move |engine| {
                            let tail = copy.take_pending();
                            engine
                                .apply_standby(copy.partition, &tail)
                                .map_err(|e| e.to_string())?;
                            engine
                                .promote_standby(&copy.promotion())
                                .map_err(|e| e.to_string())?;
                            Ok(())
                        }))
                        .map(|()| (0, next_offset))
                }
                Taken::Checked(check) => self.host.activate(p).map(|()| (0, check.next_offset)),
            });
            match applied {
                Ok((records, next_offset)) => {
                    if let Err(e) = super::set_state_position(&self.reader, &self.state_topic, p, next_offset)
                    {
                        tracing::warn!(error = %e, partition = p, "saving how far the state topic is known failed");
                    }
                    let offset = match self.reader.source_offset(&source_name(&topic, p as i32)) {
                        Ok(Some(next)) => Offset::Offset(next as i64),
                        Ok(None) => Offset::Beginning,
                        Err(e) => {
                            tracing::error!(error = %e, partition = p, "reading a restored partition's offset failed");
                            self.read(p, Duration::from_secs(1));
                            continue;
                        }
                    };
                    if let Err(e) = consumer.seek(&topic, p as i32, offset, Duration::from_secs(10)) {
                        // Restored but not sought: drop it and read it again.
                        tracing::error!(error = %e, partition = p, "seeking a restored partition failed");
                        let _ = self.discard(p);
                        self.read(p, Duration::from_secs(1));
                        continue;
                    }
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&topic, p as i32);
                    if let Err(e) = consumer.resume(&tpl) {
                        tracing::error!(error = %e, partition = p, "resuming a restored partition failed");
                    }
                    lock(&self.restoring).remove(&p);
                    lock(&self.owned).insert(p);
                    if how == "kept" {
                        // Stored for the group's commit too: lag tools read a partition with
                        // nothing new since as consumed.
                        if let Offset::Offset(_) = offset {
                            let mut resumed = TopicPartitionList::new();
                            let _ = resumed.add_partition_offset(&topic, p as i32, offset);
                            if let Err(e) = consumer.store_offsets(&resumed) {
                                tracing::debug!(error = %e, "storing the resumed offset for the group commit");
                            }
                        }
                        tracing::info!(
                            partition = p,
                            ?offset,
                            checked_ms = read.took.as_millis() as u64,
                            "kept partition resumed: no other store wrote to it in the state topic since"
                        );
                    } else {
                        metrics::counter!("tagstream_kafka_partition_restores_total", "from" => how)
                            .increment(1);
                        tracing::info!(
                            partition = p,
                            records,
                            ?offset,
                            from = how,
                            read_ms = read.took.as_millis() as u64,
                            applied_ms = started.elapsed().as_millis() as u64,
                            "partition restored from the state topic"
                        );
                    }
                }
                Err(e) => {
                    // (A copy that could not be promoted is read whole: the restore drops
                    // what of it is in the store.)
                    tracing::error!(error = %e, partition = p, "restoring a partition from the state topic failed; trying again");
                    self.status.note_error(format!("restoring partition {p}: {e}"));
                    self.read(p, Duration::from_secs(1));
                }
            }
            self.report();
        }
    }

    /// An incremental revocation: each partition released once its deltas are confirmed,
    /// or kept when the consumer is closing.
    pub(super) fn revoked(&self, consumer: &BaseConsumer<ConsumerCtx>, tpl: &TopicPartitionList) {
        let closing = self.closing.load(Ordering::SeqCst);
        // Lost, not revoked: the group expelled this member (paused past its session), and
        // others may own the partitions already.
        let lost = consumer.assignment_lost();
        if lost {
            self.lease.end();
        }
        for e in tpl.elements() {
            let p = e.partition() as u32;
            self.copies.unclaim(p);
            if lock(&self.restoring).remove(&p).is_some() {
                // Not applied yet: its read is dropped when it arrives.
                self.status.restore_read(p, None);
                continue;
            }
            if closing {
                continue;
            }
            if lost {
                // Nothing more of it is published from here: what was not is a stale copy
                // (dropped once the group consumed it further, or found out by the check a
                // take-back makes), and its new owner consumes on from the state topic.
                tracing::warn!(
                    partition = p,
                    "partition lost: this node was out of the group past its session; its unpublished state stays here unpublished"
                );
                metrics::counter!("tagstream_kafka_partitions_lost_total").increment(1);
                self.park_kept(p);
                lock(&self.owned).remove(&p);
                continue;
            }
            let deadline = Instant::now() + RELEASE_WAIT;
            loop {
                match self.host.release(p) {
                    Ok(true) => {
                        self.forget_position(p);
                        metrics::counter!("tagstream_kafka_partition_releases_total").increment(1);
                        tracing::info!(partition = p, "partition released to its next owner");
                        break;
                    }
                    // Unleased, the publisher sends nothing, and the lease cannot be
                    // renewed before this callback returns (the consumer's thread is in
                    // it, and the coordinator refuses the old generation's commits during
                    // the rebalance): waiting would only hold up the whole group.
                    Ok(false) if !self.lease.held() => {
                        tracing::warn!(
                            partition = p,
                            "the lease ran out before the broker confirmed this partition's state deltas (a rebalance outlasted it): given up unreleased at once (its next owner consumes on from what the state topic has)"
                        );
                        self.give_up(p, "unleased");
                        break;
                    }
                    Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Ok(false) => {
                        tracing::error!(
                            partition = p,
                            "the broker did not confirm this partition's state deltas within {RELEASE_WAIT:?}: given up unreleased (its next owner consumes on from what the state topic has)"
                        );
                        self.give_up(p, "timeout");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, partition = p, "releasing a revoked partition failed");
                        self.give_up(p, "error");
                        break;
                    }
                }
            }
            lock(&self.owned).remove(&p);
        }
        if closing {
            tracing::info!(topic = %self.settings.topic, "Kafka partitions kept at shutdown");
        }
        if let Err(e) = consumer.incremental_unassign(tpl) {
            tracing::error!(error = %e, "unassigning partitions failed");
        }
        self.report();
    }

    /// A revoked partition given up unreleased (`why`: `unleased`, `timeout` or `error`):
    /// kept here, parked.
    fn give_up(&self, partition: u32, why: &'static str) {
        metrics::counter!("tagstream_kafka_partitions_unreleased_total", "why" => why).increment(1);
        self.park_kept(partition);
    }

    /// A revoked partition kept here unreleased: its timers wait, as another member owns
    /// it now (its copy is dropped once that member consumed it further).
    fn park_kept(&self, partition: u32) {
        if let Err(e) = self.host.park(vec![partition]) {
            tracing::error!(error = %e, partition, "parking a partition kept unreleased failed");
        }
    }

    fn report(&self) {
        let restoring = self.restoring();
        metrics::gauge!("tagstream_kafka_partitions_restoring").set(restoring.len() as f64);
        self.status.set_restoring(restoring);
    }
}

/// The group's committed offset of `partition`, if it has one.
fn group_offset(committed: Option<&TopicPartitionList>, topic: &str, partition: u32) -> Option<u64> {
    match committed?.find_partition(topic, partition as i32)?.offset() {
        Offset::Offset(o) => Some(o as u64),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
