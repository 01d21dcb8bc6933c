#!/usr/bin/env bash
# Installs the `tagstream` binary into cargo's bin directory (~/.cargo/bin), after the same
# prerequisite step as the demo and the tests (libclang for RocksDB's build). Extra
# arguments go to `cargo install` (e.g. --root /usr/local).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/prereqs.sh
. scripts/lib/prereqs.sh
cargo install --path . --locked "$@"
bin="${CARGO_INSTALL_ROOT:-${CARGO_HOME:-$HOME/.cargo}}/bin"
case ":$PATH:" in
  *":$bin:"*) ;;
  *) echo "note: add $bin to your PATH to call \`tagstream\` directly" ;;
esac
tagstream_path="$(command -v tagstream || echo "$bin/tagstream")"
"$tagstream_path" --version
