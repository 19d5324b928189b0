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

# The VMM as it is packaged is linked statically (glibc's crt-static): the process maps no
# shared library, which keeps ~1 MiB less of it resident beside each guest (`scripts/bench vmm`).
# The host's target is named explicitly so that the flag reaches the VMM and its dependencies
# only, not the build scripts and proc macros (which cannot be static).
# static_vmm_path PROFILE (release or dev): where that build puts the binary.
static_vmm_path() {
  local dir=$1
  [ "$dir" = dev ] && dir=debug
  echo "${CARGO_TARGET_DIR:-target}/$(rustc -vV | sed -n 's/^host: //p')/$dir/vmm"
}
# The before/after benchmarks build a git revision beside the tree: BASE_TARGET is where.
BASE_TARGET="$PWD/target/bench-base"
# at_revision REV COMMAND...: runs COMMAND (a build) in a temporary worktree of revision REV,
# with CARGO_TARGET_DIR=$BASE_TARGET; the worktree is removed afterwards, failed or not.
at_revision() {
  local rev=$1 src top=$PWD
  shift
  src=$(mktemp -d /tmp/bench-base.XXXXXX)
  git worktree add -q --detach "$src" "$rev"
  (trap 'cd "$top" && git worktree remove --force "$src"' EXIT
    cd "$src" && CARGO_TARGET_DIR="$BASE_TARGET" "$@")
}
# static_vmm PROFILE: builds it; prints its path.
static_vmm() {
  local triple
  triple=$(rustc -vV | sed -n 's/^host: //p')
  env "CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_RUSTFLAGS=-C target-feature=+crt-static" \
    cargo build --profile "$1" -p vmm --bin vmm --locked -q --target "$triple" >&2
  static_vmm_path "$1"
}
