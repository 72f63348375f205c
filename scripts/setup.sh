#!/bin/sh
# Prepares a Linux machine for the target's userspace NVMe driver, like SPDK's scripts/setup.sh: reserves
# hugepages and binds NVMe controllers to vfio-pci, or gives them back to the kernel's nvme driver.
#
#   setup.sh [config]  reserve hugepages; bind NVMe controllers (PCI class 01:08:02) to vfio-pci, except those
#                      with a namespace in use (mounted, swap, held by device-mapper/md)
#   setup.sh reset     give the NVMe controllers on vfio-pci back to the kernel's nvme driver
#   setup.sh status    hugepages, IOMMU, and every NVMe controller with its driver
#   setup.sh help
#
# Environment:
#   HUGEMEM      MiB of hugepages to have reserved (default 2048); a larger existing reservation is kept (SPDK's
#                script sets exactly this, shrinking a pool programs may be using; CLEAR_HUGE=yes starts from 0)
#   NRHUGE       number of hugepages, instead of HUGEMEM
#   HUGEPGSZ     hugepage size in kB (default: the kernel's, Hugepagesize in /proc/meminfo)
#   HUGENODE     NUMA nodes to reserve on, NRHUGE (or HUGEMEM) on each: "0" or "0,1" (default: the kernel
#                spreads one pool over all nodes)
#   CLEAR_HUGE   "yes": release the hugepages of that size first (config), or at the end (reset)
#   PCI_ALLOWED  "BDF BDF ...": only these controllers ("0000:00:04.0" or "00:04.0")
#   PCI_BLOCKED  "BDF BDF ...": never these
#   TARGET_USER  user (or user:group) given the /dev/vfio/N files of bound controllers, for a target that does not
#                run as root (it also needs an unlimited memlock limit, `ulimit -l unlimited`)

# Plain POSIX sh (dash, busybox ash): operators' machines and the test lab's busybox guest both run it. Functions
# share the global namespace (no `local` in POSIX), so each uses its own `_prefix_` for its variables.

PCI=/sys/bus/pci/devices
VFIO_DRV=/sys/bus/pci/drivers/vfio-pci
NVME_CLASS=0x010802

warn() { echo "setup.sh: $*" >&2; }
die() { warn "$*"; exit 1; }

usage() {
	# The header comment, up to its first blank line.
	sed -n '2,/^$/{/^$/d;s/^# \{0,1\}//;p}' "$0"
}

# norm_bdf BDF: full lower-case form, "00:04.0" -> "0000:00:04.0".
norm_bdf() {
	case $1 in
	*:*:*) echo "$1" ;;
	*) echo "0000:$1" ;;
	esac | tr 'A-F' 'a-f'
}

# in_list BDF LIST...: whether BDF is one of LIST.
in_list() {
	_il_b=$1
	shift
	for _il_x in "$@"; do
		[ "$(norm_bdf "$_il_x")" = "$_il_b" ] && return 0
	done
	return 1
}

# usable BDF: PCI_ALLOWED and PCI_BLOCKED let this script touch BDF.
usable() {
	# shellcheck disable=SC2086 # word splitting of the lists is intended
	if [ -n "${PCI_BLOCKED:-}" ] && in_list "$1" $PCI_BLOCKED; then return 1; fi
	# shellcheck disable=SC2086
	if [ -n "${PCI_ALLOWED:-}" ]; then in_list "$1" $PCI_ALLOWED; return; fi
	return 0
}

# nvme_bdfs: every NVMe controller's BDF.
nvme_bdfs() {
	for _nb_d in "$PCI"/*; do
		[ -r "$_nb_d/class" ] || continue
		[ "$(cat "$_nb_d/class")" = "$NVME_CLASS" ] && echo "${_nb_d##*/}"
	done
}

# driver_of BDF: the bound driver's name, or nothing.
driver_of() {
	_do_l=$(readlink "$PCI/$1/driver" 2>/dev/null) && echo "${_do_l##*/}"
}

# ids BDF: "vendor:device" (hex, no 0x).
ids() {
	_id_v=$(cat "$PCI/$1/vendor")
	_id_d=$(cat "$PCI/$1/device")
	echo "${_id_v#0x}:${_id_d#0x}"
}

