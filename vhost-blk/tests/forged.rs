//! Forged virtqueues, no guest: a vhost-user front end (`vhost_blk::frontend`) connects to a controller served by
//! in-process reactors and puts well-formed and hostile requests in shared memory. Every bad input must be
//! answered with an error status or break only its own queue, never crash the target or touch memory outside
//! the guest's buffers.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use bdev::modules::malloc::{self, MallocOpts};
use vhost_blk::frontend::{Frontend, Options, F_INDIRECT, F_NEXT, F_WRITE, GPA_BASE};
use vhost_blk::request::{
    S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use vhost_blk::CreateOpts;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);
const BLOCKS: u64 = 2048;

struct Case {
    readonly: bool,
    packed: bool,
    interrupt: bool,
}

const SPLIT: Case = Case {
    readonly: false,
    packed: false,
    interrupt: false,
};

/// Starts reactors (one core), a malloc bdev and a controller named `name`, runs `body` with the socket path on a
/// plain thread (the "VM"), then deletes the controller and bdev and stops.
fn run_case(name: &str, case: Case, body: impl FnOnce(&Path) + Send + 'static) {
    let _g = reactor::testing::lock();
    let dir = std::env::temp_dir().join(format!("vhost-forged-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    vhost_blk::set_socket_dir(Some(dir.clone()));
    let sock: PathBuf = dir.join(name);
    let (tx, rx) = mpsc::channel();
    let opts = reactor::Options {
        cpumask: reactor::CpuMask::parse("0x1").unwrap(),
        main_core: None,
        idle_backoff: case.interrupt,
        pin: false,
    };
    let name = name.to_string();
    reactor::run(opts, move || {
        let bname = format!("M_{name}");
        let b = malloc::create(MallocOpts {
            name: Some(bname.clone()),
            num_blocks: BLOCKS,
            block_size: 512,
            ..Default::default()
        })
        .unwrap();
        let copts = CreateOpts {
            ctrlr: name.clone(),
            dev_name: bname,
            readonly: case.readonly,
            packed_ring: case.packed,
            ..Default::default()
        };
        vhost_blk::controller::create(copts, move |r| {
            r.expect("controller created");
            std::thread::spawn(move || {
                let res = std::panic::catch_unwind(AssertUnwindSafe(|| body(&sock)));
                // The front end is gone: wait for the session to end, then delete everything.
                for _ in 0..500 {
                    let (dtx, drx) = mpsc::channel();
                    vhost_blk::controller::delete(&name, move |r| {
                        let _ = dtx.send(r.is_ok());
                    });
                    if drx.recv().unwrap() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                b.unregister(|_| reactor::stop());
                tx.send(res).unwrap();
            });
        });
    })
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(p) = rx.recv().unwrap() {
        std::panic::resume_unwind(p);
    }
}

fn connect(sock: &Path, opts: Options) -> Frontend {
    Frontend::connect(sock, &opts).unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Sends one request in slot `s` and waits for its completion; returns (status, used len).
fn roundtrip(
    f: &mut Frontend,
    q: u16,
    s: u16,
    ty: u32,
    sector: u64,
    data: Option<(u64, u32)>,
    write: bool,
) -> (u8, u32) {
    if f.packed() {
        let n = if data.is_some() { 3 } else { 2 };
        f.request(q, s, ty, sector, data, write);
        let (id, len) = f.wait_packed_used(q, n, T).expect("completion");
        assert_eq!(id, s);
        return (f.status(q, s), len);
    }
    let before = f.used_idx(q);
    let head = f.request(q, s, ty, sector, data, write);
    assert!(
        f.wait_used(q, before.wrapping_add(1), T),
        "no completion for {ty} on queue {q}"
    );
    let (id, len) = f.used_elem(q, before);
    assert_eq!(id, head as u32);
    (f.status(q, s), len)
}

fn fill(f: &Frontend, addr: u64, len: usize, byte: u8) {
    f.mem
        .write_slice(&vec![byte; len], GuestAddress(addr))
        .unwrap();
}

fn read(f: &Frontend, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    f.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn basic_io(f: &mut Frontend, q: u16) {
    let buf = f.data(0);
    let pat: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    f.mem.write_slice(&pat, GuestAddress(buf)).unwrap();
    assert_eq!(
        roundtrip(f, q, 0, T_OUT, 8, Some((buf, 4096)), false),
        (S_OK, 1)
    );
    let back = f.data(8192);
    fill(f, back, 4096 + 64, 0xaa);
    assert_eq!(
        roundtrip(f, q, 1, T_IN, 8, Some((back, 4096)), true),
        (S_OK, 4097)
    );
    assert_eq!(read(f, back, 4096), pat);
    assert!(
        read(f, back + 4096, 64).iter().all(|b| *b == 0xaa),
        "wrote past the buffer"
    );
    assert_eq!(roundtrip(f, q, 2, T_FLUSH, 0, None, false).0, S_OK);
}

#[test]
fn well_formed_requests() {
    run_case("ok", SPLIT, |sock| {
        let mut f = connect(sock, Options::default());
        let cfg = f.config(60).unwrap();
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), BLOCKS);
        assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
        assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 126);
        basic_io(&mut f, 0);
        // GET_ID: the bdev name, space padded to 20 bytes.
        let id = f.data(0x10000);
        let (st, len) = roundtrip(&mut f, 0, 3, T_GET_ID, 0, Some((id, 20)), true);
        assert_eq!((st, len), (S_OK, 21));
        assert_eq!(&read(&f, id, 20), b"M_ok                ");
        // Discard, then write-zeroes with the unmap flag: the range reads back as zeroes.
        let seg = f.data(0x20000);
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&8u64.to_le_bytes());
        b[8..12].copy_from_slice(&8u32.to_le_bytes());
        f.mem.write_slice(&b, GuestAddress(seg)).unwrap();
        assert_eq!(
            roundtrip(&mut f, 0, 4, T_DISCARD, 0, Some((seg, 16)), false).0,
            S_OK
        );
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        f.mem.write_slice(&b, GuestAddress(seg)).unwrap();
        assert_eq!(
            roundtrip(&mut f, 0, 5, T_WRITE_ZEROES, 0, Some((seg, 16)), false).0,
            S_OK
        );
        let back = f.data(0x30000);
        fill(&f, back, 4096, 0x55);
        assert_eq!(
            roundtrip(&mut f, 0, 6, T_IN, 8, Some((back, 4096)), true).0,
            S_OK
        );
        assert!(read(&f, back, 4096).iter().all(|b| *b == 0));
        // The unmap flag is only for write-zeroes; unknown types are unsupported.
        assert_eq!(
            roundtrip(&mut f, 0, 7, T_DISCARD, 0, Some((seg, 16)), false).0,
            S_UNSUPP
        );
        assert_eq!(roundtrip(&mut f, 0, 8, 99, 0, None, false).0, S_UNSUPP);
    });
}

#[test]
fn hostile_buffers_get_error_status() {
    run_case("bufs", SPLIT, |sock| {
        let mut f = connect(sock, Options::default());
        let end = GPA_BASE + Options::default().mem_size;
        let buf = f.data(0);
        fill(&f, buf, 8192, 0xaa);
        let cases: &[(&str, u32, u64, u64, u32, bool, u8)] = &[
            ("outside memory", T_IN, 0, end + 4096, 4096, true, S_IOERR),
            (
                "crosses the end of memory",
                T_IN,
                0,
                end - 2048,
                4096,
                true,
                S_IOERR,
            ),
            ("below memory", T_OUT, 0, 0x1000, 512, false, S_IOERR),
            ("address wraps", T_IN, 0, u64::MAX - 100, 512, true, S_IOERR),
            (
                "past the end of the disk",
                T_IN,
                BLOCKS - 1,
                buf,
                1024,
                true,
                S_IOERR,
            ),
            (
                "sector overflow",
                T_OUT,
                u64::MAX / 256,
                buf,
                512,
                false,
                S_IOERR,
            ),
            ("not a multiple of 512", T_IN, 0, buf, 1000, true, S_UNSUPP),
            (
                "read into a device-readable buffer",
                T_IN,
                0,
                buf,
                512,
                false,
                S_IOERR,
            ),
            (
                "write from a device-writable buffer",
                T_OUT,
                0,
                buf,
                512,
                true,
                S_IOERR,
            ),
        ];
        for (i, &(what, ty, sector, addr, len, w, want)) in cases.iter().enumerate() {
            let (st, ulen) = roundtrip(&mut f, 0, i as u16, ty, sector, Some((addr, len)), w);
            assert_eq!(st, want, "{what}");
            assert_eq!(ulen, 1, "{what}");
        }
        assert!(
            read(&f, buf, 8192).iter().all(|b| *b == 0xaa),
            "a failed request touched guest memory"
        );
        // Header of the wrong size or direction.
        let q = &f.queues[0];
        let (hdr, st) = (q.hdr(20), q.status(20));
        f.write_hdr(hdr, T_IN, 0);
        for (k, (hlen, hflags)) in [(8u32, 0u16), (17, 0), (16, F_WRITE)]
            .into_iter()
            .enumerate()
        {
            let head = 60 + 3 * k as u16;
            f.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
            f.write_desc(0, head, hdr, hlen, hflags | F_NEXT, head + 1);
            f.write_desc(0, head + 1, buf, 512, F_WRITE | F_NEXT, head + 2);
            f.write_desc(0, head + 2, st, 1, F_WRITE, 0);
            let before = f.used_idx(0);
            f.publish(0, head);
            f.kick(0, true);
            assert!(f.wait_used(0, before.wrapping_add(1), T));
            let s: u8 = f.mem.read_obj(GuestAddress(st)).unwrap();
            assert_eq!(s, S_UNSUPP, "header {hlen} bytes flags {hflags}");
        }
        // More segments than seg_max, through an indirect table: IOERR, nothing read or written.
        let table = f.queues[0].scratch();
        let q = &f.queues[0];
        let (hdr, st) = (q.hdr(30), q.status(30));
        f.write_hdr(hdr, T_IN, 0);
        f.write_table_desc(table, 0, hdr, 16, F_NEXT, 1);
        for i in 1..=200u16 {
            f.write_table_desc(table, i, buf, 512, F_WRITE | F_NEXT, i + 1);
        }
        f.write_table_desc(table, 201, st, 1, F_WRITE, 0);
        f.write_desc(0, 90, table, 202 * 16, F_INDIRECT, 0);
        let before = f.used_idx(0);
        f.publish(0, 90);
        f.kick(0, true);
        assert!(f.wait_used(0, before.wrapping_add(1), T));
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(st)).unwrap(), S_IOERR);
        assert!(read(&f, buf, 8192).iter().all(|b| *b == 0xaa));
        // The queue still works.
        basic_io(&mut f, 0);
    });
}

