#!/usr/bin/env bash
# Runs the demo: tagstream on the embedded default (RocksDB in ./tagstream-demo-data, no
# Kafka) with the example rules and a built-in stream of events. Extra arguments go to
# `tagstream demo` (see `--help`: --listen, --rate, --customers, --data-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/prereqs.sh
. scripts/lib/prereqs.sh
exec cargo run --release --locked -q -- demo "$@"
