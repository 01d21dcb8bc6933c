//! The engine's behaviour around the core: restarts, rule changes, manual tags, dedup,
//! dead letters, the clock.

use std::collections::BTreeMap;

use processor::{Cause, ClockMode, Engine, EngineConfig, EngineError, Op};
use tests::TempDir;

const T0: i64 = 1_744_000_000_000;
const MIN: i64 = 60_000;
const DAY: i64 = 86_400_000;

fn event_config() -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        ..Default::default()
    }
}

fn ev(id: &str, customer: &str, event_type: &str, ts: i64, extra: &str) -> String {
    format!(r#"{{"event_id":"{id}","customer_id":"{customer}","type":"{event_type}","ts":{ts}{extra}}}"#)
}

const SLA: &str = r#"tag lead_sla_breach = profile.lead_status == "new" and since(lead_created) > 45m"#;

#[test]
fn timers_clock_and_sequence_survive_a_restart() {
    let dir = TempDir::new("engine-restart");
    {
        let mut engine = Engine::open(dir.path(), Some(SLA), event_config()).unwrap();
        let lead = ev(
            "e1",
            "c1",
            "lead_created",
            T0,
            r#","profile":{"lead_status":"new"}"#,
        );
        engine.ingest(&[lead]).unwrap();
        assert_eq!(engine.pending_timers(), 1);
    }
    let mut engine = Engine::open(dir.path(), None, event_config()).unwrap();
    assert_eq!(engine.clock(), Some(T0));
    assert_eq!(
        engine.next_timer(),
        Some(T0 + 45 * MIN + 1),
        "the timer was reloaded"
    );
    let changes = engine.advance_clock(T0 + DAY).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].seq, changes[0].at, &changes[0].cause),
        (1, T0 + 45 * MIN + 1, &Cause::Timer)
    );
    // Dedup keys survive too.
    let again = ev("e1", "c1", "lead_created", T0 + DAY, "");
    assert_eq!(engine.ingest(&[again]).unwrap().duplicates, 1);
}

#[test]
fn a_rule_change_sees_the_past_and_emits_rule_change_changes() {
    let dir = TempDir::new("engine-rules");
    let mut engine = Engine::open(
        dir.path(),
        Some("tag any_view = count(view, 30d) >= 1"),
        event_config(),
    )
    .unwrap();
    let events: Vec<String> = (0..5)
        .map(|i| {
            ev(
                &format!("p{i}"),
                &format!("c{}", i % 3),
                "payment",
                T0 + i * MIN,
                r#","props":{"amount":900}"#,
            )
        })
        .collect();
    engine.ingest(&events).unwrap();
    assert!(engine.changes(0, 100).unwrap().is_empty());

    let bad = engine.replace_rules("tag big = sum(payment.amount, 30d) >= 1000 and nope");
    assert!(
        matches!(bad, Err(EngineError::Rules(d)) if d.len() == 1),
        "bad rules are refused"
    );
    assert_eq!(
        engine.rules().defs()[0].name.as_ref(),
        "any_view",
        "the old rules stay"
    );

    engine
        .replace_rules("tag big = sum(payment.amount, 30d) >= 1000")
        .unwrap();
    assert!(engine.backfill_pending());
    // c0 is touched by an event before the sweep reaches it: it is upgraded first.
    let out = engine
        .ingest(&[ev("v1", "c0", "view", T0 + 10 * MIN, "")])
        .unwrap();
    assert_eq!(out.changes.len(), 1);
    assert_eq!(
        (
            out.changes[0].name.as_ref(),
            out.changes[0].op,
            &out.changes[0].cause
        ),
        ("big", Op::Add, &Cause::RuleChange)
    );
    let mut reported = Vec::new();
    while let Some(progress) = engine.backfill_progress() {
        reported.push(progress.customers_done);
        assert!(progress.customers_done <= progress.customers_estimated);
        engine.backfill_step(1).unwrap();
    }
    assert!(!engine.backfill_pending());
    assert!(
        reported.windows(2).all(|w| w[0] < w[1]) && reported.len() >= 2,
        "progress moves forward step by step: {reported:?}"
    );
    let all = engine.changes(0, 100).unwrap();
    let big: Vec<_> = all
        .iter()
        .filter(|c| c.name.as_ref() == "big")
        .map(|c| c.customer_id.to_string())
        .collect();
    assert_eq!(
        big,
        ["c0", "c1"],
        "c0 (2 payments) and c1 (2 payments) qualify, c2 (1) does not"
    );
    assert!(all.iter().all(|c| c.cause == Cause::RuleChange));
    // Restarting with the same rules is not a rule change.
    drop(engine);
    let engine = Engine::open(
        dir.path(),
        Some("tag big = sum(payment.amount, 30d) >= 1000"),
        event_config(),
    )
    .unwrap();
    assert!(!engine.backfill_pending());
}

