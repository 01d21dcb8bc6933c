//! The engine as a service: the synchronous [`Engine`] on a thread of its own, driven by
//! one loop, with a cloneable [`EngineHandle`] for every edge — HTTP, Kafka, the demo
//! generator — to send it work through one bounded queue.
//!
//! Ingest is **group-committed**: when the loop takes an ingest request it also takes every
//! other ingest request already waiting (up to [`ServiceConfig::max_group_events`]) and
//! applies them all in one atomic commit, one WAL write and fsync. Under light load a
//! request commits alone and at once; under heavy load batches grow with the load, so the
//! fsync and the per-commit work are shared and latency stays bounded by the time of about
//! two groups instead of growing with a fixed batch size. Events are parsed on the caller's
//! thread; the engine thread only applies them.
//!
//! Group commits are **pipelined** ([`Engine::submit_group_answering`]): while one group's
//! batch is written and fsynced on the writer thread, the loop takes the next group and
//! evaluates it; callers are answered by the writer thread as soon as their group is durable
//! and visible. A request that arrives during a write is taken at once rather than after it,
//! and with nothing waiting once the write has ended, the loop finishes the group (cache
//! eviction) and turns to timers and checkpoints.
//!
//! Between jobs the loop fires due timers (wall clock mode), continues a rule-change
//! backfill, and checkpoints the membership index, so these proceed while edges keep
//! sending work. The loop stops once every handle is dropped and the queue is drained.
//!
//! ```
//! use processor::{ClockMode, Engine, EngineConfig, EngineHandle, ServiceConfig};
//!
//! let dir = std::env::temp_dir().join(format!("tagstream-service-doc-{}", std::process::id()));
//! let config = EngineConfig { clock: ClockMode::Event, sync_writes: false, ..Default::default() };
//! let engine = Engine::open(&dir, Some("tag buyer on payment"), config).unwrap();
//! let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
//!
//! let line = br#"{"customer_id": "c1", "type": "payment", "ts": 1744000000000}"#.to_vec();
//! let outcome = handle.ingest_blocking(vec![line], Vec::new(), "doc").unwrap();
//! assert_eq!((outcome.accepted, outcome.changes.len()), (1, 1));
//!
//! drop(handle);
//! thread.join().unwrap();
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kafka::{Apply, ApplyError, KafkaBatch};
use crate::{
    telemetry, ClockMode, Engine, EngineError, IngestOutcome, IngestRequest, Intake, ReadHandle, Trimmed,
};

/// How the service loop paces its work.
#[derive(Debug, Clone, Copy)]
pub struct ServiceConfig {
    /// Jobs waiting before [`EngineHandle::call`] and [`EngineHandle::ingest`] answer
    /// [`ServiceError::Busy`] (blocking callers wait instead).
    pub queue: usize,
    /// How often timers are checked in wall clock mode (well under the one-second promise).
    pub tick: Duration,
    /// Customers re-evaluated per backfill step between jobs.
    pub backfill_step: usize,
    /// How often the membership index writes its checkpoint (a restart replays the change
    /// log since the last one).
    pub index_checkpoint: Duration,
    /// Most events one group commit takes from waiting requests (a request is never split:
    /// one larger than this commits alone).
    pub max_group_events: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            queue: 1024,
            tick: Duration::from_millis(100),
            backfill_step: 2_000,
            index_checkpoint: Duration::from_secs(10),
            max_group_events: 8_192,
        }
    }
}

/// Why the service did not run a job.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The queue is full: backpressure, retry shortly.
    #[error("the engine is busy; retry shortly")]
    Busy,
    /// The engine thread has stopped (shutdown) or dropped the job.
    #[error("the engine has stopped")]
    Stopped,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

type Reply<T> = Box<dyn FnOnce(T) + Send>;

struct IngestJob {
    request: IngestRequest,
    /// When the request arrived, for the event-to-change latency.
    received: Instant,
    reply: Reply<Result<IngestOutcome, EngineError>>,
}

