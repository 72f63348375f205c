//! The README's set-up on Debian's own paths: `scripts/deps.sh` run with only the system directories (and the
//! Rust toolchain's) on PATH, so Debian's Python (PEP 668: no system-wide `pip install`) is the one it finds;
//! afterwards SPDK's client answers on that same PATH.

use std::path::Path;
use std::process::Command;

const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[test]
fn deps_script_works_with_debians_own_python() {
    if !Path::new("/usr/bin/dpkg-query").exists() {
        println!("SKIPPED: not a Debian system");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // The toolchain running this test: its directory is the only non-system one on PATH.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let cargo_dir = Path::new(&cargo)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let path = format!("{SYSTEM_PATH}:{cargo_dir}");
    let o = Command::new("bash")
        .arg(root.join("scripts/deps.sh"))
        .env_clear()
        .env("PATH", &path)
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        )
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "deps.sh: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new("spdk-rpc")
        .arg("--help")
        .env_clear()
        .env("PATH", SYSTEM_PATH)
        .output()
        .expect("spdk-rpc on the system PATH");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("usage: spdk-rpc"));
}
