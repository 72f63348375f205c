#!/usr/bin/env bash
# Our bdevperf side by side with SPDK v24.05's, same run, same JSON configs, same flags: one core, 4 KiB,
# null and malloc bdevs (and passthru over each). Runs alternate between the two tools and the best of ROUNDS
# is kept for each, so a busy shared machine disturbs both alike; the ratio is ours / SPDK's.
# SPDK's bdevperf comes from ../shared/tools/spdk-peer/build.sh (default /root/spdk-peer); without it only our
# figures are printed (no ratio: a figure recorded elsewhere proves nothing).
# Usage: bash benches/run.sh [seconds per run] [rounds] [case ...]
#   case: BDEV-WORKLOAD-QD with BDEV in null, malloc, pt_null, pt_malloc, idle1000 (null0 next to 1,000 idle
#   null bdevs whose channels are open on the benchmarked thread), lvol_malloc (a thick 900 MiB lvol on the
#   malloc base: compare with malloc-* for the lvol's cost over its base), thin_malloc (the same lvol thin: a
#   randwrite run allocates every cluster on first write, copy-free as SPDK's).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-3}
ROUNDS=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(null-randread-128 null-randread-1 malloc-randread-128 malloc-randwrite-128)
SPDK_BDEVPERF=${SPDK_BDEVPERF:-/root/spdk-peer/build/examples/bdevperf}
[ -x "$SPDK_BDEVPERF" ] || SPDK_BDEVPERF=
# SPDK runs on hugepages; give ours the same (2.5 GiB), or malloc measures TLB misses instead of the data path.
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1280 ]; then
  echo 1280 > /proc/sys/vm/nr_hugepages || true
fi
grep -q hugetlbfs /proc/mounts || { mkdir -p /dev/hugepages; mount -t hugetlbfs nodev /dev/hugepages 2>/dev/null || true; }
cargo build --release -q -p benches
dir=$(mktemp -d /var/tmp/spdk-rs-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
# A private copy: other builds may replace target/release/bdevperf while this runs.
cp target/release/bdevperf "$dir/bdevperf"
ours=$dir/bdevperf
base() {
  case $1 in
    null) echo '{"method":"bdev_null_create","params":{"name":"'"$2"'","num_blocks":262144,"block_size":4096}}' ;;
    malloc) echo '{"method":"bdev_malloc_create","params":{"name":"'"$2"'","num_blocks":262144,"block_size":4096}}' ;;
  esac
}
config() {
  local entries
  case $1 in
    null | malloc) entries=$(base "$1" "${1}0") ;;
    pt_null | pt_malloc)
      entries="$(base "${1#pt_}" base0),"'{"method":"bdev_passthru_create","params":{"base_bdev_name":"base0","name":"pt0"}}' ;;
    lvol_malloc | thin_malloc)
      local thin=false
      [ "$1" = thin_malloc ] && thin=true
      entries="$(base malloc base0),"'{"method":"bdev_lvol_create_lvstore","params":{"bdev_name":"base0","lvs_name":"lvs"}},{"method":"bdev_lvol_create","params":{"lvs_name":"lvs","lvol_name":"lv","size_in_mib":900,"thin_provision":'"$thin"'}}' ;;
    idle1000)
      entries=$(base null null0)
      for i in $(seq 1 1000); do
        entries+=',{"method":"bdev_null_create","params":{"name":"idle'"$i"'","num_blocks":1024,"block_size":4096}}'
      done ;;
  esac
  echo '{"subsystems":[{"subsystem":"bdev","config":['"$entries"',{"method":"bdev_wait_for_examine"}]}]}'
}
iops() { sed -n 's/^.*Total *: *\([0-9.]*\).*/\1/p' | head -1; }
best() { awk -v a="$1" -v b="$2" 'BEGIN{print (a+0 > b+0) ? a : b}'; }
run() { # tool bdev workload qd -> IOPS
  local extra=()
  # Only null0 is measured; ours also holds an idle channel on each of the other 1,000 (SPDK's bdevperf has no
  # such flag: its figure is null0 with the idle bdevs merely registered).
  if [ "$2" = idle1000 ]; then
    extra=(-T null0)
    [ "$1" = "$ours" ] && extra+=(--idle-channels)
  fi
  "$1" -c "$dir/$2.json" -q "$4" -o 4096 -w "$3" -t "$T" -m 0x1 "${extra[@]}" 2>/dev/null | iops
}
printf "%-10s %-10s %4s %14s %14s %8s\n" bdev workload qd ours spdk ratio
for c in "${cases[@]}"; do
  IFS=- read -r b w q <<<"$c"
  [ -f "$dir/$b.json" ] || config "$b" > "$dir/$b.json"
  mine=0 theirs=0
  for _ in $(seq "$ROUNDS"); do
    mine=$(best "$mine" "$(run "$ours" "$b" "$w" "$q")")
    [ -n "$SPDK_BDEVPERF" ] && theirs=$(best "$theirs" "$(run "$SPDK_BDEVPERF" "$b" "$w" "$q")")
  done
  if [ -n "$SPDK_BDEVPERF" ] && [ "$theirs" != 0 ]; then
    ratio=$(awk -v a="$mine" -v b="$theirs" 'BEGIN{printf "%.2fx", a/b}')
  else
    theirs=- ratio=-
  fi
  printf "%-10s %-10s %4s %14s %14s %8s\n" "$b" "$w" "$q" "$mine" "$theirs" "$ratio"
done
