//! Reads that do not queue behind ingest: customer lookups served from RocksDB on the
//! caller's thread, against the rule set and clock of the last commit.
//!
//! The engine thread is the only writer. Every commit writes each changed customer's record
//! and events in one `WriteBatch`, so RocksDB always holds the state of the last commit, and
//! a lookup reading one snapshot sees exactly that (never half a batch). What a reader does
//! not see is the batch in flight, as with any read through the engine.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use rules::CompiledRules;

use super::{customer_view, wall_ms, ClockMode, CustomerView, Engine, EngineError};
use crate::store::Store;

/// What the engine publishes for readers after each commit and rule change.
#[derive(Debug)]
pub(super) struct Published {
    rules: RwLock<Arc<CompiledRules>>,
    /// The event clock of the last commit; `i64::MIN` before the first event.
    clock: AtomicI64,
}

impl Published {
    pub(super) fn new(rules: Arc<CompiledRules>, clock: Option<i64>) -> Published {
        Published {
            rules: RwLock::new(rules),
            clock: AtomicI64::new(clock.unwrap_or(i64::MIN)),
        }
    }

    pub(super) fn set_clock(&self, clock: Option<i64>) {
        self.clock.store(clock.unwrap_or(i64::MIN), Ordering::Release);
    }

    pub(super) fn set_rules(&self, rules: Arc<CompiledRules>) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    fn rules(&self) -> Arc<CompiledRules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn clock(&self) -> Option<i64> {
        Some(self.clock.load(Ordering::Acquire)).filter(|c| *c != i64::MIN)
    }
}

/// A cheap, cloneable handle for lookups from any thread.
#[derive(Clone)]
pub struct ReadHandle {
    store: Arc<Store>,
    published: Arc<Published>,
    clock_mode: ClockMode,
    retention_ms: i64,
}

impl ReadHandle {
    /// The evaluation instant, as [`Engine::now`] would answer after the last commit.
    pub fn now(&self) -> i64 {
        let clock = self.published.clock();
        match self.clock_mode {
            ClockMode::Event => clock.unwrap_or(0),
            ClockMode::Wall => wall_ms().max(clock.unwrap_or(i64::MIN)),
        }
    }

    /// A customer as of the last commit, traits evaluated now; see [`Engine::customer`].
    pub fn customer(&self, customer_id: &str) -> Result<Option<CustomerView>, EngineError> {
        let id = rules::normalize(customer_id).into_owned();
        let Some(mut state) = self.store.load_customer_consistent(&id)? else {
            return Ok(None);
        };
        let rules = self.published.rules();
        Ok(Some(customer_view(
            &rules,
            id,
            &mut state,
            self.now(),
            self.retention_ms,
        )))
    }
}

impl Engine {
    /// A handle for lookups that run on the caller's thread, concurrently with ingest.
    pub fn reader(&self) -> ReadHandle {
        ReadHandle {
            store: self.store.clone(),
            published: self.published.clone(),
            clock_mode: self.config.clock,
            retention_ms: self.config.retention_ms,
        }
    }
}
