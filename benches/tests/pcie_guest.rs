//! Benchmark, informational (run by `benches/nvme_pcie_guest.sh`, ignored by `cargo test`): QEMU's emulated NVMe
//! controller behind an intel-iommu in a TCG guest, driven three ways in the same boot: our `bdevperf` through our
//! VFIO driver, SPDK v24.05's `bdevperf` through SPDK's (when the peer is built), and `fio` through the guest
//! kernel's nvme driver. The emulated CPU and device bound every number here, so the ratios say whether a driver
//! costs more than another on the same emulated hardware, not what a real SSD gives.
//!
//! The host libraries alone are compared too: our `nvme_perf` next to SPDK's `spdk_nvme_perf`, same flags.
//!
//! Env: `BENCH_BDEVPERF`, `BENCH_NVME_PERF` (ours, release builds), `SPDK_BDEVPERF`, `SPDK_NVME_PERF`
//! (optional), `BENCH_SECONDS`, `BENCH_ROUNDS`.

use std::path::{Path, PathBuf};
use std::time::Duration;

const SCRIPT: &str = r#"
. /lab/lib.sh
# SPDK's app keeps its core locks in /var/tmp, DPDK its runtime files in /var/run.
mkdir -p /var/tmp /var/run /dev/hugepages
mount -t hugetlbfs nodev /dev/hugepages || fail "mount hugetlbfs"
# Both drivers on hugepages (DPDK without them maps memory at addresses beyond a 39-bit IOMMU).
HUGEMEM=1024 PCI_ALLOWED=$BDF sh /lab/setup.sh config > /dev/null || fail "setup.sh config"
# perf NAME BINARY EXTRA WORKLOAD: one bdevperf run; prints RESULT NAME WORKLOAD IOPS.
perf() {
  $2 -m 0x1 -s 512 $3 --json /opt/perf.json -q 32 -o 4096 -w $4 -t $SECONDS > /tmp/perf.out 2>&1 \
    || { tail -20 /tmp/perf.out; fail "$1 bdevperf $4"; }
  echo "RESULT $1 $4 $(tr -d '\r' < /tmp/perf.out | awk '$1 == "Total" && $2 == ":" {print $3}')"
}
# nperf NAME BINARY WORKLOAD: one spdk_nvme_perf-style run on the controller itself (the host libraries alone).
nperf() {
  $2 -q 32 -o 4096 -w $3 -t $SECONDS -c 0x1 -r "trtype:PCIe traddr:$BDF" > /tmp/nperf.out 2>&1 \
    || { tail -20 /tmp/nperf.out; fail "$1 $3"; }
  echo "RESULT $1 $3 $(tr -d '\r' < /tmp/nperf.out | awk '$1 == "Total" && $2 == ":" {print $3}')"
}
r=0
while [ $r -lt $ROUNDS ]; do
  for w in randread randwrite; do
    perf ours "$BDEVPERF" "" $w
    [ -n "$SPDK_BDEVPERF" ] && perf spdk "$SPDK_BDEVPERF" "" $w
    nperf ours-perf "$NVME_PERF" $w
    [ -n "$SPDK_NVME_PERF" ] && nperf spdk-perf "$SPDK_NVME_PERF" $w
  done
  r=$((r + 1))
done
HUGEMEM=0 sh /lab/setup.sh reset > /dev/null || fail "setup.sh reset"
modprobe nvme 2>/dev/null
_t=100; until [ -b /dev/nvme0n1 ] || [ $_t -eq 0 ]; do sleep 0.1; _t=$((_t - 1)); done
r=0
while [ $r -lt $ROUNDS ]; do
  for w in randread randwrite; do
    fio --name=k --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=$w --bs=4k --iodepth=32 \
      --runtime=$SECONDS --time_based --minimal > /tmp/fio.out 2>&1 || { cat /tmp/fio.out; fail "fio $w"; }
    # Terse output: read IOPS is field 8, write IOPS field 49.
    if [ $w = randread ]; then f=8; else f=49; fi
    echo "RESULT kernel-fio $w $(cut -d';' -f$f /tmp/fio.out)"
  done
  r=$((r + 1))
done
"#;

