//! One map of the memory that can carry I/O data (SPDK's `spdk_mem_register` / `spdk_mem_map`).
//!
//! Producers of I/O memory (DMA pools, malloc bdevs, vhost guest memory tables; later anything else) call
//! [`register`] for every mapping they make and keep the [`Registration`] while the memory is mapped; dropping it
//! unregisters. Consumers that must prepare memory for a device (a VFIO container mapping IOVAs, an RDMA
//! protection domain registering MRs) create a [`MemMap`] whose notify callback hears
//! [`MemEvent::Register`] for every region already registered (replayed in address order) and for each new one,
//! and [`MemEvent::Unregister`] for every region going away. A callback records what it needs per region with
//! [`Translations::set_translation`] (a key, the same for every byte) or
//! [`Translations::set_linear_translation`] (an address, offset per byte); the I/O path asks
//! [`Translations::translate`] (any thread) or, cheaper, a [`TranslationCache`] it owns: neither takes a lock or
//! allocates.
//!
//! Unlike SPDK, regions are exact byte ranges, not 2 MiB pages: our DMA chunks are 2 MiB long but only
//! 4 KiB-aligned when hugepages are missing, and vhost guest regions have whatever size and alignment the front end
//! chose. Translations are therefore kept as a sorted list of ranges searched in O(log n), not SPDK's two-level
//! page table.
//!
//! Registration, map creation and removal are control path: they take one process-wide mutex and run every
//! callback under it (as SPDK's `g_spdk_mem_map_mutex`), so callbacks see a consistent order of events. A callback
//! must not register, unregister or create or drop a map (it would deadlock; it gets [`MemError::Reentrant`]
//! instead, or a panic from a `Drop`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

/// What happened to a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemEvent {
    /// The region can now carry I/O data.
    Register,
    /// The region is about to go away: stop using it.
    Unregister,
}

/// Why a registration, a map or a translation was refused.
#[derive(Debug)]
pub enum MemError {
    /// A zero-length range.
    ZeroLength,
    /// `addr + len` wraps around the address space.
    Wraps {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// The range overlaps a region that is already registered.
    Overlaps {
        /// Start of the refused range.
        addr: usize,
        /// Its length.
        len: usize,
        /// The registered region it overlaps (start, length).
        with: (usize, usize),
    },
    /// A subscriber's notify callback failed the registration.
    Refused {
        /// Start of the region.
        addr: usize,
        /// Its length.
        len: usize,
        /// What the callback said.
        error: io::Error,
    },
    /// Called from inside a notify callback, which would deadlock.
    Reentrant,
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::ZeroLength => write!(f, "memory region of length 0"),
            MemError::Wraps { addr, len } => {
                write!(
                    f,
                    "memory region {addr:#x}+{len:#x} wraps the address space"
                )
            }
            MemError::Overlaps { addr, len, with } => write!(
                f,
                "memory region {addr:#x}+{len:#x} overlaps registered region {:#x}+{:#x}",
                with.0, with.1
            ),
            MemError::Refused { addr, len, error } => write!(
                f,
                "memory region {addr:#x}+{len:#x} refused by a memory map subscriber: {error}"
            ),
            MemError::Reentrant => write!(
                f,
                "memory map changed from inside a memory map notification"
            ),
        }
    }
}

impl std::error::Error for MemError {}

impl From<MemError> for io::Error {
    fn from(e: MemError) -> io::Error {
        let kind = match &e {
            MemError::ZeroLength | MemError::Wraps { .. } => io::ErrorKind::InvalidInput,
            MemError::Overlaps { .. } => io::ErrorKind::AlreadyExists,
            MemError::Refused { error, .. } => error.kind(),
            MemError::Reentrant => io::ErrorKind::Deadlock,
        };
        io::Error::new(kind, e)
    }
}

type Result<T> = std::result::Result<T, MemError>;

fn end_of(addr: usize, len: usize) -> Result<usize> {
    if len == 0 {
        return Err(MemError::ZeroLength);
    }
    addr.checked_add(len).ok_or(MemError::Wraps { addr, len })
}

