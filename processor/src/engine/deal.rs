//! Dealing: the shards apply a round's events while the engine thread is still deciding
//! what is global about the later ones — for rounds whose events carry identifiers, where
//! resolution and merges make the engine thread's part long (without them it is short, and
//! a round collects its jobs first: [`Engine::collected_round`]).
//!
//! The engine thread's part of a round (validation against the clock, dedup, identity
//! resolution and merges, arrival numbers, dead letters) is serial; the shards' part
//! (loading, judging, timers) is parallel. Instead of running one after the other, a round
//! started with [`Engine::dealt_round`] gives each shard a thread of its own for the round
//! and a queue: accepted events reach it in small chunks as they are decided, with the steps
//! at which the clock moved, and it applies them in order while the engine thread goes on.
//!
//! Work that needs a customer as the events before it left it (a merge: the absorbed
//! customer leaves, the survivor takes over) is queued behind those events on the owning
//! shard; the survivor's shard waits there for the absorbed customers' handovers, and the
//! engine thread waits for nothing. So a merge no longer stops the round, and the engine
//! thread's serial work overlaps the shards' instead of adding to it. (No deadlock: a
//! shard waits only for the leaving halves of the merge it is at, queued on their shards
//! before anything queued after that merge.)
//!
//! A leaving half whose customer has nothing else queued in the round (the usual case: a
//! customer a merge absorbs rarely had an event in the same round) does not wait for the
//! events dealt to its shard before it either: the shard takes it out of turn, at its next
//! look at its queue, so the survivor's shard waits for it only briefly. Nothing it does
//! depends on other customers' work: the customer's own timers due by the merge fire as it
//! is loaded, placed where one thread would have fired them (by the clock's steps up to the
//! merge, which the leave carries).
//!
//! The order of the change log does not depend on any of this: every change carries its
//! [`Place`] in the order one thread would have made it, and the commit sorts by it.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};

use super::*;

/// Jobs a shard is sent at once: small enough that a shard starts while the engine thread
/// is still dealing, large enough that the queue is not the cost.
const CHUNK: usize = 32;

/// Work run on a shard's thread, in its queue's order; an error fails the round.
pub(super) type ShardWork<'s> =
    Box<dyn for<'w> FnOnce(&mut Worker<'w>) -> Result<(), EngineError> + Send + 's>;

/// What a shard's thread is sent; each message carries the steps at which the clock moved
/// since the last one it was sent (what timers fired now are placed by).
pub(super) enum Msg<'s> {
    Jobs(Vec<(u64, i64)>, Vec<Job>),
    Run(Vec<(u64, i64)>, ShardWork<'s>),
    /// Work for a customer with nothing else queued in the round: it may run before the
    /// jobs sent ahead of it.
    Early(Vec<(u64, i64)>, ShardWork<'s>),
    /// The round's last message: the timers due by `until` (if any) fire.
    End(Vec<(u64, i64)>, Option<i64>),
}

/// The engine thread's end of the shards' queues during a dealt round.
pub(super) struct Dealer<'s> {
    queues: Vec<Sender<Msg<'s>>>,
    waiting: Vec<Vec<Job>>,
    /// How many of the round's steps each shard has been sent.
    sent_steps: Vec<usize>,
    /// The customers with work queued in the round.
    busy: foldhash::HashSet<Arc<str>>,
}

const STOPPED: &str = "an engine worker stopped in the middle of a round";

/// A shard's thread stopped (its own error is the round's answer).
pub(super) fn stopped() -> EngineError {
    EngineError::Conflict(STOPPED.into())
}

fn is_stopped(e: &EngineError) -> bool {
    matches!(e, EngineError::Conflict(m) if m == STOPPED)
}

