#!/usr/bin/env bash
# Stock fio with our engine (libfio_spdk_bdev.so) side by side, same run, same JSON config and job, with:
#   - SPDK v24.05's own fio bdev plugin (the peer: ../shared/tools/spdk-peer/build.sh, plus its fio plugin built
#     against fio 3.33's source: `make -C app/fio/bdev CONFIG_FIO_PLUGIN=y CONFIG_FIO_SOURCE_DIR=<fio-3.33 src>`);
#   - our bdevperf on the same bdev (the bdev layer without fio's own per-I/O work);
#   - fio's built-in `null` engine (fio's floor: the engine's overhead is what lies between it and ours).
# One job thread, 4 KiB, rounds alternate between the tools and the best of ROUNDS is kept for each, so a busy
# shared machine disturbs all alike. Ratios are ours / theirs. Without the SPDK plugin its column is left out.
# Usage: bash benches/fio_engine.sh [seconds per run] [rounds] [case ...]
#   case: BDEV-WORKLOAD-QD with BDEV in null, malloc; WORKLOAD randread, randwrite.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-3}
ROUNDS=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(null-randread-128 null-randread-1 malloc-randread-32 malloc-randwrite-32)
command -v fio >/dev/null || { echo "fio is not installed (bash scripts/deps.sh)"; exit 1; }
SPDK_FIO_PLUGIN=${SPDK_FIO_PLUGIN:-/root/spdk-peer/build/fio/spdk_bdev}
[ -f "$SPDK_FIO_PLUGIN" ] || SPDK_FIO_PLUGIN=
# SPDK runs on hugepages; give ours the same.
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1280 ]; then
  echo 1280 > /proc/sys/vm/nr_hugepages || true
fi
grep -q hugetlbfs /proc/mounts || { mkdir -p /dev/hugepages; mount -t hugetlbfs nodev /dev/hugepages 2>/dev/null || true; }
cargo build --release -q -p fio-engine -p benches
dir=$(mktemp -d /var/tmp/spdk-rs-fio.XXXXXX)
trap 'rm -rf "$dir"' EXIT
# Private copies: other builds may replace target/release while this runs.
cp target/release/libfio_spdk_bdev.so target/release/bdevperf "$dir/"
for b in null malloc; do
  m=bdev_${b}_create
  echo '{"subsystems":[{"subsystem":"bdev","config":[{"method":"'"$m"'","params":{"name":"'"$b"'0","num_blocks":262144,"block_size":4096}}]}]}' > "$dir/$b.json"
done
# IOPS of a fio JSON report (read + write).
fio_iops() { python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["read"]["iops"]+j["write"]["iops"])'; }
job() { echo --name=bench --thread=1 --bs=4k --rw="$2" --iodepth="$3" --runtime="$T" --time_based --output-format=json; }
run() { # tool bdev workload qd -> IOPS
  case $1 in
    ours) fio $(job "$2" "$3" "$4") --ioengine=external:"$dir/libfio_spdk_bdev.so" --spdk_json_conf="$dir/$2.json" \
            --filename="${2}0" 2>/dev/null | fio_iops ;;
    spdk) env LD_PRELOAD="$SPDK_FIO_PLUGIN" fio $(job "$2" "$3" "$4") --ioengine=spdk_bdev \
            --spdk_json_conf="$dir/$2.json" --filename="${2}0" 2>/dev/null | fio_iops ;;
    fionull) fio $(job "$2" "$3" "$4") --ioengine=null --size=1G --filename=/dev/null 2>/dev/null | fio_iops ;;
    bdevperf) "$dir/bdevperf" -c "$dir/$2.json" -q "$4" -o 4096 -w "$3" -t "$T" -m 0x1 2>/dev/null |
            sed -n 's/^.*Total *: *\([0-9.]*\).*/\1/p' | head -1 ;;
  esac
}
best() { awk -v a="$1" -v b="$2" 'BEGIN{print (a+0 > b+0) ? a : b}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 > 0) printf "%.2fx", a/b; else printf "-" }'; }
tools=(ours bdevperf fionull)
[ -n "$SPDK_FIO_PLUGIN" ] && tools=(ours spdk bdevperf fionull)
printf "%-7s %-10s %4s %12s %12s %12s %12s %9s %9s %9s\n" bdev workload qd fio+ours fio+spdk bdevperf fio-null \
  ours/spdk ours/bperf ours/null
for c in "${cases[@]}"; do
  IFS=- read -r b w q <<<"$c"
  declare -A top=([ours]=0 [spdk]=0 [bdevperf]=0 [fionull]=0)
  for _ in $(seq "$ROUNDS"); do
    for t in "${tools[@]}"; do
      top[$t]=$(best "${top[$t]}" "$(run "$t" "$b" "$w" "$q" || echo 0)")
    done
  done
  printf "%-7s %-10s %4s %12.0f %12.0f %12.0f %12.0f %9s %9s %9s\n" "$b" "$w" "$q" "${top[ours]}" "${top[spdk]}" \
    "${top[bdevperf]}" "${top[fionull]}" "$(ratio "${top[ours]}" "${top[spdk]}")" \
    "$(ratio "${top[ours]}" "${top[bdevperf]}")" "$(ratio "${top[ours]}" "${top[fionull]}")"
done
