#!/usr/bin/env bash
# One-step set-up for a fresh Debian/Ubuntu machine (run as root), then one job:
#   ./bootstrap.sh run [ARGS...]   set up, then `arcbox-vm run ARGS...` (default: -- uname -r)
#   ./bootstrap.sh test [PYTEST ARGS...]   set up, then the whole test suite (real VMs included)
#   ./bootstrap.sh setup           set up only
# Set-up = system packages (apt), Python packages in ./.venv, the guest image (cached).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

APT_PACKAGES=(
  qemu-system-x86   # the VMM that boots sandboxes here (and KVM-less hosts)
  busybox-static    # the guest initramfs
  mmdebstrap        # builds the guest rootfs from Debian packages
  e2fsprogs         # mke2fs -d / debugfs: ext4 images without mounting
  skopeo umoci      # image import-oci: read docker-save / OCI archives, apply their layers
  lz4 cpio kmod file dpkg   # kernel extraction, initramfs packing, module deps
  iproute2 nftables iputils-ping   # TAP networking, NAT, network tests
  python3-venv      # the project's virtual environment
  ca-certificates
)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  printf '%s\n' "${missing[@]}"
}

setup() {
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap.sh must run as root (it installs packages and boots VMs with TAP networking)" >&2
    exit 1
  fi
  mapfile -t missing < <(need_apt)
  if [ "${#missing[@]}" -gt 0 ] && [ -n "${missing[0]}" ]; then
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
  fi
  local py=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    log "creating the virtual environment (.venv)"
    rm -rf .venv
    "$py" -m venv .venv
  fi
  local stamp=.venv/.arcbox-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing Python packages into .venv"
    .venv/bin/pip install -q --upgrade pip </dev/null
    .venv/bin/pip install -q -e ".[test]" </dev/null
    touch "$stamp"
  fi
  log "guest image (built once, then cached)"
  .venv/bin/arcbox-vm image build </dev/null
}

cmd=${1:-run}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  run)
    setup
    if [ $# -eq 0 ]; then set -- -- uname -r; fi
    log "arcbox-vm run $*"
    exec .venv/bin/arcbox-vm run "$@"
    ;;
  test)
    setup
    log "test suite"
    exec .venv/bin/python -m pytest "$@"
    ;;
  *) echo "usage: $0 {run [ARGS...]|test [PYTEST ARGS...]|setup}" >&2; exit 2 ;;
esac
