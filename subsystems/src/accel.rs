//! `accel` subsystem: `accel_set_options`, `accel_assign_opc`, `accel_set_driver`, `accel_crypto_key_create`,
//! `accel_crypto_key_destroy` (lib/accel/accel_rpc.c) and the module scans `ioat_scan_accel_module`,
//! `dsa_scan_accel_module`, `iaa_scan_accel_module` (deprecated aliases `*_scan_accel_engine`).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::params::{some, Params};

/// `accel_set_options` parameters and options (`struct spdk_accel_opts`); a call changes the members it gives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct AccelOptions {
    /// Per-channel cache of small iobuf buffers.
    pub small_cache_size: u32,
    /// Per-channel cache of large iobuf buffers.
    pub large_cache_size: u32,
    /// Tasks per channel.
    pub task_count: u32,
    /// Sequences per channel.
    pub sequence_count: u32,
    /// Accel buffers per channel.
    pub buf_count: u32,
}

impl Params for AccelOptions {}

impl Default for AccelOptions {
    /// 128 and 16 cached buffers, 2048 tasks, sequences and buffers.
    fn default() -> Self {
        AccelOptions {
            small_cache_size: 128,
            large_cache_size: 16,
            task_count: 2048,
            sequence_count: 2048,
            buf_count: 2048,
        }
    }
}

crate::names! {
    /// An accel operation (`g_opcode_strings`; v24.05 has the first 15, the `dix_*` ones came later). Saved
    /// assignments are written in this order.
    pub enum Opcode {
        /// Copy.
        Copy = "copy",
        /// Fill.
        Fill = "fill",
        /// Dualcast.
        Dualcast = "dualcast",
        /// Compare.
        Compare = "compare",
        /// CRC-32C.
        Crc32c = "crc32c",
        /// Copy with CRC-32C.
        CopyCrc32c = "copy_crc32c",
        /// Compress.
        Compress = "compress",
        /// Decompress.
        Decompress = "decompress",
        /// Encrypt.
        Encrypt = "encrypt",
        /// Decrypt.
        Decrypt = "decrypt",
        /// XOR.
        Xor = "xor",
        /// DIF verify.
        DifVerify = "dif_verify",
        /// DIF verify with copy.
        DifVerifyCopy = "dif_verify_copy",
        /// DIF generate.
        DifGenerate = "dif_generate",
        /// DIF generate with copy.
        DifGenerateCopy = "dif_generate_copy",
        /// DIX generate (SPDK 24.09+).
        DixGenerate = "dix_generate",
        /// DIX verify (SPDK 24.09+).
        DixVerify = "dix_verify",
    }
}

/// `accel_assign_opc` parameters: a later call for the same operation replaces the module; saved one entry per
/// operation, in [`Opcode`] order. The module name is not checked (there is no module here to find).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct AccelAssignOpc {
    /// Operation.
    pub opname: Opcode,
    /// Module to run it.
    pub module: String,
}

impl Params for AccelAssignOpc {}

/// `accel_set_driver` parameters, saved once set. The driver (`mlx5` in SPDK) is not checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct AccelSetDriver {
    /// Driver name.
    pub name: String,
}

impl Params for AccelSetDriver {}

/// `dsa_scan_accel_module` parameters, saved once called (a second call is `-EALREADY`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct DsaScanAccelModule {
    /// Use the kernel IDXD driver instead of the user-space one.
    pub config_kernel_mode: bool,
}

impl Params for DsaScanAccelModule {}

crate::names! {
    /// How an XTS tweak is derived from the LBA.
    pub enum TweakMode {
        /// The LBA as is.
        SimpleLba = "SIMPLE_LBA",
        /// The LBA joined with its negation.
        JoinNegLbaWithLba = "JOIN_NEG_LBA_WITH_LBA",
        /// The LBA counted in 512-byte units, full width.
        Incr512FullLba = "INCR_512_FULL_LBA",
        /// The LBA counted in 512-byte units, upper half.
        Incr512UpperLba = "INCR_512_UPPER_LBA",
    }
}

/// Ciphers (`SPDK_ACCEL_CIPHER_*`); a cipher name is taken when it starts with one of them, as SPDK compares.
pub const CIPHERS: &[&str] = &["AES_CBC", "AES_XTS"];

/// `accel_crypto_key_create` parameters, saved as given (one entry per key, in the order created).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct AccelCryptoKeyCreate {
    /// Key name, unique.
    pub name: String,
    /// Cipher, see [`CIPHERS`].
    pub cipher: String,
    /// Key, in hex.
    pub key: String,
    /// Second key (XTS), in hex.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub key2: Option<String>,
    /// Tweak mode (XTS).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tweak_mode: Option<TweakMode>,
}

impl Params for AccelCryptoKeyCreate {
    // rpc_accel_dek_create_decoders: cipher, key, key2, tweak_mode, name.
    const REQUIRED: &'static [&'static str] = &["cipher", "key", "name"];
}

impl AccelCryptoKeyCreate {
    /// `spdk_accel_crypto_key_create()`'s checks: a known cipher, keys in hex, a name no key of `existing`
    /// has. Failures answer `-32602 "failed to create DEK, rc <-errno>"`, as the RPC does.
    pub fn check(&self, existing: &[AccelCryptoKeyCreate]) -> Result<(), RpcError> {
        let dek = |rc: i32, why: &str| {
            log::error!("accel_crypto_key_create: {why}");
            RpcError::invalid_params(format!("failed to create DEK, rc {rc}"))
        };
        if !CIPHERS.iter().any(|c| self.cipher.starts_with(c)) {
            return Err(dek(-libc::EINVAL, "Failed to parse cipher"));
        }
        for (k, hex) in [("key", Some(&self.key)), ("key2", self.key2.as_ref())] {
            if let Some(hex) = hex {
                let ok = !hex.is_empty()
                    && hex.len() % 2 == 0
                    && hex.bytes().all(|b| b.is_ascii_hexdigit());
                if !ok {
                    return Err(dek(-libc::EINVAL, &format!("invalid hex {k}")));
                }
            }
        }
        if existing.iter().any(|k| k.name == self.name) {
            return Err(dek(-libc::EEXIST, "key name already exists"));
        }
        Ok(())
    }
}

/// `accel_crypto_key_destroy` parameters; an unknown key is `-32602 "No key object found"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct AccelCryptoKeyDestroy {
    /// Name of the key.
    pub key_name: String,
}

impl Params for AccelCryptoKeyDestroy {}
