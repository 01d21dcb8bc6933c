#!/usr/bin/env bash
# The one command that runs every check tagstream has: formatting, lints, and all tests.
# CI (.ci/run) calls exactly this. Builds go to a target dir outside the clone so repeated
# runs on one machine reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# No incremental compilation data: it only speeds up rebuilds after small edits, and on a
# fresh clone (CI) it adds 4-6 GB beside the build to a disk the target dir already fills.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# shellcheck source=lib/prereqs.sh
. scripts/lib/prereqs.sh
# shellcheck source=lib/tansu.sh
. scripts/lib/tansu.sh
# shellcheck source=lib/prometheus.sh
. scripts/lib/prometheus.sh
# shellcheck source=lib/chromium.sh
. scripts/lib/chromium.sh

# The shared target dir keeps every test executable ever linked (about 1 GB each in the
# debug profile; a dependency change gives them new names), so a machine that runs this
# often fills its disk. Executables not relinked for a day are dropped; cargo relinks any
# that is needed again.
if [ -d "$CARGO_TARGET_DIR/debug/deps" ]; then
  find "$CARGO_TARGET_DIR/debug/deps" -maxdepth 1 -type f -perm -u+x ! -name '*.*' -mtime +0 -delete
fi

echo "==> prerequisite probe (scripts/check-prereqs-probe.sh)"
./scripts/check-prereqs-probe.sh

echo "==> console/dist is what console/src builds to (scripts/build-console.sh --check)"
./scripts/build-console.sh --check

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> deploy/ checks (scripts/check-deploy.sh)"
cargo build --locked -q -p tagstream
./scripts/check-deploy.sh "$CARGO_TARGET_DIR/debug/tagstream"

echo "==> tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --doc --locked
else
  cargo test --workspace --locked --no-fail-fast
fi

echo "==> short soak (bench/soak.sh 20 s at 2,000 events/s on the debug build; the figures are bench/RESULTS.md's)"
cargo build --locked -q -p tagstream -p bench
BENCH_BIN="$CARGO_TARGET_DIR/debug" BENCH_DIR="$(mktemp -d)" SOAK_INTERVAL=5 SOAK_PLOT=0 \
  bench/soak.sh 20 2000 10000
