#!/usr/bin/env bash
# Event -> tag change latency in wall clock mode (issue #17): `tagstream demo` streams events
# at RATE/s for SECONDS into a fresh store (WAL on, fsync per group commit), the engine
# grouping whatever has arrived into one commit; at the end the script reads
# tagstream_event_to_change_seconds and tagstream_timer_lateness_seconds from /metrics and
# prints p50/p99 (interpolated within the histogram's bucket, as Prometheus does), the
# accepted rate, the group sizes and peak RSS.
#
#   bench/latency.sh RATE [SECONDS] [CUSTOMERS] [RUNS]   (defaults: -, 60, 100000, 3)
#
# A RATE above what the engine sustains measures the maximum: the accepted rate is it.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:?usage: bench/latency.sh RATE [SECONDS] [CUSTOMERS] [RUNS]}
seconds=${2:-60}
customers=${3:-100000}
runs=${4:-3}
events=1000 # the shared stream is not used here; lib.sh builds the binaries
# shellcheck source=lib.sh
. bench/lib.sh
port=${BENCH_PORT:-18490}
machine_line
for run in $(seq "$runs"); do
    data=$work/latency-data
    rm -rf "$data"
    /usr/bin/time -f "%M" -o "$work/latency-rss" "$bin/tagstream" demo --data-dir "$data" \
        --listen "127.0.0.1:$port" --rate "$rate" --customers "$customers" \
        >"$work/latency-demo.log" 2>&1 &
    demo=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
        sleep 0.2
    done
    # Warm-up, then measure the difference between two scrapes.
    sleep 5
    curl -sf "http://127.0.0.1:$port/metrics" >"$work/latency-before.prom"
    sleep "$seconds"
    curl -sf "http://127.0.0.1:$port/metrics" >"$work/latency-after.prom"
    # SIGTERM to tagstream itself (time(1) would not pass it on), then time writes peak RSS.
    pkill -TERM -P "$demo"
    wait "$demo" || true
    python3 - "$work/latency-before.prom" "$work/latency-after.prom" "$seconds" "$run" \
        "$(cat "$work/latency-rss")" <<'PY'
import sys
sys.path.insert(0, 'bench')
from prom import parse, quantile as between
a, b = parse(open(sys.argv[1]).read()), parse(open(sys.argv[2]).read())
seconds, run, rss_kb = float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
def delta(name):
    return b.get(name, 0.0) - a.get(name, 0.0)
def quantile(metric, q):
    return between(a, b, metric, q)
accepted = delta('tagstream_events_total{result="accepted"}')
fmt = lambda v: '-' if v is None else f'{v * 1000:.1f} ms'
groups = delta('tagstream_group_commit_events_count')
print(f"run {run}: accepted {accepted / seconds:,.0f} events/s, "
      f"event->change p50 {fmt(quantile('tagstream_event_to_change_seconds', 0.5))} "
      f"p99 {fmt(quantile('tagstream_event_to_change_seconds', 0.99))} "
      f"({delta('tagstream_event_to_change_seconds_count'):,.0f} changes), "
      f"timer lateness p99 {fmt(quantile('tagstream_timer_lateness_seconds', 0.99))}, "
      f"{delta('tagstream_group_commit_events_sum') / max(groups, 1):,.0f} events per group commit, "
      f"peak RSS {rss_kb / 1024:,.0f} MB")
PY
done