thread_local! {
    static IN_NOTIFY: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as running notify callbacks; cleared on drop (also when a callback panics).
struct NotifyScope;

impl NotifyScope {
    fn enter() -> Result<NotifyScope> {
        // `try_with`: registrations may be dropped by other thread-locals' destructors at thread exit.
        if IN_NOTIFY.try_with(|f| f.replace(true)).unwrap_or(false) {
            return Err(MemError::Reentrant);
        }
        Ok(NotifyScope)
    }
}

impl Drop for NotifyScope {
    fn drop(&mut self) {
        let _ = IN_NOTIFY.try_with(|f| f.set(false));
    }
}

/// One translation range: `[start, end)` maps to `value` (or `value + offset` when `linear`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    start: usize,
    end: usize,
    value: u64,
    linear: bool,
}

impl Entry {
    fn at(&self, addr: usize) -> u64 {
        if self.linear {
            self.value.wrapping_add((addr - self.start) as u64)
        } else {
            self.value
        }
    }

    /// Whether `next` continues this entry's translation without a break.
    fn continued_by(&self, next: &Entry) -> bool {
        next.start == self.end && next.linear == self.linear && next.value == self.at(self.end)
    }
}

/// The translation of `addr` in sorted, non-overlapping `v`, and how far it continues (at most `len`).
#[inline]
fn lookup(v: &[Entry], addr: usize, len: usize) -> Option<(u64, usize)> {
    let i = v.partition_point(|e| e.end <= addr);
    let first = v.get(i).filter(|e| e.start <= addr)?;
    let mut run = first.end - addr;
    let mut prev = first;
    for next in &v[i + 1..] {
        if run >= len || !prev.continued_by(next) {
            break;
        }
        run += next.end - next.start;
        prev = next;
    }
    Some((first.at(addr), run.min(len)))
}

type Snapshot = Arc<Vec<Entry>>;

/// A subscriber's translations: an immutable sorted list published through an atomic pointer.
///
/// Writers (notify callbacks, control path) serialize on a mutex, copy the list, change the copy and publish it;
/// readers load the current list without a lock. `arc-swap` frees a replaced list once the last reader that
/// loaded it (or the last [`TranslationCache`] holding it) is done.
pub struct Translations {
    entries: Arc<ArcSwap<Vec<Entry>>>,
    write: Mutex<()>,
}

/// A private view of a map's translations for one user on the I/O path (a channel, a queue pair): a lookup
/// checks with one plain atomic load whether the map changed since the last one, then searches the snapshot
/// it holds, with no atomic read-modify-write at all (unlike [`Translations::translate`], which pays two on
/// thread-local slots). Needs `&mut`, so it belongs to one user; it keeps the snapshot it last saw alive until
/// its next lookup or its drop. Outlives its map harmlessly (it then translates nothing).
pub struct TranslationCache {
    cache: arc_swap::Cache<Arc<ArcSwap<Vec<Entry>>>, Snapshot>,
}

impl fmt::Debug for TranslationCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TranslationCache")
    }
}

impl TranslationCache {
    /// As [`Translations::translate`], against the map's current translations.
    #[inline]
    pub fn translate(&mut self, addr: usize, len: usize) -> Option<(u64, usize)> {
        lookup(self.cache.load(), addr, len)
    }
}

impl Default for Translations {
    fn default() -> Self {
        Translations::new()
    }
}

impl fmt::Debug for Translations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.load().iter()).finish()
    }
}

impl Translations {
    /// An empty table.
    pub fn new() -> Translations {
        Translations {
            entries: Arc::new(ArcSwap::from_pointee(Vec::new())),
            write: Mutex::new(()),
        }
    }

    /// A cache for one user on the I/O path; see [`TranslationCache`].
    pub fn cache(&self) -> TranslationCache {
        TranslationCache {
            cache: arc_swap::Cache::new(self.entries.clone()),
        }
    }

