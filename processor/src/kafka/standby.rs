//! Warm standby copies (`[kafka] standby_replicas`, issue #21, `docs/design/cluster.md`
//! §2): a node keeps copies of partitions other members own, read from the state topic
//! and kept up to date as their owners publish ([`crate::changelog::follow`]), so that a
//! take-over reads only the records after the copy's position instead of the whole
//! partition.
//!
//! Which node copies which partition follows from the members' cards alone: for each
//! partition with a live owner, the other live members ranked by a hash of their address
//! and the partition (rendezvous hashing), the first `standby_replicas` of them. Every node
//! computes the same ranking from the same cards; when cards differ for a moment, a
//! partition is copied by one node more or one fewer, which costs reads, never
//! correctness: a copy is only ever used after the group assigned its partition here.
//!
//! One thread (`tagstream-standby`) reads every copied partition with one consumer
//! (assigned, no group) and hands each complete delta to the engine (between batches). A
//! partition the group assigns to this node is claimed ([`Copies::claim`]): from then on
//! the thread leaves it alone, and the membership reads the copy's tail and promotes it
//! ([`super::group`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::members::Members;
use super::{KafkaSettings, KafkaStatus, PartitionHost};
use crate::changelog::follow::Follower;
use crate::changelog::Assembler;

/// How often the copies wanted are worked out again from the cards.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// A first read is taken as whole once the end named is reached and nothing more arrived
/// for this long (some brokers name an end short of the last record).
const SETTLE: Duration = Duration::from_millis(300);

/// A record of the state topic as a copy reads it.
struct Record<'a> {
    offset: i64,
    key: &'a [u8],
    value: Option<&'a [u8]>,
    commit: Option<u64>,
    writer: Option<&'a [u8]>,
}

/// A copy being made.
enum Copy {
    /// Read from the start, not in the store yet.
    Reading {
        assembler: Assembler,
        /// The end the broker named when the read began.
        end: i64,
        next_offset: i64,
        last_record: Instant,
    },
    /// In the store, followed on.
    Following(Follower),
}

/// The copies this node makes, shared by the thread that reads them, the engine thread
/// that writes them and the membership that claims them.
#[derive(Default)]
pub struct Copies {
    copies: Mutex<BTreeMap<u32, Copy>>,
    /// Partitions assigned to this node: never copied while assigned.
    claimed: Mutex<BTreeSet<u32>>,
}

impl Copies {
    /// The partition is assigned here: the thread stops copying it, and the copy, if one
    /// is in the store, is returned to be caught up and promoted.
    pub(super) fn claim(&self, partition: u32) -> Option<Follower> {
        lock(&self.claimed).insert(partition);
        match lock(&self.copies).remove(&partition) {
            Some(Copy::Following(follower)) => Some(follower),
            _ => None,
        }
    }

    /// The partition is no longer assigned here: it may be copied again.
    pub(super) fn unclaim(&self, partition: u32) {
        lock(&self.claimed).remove(&partition);
    }

    /// The partitions copied (being read or followed).
    pub fn partitions(&self) -> Vec<u32> {
        lock(&self.copies).keys().copied().collect()
    }

    /// The copies followed, in the store.
    pub fn following(&self) -> Vec<u32> {
        lock(&self.copies)
            .iter()
            .filter(|(_, copy)| matches!(copy, Copy::Following(_)))
            .map(|(p, _)| *p)
            .collect()
    }
}

/// Which of `partitions` the node at `me` copies, with `replicas` copies of each: for
/// each partition a live card claims, the other cards ranked by [`rank`].
pub fn standby_partitions(
    cards: &[super::members::MemberCard],
    me: &str,
    partitions: u32,
    replicas: u32,
) -> BTreeSet<u32> {
    let mut mine = BTreeSet::new();
    if replicas == 0 {
        return mine;
    }
    for p in 0..partitions {
        let Some(owner) = cards
            .iter()
            .filter(|card| card.owned.contains(&p))
            .max_by_key(|card| card.at)
        else {
            continue;
        };
        let mut others: Vec<&str> = cards
            .iter()
            .map(|card| card.url.as_str())
            .filter(|url| *url != owner.url)
            .collect();
        others.sort_unstable_by_key(|url| std::cmp::Reverse(super::members::rank(url, &p.to_be_bytes())));
        if others.iter().take(replicas as usize).any(|url| *url == me) {
            mine.insert(p);
        }
    }
    mine
}

