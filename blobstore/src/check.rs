//! The consistency checker: what must hold between a store's masks and its metadata, and between blobs.
//!
//! - every blob loads;
//! - the masks are exactly what the metadata implies: no used page, cluster or blob id left unmarked (SPDK would
//!   hand it out again), none marked without an owner (leaked);
//! - no metadata page and no cluster has two owners; no allocated cluster lies in the metadata clusters or past
//!   the end of the store;
//! - every parent chain ends at an existing, read-only blob, without a cycle;
//! - no snapshot operation was left half done, and the super blob exists.
//!
//! Masks of a store that was not unloaded cleanly are stale by design; [`Store::check`] reports that once and
//! compares nothing until [`Store::rebuild_masks`] has run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::format::{BlobId, MaskType};
use crate::store::{MaskState, PendingOp, Store};

/// One inconsistency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The store was not unloaded cleanly (or has no blobid mask): its masks are stale and were not compared.
    MasksNotTrusted,
    /// A blob whose metadata does not load.
    BadBlob {
        /// The blob.
        blob: BlobId,
        /// Why.
        error: String,
    },
    /// Used according to the metadata, but clear in the mask.
    Unmarked {
        /// Which mask.
        mask: MaskType,
        /// Page or cluster index.
        index: u64,
    },
    /// Set in the mask, but used by nothing (a leak).
    Leaked {
        /// Which mask.
        mask: MaskType,
        /// Page or cluster index.
        index: u64,
    },
    /// A metadata page referenced by two blobs (or twice by one).
    PageOwnedTwice {
        /// The page.
        page: u32,
        /// The first owner.
        first: BlobId,
        /// The second owner.
        second: BlobId,
    },
    /// A cluster allocated to two blobs (or twice to one).
    ClusterOwnedTwice {
        /// The cluster.
        cluster: u32,
        /// The first owner.
        first: BlobId,
        /// The second owner.
        second: BlobId,
    },
    /// An allocated cluster past the end of the store.
    ClusterOutOfRange {
        /// The owner.
        blob: BlobId,
        /// The cluster.
        cluster: u32,
    },
    /// An allocated cluster inside the metadata clusters.
    ClusterInMetadata {
        /// The owner.
        blob: BlobId,
        /// The cluster.
        cluster: u32,
    },
    /// A clone whose parent snapshot did not load or does not exist.
    MissingParent {
        /// The clone.
        blob: BlobId,
        /// The parent it names.
        parent: BlobId,
    },
    /// A clone whose parent can be written (snapshots are read-only).
    ParentNotReadOnly {
        /// The clone.
        blob: BlobId,
        /// The parent.
        parent: BlobId,
    },
    /// Following parents from this blob never ends.
    ParentCycle {
        /// Where the walk started.
        blob: BlobId,
    },
    /// A snapshot creation or deletion a crash interrupted; SPDK finishes or undoes it at load.
    Interrupted {
        /// The blob carrying the marker.
        blob: BlobId,
        /// The operation.
        op: PendingOp,
    },
    /// The super block names a super blob that did not load.
    SuperBlobMissing {
        /// The id it names.
        blob: BlobId,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::MasksNotTrusted => write!(f, "store not unloaded cleanly: masks are stale"),
            Problem::BadBlob { blob, error } => write!(f, "blob {blob} does not load: {error}"),
            Problem::Unmarked { mask, index } => {
                write!(f, "{mask} mask: {index} is used but not marked")
            }
            Problem::Leaked { mask, index } => {
                write!(f, "{mask} mask: {index} is marked but used by nothing")
            }
            Problem::PageOwnedTwice {
                page,
                first,
                second,
            } => write!(
                f,
                "md page {page} belongs to blob {first} and blob {second}"
            ),
            Problem::ClusterOwnedTwice {
                cluster,
                first,
                second,
            } => write!(
                f,
                "cluster {cluster} belongs to blob {first} and blob {second}"
            ),
            Problem::ClusterOutOfRange { blob, cluster } => {
                write!(
                    f,
                    "blob {blob}: cluster {cluster} is past the end of the store"
                )
            }
            Problem::ClusterInMetadata { blob, cluster } => {
                write!(f, "blob {blob}: cluster {cluster} is a metadata cluster")
            }
            Problem::MissingParent { blob, parent } => {
                write!(f, "blob {blob}: parent snapshot {parent} does not exist")
            }
            Problem::ParentNotReadOnly { blob, parent } => {
                write!(f, "blob {blob}: parent {parent} is not read-only")
            }
            Problem::ParentCycle { blob } => {
                write!(f, "blob {blob}: its parent chain does not end")
            }
            Problem::Interrupted { blob, op } => write!(f, "blob {blob}: interrupted {op:?}"),
            Problem::SuperBlobMissing { blob } => write!(f, "super blob {blob} does not exist"),
        }
    }
}