# iommu_group BDF: the IOMMU group number, or nothing.
iommu_group() {
	_ig_l=$(readlink "$PCI/$1/iommu_group" 2>/dev/null) && echo "${_ig_l##*/}"
}

# noiommu: whether vfio runs without an IOMMU (CONFIG_VFIO_NOIOMMU and enable_unsafe_noiommu_mode=Y): then
# vfio-pci binds devices that have no IOMMU group, and their group files are /dev/vfio/noiommu-N.
noiommu() {
	[ "$(cat /sys/module/vfio/parameters/enable_unsafe_noiommu_mode 2>/dev/null)" = Y ]
}

# group_path BDF: the VFIO group file of a device bound to vfio-pci.
group_path() {
	_gp_g=$(iommu_group "$1") || return 1
	if [ -e "/dev/vfio/$_gp_g" ]; then
		echo "/dev/vfio/$_gp_g"
	elif [ -e "/dev/vfio/noiommu-$_gp_g" ]; then
		echo "/dev/vfio/noiommu-$_gp_g"
	else
		return 1
	fi
}

# blockdevs BDF: the block devices of the controller's namespaces. With native NVMe multipath a controller holds
# hidden paths (nvme<subsys>c<ctrl>n<ns>) of the namespace head nvme<subsys>n<ns>, which is the device users see.
blockdevs() {
	for _bd_n in "$PCI/$1"/nvme/nvme*/nvme*; do
		[ -e "$_bd_n" ] || continue
		_bd_b=${_bd_n##*/}
		case $_bd_b in
		nvme*c*n*) _bd_b=$(echo "$_bd_b" | sed 's/c[0-9]*n/n/') ;;
		nvme*n*) ;;
		*) continue ;;
		esac
		[ -e "/sys/block/$_bd_b" ] && echo "$_bd_b"
	done | sort -u
}

# in_use BDF: prints what uses the controller's namespaces ("mount@nvme0n1p1 swap@nvme0n1 holder@nvme0n1:dm-0"),
# nothing when unused.
in_use() {
	_iu_r=""
	for _iu_b in $(blockdevs "$1"); do
		for _iu_p in "/sys/block/$_iu_b" "/sys/block/$_iu_b/$_iu_b"*; do
			[ -r "$_iu_p/dev" ] || continue
			_iu_n=${_iu_p##*/}
			_iu_mm=$(cat "$_iu_p/dev")
			# mountinfo's third field is the mounted device's major:minor (whatever name it was mounted by);
			# /proc/mounts catches the file systems that report another device number (btrfs).
			if awk -v d="$_iu_mm" '$3 == d { f = 1 } END { exit !f }' /proc/self/mountinfo 2>/dev/null ||
				grep -q "^/dev/$_iu_n " /proc/mounts 2>/dev/null; then
				_iu_r="$_iu_r mount@$_iu_n"
			fi
			grep -q "^/dev/$_iu_n " /proc/swaps 2>/dev/null && _iu_r="$_iu_r swap@$_iu_n"
			for _iu_h in "$_iu_p"/holders/*; do
				[ -e "$_iu_h" ] && _iu_r="$_iu_r holder@$_iu_n:${_iu_h##*/}"
			done
		done
	done
	echo "${_iu_r# }"
}

# load_vfio: loads vfio-pci unless it is there; explains why not when it cannot.
load_vfio() {
	# The type 1 IOMMU backend is only a soft dependency of vfio, which some modprobes (busybox's) do not follow:
	# without it a userspace driver finds no IOMMU to set on its container.
	[ -d /sys/module/vfio_iommu_type1 ] || modprobe vfio_iommu_type1 2>/dev/null
	[ -d "$VFIO_DRV" ] && return 0
	if ! _lv_e=$(modprobe vfio-pci 2>&1) || [ ! -d "$VFIO_DRV" ]; then
		warn "cannot load vfio-pci: ${_lv_e:-no such driver after modprobe}"
		warn "the kernel ($(uname -r)) needs VFIO (CONFIG_VFIO_PCI, module vfio-pci with its dependencies)"
		return 1
	fi
	echo "loaded vfio-pci"
}

