//! A blob's metadata as SPDK lays it out in pages (`blob_serialize` and `blob_serialize_extent_page`): the
//! chain holds FLAGS, then the xattrs, then the internal xattrs, then the extent table (or the RLE extents),
//! each descriptor whole on one page, a new page started when the next one does not fit. The pages come back
//! unlinked (`next` = end); the writer assigns their md pages and links them.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    BlobId, Descriptor, Extent, ExtentTableEntry, Flags, MdPage, Xattr, DESCRIPTORS_LEN,
    DESC_HEADER_LEN, EXTENTS_PER_EP, INVALID_PAGE,
};

/// How a blob's cluster list is stored.
#[derive(Clone, Copy, Debug)]
pub enum Extents<'a> {
    /// An extent table: the blob's size in clusters and the md page of each extent page slot (0 = none);
    /// `pages.len()` is `ceil(num_clusters / 512)`.
    Table {
        /// Size in clusters.
        num_clusters: u64,
        /// Extent page per slot.
        pages: &'a [u32],
    },
    /// RLE runs (see [`rle_runs`]).
    Rle(&'a [Extent]),
}

/// What goes into a blob's chain.
#[derive(Clone, Copy, Debug)]
pub struct BlobMeta<'a> {
    /// The blob.
    pub id: BlobId,
    /// Its flags.
    pub flags: Flags,
    /// User xattrs, in order.
    pub xattrs: &'a [Xattr],
    /// Internal xattrs, in order.
    pub internal_xattrs: &'a [Xattr],
    /// The cluster list.
    pub extents: Extents<'a>,
}

/// Pages being filled.
struct Chain {
    id: BlobId,
    pages: Vec<MdPage>,
    room: usize,
}

impl Chain {
    fn new(id: BlobId) -> Chain {
        let mut c = Chain {
            id,
            pages: Vec::new(),
            room: 0,
        };
        c.add_page();
        c
    }

    fn add_page(&mut self) {
        self.pages.push(MdPage {
            id: self.id,
            sequence_num: self.pages.len() as u32,
            reserved0: 0,
            descriptors: Vec::new(),
            next: INVALID_PAGE,
        });
        self.room = DESCRIPTORS_LEN;
    }

    /// Appends to the current page; the caller made sure it fits.
    fn push(&mut self, d: Descriptor) {
        self.room -= d.encoded_len();
        if let Some(p) = self.pages.last_mut() {
            p.descriptors.push(d);
        }
    }

    fn xattr(&mut self, d: Descriptor) -> Result<()> {
        if d.encoded_len() > self.room {
            self.add_page();
            if d.encoded_len() > self.room {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!(
                        "an xattr of {} bytes does not fit a metadata page",
                        d.encoded_len()
                    ),
                ));
            }
        }
        self.push(d);
        Ok(())
    }
}

/// Size of an extent table or RLE descriptor's fixed part: header plus `num_clusters`, or header plus one run.
const TABLE_FIXED: usize = DESC_HEADER_LEN + 8;
const ENTRY: usize = 8;

/// The chain pages of a blob, as `blob_serialize` fills them.
pub fn serialize(m: &BlobMeta) -> Result<Vec<MdPage>> {
    let mut c = Chain::new(m.id);
    c.push(Descriptor::Flags(m.flags));
    for x in m.xattrs {
        c.xattr(Descriptor::Xattr(x.clone()))?;
    }
    for x in m.internal_xattrs {
        c.xattr(Descriptor::XattrInternal(x.clone()))?;
    }
    match m.extents {
        Extents::Table {
            num_clusters,
            pages,
        } => serialize_table(&mut c, num_clusters, pages),
        Extents::Rle(runs) => serialize_rle(&mut c, runs),
    }
    Ok(c.pages)
}

/// The extent table's entries: one per allocated extent page, unallocated ones merged into runs.
pub fn table_entries(pages: &[u32]) -> Vec<ExtentTableEntry> {
    let mut out: Vec<ExtentTableEntry> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(e) if p == 0 && e.page_idx == 0 => e.num_pages += 1,
            _ => out.push(ExtentTableEntry {
                page_idx: p,
                num_pages: 1,
            }),
        }
    }
    out
}