/// Waits a little and checks queue `q` produced nothing more.
fn assert_stuck(f: &Frontend, q: u16, used: u16, what: &str) {
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(f.used_idx(q), used, "{what}: the broken queue answered");
}

#[test]
fn malformed_chains_break_only_their_queue() {
    run_case("chains", SPLIT, |sock| {
        let mut f = connect(
            sock,
            Options {
                queues: 8,
                queue_size: 64,
                ..Default::default()
            },
        );
        let buf = f.data(0);
        fill(&f, buf, 4096, 0xaa);
        let hdr_st = |f: &Frontend, q: u16| {
            let dq = &f.queues[q as usize];
            (dq.hdr(0), dq.status(0))
        };
        // q0: a loop (0 -> 1 -> 0).
        let (hdr, st) = hdr_st(&f, 0);
        f.write_hdr(hdr, T_IN, 0);
        f.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        f.write_desc(0, 0, hdr, 16, F_NEXT, 1);
        f.write_desc(0, 1, buf, 512, F_WRITE | F_NEXT, 0);
        f.publish(0, 0);
        f.kick(0, true);
        // q1: `next` out of range.
        let (hdr, _) = hdr_st(&f, 1);
        f.write_hdr(hdr, T_IN, 0);
        f.write_desc(1, 0, hdr, 16, F_NEXT, 5000);
        f.publish(1, 0);
        f.kick(1, true);
        // q2: status descriptor of 2 bytes.
        let (hdr, st) = hdr_st(&f, 2);
        f.write_hdr(hdr, T_FLUSH, 0);
        f.mem.write_obj(0xffffu16, GuestAddress(st)).unwrap();
        f.write_desc(2, 0, hdr, 16, F_NEXT, 1);
        f.write_desc(2, 1, st, 2, F_WRITE, 0);
        f.publish(2, 0);
        f.kick(2, true);
        // q3: status descriptor device-readable.
        let (hdr, st) = hdr_st(&f, 3);
        f.write_hdr(hdr, T_FLUSH, 0);
        f.write_desc(3, 0, hdr, 16, F_NEXT, 1);
        f.write_desc(3, 1, st, 1, 0, 0);
        f.publish(3, 0);
        f.kick(3, true);
        // q4: the available index jumps by more than the queue size.
        f.set_avail_idx(4, 200);
        f.kick(4, true);
        // q5: head index out of range.
        f.publish(5, 1000);
        f.kick(5, true);
        // q6: nested indirect table.
        let table = f.queues[6].scratch();
        f.write_table_desc(table, 0, table, 32, F_INDIRECT, 0);
        f.write_desc(6, 0, table, 32, F_INDIRECT, 0);
        f.publish(6, 0);
        f.kick(6, true);
        // q7: indirect table outside guest memory.
        f.write_desc(7, 0, GPA_BASE + (1 << 40), 64, F_INDIRECT, 0);
        f.publish(7, 0);
        f.kick(7, true);

        for q in 0..8u16 {
            assert_stuck(&f, q, 0, &format!("queue {q}"));
        }
        let (_, st) = hdr_st(&f, 2);
        assert_eq!(
            f.mem.read_obj::<u16>(GuestAddress(st)).unwrap(),
            0xffff,
            "bad status descriptor written"
        );
        assert!(read(&f, buf, 4096).iter().all(|b| *b == 0xaa));
        // A broken queue takes no more requests; stopping it still answers (and the target lives on).
        f.request(0, 5, T_FLUSH, 0, None, false);
        assert_stuck(&f, 0, 0, "queue 0 after a valid request");
        for q in 0..8u16 {
            f.stop_queue(q).expect("GET_VRING_BASE on a broken queue");
        }
        drop(f);
        // A new connection gets working queues.
        let mut f = connect(sock, Options::default());
        basic_io(&mut f, 0);
    });
}

