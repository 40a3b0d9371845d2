//! How the filter's two instances in one VM find each other.
//!
//! The filter runs twice per Envoy worker: before the router (the caller's stream: admission,
//! cache, the engine) and, optionally, inside the router as an upstream filter (each of the
//! router's attempts: per-provider rewrites and verdicts, which is what lets a failover be one
//! of the router's own retries, so its answer streams). Both use the same `vm_config`, so
//! Envoy runs them in one VM per worker, and thread-local state is shared by them: the
//! caller-side instance registers its state here, and the upstream instance looks it up by the
//! index the request carries in [`crate::routing::FLOW_HEADER`]. (That the upstream instance
//! exists at all is [`crate::proxy::set_upstream_present`], which the host reports.)

use crate::driver::Shared;
use crate::proxy::ProxyWasm;
use crate::state::State;
use std::cell::RefCell;
use std::rc::{Rc, Weak};

thread_local! {
    static STATES: RefCell<Vec<Weak<RefCell<State<ProxyWasm>>>>> = const { RefCell::new(Vec::new()) };
}

/// Registers a caller-side state; returns its index.
pub fn register(state: &Shared<ProxyWasm>) -> usize {
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
pub fn lookup(index: usize) -> Option<Shared<ProxyWasm>> {
    STATES.with(|s| s.borrow().get(index).and_then(Weak::upgrade))
}
