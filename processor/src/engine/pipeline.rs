//! Pipelined group commit: a group's batch is written (WAL, fsync, memtables) on a writer
//! thread while the engine evaluates the next group, so the disk's time and the CPU's
//! overlap instead of adding up.
//!
//! [`Engine::submit_group`] evaluates a group and prepares its batch; then it waits for the
//! previous group's write, finishes that group on the engine's side (cache clock, eviction)
//! and hands the new batch to the writer. Where the write ends, on the writer thread, the
//! group becomes visible ([`Visible`]: the membership index, the clocks, the durable `seq`)
//! and — when it was submitted with an [`Answer`] ([`Engine::submit_group_answering`]) —
//! its callers are answered right there, while the engine is still evaluating the next
//! group; otherwise its outcomes wait for [`Engine::take_finished`]. A caller is never
//! answered before its group is durable and counted. While a group is being written:
//!
//! - its customers stay in the cache (eviction skips them), so the next group never reads a
//!   customer's record from the store before it is there;
//! - its dedup keys are consulted beside the store's;
//! - a worker that needs a customer's stored history waits for the write first;
//! - new customer numbers and journal entries continue after its own;
//! - every other kind of work (rule changes, manual tags, ticks, checkpoints, backups, a
//!   synchronous ingest) settles it first ([`Engine::settle`]).
//!
//! If a write fails, the group and the one evaluated on top of it are both refused (their
//! callers get the error) and the engine rolls back to the state before the first: nothing
//! of either was applied.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;

use super::commit::Visible;
use super::*;

/// What the engine keeps of a commit until its write has ended.
pub(super) struct Done {
    /// The first customer number after those the commit gives.
    pub next_number: u32,
    /// The profile journal entry it writes.
    pub journal: Option<u64>,
    /// The dedup keys it writes.
    pub dedup: foldhash::HashMap<String, i64>,
    /// The identity graph writes it makes.
    pub identities: foldhash::HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Each shard's customers it writes (shared with the next round's workers).
    pub dirty: Arc<Vec<foldhash::HashSet<Arc<str>>>>,
    /// Each shard's events it writes, if every shard kept them (a round whose events carry
    /// identifiers does): a merge in the next round reads them instead of waiting.
    pub written: Option<Arc<Vec<Written>>>,
}

/// A group's callers: given the group's outcomes, one per request with its changes, or why
/// nothing of the group was applied. Called once, from whichever thread finishes the group.
pub type Answer = Box<dyn FnOnce(Result<Vec<IngestOutcome>, EngineError>) + Send>;

/// Where a group's answer goes.
enum Answering {
    /// To [`Engine::take_finished`], with the outcomes kept here until then.
    Later(Vec<IngestOutcome>, Vec<u64>),
    /// To the callers, by the writer thread once the group is visible (it has the outcomes).
    Sent,
}

/// A commit's changes in `seq` order, with the step of each.
type Placed = (Vec<Change>, Vec<u64>);

/// How a write ended, and what it made visible, for whoever waits for it.
#[derive(Default)]
struct WriteState {
    /// How the write ended, once it has.
    written: Option<Result<(), String>>,
    /// Set once the commit is visible (or its write failed).
    shown: bool,
    /// The commit's changes with their steps, when nobody was answered on the writer thread.
    changes: Option<Placed>,
}

/// The end of one write.
#[derive(Default)]
pub(super) struct WriteSignal {
    state: Mutex<WriteState>,
    changed: Condvar,
}

