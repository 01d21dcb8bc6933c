#!/usr/bin/env bash
# The cost of a tracking plan (issue #19): replays the same stream into a fresh store with
# the example rules, alternately without a plan and with the 20-type example plan in block
# mode (deploy/rules/example-plan.toml, which every generated event fits), RUNS pairs, and
# prints each run's throughput and the CPU seconds it used (user + system, all threads).
# Alternating pairs keep a noisy machine's drift out of the comparison; quote the medians.
# OLD_BIN=DIR adds a run of another build (no plan) to each round, for a paired comparison.
#
#   bench/quality.sh [CUSTOMERS] [EVENTS] [RUNS]   (defaults: 100000 1000000 5)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-100000}
events=${2:-1000000}
runs=${3:-5}
. bench/lib.sh
machine_line
echo "stream: $customers customers, $events events, $(du -h "$stream" | cut -f1)"
run() {
    local exe=$1
    shift
    rm -rf "$work/data"
    /usr/bin/time -f "cpu %U %S" "$exe" replay "$stream" --data-dir "$work/data" --rules deploy/rules/example.trl \
        --clock event --quiet "$@" 2>&1 | grep -E '^(replayed|cpu)' |
        awk '/^replayed/ {rate = $(NF-1) " events/s"} /^cpu/ {cpu = $2 + $3} END {printf "%s, %.1f CPU s\n", rate, cpu}'
}
for i in $(seq "$runs"); do
    if [ -n "${OLD_BIN:-}" ]; then
        echo "run $i: old build, no plan: $(run "$OLD_BIN/tagstream")"
    fi
    echo "run $i: no plan: $(run "$bin/tagstream")"
    echo "run $i: plan:    $(run "$bin/tagstream" --tracking-plan deploy/rules/example-plan.toml)"
done
