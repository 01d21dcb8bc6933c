//! A partition's state is separable: listed, exported from one store and imported into
//! another — where its customers carry on exactly as if they had never moved — and dropped
//! from the store it left.

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
        ..Default::default()
    }
}

/// `gone` and every other customer of partition 1 have left `engine`.
fn assert_gone(engine: &Engine, gone: &str) {
    assert_eq!(engine.customer(gone).unwrap(), None);
    let members = engine.members("high_value_active").unwrap();
    assert!(members
        .iter()
        .all(|(id, _)| partition_of(id.as_bytes(), PARTITIONS) != 1));
}

#[test]
fn a_partition_moved_to_another_store_carries_on_as_if_it_had_stayed() {
    let stream = ordered_stream();
    let rules = rules_text();
    let (first, second) = stream.split_at(stream.len() / 2);
    let end = 1_744_732_800_000;

    // The store that keeps everything.
    let stay_dir = TempDir::new("partitions-stay");
    let mut stay = Engine::open(stay_dir.path(), Some(&rules), config(2)).unwrap();
    ingest_all(&mut stay, first.iter().map(|(_, l)| l));
    let clock = stay.clock().unwrap();
    // A customer of partition 1 whose profile is set at the clock's instant: a later update
    // at the same instant wins by arrival, in whichever store it lands.
    let probe = (0..)
        .map(|i| format!("probe-{i}"))
        .find(|id| partition_of(id.as_bytes(), PARTITIONS) == 1)
        .unwrap();
    let probe_event = |id: &str, city: &str| {
        format!(
            r#"{{"event_id":"{id}","customer_id":"{probe}","type":"app_open","ts":{clock},"profile":{{"city":"{city}"}}}}"#
        )
    };
    stay.ingest(&[probe_event("probe-1", "杭州")]).unwrap();

    let cut = stay.next_seq() - 1;

    let counts = stay.reader().partition_counts(PARTITIONS).unwrap();
    let ids = stay.customer_ids().unwrap();
    assert_eq!(counts.iter().sum::<u64>(), ids.len() as u64);
    assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
    for p in 0..PARTITIONS {
        let listed = stay
            .reader()
            .partition_customers(p, PARTITIONS, None, usize::MAX)
            .unwrap();
        assert_eq!(listed.len() as u64, counts[p as usize]);
        assert!(listed
            .iter()
            .all(|id| partition_of(id.as_bytes(), PARTITIONS) == p));
        // Paged: after the first id, one fewer.
        let rest = stay
            .reader()
            .partition_customers(p, PARTITIONS, Some(&listed[0]), usize::MAX)
            .unwrap();
        assert_eq!(rest, listed[1..]);
    }

    // Partitions 1 and 3 move to a new store, exported from a snapshot while nothing stops.
    let moved = [1u32, 3];
    let mut files = Vec::new();
    for &p in &moved {
        let mut file = Vec::new();
        let summary = stay.reader().export_partition(p, PARTITIONS, &mut file).unwrap();
        assert_eq!(summary.customers, counts[p as usize]);
        assert!(summary.events > 0 && summary.dedup_entries > 0, "{summary:?}");
        files.push(file);
    }
    let moved_dir = TempDir::new("partitions-moved");
    {
        let mut there = Engine::open(moved_dir.path(), Some(&rules), config(3)).unwrap();
        there.advance_clock(clock).unwrap();
        for file in &files {
            there.import_partition(&mut &file[..]).unwrap();
        }
    }
    // Reopened: the index rebuilt at import was checkpointed, the timers were kept.
    let mut there = Engine::open(moved_dir.path(), Some(&rules), config(1)).unwrap();
    let moved_ids: Vec<String> = ids
        .iter()
        .filter(|id| moved.contains(&partition_of(id.as_bytes(), PARTITIONS)))
        .cloned()
        .collect();
    assert_eq!(views(&there, &moved_ids), views(&stay, &moved_ids));
    for tag in [
        "high_value_active",
        "lead_sla_breach",
        "viewed_seafood",
        "spring_promo",
    ] {
        let mut theirs: Vec<String> = there.members(tag).unwrap().into_iter().map(|m| m.0).collect();
        let mut ours: Vec<String> = stay
            .members(tag)
            .unwrap()
            .into_iter()
            .map(|m| m.0)
            .filter(|id| moved.contains(&partition_of(id.as_bytes(), PARTITIONS)))
            .collect();
        theirs.sort();
        ours.sort();
        assert_eq!(theirs, ours, "members of {tag}");
    }

    // Already applied events of moved customers are still duplicates there.
    let (_, resent) = first
        .iter()
        .rev()
        .find(|(c, l)| moved.contains(&partition_of(c.as_bytes(), PARTITIONS)) && l.contains("event_id"))
        .unwrap();
    let outcome = there.ingest(&[resent]).unwrap();
    assert_eq!((outcome.accepted, outcome.duplicates), (0, 1), "{resent}");
    for engine in [&mut stay, &mut there] {
        engine.ingest(&[probe_event("probe-2", "上海")]).unwrap();
        let city = engine.customer(&probe).unwrap().unwrap().profile["city"].clone();
        assert_eq!(city, rules::Value::Str("上海".into()));
    }

    // The second half: everything into the store that kept it all; the moved customers'
    // events (resent duplicates included) into the new one.
    ingest_all(&mut stay, second.iter().map(|(_, l)| l));
    let theirs: Vec<&String> = second
        .iter()
        .filter(|(c, _)| moved.contains(&partition_of(c.as_bytes(), PARTITIONS)))
        .map(|(_, l)| l)
        .collect();
    ingest_all(&mut there, theirs);
    stay.advance_clock(end).unwrap();
    there.advance_clock(end).unwrap();

    assert_eq!(views(&there, &moved_ids), views(&stay, &moved_ids));
    let mut expected = changes_by_customer(&stay, cut);
    expected.retain(|id, _| moved.contains(&partition_of(id.as_bytes(), PARTITIONS)));
    assert!(!expected.is_empty(), "the moved customers change after the move");
    assert_eq!(changes_by_customer(&there, 0), expected);

    // The store they left drops them.
    let before = stay.reader().partition_counts(PARTITIONS).unwrap();
    let dropped = stay.drop_partition(1).unwrap();
    assert_eq!(dropped.customers, before[1]);
    assert_eq!(stay.reader().partition_counts(PARTITIONS).unwrap()[1], 0);
    let gone = moved_ids
        .iter()
        .find(|id| partition_of(id.as_bytes(), PARTITIONS) == 1)
        .unwrap();
    assert_gone(&stay, gone);
    assert!(
        stay.reader().numbers_of_partitions(&[1]).is_empty(),
        "its customers' numbers go too"
    );
    drop(stay);
    let mut stay = Engine::open(stay_dir.path(), Some(&rules), config(2)).unwrap();
    assert_gone(&stay, gone);
    assert!(
        stay.reader().numbers_of_partitions(&[1]).is_empty(),
        "also after a restart"
    );

    // Taken in again, its customers are numbered anew, each once: a group's answers for
    // the partition (a query's count, SQL's rows) count each customer once.
    let mut file = Vec::new();
    there.reader().export_partition(1, PARTITIONS, &mut file).unwrap();
    stay.import_partition(&mut &file[..]).unwrap();
    let held = stay.reader().partition_counts(PARTITIONS).unwrap()[1];
    assert!(held > 0);
    assert_eq!(stay.reader().numbers_of_partitions(&[1]).len(), held);
    assert_eq!(
        stay.reader().live_numbers().len(),
        stay.customer_ids().unwrap().len() as u64,
        "every customer the store holds, each once"
    );
}