/// The running copier; stops with the Kafka workers' stop flag.
pub(super) struct Standby {
    pub(super) thread: std::thread::JoinHandle<()>,
}

/// Starts copying, `replicas` copies of each partition among the members `members` knows.
pub(super) fn start(
    settings: &KafkaSettings,
    state_topic: &str,
    members: Arc<Members>,
    host: Arc<dyn PartitionHost>,
    copies: Arc<Copies>,
    status: Arc<KafkaStatus>,
    stop: Arc<AtomicBool>,
) -> Result<Standby, String> {
    let consumer: BaseConsumer = settings
        .client_config()
        // Assigned, not subscribed: the group id is never joined nor committed to.
        .set("group.id", format!("{}-standby", settings.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("connecting to read the state topic `{state_topic}` for standby copies: {e}"))?;
    let copier = Copier {
        topic: state_topic.to_owned(),
        replicas: settings.standby_replicas,
        consumer,
        members,
        host,
        copies,
        status,
        assigned: BTreeSet::new(),
    };
    let thread = std::thread::Builder::new()
        .name("tagstream-standby".into())
        .spawn(move || copier.run(&stop))
        .map_err(|e| e.to_string())?;
    Ok(Standby { thread })
}

struct Copier {
    topic: String,
    replicas: u32,
    consumer: BaseConsumer,
    members: Arc<Members>,
    host: Arc<dyn PartitionHost>,
    copies: Arc<Copies>,
    status: Arc<KafkaStatus>,
    /// The topic partitions the consumer reads.
    assigned: BTreeSet<u32>,
}

impl Copier {
    fn run(mut self, stop: &AtomicBool) {
        let mut looked = Instant::now() - LOOK_EVERY;
        while !stop.load(Ordering::SeqCst) {
            if looked.elapsed() >= LOOK_EVERY {
                looked = Instant::now();
                self.look();
            }
            if self.assigned.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let until = Instant::now() + Duration::from_millis(200);
            let mut failed = Vec::new();
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match self.consumer.poll(left) {
                    Some(Ok(m)) => {
                        let commit = super::commit_header(&m);
                        let p = m.partition() as u32;
                        let record = Record {
                            offset: m.offset(),
                            key: m.key().unwrap_or_default(),
                            value: m.payload(),
                            commit,
                            writer: super::writer_of(&m),
                        };
                        if let Some(reason) = self.take(p, record) {
                            failed.push((p, reason));
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, topic = %self.topic, "reading the state topic for standby copies");
                        break;
                    }
                    None => break,
                }
            }
            for (p, reason) in failed {
                self.drop_copy(p, &format!("{reason}; read again from the start"));
            }
            self.write();
        }
    }

    /// Works out the copies wanted: starts the new ones, drops those no longer wanted.
    fn look(&mut self) {
        let owned: BTreeSet<u32> = self.status.owned_partitions().into_iter().collect();
        let claimed = lock(&self.copies.claimed).clone();
        let wanted: BTreeSet<u32> = standby_partitions(
            &self.members.cards(),
            self.members.url(),
            self.members.partitions(),
            self.replicas,
        )
        .into_iter()
        .filter(|p| !owned.contains(p) && !claimed.contains(p) && !self.status.restoring(*p))
        .collect();
        for p in self.copies.partitions() {
            if !wanted.contains(&p) {
                self.drop_copy(p, "no longer copied here");
            }
        }
        for &p in &wanted {
            if lock(&self.copies.copies).contains_key(&p) {
                continue;
            }
            let end = match self
                .consumer
                .fetch_watermarks(&self.topic, p as i32, Duration::from_secs(5))
            {
                Ok((_, end)) => end,
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "finding the end of a partition to copy");
                    continue;
                }
            };
            let copy = Copy::Reading {
                assembler: Assembler::new(p, self.members.partitions()),
                end,
                next_offset: 0,
                last_record: Instant::now(),
            };
            lock(&self.copies.copies).insert(p, copy);
            tracing::info!(partition = p, "copying a partition another member owns (standby)");
        }
        self.assign();
    }

    /// Reads every copy from where it is.
    fn assign(&mut self) {
        let copies = lock(&self.copies.copies);
        let now: BTreeSet<u32> = copies.keys().copied().collect();
        if now == self.assigned {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, copy) in copies.iter() {
            let next = match copy {
                Copy::Reading { next_offset, .. } => *next_offset,
                Copy::Following(follower) => follower.next_offset,
            };
            let offset = if next == 0 {
                Offset::Beginning
            } else {
                Offset::Offset(next)
            };
            let _ = tpl.add_partition_offset(&self.topic, *p as i32, offset);
        }
        drop(copies);
        match self.consumer.assign(&tpl) {
            Ok(()) => self.assigned = now,
            Err(e) => tracing::error!(error = %e, "assigning the partitions to copy"),
        }
        self.report();
    }

    /// Tells the card and the metrics which copies are followed.
    fn report(&self) {
        let following = self.copies.following();
        metrics::gauge!("tagstream_kafka_standby_partitions").set(following.len() as f64);
        self.status.set_standby(following);
    }

    /// One record of a copied partition; why the copy cannot go on, if it cannot.
    fn take(&self, p: u32, r: Record<'_>) -> Option<String> {
        let mut copies = lock(&self.copies.copies);
        match copies.get_mut(&p) {
            None => None, // claimed, or dropped since
            Some(Copy::Reading {
                assembler,
                next_offset,
                last_record,
                ..
            }) => {
                *next_offset = r.offset + 1;
                *last_record = Instant::now();
                assembler.add_written(r.key, r.value, r.commit, r.writer).err()
            }
            Some(Copy::Following(follower)) => follower
                .add(r.offset, r.key, r.value, r.commit, r.writer)
                .err()
                .map(|e| e.0),
        }
    }

    /// Writes what the copies read: a first read once whole, the deltas followed since.
    fn write(&mut self) {
        let ready: Vec<u32> = lock(&self.copies.copies)
            .iter()
            .filter(|(_, copy)| match copy {
                Copy::Reading {
                    end,
                    next_offset,
                    last_record,
                    ..
                } => *next_offset >= *end && last_record.elapsed() >= SETTLE,
                Copy::Following(follower) => follower.pending() > 0,
            })
            .map(|(p, _)| *p)
            .collect();
        for p in ready {
            let (copies, topic) = (self.copies.clone(), self.topic.clone());
            let written = self
                .host
                .run(Box::new(move |engine| write_copy(engine, &copies, &topic, p)));
            if let Err(e) = written {
                self.drop_copy(p, &format!("writing it failed: {e}"));
            }
        }
        self.report();
    }

    /// Stops copying `p` and drops what of it is in the store (unless claimed meanwhile).
    fn drop_copy(&mut self, p: u32, why: &str) {
        let copies = self.copies.clone();
        let dropped = self.host.run(Box::new(move |engine| {
            if lock(&copies.copies).remove(&p).is_some() {
                engine.drop_standby_copy(p).map_err(|e| e.to_string())?;
            }
            Ok(())
        }));
        match dropped {
            Ok(()) => tracing::info!(partition = p, "standby copy dropped: {why}"),
            Err(e) => tracing::error!(error = %e, partition = p, "dropping a standby copy failed"),
        }
        self.assign();
    }
}

