#!/usr/bin/env bash
# The cost of access control (issue #18): lookups under ingest and a Parquet export, each
# served open (no keys), with API keys, and with API keys plus field masking (the customer id
# and a profile attribute masked on every row), on copies of one store.
#
#   bench/access.sh [CUSTOMERS] [EVENTS] [RUNS]      (defaults: 1000000 2000000 3)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-1000000}
events=${2:-2000000}
runs=${3:-3}
port=${BENCH_PORT:-18490}
# shellcheck source=lib.sh
. bench/lib.sh
base=$work/access-base
if [ ! -d "$base" ]; then
    "$bin/tagstream" replay "$stream" --data-dir "$base" --rules deploy/rules/example.trl --clock event --quiet
    # A segment of every customer, computed at once from the index: the export's rows.
    "$bin/tagstream" serve --data-dir "$base" --clock event --listen "127.0.0.1:$port" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
    curl -sf -X PUT "http://127.0.0.1:$port/v1/segments/everyone" -d '{"expr": "not has(profile.no_such_attribute)"}' >/dev/null
    kill "$server"; wait "$server" 2>/dev/null || true
fi
machine_line
echo "store: $customers customers, $events events; lookups: 2 connections, 10 s, 10000 events/s ingested; export: every customer as Parquet with profile.city"

run_mode() {
    local mode=$1 data=$work/access-$1 settings=$work/access-$1.toml
    rm -rf "$data"; cp -r "$base" "$data"
    : >"$settings"
    local lookup_args=() ingest_args=() export_auth=()
    if [ "$mode" != open ]; then
        local reader exporter ingest
        reader=$("$bin/tagstream" keys create --role reader --name bench-reader --data-dir "$data")
        exporter=$("$bin/tagstream" keys create --role exporter --name bench-exporter --data-dir "$data")
        ingest=$("$bin/tagstream" keys create --role ingest --name bench-ingest --data-dir "$data")
        lookup_args=(--key "$reader"); ingest_args=(--ingest-key "$ingest")
        export_auth=(-H "Authorization: Bearer $exporter")
        printf '[access.limits]\nrequests_per_second = 0\n' >>"$settings"
    fi
    if [ "$mode" = masked ]; then
        printf '[access.fields]\ncustomer_id = "mask"\ncity = "mask"\n' >>"$settings"
    fi
    "$bin/tagstream" serve --config "$settings" --data-dir "$data" --clock wall --listen "127.0.0.1:$port" \
        >"$work/access-serve.log" 2>&1 &
    local server=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
    for run in $(seq "$runs"); do
        echo "$mode lookups run $run:"
        "$bin/httpload" --addr "127.0.0.1:$port" --customers "$customers" \
            --connections 2 --seconds 10 --ingest-rate 10000 "${lookup_args[@]}" "${ingest_args[@]}"
    done
    for run in $(seq 5); do
        local t
        t=$(curl -s "${export_auth[@]}" -o "$work/access.parquet" -w '%{time_total}' \
            "http://127.0.0.1:$port/v1/segments/everyone/members?format=parquet&fields=profile.city")
        echo "$mode export run $run: $(stat -c %s "$work/access.parquet") bytes, $t s"
    done
    kill "$server"; wait "$server" 2>/dev/null || true
}
for mode in open keys masked; do run_mode "$mode"; done
