//! Hand-over: work of a node that is lost (or no longer selected) moves to
//! another live node of its destination, is skipped, or waits for a node.
//!
//! * A movable step (command destinations) goes to another live node of its
//!   destination, which runs its check first.
//! * A node-bound step (process destinations) of a node lost while other
//!   nodes of its destination carry on is skipped: a vanished server is
//!   gone, not a failed step.
//! * Work with no live node at all to run on (a movable step whose
//!   destination has no live node left, or the steps of a destination whose
//!   every node is lost) waits: nodes reboot. The step is marked
//!   [`NodeWait`] until the destination's `node_wait` (and, going forward,
//!   the deadline) passes; a node registering again takes it up
//!   ([`Deployment::node_back`]); past the bound the leader proposes the
//!   give-up ([`Deployment::give_up_waiting`]) and the work is skipped as
//!   above, which fails the deployment (or, for an undo that must run
//!   somewhere, needs a human).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, UNIX_EPOCH};

use super::{Cursor, DeployError, DeployState, Deployment, Event, LiveNodes, NodeWait, NodeWaits, StepStatus};
use crate::manifest::DEFAULT_NODE_WAIT_MS;

/// How [`Deployment::hand_over`] treats work with no live node to run on.
#[derive(Clone, Copy)]
enum NoNode<'a> {
    /// Wait for a node, each destination for its `node_wait`.
    Wait(&'a NodeWaits),
    /// The wait is over: skip it (today's rule for a vanished server).
    GiveUp,
}

/// `at_ms` as an RFC 3339 time (UTC, seconds); one past the year 9999
/// (which RFC 3339 cannot write) as milliseconds since the epoch.
pub(crate) fn clock(at_ms: i64) -> String {
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    if at_ms >= YEAR_10000_MS {
        return format!("{at_ms} ms after the epoch");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_ms.max(0) as u64)).to_string()
}

/// A span of milliseconds as `2m 3s`.
fn span(ms: i64) -> String {
    humantime::format_duration(Duration::from_millis(ms.max(0) as u64 / 100 * 100)).to_string()
}

impl Deployment {
    /// `node` missed its heartbeat lease. `live` is every destination's
    /// live nodes now (without `node`), `waits` their `node_wait`. What was
    /// left for it is handed over, skipped or waits for a node (see the
    /// module docs). The epoch is bumped when work moves or is skipped, so
    /// anything the lost node still reports is refused; work that waits for
    /// the node keeps its epoch, so the node, back, answers it from its
    /// journal. Returns false when nothing here involved that node.
    pub fn node_lost_with_waits(
        &mut self,
        node: &str,
        at_ms: i64,
        why: &str,
        live: &LiveNodes,
        waits: &NodeWaits,
    ) -> Result<bool, DeployError> {
        if self.state.is_terminal() || self.token.is_none() || !self.steps.iter().any(|s| s.plan.node == node) {
            return Ok(false);
        }
        let cause = format!("node {node} lost ({why})");
        self.hand_over(&cause, at_ms, live, NoNode::Wait(waits))
    }

    /// [`Deployment::node_lost_with_waits`] with every destination's
    /// `node_wait` at its default.
    pub fn node_lost(&mut self, node: &str, at_ms: i64, why: &str, live: &LiveNodes) -> Result<bool, DeployError> {
        self.node_lost_with_waits(node, at_ms, why, live, &NodeWaits::new())
    }

    /// Re-sync with the destinations' membership (after a `resource`
    /// error: the target changed): work left for nodes that are no longer
    /// live or selected is handed over or skipped. It does not wait: a node
    /// that left the destination's selection does not come back by
    /// rebooting (a lost one waits through [`Deployment::node_lost_with_waits`]).
    pub fn resync(&mut self, at_ms: i64, live: &LiveNodes) -> Result<bool, DeployError> {
        if self.state.is_terminal() || self.token.is_none() {
            return Ok(false);
        }
        self.hand_over("re-synced the destination membership after a resource error", at_ms, live, NoNode::GiveUp)
    }

