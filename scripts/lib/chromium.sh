# Sourced by scripts/test-all.sh: a headless Chromium and its WebDriver (Debian's `chromium`
# and `chromium-driver`) for the console's browser test (tests/e2e/console.rs).
# TAGSTREAM_CHROMIUM and TAGSTREAM_CHROMEDRIVER point the test at other binaries.
if [ ! -x "${TAGSTREAM_CHROMIUM:-/usr/bin/chromium}" ] || [ ! -x "${TAGSTREAM_CHROMEDRIVER:-/usr/bin/chromedriver}" ]; then
  echo "==> installing chromium and chromium-driver (Debian packages: the console's browser test)"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: chromium and chromedriver are missing and this is not a Debian/Ubuntu machine:" \
      "install them (or set TAGSTREAM_CHROMIUM and TAGSTREAM_CHROMEDRIVER) and rerun" >&2
    exit 1
  fi
  sudo_cmd=()
  [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
fi
