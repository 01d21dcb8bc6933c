#!/usr/bin/env bash
# Two nodes of one consumer group on loopback (issue #21): a generated stream produced to a
# tansu broker (in-memory storage) on PARTITIONS partitions, consumed by node A alone with
# the state topic on; then node B joins and restores its half from the state topic; then B
# is killed (SIGKILL) and A takes its half back. Prints
#   - the latency of ad-hoc queries (`POST /v1/segments/query`) and SQL (`POST /v1/sql`, whose
#     customers rows travel between nodes) on A alone and on A and B once they share the
#     partitions (every query then fans out to the other node): what the fan-out adds;
#   - how long B took from its start to serve its half (a restore of PARTITIONS/2 partitions);
#   - how long A took from B's kill to serve every partition again (the group's session
#     timeout, 6 s here, then a restore of B's half: read whole from the state topic, or with
#     STANDBY=1 promoted from the standby copies A keeps of B's half, reading only their tail);
#   - how long A, restarted (SIGTERM, start), took to serve its kept partitions again: each
#     is checked against the state topic before it is resumed (no restore).
#
#   [STANDBY=1] bench/cluster.sh [CUSTOMERS] [EVENTS] [QUERIES] [PARTITIONS]   (defaults: 100000 1000000 300 6)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-100000}
events=${2:-1000000}
queries=${3:-300}
partitions=${4:-6}
standby=${STANDBY:-0}
# shellcheck source=../scripts/lib/tansu.sh
. scripts/lib/tansu.sh
# shellcheck source=lib.sh
. bench/lib.sh
lines=$(grep -cv '^[[:space:]]*$' "$stream")
port=${BENCH_KAFKA_PORT:-19193}
http_a=${BENCH_PORT:-18491}
http_b=$((http_a + 1))
broker="" a="" b=""
cleanup() {
    for pid in "$a" "$b" "$broker"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
start_memory_broker "$port" "$work/tansu-cluster.log"
create_group_topics "$port" "$partitions"
"$bin/kafkaload" --brokers "127.0.0.1:$port" --topic events --file "$stream"
machine_line
echo "stream: $customers customers, $lines lines on $partitions partitions"
config=$work/cluster.toml
cat >"$config" <<EOF
clock = "event"
[engine]
partitions = $partitions
[kafka]
brokers = "127.0.0.1:$port"
group_id = "bench-cluster-$$"
state_topic = "state"
members_topic = "members"
control_topic = "control"
standby_replicas = $standby
[kafka.options]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
EOF
# The sum of metric $2's series on the node at port $1 (all labels, or `name{labels}` exactly).
metric() {
    curl -sf "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk -v m="$2" '{name = $1; if (index(m, "{") == 0) sub(/\{.*/, "", name)} name == m {n += $2} END {print n + 0}'
}
# Whether the node at port $1 sees $2 live nodes, each owning some partitions, and every
# partition owned and restored.
settled() {
    curl -sf "http://127.0.0.1:$1/v1/cluster" 2>/dev/null | python3 -c '
import json, sys
c = json.load(sys.stdin)
ok = (len(c["nodes"]) == int(sys.argv[1]) and all(n["owned"] for n in c["nodes"])
      and not c["unowned_partitions"] and not any(p["restoring"] for p in c["partitions"]))
sys.exit(0 if ok else 1)' "$2"
}
# Whether the node at port $1 owns and serves every partition itself.
serves_all() {
    curl -sf "http://127.0.0.1:$1/v1/cluster" 2>/dev/null | python3 -c '
import json, sys
c = json.load(sys.stdin)
me = c["nodes"][0]
sys.exit(0 if len(me["owned"]) == me["partitions"] and not me["restoring"] else 1)' 2>/dev/null
}
now() { date +%s.%N; }
serve() {
    "$bin/tagstream" serve --config "$config" --data-dir "$work/cluster-$1" --rules deploy/rules/example.trl \
        --listen "127.0.0.1:$2" >"$work/cluster-$1.log" 2>&1 &
}
# p50 / p99 / mean of QUERIES requests per expression (one keep-alive connection).
latency() {
    python3 - "$1" "$queries" <<'PY'
import http.client, json, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
cases = [
    ("bitmaps, count", "hot_lead or viewed_seafood or lead_sla_breach", 0),
    ("bitmaps, page of 100", "hot_lead or viewed_seafood or lead_sla_breach", 100),
    ("profile column, page of 100", 'profile.city == "上海"', 100),
]
conn = http.client.HTTPConnection("127.0.0.1", port)
for name, expr, limit in cases:
    body = json.dumps({"expr": expr, "limit": limit})
    times, count = [], None
    for _ in range(n):
        t = time.perf_counter()
        conn.request("POST", "/v1/segments/query", body, {"content-type": "application/json"})
        r = conn.getresponse()
        answer = json.loads(r.read())
        times.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, answer
        count = answer["count"]
    times.sort()
    print(f"  {name:30s} count {count:7d}: p50 {times[len(times) // 2]:6.2f} ms, p99 {times[int(len(times) * 0.99) - 1]:6.2f} ms, mean {sum(times) / len(times):6.2f} ms")
# SQL: every node's customers rows travel to the asked node (a tenth as many requests).
statements = [
    ("SQL, count over a tag", "select count(*) as n from customers where hot_lead"),
    ("SQL, group by a profile column", 'select "profile.city" as c, count(*) as n from customers group by 1 order by 2 desc limit 5'),
    ("SQL, the group log counted", "select count(*) as n from changes"),
]
for name, sql in statements:
    body = json.dumps({"sql": sql, "timeout_ms": 60000})
    times, rows = [], None
    for _ in range(max(n // 10, 3)):
        t = time.perf_counter()
        conn.request("POST", "/v1/sql", body, {"content-type": "application/json"})
        r = conn.getresponse()
        answer = json.loads(r.read())
        times.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, answer
        rows = answer["rows"][0]
    times.sort()
    print(f"  {name:30s} {json.dumps(rows, ensure_ascii=False)[:40]:40s}: p50 {times[len(times) // 2]:7.1f} ms, max {times[-1]:7.1f} ms")
PY
}

rm -rf "$work/cluster-a" "$work/cluster-b"
serve a "$http_a"
a=$!
while [ "$(applied "$http_a")" -lt "$lines" ]; do sleep 0.5; done
until settled "$http_a" 1; do sleep 0.2; done
echo "node A alone (every partition):"
latency "$http_a"

started=$(now)
serve b "$http_b"
b=$!
until settled "$http_a" 2 && settled "$http_b" 2; do sleep 0.1; done
joined=$(now)
awk -v s="$started" -v e="$joined" -v p="$partitions" \
    'BEGIN {printf "node B joined: from its start to both nodes serving their halves (a restore of %d partitions): %.1f s\n", p / 2, e - s}'
echo "restores on B: $(metric "$http_b" tagstream_kafka_partition_restores_total)"
echo "node A, each query fanned out to B:"
latency "$http_a"
echo "node B, each query fanned out to A:"
latency "$http_b"

if [ "$standby" -gt 0 ]; then
    # A follows a copy of each of B's partitions before B dies.
    until [ "$(metric "$http_a" tagstream_kafka_standby_partitions)" -ge $((partitions / 2)) ]; do sleep 0.2; done
    echo "standby copies on A: $(metric "$http_a" tagstream_kafka_standby_partitions), deltas applied: $(metric "$http_a" tagstream_kafka_standby_deltas_applied_total)"
fi
kill -9 "$b"
wait "$b" 2>/dev/null || true
b=""
killed=$(now)
until serves_all "$http_a"; do sleep 0.1; done
back=$(now)
awk -v s="$killed" -v e="$back" -v how="$([ "$standby" -gt 0 ] && echo "promoting its standby copies" || echo "the restore")" \
    'BEGIN {printf "node B killed: until node A serves every partition again (session timeout 6 s, then %s): %.1f s\n", how, e - s}'
echo "restores on A: read whole $(metric "$http_a" 'tagstream_kafka_partition_restores_total{from="read"}'), from standby copies $(metric "$http_a" 'tagstream_kafka_partition_restores_total{from="standby"}')"
grep -h "partition restored from the state topic" "$work/cluster-a.log" | tail -n $((partitions / 2)) | sed 's/^/  /' | cut -c1-220 || true
# B's card is presumed gone 20 s after its last refresh.
until settled "$http_a" 1; do sleep 0.5; done
echo "node A alone again:"
latency "$http_a"

# A restart keeps every partition: each is checked against the state topic (no other
# store's records after this store's position) and resumed, not restored.
kill -TERM "$a"
wait "$a" 2>/dev/null || true
restarted=$(now)
serve a "$http_a"
a=$!
until serves_all "$http_a"; do sleep 0.05; done
serving=$(now)
awk -v s="$restarted" -v e="$serving" -v p="$partitions" \
    'BEGIN {printf "node A restarted: from its start to serving its %d kept partitions (each checked against the state topic): %.2f s\n", p, e - s}'
echo "restores on A after the restart: $(metric "$http_a" tagstream_kafka_partition_restores_total), found stale: $(metric "$http_a" tagstream_kafka_partitions_fenced_total)"
grep -h "kept partition resumed" "$work/cluster-a.log" | tail -n "$partitions" | sed 's/^/  /' | cut -c1-220 || true
