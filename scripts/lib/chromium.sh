# Sourced by scripts/test-all.sh: a headless Chromium and its WebDriver (Debian's `chromium`
# and `chromium-driver`) for the console's browser test (tests/e2e/console.rs).
# TAGSTREAM_CHROMIUM and TAGSTREAM_CHROMEDRIVER point the test at other binaries.
if [ ! -x "${TAGSTREAM_CHROMIUM:-/usr/bin/chromium}" ] || [ ! -x "${TAGSTREAM_CHROMEDRIVER:-/usr/bin/chromedriver}" ]; then
  # shellcheck source=apt.sh
  . "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
  tagstream_apt_install "Debian packages: the console's browser test" \
    "install them (or set TAGSTREAM_CHROMIUM and TAGSTREAM_CHROMEDRIVER)" chromium chromium-driver
fi