#[test]
fn manual_tags_are_set_expire_on_time_and_cannot_override_rules() {
    let dir = TempDir::new("engine-manual");
    let rules = "tag vip_by_rule = count(payment, 30d) >= 10\ntag seen on view ttl 1d";
    let mut engine = Engine::open(dir.path(), Some(rules), event_config()).unwrap();
    engine.ingest(&[ev("e1", "c1", "view", T0, "")]).unwrap();

    let set = engine.set_manual_tag("c1", "called_back", Some(7 * DAY)).unwrap();
    assert_eq!(
        (set[0].op, &set[0].cause, set[0].at),
        (Op::Add, &Cause::Manual, T0)
    );
    let view = engine.customer("c1").unwrap().unwrap();
    assert_eq!(view.tags["called_back"].expires_at, Some(T0 + 7 * DAY));

    let expired = engine.advance_clock(T0 + 8 * DAY).unwrap();
    let called_back: Vec<_> = expired
        .iter()
        .filter(|c| c.name.as_ref() == "called_back")
        .collect();
    assert_eq!(
        (called_back[0].op, called_back[0].at, &called_back[0].cause),
        (Op::Remove, T0 + 7 * DAY, &Cause::Timer)
    );

    assert!(matches!(
        engine.set_manual_tag("c1", "vip_by_rule", None),
        Err(EngineError::Conflict(_))
    ));
    // An event tag may be set by hand, and removed.
    let set = engine.set_manual_tag("c1", "seen", None).unwrap();
    assert_eq!(set[0].op, Op::Add);
    let removed = engine.remove_manual_tag("c1", "seen").unwrap();
    assert_eq!((removed[0].op, &removed[0].cause), (Op::Remove, &Cause::Manual));
}

#[test]
fn dedup_holds_for_the_horizon_of_clock_time() {
    let dir = TempDir::new("engine-dedup");
    let config = EngineConfig {
        dedup_horizon_ms: DAY,
        ..event_config()
    };
    let mut engine = Engine::open(dir.path(), Some("trait n = count(view, lifetime)"), config).unwrap();
    let first = engine
        .ingest(&[ev("x", "c1", "view", T0, ""), ev("x", "c1", "view", T0 + 1, "")])
        .unwrap();
    assert_eq!(
        (first.accepted, first.duplicates),
        (1, 1),
        "a duplicate within one batch"
    );
    engine.ingest(&[ev("later", "c2", "view", T0 + DAY, "")]).unwrap();
    assert_eq!(
        engine
            .ingest(&[ev("x", "c1", "view", T0 + DAY, "")])
            .unwrap()
            .duplicates,
        1,
        "exactly the horizon ago"
    );
    engine
        .ingest(&[ev("later2", "c2", "view", T0 + DAY + 1, "")])
        .unwrap();
    assert_eq!(
        engine
            .ingest(&[ev("x", "c1", "view", T0 + DAY + 1, "")])
            .unwrap()
            .accepted,
        1,
        "past the horizon"
    );
    // Events without an id are never duplicates.
    let plain = r#"{"customer_id":"c1","type":"view","ts":1744086400001}"#;
    assert_eq!(engine.ingest(&[plain, plain]).unwrap().accepted, 2);
}

#[test]
fn rejected_events_are_dead_letters_with_their_bytes_and_nothing_else_is_lost() {
    let dir = TempDir::new("engine-dlq");
    let mut engine = Engine::open(
        dir.path(),
        Some("trait n = count(view, lifetime)"),
        event_config(),
    )
    .unwrap();
    let batch: Vec<Vec<u8>> = vec![
        ev("a", "c1", "view", T0, "").into_bytes(),
        b"{not json".to_vec(),
        b"\xff\xfe".to_vec(),
        ev("b", "c1", "view", T0 + 1, "").into_bytes(),
    ];
    let out = engine.ingest(&batch).unwrap();
    assert_eq!((out.accepted, out.rejected), (2, 2));
    assert_eq!(out.errors.iter().map(|e| e.index).collect::<Vec<_>>(), [1, 2]);
    let dead = engine.dead_letters(None, 10).unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].raw, b"{not json");
    assert!(dead[0].reason.starts_with("invalid JSON"));
    assert_eq!(
        (dead[1].raw.as_slice(), dead[1].reason.as_str()),
        (&b"\xff\xfe"[..], "not valid UTF-8")
    );
    assert_eq!(
        engine.dead_letters(Some(dead[0].id), 10).unwrap().len(),
        1,
        "paged by id"
    );
    assert_eq!(engine.purge_dead_letters().unwrap(), 2);
    assert!(engine.dead_letters(None, 10).unwrap().is_empty());
    let view = engine.customer("c1").unwrap().unwrap();
    assert_eq!(view.traits["n"], rules::Value::num(2));
}

