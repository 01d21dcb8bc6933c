//! Micro-benchmarks of reading the change log back: every reader of `GET /v1/changes`, SSE,
//! webhooks, the Kafka publisher and the index replay decodes stored changes
//! (`decode_stored`), and each retention step reads the `at` of up to 50,000 of them
//! (`stored_at`).
//!
//! Run: `cargo bench -p bench --bench changes`. Results: `bench/RESULTS.md`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use processor::{Cause, Change, MemberKind, Op};

fn stored() -> Vec<Vec<u8>> {
    (0..1000u64)
        .map(|i| {
            Change {
                seq: 1_000_000 + i,
                pseq: None,
                rules_version: None,
                customer_id: format!("1300000{i:04}").into(),
                kind: if i % 3 == 0 {
                    MemberKind::Segment
                } else {
                    MemberKind::Tag
                },
                name: ["high_value_30d", "seafood_viewer", "lead_left_alone"][i as usize % 3].into(),
                op: if i % 2 == 0 { Op::Add } else { Op::Remove },
                at: 1_740_000_000_000 + i as i64 * 37,
                cause: if i % 4 == 0 {
                    Cause::Timer
                } else {
                    Cause::Event(Some(format!("ev-{i:010}")))
                },
            }
            .encode_stored(i as u32)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let changes = stored();
    c.bench_function("changes/decode_stored_1000", |b| {
        b.iter(|| {
            for bytes in &changes {
                black_box(Change::decode_stored(black_box(bytes)));
            }
        })
    });
    c.bench_function("changes/stored_at_1000", |b| {
        b.iter(|| {
            for bytes in &changes {
                black_box(Change::stored_at(black_box(bytes)));
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
