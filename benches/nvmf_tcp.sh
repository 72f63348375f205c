#!/usr/bin/env bash
# The NVMe-oF TCP target side by side with SPDK v24.05's nvmf_tgt, same run: SPDK's own initiator
# (spdk_nvme_perf) drives each target over TCP loopback, the target on core 0 and the initiator on core 1, 4 KiB,
# one namespace (null or malloc). Runs alternate between the two targets and the best of ROUNDS is kept for each;
# the ratio is ours / SPDK's (IOPS, and average latency for qd 1 where lower is better).
# SPDK's binaries come from ../shared/tools/spdk-peer/build.sh (default /root/spdk-peer); without them nothing
# can be compared and the script says so.
# Usage: bash benches/nvmf_tcp.sh [seconds per run] [rounds] [case ...]
#   case: BDEV-WORKLOAD-QD, BDEV in null, malloc; e.g. malloc-randread-128 null-randwrite-128 malloc-randread-1
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-3}
ROUNDS=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(null-randread-128 null-randwrite-128 malloc-randread-128 malloc-randwrite-128 malloc-randread-1)
PEER=${SPDK_PEER:-/root/spdk-peer}
PERF=$PEER/build/bin/spdk_nvme_perf
SPDK_TGT=$PEER/build/bin/nvmf_tgt
if [ ! -x "$PERF" ] || [ ! -x "$SPDK_TGT" ]; then
  echo "SPDK peer not built at $PEER (../shared/tools/spdk-peer/build.sh): nothing to compare against" >&2
  exit 1
fi
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1280 ]; then
  echo 1280 > /proc/sys/vm/nr_hugepages || true
fi
cargo build --release -q --bin spdk_tgt
dir=$(mktemp -d /var/tmp/spdk-rs-nvmf-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
cp target/release/spdk_tgt "$dir/spdk_tgt"
NQN=nqn.2016-06.io.spdk:bench
config() { # bdev port
  local b
  case $1 in
    null) b='{"method":"bdev_null_create","params":{"name":"ns0","num_blocks":65536,"block_size":4096}}' ;;
    malloc) b='{"method":"bdev_malloc_create","params":{"name":"ns0","num_blocks":65536,"block_size":4096}}' ;;
  esac
  cat <<EOF
{"subsystems":[{"subsystem":"bdev","config":[$b]},
{"subsystem":"nvmf","config":[{"method":"nvmf_create_transport","params":{"trtype":"TCP"}},
{"method":"nvmf_create_subsystem","params":{"nqn":"$NQN","allow_any_host":true}},
{"method":"nvmf_subsystem_add_ns","params":{"nqn":"$NQN","namespace":{"bdev_name":"ns0"}}},
{"method":"nvmf_subsystem_add_listener","params":{"nqn":"$NQN","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"$2"}}}]}]}
EOF
}
start() { # binary bdev port -> pid, once the port answers
  config "$2" "$3" > "$dir/$2-$3.json"
  "$1" -m 0x1 -r "$dir/$3.sock" --json "$dir/$2-$3.json" > "$dir/tgt-$3.log" 2>&1 &
  local pid=$!
  for _ in $(seq 200); do
    if (exec 3<>/dev/tcp/127.0.0.1/"$3") 2>/dev/null; then echo "$pid"; return; fi
    sleep 0.05
  done
  echo "target on port $3 did not come up: $(tail -5 "$dir/tgt-$3.log")" >&2
  exit 1
}
perf() { # port workload qd -> "IOPS avg_us"
  "$PERF" -c 0x2 -q "$3" -o 4096 -w "$2" -t "$T" \
    -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$1 subnqn:$NQN" 2>/dev/null |
    awk '/^Total/ {print $3, $5; exit}'
}
printf "%-8s %-10s %4s %12s %12s %7s %10s %10s %7s\n" bdev workload qd ours spdk ratio "ours us" "spdk us" "lat"
for c in "${cases[@]}"; do
  IFS=- read -r b w q <<<"$c"
  ours_pid=$(start "$dir/spdk_tgt" "$b" 14420); pids+=("$ours_pid")
  spdk_pid=$(start "$SPDK_TGT" "$b" 14421); pids+=("$spdk_pid")
  mine=0 theirs=0 mlat=0 tlat=0
  for _ in $(seq "$ROUNDS"); do
    read -r i l <<<"$(perf 14420 "$w" "$q")"
    if awk -v a="$i" -v b="$mine" 'BEGIN{exit !(a+0 > b+0)}'; then mine=$i mlat=$l; fi
    read -r i l <<<"$(perf 14421 "$w" "$q")"
    if awk -v a="$i" -v b="$theirs" 'BEGIN{exit !(a+0 > b+0)}'; then theirs=$i tlat=$l; fi
  done
  kill "$ours_pid" "$spdk_pid" 2>/dev/null || true
  wait "$ours_pid" "$spdk_pid" 2>/dev/null || true
  ratio=$(awk -v a="$mine" -v b="$theirs" 'BEGIN{ if (b > 0) printf "%.2fx", a/b; else print "-" }')
  lat=$(awk -v a="$mlat" -v b="$tlat" 'BEGIN{ if (a > 0) printf "%.2fx", b/a; else print "-" }')
  printf "%-8s %-10s %4s %12s %12s %7s %10s %10s %7s\n" "$b" "$w" "$q" "$mine" "$theirs" "$ratio" "$mlat" "$tlat" "$lat"
done
