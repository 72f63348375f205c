#!/usr/bin/env bash
# Informational: the PCIe driver on QEMU's emulated NVMe in a TCG guest, our bdevperf next to SPDK v24.05's
# bdevperf (both over VFIO, when the peer is built) and next to fio on the guest kernel's nvme driver, same boot,
# 4 KiB qd32 randread/randwrite, best of ROUNDS; and our nvme_perf next to SPDK's spdk_nvme_perf on the
# controller itself. Emulation-bound: compare the ratios, not the numbers.
# Usage: bash benches/nvme_pcie_guest.sh [seconds per run] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=${SPDK_PEER:-/root/spdk-peer}
cargo build --release -q -p benches --bin bdevperf --bin nvme_perf
BENCH_BDEVPERF=$PWD/target/release/bdevperf \
BENCH_NVME_PERF=$PWD/target/release/nvme_perf \
SPDK_BDEVPERF=${SPDK_BDEVPERF:-$PEER/build/examples/bdevperf} \
SPDK_NVME_PERF=${SPDK_NVME_PERF:-$PEER/build/bin/spdk_nvme_perf} \
BENCH_SECONDS=${1:-5} BENCH_ROUNDS=${2:-2} \
  cargo test --release -q -p benches --test pcie_guest -- --ignored --nocapture