#[test]
fn readonly_controller_fails_writes() {
    let case = Case {
        readonly: true,
        ..SPLIT
    };
    run_case("ro", case, |sock| {
        let mut f = connect(sock, Options::default());
        assert_ne!(f.features & vhost_blk::config::bits::BLK_F_RO, 0);
        let buf = f.data(0);
        fill(&f, buf, 4096, 0x77);
        assert_eq!(
            roundtrip(&mut f, 0, 0, T_OUT, 0, Some((buf, 4096)), false).0,
            S_IOERR
        );
        let seg = f.data(0x10000);
        let mut b = [0u8; 16];
        b[8..12].copy_from_slice(&8u32.to_le_bytes());
        f.mem.write_slice(&b, GuestAddress(seg)).unwrap();
        assert_eq!(
            roundtrip(&mut f, 0, 1, T_DISCARD, 0, Some((seg, 16)), false).0,
            S_IOERR
        );
        assert_eq!(
            roundtrip(&mut f, 0, 2, T_WRITE_ZEROES, 0, Some((seg, 16)), false).0,
            S_IOERR
        );
        let back = f.data(0x20000);
        assert_eq!(
            roundtrip(&mut f, 0, 3, T_IN, 0, Some((back, 4096)), true).0,
            S_OK
        );
        assert!(
            read(&f, back, 4096).iter().all(|b| *b == 0),
            "the write reached the disk"
        );
        assert_eq!(roundtrip(&mut f, 0, 4, T_FLUSH, 0, None, false).0, S_OK);
    });
}

