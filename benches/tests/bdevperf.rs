//! bdevperf runs real workloads: `-w verify` must pass on malloc, on an io_uring file bdev and through an
//! error bdev with nothing injected, and must fail loudly when faults are injected over RPC while it runs.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tmpdir(tag: &str) -> PathBuf {
    // /var/tmp is disk-backed on Debian (O_DIRECT works there, unlike tmpfs).
    let d = PathBuf::from(format!(
        "/var/tmp/spdk-rs-bdevperf-{tag}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &Path, entries: &str) -> PathBuf {
    let p = dir.join("bdevperf.json");
    std::fs::write(
        &p,
        format!(r#"{{"subsystems":[{{"subsystem":"bdev","config":[{entries},{{"method":"bdev_wait_for_examine"}}]}}]}}"#),
    )
    .unwrap();
    p
}

fn bdevperf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bdevperf"))
        .args(args)
        .output()
        .unwrap()
}

/// The job row of `bdev` in bdevperf's table, and its eight numbers (runtime, IOPS, MiB/s, Fail/s, TO/s, avg,
/// min, max latency).
fn job_row<'a>(stdout: &'a str, bdev: &str) -> (&'a str, Vec<f64>) {
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(bdev) && l.contains(':'))
        .expect("job row");
    let cols = row
        .split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    (row, cols)
}

fn assert_verify_passes(out: &Output, bdev: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bdevperf failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Running I/O for 1 seconds..."), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "Job: {bdev} (Core Mask 0x1, workload: verify, depth: 16, IO size: 4096)"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("Verification LBA range: start 0x0"),
        "{stdout}"
    );
    let (row, cols) = job_row(&stdout, bdev);
    assert_eq!(cols.len(), 8, "{row}");
    assert!(cols[1] > 0.0, "IOPS > 0: {row}");
    assert_eq!(cols[3], 0.0, "no failures: {row}");
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("Total")),
        "{stdout}"
    );
}

const VERIFY: &[&str] = &[
    "-q",
    "16",
    "-o",
    "4096",
    "-w",
    "verify",
    "-t",
    "1",
    "-m",
    "0x1",
    "--interrupt-mode",
];

