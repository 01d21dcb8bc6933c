# Sourced by the bench/*.sh scripts after setting $customers and $events: builds the release
# binaries, generates the stream once (kept in $work for later runs) and sets $bin, $work,
# $stream. `machine_line` prints what the figures were measured on.
work=${BENCH_DIR:-/tmp/tagstream-bench}
# shellcheck source=../scripts/lib/prereqs.sh
. scripts/lib/prereqs.sh
# BENCH_BIN names a directory with binaries already built (the test command's short soak
# uses the debug build rather than compile a release one).
if [ -n "${BENCH_BIN:-}" ]; then
    bin=$BENCH_BIN
else
    cargo build --release -q -p tagstream -p bench
    bin=$CARGO_TARGET_DIR/release
fi
mkdir -p "$work"
stream=$work/stream-$customers-$events.ndjson
# A script that makes its own stream (or uses a store already replayed) sets BENCH_OWN_STREAM.
if [ -z "${BENCH_OWN_STREAM:-}" ] && [ ! -s "$stream" ]; then
    "$bin/loadgen" --customers "$customers" --events "$events" --out "$stream"
fi
# Events the server on 127.0.0.1:PORT has applied so far: accepted + duplicate + rejected,
# from its /metrics.
applied() {
    curl -sf "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk '/^tagstream_events_total|^tagstream_events_rejected_total/ {n += $2} END {print n + 0}'
}
machine_line() {
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
}
