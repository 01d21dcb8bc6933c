//! Shards: customers are hashed to partitions (Kafka's default partitioner, so a Kafka
//! partition keyed by customer id and an engine partition hold the same customers), and each
//! partition is owned by one shard — one engine worker with its own cache and timers. A round
//! (one group commit) runs in three steps:
//!
//! 1. on the engine thread, in order: validation against the clock, dedup, arrival numbers
//!    and dead letters — everything global — turning each accepted event into a [`Job`] for
//!    the shard that owns its customer;
//! 2. every shard with work, in parallel: its timers as the clock passes them and its jobs in
//!    order, into its own batch — for events that carry identifiers, while step 1 goes on
//!    ([`super::deal`]);
//! 3. on the engine thread: the commit, which numbers new customers and gives changes their
//!    `seq` in the order one thread would have made them (each change carries its [`Place`]
//!    in that order), so the change log is the same whatever the number of workers.
//!
//! Everything the contract promises per customer lives within one shard.

use super::*;

/// Where a change (or a new customer) falls in the order one engine thread would have made
/// it. `step` is the index of the event in the round whose turn it happened in (or of the
/// customer in a sweep); within a step, a merge the event's identifiers cause comes first
/// (after the timers of its customers that were already due when it was made; then the
/// absorbed customers in turn, then the survivor), then the timers the clock passed fire, in
/// `(due, customer)` order, then the event.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(super) struct Place {
    step: u64,
    /// 0: a timer that was due before a merge of this step, 1: the merge, 2: a timer's
    /// firing, 3: the step's own work.
    phase: u8,
    due: i64,
    customer: Option<Arc<str>>,
}

impl Place {
    /// The step's own work (an event, a customer of a sweep, a manual tag).
    pub(super) fn work(step: u64) -> Place {
        Place {
            step,
            phase: 3,
            due: 0,
            customer: None,
        }
    }

    /// The `part`th customer of a merge made before the event of `step`.
    pub(super) fn merge(step: u64, part: usize) -> Place {
        Place {
            step,
            phase: 1,
            due: part as i64,
            customer: None,
        }
    }

    fn timer(step: u64, due: i64, customer: &Arc<str>) -> Place {
        Place {
            step,
            phase: 2,
            due,
            customer: Some(customer.clone()),
        }
    }

    pub(super) fn step(&self) -> u64 {
        self.step
    }
}

/// One accepted event for the shard that owns its customer, with everything the engine
/// thread decided for it.
pub(super) struct Job {
    pub step: u64,
    pub event: ValidEvent,
    pub event_id: Option<String>,
    pub ts: i64,
    /// The evaluation instant (the clock after the event, in event clock mode).
    pub now: i64,
    pub arrival: u64,
    /// The partition of the customer it is applied to (0 without a clock per partition).
    pub partition: u32,
    /// The customer the event belongs to when it is not `event.customer_id`'s canonical
    /// self: an id a merge absorbed (kept with the event for an unmerge).
    pub origin: Option<Arc<str>>,
    /// The customer absorbed another: the event keeps the profile it sets with it.
    pub keep_profile: bool,
}

/// What one engine worker owns: its customers in memory, their timers, and the batch of the
/// round in flight.
#[derive(Default)]
pub(super) struct Shard {
    pub cache: CustomerCache,
    pub timers: super::timers::Timers,
    pub fired: FiredTimers,
    pub batch: Batch,
}

/// What every worker reads and none changes during a round.
pub(super) struct Ctx<'a> {
    pub store: &'a Store,
    pub rules: &'a Arc<CompiledRules>,
    pub config: &'a EngineConfig,
    pub generation: u64,
    pub order_pos: &'a [usize],
    /// Batches committed since open; the cache's clock for eviction.
    pub batches: u64,
    /// Event clock mode: the steps of the round at which the clock moved forward, and to
    /// where, in order.
    pub steps: &'a [(u64, i64)],
    /// The write of the commit before this round, while it runs ([`super::pipeline`]), and
    /// each shard's customers it writes (only their stored events wait for it).
    pub pending: Option<&'a super::pipeline::WriteSignal>,
    pub pending_dirty: Option<&'a [foldhash::HashSet<Arc<str>>]>,
    pub pending_written: Option<&'a [super::Written]>,
    /// Wall clock mode: most timers one worker fires this round (a worker with more events
    /// than that may fire as many timers as it has events).
    pub timers: usize,
}

impl Ctx<'_> {
    /// What customers are judged under, for loading them with their stored windows.
    pub fn current(&self) -> Current<'_> {
        Current {
            rules: self.rules,
            retention_ms: self.config.retention_ms,
        }
    }

    /// The step at which one thread would have fired a timer due at `due`: the first at
    /// which the clock reached it (or `current` when the clock did not move this round).
    fn step_of(&self, due: i64, current: u64) -> u64 {
        let i = self.steps.partition_point(|&(_, clock)| clock < due);
        self.steps.get(i).map_or(current, |&(step, _)| step)
    }
}

/// One shard at work: the per-customer half of the engine (loading, judging, timers).
pub(super) struct Worker<'a> {
    pub ctx: &'a Ctx<'a>,
    pub shard: &'a mut Shard,
    /// Where what is done now falls in one thread's order.
    pub place: Place,
}

