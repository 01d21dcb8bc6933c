#!/usr/bin/env bash
# Webhook delivery in a group of two nodes (issue #21): what delivering a subscription from
# the group's change log adds over a node delivering its own changes. Two nodes of one
# consumer group on loopback (tansu, in-memory, PARTITIONS partitions), wall clock; three
# subscriptions to one receiver: the group's (one node delivers every node's changes from
# the group log, which each node reads back from the changes topic) and one node-only
# subscription on each node (`x-tagstream-scope: node`: the node's own changes from its own
# log). The stream is produced at RATE events a second for SECONDS, each event's `ts` the
# wall clock when it is sent. Prints, per kind of subscription, the latency from a change's
# `at` (its event's `ts`, so produce → consume → commit → delivery) to the receiver, and
# the changes received.
#
#   bench/webhooks.sh [RATE] [SECONDS] [PARTITIONS]   (defaults: 2000 60 6)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-2000}
seconds=${2:-60}
partitions=${3:-6}
customers=100000
events=1000000
# shellcheck source=../scripts/lib/tansu.sh
. scripts/lib/tansu.sh
# shellcheck source=lib.sh
. bench/lib.sh
port=${BENCH_KAFKA_PORT:-19194}
http_a=${BENCH_PORT:-18495}
http_b=$((http_a + 1))
hook_port=$((http_a + 2))
broker="" a="" b="" receiver=""
cleanup() {
    for pid in "$a" "$b" "$receiver" "$broker"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
start_memory_broker "$port" "$work/tansu-webhooks.log"
create_group_topics "$port" "$partitions"
machine_line
config=$work/webhooks.toml
cat >"$config" <<EOF
[engine]
partitions = $partitions
[kafka]
brokers = "127.0.0.1:$port"
group_id = "bench-webhooks-$$"
state_topic = "state"
members_topic = "members"
control_topic = "control"
[kafka.options]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[webhooks]
allow_targets = ["127.0.0.1/32"]
EOF
samples=$work/webhook-samples.tsv
: >"$samples"
# The receiver: for every change received, the subscription, the change's `at` and when it
# arrived (ms).
python3 - "$hook_port" "$samples" <<'PY' &
import http.server, json, sys, time
port, out = int(sys.argv[1]), open(sys.argv[2], "a", buffering=1)
class Hook(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        now = time.time() * 1000
        batch = json.loads(body)
        for change in batch["changes"]:
            out.write(f'{batch["subscription"]}\t{change["at"]}\t{now:.1f}\t{change.get("partition")}\t{change.get("pseq")}\n')
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Hook).serve_forever()
PY
receiver=$!
serve() {
    "$bin/tagstream" serve --config "$config" --data-dir "$work/webhooks-$1" --rules deploy/rules/example.trl \
        --listen "127.0.0.1:$2" >"$work/webhooks-$1.log" 2>&1 &
}
rm -rf "$work/webhooks-a" "$work/webhooks-b"
serve a "$http_a"
a=$!
serve b "$http_b"
b=$!
# Both nodes own some partitions, every partition is served.
settled() {
    curl -sf "http://127.0.0.1:$1/v1/cluster" 2>/dev/null | python3 -c '
import json, sys
c = json.load(sys.stdin)
sys.exit(0 if len(c["nodes"]) == 2 and all(n["owned"] for n in c["nodes"])
         and not c["unowned_partitions"] and not any(p["restoring"] for p in c["partitions"]) else 1)'
}
until settled "$http_a" 2>/dev/null && settled "$http_b" 2>/dev/null; do sleep 0.5; done
subscribe() {
    curl -s -X POST "http://127.0.0.1:$1/v1/webhooks" -H 'content-type: application/json' "${@:2}" \
        -d "{\"url\":\"http://127.0.0.1:$hook_port/hook\",\"secret\":\"a bench webhook secret\"}" |
        python3 -c 'import json, sys; a = json.load(sys.stdin); print(a["id"]) if "id" in a else sys.exit(f"subscribing: {a}")'
}
group=$(subscribe "$http_a")
node_a=$(subscribe "$http_a" -H 'x-tagstream-scope: node')
node_b=$(subscribe "$http_b" -H 'x-tagstream-scope: node')
sleep 3
deliverer=$(curl -sf "http://127.0.0.1:$http_a/v1/webhooks" |
    python3 -c 'import json, sys; print([w for w in json.load(sys.stdin)["webhooks"] if w["id"] == int(sys.argv[1])][0]["delivered_by"])' "$group")
echo "$partitions partitions, two nodes; the group's subscription delivered by $deliverer"
echo "producing $((rate * seconds)) events at $rate/s, ts = now"
head -n $((rate * seconds)) "$stream" >"$work/webhooks-stream.ndjson"
"$bin/kafkaload" --brokers "127.0.0.1:$port" --topic events --file "$work/webhooks-stream.ndjson" \
    --rate "$rate" --now
sleep 10
python3 - "$samples" "$group" "$node_a" "$node_b" <<'PY'
import sys
samples, group, node_a, node_b = sys.argv[1], *map(int, sys.argv[2:])
by = {}
for line in open(samples):
    sub, at, arrived, partition, pseq = line.split("\t")
    by.setdefault(int(sub), []).append((float(arrived) - float(at), partition, pseq.strip()))
def summary(name, rows):
    if not rows:
        print(f"  {name:34s} nothing received")
        return
    lat = sorted(r[0] for r in rows)
    unique = len({(r[1], r[2]) for r in rows})
    q = lambda f: lat[min(len(lat) - 1, int(len(lat) * f))]
    print(f"  {name:34s} {len(rows):7d} changes ({unique} distinct): p50 {q(0.5):7.1f} ms, p99 {q(0.99):7.1f} ms, max {lat[-1]:7.1f} ms")
print("change at -> received by the webhook:")
summary("group (from the group's log)", by.get(group, []))
# Each node numbers its own subscriptions: the two node-only ones may share an id.
summary("node-only, both nodes' together", [r for sub in {node_a, node_b} for r in by.get(sub, [])])
PY