    /// Every byte of `[addr, addr+len)` translates to `value` (a key or handle: an RDMA MR's lkey, a device
    /// handle). Replaces whatever translation the range had.
    pub fn set_translation(&self, addr: usize, len: usize, value: u64) -> Result<()> {
        let end = end_of(addr, len)?;
        self.update(addr, end, Some((value, false)));
        Ok(())
    }

    /// Byte `addr + i` of `[addr, addr+len)` translates to `base + i` (an IOVA or bus address). Replaces whatever
    /// translation the range had.
    pub fn set_linear_translation(&self, addr: usize, len: usize, base: u64) -> Result<()> {
        let end = end_of(addr, len)?;
        self.update(addr, end, Some((base, true)));
        Ok(())
    }

    /// Forgets the translation of `[addr, addr+len)` (parts of larger ranges are cut out).
    pub fn clear_translation(&self, addr: usize, len: usize) -> Result<()> {
        let end = end_of(addr, len)?;
        self.update(addr, end, None);
        Ok(())
    }

    fn clear_all(&self) {
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        self.entries.store(Arc::new(Vec::new()));
    }

    fn update(&self, start: usize, end: usize, new: Option<(u64, bool)>) {
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.entries.load();
        let mut v = Vec::with_capacity(old.len() + 2);
        for e in old.iter() {
            if e.end <= start || e.start >= end {
                v.push(*e);
                continue;
            }
            if e.start < start {
                v.push(Entry { end: start, ..*e });
            }
            if e.end > end {
                v.push(Entry {
                    start: end,
                    value: e.at(end),
                    ..*e
                });
            }
        }
        if let Some((value, linear)) = new {
            v.push(Entry {
                start,
                end,
                value,
                linear,
            });
        }
        v.sort_unstable_by_key(|e| e.start);
        self.entries.store(Arc::new(v));
    }

    /// The translation of `addr`, and for how many bytes from `addr` (at most `len`) translations continue
    /// without a break: across ranges that adjoin and continue the same key, or the same address line.
    /// `None` when `addr` has no translation. O(log n) plus the ranges crossed; no lock, no allocation (after the
    /// calling thread's first lookup of any map, when `arc-swap` sets up its per-thread slot once).
    #[inline]
    pub fn translate(&self, addr: usize, len: usize) -> Option<(u64, usize)> {
        lookup(&self.entries.load(), addr, len)
    }

    /// Number of translation ranges (for tests and diagnostics).
    pub fn ranges(&self) -> usize {
        self.entries.load().len()
    }
}

type Notify = dyn Fn(&Translations, MemEvent, usize, usize) -> io::Result<()> + Send + Sync;

struct MapInner {
    notify: Box<Notify>,
    table: Translations,
}

impl MapInner {
    fn notify(&self, ev: MemEvent, addr: usize, len: usize) -> io::Result<()> {
        (self.notify)(&self.table, ev, addr, len)
    }

    /// Tells the map a region goes away and drops what it recorded for it.
    fn unregister(&self, addr: usize, len: usize) {
        if let Err(e) = self.notify(MemEvent::Unregister, addr, len) {
            log::warn!("memory map subscriber failed to unregister {addr:#x}+{len:#x}: {e}");
        }
        let _ = self.table.clear_translation(addr, len);
    }
}

struct State {
    /// Registered regions: start -> length, never overlapping.
    regions: BTreeMap<usize, usize>,
    /// Subscribers in creation order.
    maps: Vec<Arc<MapInner>>,
}

/// A set of registered regions and the maps subscribed to it. The process has one, [`global`]; tests make their
/// own (as `static`s) to see exact sequences of events.
pub struct MemRegistry {
    state: Mutex<State>,
}

static GLOBAL: MemRegistry = MemRegistry::new();

/// The process-wide registry that [`register`] and [`MemMap::new`] use.
pub fn global() -> &'static MemRegistry {
    &GLOBAL
}

/// Registers `[addr, addr+len)` in the process-wide map; see [`MemRegistry::register`].
pub fn register(addr: usize, len: usize) -> Result<Registration> {
    GLOBAL.register(addr, len)
}

/// The regions registered in the process-wide map: (start, length), ascending.
pub fn regions() -> Vec<(usize, usize)> {
    GLOBAL.regions()
}

