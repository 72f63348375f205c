//! `Translations::translate` is on the I/O path: it must not allocate. A counting global allocator checks it
//! (a test binary of its own, since the allocator is process-wide).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use reactor::memmap::{MemEvent, MemMap};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator may run while thread locals are being torn down.
    let _ = COUNTING.try_with(|c| {
        if c.get() {
            let _ = COUNT.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only const-initialised
// thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    COUNT.with(|n| n.get())
}

#[test]
fn translate_does_not_allocate() {
    let map = MemMap::new(|t, ev, addr, len| {
        if ev == MemEvent::Register {
            t.set_linear_translation(addr, len, addr as u64)?;
        }
        Ok(())
    })
    .unwrap();
    // Made-up addresses: the map records numbers only.
    let regs: Vec<_> = (0..64usize)
        .map(|i| reactor::memmap::register((1 << 40) + i * (4 << 20), 2 << 20).unwrap())
        .collect();
    // The counter itself works.
    assert!(allocations(|| drop(std::hint::black_box(vec![1u8; 16]))) > 0);
    // The first lookup on a thread may set up arc-swap's per-thread slot; after that, none.
    assert!(map.translate(1 << 40, 1).is_some());
    let mut sum = 0u64;
    let n = allocations(|| {
        for i in 0..100_000usize {
            let a = (1 << 40) + (i % 64) * (4 << 20) + (i % 4096);
            if let Some((t, len)) = map.translate(std::hint::black_box(a), 8192) {
                sum = sum.wrapping_add(t + len as u64);
            }
            // Misses too.
            sum += map.translate(a + (3 << 20), 1).is_some() as u64;
        }
    });
    assert_eq!(n, 0, "translate allocated {n} times");
    assert!(sum > 0);
    // A per-user cache: nothing either, also when it picks up a changed map.
    let mut cache = map.cache();
    let _ = cache.translate(1 << 40, 1);
    let n = allocations(|| {
        for i in 0..100_000usize {
            let a = (1 << 40) + (i % 64) * (4 << 20) + (i % 4096);
            sum = sum.wrapping_add(
                cache
                    .translate(std::hint::black_box(a), 8192)
                    .map_or(0, |t| t.0),
            );
        }
    });
    assert_eq!(n, 0, "cached translate allocated {n} times");
    let extra = reactor::memmap::register(1 << 41, 4096).unwrap();
    let n = allocations(|| {
        assert_eq!(cache.translate(1 << 41, 4096), Some((1 << 41, 4096)));
    });
    assert_eq!(n, 0, "refreshing a cache allocated {n} times");
    drop(extra);
    // And on a second thread after its first lookup.
    let map = std::sync::Arc::new(map);
    let m2 = map.clone();
    let n = std::thread::spawn(move || {
        let _ = m2.translate(1 << 40, 1);
        allocations(|| {
            for i in 0..10_000usize {
                std::hint::black_box(m2.translate((1 << 40) + (i % 64) * (4 << 20), 4096));
            }
        })
    })
    .join()
    .unwrap();
    assert_eq!(n, 0, "translate allocated {n} times on a second thread");
    drop(regs);
}
