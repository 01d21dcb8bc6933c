#!/usr/bin/env bash
# Identity resolution benchmark (issue #20): a "dirty CRM" population (each person under
# 2–7 identifiers in messy spellings, some sharing a family tablet) streams PERSONS people's
# EVENTS events, replayed RUNS times in three namings, alternating, into fresh stores with
# the example rules: by their identifiers (resolution on); by the person (resolution off,
# as a perfect upstream would send them: the strict baseline); by the first identifier
# each event carries, as sent (resolution off, what the sources make without it). Then the
# duplicate rate before and after is measured on the last resolved store.
#
#   bench/identity.sh [PERSONS] [EVENTS] [RUNS]   (defaults: 100000 1000000 3)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-100000}
events=${2:-1000000}
runs=${3:-3}
BENCH_OWN_STREAM=1
# shellcheck source=lib.sh
. bench/lib.sh
machine_line
ids=$work/dirty-$customers-$events.ids.ndjson
oracle=$work/dirty-$customers-$events.oracle.ndjson
naive=$work/dirty-$customers-$events.naive.ndjson
truth=$work/dirty-$customers-$events.truth
if [ ! -s "$naive" ]; then
    "$bin/dirtycrm" generate --persons "$customers" --events "$events" \
        --out-ids "$ids" --out-oracle "$oracle" --out-naive "$naive" --truth "$truth"
fi
echo "streams: $customers people, $events events ($(du -h "$ids" | cut -f1) with identifiers, $(du -h "$oracle" | cut -f1) by person)"
replay() {
    rm -rf "$work/identity-data"
    "$bin/tagstream" replay "$1" --data-dir "$work/identity-data" \
        --rules deploy/rules/example.trl --clock event --quiet --stats 2>&1 | grep -E 'events/s|throughput' | head -1
}
for run in $(seq "$runs"); do
    echo "run $run, off, by person:           $(replay "$oracle")"
    echo "run $run, off, by first identifier: $(replay "$naive")"
    echo "run $run, on:                       $(replay "$ids")"
done
"$bin/dirtycrm" measure --data-dir "$work/identity-data" --ids "$ids" --truth "$truth"
