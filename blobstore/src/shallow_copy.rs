//! Shallow copy (`spdk_bs_blob_shallow_copy`): a read-only blob's own clusters (not its ancestors') copied to
//! another device at the same offsets, one cluster at a time, progress reported per cluster. With a snapshot
//! chain copied this way onto another lvstore's lvols and `set_parent`, a chain can be moved cluster by
//! cluster.

use crate::base::Base;
use crate::error::{Error, ErrorKind, Result};
use crate::format::BlobId;
use crate::runtime::Blobstore;

impl Blobstore {
    /// Copies read-only blob `id`'s allocated clusters to `dst` at their offsets in the blob; `progress` gets
    /// the number copied after each. As SPDK: ReadOnly (EPERM) unless the blob is read-only; Invalid when
    /// `dst` is smaller than the blob or its block size does not divide the store's.
    pub async fn shallow_copy(&self, id: BlobId, dst: &Base, progress: impl Fn(u64)) -> Result<()> {
        let s = &self.0;
        s.check_loaded()?;
        let b = s.blob(id)?;
        let (n, read_only) = {
            let md = b.md.borrow();
            (md.num_clusters, md.flags.data_ro())
        };
        if !read_only {
            return Err(Error::new(
                ErrorKind::NotPermitted,
                format!("blob {id} must be read-only for a shallow copy"),
            ));
        }
        if n * s.cluster_size > dst.size() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("the destination is smaller than blob {id}"),
            ));
        }
        if !s.block_size.is_multiple_of(dst.block_size()) {
            return Err(Error::new(
                ErrorKind::Invalid,
                "the destination's block size does not divide the store's",
            ));
        }
        // A read-only blob's map never changes: no lock needed while copying.
        let clusters = b.shared.map().allocated_clusters();
        for (i, &(c, d)) in clusters.iter().enumerate() {
            let buf = s
                .base
                .read(s.cluster_offset(d), s.cluster_size as usize)
                .await?;
            dst.write(c * s.cluster_size, buf)
                .await
                .map_err(|e| e.context(format!("shallow copy of blob {id}, cluster {c}")))?;
            progress(i as u64 + 1);
        }
        Ok(())
    }
}