impl Store {
    /// Checks the store; an empty list means consistent.
    pub fn check(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for b in &self.broken {
            out.push(Problem::BadBlob {
                blob: b.id,
                error: b.error.to_string(),
            });
        }
        let sb = &self.super_block;
        if sb.super_blob != BlobId::INVALID && !self.blobs.contains_key(&sb.super_blob) {
            out.push(Problem::SuperBlobMissing {
                blob: sb.super_blob,
            });
        }
        self.check_owners(&mut out);
        self.check_parents(&mut out);
        for b in self.blobs.values() {
            if let Some(op) = b.pending_op() {
                out.push(Problem::Interrupted { blob: b.id, op });
            }
        }
        if self.mask_state == MaskState::Stale {
            out.push(Problem::MasksNotTrusted);
        } else {
            let derived = self.derived_masks();
            for kind in [
                MaskType::UsedPages,
                MaskType::UsedClusters,
                MaskType::UsedBlobIds,
            ] {
                let (want, have) = (derived.get(kind), self.masks.get(kind));
                let w: BTreeSet<u64> = want.ones().collect();
                let h: BTreeSet<u64> = have.ones().collect();
                out.extend(
                    w.difference(&h)
                        .map(|&index| Problem::Unmarked { mask: kind, index }),
                );
                out.extend(
                    h.difference(&w)
                        .map(|&index| Problem::Leaked { mask: kind, index }),
                );
            }
        }
        out
    }

    fn check_owners(&self, out: &mut Vec<Problem>) {
        let total = self.total_clusters();
        let md_clusters = self.md_clusters();
        let mut pages: BTreeMap<u32, BlobId> = BTreeMap::new();
        let mut clusters: BTreeMap<u32, BlobId> = BTreeMap::new();
        let broken = self.broken.iter().map(|b| (b.id, &b.md_pages, None));
        let blobs = self.blobs.values().map(|b| (b.id, &b.md_pages, Some(b)));
        for (id, md_pages, blob) in blobs.chain(broken) {
            let extent = blob
                .into_iter()
                .flat_map(|b| b.extent_pages.iter().map(|&(_, p)| p));
            for p in md_pages.iter().copied().chain(extent) {
                if let Some(&first) = pages.get(&p) {
                    out.push(Problem::PageOwnedTwice {
                        page: p,
                        first,
                        second: id,
                    });
                } else {
                    pages.insert(p, id);
                }
            }
            for &(_, c) in blob.map(|b| b.clusters.as_slice()).unwrap_or_default() {
                if c as u64 >= total {
                    out.push(Problem::ClusterOutOfRange {
                        blob: id,
                        cluster: c,
                    });
                } else if (c as u64) < md_clusters {
                    out.push(Problem::ClusterInMetadata {
                        blob: id,
                        cluster: c,
                    });
                } else if let Some(&first) = clusters.get(&c) {
                    out.push(Problem::ClusterOwnedTwice {
                        cluster: c,
                        first,
                        second: id,
                    });
                } else {
                    clusters.insert(c, id);
                }
            }
        }
    }

    fn check_parents(&self, out: &mut Vec<Problem>) {
        for b in self.blobs.values() {
            let Some(parent) = b.parent_snapshot() else {
                continue;
            };
            match self.blobs.get(&parent) {
                None => out.push(Problem::MissingParent { blob: b.id, parent }),
                Some(p) if !p.read_only() => {
                    out.push(Problem::ParentNotReadOnly { blob: b.id, parent })
                }
                Some(_) => {}
            }
            // A chain longer than the number of blobs revisits one.
            let mut cur = parent;
            let mut steps = 0;
            while let Some(next) = self.blobs.get(&cur).and_then(|p| p.parent_snapshot()) {
                steps += 1;
                if steps > self.blobs.len() {
                    out.push(Problem::ParentCycle { blob: b.id });
                    break;
                }
                cur = next;
            }
        }
    }
}
