//! Telemetry with fixed names and low-cardinality labels (`tagstream_<what>_<unit>`); never
//! a customer id as a label. Counted per batch, not per event.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use processor::{Engine, EngineError, FiredTimers, IngestOutcome};

/// The process-wide Prometheus recorder (installed once; every router shares it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Ingests a batch on the engine thread (with the source positions it reaches, for Kafka)
/// and records what it did: events by result,
/// apply latency, event-to-change latency from `received` (when the batch arrived, so
/// queueing and parsing count) once per change, and the timers the batch fired.
pub fn ingest_measured<B: AsRef<[u8]>, S: AsRef<str>>(
    engine: &mut Engine,
    events: &[B],
    positions: &[(S, u64)],
    received: Instant,
) -> Result<IngestOutcome, EngineError> {
    let started = Instant::now();
    let outcome = engine.ingest_from(events, positions);
    if let Ok(o) = &outcome {
        record_ingest(o, started.elapsed(), received);
    }
    record_timers(&engine.take_fired_timers(), engine.wall_clock_ms());
    outcome
}

fn record_ingest(outcome: &IngestOutcome, elapsed: Duration, received: Instant) {
    counter!("tagstream_events_total", "result" => "accepted").increment(outcome.accepted as u64);
    counter!("tagstream_events_total", "result" => "duplicate").increment(outcome.duplicates as u64);
    for e in &outcome.errors {
        counter!("tagstream_events_rejected_total", "reason" => reason_class(&e.reason)).increment(1);
    }
    histogram!("tagstream_batch_apply_seconds").record(elapsed.as_secs_f64());
    if !outcome.changes.is_empty() {
        histogram!("tagstream_event_to_change_seconds")
            .record_many(received.elapsed().as_secs_f64(), outcome.changes.len());
    }
}

/// Timers fired by one commit. In wall clock mode lateness is the wall clock at commit minus
/// each timer's due instant (the contract allows one second); in event clock mode timers fire
/// at their exact instant and lateness is not recorded.
pub fn record_timers(fired: &FiredTimers, committed_at_wall_ms: Option<i64>) {
    counter!("tagstream_timers_fired_total").increment(fired.count);
    if let Some(wall) = committed_at_wall_ms {
        let lateness = histogram!("tagstream_timer_lateness_seconds");
        for due in &fired.due {
            lateness.record((wall - due).max(0) as f64 / 1000.0);
        }
    }
}

/// Rejection reasons with their variable parts removed, so labels stay few.
fn reason_class(reason: &str) -> &'static str {
    match reason {
        r if r.starts_with("invalid JSON") => "invalid_json",
        "not valid UTF-8" => "not_utf8",
        "not a JSON object" => "not_object",
        r if r.contains("customer_id") => "customer_id",
        r if r.contains("type") => "type",
        r if r.starts_with("ts") || r.contains("missing ts") => "ts",
        r if r.starts_with("event larger") => "too_large",
        r if r.starts_with("nested deeper") => "too_deep",
        _ => "other",
    }
}

pub fn engine_gauges(engine: &Engine) {
    gauge!("tagstream_timers_pending").set(engine.pending_timers() as f64);
    gauge!("tagstream_backfill_pending").set(if engine.backfill_pending() { 1.0 } else { 0.0 });
    let progress = engine.backfill_progress();
    gauge!("tagstream_backfill_customers_done").set(progress.map_or(0.0, |p| p.customers_done as f64));
    gauge!("tagstream_backfill_customers_estimated")
        .set(progress.map_or(0.0, |p| p.customers_estimated as f64));
    gauge!("tagstream_change_log_next_seq").set(engine.next_seq() as f64);
}

pub fn store_gauges(engine: &Engine) {
    let store = engine.store();
    gauge!("tagstream_rocksdb_sst_bytes").set(store.approximate_size() as f64);
    gauge!("tagstream_rocksdb_pending_compaction_bytes").set(store.pending_compaction_bytes() as f64);
    gauge!("tagstream_rocksdb_running_compactions").set(store.running_compactions() as f64);
    gauge!("tagstream_rocksdb_memtable_bytes").set(store.memtable_bytes() as f64);
    let index = engine.reader().index().read().memory();
    gauge!("tagstream_index_customers").set(index.customers as f64);
    gauge!("tagstream_index_id_bytes").set(index.id_bytes as f64);
    gauge!("tagstream_index_bitmap_bytes").set(index.bitmap_bytes as f64);
    gauge!("tagstream_index_sets").set(index.sets as f64);
    gauge!("tagstream_index_column_bytes").set(index.column_bytes as f64);
}

/// Counts HTTP requests by route template and status, with durations.
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    counter!("tagstream_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    histogram!("tagstream_http_request_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}