#[test]
fn packed_ring_requests_and_bad_chains() {
    let case = Case {
        packed: true,
        interrupt: true,
        ..SPLIT
    };
    run_case("packed", case, |sock| {
        let mut f = connect(
            sock,
            Options {
                queues: 3,
                queue_size: 16,
                packed: true,
                event_idx: true,
                ..Default::default()
            },
        );
        assert!(f.packed());
        // Enough requests to wrap the 16-entry ring several times.
        for round in 0..12u16 {
            basic_io(&mut f, 0);
            let _ = round;
        }
        // Indirect table in a packed ring.
        let q = &f.queues[0];
        let (hdr, st, table) = (q.hdr(9), q.status(9), q.scratch());
        let buf = f.data(0x40000);
        f.write_hdr(hdr, T_IN, 8);
        let put = |i: u64, addr: u64, len: u32, flags: u16| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[14..16].copy_from_slice(&flags.to_le_bytes());
            f.mem.write_slice(&b, GuestAddress(table + i * 16)).unwrap();
        };
        put(0, hdr, 16, 0);
        put(1, buf, 4096, F_WRITE);
        put(2, st, 1, F_WRITE);
        f.packed_chain(0, 9, &[(table, 48, F_INDIRECT)]);
        let (id, len) = f.wait_packed_used(0, 1, T).expect("indirect completion");
        assert_eq!((id, len), (9, 4097));
        assert_eq!(f.status(0, 9), S_OK);
        // q1: a chain longer than the queue (every descriptor flagged NEXT).
        let hdr = f.queues[1].hdr(0);
        f.write_hdr(hdr, T_FLUSH, 0);
        let descs: Vec<(u64, u32, u16)> = (0..16).map(|_| (hdr, 16, F_NEXT)).collect();
        f.packed_chain(1, 0, &descs);
        // q2: buffer id out of range.
        let (hdr, st) = (f.queues[2].hdr(0), f.queues[2].status(0));
        f.write_hdr(hdr, T_FLUSH, 0);
        f.packed_chain(2, 500, &[(hdr, 16, 0), (st, 1, F_WRITE)]);
        std::thread::sleep(Duration::from_millis(200));
        assert!(f.packed_used(1, 1).is_none());
        assert!(f.packed_used(2, 2).is_none());
        // Queue 0 is unaffected.
        basic_io(&mut f, 0);
        let base = f.stop_queue(0).unwrap();
        assert!(base & 0x7fff < 16);
    });
}

