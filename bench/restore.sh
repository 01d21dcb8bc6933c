#!/usr/bin/env bash
# Restoring from the state changelog (issue #21): replays a generated stream into a store
# that keeps the changelog (`bench/restore/changelog.toml`: `[kafka] state_topic` set; replay
# connects to no broker, so the outbox keeps every delta), then `restorebench` reads every
# partition's deltas and restores them into a new store. Prints the replay's rate (what
# keeping the changelog costs, next to `bench/replay.sh` on the same stream) and the
# restore's time per million customers, then the same from the topic as checkpoints and
# compaction leave it (`CHECKPOINT_MB`, default 64: `[kafka] state_checkpoint_mb`).
#
#   bench/restore.sh [CUSTOMERS] [EVENTS]   (defaults: 100000 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
customers=${1:-100000}
events=${2:-1000000}
# shellcheck source=lib.sh
. bench/lib.sh
machine_line
echo "stream: $customers customers, $events events, $(du -h "$stream" | cut -f1)"
rm -rf "$work/changelog-data" "$work/restored-data"
/usr/bin/time -f "peak RSS %M KB" "$bin/tagstream" replay "$stream" --data-dir "$work/changelog-data" \
    --config bench/restore/changelog.toml --rules deploy/rules/example.trl --clock event --quiet --stats 2>&1 |
    grep -v '^rejected'
echo "store on disk with the outbox: $(du -sh "$work/changelog-data" | cut -f1)"
/usr/bin/time -f "peak RSS %M KB" "$bin/restorebench" "$work/changelog-data" deploy/rules/example.trl "$work/restored-data"
echo "restored store on disk: $(du -sh "$work/restored-data" | cut -f1)"