impl WriteSignal {
    fn update(&self, f: impl FnOnce(&mut WriteState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }

    fn wait_for<R>(&self, mut ready: impl FnMut(&mut WriteState) -> Option<R>) -> R {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = ready(&mut state) {
                return r;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The write could not be made or followed through (the writer thread stopped): unless
    /// it had already ended, it failed for `reason`; either way nothing more will be shown.
    fn fail(&self, reason: String) {
        self.update(|state| {
            state.written.get_or_insert(Err(reason));
            state.shown = true;
        });
    }

    /// True once the commit is visible (or its write failed).
    fn shown(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).shown
    }

    /// Waits for the write to end (its data in the store) and says how.
    pub fn wait(&self) -> Result<(), String> {
        self.wait_for(|state| state.written.clone())
    }

    /// Waits for the commit to be visible too; takes its changes if they were kept.
    fn wait_shown(&self) -> (Result<(), String>, Option<Placed>) {
        self.wait_for(|state| match (&state.written, state.shown) {
            (Some(written), true) => Some((written.clone(), state.changes.take())),
            _ => None,
        })
    }
}

/// One batch for the writer, and what follows it.
struct WriteJob {
    writes: Vec<SortedWrites>,
    signal: Arc<WriteSignal>,
    visible: Visible,
    /// The callers to answer once the group is visible, with their outcomes and the step
    /// each request's events begin at.
    answer: Option<(Answer, Vec<IngestOutcome>, Vec<u64>)>,
    /// The timers the group fires, recorded once it is visible (the service's groups), and
    /// whether lateness is measured (wall clock mode).
    fired: Option<(FiredTimers, bool)>,
}

impl WriteJob {
    fn run(self, store: &Store) {
        let WriteJob {
            writes,
            signal,
            visible,
            answer,
            fired,
        } = self;
        let writing = std::time::Instant::now();
        let written = store.commit_sorted_parts(writes).map_err(|e| e.to_string());
        metrics::histogram!("tagstream_commit_write_seconds").record(writing.elapsed().as_secs_f64());
        signal.update(|state| state.written = Some(written.clone()));
        match written {
            Ok(()) => {
                let (changes, steps) = visible.show();
                if let Some((fired, wall)) = fired {
                    crate::telemetry::record_timers(&fired, wall.then(wall_ms));
                }
                match answer {
                    Some((answer, mut outcomes, starts)) => {
                        signal.update(|state| state.shown = true);
                        split_changes(&mut outcomes, &starts, changes, steps);
                        answer(Ok(outcomes));
                    }
                    None => signal.update(|state| {
                        state.changes = Some((changes, steps));
                        state.shown = true;
                    }),
                }
            }
            Err(e) => {
                signal.update(|state| state.shown = true);
                if let Some((answer, ..)) = answer {
                    answer(Err(EngineError::CommitFailed(e)));
                }
            }
        }
    }
}

/// The thread that writes batches, one at a time, in the order given.
pub(super) struct BackgroundWriter {
    jobs: Option<Sender<WriteJob>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundWriter {
    pub fn start(store: Arc<Store>) -> BackgroundWriter {
        let (jobs, queue) = channel::<WriteJob>();
        let thread = std::thread::Builder::new()
            .name("tagstream-writer".into())
            .spawn(move || {
                for job in queue {
                    let signal = job.signal.clone();
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(&store)));
                    if let Err(panic) = run {
                        // Whoever waits for this write is told it failed (its callers, whose
                        // answer went with the unwinding, hear that the engine stopped), and
                        // the thread stops: every later group is refused rather than applied
                        // on top of a commit that may be half visible.
                        let reason = format!("the writer thread panicked: {}", panic_message(&*panic));
                        tracing::error!(error = %reason, "the engine stops writing");
                        signal.fail(reason);
                        break;
                    }
                }
            })
            .expect("spawn the writer thread");
        BackgroundWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    fn write(&self, job: WriteJob) {
        let sent = match &self.jobs {
            Some(jobs) => jobs.send(job),
            None => Err(std::sync::mpsc::SendError(job)),
        };
        if let Err(std::sync::mpsc::SendError(job)) = sent {
            let WriteJob { signal, answer, .. } = job;
            let stopped = "the writer thread has stopped".to_owned();
            signal.fail(stopped.clone());
            if let Some((answer, ..)) = answer {
                answer(Err(EngineError::CommitFailed(stopped)));
            }
        }
    }

    /// True once the thread has ended (it stops after a panic; otherwise only on drop).
    fn stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a caught panic said, if it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "(no message)",
    }
}

/// A group whose batch is being written.
pub(super) struct Pending {
    ticket: u64,
    pub signal: Arc<WriteSignal>,
    /// The counters before the group, for a rollback if the write fails.
    saved: Counters,
    pub done: Done,
    answering: Answering,
}

/// A group's answer, once its commit is durable (or failed).
#[derive(Debug)]
pub struct Finished {
    pub ticket: u64,
    /// One outcome per request, with its changes; or why nothing of the group was applied.
    pub result: Result<Vec<IngestOutcome>, EngineError>,
}

impl Engine {
    /// Evaluates a group of requests and hands its commit to the writer thread, after
    /// finishing the group written before it. Returns the group's ticket; its outcomes come
    /// from [`Engine::take_finished`] once it is durable (at the latest after
    /// [`Engine::settle`]).
    pub fn submit_group(&mut self, requests: Vec<IngestRequest>) -> u64 {
        self.submit(requests, None)
    }