enum Job {
    Ingest(IngestJob),
    Run(Box<dyn FnOnce(&mut Engine) + Send>),
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    reader: ReadHandle,
    intake: Intake,
    /// Jobs queued and not yet taken by the loop.
    waiting: Arc<AtomicUsize>,
    /// The `seq` of the last committed change, for change streams to wait on.
    committed: tokio::sync::watch::Receiver<u64>,
}

impl EngineHandle {
    /// Starts the engine thread. It stops once every handle is dropped and the queued jobs
    /// are done, flushing the store on the way out.
    pub fn spawn(engine: Engine, config: ServiceConfig) -> (EngineHandle, JoinHandle<()>) {
        let (jobs, queue) = sync_channel::<Job>(config.queue);
        let reader = engine.reader();
        let intake = engine.intake();
        let (committed_tx, committed) = tokio::sync::watch::channel(reader.last_seq());
        let waiting = Arc::new(AtomicUsize::new(0));
        let service = Service {
            engine,
            config,
            queue,
            waiting: waiting.clone(),
            held: None,
            committed: Arc::new(committed_tx),
        };
        let thread = std::thread::Builder::new()
            .name("tagstream-engine".into())
            .spawn(move || service.run())
            .expect("spawn the engine thread");
        let handle = EngineHandle {
            jobs,
            reader,
            intake,
            waiting,
            committed,
        };
        (handle, thread)
    }

    /// Lookups that run on the caller's thread, as of the last commit, without queueing
    /// behind ingest.
    pub fn reader(&self) -> &ReadHandle {
        &self.reader
    }

    /// Jobs queued and not yet taken by the engine thread (`tagstream_engine_queue_jobs`).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// False once the engine thread has stopped (its end of the `committed` channel is gone).
    pub fn running(&self) -> bool {
        self.committed.has_changed().is_ok()
    }

    /// Changes with the `seq` of the last committed change after each engine job.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Ingests raw events (parsed here, on the caller's thread) in the next group commit;
    /// answers once they are durable. A full queue answers [`ServiceError::Busy`].
    pub async fn ingest(&self, raw: Vec<Vec<u8>>) -> Result<IngestOutcome, ServiceError> {
        let received = Instant::now();
        let request = IngestRequest::parse_with(raw, &self.intake, "http");
        self.submit_ingest(request, received).await
    }

    /// Applies events already parsed (with this handle's [`EngineHandle::intake`]) in the
    /// next group commit, as [`EngineHandle::ingest`] does.
    pub async fn ingest_request(&self, request: IngestRequest) -> Result<IngestOutcome, ServiceError> {
        self.submit_ingest(request, Instant::now()).await
    }

