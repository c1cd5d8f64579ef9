#!/usr/bin/env bash
# Ferry's test command (README.md names it; .ci/run runs it). Installs the Debian packages the
# end-to-end tests drive as real peers, when missing, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-utils nbdkit libnbd-bin fio rsync tmux openssh-server iproute2
  ceph-mon ceph-osd ceph-mgr ceph-common librbd-dev librados-dev uuid-runtime)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "ferry tests: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Release profile: the simulator runs thousands of seeds and the end-to-end tests move real data.
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --release --no-fail-fast
else
  cargo test --workspace --release --no-fail-fast
fi