#[test]
fn verify_passes_on_malloc() {
    let d = tmpdir("malloc");
    let c = config(
        &d,
        r#"{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":16384,"block_size":512}}"#,
    );
    let out = bdevperf(&[VERIFY, &["-c", c.to_str().unwrap()]].concat());
    assert_verify_passes(&out, "Malloc0");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn verify_passes_on_uring_file_and_data_reaches_the_file() {
    let d = tmpdir("uring");
    let f = d.join("disk.img");
    std::fs::File::create(&f)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let c = config(
        &d,
        &format!(
            r#"{{"method":"bdev_uring_create","params":{{"name":"Uring0","filename":"{}","block_size":512}}}}"#,
            f.display()
        ),
    );
    let out = bdevperf(&[VERIFY, &["-c", c.to_str().unwrap()]].concat());
    assert_verify_passes(&out, "Uring0");
    let data = std::fs::read(&f).unwrap();
    assert!(
        data.iter().any(|b| *b != 0),
        "verify wrote its pattern to the file"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn verify_passes_through_error_bdev_with_nothing_injected() {
    let d = tmpdir("error");
    let c = config(
        &d,
        r#"{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":16384,"block_size":512}},{"method":"bdev_error_create","params":{"base_name":"Malloc0"}}"#,
    );
    let out = bdevperf(&[VERIFY, &["-c", c.to_str().unwrap(), "-T", "EE_Malloc0"]].concat());
    assert_verify_passes(&out, "EE_Malloc0");
    let _ = std::fs::remove_dir_all(d);
}

/// A child process killed if the test fails before it is waited for (a `bdevperf -z` would otherwise poll on).
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn injected_write_failures_fail_the_run_loudly() {
    let d = tmpdir("inject");
    let sock = d.join("perf.sock");
    let c = config(
        &d,
        r#"{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":16384,"block_size":512}},{"method":"bdev_error_create","params":{"base_name":"Malloc0"}}"#,
    );
    let mut child = KillOnDrop(Some(
        Command::new(env!("CARGO_BIN_EXE_bdevperf"))
            .args([
                "-q",
                "8",
                "-o",
                "4096",
                "-w",
                "verify",
                "-t",
                "3",
                "-z",
                "-T",
                "EE_Malloc0",
                "--interrupt-mode",
                "-c",
            ])
            .arg(&c)
            .arg("-r")
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "bdevperf -z did not open its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rpc = |args: &[&str]| {
        Command::new("spdk-rpc")
            .arg("-s")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap()
    };
    let o = rpc(&[
        "bdev_error_inject_error",
        "EE_Malloc0",
        "write",
        "failure",
        "-n",
        "5",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // perform_tests through our bdevperf.py (SPDK's is not in the pip package) must report the failure.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bdevperf.py");
    let o = Command::new("python3")
        .arg(script)
        .arg("-s")
        .arg(&sock)
        .args(["-t", "60", "perform_tests"])
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "perform_tests must fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("failed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = rpc(&["spdk_kill_instance", "SIGTERM"]);
    let out = child.0.take().unwrap().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ended in about"), "{stdout}");
    assert!(!out.status.success(), "exit status reports the failure");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn bad_flags_are_refused() {
    let out = bdevperf(&["-q", "16", "-o", "4096", "-w", "bogus", "-t", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workload"));
    let out = bdevperf(&["-q", "16", "-w", "read", "-t", "1"]);
    assert!(!out.status.success());
    let out = bdevperf(&["-q", "16", "-o", "4096", "-w", "randrw", "-t", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("-M"));
}

#[test]
fn sigterm_mid_run_completes_in_flight_io_and_reports() {
    let d = tmpdir("sigterm");
    let c = config(
        &d,
        r#"{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":16384,"block_size":512}}"#,
    );
    let child = Command::new(env!("CARGO_BIN_EXE_bdevperf"))
        .args([
            "-q",
            "32",
            "-o",
            "4096",
            "-w",
            "verify",
            "-t",
            "60",
            "--interrupt-mode",
            "-c",
        ])
        .arg(&c)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "shutdown drained promptly, not by timeout"
    );
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Received shutdown signal"), "{stdout}");
    let (row, cols) = job_row(&stdout, "Malloc0");
    assert!(
        cols[1] > 0.0 && cols[3] == 0.0,
        "I/O ran and none failed: {row}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn steady_state_io_path_allocates_nothing() {
    let d = tmpdir("alloc");
    let c = config(
        &d,
        r#"{"method":"bdev_null_create","params":{"name":"null0","num_blocks":65536,"block_size":4096}},{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":16384,"block_size":512}}"#,
    );
    // verify needs a bdev that keeps data: malloc only; the others run on both bdevs at once.
    for (w, only) in [
        ("randread", None),
        ("randwrite", None),
        ("verify", Some("Malloc0")),
    ] {
        let mut args = vec![
            "-q",
            "64",
            "-o",
            "4096",
            "-w",
            w,
            "-t",
            "2",
            "-m",
            "0x1",
            "--interrupt-mode",
            "-c",
            c.to_str().unwrap(),
        ];
        if let Some(b) = only {
            args.extend(["-T", b]);
        }
        let out = bdevperf(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        let line = stdout
            .lines()
            .find(|l| l.contains("Steady-state heap allocations"))
            .expect("allocation line");
        let n: u64 = line
            .split(':')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ios: u64 = line
            .split("over ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(ios > 1000, "{line}");
        assert_eq!(
            n, 0,
            "{w}: heap allocations in the steady-state I/O path: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn every_core_jobs_split_the_verify_range() {
    if std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        < 2
    {
        return;
    }
    let d = tmpdir("everycore");
    let c = config(
        &d,
        r#"{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":16384,"block_size":512}}"#,
    );
    let out = bdevperf(&[
        "-q",
        "16",
        "-o",
        "4096",
        "-w",
        "verify",
        "-t",
        "1",
        "-m",
        "0x3",
        "-C",
        "--interrupt-mode",
        "-c",
        c.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 16384 blocks / 8 per I/O = 2048 slots, halved between the two cores' jobs.
    assert!(
        stdout.contains("Verification LBA range: start 0x0 length 0x400"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Verification LBA range: start 0x400 length 0x400"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(d);
}
