//! Boots a real guest: the script sees its environment, a per-run file, an extra QEMU disk, and its exit code
//! comes back.

use std::io::Write;

#[test]
fn guest_runs_script_and_returns_output() {
    let Some(lab) = lab::Lab::get_or_skip("guest_runs_script_and_returns_output") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("lab-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // An extra QEMU device: a raw disk holding a known pattern at offset 4096.
    let disk = dir.join("disk.raw");
    let mut f = std::fs::File::create(&disk).unwrap();
    f.write_all(&vec![0u8; 4096]).unwrap();
    f.write_all(b"LAB-DISK-PATTERN-42").unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    let data = dir.join("data.txt");
    std::fs::write(&data, "per-run file contents\n").unwrap();

    let script = r#"
. /lab/lib.sh
step "env and files"
echo "GREETING=$GREETING"
echo "FILE=$(cat /opt/data.txt)"
echo "KERNEL=$(uname -r)"
step "extra disk"
[ -b /dev/vda ] || fail "no /dev/vda"
echo "DISK=$(dd if=/dev/vda bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | head -c 19)"
exit 7
"#;
    let mut cfg = lab::GuestConfig::new("lab-selftest", script);
    cfg.env
        .push(("GREETING".into(), "hello 'quoted' world".into()));
    cfg.files.push((data.clone(), "/opt/data.txt".into()));
    cfg.qemu_args.extend([
        "-drive".to_string(),
        format!(
            "file={},format=raw,if=none,id=d0,cache=none",
            disk.display()
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0".to_string(),
    ]);
    let out = lab.run(&cfg).unwrap();
    eprintln!("guest ran in {:.1} s", out.duration.as_secs_f64());
    assert_eq!(out.exit_code, Some(7), "console:\n{}", out.console);
    assert_eq!(out.boots, 1);
    assert!(!out.timed_out);
    assert_eq!(
        out.value("GREETING").as_deref(),
        Some("hello 'quoted' world")
    );
    assert_eq!(out.value("FILE").as_deref(), Some("per-run file contents"));
    assert_eq!(out.value("KERNEL").as_deref(), Some(lab.kernel_version()));
    assert_eq!(
        out.value("DISK").as_deref(),
        Some("LAB-DISK-PATTERN-42"),
        "console:\n{}",
        out.console
    );
    assert!(out.lines_with("LAB-STEP").count() >= 2);
    let _ = std::fs::remove_dir_all(&dir);
}