# iommu_groups: how many IOMMU groups there are (none: no IOMMU is enabled).
iommu_groups() {
	_ic_n=0
	for _ic_g in /sys/kernel/iommu_groups/*; do [ -e "$_ic_g" ] && _ic_n=$((_ic_n + 1)); done
	echo $_ic_n
}

# iommu_hint: why a device has no IOMMU group.
iommu_hint() {
	if [ "$(iommu_groups)" = 0 ]; then
		warn "no IOMMU is enabled (/sys/kernel/iommu_groups is empty): turn on VT-d/AMD-Vi in the firmware and" \
			"boot with intel_iommu=on (Intel) or amd_iommu=on (AMD); in a QEMU guest add" \
			"-device intel-iommu,intremap=on,caching-mode=on and -machine q35,kernel-irqchip=split"
	else
		warn "the IOMMU does not cover this device (no iommu_group)"
	fi
}

# bind_vfio BDF: binds the controller to vfio-pci; prints its group file.
bind_vfio() {
	_bv_d=$PCI/$1
	_bv_cur=$(driver_of "$1")
	if [ "$_bv_cur" = vfio-pci ]; then
		echo "$1 ($(ids "$1")): already on vfio-pci, group $(group_path "$1")"
		return 0
	fi
	if [ ! -e "$_bv_d/iommu_group" ] && ! noiommu; then
		warn "$1: no IOMMU group, vfio-pci cannot take it"
		iommu_hint
		return 1
	fi
	# driver_override makes vfio-pci (and nothing else) match the device, including on a later re-probe.
	if ! echo vfio-pci >"$_bv_d/driver_override"; then
		warn "$1: cannot write $_bv_d/driver_override"
		return 1
	fi
	if [ -n "$_bv_cur" ] && ! echo "$1" >"$_bv_d/driver/unbind"; then
		warn "$1: cannot unbind it from $_bv_cur"
		return 1
	fi
	echo "$1" >"$VFIO_DRV/bind" 2>/dev/null
	if [ "$(driver_of "$1")" != vfio-pci ]; then
		warn "$1: vfio-pci did not take it; kernel messages:"
		dmesg 2>/dev/null | tail -5 >&2
		# Back to its driver rather than left with none.
		echo >"$_bv_d/driver_override" 2>/dev/null
		echo "$1" >/sys/bus/pci/drivers_probe 2>/dev/null
		return 1
	fi
	_bv_g=$(group_path "$1") || {
		sleep 1
		_bv_g=$(group_path "$1")
	} || {
		warn "$1: on vfio-pci but no /dev/vfio file for group $(iommu_group "$1")"
		return 1
	}
	if [ -n "${TARGET_USER:-}" ] && ! chown "$TARGET_USER" "$_bv_g"; then
		warn "$1: cannot give $_bv_g to $TARGET_USER"
		return 1
	fi
	echo "$1 ($(ids "$1")): ${_bv_cur:-no driver} -> vfio-pci, group $_bv_g"
}

# bind_kernel BDF: gives the controller back to the kernel's nvme driver.
bind_kernel() {
	_bk_d=$PCI/$1
	_bk_cur=$(driver_of "$1")
	# A lone newline clears the override, so that the normal ID match (nvme) applies again.
	echo >"$_bk_d/driver_override" 2>/dev/null
	if [ "$_bk_cur" = nvme ]; then
		echo "$1 ($(ids "$1")): already on nvme"
		return 0
	fi
	if [ -n "$_bk_cur" ] && ! echo "$1" >"$_bk_d/driver/unbind"; then
		warn "$1: cannot unbind it from $_bk_cur"
		return 1
	fi
	[ -d /sys/bus/pci/drivers/nvme ] || modprobe nvme 2>/dev/null
	echo "$1" >/sys/bus/pci/drivers_probe 2>/dev/null
	_bk_new=$(driver_of "$1")
	if [ "$_bk_new" != nvme ]; then
		warn "$1: the nvme driver did not take it (driver now: ${_bk_new:-none}); is the nvme module there?"
		return 1
	fi
	echo "$1 ($(ids "$1")): ${_bk_cur:-no driver} -> nvme"
}

# hugepage_kb: the hugepage size in kB.
hugepage_kb() {
	if [ -n "${HUGEPGSZ:-}" ]; then echo "$HUGEPGSZ"; return; fi
	awk '/^Hugepagesize:/ { print $2 }' /proc/meminfo
}

# set_hugepages FILE WANT WHERE: at least WANT pages in the pool whose nr_hugepages is FILE.
set_hugepages() {
	_sh_have=$(cat "$1" 2>/dev/null) || {
		warn "no $1 (no such hugepage size or node?)"
		return 1
	}
	if [ "${CLEAR_HUGE:-}" = yes ] && [ "$_sh_have" -gt 0 ]; then
		echo 0 >"$1" || { warn "cannot write $1"; return 1; }
		echo "hugepages: released $_sh_have on $3"
		_sh_have=0
	fi
	if [ "$_sh_have" -ge "$2" ]; then
		echo "hugepages: $_sh_have x ${HP_KB}kB on $3 (wanted $2), kept"
		return 0
	fi
	echo "$2" >"$1" 2>/dev/null || { warn "cannot write $1 (not root, or a read-only /sys?)"; return 1; }
	_sh_got=$(cat "$1")
	if [ "$_sh_got" -lt "$2" ]; then
		warn "hugepages: only $_sh_got of $2 x ${HP_KB}kB on $3 (memory too fragmented or too little free);" \
			"reserve them early, or boot with hugepages=$2"
		return 1
	fi
	echo "hugepages: reserved $_sh_got x ${HP_KB}kB on $3"
}

reserve_hugepages() {
	HP_KB=$(hugepage_kb)
	if [ -z "$HP_KB" ]; then
		warn "the kernel has no hugepages (CONFIG_HUGETLBFS); run the target with --no-huge"
		return 1
	fi
	if [ -n "${NRHUGE:-}" ]; then
		_rh_want=$NRHUGE
	else
		_rh_want=$(((${HUGEMEM:-2048} * 1024 + HP_KB - 1) / HP_KB))
	fi
	if [ -z "${HUGENODE:-}" ]; then
		set_hugepages "/sys/kernel/mm/hugepages/hugepages-${HP_KB}kB/nr_hugepages" "$_rh_want" "all nodes"
		return
	fi
	_rh_rc=0
	for _rh_n in $(echo "$HUGENODE" | tr ',' ' '); do
		set_hugepages "/sys/devices/system/node/node$_rh_n/hugepages/hugepages-${HP_KB}kB/nr_hugepages" \
			"$_rh_want" "node$_rh_n" || _rh_rc=1
	done
	return $_rh_rc
}

# check_listed: warns about PCI_ALLOWED entries that are not NVMe controllers here.
check_listed() {
	for _cl_x in ${PCI_ALLOWED:-}; do
		_cl_b=$(norm_bdf "$_cl_x")
		if [ ! -e "$PCI/$_cl_b" ]; then
			warn "PCI_ALLOWED: no PCI device $_cl_b"
		elif [ "$(cat "$PCI/$_cl_b/class")" != "$NVME_CLASS" ]; then
			warn "PCI_ALLOWED: $_cl_b is not an NVMe controller (class $(cat "$PCI/$_cl_b/class")), left alone"
		fi
	done
}

need_root() {
	[ "$(id -u)" = 0 ] || die "$1 needs root"
}

cmd_config() {
	need_root config
	_c_rc=0
	reserve_hugepages || _c_rc=1
	check_listed
	_c_todo=""
	for _c_b in $(nvme_bdfs); do
		usable "$_c_b" || continue
		_c_use=$(in_use "$_c_b")
		if [ -n "$_c_use" ]; then
			echo "$_c_b ($(ids "$_c_b")): in use ($_c_use), left on $(driver_of "$_c_b")"
			continue
		fi
		_c_todo="$_c_todo $_c_b"
	done
	if [ -z "$_c_todo" ]; then
		echo "no NVMe controller to bind${PCI_ALLOWED:+ (PCI_ALLOWED=$PCI_ALLOWED)}${PCI_BLOCKED:+ (PCI_BLOCKED=$PCI_BLOCKED)}"
		return $_c_rc
	fi
	load_vfio || return 1
	for _c_b in $_c_todo; do
		bind_vfio "$_c_b" || _c_rc=1
	done
	return $_c_rc
}

cmd_reset() {
	need_root reset
	_r_rc=0
	_r_any=""
	for _r_b in $(nvme_bdfs); do
		usable "$_r_b" || continue
		_r_cur=$(driver_of "$_r_b")
		# Controllers on vfio-pci or on no driver at all; those on another driver are someone else's.
		[ -z "$_r_cur" ] || [ "$_r_cur" = vfio-pci ] || continue
		_r_any=1
		bind_kernel "$_r_b" || _r_rc=1
	done
	[ -n "$_r_any" ] || echo "no NVMe controller on vfio-pci"
	if [ "${CLEAR_HUGE:-}" = yes ]; then
		for _r_f in /sys/kernel/mm/hugepages/hugepages-*/nr_hugepages; do
			[ -e "$_r_f" ] || continue
			echo 0 >"$_r_f" || _r_rc=1
		done
		echo "hugepages: released"
	fi
	return $_r_rc
}