impl Default for MemRegistry {
    fn default() -> Self {
        MemRegistry::new()
    }
}

impl MemRegistry {
    /// An empty registry.
    pub const fn new() -> MemRegistry {
        MemRegistry {
            state: Mutex::new(State {
                regions: BTreeMap::new(),
                maps: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registered regions: (start, length), ascending.
    pub fn regions(&self) -> Vec<(usize, usize)> {
        self.lock().regions.iter().map(|(a, l)| (*a, *l)).collect()
    }

    /// Registers `[addr, addr+len)`: every map hears [`MemEvent::Register`], in the order the maps were created.
    /// If one refuses, the maps notified before it hear [`MemEvent::Unregister`] (latest first) and the call
    /// fails; nothing stays registered. Zero-length, wrapping and overlapping ranges (duplicates included) are
    /// refused.
    ///
    /// The map records addresses only; the caller keeps the memory mapped until the [`Registration`] is dropped,
    /// since subscribers may let devices access it until then.
    pub fn register(&'static self, addr: usize, len: usize) -> Result<Registration> {
        let end = end_of(addr, len)?;
        let _scope = NotifyScope::enter()?;
        let mut st = self.lock();
        if let Some((&s, &l)) = st.regions.range(..end).next_back() {
            if s + l > addr {
                return Err(MemError::Overlaps {
                    addr,
                    len,
                    with: (s, l),
                });
            }
        }
        for (i, m) in st.maps.iter().enumerate() {
            if let Err(error) = m.notify(MemEvent::Register, addr, len) {
                let _ = m.table.clear_translation(addr, len);
                for done in st.maps[..i].iter().rev() {
                    done.unregister(addr, len);
                }
                return Err(MemError::Refused { addr, len, error });
            }
        }
        st.regions.insert(addr, len);
        Ok(Registration {
            registry: self,
            addr,
            len,
        })
    }

    fn unregister(&self, addr: usize, len: usize) {
        let _scope = match NotifyScope::enter() {
            Ok(s) => s,
            Err(_) => panic!("memory region {addr:#x}+{len:#x} unregistered from inside a memory map notification"),
        };
        let mut st = self.lock();
        st.regions.remove(&addr);
        for m in st.maps.iter().rev() {
            m.unregister(addr, len);
        }
        drop(st);
    }

    /// A new subscriber; see [`MemMap::new`].
    pub fn map(
        &'static self,
        notify: impl Fn(&Translations, MemEvent, usize, usize) -> io::Result<()> + Send + Sync + 'static,
    ) -> Result<MemMap> {
        let inner = Arc::new(MapInner {
            notify: Box::new(notify),
            table: Translations::new(),
        });
        let _scope = NotifyScope::enter()?;
        let mut st = self.lock();
        let regions: Vec<(usize, usize)> = st.regions.iter().map(|(a, l)| (*a, *l)).collect();
        for (i, &(addr, len)) in regions.iter().enumerate() {
            if let Err(error) = inner.notify(MemEvent::Register, addr, len) {
                for &(a, l) in regions[..i].iter().rev() {
                    inner.unregister(a, l);
                }
                inner.table.clear_all();
                return Err(MemError::Refused { addr, len, error });
            }
        }
        st.maps.push(inner.clone());
        Ok(MemMap {
            registry: self,
            inner,
        })
    }
}

/// A registered region; dropping it unregisters the region (every map hears [`MemEvent::Unregister`], the most
/// recently created map first, and forgets its translations for the region).
#[must_use = "dropping a Registration unregisters the region at once"]
pub struct Registration {
    registry: &'static MemRegistry,
    addr: usize,
    len: usize,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Registration({:#x}+{:#x})", self.addr, self.len)
    }
}

impl Registration {
    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes (never 0).
    pub fn size(&self) -> usize {
        self.len
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(self.addr, self.len);
    }
}

/// A subscriber to a registry (SPDK's `spdk_mem_map` with a `notify_cb`): its callback hears every region come
/// and go, and its [`Translations`] (reached through `Deref`) answer lookups on the I/O path. Dropping it
/// unsubscribes: the callback hears [`MemEvent::Unregister`] for every region still registered.
pub struct MemMap {
    registry: &'static MemRegistry,
    inner: Arc<MapInner>,
}

impl fmt::Debug for MemMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemMap")
            .field("translations", &self.inner.table)
            .finish()
    }
}

impl MemMap {
    /// Subscribes `notify` to the process-wide registry. It hears [`MemEvent::Register`] at once for every region
    /// already registered, in address order; if it fails one, the regions it accepted hear
    /// [`MemEvent::Unregister`] (in reverse) and the map is not created. Afterwards it hears every registration
    /// and unregistration. `notify` runs under the registry's mutex, on the thread that changes the map; it gets
    /// this map's [`Translations`] to record what the region translates to.
    pub fn new(
        notify: impl Fn(&Translations, MemEvent, usize, usize) -> io::Result<()> + Send + Sync + 'static,
    ) -> Result<MemMap> {
        GLOBAL.map(notify)
    }

    /// The map's translations.
    pub fn translations(&self) -> &Translations {
        &self.inner.table
    }
}

impl std::ops::Deref for MemMap {
    type Target = Translations;

    fn deref(&self) -> &Translations {
        &self.inner.table
    }
}

impl Drop for MemMap {
    fn drop(&mut self) {
        let _scope = match NotifyScope::enter() {
            Ok(s) => s,
            Err(_) => panic!("memory map dropped from inside a memory map notification"),
        };
        let mut st = self.registry.lock();
        st.maps.retain(|m| !Arc::ptr_eq(m, &self.inner));
        for (&addr, &len) in st.regions.iter() {
            if let Err(e) = self.inner.notify(MemEvent::Unregister, addr, len) {
                log::warn!("memory map subscriber failed to unregister {addr:#x}+{len:#x}: {e}");
            }
        }
        drop(st);
        self.inner.table.clear_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    type Log = Arc<Mutex<Vec<(&'static str, MemEvent, usize, usize)>>>;

    fn log() -> Log {
        Arc::new(Mutex::new(Vec::new()))
    }

    fn take(l: &Log) -> Vec<(&'static str, MemEvent, usize, usize)> {
        std::mem::take(&mut *l.lock().unwrap())
    }

    /// A subscriber named `name` that logs events and translates addresses linearly (IOVA = VA + `shift`).
    fn recorder(reg: &'static MemRegistry, name: &'static str, l: &Log, shift: u64) -> MemMap {
        let l = l.clone();
        reg.map(move |t, ev, a, n| {
            l.lock().unwrap().push((name, ev, a, n));
            if ev == MemEvent::Register {
                t.set_linear_translation(a, n, a as u64 + shift)?;
            }
            Ok(())
        })
        .unwrap()
    }

    use MemEvent::{Register as R, Unregister as U};

    const M: usize = 1 << 20;

    #[test]
    fn bad_ranges_are_refused() {
        static REG: MemRegistry = MemRegistry::new();
        assert!(matches!(REG.register(0x1000, 0), Err(MemError::ZeroLength)));
        assert!(matches!(
            REG.register(usize::MAX - 10, 20),
            Err(MemError::Wraps { .. })
        ));
        let a = REG.register(10 * M, 2 * M).unwrap();
        assert_eq!((a.addr(), a.size()), (10 * M, 2 * M));
        for (addr, len) in [
            (10 * M, 2 * M), // duplicate
            (10 * M, 1),     // same start
            (9 * M, M + 1),  // tail overlaps the start
            (12 * M - 1, 5), // head overlaps the end
            (9 * M, 4 * M),  // covers it
            (11 * M, 4096),  // inside it
        ] {
            match REG.register(addr, len) {
                Err(MemError::Overlaps { with, .. }) => assert_eq!(with, (10 * M, 2 * M)),
                other => panic!("{addr:#x}+{len:#x}: {other:?}"),
            }
        }
        let err = REG.register(11 * M, 1).unwrap_err().to_string();
        assert!(
            err.contains("overlaps registered region 0xa00000+0x200000"),
            "{err}"
        );
        // Adjoining ranges are fine.
        let b = REG.register(12 * M, M).unwrap();
        let c = REG.register(9 * M, M).unwrap();
        assert_eq!(
            REG.regions(),
            vec![(9 * M, M), (10 * M, 2 * M), (12 * M, M)]
        );
        drop((a, b, c));
        assert!(REG.regions().is_empty());
        // Gone means registrable again.
        let _a = REG.register(10 * M, 2 * M).unwrap();
    }

    #[test]
    fn notifications_in_order_and_replayed() {
        static REG: MemRegistry = MemRegistry::new();
        let l = log();
        let r1 = REG.register(20 * M, M).unwrap();
        let r0 = REG.register(4 * M, M).unwrap();
        // A new map hears the existing regions in address order.
        let a = recorder(&REG, "a", &l, 0);
        assert_eq!(take(&l), vec![("a", R, 4 * M, M), ("a", R, 20 * M, M)]);
        let b = recorder(&REG, "b", &l, 0);
        assert_eq!(take(&l), vec![("b", R, 4 * M, M), ("b", R, 20 * M, M)]);
        // Registration: maps in creation order; unregistration: latest map first.
        let r2 = REG.register(8 * M, M).unwrap();
        assert_eq!(take(&l), vec![("a", R, 8 * M, M), ("b", R, 8 * M, M)]);
        drop(r2);
        assert_eq!(take(&l), vec![("b", U, 8 * M, M), ("a", U, 8 * M, M)]);
        // Dropping a map unregisters everything from it, and only from it.
        drop(a);
        assert_eq!(take(&l), vec![("a", U, 4 * M, M), ("a", U, 20 * M, M)]);
        drop(r0);
        assert_eq!(take(&l), vec![("b", U, 4 * M, M)]);
        drop(r1);
        drop(b);
        assert_eq!(take(&l), vec![("b", U, 20 * M, M)]);
    }

    #[test]
    fn refused_registration_rolls_back() {
        static REG: MemRegistry = MemRegistry::new();
        let l = log();
        let a = recorder(&REG, "a", &l, 0);
        let b = recorder(&REG, "b", &l, 0);
        let refuse = Arc::new(AtomicBool::new(true));
        let (l2, r2) = (l.clone(), refuse.clone());
        let picky = REG
            .map(move |t, ev, addr, n| {
                l2.lock().unwrap().push(("picky", ev, addr, n));
                t.set_translation(addr, n, 7)?;
                if ev == R && r2.load(Ordering::SeqCst) {
                    return Err(io::Error::other("no IOMMU room"));
                }
                Ok(())
            })
            .unwrap();
        let c = recorder(&REG, "c", &l, 0);
        let err = REG.register(30 * M, M).unwrap_err();
        assert!(err.to_string().contains("no IOMMU room"), "{err}");
        assert!(matches!(err, MemError::Refused { addr, len, .. } if addr == 30 * M && len == M));
        // "c" never heard of it; "b" then "a" took it back.
        assert_eq!(
            take(&l),
            vec![
                ("a", R, 30 * M, M),
                ("b", R, 30 * M, M),
                ("picky", R, 30 * M, M),
                ("b", U, 30 * M, M),
                ("a", U, 30 * M, M),
            ]
        );
        assert!(REG.regions().is_empty());
        for t in [&a, &b, &picky, &c] {
            assert_eq!(t.translate(30 * M, 1), None, "translation left behind");
        }
        refuse.store(false, Ordering::SeqCst);
        let r = REG.register(30 * M, M).unwrap();
        assert_eq!(picky.translate(30 * M + 5, 10), Some((7, 10)));
        drop(r);
        drop((a, b, picky, c));
    }

    #[test]
    fn refused_replay_fails_the_map() {
        static REG: MemRegistry = MemRegistry::new();
        let l = log();
        let _r = [
            REG.register(M, M).unwrap(),
            REG.register(3 * M, M).unwrap(),
            REG.register(5 * M, M).unwrap(),
        ];
        let l2 = l.clone();
        let e = REG
            .map(move |_, ev, a, n| {
                l2.lock().unwrap().push(("x", ev, a, n));
                if ev == R && a == 5 * M {
                    return Err(io::Error::other("full"));
                }
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(e, MemError::Refused { addr, .. } if addr == 5 * M));
        assert_eq!(
            take(&l),
            vec![
                ("x", R, M, M),
                ("x", R, 3 * M, M),
                ("x", R, 5 * M, M),
                ("x", U, 3 * M, M),
                ("x", U, M, M),
            ]
        );
        // The failed map is not subscribed.
        let _r2 = REG.register(7 * M, M).unwrap();
        assert!(take(&l).is_empty());
    }

    #[test]
    fn translate_reports_contiguous_length() {
        static REG: MemRegistry = MemRegistry::new();
        let l = log();
        let map = recorder(&REG, "a", &l, 0x1_0000_0000);
        let sh = 0x1_0000_0000u64;
        // Two adjoining regions and one after a gap.
        let _a = REG.register(10 * M, 2 * M).unwrap();
        let _b = REG.register(12 * M, M).unwrap();
        let _c = REG.register(14 * M, M).unwrap();
        let x = 10 * M + 100;
        assert_eq!(map.translate(x, 1), Some((x as u64 + sh, 1)));
        assert_eq!(map.translate(x, 0), Some((x as u64 + sh, 0)));
        // Within the first region.
        assert_eq!(map.translate(x, M), Some((x as u64 + sh, M)));
        // Across the boundary into the adjoining region: linear translations continue.
        assert_eq!(map.translate(x, 2 * M), Some((x as u64 + sh, 2 * M)));
        // Past the second region's end, into the gap: stops at 13 MiB.
        assert_eq!(map.translate(x, 10 * M), Some((x as u64 + sh, 3 * M - 100)));
        // The last byte, the gap, before and after everything.
        assert_eq!(
            map.translate(13 * M - 1, 8),
            Some(((13 * M - 1) as u64 + sh, 1))
        );
        assert_eq!(map.translate(13 * M, 1), None);
        assert_eq!(map.translate(0, 1), None);
        assert_eq!(map.translate(15 * M, 1), None);
        assert_eq!(map.translate(usize::MAX, 1), None);
        // A break in the address line stops the run even where ranges adjoin.
        map.set_linear_translation(12 * M, M, 0x42).unwrap();
        assert_eq!(map.translate(x, 2 * M), Some((x as u64 + sh, 2 * M - 100)));
        assert_eq!(map.translate(12 * M + 8, 16), Some((0x42 + 8, 16)));
        // Keys: the same value for every byte; adjoining ranges with the same key are contiguous.
        map.set_translation(10 * M, 2 * M, 9).unwrap();
        map.set_translation(12 * M, M, 9).unwrap();
        assert_eq!(map.translate(11 * M, 2 * M), Some((9, 2 * M)));
        map.set_translation(12 * M, M, 10).unwrap();
        assert_eq!(map.translate(11 * M, 2 * M), Some((9, M)));
        // Cutting a hole splits a range; a linear right-hand piece keeps its addresses.
        map.set_linear_translation(10 * M, 2 * M, 0).unwrap();
        map.clear_translation(10 * M + 4096, 4096).unwrap();
        assert_eq!(map.translate(10 * M, 3 * 4096), Some((0, 4096)));
        assert_eq!(map.translate(10 * M + 4096, 1), None);
        assert_eq!(map.translate(10 * M + 8192, 1), Some((8192, 1)));
        assert!(matches!(
            map.set_translation(1, 0, 1),
            Err(MemError::ZeroLength)
        ));
    }

    #[test]
    fn a_cache_follows_its_map() {
        static REG: MemRegistry = MemRegistry::new();
        let l = log();
        let map = recorder(&REG, "a", &l, 0x10);
        let mut cache = map.cache();
        assert_eq!(cache.translate(M, 1), None);
        let r = REG.register(M, M).unwrap();
        assert_eq!(cache.translate(M + 1, 2), Some((M as u64 + 0x11, 2)));
        map.set_translation(M, M, 3).unwrap();
        assert_eq!(cache.translate(M + 1, 2), Some((3, 2)));
        drop(r);
        assert_eq!(cache.translate(M + 1, 2), None);
        let _r = REG.register(M, M).unwrap();
        // The map goes; its caches translate nothing.
        drop(map);
        assert_eq!(cache.translate(M + 1, 2), None);
    }

    #[test]
    fn unregister_clears_translations() {
        static REG: MemRegistry = MemRegistry::new();
        // A subscriber that forgets to clear: the map does it after the Unregister callback.
        let map = REG
            .map(|t, ev, a, n| {
                if ev == R {
                    t.set_translation(a, n, 5)?;
                }
                Ok(())
            })
            .unwrap();
        let r = REG.register(2 * M, M).unwrap();
        assert_eq!(map.translate(2 * M, M), Some((5, M)));
        assert_eq!(map.ranges(), 1);
        drop(r);
        assert_eq!(map.translate(2 * M, M), None);
        assert_eq!(map.ranges(), 0);
    }

    #[test]
    fn changes_from_a_callback_are_refused() {
        static REG: MemRegistry = MemRegistry::new();
        let inner_result = Arc::new(Mutex::new(None));
        let ir = inner_result.clone();
        let _map = REG
            .map(move |_, ev, a, _| {
                if ev == R && a == M {
                    let r = REG.register(100 * M, M).map(|_| ());
                    *ir.lock().unwrap() = Some(matches!(r, Err(MemError::Reentrant)));
                }
                Ok(())
            })
            .unwrap();
        let _r = REG.register(M, M).unwrap();
        assert_eq!(*inner_result.lock().unwrap(), Some(true));
        assert_eq!(REG.regions(), vec![(M, M)]);
        // The thread is usable again afterwards.
        let _r2 = REG.register(2 * M, M).unwrap();
    }

    #[test]
    fn concurrent_lookups_while_registering() {
        static REG: MemRegistry = MemRegistry::new();
        let map = Arc::new(
            REG.map(|t, ev, a, n| {
                if ev == R {
                    t.set_linear_translation(a, n, a as u64 ^ 0xdead_0000_0000)?;
                }
                Ok(())
            })
            .unwrap(),
        );
        // Stable regions at even MiBs; transient ones at odd MiBs come and go.
        let _stable: Vec<Registration> = (0..16)
            .map(|i| REG.register((100 + 2 * i) * M, M).unwrap())
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..4)
            .map(|t| {
                let (map, stop, hits) = (map.clone(), stop.clone(), hits.clone());
                std::thread::spawn(move || {
                    let mut i = t;
                    let mut cache = map.cache();
                    while !stop.load(Ordering::Relaxed) {
                        i = (i + 1) % 32;
                        let a = (100 + i) * M + 64 * i;
                        let r = if i % 4 < 2 {
                            map.translate(a, 8192)
                        } else {
                            cache.translate(a, 8192)
                        };
                        match r {
                            Some((v, n)) => {
                                assert_eq!(v, a as u64 ^ 0xdead_0000_0000, "wrong translation");
                                assert!(n > 0 && n <= 8192);
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                            None => assert!(i % 2 == 1, "stable region {i} missing"),
                        }
                    }
                })
            })
            .collect();
        // At least 300 rounds, and on until a reader has looked up something while registrations change (on a
        // busy machine the readers may not be scheduled before the first 300 rounds are over).
        let before = hits.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut round = 0;
        while round < 300
            || (hits.load(Ordering::Relaxed) == before && std::time::Instant::now() < deadline)
        {
            let regs: Vec<Registration> = (0..16)
                .filter(|i| (i + round) % 3 != 0)
                .map(|i| REG.register((101 + 2 * i) * M, M).unwrap())
                .collect();
            drop(regs);
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert!(hits.load(Ordering::Relaxed) > 0);
        assert_eq!(map.ranges(), 16);
    }
}
