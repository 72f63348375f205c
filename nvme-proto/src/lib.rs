//! NVMe and NVMe-oF protocol definitions, shared by the NVMe-oF target (`nvmf`), the host library and the PCIe
//! driver, so there is one copy of the specification in the tree.
//!
//! Everything here is plain data: fixed layouts encoded and decoded with explicit little-endian byte offsets
//! (no `unsafe`, no transmutes), so a forged buffer can only produce a value, never undefined behaviour. Decoders
//! take byte slices of any length and say what is wrong with them; encoders write into caller buffers, so the I/O
//! path allocates nothing.
//!
//! - [`auth`]: in-band authentication (DH-HMAC-CHAP): Authentication Send / Receive and their messages.
//! - [`cmd`]: submission queue entries, completion queue entries, opcodes, SGL descriptors.
//! - [`status`]: status code types and codes.
//! - [`fabrics`]: Fabrics commands (Connect, Property Get/Set), Connect data, controller registers.
//! - [`identify`]: Identify controller / namespace / lists / descriptors.
//! - [`log`]: log pages (error, SMART / health, firmware slot, changed namespaces, ANA, discovery).
//! - [`host`]: what host-side queue pairs of every transport take (buffers, direction, refusals).
//! - [`tcp`]: NVMe/TCP PDUs.
//! - [`rdma`]: NVMe/RDMA connection private data and discovery TSAS.
//! - [`crc32c`]: the CRC the TCP digests (and the blobstore) use.
//! - [`keytext`]: the text form of DH-HMAC-CHAP secrets and TLS PSKs.

pub mod auth;
pub mod cmd;
pub mod crc32c;
pub mod fabrics;
pub mod host;
pub mod identify;
pub mod keytext;
pub mod log;
pub mod rdma;
pub mod status;
pub mod tcp;

pub use identify::ProtoError;
