//! The error-injection bdev over malloc bases, driven through real reactors.
//!
//! Each test body runs on a plain OS thread and hands work to the app thread with `on_app`, waiting for the
//! reply, so the test reads top to bottom while I/O runs (and completes) on the reactor.

mod common;
use common::*;

use std::cell::RefCell;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::modules::error::{self, ErrorType, InjectOpts};
use bdev::modules::malloc::{self, MallocOpts};
use bdev::{ErrorKind, IoStatus, IoType};

// ---------------------------------------------------------------------------------------------------------------
// Harness

/// Submits one I/O on the app thread and waits for it: (status, data read back).
fn io_on(
    name: &str,
    write: bool,
    t: IoType,
    offset: u64,
    blocks: u64,
    data: Option<Vec<u8>>,
) -> (IoStatus, Vec<u8>) {
    let name = name.to_string();
    on_app(move |reply| {
        submit(
            &chan(&name, write),
            t,
            offset,
            blocks,
            data,
            reply as Box<dyn FnOnce(_)>,
        )
    })
}

fn io(
    name: &str,
    t: IoType,
    offset: u64,
    blocks: u64,
    data: Option<Vec<u8>>,
) -> (IoStatus, Vec<u8>) {
    io_on(name, true, t, offset, blocks, data)
}

fn write(name: &str, offset: u64, data: &[u8]) -> IoStatus {
    io(
        name,
        IoType::Write,
        offset,
        data.len() as u64 / 512,
        Some(data.to_vec()),
    )
    .0
}

fn read(name: &str, offset: u64, blocks: u64) -> (IoStatus, Vec<u8>) {
    io(name, IoType::Read, offset, blocks, None)
}

