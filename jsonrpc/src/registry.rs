//! Method table with SPDK's state and allow-list checks (`lib/rpc/rpc.c`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::rc::{Rc, Weak};

use serde::Deserialize;
use serde_json::Value;

use crate::{decode_params, Responder, RpcError};

/// `SPDK_RPC_STARTUP`: the framework is not initialized yet (`--wait-for-rpc`).
pub const STATE_STARTUP: u32 = 0x1;
/// `SPDK_RPC_RUNTIME`: the framework is initialized.
pub const STATE_RUNTIME: u32 = 0x4;

/// Message for a RUNTIME-only method called in the STARTUP state.
pub const MSG_ONLY_AFTER_INIT: &str =
    "Method may only be called after framework is initialized using framework_start_init RPC.";
/// Message for a STARTUP-only method called after initialization.
pub const MSG_ONLY_BEFORE_INIT: &str =
    "Method may only be called before framework is initialized. \
     Use --wait-for-rpc command line parameter and then issue this RPC before the \
     framework_start_init RPC.";

/// A method handler. It runs on the thread that polls the server and answers
/// through the [`Responder`], now or later.
pub type Handler = Rc<dyn Fn(Option<Value>, Responder)>;

struct Method {
    name: String,
    /// `None` for aliases.
    handler: Option<Handler>,
    state_mask: u32,
    /// Target method name for deprecated aliases.
    alias_of: Option<String>,
    warned: Cell<bool>,
}

struct Table {
    /// In registration order.
    methods: Vec<Method>,
    index: HashMap<String, usize>,
    state: u32,
    allowed: Option<Vec<String>>,
    consistent: bool,
}

impl Table {
    fn is_allowed(&self, name: &str) -> bool {
        match &self.allowed {
            None => true,
            Some(list) => list.iter().any(|m| m == name),
        }
    }

    fn find(&self, name: &str) -> Option<&Method> {
        self.index.get(name).map(|&i| &self.methods[i])
    }

    fn names(&self, current_only: bool, include_aliases: bool) -> Vec<String> {
        // SPDK inserts at the head of its list: newest first.
        self.methods
            .iter()
            .rev()
            .filter(|m| self.is_allowed(&m.name))
            .filter(|m| include_aliases || m.alias_of.is_none())
            .filter(|m| !current_only || (m.state_mask & self.state) == self.state)
            .map(|m| m.name.clone())
            .collect()
    }
}

