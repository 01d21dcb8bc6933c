//! A partition restored from its state changelog (issue #21, step 2): the deltas a store's
//! commits put in its outbox give another store the partition as of the last commit read —
//! read in any order, some twice — and its customers carry on there as if they had never
//! moved.

use std::collections::BTreeSet;

use processor::changelog::{Delta, Restore};
use processor::partition::partition_of;
use processor::{ClockMode, Engine, EngineConfig, EngineError};
use tests::TempDir;

#[path = "support/moves.rs"]
mod moves;
use moves::{changes_by_customer, ingest_all, ordered_stream, rules_text, views};

const PARTITIONS: u32 = 4;

fn config(workers: usize) -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        workers,
        partitions: PARTITIONS,
        changelog: true,
        ..Default::default()
    }
}

/// The outbox's deltas of `partition` up to commit `through`, in commit order.
fn deltas(engine: &Engine, partition: u32, through: u64) -> Vec<Vec<u8>> {
    engine
        .reader()
        .changelog_deltas(partition, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|(commit, _)| *commit <= through)
        .map(|(_, delta)| delta)
        .collect()
}

/// The deltas read out of order: the second half first, then the first half backwards,
/// then every third one again.
fn scrambled(deltas: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let half = deltas.len() / 2;
    let mut out: Vec<Vec<u8>> = deltas[half..].to_vec();
    out.extend(deltas[..half].iter().rev().cloned());
    out.extend(deltas.iter().step_by(3).cloned());
    out
}

fn restore(partition: u32, deltas: Vec<Vec<u8>>) -> Restore {
    let mut restore = Restore::new(partition, PARTITIONS);
    for bytes in deltas {
        restore.add(Delta::decode(&bytes).unwrap()).unwrap();
    }
    restore
}

fn last_commit(engine: &Engine) -> u64 {
    (0..PARTITIONS)
        .filter_map(|p| {
            let all = engine.reader().changelog_deltas(p, 0, usize::MAX).unwrap();
            all.last().map(|(commit, _)| *commit)
        })
        .max()
        .unwrap()
}

