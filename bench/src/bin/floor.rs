//! The cost floor of an event (issue #17's 200k events/s goal): what every accepted event
//! costs before any rule is judged, measured with the product's own code on this machine.
//!
//! 1. **Parse**: the file's lines through `Intake::parse_batch` (the parser replay, HTTP and
//!    Kafka share), on one thread.
//! 2. **Store**: the writes the contract cannot do without, committed as the engine commits
//!    (a `SortedWrites` per batch, one `WriteBatch`, WAL fsynced, the engine's RocksDB
//!    options): the retained event (`put_event`: the timeline and rule-change backfill read
//!    it), the dedup key of an event with an `event_id`, and one customer record per customer
//!    of the batch (a fixed 64 bytes here: the real record is larger and carries the window
//!    header, and the window chunks are a further key). Nothing else: no window state, no
//!    change log, no timers, no membership index.
//! 3. **Store, grouped**: the same, but a customer's events of a batch under one key — a
//!    layout the engine does not have, measured to say what fewer keys per event would buy.
//!
//! Each phase prints wall time and the CPU time of the whole process over it (RocksDB's
//! flush and compaction threads included), per event. On a machine with C cores, a rate R
//! needs at most C / R seconds of CPU per event for everything; what the floor takes is not
//! left to evaluation.
//!
//! `floor FILE [EVENTS] [BATCH]`   (defaults: every line, 5000 — replay's batch)

use std::io::{BufRead, BufReader};
use std::time::Instant;

use bench::process_cpu_seconds;

use processor::codec::Writer;
use processor::store::{Retention, Store, CF_CUSTOMERS, CF_DEDUP, CF_EVENTS};
use processor::writes::SortedWrites;
use processor::{EventLimits, Intake, Quality};

struct Phase {
    wall: Instant,
    cpu: f64,
}

impl Phase {
    fn start() -> Phase {
        Phase {
            wall: Instant::now(),
            cpu: process_cpu_seconds(),
        }
    }

    fn report(self, name: &str, events: usize) {
        let wall = self.wall.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds() - self.cpu;
        println!(
            "{name}: {events} events, {wall:.2} s wall, {cpu:.2} s CPU: {:.2} µs CPU per event ({:.0} events/s of wall time)",
            cpu * 1e6 / events as f64,
            events as f64 / wall
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: floor FILE [EVENTS] [BATCH]");
    let limit: usize = args
        .next()
        .map_or(usize::MAX, |a| a.parse().expect("EVENTS: a number"));
    let batch: usize = args.next().map_or(5000, |a| a.parse().expect("BATCH: a number"));

    let reader = BufReader::with_capacity(1 << 20, std::fs::File::open(&file).expect("opening FILE"));
    let lines: Vec<Vec<u8>> = reader
        .split(b'\n')
        .map(|l| l.expect("reading FILE"))
        .filter(|l| !l.is_empty())
        .take(limit)
        .collect();
    println!("{} lines of {file}, batches of {batch}", lines.len());

    let intake = Intake {
        limits: EventLimits::default(),
        plan: None,
        quality: std::sync::Arc::new(Quality::default()),
        identity: None,
    };
    let phase = Phase::start();
    let mut parsed = Vec::with_capacity(lines.len());
    for chunk in lines.chunks(batch) {
        parsed.extend(intake.parse_batch(chunk, "replay"));
    }
    phase.report("parse", lines.len());
    let mut events: Vec<processor::ValidEvent> = parsed.into_iter().filter_map(Result::ok).collect();

    let mut props: Vec<rules::Props> = events
        .iter_mut()
        .map(|ev| std::mem::take(&mut ev.props))
        .collect();
    store_phase(&events, &mut props, batch, Layout::EventPerKey);
    store_phase(&events, &mut props, batch, Layout::HistoryPerCustomer);
}

/// How the store phase lays out the retained events.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// As the engine does: one `events` key per event (`put_event`).
    EventPerKey,
    /// What a layout with fewer keys would cost: one `events` key per customer per batch,
    /// holding that customer's events of the batch one after another (the dedup keys and
    /// records as above). Not what the engine does; the figure says what such a change buys.
    HistoryPerCustomer,
}

fn store_phase(events: &[processor::ValidEvent], props: &mut [rules::Props], batch: usize, layout: Layout) {
    let dir = std::env::temp_dir().join(format!("tagstream-floor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The engine's defaults: block cache and memtables of 256 MiB each, WAL synced.
    let store = Store::open(
        &dir,
        true,
        Retention {
            dedup_horizon_ms: i64::MAX,
            history_ms: i64::MAX,
            block_cache_bytes: 256 << 20,
            memtable_bytes: 256 << 20,
        },
    )
    .expect("opening the store");
    let record = [0x5au8; 64];
    let phase = Phase::start();
    let mut arrival = 0u64;
    for (chunk, chunk_props) in events.chunks(batch).zip(props.chunks_mut(batch)) {
        let mut writes = SortedWrites::default();
        // Each event's place in the batch, by customer (stable: a customer's events keep
        // their order).
        let mut order: Vec<usize> = (0..chunk.len()).collect();
        order.sort_by(|a, b| chunk[*a].customer_id.cmp(&chunk[*b].customer_id));
        let mut history = Writer::new();
        for (i, &at) in order.iter().enumerate() {
            let ev = &chunk[at];
            let event = rules::Event {
                event_type: ev.event_type.clone(),
                ts: ev.ts.unwrap_or(0),
                arrival: arrival + at as u64,
                props: std::mem::take(&mut chunk_props[at]),
            };
            match layout {
                Layout::EventPerKey => store.put_event(
                    &mut writes,
                    &ev.customer_id,
                    &event,
                    ev.event_id.as_deref(),
                    None,
                    &ev.profile,
                ),
                Layout::HistoryPerCustomer => {
                    history.i64(event.ts);
                    history.u64(event.arrival);
                    history.str(&event.event_type);
                    history.props(&event.props);
                    history.str(ev.event_id.as_deref().unwrap_or(""));
                }
            }
            chunk_props[at] = event.props;
            if let Some(id) = &ev.event_id {
                writes.put_cf(
                    store.cf(CF_DEDUP),
                    id.as_bytes(),
                    (arrival + at as u64).to_be_bytes(),
                );
            }
            let last_of_customer = order
                .get(i + 1)
                .is_none_or(|&next| chunk[next].customer_id != ev.customer_id);
            if last_of_customer {
                if layout == Layout::HistoryPerCustomer {
                    let mut key = ev.customer_id.as_bytes().to_vec();
                    key.extend_from_slice(&arrival.to_be_bytes());
                    writes.put_cf(store.cf(CF_EVENTS), &key, &history.buf);
                    history.buf.clear();
                }
                writes.put_cf(store.cf(CF_CUSTOMERS), ev.customer_id.as_bytes(), record);
            }
        }
        arrival += chunk.len() as u64;
        store.commit_sorted(writes).expect("committing");
    }
    let name = match layout {
        Layout::EventPerKey => "store, as the engine lays it out (a key per event, its dedup key, a record per customer; WAL fsynced per batch)",
        Layout::HistoryPerCustomer => "store, events grouped per customer per batch (one key per customer's events, dedup keys, records)",
    };
    phase.report(name, events.len());
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
