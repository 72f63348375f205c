//! `nvme_perf` against this project's NVMe-oF/TCP target (in this test process): a mixed run completes with
//! `spdk_nvme_perf`'s summary table and no errors, a two-core run with digests gives a row per core and their
//! sum; bad flags and an unknown subsystem exit non-zero with a message; over TLS (`-S ssl --psk-path`) 128 KiB
//! mixed I/O completes, and hosts without TLS or without a PSK do not get in.

use std::process::Command;
use std::time::Duration;

use bdev::modules::malloc::{self, MallocOpts};
use nvmf::mgmt;
use nvmf::params::{
    AnaState, ListenerConfig, NamespaceParams, NvmfCreateSubsystem, TransportKind, TransportOpts,
    Trid,
};
use reactor::testing::on_app;

const NQN: &str = "nqn.2016-06.io.spdk:nvme-perf";

/// A malloc bdev of 8 MiB for a namespace.
fn malloc_ns(name: &str) {
    malloc::create(MallocOpts {
        name: Some(name.into()),
        num_blocks: 16384,
        block_size: 512,
        ..Default::default()
    })
    .unwrap();
}

/// Makes `nqn` listen on a free loopback port (requiring TLS when `secure`) and returns the port.
fn listen(nqn: &str, secure: bool) -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let trid = Trid::tcp("127.0.0.1", &port.to_string());
    let config = ListenerConfig {
        nqn: nqn.into(),
        listen_address: trid.clone(),
        secure_channel: secure,
        sock_impl: None,
    };
    mgmt::add_listener(nqn, trid, AnaState::Optimized, config).unwrap();
    port
}

fn target() -> u16 {
    on_app(|reply| {
        for name in ["PerfM0", "PerfM1"] {
            malloc_ns(name);
        }
        mgmt::create_transport(
            TransportOpts::defaults(TransportKind::Tcp),
            None,
            move |r| {
                r.unwrap();
                let mut o = NvmfCreateSubsystem::new(NQN);
                o.allow_any_host = true;
                o.normalize(false, 1, 1024).unwrap();
                mgmt::create_subsystem(o);
                let port = listen(NQN, false);
                mgmt::add_ns(NQN, NamespaceParams::new("PerfM0"), move |r| {
                    r.unwrap();
                    mgmt::add_ns(NQN, NamespaceParams::new("PerfM1"), move |r| {
                        r.unwrap();
                        reply(port);
                    });
                });
            },
        );
    })
}

/// The summary's `Total` row.
fn total_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("Total"))
        .expect("a Total line")
}

/// The IOPS of the summary's `Total` row.
fn total_iops(out: &str) -> f64 {
    total_line(out)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
}

fn perf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nvme_perf"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn nvme_perf_runs_against_our_target() {
    let (tx, rx) = std::sync::mpsc::channel();
    reactor::testing::run("0x1", Duration::from_secs(120), move || {
        std::thread::spawn(move || {
            let res = std::panic::catch_unwind(body);
            reactor::stop();
            let _ = tx.send(res);
        });
    });
    if let Err(p) = rx.recv_timeout(Duration::from_secs(5)).unwrap() {
        std::panic::resume_unwind(p);
    }
}