    /// [`Engine::submit_group`], answering the group's callers through `answer` as soon as
    /// its commit is durable and visible — on the writer thread, while the engine evaluates
    /// the next group — or at once if it fails. Its outcomes never reach
    /// [`Engine::take_finished`].
    pub fn submit_group_answering(&mut self, requests: Vec<IngestRequest>, answer: Answer) -> u64 {
        self.submit(requests, Some(answer))
    }

    fn submit(&mut self, requests: Vec<IngestRequest>, answer: Option<Answer>) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let saved = self.counters.clone();
        let mut batch = Batch::default();
        let evaluated = self
            .evaluate_group(requests, &mut batch)
            .and_then(|(outcomes, starts)| self.prepare(batch).map(|prepared| (outcomes, starts, prepared)));
        let refuse = |engine: &mut Engine, answer: Option<Answer>, e: EngineError| match answer {
            Some(answer) => answer(Err(e)),
            None => engine.finished.push(Finished {
                ticket,
                result: Err(e),
            }),
        };
        let (outcomes, starts, (writes, done, visible)) = match evaluated {
            Ok(ready) => ready,
            Err(e) => {
                // The group before is finished (or fails) first; then this one rolls back.
                if self.settle_pinning(&[]).is_ok() {
                    self.rollback(saved);
                }
                refuse(self, answer, e);
                return ticket;
            }
        };
        if let Err(reason) = self.settle_pinning(&done.dirty) {
            // Evaluated on top of a group that was not applied: refused with it.
            refuse(self, answer, EngineError::CommitFailed(reason));
            return ticket;
        }
        let signal = Arc::new(WriteSignal::default());
        let (answering, answer, fired) = match answer {
            Some(answer) => {
                let fired = (self.take_fired_timers(), self.config.clock == ClockMode::Wall);
                (Answering::Sent, Some((answer, outcomes, starts)), Some(fired))
            }
            None => (Answering::Later(outcomes, starts), None, None),
        };
        let writer = self
            .writer
            .get_or_insert_with(|| BackgroundWriter::start(self.store.clone()));
        writer.write(WriteJob {
            writes,
            signal: signal.clone(),
            visible,
            answer,
            fired,
        });
        self.pending = Some(Pending {
            ticket,
            signal,
            saved,
            done,
            answering,
        });
        ticket
    }

    /// Waits for the group being written (if any) and finishes it.
    pub fn settle(&mut self) {
        let _ = self.settle_pinning(&[]);
    }

    /// True while a group's commit is being written.
    pub fn in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// True once the writer thread has stopped (after a panic on it): no group can be
    /// written any more, and the engine must be opened again.
    pub fn writer_stopped(&self) -> bool {
        self.writer.as_ref().is_some_and(BackgroundWriter::stopped)
    }

