//! How the filter's two instances in one VM find each other.
//!
//! The filter runs twice per Envoy worker: before the router (the caller's stream: admission,
//! cache, the engine) and, optionally, inside the router as an upstream filter (each of the
//! router's attempts: per-provider rewrites and verdicts, which is what lets a failover be one
//! of the router's own retries, so its answer streams). Both use the same `vm_config`, so
//! Envoy runs them in one VM per worker, and thread-local state is shared by them: the
//! caller-side instance registers its state here, the upstream instance looks it up by the
//! index the request carries in [`crate::filter::FLOW_HEADER`], and says here that it exists
//! (without it, the filter never routes to a failover cluster).

use crate::filter::State;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

/// The filter state of one plugin configuration, shared by its contexts.
pub type Shared = Rc<RefCell<State>>;

thread_local! {
    static STATES: RefCell<Vec<Weak<RefCell<State>>>> = const { RefCell::new(Vec::new()) };
    static UPSTREAM: Cell<bool> = const { Cell::new(false) };
}

/// Registers a caller-side state; returns its index.
pub fn register(state: &Shared) -> usize {
    STATES.with(|s| {
        let mut s = s.borrow_mut();
        // Reuse the slot of a state that is gone (a reconfigured plugin).
        if let Some(i) = s.iter().position(|w| w.strong_count() == 0) {
            if let Some(slot) = s.get_mut(i) {
                *slot = Rc::downgrade(state);
                return i;
            }
        }
        s.push(Rc::downgrade(state));
        s.len() - 1
    })
}

/// The state registered at `index`, if it is still alive.
pub fn lookup(index: usize) -> Option<Shared> {
    STATES.with(|s| s.borrow().get(index).and_then(Weak::upgrade))
}

/// The upstream instance was configured in this VM.
pub fn set_upstream_present() {
    UPSTREAM.with(|u| u.set(true));
}

/// Whether the upstream instance runs in this VM (native failover possible).
pub fn upstream_present() -> bool {
    UPSTREAM.with(Cell::get)
}
