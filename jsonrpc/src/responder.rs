//! [`Responder`]: the handle a method handler uses to answer one request.

use std::fmt;
use std::sync::mpsc::{self, Receiver, Sender};

use serde::Serialize;
use serde_json::Value;

use crate::encode;
use crate::error::{RpcError, NO_RESPONSE_MESSAGE};

/// An answered request on its way back to the server's poll thread.
#[derive(Debug)]
pub(crate) struct Completion {
    /// Connection the request came from.
    pub conn: u64,
    /// Encoded response without trailing newline; `None` when nothing is
    /// sent (a result for a request without id or with a `null` id).
    pub bytes: Option<Vec<u8>>,
    /// Close the connection once this response is written (parse errors).
    pub close_after: bool,
}

enum Target {
    Conn {
        tx: Sender<Completion>,
        conn: u64,
        /// JSON text of the request id; `None` when absent.
        id: Option<String>,
        close_after: bool,
    },
    Local(Sender<Result<Value, RpcError>>),
}

/// Handle used to answer one request.
///
/// It may be answered right away inside the handler or later, from any
/// thread (it is `Send + 'static`): the response travels through a channel
/// to the [`Server`](crate::Server), which writes it on its next
/// [`poll`](crate::Server::poll). If the connection is gone by then, the
/// response is discarded.
///
/// Dropping a `Responder` unanswered sends `-32603 "Internal error: no
/// response"`, so a client never waits forever.
///
/// As in SPDK, a *result* for a request without an id (a notification) or
/// with `"id": null` is not sent, while an *error* is always sent (with
/// `"id": null` when the request had none).
pub struct Responder {
    method: String,
    target: Option<Target>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("method", &self.method)
            .field("answered", &self.target.is_none())
            .finish()
    }
}

impl Responder {
    pub(crate) fn for_conn(
        tx: Sender<Completion>,
        conn: u64,
        id: Option<String>,
        method: String,
        close_after: bool,
    ) -> Self {
        Responder {
            method,
            target: Some(Target::Conn {
                tx,
                conn,
                id,
                close_after,
            }),
        }
    }

    /// A responder not tied to a connection: its answer (or the internal
    /// error sent when it is dropped unanswered) arrives on the returned
    /// receiver. Lets the application call handlers in-process, e.g. when
    /// replaying a JSON configuration, and lets tests drive handlers.
    pub fn local(method: &str) -> (Responder, Receiver<Result<Value, RpcError>>) {
        let (tx, rx) = mpsc::channel();
        (
            Responder {
                method: method.to_string(),
                target: Some(Target::Local(tx)),
            },
            rx,
        )
    }

    /// Name of the method being answered.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Whether a result would be dropped: the request had no id or a `null`
    /// id. Errors are still sent.
    pub fn is_notification(&self) -> bool {
        match &self.target {
            Some(Target::Conn { id, .. }) => !matches!(id.as_deref(), Some(i) if i != "null"),
            _ => false,
        }
    }

    /// Answer with a result.
    pub fn ok(mut self, result: Value) {
        if let Some(Target::Local(tx)) = &self.target {
            let _ = tx.send(Ok(result));
            self.target = None;
            return;
        }
        self.finish_result(&result, || Ok(Value::Null));
    }

    /// Answer with any serializable result, without building a `Value`
    /// first (cheaper for large results). A serialization failure is sent
    /// as an internal error.
    pub fn ok_with<T: Serialize + ?Sized>(mut self, result: &T) {
        self.finish_result(result, || {
            serde_json::to_value(result)
                .map_err(|e| RpcError::internal(format!("Internal error: {e}")))
        });
    }

    /// Answer with an error.
    pub fn err(mut self, error: RpcError) {
        self.finish_error(error);
    }

    /// Answer with a result or an error.
    pub fn respond(self, response: Result<Value, RpcError>) {
        match response {
            Ok(v) => self.ok(v),
            Err(e) => self.err(e),
        }
    }

    fn finish_result<T: Serialize + ?Sized>(
        &mut self,
        result: &T,
        to_value: impl FnOnce() -> Result<Value, RpcError>,
    ) {
        match self.target.take() {
            Some(Target::Conn {
                tx,
                conn,
                id,
                close_after,
            }) => {
                let bytes = match id.as_deref() {
                    None | Some("null") => None,
                    Some(id) => match encode::result_response(id, result) {
                        Ok(b) => Some(b),
                        Err(e) => Some(encode::error_response(
                            Some(id),
                            &RpcError::internal(format!("Internal error: {e}")),
                        )),
                    },
                };
                let _ = tx.send(Completion {
                    conn,
                    bytes,
                    close_after,
                });
            }
            Some(Target::Local(tx)) => {
                let _ = tx.send(to_value());
            }
            None => {}
        }
    }