#[test]
fn a_partition_restored_from_its_changelog_carries_on_as_if_it_had_stayed() {
    let stream = ordered_stream();
    let rules = rules_text();
    let (first, second) = stream.split_at(stream.len() / 2);
    let end = 1_744_732_800_000;
    let moved = [1u32, 3];
    let of_moved = |id: &str| moved.contains(&partition_of(id.as_bytes(), PARTITIONS));

    let source_dir = TempDir::new("changelog-source");
    let mut source = Engine::open(source_dir.path(), Some(&rules), config(2)).unwrap();
    ingest_all(&mut source, first.iter().map(|(_, l)| l));
    let clock = source.clock().unwrap();
    let cut = last_commit(&source);
    let cut_seq = source.next_seq() - 1;
    let ids_at_cut: Vec<String> = source
        .customer_ids()
        .unwrap()
        .into_iter()
        .filter(|id| of_moved(id))
        .collect();
    assert!(!ids_at_cut.is_empty());
    let at_cut = views(&source, &ids_at_cut);
    // Every partition written got a delta per commit that wrote it, numbered in order.
    for p in 0..PARTITIONS {
        let commits: Vec<u64> = source
            .reader()
            .changelog_deltas(p, 0, usize::MAX)
            .unwrap()
            .iter()
            .map(|(c, _)| *c)
            .collect();
        assert!(commits.len() > 5, "partition {p}: {commits:?}");
        assert!(commits.windows(2).all(|w| w[0] < w[1]), "{commits:?}");
        // Paged: after a commit, the rest.
        let rest = source.reader().changelog_deltas(p, commits[2], 2).unwrap();
        assert_eq!(rest.iter().map(|(c, _)| *c).collect::<Vec<_>>(), commits[3..5]);
    }
    ingest_all(&mut source, second.iter().map(|(_, l)| l));

    // A new store restores the moved partitions as of the cut, from deltas out of order.
    let there_dir = TempDir::new("changelog-there");
    let mut there = Engine::open(there_dir.path(), Some(&rules), config(3)).unwrap();
    there.advance_clock(clock).unwrap();
    for &p in &moved {
        let summary = there
            .restore_partition(&restore(p, scrambled(deltas(&source, p, cut))))
            .unwrap();
        assert!(
            summary.customers > 0 && summary.events > 0 && summary.dedup_entries > 0,
            "{summary:?}"
        );
    }
    let mut restored_ids = there.customer_ids().unwrap();
    restored_ids.sort();
    let mut expected_ids = ids_at_cut.clone();
    expected_ids.sort();
    assert_eq!(restored_ids, expected_ids);
    assert_eq!(views(&there, &ids_at_cut), at_cut);
    // Restored once; again, the partition is already here.
    let err = there
        .restore_partition(&restore(1, deltas(&source, 1, cut)))
        .unwrap_err();
    assert!(matches!(err, EngineError::Conflict(_)), "{err}");
    assert!(err.to_string().contains("already holds"), "{err}");

    // An event applied before the cut is a duplicate there too.
    let (_, resent) = first
        .iter()
        .rev()
        .find(|(c, l)| of_moved(c) && l.contains("event_id"))
        .unwrap();
    let outcome = there.ingest(&[resent]).unwrap();
    assert_eq!((outcome.accepted, outcome.duplicates), (0, 1), "{resent}");

    // The second half's events of the moved customers there: the same customers, the same
    // changes as in the store that never lost them.
    ingest_all(
        &mut there,
        second.iter().filter(|(c, _)| of_moved(c)).map(|(_, l)| l),
    );
    source.advance_clock(end).unwrap();
    there.advance_clock(end).unwrap();
    let moved_ids: Vec<String> = source
        .customer_ids()
        .unwrap()
        .into_iter()
        .filter(|id| of_moved(id))
        .collect();
    assert_eq!(views(&there, &moved_ids), views(&source, &moved_ids));
    let mut expected = changes_by_customer(&source, cut_seq);
    expected.retain(|id, _| of_moved(id));
    assert!(!expected.is_empty(), "the moved customers change after the cut");
    assert_eq!(changes_by_customer(&there, 0), expected);
    // Commits there are numbered after the restored ones: a partition's deltas stay in
    // commit order whichever store wrote them.
    let restored_last = deltas(&source, 1, cut).len();
    let restored_commit = source.reader().changelog_deltas(1, 0, usize::MAX).unwrap()[restored_last - 1].0;
    let theirs = there.reader().changelog_deltas(1, 0, usize::MAX).unwrap();
    assert!(
        theirs.first().is_some_and(|(c, _)| *c > restored_commit),
        "{:?} after {restored_commit}",
        theirs.first().map(|d| d.0)
    );

    // Restored from every delta (in order this time), a third store is the partitions as
    // the source ends.
    let all_dir = TempDir::new("changelog-all");
    let mut all = Engine::open(all_dir.path(), Some(&rules), config(1)).unwrap();
    for &p in &moved {
        all.restore_partition(&restore(p, deltas(&source, p, u64::MAX)))
            .unwrap();
    }
    // The clock came with the deltas: the moved customers' events of the second half were
    // judged after the first half's clock.
    assert!(all.clock() > Some(clock), "{:?} vs {clock}", all.clock());
    all.advance_clock(end).unwrap();
    assert_eq!(views(&all, &moved_ids), views(&source, &moved_ids));
    // Reopened: the restored state, timers, numbering and index were committed.
    drop(all);
    let all = Engine::open(all_dir.path(), Some(&rules), config(2)).unwrap();
    assert_eq!(views(&all, &moved_ids), views(&source, &moved_ids));
    // The membership index knows them: every tag's members are the source's of those
    // partitions.
    let mut checked = 0;
    for def in source.rules().defs() {
        let Ok(theirs) = all.members(&def.name) else {
            continue;
        };
        let mut theirs: Vec<String> = theirs.into_iter().map(|m| m.0).collect();
        let mut ours: Vec<String> = source
            .members(&def.name)
            .unwrap()
            .into_iter()
            .map(|m| m.0)
            .filter(|id| of_moved(id))
            .collect();
        theirs.sort();
        ours.sort();
        assert_eq!(theirs, ours, "members of {}", def.name);
        checked += usize::from(!ours.is_empty());
    }
    assert!(checked >= 3, "{checked} tags with members");
}

