//! Reactor behaviour on real OS threads. Reactors are process-global, so tests take a lock.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reactor::{CpuMask, IoDevice, Options, Poller};

fn run(mask: &str, init: impl FnOnce() + Send + 'static) {
    reactor::testing::run(mask, Duration::from_secs(30), init);
}

#[test]
fn messages_run_in_order_on_target_thread() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    run("0x1", move || {
        let app = reactor::app_thread().unwrap();
        let worker = reactor::spawn_thread("worker", None).unwrap();
        for i in 0..1000 {
            let s = s.clone();
            let w = worker.clone();
            worker.send(move || {
                assert!(w.is_current());
                s.lock().unwrap().push(i);
            });
        }
        // Sent after the 1000 messages above, so it runs after them.
        worker.send(move || app.send(reactor::stop));
    });
    assert_eq!(*seen.lock().unwrap(), (0..1000).collect::<Vec<_>>());
}

#[test]
fn messages_cross_reactors_and_threads_land_on_their_cores() {
    if std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        < 2
    {
        return;
    }
    let cores = Arc::new(Mutex::new(Vec::new()));
    let c = cores.clone();
    run("0x3", move || {
        let t1 = reactor::spawn_thread("on1", Some(&CpuMask::single(1))).unwrap();
        assert_eq!(t1.core(), 1);
        let c = c.clone();
        t1.send(move || {
            c.lock().unwrap().push(reactor::current().unwrap().core());
            reactor::app_thread().unwrap().send(move || {
                c.lock().unwrap().push(reactor::current().unwrap().core());
                reactor::stop();
            });
        });
    });
    assert_eq!(*cores.lock().unwrap(), vec![1, 0]);
}

#[test]
fn pollers_run_pause_resume_and_unregister() {
    let counts = Arc::new(Mutex::new((0u64, 0u64)));
    let c = counts.clone();
    run("0x1", move || {
        let n = Rc::new(Cell::new(0u64));
        let n2 = n.clone();
        let p = Rc::new(RefCell::new(Some(Poller::register(
            "count",
            0,
            move || {
                n2.set(n2.get() + 1);
                true
            },
        ))));
        let p2 = p.clone();
        let n3 = n.clone();
        // Pause after 100 ms, check it stays put, resume, then unregister.
        reactor::timer(50_000, move || {
            p2.borrow().as_ref().unwrap().pause();
            let at_pause = n3.get();
            let p3 = p2.clone();
            let n4 = n3.clone();
            reactor::timer(50_000, move || {
                let after = n4.get();
                assert_eq!(after, at_pause, "paused poller ran");
                p3.borrow().as_ref().unwrap().resume();
                let p4 = p3.clone();
                let n5 = n4.clone();
                reactor::timer(20_000, move || {
                    let resumed = n5.get();
                    drop(p4.borrow_mut().take());
                    let n6 = n5.clone();
                    reactor::timer(20_000, move || {
                        *c.lock().unwrap() = (resumed - after, n6.get() - resumed);
                        reactor::stop();
                    })
                    .detach();
                })
                .detach();
            })
            .detach();
        })
        .detach();
    });
    let (while_resumed, after_unregister) = *counts.lock().unwrap();
    assert!(while_resumed > 0, "resumed poller ran");
    assert_eq!(after_unregister, 0, "unregistered poller ran");
}

#[test]
fn timed_pollers_and_timers_fire_on_time() {
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let fired = Arc::new(Mutex::new(None));
    let f = fired.clone();
    run("0x1", move || {
        let start = Instant::now();
        Poller::register("every10ms", 10_000, move || {
            r.fetch_add(1, Ordering::Relaxed);
            true
        })
        .detach();
        let cancelled = reactor::timer(10_000, || panic!("cancelled timer fired"));
        drop(cancelled);
        reactor::timer(200_000, move || {
            *f.lock().unwrap() = Some(start.elapsed());
            reactor::stop();
        })
        .detach();
    });
    let el = fired.lock().unwrap().unwrap();
    // The TSC rate is calibrated against the clock, so allow it a 1% error.
    assert!(el >= Duration::from_millis(198), "{el:?}");
    let n = runs.load(Ordering::Relaxed);
    // 200 ms at a 10 ms period: about 20 runs; allow a slow shared machine.
    assert!((5..=21).contains(&n), "timed poller ran {n} times");
}

