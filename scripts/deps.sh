#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian 12 machine (idempotent, quick when already there):
# a C toolchain, fio, QEMU + a Debian kernel + busybox for the VM lab, the RDMA libraries (the nvmf-rdma crate's
# bindings are generated at build time with libclang; the lab guest runs Soft-RoCE with the rxe provider), and
# SPDK's official RPC client from PyPI.
set -euo pipefail
pkgs=(build-essential fio qemu-system-x86 qemu-utils linux-image-amd64 busybox-static kmod xz-utils
      libibverbs-dev librdmacm-dev libclang-dev rdma-core ibverbs-providers)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v spdk-rpc >/dev/null 2>&1; then
  python3 -m pip install -q spdk
fi
command -v cargo >/dev/null || { echo "cargo is required (Rust 1.87+)" >&2; exit 1; }