/// On the engine thread: a finished first read goes into the store, or the deltas
/// followed since the last write are applied — unless the partition was claimed since.
fn write_copy(
    engine: &mut crate::engine::Engine,
    copies: &Copies,
    state_topic: &str,
    p: u32,
) -> Result<(), String> {
    let mut all = lock(&copies.copies);
    let Some(copy) = all.remove(&p) else {
        return Ok(());
    };
    match copy {
        Copy::Reading {
            assembler,
            next_offset,
            ..
        } => {
            let (restore, follower) = assembler.into_follower(next_offset);
            // What an earlier copy left (its reader was restarted) goes first, and so does
            // what this store kept of the partition when it last owned it: the copy is the
            // owner's state, newer than that (the copy would be refused beside it, and
            // read again from the start, and refused again, for ever).
            if !engine.drop_standby_copy(p).map_err(|e| e.to_string())?
                && engine.reader().holds_partition(p).map_err(|e| e.to_string())?
            {
                engine.discard_partition(p).map_err(|e| e.to_string())?;
                super::forget_state_position(&engine.reader(), state_topic, p).map_err(|e| e.to_string())?;
                tracing::info!(
                    partition = p,
                    "dropped what this store kept of a partition another member owns: a standby copy replaces it"
                );
            }
            let summary = engine.begin_standby(&restore).map_err(|e| e.to_string())?;
            tracing::info!(
                partition = p,
                customers = summary.customers,
                records = restore.records,
                "standby copy made; following its owner"
            );
            all.insert(p, Copy::Following(follower));
        }
        Copy::Following(mut follower) => {
            let deltas = follower.take_pending();
            engine.apply_standby(p, &deltas).map_err(|e| e.to_string())?;
            metrics::counter!("tagstream_kafka_standby_deltas_applied_total").increment(deltas.len() as u64);
            all.insert(p, Copy::Following(follower));
        }
    }
    Ok(())
}

