//! LBA range locks and compare-and-write: a locked range holds back overlapping writes (not reads, not other
//! ranges) until unlocked; taking a lock waits for the I/O already in flight; compare-and-write writes only
//! when the compare matched, and no other write gets between them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::modules::malloc;
use bdev::{
    Bdev, BdevOps, BdevParams, Completion, IoHandle, IoStatus, IoType, IoVec, ModuleChannel,
};
use reactor::dma::DmaBuf;

type Log = Arc<Mutex<Vec<(&'static str, IoStatus)>>>;

fn rec(tag: &'static str, o: &Log) -> Completion {
    let o = o.clone();
    Completion::Closure(Box::new(move |io: IoHandle| {
        o.lock().unwrap().push((tag, io.status()))
    }))
}

fn run(init: impl FnOnce() + Send + 'static) {
    reactor::testing::run("0x1", Duration::from_secs(60), init);
}

fn filled(len: usize, byte: u8) -> DmaBuf {
    let mut b = DmaBuf::alloc(len).unwrap();
    b.as_mut_slice().fill(byte);
    b
}

fn iov(b: &DmaBuf) -> [IoVec; 1] {
    [IoVec {
        base: b.as_ptr(),
        len: b.len(),
    }]
}

#[test]
fn compare_and_write_writes_only_on_a_match() {
    let out: Arc<Mutex<Vec<(IoStatus, u8)>>> = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    run(move || {
        let b = malloc::create(malloc::MallocOpts {
            name: Some("M_caw".into()),
            num_blocks: 64,
            block_size: 512,
            ..Default::default()
        })
        .unwrap();
        let desc = Rc::new(b.open(true, None).unwrap());
        let ch = desc.channel();
        let (a, x, c) = (filled(4096, 0xaa), filled(4096, 0x55), filled(4096, 0xcc));
        let keep = Rc::new(RefCell::new(Some((a, x, c, desc, b))));
        let ch2 = ch.clone();
        let k2 = keep.clone();
        let o2 = o.clone();
        // Blocks 0..8 hold 0xaa. A compare against 0x55 fails and writes nothing; one against 0xaa writes 0xcc.
        let after_write = Completion::Closure(Box::new(move |_io: IoHandle| {
            let k = k2.borrow();
            let (a, x, c, _, _) = k.as_ref().unwrap();
            let (ch3, k3, o3) = (ch2.clone(), k2.clone(), o2.clone());
            let miss = Completion::Closure(Box::new(move |io: IoHandle| {
                let st = io.status();
                let (ch4, k4, o4) = (ch3.clone(), k3.clone(), o3.clone());
                let read_back = Completion::Closure(Box::new(move |mut io: IoHandle| {
                    let buf = io.take_buf().unwrap();
                    o4.lock().unwrap().push((st, buf.as_slice()[0]));
                    let k = k4.borrow();
                    let (a, _, c, _, _) = k.as_ref().unwrap();
                    let (k5, o5, ch5) = (k4.clone(), o4.clone(), ch4.clone());
                    let hit = Completion::Closure(Box::new(move |io: IoHandle| {
                        let st = io.status();
                        let (k6, o6) = (k5.clone(), o5.clone());
                        let last = Completion::Closure(Box::new(move |mut io: IoHandle| {
                            let buf = io.take_buf().unwrap();
                            o6.lock().unwrap().push((st, buf.as_slice()[4095]));
                            if let Some((_, _, _, desc, b)) = k6.borrow_mut().take() {
                                drop(desc);
                                b.unregister(|_| reactor::stop());
                            }
                        }));
                        ch5.read(DmaBuf::alloc(4096).unwrap(), 0, 8, last, 0)
                            .unwrap();
                    }));
                    // SAFETY: the buffers live in `keep` until the end of the test.
                    unsafe { ch4.compare_and_writev(&iov(a), &iov(c), 0, 8, hit, 0) }.unwrap();
                }));
                ch3.read(DmaBuf::alloc(4096).unwrap(), 0, 8, read_back, 0)
                    .unwrap();
            }));
            // SAFETY: the buffers live in `keep` until the end of the test.
            unsafe { ch2.compare_and_writev(&iov(x), &iov(c), 0, 8, miss, 0) }.unwrap();
            let _ = a;
        }));
        let k = keep.borrow();
        // SAFETY: the buffer lives in `keep` until the end of the test.
        unsafe { ch.writev(&iov(&k.as_ref().unwrap().0), 0, 8, after_write, 0) }.unwrap();
    });
    assert_eq!(
        *out.lock().unwrap(),
        vec![(IoStatus::Miscompare, 0xaa), (IoStatus::Success, 0xcc)]
    );
}

#[test]
fn a_locked_range_holds_overlapping_writes_only() {
    let out: Log = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    run(move || {
        let b = malloc::create(malloc::MallocOpts {
            name: Some("M_lock".into()),
            num_blocks: 256,
            block_size: 512,
            ..Default::default()
        })
        .unwrap();
        let desc = b.open(true, None).unwrap();
        let ch = desc.channel();
        let keep = Arc::new(Mutex::new(Some((desc, b.clone()))));
        let step = reactor::OnThread::new(move |id: u64| {
            let buf = || DmaBuf::alloc(512).unwrap();
            o.lock().unwrap().push(("locked", IoStatus::Success));
            ch.write(buf(), 10, 1, rec("write in range", &o), 0)
                .unwrap();
            ch.write(buf(), 100, 1, rec("write elsewhere", &o), 0)
                .unwrap();
            ch.read(buf(), 10, 1, rec("read in range", &o), 0).unwrap();
            let (b2, o2, k2) = (b.clone(), o.clone(), keep.clone());
            // Give the held write every chance to slip through before the unlock.
            reactor::timer(2000, move || {
                o2.lock().unwrap().push(("unlock", IoStatus::Success));
                b2.unlock_lba_range(id, move || {
                    let k = k2.clone();
                    reactor::timer(1000, move || {
                        if let Some((desc, b)) = k.lock().unwrap().take() {
                            drop(desc);
                            b.unregister(|_| reactor::stop());
                        }
                    })
                    .detach();
                });
            })
            .detach();
        });
        let bd = bdev::get("M_lock").unwrap();
        bd.lock_lba_range(8, 8, move |id| step.with(move |f| f(id)));
    });
    let got = out.lock().unwrap().clone();
    let ok = IoStatus::Success;
    assert_eq!(
        got,
        vec![
            ("locked", ok),
            ("write elsewhere", ok),
            ("read in range", ok),
            ("unlock", ok),
            ("write in range", ok),
        ]
    );
}

/// A module that holds every I/O until the test releases them.
struct Hold;

thread_local! {
    static HELD: RefCell<VecDeque<IoHandle>> = const { RefCell::new(VecDeque::new()) };
}

impl BdevOps for Hold {
    fn module_name(&self) -> &'static str {
        "hold"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::Write)
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(HoldCh)
    }
}

