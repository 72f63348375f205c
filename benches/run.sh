#!/usr/bin/env bash
# One-core 4 KiB bdevperf runs on null and malloc bdevs, printed with the ratio to SPDK v24.05's bdevperf on this
# machine kind (figures from the project's issue, measured with the same flags). If an SPDK bdevperf binary is
# given in SPDK_BDEVPERF, it is run side by side with the same config and flags instead, and ratios use it.
# Usage: bash benches/run.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-5}
# SPDK runs on hugepages; give ours the same (2.5 GiB), or malloc measures TLB misses instead of the data path.
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1280 ]; then
  echo 1280 > /proc/sys/vm/nr_hugepages || true
fi
cargo build --release -q -p benches
ours=target/release/bdevperf
dir=$(mktemp -d /var/tmp/spdk-rs-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/null.json" <<'JSON'
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_null_create","params":{"name":"null0","num_blocks":262144,"block_size":4096}},{"method":"bdev_wait_for_examine"}]}]}
JSON
cat > "$dir/malloc.json" <<'JSON'
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"malloc0","num_blocks":262144,"block_size":4096}},{"method":"bdev_wait_for_examine"}]}]}
JSON
# SPDK v24.05 bdevperf, one core, 4 KiB, measured on this machine kind (IOPS).
declare -A ref=( [null-randread-128]=5300000 [null-randread-1]=2300000 [malloc-randread-128]=880000 [malloc-randwrite-128]=900000 )
iops() { sed -n 's/^.*Total *: *\([0-9.]*\).*/\1/p' ; }
printf "%-8s %-10s %4s %14s %14s %8s  %s\n" bdev workload qd ours spdk ratio allocs/io
for case in null-randread-128 null-randread-1 null-randwrite-128 malloc-randread-128 malloc-randwrite-128; do
  IFS=- read -r b w q <<<"$case"
  out=$("$ours" -c "$dir/$b.json" -q "$q" -o 4096 -w "$w" -t "$T" -m 0x1 2>/dev/null)
  mine=$(iops <<<"$out")
  allocs=$(sed -n 's/.*(\(.*\) per I\/O).*/\1/p' <<<"$out")
  if [ -n "${SPDK_BDEVPERF:-}" ]; then
    theirs=$("$SPDK_BDEVPERF" -c "$dir/$b.json" -q "$q" -o 4096 -w "$w" -t "$T" -m 0x1 | iops)
  else
    theirs=${ref[$case]:-}
  fi
  ratio=$( [ -n "$theirs" ] && awk -v a="$mine" -v b="$theirs" 'BEGIN{printf "%.2fx", a/b}' || echo "-")
  printf "%-8s %-10s %4s %14s %14s %8s  %s\n" "$b" "$w" "$q" "$mine" "${theirs:--}" "$ratio" "$allocs"
done
