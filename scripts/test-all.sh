#!/usr/bin/env bash
# The one command that runs every check tagstream has: formatting, lints, and all tests.
# CI (.ci/run) calls exactly this. Builds go to a target dir outside the clone so repeated
# runs on one machine reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tagstream-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# RocksDB's bindings are generated with libclang at build time; a fresh machine lacks it.
if ! ls /usr/lib/x86_64-linux-gnu/libclang-*.so* /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  echo "==> installing libclang (needed to build RocksDB)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --doc --locked
else
  cargo test --workspace --locked --no-fail-fast
fi
