//! The group's identity resolver (issue #21, `docs/design/cluster.md` §6): partition 0's
//! owner resolves every event with `ids` of the whole group, in that partition's order — the
//! one serial step of a group. This measures how many events a second a store resolves as
//! the resolver (the graph changed, the event and the handover requests kept in its outbox,
//! then deleted as a member does once the broker confirmed them; nothing applied), beside the
//! same store resolving and applying them as a node alone does, on the same stream.
//!
//! `resolverbench STREAM RULES DATA_DIR [BATCH] [RUNS]`   (defaults: 1000 events a batch, 3 runs)
//!
//! Each run, each arm a fresh store under `DATA_DIR`, WAL on; the arms alternate.

use std::time::Instant;

use bench::process_cpu_seconds;
use processor::{ClockMode, Engine, EngineConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: resolverbench STREAM RULES DATA_DIR [BATCH] [RUNS]");
        std::process::exit(2);
    }
    let lines: Vec<String> = std::fs::read_to_string(&args[1])
        .expect("reading the stream")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let rules = std::fs::read_to_string(&args[2]).expect("reading the rules");
    let dir = std::path::PathBuf::from(&args[3]);
    let batch: usize = args.get(4).map_or(1000, |b| b.parse().expect("a batch size"));
    let runs: usize = args.get(5).map_or(3, |r| r.parse().expect("a run count"));
    println!("{} events, batches of {batch}", lines.len());
    for run in 1..=runs {
        // `ARM=resolver` or `ARM=alone` runs one (for a profile).
        let arm = std::env::var("ARM").unwrap_or_default();
        for resolver in [false, true] {
            if !arm.is_empty() && (arm == "resolver") != resolver {
                continue;
            }
            let data = dir.join(if resolver { "resolver" } else { "alone" });
            let _ = std::fs::remove_dir_all(&data);
            let config = EngineConfig {
                clock: ClockMode::Event,
                clock_per_partition: resolver,
                changelog: resolver,
                resolver,
                ..Default::default()
            };
            let mut engine = Engine::open(&data, Some(&rules), config).expect("opening the store");
            let (wall, cpu) = (Instant::now(), process_cpu_seconds());
            let (mut records, mut merges) = (0usize, 0usize);
            for chunk in lines.chunks(batch) {
                let outcome = engine.ingest(chunk).expect("ingesting");
                if resolver {
                    let outbox = engine.resolver_outbox().expect("reading the outbox");
                    records += outbox.len();
                    merges += outbox
                        .iter()
                        .filter(|p| matches!(p.record, processor::ResolverRecord::HandOver(_)))
                        .count();
                    let keys: Vec<Vec<u8>> = outbox.into_iter().map(|p| p.key).collect();
                    engine.resolver_delivered(&keys).expect("deleting what was sent");
                } else {
                    merges += outcome
                        .changes
                        .iter()
                        .filter(|c| c.op == processor::Op::Merge)
                        .count();
                }
            }
            let (wall, cpu) = (wall.elapsed().as_secs_f64(), process_cpu_seconds() - cpu);
            let arm = match resolver {
                true => format!("resolver (partition 0's owner): {records} records sent"),
                false => "one store, resolved and applied".to_owned(),
            };
            println!(
                "run {run}, {arm}: {:.0} events/s, {wall:.1} s wall, {cpu:.1} s CPU, {merges} customers merged",
                lines.len() as f64 / wall
            );
        }
    }
}
