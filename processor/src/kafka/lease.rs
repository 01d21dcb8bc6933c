//! A member's lease on the partitions it owns (issue #21, `docs/design/cluster.md` §7
//! step 3): what keeps a node paused past its session — a *zombie*: a stopped process, a
//! VM frozen, a disk that hung — from writing to the state topic after another member took
//! its partitions over.
//!
//! The group's coordinator expels a member whose heartbeats stop for the session timeout
//! (or that stops polling for `max.poll.interval.ms`, when the client leaves by itself),
//! and only then gives its partitions to others. A member therefore counts itself the
//! owner only while a request the coordinator checked its membership by — a synchronous
//! offset commit, made between batches — was *sent* less than two thirds of that time ago:
//! a commit answered after a pause still dates from before it. Once the lease has run out,
//! the state publisher sends nothing until a commit of the current generation succeeds;
//! an expelled member never gets one before the client has told it its partitions were
//! lost, and a lost partition is not published from here again (it is kept unpublished, a
//! stale copy, for the check a take-back makes).
//!
//! The third left over is what a record sent just before the lease ran out has to reach
//! the broker: a bound on delivery this fencing assumes (Kafka's transactional producer
//! would not; see the design).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::KafkaSettings;

/// librdkafka's defaults, for settings that do not name them.
const SESSION_TIMEOUT: Duration = Duration::from_millis(45_000);
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(300_000);
/// How soon a renewal is tried again while the lease does not hold.
const RETRY: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Lease {
    base: Instant,
    /// Until when (nanoseconds after `base`) the lease holds; 0: never renewed.
    until: AtomicU64,
    /// How long a renewal holds, from when it was sent.
    length: Duration,
    /// When a renewal was last tried.
    tried: Mutex<Option<Instant>>,
}

impl Lease {
    /// A lease of two thirds of the shorter of the session timeout and the poll interval
    /// `settings` give the consumer.
    pub fn new(settings: &KafkaSettings) -> Lease {
        let option = |name: &str, default: Duration| {
            settings
                .client_options
                .get(name)
                .and_then(|ms| ms.trim().parse::<u64>().ok())
                .map_or(default, Duration::from_millis)
        };
        let expelled_after = option("session.timeout.ms", SESSION_TIMEOUT)
            .min(option("max.poll.interval.ms", MAX_POLL_INTERVAL));
        Lease {
            base: Instant::now(),
            until: AtomicU64::new(0),
            length: expelled_after * 2 / 3,
            tried: Mutex::new(None),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Whether this member may still count itself the owner of its partitions.
    pub fn held(&self) -> bool {
        self.nanos(Instant::now()) < self.until.load(Ordering::Acquire)
    }

    /// Whether a renewal is to be tried now: a quarter of the lease after the last try
    /// while it holds, a tenth of a second after it when it does not (the state publisher
    /// waits meanwhile).
    pub(super) fn due(&self) -> bool {
        let every = match self.held() {
            true => self.length / 4,
            false => RETRY.min(self.length / 4),
        };
        let tried = self.tried.lock().unwrap_or_else(|e| e.into_inner());
        tried.is_none_or(|at| at.elapsed() >= every)
    }

    /// A renewal sent at `sent` is being tried; `ok` when the coordinator accepted it.
    pub(super) fn renewal(&self, sent: Instant, ok: bool) {
        *self.tried.lock().unwrap_or_else(|e| e.into_inner()) = Some(sent);
        if ok {
            self.until
                .fetch_max(self.nanos(sent + self.length), Ordering::AcqRel);
        }
        metrics::gauge!("tagstream_kafka_lease_held").set(if self.held() { 1.0 } else { 0.0 });
    }

    /// Ends the lease at once (the partitions were lost).
    pub(super) fn end(&self) {
        self.until.store(0, Ordering::Release);
        metrics::gauge!("tagstream_kafka_lease_held").set(0.0);
    }

    #[cfg(test)]
    fn length(&self) -> Duration {
        self.length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_holds_two_thirds_of_the_session_from_when_it_was_sent() {
        let mut settings = KafkaSettings::new("b:9092", "events", "g");
        settings
            .client_options
            .insert("session.timeout.ms".into(), "6000".into());
        let lease = Lease::new(&settings);
        assert_eq!(lease.length(), Duration::from_millis(4000));
        assert!(!lease.held() && lease.due(), "nothing held before a renewal");
        lease.renewal(Instant::now(), false);
        assert!(!lease.held() && !lease.due(), "a refused renewal holds nothing");
        std::thread::sleep(RETRY);
        assert!(lease.due(), "tried again soon while nothing holds");
        lease.renewal(Instant::now(), true);
        assert!(lease.held() && !lease.due());
        // Sent before a pause longer than the lease: answered after it, it holds nothing.
        let lease = Lease::new(&settings);
        std::thread::sleep(Duration::from_millis(5));
        let long_ago = Instant::now() - Duration::from_secs(5);
        lease.renewal(long_ago, true);
        assert!(!lease.held());
        lease.renewal(Instant::now(), true);
        lease.end();
        assert!(!lease.held(), "lost partitions end it");

        // The shorter of the session and the poll interval.
        settings
            .client_options
            .insert("max.poll.interval.ms".into(), "3000".into());
        assert_eq!(Lease::new(&settings).length(), Duration::from_millis(2000));
        let defaults = Lease::new(&KafkaSettings::new("b:9092", "events", "g"));
        assert_eq!(defaults.length(), Duration::from_secs(30));
    }
}
