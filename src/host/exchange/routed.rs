//! A routed request's group through the exchange: named for the route's own attempt, marked
//! down by failed attempts, and failed over on a retry.

use super::Exchange;
use crate::host::headers::name_is;
use crate::host::{Host, Level, Metric};
use crate::plan::Driver;
use crate::retry::Outcome;
use std::rc::Rc;

impl Exchange {
    /// Names the routed group. The native driver's attempt 1 is the route's own request, so it
    /// is pointed at the group (header, and `kong.service.target` on Kong); dispatched attempts
    /// carry the header in any case (a retry replays these headers).
    pub(super) fn name_group(&mut self, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        let (Some(rp), Some(r)) = (plan.routing.as_ref(), self.routed.as_ref()) else {
            return;
        };
        let Some(g) = rp.groups.get(r.group) else {
            return;
        };
        self.headers.push((rp.group_header.clone(), g.name.clone()));
        if self.driver == Driver::Native {
            crate::host::name_group(host, plan.host, &rp.group_header, &g.name, &g.target);
        }
    }

    /// Group health: a failed attempt counts against its group; a good one clears it.
    pub(super) fn note_outcome(&mut self, host: &impl Host, outcome: Outcome) {
        let plan = Rc::clone(&self.plan);
        let (Some(rp), Some(r)) = (plan.routing.as_ref(), self.routed.as_mut()) else {
            return;
        };
        let failed = match outcome {
            Outcome::Status(s) => s >= 500,
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout => true,
        };
        if failed {
            if rp.failed(r.group, host.now_ms()) {
                host.count(Metric::RoutingGroupDown);
                let name = rp.groups.get(r.group).map_or("?", |g| g.name.as_str());
                host.log(Level::Warn, &format!("rollsafe: group {name} marked down"));
            }
            r.tried.push(r.group);
        } else {
            rp.succeeded(r.group);
        }
    }

    /// A retry of a routed request goes to the key's next group that is up and untried.
    pub(super) fn reroute(&mut self, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        let (Some(rp), Some(r)) = (plan.routing.as_ref(), self.routed.as_mut()) else {
            return;
        };
        if r.fixed || r.tried.is_empty() {
            return;
        }
        let next = rp.pick(r.key_hash, host.now_ms(), &r.tried);
        if next == r.group {
            return;
        }
        host.count(Metric::RoutingFailover);
        r.group = next;
        if let Some(g) = rp.groups.get(next) {
            self.target = Some(g.target.clone());
            for (k, v) in self.headers.iter_mut() {
                if name_is(k, &rp.group_header) {
                    *v = g.name.clone();
                }
            }
        }
    }
}
