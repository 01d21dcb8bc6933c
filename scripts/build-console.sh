#!/usr/bin/env bash
# Builds the console (console/: Preact + TypeScript, bundled by Vite) into console/dist, which
# is committed and embedded in the binary at compile time — so building tagstream needs no
# node, and running it needs neither node nor the network. Run after changing console/src;
# the test command checks that console/dist is what the sources build to.
#
#   scripts/build-console.sh          rebuild console/dist
#   scripts/build-console.sh --check  rebuild into a temporary dir and fail if it differs
set -euo pipefail
cd "$(dirname "$0")/../console"
if ! command -v npm >/dev/null 2>&1; then
  echo "error: npm is missing: install Node.js 20 or later (with npm) and rerun" >&2
  exit 1
fi
npm ci --no-audit --no-fund --loglevel=error
if [ "${1:-}" = "--check" ]; then
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
  npx tsc --noEmit
  npx vite build --outDir "$out" --emptyOutDir --logLevel warn
  if ! diff -r "$out" dist >/dev/null; then
    diff -r "$out" dist | head -20 >&2 || true
    echo "error: console/dist is not what console/src builds to: run scripts/build-console.sh and commit console/dist" >&2
    exit 1
  fi
  echo "console/dist is current"
else
  npm run build --silent
fi
