#!/usr/bin/env bash
# Count latency in the console (issue #22: keystroke → number shown, goal p95 ≤ 150 ms at
# 10M customers): a headless Chromium types segment expressions into the segment builder at
# a person's pace (one key every 150 ms) against `tagstream serve` on a replayed store, and
# reads the console's own `tagstream:count` measures. Needs chromium and chromedriver
# (scripts/lib/chromium.sh installs them).
#
#   BENCH_STORE=DIR bench/console.sh [ROUNDS]   a store replayed with deploy/rules/example.trl
#                                               and `segment everyone` (bench/access.sh makes
#                                               one); default: bench/access.sh's store
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
customers=0
events=0
port=${BENCH_PORT:-18495}
BENCH_OWN_STREAM=1
# shellcheck source=lib.sh
. bench/lib.sh
# shellcheck source=../scripts/lib/chromium.sh
. scripts/lib/chromium.sh
store=${BENCH_STORE:-$work/access-base}
[ -d "$store" ] || { echo "no store at $store: run bench/access.sh first or set BENCH_STORE" >&2; exit 1; }
settings=$work/console-open.toml
printf '[access]\nauth = "off"\n' >"$settings"
"$bin/tagstream" serve --config "$settings" --data-dir "$store" --clock wall --listen "127.0.0.1:$port" \
    --log-format json >/dev/null 2>"$work/console-serve.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
members=$(curl -sf -X POST "http://127.0.0.1:$port/v1/segments/query" -d '{"expr": "everyone", "limit": 1}' |
    sed 's/.*"count":\([0-9]*\).*/\1/')
machine_line
echo "store: $store ($members customers); a key every 150 ms; $rounds rounds"
"$bin/consolebench" --url "http://127.0.0.1:$port/#/segments" --rounds "$rounds" \
    'everyone and not churn_risk' \
    'high_value_active or big_ticket' \
    'everyone and profile.city == "上海"' \
    'everyone and not profile.city == "上海"' \
    'winback and not profile.city in ["杭州", "上海"]' \
    'spring_promo or seafood_retarget or browser_not_buyer'
