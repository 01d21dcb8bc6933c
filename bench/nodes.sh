#!/usr/bin/env bash
# Throughput of one consumer group of 1, 2 and 3 nodes on this machine (issue #21): for each
# group size a generated stream is produced to a fresh events topic of PARTITIONS partitions
# on a tansu broker (in-memory storage); the nodes start together, each pinned to one core
# with `taskset` (node i to core i mod the machine's cores), with the state topic on (every
# commit also writes and publishes its changelog deltas, as in production), and consume it
# to the end. Prints, per group size and run, the time from the first event applied to the
# last and the events per second over it (the group's forming before the first event is
# left out: it is the session and rebalance timing, not work).
#
#   bench/nodes.sh [CUSTOMERS] [EVENTS] [PARTITIONS] [RUNS]   (defaults: 100000 1000000 6 3)
#
# BENCH_NODES="1 2" runs only those group sizes; BENCH_UNKEYED=1 produces the stream without
# keys (each event to a random partition), so the members forward most events to the
# owners of their customers' partitions (docs/cluster.md, "Events keyed by anything").
#
# The broker is not pinned: it shares the cores with the nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-100000}
events=${2:-1000000}
partitions=${3:-6}
runs=${4:-3}
# shellcheck source=../scripts/lib/tansu.sh
. scripts/lib/tansu.sh
# shellcheck source=lib.sh
. bench/lib.sh
lines=$(grep -cv '^[[:space:]]*$' "$stream")
cores=$(nproc)
port=${BENCH_KAFKA_PORT:-19293}
http=${BENCH_PORT:-18591}
broker=""
nodes=()
cleanup() {
    for pid in "${nodes[@]}" "$broker"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
start_memory_broker "$port" "$work/tansu-nodes.log"
topic() { create_topic "$port" "$@"; }
now() { date +%s.%N; }
machine_line
keys=()
[ -n "${BENCH_UNKEYED:-}" ] && keys=(--unkeyed)
echo "stream: $customers customers, $lines lines on $partitions partitions${keys:+, unkeyed}; nodes pinned one per core ($cores cores)"

for run in $(seq "$runs"); do
    for k in ${BENCH_NODES:-1 2 3}; do
        name=r$run-n$k
        topic "events-$name" "$partitions"
        topic "changes-$name" "$partitions"
        topic "dead-$name" 1
        topic "state-$name" "$partitions" --config cleanup.policy=compact --config retention.ms=-1
        topic "members-$name" 1 --config cleanup.policy=compact
        topic "control-$name" 1 --config cleanup.policy=compact
        "$bin/kafkaload" --brokers "127.0.0.1:$port" --topic "events-$name" --file "$stream" "${keys[@]}" >/dev/null
        config=$work/nodes-$name.toml
        cat >"$config" <<EOF
clock = "event"
[engine]
partitions = $partitions
[kafka]
brokers = "127.0.0.1:$port"
topic = "events-$name"
changes_topic = "changes-$name"
dead_letter_topic = "dead-$name"
group_id = "bench-nodes-$name-$$"
state_topic = "state-$name"
members_topic = "members-$name"
control_topic = "control-$name"
EOF
        nodes=()
        ports=()
        for i in $(seq 0 $((k - 1))); do
            dir=$work/nodes-$name-$i
            rm -rf "$dir"
            taskset -c $((i % cores)) "$bin/tagstream" serve --config "$config" --data-dir "$dir" \
                --rules deploy/rules/example.trl --listen "127.0.0.1:$((http + i))" >"$dir.log" 2>&1 &
            nodes+=($!)
            ports+=($((http + i)))
        done
        total() {
            local n=0
            for p in "${ports[@]}"; do n=$((n + $(applied "$p"))); done
            echo "$n"
        }
        until [ "$(total)" -gt 0 ]; do sleep 0.05; done
        first=$(now)
        until [ "$(total)" -ge "$lines" ]; do sleep 0.1; done
        last=$(now)
        awk -v k="$k" -v run="$run" -v s="$first" -v e="$last" -v n="$lines" \
            'BEGIN {printf "run %d, %d node(s): %.1f s, %.0f events/s\n", run, k, e - s, n / (e - s)}'
        for pid in "${nodes[@]}"; do kill "$pid" 2>/dev/null || true; done
        for pid in "${nodes[@]}"; do wait "$pid" 2>/dev/null || true; done
        nodes=()
        for i in $(seq 0 $((k - 1))); do rm -rf "$work/nodes-$name-$i"; done
    done
done
