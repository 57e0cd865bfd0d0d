//! Destination locks and queues: manual locks, and the grant of a queue's
//! head (every lock of a stack in one apply).

use std::collections::BTreeSet;

use super::{Ctx, State, DEPLOYMENT_HOLDER_PREFIX, LOCK_PREFIX};
use crate::command::{LockView, Response};
use crate::deploy::DeployState;
use crate::names::{validate_name, validate_text, MAX_REASON_LEN};

impl State {
    pub(super) fn acquire(&mut self, cx: &mut Ctx, destination: &str, holder: &str, reason: &str) -> Response {
        if let Err(e) = validate_name("destination", destination).and_then(|_| validate_text("reason", reason, MAX_REASON_LEN)) {
            return Response::Invalid { reason: e.to_string() };
        }
        if holder.is_empty() {
            return Response::Invalid { reason: "lock holder is empty".into() };
        }
        match self.locks.get(destination) {
            Some(lock) if lock.holder == holder => Response::Granted { lock: lock.clone() },
            // `cargo xtask mutants` builds this refusal away on purpose to
            // show the tests catch a lock granted twice; no other build has it.
            Some(lock) if !cfg!(feature = "mutation-steal-lock") => Response::Held { lock: lock.clone() },
            _ => {
                let lock = LockView {
                    destination: destination.to_string(),
                    holder: holder.to_string(),
                    reason: reason.into(),
                    since_ms: cx.at_ms,
                    fencing_token: cx.seq,
                };
                cx.put(format!("{LOCK_PREFIX}{destination}"), &lock);
                self.locks.insert(destination.to_string(), lock.clone());
                Response::Granted { lock }
            }
        }
    }

    /// Release a manual lock; the next in line on that destination starts.
    pub(super) fn release(&mut self, cx: &mut Ctx, destination: &str, holder: &str) -> Response {
        if let Err(e) = validate_name("destination", destination) {
            return Response::Invalid { reason: e.to_string() };
        }
        match self.locks.get(destination) {
            None => Response::NotHeld { destination: destination.to_string() },
            Some(lock) if lock.holder != holder => Response::NotOwner { lock: lock.clone() },
            Some(_) => {
                self.locks.remove(destination);
                cx.delete(format!("{LOCK_PREFIX}{destination}"));
                self.pump(cx, std::slice::from_ref(&destination.to_string()));
                Response::Released { destination: destination.to_string() }
            }
        }
    }

    /// A deployment moved: when it ended, free its destination (unless a
    /// human must look first) and start the next in line.
    pub(super) fn after_progress(&mut self, cx: &mut Ctx, n: u64) {
        let Some(d) = self.deployments.get(&n) else { return };
        if !d.state.is_terminal() {
            return;
        }
        let dests = d.destinations().to_vec();
        let keeps_lock = d.keeps_destination();
        if keeps_lock {
            return;
        }
        let holder = format!("{DEPLOYMENT_HOLDER_PREFIX}d{n}");
        for dest in &dests {
            if let Some(q) = self.queues.get_mut(dest) {
                q.retain(|x| *x != n);
            }
            self.put_queue(cx, dest);
            if self.locks.get(dest).is_some_and(|l| l.holder == holder) {
                self.locks.remove(dest);
                cx.delete(format!("{LOCK_PREFIX}{dest}"));
            }
        }
        self.pump(cx, &dests);
    }

    /// Start what can start now on `destinations`: a queue head whose
    /// every destination is free and has it at the head too is granted all
    /// its locks in this one apply (fencing token = this request's sequence number).
    pub(super) fn pump(&mut self, cx: &mut Ctx, destinations: &[String]) {
        let (index, at_ms) = (cx.seq, cx.at_ms);
        let mut todo: Vec<String> = destinations.to_vec();
        while let Some(destination) = todo.pop() {
            if self.locks.contains_key(&destination) {
                continue;
            }
            let Some(&n) = self.queues.get(&destination).and_then(|q| q.front()) else { continue };
            let Some(d) = self.deployments.get(&n) else {
                self.queues.get_mut(&destination).map(|q| q.pop_front());
                self.put_queue(cx, &destination);
                todo.push(destination);
                continue;
            };
            if d.state != DeployState::Queued {
                // Defensive: only queued deployments wait in a queue.
                self.queues.get_mut(&destination).map(|q| q.pop_front());
                self.put_queue(cx, &destination);
                todo.push(destination);
                continue;
            }
            let dests = d.destinations().to_vec();
            let ready = dests.iter().all(|x| !self.locks.contains_key(x) && self.queues.get(x).and_then(|q| q.front()) == Some(&n));
            if !ready {
                // It waits for another of its destinations; that one's
                // release pumps it.
                continue;
            }
            let steps = self.plan_for(d);
            let previous = self.current_release(&d.app, &d.destination).map(|p| p.release.clone());
            let bare: Vec<String> = dests.iter().filter(|x| self.nodes_for(x).is_empty()).cloned().collect();
            let Some(d) = self.deployments.get_mut(&n) else { continue };
            d.token = Some(index);
            d.previous_release = previous;
            *d.steps_mut() = steps;
            let node_count: BTreeSet<&str> = d.steps.iter().map(|s| s.plan.node.as_str()).collect();
            let what = if dests.len() > 1 {
                format!("{} destination locks granted in one step", dests.len())
            } else {
                "destination lock granted".into()
            };
            let reason = format!("{what} (fencing token {index}) on {} node(s)", node_count.len());
            let _ = d.transition(DeployState::Running, at_ms, reason, "coordinator");
            if !bare.is_empty() {
                let why = format!("no worker node matches destination `{}` any more; start one, then deploy again", bare.join("`, `"));
                let _ = d.transition(DeployState::Compensating, at_ms, why, "coordinator");
                let _ = d.settle(at_ms, "coordinator");
            } else if !d.targets.is_empty() && d.steps.is_empty() {
                // A catch-up whose servers left before it started: a vanished server is gone.
                let why = format!("server(s) {} left the destination before this started; nothing to deploy", d.targets.join(", "));
                let _ = d.transition(DeployState::Compensating, at_ms, why, "coordinator");
                let _ = d.settle(at_ms, "coordinator");
            }
            let ended = d.state.is_terminal();
            let lock = LockView {
                destination: String::new(),
                holder: format!("{DEPLOYMENT_HOLDER_PREFIX}{}", d.id),
                reason: format!("deploy {}@{}", d.app, d.release).into(),
                since_ms: at_ms,
                fencing_token: index,
            };
            self.put_deployment(cx, n);
            for x in &dests {
                if ended {
                    self.queues.get_mut(x).map(|q| q.pop_front());
                    self.put_queue(cx, x);
                    todo.push(x.clone());
                } else {
                    let lock = LockView { destination: x.clone(), ..lock.clone() };
                    cx.put(format!("{LOCK_PREFIX}{x}"), &lock);
                    self.locks.insert(x.clone(), lock);
                }
            }
        }
    }
}