impl<'a> Worker<'a> {
    pub fn new(ctx: &'a Ctx<'a>, shard: &'a mut Shard, place: Place) -> Worker<'a> {
        Worker { ctx, shard, place }
    }

    /// A round's work for this shard: in event clock mode each job after the timers the
    /// clock passed before it, then the timers due by `until`; in wall clock mode the timers
    /// due by `until` first, then the jobs.
    pub fn run(&mut self, jobs: Vec<Job>, until: Option<i64>) -> Result<(), EngineError> {
        let event_clock = self.ctx.config.clock == ClockMode::Event;
        if !event_clock {
            if let Some(until) = until {
                let most = self
                    .ctx
                    .timers
                    .max(jobs.len())
                    .min(self.ctx.config.timers_per_round);
                self.fire_timers(until, most)?;
            }
        }
        self.apply_jobs(jobs)?;
        if event_clock {
            if let Some(until) = until {
                self.fire_timers(until, usize::MAX)?;
            }
        }
        Ok(())
    }

    /// Applies jobs in order; in event clock mode each after the timers the clock passed
    /// before it.
    pub fn apply_jobs(&mut self, jobs: Vec<Job>) -> Result<(), EngineError> {
        let event_clock = self.ctx.config.clock == ClockMode::Event;
        for job in jobs {
            self.place = Place::work(job.step);
            if event_clock {
                self.fire_before(job.partition, job.now)?;
                self.place = Place::work(job.step);
            }
            let Job {
                event,
                event_id,
                ts,
                now,
                arrival,
                origin,
                keep_profile,
                ..
            } = job;
            let identity = (origin.as_deref(), keep_profile);
            self.apply_event(event, event_id.as_deref(), ts, now, arrival, identity)?;
        }
        Ok(())
    }

    /// The end of a dealt round ([`super::deal`]) that applied `applied` jobs here: the
    /// timers due by `until` fire — every one in event clock mode; in wall clock mode as
    /// many as a round beside events may fire, placed before the round's events as
    /// [`Worker::run`] fires them (a customer with events here had its due timers fired
    /// when its events were applied).
    pub fn end_round(&mut self, until: Option<i64>, applied: usize) -> Result<(), EngineError> {
        let Some(until) = until else {
            return Ok(());
        };
        self.place = Place::work(0);
        match self.ctx.config.clock {
            ClockMode::Event => self.fire_timers(until, usize::MAX),
            ClockMode::Wall => {
                let most = self.ctx.timers.max(applied).min(self.ctx.config.timers_per_round);
                self.fire_timers(until, most)
            }
        }
    }

    /// Encodes into the batch the records of its dirty customers that the commit has
    /// nothing left to decide for: every one with a number (new customers are numbered by
    /// the commit, in one thread's order) and its windows built. Run on the shard's thread
    /// at the end of a dealt round, so that work is not in the commit's serial part; the
    /// commit encodes the rest ([`Batch::encoded`]).
    pub fn encode_numbered(&mut self) {
        let (store, rules) = (self.ctx.store, &**self.ctx.rules);
        let Shard { cache, batch, .. } = &mut *self.shard;
        for customer in &batch.dirty {
            cache.update(customer, |state| {
                if state.number == crate::index::NO_NUMBER || state.windows.is_none() && state.history_loaded
                {
                    return;
                }
                store.put_customer(&mut batch.wb, customer, state, rules);
                batch.touched.push(state.number);
                // Its events are in this batch: the cache keeps only the windows.
                state.unload_history();
                batch.encoded.insert(customer.clone());
            });
        }
    }

    /// The place of a timer due at `due` fired now.
    pub(super) fn timer_place(&self, due: i64, customer: &Arc<str>) -> Place {
        let step = self.ctx.step_of(due, self.place.step);
        if self.place.phase == 1 && step == self.place.step {
            // Loading a customer for a merge fires what was due before it: before it too.
            // (Under the event clock, a timer due in the round falls on the step the clock
            // passed it, as it would have fired had the merge not loaded its customer.)
            return Place {
                phase: 0,
                ..Place::timer(step, due, customer)
            };
        }
        Place::timer(step, due, customer)
    }
}

/// The shard that owns `customer`: its partition's, partitions dealt round-robin.
pub(super) fn shard_of(customer: &str, partitions: u32, shards: usize) -> usize {
    if shards == 1 {
        return 0;
    }
    crate::partition::partition_of(customer.as_bytes(), partitions) as usize % shards
}

/// Runs `work` on every shard with something to do, in parallel when more than one has.
pub(super) fn in_parallel<T: Send>(
    shards: &mut [Shard],
    inputs: Vec<T>,
    work: impl Fn(&mut Shard, T) -> Result<(), EngineError> + Sync,
) -> Result<(), EngineError> {
    let mut tasks: Vec<(&mut Shard, T)> = shards.iter_mut().zip(inputs).collect();
    if tasks.len() == 1 {
        let (shard, input) = tasks.pop().expect("one task");
        return work(shard, input);
    }
    let work = &work;
    std::thread::scope(|scope| {
        let last = tasks.pop();
        let handles: Vec<_> = tasks
            .into_iter()
            .map(|(shard, input)| scope.spawn(move || work(shard, input)))
            .collect();
        let mut result = match last {
            Some((shard, input)) => work(shard, input),
            None => Ok(()),
        };
        for handle in handles {
            let r = handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}
