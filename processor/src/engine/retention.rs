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
use std::sync::Mutex;

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
        let changes_age_floor = self
            .now()
            .saturating_sub(self.config.changes_retention.max_age_ms);
        let changes = self.trim(Log::Changes, changes_limit, self.counters.next_seq, |value| {
            let (_, change) = Change::decode_stored(value).ok_or(CodecError("bad stored change"))?;
            Ok(change.at <= changes_age_floor)
        })?;
        let letters_limit = holds
            .lowest(Log::DeadLetters)
            .unwrap_or(u64::MAX)
            .min(self.counters.next_dlq);
        let letters_age_floor = wall_ms().saturating_sub(self.config.dead_letters_retention.max_age_ms);
        let dead_letters = self.trim(Log::DeadLetters, letters_limit, self.counters.next_dlq, |value| {
            Ok(Reader::new(value).i64()? <= letters_age_floor)
        })?;
        metrics::gauge!("tagstream_log_oldest", "log" => "changes")
            .set(floor(&self.store, Log::Changes)? as f64);
        metrics::gauge!("tagstream_log_oldest", "log" => "dead_letters")
            .set(floor(&self.store, Log::DeadLetters)? as f64);
        Ok(Trimmed {
            changes,
            dead_letters,
        })
    }

    /// Deletes the longest prefix of `log` below `limit` whose entries are each too many
    /// (more than the retention's count would be left after it, `next` being the log's
    /// next position) or too old (`too_old` on the stored value). Returns how many went.
    fn trim(
        &self,
        log: Log,
        limit: u64,
        next: u64,
        too_old: impl Fn(&[u8]) -> Result<bool, CodecError>,
    ) -> Result<u64, EngineError> {
        let retention = match log {
            Log::Changes => self.config.changes_retention,
            Log::DeadLetters => self.config.dead_letters_retention,
        };
        let from = floor(&self.store, log)?;
        let (mut cut, mut deleted) = (from, 0);
        for item in self
            .store
            .scan_from(log.cf(), &from.to_be_bytes())
            .take(TRIM_STEP)
        {
            let (key, value) = item?;
            let position = u64::from_be_bytes(
                key.get(..8)
                    .and_then(|k| k.try_into().ok())
                    .ok_or(StoreError::Codec(CodecError("bad log key")))?,
            );
            if position >= limit {
                break;
            }
            let too_many = next.saturating_sub(position) > retention.max_entries;
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
        batch.delete_range_cf(self.store.cf(log.cf()), from.to_be_bytes(), cut.to_be_bytes());
        self.store.put_meta_u64(&mut batch, log.floor_key(), cut);
        self.store.commit(batch)?;
        if log == Log::Changes {
            // Its index entries go with the next compactions.
            self.store.set_changes_floor(cut);
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