#[test]
fn an_import_is_refused_whole_when_it_cannot_apply() {
    let stream = ordered_stream();
    let rules = rules_text();
    let dir = TempDir::new("partitions-source");
    let mut source = Engine::open(dir.path(), Some(&rules), config(2)).unwrap();
    ingest_all(&mut source, stream.iter().take(800).map(|(_, l)| l));
    let mut file = Vec::new();
    source
        .reader()
        .export_partition(2, PARTITIONS, &mut file)
        .unwrap();
    assert!(matches!(
        source
            .reader()
            .export_partition(PARTITIONS, PARTITIONS, &mut Vec::new()),
        Err(EngineError::NotFound(_))
    ));

    let target_dir = TempDir::new("partitions-target");
    let mut target = Engine::open(target_dir.path(), Some(&rules), config(2)).unwrap();
    // Cut short anywhere: refused, nothing written.
    for cut in [5, file.len() / 3, file.len() - 1] {
        let err = target.import_partition(&mut &file[..cut]).unwrap_err();
        assert!(err.to_string().contains("not a partition export"), "{err}");
        assert!(target.customer_ids().unwrap().is_empty());
    }
    // Another partition count: refused.
    let other_dir = TempDir::new("partitions-other");
    let mut other = Engine::open(
        other_dir.path(),
        Some(&rules),
        EngineConfig {
            partitions: 8,
            ..config(1)
        },
    )
    .unwrap();
    let err = other.import_partition(&mut &file[..]).unwrap_err();
    assert!(err.to_string().contains("8 partitions"), "{err}");
    // A format this version does not know (a newer one's): refused, naming both.
    let header = processor::PARTITION_EXPORT_MAGIC.len() + 4;
    assert_eq!(
        file[header..header + 2],
        [1, 3],
        "the header frame: its kind, format 3"
    );
    let mut newer = file.clone();
    newer[header + 1] = 9;
    let err = target.import_partition(&mut &newer[..]).unwrap_err();
    assert!(
        err.to_string()
            .contains("format 9; this version reads formats 1 to 3"),
        "{err}"
    );
    assert!(target.customer_ids().unwrap().is_empty());
    // Imported once (as format 2 wrote it: the same frames, a group's graph aside); a
    // second time it is already here.
    let mut older = file.clone();
    older[header + 1] = 2;
    let summary = target.import_partition(&mut &older[..]).unwrap();
    assert!(summary.customers > 0);
    let err = target.import_partition(&mut &file[..]).unwrap_err();
    assert!(err.to_string().contains("already in this store"), "{err}");
    assert_eq!(target.customer_ids().unwrap().len() as u64, summary.customers);
}

