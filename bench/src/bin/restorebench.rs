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
//! `restorebench SOURCE_DIR RULES TARGET_DIR [PARTITIONS]`   (partitions: the engine's default)

use std::time::Instant;

use bench::process_cpu_seconds;

use processor::changelog::{Delta, Restore};
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
    let source = Engine::open(args[1].as_ref(), Some(&rules), config.clone()).expect("opening the source");
    let reader = source.reader();
    let _ = std::fs::remove_dir_all(&args[3]);
    let mut target = Engine::open(args[3].as_ref(), Some(&rules), config).expect("opening the target");

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
}
