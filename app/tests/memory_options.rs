//! SPDK's memory options: `-s/--mem-size` caps the DMA memory the target takes (a malloc bdev past it is
//! refused with -ENOMEM, and the target goes on serving), `--no-huge` runs on ordinary pages, and `--huge-dir`
//! backs DMA memory with files in a hugetlbfs mount (unlinked at once: nothing is left there).

mod common;
use common::*;

use serde_json::{json, Value};

fn malloc(t: &Tgt, name: &str, mib: u64) -> Value {
    t.call(
        "bdev_malloc_create",
        json!({"name": name, "num_blocks": mib * 256, "block_size": 4096}),
    )
}

#[test]
fn mem_size_caps_dma_memory() {
    let t = Tgt::start("memsize", &["-s", "128", "--no-huge"]);
    let e = malloc(&t, "big", 256);
    assert_eq!(e["error"]["code"], -libc::ENOMEM, "{e}");
    assert_eq!(e["error"]["message"], "Cannot allocate memory");
    assert!(
        malloc(&t, "small", 16).get("error").is_none(),
        "the target serves on"
    );
    let b = t.call("bdev_get_bdevs", json!({"name": "small"}));
    assert_eq!(b["result"][0]["num_blocks"], 16 * 256);
    assert!(t
        .call("bdev_get_bdevs", json!({"name": "big"}))
        .get("error")
        .is_some());
    let (st, _) = t.stop();
    assert!(st.success());
}

#[test]
fn huge_dir_backs_memory_with_hugetlbfs_files() {
    // A private hugetlbfs mount with a few hugepages reserved; skipped where neither can be had.
    let free = |f: &str| -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(f))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let total = free("HugePages_Total:");
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", (total + 64).to_string());
    let restore = || {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", total.to_string());
    };
    let dir = std::env::temp_dir().join(format!("hugedir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "hugetlbfs", "nodev"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted || free("HugePages_Free:") < 32 {
        println!("SKIPPED: no hugetlbfs mount or hugepages here");
        if mounted {
            let _ = std::process::Command::new("umount").arg(&dir).status();
        }
        let _ = std::fs::remove_dir(&dir);
        restore();
        return;
    }
    // Not a hugetlbfs mount: refused at start with a clear message.
    let plain = std::env::temp_dir().join(format!("nothuge-{}", std::process::id()));
    std::fs::create_dir_all(&plain).unwrap();
    let out = Tgt::try_start("hugedir_bad", &["--huge-dir", plain.to_str().unwrap()])
        .err()
        .expect("refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a hugetlbfs mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = free("HugePages_Free:");
    let t = Tgt::start("hugedir", &["--huge-dir", dir.to_str().unwrap()]);
    assert!(malloc(&t, "m", 32).get("error").is_none());
    let during = free("HugePages_Free:");
    assert!(
        before - during >= 16,
        "32 MiB of malloc took hugepages from the mount ({before} -> {during} free)"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "the backing files are unlinked"
    );
    let (st, _) = t.stop();
    assert!(st.success());
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir(&dir);
    let _ = std::fs::remove_dir(&plain);
    restore();
}
