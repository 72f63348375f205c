//! JSON configuration in SPDK's format: loading (replaying each entry as an in-process RPC, in subsystem order,
//! STARTUP-state methods before subsystem init and the rest after) and `save_config`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, TryRecvError};

use jsonrpc::{Registry, Responder, RpcError, STATE_STARTUP};
use serde_json::{json, Value};

/// One `{"method", "params"}` entry of a subsystem's config.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The subsystem it came from.
    pub subsystem: String,
    /// Method name.
    pub method: String,
    /// Params (absent allowed).
    pub params: Option<Value>,
}

/// Parses a config document (`{"subsystems": [{"subsystem": .., "config": [..] | null}]}`) into entries in
/// file order. Errors name what is malformed.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let subs = doc
        .get("subsystems")
        .ok_or("missing \"subsystems\" array")?
        .as_array()
        .ok_or("\"subsystems\" is not an array")?;
    let mut out = vec![];
    for (i, s) in subs.iter().enumerate() {
        let name = s
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("subsystems[{i}]: missing \"subsystem\" name"))?;
        match s.get("config") {
            None | Some(Value::Null) => {}
            Some(Value::Array(entries)) => {
                // Newer SPDK may group entries in batch arrays; they replay in the same order.
                let flat = entries.iter().flat_map(|e| match e {
                    Value::Array(batch) => batch.iter().collect::<Vec<_>>(),
                    one => vec![one],
                });
                for (j, e) in flat.enumerate() {
                    let method = e
                        .get("method")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("{name}.config[{j}]: missing \"method\""))?;
                    if let Some(k) = e
                        .as_object()
                        .and_then(|o| o.keys().find(|k| *k != "method" && *k != "params"))
                    {
                        return Err(format!("{name}.config[{j}]: unexpected key \"{k}\""));
                    }
                    out.push(Entry {
                        subsystem: name.to_string(),
                        method: method.to_string(),
                        params: e.get("params").cloned(),
                    });
                }
            }
            Some(_) => return Err(format!("{name}: \"config\" is not an array")),
        }
    }
    Ok(out)
}

/// Splits entries into those run before subsystem init (methods allowed in STARTUP) and the rest, as SPDK's
/// json_config loader does. Unknown methods go to the second list, where they fail with a clear error.
pub fn split_by_state(reg: &Registry, entries: Vec<Entry>) -> (Vec<Entry>, Vec<Entry>) {
    entries.into_iter().partition(|e| {
        reg.state_mask(&e.method)
            .is_some_and(|m| m & STATE_STARTUP != 0)
    })
}

type Done = Box<dyn FnOnce(Result<(), String>)>;

struct Run {
    reg: Rc<RefCell<Registry>>,
    entries: VecDeque<Entry>,
    ignore_errors: bool,
    done: Option<Done>,
}

/// Replays `entries` in order through `reg` on the current (app) thread, waiting for each answer (handlers may
/// answer later). Stops at the first error unless `ignore_errors`; `done` gets the first error's description.
pub fn apply(
    reg: Rc<RefCell<Registry>>,
    entries: Vec<Entry>,
    ignore_errors: bool,
    done: impl FnOnce(Result<(), String>) + 'static,
) {
    let run = Rc::new(RefCell::new(Run {
        reg,
        entries: entries.into(),
        ignore_errors,
        done: Some(Box::new(done)),
    }));
    step(run);
}

fn step(run: Rc<RefCell<Run>>) {
    let next = run.borrow_mut().entries.pop_front();
    let Some(e) = next else {
        let done = run.borrow_mut().done.take();
        if let Some(d) = done {
            d(Ok(()));
        }
        return;
    };
    log::debug!(
        "config: {} {}",
        e.method,
        e.params.as_ref().map(|p| p.to_string()).unwrap_or_default()
    );
    let (responder, rx) = Responder::local(&e.method);
    let found = run.borrow().reg.borrow().lookup(&e.method);
    match found {
        Ok(h) => h(e.params.clone(), responder),
        Err(err) => responder.err(err),
    }
    wait(run, e, rx);
}

fn wait(run: Rc<RefCell<Run>>, e: Entry, rx: Receiver<Result<Value, RpcError>>) {
    match rx.try_recv() {
        Err(TryRecvError::Empty) => {
            reactor::timer(100, move || wait(run, e, rx)).detach();
        }
        Ok(Ok(_)) => step(run),
        res => {
            let msg = match res {
                Ok(Err(err)) => format!(
                    "{} (subsystem {}): {} ({})",
                    e.method, e.subsystem, err.message, err.code
                ),
                _ => format!("{}: no answer", e.method),
            };
            if run.borrow().ignore_errors {
                log::warn!("ignoring config error: {msg}");
                step(run);
            } else {
                let done = run.borrow_mut().done.take();
                if let Some(d) = done {
                    d(Err(msg));
                }
            }
        }
    }
}

/// The `save_config` document for the given subsystems' configs.
pub fn document(subsystems: Vec<(String, Value)>) -> Value {
    json!({
        "subsystems": subsystems
            .into_iter()
            .map(|(name, config)| json!({"subsystem": name, "config": config}))
            .collect::<Vec<_>>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spdk_config_and_reports_malformed_parts() {
        let e = parse(
            r#"{"subsystems":[{"subsystem":"iobuf","config":[{"method":"iobuf_set_options","params":{"small_pool_count":8192}}]},
                {"subsystem":"scsi","config":null},
                {"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"M","num_blocks":8,"block_size":512}},[{"method":"bdev_wait_for_examine"}]]}]}"#,
        )
        .unwrap();
        let names: Vec<_> = e.iter().map(|e| e.method.as_str()).collect();
        assert_eq!(
            names,
            [
                "iobuf_set_options",
                "bdev_malloc_create",
                "bdev_wait_for_examine"
            ]
        );
        assert!(e[2].params.is_none());
        assert!(parse("{").unwrap_err().contains("invalid JSON"));
        assert!(parse("{}").unwrap_err().contains("subsystems"));
        assert!(parse(r#"{"subsystems":[{"config":[]}]}"#)
            .unwrap_err()
            .contains("subsystem"));
        assert!(
            parse(r#"{"subsystems":[{"subsystem":"bdev","config":{}}]}"#)
                .unwrap_err()
                .contains("not an array")
        );
        assert!(
            parse(r#"{"subsystems":[{"subsystem":"bdev","config":[{"params":{}}]}]}"#)
                .unwrap_err()
                .contains("bdev.config[0]")
        );
        assert!(parse(
            r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"x","parms":{}}]}]}"#
        )
        .unwrap_err()
        .contains("parms"));
    }
}
