# Helpers for lab scripts: `. /lab/lib.sh`.
up() { cut -d' ' -f1 /proc/uptime; }
step() { echo "LAB-STEP [$(up)s] $*"; }
fail() { echo "LAB-FAIL: $*"; exit 1; }
ok() { echo "LAB-OK: $*"; }
# host_sync NAME: tells the host test (lab::sync::Handshake, port $LAB_SYNC_PORT) that the script reached NAME
# and waits, however long, for its one-line answer, left in HOST_SYNC_REPLY; non-zero when there is none.
host_sync() {
  echo "LAB-SYNC $1"
  HOST_SYNC_REPLY=$(echo "$1" | busybox nc "${LAB_SYNC_ADDR:-10.0.2.2}" "${LAB_SYNC_PORT:?no LAB_SYNC_PORT}")
  echo "LAB-SYNC $1: ${HOST_SYNC_REPLY:-(no answer)}"
  [ -n "$HOST_SYNC_REPLY" ]
}
# busybox's shell runs its own applet for a name before looking at PATH: the host binaries the image carries
# (coreutils dd with O_DIRECT, util-linux blkdiscard, ...) are called through functions of the same name.
for _b in $(cat /lab/binaries 2>/dev/null); do
  _n=${_b##*/}
  case $_n in *[!A-Za-z0-9_]*) continue;; esac
  [ -x "$_b" ] && eval "$_n() { $_b \"\$@\"; }"
done
unset _b _n