fn body() {
    let port = target();
    let r = format!("trtype:tcp adrfam:ipv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}");
    let (ok, out, err) = perf(&[
        "-q", "8", "-o", "4096", "-w", "randrw", "-M", "50", "-t", "1", "-r", &r,
    ]);
    assert!(ok, "{out}{err}");
    let iops = total_iops(&out);
    assert!(iops > 0.0, "{out}");
    assert!(out.contains("Device Information"), "{out}");
    // Both namespaces on the one core: a job and a row each, as SPDK perf runs them.
    for nsid in [1, 2] {
        assert!(
            out.contains(&format!("subnqn:{NQN}) NSID {nsid} from core  0")),
            "{out}"
        );
    }
    // `ns:2` in the transport id: that namespace only.
    let (ok, out, err) = perf(&[
        "-q",
        "4",
        "-o",
        "4096",
        "-w",
        "randread",
        "-t",
        "1",
        "-r",
        &format!("{r} ns:2"),
    ]);
    assert!(ok, "{out}{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains(" from core ")).collect();
    assert!(rows.len() == 1 && rows[0].contains("NSID 2"), "{out}");
    let (ok, _, err) = perf(&[
        "-q",
        "4",
        "-o",
        "4096",
        "-w",
        "randread",
        "-t",
        "1",
        "-r",
        &format!("{r} ns:9"),
    ]);
    assert!(!ok && err.contains("namespace 9 is not active"), "{err}");
    // Two cores and two namespaces: namespace i on core i, each on its own I/O queue, and their sum; with TCP
    // digests.
    let (ok, out, err) = perf(&[
        "-q", "4", "-o", "4096", "-w", "randread", "-t", "1", "-c", "0x3", "-H", "-I", "-r", &r,
    ]);
    assert!(ok, "{out}{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains(" from core ")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].contains("NSID 1 from core  0") && rows[1].contains("NSID 2 from core  1"),
        "{out}"
    );
    let iops = |l: &str| -> f64 {
        l.rsplit(':')
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let total = total_line(&out);
    let sum: f64 = rows.iter().map(|l| iops(l)).sum();
    assert!(rows.iter().all(|l| iops(l) > 0.0), "{out}");
    assert!((iops(total) - sum).abs() < 1.0, "{out}");
    // Refusals: a flag it does not know, a size that is not whole blocks, nobody at that subsystem.
    let (ok, _, err) = perf(&[
        "-q", "8", "-o", "4096", "-w", "randread", "-t", "1", "-Z", "-r", &r,
    ]);
    assert!(!ok && err.contains("unknown flag -Z"), "{err}");
    let (ok, _, err) = perf(&[
        "-q", "8", "-o", "1000", "-w", "randread", "-t", "1", "-r", &r,
    ]);
    assert!(!ok && err.contains("block size"), "{err}");
    let bad = r.replace(NQN, "nqn.2016-06.io.spdk:nobody");
    let (ok, _, err) = perf(&["-q", "8", "-o", "4096", "-w", "read", "-t", "1", "-r", &bad]);
    assert!(!ok && err.contains("Connect"), "{err}");
    tls_runs();
}

/// Over TLS (`-S ssl --psk-path`, SPDK perf's flags): a subsystem behind a `secure_channel` listener that knows
/// the host by a 48-byte PSK (SHA-384 suite); 128 KiB mixed I/O (several TLS records per PDU, R2T/H2C data)
/// completes; without TLS, with another host NQN, and with `--psk-path` but no `-S ssl` it does not.
fn tls_runs() {
    const NQN_TLS: &str = "nqn.2016-06.io.spdk:nvme-perf-tls";
    const HOST: &str = "nqn.2016-06.io.spdk:perf-host";
    let key = nvme_tls::ConfiguredPsk::new((0..48u8).collect(), 2).unwrap();
    let dir = std::env::temp_dir().join(format!("nvme-perf-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let psk = dir.join("psk");
    std::fs::write(&psk, key.to_text()).unwrap();
    let port = on_app(move |reply| {
        malloc_ns("PerfTls");
        let mut o = NvmfCreateSubsystem::new(NQN_TLS);
        o.normalize(false, 2, 1024).unwrap();
        mgmt::create_subsystem(o);
        let host =
            serde_json::from_value(serde_json::json!({"nqn": NQN_TLS, "host": HOST})).unwrap();
        mgmt::add_host(host, Some(key)).unwrap();
        let port = listen(NQN_TLS, true);
        mgmt::add_ns(NQN_TLS, NamespaceParams::new("PerfTls"), move |r| {
            r.unwrap();
            reply(port);
        });
    });
    let r = format!(
        "trtype:tcp adrfam:ipv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN_TLS} hostnqn:{HOST}"
    );
    let psk = psk.to_string_lossy().into_owned();
    let run = |extra: &[&str], r: &str| {
        let mut a = vec![
            "-q", "8", "-o", "131072", "-w", "randrw", "-M", "50", "-t", "1",
        ];
        a.extend_from_slice(extra);
        a.extend(["-r", r]);
        perf(&a)
    };
    let (ok, out, err) = run(&["-S", "ssl", "--psk-path", &psk], &r);
    assert!(ok, "{out}{err}");
    let iops = total_iops(&out);
    assert!(iops > 0.0 && !err.contains("error"), "{out}{err}");
    let (ok, _, _) = run(&[], &r);
    assert!(!ok, "NVMe/TCP in the clear at a TLS listener");
    let other = r.replace(HOST, "nqn.2016-06.io.spdk:someone-else");
    let (ok, _, _) = run(&["-S", "ssl", "--psk-path", &psk], &other);
    assert!(!ok, "a host the subsystem has no PSK for");
    let (ok, _, err) = run(&["--psk-path", &psk], &r);
    assert!(!ok && err.contains("-S ssl"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
