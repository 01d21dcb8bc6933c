//! Time: the event clock, wall-clock ticks, and each customer's one pending timer — the
//! earliest instant time alone could change one of their tags or segments.

use super::*;

/// A shard's pending timers, `(due, customer)` in time order: one set per partition when
/// each partition has its own event clock (a partition's timers fire as its clock passes
/// them), one for all otherwise.
#[derive(Default)]
pub(super) struct Timers {
    /// The partitions customers are hashed to when each has a set; 0 for one set.
    partitions: u32,
    sets: Vec<BTreeSet<(i64, Arc<str>)>>,
    len: usize,
}

impl Timers {
    /// Timers in one set for all customers, or one per partition of `partitions`.
    pub(super) fn new(per_partition: Option<u32>) -> Timers {
        let partitions = per_partition.unwrap_or(0);
        Timers {
            partitions,
            sets: (0..partitions.max(1)).map(|_| BTreeSet::new()).collect(),
            len: 0,
        }
    }

    /// The set `customer`'s timer is in.
    pub(super) fn set_of(&self, customer: &str) -> usize {
        match self.partitions {
            0 => 0,
            n => crate::partition::partition_of(customer.as_bytes(), n) as usize,
        }
    }

    /// The set of `partition`'s customers.
    pub(super) fn set_of_partition(&self, partition: u32) -> usize {
        match self.partitions {
            0 => 0,
            _ => partition as usize,
        }
    }

    pub(super) fn insert(&mut self, timer: (i64, Arc<str>)) {
        let set = self.set_of(&timer.1);
        if self.sets[set].insert(timer) {
            self.len += 1;
        }
    }

    pub(super) fn remove(&mut self, timer: &(i64, Arc<str>)) {
        let set = self.set_of(&timer.1);
        if self.sets[set].remove(timer) {
            self.len -= 1;
        }
    }

    pub(super) fn contains(&self, timer: &(i64, Arc<str>)) -> bool {
        self.sets[self.set_of(&timer.1)].contains(timer)
    }

    /// The earliest timer of set `set`.
    pub(super) fn first_in(&self, set: usize) -> Option<&(i64, Arc<str>)> {
        self.sets[set].first()
    }

    /// The instant of the earliest timer of all.
    pub(super) fn first_due(&self) -> Option<i64> {
        self.sets
            .iter()
            .filter_map(|s| s.first().map(|(due, _)| *due))
            .min()
    }

    pub(super) fn sets(&self) -> usize {
        self.sets.len()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn clear(&mut self) {
        self.sets.iter_mut().for_each(BTreeSet::clear);
        self.len = 0;
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &(i64, Arc<str>)> {
        self.sets.iter().flatten()
    }
}

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
        let ((), changes) = self.transact(|engine, _| {
            engine.run_round(Vec::new(), &[(0, now)], Some(now), usize::MAX)?;
            engine.counters.advance_all(now);
            Ok(())
        })?;
        Ok(changes)
    }

    /// Wall clock mode: fires the timers due by now, at most
    /// [`EngineConfig::timers_per_round`] per worker; while [`Engine::timers_behind`] says
    /// more are due, call again right away. Call at least once a second.
    pub fn tick(&mut self) -> Result<Vec<Change>, EngineError> {
        self.tick_at_most(self.config.timers_per_round)
    }

    /// [`Engine::tick`] for when events wait: at most
    /// [`EngineConfig::timers_beside_events`] per worker, so a backlog of timers is worked
    /// off between groups of events rather than ahead of them.
    pub fn tick_beside_events(&mut self) -> Result<Vec<Change>, EngineError> {
        self.tick_at_most(self.config.timers_beside_events.min(self.config.timers_per_round))
    }

    fn tick_at_most(&mut self, per_worker: usize) -> Result<Vec<Change>, EngineError> {
        let now = self.now();
        if self.next_timer().is_none_or(|due| due > now) {
            return Ok(Vec::new());
        }
        let ((), changes) =
            self.transact(|engine, _| engine.run_round(Vec::new(), &[], Some(now), per_worker))?;
        Ok(changes)
    }

    /// Whether a timer is due by now (wall clock mode: a tick has more to do).
    pub fn timers_behind(&self) -> bool {
        self.next_timer().is_some_and(|due| due <= self.now())
    }

    /// The instant of the earliest pending timer.
    pub fn next_timer(&self) -> Option<i64> {
        self.shards.iter().filter_map(|s| s.timers.first_due()).min()
    }

