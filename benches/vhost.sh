#!/usr/bin/env bash
# vhost-user-blk without a VM: our spdk_tgt, qemu-storage-daemon and SPDK v24.05's vhost (from the peer build,
# ../shared/tools/spdk-peer/build.sh, when it is there) side by side, each pinned to one core, on null and RAM
# backing, 4 KiB randread/randwrite at qd 32 and 128, driven by target/release/vhost_bench (a vhost-user front
# end + guest driver on another core), best of 3 alternating runs per back end (--rounds). Prints IOPS, back-end
# CPU, IOPS per back-end core and the ratios.
# Usage: bash benches/vhost.sh [vhost_bench args, e.g. -t 10 --qd 32]
# Numbers are only meaningful on an otherwise idle machine (two cores: back end and driver).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-storage-daemon >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq qemu-system-common >/dev/null
fi
# SPDK's vhost and the guest memory it registers live on hugepages.
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1280 ]; then
  echo 1280 > /proc/sys/vm/nr_hugepages || true
fi
grep -q hugetlbfs /proc/mounts || { mkdir -p /dev/hugepages; mount -t hugetlbfs nodev /dev/hugepages 2>/dev/null || true; }
cargo build --release -q -p spdk-tgt -p benches --bin spdk_tgt --bin vhost_bench
exec target/release/vhost_bench "$@"
