//! SPDK-compatible JSON-RPC 2.0 server over a Unix stream socket.
//!
//! A pure-Rust counterpart of SPDK's `lib/jsonrpc` and `lib/rpc`: the same
//! wire behaviour (unframed JSON values on a stream, batch arrays refused with
//! -32600 as SPDK refuses them, SPDK's error
//! codes and messages, one response per line), the same method table
//! semantics (STARTUP/RUNTIME state masks, `--rpcs-allowed`, deprecated
//! aliases, `rpc_get_methods`), and the same socket lock-file convention.
//!
//! The [`Server`] is driven by polling: the application calls
//! [`Server::poll`] from a poller on its app thread; nothing blocks and the
//! crate starts no threads. Handlers get a [`Responder`], which can be
//! answered later and from any thread. See `DESIGN.md` for the details.
//!
//! ```no_run
//! use std::{cell::RefCell, path::Path, rc::Rc};
//! use jsonrpc::{decode_params, Registry, Responder, Server, STATE_RUNTIME};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Params { name: String }
//!
//! let mut reg = Registry::new();
//! reg.register("hello", STATE_RUNTIME, Rc::new(|params, r: Responder| {
//!     match decode_params::<Params>(params) {
//!         Ok(p) => r.ok(serde_json::json!(format!("hello {}", p.name))),
//!         Err(e) => r.err(e),
//!     }
//! }));
//! reg.set_state(STATE_RUNTIME);
//! let mut server = Server::listen(Path::new("/var/tmp/spdk.sock"), Rc::new(RefCell::new(reg)))?;
//! loop {
//!     server.poll();
//! #   break;
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

mod encode;
mod error;
mod params;
mod registry;
mod request;
mod responder;
mod scanner;
mod server;

pub use encode::{to_ascii_json, AsciiFormatter};
pub use error::{
    strerror, RpcError, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, INVALID_STATE,
    METHOD_NOT_FOUND, NO_RESPONSE_MESSAGE, PARSE_ERROR,
};
pub use params::{decode_params, no_params};
pub use registry::{
    Handler, Registry, MSG_ONLY_AFTER_INIT, MSG_ONLY_BEFORE_INIT, STATE_RUNTIME, STATE_STARTUP,
};
pub use responder::Responder;
pub use scanner::{Scan, Scanner, MAX_DEPTH};
pub use server::{Server, MAX_CONNECTIONS, MAX_PENDING_OUTPUT, MAX_REQUEST_SIZE};
