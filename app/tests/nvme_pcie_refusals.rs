//! `bdev_nvme_attach_controller -t PCIe` refusals on any machine (no VFIO needed): a malformed address, a PCI
//! function that does not exist, one `-u`, `-A` or `-B` keeps from this process, and bad `-A`/`-B` values at
//! start. Each gets SPDK's answer (errno and its text) with the reason in the log, and the target keeps serving.
//! (Attaching for real runs in the lab guest: `nvme_pcie_guest.rs`.)

mod common;

use common::Tgt;

const ABSENT: &str = "0000:7f:1f.7";

fn attach(t: &Tgt, addr: &str) -> serde_json::Value {
    t.err(&[
        "bdev_nvme_attach_controller",
        "-b",
        "Nvme0",
        "-t",
        "PCIe",
        "-a",
        addr,
    ])
}

#[test]
fn pcie_attach_refusals() {
    let t = Tgt::start("pcie-refusals", &[]);
    for bad in [
        "0000:00:04",
        "00:20.0",
        "0000:00:04.8",
        "zz:00.0",
        "10.0.0.1",
    ] {
        let e = attach(&t, bad);
        assert_eq!(
            e,
            serde_json::json!({"code": -22, "message": "Invalid argument"}),
            "{bad}"
        );
    }
    // No such function: ENODEV, as SPDK's probe that finds nothing; the short form names the same function.
    for addr in [ABSENT, "7f:1f.7"] {
        let e = attach(&t, addr);
        assert_eq!(
            e,
            serde_json::json!({"code": -19, "message": "No such device"}),
            "{addr}"
        );
    }
    // Still serving, nothing left behind.
    assert_eq!(t.ok(&["bdev_nvme_get_controllers"]), serde_json::json!([]));
    let (st, log) = t.stop();
    assert!(st.success());
    for why in ["Invalid traddr 0000:00:04", "Invalid traddr 10.0.0.1"] {
        assert!(log.contains(why), "{why}: {log}");
    }
    assert_eq!(
        log.matches(&format!("PCI device {ABSENT} does not exist"))
            .count(),
        2,
        "{log}"
    );
}

#[test]
fn pci_allow_block_and_no_pci() {
    for (tag, args) in [
        ("pcie-no-pci", vec!["-u"]),
        ("pcie-blocked", vec!["-B", "7f:1f.7"]),
        ("pcie-allowed-other", vec!["-A", "0000:00:04.0"]),
    ] {
        let t = Tgt::start(tag, &args);
        let e = attach(&t, ABSENT);
        assert_eq!(e["code"], -19, "{tag}: {e}");
        let (st, log) = t.stop();
        assert!(st.success(), "{tag}");
        assert!(
            log.contains(&format!("PCI device {ABSENT} is not allowed")),
            "{tag}: {log}"
        );
    }
    // An address that is allowed reaches the probe (which finds nothing here).
    let t = Tgt::start("pcie-allowed", &["-A", ABSENT]);
    assert_eq!(attach(&t, ABSENT)["code"], -19);
    let (_, log) = t.stop();
    assert!(
        log.contains(&format!("PCI device {ABSENT} does not exist")),
        "{log}"
    );
    // A malformed -A / -B stops the target at start with a message.
    let out = Tgt::try_start("pcie-bad-allow", &["-A", "nonsense"])
        .err()
        .expect("spdk_tgt refuses a malformed -A");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Invalid PCI address nonsense"), "{text}");
}
