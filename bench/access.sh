#!/usr/bin/env bash
# The cost of access control (issue #18): lookups under ingest and a Parquet export of every
# customer, served three ways —
#   open:   `[access] auth = "off"` (no key checked),
#   keys:   an API key on every request (built-in roles reader / exporter / ingest),
#   masked: keys of custom roles with reader's and exporter's permissions that see
#           `customer_id` and `profile.city` masked on every row.
# Open is one server, keys and masked another (they differ only by the key sent), each on its
# own copy of the same store, both running for the whole benchmark. The three modes take
# turns request by request (exports) and run by run (lookups), in an order that rotates
# every round, so the machine's drift and the stores' warming spread over all three alike.
#
#   bench/access.sh [CUSTOMERS] [EVENTS] [ROUNDS] [ZIPF]   (defaults: 1000000 2000000 3 1.05)
#   BENCH_STORE=DIR bench/access.sh ...   uses a store already replayed whose rule set defines
#                                         `segment everyone` (the export's rows); the open
#                                         server runs on a copy of it (DIR.open, made once)
#   BENCH_EXPORTS=N                       exports per mode and round (default 3)
#   BENCH_LOOKUPS=N                       lookup runs (4 s each) per mode and round (default 3)
#
# Lookups go to a warm set of 20,000 customers of the store with no ingest meanwhile, and are measured by
# the server CPU time per lookup: a cached lookup is the cheapest request there is, so the
# per-request cost of a key check and of masking weighs the most on it, and neither disk
# reads nor compactions (which made lookup rates swing 3× between runs under ingest) blur it.
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-1000000}
events=${2:-2000000}
rounds=${3:-3}
zipf=${4:-1.05}
port=${BENCH_PORT:-18490}
BENCH_OWN_STREAM=1
# shellcheck source=lib.sh
. bench/lib.sh
base=${BENCH_STORE:-$work/access-base}
if [ ! -d "$base" ]; then
    # `everyone` is in the rule set from the first event on, so each customer enters it as
    # it arrives (a segment saved later over the API commits every member's entry at once,
    # and the backfill sweep of a changed rule set holds too much at 10M customers: see
    # RESULTS.md).
    rules=$work/access-rules.trl
    { echo 'segment everyone = not has(profile.no_such_attribute)'; cat deploy/rules/example.trl; } >"$rules"
    "$bin/loadgen" --customers "$customers" --events "$events" --zipf "$zipf" --out "$work/access-stream.ndjson"
    "$bin/tagstream" replay "$work/access-stream.ndjson" --data-dir "$base" --rules "$rules" --clock event --quiet
    rm -f "$work/access-stream.ndjson"
fi
open_settings=$work/access-open.toml
keyed_settings=$work/access-keyed.toml
printf '[access]\nauth = "off"\n' >"$open_settings"
cat >"$keyed_settings" <<'EOF'
[access.limits]
requests_per_second = 0

[access.roles.masked_reader]
permissions = ["customers_read", "segments_read", "rules_read", "quality_read"]
fields = { customer_id = "mask", city = "mask" }

[access.roles.masked_exporter]
permissions = ["segments_read", "members_export"]
fields = { customer_id = "mask", city = "mask" }
EOF

# Keys (in the store's access column family), once per store.
if [ ! -s "$base/bench-keys" ]; then
    suffix=$(date +%s)
    for role in reader exporter ingest masked_reader masked_exporter; do
        k=$("$bin/tagstream" keys create --role "$role" --name "bench-$role-$suffix" \
            --data-dir "$base" --config "$keyed_settings" 2>/dev/null)
        echo "$role $k" >>"$base/bench-keys.new"
    done
    mv "$base/bench-keys.new" "$base/bench-keys"
fi

# The open server's copy of the store, made once.
open_store=$base.open
if [ ! -d "$open_store" ]; then
    cp -a "$base" "$open_store.new"
    mv "$open_store.new" "$open_store"
fi

servers=()
serve() { # SETTINGS STORE PORT: starts a server, waits until it answers
    "$bin/tagstream" serve --config "$1" --data-dir "$2" --clock wall --listen "127.0.0.1:$3" \
        --log-format json >/dev/null 2>"$work/access-serve-$3.log" &
    servers+=($!)
    for _ in $(seq 600); do curl -sf "http://127.0.0.1:$3/healthz" >/dev/null && return; sleep 0.2; done
    echo "the server on port $3 did not start" >&2
    exit 1
}
trap 'kill "${servers[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

key() { awk -v r="$1" '$1 == r {print $2}' "$base/bench-keys"; }
open_port=$port
keyed_port=$((port + 1))

