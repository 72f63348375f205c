//! Harness for the runtime blobstore tests: real reactors, the test body on a plain OS thread that hands
//! work (async blocks included) to the app thread, and a RAM disk whose writes can be cut off after the Nth
//! (a power cut: every later write fails and reaches nothing).

#![allow(dead_code)]

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bdev::{
    Bdev, BdevEvent, BdevOps, BdevParams, Completion, Desc, IoChannel, IoHandle, IoStatus, IoType,
    ModuleChannel,
};
use blobstore::blob::BlobHandle;
use blobstore::runtime::Blobstore;
use reactor::dma::DmaBuf;

// Not every test binary that includes this module uses every item.
#[allow(unused_imports)]
pub use reactor::testing::{app, on_app, Reply};

thread_local! {
    /// Stores, open blobs and channels the test keeps on the app thread, by name.
    pub static STORES: RefCell<HashMap<String, Blobstore>> = RefCell::new(HashMap::new());
    pub static BLOBS: RefCell<HashMap<String, BlobHandle>> = RefCell::new(HashMap::new());
    static CHANNELS: RefCell<HashMap<String, (Desc, IoChannel)>> = RefCell::new(HashMap::new());
}

/// Starts reactors on `mask`, runs `body` on a helper OS thread, then stops.
pub fn with_reactors(mask: &str, body: impl FnOnce() + Send + 'static) {
    let failure: Arc<Mutex<Option<Box<dyn Any + Send>>>> = Arc::new(Mutex::new(None));
    let f2 = failure.clone();
    reactor::testing::run(mask, Duration::from_secs(600), move || {
        std::thread::spawn(move || {
            let res = std::panic::catch_unwind(AssertUnwindSafe(body));
            let (tx, rx) = mpsc::channel();
            reactor::app_thread().unwrap().send(move || {
                CHANNELS.with(|c| c.borrow_mut().clear());
                BLOBS.with(|c| c.borrow_mut().clear());
                STORES.with(|c| c.borrow_mut().clear());
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

/// Runs the future `f` builds on the app thread (where it is built) and waits for its output.
pub fn run<R, F>(f: impl FnOnce() -> F + Send + 'static) -> R
where
    R: Send + 'static,
    F: Future<Output = R> + 'static,
{
    on_app(move |reply| blobstore::exec::spawn_with(f(), reply))
}

/// The store the test keeps as `name` (app thread only).
pub fn store(name: &str) -> Blobstore {
    STORES.with(|s| s.borrow().get(name).cloned().expect("store kept"))
}

pub fn keep_store(name: &str, bs: Blobstore) {
    STORES.with(|s| s.borrow_mut().insert(name.to_string(), bs));
}

pub fn forget_store(name: &str) -> Option<Blobstore> {
    STORES.with(|s| s.borrow_mut().remove(name))
}

pub fn keep_blob(name: &str, b: BlobHandle) {
    BLOBS.with(|s| s.borrow_mut().insert(name.to_string(), b));
}

pub fn take_blob(name: &str) -> BlobHandle {
    BLOBS.with(|s| s.borrow_mut().remove(name).expect("blob kept"))
}

pub fn with_blob<R>(name: &str, f: impl FnOnce(&BlobHandle) -> R) -> R {
    BLOBS.with(|s| f(s.borrow().get(name).expect("blob kept")))
}

/// The app thread's channel on bdev `name` (opened on first use). App thread only.
pub fn chan(name: &str) -> IoChannel {
    if let Some(ch) = CHANNELS.with(|c| c.borrow().get(name).map(|e| e.1.clone())) {
        return ch;
    }
    let n2 = name.to_string();
    let on_event: bdev::EventCb = Arc::new(move |ev, _b| {
        if ev == BdevEvent::Remove {
            let n = n2.clone();
            CHANNELS.with(|c| c.borrow_mut().remove(&n));
        }
    });
    let desc =
        bdev::open(name, true, Some(on_event)).unwrap_or_else(|e| panic!("open {name}: {e}"));
    let ch = desc.channel();
    CHANNELS.with(|c| c.borrow_mut().insert(name.to_string(), (desc, ch.clone())));
    ch
}

/// Closes the app thread's channel on `name`.
pub fn close_chan(name: &str) {
    CHANNELS.with(|c| c.borrow_mut().remove(name));
}

/// Submits one read or write through `ch`; `done(status, data read)`.
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
            _ => ch.write(buf, offset, blocks, cb, 0),
        }
    } else {
        ch.submit_nodata(t, offset, blocks, cb, 0)
    };
    r.expect("submit");
}

/// One I/O on bdev `name` from the app thread, waited for.
pub fn io(
    name: &str,
    t: IoType,
    offset: u64,
    blocks: u64,
    data: Option<Vec<u8>>,
) -> (IoStatus, Vec<u8>) {
    let name = name.to_string();
    on_app(move |reply| {
        submit(
            &chan(&name),
            t,
            offset,
            blocks,
            data,
            reply as Box<dyn FnOnce(_)>,
        )
    })
}

pub fn write(name: &str, offset: u64, data: &[u8], bs: u64) -> IoStatus {
    io(
        name,
        IoType::Write,
        offset,
        data.len() as u64 / bs,
        Some(data.to_vec()),
    )
    .0
}

pub fn read(name: &str, offset: u64, blocks: u64) -> Vec<u8> {
    let (st, d) = io(name, IoType::Read, offset, blocks, None);
    assert_eq!(st, IoStatus::Success, "read {name} at {offset}");
    d
}

pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// A RAM disk with a power switch

/// The state of a RAM disk, shared with the test.
pub struct RamState {
    pub data: Mutex<Vec<u8>>,
    /// Writes (write, write zeroes, unmap) that reached the disk.
    pub writes: AtomicU64,
    /// Writes allowed before the cut (u64::MAX: no cut).
    pub cut_after: AtomicU64,
}

impl RamState {
    pub fn new(image: Vec<u8>) -> Arc<RamState> {
        Arc::new(RamState {
            data: Mutex::new(image),
            writes: AtomicU64::new(0),
            cut_after: AtomicU64::new(u64::MAX),
        })
    }

    /// Whether one more write may happen (counting it).
    fn allow_write(&self) -> bool {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        n < self.cut_after.load(Ordering::SeqCst)
    }

    pub fn image(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

struct Ram {
    st: Arc<RamState>,
    bs: u64,
}

impl BdevOps for Ram {
    fn module_name(&self) -> &'static str {
        "ramdisk"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(
            t,
            IoType::Read | IoType::Write | IoType::Unmap | IoType::WriteZeroes | IoType::Flush
        )
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(RamChannel {
            st: self.st.clone(),
            bs: self.bs,
        })
    }
}

struct RamChannel {
    st: Arc<RamState>,
    bs: u64,
}

impl ModuleChannel for RamChannel {
    fn submit(&mut self, mut io: IoHandle) {
        let off = (io.offset_blocks() * self.bs) as usize;
        let len = (io.num_blocks() * self.bs) as usize;
        let t = io.io_type();
        if t.is_write() && !self.st.allow_write() {
            return io.complete(IoStatus::Failed(libc::EIO));
        }
        let mut d = self.st.data.lock().unwrap();
        match t {
            IoType::Read => io.copy_in(&d[off..off + len]),
            IoType::Write => io.copy_out(&mut d[off..off + len]),
            IoType::Unmap | IoType::WriteZeroes => d[off..off + len].fill(0),
            _ => {}
        }
        drop(d);
        io.complete(IoStatus::Success);
    }
}

/// Registers RAM disk `name` over `st`'s bytes, blocks of `bs`. App thread.
pub fn ram_disk(name: &str, st: Arc<RamState>, bs: u64) -> Bdev {
    let blocks = st.data.lock().unwrap().len() as u64 / bs;
    bdev::register(
        BdevParams::new(name, bs as u32, blocks),
        Box::new(Ram { st, bs }),
    )
    .unwrap()
}

/// Opens `name` and claims it for the blobstore (app thread).
pub fn claimed(name: &str) -> Desc {
    let mut d = bdev::open(name, true, None).unwrap();
    d.claim("blobstore").unwrap();
    d
}

/// Unregisters bdev `name` and waits (from the test thread).
pub fn unregister(name: &str) {
    let name = name.to_string();
    let r: bdev::Result<()> = on_app(move |reply| match bdev::get(&name) {
        Some(b) => b.unregister(reply),
        None => reply(Ok(())),
    });
    r.unwrap();
}

/// `len` bytes at byte `off` of blob `id` in `image`, as the blob reads them: its own clusters, else its
/// nearest ancestor's, else zeroes (`cluster`: the store's cluster size).
pub fn chain_bytes(
    store: &blobstore::Store,
    image: &[u8],
    id: blobstore::BlobId,
    off: u64,
    len: u64,
    cluster: u64,
) -> Vec<u8> {
    assert!(store.blob(id).is_some(), "blob {id} in the image");
    let mut out = vec![0u8; len as usize];
    let mut at = 0;
    while at < len {
        let pos = off + at;
        let n = (cluster - pos % cluster).min(len - at);
        let mut b = store.blob(id);
        while let Some(blob) = b {
            if let Some(d) = blob.cluster(pos / cluster) {
                let src = (d as u64 * cluster + pos % cluster) as usize;
                out[at as usize..(at + n) as usize].copy_from_slice(&image[src..src + n as usize]);
                break;
            }
            b = blob.parent_snapshot().and_then(|p| store.blob(p));
        }
        at += n;
    }
    out
}

/// Opens blob `id` of the kept store `bs`, keeps the handle as `name` and registers bdev `name` over it.
pub fn open_bdev(bs: &str, id: blobstore::BlobId, name: &str) {
    let (bs, name) = (bs.to_string(), name.to_string());
    run(move || async move {
        let h = store(&bs).open_blob(id).await.unwrap();
        blobstore::blob_bdev::register(&h, &name, Default::default()).unwrap();
        keep_blob(&name, h);
    })
}

/// Unregisters bdev `name` (its channel first) and closes its blob.
pub fn close_bdev(name: &str) {
    app({
        let n = name.to_string();
        move || close_chan(&n)
    });
    unregister(name);
    let name = name.to_string();
    run(move || async move { take_blob(&name).close().await.unwrap() })
}
