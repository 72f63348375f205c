//! The runtime blobstore: a store on a claimed bdev, its allocation masks in memory, and every blob's
//! metadata, changed by `async` operations on the metadata thread (the thread that initialised or loaded the
//! store) and read by the I/O path of every thread through each blob's [`BlobShared`].
//!
//! Crash ordering, as SPDK's (`blobstore.c`), and stricter where SPDK has a window:
//! - **init**: zero the metadata area and clear the data area, then write the super block (not clean);
//! - **load**: a store not unloaded cleanly gets its masks rebuilt from the metadata (the loader);
//! - **first metadata change after a load** ([`StoreInner::mark_dirty`]): the super block is rewritten with
//!   `clean = 0` before anything else is written, so a crash from then on makes the next load rebuild;
//! - **a blob's metadata** ([`crate::blob`]): new extent pages, then the chain's other pages (fresh pages),
//!   then its first page (in place: the commit point), then the old pages zeroed and released;
//! - **unload**: the three masks, then the super block with `clean = 1`, last.
//!
//! Allocation is lowest-first from the in-memory masks, as SPDK's bit pools hand out bits.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use bdev::Desc;
use reactor::dma::DmaBuf;
use reactor::ThreadHandle;

use crate::base::Base;
use crate::blob::BlobState;
use crate::device::ReadAt;
use crate::error::{Error, ErrorKind, Result};
use crate::exec::{join_all, AsyncMutex};
use crate::format::{BlobId, Mask, MaskType, MdPage, SuperBlock, BSTYPE_LEN, PAGE_SIZE};
use crate::layout::{self, InitClear, InitOptions};
use crate::store::{LoadOptions, MaskState, Masks, Store};

/// Metadata pages read per device read while loading.
const LOAD_CHUNK_PAGES: u64 = 256;
/// Reads in flight while loading.
const LOAD_READS_IN_FLIGHT: usize = 8;

thread_local! {
    /// The stores whose metadata thread this is, by id: allocation requests from other threads find their
    /// store here.
    static STORES: RefCell<HashMap<u64, Weak<StoreInner>>> = RefCell::new(HashMap::new());
}

static NEXT_STORE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The store with id `id`, if this thread is its metadata thread and it is loaded.
pub(crate) fn lookup_store(id: u64) -> Option<Rc<StoreInner>> {
    STORES
        .try_with(|s| s.borrow().get(&id).and_then(Weak::upgrade))
        .ok()
        .flatten()
}

/// A loaded store. Cheap to clone; lives on (and is used from) its metadata thread.
#[derive(Clone)]
pub struct Blobstore(pub(crate) Rc<StoreInner>);

/// The store's state; metadata thread only.
pub(crate) struct StoreInner {
    pub(crate) id: u64,
    /// The claimed base, shared with the blobs' I/O channels; dropped at unload.
    pub(crate) desc: RefCell<Option<Arc<Desc>>>,
    pub(crate) base: Base,
    /// The super block as on disk (the `clean` flag included).
    pub(crate) sb: RefCell<SuperBlock>,
    /// Serializes writes of the super block (mark dirty, set super blob, unload).
    pub(crate) super_lock: AsyncMutex,
    pub(crate) masks: RefCell<Masks>,
    pub(crate) blobs: RefCell<BTreeMap<BlobId, Rc<BlobState>>>,
    /// Blobs whose metadata did not load: listed, never opened.
    pub(crate) broken: RefCell<Vec<(BlobId, String)>>,
    pub(crate) md_thread: ThreadHandle,
    /// Clusters on the device (grows with [`Blobstore::grow`]).
    pub(crate) total_clusters: Cell<u64>,
    pub(crate) md_clusters: u64,
    pub(crate) cluster_size: u64,
    pub(crate) block_size: u64,
    pub(crate) unloaded: Cell<bool>,
    /// The external snapshots of esnap clones (created or loaded), for their devices to be attached.
    pub(crate) externals: RefCell<Vec<Arc<crate::map::External>>>,
    /// Background tasks running (cluster releases), and who waits for none to be left (unload).
    background: Cell<usize>,
    background_idle: RefCell<Vec<crate::exec::Sender<()>>>,
}

