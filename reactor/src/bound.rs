//! Values bound to the lightweight thread that made them, reachable from elsewhere through a `Send` token.
//!
//! Control-path callbacks are often `Send` (they may complete on another thread) while what they must call
//! back into is not (an `Rc`, a closure capturing thread state). [`OnThread`] keeps such a value on its
//! thread and hands out a token that can travel; using the token runs the code on the value's thread.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::thread::{current, ThreadHandle};

thread_local! {
    static PARKED: RefCell<HashMap<u64, Box<dyn Any>>> = RefCell::new(HashMap::new());
}

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A `T` kept on the thread that created the token. Dropping the token without [`OnThread::with`] leaves the
/// value parked until its thread exits (control path only: nothing on the I/O path parks values).
pub struct OnThread<T> {
    id: u64,
    thread: Option<ThreadHandle>,
    _t: PhantomData<fn() -> T>,
}

impl<T: 'static> OnThread<T> {
    /// Parks `v` on the current thread (off the reactors: on the calling OS thread).
    pub fn new(v: T) -> Self {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        PARKED.with(|p| p.borrow_mut().insert(id, Box::new(v)));
        OnThread {
            id,
            thread: current(),
            _t: PhantomData,
        }
    }

    /// Runs `f` with the value on its thread: now when called there, else by message.
    pub fn with(self, f: impl FnOnce(T) + Send + 'static) {
        let id = self.id;
        let take = move || {
            let v = PARKED.with(|p| p.borrow_mut().remove(&id));
            match v.and_then(|b| b.downcast::<T>().ok()) {
                Some(v) => f(*v),
                None => log::error!("OnThread: value {id} is not on this thread"),
            }
        };
        match &self.thread {
            Some(t) if !t.is_current() => t.send(take),
            _ => take(),
        }
    }
}
