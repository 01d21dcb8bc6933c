# Sourced by the scripts in scripts/: makes sure a fresh machine can build tagstream.
# RocksDB's bindings are generated with libclang at build time; a fresh machine lacks it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tagstream-target}"
if ! ls /usr/lib/x86_64-linux-gnu/libclang-*.so* /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  echo "==> installing libclang (needed to build RocksDB)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  fi
fi
