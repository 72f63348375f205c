#!/usr/bin/env bash
# The NVMe-oF/TCP initiator side by side with SPDK v24.05's, same run, the target on core 0 and the initiator
# on core 1, 4 KiB. TOOL=bdevperf (default): each bdevperf (ours and SPDK's) attaches the target with
# bdev_nvme_attach_controller in its JSON config and drives Nvme0n1 (bdev_nvme). TOOL=perf: our nvme_perf against
# SPDK's spdk_nvme_perf, same flags (the host libraries alone). The target is ours or SPDK's nvmf_tgt
# (TARGET=ours|spdk), so all four pairings can be run. TLS=1 runs everything over NVMe/TCP with TLS 1.3: the
# target's listener requires a secure channel and knows the host by a PSK (32 bytes, hash 01: SHA-256 suite), both
# initiators use the same key (bdev_nvme's `psk` from the keyring; `-S ssl --psk-path` for the perf tools). SPDK
# v24.05 needs its empty-salt HKDF fix for TLS with OpenSSL 3.0 (see app/tests/bdev_nvme.rs). Runs alternate between the two initiators and the best of
# ROUNDS is kept for each; the ratio is ours / SPDK's.
# SPDK's binaries come from ../shared/tools/spdk-peer/build.sh (default /root/spdk-peer); SPDK_BDEVPERF=<binary>
# compares another bdevperf instead (e.g. ours from an earlier commit, to see what a change cost).
# Usage: [TARGET=ours|spdk] [TOOL=bdevperf|perf] [TLS=1] bash benches/nvme_tcp_host.sh [seconds per run] [rounds] [case ...]
#   case: BDEV-WORKLOAD-QD, BDEV in null, malloc; e.g. null-randread-128 malloc-randwrite-128 null-randread-1
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-3}
ROUNDS=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(null-randread-128 null-randwrite-128 null-randread-1)
TARGET=${TARGET:-ours}
TOOL=${TOOL:-bdevperf}
TLS=${TLS:-0}
PEER=${SPDK_PEER:-/root/spdk-peer}
SPDK_PERF=$PEER/build/bin/spdk_nvme_perf
SPDK_BDEVPERF=${SPDK_BDEVPERF:-$PEER/build/examples/bdevperf}
SPDK_TGT=$PEER/build/bin/nvmf_tgt
if [ ! -x "$SPDK_BDEVPERF" ] || [ ! -x "$SPDK_TGT" ]; then
  echo "SPDK peer not built at $PEER (../shared/tools/spdk-peer/build.sh): nothing to compare against" >&2
  exit 1
fi
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1280 ]; then
  echo 1280 > /proc/sys/vm/nr_hugepages || true
fi
cargo build --release -q --bin spdk_tgt -p spdk-tgt
cargo build --release -q -p benches
dir=$(mktemp -d /var/tmp/spdk-rs-nvme-host-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
cp target/release/spdk_tgt "$dir/spdk_tgt"
cp target/release/bdevperf "$dir/bdevperf"
cp target/release/nvme_perf "$dir/nvme_perf"
NQN=nqn.2016-06.io.spdk:bench
HOSTNQN=nqn.2016-06.io.spdk:bench-host
PORT=14430
# A TLS PSK in interchange format: 32 bytes, its CRC-32, hash 01.
python3 - "$dir/psk" <<'PY'
import base64, os, sys, zlib
key = bytes((i * 29 + 7) & 0xff for i in range(32))
text = "NVMeTLSkey-1:01:" + base64.b64encode(key + zlib.crc32(key).to_bytes(4, "little")).decode() + ":"
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, text.encode())
os.close(fd)
PY
if [ "$TLS" = 1 ]; then
  KEYRING='{"subsystem":"keyring","config":[{"method":"keyring_file_add_key","params":{"name":"key0","path":"'$dir/psk'"}}]},'
  ANY=false SECURE=true
  HOSTS=',{"method":"nvmf_subsystem_add_host","params":{"nqn":"'$NQN'","host":"'$HOSTNQN'","psk":"key0"}}'
  ATTACH_TLS=',"hostnqn":"'$HOSTNQN'","psk":"key0"'
  PERF_TLS=(-S ssl --psk-path "$dir/psk")
  TRID_TLS=" hostnqn:$HOSTNQN"
