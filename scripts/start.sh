#!/usr/bin/env bash
# Builds spdk_tgt (release) and starts it on the embedded default config: one 64 MiB malloc bdev, RPC on
# /var/tmp/spdk.sock. Extra arguments are passed to spdk_tgt (e.g. -m 0x3, -r /tmp/other.sock).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p spdk-tgt
exec target/release/spdk_tgt -c app/config/default.json "$@"