impl<'s> Dealer<'s> {
    fn new(queues: Vec<Sender<Msg<'s>>>) -> Dealer<'s> {
        let shards = queues.len();
        Dealer {
            queues,
            waiting: (0..shards).map(|_| Vec::new()).collect(),
            sent_steps: vec![0; shards],
            busy: foldhash::HashSet::default(),
        }
    }

    /// Queues `job` for `shard`; a full chunk is sent.
    pub(super) fn deal(&mut self, shard: usize, job: Job, steps: &[(u64, i64)]) -> Result<(), EngineError> {
        if !self.busy.contains(&job.event.customer_id) {
            self.busy.insert(job.event.customer_id.clone());
        }
        self.waiting[shard].push(job);
        if self.waiting[shard].len() >= CHUNK {
            self.send_jobs(shard, steps)?;
        }
        Ok(())
    }

    fn new_steps(&mut self, shard: usize, steps: &[(u64, i64)]) -> Vec<(u64, i64)> {
        let from = std::mem::replace(&mut self.sent_steps[shard], steps.len());
        steps[from..].to_vec()
    }

    fn send_jobs(&mut self, shard: usize, steps: &[(u64, i64)]) -> Result<(), EngineError> {
        let jobs = std::mem::take(&mut self.waiting[shard]);
        let steps = self.new_steps(shard, steps);
        self.queues[shard]
            .send(Msg::Jobs(steps, jobs))
            .map_err(|_| stopped())
    }

    /// Sends every shard what waits for it.
    fn send_all(&mut self, steps: &[(u64, i64)]) -> Result<(), EngineError> {
        for shard in 0..self.queues.len() {
            if !self.waiting[shard].is_empty() {
                self.send_jobs(shard, steps)?;
            }
        }
        Ok(())
    }

    /// Queues `work` for `customer` on its `shard` after every job dealt to it so far; with
    /// `early`, out of turn if nothing else is queued for the customer in the round.
    pub(super) fn queue(
        &mut self,
        shard: usize,
        customer: &str,
        early: bool,
        steps: &[(u64, i64)],
        work: ShardWork<'s>,
    ) -> Result<(), EngineError> {
        if !self.waiting[shard].is_empty() {
            self.send_jobs(shard, steps)?;
        }
        let steps = self.new_steps(shard, steps);
        let idle = !self.busy.contains(customer);
        if idle {
            self.busy.insert(Arc::from(customer));
        }
        let msg = match early && idle {
            true => Msg::Early(steps, work),
            false => Msg::Run(steps, work),
        };
        self.queues[shard].send(msg).map_err(|_| stopped())
    }

    /// Sends the rest and the end of the round.
    fn end(mut self, steps: &[(u64, i64)], until: Option<i64>) -> Result<(), EngineError> {
        self.send_all(steps)?;
        for shard in 0..self.queues.len() {
            let steps = self.new_steps(shard, steps);
            self.queues[shard]
                .send(Msg::End(steps, until))
                .map_err(|_| stopped())?;
        }
        Ok(())
    }
}

/// What every shard's thread reads during a dealt round: [`Ctx`]'s fields, owned.
struct Held {
    store: Arc<Store>,
    rules: Arc<CompiledRules>,
    config: EngineConfig,
    generation: u64,
    order_pos: Vec<usize>,
    batches: u64,
    pending: Option<Arc<pipeline::WriteSignal>>,
    pending_dirty: Option<Arc<Vec<foldhash::HashSet<Arc<str>>>>>,
    pending_written: Option<Arc<Vec<Written>>>,
}

impl Held {
    fn ctx<'a>(&'a self, steps: &'a [(u64, i64)]) -> Ctx<'a> {
        Ctx {
            store: &self.store,
            rules: &self.rules,
            config: &self.config,
            generation: self.generation,
            order_pos: &self.order_pos,
            batches: self.batches,
            steps,
            pending: self.pending.as_deref(),
            pending_dirty: self.pending_dirty.as_deref().map(|d| &d[..]),
            pending_written: self.pending_written.as_deref().map(|w| &w[..]),
            timers: self.config.timers_beside_events,
        }
    }
}

/// A shard's thread: applies what it is sent, in order (but [`Msg::Early`] work as soon
/// as it sees it), until the round ends or something fails (then its queue closes and the
/// engine thread learns it at its next send).
fn serve(held: &Held, shard: &mut Shard, queue: Receiver<Msg<'_>>) -> Result<(), EngineError> {
    // Every step received so far, in the order sent; each message waiting here is run with
    // the steps sent up to it, as it would have been had it run when it came.
    let mut steps: Vec<(u64, i64)> = Vec::new();
    let mut waiting: VecDeque<(usize, Msg<'_>)> = VecDeque::new();
    let mut applied = 0;
    loop {
        // What has come meanwhile (with nothing to do, what comes next); out-of-turn work
        // runs now.
        let mut next = match waiting.is_empty() {
            true => match queue.recv() {
                Ok(msg) => Some(msg),
                // The engine thread is gone without ending the round: it failed.
                Err(_) => return Ok(()),
            },
            false => queue.try_recv().ok(),
        };
        while let Some(msg) = next {
            let more = match &msg {
                Msg::Jobs(more, _) | Msg::Run(more, _) | Msg::Early(more, _) | Msg::End(more, _) => more,
            };
            steps.extend_from_slice(more);
            match msg {
                Msg::Early(_, work) => {
                    let ctx = held.ctx(&steps);
                    work(&mut Worker::new(&ctx, shard, Place::work(0)))?;
                }
                msg => waiting.push_back((steps.len(), msg)),
            }
            next = queue.try_recv().ok();
        }
        let Some((upto, msg)) = waiting.pop_front() else {
            continue;
        };
        let ctx = held.ctx(&steps[..upto]);
        match msg {
            Msg::Jobs(_, jobs) => {
                applied += jobs.len();
                Worker::new(&ctx, shard, Place::work(0)).apply_jobs(jobs)?;
            }
            Msg::Run(_, work) => work(&mut Worker::new(&ctx, shard, Place::work(0)))?,
            Msg::End(_, until) => {
                let mut worker = Worker::new(&ctx, shard, Place::work(0));
                worker.end_round(until, applied)?;
                worker.encode_numbered();
                return Ok(());
            }
            Msg::Early(..) => unreachable!("run as it comes"),
        }
    }
}

impl Engine {
    /// Runs `deal` on this thread with a [`Round`] whose jobs the shards apply on threads
    /// of their own as they are dealt (see the module's comment); once `deal` returns, the
    /// shards finish the round (the timers due by its end) and the round's result is
    /// `deal`'s, or the first error of a shard. The shards keep what their batches write
    /// (`Batch::written`): the events' ids for a merge later in the round, the events for
    /// the next round's merges.
    pub(super) fn dealt_round<R>(
        &mut self,
        deal: impl FnOnce(&mut Engine, &mut Round<'_>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        let held = Held {
            store: self.store.clone(),
            rules: self.rules.clone(),
            config: self.config.clone(),
            generation: self.generation,
            order_pos: self.order_pos.clone(),
            batches: self.batches,
            pending: self.pending.as_ref().map(|p| p.signal.clone()),
            pending_dirty: self.pending.as_ref().map(|p| p.done.dirty.clone()),
            pending_written: self.pending.as_ref().and_then(|p| p.done.written.clone()),
        };
        let mut shards = std::mem::take(&mut self.shards);
        for (i, shard) in shards.iter_mut().enumerate() {
            // Room for as much as the shard's last batch kept.
            let last = held.pending_written.as_deref().and_then(|w| w.get(i));
            shard
                .batch
                .written
                .get_or_insert_with(|| last.map(Written::sized_like).unwrap_or_default());
        }
        let result = std::thread::scope(|scope| {
            let mut queues = Vec::with_capacity(shards.len());
            let mut threads = Vec::with_capacity(shards.len());
            for shard in shards.iter_mut() {
                let (queue, received) = channel();
                let held = &held;
                threads.push(scope.spawn(move || serve(held, shard, received)));
                queues.push(queue);
            }
            let mut round = Round::dealt(Dealer::new(queues));
            let dealt = deal(self, &mut round).and_then(|r| round.end(self.round_until()).map(|()| r));
            drop(round);
            let mut errors: Vec<EngineError> = Vec::new();
            for thread in threads {
                let r = thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                errors.extend(r.err());
            }
            match dealt {
                Ok(r) if errors.is_empty() => return Ok(r),
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
            // The first error that is not "a worker stopped" is the cause.
            let cause = errors.iter().position(|e| !is_stopped(e)).unwrap_or(0);
            Err(errors.swap_remove(cause))
        });
        self.shards = shards;
        result
    }
}

impl Round<'_> {
    fn end(&mut self, until: Option<i64>) -> Result<(), EngineError> {
        match self.dealer.take() {
            Some(dealer) => dealer.end(&self.steps, until),
            None => Ok(()),
        }
    }
}