    /// The wait that holds the deployment up now: the step the engine
    /// needs next (or the forward step still in flight while cancelling)
    /// waits for a node. `(step, wait)`.
    pub fn blocking_wait(&self) -> Option<(usize, &NodeWait)> {
        self.blocking_wait_at(&self.cursor())
    }

    /// [`Deployment::blocking_wait`], given the deployment's cursor now.
    pub fn blocking_wait_at(&self, c: &Cursor) -> Option<(usize, &NodeWait)> {
        let i = c.step()?;
        self.steps.get(i).and_then(|s| s.waiting.as_ref()).map(|w| (i, w))
    }

    /// `node` registered again (it is in `live` for the destinations that
    /// select it): work waiting for a node goes on there. Work waiting for
    /// this very node keeps its epoch; the step that may have been in
    /// flight runs its check first. Movable work that waited for another
    /// node is handed over to this one (new epoch, check first). Returns
    /// false when nothing waited for it.
    pub fn node_back(&mut self, node: &str, at_ms: i64, live: &LiveNodes) -> Result<bool, DeployError> {
        if self.state.is_terminal() {
            return Ok(false);
        }
        let mut resumed: Vec<String> = vec![];
        let mut moved: Vec<String> = vec![];
        let mut since = at_ms;
        for i in 0..self.steps.len() {
            let dest = self.step_destination(i).to_string();
            let Some(s) = self.step_mut(i) else { continue };
            let Some(w) = s.waiting.clone() else { continue };
            if !Self::is_live(live, &dest, node) || (s.plan.node != node && !s.plan.movable) {
                continue;
            }
            since = since.min(w.since_ms);
            s.waiting = None;
            let check = if s.check_first { " (check first)" } else { "" };
            if s.plan.node == node {
                resumed.push(format!("`{}`{check}", s.plan.name));
            } else {
                moved.push(format!("`{}` from {} to {node}{check}", s.plan.name, s.plan.node));
                s.plan.node = node.to_string();
            }
        }
        if resumed.is_empty() && moved.is_empty() {
            return Ok(false);
        }
        let mut what = vec![];
        if !resumed.is_empty() {
            what.push(format!("{} go(es) on there", resumed.join(", ")));
        }
        if !moved.is_empty() {
            self.epoch = self.epoch.saturating_add(1);
            what.push(format!("handed over {}; assignment epoch is now {}", moved.join(", "), self.epoch));
        }
        self.events.push(Event {
            at_ms,
            from: Some(self.state),
            to: self.state,
            reason: format!(
                "node {node} registered again after the work waited {}: {}",
                span(at_ms.saturating_sub(since)),
                what.join("; ")
            ),
            actor: "coordinator".into(),
        });
        Ok(true)
    }

    /// The leader saw the bound of [`Deployment::blocking_wait`] pass (at
    /// `at_ms`, by its clock): stop waiting. Every piece of work whose node
    /// is still not live is skipped as for a vanished server, which fails
    /// the deployment (or, when an undo had nowhere to run, needs a human).
    /// Returns false when nothing waits, or the bound has not passed.
    pub fn give_up_waiting(&mut self, at_ms: i64, live: &LiveNodes, waits: &NodeWaits) -> Result<bool, DeployError> {
        let Some((i, w)) = self.blocking_wait() else { return Ok(false) };
        if at_ms < w.until_ms {
            return Ok(false);
        }
        let dest = self.step_destination(i).to_string();
        let node = self.steps.get(i).map(|s| s.plan.node.clone()).unwrap_or_default();
        let node_wait = waits.get(&dest).copied().unwrap_or(DEFAULT_NODE_WAIT_MS) as i64;
        let bound = if w.since_ms.saturating_add(node_wait) > w.until_ms { "the deployment's deadline" } else { "node_wait" };
        let cause = format!(
            "gave up waiting for a node of {dest}: {node}, lost at {}, was not back by {} ({bound})",
            clock(w.since_ms),
            clock(w.until_ms)
        );
        self.hand_over(&cause, at_ms, live, NoNode::GiveUp)
    }

