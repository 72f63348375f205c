//! NVMe in-band authentication (DH-HMAC-CHAP) names, shared by `bdev_nvme_set_options` and `nvmf_set_config`:
//! SPDK keeps each list as a bitmask and writes it in this order.

crate::names! {
    /// A hash function (`spdk_nvme_dhchap_get_digest_name()`).
    pub enum Digest {
        /// SHA-256.
        Sha256 = "sha256",
        /// SHA-384.
        Sha384 = "sha384",
        /// SHA-512.
        Sha512 = "sha512",
    }
}

crate::names! {
    /// A Diffie-Hellman group (`spdk_nvme_dhchap_get_dhgroup_name()`).
    pub enum DhGroup {
        /// No Diffie-Hellman exchange.
        Null = "null",
        /// ffdhe2048.
        Ffdhe2048 = "ffdhe2048",
        /// ffdhe3072.
        Ffdhe3072 = "ffdhe3072",
        /// ffdhe4096.
        Ffdhe4096 = "ffdhe4096",
        /// ffdhe6144.
        Ffdhe6144 = "ffdhe6144",
        /// ffdhe8192.
        Ffdhe8192 = "ffdhe8192",
    }
}
