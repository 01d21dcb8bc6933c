#!/usr/bin/env bash
# Copies the shared conformance sample into tests/conformance/ (see its README).
# Usage: scripts/refresh-conformance.sh SAMPLE_DIR   (the shared sample's directory, beside
# the clone on a developer's machine; the tests never read it from there)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: scripts/refresh-conformance.sh SAMPLE_DIR}"
for f in events.ndjson example.trl lead_scoring.trl expected-example expected-lead_scoring README.md; do
  [ -e "$src/$f" ] || { echo "error: $src/$f is missing: is $src the conformance sample?" >&2; exit 1; }
done
dst=tests/conformance
rm -rf "$dst/expected-example" "$dst/expected-lead_scoring"
cp -r "$src/events.ndjson" "$src/example.trl" "$src/lead_scoring.trl" \
  "$src/expected-example" "$src/expected-lead_scoring" "$dst/"
cp "$src/README.md" "$dst/SAMPLE.md"
git status --short -- "$dst"
