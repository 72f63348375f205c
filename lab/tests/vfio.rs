//! Boots a guest with two emulated NVMe controllers behind a vIOMMU (`GuestConfig::vfio_nvme`) and drives the
//! repository's `scripts/setup.sh` (shipped as `/lab/setup.sh`) in it: binding one controller to vfio-pci by
//! PCI_ALLOWED while hugepages are reserved, leaving the one whose namespace is mounted alone, honouring
//! PCI_BLOCKED, binding the other once unmounted, `status`, and `reset` back to the kernel's nvme driver.

const SCRIPT: &str = r#"
. /lab/lib.sh
PCI=/sys/bus/pci/devices
drv() { _l=$(readlink $PCI/$1/driver 2>/dev/null) && echo "${_l##*/}"; }
# blk BDF: the controller's namespace block device (the head's name when native multipath hides the path).
blk() {
  for _n in $PCI/$1/nvme/nvme*/nvme*n*; do [ -e "$_n" ] && echo "${_n##*/}" | sed 's/c[0-9]*n/n/'; done | head -1
}
wait_blk() {
  _t=100
  while [ $_t -gt 0 ]; do _b=$(blk $1); [ -n "$_b" ] && [ -b /dev/$_b ] && return 0; sleep 0.1; _t=$((_t - 1)); done
  return 1
}
# setup COMMAND [VAR=value...]: runs setup.sh COMMAND with those variables; its output is in /tmp/setup.out.
setup() {
  _c=$1; shift
  echo "+ $* setup.sh $_c"
  env "$@" sh /lab/setup.sh $_c > /tmp/setup.out 2>&1; _rc=$?
  cat /tmp/setup.out; return $_rc
}

step "controllers on the kernel nvme driver"
for v in A B; do
  eval b=\$NVME_$v
  [ -e $PCI/$b ] || fail "no PCI device $b"
  echo "PCI_ID_$v=$(cat $PCI/$b/vendor | sed s/0x//):$(cat $PCI/$b/device | sed s/0x//)"
  echo "PCI_CLASS_$v=$(cat $PCI/$b/class)"
  wait_blk $b || fail "$b: no namespace block device on nvme (driver: $(drv $b))"
  echo "SERIAL_$v=$(cat $PCI/$b/nvme/nvme*/serial | tr -d ' ')"
  echo "$b: driver $(drv $b), namespace $(blk $b), iommu group $(readlink $PCI/$b/iommu_group)"
done
dmesg | grep -i -E 'DMAR|iommu' | head -5

step "mount B's namespace"
BB=/dev/$(blk $NVME_B)
mke2fs -q $BB > /dev/null 2>&1 || fail "mke2fs $BB"
modprobe ext4 && mount -t ext2 $BB /mnt || fail "mount $BB"
grep /mnt /proc/mounts

