#!/usr/bin/env bash
# What answering a write over HTTP only once its state is in the state topic costs on a
# member of a consumer group (issue #21, docs/cluster.md "A write over HTTP is answered once
# it is in the state topic"): the latency of `POST /v1/events` on one node without Kafka,
# and on a node alone in its group with the state topic on (tansu on loopback, in-memory
# storage) — single events, then batches of 100, sequential on one keep-alive connection.
#
#   bench/http_ack.sh [REQUESTS]   (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=1000
events=1000
requests=${1:-300}
BENCH_OWN_STREAM=1
# shellcheck source=../scripts/lib/tansu.sh
. scripts/lib/tansu.sh
# shellcheck source=lib.sh
. bench/lib.sh
port=${BENCH_KAFKA_PORT:-19195}
http_single=${BENCH_PORT:-18495}
http_group=$((http_single + 1))
broker="" single="" group=""
cleanup() {
    for pid in "$single" "$group" "$broker"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
start_memory_broker "$port" "$work/tansu-http-ack.log"
create_group_topics "$port" 6
machine_line
cat >"$work/http-single.toml" <<EOF2
clock = "event"
EOF2
cat >"$work/http-group.toml" <<EOF2
clock = "event"
[engine]
partitions = 6
[kafka]
brokers = "127.0.0.1:$port"
group_id = "bench-http-ack-$$"
state_topic = "state"
members_topic = "members"
control_topic = "control"
EOF2
rm -rf "$work/http-single" "$work/http-group"
"$bin/tagstream" serve --config "$work/http-single.toml" --data-dir "$work/http-single" \
    --rules deploy/rules/example.trl --listen "127.0.0.1:$http_single" >"$work/http-single.log" 2>&1 &
single=$!
"$bin/tagstream" serve --config "$work/http-group.toml" --data-dir "$work/http-group" \
    --rules deploy/rules/example.trl --listen "127.0.0.1:$http_group" >"$work/http-group.log" 2>&1 &
group=$!
for p in "$http_single" "$http_group"; do
    until curl -sf "http://127.0.0.1:$p/readyz" >/dev/null; do sleep 0.2; done
done
python3 - "$http_single" "$http_group" "$requests" <<'PY'
import http.client, json, sys, time
single, group, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def run(port, name, per_request):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for i in range(n):
        body = "\n".join(
            json.dumps({"event_id": f"{name}-{per_request}-{i}-{k}", "customer_id": f"c{(i * per_request + k) % 997}",
                        "type": "payment", "ts": 1740000000000 + i * 1000 + k, "props": {"amount": 10}})
            for k in range(per_request))
        t = time.perf_counter()
        conn.request("POST", "/v1/events", body, {"content-type": "application/x-ndjson"})
        r = conn.getresponse()
        answer = json.loads(r.read())
        times.append((time.perf_counter() - t) * 1000)
        assert r.status == 200 and answer["accepted"] == per_request, answer
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99) - 1], sum(times) / len(times)
for per_request in (1, 100):
    for name, port in (("one node, no Kafka", single), ("alone in a group, state topic", group)):
        p50, p99, mean = run(port, name.split(",")[0].replace(" ", ""), per_request)
        print(f"  {per_request:3d} event(s) a request, {name:30s}: p50 {p50:6.2f} ms, p99 {p99:6.2f} ms, mean {mean:6.2f} ms")
PY