#[test]
fn the_event_clock_never_goes_back_and_needs_a_start() {
    let dir = TempDir::new("engine-clock");
    let mut engine = Engine::open(
        dir.path(),
        Some("trait n = count(view, lifetime)"),
        event_config(),
    )
    .unwrap();
    let no_ts = r#"{"customer_id":"c1","type":"view"}"#;
    let out = engine.ingest(&[no_ts]).unwrap();
    assert!(
        out.errors[0].reason.contains("event clock is not set"),
        "{:?}",
        out.errors
    );
    engine.advance_clock(T0).unwrap();
    assert_eq!(
        engine.ingest(&[no_ts]).unwrap().accepted,
        1,
        "without ts the event takes the clock"
    );
    assert!(matches!(engine.advance_clock(T0 - 1), Err(EngineError::Clock(_))));
    // Rejected and duplicate events do not move the clock.
    let future = format!(r#"{{"customer_id":"c1","type":"view","ts":{}}}"#, i64::MAX / 2);
    engine.ingest(&[future]).unwrap();
    assert_eq!(engine.clock(), Some(T0));
}

#[test]
fn wall_clock_mode_fires_due_timers_on_tick() {
    let dir = TempDir::new("engine-wall");
    let config = EngineConfig {
        clock: ClockMode::Wall,
        sync_writes: false,
        ..Default::default()
    };
    let mut engine = Engine::open(dir.path(), Some("tag seen on view ttl 200ms"), config).unwrap();
    let out = engine.ingest(&[r#"{"customer_id":"c1","type":"view"}"#]).unwrap();
    assert_eq!(out.changes.len(), 1, "no ts: stamped with the wall clock");
    // Stamped when accepted; the tag is added when judged, the same or a later millisecond.
    let stamped = engine.timeline("c1", None, 1).unwrap().unwrap()[0].event.ts;
    assert!(out.changes[0].at >= stamped && out.changes[0].at - stamped < 50);
    std::thread::sleep(std::time::Duration::from_millis(250));
    let fired = engine.tick().unwrap();
    assert_eq!(fired.len(), 1);
    assert_eq!(
        (fired[0].op, fired[0].at),
        (Op::Remove, stamped + 200),
        "at the exact instant, not when noticed"
    );
}

/// A wall clock engine (one worker) whose `customers` each have a timer 100 ms after their
/// view, slept past: a backlog of due timers. Returns the `ts` of each customer's view. The
/// views carry it: an unstamped event takes the wall clock when accepted, and its tag is
/// added at the (possibly later) instant it is judged, so the tag's instant is not always
/// the expiry's base.
fn due_timers(dir: &TempDir, config: EngineConfig, customers: usize) -> (Engine, BTreeMap<String, i64>) {
    let config = EngineConfig {
        clock: ClockMode::Wall,
        sync_writes: false,
        workers: 1,
        ..config
    };
    let mut engine = Engine::open(dir.path(), Some("tag seen on view ttl 100ms"), config).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let seen: BTreeMap<String, i64> = (0..customers)
        .map(|i| (format!("c{i}"), now - i as i64))
        .collect();
    let views: Vec<String> = seen
        .iter()
        .map(|(id, ts)| format!(r#"{{"customer_id":"{id}","type":"view","ts":{ts}}}"#))
        .collect();
    let added = engine.ingest(&views).unwrap().changes;
    assert_eq!(added.len(), customers);
    std::thread::sleep(std::time::Duration::from_millis(150));
    assert!(engine.timers_behind());
    (engine, seen)
}

/// A backlog of due timers (a restart after downtime) is fired a bounded number per round,
/// each round committed on its own: every timer still fires once, at its own instant.
#[test]
fn a_backlog_of_timers_is_fired_in_bounded_rounds() {
    let dir = TempDir::new("engine-wall-backlog");
    let config = EngineConfig {
        timers_per_round: 2,
        ..Default::default()
    };
    let (mut engine, seen) = due_timers(&dir, config, 7);
    let mut removed = BTreeMap::new();
    let mut rounds = 0;
    while engine.timers_behind() {
        let fired = engine.tick().unwrap();
        assert!(fired.len() <= 2, "{} timers in one round", fired.len());
        for c in fired {
            assert_eq!(c.op, Op::Remove);
            assert!(
                removed.insert(c.customer_id.to_string(), c.at).is_none(),
                "fired twice"
            );
        }
        rounds += 1;
    }
    assert_eq!(rounds, 4);
    let expected: BTreeMap<String, i64> = seen.into_iter().map(|(id, ts)| (id, ts + 100)).collect();
    assert_eq!(removed, expected, "each at its own instant");
    assert!(engine.tick().unwrap().is_empty());
}

/// While events wait, a backlog of due timers takes turns with them: a round that applies
/// events fires at most `timers_beside_events` timers a worker (or as many as it has
/// events), and so does a tick taken while events wait. Every timer still fires once, at its
/// own instant; a tick with nothing waiting takes a full round.
#[test]
fn a_backlog_of_timers_shares_rounds_with_events() {
    timers_share_rounds_with(|i| format!(r#"{{"customer_id":"x{i}","type":"ping"}}"#));
}

/// The same with events that carry identifiers (a round whose events the shards apply as
/// they are dealt, `processor/src/engine/deal.rs`).
#[test]
fn a_backlog_of_timers_shares_dealt_rounds_with_events() {
    timers_share_rounds_with(|i| format!(r#"{{"type":"ping","ids":{{"phone":"1390000000{i}"}}}}"#));
}

fn timers_share_rounds_with(event: impl Fn(usize) -> String) {
    let dir = TempDir::new("engine-wall-share");
    let config = EngineConfig {
        timers_per_round: 100,
        timers_beside_events: 3,
        ..Default::default()
    };
    let (mut engine, seen) = due_timers(&dir, config, 20);
    let mut removed = BTreeMap::new();
    let mut take = |changes: Vec<processor::Change>| {
        let mut n = 0;
        for c in changes.into_iter().filter(|c| c.op == Op::Remove) {
            assert!(
                removed.insert(c.customer_id.to_string(), c.at).is_none(),
                "fired twice"
            );
            n += 1;
        }
        n
    };
    // One event: three timers beside it. Five events (of customers without a due timer):
    // five timers. A tick while events wait: three.
    let one = engine.ingest(&[event(0)]).unwrap();
    assert_eq!(take(one.changes), 3);
    let five: Vec<String> = (1..6).map(event).collect();
    assert_eq!(take(engine.ingest(&five).unwrap().changes), 5);
    assert_eq!(take(engine.tick_beside_events().unwrap()), 3);
    // Nothing waiting: the rest in one full round.
    assert_eq!(take(engine.tick().unwrap()), 9);
    assert!(!engine.timers_behind());
    let expected: BTreeMap<String, i64> = seen.into_iter().map(|(id, ts)| (id, ts + 100)).collect();
    assert_eq!(removed, expected, "each once, at its own instant");
}

/// In wall clock mode a customer's timer can fall due between ticks. When the customer is
/// judged at a later instant first (here a manual tag), every timer due by then fires before:
/// its change happens at its own instant, judged over the whole history (the cache keeps
/// windows, not events), and is not lost when the later judgement reschedules the timer.
/// The pings are a few ms apart, so the first timer (the first ping's window exit) finds
/// `recent` still held and the exit is a second timer, also due before the manual tag.
#[test]
fn a_timer_due_before_a_later_judgement_fires_first() {
    let dir = TempDir::new("engine-wall-due-timer");
    let config = EngineConfig {
        clock: ClockMode::Wall,
        sync_writes: false,
        ..Default::default()
    };
    let rules = "tag recent = count(ping, 300ms) >= 1\ntag regular = count(ping, 300ms) >= 1 or count(ping, lifetime) >= 2";
    let mut engine = Engine::open(dir.path(), Some(rules), config).unwrap();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (first, last) = (wall - 20, wall - 15);
    let out = engine
        .ingest(&[
            format!(r#"{{"customer_id":"c1","type":"ping","ts":{first}}}"#),
            format!(r#"{{"customer_id":"c1","type":"ping","ts":{last}}}"#),
        ])
        .unwrap();
    assert_eq!(out.changes.len(), 2, "{:?}", out.changes);
    assert!(engine.next_timer().is_some_and(|t| t <= last + 300));
    std::thread::sleep(std::time::Duration::from_millis(400));
    let changes = engine.set_manual_tag("c1", "vip", None).unwrap();
    let summary: Vec<(&str, Op, Cause)> = changes
        .iter()
        .map(|c| (&*c.name, c.op, c.cause.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("recent", Op::Remove, Cause::Timer),
            ("vip", Op::Add, Cause::Manual)
        ],
        "the window exit, then the tag; `regular` holds by its lifetime count"
    );
    assert_eq!(changes[0].at, last + 300, "the exit at its exact instant");
    assert!(engine.tick().unwrap().is_empty(), "fired once");
    let view = engine.customer("c1").unwrap().unwrap();
    assert_eq!(
        view.tags.keys().map(|k| &**k).collect::<Vec<_>>(),
        ["regular", "vip"]
    );
}

#[test]
fn events_older_than_the_retention_leave_lifetime_windows() {
    let dir = TempDir::new("engine-retention");
    let config = EngineConfig {
        retention_ms: 10 * DAY,
        ..event_config()
    };
    let mut engine = Engine::open(
        dir.path(),
        Some("tag buyer = count(payment, lifetime) >= 1"),
        config,
    )
    .unwrap();
    let out = engine.ingest(&[ev("p", "c1", "payment", T0, "")]).unwrap();
    assert_eq!(out.changes[0].op, Op::Add);
    let later = engine.advance_clock(T0 + 11 * DAY).unwrap();
    assert_eq!((later[0].op, later[0].at), (Op::Remove, T0 + 10 * DAY));
    engine
        .ingest(&[ev("v", "c1", "view", T0 + 11 * DAY, "")])
        .unwrap();
    let events = engine.store().customer_events("c1").unwrap();
    assert_eq!(events.len(), 1, "the payment was pruned from the stored history");
}

/// A profile change judges past events again for every aggregate whose filter reads it, also
/// when the definition read the attribute before the filter did; and the cache holding
/// customers without their history (the second batch) still finds every past event.
#[test]
fn a_profile_change_rebuilds_windows_from_the_history_of_earlier_batches() {
    let dir = TempDir::new("engine-profile-rebuild");
    let rules = "tag vip_buyer = profile.vip == true and count(pay where profile.vip == true, 30d) >= 2";
    let mut engine = Engine::open(dir.path(), Some(rules), event_config()).unwrap();
    let out = engine
        .ingest(&[ev("p1", "c1", "pay", T0, ""), ev("p2", "c1", "pay", T0 + 1, "")])
        .unwrap();
    assert!(out.changes.is_empty(), "not a vip yet: {:?}", out.changes);
    let out = engine
        .ingest(&[ev("v", "c1", "visit", T0 + 2, r#","profile":{"vip":true}"#)])
        .unwrap();
    assert_eq!(
        out.changes.iter().map(|c| (&*c.name, c.op)).collect::<Vec<_>>(),
        [("vip_buyer", Op::Add)],
        "both earlier payments match once `vip` is true"
    );
}

#[test]
fn lookups_off_the_engine_thread_see_whole_commits_and_follow_rules_and_clock() {
    let dir = TempDir::new("engine-reader");
    let rules = "trait n = count(ping, lifetime)\ntag pinged = count(ping, 1d) >= 1";
    let mut engine = Engine::open(dir.path(), Some(rules), event_config()).unwrap();
    let reader = engine.reader();
    assert_eq!(reader.customer("c1").unwrap(), None);
    assert_eq!(reader.now(), 0);

    // Each event sets the profile (the customer record) and adds to the history (the events
    // column family): a lookup must never see one commit's record with another's events.
    const EVENTS: i64 = 300;
    let writer = std::thread::spawn(move || {
        for i in 1..=EVENTS {
            let e = ev(
                &format!("e{i}"),
                "c1",
                "ping",
                T0 + i,
                &format!(r#","profile":{{"i":{i}}}"#),
            );
            engine.ingest(&[e]).unwrap();
        }
        engine
    });
    let mut last = 0;
    while last < EVENTS {
        let Some(view) = reader.customer("c1").unwrap() else {
            continue;
        };
        let n = view.traits["n"].as_num().unwrap();
        assert_eq!(
            Some(n),
            view.profile["i"].as_num(),
            "record and events of one commit"
        );
        let n: i64 = n.try_into().unwrap();
        assert!(n >= last, "lookups never go back in time");
        last = n;
    }
    let mut engine = writer.join().unwrap();
    assert_eq!(reader.customer("c1").unwrap(), engine.customer("c1").unwrap());
    assert_eq!(reader.now(), T0 + EVENTS);

    // The clock and the rule set the engine publishes are the ones lookups use.
    engine.advance_clock(T0 + 2 * DAY).unwrap();
    let view = reader.customer("c1").unwrap().unwrap();
    assert!(!view.tags.contains_key("pinged"));
    engine
        .replace_rules("trait n = count(ping, lifetime) * 2")
        .unwrap();
    let view = reader.customer("c1").unwrap().unwrap();
    assert_eq!(view.traits["n"].as_num(), Some((2 * EVENTS).into()));
    // Normalised ids, as everywhere.
    assert!(reader.customer("ｃ1\u{200b}").unwrap().is_some());
}

/// Timers are set for changes of membership only: a count a tag compares with a number
/// wakes the customer when the comparison turns (here when the third-newest ping leaves),
/// not at every ping leaving its window, and aggregates only traits read set none.
#[test]
fn timers_wait_for_the_instant_a_comparison_turns() {
    let dir = TempDir::new("engine-thresholds");
    let rules = "tag busy = count(ping, 1d) >= 3\ntrait pings_7d = count(ping, 7d)\ntrait amount_90d = sum(ping.n, 90d)";
    let mut engine = Engine::open(dir.path(), Some(rules), event_config()).unwrap();
    let pings: Vec<String> = (0..5)
        .map(|i| {
            format!(
                r#"{{"customer_id":"c1","type":"ping","ts":{},"props":{{"n":1}}}}"#,
                T0 + i * MIN
            )
        })
        .collect();
    let out = engine.ingest(&pings).unwrap();
    assert_eq!(out.changes.len(), 1, "busy from the third ping");
    let turns = T0 + 2 * MIN + DAY;
    assert_eq!(engine.next_timer(), Some(turns), "the third-newest ping leaves");
    assert!(engine.advance_clock(turns - 1).unwrap().is_empty());
    let changes = engine.advance_clock(turns).unwrap();
    assert_eq!(
        changes.iter().map(|c| (&*c.name, c.op, c.at)).collect::<Vec<_>>(),
        [("busy", Op::Remove, turns)]
    );
    assert_eq!(engine.next_timer(), None, "nothing a tag reads changes any more");
    assert_eq!(
        engine.take_fired_timers().count,
        1,
        "one wake-up, not one per ping"
    );
}

/// A weighted sum of counts compared with a number wakes the customer once, when the sum
/// crosses it — not at each of its events leaving — and `last`/`since` wake only when their
/// newest event leaves, not when older ones do.
#[test]
fn weighted_sums_and_newest_event_reads_wake_only_when_they_can_turn() {
    let dir = TempDir::new("engine-weighted");
    let rules = "trait engagement = count(ping, 1d) + 5 * count(demo, 1d)\n\
                 tag hot = engagement >= 7\n\
                 tag quiet = last(ping.n) == 1 and since(demo) < 2d";
    // One day of history: `last` and `since` lose their events after a day.
    let config = EngineConfig {
        retention_ms: DAY,
        ..event_config()
    };
    let mut engine = Engine::open(dir.path(), Some(rules), config).unwrap();
    let mut events: Vec<String> = (0..6)
        .map(|i| {
            format!(
                r#"{{"customer_id":"c1","type":"ping","ts":{},"props":{{"n":1}}}}"#,
                T0 + i * MIN
            )
        })
        .collect();
    events.push(format!(
        r#"{{"customer_id":"c1","type":"demo","ts":{}}}"#,
        T0 + 10 * MIN
    ));
    let out = engine.ingest(&events).unwrap();
    assert_eq!(
        out.changes.iter().filter(|c| c.op == Op::Add).count(),
        2,
        "hot (6 + 5 >= 7) and quiet: {:?}",
        out.changes
    );
    // 11 now; it falls below 7 when the fifth ping leaves (11 - 5 = 6). The pings before it
    // leaving wake nobody: neither the sum nor `last(ping.n)` turns.
    let turns = T0 + 4 * MIN + DAY;
    assert_eq!(
        engine.next_timer(),
        Some(turns),
        "the sum's crossing, not the first ping leaving"
    );
    assert!(engine.advance_clock(turns - 1).unwrap().is_empty());
    let changes = engine.advance_clock(turns).unwrap();
    assert_eq!(
        changes.iter().map(|c| (&*c.name, c.op, c.at)).collect::<Vec<_>>(),
        [("hot", Op::Remove, turns)]
    );
    // The newest ping leaving empties `last(ping.n)`: quiet ends. Then the demo leaving
    // changes `since(demo)` (nothing turns: quiet is off, the sum falls further below 7).
    let newest_leaves = T0 + 5 * MIN + DAY;
    assert_eq!(engine.next_timer(), Some(newest_leaves));
    let changes = engine.advance_clock(T0 + 3 * DAY).unwrap();
    assert_eq!(
        changes.iter().map(|c| (&*c.name, c.op, c.at)).collect::<Vec<_>>(),
        [("quiet", Op::Remove, newest_leaves)]
    );
    assert_eq!(engine.next_timer(), None);
    assert_eq!(
        engine.take_fired_timers().count,
        3,
        "the crossing, the newest ping and the demo leaving (not each ping)"
    );
}

/// A customer as the engine loads them from the store on a cache miss.
fn stored(engine: &Engine, id: &str) -> processor::state::CustomerState {
    let current = processor::store::Current {
        rules: engine.rules(),
        retention_ms: engine.config().retention_ms,
    };
    engine
        .store()
        .load_customer_current(id, current)
        .unwrap()
        .unwrap()
}

/// A customer read back from the store (a cache miss, a restart) comes with the window state
/// of their record: one read of what the windows hold, not a scan of their history. Under
/// rules whose windows differ, the history is read instead.
#[test]
fn a_customer_loaded_from_the_store_brings_its_windows_not_its_history() {
    let dir = TempDir::new("engine-stored-windows");
    let rules = "tag spender = sum(payment.amount, 30d) >= 100\ntag active = count(app_open, 7d) >= 2";
    {
        let mut engine = Engine::open(dir.path(), Some(rules), event_config()).unwrap();
        let events: Vec<String> = (0..50)
            .map(|i| {
                let kind = if i % 2 == 0 { "payment" } else { "app_open" };
                ev(
                    &format!("e{i}"),
                    "c1",
                    kind,
                    T0 + i * MIN,
                    r#","props":{"amount":7.5}"#,
                )
            })
            .collect();
        engine.ingest(&events).unwrap();
    }
    let mut engine = Engine::open(dir.path(), None, event_config()).unwrap();
    let state = stored(&engine, "c1");
    assert!(!state.history_loaded, "the history was read");
    assert!(state.windows.is_some() && state.has_events);
    // Judged from the stored windows, exactly as before the restart: 25 payments of 7.5.
    let view = engine.customer("c1").unwrap().unwrap();
    assert!(view.tags.contains_key("spender") && view.tags.contains_key("active"));
    // Time passes: the stored windows drain as the history would.
    let changes = engine.advance_clock(T0 + 40 * DAY).unwrap();
    let removed: Vec<&str> = changes.iter().map(|c| &*c.name).collect();
    assert_eq!(removed, ["active", "spender"]);
    assert!(changes.iter().all(|c| c.op == Op::Remove));

    // Other windows: the stored state does not fit, the history is read.
    drop(engine);
    let wider = "tag spender = sum(payment.amount, 31d) >= 100\ntag active = count(app_open, 7d) >= 2";
    let mut engine = Engine::open(dir.path(), Some(wider), event_config()).unwrap();
    // A store keeps its rule set: the new one is a rule change.
    assert!(!engine.rules().source().contains("31d"));
    engine.replace_rules(wider).unwrap();
    let state = stored(&engine, "c1");
    assert!(state.history_loaded && state.windows.is_none());
    assert_eq!(state.history.events.len(), 50);
}

/// Replacing or deleting a saved segment that read its own aggregates takes those
/// aggregates out of the rules: customers held in memory (and their stored records) keep
/// window state shaped by the old rules, which must not be read under the new ones.
#[test]
fn a_segment_change_that_reshapes_the_windows_leaves_no_stale_window_state() {
    let dir = TempDir::new("engine-segment-reshape");
    let rules = "segment payer = count(payment, 7d) >= 1\ntrait views = count(view, 30d)";
    let mut engine = Engine::open(dir.path(), Some(rules), event_config()).unwrap();
    let events = [
        ev("e1", "c1", "payment", T0, ""),
        ev("e2", "c1", "view", T0 + 1, ""),
        ev("e3", "c1", "view", T0 + 2, ""),
    ];
    engine.ingest(&events).unwrap();
    assert!(engine
        .customer("c1")
        .unwrap()
        .unwrap()
        .segments
        .contains_key("payer"));
    // Static now: applied at once, and the `payment` aggregate leaves the rules.
    let update = engine.put_segment("payer", "profile.vip == true").unwrap();
    assert!(
        matches!(update, processor::SegmentUpdate::Immediate { .. }),
        "{update:?}"
    );
    engine.ingest(&[ev("e4", "c1", "view", T0 + 3, "")]).unwrap();
    let view = engine.customer("c1").unwrap().unwrap();
    assert_eq!(view.traits["views"], rules::Value::num(3));
    assert!(!view.segments.contains_key("payer"));
    // And from the store, after a restart.
    drop(engine);
    let engine = Engine::open(dir.path(), None, event_config()).unwrap();
    assert_eq!(
        engine.customer("c1").unwrap().unwrap().traits["views"],
        rules::Value::num(3)
    );
}

/// Retention deletes the oldest changes past the configured count or age, from the front
/// and never past the index checkpoint or a reader's hold; a cursor before what is left is
/// `Gone` with the oldest seq, not a silent gap; the floor survives a restart. Dead letters
/// likewise, by count.
#[test]
fn retention_trims_the_logs_from_the_front_and_a_cursor_before_them_is_gone() {
    use processor::{Log, LogRetention};
    let dir = TempDir::new("engine-retention");
    let config = EngineConfig {
        changes_retention: LogRetention {
            max_age_ms: 10 * DAY,
            max_entries: 6,
        },
        dead_letters_retention: LogRetention {
            max_age_ms: 30 * DAY,
            max_entries: 1,
        },
        ..event_config()
    };
    let rules = "tag viewed = count(view, 1d) >= 1";
    let mut engine = Engine::open(dir.path(), Some(rules), config.clone()).unwrap();
    // Ten customers view once each (10 adds), then three bad events.
    let views: Vec<String> = (0..10)
        .map(|i| ev(&format!("v{i}"), &format!("c{i}"), "view", T0 + i * MIN, ""))
        .collect();
    engine.ingest(&views).unwrap();
    engine.ingest(&["{", "[]", "{\"type\":1}"]).unwrap();
    assert_eq!(engine.next_seq(), 11);
    let reader = engine.reader();

    // The index checkpoint covers seq 7 only, and a publisher still needs seq 3 on.
    reader.hold("publisher", Log::Changes, 3);
    let trimmed = engine.trim_logs(7).unwrap();
    assert_eq!(trimmed.changes, 2, "seqs 1 and 2: the hold keeps 3 on");
    assert_eq!(trimmed.dead_letters, 2, "the oldest two of three dead letters");
    reader.hold("publisher", Log::Changes, 11);
    assert_eq!(
        engine.trim_logs(7).unwrap(),
        processor::Trimmed {
            changes: 2,
            dead_letters: 0
        },
        "seqs 3 and 4: six changes are left, 5..=10"
    );
    assert_eq!(reader.log_floor(Log::Changes).unwrap(), 5);
    let seqs = |after| {
        engine
            .changes(after, 100)
            .map(|c| c.iter().map(|c| c.seq).collect::<Vec<_>>())
    };
    assert_eq!(seqs(4).unwrap(), [5, 6, 7, 8, 9, 10]);
    match seqs(3) {
        Err(EngineError::Gone { log, oldest }) => assert_eq!((log, oldest), ("changes", 5)),
        other => panic!("a cursor before the floor is gone, got {other:?}"),
    }
    assert!(
        matches!(seqs(0), Err(EngineError::Gone { .. })),
        "so is the start of the log"
    );
    assert!(reader.check_changes_cursor(3).is_err() && reader.check_changes_cursor(4).is_ok());
    let letters = engine.dead_letters(None, 10).unwrap();
    assert_eq!(
        letters.iter().map(|d| d.id).collect::<Vec<_>>(),
        [2],
        "the list starts at what is left"
    );
    assert!(matches!(
        engine.dead_letters(Some(0), 10),
        Err(EngineError::Gone {
            log: "dead_letters",
            oldest: 2
        })
    ));
    assert_eq!(engine.dead_letters(Some(1), 10).unwrap().len(), 1);

    // Age: the clock moves eleven days on; every change is older than ten days, but the
    // checkpoint still covers only up to 8.
    engine.advance_clock(T0 + 11 * DAY).unwrap();
    let last = engine.next_seq() - 1;
    assert!(last > 10, "the views expired: removals at the new instant");
    assert_eq!(engine.trim_logs(8).unwrap().changes, 4, "5..=8");
    assert_eq!(
        engine.trim_logs(last).unwrap().changes,
        2,
        "9 and 10; the removals are young"
    );
    let floor = reader.log_floor(Log::Changes).unwrap();
    assert_eq!(floor, 11);
    drop((engine, reader));
    let engine = Engine::open(dir.path(), None, config).unwrap();
    assert_eq!(
        engine.reader().log_floor(Log::Changes).unwrap(),
        11,
        "the floor is stored"
    );
    assert!(matches!(
        engine.changes(9, 10),
        Err(EngineError::Gone { oldest: 11, .. })
    ));
    assert_eq!(engine.changes(10, 100).unwrap().len() as u64, last - 10);
    // The index by definition answers alike, and its entries of deleted changes go at the
    // next compaction.
    let reader = engine.reader();
    assert!(matches!(
        reader.changes_of("viewed", 9, 10),
        Err(EngineError::Gone { oldest: 11, .. })
    ));
    assert_eq!(
        reader.changes_of("viewed", 10, 100).unwrap().len() as u64,
        last - 10
    );
    let store = reader.store();
    store.flush().unwrap();
    store.compact(processor::store::CF_CHANGES_BY_NAME);
    let indexed: Vec<u64> = store
        .scan_from(processor::store::CF_CHANGES_BY_NAME, &[])
        .map(|kv| {
            let key = kv.unwrap().0;
            u64::from_be_bytes(key[key.len() - 8..].try_into().unwrap())
        })
        .collect();
    assert_eq!(indexed, (11..=last).collect::<Vec<_>>());
}

/// The change log's index by definition gives each name's changes exactly as filtering the
/// whole log would, from any cursor; a store written before the index gets it built at
/// open.
#[test]
fn changes_of_a_name_are_the_logs_changes_of_that_name_also_for_stores_from_before_the_index() {
    let dir = TempDir::new("engine-changes-of");
    let rules = "tag viewed = count(view, 1d) >= 1\ntag twice = count(view, 1d) >= 2\nsegment both = viewed and twice";
    let mut engine = Engine::open(dir.path(), Some(rules), event_config()).unwrap();
    let views: Vec<String> = (0..40)
        .map(|i| {
            ev(
                &format!("v{i}"),
                &format!("c{}", i % 7),
                "view",
                T0 + i * 3 * 60 * MIN,
                "",
            )
        })
        .collect();
    engine.ingest(&views).unwrap();
    engine.advance_clock(T0 + 10 * DAY).unwrap();
    let check = |engine: &Engine| {
        let log = engine.changes(0, usize::MAX).unwrap();
        assert!(log.len() > 40);
        let reader = engine.reader();
        for name in ["viewed", "twice", "both", "nothing"] {
            for after in [0, 5, 17, log.len() as u64] {
                let expected: Vec<u64> = log
                    .iter()
                    .filter(|c| *c.name == *name && c.seq > after)
                    .map(|c| c.seq)
                    .collect();
                let got: Vec<u64> = reader
                    .changes_of(name, after, usize::MAX)
                    .unwrap()
                    .iter()
                    .map(|c| c.seq)
                    .collect();
                assert_eq!(got, expected, "{name} after {after}");
                let first_two: Vec<u64> = reader
                    .changes_of(name, after, 2)
                    .unwrap()
                    .iter()
                    .map(|c| c.seq)
                    .collect();
                assert_eq!(first_two, expected.iter().copied().take(2).collect::<Vec<_>>());
            }
        }
    };
    check(&engine);
    // A store from before the index: no entries, no marker.
    let store = engine.reader().store().clone();
    let keys: Vec<_> = store
        .scan_from(processor::store::CF_CHANGES_BY_NAME, &[])
        .map(|kv| kv.unwrap().0)
        .collect();
    assert!(!keys.is_empty());
    let mut batch = rocksdb::WriteBatch::default();
    for key in &keys {
        batch.delete_cf(store.cf(processor::store::CF_CHANGES_BY_NAME), key);
    }
    batch.delete_cf(store.cf(processor::store::CF_META), "changes_by_name_built");
    store.commit(batch).unwrap();
    assert!(
        engine.reader().changes_of("viewed", 0, 10).unwrap().is_empty(),
        "the index is gone"
    );
    drop((engine, store));
    let engine = Engine::open(dir.path(), None, event_config()).unwrap();
    check(&engine);
}

/// With a heap probe and `bound_heap`, `cache_bytes` bounds the whole heap: a heap the probe reports as full
/// of something else leaves the cache its floor, a quarter of the budget; an empty one
/// leaves it the whole budget. Customers evicted read back the same from the store.
#[test]
fn a_heap_probe_gives_the_cache_what_the_rest_of_the_heap_leaves() {
    fn heap_full_of_other_things() -> usize {
        1 << 40
    }
    fn heap_empty() -> usize {
        0
    }
    const BUDGET: usize = 8 << 20;
    const ROUNDS: usize = 8;
    const EACH: usize = 250;
    let rules = "trait spend = sum(payment.amount, 30d)\ntag buyer = count(payment, 30d) >= 2";
    let run = |probe: fn() -> usize, bound_heap: bool| {
        let dir = TempDir::new("engine-heap-probe");
        let config = EngineConfig {
            cache_bytes: BUDGET,
            heap_probe: Some(processor::HeapProbe(probe)),
            bound_heap,
            workers: 1,
            ..event_config()
        };
        let mut engine = Engine::open(dir.path(), Some(rules), config).unwrap();
        // Each round new customers (the cache evicts by round), each with two payments.
        for round in 0..ROUNDS {
            let batch: Vec<String> = (round * EACH..(round + 1) * EACH)
                .flat_map(|c| {
                    (0..2).map(move |i| {
                        let extra = format!(r#","props":{{"amount":{}}}"#, 10 + c);
                        ev(
                            &format!("e{c}-{i}"),
                            &format!("c{c}"),
                            "payment",
                            T0 + round as i64 * MIN,
                            &extra,
                        )
                    })
                })
                .collect();
            engine.ingest(&batch).unwrap();
        }
        let usage = engine.cache_usage();
        let first = engine.customer("c7").unwrap().unwrap();
        (usage, first)
    };
    let ((squeezed_customers, squeezed), c7_squeezed) = run(heap_full_of_other_things, true);
    let ((roomy_customers, roomy), c7_roomy) = run(heap_empty, true);
    // Not asked to bound the heap: the probe only reports.
    let ((unbound_customers, _), _) = run(heap_full_of_other_things, false);
    assert_eq!(unbound_customers, ROUNDS * EACH, "the cache's own estimate only");
    assert_eq!(
        roomy_customers,
        ROUNDS * EACH,
        "the whole budget holds everyone: {roomy} bytes"
    );
    assert!(
        squeezed > 0 && squeezed <= BUDGET / 4 && squeezed_customers < ROUNDS * EACH,
        "the floor: {squeezed_customers} customers, {squeezed} bytes cached"
    );
    assert_eq!(c7_squeezed.tags, c7_roomy.tags);
    assert_eq!(c7_squeezed.traits, c7_roomy.traits);
    assert!(c7_roomy.tags.contains_key("buyer"));
}