impl std::fmt::Debug for Blobstore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blobstore({} blobs)", self.0.blobs.borrow().len())
    }
}

/// A store read into memory by pages: the super block, the masks, and the metadata pages that are not all
/// zeroes (unused pages are zeroed, so a store costs memory in proportion to what it uses).
struct Image {
    size: u64,
    pages: HashMap<u64, Box<[u8]>>,
}

impl ReadAt for Image {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let ps = PAGE_SIZE as u64;
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            let (page, inpage) = (pos / ps, (pos % ps) as usize);
            let n = (PAGE_SIZE - inpage).min(buf.len() - at);
            match self.pages.get(&page) {
                Some(p) => buf[at..at + n].copy_from_slice(&p[inpage..inpage + n]),
                None => buf[at..at + n].fill(0),
            }
            at += n;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}

impl Blobstore {
    /// Creates a new store on `desc` (writable, normally claimed) as `spdk_bs_init` does, on the current
    /// thread, which becomes the store's metadata thread.
    pub async fn init(desc: Desc, opts: &InitOptions) -> Result<Blobstore> {
        let desc = Arc::new(desc);
        let base = Base::new(desc.channel());
        let blocks = desc.bdev().num_blocks();
        let bs = base.block_size();
        let l = layout::compute(blocks, bs as u32, opts)?;
        let md_bytes = l.md_region_pages * PAGE_SIZE as u64;
        let dev_bytes = blocks * bs;
        // Zero the metadata (old super block first of all) and clear the data, together; then the super block.
        let clear_data = async {
            let len = dev_bytes.saturating_sub(md_bytes);
            match opts.clear {
                InitClear::Unmap if len > 0 => base.unmap(md_bytes, len).await,
                InitClear::WriteZeroes if len > 0 => base.write_zeroes(md_bytes, len).await,
                _ => Ok(()),
            }
        };
        let (z, c) = futures_join(base.write_zeroes(0, md_bytes), clear_data).await;
        z.map_err(|e| e.context("zeroing the metadata area"))?;
        c.map_err(|e| e.context("clearing the data area"))?;
        let sb = l.super_block.clone();
        write_super(&base, &sb).await?;
        let md_len = sb.md.len as u64;
        let mut masks = Masks {
            used_pages: crate::Bitmap::new(md_len),
            used_clusters: crate::Bitmap::new(l.total_clusters),
            used_blobids: crate::Bitmap::new(md_len),
        };
        for c in 0..l.md_clusters {
            masks.used_clusters.set(c);
        }
        Ok(Self::assemble(desc, base, sb, masks, &l, Vec::new()))
    }

