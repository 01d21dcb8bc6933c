//! Retention of the change log and the dead letters. Both are logs read by cursor (`seq`,
//! dead letter id); their oldest entries are deleted once past the configured age or count
//! ([`LogRetention`]), as one range delete with the new floor (`changes_from`,
//! `dead_letters_from`) in the same write. A cursor before the floor is answered with
//! [`EngineError::Gone`] naming the oldest entry left, never with a silent gap.
//!
//! What is still needed is kept whatever the retention says: changes the membership index's
//! last checkpoint does not cover (a restart replays them), and entries a reader holds
//! ([`ReadHandle::hold`]: the Kafka publisher and each webhook hold their position, so
//! nothing is deleted before it was published or delivered).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::codec::CodecError;

pub(super) use crate::store::META_CHANGES_FROM;
pub(super) const META_DEAD_LETTERS_FROM: &str = "dead_letters_from";

/// Most entries of each log one [`Engine::trim_logs`] looks at, so a first trim of a long
/// log does not stall ingest; the next call goes on.
const TRIM_STEP: usize = 50_000;

/// The logs retention applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Log {
    Changes,
    DeadLetters,
}

impl Log {
    fn floor_key(self) -> &'static str {
        match self {
            Log::Changes => META_CHANGES_FROM,
            Log::DeadLetters => META_DEAD_LETTERS_FROM,
        }
    }

    fn cf(self) -> &'static str {
        match self {
            Log::Changes => CF_CHANGES,
            Log::DeadLetters => CF_DLQ,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Log::Changes => "changes",
            Log::DeadLetters => "dead_letters",
        }
    }
}

/// Positions readers need kept, by reader name: the first entry of each log it has not
/// consumed yet.
#[derive(Debug, Default)]
pub(super) struct Holds(Mutex<HashMap<String, (Log, u64)>>);

impl Holds {
    pub(super) fn set(&self, name: &str, log: Log, first_needed: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), (log, first_needed));
    }

    pub(super) fn release(&self, name: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    fn lowest(&self, log: Log) -> Option<u64> {
        let holds = self.0.lock().unwrap_or_else(|p| p.into_inner());
        holds
            .values()
            .filter(|(l, _)| *l == log)
            .map(|(_, first)| *first)
            .min()
    }
}

/// What one [`Engine::trim_logs`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    pub changes: u64,
    pub dead_letters: u64,
}

/// The oldest entry a log may still hold (0 until retention deleted any).
pub(super) fn floor(store: &Store, log: Log) -> Result<u64, StoreError> {
    store.meta_u64(log.floor_key())
}

/// `Ok` when reading `log` from `first` on skips nothing retention deleted.
pub(super) fn check_cursor(store: &Store, log: Log, first: u64) -> Result<(), EngineError> {
    let oldest = floor(store, log)?;
    if first < oldest {
        return Err(EngineError::Gone {
            log: log.label(),
            oldest,
        });
    }
    Ok(())
}

impl Engine {
    /// Deletes the oldest changes and dead letters past retention (at most a step of each
    /// per call). Never a change after `index_checkpoint_seq` (the membership index's last
    /// checkpoint, which a restart replays from), nor an entry a reader holds.
    pub fn trim_logs(&mut self, index_checkpoint_seq: u64) -> Result<Trimmed, EngineError> {
        self.trim_plan(index_checkpoint_seq).run()
    }