    fn finish_error(&mut self, error: RpcError) {
        match self.target.take() {
            Some(Target::Conn {
                tx,
                conn,
                id,
                close_after,
            }) => {
                let bytes = Some(encode::error_response(id.as_deref(), &error));
                let _ = tx.send(Completion {
                    conn,
                    bytes,
                    close_after,
                });
            }
            Some(Target::Local(tx)) => {
                let _ = tx.send(Err(error));
            }
            None => {}
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.target.is_some() {
            log::warn!(
                "RPC {}: handler dropped the request unanswered",
                self.method
            );
            self.finish_error(RpcError::internal(NO_RESPONSE_MESSAGE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn assert_send<T: Send + 'static>() {}

    #[test]
    fn responder_is_send() {
        assert_send::<Responder>();
    }

    fn conn_responder(id: Option<&str>) -> (Responder, Receiver<Completion>) {
        let (tx, rx) = mpsc::channel();
        (
            Responder::for_conn(tx, 3, id.map(String::from), "m".into(), false),
            rx,
        )
    }

    fn text(c: Completion) -> Option<String> {
        c.bytes.map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn results_and_errors() {
        let (r, rx) = conn_responder(Some("1"));
        assert!(!r.is_notification());
        r.ok(json!([1]));
        assert_eq!(
            text(rx.recv().unwrap()).unwrap(),
            r#"{"jsonrpc":"2.0","id":1,"result":[1]}"#
        );

        let (r, rx) = conn_responder(None);
        assert!(r.is_notification());
        r.ok(json!(true));
        assert_eq!(text(rx.recv().unwrap()), None);

        let (r, rx) = conn_responder(Some("null"));
        r.ok(json!(true));
        assert_eq!(text(rx.recv().unwrap()), None);

        let (r, rx) = conn_responder(None);
        r.err(RpcError::invalid_params("bad"));
        assert_eq!(
            text(rx.recv().unwrap()).unwrap(),
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32602,"message":"bad"}}"#
        );

        let (r, rx) = conn_responder(Some("\"a\""));
        r.ok_with(&vec!["x", "y"]);
        assert_eq!(
            text(rx.recv().unwrap()).unwrap(),
            r#"{"jsonrpc":"2.0","id":"a","result":["x","y"]}"#
        );
    }

    #[test]
    fn unserializable_result_is_an_internal_error() {
        let bad: std::collections::BTreeMap<Vec<u8>, u32> = [(vec![1u8], 1)].into();
        let (r, rx) = conn_responder(Some("4"));
        r.ok_with(&bad);
        let v: Value = serde_json::from_str(&text(rx.recv().unwrap()).unwrap()).unwrap();
        assert_eq!(v["id"], 4);
        assert_eq!(v["error"]["code"], crate::INTERNAL_ERROR);
        let (r, rx) = Responder::local("m");
        r.ok_with(&bad);
        assert_eq!(rx.recv().unwrap().unwrap_err().code, crate::INTERNAL_ERROR);
    }

    #[test]
    fn dropped_responder_sends_internal_error() {
        let (r, rx) = conn_responder(Some("9"));
        drop(r);
        assert_eq!(
            text(rx.recv().unwrap()).unwrap(),
            r#"{"jsonrpc":"2.0","id":9,"error":{"code":-32603,"message":"Internal error: no response"}}"#
        );
        assert!(rx.try_recv().is_err());

        let (r, rx) = Responder::local("m");
        drop(r);
        assert_eq!(
            rx.recv().unwrap(),
            Err(RpcError::internal(NO_RESPONSE_MESSAGE))
        );
    }

    #[test]
    fn local_responder_from_another_thread() {
        let (r, rx) = Responder::local("m");
        assert_eq!(r.method(), "m");
        std::thread::spawn(move || r.respond(Ok(json!({"k": 1}))))
            .join()
            .unwrap();
        assert_eq!(rx.recv().unwrap(), Ok(json!({"k": 1})));
    }
}
