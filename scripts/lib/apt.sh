# Sourced by the scripts in scripts/lib/: installs Debian packages a step needs, with sudo
# when not root, or stops with what to install by hand on a machine without apt-get.
# tagstream_apt_install "WHAT IT IS FOR" "HOW TO DO IT ELSEWHERE" PACKAGE...
tagstream_apt_install() {
  local why=$1 elsewhere=$2
  shift 2
  echo "==> installing $* ($why)"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $* missing and this is not a Debian/Ubuntu machine: $elsewhere, and rerun" >&2
    exit 1
  fi
  local sudo_cmd=()
  [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
