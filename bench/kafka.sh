#!/usr/bin/env bash
# Kafka → tags benchmark (issue #5): a generated stream produced to a tansu broker on
# loopback (in-memory storage), then consumed by `tagstream serve --kafka-brokers` into a
# fresh store with the 20-definition example rules (WAL on, fsync per batch), RUNS times.
# Prints the consume rate from the first event applied to the last, and the publish side.
#
#   bench/kafka.sh [CUSTOMERS] [EVENTS] [RUNS] [PARTITIONS]   (defaults: 100000 1000000 3 3)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-100000}
events=${2:-1000000}
runs=${3:-3}
partitions=${4:-3}
# shellcheck source=../scripts/lib/tansu.sh
. scripts/lib/tansu.sh
# shellcheck source=lib.sh
. bench/lib.sh
lines=$(grep -cv '^[[:space:]]*$' "$stream")
port=${BENCH_KAFKA_PORT:-19192}
http=${BENCH_PORT:-18490}
broker=""
server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    [ -n "$broker" ] && kill "$broker" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
start_memory_broker "$port" "$work/tansu.log"
create_topic "$port" events "$partitions"
create_topic "$port" tag-changes "$partitions"
create_topic "$port" tagstream-dead-letters 1
"$bin/kafkaload" --brokers "127.0.0.1:$port" --topic events --file "$stream"
machine_line
echo "stream: $customers customers, $lines lines on $partitions partitions"
now() { date +%s.%N; }
for run in $(seq "$runs"); do
    rm -rf "$work/kafka-data"
    "$bin/tagstream" serve --data-dir "$work/kafka-data" --rules deploy/rules/example.trl \
        --clock event --listen "127.0.0.1:$http" --kafka-brokers "127.0.0.1:$port" \
        --kafka-group "bench-$run-$$" >"$work/kafka-serve.log" 2>&1 &
    server=$!
    while [ "$(applied "$http")" = 0 ]; do sleep 0.05; done
    first=$(now)
    while [ "$(applied "$http")" -lt "$lines" ]; do sleep 0.2; done
    last=$(now)
    changes=$(curl -s "http://127.0.0.1:$http/metrics" | awk '/^tagstream_change_log_next_seq/ {print $2 - 1}')
    # Publishing runs beside consumption; wait until every change is confirmed by the broker.
    published() {
        curl -s "http://127.0.0.1:$http/metrics" |
            awk '/^tagstream_kafka_published_total\{feed="changes"\}/ {print $2 + 0}'
    }
    while [ "$(published)" -lt "$changes" ]; do sleep 0.2; done
    done_publishing=$(now)
    awk -v n="$lines" -v a="$first" -v b="$last" -v c="$changes" -v p="$done_publishing" -v r="$run" \
        'BEGIN {printf "run %d: %d events consumed in %.2f s: %.0f events/s; %d changes all published %.2f s after the first event\n", r, n, b - a, n / (b - a), c, p - a}'
    kill "$server"
    wait "$server" 2>/dev/null || true
    server=""
done
