//! Pipelined group commit: a group's batch is written (WAL, fsync, memtables) on a writer
//! thread while the engine evaluates the next group, so the disk's time and the CPU's
//! overlap instead of adding up.
//!
//! [`Engine::submit_group`] evaluates a group and prepares its batch; then it waits for the
//! previous group's write, finishes that group (index, clock, eviction, its callers'
//! outcomes) and hands the new batch to the writer. Callers are answered only once their
//! group is durable ([`Engine::take_finished`]). While a group is being written:
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

use super::*;

/// What follows a commit's write: the membership index's update, the clock, the changes.
pub(super) struct Done {
    pub new_ids: Vec<(u32, Arc<str>)>,
    pub changes: Vec<Change>,
    pub steps: Vec<u64>,
    pub numbers: Vec<u32>,
    pub profiles: Vec<ProfileUpdate>,
    pub journal: Option<u64>,
    pub touched: Vec<u32>,
    /// The event clock the commit writes, and the instant it was judged at.
    pub clock: Option<i64>,
    pub now: i64,
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

/// The end of one write, for whoever waits for it.
#[derive(Default)]
pub(super) struct WriteSignal {
    result: Mutex<Option<Result<(), String>>>,
    written: Condvar,
}

impl WriteSignal {
    fn set(&self, result: Result<(), String>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.written.notify_all();
    }

    /// Waits for the write to end and says how.
    pub fn wait(&self) -> Result<(), String> {
        let mut result = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = &*result {
                return r.clone();
            }
            result = self.written.wait(result).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The thread that writes batches, one at a time, in the order given.
pub(super) struct BackgroundWriter {
    jobs: Option<Sender<(Vec<SortedWrites>, Arc<WriteSignal>)>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundWriter {
    pub fn start(store: Arc<Store>) -> BackgroundWriter {
        let (jobs, queue) = channel::<(Vec<SortedWrites>, Arc<WriteSignal>)>();
        let thread = std::thread::Builder::new()
            .name("tagstream-writer".into())
            .spawn(move || {
                for (writes, signal) in queue {
                    let writing = std::time::Instant::now();
                    let result = store.commit_sorted_parts(writes).map_err(|e| e.to_string());
                    metrics::histogram!("tagstream_commit_write_seconds")
                        .record(writing.elapsed().as_secs_f64());
                    signal.set(result);
                }
            })
            .expect("spawn the writer thread");
        BackgroundWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    fn write(&self, writes: Vec<SortedWrites>) -> Arc<WriteSignal> {
        let signal = Arc::new(WriteSignal::default());
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send((writes, signal.clone())).is_ok());
        if !sent {
            signal.set(Err("the writer thread has stopped".into()));
        }
        signal
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

/// A group whose batch is being written.
pub(super) struct Pending {
    ticket: u64,
    pub signal: Arc<WriteSignal>,
    /// The counters before the group, for a rollback if the write fails.
    saved: Counters,
    pub done: Done,
    outcomes: Vec<IngestOutcome>,
    /// The step each request's events begin at.
    starts: Vec<u64>,
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
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let saved = self.counters;
        let mut batch = Batch::default();
        let evaluated = self
            .evaluate_group(requests, &mut batch)
            .and_then(|(outcomes, starts)| self.prepare(batch).map(|prepared| (outcomes, starts, prepared)));
        let (outcomes, starts, (writes, done)) = match evaluated {
            Ok(ready) => ready,
            Err(e) => {
                // The group before is finished (or fails) first; then this one rolls back.
                if self.settle_pinning(&[]) {
                    self.rollback(saved);
                }
                self.finished.push(Finished {
                    ticket,
                    result: Err(e),
                });
                return ticket;
            }
        };
        if !self.settle_pinning(&done.dirty) {
            // Evaluated on top of a group that was not applied: refused with it.
            let reason = match &self.finished.last() {
                Some(Finished { result: Err(e), .. }) => e.to_string(),
                _ => "the commit before it failed".into(),
            };
            self.finished.push(Finished {
                ticket,
                result: Err(EngineError::CommitFailed(reason)),
            });
            return ticket;
        }
        let writer = self
            .writer
            .get_or_insert_with(|| BackgroundWriter::start(self.store.clone()));
        let signal = writer.write(writes);
        self.pending = Some(Pending {
            ticket,
            signal,
            saved,
            done,
            outcomes,
            starts,
        });
        ticket
    }

    /// Waits for the group being written (if any) and finishes it.
    pub fn settle(&mut self) {
        self.settle_pinning(&[]);
    }

    /// True while a group's commit is being written.
    pub fn in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// The answers of the groups finished since the last call, in ticket order.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    /// The `seq` of the last durable change.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Finishes the group being written, keeping `pinned` (the next group's customers) in
    /// the cache. False if its write failed: everything since it began is rolled back.
    fn settle_pinning(&mut self, pinned: &[foldhash::HashSet<Arc<str>>]) -> bool {
        let Some(pending) = self.pending.take() else {
            return true;
        };
        let Pending {
            ticket,
            signal,
            saved,
            done,
            mut outcomes,
            starts,
        } = pending;
        match signal.wait() {
            Ok(()) => {
                let (changes, steps) = self.complete(done, pinned);
                split_changes(&mut outcomes, &starts, changes, steps);
                self.finished.push(Finished {
                    ticket,
                    result: Ok(outcomes),
                });
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "a group commit failed; it and the group after it were not applied");
                self.rollback(saved);
                self.finished.push(Finished {
                    ticket,
                    result: Err(EngineError::CommitFailed(e)),
                });
                false
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
