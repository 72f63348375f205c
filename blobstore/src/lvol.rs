//! The logical volume store view of a blobstore (`lib/lvol/lvol.c`): the store's type tag is "LVOLSTORE", its
//! super blob carries the lvstore's `name` and `uuid` xattrs, and every other blob is an lvol with `name` and
//! `uuid` xattrs. Strings are stored with their NUL; an lvol's name is written as the whole 64-byte buffer at
//! creation and as `strlen + 1` bytes after a rename.

use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{BlobId, ClearMethod, Xattr, BSTYPE_LVOLSTORE};
use crate::store::{Blob, Parent, Store};

/// Longest lvstore name buffer, NUL included (`SPDK_LVS_NAME_MAX`).
pub const LVS_NAME_MAX: usize = 64;
/// Longest lvol name buffer, NUL included (`SPDK_LVOL_NAME_MAX`).
pub const LVOL_NAME_MAX: usize = 64;
/// A UUID string with its NUL (`SPDK_UUID_STRING_LEN`).
pub const UUID_STRING_LEN: usize = 37;

/// An lvstore and its lvols, as SPDK's `lvs_load` sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LvolStore {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: Uuid,
    /// The super blob holding name and uuid.
    pub super_blob: BlobId,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Block size reported by `bdev_lvol_get_lvstores` (the io unit size).
    pub block_size: u32,
    /// Clusters available to lvols.
    pub total_data_clusters: u64,
    /// Free clusters per the store's masks.
    pub free_clusters: u64,
    /// The lvols, in blob id order.
    pub lvols: Vec<Lvol>,
}

/// One lvol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lvol {
    /// Its blob.
    pub blob_id: BlobId,
    /// Name.
    pub name: String,
    /// UUID; `None` when missing or malformed (SPDK then uses a null uuid and [`Lvol::unique_id`]).
    pub uuid: Option<Uuid>,
    /// The uuid string, or `<lvs uuid>_<blob id in decimal>` without one.
    pub unique_id: String,
    /// Size in clusters.
    pub num_clusters: u64,
    /// Allocated clusters.
    pub num_allocated_clusters: u64,
    /// Thin provisioned.
    pub thin: bool,
    /// Read-only (snapshots).
    pub read_only: bool,
    /// Some lvol is a clone of it.
    pub is_snapshot: bool,
    /// Its parent is a snapshot of this store.
    pub is_clone: bool,
    /// Its parent is an external bdev.
    pub is_esnap_clone: bool,
    /// The parent snapshot's blob id.
    pub parent: Option<BlobId>,
    /// The external snapshot's id (for lvols, the bdev's uuid string and NUL).
    pub esnap_id: Option<Vec<u8>>,
    /// Blob ids of its clones, ascending.
    pub clones: Vec<BlobId>,
    /// Stored clear method.
    pub clear_method: ClearMethod,
}

/// A stored string: up to the first NUL (SPDK reads it with `%s`), cut to `max - 1` bytes (the `snprintf`
/// into a `max`-byte buffer), lossy UTF-8.
pub(crate) fn c_string(v: &[u8], max: usize) -> String {
    let n = v
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(v.len())
        .min(max - 1);
    String::from_utf8_lossy(&v[..n]).into_owned()
}

/// A stored UUID string, as `lvs_read_uuid` accepts it: 37 bytes, NUL last, 36-character hyphenated form.
pub(crate) fn parse_uuid(v: Option<&[u8]>) -> Option<Uuid> {
    let v = v?;
    if v.len() != UUID_STRING_LEN || v[UUID_STRING_LEN - 1] != 0 {
        return None;
    }
    let s = std::str::from_utf8(&v[..UUID_STRING_LEN - 1]).ok()?;
    Uuid::try_parse(s).ok()
}

