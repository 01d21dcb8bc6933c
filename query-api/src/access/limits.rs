//! Abuse limits per API key: a token bucket for requests (429 with `Retry-After` when empty)
//! and a bound on concurrent exports and SQL statements; and per client address, a budget of
//! failed authentications that are audited one by one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits applied to every key (`[access.limits]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitConfig {
    /// Requests per second a key may sustain; 0: unlimited.
    pub requests_per_second: f64,
    /// Requests a key may make at once after being idle.
    pub burst: f64,
    /// Exports (members, SQL) a key may run at the same time.
    pub concurrent_exports: usize,
    /// Failed authentications per minute one client address may make (each one audited,
    /// fsynced); past it they are answered 429 and summed into that address's next audit
    /// record, so a flood of bad keys cannot turn into a flood of disk syncs.
    pub failed_auth_per_minute: f64,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            requests_per_second: 200.0,
            burst: 400.0,
            concurrent_exports: 2,
            failed_auth_per_minute: 60.0,
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct KeyLimits {
    bucket: Mutex<Bucket>,
    exports: Arc<Semaphore>,
}

/// The limits of every key seen since start.
pub struct Limiter {
    config: LimitConfig,
    keys: Mutex<HashMap<String, Arc<KeyLimits>>>,
}

impl Limiter {
    pub fn new(config: LimitConfig) -> Limiter {
        Limiter {
            config,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn of(&self, key_id: &str) -> Arc<KeyLimits> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.entry(key_id.to_owned())
            .or_insert_with(|| {
                Arc::new(KeyLimits {
                    bucket: Mutex::new(Bucket {
                        tokens: self.config.burst.max(1.0),
                        at: Instant::now(),
                    }),
                    exports: Arc::new(Semaphore::new(self.config.concurrent_exports.max(1))),
                })
            })
            .clone()
    }

    /// Takes one request's token at `now`; when the bucket is empty, how long until it has one.
    pub fn admit_at(&self, key_id: &str, now: Instant) -> Result<(), Duration> {
        let rate = self.config.requests_per_second;
        if rate <= 0.0 {
            return Ok(());
        }
        let limits = self.of(key_id);
        let mut bucket = limits.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(self.config.burst.max(1.0));
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    pub fn admit(&self, key_id: &str) -> Result<(), Duration> {
        self.admit_at(key_id, Instant::now())
    }

    /// A slot for one export, held until the permit is dropped (the response body ends);
    /// `None` when the key runs as many as it may.
    pub fn export_slot(&self, key_id: &str) -> Option<OwnedSemaphorePermit> {
        self.of(key_id).exports.clone().try_acquire_owned().ok()
    }
}

/// What to do with one failed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureVerdict {
    /// Audit it, with the failures from the same address that were not (0 or more).
    Record { unrecorded_before: u64 },
    /// The address is over its budget: answer 429, count it for the next record.
    Throttled { retry_after: Duration },
}

struct Failures {
    bucket: Bucket,
    unrecorded: u64,
}

/// The failed-authentication budget of every client address (see
/// [`LimitConfig::failed_auth_per_minute`]). Bounded: past [`FailureBudget::MAX_CLIENTS`]
/// addresses, those whose budget is whole again are forgotten, and if that is not enough
/// the rest share one budget.
pub struct FailureBudget {
    per_minute: f64,
    clients: Mutex<HashMap<Option<IpAddr>, Failures>>,
}

impl FailureBudget {
    pub const MAX_CLIENTS: usize = 10_000;