struct HoldCh;

impl ModuleChannel for HoldCh {
    fn submit(&mut self, io: IoHandle) {
        HELD.with(|h| h.borrow_mut().push_back(io));
    }
}

#[test]
fn taking_a_lock_waits_for_io_in_flight_on_its_range_only() {
    let out: Log = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    run(move || {
        let b = bdev::register(BdevParams::new("H_lock", 512, 64), Box::new(Hold)).unwrap();
        let desc = b.open(true, None).unwrap();
        let ch = desc.channel();
        let buf = || DmaBuf::alloc(512).unwrap();
        // In flight before the lock: one write on another range, one on the range. Only the second holds the
        // lock up, as in SPDK.
        ch.write(buf(), 40, 1, rec("outside", &o), 0).unwrap();
        ch.write(buf(), 4, 1, rec("inside", &o), 0).unwrap();
        let o2 = o.clone();
        let keep = Arc::new(Mutex::new(Some((desc, b.clone()))));
        let step = reactor::OnThread::new(move |id: u64| {
            o2.lock().unwrap().push(("locked", IoStatus::Success));
            let keep = keep.clone();
            b.unlock_lba_range(id, move || {
                if let Some((desc, b)) = keep.lock().unwrap().take() {
                    drop(desc);
                    b.unregister(|_| reactor::stop());
                }
            });
        });
        let bd = bdev::get("H_lock").unwrap();
        bd.lock_lba_range(0, 8, move |id| step.with(move |f| f(id)));
        // While the lock is being taken, I/O elsewhere reaches the module at once.
        let o3 = o.clone();
        reactor::timer(500, move || {
            ch.read(buf(), 50, 1, rec("read elsewhere", &o3), 0)
                .unwrap();
        })
        .detach();
        // Release what the module holds outside the range first, then the write on the range.
        fn release(outside: bool) {
            let held: Vec<IoHandle> = HELD.with(|h| h.borrow_mut().drain(..).collect());
            for io in held {
                if (io.offset_blocks() >= 8) == outside {
                    io.complete(IoStatus::Success);
                } else {
                    HELD.with(|h| h.borrow_mut().push_back(io));
                }
            }
        }
        reactor::timer(3000, || {
            release(true);
            reactor::timer(3000, || release(false)).detach();
        })
        .detach();
    });
    let got = out.lock().unwrap().clone();
    let ok = IoStatus::Success;
    assert_eq!(
        got,
        vec![
            ("outside", ok),
            ("read elsewhere", ok),
            ("inside", ok),
            ("locked", ok)
        ]
    );
}

/// A channel made while a range is locked (on another thread) starts with the lock: its overlapping write waits
/// for the unlock.
#[test]
fn a_channel_made_while_locked_respects_the_lock() {
    let out: Log = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    run(move || {
        let b = malloc::create(malloc::MallocOpts {
            name: Some("M_lock_new".into()),
            num_blocks: 64,
            block_size: 512,
            ..Default::default()
        })
        .unwrap();
        let desc = Arc::new(b.open(true, None).unwrap());
        let keep = Arc::new(Mutex::new(Some(b.clone())));
        let step = reactor::OnThread::new(move |id: u64| {
            let other = reactor::spawn_thread("lock_other", None).unwrap();
            let (d2, o2, b2, k2) = (desc.clone(), o.clone(), b.clone(), keep.clone());
            other.send(move || {
                // A channel of this thread, made now.
                let ch = d2.channel();
                let done = Completion::Closure(Box::new(move |io: IoHandle| {
                    o2.lock().unwrap().push(("write", io.status()));
                    drop(d2);
                    if let Some(b) = k2.lock().unwrap().take() {
                        b.unregister(|_| reactor::stop());
                    }
                }));
                ch.write(DmaBuf::alloc(512).unwrap(), 3, 1, done, 0)
                    .unwrap();
            });
            let o3 = o.clone();
            reactor::timer(3000, move || {
                o3.lock().unwrap().push(("unlock", IoStatus::Success));
                b2.unlock_lba_range(id, || {});
            })
            .detach();
        });
        bdev::get("M_lock_new")
            .unwrap()
            .lock_lba_range(0, 8, move |id| step.with(move |f| f(id)));
    });
    let ok = IoStatus::Success;
    assert_eq!(*out.lock().unwrap(), vec![("unlock", ok), ("write", ok)]);
}
