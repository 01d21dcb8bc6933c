//! The engine as a service: group commit of waiting ingest requests, job order, per-request
//! outcomes, backpressure, and shutdown.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use processor::{ClockMode, Engine, EngineConfig, EngineHandle, IngestOutcome, ServiceConfig, ServiceError};
use tests::TempDir;

const T0: i64 = 1_744_000_000_000;

fn event_config() -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        ..Default::default()
    }
}

fn line(id: &str, customer: &str, ts: i64) -> Vec<u8> {
    format!(r#"{{"event_id":"{id}","customer_id":"{customer}","type":"payment","ts":{ts}}}"#).into_bytes()
}

/// Holds the engine thread until the returned sender is dropped or sent to.
fn hold(handle: &EngineHandle) -> mpsc::Sender<()> {
    let (release, held) = mpsc::channel::<()>();
    let (started, running) = mpsc::channel::<()>();
    let h = handle.clone();
    std::thread::spawn(move || {
        h.call_blocking(move |_| {
            started.send(()).unwrap();
            let _ = held.recv();
        })
        .unwrap();
    });
    running.recv().unwrap();
    release
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn commits(handle: &EngineHandle) -> u64 {
    handle.call_blocking(|engine| engine.commits()).unwrap()
}

#[test]
fn waiting_requests_commit_together_each_with_its_own_outcome() {
    let dir = TempDir::new("service-group");
    let engine = Engine::open(dir.path(), Some("tag buyer on payment"), event_config()).unwrap();
    let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
    let before = commits(&handle);

    let release = hold(&handle);
    let senders: Vec<_> = (0..5)
        .map(|n| {
            let h = handle.clone();
            std::thread::spawn(move || {
                // Two events and one malformed line per request, the bad one in the middle.
                let raw = vec![
                    line(&format!("a{n}"), &format!("c{n}"), T0 + n),
                    b"{not json".to_vec(),
                    line(&format!("b{n}"), &format!("c{n}"), T0 + n),
                ];
                (
                    n,
                    h.ingest_blocking(raw, vec![(format!("src-{n}"), 10 + n as u64)], "test")
                        .unwrap(),
                )
            })
        })
        .collect();
    wait_until("five requests queued", || handle.waiting() == 5);
    release.send(()).unwrap();
    let outcomes: Vec<(i64, IngestOutcome)> = senders.into_iter().map(|t| t.join().unwrap()).collect();

    assert_eq!(commits(&handle) - before, 1, "five requests, one commit");
    for (n, outcome) in &outcomes {
        assert_eq!(
            (outcome.accepted, outcome.duplicates, outcome.rejected),
            (2, 0, 1)
        );
        assert_eq!(outcome.errors[0].index, 1, "indexes are the request's own");
        assert_eq!(outcome.errors[0].code, "invalid_json");
        let customers: Vec<&str> = outcome.changes.iter().map(|c| &*c.customer_id).collect();
        assert_eq!(customers, [format!("c{n}")], "each request gets its own changes");
    }
    // Every request's source position was committed with it.
    for n in 0..5 {
        let offset = handle
            .call_blocking(move |engine| engine.source_offset(&format!("src-{n}")).unwrap())
            .unwrap();
        assert_eq!(offset, Some(10 + n as u64));
    }
    // seq stays gap-free across the group.
    let log = handle
        .call_blocking(|engine| engine.changes(0, 100).unwrap())
        .unwrap();
    let seqs: Vec<u64> = log.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (1..=5).collect::<Vec<u64>>());
    drop(handle);
    thread.join().unwrap();
}

#[test]
fn a_job_of_another_kind_ends_the_group_and_keeps_its_place() {
    let dir = TempDir::new("service-order");
    let engine = Engine::open(dir.path(), Some("tag buyer on payment"), event_config()).unwrap();
    let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
    let release = hold(&handle);

    let h = handle.clone();
    let first =
        std::thread::spawn(move || h.ingest_blocking(vec![line("e1", "early", T0)], Vec::new(), "test"));
    wait_until("the first request queued", || handle.waiting() == 1);
    let h = handle.clone();
    let between = std::thread::spawn(move || {
        h.call_blocking(|engine| {
            let seen = |id: &str| engine.customer(id).unwrap().is_some();
            (seen("early"), seen("late"))
        })
    });
    wait_until("the lookup queued", || handle.waiting() == 2);
    let h = handle.clone();
    let last =
        std::thread::spawn(move || h.ingest_blocking(vec![line("e2", "late", T0 + 1)], Vec::new(), "test"));
    wait_until("the last request queued", || handle.waiting() == 3);
    release.send(()).unwrap();

    assert_eq!(first.join().unwrap().unwrap().accepted, 1);
    assert_eq!(last.join().unwrap().unwrap().accepted, 1);
    assert_eq!(
        between.join().unwrap().unwrap(),
        (true, false),
        "the lookup ran after the request before it and before the one after it"
    );
    drop(handle);
    thread.join().unwrap();
}

#[test]
fn a_group_stops_at_its_event_limit_and_never_splits_a_request() {
    let dir = TempDir::new("service-limit");
    let engine = Engine::open(dir.path(), Some("tag buyer on payment"), event_config()).unwrap();
    let config = ServiceConfig {
        max_group_events: 4,
        ..Default::default()
    };
    let (handle, thread) = EngineHandle::spawn(engine, config);
    let before = commits(&handle);
    let release = hold(&handle);
    let senders: Vec<_> = (0..4)
        .map(|n| {
            let h = handle.clone();
            let raw: Vec<Vec<u8>> = (0..3)
                .map(|i| line(&format!("e{n}-{i}"), &format!("c{n}"), T0))
                .collect();
            let t = std::thread::spawn(move || h.ingest_blocking(raw, Vec::new(), "test").unwrap());
            wait_until("the request queued", || handle.waiting() == n + 1);
            t
        })
        .collect();
    release.send(()).unwrap();
    for t in senders {
        assert_eq!(t.join().unwrap().accepted, 3);
    }
    // 3 + 3 reach the limit of 4: groups of two requests, two commits.
    assert_eq!(commits(&handle) - before, 2);
    drop(handle);
    thread.join().unwrap();
}

#[test]
fn a_full_queue_answers_busy_and_blocking_callers_wait() {
    let dir = TempDir::new("service-busy");
    let engine = Engine::open(dir.path(), Some("tag buyer on payment"), event_config()).unwrap();
    let config = ServiceConfig {
        queue: 1,
        ..Default::default()
    };
    let (handle, thread) = EngineHandle::spawn(engine, config);
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let release = hold(&handle);
    let h = handle.clone();
    let waiting =
        std::thread::spawn(move || h.ingest_blocking(vec![line("e1", "c1", T0)], Vec::new(), "test"));
    wait_until("the queue full", || handle.waiting() == 1);
    let busy = runtime.block_on(handle.ingest(vec![line("e2", "c2", T0)]));
    assert!(matches!(busy, Err(ServiceError::Busy)), "{busy:?}");
    release.send(()).unwrap();
    assert_eq!(waiting.join().unwrap().unwrap().accepted, 1);
    let after = runtime
        .block_on(handle.ingest(vec![line("e2", "c2", T0)]))
        .unwrap();
    assert_eq!(after.accepted, 1, "the refused request changed nothing");
    drop(handle);
    thread.join().unwrap();
}

#[test]
fn the_loop_stops_once_every_handle_is_gone_after_draining_its_queue() {
    let dir = TempDir::new("service-stop");
    let engine = Engine::open(dir.path(), Some("tag buyer on payment"), event_config()).unwrap();
    let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
    let release = hold(&handle);
    let h = handle.clone();
    let queued =
        std::thread::spawn(move || h.ingest_blocking(vec![line("e1", "c1", T0)], Vec::new(), "test"));
    wait_until("the request queued", || handle.waiting() == 1);
    drop(handle);
    release.send(()).unwrap();
    assert_eq!(queued.join().unwrap().unwrap().accepted, 1, "queued work is done");
    thread.join().unwrap();
    let engine = Engine::open(dir.path(), None, event_config()).unwrap();
    assert!(engine.customer("c1").unwrap().is_some(), "and durable");
}
