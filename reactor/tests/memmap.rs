//! The process-wide memory map as producers use it: DMA buffers register their backing memory.

use std::sync::{Arc, Mutex};

use reactor::dma::{DmaBuf, CHUNK};
use reactor::memmap::{MemEvent, MemMap};

type Events = Arc<Mutex<Vec<(MemEvent, usize, usize)>>>;

/// Taken by every test here: their allocations share the process-wide pool and map, so run concurrently one
/// test's small buffers could land in chunks another's allocations had just registered (seen: "3 registrations
/// for 64 small buffers" in a full-suite run).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A subscriber translating linearly (IOVA = VA, as a VFIO driver with an identity IOMMU mapping would).
fn subscriber() -> (MemMap, Events) {
    let ev: Events = Arc::new(Mutex::new(Vec::new()));
    let e2 = ev.clone();
    let map = MemMap::new(move |t, what, addr, len| {
        e2.lock().unwrap().push((what, addr, len));
        if what == MemEvent::Register {
            t.set_linear_translation(addr, len, addr as u64)?;
        }
        Ok(())
    })
    .unwrap();
    (map, ev)
}

fn covering(ev: &Events, what: MemEvent, addr: usize) -> Option<(usize, usize)> {
    ev.lock()
        .unwrap()
        .iter()
        .find(|(w, a, l)| *w == what && *a <= addr && addr < a + l)
        .map(|(_, a, l)| (*a, *l))
}

#[test]
fn dma_buffers_are_registered() {
    let _serial = serial();
    let (map, ev) = subscriber();
    // A buffer of a whole chunk's class takes a fresh chunk (nothing in this process freed one): the chunk is
    // registered, once, and stays registered (chunks are pooled, never unmapped).
    let a = DmaBuf::alloc(CHUNK).unwrap();
    let at = a.as_ptr() as usize;
    assert_eq!(
        covering(&ev, MemEvent::Register, at),
        Some((at, CHUNK)),
        "chunk not registered"
    );
    assert_eq!(map.translate(at + 10, 100), Some((at as u64 + 10, 100)));
    // Small buffers carved from one chunk: at most one registration for many buffers.
    let before = ev.lock().unwrap().len();
    let small: Vec<DmaBuf> = (0..64).map(|_| DmaBuf::alloc(4096).unwrap()).collect();
    // Only registrations of memory these buffers lie in: the other tests of this binary run at the same time and
    // register chunks of their own with the same process-wide map.
    let regs = ev.lock().unwrap()[before..]
        .iter()
        .filter(|(what, a, l)| {
            *what == MemEvent::Register
                && small.iter().any(|b| {
                    let p = b.as_ptr() as usize;
                    p >= *a && p < a + l
                })
        })
        .count();
    assert!(regs <= 1, "{regs} registrations for 64 small buffers");
    for b in &small {
        let p = b.as_ptr() as usize;
        assert!(covering(&ev, MemEvent::Register, p).is_some());
        assert_eq!(map.translate(p, 4096), Some((p as u64, 4096)));
    }
    drop(small);
    drop(a);
    assert!(covering(&ev, MemEvent::Unregister, at).is_none());
    assert!(map.translate(at, 1).is_some(), "pooled chunk unregistered");

    // A buffer larger than a chunk is its own mapping: registered while it lives.
    let big = DmaBuf::alloc(5 << 20).unwrap();
    let at = big.as_ptr() as usize;
    assert_eq!(covering(&ev, MemEvent::Register, at), Some((at, 6 << 20)));
    assert_eq!(map.translate(at, 5 << 20), Some((at as u64, 5 << 20)));
    assert!(reactor::memmap::regions().contains(&(at, 6 << 20)));
    drop(big);
    assert_eq!(covering(&ev, MemEvent::Unregister, at), Some((at, 6 << 20)));
    assert_eq!(map.translate(at, 1), None);
    assert!(!reactor::memmap::regions().contains(&(at, 6 << 20)));
}

#[test]
fn a_new_map_sees_existing_buffers() {
    let _serial = serial();
    let keep = DmaBuf::alloc(3 << 20).unwrap();
    let at = keep.as_ptr() as usize;
    let (map, ev) = subscriber();
    assert_eq!(covering(&ev, MemEvent::Register, at), Some((at, 4 << 20)));
    assert_eq!(map.translate(at + 1, 16), Some((at as u64 + 1, 16)));
    // Dropping the map tells it everything goes away (for it).
    let ev2 = ev.clone();
    drop(map);
    assert_eq!(
        covering(&ev2, MemEvent::Unregister, at),
        Some((at, 4 << 20))
    );
    drop(keep);
}

#[test]
fn a_refusing_subscriber_fails_the_allocation() {
    let _serial = serial();
    // Only large buffers of one odd size are refused, so concurrent tests in this binary are not disturbed.
    let odd = 14 << 20;
    let _map = MemMap::new(move |_, what, _, len| {
        if what == MemEvent::Register && len == odd {
            return Err(std::io::Error::other("IOMMU full"));
        }
        Ok(())
    })
    .unwrap();
    let before = reactor::memmap::regions();
    let e = DmaBuf::alloc(odd - 4096)
        .err()
        .expect("allocation must fail");
    assert!(e.to_string().contains("IOMMU full"), "{e}");
    assert!(reactor::memmap::regions()
        .iter()
        .all(|r| r.1 != odd || before.contains(r)));
    assert!(DmaBuf::alloc(4 << 20).is_ok());
}