#[test]
fn event_idx_interrupts_are_exact() {
    run_case("evidx", SPLIT, |sock| {
        let mut f = connect(
            sock,
            Options {
                queues: 2,
                event_idx: true,
                ..Default::default()
            },
        );
        assert_ne!(f.features & vhost_blk::config::bits::RING_F_EVENT_IDX, 0);
        for q in 0..2u16 {
            let used_event = f.queues[q as usize].avail() + 4 + 2 * 128;
            // Ask for an interrupt at the next completion: it must come.
            let _ = f.queues[q as usize].call.read();
            let u = f.used_idx(q);
            f.mem
                .write_obj(u.to_le(), GuestAddress(used_event))
                .unwrap();
            assert_eq!(roundtrip(&mut f, q, 0, T_FLUSH, 0, None, false).0, S_OK);
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                f.queues[q as usize].call.read().is_ok(),
                "queue {q}: missed interrupt"
            );
            // Ask for one only 10 completions from now: none for the next one.
            let u = f.used_idx(q);
            f.mem
                .write_obj(u.wrapping_add(10).to_le(), GuestAddress(used_event))
                .unwrap();
            assert_eq!(roundtrip(&mut f, q, 1, T_FLUSH, 0, None, false).0, S_OK);
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                f.queues[q as usize].call.read().is_err(),
                "queue {q}: unwanted interrupt"
            );
        }
        basic_io(&mut f, 1);
    });
}

