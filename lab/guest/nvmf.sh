# NVMe-oF host helpers for lab scripts: `. /lab/nvmf.sh` (it sources /lab/lib.sh).
# Needs an image built with ImageSpec::nvme_tcp_host() (nvme_tcp + nvme-cli's `nvme`; nvme_rdma for RDMA) and a NIC
# (GuestConfig.net).
#
# Variables (exported by the host side, lab::nvmf::NvmfGuest::env), with defaults:
#   NVMF_ADDR     target address as the guest sees it (10.0.2.2: the host's 127.0.0.1 through slirp)
#   NVMF_PORT     target TCP port (4420)
#   NVMF_NQN      subsystem NQN
#   NVMF_HOSTNQN  this host's NQN (written to /etc/nvme/hostnqn by nvmf_setup)
#   NVMF_HOSTID   this host's ID, a UUID (/etc/nvme/hostid)
#   NVMF_TRANSPORT  nvme-cli's transport: tcp (default) or rdma
#
# Conventions: helpers print `KEY=value` lines the host reads with GuestOutput::value, return non-zero on failure
# (callers decide: `... || fail "why"`), and never leave the script on their own except nvmf_setup.
. /lab/lib.sh

NVMF_ADDR=${NVMF_ADDR:-10.0.2.2}
NVMF_PORT=${NVMF_PORT:-4420}
NVMF_TRANSPORT=${NVMF_TRANSPORT:-tcp}

# Writes /etc/nvme/hostnqn and hostid, checks the fabrics module is there; fails the script if it is not.
nvmf_setup() {
  mkdir -p /etc/nvme
  [ -n "$NVMF_HOSTNQN" ] && echo "$NVMF_HOSTNQN" > /etc/nvme/hostnqn
  [ -n "$NVMF_HOSTID" ] && echo "$NVMF_HOSTID" > /etc/nvme/hostid
  modprobe "nvme_$NVMF_TRANSPORT" 2>/dev/null
  [ -c /dev/nvme-fabrics ] || fail "no /dev/nvme-fabrics (nvme_fabrics/nvme_$NVMF_TRANSPORT not loaded?)"
  [ -x /usr/sbin/nvme ] || fail "no /usr/sbin/nvme in the image (ImageSpec::nvme_tcp_host)"
  [ -e /sys/class/net/eth0 ] || fail "no NIC (GuestConfig.net)"
}

# nvmf_discover [HOSTNQN [HOSTID]]: `nvme discover` against the target; output in /tmp/nvmf-discover.
nvmf_discover() {
  _q=${1:-$NVMF_HOSTNQN}; _i=${2:-$NVMF_HOSTID}
  nvme discover -t "$NVMF_TRANSPORT" -a "$NVMF_ADDR" -s "$NVMF_PORT" ${_q:+--hostnqn="$_q"} ${_i:+--hostid="$_i"} \
    > /tmp/nvmf-discover 2>&1
}

# nvmf_discovered NQN: whether the last discovery log page listed NQN.
nvmf_discovered() {
  grep -q "^subnqn: *$1 *\$" /tmp/nvmf-discover
}

# nvmf_connect [NQN [nvme-connect options...]]: `nvme connect -t $NVMF_TRANSPORT` to the target; output in
# /tmp/nvmf-connect.
nvmf_connect() {
  _n=${1:-$NVMF_NQN}; [ $# -gt 0 ] && shift
  nvme connect -t "$NVMF_TRANSPORT" -a "$NVMF_ADDR" -s "$NVMF_PORT" -n "$_n" "$@" > /tmp/nvmf-connect 2>&1
}

# nvmf_ctrl [NQN]: prints the controller name (nvme0, ...) connected to NQN through this target's address and
# port (sysfs subsysnqn and address); nothing and non-zero when there is none.
nvmf_ctrl() {
  _n=${1:-$NVMF_NQN}
  for _c in /sys/class/nvme/nvme*; do
    [ -e "$_c/subsysnqn" ] || continue
    [ "$(cat "$_c/subsysnqn")" = "$_n" ] || continue
    case "$(cat "$_c/address" 2>/dev/null)" in
      *traddr=$NVMF_ADDR,trsvcid=$NVMF_PORT*) echo "${_c##*/}"; return 0 ;;
    esac
  done
  return 1
}