    /// Queues `request` (a full queue answers [`ServiceError::Busy`]) and answers once it
    /// is durable.
    async fn submit_ingest(
        &self,
        request: IngestRequest,
        received: Instant,
    ) -> Result<IngestOutcome, ServiceError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.try_submit(Job::Ingest(IngestJob {
            request,
            received,
            reply: Box::new(move |r| drop(reply.send(r))),
        }))?;
        Ok(answer.await.map_err(|_| ServiceError::Stopped)??)
    }

    /// The limits, tracking plan, identity types and quality record events are parsed with.
    pub fn intake(&self) -> &Intake {
        &self.intake
    }

    /// Like [`EngineHandle::ingest`] for threads outside the async runtime (Kafka, the demo
    /// generator), with the source positions to commit with the events. Waits for room in
    /// the queue instead of answering busy: that is the backpressure such a source wants.
    /// `source` names where they came from in the quality record (`kafka`, `demo`).
    pub fn ingest_blocking(
        &self,
        raw: Vec<Vec<u8>>,
        positions: Vec<(String, u64)>,
        source: &'static str,
    ) -> Result<IngestOutcome, ServiceError> {
        let received = Instant::now();
        let request = IngestRequest::parse_with(raw, &self.intake, source).with_positions(positions);
        self.apply_blocking(request, received)
    }

    /// Applies events already parsed in the next group commit, waiting for room in the
    /// queue; answers once they are durable.
    fn apply_blocking(
        &self,
        request: IngestRequest,
        received: Instant,
    ) -> Result<IngestOutcome, ServiceError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.send(Job::Ingest(IngestJob {
            request,
            received,
            reply: Box::new(move |r| drop(reply.send(r))),
        }))?;
        Ok(answer.recv().map_err(|_| ServiceError::Stopped)??)
    }

    /// How the Kafka consumer applies its batches through this handle. In a group of
    /// several, the events read outside their customer's partition are forwarded there
    /// first ([`crate::kafka::route`]) and only the others are applied (the batch's offsets
    /// are committed whole: a forward is confirmed before).
    pub fn kafka_apply(&self) -> Apply {
        let handle = self.clone();
        Box::new(move |batch: Arc<KafkaBatch>| {
            if let Some(frame) = &batch.handover {
                return handle.take_handover(frame, &batch);
            }
            if let Some(request) = &batch.request {
                return handle.take_request(request, &batch);
            }
            let received = Instant::now();
            let intake = &handle.intake;
            let (mut parsed, sightings) = intake.parse_unrecorded(&batch.events);
            crate::kafka::route::mark_resolved(&batch, &mut parsed);
            let here = match &batch.router {
                Some(router) => Some(
                    router
                        .forward(
                            &batch.events,
                            &parsed,
                            crate::kafka::route::Where::Read(&batch.origins),
                            intake.identity.as_deref(),
                        )
                        .map_err(ApplyError::Failed)?,
                ),
                None => None,
            };
            let applied = |i: usize| here.as_ref().is_none_or(|here| here[i]);
            intake.record("kafka", &parsed, sightings, applied);
            crate::kafka::route::mark_forwarded(&batch, &mut parsed);
            let (mut raw, mut kept) = (Vec::with_capacity(parsed.len()), Vec::with_capacity(parsed.len()));
            for (i, event) in parsed.into_iter().enumerate() {
                if applied(i) {
                    raw.push(batch.events[i].clone());
                    kept.push(event);
                }
            }
            let request = IngestRequest {
                raw,
                parsed: kept,
                positions: batch.positions.clone(),
                source: "kafka",
                owned_only: false,
            };
            handle.apply_blocking(request, received).map_err(ApplyError::from)
        })
    }

    /// Applies a handover read from the events topic ([`KafkaBatch::handover`]): taken by
    /// its survivor here, or sent on to the partition the survivor went to since (then its
    /// position is committed once the broker confirmed that).
    fn take_handover(&self, frame: &[u8], batch: &KafkaBatch) -> Result<IngestOutcome, ApplyError> {
        let (bytes, positions) = (frame.to_vec(), batch.positions.clone());
        let handed = self
            .call_blocking(move |engine| engine.take_handover_at(&bytes, &positions))
            .map_err(ApplyError::from)?
            .map_err(|e| ApplyError::Failed(format!("taking a handover: {e}")))?;
        match handed {
            crate::Handed::Taken(merged) => {
                if !merged.changes.is_empty() {
                    metrics::counter!("tagstream_kafka_handovers_taken_total").increment(1);
                    tracing::info!(survivor = %merged.survivor, absorbed = ?merged.absorbed, "took a customer handed over");
                }
            }
            crate::Handed::Elsewhere(survivor, frame) => {
                let router = batch.router.as_ref().ok_or_else(|| {
                    ApplyError::Failed("a handover to send on, and no producer to send it with".into())
                })?;
                let absorbed = crate::engine::frame_absorbed(&frame).unwrap_or_default();
                router
                    .send_handover(&absorbed, &survivor, &frame)
                    .map_err(ApplyError::Failed)?;
                self.commit_positions(batch)?;
            }
            crate::Handed::SplitOff(unmerged) => {
                if !unmerged.changes.is_empty() {
                    metrics::counter!("tagstream_kafka_splits_taken_total").increment(1);
                    tracing::info!(customer = ?unmerged.split, from = %unmerged.customer, "a customer split off took its events back");
                }
            }
            crate::Handed::Malformed(outcome) => {
                metrics::counter!("tagstream_kafka_handovers_malformed_total").increment(1);
                return Ok(malformed(outcome, "handover"));
            }
        }
        Ok(IngestOutcome::default())
    }

    /// Commits `batch`'s positions alone: its record was sent on, or left out.
    fn commit_positions(&self, batch: &KafkaBatch) -> Result<(), ApplyError> {
        let positions = batch.positions.clone();
        self.call_blocking(move |engine| engine.ingest_parsed::<&[u8], String>(&[], Vec::new(), &positions))?
            .map(drop)
            .map_err(|e| ApplyError::Failed(e.to_string()))
    }

    /// Applies a request read from the events topic ([`KafkaBatch::request`]): a merge by
    /// hand for the group's identity resolver, or a customer it asks to hand over. One that
    /// cannot be read is left out (its position committed).
    fn take_request(&self, value: &[u8], batch: &KafkaBatch) -> Result<IngestOutcome, ApplyError> {
        let positions = batch.positions.clone();
        let request = match serde_json::from_slice::<crate::kafka::route::Request>(value) {
            Ok(request) => request,
            Err(e) => {
                metrics::counter!("tagstream_kafka_requests_malformed_total").increment(1);
                let rejection = crate::Rejection::ControlRecordMalformed {
                    kind: "request",
                    error: e.to_string(),
                };
                let raw = value.to_vec();
                let outcome = self
                    .call_blocking(move |engine| engine.dead_letter_at(&raw, rejection, &positions))?
                    .map_err(|e| ApplyError::Failed(e.to_string()))?;
                return Ok(malformed(outcome, "request"));
            }
        };
        let done = self
            .call_blocking(move |engine| match request {
                crate::kafka::route::Request::Merge {
                    survivor,
                    absorbed,
                    cause,
                } => engine
                    .merge_requested(&survivor, &absorbed, &cause, &positions)
                    .map(|merged| merged.is_some()),
                crate::kafka::route::Request::HandOver {
                    absorbed,
                    survivor,
                    cause,
                } => engine
                    .hand_over_requested(&absorbed, &survivor, &cause, &positions)
                    .map(|handed| handed.is_some()),
                crate::kafka::route::Request::Merging { survivor, absorbed } => {
                    engine.merge_noticed(&survivor, &absorbed, &positions)
                }
                crate::kafka::route::Request::Unmerge {
                    survivor,
                    split,
                    cause,
                    id,
                } => engine
                    .unmerge_requested(&survivor, &split, &cause, &id, &positions)
                    .map(|unmerged| unmerged.is_some()),
                crate::kafka::route::Request::Split {
                    customer,
                    at,
                    members,
                    cause,
                    id,
                } => {
                    let partitions = engine.config().partitions;
                    let request = crate::kafka::route::Request::split_request(
                        &customer, &at, &members, &cause, &id, partitions,
                    );
                    engine.split_requested(&request, &positions)
                }
            })
            .map_err(ApplyError::from)?
            .map_err(|e| ApplyError::Failed(format!("applying a request: {e}")))?;
        if done {
            metrics::counter!("tagstream_kafka_requests_applied_total").increment(1);
        }
        Ok(IngestOutcome::default())
    }

    /// The engine's side of a consumer group of several ([`crate::kafka::PartitionHost`]).
    pub fn partition_host(&self) -> std::sync::Arc<dyn crate::kafka::PartitionHost> {
        std::sync::Arc::new(self.clone())
    }

    /// Runs `f` on the engine thread and returns its result. A full queue answers
    /// [`ServiceError::Busy`].
    pub async fn call<R, F>(&self, f: F) -> Result<R, ServiceError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Engine) -> R + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.try_submit(Job::Run(Box::new(move |engine| {
            let _ = reply.send(f(engine));
        })))?;
        answer.await.map_err(|_| ServiceError::Stopped)
    }

    /// Like [`EngineHandle::call`] for threads outside the async runtime: waits for room
    /// in the queue, then for the answer.
    pub fn call_blocking<R, F>(&self, f: F) -> Result<R, ServiceError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Engine) -> R + Send + 'static,
    {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let job = Job::Run(Box::new(move |engine| {
            let _ = reply.send(f(engine));
        }));
        self.send(job)?;
        answer.recv().map_err(|_| ServiceError::Stopped)
    }

    /// Queues a job; a full queue is backpressure (busy), never a wait.
    fn try_submit(&self, job: Job) -> Result<(), ServiceError> {
        // Counted before it is queued, so the loop never takes a job it has not counted.
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.jobs.try_send(job).map_err(|e| {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) => ServiceError::Busy,
                TrySendError::Disconnected(_) => ServiceError::Stopped,
            }
        })
    }

    /// Queues a job, waiting for room.
    fn send(&self, job: Job) -> Result<(), ServiceError> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.jobs.send(job).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            ServiceError::Stopped
        })
    }
}