else
  KEYRING='' ANY=true SECURE=false HOSTS='' ATTACH_TLS='' PERF_TLS=() TRID_TLS=''
fi
target_config() { # bdev
  local b
  case $1 in
    null) b='{"method":"bdev_null_create","params":{"name":"ns0","num_blocks":65536,"block_size":4096}}' ;;
    malloc) b='{"method":"bdev_malloc_create","params":{"name":"ns0","num_blocks":65536,"block_size":4096}}' ;;
  esac
  cat <<JSON
{"subsystems":[$KEYRING{"subsystem":"bdev","config":[$b]},
{"subsystem":"nvmf","config":[{"method":"nvmf_create_transport","params":{"trtype":"TCP"}},
{"method":"nvmf_create_subsystem","params":{"nqn":"$NQN","allow_any_host":$ANY}},
{"method":"nvmf_subsystem_add_ns","params":{"nqn":"$NQN","namespace":{"bdev_name":"ns0"}}},
{"method":"nvmf_subsystem_add_listener","params":{"nqn":"$NQN","secure_channel":$SECURE,"listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"$PORT"}}}$HOSTS]}]}
JSON
}
cat > "$dir/host.json" <<JSON
{"subsystems":[$KEYRING{"subsystem":"bdev","config":[
{"method":"bdev_nvme_attach_controller","params":{"name":"Nvme0","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"$PORT","subnqn":"$NQN"$ATTACH_TLS}},
{"method":"bdev_wait_for_examine"}]}]}
JSON
case $TARGET in
  ours) TGT=$dir/spdk_tgt ;;
  spdk) TGT=$SPDK_TGT ;;
  *) echo "TARGET must be ours or spdk" >&2; exit 1 ;;
esac
run() { # tool workload qd -> IOPS
  if [ "$TOOL" = perf ]; then
    "$1" -q "$3" -o 4096 -w "$2" -t "$T" -c 0x2 "${PERF_TLS[@]}" \
      -r "trtype:tcp adrfam:ipv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$NQN$TRID_TLS" 2>/dev/null |
      awk '/^Total/ {print $3; exit}'
  else
    "$1" -c "$dir/host.json" -q "$3" -o 4096 -w "$2" -t "$T" -m 0x2 2>/dev/null |
      sed -n 's/^.*Total *: *\([0-9.]*\).*/\1/p' | head -1
  fi
}
case $TOOL in
  bdevperf) OURS=$dir/bdevperf THEIRS=$SPDK_BDEVPERF ;;
  perf) OURS=$dir/nvme_perf THEIRS=$SPDK_PERF ;;
  *) echo "TOOL must be bdevperf or perf" >&2; exit 1 ;;
esac
best() { awk -v a="$1" -v b="$2" 'BEGIN{print (a+0 > b+0) ? a : b}'; }
printf "target %s, tool %s, tls %s\n%-8s %-10s %4s %12s %12s %7s\n" "$TARGET" "$TOOL" "$TLS" bdev workload qd ours spdk ratio
for c in "${cases[@]}"; do
  IFS=- read -r b w q <<<"$c"
  target_config "$b" > "$dir/target-$b.json"
  "$TGT" -m 0x1 -r "$dir/tgt.sock" --json "$dir/target-$b.json" > "$dir/tgt.log" 2>&1 &
  tpid=$!; pids+=("$tpid")
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.05; done
  mine=0 theirs=0
  for _ in $(seq "$ROUNDS"); do
    mine=$(best "$mine" "$(run "$OURS" "$w" "$q")")
    theirs=$(best "$theirs" "$(run "$THEIRS" "$w" "$q")")
  done
  kill "$tpid" 2>/dev/null || true
  wait "$tpid" 2>/dev/null || true
  ratio=$(awk -v a="$mine" -v b="$theirs" 'BEGIN{ if (b > 0) printf "%.2fx", a/b; else print "-" }')
  printf "%-8s %-10s %4s %12s %12s %7s\n" "$b" "$w" "$q" "$mine" "$theirs" "$ratio"
done
