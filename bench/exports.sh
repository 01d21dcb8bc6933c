#!/usr/bin/env bash
# Parquet export time and size for number columns (issue #19: exact decimals in exports).
# Times 5 exports of the `winback` members with three number traits from a copy of the store
# the last bench/replay.sh or bench/quality.sh run left in /tmp/tagstream-bench/data.
#
#   bench/exports.sh BINARY PORT LABEL
set -euo pipefail
exe=$1; port=$2; label=$3
rm -rf /tmp/export-store; cp -r /tmp/tagstream-bench/data /tmp/export-store
"$exe" serve --data-dir /tmp/export-store --rules deploy/rules/example.trl --clock event --listen 127.0.0.1:$port > /tmp/export-serve.log 2>&1 &
pid=$!
for i in $(seq 50); do curl -sf http://127.0.0.1:$port/readyz >/dev/null 2>&1 && break; sleep 0.2; done
members=$(curl -s "http://127.0.0.1:$port/v1/segments/winback/members?format=ndjson" | wc -l)
for run in 1 2 3 4 5; do
  t=$(curl -s -o /tmp/export.parquet -w '%{time_total}' "http://127.0.0.1:$port/v1/segments/winback/members?format=parquet&fields=ltv_90d,spend_30d,avg_order")
  echo "$label run $run: $members members, $(stat -c %s /tmp/export.parquet) bytes, $t s"
done
kill $pid; wait $pid 2>/dev/null || true
