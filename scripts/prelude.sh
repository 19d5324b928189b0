# Sourced by scripts/test, scripts/demo and scripts/bench.d/*, after `set -euo pipefail` and
# with LOG_PREFIX set: the repository root as working directory, log lines, the checks a
# script makes before it starts, and the test guest's image.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# One line of narration on stderr, prefixed with the script's name.
log() { printf '[%s] %s\n' "$LOG_PREFIX" "$*" >&2; }

# Fails unless every named command is installed (scripts/setup installs them all).
need() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null || { echo "missing $t: run scripts/setup" >&2; exit 1; }
  done
}

# Fails unless /dev/kvm can be opened for writing.
need_kvm() { [ -w /dev/kvm ] || { echo "/dev/kvm is not usable" >&2; exit 1; }; }

# Builds the test guest (or finds it in the cache) and exports GUEST_KERNEL, GUEST_ROOTFS and
# GUEST_CMDLINE; when the caller's environment already names a kernel, that image is used.
# Arguments go to guest-images/build (e.g. --quiet).
guest_image() {
  [ -n "${GUEST_KERNEL:-}" ] || eval "$(guest-images/build "$@")"
  export GUEST_KERNEL GUEST_ROOTFS GUEST_CMDLINE
}
