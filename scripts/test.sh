#!/usr/bin/env bash
# The whole test suite: installs what it needs, lints, then builds once (the debug profile; integration tests
# start the very binaries `cargo test` built) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# Only the tests need clippy (so not deps.sh); rustup toolchains may have been installed without it.
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
# Lints first: a warning (e.g. an unsafe block without a SAFETY comment) fails the run before the long tests.
# Same target dir and profile as the tests, so build scripts and proc macros are built once for both.
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace 2>&1 | tee /tmp/spdk-rs-test-output.txt