# nvmf_ns_find NSID [NQN]: prints the block device of namespace NSID of NQN (nvme0n1, ...) if there is one now,
# else returns non-zero. With native multipath (Debian's default) the device is the subsystem's namespace head
# (/sys/class/nvme-subsystem/nvme-subsysX/nvmeXnY), otherwise the controller's child nvmeXnY.
nvmf_ns_find() {
  _id=$1; _n=${2:-$NVMF_NQN}
  for _d in /sys/class/nvme-subsystem/nvme-subsys*/nvme*n* /sys/class/nvme/nvme*/nvme*n*; do
    [ -e "$_d/nsid" ] || continue
    _b=${_d##*/}
    case $_b in nvme*c*n*) continue ;; esac
    [ "$(cat "$_d/nsid")" = "$_id" ] || continue
    [ "$(cat "${_d%/*}/subsysnqn" 2>/dev/null)" = "$_n" ] || continue
    [ -b "/dev/$_b" ] || continue
    echo "$_b"; return 0
  done
  return 1
}

# nvmf_ns_dev NSID [NQN [SECONDS]]: waits (default 10 s) for the block device of namespace NSID of NQN and prints
# its name (see nvmf_ns_find).
nvmf_ns_dev() {
  _t=$(( ${3:-10} * 10 ))
  while [ $_t -gt 0 ]; do
    nvmf_ns_find "$1" "$2" && return 0
    sleep 0.1; _t=$((_t - 1))
  done
  return 1
}

# nvmf_ns_gone NSID [NQN [SECONDS]]: waits (default 10 s) until namespace NSID of NQN has no block device any more.
nvmf_ns_gone() {
  _t=$(( ${3:-10} * 10 ))
  while nvmf_ns_find "$1" "$2" > /dev/null; do
    [ $_t -gt 0 ] || return 1
    sleep 0.1; _t=$((_t - 1))
  done
}

# nvmf_ctrl_state [CTRL]: the state of controller CTRL (default: nvmf_ctrl's), e.g. live, resetting, connecting,
# deleting; "gone" when there is no such controller.
nvmf_ctrl_state() {
  _c=${1:-$(nvmf_ctrl)}
  cat "/sys/class/nvme/$_c/state" 2>/dev/null || echo gone
}

# nvmf_field FILE NAME: the value of `NAME : value` in nvme-cli's normal output saved in FILE, trimmed.
nvmf_field() {
  sed -n "s/^$2 *: *//p" "$1" | head -1 | sed 's/ *$//'
}

# nvmf_expect FILE NAME VALUE: fails (non-zero, with a message) unless nvmf_field FILE NAME is VALUE.
nvmf_expect() {
  _v=$(nvmf_field "$1" "$2")
  [ "$_v" = "$3" ] || { echo "nvmf_expect: $2 is '$_v', expected '$3'"; return 1; }
}

# nvmf_id_ctrl DEV: `nvme id-ctrl` (saved in /tmp/nvmf-id-ctrl) and prints SN=, MN=, FR=, SUBNQN=, CNTLID=,
# IOCCSZ=, IORCSZ=, MAXCMD=, MDTS=, SGLS=, MSDBD= lines with the given PREFIX (second argument, default CTRL_).
nvmf_id_ctrl() {
  _p=${2:-CTRL_}
  nvme id-ctrl "/dev/$1" > /tmp/nvmf-id-ctrl 2>&1 || { cat /tmp/nvmf-id-ctrl; return 1; }
  for _f in sn mn fr subnqn cntlid ioccsz iorcsz maxcmd mdts sgls msdbd; do
    echo "$_p$(echo $_f | tr a-z A-Z)=$(nvmf_field /tmp/nvmf-id-ctrl $_f)"
  done
}

# nvmf_id_ns DEV [PREFIX]: `nvme id-ns` (saved in /tmp/nvmf-id-ns) and prints NSZE=, NCAP=, NUSE=, FLBAS=,
# LBADS= (log2 of the in-use LBA format's block size) lines, numbers in decimal.
nvmf_id_ns() {
  _p=${2:-NS_}
  nvme id-ns "/dev/$1" > /tmp/nvmf-id-ns 2>&1 || { cat /tmp/nvmf-id-ns; return 1; }
  for _f in nsze ncap nuse flbas; do
    echo "$_p$(echo $_f | tr a-z A-Z)=$(($(nvmf_field /tmp/nvmf-id-ns $_f)))"
  done
  echo "${_p}LBADS=$(sed -n 's/^lbaf *[0-9]* *:.*lbads:\([0-9]*\).*in use.*/\1/p' /tmp/nvmf-id-ns | head -1)"
}

# nvmf_write PATTERN DEV OFFSET_MIB: writes the file PATTERN to /dev/DEV at OFFSET_MIB MiB with O_DIRECT and
# fsync (coreutils dd: busybox's has no oflag=direct).
nvmf_write() {
  dd if="$1" of="/dev/$2" bs=1M seek="$3" oflag=direct conv=notrunc,fsync 2>/tmp/nvmf-dd \
    || { cat /tmp/nvmf-dd; return 1; }
}

# nvmf_read_compare PATTERN DEV OFFSET_MIB: reads back len(PATTERN) bytes of /dev/DEV at OFFSET_MIB MiB with
# O_DIRECT (page cache dropped first) into /tmp/nvmf-back and compares them with PATTERN.
nvmf_read_compare() {
  _mib=$(( ($(wc -c < "$1") + 1048575) / 1048576 ))
  echo 3 > /proc/sys/vm/drop_caches
  dd if="/dev/$2" of=/tmp/nvmf-back bs=1M skip="$3" count="$_mib" iflag=direct 2>/tmp/nvmf-dd \
    || { cat /tmp/nvmf-dd; return 1; }
  truncate -s "$(wc -c < "$1")" /tmp/nvmf-back
  cmp "$1" /tmp/nvmf-back
}

# nvmf_md5 FILE: the MD5 of FILE (hex).
nvmf_md5() {
  md5sum < "$1" | cut -d' ' -f1
}

# nvmf_disconnect [NQN]: `nvme disconnect -n NQN`, then waits (5 s) for its controllers to go.
nvmf_disconnect() {
  _n=${1:-$NVMF_NQN}
  nvme disconnect -n "$_n" > /tmp/nvmf-disconnect 2>&1 || { cat /tmp/nvmf-disconnect; return 1; }
  _t=50
  while nvmf_ctrl "$_n" > /dev/null; do
    [ $_t -gt 0 ] || return 1
    sleep 0.1; _t=$((_t - 1))
  done
}

# nvmf_dmesg: the kernel's nvme messages, each line prefixed with KMSG: (the console runs with loglevel=1).
nvmf_dmesg() {
  dmesg | grep -i nvme | sed 's/^/KMSG: /'
}
