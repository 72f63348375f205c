#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian 12 machine (idempotent, quiet when already there).
set -euo pipefail
need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v fio >/dev/null || need_apt+=(fio)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v spdk-rpc >/dev/null 2>&1; then
  python3 -m pip install -q spdk
fi
command -v cargo >/dev/null || { echo "cargo is required (Rust 1.80+)" >&2; exit 1; }
