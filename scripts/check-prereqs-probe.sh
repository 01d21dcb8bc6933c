#!/usr/bin/env bash
# Tests scripts/lib/prereqs.sh's probes against machine roots built here. libclang: one like
# a fresh machine of this project's kind (only libclang-cpp.so.N, which clang-sys never
# loads), the runtime library without clang's headers, and the layouts Debian's libclang-dev
# gives. OpenSSL: a fresh machine (the runtime libssl.so.3 only), headers without the link,
# no pkg-config, and Debian's libssl-dev. A probe that says "present" on a fresh machine
# skips the install and the build fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TAGSTREAM_PREREQS_PROBE_ONLY=1
# shellcheck source=lib/prereqs.sh
. scripts/lib/prereqs.sh
unset LIBCLANG_PATH

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0
root_with() { # NAME FILE... : a machine root holding these (empty) files
  local root="$work/$1"
  shift
  mkdir -p "$root"
  for f in "$@"; do
    mkdir -p "$root/$(dirname "$f")"
    : >"$root/$f"
  done
  echo "$root"
}
expect() { # WANT NAME ROOT [PROBE]
  local got=missing
  "${4:-tagstream_libclang_found}" "$3" && got=found
  if [ "$got" = "$1" ]; then
    echo "ok: $2: $got"
  else
    echo "FAIL: $2: probe says $got, the build needs it to say $1" >&2
    failures=$((failures + 1))
  fi
}

headers=usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h
expect missing "empty machine" "$(root_with empty)"
expect missing "fresh machine (libclang-cpp only)" \
  "$(root_with fresh usr/lib/x86_64-linux-gnu/libclang-cpp.so.14 usr/lib/llvm-14/lib/libclang-cpp.so.14)"
expect missing "libclang1 without clang's headers" \
  "$(root_with runtime-only usr/lib/x86_64-linux-gnu/libclang-14.so.1 usr/lib/llvm-14/lib/libclang.so.1)"
expect missing "clang's headers without libclang" "$(root_with headers-only "$headers")"
expect found "Debian libclang-dev" \
  "$(root_with debian usr/lib/x86_64-linux-gnu/libclang-cpp.so.14 usr/lib/llvm-14/lib/libclang.so \
    usr/lib/llvm-14/lib/libclang-14.so.1 "$headers")"
expect found "versioned library only (libclang-17.so.17)" \
  "$(root_with versioned usr/lib/x86_64-linux-gnu/libclang-17.so.17 usr/lib/llvm-17/lib/clang/17/include/stddef.h)"
expect found "this machine after the set-up" ""

ssl=tagstream_openssl_found
ssl_dev=(usr/include/openssl/ssl.h usr/lib/x86_64-linux-gnu/libssl.so.3
  usr/lib/x86_64-linux-gnu/libssl.so usr/lib/x86_64-linux-gnu/pkgconfig/openssl.pc)
expect missing "OpenSSL: fresh machine (runtime libssl3 only)" \
  "$(root_with ssl-fresh usr/lib/x86_64-linux-gnu/libssl.so.3 usr/bin/openssl)" $ssl
expect missing "OpenSSL: headers without the libssl.so link" \
  "$(root_with ssl-headers usr/include/openssl/ssl.h usr/lib/x86_64-linux-gnu/libssl.so.3 usr/bin/pkg-config)" $ssl
expect missing "OpenSSL: libssl-dev without pkg-config" "$(root_with ssl-no-pkgconfig "${ssl_dev[@]}")" $ssl
expect found "OpenSSL: Debian libssl-dev and pkg-config" \
  "$(root_with ssl-debian "${ssl_dev[@]}" usr/bin/pkg-config)" $ssl
expect found "OpenSSL: this machine after the set-up" "" $ssl

if [ "$failures" -ne 0 ]; then
  echo "prerequisite probe: $failures case(s) wrong" >&2
  exit 1
fi
echo "prerequisite probe: all cases right"
