//! Time: the event clock, wall-clock ticks, and each customer's one pending timer — the
//! earliest instant time alone could change one of their tags or segments.

use super::*;

impl Engine {
    /// Moves the event clock forward to `now`, firing every timer due on the way, in time
    /// order. Event clock mode only.
    pub fn advance_clock(&mut self, now: i64) -> Result<Vec<Change>, EngineError> {
        if self.config.clock != ClockMode::Event {
            return Err(EngineError::Clock(
                "the clock can only be set in `event` clock mode".into(),
            ));
        }
        if let Some(current) = self.counters.clock.filter(|c| now < *c) {
            return Err(EngineError::Clock(format!(
                "the clock never moves backwards: it is at {current}, {now} is earlier"
            )));
        }
        let ((), changes) = self.transact(|engine, batch| {
            engine.fire_timers(now, batch)?;
            engine.counters.clock = Some(now);
            Ok(())
        })?;
        Ok(changes)
    }

    /// Wall clock mode: fires every timer due by now. Call at least once a second.
    pub fn tick(&mut self) -> Result<Vec<Change>, EngineError> {
        let now = self.now();
        if self.timers.first().is_none_or(|(due, _)| *due > now) {
            return Ok(Vec::new());
        }
        let ((), changes) = self.transact(|engine, batch| engine.fire_timers(now, batch))?;
        Ok(changes)
    }

    /// Fires every timer due at or before `until`, in time order.
    pub(super) fn fire_timers(&mut self, until: i64, batch: &mut Batch) -> Result<(), EngineError> {
        while let Some((due, customer)) = self.timers.first().cloned() {
            if due > until {
                break;
            }
            // Out of the set first, so loading the customer does not fire it again.
            self.timers.remove(&(due, customer.clone()));
            let mut state = self.take_customer(&customer, due, batch)?;
            self.fire_timer(&customer, &mut state, due, batch)?;
            self.put_back(customer, state, batch);
        }
        Ok(())
    }

    /// Fires `customer`'s timer due at `due`: every definition is judged at that instant.
    pub(super) fn fire_timer(
        &mut self,
        customer: &Arc<str>,
        state: &mut CustomerState,
        due: i64,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        self.timers.remove(&(due, customer.clone()));
        self.fired.count += 1;
        if self.config.clock == ClockMode::Wall && self.fired.due.len() < FiredTimers::MAX_DUE {
            self.fired.due.push(due);
        }
        batch
            .wb
            .delete_cf(self.store.cf(CF_TIMERS), timer_key(due, customer));
        if state.timer == Some(due) {
            // (A rule change judged on loading may have set a newer one: that one stays.)
            state.timer = None;
        }
        for tag in state.event_tags.values_mut() {
            tag.settle(due);
        }
        self.windows_not_after(customer, state, due, batch)?;
        self.evaluate(customer, state, due, due, Scope::All, &Cause::Timer, batch);
        Ok(())
    }

    /// Makes the customer's windows usable at `now`: windows never move back, so if they are
    /// past it they are built again from the history.
    pub(super) fn windows_not_after(
        &self,
        customer: &str,
        state: &mut CustomerState,
        now: i64,
        batch: &Batch,
    ) -> Result<(), EngineError> {
        if state.windows.as_ref().is_some_and(|w| w.at() > now) {
            self.load_history(customer, state, now, batch)?;
            state.windows = None;
        }
        Ok(())
    }

    pub(super) fn schedule(
        &mut self,
        customer: &Arc<str>,
        state: &mut CustomerState,
        next: Option<i64>,
        batch: &mut Batch,
    ) {
        if state.timer == next {
            return;
        }
        if let Some(old) = state.timer {
            self.timers.remove(&(old, customer.clone()));
            batch
                .wb
                .delete_cf(self.store.cf(CF_TIMERS), timer_key(old, customer));
        }
        if let Some(due) = next {
            self.timers.insert((due, customer.clone()));
            batch
                .wb
                .put_cf(self.store.cf(CF_TIMERS), timer_key(due, customer), []);
        }
        state.timer = next;
    }
}
