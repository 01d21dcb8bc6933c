#!/usr/bin/env bash
# Soak (issue #16): `tagstream demo` in wall clock mode at RATE events/s (default 47,000:
# ~70% of the live path's measured maximum, bench/RESULTS.md) for SECONDS (default 3600),
# on a fresh store with the settings of bench/soak/retention.toml (retention short enough
# that an hour shows whether disk stays bounded by it; SOAK_CONFIG names another file, or ""
# for the defaults: 400 days of history). Every INTERVAL seconds (default 10) it records
# RSS, the store's size on disk, the accepted rate, the p99 of event -> change latency and of
# timer lateness over that interval, and the engine queue, into $BENCH_DIR/soak/soak.csv,
# then prints a summary and draws soak.png (matplotlib, installed into the tools venv;
# SOAK_PLOT=0 skips it).
#
#   bench/soak.sh [SECONDS] [RATE] [CUSTOMERS]   (defaults: 3600, 47000, 100000)
#
# The demo has no Kafka: consumer lag is not part of this run (bench/kafka.sh measures the
# Kafka path; tansu's high watermarks make lag figures against it meaningless anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3600}
rate=${2:-47000}
customers=${3:-100000}
interval=${SOAK_INTERVAL:-10}
events=1000 # the shared stream is not used here; lib.sh builds the binaries
# shellcheck source=lib.sh
. bench/lib.sh
out=$work/soak
rm -rf "$out"
mkdir -p "$out"
machine_line | tee "$out/machine.txt"
settings=()
config=${SOAK_CONFIG-bench/soak/retention.toml}
if [ -n "$config" ]; then
    settings=(--config "$config")
    echo "settings: $config" | tee -a "$out/machine.txt"
fi
# A free port: the demo says which one it bound.
"$bin/tagstream" demo --data-dir "$out/data" --listen "127.0.0.1:${BENCH_PORT:-0}" --rate "$rate" \
    --customers "$customers" "${settings[@]}" >"$out/demo.log" 2>&1 &
demo=$!
trap 'kill -TERM $demo 2>/dev/null || true; wait $demo 2>/dev/null || true' EXIT
addr=
for _ in $(seq 300); do
    addr=$(sed -n 's|^tagstream listening on \(http://[^ ]*\)$|\1|p' "$out/demo.log" | head -1)
    [ -n "$addr" ] && python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "$addr/readyz" 2>/dev/null && break
    sleep 0.2
done
[ -n "$addr" ] || { cat "$out/demo.log"; echo "the demo did not start" >&2; exit 1; }
python3 bench/soak/record.py "$addr/metrics" "$out/data" "$seconds" "$interval" "$out/soak.csv"
kill -TERM $demo
wait $demo || true
trap - EXIT
python3 bench/soak/summary.py "$out/soak.csv" "$rate" | tee "$out/summary.txt"
if [ "${SOAK_PLOT:-1}" = 1 ]; then
    tools="${TAGSTREAM_TOOLS:-$HOME/.cache/tagstream-tools}"
    venv="$tools/venv"
    if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
        echo "==> installing matplotlib into $venv (for the plot)"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet 'matplotlib==3.10.7'
    fi
    "$venv/bin/python" bench/soak/plot.py "$out/soak.csv" "$out/soak.png" "$(cat "$out/machine.txt")" "$rate"
    echo "plot: $out/soak.png"
fi
