//! The engine under the distribution's stock fio (Debian 12: fio 3.33), loaded both ways SPDK's plugin is:
//! `ioengine=external:<lib>` and `LD_PRELOAD=<lib>` with `ioengine=spdk_bdev`. Skipped (with a message)
//! where fio is not installed; `scripts/deps.sh` installs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The engine library cargo built next to this test: in `deps/`, from the same compile as the test (a copy in
/// the target directory above may be older: only `cargo build` refreshes it).
fn engine() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        let p = dir.join("libfio_spdk_bdev.so");
        if p.exists() {
            return p;
        }
    }
    panic!("libfio_spdk_bdev.so not found next to {}", exe.display());
}

fn have_fio() -> bool {
    let ok = Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("fio-3.33"));
    if !ok {
        eprintln!("skipped: fio 3.33 is not installed (bash scripts/deps.sh installs it)");
    }
    ok
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fio-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A JSON config with these bdev-subsystem entries.
fn config(dir: &Path, entries: Value) -> PathBuf {
    let p = dir.join("bdev.json");
    let doc = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": entries}]});
    std::fs::write(&p, doc.to_string()).unwrap();
    p
}

fn fio(args: &[&str], preload: bool) -> Output {
    let mut c = Command::new("timeout");
    // fio saves verify state files in its working directory: not in the source tree.
    c.arg("120")
        .arg("fio")
        .arg("--verify_state_save=0")
        .current_dir(std::env::temp_dir());
    if preload {
        c.env("LD_PRELOAD", engine());
    }
    c.args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// fio's JSON report from stdout (fio prints our log lines on stderr).
fn report(o: &Output) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in: {}", text(o)));
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn malloc(name: &str, mib: u64) -> Value {
    serde_json::json!({"method": "bdev_malloc_create",
        "params": {"name": name, "num_blocks": mib * 256, "block_size": 4096}})
}

/// Stock fio with `verify=crc32c` on malloc, null, an io_uring file and a raid1 over two mallocs: several
/// jobs, depths, trim (each block trimmed, then written and verified), fsync (flushes), and two jobs on one bdev in separate halves. Every job does I/O and
/// reports no error and no verify failure; the environment shuts down in order when fio exits.
#[test]
fn stock_fio_verifies_on_every_bdev_kind() {
    if !have_fio() {
        return;
    }
    let dir = scratch("verify");
    let file = dir.join("uring.img");
    std::fs::write(&file, vec![0u8; 32 << 20]).unwrap();
    let conf = config(
        &dir,
        serde_json::json!([
            malloc("Malloc0", 64),
            malloc("Malloc1", 32),
            malloc("M2", 32),
            malloc("M3", 32),
            {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 65536, "block_size": 4096}},
            {"method": "bdev_uring_create", "params": {"name": "Uring0", "filename": file, "block_size": 4096}},
            {"method": "bdev_raid_create", "params": {"name": "Raid1", "raid_level": "raid1",
                "base_bdevs": ["M2", "M3"], "strip_size_kb": 0}},
        ]),
    );
    let job = dir.join("verify.fio");
    std::fs::write(
        &job,
        format!(
            "[global]\nioengine=external:{}\nspdk_json_conf={}\nthread=1\nbs=4k\nverify=crc32c\n\
             group_reporting=0\n\n\
             [malloc_a]\nfilename=Malloc0\nrw=randrw\niodepth=16\nsize=32M\noffset=0\n\n\
             [malloc_b]\nfilename=Malloc0\nrw=randwrite\niodepth=4\nsize=32M\noffset=32M\nbs=16k\n\n\
             [trim]\nfilename=Malloc1\nrw=trimwrite\niodepth=8\nsize=16M\n\n\
             [null]\nfilename=Null0\nrw=randread\niodepth=32\nsize=64M\nverify=0\n\n\
             [uring]\nfilename=Uring0\nrw=randwrite\niodepth=8\nsize=16M\nfsync=16\nzonemode=none\n\n\
             [raid1]\nfilename=Raid1\nrw=randrw\nrwmixread=30\niodepth=16\nsize=16M\n",
            engine().display(),
            conf.display()
        ),
    )
    .unwrap();
    let o = fio(&[job.to_str().unwrap(), "--output-format=json"], false);
    let all = text(&o);
    assert!(o.status.success(), "fio failed: {all}");
    assert!(!all.contains("verify:"), "verify errors: {all}");
    let r = report(&o);
    let jobs = r["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 6, "{all}");
    for j in jobs {
        let name = j["jobname"].as_str().unwrap();
        assert_eq!(j["error"], 0, "job {name}: {all}");
        let moved =
            j["read"]["io_bytes"].as_u64().unwrap() + j["write"]["io_bytes"].as_u64().unwrap();
        assert!(moved > 0, "job {name} did no I/O: {all}");
        if name == "trim" {
            assert!(
                j["trim"]["total_ios"].as_u64().unwrap() > 0,
                "no trims: {all}"
            );
        }
        if name == "uring" {
            // fsync=16: a flush of the bdev after every 16 writes of 4 KiB.
            let syncs = j["sync"]["total_ios"].as_u64().unwrap();
            assert!(syncs >= (16 << 20) / 4096 / 16, "{syncs} syncs: {all}");
        }
        if name != "null" {
            // Verifying jobs read back what they wrote.
            assert!(
                j["read"]["io_bytes"].as_u64().unwrap() > 0,
                "job {name} verified nothing"
            );
        }
    }
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Reactor on core 0 stopped"),
        "no orderly shutdown at exit: {all}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Several threads on one bdev through `--numjobs`, each job thread on its own channel, with the engine
/// preloaded and named `spdk_bdev` as SPDK's usage has it; the RPC socket asked for serves while fio runs
/// and is gone after.
#[test]
fn preloaded_engine_runs_numjobs_threads() {
    if !have_fio() {
        return;
    }
    let dir = scratch("preload");
    let conf = config(&dir, serde_json::json!([malloc("Malloc0", 64)]));
    let sock = dir.join("fio.sock");
    let o = fio(
        &[
            "--name=numjobs",
            "--ioengine=spdk_bdev",
            &format!("--spdk_json_conf={}", conf.display()),
            &format!("--spdk_rpc_listen_addr={}", sock.display()),
            "--thread=1",
            "--filename=Malloc0",
            "--rw=randwrite",
            "--verify=crc32c",
            "--bs=4k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--output-format=json",
        ],
        true,
    );
    let all = text(&o);
    assert!(o.status.success(), "fio failed: {all}");
    let r = report(&o);
    let jobs = r["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4, "{all}");
    for j in jobs {
        assert_eq!(j["error"], 0, "{all}");
        assert_eq!(j["job options"]["ioengine"], "spdk_bdev");
        assert_eq!(j["write"]["io_bytes"].as_u64().unwrap(), 16 << 20, "{all}");
        assert_eq!(j["read"]["io_bytes"].as_u64().unwrap(), 16 << 20, "{all}");
    }
    assert!(
        all.contains(&format!("{}", sock.display())),
        "RPC server not started: {all}"
    );
    assert!(!sock.exists(), "RPC socket left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Data changed behind the engine's back is caught by fio's verify: a pattern written through the engine
/// into an io_uring file bdev, one block of the file overwritten, then a verify-only pass.
#[test]
fn verify_catches_a_block_corrupted_behind_the_engine() {
    if !have_fio() {
        return;
    }
    let dir = scratch("corrupt");
    let file = dir.join("data.img");
    std::fs::write(&file, vec![0u8; 8 << 20]).unwrap();
    let conf = config(
        &dir,
        serde_json::json!([{"method": "bdev_uring_create",
            "params": {"name": "Uring0", "filename": file, "block_size": 4096}}]),
    );
    let lib = format!("--ioengine=external:{}", engine().display());
    let c = format!("--spdk_json_conf={}", conf.display());
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--name=pattern",
            lib.as_str(),
            c.as_str(),
            "--thread=1",
            "--filename=Uring0",
            "--rw=write",
            "--bs=4k",
            "--iodepth=8",
            "--size=8M",
            "--verify=crc32c",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&'static str]| {
        let a = args(extra);
        fio(&a.iter().map(String::as_str).collect::<Vec<_>>(), false)
    };
    let o = run(&["--do_verify=0"]);
    assert!(o.status.success(), "writing the pattern: {}", text(&o));
    // Unchanged, the verify pass is clean.
    let o = run(&["--verify_only=1"]);
    assert!(o.status.success(), "clean verify: {}", text(&o));
    // One block (at 3 MiB) overwritten through the file, not through the engine.
    let mut data = std::fs::read(&file).unwrap();
    for b in &mut data[3 << 20..(3 << 20) + 4096] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, &data).unwrap();
    let o = run(&["--verify_only=1"]);
    let all = text(&o);
    assert!(!o.status.success(), "corruption not reported: {all}");
    assert!(
        all.contains("verify") && all.contains(&format!("offset {}", 3 << 20)),
        "fio did not name the corrupted block: {all}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the engine refuses, each with a message fio itself would not print and a failed run.
#[test]
fn refusals_say_why() {
    if !have_fio() {
        return;
    }
    let dir = scratch("refuse");
    let conf = config(&dir, serde_json::json!([malloc("Malloc0", 16)]));
    let lib = format!("--ioengine=external:{}", engine().display());
    let c = format!("--spdk_json_conf={}", conf.display());
    let base = ["--name=r", "--rw=read", "--bs=4k", "--size=1M"];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                lib.clone(),
                c.clone(),
                "--thread=0".into(),
                "--filename=Malloc0".into(),
            ],
            "must set thread=1",
        ),
        (
            vec![
                lib.clone(),
                c.clone(),
                "--thread=1".into(),
                "--filename=Nope0".into(),
            ],
            "Unable to find bdev with name Nope0",
        ),
        (
            vec![
                lib.clone(),
                "--thread=1".into(),
                "--filename=Malloc0".into(),
            ],
            "no configuration file",
        ),
        (
            vec![
                lib.clone(),
                format!("--spdk_json_conf={}", dir.join("missing.json").display()),
                "--thread=1".into(),
                "--filename=Malloc0".into(),
            ],
            "missing.json",
        ),
        (
            vec![
                lib.clone(),
                c.clone(),
                "--thread=1".into(),
                "--filename=Malloc0".into(),
                "--zone_append=1".into(),
            ],
            "zoned bdevs",
        ),
    ];
    for (extra, want) in cases {
        let mut a: Vec<&str> = base.to_vec();
        a.extend(extra.iter().map(String::as_str));
        let o = fio(&a, false);
        let all = text(&o);
        assert!(!o.status.success(), "{extra:?} succeeded: {all}");
        assert!(all.contains(want), "{extra:?}: no '{want}' in: {all}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