    fn is_live(live: &LiveNodes, destination: &str, node: &str) -> bool {
        live.get(destination).is_some_and(|ns| ns.iter().any(|n| n == node))
    }

    /// Move, skip or hold the work of nodes that are not live; see the module docs.
    fn hand_over(&mut self, cause: &str, at_ms: i64, live: &LiveNodes, no_node: NoNode) -> Result<bool, DeployError> {
        let undoing = matches!(self.state, DeployState::Compensating | DeployState::Cancelling) && self.pending_forward_step().is_none();
        let current = if undoing { self.next().map(|w| w.step) } else { self.steps.iter().position(|s| !s.status.settled_forward()) };
        let deadline_ms = self.deadline_ms;
        let mut moved: Vec<String> = vec![];
        let mut skipped = 0usize;
        let mut stranded: Vec<String> = vec![];
        // destination → (lost nodes, steps, until, node_wait) of work that now waits.
        let mut waiting: BTreeMap<String, (BTreeSet<String>, Vec<String>, i64, u64)> = BTreeMap::new();
        for i in 0..self.steps.len() {
            let dest = self.step_destination(i).to_string();
            let Some(s) = self.step_mut(i) else { continue };
            let affected = if undoing { s.status == StepStatus::Done && s.plan.reversible } else { s.status == StepStatus::Pending };
            if !affected || Self::is_live(live, &dest, &s.plan.node) {
                continue;
            }
            let from = s.plan.node.clone();
            let live_here = live.get(&dest).and_then(|ns| ns.first()).cloned();
            let to = if s.plan.movable { live_here.clone() } else { None };
            // No live node can run it: it waits (a movable step whose
            // destination has none left; any step of a destination whose
            // every node is lost). A lost server among live ones is skipped.
            let wait_for = match no_node {
                NoNode::Wait(waits) if to.is_none() && (s.plan.movable || live_here.is_none()) => Some(waits),
                _ => None,
            };
            // Work already waiting is left exactly as it is: a change here
            // that the caller is not told of (it returns false when nothing
            // else changed) would never be persisted, and a replica rebuilt
            // from its store would differ from one that applied it.
            if to.is_none() && wait_for.is_some() && s.waiting.is_some() {
                continue;
            }
            s.not_before_ms = None;
            match (to, wait_for) {
                (Some(to), _) => {
                    s.check_first = !undoing && current == Some(i);
                    s.waiting = None;
                    moved.push(format!("`{}` from {from} to {to}{}", s.plan.name, if s.check_first { " (check first)" } else { "" }));
                    s.plan.node = to;
                }
                (None, Some(waits)) => {
                    let node_wait = waits.get(&dest).copied().unwrap_or(DEFAULT_NODE_WAIT_MS);
                    let mut until = at_ms.saturating_add(node_wait.min(i64::MAX as u64) as i64);
                    if !undoing {
                        // Going forward the deadline bounds it too;
                        // compensation is never cut short by it.
                        until = until.min(deadline_ms);
                    }
                    s.waiting = Some(NodeWait { since_ms: at_ms, until_ms: until });
                    s.check_first = !undoing && current == Some(i);
                    let e = waiting.entry(dest).or_insert_with(|| (BTreeSet::new(), vec![], until, node_wait));
                    e.0.insert(from);
                    e.1.push(format!("`{}`", s.plan.name));
                    e.2 = e.2.min(until);
                }
                (None, None) => {
                    s.status = StepStatus::Skipped;
                    s.check_first = false;
                    s.waiting = None;
                    s.error = Some(if undoing {
                        format!("not undone: node {from} is gone ({cause})")
                    } else {
                        format!("skipped: node {from} is gone ({cause})")
                    });
                    skipped += 1;
                    if s.plan.movable {
                        stranded.push(format!("`{}` of {dest}", s.plan.name));
                    }
                }
            }
        }
        if moved.is_empty() && skipped == 0 && waiting.is_empty() {
            return Ok(false);
        }
        if !moved.is_empty() || skipped > 0 {
            self.epoch = self.epoch.saturating_add(1);
        }
        let mut what = vec![];
        if !moved.is_empty() {
            what.push(format!("handed over {}", moved.join(", ")));
        }
        if skipped > 0 {
            what.push(if undoing {
                format!("{skipped} completed step(s) could not be undone there")
            } else {
                format!("{skipped} step(s) skipped")
            });
        }
        for (dest, (nodes, steps, until, node_wait)) in &waiting {
            let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let bound = if *until < at_ms.saturating_add(*node_wait as i64) { ", bounded by the deadline" } else { "" };
            what.push(format!(
                "waiting for a node of {dest}: {} lost, {} {} for it (gives up at {}, node_wait {}{bound})",
                nodes.join(", "),
                steps.join(", "),
                if undoing { "must be undone" } else { "wait" },
                clock(*until),
                span(*node_wait as i64)
            ));
        }
        if !moved.is_empty() || skipped > 0 {
            what.push(format!("assignment epoch is now {}", self.epoch));
        }
        self.events.push(Event {
            at_ms,
            from: Some(self.state),
            to: self.state,
            reason: format!("{cause}; {}", what.join("; ")),
            actor: "coordinator".into(),
        });
        // Skipping is for a server that vanished while others carry the
        // release. When a destination has no node left, or a step that
        // must run somewhere has nowhere to go, the release cannot be
        // complete: that is a failure (undone as a whole), never a success.
        // A command destination's change lives outside the node: an undo
        // with no node left to run it is not "undone", a human must look.
        if undoing && !stranded.is_empty() {
            let reason = format!(
                "no live node is left to undo {}; the change it made is still in place: start the node, check the destination, then run `fleetctl resolve {}`",
                stranded.join(", "),
                self.id
            );
            self.transition(DeployState::CompensationFailed, at_ms, reason, "coordinator")?;
            return Ok(true);
        }
        if self.state == DeployState::Running {
            let lost: BTreeSet<&str> = self.skipped_nodes().into_iter().collect();
            let bare: Vec<&String> = self
                .destinations()
                .iter()
                .filter(|d| {
                    !(0..self.steps.len()).any(|i| {
                        self.step_destination(i) == d.as_str() && self.steps.get(i).is_some_and(|s| !lost.contains(s.plan.node.as_str()))
                    })
                })
                .collect();
            let reason = if !stranded.is_empty() {
                Some(format!(
                    "no live node is left to run {}; start a node the destination selects, then deploy again",
                    stranded.join(", ")
                ))
            } else if !bare.is_empty() {
                let names: Vec<&str> = bare.iter().map(|d| d.as_str()).collect();
                Some(format!("every node of {} was lost; nothing was deployed there; start its nodes, then deploy again", names.join(", ")))
            } else {
                None
            };
            if let Some(reason) = reason {
                let reason = if self.destinations().len() > 1 { format!("{reason}; the stack is undone as a whole") } else { reason };
                self.transition(DeployState::Compensating, at_ms, reason, "coordinator")?;
                self.hand_over(cause, at_ms, live, no_node)?;
            }
        } else if !undoing && skipped > 0 && self.pending_forward_step().is_none() {
            // Cancelling, and the forward step that was in flight is now
            // skipped: the undos come next, for the same missing nodes.
            self.hand_over(cause, at_ms, live, no_node)?;
        }
        self.settle(at_ms, "coordinator")?;
        Ok(true)
    }
}
