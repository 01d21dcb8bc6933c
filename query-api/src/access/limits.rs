//! Abuse limits per API key: a token bucket for requests (429 with `Retry-After` when empty)
//! and a bound on concurrent exports and SQL statements.

use std::collections::HashMap;
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
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            requests_per_second: 200.0,
            burst: 400.0,
            concurrent_exports: 2,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let limiter = Limiter::new(LimitConfig {
            requests_per_second: 10.0,
            burst: 3.0,
            concurrent_exports: 1,
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
