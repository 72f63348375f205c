#!/usr/bin/env bash
# spdk_dd throughput next to SPDK v24.05's spdk_dd (when the peer is built) and coreutils dd, same files, same run,
# runs alternating, best of ROUNDS: file -> file, and file -> bdev -> file through an aio bdev on a file.
# Usage: bash benches/spdk_dd.sh [MiB] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-512}
ROUNDS=${2:-3}
PEER=${SPDK_PEER:-/root/spdk-peer}
SPDK_DD=${SPDK_DD:-$PEER/build/bin/spdk_dd}
cargo build --release -q -p spdk-tgt --bin spdk_dd
OURS=$PWD/target/release/spdk_dd
dir=$(mktemp -d /var/tmp/spdk-dd-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
head -c "${MIB}M" /dev/urandom > "$dir/in"
truncate -s "$((MIB + 16))M" "$dir/disk"
cat > "$dir/cfg.json" <<JSON
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_aio_create", "params": {"name": "Aio0", "filename": "$dir/disk", "block_size": 512}}]}]}
JSON
# run NAME CMD...: prints the seconds it took.
secs() { local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
declare -A best
keep() { local k=$1 s=$2; if [ -z "${best[$k]:-}" ] || (( $(echo "$s < ${best[$k]}" | bc -l) )); then best[$k]=$s; fi; }
tools=(ours)
[ -x "$SPDK_DD" ] && tools+=(spdk)
for _ in $(seq "$ROUNDS"); do
  for t in "${tools[@]}"; do
    bin=$OURS; [ "$t" = spdk ] && bin=$SPDK_DD
    keep "$t-file" "$(secs "$bin" --if "$dir/in" --of "$dir/out" --bs 1048576 --qd 8)"
    keep "$t-tobdev" "$(secs "$bin" --if "$dir/in" --ob Aio0 --json "$dir/cfg.json" --bs 1048576 --qd 8)"
    keep "$t-frombdev" "$(secs "$bin" --ib Aio0 --of "$dir/out" --json "$dir/cfg.json" --bs 1048576 --qd 8 --count "$MIB")"
    cmp -s "$dir/in" "$dir/out" || { echo "$t: the copy out of the bdev differs" >&2; exit 1; }
  done
  keep "dd-file" "$(secs dd if="$dir/in" of="$dir/out" bs=1M)"
done
mbps() { echo "scale=0; $MIB / $1" | bc -l; }
printf '%-12s %10s %10s %10s %10s %10s\n' case "ours MB/s" "SPDK MB/s" "dd MB/s" ours/SPDK ours/dd
for c in file tobdev frombdev; do
  o=$(mbps "${best[ours-$c]}")
  s=-; r=-
  if [ -n "${best[spdk-$c]:-}" ]; then s=$(mbps "${best[spdk-$c]}"); r=$(echo "scale=2; ${best[spdk-$c]} / ${best[ours-$c]}" | bc -l); fi
  d=-; rd=-
  if [ "$c" = file ]; then d=$(mbps "${best[dd-file]}"); rd=$(echo "scale=2; ${best[dd-file]} / ${best[ours-$c]}" | bc -l); fi
  printf '%-12s %10s %10s %10s %10s %10s\n' "$c" "$o" "$s" "$d" "$r" "$rd"
done
