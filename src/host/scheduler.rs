//! Root-driven work for HTTP contexts (native driver, Envoy only): backoffs that end on a tick,
//! and the calls the root dispatched for them. Requests are held weakly: one whose client went
//! away is dropped by the SDK, and its entries lapse instead of acting on a dead stream.

use super::flow::Request;
use std::cell::RefCell;
use std::rc::{Rc, Weak};

pub type Shared = Rc<RefCell<Request>>;
type Held = Weak<RefCell<Request>>;

/// A request to act on later: (when or which call, its context id, the request).
type Entry = (u64, u32, Held);
type CallEntry = (u32, u32, Held);

/// A call the root sends for a request that does not wait for its answer.
pub struct Later {
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// The most calls waiting for the root's next tick: past it a call is dropped (and logged by
/// the caller), so a store that stopped answering cannot make memory grow.
pub const LATER_MAX: usize = 4096;

#[derive(Default)]
pub struct Scheduler {
    wakeups: RefCell<Vec<Entry>>,
    calls: RefCell<Vec<CallEntry>>,
    later: RefCell<Vec<Later>>,
    /// The root's tick is running: it runs only while a wake-up is filed, so an idle worker
    /// is never woken (a 10 ms tick costs a VM call a hundred times a second).
    ticking: std::cell::Cell<bool>,
    /// The plan waits on the tick at all (Envoy with retries).
    tick_allowed: std::cell::Cell<bool>,
}

impl Scheduler {
    /// After a request ran: file its backoff wake-up and, when the root dispatched for it, the
    /// call to route back (calls an HTTP context dispatched itself come back to it).
    pub fn track(&self, context_id: u32, request: &Shared, dispatched_by_root: bool) {
        let Ok(mut req) = request.try_borrow_mut() else {
            return;
        };
        if let Some(at) = req.take_wake() {
            self.wakeups
                .borrow_mut()
                .push((at, context_id, Rc::downgrade(request)));
        }
        if dispatched_by_root {
            if let Some(token) = req.pending_call() {
                self.calls
                    .borrow_mut()
                    .push((token, context_id, Rc::downgrade(request)));
            }
        }
    }

    /// The requests whose backoff has ended by `now`, still alive.
    pub fn due(&self, now: u64) -> Vec<(u32, Shared)> {
        let mut wakeups = self.wakeups.borrow_mut();
        let mut due = Vec::new();
        wakeups.retain(|(at, id, weak)| {
            if *at > now {
                return weak.strong_count() > 0;
            }
            if let Some(req) = weak.upgrade() {
                due.push((*id, req));
            }
            false
        });
        due
    }

    /// The request a root-dispatched call belongs to, if it is still alive.
    pub fn take_call(&self, token: u32) -> Option<(u32, Shared)> {
        let mut calls = self.calls.borrow_mut();
        calls.retain(|(_, _, weak)| weak.strong_count() > 0);
        let i = calls.iter().position(|(t, _, _)| *t == token)?;
        let (_, id, weak) = calls.swap_remove(i);
        weak.upgrade().map(|req| (id, req))
    }

    /// Whether the tick must start (a wake-up is filed and it is not running) or may stop
    /// (nothing is filed): `Some(on)` when the tick should be switched, recorded as done.
    pub fn tick_change(&self) -> Option<bool> {
        let want = self.tick_allowed.get()
            && !(self.wakeups.borrow().is_empty() && self.later.borrow().is_empty());
        (want != self.ticking.get()).then(|| {
            self.ticking.set(want);
            want
        })
    }

    /// Files a call for the root's next tick; `false` when too many are waiting.
    pub fn send_later(&self, call: Later) -> bool {
        let mut later = self.later.borrow_mut();
        if later.len() >= LATER_MAX {
            return false;
        }
        later.push(call);
        true
    }

    /// The calls to send now.
    pub fn take_later(&self) -> Vec<Later> {
        std::mem::take(&mut *self.later.borrow_mut())
    }

    /// Set at configure time: whether the plan waits on the tick.
    pub fn allow_tick(&self, allowed: bool) {
        self.tick_allowed.set(allowed);
    }

    /// The host refused to switch the tick: the state stays as it was.
    pub fn tick_refused(&self, wanted: bool) {
        self.ticking.set(!wanted);
    }

    /// Entries held (bounded by live requests: dead ones are swept on every pass).
    pub fn len(&self) -> usize {
        self.wakeups.borrow().len() + self.calls.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