/// A partition restored into a store that runs another rule set than the one its customers
/// were judged under — the store took a rule change its source had not, or the other way
/// round, as when a group's rule change reaches one node while another restores — is
/// brought up to the store's rules: each customer ends as in a store that ran those rules
/// all along.
#[test]
fn a_partition_restored_under_another_rule_set_is_brought_up_to_the_one_running() {
    let stream = ordered_stream();
    let rules = rules_text();
    let changed = format!("{rules}\ntag paid_once = count(payment, lifetime) >= 1\n");
    let moved = 2u32;
    let of_moved = |id: &str| partition_of(id.as_bytes(), PARTITIONS) == moved;
    let open = |name: &str, text: &str| {
        let dir = TempDir::new(name);
        let engine = Engine::open(dir.path(), Some(text), config(2)).unwrap();
        (dir, engine)
    };
    let settled = |engine: &mut Engine| {
        while engine.backfill_pending() {
            engine.backfill_step(1000).unwrap();
        }
    };
    // A tag a rule change adds is gained at the change (`since`), which differs by store.
    let judged = |engine: &Engine, ids: &[String]| {
        let mut all = views(engine, ids);
        for view in all.values_mut() {
            for m in view.tags.values_mut().chain(view.segments.values_mut()) {
                m.since = 0;
            }
        }
        all
    };
    // What the moved customers are under the changed rules, judged all along.
    let (_d, mut reference) = open("changelog-reference", &changed);
    ingest_all(&mut reference, stream.iter().map(|(_, l)| l));
    let ids: Vec<String> = reference
        .customer_ids()
        .unwrap()
        .into_iter()
        .filter(|id| of_moved(id))
        .collect();
    assert!(!ids.is_empty());
    let expected = judged(&reference, &ids);
    assert!(
        expected.values().any(|v| v.tags.contains_key("paid_once")),
        "the new tag has members"
    );

    let (_s, mut source) = open("changelog-behind", &rules);
    ingest_all(&mut source, stream.iter().map(|(_, l)| l));
    let change = source
        .propose_rules(&changed, &processor::RuleEdit::by("t"), "put_rules".into())
        .unwrap();
    let unchanged = judged(&source, &ids);
    // Each change names the rule set it was made under, beside its number: what a consumer
    // tells apart when a partition's old and new owner judged the same events under two.
    let made_under = |engine: &Engine, after: u64| -> BTreeSet<Option<u64>> {
        engine
            .changes(after, usize::MAX)
            .unwrap()
            .iter()
            .map(|c| c.rules_version)
            .collect()
    };
    assert_eq!(
        made_under(&source, 0),
        BTreeSet::from([Some(source.rules_version())])
    );
    assert!(change.version.version > source.rules_version());

    // The restoring store runs the change; the source has not applied it yet.
    let (_t, mut ahead) = open("changelog-ahead", &rules);
    ahead.apply_proposal(change.clone()).unwrap();
    settled(&mut ahead);
    let cut = last_commit(&source);
    let before_restore = ahead.changes(0, usize::MAX).unwrap().last().map_or(0, |c| c.seq);
    ahead
        .restore_partition(&restore(moved, deltas(&source, moved, cut)))
        .unwrap();
    assert!(
        ahead.backfill_pending(),
        "restored customers of another generation are swept"
    );
    settled(&mut ahead);
    assert_eq!(judged(&ahead, &ids), expected);
    assert_eq!(
        made_under(&ahead, before_restore),
        BTreeSet::from([Some(change.version.version)]),
        "the sweep of the restored customers is made under the new rules"
    );

    // The source runs the change; a store that has not yet restores from it, then applies
    // the change itself.
    source.apply_proposal(change.clone()).unwrap();
    settled(&mut source);
    let (_b, mut behind) = open("changelog-restoring-behind", &rules);
    let cut = last_commit(&source);
    behind
        .restore_partition(&restore(moved, deltas(&source, moved, cut)))
        .unwrap();
    // Until it applies the change, it judges them under the rules it runs.
    assert!(
        behind.backfill_pending(),
        "restored customers of another generation are swept"
    );
    settled(&mut behind);
    assert_eq!(judged(&behind, &ids), unchanged);
    behind.apply_proposal(change).unwrap();
    settled(&mut behind);
    assert_eq!(judged(&behind, &ids), expected);
    // Between stores of the same rule history nothing is re-judged.
    let (_c, mut same) = open("changelog-same", &rules);
    same.apply_proposal(source.current_proposal().unwrap().unwrap())
        .unwrap();
    settled(&mut same);
    same.restore_partition(&restore(moved, deltas(&source, moved, cut)))
        .unwrap();
    assert!(
        !same.backfill_pending(),
        "customers of the running generation are current"
    );
    assert_eq!(judged(&same, &ids), expected);
}

#[test]
fn a_restore_is_refused_whole_when_it_cannot_apply() {
    let stream = ordered_stream();
    let rules = rules_text();
    let dir = TempDir::new("changelog-refused-source");
    let mut source = Engine::open(dir.path(), Some(&rules), config(2)).unwrap();
    ingest_all(&mut source, stream.iter().take(800).map(|(_, l)| l));
    let other_dir = TempDir::new("changelog-refused-other");
    let mut other = Engine::open(
        other_dir.path(),
        Some(&rules),
        EngineConfig {
            partitions: 8,
            ..config(1)
        },
    )
    .unwrap();
    let err = other
        .restore_partition(&restore(2, deltas(&source, 2, u64::MAX)))
        .unwrap_err();
    assert!(err.to_string().contains("8"), "{err}");
    assert!(other.customer_ids().unwrap().is_empty());
    // A partition import would not be in the changelog: refused in a store that keeps it.
    let mut file = Vec::new();
    source
        .reader()
        .export_partition(2, PARTITIONS, &mut file)
        .unwrap();
    let err = other.import_partition(&mut &file[..]).unwrap_err();
    assert!(err.to_string().contains("state changelog"), "{err}");
    // A delta whose retained event does not read back as one: refused, nothing written.
    let mut corrupt = Restore::new(2, PARTITIONS);
    for bytes in deltas(&source, 2, u64::MAX) {
        let mut delta = Delta::decode(&bytes).unwrap();
        for write in &mut delta.writes {
            if write.family == processor::changelog::Family::Events {
                write.value = Some(b"\xff".to_vec());
            }
        }
        corrupt.add(delta).unwrap();
    }
    let plain_dir = TempDir::new("changelog-corrupt");
    let mut target = Engine::open(
        plain_dir.path(),
        Some(&rules),
        EngineConfig {
            changelog: false,
            ..config(1)
        },
    )
    .unwrap();
    assert!(target.restore_partition(&corrupt).is_err());
    assert!(target.customer_ids().unwrap().is_empty());
    // A delta of another partition does not join a restore.
    let mut mixed = Restore::new(2, PARTITIONS);
    let wrong = deltas(&source, 3, u64::MAX).remove(0);
    assert!(mixed.add(Delta::decode(&wrong).unwrap()).is_err());
    // Without the changelog, commits put nothing in the outbox.
    let plain_dir = TempDir::new("changelog-off");
    let mut plain = Engine::open(
        plain_dir.path(),
        Some(&rules),
        EngineConfig {
            changelog: false,
            ..config(2)
        },
    )
    .unwrap();
    ingest_all(&mut plain, stream.iter().take(300).map(|(_, l)| l));
    assert!((0..PARTITIONS).all(|p| deltas(&plain, p, u64::MAX).is_empty()));
}