cmd_status() {
	echo "Hugepages"
	printf '%-8s %12s %8s / %s\n' node hugesize free total
	_s_any=""
	for _s_p in /sys/devices/system/node/node*/hugepages/hugepages-*; do
		[ -e "$_s_p/nr_hugepages" ] || continue
		_s_n=${_s_p%/hugepages/*}
		_s_sz=${_s_p##*hugepages-}
		printf '%-8s %12s %8s / %s\n' "${_s_n##*/}" "$_s_sz" "$(cat "$_s_p/free_hugepages")" "$(cat "$_s_p/nr_hugepages")"
		_s_any=1
	done
	if [ -z "$_s_any" ]; then
		# No NUMA in sysfs (CONFIG_NUMA off): the global pools.
		for _s_p in /sys/kernel/mm/hugepages/hugepages-*; do
			[ -e "$_s_p/nr_hugepages" ] || continue
			printf '%-8s %12s %8s / %s\n' - "${_s_p##*hugepages-}" "$(cat "$_s_p/free_hugepages")" \
				"$(cat "$_s_p/nr_hugepages")"
		done
	fi
	_s_m=$(awk '$3 == "hugetlbfs" { printf "%s ", $2 }' /proc/mounts 2>/dev/null)
	# The target maps anonymous hugepages; only --huge-dir needs a hugetlbfs mount.
	echo "hugetlbfs mounts: ${_s_m:-none}"
	echo
	_s_g=$(iommu_groups)
	if [ "$_s_g" -gt 0 ]; then
		echo "IOMMU: $_s_g groups"
	elif noiommu; then
		echo "IOMMU: none; vfio runs in unsafe no-IOMMU mode"
	else
		echo "IOMMU: none (vfio-pci needs one: intel_iommu=on / amd_iommu=on, VT-d/AMD-Vi in the firmware)"
	fi
	if [ -d "$VFIO_DRV" ]; then
		echo "vfio-pci: loaded"
	elif modinfo vfio-pci >/dev/null 2>&1; then
		echo "vfio-pci: available, not loaded"
	else
		echo "vfio-pci: not found for kernel $(uname -r)"
	fi
	echo
	printf '%-14s %-6s %-6s %-5s %-10s %-16s %s\n' BDF Vendor Device NUMA Driver Device Block-devices
	_s_any=""
	for _s_b in $(nvme_bdfs); do
		_s_any=1
		_s_drv=$(driver_of "$_s_b")
		_s_dev=-
		case $_s_drv in
		vfio-pci) _s_dev=$(group_path "$_s_b") || _s_dev="group $(iommu_group "$_s_b")?" ;;
		nvme)
			for _s_c in "$PCI/$_s_b"/nvme/nvme*; do [ -e "$_s_c" ] && _s_dev=${_s_c##*/}; done
			;;
		esac
		_s_blk=$(blockdevs "$_s_b" | tr '\n' ' ')
		_s_ids=$(ids "$_s_b")
		printf '%-14s %-6s %-6s %-5s %-10s %-16s %s\n' "$_s_b" "${_s_ids%:*}" "${_s_ids#*:}" \
			"$(cat "$PCI/$_s_b/numa_node" 2>/dev/null || echo -)" "${_s_drv:--}" "$_s_dev" "${_s_blk:--}"
	done
	[ -n "$_s_any" ] || echo "(no NVMe controllers)"
}

case ${1:-config} in
config) cmd_config ;;
reset) cmd_reset ;;
status) cmd_status ;;
help | -h | --help) usage ;;
*)
	usage >&2
	exit 1
	;;
esac
