//! TLS 1.3 with pre-shared keys for NVMe/TCP, both roles, as SPDK's `ssl` sock speaks it (SPDK v24.05 uses
//! OpenSSL; this is the same protocol in Rust, so the data plane stays one language and links no C library).
//!
//! - [`psk`]: the NVMe key formats and derivations: the interchange text (`NVMeTLSkey-1:XX:...:`), the retained
//!   PSK, the identity `NVMe0R0X <hostnqn> <subnqn>` and the TLS PSK.
//! - [`handshake`]: the handshake messages of a PSK handshake (`psk_dhe_ke` with x25519), encoded and checked.
//! - [`crypto`]: the two suites (`TLS_AES_128_GCM_SHA256`, `TLS_AES_256_GCM_SHA384`), HKDF, record keys.
//! - [`TlsStream`]: a polled connection over a non-blocking socket, what the NVMe/TCP queue pairs of the
//!   initiator and the target read and write through ([`Conn`]: the socket with or without TLS).
//!
//! Only what NVMe/TCP uses is there: no certificates, no session tickets (a server's are read and dropped), no
//! 0-RTT, no HelloRetryRequest (both sides offer x25519, which OpenSSL offers first).

mod conn;
pub mod crypto;
pub mod handshake;
pub mod psk;
mod stream;

pub use conn::Conn;
pub use crypto::Suite;
pub use psk::{ConfiguredPsk, TlsPsk};
pub use stream::{PskLookup, TlsStream};