    /// Creates an lvstore (`spdk_lvs_init`): a store of type "LVOLSTORE" with `ratio` metadata pages per 100
    /// clusters, whose super blob carries the lvstore's `uuid` and `name` xattrs (strings with their NUL).
    pub async fn init_lvstore(
        desc: Desc,
        name: &str,
        uuid: uuid::Uuid,
        cluster_size: u32,
        md_pages_ratio: u32,
        clear: InitClear,
    ) -> Result<Blobstore> {
        if name.is_empty() || name.len() >= crate::lvol::LVS_NAME_MAX {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "lvstore name must be 1 to {} bytes",
                    crate::lvol::LVS_NAME_MAX - 1
                ),
            ));
        }
        let b = desc.bdev();
        let opts = InitOptions::lvstore(
            b.num_blocks(),
            b.block_size(),
            cluster_size,
            md_pages_ratio,
            clear,
        )?;
        let bs = Blobstore::init(desc, &opts).await?;
        let id = bs
            .create_blob(crate::blob::CreateOptions {
                xattrs: crate::lvol::lvs_xattrs(name, &uuid),
                ..Default::default()
            })
            .await?;
        bs.set_super_blob(id).await?;
        Ok(bs)
    }

    /// Loads the store on `desc` (`spdk_bs_load`) on the current thread, which becomes its metadata thread:
    /// the whole metadata is read (in 1 MiB reads), the loader builds the model, and a store that was not
    /// unloaded cleanly gets its masks rebuilt from it, as SPDK's recovery does.
    pub async fn load(desc: Desc, opts: &LoadOptions) -> Result<Blobstore> {
        let desc = Arc::new(desc);
        let base = Base::new(desc.channel());
        let size = base.size();
        let page0 = base.read(0, PAGE_SIZE).await?;
        let sb = SuperBlock::decode(page0.as_slice())?;
        sb.check_geometry(size)?;
        if opts.bstype != [0; BSTYPE_LEN] && opts.bstype != sb.bstype {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "store type is \"{}\", not the one asked for",
                    sb.bstype_str()
                ),
            ));
        }
        let mut img = Image {
            size,
            pages: HashMap::new(),
        };
        img.pages.insert(0, page0.as_slice().into());
        let mut regions = vec![sb.used_page_mask, sb.used_cluster_mask, sb.md];
        if sb.has_blobid_mask() {
            regions.push(sb.used_blobid_mask);
        }
        let mut chunks = Vec::new();
        for r in regions {
            let mut p = r.start as u64;
            while p < r.end() {
                let n = LOAD_CHUNK_PAGES.min(r.end() - p);
                chunks.push((p, n));
                p += n;
            }
        }
        // A few reads in flight at once: a large store loads at the device's sequential speed.
        for window in chunks.chunks(LOAD_READS_IN_FLIGHT) {
            let reads: Vec<_> = window
                .iter()
                .map(|&(p, n)| base.read(p * PAGE_SIZE as u64, (n * PAGE_SIZE as u64) as usize))
                .collect();
            for (&(p, _), buf) in window.iter().zip(join_all(reads).await) {
                for (i, chunk) in buf?.as_slice().chunks_exact(PAGE_SIZE).enumerate() {
                    if chunk.iter().any(|&b| b != 0) {
                        img.pages.insert(p + i as u64, chunk.into());
                    }
                }
            }
        }
        let mut store = Store::load_with(&img, opts)?;
        if store.mask_state != MaskState::Clean {
            store.rebuild_masks();
        }
        let l = layout::Layout {
            total_clusters: store.total_clusters(),
            md_clusters: store.md_clusters(),
            md_region_pages: sb.md.end(),
            super_block: sb,
        };
        let broken = store
            .broken
            .iter()
            .map(|b| (b.id, b.error.to_string()))
            .collect();
        let s = Self::assemble(
            desc,
            base,
            store.super_block.clone(),
            store.masks.clone(),
            &l,
            broken,
        );
        crate::blob::attach_loaded(&s, &store)?;
        // As SPDK at load: snapshot operations a crash interrupted are finished or undone. A failure here
        // leaves the marked blob as it is for the next load; the store serves the rest.
        if let Err(e) = crate::snapshot::repair_interrupted(&s).await {
            log::error!("blobstore: repairing an interrupted snapshot operation: {e}");
        }
        Ok(s)
    }

    fn assemble(
        desc: Arc<Desc>,
        base: Base,
        sb: SuperBlock,
        masks: Masks,
        l: &layout::Layout,
        broken: Vec<(BlobId, String)>,
    ) -> Blobstore {
        let md_thread = reactor::current().expect("a blobstore runs on a reactor thread");
        let inner = Rc::new(StoreInner {
            id: NEXT_STORE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            desc: RefCell::new(Some(desc)),
            block_size: base.block_size(),
            base,
            cluster_size: sb.cluster_size as u64,
            sb: RefCell::new(sb),
            super_lock: AsyncMutex::default(),
            masks: RefCell::new(masks),
            blobs: RefCell::new(BTreeMap::new()),
            broken: RefCell::new(broken),
            md_thread,
            total_clusters: Cell::new(l.total_clusters),
            md_clusters: l.md_clusters,
            unloaded: Cell::new(false),
            externals: RefCell::new(Vec::new()),
            background: Cell::new(0),
            background_idle: RefCell::new(Vec::new()),
        });
        STORES.with(|s| {
            s.borrow_mut().insert(inner.id, Rc::downgrade(&inner));
        });
        Blobstore(inner)
    }

    /// Unloads the store (`spdk_bs_unload`): refused (Busy) while a blob is open; writes the used-pages,
    /// used-blobids and used-clusters masks, then the super block marked clean, and releases the base.
    pub async fn unload(&self) -> Result<()> {
        let s = &self.0;
        s.settled_and_closed().await?;
        let _g = s.super_lock.lock().await;
        let sb = s.sb.borrow().clone();
        let (pages, blobids, clusters) = {
            let m = s.masks.borrow();
            (
                Mask {
                    kind: MaskType::UsedPages,
                    bits: m.used_pages.clone(),
                }
                .encode(sb.used_page_mask.len)?,
                Mask {
                    kind: MaskType::UsedBlobIds,
                    bits: m.used_blobids.clone(),
                }
                .encode(sb.used_blobid_mask.len)
                .ok(),
                Mask {
                    kind: MaskType::UsedClusters,
                    bits: m.used_clusters.clone(),
                }
                .encode(sb.used_cluster_mask.len)?,
            )
        };
        s.write_bytes(sb.used_page_mask.byte_offset(), &pages)
            .await?;
        if sb.has_blobid_mask() {
            if let Some(b) = blobids {
                s.write_bytes(sb.used_blobid_mask.byte_offset(), &b).await?;
            }
        }
        s.write_bytes(sb.used_cluster_mask.byte_offset(), &clusters)
            .await?;
        let mut clean = sb;
        clean.clean = 1;
        write_super(&s.base, &clean).await?;
        *s.sb.borrow_mut() = clean;
        s.unloaded.set(true);
        s.desc.borrow_mut().take();
        STORES.with(|m| {
            m.borrow_mut().remove(&s.id);
        });
        Ok(())
    }

    /// Grows the store to the base's current size (`spdk_bs_grow_live`): the super block gets the new size and
    /// used-cluster mask length (written with `clean = 0`: the masks on disk are the old ones until the
    /// unload), and the new clusters are free at once. Nothing to do when the size is unchanged; NoSpace when
    /// the base shrank or its cluster mask would not fit the pages reserved for it at init.
    pub async fn grow(&self) -> Result<()> {
        let s = &self.0;
        s.check_loaded()?;
        let _g = s.super_lock.lock().await;
        let mut sb = s.sb.borrow().clone();
        let dev_size = s.base.size();
        if dev_size == sb.size {
            return Ok(());
        }
        let total = dev_size / sb.cluster_size as u64;
        let mask_len =
            (crate::format::MASK_HEADER_LEN as u64 + total.div_ceil(8)).div_ceil(PAGE_SIZE as u64);
        // SPDK reserves room for the mask up to the blob id mask (sized at init for the largest store the
        // metadata region can describe).
        let room =
            (sb.used_blobid_mask.start as u64).saturating_sub(sb.used_cluster_mask.start as u64);
        if dev_size < sb.size || total < s.total_clusters.get() || mask_len > room {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "cannot grow the store from {} to {dev_size} bytes ({total} clusters, {mask_len} mask pages, room for {room})",
                    sb.size
                ),
            ));
        }
        sb.clean = 0;
        sb.size = dev_size;
        sb.used_cluster_mask.len = mask_len as u32;
        write_super(&s.base, &sb)
            .await
            .map_err(|e| e.context("growing the store"))?;
        *s.sb.borrow_mut() = sb;
        s.masks.borrow_mut().used_clusters.resize(total);
        s.total_clusters.set(total);
        Ok(())
    }

    /// Destroys the store (`spdk_bs_destroy`): refused (Busy) while a blob is open; the super block is zeroed
    /// (nothing loads from the device any more) and the base released. Blobs are not deleted one by one.
    pub async fn destroy(&self) -> Result<()> {
        let s = &self.0;
        s.settled_and_closed().await?;
        let _g = s.super_lock.lock().await;
        s.base
            .write_zeroes(0, PAGE_SIZE as u64)
            .await
            .map_err(|e| e.context("zeroing the super block"))?;
        s.unloaded.set(true);
        s.desc.borrow_mut().take();
        STORES.with(|m| {
            m.borrow_mut().remove(&s.id);
        });
        Ok(())
    }

    /// Sets the super blob (`spdk_bs_set_super`): the super block is rewritten with it.
    pub async fn set_super_blob(&self, id: BlobId) -> Result<()> {
        let s = &self.0;
        s.check_loaded()?;
        let _g = s.super_lock.lock().await;
        let mut sb = s.sb.borrow().clone();
        sb.super_blob = id;
        write_super(&s.base, &sb).await?;
        *s.sb.borrow_mut() = sb;
        Ok(())
    }

    /// The super blob, if set.
    pub fn super_blob(&self) -> Option<BlobId> {
        let id = self.0.sb.borrow().super_blob;
        (id != BlobId::INVALID).then_some(id)
    }

    /// The super block as last written.
    pub fn super_block(&self) -> SuperBlock {
        self.0.sb.borrow().clone()
    }

    /// Ids of every blob that loaded (or was created), ascending.
    pub fn blob_ids(&self) -> Vec<BlobId> {
        self.0.blobs.borrow().keys().copied().collect()
    }

    /// Blobs that did not load, with the reason.
    pub fn broken_blobs(&self) -> Vec<(BlobId, String)> {
        self.0.broken.borrow().clone()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.0.cluster_size
    }

    /// The io unit (the base's block size).
    pub fn io_unit_size(&self) -> u64 {
        self.0.block_size
    }

    /// Clusters in the store.
    pub fn total_clusters(&self) -> u64 {
        self.0.total_clusters.get()
    }

    /// Clusters available to blobs (`total_data_clusters`).
    pub fn total_data_clusters(&self) -> u64 {
        self.0.total_clusters.get() - self.0.md_clusters
    }

    /// Free clusters (`free_clusters`).
    pub fn free_clusters(&self) -> u64 {
        self.0.masks.borrow().used_clusters.count_zeros()
    }

    /// Copies of the in-memory masks (tests compare them with what a reload rebuilds).
    pub fn masks(&self) -> Masks {
        self.0.masks.borrow().clone()
    }

    /// The claimed base descriptor (I/O channels of the blobs' bdevs come from it).
    pub fn base_desc(&self) -> Option<Arc<Desc>> {
        self.0.desc.borrow().clone()
    }
}