machine_line
echo "stores: $open_store (open), $base (keyed); lookups: 2 connections, 4 s a run, 20000 customers of the store, no ingest; export: every customer as Parquet with profile.city"

# MODE -> port and credentials
port_of() { if [ "$1" = open ]; then echo "$open_port"; else echo "$keyed_port"; fi; }
# The CPU time (ms) the server serving MODE has used: less disturbed by the machine's other
# work than the wall time, and without curl's.
cpu_ms() { # MODE
    local pid=${servers[0]}
    [ "$1" = open ] || pid=${servers[1]}
    awk -v hz="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / hz)}' "/proc/$pid/stat"
}
lookups() { # MODE
    local mode=$1 args=() before out requests
    case $mode in
        keys) args=(--key "$(key reader)") ;;
        masked) args=(--key "$(key masked_reader)") ;;
    esac
    before=$(cpu_ms "$mode")
    out=$("$bin/httpload" --addr "127.0.0.1:$(port_of "$mode")" --ids "$work/access-ids.txt" \
        --connections 2 --seconds 4 --ingest-rate 0 "${args[@]}" | sed -n 1p)
    requests=$(echo "$out" | sed 's/.* \([0-9]*\) requests.*/\1/')
    echo "$mode lookups: server cpu $(((($(cpu_ms "$mode") - before) * 1000000) / requests)) ns/lookup; $out"
}
export_once() { # MODE
    local mode=$1 t auth=() before
    case $mode in
        keys) auth=(-H "Authorization: Bearer $(key exporter)") ;;
        masked) auth=(-H "Authorization: Bearer $(key masked_exporter)") ;;
    esac
    before=$(cpu_ms "$mode")
    t=$(curl -sf "${auth[@]}" -o "$work/access.parquet" -w '%{time_total}' \
        "http://127.0.0.1:$(port_of "$mode")/v1/segments/everyone/members?format=parquet&fields=profile.city")
    echo "$mode export: $(stat -c %s "$work/access.parquet") bytes, server cpu $(($(cpu_ms "$mode") - before)) ms, $t s"
}

serve "$open_settings" "$open_store" "$open_port"
serve "$keyed_settings" "$base" "$keyed_port"
# The warm set: 20,000 customers of the store (phone-number ids, which need no escaping).
curl -sf "http://127.0.0.1:$open_port/v1/segments/everyone/members?format=csv&limit=40000" |
    tail -n +2 | grep -E '^[0-9]+$' | sed -n 1,20000p >"$work/access-ids.txt"
for mode in open keys masked; do export_once "$mode" >/dev/null; lookups "$mode" >/dev/null; done # warm-up, discarded

exports=${BENCH_EXPORTS:-3}
orders=("open keys masked" "keys masked open" "masked open keys")
for round in $(seq "$rounds"); do
    echo "== round $round"
    order=${orders[$(((round - 1) % 3))]}
    for _ in $(seq "$exports"); do
        for mode in $order; do export_once "$mode"; done
    done
    for _ in $(seq "${BENCH_LOOKUPS:-3}"); do
        for mode in $order; do lookups "$mode"; done
    done
done | tee "$work/access-results.txt"
rm -f "$work/access.parquet"

# Medians per mode, and each keyed mode against open.
awk '
    function median(list,    v, n, i, j, t) {
        n = split(list, v, " ")
        for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    $2 == "export:" { e[$1] = e[$1] " " $(NF - 1); c[$1] = c[$1] " " $(NF - 3) }
    $2 == "lookups:" { l[$1] = l[$1] " " $5 }
    END {
        print "== medians"
        for (m = 1; m <= 3; m++) {
            mode = m == 1 ? "open" : m == 2 ? "keys" : "masked"
            me[mode] = median(e[mode]); mc[mode] = median(c[mode]); ml[mode] = median(l[mode])
            printf "%s: export %.3f s (server cpu %d ms), lookups: server cpu %d ns each\n", mode, me[mode], mc[mode], ml[mode]
        }
        for (m = 2; m <= 3; m++) {
            mode = m == 2 ? "keys" : "masked"
            printf "%s vs open: export %+.1f%% (server cpu %+.1f%%), lookup server cpu %+.1f%%\n", mode, (me[mode] / me["open"] - 1) * 100, (mc[mode] / mc["open"] - 1) * 100, (ml[mode] / ml["open"] - 1) * 100
        }
        printf "masked vs keys: export %+.1f%% (server cpu %+.1f%%), lookup server cpu %+.1f%%\n", (me["masked"] / me["keys"] - 1) * 100, (mc["masked"] / mc["keys"] - 1) * 100, (ml["masked"] / ml["keys"] - 1) * 100
    }' "$work/access-results.txt"