/// Starts an I/O on the app thread without waiting; its outcome lands in the returned slot.
fn start(name: &str, t: IoType, offset: u64, blocks: u64) -> Arc<Mutex<Option<IoStatus>>> {
    let slot = Arc::new(Mutex::new(None));
    let s2 = slot.clone();
    let name = name.to_string();
    app(move || {
        let data = (t == IoType::Write).then(|| vec![0x5a; (blocks * 512) as usize]);
        submit(
            &chan(&name, true),
            t,
            offset,
            blocks,
            data,
            Box::new(move |(st, _)| *s2.lock().unwrap() = Some(st)),
        );
    });
    slot
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn malloc(name: &str) {
    let opts = MallocOpts {
        name: Some(name.into()),
        num_blocks: 2048,
        block_size: 512,
        ..Default::default()
    };
    app(move || malloc::create(opts).map(|_| ())).unwrap();
}

fn create_ee(base: &str) -> bdev::Bdev {
    let base = base.to_string();
    app(move || error::create(&base, None)).unwrap()
}

fn inject(name: &str, opts: InjectOpts) -> bdev::Result<()> {
    let name = name.to_string();
    app(move || error::inject_error(&name, opts))
}

fn inject_n(name: &str, io_type: &str, e: ErrorType, num: u32) {
    let mut o = InjectOpts::new(io_type, e);
    o.num = num;
    inject(name, o).unwrap();
}

fn delete_ee(name: &str) -> bdev::Result<()> {
    let name = name.to_string();
    on_app(move |reply| error::delete(&name, reply))
}

fn delete_malloc(name: &str) -> bdev::Result<()> {
    let name = name.to_string();
    on_app(move |reply| bdev::unregister_by_name(&name, malloc::MODULE, reply))
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

#[test]
fn passes_data_through_and_claims_the_base() {
    with_reactors("0x1", || {
        malloc("pt_base");
        let uuid = uuid::Uuid::new_v4();
        let ee = app(move || error::create("pt_base", Some(uuid))).unwrap();
        assert_eq!(ee.name(), "EE_pt_base");
        assert_eq!(ee.uuid(), uuid);
        assert_eq!(ee.module_name(), error::MODULE);
        assert_eq!(ee.block_size(), 512);
        assert_eq!(ee.num_blocks(), 2048);
        assert_eq!(ee.params().product_name, "Error Injection Disk");
        let base = bdev::get("pt_base").unwrap();
        assert_eq!(base.claimed_by().as_deref(), Some(error::MODULE));
        let info = ee.info_json();
        assert_eq!(
            info["driver_specific"]["error_disk"]["base_bdev"],
            "pt_base"
        );
        for t in [
            "read",
            "write",
            "unmap",
            "flush",
            "reset",
            "write_zeroes",
            "compare",
        ] {
            assert_eq!(
                info["supported_io_types"][t],
                base.info_json()["supported_io_types"][t],
                "{t}"
            );
        }
        let cfg = ee.write_config().unwrap();
        assert_eq!(cfg["method"], "bdev_error_create");
        assert_eq!(cfg["params"]["base_name"], "pt_base");
        assert_eq!(cfg["params"]["uuid"], uuid.to_string());

        let data = pattern(1, 8 * 512);
        assert_eq!(write("EE_pt_base", 100, &data), IoStatus::Success);
        assert_eq!(
            read("EE_pt_base", 100, 8),
            (IoStatus::Success, data.clone())
        );
        // What the base holds (read through a read-only descriptor, which the claim allows).
        assert_eq!(io_on("pt_base", false, IoType::Read, 100, 8, None).1, data);
        for t in [
            IoType::Flush,
            IoType::Unmap,
            IoType::WriteZeroes,
            IoType::Reset,
        ] {
            assert_eq!(
                io("EE_pt_base", t, 100, 4, None).0,
                IoStatus::Success,
                "{t:?}"
            );
        }
        assert_eq!(
            io(
                "EE_pt_base",
                IoType::Compare,
                104,
                4,
                Some(data[4 * 512..].to_vec())
            )
            .0,
            IoStatus::Success
        );
        assert_eq!(read("EE_pt_base", 100, 4).1, vec![0u8; 2048]);

        // Writers to the base are refused while the error bdev holds it.
        let claimed = app(|| {
            bdev::open("pt_base", true, None)
                .map(|_| ())
                .unwrap_err()
                .kind
        });
        assert_eq!(claimed, ErrorKind::Claimed);
        delete_ee("EE_pt_base").unwrap();
        assert!(bdev::get("EE_pt_base").is_none());
        assert_eq!(bdev::get("pt_base").unwrap().claimed_by(), None);
        delete_malloc("pt_base").unwrap();
    });
}

#[test]
fn failure_hits_exactly_num_ios_of_its_type() {
    with_reactors("0x1", || {
        malloc("fail_base");
        create_ee("fail_base");
        let ee = "EE_fail_base";
        inject_n(ee, "write", ErrorType::Failure, 2);
        let data = pattern(2, 512);
        // Reads are not affected by a write injection.
        assert_eq!(read(ee, 0, 1).0, IoStatus::Success);
        assert_eq!(write(ee, 0, &data), IoStatus::Failed(libc::EIO));
        assert_eq!(write(ee, 1, &data), IoStatus::Failed(libc::EIO));
        assert_eq!(write(ee, 2, &data), IoStatus::Success);
        assert_eq!(write(ee, 3, &data), IoStatus::Success);
        // The failed writes never reached the base.
        assert_eq!(read(ee, 0, 2).1, vec![0u8; 1024]);
        assert_eq!(read(ee, 2, 1).1, data);

        // "all" arms every type; "clear" disarms them.
        inject_n(ee, "all", ErrorType::Failure, 5);
        assert_eq!(read(ee, 0, 1).0, IoStatus::Failed(libc::EIO));
        assert_eq!(write(ee, 0, &data), IoStatus::Failed(libc::EIO));
        assert_eq!(
            io(ee, IoType::Flush, 0, 1, None).0,
            IoStatus::Failed(libc::EIO)
        );
        assert_eq!(
            io(ee, IoType::Unmap, 0, 1, None).0,
            IoStatus::Failed(libc::EIO)
        );
        // Types without injections are passed on.
        assert_eq!(io(ee, IoType::WriteZeroes, 0, 1, None).0, IoStatus::Success);
        inject_n(ee, "clear", ErrorType::Failure, 0);
        assert_eq!(read(ee, 0, 1).0, IoStatus::Success);
        assert_eq!(write(ee, 0, &data), IoStatus::Success);
        assert_eq!(io(ee, IoType::Flush, 0, 1, None).0, IoStatus::Success);
        assert_eq!(io(ee, IoType::Unmap, 0, 1, None).0, IoStatus::Success);

        // A new injection replaces the old one of its type.
        inject_n(ee, "read", ErrorType::Failure, 10);
        inject_n(ee, "read", ErrorType::Failure, 1);
        assert_eq!(read(ee, 0, 1).0, IoStatus::Failed(libc::EIO));
        assert_eq!(read(ee, 0, 1).0, IoStatus::Success);
        delete_ee(ee).unwrap();
        delete_malloc("fail_base").unwrap();
    });
}

#[test]
fn corrupt_data_flips_one_byte_of_reads_and_writes() {
    with_reactors("0x1", || {
        malloc("cor_base");
        create_ee("cor_base");
        let ee = "EE_cor_base";
        let data = pattern(3, 4 * 512);
        assert_eq!(write(ee, 8, &data), IoStatus::Success);

        let mut o = InjectOpts::new("read", ErrorType::CorruptData);
        o.corrupt_value = 0;
        assert_eq!(
            inject(ee, o.clone()).unwrap_err().kind,
            ErrorKind::Invalid,
            "corrupt_value 0"
        );
        o.corrupt_offset = 1000;
        o.corrupt_value = 0xff;
        inject(ee, o).unwrap();
        let (st, got) = read(ee, 8, 4);
        assert_eq!(st, IoStatus::Success);
        let mut want = data.clone();
        want[1000] ^= 0xff;
        assert_eq!(got, want, "byte 1000 of the read is flipped");
        assert_eq!(read(ee, 8, 4).1, data, "only one read is corrupted");
        // The base holds the original.
        assert_eq!(io_on("cor_base", false, IoType::Read, 8, 4, None).1, data);

        let mut o = InjectOpts::new("write", ErrorType::CorruptData);
        o.corrupt_offset = 3;
        o.corrupt_value = 0x21;
        inject(ee, o).unwrap();
        let data2 = pattern(4, 2 * 512);
        assert_eq!(write(ee, 20, &data2), IoStatus::Success);
        let mut want = data2.clone();
        want[3] ^= 0x21;
        assert_eq!(
            io_on("cor_base", false, IoType::Read, 20, 2, None).1,
            want,
            "the base got the flipped byte"
        );
        assert_eq!(write(ee, 20, &data2), IoStatus::Success);
        assert_eq!(read(ee, 20, 2).1, data2, "the next write is intact");
        delete_ee(ee).unwrap();
        delete_malloc("cor_base").unwrap();
    });
}

#[test]
fn nomem_is_retried_by_the_layer_and_queue_depth_gates_injection() {
    with_reactors("0x1", || {
        malloc("nm_base");
        create_ee("nm_base");
        let ee = "EE_nm_base";
        inject_n(ee, "write", ErrorType::Nomem, 3);
        let data = pattern(5, 512);
        assert_eq!(
            write(ee, 7, &data),
            IoStatus::Success,
            "NOMEM completions are retried"
        );
        assert_eq!(read(ee, 7, 1).1, data);

        // queue_depth 4: a lone I/O is spared; in a burst of 8, exactly one (num = 1) fails once 4 are in flight.
        let mut o = InjectOpts::new("read", ErrorType::Failure);
        o.queue_depth = 4;
        inject(ee, o).unwrap();
        assert_eq!(read(ee, 0, 1).0, IoStatus::Success);
        let statuses = on_app(|reply| {
            let ch = chan("EE_nm_base", true);
            let out = std::rc::Rc::new(RefCell::new((Vec::new(), Some(reply))));
            for i in 0..8 {
                let out = out.clone();
                submit(
                    &ch,
                    IoType::Read,
                    i,
                    1,
                    None,
                    Box::new(move |(st, _)| {
                        let mut o = out.borrow_mut();
                        o.0.push((i, st));
                        if o.0.len() == 8 {
                            let v = std::mem::take(&mut o.0);
                            (o.1.take().unwrap())(v);
                        }
                    }),
                );
            }
        });
        let failed: Vec<u64> = statuses
            .iter()
            .filter(|(_, s)| *s != IoStatus::Success)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(
            failed,
            vec![4],
            "the fifth read (4 in flight before it) fails: {statuses:?}"
        );
        delete_ee(ee).unwrap();
        delete_malloc("nm_base").unwrap();
    });
}

#[test]
fn pending_ios_are_held_until_reset_on_any_thread() {
    with_reactors("0x1", || {
        malloc("pend_base");
        create_ee("pend_base");
        let ee = "EE_pend_base";
        inject_n(ee, "read", ErrorType::Pending, 2);
        let a = start(ee, IoType::Read, 0, 1);
        // Another thread's channel holds the second one.
        let worker = app(|| reactor::spawn_thread("ee_worker", None).unwrap());
        let b = Arc::new(Mutex::new(None));
        let b2 = b.clone();
        let (tx, rx) = mpsc::channel();
        worker.send(move || {
            let desc = bdev::open("EE_pend_base", true, None).unwrap();
            let ch = desc.channel();
            let desc = RefCell::new(Some(desc));
            submit(
                &ch,
                IoType::Read,
                1,
                1,
                None,
                Box::new(move |(st, _)| {
                    *b2.lock().unwrap() = Some(st);
                    drop(desc.borrow_mut().take());
                }),
            );
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // Injection used up: the next read goes through while the two stay held.
        assert_eq!(read(ee, 2, 1).0, IoStatus::Success);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(*a.lock().unwrap(), None, "held on the app thread");
        assert_eq!(*b.lock().unwrap(), None, "held on the worker");

        assert_eq!(io(ee, IoType::Reset, 0, 0, None).0, IoStatus::Success);
        assert_eq!(
            *a.lock().unwrap(),
            Some(IoStatus::Failed(libc::EIO)),
            "failed by the reset"
        );
        wait_for("the worker's held read to fail", || {
            b.lock().unwrap().is_some()
        });
        assert_eq!(*b.lock().unwrap(), Some(IoStatus::Failed(libc::EIO)));
        worker.request_exit();

        // Held I/Os are also failed when the bdev is deleted.
        inject_n(ee, "write", ErrorType::Pending, 1);
        let w = start(ee, IoType::Write, 5, 1);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(*w.lock().unwrap(), None);
        delete_ee(ee).unwrap();
        wait_for("the held write to fail on delete", || {
            w.lock().unwrap().is_some()
        });
        assert_eq!(*w.lock().unwrap(), Some(IoStatus::Failed(libc::EIO)));
        delete_malloc("pend_base").unwrap();
    });
}

#[test]
fn removing_the_base_removes_the_error_bdev() {
    with_reactors("0x1", || {
        malloc("hr_base");
        create_ee("hr_base");
        // Keep a descriptor and channel open on the error bdev; it closes on the remove event.
        assert_eq!(write("EE_hr_base", 0, &pattern(6, 512)), IoStatus::Success);
        delete_malloc("hr_base").unwrap();
        assert!(
            bdev::get("EE_hr_base").is_none(),
            "error bdev gone with its base"
        );
        assert!(bdev::get("hr_base").is_none());
        assert_eq!(
            inject("EE_hr_base", InjectOpts::new("read", ErrorType::Failure))
                .unwrap_err()
                .kind,
            ErrorKind::NotFound
        );
        // The base name can be reused, and an error bdev made on it again.
        malloc("hr_base");
        create_ee("hr_base");
        assert_eq!(
            read("EE_hr_base", 0, 1),
            (IoStatus::Success, vec![0u8; 512])
        );
        delete_ee("EE_hr_base").unwrap();
        delete_malloc("hr_base").unwrap();
    });
}

#[test]
fn create_inject_and_delete_errors() {
    with_reactors("0x1", || {
        let kind = |r: bdev::Result<()>| r.unwrap_err().kind;
        assert_eq!(
            kind(inject(
                "EE_nothing",
                InjectOpts::new("read", ErrorType::Failure)
            )),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(app(|| error::create("nothing", None).map(|_| ()))),
            ErrorKind::NotFound
        );
        malloc("err_base");
        assert_eq!(
            kind(inject(
                "err_base",
                InjectOpts::new("read", ErrorType::Failure)
            )),
            ErrorKind::NotFound,
            "not an error bdev"
        );
        create_ee("err_base");
        assert_eq!(
            kind(app(|| error::create("err_base", None).map(|_| ()))),
            ErrorKind::Exists
        );
        assert_eq!(
            kind(inject(
                "EE_err_base",
                InjectOpts::new("compare", ErrorType::Failure)
            )),
            ErrorKind::Invalid
        );
        assert_eq!(
            kind(delete_ee("err_base")),
            ErrorKind::NotFound,
            "delete refuses a non-error bdev"
        );
        delete_ee("EE_err_base").unwrap();
        assert_eq!(kind(delete_ee("EE_err_base")), ErrorKind::NotFound);

        // A base claimed by another module cannot be taken.
        let claimed = app(|| {
            let mut d = bdev::open("err_base", false, None).unwrap();
            d.claim("other").unwrap();
            let r = error::create("err_base", None).map(|_| ());
            drop(d);
            r
        });
        assert_eq!(kind(claimed), ErrorKind::Claimed);
        assert!(bdev::get("EE_err_base").is_none());
        assert_eq!(bdev::get("err_base").unwrap().claimed_by(), None);
        delete_malloc("err_base").unwrap();
    });
}