impl StoreInner {
    /// A background task (a release) started; [`Blobstore::unload`] waits for it.
    pub(crate) fn background_started(&self) {
        self.background.set(self.background.get() + 1);
    }

    /// A background task ended.
    pub(crate) fn background_done(&self) {
        let n = self.background.get().saturating_sub(1);
        self.background.set(n);
        if n == 0 {
            for tx in self.background_idle.borrow_mut().drain(..) {
                tx.send(());
            }
        }
    }

    /// Before an unload or destroy: loaded, no background task left, no blob open (Busy).
    async fn settled_and_closed(&self) -> Result<()> {
        self.check_loaded()?;
        self.background_settled().await;
        if let Some(b) = self.blobs.borrow().values().find(|b| b.open_ref.get() > 0) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("blob {} is still open", b.id),
            ));
        }
        Ok(())
    }

    /// Waits until no background task runs.
    async fn background_settled(&self) {
        while self.background.get() > 0 {
            let (tx, rx) = crate::exec::oneshot();
            self.background_idle.borrow_mut().push(tx);
            rx.await;
        }
    }

    /// Blob `id` of the store (open or not).
    pub(crate) fn blob(&self, id: BlobId) -> Result<Rc<crate::blob::BlobState>> {
        self.blobs
            .borrow()
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NoEntry, format!("no blob {id}")))
    }

    pub(crate) fn check_loaded(&self) -> Result<()> {
        if self.unloaded.get() {
            return Err(Error::new(ErrorKind::NoEntry, "blobstore is unloaded"));
        }
        Ok(())
    }

    /// Byte offset of metadata page `p`.
    pub(crate) fn md_offset(&self, p: u32) -> u64 {
        (self.sb.borrow().md.start as u64 + p as u64) * PAGE_SIZE as u64
    }

    /// Byte offset of cluster `c`.
    pub(crate) fn cluster_offset(&self, c: u32) -> u64 {
        c as u64 * self.cluster_size
    }

    async fn write_bytes(&self, off: u64, bytes: &[u8]) -> Result<()> {
        let mut buf = DmaBuf::alloc(bytes.len()).map_err(|e| Error::io(e, "write buffer"))?;
        buf.as_mut_slice().copy_from_slice(bytes);
        self.base.write(off, buf).await
    }

    /// Writes metadata page `p`.
    pub(crate) async fn write_md_page(&self, p: u32, page: &MdPage) -> Result<()> {
        let bytes = page.encode()?;
        self.write_bytes(self.md_offset(p), &bytes)
            .await
            .map_err(|e| e.context(format!("md page {p}")))
    }

    /// Zeroes metadata page `p`.
    pub(crate) async fn zero_md_page(&self, p: u32) -> Result<()> {
        self.base
            .write_zeroes(self.md_offset(p), PAGE_SIZE as u64)
            .await
            .map_err(|e| e.context(format!("zeroing md page {p}")))
    }

    /// Before the first metadata change after a load: the super block on disk says "not clean"
    /// (`bs_mark_dirty`), so that a crash from here on makes the next load rebuild the masks.
    pub(crate) async fn mark_dirty(&self) -> Result<()> {
        if self.sb.borrow().clean == 0 {
            return Ok(());
        }
        let _g = self.super_lock.lock().await;
        let mut sb = self.sb.borrow().clone();
        if sb.clean == 0 {
            return Ok(());
        }
        sb.clean = 0;
        write_super(&self.base, &sb)
            .await
            .map_err(|e| e.context("marking the store dirty"))?;
        *self.sb.borrow_mut() = sb;
        Ok(())
    }

    /// Claims the lowest free metadata page at or after `from`.
    pub(crate) fn claim_md_page(&self, from: u32) -> Result<u32> {
        let mut m = self.masks.borrow_mut();
        let p = m
            .used_pages
            .find_first_clear(from as u64)
            .ok_or_else(|| Error::new(ErrorKind::NoSpace, "no free metadata page"))?;
        m.used_pages.set(p);
        Ok(p as u32)
    }

    /// Releases a metadata page.
    pub(crate) fn release_md_page(&self, p: u32) {
        self.masks.borrow_mut().used_pages.clear(p as u64);
    }

    /// Claims the lowest free cluster.
    pub(crate) fn claim_cluster(&self) -> Result<u32> {
        let mut m = self.masks.borrow_mut();
        let c = m
            .used_clusters
            .find_first_clear(0)
            .ok_or_else(|| Error::new(ErrorKind::NoSpace, "no free cluster"))?;
        m.used_clusters.set(c);
        Ok(c as u32)
    }

    /// Releases a cluster.
    pub(crate) fn release_cluster(&self, c: u32) {
        self.masks.borrow_mut().used_clusters.clear(c as u64);
    }

    /// Free metadata pages at or after `from` (enough for `n`?).
    pub(crate) fn has_free_md_pages(&self, from: u32, n: u64) -> bool {
        let m = self.masks.borrow();
        let mut at = from as u64;
        for _ in 0..n {
            match m.used_pages.find_first_clear(at) {
                Some(p) => at = p + 1,
                None => return false,
            }
        }
        true
    }

    /// Free clusters.
    pub(crate) fn free_clusters(&self) -> u64 {
        self.masks.borrow().used_clusters.count_zeros()
    }
}

/// Writes the super block.
async fn write_super(base: &Base, sb: &SuperBlock) -> Result<()> {
    let bytes = sb.encode();
    let mut buf = DmaBuf::alloc(PAGE_SIZE).map_err(|e| Error::io(e, "super block buffer"))?;
    buf.as_mut_slice().copy_from_slice(&bytes);
    base.write(0, buf)
        .await
        .map_err(|e| e.context("super block"))
}

/// Awaits two futures together.
async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    let mut ra = None;
    let mut rb = None;
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if ra.is_some() && rb.is_some() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    match (ra, rb) {
        (Some(a), Some(b)) => (a, b),
        // Both are Some once the poll_fn above is ready.
        _ => unreachable!("both futures finished"),
    }
}
