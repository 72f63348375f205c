#!/usr/bin/env bash
# Lvstore scale side by side with SPDK v24.05's spdk_tgt, same run: creating N thin lvols and a snapshot of each
# over RPC, then loading that lvstore after a restart (see benches/lvol_scale.py).
# SPDK comes from ../shared/tools/spdk-peer/build.sh (default /root/spdk-peer).
# Usage: bash benches/lvol_scale.sh [N] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=${SPDK_PEER:-/root/spdk-peer}
if [ ! -x "$PEER/build/bin/spdk_tgt" ]; then
  echo "SPDK peer not built at $PEER (../shared/tools/spdk-peer/build.sh): nothing to compare against" >&2
  exit 1
fi
bash scripts/deps.sh >/dev/null
cargo build --release -q --bin spdk_tgt
dir=$(mktemp -d /var/tmp/spdk-rs-lvol-scale.XXXXXX)
trap 'rm -rf "$dir"' EXIT
cp target/release/spdk_tgt "$dir/spdk_tgt"
PY=python3
[ -x /opt/spdk-rs/venv/bin/python3 ] && PY=/opt/spdk-rs/venv/bin/python3
"$PY" benches/lvol_scale.py "$dir/spdk_tgt" "$PEER/build/bin/spdk_tgt" "${1:-1000}" "${2:-2}"