/// `blob_serialize_extent_table`: pieces of the table, each repeating `num_clusters`, as many entries per page
/// as fit. A blob with no slot gets one piece with no entry, unless the page has no room for even that (then
/// none, as SPDK). Where SPDK would drop a run of unallocated slots cut by a page end (its entry counter is
/// reset with the run half counted), the run is split between the two pieces instead, so the table always
/// has every slot.
fn serialize_table(c: &mut Chain, num_clusters: u64, pages: &[u32]) {
    let mut entries = table_entries(pages).into_iter().peekable();
    if entries.peek().is_none() {
        if c.room >= TABLE_FIXED {
            c.push(Descriptor::ExtentTable {
                num_clusters,
                entries: Vec::new(),
            });
        }
        return;
    }
    while entries.peek().is_some() {
        if c.room < TABLE_FIXED + ENTRY {
            c.add_page();
        }
        let fit = (c.room - TABLE_FIXED) / ENTRY;
        let piece: Vec<ExtentTableEntry> = entries.by_ref().take(fit).collect();
        c.push(Descriptor::ExtentTable {
            num_clusters,
            entries: piece,
        });
    }
}

/// `blob_serialize_extents_rle`: the runs, as many per descriptor as fit, a descriptor per page. A blob of no
/// cluster has no RLE descriptor.
fn serialize_rle(c: &mut Chain, runs: &[Extent]) {
    let mut rest = runs;
    while !rest.is_empty() {
        if c.room < TABLE_FIXED {
            c.add_page();
        }
        let fit = ((c.room - DESC_HEADER_LEN) / ENTRY).min(rest.len());
        c.push(Descriptor::ExtentRle(rest[..fit].to_vec()));
        rest = &rest[fit..];
    }
}

/// The RLE runs of a cluster list (`cluster(i)` = device cluster of blob cluster `i`, 0 = unallocated):
/// consecutive device clusters in one run, unallocated clusters in one run.
pub fn rle_runs(num_clusters: u64, cluster: impl Fn(u64) -> u32) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for i in 0..num_clusters {
        let c = cluster(i);
        if let Some(last) = out.last_mut() {
            let extends = if c == 0 {
                last.cluster_idx == 0
            } else {
                last.cluster_idx != 0 && last.cluster_idx as u64 + last.length as u64 == c as u64
            };
            if extends && last.length < u32::MAX {
                last.length += 1;
                continue;
            }
        }
        out.push(Extent {
            cluster_idx: c,
            length: 1,
        });
    }
    out
}

/// An extent page (`blob_serialize_extent_page`): the device clusters of blob clusters
/// `slot * 512 ..` (`clusters`, at most 512 of them), owned by blob `id`.
pub fn extent_page(id: BlobId, slot: u64, clusters: Vec<u32>) -> MdPage {
    MdPage {
        id,
        sequence_num: 0,
        reserved0: 0,
        descriptors: vec![Descriptor::ExtentPage {
            start_cluster_idx: (slot * EXTENTS_PER_EP) as u32,
            clusters,
        }],
        next: INVALID_PAGE,
    }
}

