#!/usr/bin/env bash
# Lookup benchmark (issue #4): GET /v1/customers/{id} under load while ingest runs.
# Replays a generated stream into a fresh store, serves it (wall clock, WAL on), then runs
# bench/src/bin/httpload.rs RUNS times: CONNECTIONS keep-alive connections looking up
# customers back to back, while one more connection posts INGEST events/s.
#
#   bench/lookup.sh [CUSTOMERS] [EVENTS] [RUNS] [INGEST] [CONNECTIONS] [--zipf | "--top N"]
#   (defaults: 100000 1000000 3 10000 8; ids uniform over customers, or Zipf like the
#   activity, or uniform over the N busiest customers)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-100000}
events=${2:-1000000}
runs=${3:-3}
ingest=${4:-10000}
connections=${5:-8}
pick=${6:-}
port=${BENCH_PORT:-18480}
# shellcheck source=lib.sh
. bench/lib.sh
data=$work/lookup-data
rm -rf "$data"
"$bin/tagstream" replay "$stream" --data-dir "$data" --rules deploy/rules/example.trl --clock event --quiet
"$bin/tagstream" serve --data-dir "$data" --rules deploy/rules/example.trl --clock wall \
    --listen "127.0.0.1:$port" >"$work/lookup-serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.2
done
machine_line
echo "store: $customers customers, $events events replayed; lookups ${pick:---uniform}, ingest $ingest events/s"
for run in $(seq "$runs"); do
    "$bin/httpload" --addr "127.0.0.1:$port" --customers "$customers" --connections "$connections" \
        --seconds 20 --ingest-rate "$ingest" $pick
done
