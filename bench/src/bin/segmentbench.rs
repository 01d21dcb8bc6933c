//! The segments benchmark: a store of N customers (default 10M) with 200 tags, then
//! - index rebuild by scan (a store without a checkpoint) and open from the checkpoint;
//! - index memory per customer;
//! - a 10-tag AND/OR/NOT count, and tags mixed with a trait or profile condition (p50/p99),
//!   judged on the profile columns;
//! - exports of a segment with every customer as Parquet, Arrow, CSV and NDJSON (rows/s).
//!
//! The store is written directly (records, numbers) rather than through the engine, which
//! would take hours at this size; every figure after that goes through the product's own
//! code: `Engine::open`, `ReadHandle::query`, the export encoder.
//!
//! Tag `tNNN` holds for a customer with probability 0.3 × 0.97^NNN (about 10 tags per
//! customer; `t000` ≈ 30%, `t150` ≈ 0.3%); tag `all` holds for everyone. Each customer has
//! the profile attribute `ltv` (0..10,000) and one payment event (amount 0..1,000, a day
//! before the clock), and the rules define `trait ltv_band = profile.ltv / 1000` and `trait
//! spend_30d = sum(payment.amount, 30d)` (which reads events: first from the store, then
//! from the trait cache).
//!
//! `segmentbench DIR [CUSTOMERS] [RUNS]`

use std::sync::Arc;
use std::time::Instant;

use processor::state::{CustomerState, Membership};
use processor::store::{Retention, Store, CF_NUMBERS};
use processor::{ClockMode, Engine, EngineConfig};
use query_api::export::{Column, Encoder, Format};
use rules::{ProfileEntry, Value};

const TAGS: usize = 200;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// When the payments happened, and the clock a day later.
const PAID_AT: i64 = 1_744_000_000_000;
const CLOCK: i64 = PAID_AT + 86_400_000;

fn rules_text() -> String {
    let mut text = String::from(
        "trait ltv_band = profile.ltv / 1000\ntrait spend_30d = sum(payment.amount, 30d)\ntag all on signup\n",
    );
    for i in 0..TAGS {
        text.push_str(&format!("tag t{i:03} on e{i:03}\n"));
    }
    text
}

fn customer_id(n: u64) -> String {
    format!("1{n:010}")
}