/// Marks `follower`'s partition of `topic` as `writer`'s ([`super::mark_owner`]) and reads
/// it from the copy's position to the mark: what a take-over from a copy reads.
pub(super) fn read_tail(
    settings: &KafkaSettings,
    topic: &str,
    mut follower: Follower,
    writer: u64,
    stall: Duration,
) -> Result<Follower, String> {
    let (partition, from) = (follower.partition, follower.next_offset);
    super::read_to_own_mark(settings, topic, partition, from, writer, stall, &mut |m| {
        follower
            .add(
                m.offset(),
                m.key().unwrap_or_default(),
                m.payload(),
                super::commit_header(m),
                super::writer_of(m),
            )
            .map_err(|e| e.0)
    })?;
    Ok(follower)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::members::MemberCard;

    fn card(url: &str, owned: &[u32]) -> MemberCard {
        MemberCard {
            url: url.into(),
            owned: owned.to_vec(),
            restoring: Vec::new(),
            standby: Vec::new(),
            partitions: 6,
            at: 1,
            rules_version: 1,
            settings: String::new(),
        }
    }

    /// Each owned partition is copied by `replicas` of the other members, never its owner,
    /// and every node works out the same copies from the same cards.
    #[test]
    fn each_partition_is_copied_by_as_many_other_members_as_asked() {
        let cards = [
            card("http://a:1", &[0, 1]),
            card("http://b:1", &[2, 3]),
            card("http://c:1", &[4]),
        ];
        let of = |me: &str, replicas| standby_partitions(&cards, me, 6, replicas);
        assert!(of("http://a:1", 0).is_empty());
        for replicas in [1u32, 2] {
            let mut copies = BTreeMap::<u32, u32>::new();
            for card in &cards {
                let mine = of(&card.url, replicas);
                assert!(
                    mine.iter().all(|p| !card.owned.contains(p)),
                    "{} copies its own",
                    card.url
                );
                for p in mine {
                    *copies.entry(p).or_default() += 1;
                }
            }
            // Partition 5 has no owner: nobody copies it.
            let expected: BTreeMap<u32, u32> = (0..5).map(|p| (p, replicas)).collect();
            assert_eq!(copies, expected, "{replicas} replicas");
        }
        // More replicas than other members: each of them copies.
        assert_eq!(of("http://c:1", 5), [0, 1, 2, 3].into());
    }
}
