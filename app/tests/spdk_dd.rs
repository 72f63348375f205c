//! `spdk_dd` as an operator runs it: files and bdevs (an aio bdev on a file, a raid1 over two) from a `--json`
//! config, byte-for-byte round trips, `--skip`/`--seek`/`--count` in I/O units, a short last unit, `--sparse`
//! (holes of the input skipped), io_uring and `--aio` file paths,
//! and SPDK's messages and exit codes for bad flags, a missing bdev and counts that do not fit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;

const MIB: usize = 1 << 20;

fn dd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spdk_dd"))
        .args(args)
        .arg("--no-huge")
        .args(["-s", "256"])
        .output()
        .expect("run spdk_dd")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A directory on a disk-backed file system (aio bdevs open their file with O_DIRECT, which tmpfs refuses).
fn scratch(tag: &str) -> PathBuf {
    let d = PathBuf::from("/var/tmp").join(format!("spdk-dd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sized(p: &Path, len: u64) {
    std::fs::File::create(p).unwrap().set_len(len).unwrap();
}

/// A `--json` config in `d`: an aio bdev (512-byte blocks) per (name, file), then `extra`.
fn config(d: &Path, aio: &[(&str, &Path)], extra: Option<serde_json::Value>) -> PathBuf {
    let mut entries: Vec<serde_json::Value> = aio
        .iter()
        .map(|(name, f)| {
            json!({"method": "bdev_aio_create",
                   "params": {"name": name, "filename": s(f), "block_size": 512}})
        })
        .collect();
    entries.extend(extra);
    let p = d.join("cfg.json");
    std::fs::write(
        &p,
        json!({"subsystems": [{"subsystem": "bdev", "config": entries}]}).to_string(),
    )
    .unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn file_to_bdev_and_back() {
    let d = scratch("aio");
    let a = d.join("a");
    let data = pattern(3 * MIB, 1);
    std::fs::write(&a, &data).unwrap();
    let disk = d.join("disk");
    sized(&disk, 4 * MIB as u64);
    let cfg = config(&d, &[("Aio0", &disk)], None);
    let o = dd(&[
        "--if",
        s(&a),
        "--ob",
        "Aio0",
        "--json",
        s(&cfg),
        "--bs",
        "65536",
        "--qd",
        "4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Copying: "), "{}", text(&o));
    // Straight from the disk file: the data is there.
    assert_eq!(&std::fs::read(&disk).unwrap()[..3 * MIB], &data[..]);
    let c = d.join("c");
    let o = dd(&[
        "--ib=Aio0",
        "--of",
        s(&c),
        "--json",
        s(&cfg),
        "--bs=65536",
        "--count",
        "48",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&c).unwrap(), data);
    // The whole bdev out: 4 MiB, the last one never written.
    let all = d.join("all");
    let o = dd(&[
        "--ib",
        "Aio0",
        "--of",
        s(&all),
        "--json",
        s(&cfg),
        "--bs",
        "131072",
        "--qd",
        "8",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = std::fs::read(&all).unwrap();
    assert_eq!(got.len(), 4 * MIB);
    assert_eq!(&got[..3 * MIB], &data[..]);
    assert!(got[3 * MIB..].iter().all(|b| *b == 0));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn through_a_raid1_and_out_again() {
    let d = scratch("raid");
    let (m0, m1) = (d.join("m0"), d.join("m1"));
    sized(&m0, 8 * MIB as u64);
    sized(&m1, 8 * MIB as u64);
    let raid = json!({"method": "bdev_raid_create", "params": {"name": "R1", "raid_level": "raid1",
        "base_bdevs": ["A0", "A1"]}});
    let cfg = config(&d, &[("A0", &m0), ("A1", &m1)], Some(raid));
    let data = pattern(5 * MIB, 7);
    let a = d.join("a");
    std::fs::write(&a, &data).unwrap();
    let o = dd(&[
        "--if",
        s(&a),
        "--ob",
        "R1",
        "--json",
        s(&cfg),
        "--bs",
        "1048576",
        "--qd",
        "3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // Both mirrors hold it.
    for m in [&m0, &m1] {
        assert_eq!(&std::fs::read(m).unwrap()[..5 * MIB], &data[..]);
    }
    let c = d.join("c");
    let o = dd(&[
        "--ib",
        "R1",
        "--of",
        s(&c),
        "--json",
        s(&cfg),
        "--bs",
        "1048576",
        "--count",
        "5",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&c).unwrap(), data);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn files_skip_seek_count_and_short_units() {
    let d = scratch("files");
    let a = d.join("a");
    let data = pattern(10_000, 3);
    std::fs::write(&a, &data).unwrap();
    // Units of 4 KiB: skip one, write three from the third on (the third is short: the file ends).
    let b = d.join("b");
    let o = dd(&[
        "--if",
        s(&a),
        "--of",
        s(&b),
        "--bs",
        "4096",
        "--skip",
        "1",
        "--seek",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = std::fs::read(&b).unwrap();
    assert_eq!(got.len(), 8192 + (10_000 - 4096));
    assert!(got[..8192].iter().all(|x| *x == 0));
    assert_eq!(&got[8192..], &data[4096..]);
    // --count of units.
    let c = d.join("c");
    let o = dd(&["--if", s(&a), "--of", s(&c), "--bs", "1000", "--count", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&c).unwrap(), &data[..3000]);
    // --sparse: zero units leave holes, the size is still the input's.
    let z = d.join("z");
    let mut zd = vec![0u8; 64 * 1024];
    zd[40_000] = 1;
    std::fs::write(&z, &zd).unwrap();
    let zo = d.join("zo");
    let o = dd(&["--if", s(&z), "--of", s(&zo), "--bs", "4096", "--sparse"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&zo).unwrap(), zd);
    let _ = std::fs::remove_dir_all(&d);
}

/// A sparse input file (holes between data runs, a hole at the end) copied with `--sparse`, through io_uring
/// and through `--aio` (the helper thread), into a file and into a bdev: the copies equal the input, and the
/// output file keeps the holes (its allocated blocks are about the input's data, not its size).
#[test]
fn sparse_input_holes_are_skipped_on_both_file_paths() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let d = scratch("holes");
    let a = d.join("a");
    let size = 16 * MIB as u64;
    sized(&a, size);
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    let runs = [
        (0u64, 4096usize),
        (3 * MIB as u64 + 8192, 70_000),
        (9 * MIB as u64, MIB),
    ];
    for (i, (at, len)) in runs.iter().enumerate() {
        f.write_all_at(&pattern(*len, 10 + i as u64), *at).unwrap();
    }
    drop(f);
    let input = std::fs::read(&a).unwrap();
    let bdev = d.join("bdev");
    sized(&bdev, size);
    let cfg = config(&d, &[("Aio0", &bdev)], None);
    for aio in [false, true] {
        let out = d.join(format!("out-{aio}"));
        let mut args = vec![
            "--if",
            s(&a),
            "--of",
            s(&out),
            "--bs",
            "65536",
            "--qd",
            "4",
            "--sparse",
        ];
        if aio {
            args.push("--aio");
        }
        let o = dd(&args);
        assert!(o.status.success(), "aio={aio}: {}", text(&o));
        assert_eq!(std::fs::read(&out).unwrap(), input, "aio={aio}");
        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!(meta.len(), size);
        // 512-byte sectors: the data runs (rounded out to 64 KiB units) and little else.
        let allocated = meta.blocks() * 512;
        assert!(
            allocated <= 2 * MIB as u64,
            "aio={aio}: holes filled ({allocated} bytes allocated)"
        );
        // Into a bdev (zeroed first by the file's creation): the same bytes.
        std::fs::write(&bdev, vec![0u8; size as usize]).unwrap();
        let mut args = vec![
            "--if",
            s(&a),
            "--ob",
            "Aio0",
            "--json",
            s(&cfg),
            "--bs",
            "65536",
            "--sparse",
        ];
        if aio {
            args.push("--aio");
        }
        let o = dd(&args);
        assert!(o.status.success(), "aio={aio}: {}", text(&o));
        assert_eq!(
            std::fs::read(&bdev).unwrap(),
            input,
            "aio={aio} into a bdev"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_flags_and_targets_get_spdk_answers() {
    let d = scratch("bad");
    let a = d.join("a");
    std::fs::write(&a, pattern(8192, 5)).unwrap();
    let disk = d.join("disk");
    sized(&disk, MIB as u64);
    let cfg = config(&d, &[("Aio0", &disk)], None);
    let out = s(&d).to_string() + "/out";
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec![], 22, "You must specify either --if or --ib"),
        (
            vec!["--if", s(&a)],
            22,
            "You must specify either --of or --ob",
        ),
        (
            vec!["--if", s(&a), "--ib", "Aio0", "--of", &out],
            22,
            "You may specify either --if or --ib, but not both.",
        ),
        (
            vec!["--if", s(&a), "--of", &out, "--ob", "Aio0"],
            22,
            "You may specify either --of or --ob, but not both.",
        ),
        (
            vec!["--if", s(&a), "--of", &out, "--bs", "0"],
            22,
            "Invalid --bs value",
        ),
        (
            vec!["--if", s(&a), "--of", &out, "--count", "-3"],
            22,
            "Invalid --count value",
        ),
        (
            vec!["--ib", "Aio0", "--of", &out, "--iflag", "direct"],
            22,
            "--iflags may be used only with --if",
        ),
        (
            vec!["--if", s(&a), "--of", &out, "--iflag", "bogus"],
            234,
            "Unknown file flag: bogus",
        ),
        (
            vec!["--ib", "Nope", "--of", &out, "--json", s(&cfg)],
            237,
            "Could not open bdev Nope: No such device",
        ),
        (
            vec![
                "--if",
                s(&a),
                "--ob",
                "Aio0",
                "--json",
                s(&cfg),
                "--count",
                "300",
            ],
            228,
            "--count value too big (300) - only 256 blocks available in output",
        ),
        (
            vec![
                "--ib",
                "Aio0",
                "--of",
                &out,
                "--json",
                s(&cfg),
                "--skip",
                "1000",
            ],
            228,
            "--skip value too big (1000) - only 256 blocks available in input",
        ),
        (
            vec![
                "--if",
                s(&a),
                "--ob",
                "Aio0",
                "--json",
                s(&cfg),
                "--bs",
                "256",
            ],
            234,
            "--bs value cannot be less than input (1) neither output (512) native block size",
        ),
        (
            vec!["--if", "/nonexistent/x", "--of", &out],
            254,
            "Could not open file /nonexistent/x: No such file or directory",
        ),
        (vec!["--bogus"], 2, "Invalid arguments"),
    ];
    for (args, code, msg) in cases {
        let o = dd(&args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(msg),
            "{args:?}: want {msg:?} in\n{}",
            text(&o)
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
