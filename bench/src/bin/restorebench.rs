//! Restoring partitions from the state changelog (issue #21: restore time per million
//! customers). The source is a stopped store that kept the changelog and never published it
//! — `tagstream replay` with `[kafka] state_topic` set (replay connects to no broker, so its
//! outbox keeps every delta) — read partition by partition as a restoring node reads the
//! state topic, each partition restored into one new store.
//!
//! Two phases, each with wall and process CPU time: **read** (the outbox's deltas of every
//! partition decoded and gathered into a `Restore`: what a node does with the records it
//! fetches, without the network) and **apply** (`Engine::restore_partition`: the writes, the
//! timers, the membership index rebuilt).
//!
//! Then the same from the topic as checkpoints and compaction leave it (`[kafka]
//! state_checkpoint_mb`, 64 MiB by default: `CHECKPOINT_MB` in the environment): per
//! partition, the deltas up to its last checkpoint folded into keyed records (the latest
//! value of each key still held, as compaction keeps it) and the marker, plus the deltas
//! after it — its bytes, and the restore from it through the same `Assembler` a node reads
//! the topic with, into a second new store.
//!
//! `restorebench SOURCE_DIR RULES TARGET_DIR [PARTITIONS]`   (partitions: the engine's default)

use std::time::Instant;

use bench::process_cpu_seconds;

use processor::changelog::{records, Assembler, Checkpoint, Delta, Restore, MARKER_KEY, MAX_RECORD_BYTES};
use processor::{ClockMode, Engine, EngineConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: restorebench SOURCE_DIR RULES TARGET_DIR [PARTITIONS]");
        std::process::exit(2);
    }
    let rules = std::fs::read_to_string(&args[2]).expect("reading the rules");
    let partitions = args.get(4).map_or(EngineConfig::default().partitions, |p| {
        p.parse().expect("a partition count")
    });
    let config = EngineConfig {
        clock: ClockMode::Event,
        partitions,
        changelog: true,
        ..Default::default()
    };
    let checkpoint_bytes = std::env::var("CHECKPOINT_MB").ok().map_or(64.0, |mb| {
        mb.parse::<f64>().expect("CHECKPOINT_MB: a number of MiB")
    }) * 1048576.0;
    let source = Engine::open(args[1].as_ref(), Some(&rules), config.clone()).expect("opening the source");
    let reader = source.reader();
    let _ = std::fs::remove_dir_all(&args[3]);
    let mut target =
        Engine::open(args[3].as_ref(), Some(&rules), config.clone()).expect("opening the target");

    // One partition at a time, as a node restores the partitions it is given.
    let (mut read_wall, mut read_cpu, mut apply_wall, mut apply_cpu) = (0.0, 0.0, 0.0, 0.0);
    let (mut deltas, mut bytes, mut customers, mut events) = (0u64, 0u64, 0u64, 0u64);
    for p in 0..partitions {
        let (wall, cpu) = (Instant::now(), process_cpu_seconds());
        let mut restore = Restore::new(p, partitions);
        for (_, delta) in reader
            .changelog_deltas(p, 0, usize::MAX)
            .expect("reading the outbox")
        {
            bytes += delta.len() as u64;
            deltas += 1;
            restore
                .add(Delta::decode(&delta).expect("a delta"))
                .expect("a delta of this partition");
        }
        read_wall += wall.elapsed().as_secs_f64();
        read_cpu += process_cpu_seconds() - cpu;
        let (wall, cpu) = (Instant::now(), process_cpu_seconds());
        let summary = target.restore_partition(&restore).expect("restoring");
        customers += summary.customers;
        events += summary.events;
        apply_wall += wall.elapsed().as_secs_f64();
        apply_cpu += process_cpu_seconds() - cpu;
    }
    println!(
        "read: {deltas} deltas, {:.1} MB, {read_wall:.2} s wall, {read_cpu:.2} s CPU",
        bytes as f64 / 1e6
    );
    println!("apply: {customers} customers, {events} events, {apply_wall:.2} s wall, {apply_cpu:.2} s CPU");
    let total = read_wall + apply_wall;
    println!(
        "restore: {total:.2} s for {customers} customers: {:.1} s per million customers ({:.0} customers/s)",
        total * 1e6 / customers.max(1) as f64,
        customers as f64 / total
    );
    drop(target);

    // The compacted topic: what a broker keeps once checkpoints ran.
    let compacted_dir = format!("{}-compacted", args[3]);
    let _ = std::fs::remove_dir_all(&compacted_dir);
    let mut target = Engine::open(compacted_dir.as_ref(), Some(&rules), config).expect("opening the target");
    let (mut kept_records, mut kept_bytes, mut wall_total, mut cpu_total) = (0u64, 0u64, 0.0, 0.0);
    for p in 0..partitions {
        let deltas = reader
            .changelog_deltas(p, 0, usize::MAX)
            .expect("reading the outbox");
        // The last checkpoint: where the deltas since the one before reach the size.
        let (mut since, mut last) = (0.0, 0);
        for (i, (_, delta)) in deltas.iter().enumerate() {
            since += delta.len() as f64;
            if since >= checkpoint_bytes {
                (since, last) = (0.0, i + 1);
            }
        }
        let mut checkpoint = Checkpoint::new(p, partitions, None);
        for (commit, delta) in &deltas[..last] {
            checkpoint.add(*commit, delta).expect("a delta");
        }
        let mut topic: Vec<(Vec<u8>, Vec<u8>)> = checkpoint
            .fold
            .keyed()
            .filter_map(|k| k.record_value().map(|v| (k.record_key(), v)))
            .collect();
        if last > 0 {
            topic.push((MARKER_KEY.to_vec(), checkpoint.fold.marker().encode()));
        }
        drop(checkpoint);
        for (commit, delta) in &deltas[last..] {
            for (key, value) in records(*commit, delta, MAX_RECORD_BYTES) {
                topic.push((key.into_bytes(), value.to_vec()));
            }
        }
        drop(deltas);
        kept_records += topic.len() as u64;
        kept_bytes += topic.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
        let (wall, cpu) = (Instant::now(), process_cpu_seconds());
        let mut assembler = Assembler::new(p, partitions);
        for (key, value) in &topic {
            assembler.add(key, Some(value), None).expect("a record");
        }
        let (restore, _) = assembler.finish();
        target.restore_partition(&restore).expect("restoring");
        wall_total += wall.elapsed().as_secs_f64();
        cpu_total += process_cpu_seconds() - cpu;
    }
    println!(
        "compacted topic (checkpoints every {:.0} MiB): {kept_records} records, {:.1} MB (against {:.1} MB of deltas)",
        checkpoint_bytes / 1048576.0,
        kept_bytes as f64 / 1e6,
        bytes as f64 / 1e6
    );
    println!(
        "restore from it: {wall_total:.2} s wall, {cpu_total:.2} s CPU: {:.1} s per million customers",
        wall_total * 1e6 / customers.max(1) as f64
    );
}