/// A partition carries its customers' identities: their identifiers, the ids merged into
/// them and what an unmerge needs go with them, and leave the store they left.
#[test]
fn a_moved_partition_takes_its_customers_identifiers_along() {
    let rules = "trait spend = sum(payment.amount, lifetime)\n";
    let dir = TempDir::new("partitions-identity");
    let mut here = Engine::open(dir.path(), Some(rules), config(2)).unwrap();
    here.ingest(&[
        r#"{"customer_id":"crm-1","type":"payment","ts":1744000000000,"props":{"amount":5}}"#,
        r#"{"type":"payment","ts":1744000001000,"ids":{"phone":"13800000001"},"props":{"amount":7}}"#,
        r#"{"customer_id":"crm-1","type":"view","ts":1744000002000,"ids":{"phone":"+86 138 0000 0001","email":"a@b.cn"}}"#,
    ])
    .unwrap();
    assert_eq!(&*here.identify("phone", "13800000001").unwrap().unwrap(), "crm-1");
    let p = partition_of(b"crm-1", PARTITIONS);
    let mut file = Vec::new();
    let summary = here.reader().export_partition(p, PARTITIONS, &mut file).unwrap();
    // The record, two identifiers (the phone, the email) and the absorbed id, a snapshot.
    assert!(summary.identity_entries >= 4, "{summary:?}");

    let there_dir = TempDir::new("partitions-identity-there");
    let mut there = Engine::open(there_dir.path(), Some(rules), config(1)).unwrap();
    there.import_partition(&mut &file[..]).unwrap();
    assert_eq!(&*there.identify("email", "A@B.cn").unwrap().unwrap(), "crm-1");
    there
        .ingest(&[
            r#"{"customer_id":"phone:13800000001","type":"payment","ts":1744000003000,"props":{"amount":1}}"#,
        ])
        .unwrap();
    let view = there.customer("crm-1").unwrap().unwrap();
    assert_eq!(view.traits["spend"].to_string(), "13");
    there
        .unmerge_customers("crm-1", &["phone:13800000001".to_owned()], None)
        .unwrap();
    assert_eq!(
        there.customer("phone:13800000001").unwrap().unwrap().traits["spend"].to_string(),
        "8"
    );

    here.drop_partition(p).unwrap();
    assert_eq!(here.identify("email", "a@b.cn").unwrap(), None);
    assert_eq!(&*here.canonical_id("phone:13800000001"), "phone:13800000001");
}

/// A partition dropped from a store and consumed there again from the start (as when the
/// state topic held nothing of it to restore) counts every event again: the dedup entries
/// of its events leave with it, as its customers and events do.
#[test]
fn a_dropped_partition_consumed_again_counts_its_events_again() {
    let rules = rules_text();
    let stream = ordered_stream();
    let of_1: Vec<&String> = stream
        .iter()
        .filter(|(customer, _)| partition_of(customer.as_bytes(), PARTITIONS) == 1)
        .map(|(_, line)| line)
        .collect();
    let ids: Vec<String> = stream
        .iter()
        .filter(|(customer, _)| partition_of(customer.as_bytes(), PARTITIONS) == 1)
        .map(|(customer, _)| customer.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let dir = TempDir::new("partition-drop-dedup");
    // A clock per partition, as a group's node has: the dropped partition's goes with it.
    let config = EngineConfig {
        clock_per_partition: true,
        ..config(1)
    };
    let mut engine = Engine::open(dir.path(), Some(&rules), config).unwrap();
    ingest_all(&mut engine, of_1.iter().copied());
    let first = views(&engine, &ids);
    let dropped = engine.drop_partition(1).unwrap();
    assert!(dropped.dedup_entries > 0, "{dropped:?}");
    ingest_all(&mut engine, of_1.iter().copied());
    assert_eq!(views(&engine, &ids), first);
}
