# Sourced by scripts/test-all.sh: Prometheus and promtool (Debian's `prometheus` package) for
# the observability test (tests/e2e/observability.rs) and the alert-rule unit tests.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  # shellcheck source=apt.sh
  . "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
  # The package's service is not started here (no init system needed): the test runs its own.
  tagstream_apt_install "Debian package: the observability test runs a real one" \
    "install them (or set TAGSTREAM_PROMETHEUS_BIN to a directory holding both)" prometheus
fi