/// Extent page slots a blob of `num_clusters` clusters has.
pub fn slots(num_clusters: u64) -> u64 {
    num_clusters.div_ceil(EXTENTS_PER_EP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::{spdk_clone_page, spdk_extent_page, spdk_super_blob_page};
    use crate::format::PAGE_SIZE;

    fn xattr_of(page: &MdPage, name: &str) -> Xattr {
        page.descriptors
            .iter()
            .find_map(|d| match d {
                Descriptor::Xattr(x) | Descriptor::XattrInternal(x)
                    if x.name == name.as_bytes() =>
                {
                    Some(x.clone())
                }
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn reproduces_spdk_pages_byte_for_byte() {
        // The lvstore super blob: flags 0x4, uuid and name, an empty extent table.
        let raw = spdk_super_blob_page();
        let spdk = MdPage::decode(&raw).unwrap();
        let ours = serialize(&BlobMeta {
            id: spdk.id,
            flags: Flags {
                invalid: Flags::EXTENT_TABLE,
                ..Default::default()
            },
            xattrs: &[xattr_of(&spdk, "uuid"), xattr_of(&spdk, "name")],
            internal_xattrs: &[],
            extents: Extents::Table {
                num_clusters: 0,
                pages: &[],
            },
        })
        .unwrap();
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].encode().unwrap(), raw);

        // A thin clone: name, uuid, internal SNAP, 3 unallocated clusters.
        let raw = spdk_clone_page();
        let spdk = MdPage::decode(&raw).unwrap();
        let ours = serialize(&BlobMeta {
            id: spdk.id,
            flags: Flags {
                invalid: Flags::THIN_PROV | Flags::INTERNAL_XATTR | Flags::EXTENT_TABLE,
                ..Default::default()
            },
            xattrs: &[xattr_of(&spdk, "name"), xattr_of(&spdk, "uuid")],
            internal_xattrs: &[xattr_of(&spdk, "SNAP")],
            extents: Extents::Table {
                num_clusters: 3,
                pages: &[0],
            },
        })
        .unwrap();
        assert_eq!(ours[0].encode().unwrap(), raw);

        // The snapshot's extent page (its id is the clone's: the snapshot took it over).
        let raw = spdk_extent_page();
        let spdk = MdPage::decode(&raw).unwrap();
        assert_eq!(
            extent_page(spdk.id, 0, vec![1, 2, 3]).encode().unwrap(),
            raw
        );
    }

    #[test]
    fn xattrs_spill_to_new_pages_and_tables_split() {
        let big: Vec<Xattr> = (0..5)
            .map(|i| Xattr::new(format!("x{i}"), vec![i as u8; 1500]))
            .collect();
        // 3000 slots, every third allocated: 2001 entries, more than a page holds.
        let pages: Vec<u32> = (0..3000)
            .map(|i| if i % 3 == 0 { 10 + i } else { 0 })
            .collect();
        let chain = serialize(&BlobMeta {
            id: BlobId::from_page(7),
            flags: Flags::default(),
            xattrs: &big,
            internal_xattrs: &[],
            extents: Extents::Table {
                num_clusters: 3000 * 512,
                pages: &pages,
            },
        })
        .unwrap();
        // Two 1509-byte xattrs per page: pages 0 (flags + 2), 1 (2), 2 (1 + table...).
        let kinds: Vec<Vec<u8>> = chain
            .iter()
            .map(|p| p.descriptors.iter().map(|d| d.kind()).collect())
            .collect();
        assert_eq!(kinds[0], vec![3, 2, 2]);
        assert_eq!(kinds[1], vec![2, 2]);
        assert_eq!(kinds[2][0], 2);
        let mut slots = 0u64;
        for (i, p) in chain.iter().enumerate() {
            assert_eq!(p.sequence_num, i as u32);
            let bytes = p.encode().unwrap();
            assert_eq!(bytes.len(), PAGE_SIZE);
            for d in &p.descriptors {
                if let Descriptor::ExtentTable {
                    num_clusters,
                    entries,
                } = d
                {
                    assert_eq!(*num_clusters, 3000 * 512);
                    slots += entries.iter().map(|e| e.num_pages as u64).sum::<u64>();
                }
            }
        }
        assert_eq!(slots, 3000);
    }

    #[test]
    fn rle_runs_merge_as_spdk() {
        let map = [5, 6, 7, 0, 0, 9, 8, 0];
        let runs = rle_runs(map.len() as u64, |i| map[i as usize]);
        let got: Vec<(u32, u32)> = runs.iter().map(|r| (r.cluster_idx, r.length)).collect();
        assert_eq!(got, vec![(5, 3), (0, 2), (9, 1), (8, 1), (0, 1)]);
        let chain = serialize(&BlobMeta {
            id: BlobId::from_page(1),
            flags: Flags::default(),
            xattrs: &[],
            internal_xattrs: &[],
            extents: Extents::Rle(&runs),
        })
        .unwrap();
        assert_eq!(chain[0].descriptors[1], Descriptor::ExtentRle(runs));
        // No cluster, no RLE descriptor.
        let empty = serialize(&BlobMeta {
            id: BlobId::from_page(1),
            flags: Flags::default(),
            xattrs: &[],
            internal_xattrs: &[],
            extents: Extents::Rle(&[]),
        })
        .unwrap();
        assert_eq!(empty[0].descriptors.len(), 1);
    }
}