/// A store that kept no changelog, or stopped keeping it for a while, starts it with a
/// baseline of every partition: restored from the deltas alone, the partitions are the
/// store, whatever happened while nothing was kept.
#[test]
fn turning_the_changelog_on_for_a_store_with_data_starts_with_a_baseline() {
    let stream = ordered_stream();
    let rules = rules_text();
    let third = stream.len() / 3;
    let dir = TempDir::new("changelog-baseline");
    let off = || EngineConfig {
        changelog: false,
        ..config(2)
    };
    let mut engine = Engine::open(dir.path(), Some(&rules), off()).unwrap();
    ingest_all(&mut engine, stream[..third].iter().map(|(_, l)| l));
    drop(engine);
    let mut engine = Engine::open(dir.path(), Some(&rules), config(2)).unwrap();
    let baseline: Vec<Vec<u8>> = (0..PARTITIONS)
        .flat_map(|p| deltas(&engine, p, u64::MAX))
        .collect();
    assert!(!baseline.is_empty());
    assert!(
        (0..PARTITIONS).all(|p| deltas(&engine, p, u64::MAX)
            .last()
            .is_some_and(|d| Delta::decode(d).unwrap().baseline_from.is_some())),
        "every partition's baseline ends"
    );
    ingest_all(&mut engine, stream[third..2 * third].iter().map(|(_, l)| l));
    drop(engine);
    // Off for a while (what happens then is in no delta), then on again.
    let mut engine = Engine::open(dir.path(), Some(&rules), off()).unwrap();
    ingest_all(
        &mut engine,
        stream[2 * third..5 * third / 2].iter().map(|(_, l)| l),
    );
    drop(engine);
    let mut engine = Engine::open(dir.path(), Some(&rules), config(1)).unwrap();
    ingest_all(&mut engine, stream[5 * third / 2..].iter().map(|(_, l)| l));
    let clock = engine.clock().unwrap();

    let ids = engine.customer_ids().unwrap();
    let restored_dir = TempDir::new("changelog-baseline-restored");
    let mut restored = Engine::open(restored_dir.path(), Some(&rules), config(2)).unwrap();
    for p in 0..PARTITIONS {
        restored
            .restore_partition(&restore(p, scrambled(deltas(&engine, p, u64::MAX))))
            .unwrap();
    }
    assert_eq!(restored.clock(), Some(clock));
    let mut restored_ids = restored.customer_ids().unwrap();
    restored_ids.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(restored_ids, expected);
    assert_eq!(views(&restored, &ids), views(&engine, &ids));

    // `[engine] partitions` changed: the store writes a baseline under the new count; the
    // deltas of the old one, still in the topic (here the outbox), are left out by a restore.
    drop(engine);
    let eight = || EngineConfig {
        partitions: 8,
        ..config(2)
    };
    let engine = Engine::open(dir.path(), Some(&rules), eight()).unwrap();
    let again_dir = TempDir::new("changelog-baseline-eight");
    let mut again = Engine::open(again_dir.path(), Some(&rules), eight()).unwrap();
    for p in 0..8 {
        let mut restore = Restore::new(p, 8);
        for bytes in deltas(&engine, p, u64::MAX) {
            restore.add(Delta::decode(&bytes).unwrap()).unwrap();
        }
        again.restore_partition(&restore).unwrap();
    }
    assert_eq!(views(&again, &ids), views(&engine, &ids));
    // Without the new baseline, the old deltas are not a partition of eight.
    let mut old_only = Restore::new(1, 8);
    for bytes in deltas(&engine, 1, u64::MAX) {
        let delta = Delta::decode(&bytes).unwrap();
        if delta.partitions == PARTITIONS {
            old_only.add(delta).unwrap();
        }
    }
    let empty_dir = TempDir::new("changelog-baseline-refused");
    let mut empty = Engine::open(empty_dir.path(), Some(&rules), eight()).unwrap();
    let err = empty.restore_partition(&old_only).unwrap_err();
    assert!(err.to_string().contains("another partition count"), "{err}");
}