    /// True if a group is in flight and its write has ended: [`Engine::settle`] would not wait.
    pub fn in_flight_ended(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.signal.shown())
    }

    /// The answers of the groups finished since the last call, in ticket order (not those
    /// submitted with an [`Answer`]).
    pub fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    /// The `seq` of the last durable change.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Finishes the group being written, keeping `pinned` (the next group's customers) in
    /// the cache. Fails with the reason if its write failed: everything since it began is
    /// rolled back.
    fn settle_pinning(&mut self, pinned: &[foldhash::HashSet<Arc<str>>]) -> Result<(), String> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let Pending {
            ticket,
            signal,
            saved,
            done: _,
            answering,
        } = pending;
        let (written, changes) = signal.wait_shown();
        match written {
            Ok(()) => {
                self.complete(pinned);
                if let (Answering::Later(mut outcomes, starts), Some((changes, steps))) = (answering, changes)
                {
                    split_changes(&mut outcomes, &starts, changes, steps);
                    self.finished.push(Finished {
                        ticket,
                        result: Ok(outcomes),
                    });
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "a group commit failed; it and the group after it were not applied");
                self.rollback(saved);
                if let Answering::Later(..) = answering {
                    self.finished.push(Finished {
                        ticket,
                        result: Err(EngineError::CommitFailed(e.clone())),
                    });
                }
                Err(e)
            }
        }
    }
}