#[test]
fn bad_ring_addresses_are_refused() {
    run_case("addr", SPLIT, |sock| {
        // A front end whose ring lies outside the memory table: the message fails, the target lives on.
        let mut f = connect(sock, Options::default());
        use vhost::VhostBackend;
        let r = f.raw().set_vring_addr(
            0,
            &vhost::VringConfigData {
                queue_max_size: 128,
                queue_size: 128,
                flags: 0,
                desc_table_addr: 0x1000,
                used_ring_addr: 0x2000,
                avail_ring_addr: 0x3000,
                log_addr: None,
            },
        );
        assert!(r.is_err(), "ring outside guest memory was accepted");
        drop(f);
        let mut f = connect(sock, Options::default());
        basic_io(&mut f, 0);
    });
}

#[test]
fn hot_remove_fails_new_io() {
    run_case("hotrm", SPLIT, |sock| {
        let mut f = connect(sock, Options::default());
        basic_io(&mut f, 0);
        let (tx, rx) = mpsc::channel();
        bdev::get("M_hotrm").unwrap().unregister(move |r| {
            let _ = tx.send(r.is_ok());
        });
        assert!(
            rx.recv_timeout(T).unwrap(),
            "bdev unregister did not complete"
        );
        assert!(bdev::get("M_hotrm").is_none());
        let buf = f.data(0);
        assert_eq!(
            roundtrip(&mut f, 0, 0, T_IN, 0, Some((buf, 512)), true).0,
            S_IOERR
        );
        assert_eq!(roundtrip(&mut f, 0, 1, T_FLUSH, 0, None, false).0, S_IOERR);
        let c = vhost_blk::controller::get("hotrm").unwrap();
        assert!(vhost_blk::rpc::controller_json(&c)["backend_specific"]["block"]["bdev"].is_null());
    });
}

#[test]
fn coalescing_delays_interrupts_not_completions() {
    run_case("coal", SPLIT, |sock| {
        vhost_blk::controller::set_coalescing("coal", 20_000, 100).unwrap();
        assert!(
            vhost_blk::controller::set_coalescing("coal", 0, 50).is_err(),
            "iops_threshold below 100 accepted"
        );
        let mut f = connect(sock, Options::default());
        // Completions are visible in the used ring at once (roundtrip polls it) even while interrupts wait.
        for i in 0..40u16 {
            assert_eq!(
                roundtrip(&mut f, 0, i % 32, T_FLUSH, 0, None, false).0,
                S_OK
            );
        }
        // The last completion's interrupt still comes, after the delay.
        std::thread::sleep(Duration::from_millis(300));
        let _ = f.queues[0].call.read();
        assert_eq!(roundtrip(&mut f, 0, 0, T_FLUSH, 0, None, false).0, S_OK);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            f.queues[0].call.read().is_ok(),
            "interrupt lost under coalescing"
        );
        let c = vhost_blk::controller::get("coal").unwrap();
        let j = vhost_blk::rpc::controller_json(&c);
        assert_eq!(j["delay_base_us"], 20_000);
        assert_eq!(j["iops_threshold"], 100);
    });
}

