//! HTTP telemetry and the Prometheus recorder; the engine's own metrics are recorded in
//! `processor::telemetry`. Fixed names and low-cardinality labels (`tagstream_<what>_<unit>`),
//! never a customer id as a label.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process-wide Prometheus recorder (installed once; every router shares it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04,
                0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0,
            ];
            let sizes = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Prefix("tagstream_group_commit_".into()), &sizes)
                })
                // Fine around the 20 ms event -> change and 100 ms timer lateness goals, so
                // their p99s read true (not interpolated across a 50 ms wide bucket).
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("tagstream_event_to_change_seconds".into()),
                        &latency,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("tagstream_timer_lateness_seconds".into()),
                        &latency,
                    )
                })
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                processor::telemetry::describe();
            }
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the samples histograms collect into their buckets every [`UPKEEP_EVERY`]. The
/// recorder keeps every observation until a scrape or an upkeep drains it: without this, a
/// server nobody scrapes (no Prometheus yet, or one that stopped) grows by every latency it
/// records — about 100 KB a second at 50k events/s — for as long as it runs.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the metrics upkeep thread: histograms grow until scraped");
    }
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
    let elapsed = started.elapsed();
    // The access log names the route template, never the path: paths carry customer ids
    // (phone numbers), which do not belong in logs.
    tracing::info!(
        target: "tagstream::access",
        method = %method,
        route = %route,
        status = response.status().as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    histogram!("tagstream_http_request_seconds", "route" => route, "method" => method)
        .record(elapsed.as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Histograms recorded while nobody scrapes are folded into their buckets by the upkeep
    /// thread (not kept sample by sample until a scrape), and no sample is lost by it.
    #[test]
    fn histograms_are_kept_in_buckets_without_a_scrape() {
        let handle = prometheus();
        // The thread names itself once it starts: look for a while.
        let thread_names = || -> Vec<String> {
            std::fs::read_dir("/proc/self/task")
                .expect("/proc/self/task")
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|name| name.trim().to_owned())
                .collect()
        };
        let started = Instant::now();
        while !thread_names().iter().any(|n| n == "metrics-upkeep") {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "no metrics upkeep thread among {:?}",
                thread_names()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for i in 0..1000 {
            histogram!("tagstream_upkeep_test_seconds").record(f64::from(i) / 1000.0);
        }
        std::thread::sleep(UPKEEP_EVERY + std::time::Duration::from_secs(1));
        let text = handle.render();
        let count = text
            .lines()
            .find(|l| l.starts_with("tagstream_upkeep_test_seconds_count"))
            .expect("the histogram is rendered");
        assert!(count.ends_with(" 1000"), "{count}");
    }
}