    /// What [`Engine::trim_logs`] would delete up to, fixed now; [`TrimPlan::run`] does the
    /// scan and the delete, on any thread (the service runs it beside the engine: a step
    /// reads tens of thousands of entries, too long to hold up a group).
    pub fn trim_plan(&mut self, index_checkpoint_seq: u64) -> TrimPlan {
        self.settle();
        let holds = &self.published.holds;
        let changes_limit = [
            Some(index_checkpoint_seq.saturating_add(1)),
            holds.lowest(Log::Changes),
            Some(self.counters.next_seq),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(0);
        let letters_limit = holds
            .lowest(Log::DeadLetters)
            .unwrap_or(u64::MAX)
            .min(self.counters.next_dlq);
        TrimPlan {
            store: self.store.clone(),
            changes: LogTrim {
                log: Log::Changes,
                limit: changes_limit,
                next: self.counters.next_seq,
                max_entries: self.config.changes_retention.max_entries,
                age_floor: self
                    .now()
                    .saturating_sub(self.config.changes_retention.max_age_ms),
            },
            dead_letters: LogTrim {
                log: Log::DeadLetters,
                limit: letters_limit,
                next: self.counters.next_dlq,
                max_entries: self.config.dead_letters_retention.max_entries,
                age_floor: wall_ms().saturating_sub(self.config.dead_letters_retention.max_age_ms),
            },
        }
    }
}

/// One step of retention for both logs, with its limits fixed by [`Engine::trim_plan`].
/// Only the entries before each limit are looked at, and the engine never writes there
/// again, so it may run while the engine goes on; one at a time.
pub struct TrimPlan {
    store: Arc<Store>,
    changes: LogTrim,
    dead_letters: LogTrim,
}

/// The limits of one log's step.
struct LogTrim {
    log: Log,
    /// Nothing at or after this position is deleted (checkpoint, readers' holds).
    limit: u64,
    /// The log's next position, when the plan was made.
    next: u64,
    max_entries: u64,
    /// Entries at or before this instant are too old.
    age_floor: i64,
}

impl TrimPlan {
    /// Deletes what the plan allows; says how much went.
    pub fn run(&self) -> Result<Trimmed, EngineError> {
        #[cfg(test)]
        self.store.hold_trims();
        let changes = self.trim(&self.changes)?;
        let dead_letters = self.trim(&self.dead_letters)?;
        metrics::gauge!("tagstream_log_oldest", "log" => "changes")
            .set(floor(&self.store, Log::Changes)? as f64);
        metrics::gauge!("tagstream_log_oldest", "log" => "dead_letters")
            .set(floor(&self.store, Log::DeadLetters)? as f64);
        Ok(Trimmed {
            changes,
            dead_letters,
        })
    }

    /// Deletes the longest prefix of the log below its limit whose entries are each too
    /// many (more than the retention's count would be left after it) or too old. Returns
    /// how many went.
    fn trim(&self, plan: &LogTrim) -> Result<u64, EngineError> {
        let log = plan.log;
        let too_old = |value: &[u8]| -> Result<bool, CodecError> {
            let at = match log {
                Log::Changes => Change::stored_at(value).ok_or(CodecError("bad stored change"))?,
                Log::DeadLetters => Reader::new(value).i64()?,
            };
            Ok(at <= plan.age_floor)
        };
        let store = &self.store;
        let from = floor(store, log)?;
        let (mut cut, mut deleted) = (from, 0);
        for item in store.scan_from(log.cf(), &from.to_be_bytes()).take(TRIM_STEP) {
            let (key, value) = item?;
            let position = u64::from_be_bytes(
                key.get(..8)
                    .and_then(|k| k.try_into().ok())
                    .ok_or(StoreError::Codec(CodecError("bad log key")))?,
            );
            if position >= plan.limit {
                break;
            }
            let too_many = plan.next.saturating_sub(position) > plan.max_entries;
            if !too_many && !too_old(&value).map_err(StoreError::from)? {
                break;
            }
            cut = position + 1;
            deleted += 1;
        }
        if deleted == 0 {
            return Ok(0);
        }
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range_cf(store.cf(log.cf()), from.to_be_bytes(), cut.to_be_bytes());
        store.put_meta_u64(&mut batch, log.floor_key(), cut);
        store.commit(batch)?;
        if log == Log::Changes {
            // Its index entries go with the next compactions.
            store.set_changes_floor(cut);
        }
        metrics::counter!("tagstream_log_trimmed_total", "log" => log.label()).increment(deleted);
        tracing::debug!(
            log = log.label(),
            deleted,
            before = cut,
            "retention deleted the oldest entries"
        );
        Ok(deleted)
    }
}
