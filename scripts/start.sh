#!/usr/bin/env bash
# Builds every binary the README uses (release: spdk_tgt, bdevperf, vhost_bench) and starts spdk_tgt in the
# foreground on the embedded default config: one 64 MiB malloc bdev, RPC on /var/tmp/spdk.sock. Extra arguments
# are passed to spdk_tgt (e.g. -m 0x3, -r /tmp/other.sock). Stop it with Ctrl-C or
# `spdk-rpc spdk_kill_instance SIGTERM`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q --bins
exec target/release/spdk_tgt -c app/config/default.json "$@"
