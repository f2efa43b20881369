#!/usr/bin/env bash
# System packages agentkernel needs on Debian 12 (bookworm): the VMM, the kernel build, the guest agent's
# compiler, the image builders, the container engine and a local registry for the tests. Run as root (or
# with sudo).
set -euo pipefail

packages=(
  # VMM and disks
  qemu-system-x86 qemu-utils
  # the egress gateway's link from QEMU user networking to its Unix socket; Firecracker's per-sandbox
  # network namespace drops all but the proxy with nftables
  socat nftables
  # guest kernel build from Debian's source package
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils
  # guest agent: static binary with musl
  musl-tools
  # root filesystem images and OCI images
  e2fsprogs busybox-static mmdebstrap skopeo
  # Python virtual environments
  python3 python3-venv python3-pip
  # tests: a local OCI registry on loopback
  docker-registry
  # container backend: podman; runc as well as crun (crun refuses hosts in cgroup v1/hybrid mode)
  podman runc crun
  # fleet: membership and placement across hosts (etcd v3, its JSON gateway at /v3/)
  etcd-server
  # tests: the dashboard's browser tests drive a headless Chromium
  chromium chromium-driver
)

# The container backend maps the root of root's containers to unprivileged host ids: reserve 65536 of
# them for root, once (a range root already has is kept). 700000000 is above the ranges useradd hands
# out (SUB_UID_MAX), so no user's rootless containers share these ids.
subids_sudo=""
[ "$(id -u)" -eq 0 ] || subids_sudo="sudo"
for file in /etc/subuid /etc/subgid; do
  grep -qE '^(root|0):' "$file" 2>/dev/null || echo "root:700000000:65536" | $subids_sudo tee -a "$file" >/dev/null
done

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing system packages: ${missing[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