/// A parked partition's timers wait — a member of a consumer group of several keeps
/// partitions it does not own without time changing their customers — and once it is
/// active again they fire at their own instants: the same changes as a store that never
/// parked, later.
#[test]
fn parked_partitions_fire_no_timers_until_activated() {
    let stream = ordered_stream();
    let rules = rules_text();
    let (parked_dir, twin_dir) = (TempDir::new("parked"), TempDir::new("parked-twin"));
    let mut parked = Engine::open(parked_dir.path(), Some(&rules), config(2)).unwrap();
    let mut twin = Engine::open(twin_dir.path(), Some(&rules), config(2)).unwrap();
    ingest_all(&mut parked, stream.iter().map(|(_, l)| l));
    ingest_all(&mut twin, stream.iter().map(|(_, l)| l));
    assert!(parked.next_timer().is_some(), "the stream leaves timers pending");
    let far = parked.clock().unwrap() + 400 * 86_400_000;
    let of = |changes: &[processor::Change], partition: u32| -> Vec<(String, String, i64)> {
        changes
            .iter()
            .filter(|c| partition_of(c.customer_id.as_bytes(), PARTITIONS) == partition)
            .map(|c| {
                (
                    c.customer_id.to_string(),
                    format!("{:?} {:?} {}", c.kind, c.op, c.name),
                    c.at,
                )
            })
            .collect()
    };
    let expected = twin.advance_clock(far).unwrap();

    parked.park_partitions(0..PARTITIONS);
    assert_eq!(parked.parked_partitions(), [0, 1, 2, 3]);
    assert_eq!(parked.next_timer(), None);
    assert!(
        parked.advance_clock(far).unwrap().is_empty(),
        "nothing fires while parked"
    );
    for partition in 0..PARTITIONS {
        parked.activate_partition(partition);
        let fired = parked.advance_clock(far + 1 + partition as i64).unwrap();
        assert!(
            !of(&expected, partition).is_empty(),
            "partition {partition} has timers"
        );
        assert_eq!(
            of(&fired, partition),
            of(&expected, partition),
            "partition {partition}"
        );
        assert_eq!(
            fired.len(),
            of(&fired, partition).len(),
            "only partition {partition} fired"
        );
    }
    assert_eq!(parked.parked_partitions(), Vec::<u32>::new());
}

/// A customer's identifiers move with the customer's partition (issue #21): an identity
/// graph entry is kept in the changelog of the partition of the customer it names — not of
/// the identifier's own hash, which another node may own — so the node that restores the
/// customer finds them by their phone, also once the phone went to another customer in
/// the same partition and was taken back.
#[test]
fn identifiers_move_with_their_customers_partition() {
    let dir = TempDir::new("changelog-identifiers");
    let mut source = Engine::open(dir.path(), Some(&rules_text()), config(1)).unwrap();
    let partition = |bytes: &[u8]| partition_of(bytes, PARTITIONS);
    let (customer, phone) = (0..100)
        .map(|i| (format!("c-{i}"), format!("1380000{i:04}")))
        .find(|(c, p)| partition(format!("phone\0{p}").as_bytes()) != partition(c.as_bytes()))
        .unwrap();
    let line = format!(
        r#"{{"event_id":"e1","customer_id":"{customer}","type":"view","ts":1740000000000,"ids":{{"phone":"{phone}"}}}}"#
    );
    source.ingest(&[line]).unwrap();
    let home = partition(customer.as_bytes());
    let through = last_commit(&source);
    let to = TempDir::new("changelog-identifiers-to");
    let mut restored = Engine::open(to.path(), Some(&rules_text()), config(1)).unwrap();
    restored
        .restore_partition(&restore(home, deltas(&source, home, through)))
        .unwrap();
    assert_eq!(
        restored.identify("phone", &phone).unwrap().as_deref(),
        Some(customer.as_str()),
        "the phone came with its customer's partition"
    );
    for p in (0..PARTITIONS).filter(|p| *p != home) {
        let other = deltas(&source, p, through);
        assert!(
            other.is_empty(),
            "nothing of it in partition {p}: {} deltas",
            other.len()
        );
    }
}

