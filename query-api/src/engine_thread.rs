//! The engine runs on one thread of its own; handlers send it jobs through a bounded queue
//! and await the answer. A full queue is backpressure: the caller gets 503 and retries.
//! Between jobs the thread fires due timers (wall clock mode) and continues a rule-change
//! backfill, so both proceed while the API keeps serving.

use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use processor::{ClockMode, Engine, ReadHandle};

use crate::error::ApiError;
use crate::metrics as m;

type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    reader: ReadHandle,
    /// The `seq` of the last committed change, for change streams to wait on.
    committed: tokio::sync::watch::Receiver<u64>,
}

/// How the engine thread paces its background work.
#[derive(Debug, Clone, Copy)]
pub struct EngineThreadConfig {
    /// Jobs waiting before callers get 503.
    pub queue: usize,
    /// How often timers are checked in wall clock mode (well under the one-second promise).
    pub tick: Duration,
    /// Customers re-evaluated per backfill step between jobs.
    pub backfill_step: usize,
    /// How often the membership index writes its checkpoint (a restart replays the change
    /// log since the last one).
    pub index_checkpoint: Duration,
}

impl Default for EngineThreadConfig {
    fn default() -> Self {
        EngineThreadConfig {
            queue: 1024,
            tick: Duration::from_millis(100),
            backfill_step: 2_000,
            index_checkpoint: Duration::from_secs(10),
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread. It stops once every handle is dropped and the queued jobs
    /// are done.
    pub fn spawn(mut engine: Engine, config: EngineThreadConfig) -> (EngineHandle, JoinHandle<()>) {
        let (jobs, queue) = sync_channel::<Job>(config.queue);
        let reader = engine.reader();
        let (committed_tx, committed) = tokio::sync::watch::channel(reader.last_seq());
        let seq_reader = reader.clone();
        let thread = std::thread::Builder::new()
            .name("tagstream-engine".into())
            .spawn(move || {
                let wall = engine.config().clock == ClockMode::Wall;
                let mut last_tick = Instant::now();
                let mut last_checkpoint = Instant::now();
                loop {
                    match queue.recv_timeout(config.tick) {
                        Ok(job) => job(&mut engine),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    if wall && last_tick.elapsed() >= config.tick {
                        last_tick = Instant::now();
                        if let Err(e) = engine.tick() {
                            tracing::error!(error = %e, "firing timers failed; will retry");
                        }
                        m::record_timers(&engine.take_fired_timers(), engine.wall_clock_ms());
                    }
                    if engine.backfill_pending() {
                        if let Err(e) = engine.backfill_step(config.backfill_step) {
                            tracing::error!(error = %e, "rule-change backfill step failed; will retry");
                        }
                    }
                    if last_checkpoint.elapsed() >= config.index_checkpoint {
                        last_checkpoint = Instant::now();
                        if let Err(e) = engine.checkpoint_index() {
                            tracing::error!(error = %e, "membership index checkpoint failed; will retry");
                        }
                    }
                    committed_tx.send_if_modified(|seq| {
                        let last = seq_reader.last_seq();
                        std::mem::replace(seq, last) != last
                    });
                    m::engine_gauges(&engine);
                }
                if let Err(e) = engine.store().flush() {
                    tracing::error!(error = %e, "flush at shutdown failed (the WAL still has everything)");
                }
            })
            .expect("spawn the engine thread");
        (
            EngineHandle {
                jobs,
                reader,
                committed,
            },
            thread,
        )
    }

    /// Lookups that run on the caller's thread, as of the last commit, without queueing
    /// behind ingest batches.
    pub fn reader(&self) -> &ReadHandle {
        &self.reader
    }

    /// Changes with the `seq` of the last committed change after each engine job.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Like [`EngineHandle::call`] for threads outside the async runtime (the Kafka
    /// consumer): blocks until the engine has run `f`.
    pub fn call_blocking<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Engine) -> R + Send + 'static,
    {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.submit(Box::new(move |engine| {
            let _ = reply.send(f(engine));
        }))?;
        answer.recv().map_err(|_| dropped())
    }

    /// Runs `f` on the engine thread and returns its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Engine) -> R + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |engine| {
            let _ = reply.send(f(engine));
        }))?;
        answer.await.map_err(|_| dropped())
    }

    /// Queues a job; a full queue is backpressure (503), never a wait.
    fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => ApiError::Busy,
            TrySendError::Disconnected(_) => ApiError::Internal("the engine has stopped".into()),
        })
    }
}

fn dropped() -> ApiError {
    ApiError::Internal("the engine dropped the request".into())
}