    /// One round of the shards: each runs its `jobs` (one list per shard, or none) and fires
    /// its timers as the clock passes them (`steps`, event clock mode) and up to `until`, at
    /// most `timers` per worker in wall clock mode (see [`Ctx::timers`]).
    pub(super) fn run_round(
        &mut self,
        mut jobs: Vec<Vec<Job>>,
        steps: &[(u64, i64)],
        until: Option<i64>,
        timers: usize,
    ) -> Result<(), EngineError> {
        jobs.resize_with(self.shards.len(), Vec::new);
        let (ctx, shards) = self.parts(steps, timers);
        let ctx = &ctx;
        in_parallel(shards, jobs, |shard, jobs| {
            let busy = !jobs.is_empty()
                || until.is_some_and(|u| shard.timers.first_due().is_some_and(|due| due <= u));
            if !busy {
                return Ok(());
            }
            Worker::new(ctx, shard, Place::work(0)).run(jobs, until)
        })
    }
}

impl Worker<'_> {
    /// Fires the timers of this shard due at or before `until`, in time order: every one in
    /// event clock mode (the change log follows the clock), at most `most` in wall clock
    /// mode.
    pub(super) fn fire_timers(&mut self, until: i64, most: usize) -> Result<(), EngineError> {
        let most = match self.ctx.config.clock {
            ClockMode::Event => usize::MAX,
            ClockMode::Wall => most.max(1),
        };
        let mut fired = 0;
        for set in 0..self.shard.timers.sets() {
            fired += self.fire_set(set, until, most - fired)?;
        }
        Ok(())
    }

    /// Fires what an event of `partition` at `now` passes first: every timer due by then,
    /// of that partition's customers alone when each partition has its own clock.
    pub(super) fn fire_before(&mut self, partition: u32, now: i64) -> Result<(), EngineError> {
        match self.ctx.config.partition_clocks() {
            true => {
                let set = self.shard.timers.set_of_partition(partition);
                self.fire_set(set, now, usize::MAX).map(drop)
            }
            false => self.fire_timers(now, usize::MAX),
        }
    }

    /// Fires the timers of set `set` due at or before `until`, at most `most`; how many.
    fn fire_set(&mut self, set: usize, until: i64, most: usize) -> Result<usize, EngineError> {
        let mut fired = 0;
        while let Some((due, customer)) = self.shard.timers.first_in(set).cloned() {
            if due > until || fired == most {
                break;
            }
            fired += 1;
            // Out of the set first, so loading the customer does not fire it again.
            self.shard.timers.remove(&(due, customer.clone()));
            let timer = self.timer_place(due, &customer);
            let place = std::mem::replace(&mut self.place, timer);
            let mut state = self.take_customer(&customer, due)?;
            self.fire_timer(&customer, &mut state, due)?;
            self.put_back(customer, state);
            self.place = place;
        }
        Ok(fired)
    }
    /// Fires `customer`'s timer due at `due`: every definition is judged at that instant.
    pub(super) fn fire_timer(
        &mut self,
        customer: &Arc<str>,
        state: &mut CustomerState,
        due: i64,
    ) -> Result<(), EngineError> {
        let shard = &mut *self.shard;
        shard.timers.remove(&(due, customer.clone()));
        shard.fired.count += 1;
        if self.ctx.config.clock == ClockMode::Wall && shard.fired.due.len() < FiredTimers::MAX_DUE {
            shard.fired.due.push(due);
        }
        shard
            .batch
            .wb
            .delete_cf(self.ctx.store.cf(CF_TIMERS), timer_key(due, customer));
        if state.timer == Some(due) {
            // (A rule change judged on loading may have set a newer one: that one stays.)
            state.timer = None;
        }
        for tag in state.event_tags.values_mut() {
            tag.settle(due);
        }
        self.windows_not_after(customer, state, due)?;
        self.evaluate(customer, state, due, due, Scope::All, &Cause::Timer);
        Ok(())
    }

    /// Makes the customer's windows usable at `now`: windows never move back, so if they are
    /// past it they are built again from the history.
    pub(super) fn windows_not_after(
        &self,
        customer: &str,
        state: &mut CustomerState,
        now: i64,
    ) -> Result<(), EngineError> {
        if state.windows.as_ref().is_some_and(|w| w.at() > now) {
            self.load_history(customer, state, now)?;
            state.windows = None;
        }
        Ok(())
    }

    pub(super) fn schedule(&mut self, customer: &Arc<str>, state: &mut CustomerState, next: Option<i64>) {
        if state.timer == next {
            return;
        }
        let (shard, cf) = (&mut *self.shard, self.ctx.store.cf(CF_TIMERS));
        if let Some(old) = state.timer {
            shard.timers.remove(&(old, customer.clone()));
            shard.batch.wb.delete_cf(cf, timer_key(old, customer));
        }
        if let Some(due) = next {
            shard.timers.insert((due, customer.clone()));
            shard.batch.wb.put_cf(cf, timer_key(due, customer), []);
        }
        state.timer = next;
    }
}