/// The records a state topic partition holds for `deltas` (in commit order): each delta
/// as its records (parts of at most `part_bytes`), and after the first `folded` deltas
/// and `later` more, a checkpoint of those first ones — their keyed records, the marker
/// and tombstones of their records — as a publisher leaves it when newer deltas went out
/// before its fold. `(key, value, commit header)`.
type Record = (Vec<u8>, Option<Vec<u8>>, Option<u64>);
fn topic_of(
    partition: u32,
    deltas: &[(u64, Vec<u8>)],
    part_bytes: usize,
    folded: usize,
    later: usize,
) -> Vec<Record> {
    use processor::changelog::{records, Checkpoint, MARKER_KEY};
    let mut topic: Vec<Record> = Vec::new();
    let put = |topic: &mut Vec<Record>, commit: u64, bytes: &[u8]| {
        for (key, value) in records(commit, bytes, part_bytes) {
            topic.push((key.into_bytes(), Some(value.to_vec()), None));
        }
    };
    for (commit, bytes) in &deltas[..folded + later] {
        put(&mut topic, *commit, bytes);
    }
    let mut checkpoint = Checkpoint::new(partition, PARTITIONS, None);
    for (commit, bytes) in &deltas[..folded] {
        checkpoint.add(*commit, bytes).unwrap();
    }
    for keyed in checkpoint.fold.keyed() {
        let commit = keyed.commit;
        topic.push((keyed.record_key(), keyed.record_value(), Some(commit)));
    }
    topic.push((MARKER_KEY.to_vec(), Some(checkpoint.fold.marker().encode()), None));
    // (The fold's own record keys are those of the largest records; these were cut
    // smaller.)
    for (commit, bytes) in &deltas[..folded] {
        for (key, _) in records(*commit, bytes, part_bytes) {
            topic.push((key.into_bytes(), None, None));
        }
    }
    for (commit, bytes) in &deltas[folded + later..] {
        put(&mut topic, *commit, bytes);
    }
    topic
}

/// Each customer record in `writes` without its number.
fn unnumbered(
    mut outbox: Vec<(u64, Vec<processor::changelog::DeltaWrite>)>,
) -> Vec<(u64, Vec<processor::changelog::DeltaWrite>)> {
    use processor::changelog::Family;
    use processor::state::CustomerState;
    for write in outbox.iter_mut().flat_map(|(_, writes)| writes.iter_mut()) {
        if let (Family::Customers, Some(value)) = (write.family, write.value.as_mut()) {
            let mut state = CustomerState::decode(value).unwrap();
            state.number = processor::index::NO_NUMBER;
            *value = state.encode(None);
        }
    }
    outbox
}

/// The outbox of `partition` as `(commit, its writes)`.
fn outbox_writes(engine: &Engine, partition: u32) -> Vec<(u64, Vec<processor::changelog::DeltaWrite>)> {
    engine
        .reader()
        .changelog_deltas(partition, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(commit, bytes)| (commit, Delta::decode(&bytes).unwrap().writes))
        .collect()
}

