#!/usr/bin/env bash
# The whole test suite: installs what it needs, then builds once (the debug profile; integration tests start
# the very binaries `cargo test` built) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo test --workspace 2>&1 | tee /tmp/spdk-rs-test-output.txt
