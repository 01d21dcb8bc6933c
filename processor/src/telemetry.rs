//! The engine's telemetry, with fixed names and low-cardinality labels
//! (`tagstream_<what>_<unit>`, never a customer id as a label), counted per batch.
//! Whoever drives the engine (the service loop, a file replay) records through here, so
//! every edge — HTTP, Kafka, the demo — reports the same numbers.

use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};

use crate::{Engine, FiredTimers, IngestOutcome, ReadHandle};

/// One ingest call's results: events by result, rejections by code, the time the engine
/// spent on its group, and the event-to-change latency from `received` (when the request
/// arrived, so queueing, parsing and waiting for the group count) once per change.
pub fn record_ingest(outcome: &IngestOutcome, applied_in: Duration, received: Instant) {
    counter!("tagstream_events_total", "result" => "accepted").increment(outcome.accepted as u64);
    counter!("tagstream_events_total", "result" => "duplicate").increment(outcome.duplicates as u64);
    for e in &outcome.errors {
        counter!("tagstream_events_rejected_total", "reason" => e.code).increment(1);
    }
    histogram!("tagstream_batch_apply_seconds").record(applied_in.as_secs_f64());
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

/// Gauges of the engine's own state, set after each job.
pub fn engine_gauges(engine: &Engine) {
    gauge!("tagstream_timers_pending").set(engine.pending_timers() as f64);
    gauge!("tagstream_backfill_pending").set(if engine.backfill_pending() { 1.0 } else { 0.0 });
    let progress = engine.backfill_progress();
    gauge!("tagstream_backfill_customers_done").set(progress.map_or(0.0, |p| p.customers_done as f64));
    gauge!("tagstream_backfill_customers_estimated")
        .set(progress.map_or(0.0, |p| p.customers_estimated as f64));
    gauge!("tagstream_change_log_next_seq").set(engine.next_seq() as f64);
}

/// Gauges of the store and the membership index (read when `/metrics` is scraped).
pub fn store_gauges(reader: &ReadHandle) {
    let store = reader.store();
    gauge!("tagstream_rocksdb_sst_bytes").set(store.approximate_size() as f64);
    gauge!("tagstream_rocksdb_pending_compaction_bytes").set(store.pending_compaction_bytes() as f64);
    gauge!("tagstream_rocksdb_running_compactions").set(store.running_compactions() as f64);
    gauge!("tagstream_rocksdb_memtable_bytes").set(store.memtable_bytes() as f64);
    gauge!("tagstream_rocksdb_table_readers_bytes").set(store.table_readers_bytes() as f64);
    gauge!("tagstream_rocksdb_block_cache_bytes").set(store.block_cache_bytes() as f64);
    if let Some((free, total)) = store.disk_space() {
        gauge!("tagstream_disk_free_bytes").set(free as f64);
        gauge!("tagstream_disk_total_bytes").set(total as f64);
    }
    let index = reader.index().read().memory();
    gauge!("tagstream_index_customers").set(index.customers as f64);
    gauge!("tagstream_index_id_bytes").set(index.id_bytes as f64);
    gauge!("tagstream_index_bitmap_bytes").set(index.bitmap_bytes as f64);
    gauge!("tagstream_index_sets").set(index.sets as f64);
    gauge!("tagstream_index_column_bytes").set(index.column_bytes as f64);
}

/// What a metric is, for its `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric tagstream exports, with its `# HELP` text: registered by [`describe`], listed
/// in docs/api.md (a test checks both).
pub const METRICS: &[(&str, MetricKind, &str)] = &[
    ("tagstream_build_info", MetricKind::Gauge, "Always 1; the labels say which build runs (version)."),
    ("tagstream_events_total", MetricKind::Counter, "Events ingested, by result (accepted, duplicate)."),
    ("tagstream_events_rejected_total", MetricKind::Counter, "Events rejected, by rejection code (see docs/api.md)."),
    ("tagstream_quality_violations_total", MetricKind::Counter, "Data-quality violations, by source, class, planned event type and field, and outcome (blocked or kept); see docs/rules.md."),
    ("tagstream_batch_apply_seconds", MetricKind::Histogram, "Time to apply and commit one group of ingest requests."),
    ("tagstream_group_commit_requests", MetricKind::Histogram, "Ingest requests committed together in one group commit."),
    ("tagstream_group_commit_events", MetricKind::Histogram, "Events in one group commit."),
    ("tagstream_event_to_change_seconds", MetricKind::Histogram, "From an ingest request's arrival to its tag and segment changes being committed, one sample per change."),
    ("tagstream_changes_total", MetricKind::Counter, "Tag and segment changes, by kind, cause, definition and op."),
    ("tagstream_timers_pending", MetricKind::Gauge, "Customers with a pending timer."),
    ("tagstream_timers_fired_total", MetricKind::Counter, "Timers fired."),
    ("tagstream_timer_lateness_seconds", MetricKind::Histogram, "Wall clock mode: commit time minus each fired timer's due instant."),
    ("tagstream_backfill_pending", MetricKind::Gauge, "1 while a rule change's re-evaluation runs."),
    ("tagstream_backfill_customers_done", MetricKind::Gauge, "Customers the running backfill has passed."),
    ("tagstream_backfill_customers_estimated", MetricKind::Gauge, "Customers the running backfill will pass (estimate)."),
    ("tagstream_change_log_next_seq", MetricKind::Gauge, "The seq the next change will get."),
    ("tagstream_log_oldest", MetricKind::Gauge, "The oldest entry retention left of each log (change seq, dead letter id; 0 before any was deleted)."),
    ("tagstream_log_trimmed_total", MetricKind::Counter, "Log entries deleted by retention, by log."),
    ("tagstream_engine_queue_jobs", MetricKind::Gauge, "Jobs waiting for the engine thread."),
    ("tagstream_engine_queue_capacity", MetricKind::Gauge, "Jobs the engine queue holds before HTTP answers 503."),
    ("tagstream_cache_customers", MetricKind::Gauge, "Customers in the engine's in-memory cache."),
    ("tagstream_cache_bytes", MetricKind::Gauge, "Estimated bytes of the customers in the engine's cache."),
    ("tagstream_cache_lookups_total", MetricKind::Counter, "Customers the engine used (once per event or timer), found in its cache (result=hit) or not (result=miss: read from the store, or new)."),
    ("tagstream_cache_budget_bytes", MetricKind::Gauge, "Bytes the engine's cache may hold now: [cache] memory_mb, or with bound_heap what the rest of the heap leaves of it (never under a quarter)."),
    ("tagstream_heap_bytes", MetricKind::Gauge, "Bytes the allocator holds for the process's heap (committed), as the engine last asked."),
    ("tagstream_identity_merges_total", MetricKind::Counter, "Merges of customers (identity resolution), by events or by hand."),
    ("tagstream_identity_unmerges_total", MetricKind::Counter, "Customers split off again by hand."),
    ("tagstream_identity_limit_hits_total", MetricKind::Counter, "Identifiers not attached, or merges not made, because a type's limit would break, by type."),
    ("tagstream_identity_unusable_total", MetricKind::Counter, "Identifiers that normalised to nothing (dropped, the event kept), by type."),
    ("tagstream_identity_cache_entries", MetricKind::Gauge, "Identifier lookups kept in memory."),
    ("tagstream_identity_cache_complete", MetricKind::Gauge, "1 while the identity cache holds the whole graph (a new identifier costs no read), 0 once it outgrew it."),
    ("tagstream_rocksdb_sst_bytes", MetricKind::Gauge, "On-disk size of every column family."),
    ("tagstream_rocksdb_pending_compaction_bytes", MetricKind::Gauge, "Bytes RocksDB estimates compaction still has to rewrite."),
    ("tagstream_rocksdb_running_compactions", MetricKind::Gauge, "RocksDB compactions running now."),
    ("tagstream_rocksdb_memtable_bytes", MetricKind::Gauge, "Bytes in RocksDB memtables not yet flushed."),
    ("tagstream_rocksdb_table_readers_bytes", MetricKind::Gauge, "Bytes RocksDB's open tables hold outside the block cache (filters and indexes); grows with the keys on disk."),
    ("tagstream_rocksdb_block_cache_bytes", MetricKind::Gauge, "Bytes in RocksDB's block cache ([cache] block_cache_mb)."),
    ("tagstream_disk_free_bytes", MetricKind::Gauge, "Free bytes (for unprivileged users) of the file system holding the store."),
    ("tagstream_disk_total_bytes", MetricKind::Gauge, "Size of the file system holding the store."),
    ("tagstream_index_customers", MetricKind::Gauge, "Customers numbered in the membership index."),
    ("tagstream_index_id_bytes", MetricKind::Gauge, "Bytes of the index's id table."),
    ("tagstream_index_bitmap_bytes", MetricKind::Gauge, "Bytes of the index's membership bitmaps."),
    ("tagstream_index_sets", MetricKind::Gauge, "Tags and segments with a membership bitmap."),
    ("tagstream_index_column_bytes", MetricKind::Gauge, "Bytes of the index's profile and trait columns."),
    ("tagstream_index_checkpoint_seconds", MetricKind::Histogram, "Time to write one membership index checkpoint."),
    ("tagstream_commit_write_seconds", MetricKind::Histogram, "Time RocksDB takes to write one commit's batch (WAL, fsync, memtables)."),
    ("tagstream_index_checkpoint_bytes_total", MetricKind::Counter, "Bytes written by membership index checkpoints."),
    ("tagstream_kafka_partitions_assigned", MetricKind::Gauge, "Kafka partitions this process owns."),
    ("tagstream_kafka_consumer_lag", MetricKind::Gauge, "Messages behind the high watermark, by partition."),
    ("tagstream_kafka_publish_lag_changes", MetricKind::Gauge, "Records of a feed (changes, dead letters) not yet published to Kafka."),
    ("tagstream_kafka_publish_lag_state", MetricKind::Gauge, "State changelog deltas in the outbox not yet confirmed by the broker (counted up to 1,000)."),
    ("tagstream_kafka_state_outbox_bytes", MetricKind::Gauge, "Bytes of confirmed state changelog deltas the outbox keeps until their partition's next checkpoint."),
    ("tagstream_kafka_state_checkpoints_total", MetricKind::Counter, "State changelog checkpoints published (keyed records, marker, tombstones for the deltas folded)."),
    ("tagstream_kafka_published_total", MetricKind::Counter, "Records published to Kafka, by feed."),
    ("tagstream_kafka_partitions_restoring", MetricKind::Gauge, "Partitions this member owns and is restoring from the state topic (a group of several)."),
    ("tagstream_kafka_restore_records_read", MetricKind::Gauge, "Records read so far of a partition being restored from the state topic, by partition (0 when none is)."),
    ("tagstream_kafka_partition_restores_total", MetricKind::Counter, "Partitions restored from the state topic on assignment, by how: read whole, or a standby copy's tail read and promoted."),
    ("tagstream_cluster_settings_differ", MetricKind::Gauge, "Live nodes of the group whose settings (tracking plan, identity, limits, horizons, roles) differ from this node's."),
    ("tagstream_kafka_standby_partitions", MetricKind::Gauge, "Partitions other members own that this node keeps a standby copy of, in its store and followed."),
    ("tagstream_kafka_standby_deltas_applied_total", MetricKind::Counter, "State changelog deltas applied to standby copies."),
    ("tagstream_kafka_partition_releases_total", MetricKind::Counter, "Revoked partitions released to their next owner."),
    ("tagstream_kafka_partitions_unreleased_total", MetricKind::Counter, "Revoked partitions given up unreleased, kept here, because not all of their state deltas were confirmed, by why: unleased (the lease ran out during the rebalance), timeout (30 s), error; their next owner consumes on from what the state topic has."),
    ("tagstream_kafka_partitions_fenced_total", MetricKind::Counter, "Kept partitions found stale on assignment because the state topic holds another store's records of them since this store's position (dropped and restored)."),
    ("tagstream_kafka_partitions_lost_total", MetricKind::Counter, "Partitions lost: the group expelled this node (paused past its session) and gave them to others; nothing more of them is published from here."),
    ("tagstream_kafka_state_records_fenced_total", MetricKind::Counter, "State topic records left out by a reader (restore, check, standby copy) because another store wrote them after the partition's last owner mark: a zombie's."),
    ("tagstream_kafka_lease_held", MetricKind::Gauge, "1 while this member may count itself the owner of its partitions (a synchronous commit of the current generation less than two thirds of the session ago); the state publisher waits while 0."),
    ("tagstream_kafka_forwarded_total", MetricKind::Counter, "Events read from (or posted for) a partition other than their customer's, forwarded to it through the events topic (a group of several)."),
    ("tagstream_kafka_handovers_sent_total", MetricKind::Counter, "Customers handed over from here (a merge by hand across partitions) whose frames the broker confirmed in their survivors' partitions."),
    ("tagstream_kafka_handovers_taken_total", MetricKind::Counter, "Handover frames read from this node's partitions and taken by their survivors (one taken before counts no more)."),
    ("tagstream_kafka_handovers_malformed_total", MetricKind::Counter, "Records of the events topic marked as handovers that are not handover frames: kept as dead letters."),
    ("tagstream_kafka_resolved_sent_total", MetricKind::Counter, "Records the group's identity resolver (partition 0's owner) sent: events named by their customers, and handover requests for the customers merges absorbed."),
    ("tagstream_group_log_records_total", MetricKind::Counter, "Records of the changes topic read into the group log, by outcome: added, repeated (a change made again after a take-over, left out), conflicting (another change under a number held: left out, logged), gap (numbers skipped before it), skipped (not a numbered change)."),
    ("tagstream_kafka_splits_taken_total", MetricKind::Counter, "Split frames read from this node's partitions and taken by the customers an unmerge split off (one taken before counts no more)."),
    ("tagstream_kafka_requests_applied_total", MetricKind::Counter, "Requests read from this node's partitions and applied: merges and unmerges by hand made in the identity graph, customers handed over, merges noticed by survivors and splits made or sent on at the resolver's request."),
    ("tagstream_kafka_requests_malformed_total", MetricKind::Counter, "Records of the events topic marked as requests that are not one: kept as dead letters."),
    ("tagstream_kafka_kept_partitions_dropped_total", MetricKind::Counter, "Partitions this store kept from when it owned them, dropped: another member consumed them further, or has owned them for state_cleanup_delay."),
    ("tagstream_http_requests_total", MetricKind::Counter, "HTTP requests, by route template, method and status."),
    ("tagstream_auth_failures_total", MetricKind::Counter, "Requests refused for a missing, malformed, unknown or revoked API key (401, or 429 past the address's failure budget)."),
    ("tagstream_auth_failures_unaudited_total", MetricKind::Counter, "Failed authentications past their address's budget: answered 429 and counted in that address's next audit record instead of one of their own."),
    ("tagstream_http_request_seconds", MetricKind::Histogram, "HTTP request durations, by route template and method."),
    ("tagstream_webhook_deliveries_total", MetricKind::Counter, "Webhook delivery attempts, by result."),
    ("tagstream_webhook_delivery_seconds", MetricKind::Histogram, "Duration of one webhook delivery attempt."),
    ("tagstream_webhook_lag_changes", MetricKind::Gauge, "Changes a webhook subscription has not delivered yet."),
    ("tagstream_webhook_changes_skipped_total", MetricKind::Counter, "Changes of the group's log a webhook subscription could not deliver: retention deleted them first."),
    ("process_resident_memory_bytes", MetricKind::Gauge, "Resident memory of the tagstream process."),
    ("process_virtual_memory_bytes", MetricKind::Gauge, "Virtual memory of the tagstream process."),
    ("process_cpu_seconds_total", MetricKind::Counter, "User and system CPU time of the tagstream process."),
    ("process_open_fds", MetricKind::Gauge, "Open file descriptors of the tagstream process."),
    ("process_start_time_seconds", MetricKind::Gauge, "When the tagstream process started, in seconds since the Unix epoch."),
    ("process_threads", MetricKind::Gauge, "Threads of the tagstream process."),
];

/// Registers the `# HELP` text of every metric and sets `tagstream_build_info`. Call once,
/// after installing the recorder.
pub fn describe() {
    for &(name, kind, help) in METRICS {
        match kind {
            MetricKind::Counter => metrics::describe_counter!(name, help),
            MetricKind::Gauge => metrics::describe_gauge!(name, help),
            MetricKind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
    gauge!("tagstream_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    if let Some(start) = process_start_seconds() {
        gauge!("process_start_time_seconds").set(start);
    }
}

/// The process gauges (`process_*`, as Prometheus's client libraries name them), read from
/// `/proc/self` when `/metrics` is scraped. Elsewhere than Linux they are left out.
pub fn process_gauges() {
    let Some(fields) = self_stat() else {
        return;
    };
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let ticks = clock_ticks_per_second();
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        counter!("process_cpu_seconds_total").absolute(((utime + stime) / ticks) as u64);
    }
    if let Some(threads) = field(20) {
        gauge!("process_threads").set(threads);
    }
    if let Some(vsize) = field(23) {
        gauge!("process_virtual_memory_bytes").set(vsize);
    }
    if let Some(rss_pages) = field(24) {
        gauge!("process_resident_memory_bytes").set(rss_pages * page_size());
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge!("process_open_fds").set(fds.count() as f64);
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn page_size() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as f64
    } else {
        4096.0
    }
}

/// The fields of /proc/self/stat after the command name (which may hold spaces, in
/// parentheses): index 0 is field 3, the state.
fn self_stat() -> Option<Vec<String>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// The process's start, from its start tick (field 22 of /proc/self/stat) and the boot time.
fn process_start_seconds() -> Option<f64> {
    let start_ticks: f64 = self_stat()?.get(22 - 3)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot + start_ticks / clock_ticks_per_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented_once() {
        let docs = [
            include_str!("../../docs/api.md"),
            include_str!("../../docs/kafka.md"),
        ]
        .concat();
        let mut names: Vec<&str> = METRICS.iter().map(|m| m.0).collect();
        for name in &names {
            assert!(
                docs.contains(&format!("`{name}")),
                "{name} is not in docs/api.md or docs/kafka.md"
            );
        }
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a metric is listed twice");
    }

    #[test]
    fn the_process_gauges_read_this_process() {
        assert!(process_start_seconds().is_some_and(|s| s > 1.6e9));
        assert!(clock_ticks_per_second() > 0.0 && page_size() >= 4096.0);
    }
}
