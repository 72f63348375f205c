//! Prints a blobstore image: super block, blobs, lvstore, and what the checker finds.
//!
//! `cargo run -p blobstore --example dump -- <image or device> [--rebuild]`

use blobstore::{FileDevice, MaskState, Store};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: dump <image> [--rebuild]");
        std::process::exit(2);
    };
    let rebuild = args.any(|a| a == "--rebuild");
    let dev = FileDevice::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut store = Store::load(&dev).unwrap_or_else(|e| panic!("{path}: {e}"));
    if rebuild && store.mask_state == MaskState::Stale {
        store.rebuild_masks();
    }
    println!("{:#?}", store.super_block);
    println!(
        "total clusters {}, metadata clusters {}, free clusters {} (masks {:?})",
        store.total_clusters(),
        store.md_clusters(),
        store.free_clusters(),
        store.mask_state
    );
    for b in store.blobs.values() {
        let xattrs: Vec<String> = b
            .xattrs
            .iter()
            .chain(&b.internal_xattrs)
            .map(|x| {
                format!(
                    "{}={:?}",
                    String::from_utf8_lossy(&x.name),
                    String::from_utf8_lossy(&x.value)
                )
            })
            .collect();
        println!(
            "blob {}: flags {:?}, {:?}, {} clusters ({} allocated), md pages {:?}, extent pages {:?}, parent {:?}, {}",
            b.id,
            b.flags,
            b.extent_format,
            b.num_clusters,
            b.num_allocated_clusters(),
            b.md_pages,
            b.extent_pages,
            b.parent(),
            xattrs.join(" ")
        );
    }
    for b in &store.broken {
        println!("broken blob {}: {}", b.id, b.error);
    }
    match store.lvol_store() {
        Ok(lvs) => println!("{lvs:#?}"),
        Err(e) => println!("no lvstore: {e}"),
    }
    for p in store.check() {
        println!("problem: {p}");
    }
}