step "config, PCI_ALLOWED=A: A to vfio-pci, 8 MiB of hugepages"
setup config HUGEMEM=8 PCI_ALLOWED=$NVME_A || fail "setup.sh config A"
[ "$(drv $NVME_A)" = vfio-pci ] || fail "A on $(drv $NVME_A), not vfio-pci"
[ "$(drv $NVME_B)" = nvme ] || fail "B left nvme: $(drv $NVME_B)"
grep -q "loaded vfio-pci" /tmp/setup.out || fail "setup.sh did not load vfio-pci"
G=$(readlink $PCI/$NVME_A/iommu_group) || fail "A has no iommu_group"
echo "IOMMU_GROUP_A=${G##*/}"
[ -c /dev/vfio/${G##*/} ] || fail "no /dev/vfio/${G##*/}"
grep -q "group /dev/vfio/${G##*/}" /tmp/setup.out || fail "setup.sh did not print the group file"
echo "VFIO_GROUP_A=/dev/vfio/${G##*/}"
# vfio lets one process at a time open a group: this open shows the group is free for a userspace driver.
exec 3<>/dev/vfio/${G##*/} || fail "open /dev/vfio/${G##*/}"
exec 3>&-
ls -l /dev/vfio
echo "HUGEPAGES=$(cat /proc/sys/vm/nr_hugepages)"

step "config, everything: B's namespace is mounted, so it stays on nvme"
setup config HUGEMEM=0 || fail "setup.sh config all (B mounted)"
grep -q "$NVME_B.*in use (mount@" /tmp/setup.out || fail "setup.sh did not say B is mounted"
[ "$(drv $NVME_B)" = nvme ] || fail "mounted B was taken: $(drv $NVME_B)"
umount /mnt

step "config, PCI_BLOCKED=B"
setup config HUGEMEM=0 PCI_BLOCKED=$NVME_B || fail "setup.sh config blocked"
[ "$(drv $NVME_B)" = nvme ] || fail "blocked B was taken: $(drv $NVME_B)"

step "config, everything: B to vfio-pci"
setup config HUGEMEM=0 || fail "setup.sh config all"
[ "$(drv $NVME_B)" = vfio-pci ] || fail "B on $(drv $NVME_B), not vfio-pci"
G=$(readlink $PCI/$NVME_B/iommu_group) || fail "B has no iommu_group"
echo "IOMMU_GROUP_B=${G##*/}"
[ -c /dev/vfio/${G##*/} ] && echo "VFIO_GROUP_B=/dev/vfio/${G##*/}"

step "status"
setup status || fail "setup.sh status"
for b in $NVME_A $NVME_B; do grep -q "^$b .* vfio-pci " /tmp/setup.out || fail "status: $b not on vfio-pci"; done

step "reset: back to nvme"
setup reset || fail "setup.sh reset"
for b in $NVME_A $NVME_B; do
  [ "$(drv $b)" = nvme ] || fail "$b on $(drv $b) after reset"
  wait_blk $b || fail "$b: no namespace block device after reset"
done
[ "$(cat $PCI/$NVME_A/driver_override)" = "(null)" ] || fail "driver_override left: $(cat $PCI/$NVME_A/driver_override)"
mount -t ext2 /dev/$(blk $NVME_B) /mnt && umount /mnt || fail "B's file system is gone after reset"
ok "vfio"
"#;

#[test]
fn nvme_controllers_bind_to_vfio_pci_behind_the_viommu() {
    const TEST: &str = "nvme_controllers_bind_to_vfio_pci_behind_the_viommu";
    let Some(lab) = lab::Lab::get_or_skip(TEST) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("lab-vfio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = lab::GuestConfig::new("lab-vfio", SCRIPT);
    // The kernel's nvme driver holds both controllers at boot, as on an operator's machine; ext4 (which serves
    // ext2) for the mounted namespace.
    cfg.image = lab::ImageSpec::default()
        .with_modules(&["nvme"])
        .with_extra_modules(&["ext4"]);
    let mut bdfs = vec![];
    for (i, slot) in [4u8, 5].into_iter().enumerate() {
        let backing = dir.join(format!("nvme{i}.raw"));
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        bdfs.push(cfg.vfio_nvme(&format!("LABVFIO{i}"), &backing, slot, ""));
    }
    assert_eq!(bdfs, ["0000:00:04.0", "0000:00:05.0"]);
    cfg.env.push(("NVME_A".into(), bdfs[0].clone()));
    cfg.env.push(("NVME_B".into(), bdfs[1].clone()));
    cfg.timeout = std::time::Duration::from_secs(180);

    let out = lab.run(&cfg).unwrap();
    let boot = out.lines_with("LAB-BOOT").next().unwrap_or("?").to_string();
    eprintln!(
        "guest ran in {:.1} s (script started at guest uptime {boot} s)",
        out.duration.as_secs_f64()
    );
    for l in out.lines_with("LAB-STEP") {
        eprintln!("  {l}");
    }
    out.assert_success();
    for v in ["A", "B"] {
        let id = out.value(&format!("PCI_ID_{v}"));
        let class = out.value(&format!("PCI_CLASS_{v}"));
        let group = out.value(&format!("VFIO_GROUP_{v}"));
        eprintln!(
            "controller {v}: {} id {id:?} class {class:?} serial {:?}, group {group:?}",
            bdfs[usize::from(v == "B")],
            out.value(&format!("SERIAL_{v}"))
        );
        // QEMU's NVMe controller (Red Hat's QEMU vendor ID), NVMe class with the NVM Express interface.
        assert_eq!(id.as_deref(), Some("1b36:0010"));
        assert_eq!(class.as_deref(), Some("0x010802"));
        assert!(group.is_some_and(|g| g.starts_with("/dev/vfio/")));
    }
    assert_eq!(out.value("SERIAL_A").as_deref(), Some("LABVFIO0"));
    assert_ne!(out.value("IOMMU_GROUP_A"), out.value("IOMMU_GROUP_B"));
    // HUGEMEM=8 with 2 MiB pages.
    assert_eq!(out.value("HUGEPAGES").as_deref(), Some("4"));
    let _ = std::fs::remove_dir_all(&dir);
}