#[test]
#[ignore = "benchmark: run by benches/nvme_pcie_guest.sh"]
fn pcie_guest_bench() {
    let Some(lab) = lab::Lab::get_or_skip("pcie_guest_bench") else {
        return;
    };
    let ours = PathBuf::from(std::env::var("BENCH_BDEVPERF").expect("BENCH_BDEVPERF"));
    let ours_perf = PathBuf::from(std::env::var("BENCH_NVME_PERF").expect("BENCH_NVME_PERF"));
    let spdk_perf = std::env::var("SPDK_NVME_PERF")
        .ok()
        .filter(|p| Path::new(p).exists());
    let spdk = std::env::var("SPDK_BDEVPERF")
        .ok()
        .filter(|p| Path::new(p).exists());
    let secs = std::env::var("BENCH_SECONDS").unwrap_or_else(|_| "5".into());
    let rounds = std::env::var("BENCH_ROUNDS").unwrap_or_else(|_| "2".into());
    let scratch = lab
        .root()
        .join(format!("pcie-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let drive = scratch.join("drive.img");
    std::fs::File::create(&drive)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let mut cfg = lab::GuestConfig::new("nvme-pcie-bench", SCRIPT);
    let bdf = cfg.vfio_nvme("SPDKRSBENCH0001", &drive, 4, "");
    let conf = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_attach_controller",
         "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": bdf}}]}]});
    let conf_path = scratch.join("perf.json");
    std::fs::write(&conf_path, conf.to_string()).unwrap();
    cfg.image = cfg
        .image
        .clone()
        .with_binaries(&["/usr/bin/fio"])
        .with_packages(&["fio"])
        .with_extra_modules(&["nvme"]);
    cfg.image.binaries.push(ours.clone());
    cfg.image.binaries.push(ours_perf.clone());
    if let Some(s) = &spdk_perf {
        cfg.image.binaries.push(PathBuf::from(s));
    }
    if let Some(s) = &spdk {
        cfg.image.binaries.push(PathBuf::from(s));
        // SPDK initializes OpenSSL, which wants its configuration file.
        let cnf = PathBuf::from("/usr/lib/ssl/openssl.cnf");
        if cnf.exists() {
            cfg.image
                .files
                .push((cnf.clone(), cnf.display().to_string()));
        }
    }
    cfg.files.push((conf_path, "/opt/perf.json".into()));
    cfg.env.extend([
        ("BDF".to_string(), bdf),
        ("BDEVPERF".to_string(), ours.display().to_string()),
        (
            "SPDK_BDEVPERF".to_string(),
            spdk.clone().unwrap_or_default(),
        ),
        ("NVME_PERF".to_string(), ours_perf.display().to_string()),
        (
            "SPDK_NVME_PERF".to_string(),
            spdk_perf.clone().unwrap_or_default(),
        ),
        ("SECONDS".to_string(), secs),
        ("ROUNDS".to_string(), rounds),
    ]);
    cfg.mem_mb = 3072;
    cfg.timeout = Duration::from_secs(1800);
    let out = lab.run(&cfg).unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(out.success(), "{}", out.console);
    // Best of the rounds per tool and workload.
    let mut best: Vec<(String, String, f64)> = Vec::new();
    for l in out.lines_with("RESULT ") {
        // TOOL WORKLOAD IOPS
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let v: f64 = f[2].parse().unwrap_or(0.0);
        match best.iter_mut().find(|b| b.0 == f[0] && b.1 == f[1]) {
            Some(b) => b.2 = b.2.max(v),
            None => best.push((f[0].to_string(), f[1].to_string(), v)),
        }
    }
    let get = |t: &str, w: &str| {
        best.iter()
            .find(|b| b.0 == t && b.1 == w)
            .map_or(0.0, |b| b.2)
    };
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}x", a / b)
        } else {
            "-".into()
        }
    };
    println!("\nbdevperf    ours (VFIO)  SPDK (VFIO)  kernel fio   ours/SPDK  ours/kernel");
    for w in ["randread", "randwrite"] {
        let (o, s, k) = (get("ours", w), get("spdk", w), get("kernel-fio", w));
        println!(
            "{w:<10} {o:>12.0} {s:>12.0} {k:>11.0} {:>11} {:>12}",
            ratio(o, s),
            ratio(o, k)
        );
    }
    println!("\nnvme_perf   ours (VFIO)  SPDK (VFIO)   ours/SPDK");
    for w in ["randread", "randwrite"] {
        let (o, s) = (get("ours-perf", w), get("spdk-perf", w));
        println!("{w:<10} {o:>12.0} {s:>12.0} {:>11}", ratio(o, s));
    }
}
