#!/usr/bin/env bash
# The cost of access control (issue #18): lookups under ingest and a Parquet export of every
# customer, served three ways on one store —
#   open:   `[access] auth = "off"` (no key checked),
#   keys:   an API key on every request (built-in roles reader / exporter / ingest),
#   masked: keys of custom roles with reader's and exporter's permissions that see
#           `customer_id` and `profile.city` masked on every row.
# Open is one server, keys and masked another (they differ only by the key sent); the two
# servers alternate for ROUNDS rounds, and within a round the keyed and masked requests
# alternate too, so the machine's drift spreads over all three.
#
#   bench/access.sh [CUSTOMERS] [EVENTS] [ROUNDS] [ZIPF]   (defaults: 1000000 2000000 3 1.05)
#   BENCH_STORE=DIR bench/access.sh ...   uses a store already replayed whose rule set defines
#                                         `segment everyone` (the export's rows)
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

serve() { # SETTINGS: starts a server on the base store, waits until it answers
    "$bin/tagstream" serve --config "$1" --data-dir "$base" --clock wall --listen "127.0.0.1:$port" \
        --log-format json >/dev/null 2>"$work/access-serve.log" &
    server=$!
    for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return; sleep 0.2; done
    echo "the server did not start" >&2
    exit 1
}
stop() { kill "$server"; wait "$server" 2>/dev/null || true; }

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
key() { awk -v r="$1" '$1 == r {print $2}' "$base/bench-keys"; }

machine_line
echo "store: $base; lookups: 2 connections, 10 s, 10000 events/s ingested; export: every customer as Parquet with profile.city"

lookups() { # MODE [httpload key args]
    local mode=$1
    shift
    echo "$mode lookups: $("$bin/httpload" --addr "127.0.0.1:$port" --customers "$customers" \
        --connections 2 --seconds 10 --ingest-rate 10000 "$@" | tr '\n' ' ')"
}
export_once() { # MODE [curl auth args]
    local mode=$1 t
    shift
    t=$(curl -sf "$@" -o "$work/access.parquet" -w '%{time_total}' \
        "http://127.0.0.1:$port/v1/segments/everyone/members?format=parquet&fields=profile.city")
    echo "$mode export: $(stat -c %s "$work/access.parquet") bytes, $t s"
}
bearer() { echo "Authorization: Bearer $(key "$1")"; }

for round in $(seq "$rounds"); do
    echo "== round $round"
    serve "$open_settings"
    lookups open
    export_once open
    export_once open
    stop
    serve "$keyed_settings"
    lookups keys --key "$(key reader)" --ingest-key "$(key ingest)"
    lookups masked --key "$(key masked_reader)" --ingest-key "$(key ingest)"
    export_once keys -H "$(bearer exporter)"
    export_once masked -H "$(bearer masked_exporter)"
    export_once keys -H "$(bearer exporter)"
    export_once masked -H "$(bearer masked_exporter)"
    stop
done
rm -f "$work/access.parquet"