/// A standby's copy (issue #21, `--standby-replicas`): read like a restore up to a point
/// in the middle of a delta in parts, then followed record by record — a checkpoint's
/// fold published after newer deltas among them — with each complete delta applied as it
/// arrives, while the partition stays parked (nothing of it counted or indexed). Promoted,
/// the store is what a restore of the whole topic gives: the same customers, outbox
/// take-over, positions and clock, and the same changes for the events that follow.
#[test]
fn a_standby_copy_followed_delta_by_delta_takes_over_like_a_restore() {
    use processor::changelog::Assembler;
    let stream = ordered_stream();
    let rules = rules_text();
    let third = stream.len() / 3;
    let (first, rest) = stream.split_at(third);
    let (second, last) = rest.split_at(third);
    let p = 1u32;
    let of_p = |id: &str| partition_of(id.as_bytes(), PARTITIONS) == p;

    let source_dir = TempDir::new("standby-source");
    let mut source = Engine::open(source_dir.path(), Some(&rules), config(2)).unwrap();
    ingest_all(&mut source, first.iter().map(|(_, l)| l));
    ingest_all(&mut source, second.iter().map(|(_, l)| l));
    let all_deltas = source.reader().changelog_deltas(p, 0, usize::MAX).unwrap();
    assert!(all_deltas.len() > 12, "{} deltas", all_deltas.len());
    let topic = topic_of(p, &all_deltas, 2048, all_deltas.len() / 3, 4);
    assert!(
        topic.iter().any(|(k, _, _)| k.split(|b| *b == b'/').count() == 4),
        "some deltas are in parts"
    );

    let standby_dir = TempDir::new("standby-copy");
    let mut standby = Engine::open(standby_dir.path(), Some(&rules), config(2)).unwrap();
    // Owned partitions are not copied.
    let whole = {
        let mut a = Assembler::new(p, PARTITIONS);
        for (key, value, commit) in &topic {
            a.add(key, value.as_deref(), *commit).unwrap();
        }
        a.finish().0
    };
    let err = standby.begin_standby(&whole).unwrap_err();
    assert!(err.to_string().contains("owned here"), "{err}");
    standby.park_partitions(0..PARTITIONS);
    // Read up to the middle of a delta in parts, then followed.
    let cut = topic
        .iter()
        .position(|(k, _, _)| k.starts_with(b"d/") && (k.ends_with(b"/0/2") || k.ends_with(b"/0/3")))
        .expect("a delta in parts")
        + 1;
    let mut assembler = Assembler::new(p, PARTITIONS);
    for (key, value, commit) in &topic[..cut] {
        assembler.add(key, value.as_deref(), *commit).unwrap();
    }
    let (read, mut follower) = assembler.into_follower(cut as i64);
    standby.begin_standby(&read).unwrap();
    let err = standby.apply_standby(2, &[]).unwrap_err();
    assert!(
        err.to_string().contains("no standby copy of partition 2"),
        "{err}"
    );
    for (i, (key, value, commit)) in topic.iter().enumerate().skip(cut) {
        follower
            .add(i as i64, key, value.as_deref(), *commit, None)
            .unwrap();
        if i % 7 == 0 {
            standby.apply_standby(p, &follower.take_pending()).unwrap();
        }
    }
    standby.apply_standby(p, &follower.take_pending()).unwrap();
    assert_eq!(follower.next_offset, topic.len() as i64);
    // Parked: its customers are held, not counted.
    let tag_with_members = source
        .rules()
        .defs()
        .iter()
        .map(|d| d.name.clone())
        .find(|name| {
            source
                .members(name)
                .is_ok_and(|m| m.iter().any(|(id, ..)| of_p(id)))
        })
        .expect("a tag with members of the partition");
    assert!(standby.members(&tag_with_members).unwrap().is_empty());
    // A delta out of commit order is not followed.
    let mut replay = Assembler::new(p, PARTITIONS).into_follower(0).1;
    let (k0, v0, _) = topic
        .iter()
        .find(|(k, _, _)| k.starts_with(b"d/") && k.iter().filter(|b| **b == b'/').count() == 1)
        .expect("a delta in one record");
    replay.add(0, k0, v0.as_deref(), None, None).unwrap();
    let again = replay.add(1, k0, v0.as_deref(), None, None).unwrap_err();
    assert!(again.to_string().contains("not in commit order"), "{again}");

    // Another partition comes and goes meanwhile (its drop renumbers the store's index):
    // the copy's customers stay out of it until promoted.
    standby
        .restore_partition(&restore(2, deltas(&source, 2, u64::MAX)))
        .unwrap();
    standby.discard_partition(2).unwrap();
    assert_eq!(standby.reader().live_numbers().len(), 0);

    standby.promote_standby(&follower.promotion()).unwrap();
    let restored_dir = TempDir::new("standby-restored");
    let mut restored = Engine::open(restored_dir.path(), Some(&rules), config(2)).unwrap();
    restored.restore_partition(&whole).unwrap();
    assert!(standby.reader().standby_copies().unwrap().is_empty());

    let ids: Vec<String> = source
        .customer_ids()
        .unwrap()
        .into_iter()
        .filter(|id| of_p(id))
        .collect();
    assert_eq!(views(&standby, &ids), views(&restored, &ids));
    assert_eq!(views(&standby, &ids), views(&source, &ids));
    // (Customer records as the stores' own numbers leave them: the copy's, unnumbered;
    // the restore's, numbered by the writer. A store taking them in numbers them anew.)
    // (The commit numbers differ: the standby's store numbered partition 2's take-over.)
    let writes = |engine: &Engine| -> Vec<_> {
        unnumbered(outbox_writes(engine, p))
            .into_iter()
            .map(|(_, w)| w)
            .collect()
    };
    assert!(
        writes(&standby) == writes(&restored),
        "the same take-over in the outbox"
    );
    assert!(!writes(&standby).is_empty(), "the take-over is in the outbox");
    assert_eq!(
        standby.reader().source_offsets().unwrap(),
        restored.reader().source_offsets().unwrap()
    );
    assert_eq!(standby.clock(), restored.clock());
    assert_eq!(
        standby.reader().live_numbers().len(),
        restored.reader().live_numbers().len(),
        "each customer numbered once"
    );
    assert_eq!(
        standby.members(&tag_with_members).unwrap(),
        restored.members(&tag_with_members).unwrap()
    );

    // The events that follow make the same changes in both, and in the source.
    let cut_seq = source.next_seq() - 1;
    ingest_all(&mut source, last.iter().map(|(_, l)| l));
    for engine in [&mut standby, &mut restored] {
        ingest_all(engine, last.iter().filter(|(c, _)| of_p(c)).map(|(_, l)| l));
    }
    let mut expected = changes_by_customer(&source, cut_seq);
    expected.retain(|id, _| of_p(id));
    assert!(!expected.is_empty());
    assert_eq!(changes_by_customer(&standby, 0), expected);
    assert_eq!(changes_by_customer(&restored, 0), expected);
    // Promoted for good: reopened, as it was.
    let before = views(&standby, &ids);
    drop(standby);
    let standby = Engine::open(standby_dir.path(), Some(&rules), config(1)).unwrap();
    assert_eq!(views(&standby, &ids), before);
}

