#!/usr/bin/env bash
# Writes a store fixture for the upgrade test (tests/e2e/crash.rs,
# `a_backup_from_an_earlier_build_restores_and_goes_on_like_an_uninterrupted_run`): the
# first 2,600 lines of the conformance stream replayed with the example rules by the given
# tagstream binary (built from an earlier commit), then backed up with that same binary.
# Keep the binary's commit in the name; the test reads every fixture under tests/fixtures/
# whose name starts with `backup-`.
#
#   scripts/make-store-fixture.sh TAGSTREAM_BINARY COMMIT
#
# e.g. after `git worktree add /tmp/old OLDCOMMIT && (cd /tmp/old && cargo build --release)`:
#   scripts/make-store-fixture.sh /tmp/old/target/release/tagstream OLDCOMMIT
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: scripts/make-store-fixture.sh TAGSTREAM_BINARY COMMIT}
commit=${2:?usage: scripts/make-store-fixture.sh TAGSTREAM_BINARY COMMIT}
out=tests/fixtures/backup-$commit
[ -e "$out" ] && { echo "$out exists" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The test replays the rest of the stream from line 2,601 on: keep the two in step.
head -n 2600 tests/conformance/events.ndjson >"$work/first.ndjson"
"$bin" replay "$work/first.ndjson" --data-dir "$work/data" --rules tests/conformance/example.trl \
    --clock event --quiet
"$bin" backup --data-dir "$work/data" --to "$work/backup" >/dev/null
mkdir -p "$out"
# RocksDB's LOG is a diagnostic, not part of the store.
find "$work/backup" -maxdepth 1 -type f ! -name 'LOG*' -exec cp {} "$out/" \;
echo "wrote $out ($(du -sh "$out" | cut -f1)): $(tr -d '\n ' <"$out/BACKUP.json")"
