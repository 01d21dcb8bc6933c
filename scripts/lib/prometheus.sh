# Sourced by scripts/test-all.sh: Prometheus and promtool (Debian's `prometheus` package) for
# the observability test (tests/e2e/observability.rs) and the alert-rule unit tests.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "==> installing prometheus (Debian package: the observability test runs a real one)"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: prometheus and promtool are missing and this is not a Debian/Ubuntu machine:" \
      "install them (or set TAGSTREAM_PROMETHEUS_BIN to a directory holding both) and rerun" >&2
    exit 1
  fi
  sudo_cmd=()
  [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  # The package's service is not started here (no init system needed): the test runs its own.
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