    pub fn new(per_minute: f64) -> FailureBudget {
        FailureBudget {
            per_minute,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one failed authentication from `client` (`None`: unknown) at `now`.
    pub fn fail_at(&self, client: Option<IpAddr>, now: Instant) -> FailureVerdict {
        if self.per_minute <= 0.0 {
            return FailureVerdict::Record { unrecorded_before: 0 };
        }
        let (rate, burst) = (self.per_minute / 60.0, self.per_minute.max(1.0));
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mut client = client;
        if !clients.contains_key(&client) && clients.len() >= Self::MAX_CLIENTS {
            clients.retain(|_, f| {
                let refilled =
                    f.bucket.tokens + now.saturating_duration_since(f.bucket.at).as_secs_f64() * rate;
                f.unrecorded > 0 || refilled < burst
            });
            if clients.len() >= Self::MAX_CLIENTS {
                client = None;
            }
        }
        let failures = clients.entry(client).or_insert(Failures {
            bucket: Bucket {
                tokens: burst,
                at: now,
            },
            unrecorded: 0,
        });
        let bucket = &mut failures.bucket;
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            FailureVerdict::Record {
                unrecorded_before: std::mem::take(&mut failures.unrecorded),
            }
        } else {
            failures.unrecorded += 1;
            FailureVerdict::Throttled {
                retry_after: Duration::from_secs_f64((1.0 - bucket.tokens) / rate),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_authentications_are_recorded_within_the_budget_and_summed_past_it() {
        let budget = FailureBudget::new(60.0); // one a second, 60 at once
        let (a, b) = (
            Some("10.0.0.1".parse().unwrap()),
            Some("10.0.0.2".parse().unwrap()),
        );
        let t0 = Instant::now();
        for _ in 0..60 {
            assert_eq!(
                budget.fail_at(a, t0),
                FailureVerdict::Record { unrecorded_before: 0 }
            );
        }
        for _ in 0..5 {
            assert!(
                matches!(budget.fail_at(a, t0), FailureVerdict::Throttled { retry_after } if retry_after <= Duration::from_secs(1))
            );
        }
        // Another address has its own budget.
        assert_eq!(
            budget.fail_at(b, t0),
            FailureVerdict::Record { unrecorded_before: 0 }
        );
        // A second later one more is recorded, carrying the five that were not.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            budget.fail_at(a, t1),
            FailureVerdict::Record { unrecorded_before: 5 }
        );
        assert!(matches!(budget.fail_at(a, t1), FailureVerdict::Throttled { .. }));
    }

    #[test]
    fn the_failure_budget_forgets_idle_addresses_and_never_grows_past_its_bound() {
        let budget = FailureBudget::new(60.0);
        let t0 = Instant::now();
        for i in 0..FailureBudget::MAX_CLIENTS as u32 + 50 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            budget.fail_at(Some(ip), t0);
        }
        assert!(budget.clients.lock().unwrap().len() <= FailureBudget::MAX_CLIENTS + 1);
        // A minute later every budget is whole: the old addresses make room.
        let t1 = t0 + Duration::from_secs(61);
        let fresh = Some(IpAddr::from(std::net::Ipv4Addr::new(192, 168, 0, 1)));
        assert_eq!(
            budget.fail_at(fresh, t1),
            FailureVerdict::Record { unrecorded_before: 0 }
        );
        assert!(budget.clients.lock().unwrap().contains_key(&fresh));
    }

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let limiter = Limiter::new(LimitConfig {
            requests_per_second: 10.0,
            burst: 3.0,
            ..LimitConfig::default()
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.admit_at("k", t0).is_ok());
        }
        let wait = limiter.admit_at("k", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // Another key has its own bucket.
        assert!(limiter.admit_at("other", t0).is_ok());
        // 100 ms later one token is back, not more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.admit_at("k", t1).is_ok());
        assert!(limiter.admit_at("k", t1).is_err());
        // Idle for long, the bucket holds the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.admit_at("k", t2).is_ok());
        }
        assert!(limiter.admit_at("k", t2).is_err());
    }

    #[test]
    fn exports_are_bounded_per_key() {
        let limiter = Limiter::new(LimitConfig {
            concurrent_exports: 1,
            ..LimitConfig::default()
        });
        let held = limiter.export_slot("k").unwrap();
        assert!(limiter.export_slot("k").is_none());
        assert!(limiter.export_slot("j").is_some());
        drop(held);
        assert!(limiter.export_slot("k").is_some());
    }
}
