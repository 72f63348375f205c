//! The application's view of a subsystem (SPDK's `struct spdk_subsystem`): the app registers what it links,
//! initializes the subsystems in order, writes each one's `save_config` section, and finishes them in reverse
//! order at shutdown. Nothing subsystem-specific lives in the app.

use std::path::PathBuf;

use jsonrpc::Registry;
use serde_json::Value;

/// Called once an asynchronous step finished: `Err` carries why init failed.
pub type InitDone = Box<dyn FnOnce(Result<(), String>)>;
/// Called once an asynchronous shutdown step finished.
pub type FiniDone = Box<dyn FnOnce()>;

/// What the application's command line tells subsystems.
#[derive(Clone, Debug, Default)]
pub struct AppEnv {
    /// Directory for vhost-user sockets (`-S`).
    pub vhost_sock_dir: Option<PathBuf>,
}

/// A subsystem the application drives. Every call runs on the app thread.
pub trait Subsystem: Send + Sync {
    /// SPDK's name, as `framework_get_subsystems` and `save_config` use it (`bdev`, `vhost_blk`, ...).
    fn name(&self) -> &'static str;
    /// Registers the subsystem's RPC methods (before any configuration is applied).
    fn register_rpcs(&self, _reg: &mut Registry) {}
    /// Takes the command line's settings (before init).
    fn configure(&self, _env: &AppEnv) {}
    /// Initializes the subsystem (`framework_start_init`); may finish later.
    fn init(&self, done: InitDone) {
        done(Ok(()))
    }
    /// Stops the subsystem at shutdown, after every subsystem that depends on it stopped; may finish later.
    fn fini(&self, done: FiniDone) {
        done()
    }
    /// The subsystem's `save_config` array; `None` leaves the section to the application's defaults.
    fn config_json(&self) -> Option<Value> {
        None
    }
}

/// A step's continuation in [`chain`].
pub type Next<E> = Box<dyn FnOnce(Result<(), E>)>;

/// Runs `step` on each item in turn, each starting when the previous one called back, then `done` (at the
/// first error, straight to `done`).
pub fn chain<T: Clone + 'static, E: 'static>(items: Vec<T>, step: fn(&T, Next<E>), done: Next<E>) {
    fn next<T: Clone + 'static, E: 'static>(
        mut items: std::vec::IntoIter<T>,
        step: fn(&T, Next<E>),
        done: Next<E>,
    ) {
        match items.next() {
            None => done(Ok(())),
            Some(it) => step(
                &it,
                Box::new(move |r| match r {
                    Ok(()) => next(items, step, done),
                    Err(e) => done(Err(e)),
                }),
            ),
        }
    }
    next(items.into_iter(), step, done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn chain_runs_in_order_and_stops_at_the_first_error() {
        thread_local! { static SEEN: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) }; }
        fn step(v: &u32, done: Box<dyn FnOnce(Result<(), String>)>) {
            SEEN.with(|s| s.borrow_mut().push(*v));
            done(if *v == 3 { Err("three".into()) } else { Ok(()) })
        }
        let out = Rc::new(RefCell::new(None));
        let o2 = out.clone();
        chain(
            vec![1, 2, 3, 4],
            step,
            Box::new(move |r| *o2.borrow_mut() = Some(r)),
        );
        assert_eq!(SEEN.with(|s| s.borrow().clone()), vec![1, 2, 3]);
        assert_eq!(out.borrow_mut().take(), Some(Err("three".to_string())));
    }
}
