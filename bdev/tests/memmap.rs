//! A malloc bdev's memory is in the memory map from create to destruct.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bdev::modules::malloc;
use reactor::memmap::{MemEvent, MemMap};

#[test]
fn malloc_memory_is_registered_until_destruct() {
    let events: Arc<Mutex<Vec<(MemEvent, usize, usize)>>> = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    // 37 MiB of blocks: mapped (and registered) as 38 MiB, a size nothing else in this test uses.
    let len = 38usize << 20;
    let map = MemMap::new(move |t, ev, addr, len2| {
        e2.lock().unwrap().push((ev, addr, len2));
        // Only this bdev's size: another test of this binary may reuse the address once it is unmapped.
        if ev == MemEvent::Register && len2 == len {
            t.set_translation(addr, len2, 0x77)?;
        }
        Ok(())
    })
    .unwrap();
    let blocks = (37u64 << 20) / 4096;
    let (tx, rx) = mpsc::channel();
    let ev = events.clone();
    reactor::testing::run("0x1", Duration::from_secs(60), move || {
        let b = malloc::create(malloc::MallocOpts {
            name: Some("M_memmap".into()),
            num_blocks: blocks,
            block_size: 4096,
            ..Default::default()
        })
        .unwrap();
        // This bdev's events: those of its size.
        let mine = move || -> Vec<_> {
            ev.lock()
                .unwrap()
                .iter()
                .filter(|e| e.2 == len)
                .copied()
                .collect()
        };
        let regs = mine();
        let keep = b.clone();
        b.unregister(move |r| {
            r.unwrap();
            let after = mine();
            // The handle still exists: the memory is gone from the map anyway.
            drop(keep);
            tx.send((regs, after)).unwrap();
            reactor::stop();
        });
    });
    let (at_create, at_destruct) = rx.recv().unwrap();
    assert_eq!(at_create.len(), 1, "{at_create:?}");
    let (ev, addr, _) = at_create[0];
    assert_eq!(ev, MemEvent::Register);
    assert_eq!(
        at_destruct,
        vec![
            (MemEvent::Register, addr, len),
            (MemEvent::Unregister, addr, len)
        ]
    );
    assert_eq!(map.translate(addr, 4096), None);
    assert!(!reactor::memmap::regions().contains(&(addr, len)));
}

#[test]
fn malloc_memory_translates_while_registered() {
    let (tx, rx) = mpsc::channel();
    reactor::testing::run("0x1", Duration::from_secs(60), move || {
        let map = MemMap::new(|t, ev, addr, len| {
            if ev == MemEvent::Register {
                t.set_linear_translation(addr, len, addr as u64)?;
            }
            Ok(())
        })
        .unwrap();
        let before = reactor::memmap::regions();
        let b = malloc::create(malloc::MallocOpts {
            name: Some("M_memmap2".into()),
            num_blocks: 1000,
            block_size: 512,
            ..Default::default()
        })
        .unwrap();
        let new: Vec<_> = reactor::memmap::regions()
            .into_iter()
            .filter(|r| !before.contains(r))
            .collect();
        // 500 KiB of blocks map (and register) one 2 MiB chunk; every new region translates.
        let ok = new.iter().any(|r| r.1 == 2 << 20)
            && new
                .iter()
                .all(|r| map.translate(r.0 + 512, 1024) == Some((r.0 as u64 + 512, 1024)));
        b.unregister(move |r| {
            r.unwrap();
            tx.send((ok, new)).unwrap();
            reactor::stop();
        });
    });
    let (ok, new) = rx.recv().unwrap();
    assert!(ok, "new regions {new:?}");
}