/// The RPC method table, the current RPC state and the `--rpcs-allowed`
/// list. Single-threaded; the server keeps it in an `Rc<RefCell<_>>` and
/// never holds a borrow while a handler runs, so handlers may change it
/// (e.g. `framework_start_init` calling [`set_state`](Self::set_state)).
///
/// [`Registry::new`] registers `rpc_get_methods` itself.
pub struct Registry {
    table: Rc<RefCell<Table>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.table.borrow();
        f.debug_struct("Registry")
            .field("methods", &t.methods.len())
            .field("state", &t.state)
            .field("allowed", &t.allowed)
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GetMethodsParams {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

impl Registry {
    /// An empty table in the STARTUP state (as SPDK starts), holding only
    /// `rpc_get_methods` (STARTUP | RUNTIME).
    pub fn new() -> Self {
        let table = Rc::new(RefCell::new(Table {
            methods: Vec::new(),
            index: HashMap::new(),
            state: STATE_STARTUP,
            allowed: None,
            consistent: true,
        }));
        let mut reg = Registry { table };
        let weak: Weak<RefCell<Table>> = Rc::downgrade(&reg.table);
        reg.register(
            "rpc_get_methods",
            STATE_STARTUP | STATE_RUNTIME,
            Rc::new(move |params, responder: Responder| {
                let Some(table) = weak.upgrade() else {
                    return responder.err(RpcError::internal("Internal error"));
                };
                let p: GetMethodsParams = match decode_params(params) {
                    Ok(p) => p,
                    Err(_) => return responder.err(RpcError::invalid_params("Invalid parameters")),
                };
                let names = table.borrow().names(p.current, p.include_aliases);
                responder.ok_with(&names);
            }),
        );
        reg
    }

    /// Register `name`, callable in the states of `state_mask`
    /// (`STATE_STARTUP`, `STATE_RUNTIME` or both). A duplicate name is
    /// logged and ignored, and [`verify_methods`](Self::verify_methods)
    /// then returns false (as in SPDK).
    pub fn register(&mut self, name: &str, state_mask: u32, handler: Handler) {
        let mut t = self.table.borrow_mut();
        if t.index.contains_key(name) {
            log::error!("duplicate RPC {name} registered...");
            t.consistent = false;
            return;
        }
        let i = t.methods.len();
        t.methods.push(Method {
            name: name.to_string(),
            handler: Some(handler),
            state_mask,
            alias_of: None,
            warned: Cell::new(false),
        });
        t.index.insert(name.to_string(), i);
    }

    /// Register `alias` as a deprecated alias of `target` (SPDK's
    /// `SPDK_RPC_REGISTER_ALIAS_DEPRECATED`). Calls are forwarded with a
    /// one-time warning; aliases are listed by `rpc_get_methods` only with
    /// `include_aliases`. The target must exist and not be an alias itself.
    pub fn register_alias(&mut self, alias: &str, target: &str) {
        let mut t = self.table.borrow_mut();
        let state_mask = match t.find(target) {
            None => {
                log::error!("cannot create alias {alias} - method {target} does not exist");
                t.consistent = false;
                return;
            }
            Some(m) if m.alias_of.is_some() => {
                log::error!("cannot create alias {alias} of alias {target}");
                t.consistent = false;
                return;
            }
            Some(m) => m.state_mask,
        };
        if t.index.contains_key(alias) {
            log::error!("duplicate RPC {alias} registered...");
            t.consistent = false;
            return;
        }
        let i = t.methods.len();
        t.methods.push(Method {
            name: alias.to_string(),
            handler: None,
            state_mask,
            alias_of: Some(target.to_string()),
            warned: Cell::new(false),
        });
        t.index.insert(alias.to_string(), i);
    }

    /// False if a registration failed (duplicate name, bad alias), like
    /// `spdk_rpc_verify_methods()`.
    pub fn verify_methods(&self) -> bool {
        self.table.borrow().consistent
    }

    /// Set the current RPC state (`STATE_STARTUP` or `STATE_RUNTIME`).
    pub fn set_state(&mut self, state: u32) {
        self.table.borrow_mut().state = state;
    }

    /// The current RPC state.
    pub fn state(&self) -> u32 {
        self.table.borrow().state
    }

    /// Restrict callable (and listed) methods to `methods`
    /// (`--rpcs-allowed`); `None` allows all. A method outside the list
    /// answers "Method not found", as in SPDK.
    pub fn set_allowed(&mut self, methods: Option<Vec<String>>) {
        self.table.borrow_mut().allowed = methods;
    }

    /// Method names as `rpc_get_methods` lists them: newest registration
    /// first (SPDK's list order), allowed ones only, only those callable in
    /// the current state if `current_only`, aliases if `include_aliases`.
    pub fn method_names(&self, current_only: bool, include_aliases: bool) -> Vec<String> {
        self.table.borrow().names(current_only, include_aliases)
    }

    /// `spdk_rpc_is_method_allowed()`: `Ok` if `method` exists, is allowed,
    /// and is callable in every state of `state_mask`; otherwise
    /// `Err(-ENOENT)` (unknown or not allowed) or `Err(-EPERM)` (state).
    pub fn is_method_allowed(&self, method: &str, state_mask: u32) -> Result<(), i32> {
        let t = self.table.borrow();
        if !t.is_allowed(method) {
            return Err(-libc::ENOENT);
        }
        match t.find(method) {
            None => Err(-libc::ENOENT),
            Some(m) if (m.state_mask & state_mask) == state_mask => Ok(()),
            Some(_) => Err(-libc::EPERM),
        }
    }

    /// The state mask `method` was registered with.
    pub fn state_mask(&self, method: &str) -> Option<u32> {
        self.table.borrow().find(method).map(|m| m.state_mask)
    }

    /// Resolve `method` for a call in the current state: the handler to run
    /// (aliases resolved), or the error to send. Holds no borrow afterwards.
    pub fn lookup(&self, method: &str) -> Result<Handler, RpcError> {
        let t = self.table.borrow();
        let m = match t.find(method) {
            Some(m) if t.is_allowed(&m.name) => m,
            _ => return Err(RpcError::method_not_found()),
        };
        let m = match &m.alias_of {
            Some(target) => {
                if !m.warned.replace(true) {
                    log::warn!(
                        "RPC method {} is deprecated.  Use {} instead.",
                        m.name,
                        target
                    );
                }
                t.find(target).ok_or_else(RpcError::method_not_found)?
            }
            None => m,
        };
        if (m.state_mask & t.state) != t.state {
            return Err(RpcError::invalid_state(if t.state == STATE_STARTUP {
                MSG_ONLY_AFTER_INIT
            } else {
                MSG_ONLY_BEFORE_INIT
            }));
        }
        m.handler
            .clone()
            .ok_or_else(|| RpcError::internal("Internal error"))
    }

    /// Run `method` with the state and allow-list checks SPDK applies,
    /// answering errors through `responder`. The handler runs after the
    /// table borrow is released.
    ///
    /// Do not call this through a borrow of a `RefCell<Registry>` if the
    /// handler may borrow that cell mutably; use [`lookup`](Self::lookup)
    /// and release the borrow first (as the server does).
    pub fn dispatch(&self, method: &str, params: Option<Value>, responder: Responder) {
        match self.lookup(method) {
            Ok(handler) => handler(params, responder),
            Err(e) => responder.err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{INVALID_PARAMS, INVALID_STATE, METHOD_NOT_FOUND};
    use serde_json::json;

    fn echo() -> Handler {
        Rc::new(|p: Option<Value>, r: Responder| r.ok(p.unwrap_or(Value::Null)))
    }

    fn call(reg: &Registry, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let (r, rx) = Responder::local(method);
        reg.dispatch(method, params, r);
        rx.try_recv().expect("answered synchronously")
    }

    fn registry() -> Registry {
        let mut reg = Registry::new();
        reg.register("startup_only", STATE_STARTUP, echo());
        reg.register("runtime_only", STATE_RUNTIME, echo());
        reg.register("both", STATE_STARTUP | STATE_RUNTIME, echo());
        reg.register_alias("old_both", "both");
        reg
    }

    #[test]
    fn state_checks() {
        let mut reg = registry();
        assert_eq!(reg.state(), STATE_STARTUP);
        assert_eq!(call(&reg, "startup_only", None), Ok(Value::Null));
        assert_eq!(
            call(&reg, "runtime_only", None),
            Err(RpcError::new(INVALID_STATE, MSG_ONLY_AFTER_INIT))
        );
        reg.set_state(STATE_RUNTIME);
        assert_eq!(
            call(&reg, "startup_only", None),
            Err(RpcError::new(INVALID_STATE, MSG_ONLY_BEFORE_INIT))
        );
        assert_eq!(
            call(&reg, "runtime_only", Some(json!({"a": 1}))),
            Ok(json!({"a": 1}))
        );
        assert_eq!(call(&reg, "old_both", Some(json!([2]))), Ok(json!([2])));
        assert_eq!(call(&reg, "nope", None).unwrap_err().code, METHOD_NOT_FOUND);
    }

    #[test]
    fn get_methods() {
        let mut reg = registry();
        let all = call(&reg, "rpc_get_methods", None).unwrap();
        assert_eq!(
            all,
            json!(["both", "runtime_only", "startup_only", "rpc_get_methods"])
        );
        let cur = call(&reg, "rpc_get_methods", Some(json!({"current": true}))).unwrap();
        assert_eq!(cur, json!(["both", "startup_only", "rpc_get_methods"]));
        let al = call(
            &reg,
            "rpc_get_methods",
            Some(json!({"include_aliases": true})),
        )
        .unwrap();
        assert_eq!(
            al,
            json!([
                "old_both",
                "both",
                "runtime_only",
                "startup_only",
                "rpc_get_methods"
            ])
        );
        for bad in [
            json!({"bogus": 1}),
            json!({"current": "yes"}),
            json!([true]),
        ] {
            assert_eq!(
                call(&reg, "rpc_get_methods", Some(bad)),
                Err(RpcError::new(INVALID_PARAMS, "Invalid parameters"))
            );
        }
        reg.set_state(STATE_RUNTIME);
        let cur = call(&reg, "rpc_get_methods", Some(json!({"current": true}))).unwrap();
        assert_eq!(cur, json!(["both", "runtime_only", "rpc_get_methods"]));
    }

    #[test]
    fn allow_list() {
        let mut reg = registry();
        reg.set_allowed(Some(vec!["both".into(), "rpc_get_methods".into()]));
        assert_eq!(
            call(&reg, "startup_only", None).unwrap_err(),
            RpcError::method_not_found()
        );
        assert_eq!(
            call(&reg, "old_both", None).unwrap_err(),
            RpcError::method_not_found()
        );
        assert_eq!(call(&reg, "both", None), Ok(Value::Null));
        assert_eq!(
            call(&reg, "rpc_get_methods", None).unwrap(),
            json!(["both", "rpc_get_methods"])
        );
        assert_eq!(
            reg.is_method_allowed("startup_only", STATE_STARTUP),
            Err(-libc::ENOENT)
        );
        reg.set_allowed(None);
        assert_eq!(reg.is_method_allowed("startup_only", STATE_STARTUP), Ok(()));
        assert_eq!(
            reg.is_method_allowed("startup_only", STATE_RUNTIME),
            Err(-libc::EPERM)
        );
        assert_eq!(
            reg.is_method_allowed("missing", STATE_RUNTIME),
            Err(-libc::ENOENT)
        );
        assert_eq!(reg.state_mask("runtime_only"), Some(STATE_RUNTIME));
    }

    #[test]
    fn bad_registrations() {
        let mut reg = registry();
        assert!(reg.verify_methods());
        reg.register("both", STATE_RUNTIME, echo());
        assert!(!reg.verify_methods());
        let mut reg = registry();
        reg.register_alias("x", "missing");
        assert!(!reg.verify_methods());
        let mut reg = registry();
        reg.register_alias("y", "old_both");
        assert!(!reg.verify_methods());
        // The original registration stays.
        assert_eq!(reg.state_mask("both"), Some(STATE_STARTUP | STATE_RUNTIME));
    }

    #[test]
    fn handler_may_change_the_registry() {
        let reg = Rc::new(RefCell::new(registry()));
        let r2 = Rc::clone(&reg);
        reg.borrow_mut().register(
            "framework_start_init",
            STATE_STARTUP,
            Rc::new(move |_p, r: Responder| {
                r2.borrow_mut().set_state(STATE_RUNTIME);
                r.ok(json!(true));
            }),
        );
        let h = reg.borrow().lookup("framework_start_init").unwrap();
        let (r, rx) = Responder::local("framework_start_init");
        h(None, r);
        assert_eq!(rx.recv().unwrap(), Ok(json!(true)));
        assert_eq!(reg.borrow().state(), STATE_RUNTIME);
    }
}