/// How often the loop looks whether a group's write has ended while it waits for jobs.
const WRITE_POLL: Duration = Duration::from_micros(500);

/// The loop on the engine thread.
struct Service {
    engine: Engine,
    config: ServiceConfig,
    queue: Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    /// A job taken from the queue while gathering a group, run next.
    held: Option<Job>,
    /// The `seq` of the last durable change, sent where a group's callers are answered and
    /// after each job.
    committed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Tells change streams about `seq` unless they know of a later one (groups are answered
/// on the writer thread, other jobs' commits here).
/// A record of the events topic marked as a handover or a request that was not one, kept as
/// a dead letter (`outcome`): counted with the rejected events, by its code, and logged.
fn malformed(outcome: IngestOutcome, kind: &str) -> IngestOutcome {
    for e in &outcome.errors {
        metrics::counter!("tagstream_events_rejected_total", "reason" => e.code).increment(1);
        tracing::error!(reason = %e.reason, "a record marked as a {kind} is not one; kept as a dead letter");
    }
    outcome
}

fn announce(committed: &tokio::sync::watch::Sender<u64>, seq: u64) {
    committed.send_if_modified(|known| {
        let later = seq > *known;
        if later {
            *known = seq;
        }
        later
    });
}

impl Service {
    fn run(mut self) {
        let wall = self.engine.config().clock == ClockMode::Wall;
        let mut last_tick = Instant::now();
        let mut last_checkpoint = Instant::now();
        // The retention step running beside the engine, if any.
        let mut trimming: Option<JoinHandle<Result<Trimmed, EngineError>>> = None;
        // Timers are still due after a tick that fired its most (a backlog worked off round
        // by round): the next tick comes right away. Not after a failed tick: that waits.
        let mut behind = false;
        loop {
            let job = match self.held.take() {
                Some(job) => Some(job),
                // A group is being written (its callers are answered where the write ends):
                // take the next job as soon as one comes, so its evaluation overlaps the
                // write; once the write has ended with nothing waiting, finish the group.
                None if self.engine.in_flight() => match self.queue.try_recv() {
                    Ok(job) => Some(self.taken(job)),
                    Err(TryRecvError::Empty) if self.engine.in_flight_ended() => {
                        self.engine.settle();
                        None
                    }
                    Err(TryRecvError::Empty) => match self.queue.recv_timeout(WRITE_POLL) {
                        Ok(job) => Some(self.taken(job)),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    },
                    Err(TryRecvError::Disconnected) => break,
                },
                None if behind => match self.queue.try_recv() {
                    Ok(job) => Some(self.taken(job)),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                },
                None => match self.queue.recv_timeout(self.config.tick) {
                    Ok(job) => Some(self.taken(job)),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            if self.engine.writer_stopped() {
                // Every later group would be refused: stop, so that `/readyz` says so and
                // `tagstream serve` exits for its supervisor to start it again (the store
                // has every acknowledged event). The job taken, and those still queued, are
                // dropped: their callers hear that the engine stopped.
                tracing::error!("the engine's writer thread has stopped; the engine stops");
                break;
            }
            match job {
                Some(Job::Run(f)) => {
                    // It sees (and may change) everything committed before it.
                    self.engine.settle();
                    f(&mut self.engine)
                }
                Some(Job::Ingest(first)) => self.ingest_group(first),
                None => {}
            }
            self.record_fired_timers();
            // Under load, each group fires the timers due before it; ticks are for the rest.
            if wall && !self.engine.in_flight() && (last_tick.elapsed() >= self.config.tick || behind) {
                last_tick = Instant::now();
                // Events waiting: a backlog of timers takes its turn between their groups.
                let fired = if self.waiting.load(Ordering::Acquire) > 0 {
                    self.engine.tick_beside_events()
                } else {
                    self.engine.tick()
                };
                behind = match fired {
                    Ok(_) => self.engine.timers_behind(),
                    Err(e) => {
                        tracing::error!(error = %e, "firing timers failed; will retry");
                        false
                    }
                };
                telemetry::record_timers(&self.engine.take_fired_timers(), self.engine.wall_clock_ms());
            }
            if self.engine.backfill_pending() {
                if let Err(e) = self.engine.backfill_step(self.config.backfill_step) {
                    tracing::error!(error = %e, "rule-change backfill step failed; will retry");
                }
            }
            if last_checkpoint.elapsed() >= self.config.index_checkpoint {
                last_checkpoint = Instant::now();
                self.engine.settle();
                match self.engine.checkpoint_index() {
                    // Retention may delete what the checkpoint now covers: a step at a time,
                    // beside the engine (a step reads tens of thousands of entries, which
                    // would hold up the groups behind it), the next once this one is over.
                    Ok(done) if trimming.as_ref().is_none_or(JoinHandle::is_finished) => {
                        if let Some(step) = trimming.take() {
                            finish_trim(step);
                        }
                        let plan = self.engine.trim_plan(done.seq);
                        trimming = std::thread::Builder::new()
                            .name("tagstream-retention".into())
                            .spawn(move || plan.run())
                            .inspect_err(|e| tracing::error!(error = %e, "starting a retention step failed; will retry"))
                            .ok();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "membership index checkpoint failed; will retry"),
                }
            }
            metrics::gauge!("tagstream_engine_queue_jobs").set(self.waiting.load(Ordering::Acquire) as f64);
            // Set here, not at spawn: the recorder may be installed after the engine starts.
            metrics::gauge!("tagstream_engine_queue_capacity").set(self.config.queue as f64);
            announce(&self.committed, self.engine.durable_seq());
            telemetry::engine_gauges(&self.engine);
        }
        self.engine.settle();
        self.record_fired_timers();
        announce(&self.committed, self.engine.durable_seq());
        if let Some(step) = trimming {
            finish_trim(step);
        }
        if let Err(e) = self.engine.store().flush() {
            tracing::error!(error = %e, "flush at shutdown failed (the WAL still has everything)");
        }
    }

    /// Records the timers fired by jobs other than ingest groups (the service submits groups
    /// with an answer: their callers, and their timers, are answered and recorded where each
    /// group becomes visible).
    fn record_fired_timers(&mut self) {
        let fired = self.engine.take_fired_timers();
        if fired.count > 0 {
            telemetry::record_timers(&fired, self.engine.wall_clock_ms());
        }
    }

    fn taken(&self, job: Job) -> Job {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        job
    }

    /// Takes `first` and every ingest request already waiting behind it, up to the group
    /// limit, and commits them together. A job of another kind ends the group (it runs
    /// next, so jobs keep their order).
    fn ingest_group(&mut self, first: IngestJob) {
        let mut events = first.request.len();
        let mut group = vec![first];
        while events < self.config.max_group_events {
            match self.queue.try_recv().map(|job| self.taken(job)) {
                Ok(Job::Ingest(job)) => {
                    events += job.request.len();
                    group.push(job);
                }
                Ok(other) => {
                    self.held = Some(other);
                    break;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let started = Instant::now();
        let mut replies = Vec::with_capacity(group.len());
        let requests = group
            .into_iter()
            .map(|job| {
                replies.push((job.received, job.reply));
                job.request
            })
            .collect();
        metrics::histogram!("tagstream_group_commit_requests").record(replies.len() as f64);
        metrics::histogram!("tagstream_group_commit_events").record(events as f64);
        let committed = self.committed.clone();
        self.engine.submit_group_answering(
            requests,
            Box::new(move |result| answer_group(result, replies, started, &committed)),
        );
    }
}

/// Waits for a retention step and says if it failed (the next checkpoint tries again).
fn finish_trim(step: JoinHandle<Result<Trimmed, EngineError>>) {
    match step.join() {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "deleting log entries past retention failed; will retry"),
        Err(_) => tracing::error!("a retention step panicked; will retry"),
    }
}

/// Answers a group's callers; on the writer thread as soon as the group is durable and
/// visible (or at once if it failed).
fn answer_group(
    result: Result<Vec<IngestOutcome>, EngineError>,
    replies: Vec<(Instant, Reply<Result<IngestOutcome, EngineError>>)>,
    started: Instant,
    committed: &tokio::sync::watch::Sender<u64>,
) {
    let applied_in = started.elapsed();
    match result {
        Ok(outcomes) => {
            let last = outcomes
                .iter()
                .flat_map(|o| o.changes.last())
                .map(|c| c.seq)
                .max();
            if let Some(seq) = last {
                announce(committed, seq);
            }
            for ((received, reply), outcome) in replies.into_iter().zip(outcomes) {
                telemetry::record_ingest(&outcome, applied_in, received);
                reply(Ok(outcome));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, requests = replies.len(), "a group commit failed; nothing of it was applied");
            // Said once: the pipeline's errors already say the commit failed.
            let message = match e {
                EngineError::CommitFailed(reason) => reason,
                other => other.to_string(),
            };
            for (_, reply) in replies {
                reply(Err(EngineError::CommitFailed(message.clone())));
            }
        }
    }
}

/// Each runs on the engine thread, between batches.
impl crate::kafka::PartitionHost for EngineHandle {
    fn release(&self, partition: u32) -> Result<bool, String> {
        self.call_blocking(move |engine| {
            if engine.unconfirmed_deltas(partition)? > 0 {
                return Ok(false);
            }
            engine.release_partition(partition).map(|_| true)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e: EngineError| e.to_string())
    }

    fn discard(&self, partition: u32) -> Result<(), String> {
        self.call_blocking(move |engine| engine.discard_partition(partition).map(drop))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    fn park(&self, partitions: Vec<u32>) -> Result<(), String> {
        self.call_blocking(move |engine| engine.park_partitions(partitions))
            .map_err(|e| e.to_string())
    }

    fn activate(&self, partition: u32) -> Result<(), String> {
        self.call_blocking(move |engine| engine.activate_partition(partition))
            .map_err(|e| e.to_string())
    }

    fn restore(&self, restore: crate::changelog::Restore) -> Result<(), String> {
        self.call_blocking(move |engine| engine.restore_partition(&restore).map(drop))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    fn run(&self, work: crate::kafka::EngineWork) -> Result<(), String> {
        self.call_blocking(work).map_err(|e| e.to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EngineConfig;

    /// An engine in event clock mode without fsync, with one tag on `view`.
    fn viewing_engine(dir: &::tests::TempDir) -> Engine {
        let config = EngineConfig {
            clock: ClockMode::Event,
            sync_writes: false,
            ..Default::default()
        };
        Engine::open(dir.path(), Some("tag seen on view"), config).unwrap()
    }

    /// A `view` by customer `id`.
    fn view(id: &str) -> Vec<u8> {
        format!(r#"{{"customer_id":"{id}","type":"view","ts":1744000000000}}"#).into_bytes()
    }

    /// A caller whose group could not be written is told so once, with RocksDB's reason.
    #[test]
    fn a_failed_commit_is_reported_to_its_caller_once() {
        let dir = ::tests::TempDir::new("service-fail");
        let engine = Engine::open(dir.path(), Some("tag seen on view"), EngineConfig::default()).unwrap();
        engine.store().fail_writes.store(1, Ordering::Release);
        let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
        let event = br#"{"customer_id":"c1","type":"view","ts":1744000000000}"#.to_vec();
        let error = handle
            .ingest_blocking(vec![event], Vec::new(), "test")
            .unwrap_err()
            .to_string();
        assert_eq!(error.matches("nothing was applied").count(), 1, "{error}");
        drop(handle);
        thread.join().unwrap();
    }

    /// A request that arrives while the group before it is being written is taken (and
    /// evaluated) during that write, not after it; both are answered once durable.
    #[test]
    fn a_request_arriving_during_a_write_is_taken_at_once() {
        let dir = ::tests::TempDir::new("service-overlap");
        let engine = viewing_engine(&dir);
        let store = engine.store().clone();
        store.hold_writes.store(true, Ordering::Release);
        let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
        let send = |id: &str| {
            let handle = handle.clone();
            let event = view(id);
            std::thread::spawn(move || handle.ingest_blocking(vec![event], Vec::new(), "test"))
        };
        let taken = |handle: &EngineHandle| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while handle.waiting() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            handle.waiting() == 0
        };
        let first = send("c1");
        // Taken alone (not in one group with the second), its write held.
        std::thread::sleep(Duration::from_millis(100));
        assert!(taken(&handle));
        // The first group's write is held; the second request still gets taken.
        let second = send("c2");
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            taken(&handle),
            "the second request waited for the first one's write"
        );
        store.hold_writes.store(false, Ordering::Release);
        for answered in [first, second] {
            let outcome = answered.join().unwrap().unwrap();
            assert_eq!((outcome.accepted, outcome.changes.len()), (1, 1));
        }
        drop(handle);
        thread.join().unwrap();
    }

    /// A retention step runs beside the engine: a request is answered while one is under
    /// way (it reads tens of thousands of entries when the logs are busy).
    #[test]
    fn a_retention_step_does_not_hold_up_ingest() {
        let dir = ::tests::TempDir::new("service-trim");
        let engine = viewing_engine(&dir);
        let store = engine.store().clone();
        store.hold_trims.store(true, Ordering::Release);
        let service = ServiceConfig {
            index_checkpoint: Duration::from_millis(1),
            ..Default::default()
        };
        let (handle, thread) = EngineHandle::spawn(engine, service);
        let send = |id: &str| {
            let (handle, event) = (handle.clone(), view(id));
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || tx.send(handle.ingest_blocking(vec![event], Vec::new(), "test")));
            rx
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.trims.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            store.trims.load(Ordering::Acquire) > 0,
            "no retention step started"
        );
        for id in ["c1", "c2"] {
            let outcome = send(id)
                .recv_timeout(Duration::from_secs(10))
                .expect("answered while a retention step is under way")
                .unwrap();
            assert_eq!(outcome.accepted, 1);
        }
        assert_eq!(store.trims.load(Ordering::Acquire), 1, "one step at a time");
        store.hold_trims.store(false, Ordering::Release);
        drop(handle);
        thread.join().unwrap();
    }

    /// When the writer thread stops (a panic on it), the engine stops: the group being
    /// written and every later request are refused, and the handle says it is not running
    /// (`/readyz`, and `tagstream serve` exits for its supervisor to restart it).
    #[test]
    fn the_engine_stops_when_its_writer_does() {
        let dir = ::tests::TempDir::new("service-writer-panic");
        let engine = viewing_engine(&dir);
        let store = engine.store().clone();
        let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
        let outcome = handle
            .ingest_blocking(vec![view("c1")], Vec::new(), "test")
            .unwrap();
        assert_eq!(outcome.accepted, 1);
        assert!(handle.running());
        store.panic_writes.store(true, Ordering::Release);
        let refused = handle.ingest_blocking(vec![view("c2")], Vec::new(), "test");
        assert!(refused.is_err(), "{refused:?}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while handle.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!handle.running(), "the engine kept running without a writer");
        let later = handle.ingest_blocking(vec![view("c3")], Vec::new(), "test");
        assert!(matches!(later, Err(ServiceError::Stopped)), "{later:?}");
        drop(handle);
        thread.join().unwrap();
    }
}