/// Gives each request the changes of its steps (the first also those of timers fired before
/// it): changes come in step order.
pub(super) fn split_changes(
    outcomes: &mut [IngestOutcome],
    starts: &[u64],
    changes: Vec<Change>,
    steps: Vec<u64>,
) {
    let mut changes = changes.into_iter().zip(steps).peekable();
    for (i, outcome) in outcomes.iter_mut().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(u64::MAX);
        while let Some((change, _)) = changes.next_if(|(_, step)| *step < end) {
            outcome.changes.push(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    const RULES: &str = "tag buyer on payment\n\
        trait spent = sum(payment.amount, 30d)\n\
        tag big = spent >= 100\n\
        tag quiet = count(app_open, 1d) == 0 and count(app_open, lifetime) >= 1\n\
        trait t1_payments = count(payment where profile.tier == \"t1\", 30d)\n\
        tag t1_regular = t1_payments >= 1\n";

    fn config() -> EngineConfig {
        EngineConfig {
            clock: ClockMode::Event,
            sync_writes: false,
            workers: 2,
            partitions: 6,
            cache_customers: 1,
            ..Default::default()
        }
    }

    fn group(first: u64, n: u64) -> IngestRequest {
        let raw = (first..first + n)
            .map(|i| {
                let kind = if i % 3 == 0 { "payment" } else { "app_open" };
                format!(
                    r#"{{"event_id":"e{i}","customer_id":"c{}","type":"{kind}","ts":{},"amount":{},"profile":{{"tier":"t{}"}}}}"#,
                    i % 7,
                    1_744_000_000_000 + i as i64 * 3_600_000,
                    i * 10,
                    i % 4
                )
                .into_bytes()
            })
            .collect();
        IngestRequest::parse(raw, &EventLimits::default())
    }

    fn log(engine: &Engine) -> Vec<String> {
        engine
            .changes(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|c| format!("{} {} {} {:?} {}", c.seq, c.customer_id, c.name, c.op, c.at))
            .collect()
    }

    /// A write that fails refuses its group and the group evaluated on top of it, and
    /// leaves the engine as before the first; the same groups sent again end exactly as a
    /// run that never failed.
    #[test]
    fn a_failed_write_refuses_its_group_and_the_next_and_applies_nothing() {
        let (dir, clean_dir) = (
            ::tests::TempDir::new("pipeline-fail"),
            ::tests::TempDir::new("pipeline-clean"),
        );
        let mut clean = Engine::open(clean_dir.path(), Some(RULES), config()).unwrap();
        for (first, n) in [(0, 20), (20, 20), (40, 20)] {
            clean.submit_group(vec![group(first, n)]);
        }
        clean.settle();
        assert!(clean.take_finished().iter().all(|f| f.result.is_ok()));

        let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
        engine.submit_group(vec![group(0, 20)]);
        engine.settle();
        let before = (log(&engine), engine.next_seq(), engine.customer("c1").unwrap());
        engine.store.fail_writes.store(1, Ordering::Release);
        let (b, c) = (
            engine.submit_group(vec![group(20, 20)]),
            engine.submit_group(vec![group(40, 20)]),
        );
        engine.settle();
        let finished: Vec<(u64, bool)> = engine
            .take_finished()
            .into_iter()
            .map(|f| (f.ticket, f.result.is_ok()))
            .collect();
        assert_eq!(finished, [(0, true), (b, false), (c, false)]);
        assert_eq!(
            (log(&engine), engine.next_seq(), engine.customer("c1").unwrap()),
            before
        );

        for (first, n) in [(20, 20), (40, 20)] {
            engine.submit_group(vec![group(first, n)]);
        }
        engine.settle();
        assert!(engine.take_finished().iter().all(|f| f.result.is_ok()));
        assert_eq!(log(&engine), log(&clean));
        for c in 0..7 {
            let id = format!("c{c}");
            assert_eq!(engine.customer(&id).unwrap(), clean.customer(&id).unwrap());
        }
    }

    /// While a group is still being written, the next one sees its dedup keys, numbers its
    /// new customers after it and keeps its profile journal entry apart.
    #[test]
    fn the_next_group_sees_what_the_one_being_written_holds() {
        let (dir, clean_dir) = (
            ::tests::TempDir::new("pipeline-held"),
            ::tests::TempDir::new("pipeline-held-clean"),
        );
        let resend = group(0, 5).raw[2].clone();
        let second = || {
            let mut g = group(5, 6);
            g.raw.push(resend.clone());
            g.parsed
                .push(parse_event(&resend, &EventLimits::default(), i64::MAX));
            g
        };
        let mut clean = Engine::open(clean_dir.path(), Some(RULES), config()).unwrap();
        clean.ingest_group(vec![group(0, 5)]).unwrap();
        let expected = clean.ingest_group(vec![second()]).unwrap();
        assert_eq!(expected[0].duplicates, 1);

        let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
        let store = engine.store.clone();
        store.hold_writes.store(true, Ordering::Release);
        engine.submit_group(vec![group(0, 5)]);
        // Released only once the second group has been evaluated against the held one.
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            store.hold_writes.store(false, Ordering::Release);
        });
        engine.submit_group(vec![second()]);
        engine.settle();
        release.join().unwrap();
        let finished = engine.take_finished();
        let outcome = &finished[1].result.as_ref().unwrap()[0];
        assert_eq!((outcome.accepted, outcome.duplicates), (expected[0].accepted, 1));
        assert_eq!(log(&engine), log(&clean));
        assert_eq!(engine.customer_ids().unwrap(), clean.customer_ids().unwrap());
        // Both groups changed profiles: two journal entries, not one written twice.
        let journal = crate::columns::keys::JOURNAL;
        let entries = engine
            .store
            .scan_from(CF_INDEX, journal)
            .take_while(|item| item.as_ref().is_ok_and(|(k, _)| k.starts_with(journal)))
            .count();
        assert_eq!(entries, 2);
        drop(engine);
        // Reopened: numbers and the profile journal replay as written.
        let engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
        let ours: Vec<_> = (0..7)
            .map(|c| engine.reader().customer(&format!("c{c}")).unwrap())
            .collect();
        let theirs: Vec<_> = (0..7)
            .map(|c| clean.reader().customer(&format!("c{c}")).unwrap())
            .collect();
        assert_eq!(ours, theirs);
        let query = |e: &Engine| e.reader().query("profile.tier == \"t1\"", 100, None).unwrap();
        assert_eq!(query(&engine), query(&clean));
    }

    /// A group submitted with an answer is answered where its write ends, without the
    /// engine doing anything more (not after the next group's evaluation, nor at a settle),
    /// and by then what it changed is in the counts and the change log readers see.
    #[test]
    fn a_group_is_answered_where_its_write_ends_and_is_counted_by_then() {
        let dir = ::tests::TempDir::new("pipeline-answer");
        let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
        let (reader, (tx, rx)) = (engine.reader(), std::sync::mpsc::channel());
        engine.submit_group_answering(
            vec![group(0, 30)],
            Box::new(move |result| {
                let buyers = reader.index().read().set("buyer").map_or(0, |s| s.len());
                let logged = reader.changes(0, usize::MAX).unwrap().len();
                tx.send((result, buyers, logged, reader.last_seq())).unwrap();
            }),
        );
        let (result, buyers, logged, last_seq) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("answered while the engine thread did nothing more");
        let changes: Vec<Change> = result.unwrap().into_iter().flat_map(|o| o.changes).collect();
        let added = changes
            .iter()
            .filter(|c| &*c.name == "buyer" && c.op == Op::Add)
            .count() as u64;
        assert!(added > 0);
        assert_eq!(buyers, added);
        assert_eq!((logged, last_seq), (changes.len(), changes.last().unwrap().seq));
        assert_eq!(engine.durable_seq(), last_seq);
        engine.settle();
        assert!(engine.take_finished().is_empty(), "answered once, not also here");
    }

    /// A panic on the writer thread fails the group being written instead of leaving the
    /// engine waiting for it forever; every later group is refused, nothing more applied.
    #[test]
    fn a_panic_while_writing_refuses_the_group_and_every_later_one() {
        let dir = ::tests::TempDir::new("pipeline-panic");
        let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
        engine.submit_group(vec![group(0, 20)]);
        engine.settle();
        assert!(engine.take_finished().iter().all(|f| f.result.is_ok()));
        let before = log(&engine);
        let (done, ended) = std::sync::mpsc::channel();
        let run = std::thread::spawn(move || {
            engine.store.panic_writes.store(true, Ordering::Release);
            let (b, c) = (
                engine.submit_group(vec![group(20, 20)]),
                engine.submit_group(vec![group(40, 20)]),
            );
            engine.settle();
            let mut refused: Vec<(u64, String)> = engine
                .take_finished()
                .into_iter()
                .map(|f| (f.ticket, f.result.unwrap_err().to_string()))
                .collect();
            let d = engine.submit_group(vec![group(60, 20)]);
            engine.settle();
            refused.extend(
                engine
                    .take_finished()
                    .into_iter()
                    .map(|f| (f.ticket, f.result.unwrap_err().to_string())),
            );
            done.send(()).unwrap();
            (engine, [b, c, d], refused)
        });
        ended
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the engine settled after the writer panicked");
        let (engine, tickets, refused) = run.join().unwrap();
        assert_eq!(refused.iter().map(|(t, _)| *t).collect::<Vec<_>>(), tickets);
        assert!(refused[0].1.contains("injected write panic"), "{refused:?}");
        assert!(
            refused[2].1.contains("the writer thread has stopped"),
            "{refused:?}"
        );
        assert_eq!(log(&engine), before);
    }

    /// A failed write is answered to its own callers by the writer thread, and to the
    /// callers of the group evaluated on top of it by the engine; nothing is applied.
    #[test]
    fn a_failed_write_is_answered_to_both_groups_callers() {
        let dir = ::tests::TempDir::new("pipeline-answer-fail");
        let mut engine = Engine::open(dir.path(), Some(RULES), config()).unwrap();
        let before = log(&engine);
        engine.store.fail_writes.store(1, Ordering::Release);
        let (tx, rx) = std::sync::mpsc::channel();
        for (first, n) in [(0, 20), (20, 20)] {
            let tx = tx.clone();
            engine.submit_group_answering(
                vec![group(first, n)],
                Box::new(move |result| tx.send((first, result.map(|_| ()))).unwrap()),
            );
        }
        engine.settle();
        drop(tx);
        let mut answers: Vec<(u64, bool)> = rx.iter().map(|(first, r)| (first, r.is_err())).collect();
        answers.sort();
        assert_eq!(answers, [(0, true), (20, true)]);
        assert!(engine.take_finished().is_empty());
        assert_eq!(log(&engine), before);
        assert_eq!(engine.customer_ids().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn eviction_keeps_the_customers_of_the_commit_still_to_be_written() {
        let mut cache = CustomerCache::default();
        for i in 0..10u64 {
            let state = CustomerState {
                last_used: i,
                ..Default::default()
            };
            cache.insert(format!("c{i}").into(), Box::new(state));
        }
        let pinned: foldhash::HashSet<Arc<str>> = ["c0".into(), "c1".into()].into_iter().collect();
        cache.evict(1, usize::MAX, Some(&pinned));
        assert!(cache.contains_key("c0") && cache.contains_key("c1"));
        assert!(!cache.contains_key("c5"));
    }
}