#[test]
fn memory_map_follows_mem_tables() {
    use reactor::memmap::{MemEvent, MemMap};
    use std::os::unix::io::AsRawFd;
    use std::sync::{Arc, Mutex};
    use vhost::VhostBackend;
    use vm_memory::GuestMemoryBackend;

    // Region sizes nothing else in this binary registers, so the subscriber can ignore everything else.
    const SIZE: u64 = 72 << 20;
    const EXTRA: u64 = (22 << 20) + 3 * 4096;
    type Events = Arc<Mutex<Vec<(MemEvent, usize, usize)>>>;
    let events: Events = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    let map = Arc::new(
        MemMap::new(move |t, ev, addr, len| {
            if len as u64 == SIZE || len as u64 == EXTRA {
                // The map clears a region's translation only after this callback returns; clearing it here,
                // before the event is visible, keeps the test's "gone from the map" checks free of that race.
                match ev {
                    MemEvent::Register => t.set_linear_translation(addr, len, addr as u64)?,
                    MemEvent::Unregister => t.clear_translation(addr, len)?,
                }
                e2.lock().unwrap().push((ev, addr, len));
            }
            Ok(())
        })
        .unwrap(),
    );
    let m = map.clone();
    run_case("memmap", SPLIT, move |sock| {
        let wait = |n: usize| {
            let until = std::time::Instant::now() + T;
            loop {
                let got = events.lock().unwrap().clone();
                if got.len() >= n || std::time::Instant::now() > until {
                    return got;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let mut f = connect(
            sock,
            Options {
                mem_size: SIZE,
                ..Default::default()
            },
        );
        basic_io(&mut f, 0);
        // SET_MEM_TABLE: the back end's mapping of the guest memory is registered.
        let got = wait(1);
        assert_eq!(got.len(), 1, "{got:x?}");
        let (ev, first, len) = got[0];
        assert_eq!((ev, len as u64), (MemEvent::Register, SIZE));
        assert_eq!(
            m.translate(first + 4096, 8192),
            Some((first as u64 + 4096, 8192))
        );

        // A new table while the queue runs: the same memory (so the queue keeps working) and one more region.
        let extra_path = std::env::temp_dir().join(format!("vhost-memmap-{}", std::process::id()));
        let extra = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&extra_path)
            .unwrap();
        let _ = std::fs::remove_file(&extra_path);
        extra.set_len(EXTRA).unwrap();
        let va = f.mem.iter().next().unwrap().as_ptr() as u64;
        let fd = f.memory_file().as_raw_fd();
        f.raw()
            .set_mem_table(&[
                vhost::VhostUserMemoryRegionInfo {
                    guest_phys_addr: GPA_BASE,
                    memory_size: SIZE,
                    userspace_addr: va,
                    mmap_offset: 0,
                    mmap_handle: fd,
                },
                vhost::VhostUserMemoryRegionInfo {
                    guest_phys_addr: GPA_BASE + (1 << 30),
                    memory_size: EXTRA,
                    userspace_addr: va + (1 << 30),
                    mmap_offset: 0,
                    mmap_handle: extra.as_raw_fd(),
                },
            ])
            .unwrap();
        // New regions first (make before break), then the old table goes.
        let got = wait(4);
        assert_eq!(got.len(), 4, "{got:x?}");
        let (ev, second, len) = got[1];
        assert_eq!((ev, len as u64), (MemEvent::Register, SIZE));
        assert_ne!(second, first, "the new table is a new mapping");
        let (ev, third, len) = got[2];
        assert_eq!((ev, len as u64), (MemEvent::Register, EXTRA));
        assert_eq!(got[3], (MemEvent::Unregister, first, SIZE as usize));
        assert_eq!(m.translate(first, 1), None);
        assert_eq!(m.translate(second, 64), Some((second as u64, 64)));
        assert_eq!(m.translate(third, 64), Some((third as u64, 64)));
        basic_io(&mut f, 0);

        // The front end goes away: its memory leaves the map.
        drop(f);
        let got = wait(6);
        assert_eq!(got.len(), 6, "{got:x?}");
        let mut gone = got[4..].to_vec();
        gone.sort_by_key(|e| e.1);
        let mut want = vec![
            (MemEvent::Unregister, second, SIZE as usize),
            (MemEvent::Unregister, third, EXTRA as usize),
        ];
        want.sort_by_key(|e| e.1);
        assert_eq!(gone, want);
        assert_eq!(m.translate(second, 1), None);
        assert_eq!(m.translate(third, 1), None);
        let left = reactor::memmap::regions();
        assert!(!left.iter().any(|r| r.0 == second || r.0 == third));
    });
    drop(map);
}
