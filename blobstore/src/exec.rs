//! Running metadata operations as `async` code on a reactor thread.
//!
//! A metadata operation is a sequence of dependent writes whose order is the crash-consistency contract
//! (extent pages, then the chain's other pages, then its first page, then the old pages zeroed). Written as
//! callbacks that order is hard to read; written as `async fn`s it reads top to bottom. This module is the
//! smallest executor that runs such futures on the lightweight thread that spawned them:
//!
//! - [`spawn`] parks the future in a thread-local slab and polls it once;
//! - its waker sends a message to that thread to poll it again (bdev completions, and replies from other
//!   threads, wake it; a stale wake of a finished task is ignored by generation);
//! - [`oneshot`] turns a callback into a future; [`AsyncMutex`] serializes operations on one blob.
//!
//! Control path only: a task, its wakes and its messages allocate. The I/O path never goes through here.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use reactor::ThreadHandle;

type Task = Pin<Box<dyn Future<Output = ()>>>;

#[derive(Default)]
struct Slab {
    /// (generation, task); the task is taken out while it is polled.
    slots: Vec<(u64, Option<Task>)>,
    free: Vec<usize>,
    next_gen: u64,
}

thread_local! {
    static TASKS: RefCell<Slab> = RefCell::new(Slab::default());
}

struct TaskWaker {
    slot: usize,
    generation: u64,
    thread: Option<ThreadHandle>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        let (slot, generation) = (self.slot, self.generation);
        match &self.thread {
            Some(t) => t.send(move || poll(slot, generation)),
            // Off the reactors (unit tests): poll right away.
            None => poll(slot, generation),
        }
    }
}

/// Runs `fut` to completion on the current thread: polled now, then whenever it is woken.
pub fn spawn(fut: impl Future<Output = ()> + 'static) {
    let (slot, generation) = TASKS.with(|t| {
        let mut t = t.borrow_mut();
        t.next_gen += 1;
        let generation = t.next_gen;
        let task: Task = Box::pin(fut);
        let slot = match t.free.pop() {
            Some(i) => {
                t.slots[i] = (generation, Some(task));
                i
            }
            None => {
                t.slots.push((generation, Some(task)));
                t.slots.len() - 1
            }
        };
        (slot, generation)
    });
    poll(slot, generation);
}

/// Runs `fut` on the current thread and hands its output to `done`.
pub fn spawn_with<T: 'static>(
    fut: impl Future<Output = T> + 'static,
    done: impl FnOnce(T) + 'static,
) {
    spawn(async move { done(fut.await) });
}

fn poll(slot: usize, generation: u64) {
    // `try_with`: a task dropped while the thread exits may wake another; there is nothing left to run then.
    let task = TASKS
        .try_with(|t| {
            let mut t = t.borrow_mut();
            match t.slots.get_mut(slot) {
                Some((g, task)) if *g == generation => task.take(),
                _ => None,
            }
        })
        .ok()
        .flatten();
    // None: finished already, or being polled further up this stack (its wake is served by the message).
    let Some(mut task) = task else { return };
    let waker = Waker::from(Arc::new(TaskWaker {
        slot,
        generation,
        thread: reactor::current(),
    }));
    let mut cx = Context::from_waker(&waker);
    let done = task.as_mut().poll(&mut cx).is_ready();
    let _ = TASKS.try_with(|t| {
        let mut t = t.borrow_mut();
        if done {
            t.slots[slot] = (0, None);
            t.free.push(slot);
        } else {
            t.slots[slot].1 = Some(task);
        }
    });
}

struct OneshotInner<T> {
    value: Option<T>,
    waker: Option<Waker>,
    /// The sender was dropped without sending.
    closed: bool,
}

/// The sending half of [`oneshot`]; same thread only (bdev completions run on the submitting thread).
pub struct Sender<T>(Rc<RefCell<OneshotInner<T>>>);

/// The receiving half: a future of the sent value, or `None` if the sender went away without one.
pub struct Receiver<T>(Rc<RefCell<OneshotInner<T>>>);

/// A one-value channel from a callback to the task waiting for it.
pub fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let inner = Rc::new(RefCell::new(OneshotInner {
        value: None,
        waker: None,
        closed: false,
    }));
    (Sender(inner.clone()), Receiver(inner))
}

impl<T> Sender<T> {
    /// Delivers the value and wakes the receiver.
    pub fn send(self, v: T) {
        let waker = {
            let mut i = self.0.borrow_mut();
            i.value = Some(v);
            i.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut i = self.0.borrow_mut();
            i.closed = true;
            i.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = Option<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut i = self.0.borrow_mut();
        if let Some(v) = i.value.take() {
            return Poll::Ready(Some(v));
        }
        if i.closed {
            return Poll::Ready(None);
        }
        i.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A mutex for tasks of one thread: held across `.await`s, so that one blob's metadata operations run one
/// after the other (as SPDK queues a blob's persists).
#[derive(Default)]
pub struct AsyncMutex {
    locked: Cell<bool>,
    waiters: RefCell<VecDeque<Waker>>,
}

/// Holds an [`AsyncMutex`] until dropped.
pub struct MutexGuard<'a>(&'a AsyncMutex);

impl AsyncMutex {
    /// Waits for the mutex.
    pub async fn lock(&self) -> MutexGuard<'_> {
        std::future::poll_fn(|cx| {
            if !self.locked.get() {
                self.locked.set(true);
                return Poll::Ready(());
            }
            self.waiters.borrow_mut().push_back(cx.waker().clone());
            Poll::Pending
        })
        .await;
        MutexGuard(self)
    }

    /// Whether some task holds it.
    pub fn is_locked(&self) -> bool {
        self.locked.get()
    }
}

impl Drop for MutexGuard<'_> {
    fn drop(&mut self) {
        self.0.locked.set(false);
        // Every waiter polls again; the first to run takes it, the others queue again.
        let waiters: Vec<Waker> = self.0.waiters.borrow_mut().drain(..).collect();
        for w in waiters {
            w.wake();
        }
    }
}

/// Resolves once every future in `futs` has; their outputs in order. For the writes of one step that may
/// go to the device together.
pub async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oneshot_wakes_the_task_and_mutex_serializes() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let m = Rc::new(AsyncMutex::default());
        let (tx, rx) = oneshot::<u32>();
        let (l1, m1) = (log.clone(), m.clone());
        spawn(async move {
            let _g = m1.lock().await;
            l1.borrow_mut().push("a locked");
            let v = rx.await;
            l1.borrow_mut()
                .push(if v == Some(7) { "a got 7" } else { "a got ?" });
        });
        let (l2, m2) = (log.clone(), m.clone());
        spawn(async move {
            let _g = m2.lock().await;
            l2.borrow_mut().push("b locked");
        });
        assert_eq!(*log.borrow(), vec!["a locked"]);
        tx.send(7);
        assert_eq!(*log.borrow(), vec!["a locked", "a got 7", "b locked"]);
        assert!(!m.is_locked());
        let (tx, rx) = oneshot::<u32>();
        let l3 = log.clone();
        let closed = oneshot().1;
        spawn(async move {
            let r = join_all(vec![rx, closed]).await;
            l3.borrow_mut()
                .push(if r == vec![None, None] { "closed" } else { "?" });
        });
        drop(tx);
        assert_eq!(log.borrow().last(), Some(&"closed"));
    }
}
