//! Shared harness for the bdev module tests: real reactors, with the test body on a plain OS thread that makes
//! blocking calls into the app thread.

#![allow(dead_code)]

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bdev::{BdevEvent, Completion, Desc, IoChannel, IoHandle, IoStatus, IoType};
use reactor::dma::DmaBuf;

// Not every test binary that includes this module uses every item.
#[allow(unused_imports)]
pub use reactor::testing::{app, on_app, Reply};
pub type EventCb = Arc<dyn Fn(BdevEvent, &bdev::Bdev) + Send + Sync>;

thread_local! {
    /// Descriptors and channels opened by the tests on the app thread, by (bdev, writable).
    static CHANNELS: RefCell<HashMap<(String, bool), (Desc, IoChannel)>> = RefCell::new(HashMap::new());
}

/// Starts reactors on `mask`, runs `body` on a helper OS thread, then closes the test's channels and stops.
pub fn with_reactors(mask: &str, body: impl FnOnce() + Send + 'static) {
    let failure: Arc<Mutex<Option<Box<dyn Any + Send>>>> = Arc::new(Mutex::new(None));
    let f2 = failure.clone();
    reactor::testing::run(mask, Duration::from_secs(120), move || {
        std::thread::spawn(move || {
            let res = std::panic::catch_unwind(AssertUnwindSafe(body));
            let (tx, rx) = mpsc::channel();
            reactor::app_thread().unwrap().send(move || {
                CHANNELS.with(|c| c.borrow_mut().clear());
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(Duration::from_secs(10));
            if let Err(p) = res {
                *f2.lock().unwrap() = Some(p);
            }
            reactor::stop();
        });
    });
    let failed = failure.lock().unwrap().take();
    if let Some(p) = failed {
        std::panic::resume_unwind(p);
    }
}

/// The app thread's channel on `name` (opened on first use, closed when the bdev goes away). App thread only.
pub fn chan(name: &str, write: bool) -> IoChannel {
    let key = (name.to_string(), write);
    if let Some(ch) = CHANNELS.with(|c| c.borrow().get(&key).map(|e| e.1.clone())) {
        return ch;
    }
    let k2 = key.clone();
    let on_event: EventCb = Arc::new(move |ev, _b| {
        if ev == BdevEvent::Remove {
            let k = k2.clone();
            CHANNELS.with(|c| c.borrow_mut().remove(&k));
        }
    });
    let desc =
        bdev::open(name, write, Some(on_event)).unwrap_or_else(|e| panic!("open {name}: {e}"));
    let ch = desc.channel();
    CHANNELS.with(|c| c.borrow_mut().insert(key, (desc, ch.clone())));
    ch
}

pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

/// Submits one I/O through `ch` with a callback that calls `done(status, data read)`.
pub fn submit(
    ch: &IoChannel,
    t: IoType,
    offset: u64,
    blocks: u64,
    data: Option<Vec<u8>>,
    done: Box<dyn FnOnce((IoStatus, Vec<u8>))>,
) {
    let bs = ch.bdev().block_size() as u64;
    let cb = Completion::Closure(Box::new(move |mut io: IoHandle| {
        let st = io.status();
        let d = io
            .take_buf()
            .map(|b| b.as_slice().to_vec())
            .unwrap_or_default();
        done((st, d));
    }));
    let r = if t.has_data() {
        let mut buf = DmaBuf::alloc((blocks * bs) as usize).unwrap();
        if let Some(d) = data {
            buf.as_mut_slice()[..d.len()].copy_from_slice(&d);
        }
        match t {
            IoType::Read => ch.read(buf, offset, blocks, cb, 0),
            IoType::Write => ch.write(buf, offset, blocks, cb, 0),
            _ => ch.compare(buf, offset, blocks, cb, 0),
        }
    } else {
        ch.submit_nodata(t, offset, blocks, cb, 0)
    };
    r.expect("submit");
}

/// Creates malloc bdev `name` (512-byte blocks) from the test thread.
pub fn create_malloc(name: &str, blocks: u64) {
    let name = name.to_string();
    app(move || {
        bdev::modules::malloc::create(bdev::modules::malloc::MallocOpts {
            name: Some(name),
            num_blocks: blocks,
            block_size: 512,
            ..Default::default()
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    })
    .expect("malloc");
}