/// A store reopened with a standby's copy still marked drops it when the copy is dropped,
/// and a restore of the partition replaces the copy whole.
#[test]
fn a_restore_replaces_a_standby_copy() {
    use processor::changelog::Assembler;
    let stream = ordered_stream();
    let rules = rules_text();
    let p = 2u32;
    let source_dir = TempDir::new("standby-replaced-source");
    let mut source = Engine::open(source_dir.path(), Some(&rules), config(1)).unwrap();
    ingest_all(&mut source, stream.iter().map(|(_, l)| l));
    let deltas = source.reader().changelog_deltas(p, 0, usize::MAX).unwrap();
    let half = deltas.len() / 2;
    let dir = TempDir::new("standby-replaced");
    let mut engine = Engine::open(dir.path(), Some(&rules), config(1)).unwrap();
    engine.park_partitions([p]);
    let mut assembler = Assembler::new(p, PARTITIONS);
    for (commit, bytes) in &deltas[..half] {
        assembler
            .add(format!("d/{commit}").as_bytes(), Some(bytes), None)
            .unwrap();
    }
    engine.begin_standby(&assembler.finish().0).unwrap();
    assert_eq!(engine.reader().standby_copies().unwrap(), [p]);
    engine
        .restore_partition(&restore(p, deltas.iter().map(|(_, d)| d.clone()).collect()))
        .unwrap();
    assert!(engine.reader().standby_copies().unwrap().is_empty());
    let ids: Vec<String> = source
        .customer_ids()
        .unwrap()
        .into_iter()
        .filter(|id| partition_of(id.as_bytes(), PARTITIONS) == p)
        .collect();
    assert_eq!(views(&engine, &ids), views(&source, &ids));
    // A copy dropped leaves nothing of the partition.
    engine.park_partitions([3]);
    let mut assembler = Assembler::new(3, PARTITIONS);
    for (commit, bytes) in source.reader().changelog_deltas(3, 0, usize::MAX).unwrap() {
        assembler
            .add(format!("d/{commit}").as_bytes(), Some(&bytes), None)
            .unwrap();
    }
    engine.begin_standby(&assembler.finish().0).unwrap();
    assert!(engine.reader().partition_counts(PARTITIONS).unwrap()[3] > 0);
    // Reopened, the copy stays parked: nothing of it fires, its customers are not listed.
    drop(engine);
    let mut engine = Engine::open(dir.path(), Some(&rules), config(1)).unwrap();
    assert_eq!(engine.parked_partitions(), [3]);
    let far = source.clock().unwrap() + 400 * 86_400_000;
    let fired = engine.advance_clock(far).unwrap();
    assert!(
        fired
            .iter()
            .all(|c| partition_of(c.customer_id.as_bytes(), PARTITIONS) != 3),
        "a copy's timers fired"
    );
    assert!(engine
        .customer_ids()
        .unwrap()
        .iter()
        .all(|id| partition_of(id.as_bytes(), PARTITIONS) != 3));
    assert!(engine.drop_standby_copy(3).unwrap());
    assert_eq!(engine.reader().partition_counts(PARTITIONS).unwrap()[3], 0);
    assert!(!engine.drop_standby_copy(3).unwrap());
}

/// A rule change's sweep passes over the customers of parked partitions (kept from an
/// earlier run, or a standby's copy: another node owns them and judges them) and brings
/// them up to the new rules once their partition is activated here — the same changes, in
/// the end, as a store with nothing parked.
#[test]
fn a_sweep_passes_parked_partitions_by_and_covers_them_once_activated() {
    let stream = ordered_stream();
    let rules = rules_text();
    let changed = format!("{rules}\ntag paid_once = count(payment, lifetime) >= 1\n");
    let parked_p = 1u32;
    let of = |id: &str| partition_of(id.as_bytes(), PARTITIONS);
    let sweep = |engine: &mut Engine| {
        while engine.backfill_pending() {
            engine.backfill_step(50).unwrap();
        }
    };
    let (dir, twin_dir) = (TempDir::new("sweep-parked"), TempDir::new("sweep-parked-twin"));
    let mut engine = Engine::open(dir.path(), Some(&rules), config(2)).unwrap();
    let mut twin = Engine::open(twin_dir.path(), Some(&rules), config(2)).unwrap();
    ingest_all(&mut engine, stream.iter().map(|(_, l)| l));
    ingest_all(&mut twin, stream.iter().map(|(_, l)| l));
    let before = engine.next_seq() - 1;
    assert_eq!(before, twin.next_seq() - 1);
    engine.park_partitions([parked_p]);
    engine.replace_rules(&changed).unwrap();
    twin.replace_rules(&changed).unwrap();
    sweep(&mut engine);
    sweep(&mut twin);
    let expected = changes_by_customer(&twin, before);
    assert!(
        expected.keys().any(|id| of(id) == parked_p) && expected.keys().any(|id| of(id) != parked_p),
        "the new tag changes customers of every partition"
    );
    let swept = changes_by_customer(&engine, before);
    assert!(
        swept.keys().all(|id| of(id) != parked_p),
        "a parked partition was swept"
    );
    let mut others = expected.clone();
    others.retain(|id, _| of(id) != parked_p);
    assert_eq!(swept, others);
    engine.activate_partition(parked_p);
    assert!(engine.backfill_pending(), "activated: swept again");
    sweep(&mut engine);
    assert_eq!(changes_by_customer(&engine, before), expected);
}