fn write_store(dir: &std::path::Path, customers: u64) {
    let store = Store::open(
        dir,
        false,
        Retention {
            dedup_horizon_ms: i64::MAX,
            history_ms: i64::MAX,
            block_cache_bytes: 256 << 20,
            memtable_bytes: 256 << 20,
        },
    )
    .expect("open the store");
    let names: Vec<Arc<str>> = (0..TAGS).map(|i| Arc::from(format!("t{i:03}"))).collect();
    let all: Arc<str> = Arc::from("all");
    let thresholds: Vec<u64> = (0..TAGS)
        .map(|i| (0.3 * 0.97f64.powi(i as i32) * u32::MAX as f64) as u64)
        .collect();
    let ltv: Arc<str> = Arc::from("ltv");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut wb = rocksdb::WriteBatch::default();
    // Records without window state: the first read of each builds it from the history.
    let rules = rules::CompiledRules::compile(&rules_text()).expect("the benchmark's rules");
    let started = Instant::now();
    for n in 0..customers {
        let mut state = CustomerState {
            number: n as u32,
            generation: 1,
            ..Default::default()
        };
        let membership = Membership {
            since: 1_744_000_000_000,
            expires_at: None,
        };
        state.members.insert(all.clone(), membership.clone());
        for (i, t) in thresholds.iter().enumerate() {
            if rng.next() & 0xFFFF_FFFF < *t {
                state.members.insert(names[i].clone(), membership.clone());
            }
        }
        state.history.profile.insert(
            ltv.clone(),
            ProfileEntry {
                ts: 1_744_000_000_000,
                arrival: n,
                value: Some(Value::Num((rng.next() % 10_000).into())),
            },
        );
        let id = customer_id(n);
        let payment = rules::Event {
            event_type: Arc::from("payment"),
            ts: PAID_AT,
            arrival: n,
            props: rules::Props::new(vec![("amount".into(), Value::Num((rng.next() % 1_000).into()))]),
        };
        store.put_event(&mut wb, &id, &payment, None, None, &[]);
        store.put_customer(&mut wb, &id, &mut state, &rules);
        wb.put_cf(store.cf(CF_NUMBERS), (n as u32).to_be_bytes(), id.as_bytes());
        if n % 50_000 == 49_999 {
            store.commit(std::mem::take(&mut wb)).expect("write");
        }
    }
    store.put_meta_i64(&mut wb, "clock", CLOCK);
    store.commit(wb).expect("write");
    store.flush().expect("flush");
    println!(
        "wrote {customers} customer records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn config() -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn time_query(engine: &Engine, label: &str, expr: &str, runs: usize) {
    let reader = engine.reader();
    let mut times = Vec::with_capacity(runs);
    let mut count = 0;
    for _ in 0..runs {
        let started = Instant::now();
        count = reader.query(expr, 10, None).expect("query").count;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{label}: count {count}, p50 {:.2} ms, p99 {:.2} ms ({runs} runs) — {expr}",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
}

fn time_export(engine: &Engine, format: Format) {
    let reader = engine.reader();
    let set = reader.member_set("all").expect("the segment");
    let mut encoder = Encoder::new(format, Vec::<Column>::new()).expect("encoder");
    let started = Instant::now();
    let mut bytes = encoder.header().len();
    let numbers: Vec<u32> = set.iter().collect();
    for page in numbers.chunks(8192) {
        let ids = reader.ids_of(page.iter().copied());
        bytes += encoder.page(ids, &[]).expect("encode").len();
    }
    bytes += encoder.finish().expect("finish").len();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "export {format:?}: {} rows in {secs:.2} s = {:.1} M rows/s ({:.0} MB)",
        set.len(),
        set.len() as f64 / secs / 1e6,
        bytes as f64 / 1e6
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: segmentbench DIR [CUSTOMERS] [RUNS]"));
    let customers: u64 = args.next().map_or(10_000_000, |a| a.parse().expect("CUSTOMERS"));
    let runs: usize = args.next().map_or(200, |a| a.parse().expect("RUNS"));
    if !dir.join("CURRENT").exists() {
        write_store(&dir, customers);
        let started = Instant::now();
        let engine = Engine::open(&dir, Some(&rules_text()), config()).expect("open");
        println!(
            "index rebuilt by scanning every record in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        drop(engine);
    }
    let started = Instant::now();
    let engine = Engine::open(&dir, Some(&rules_text()), config()).expect("open");
    println!(
        "engine open with the index from its checkpoint: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let memory = engine.reader().index().read().memory();
    println!(
        "index memory: {} customers, ids {:.1} B/customer, bitmaps {:.1} MB ({:.1} B/customer) in {} sets",
        memory.customers,
        memory.id_bytes as f64 / memory.customers as f64,
        memory.bitmap_bytes as f64 / 1e6,
        memory.bitmap_bytes as f64 / memory.customers as f64,
        memory.sets
    );
    println!(
        "profile columns: {:.1} MB ({:.1} B/customer)",
        memory.column_bytes as f64 / 1e6,
        memory.column_bytes as f64 / memory.customers as f64
    );
    let compile_started = Instant::now();
    for _ in 0..20 {
        rules::CompiledRules::compile(&format!("{}\nsegment q = t000 and t001\n", rules_text()))
            .expect("compiles");
    }
    println!(
        "compiling the rule set with a query: {:.2} ms",
        compile_started.elapsed().as_secs_f64() * 1000.0 / 20.0
    );
    time_query(
        &engine,
        "10-tag count",
        "(t000 or t001) and (t002 or t003 or t004) and not t005 and (t006 or t007 and not t008) or t009",
        runs,
    );
    time_query(&engine, "tag + trait (0.3% tag)", "t150 and ltv_band >= 5", runs);
    time_query(&engine, "tag + trait (1.4% tag)", "t100 and ltv_band >= 5", runs);
    time_query(
        &engine,
        "tags + trait (3 tags)",
        "(t050 or t060) and not t001 and ltv_band >= 5",
        runs.min(50),
    );
    time_query(
        &engine,
        "tag + profile (30% tag)",
        "t000 and profile.ltv >= 9000",
        runs.min(50),
    );
    // A trait that reads events: the first query reads every candidate's record and events
    // and fills the trait cache; the rest are answered from it.
    time_query(
        &engine,
        "tag + event trait, first (cold cache)",
        "t150 and spend_30d >= 500",
        1,
    );
    time_query(
        &engine,
        "tag + event trait (0.3% tag)",
        "t150 and spend_30d >= 500",
        runs,
    );
    time_query(
        &engine,
        "tag + event trait, first (cold cache)",
        "t100 and spend_30d >= 500",
        1,
    );
    time_query(
        &engine,
        "tag + event trait (1.4% tag)",
        "t100 and spend_30d >= 500",
        runs,
    );
    for format in [Format::Parquet, Format::Arrow, Format::Csv, Format::Ndjson] {
        time_export(&engine, format);
    }
}
