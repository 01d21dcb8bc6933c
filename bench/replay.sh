#!/usr/bin/env bash
# File replay benchmark (issue #3): generates a stream with the load generator, replays it
# into a fresh store with the 20-definition example rules (WAL on, fsync per batch), RUNS
# times, and prints each run's throughput, peak RSS and the store's size per customer.
#
#   bench/replay.sh [CUSTOMERS] [EVENTS] [RUNS] [CONFIG]   (defaults: 1000000 10000000 3, none)
#
# CONFIG is a settings file for the replay (e.g. other `[cache]` budgets); without it the
# defaults of deploy/tagstream.toml apply.
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-1000000}
events=${2:-10000000}
runs=${3:-3}
config=()
if [ -n "${4:-}" ]; then
    config=(--config "$4")
fi
# shellcheck source=lib.sh
. bench/lib.sh
machine_line
echo "stream: $customers customers, $events events, $(du -h "$stream" | cut -f1)"
for run in $(seq "$runs"); do
    rm -rf "$work/data"
    /usr/bin/time -f "peak RSS %M KB" "$bin/tagstream" replay "$stream" --data-dir "$work/data" "${config[@]}" \
        --rules deploy/rules/example.trl --clock event --quiet --stats 2>&1 | grep -v '^rejected'
    echo "store on disk: $(du -sh "$work/data" | cut -f1) (run $run)"
done
