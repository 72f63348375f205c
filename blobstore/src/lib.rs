//! SPDK's blobstore and logical volumes: the on-disk format, a loader that reads a whole store (as SPDK's
//! `spdk_tgt` leaves it on a bdev) into a model that can be checked, and the runtime blobstore over a bdev.
//!
//! - [`format`](mod@format): the super block, masks, metadata pages and descriptors, blob ids; byte-exact encode/decode
//!   with every length and CRC checked (no `unsafe`, no panics on forged bytes).
//! - [`device`]: [`ReadAt`], where the bytes come from (a file or memory).
//! - [`store`]: [`Store::load`], the blobs with their flags, xattrs and cluster maps, snapshot/clone links,
//!   and [`Store::rebuild_masks`] for stores that were not unloaded cleanly.
//! - [`check`]: [`Store::check`], masks against metadata, double ownership, parent chains.
//! - [`lvol`]: [`Store::lvol_store`], the lvstore and lvols as SPDK's lvol library sees them.
//!
//! The runtime (on a bdev, on reactor threads):
//! - [`runtime`]: [`runtime::Blobstore`]: init (and lvstore init), load, unload, the allocation masks.
//! - [`blob`]: create, open, close, resize, delete, clone, xattrs, sync; metadata persisted in SPDK's order.
//! - [`snapshot`]: snapshots, deleting a snapshot into its clone, inflate / decouple, and the repair at load
//!   of an interrupted snapshot operation.
//! - [`allocate`]: clusters of thin blobs allocated and filled on first write; [`release`]: given back by
//!   unmap.
//! - [`io`] and [`map`]: the blob I/O path on every thread; [`blob_bdev`]: a bdev over a blob.
//! - [`layout`] and [`serialize`]: a new store's geometry and blob metadata, laid out as SPDK lays them out.
//! - [`exec`] and [`base`]: async metadata operations on the metadata thread, and their base I/O.
//! - [`lvs_bdev`] and [`lvs_rpc`]: the lvol bdev module (lvstores, lvol bdevs, examine) and its `bdev_lvol_*`
//!   RPCs.
//!
//! See DESIGN.md for the design (threads, crash ordering, snapshots) and what is still to come.

pub mod allocate;
pub mod base;
pub mod bitmap;
pub mod blob;
pub mod blob_bdev;
pub mod check;
pub mod device;
pub mod error;
pub mod exec;
pub mod format;
pub mod io;
pub mod layout;
pub mod lvol;
pub mod lvs_bdev;
pub mod lvs_rpc;
pub mod map;
pub mod release;
pub mod runtime;
pub mod serialize;
pub mod shallow_copy;
pub mod snapshot;
pub mod store;

pub use bitmap::Bitmap;
pub use check::Problem;
pub use device::{FileDevice, MemDevice, ReadAt};
pub use error::{Error, ErrorKind, Result};
pub use format::{BlobId, Descriptor, Flags, Mask, MaskType, MdPage, SuperBlock, Xattr};
pub use lvol::{Lvol, LvolStore};
pub use store::{Blob, BrokenBlob, LoadOptions, MaskState, Masks, Parent, PendingOp, Store};
