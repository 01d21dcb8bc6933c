#!/usr/bin/env bash
# Segments benchmark (issue #6): 10M customers with 200 tags; index rebuild and open, index
# memory, a 10-tag count, tags mixed with a trait condition, exports in every format.
# The store is written once into $BENCH_DIR/segments-v2-CUSTOMERS and reused by later runs.
#
#   bench/segments.sh [CUSTOMERS] [RUNS]   (defaults: 10000000 3)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-10000000}
runs=${2:-3}
work=${BENCH_DIR:-/tmp/tagstream-bench}
# shellcheck source=../scripts/lib/prereqs.sh
. scripts/lib/prereqs.sh
cargo build --release -q -p bench --bin segmentbench
mkdir -p "$work"
for run in $(seq "$runs"); do
    echo "--- run $run"
    "$CARGO_TARGET_DIR/release/segmentbench" "$work/segments-v2-$customers" "$customers" 200
done
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
