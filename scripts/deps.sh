#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian 12 machine (idempotent, quick when already there):
# a C toolchain, fio, QEMU + a Debian kernel + busybox for the VM lab, the RDMA libraries (the nvmf-rdma crate's
# bindings are generated at build time with libclang; the lab guest runs Soft-RoCE with the rxe provider),
# OpenSSL's command line tool (the TLS tests' peer), and SPDK's official RPC client from PyPI. The client goes
# into its own virtual environment (Debian's Python refuses a system-wide `pip install`, PEP 668) and `spdk-rpc`
# is linked into /usr/local/bin, which is on Debian's default PATH.
set -euo pipefail
# Rust: Debian 12's own cargo (1.63) is too old for this workspace.
need_rust=1.87
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: Rust $need_rust or newer is needed; install it with rustup:" >&2
  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\"" >&2
  exit 1
fi
have=$(cargo --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$need_rust" "$have" | sort -V | head -1)" != "$need_rust" ]; then
  echo "cargo $have is too old: Rust $need_rust or newer is needed (rustup update, or install rustup as above)" >&2
  exit 1
fi
pkgs=(build-essential fio qemu-system-x86 qemu-utils linux-image-amd64 busybox-static kmod xz-utils
      libibverbs-dev librdmacm-dev libclang-dev rdma-core ibverbs-providers python3 python3-venv
      openssl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # Another apt (unattended-upgrades on a fresh machine) may hold the lock: wait for it instead of failing.
  apt=(apt-get -o DPkg::Lock::Timeout=600)
  "${apt[@]}" update -qq
  "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v spdk-rpc >/dev/null 2>&1; then
  venv=/opt/spdk-rs/venv
  if [ ! -x "$venv/bin/spdk-rpc" ]; then
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check spdk
  fi
  ln -sf "$venv/bin/spdk-rpc" /usr/local/bin/spdk-rpc
fi