#[test]
fn io_channels_are_per_thread_and_released_with_last_user() {
    let created = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    struct Ch(Arc<AtomicUsize>);
    impl Drop for Ch {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    thread_local! { static HOLD: RefCell<Vec<Rc<Ch>>> = const { RefCell::new(Vec::new()) }; }
    let (c, d) = (created.clone(), dropped.clone());
    let result = Arc::new(Mutex::new(vec![]));
    let res = result.clone();
    run("0x1", move || {
        let c2 = c.clone();
        let d2 = d.clone();
        let dev = Arc::new(IoDevice::new(move || {
            c2.fetch_add(1, Ordering::SeqCst);
            Ch(d2.clone())
        }));
        let a = dev.get_channel();
        let b = dev.get_channel();
        assert!(Rc::ptr_eq(&a, &b), "same thread shares one channel");
        HOLD.with(|h| h.borrow_mut().extend([a, b]));
        let other = reactor::spawn_thread("other", None).unwrap();
        let dev2 = dev.clone();
        let c3 = c.clone();
        let d3 = d.clone();
        other.send(move || {
            let x = dev2.get_channel();
            assert_eq!(c3.load(Ordering::SeqCst), 2, "second thread gets its own");
            drop(x);
            assert_eq!(d3.load(Ordering::SeqCst), 1, "released with its last user");
            let dev3 = dev2.clone();
            reactor::app_thread().unwrap().send(move || {
                dev3.for_each_channel(
                    |_ch| 1,
                    move |v| {
                        res.lock().unwrap().push(v.len());
                        HOLD.with(|h| h.borrow_mut().clear());
                        reactor::stop();
                    },
                );
            });
        });
    });
    assert_eq!(*result.lock().unwrap(), vec![1], "one live channel visited");
    assert_eq!(created.load(Ordering::SeqCst), 2);
    assert_eq!(dropped.load(Ordering::SeqCst), 2);
}

#[test]
fn thread_exit_and_stats() {
    let info = Arc::new(Mutex::new(None));
    let i2 = info.clone();
    run("0x1", move || {
        let t = reactor::spawn_thread("short", None).unwrap();
        let t2 = t.clone();
        t.send(move || {
            Poller::register("p", 0, || false).detach();
            t2.request_exit();
        });
        reactor::timer(50_000, move || {
            assert!(t.is_exited());
            let names: Vec<String> = reactor::all_threads()
                .iter()
                .map(|t| t.name().to_string())
                .collect();
            assert_eq!(names, vec!["app_thread".to_string()]);
            Poller::register("busy_one", 0, || true).detach();
            reactor::timer(20_000, move || {
                *i2.lock().unwrap() =
                    Some((reactor::current_info().unwrap(), reactor::reactors_info()));
                reactor::stop();
            })
            .detach();
        })
        .detach();
    });
    let (ti, ri) = info.lock().unwrap().take().unwrap();
    assert_eq!(ti.name, "app_thread");
    assert!(ti.busy > 0);
    assert!(ti
        .active_pollers
        .iter()
        .any(|p| p.name == "busy_one" && p.busy_count > 0));
    assert_eq!(ri.len(), 1);
    assert_eq!(ri[0].lcore, 0);
    assert!(ri[0].busy > 0);
}

#[test]
fn bad_masks_are_rejected() {
    let _g = reactor::testing::lock();
    let opts = Options {
        cpumask: CpuMask::parse("0x1").unwrap(),
        main_core: Some(3),
        ..Default::default()
    };
    assert!(matches!(
        reactor::run(opts, || {}),
        Err(reactor::Error::MainCoreNotInMask(3))
    ));
    let opts = Options {
        cpumask: CpuMask::parse("[1000]").unwrap(),
        ..Default::default()
    };
    assert!(matches!(
        reactor::run(opts, || {}),
        Err(reactor::Error::InvalidCore(1000, _))
    ));
}

/// A thread run by an OS thread of its own (a fio job thread, say): its pollers and messages run only when
/// that thread polls, channel walks reach it, and once dropped it is no longer walked.
#[test]
fn foreign_threads_are_polled_by_their_owner_and_walked() {
    run("0x1", || {
        let dev = Arc::new(IoDevice::new(|| Cell::new(0u32)));
        let d2 = dev.clone();
        let walked = Arc::new(AtomicUsize::new(0));
        let w2 = walked.clone();
        let owner = std::thread::spawn(move || {
            assert!(
                reactor::current().is_none(),
                "a plain OS thread has no thread"
            );
            let ft = reactor::ForeignThread::new("fio_job").unwrap();
            let ran = Rc::new(Cell::new(0u32));
            let r2 = ran.clone();
            // While it lives it is the OS thread's current thread: channels and pollers made now are its.
            assert!(ft.handle().is_current());
            assert!(
                reactor::ForeignThread::new("second").is_err(),
                "one lightweight thread per OS thread"
            );
            let _poller = Poller::register("count", 0, move || {
                r2.set(r2.get() + 1);
                true
            });
            let ch = d2.get_channel();
            ch.set(7);
            assert!(ft.poll());
            assert_eq!(ran.get(), 1, "pollers run only when the owner polls");
            // A walk over the device's channels waits for this thread's poll, then sees its channel.
            let (tx, rx) = std::sync::mpsc::channel();
            let w = w2.clone();
            d2.for_each_channel(
                move |c: &Cell<u32>| c.get(),
                move |v| {
                    w.store(v.len(), Ordering::SeqCst);
                    tx.send(v).unwrap();
                },
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            let seen = loop {
                ft.poll();
                if let Ok(v) = rx.try_recv() {
                    break v;
                }
                assert!(Instant::now() < deadline, "walk never finished");
            };
            assert_eq!(seen, vec![7]);
            assert!(reactor::all_threads()
                .iter()
                .any(|t| t.id() == ft.handle().id()));
            let id = ft.handle().id();
            drop(ch);
            drop(ft);
            assert!(!reactor::all_threads().iter().any(|t| t.id() == id));
            assert!(reactor::current().is_none(), "the OS thread is plain again");
        });
        std::thread::spawn(move || {
            owner.join().unwrap();
            assert_eq!(walked.load(Ordering::SeqCst), 1);
            // Walks after the foreign thread left do not wait for it.
            let (tx, rx) = std::sync::mpsc::channel();
            reactor::for_each_thread(|| (), move |v| tx.send(v.len()).unwrap());
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
            reactor::stop();
        });
    });
}