impl Store {
    /// The lvstore on this blobstore, with SPDK's rules: the type tag must be "LVOLSTORE", the super blob must
    /// exist with a valid `uuid` and a `name` of at most 64 bytes, and every other loaded blob must have a
    /// `name` of at most 64 bytes (one that does not fails the whole lvstore load in SPDK).
    pub fn lvol_store(&self) -> Result<LvolStore> {
        let sb = &self.super_block;
        if sb.bstype != BSTYPE_LVOLSTORE {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("store type \"{}\" is not LVOLSTORE", sb.bstype_str()),
            ));
        }
        let sup = self.blobs.get(&sb.super_blob).ok_or_else(|| {
            Error::new(
                ErrorKind::NoEntry,
                format!("lvstore super blob {} not found", sb.super_blob),
            )
        })?;
        let uuid = parse_uuid(sup.xattr("uuid")).ok_or_else(|| {
            Error::corrupt(format!(
                "lvstore super blob {}: missing or bad uuid",
                sup.id
            ))
        })?;
        let name = match sup.xattr("name") {
            Some(v) if v.len() <= LVS_NAME_MAX => c_string(v, LVS_NAME_MAX),
            _ => {
                return Err(Error::corrupt(format!(
                    "lvstore super blob {}: missing or too long name",
                    sup.id
                )))
            }
        };
        let mut lvols = Vec::new();
        for b in self.blobs.values().filter(|b| b.id != sb.super_blob) {
            lvols.push(self.lvol(b, &uuid)?);
        }
        Ok(LvolStore {
            name,
            uuid,
            super_blob: sup.id,
            cluster_size: sb.cluster_size,
            block_size: sb.io_unit(),
            total_data_clusters: self.total_data_clusters(),
            free_clusters: self.free_clusters(),
            lvols,
        })
    }

    fn lvol(&self, b: &Blob, lvs_uuid: &Uuid) -> Result<Lvol> {
        let name = match b.xattr("name") {
            Some(v) if v.len() <= LVOL_NAME_MAX => c_string(v, LVOL_NAME_MAX),
            _ => {
                return Err(Error::corrupt(format!(
                    "lvol blob {}: missing or too long name",
                    b.id
                )))
            }
        };
        let uuid = parse_uuid(b.xattr("uuid"));
        let unique_id = match uuid {
            Some(u) => u.hyphenated().to_string(),
            None => format!("{}_{}", lvs_uuid.hyphenated(), b.id.0),
        };
        let parent = b.parent();
        Ok(Lvol {
            blob_id: b.id,
            name,
            uuid,
            unique_id,
            num_clusters: b.num_clusters,
            num_allocated_clusters: b.num_allocated_clusters(),
            thin: b.thin(),
            read_only: b.read_only(),
            is_snapshot: self.is_snapshot(b.id),
            is_clone: matches!(parent, Some(Parent::Snapshot(_))),
            is_esnap_clone: matches!(parent, Some(Parent::External(_))),
            parent: b.parent_snapshot(),
            esnap_id: match parent {
                Some(Parent::External(id)) => Some(id),
                _ => None,
            },
            clones: self.clones_of(b.id),
            clear_method: b.flags.clear_method(),
        })
    }
}

/// The lvstore super blob's xattrs as `spdk_lvs_init` sets them: `uuid` (lowercase string and NUL), then
/// `name` (`strlen + 1` bytes).
pub fn lvs_xattrs(name: &str, uuid: &Uuid) -> Vec<Xattr> {
    let mut u = uuid.hyphenated().to_string().into_bytes();
    u.push(0);
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    vec![Xattr::new("uuid", u), Xattr::new("name", n)]
}

/// An lvol's xattrs as `spdk_lvol_create` sets them: `name` as the whole 64-byte buffer (NUL padded), then
/// `uuid` (lowercase string and NUL). `name` must be shorter than 64 bytes.
pub fn lvol_xattrs(name: &str, uuid: &Uuid) -> Vec<Xattr> {
    let mut n = vec![0u8; LVOL_NAME_MAX];
    let len = name.len().min(LVOL_NAME_MAX - 1);
    n[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut u = uuid.hyphenated().to_string().into_bytes();
    u.push(0);
    vec![Xattr::new("name", n), Xattr::new("uuid", u)]
}

impl LvolStore {
    /// The lvol called `name`.
    pub fn lvol(&self, name: &str) -> Option<&Lvol> {
        self.lvols.iter().find(|l| l.name == name)
    }

    /// The lvol stored in blob `id`.
    pub fn lvol_by_id(&self, id: BlobId) -> Option<&Lvol> {
        self.lvols.iter().find(|l| l.blob_id == id)
    }
}
