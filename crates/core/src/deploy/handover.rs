//! Hand-over: work of a node that is lost (or no longer selected) moves to
//! another live node of its destination, or is skipped.

use std::collections::BTreeSet;

use super::{DeployError, DeployState, Deployment, Event, LiveNodes, StepStatus};

impl Deployment {
    /// `node` missed its heartbeat lease. `live` is every destination's
    /// live nodes now (without `node`). What was left for it is handed
    /// over: a movable step (command destinations) goes to another live
    /// node of its destination, which runs its check first; a node-bound
    /// step (process destinations) is skipped, since a vanished server is
    /// gone, not a failed step. The epoch is bumped so anything the lost
    /// node still reports is refused. Returns false when nothing here
    /// involved that node.
    pub fn node_lost(&mut self, node: &str, at_ms: i64, why: &str, live: &LiveNodes) -> Result<bool, DeployError> {
        if self.state.is_terminal() || self.token.is_none() || !self.steps.iter().any(|s| s.plan.node == node) {
            return Ok(false);
        }
        let cause = format!("node {node} lost ({why})");
        self.hand_over(&cause, at_ms, live)
    }

    /// Re-sync with the destinations' membership (after a `resource`
    /// error: the target changed): work left for nodes that are no longer
    /// live or selected is handed over or skipped as for a lost node.
    pub fn resync(&mut self, at_ms: i64, live: &LiveNodes) -> Result<bool, DeployError> {
        if self.state.is_terminal() || self.token.is_none() {
            return Ok(false);
        }
        self.hand_over("re-synced the destination membership after a resource error", at_ms, live)
    }

    fn is_live(live: &LiveNodes, destination: &str, node: &str) -> bool {
        live.get(destination).is_some_and(|ns| ns.iter().any(|n| n == node))
    }

    /// Move or skip the work of nodes that are not live; see [`Deployment::node_lost`].
    fn hand_over(&mut self, cause: &str, at_ms: i64, live: &LiveNodes) -> Result<bool, DeployError> {
        let undoing = matches!(self.state, DeployState::Compensating | DeployState::Cancelling) && self.pending_forward_step().is_none();
        let current = if undoing { self.next().map(|w| w.step) } else { self.steps.iter().position(|s| !s.status.settled_forward()) };
        let mut moved: Vec<String> = vec![];
        let mut skipped = 0usize;
        let mut stranded: Vec<String> = vec![];
        for i in 0..self.steps.len() {
            let dest = self.step_destination(i).to_string();
            let Some(s) = self.steps.get_mut(i) else { continue };
            let affected = if undoing { s.status == StepStatus::Done && s.plan.reversible } else { s.status == StepStatus::Pending };
            if !affected || Self::is_live(live, &dest, &s.plan.node) {
                continue;
            }
            let from = s.plan.node.clone();
            let to = if s.plan.movable { live.get(&dest).and_then(|ns| ns.first()).cloned() } else { None };
            s.not_before_ms = None;
            match to {
                Some(to) => {
                    s.check_first = !undoing && current == Some(i);
                    moved.push(format!("`{}` from {from} to {to}{}", s.plan.name, if s.check_first { " (check first)" } else { "" }));
                    s.plan.node = to;
                }
                None => {
                    s.status = StepStatus::Skipped;
                    s.check_first = false;
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
        if moved.is_empty() && skipped == 0 {
            return Ok(false);
        }
        self.epoch = self.epoch.saturating_add(1);
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
        self.events.push(Event {
            at_ms,
            from: Some(self.state),
            to: self.state,
            reason: format!("{cause}; {}; assignment epoch is now {}", what.join("; "), self.epoch),
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
                "no live node is left to undo {}; the change it made is still in place: a human must check the destination, then run `fleetctl resolve {}`",
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
                Some(format!("every node of {} was lost; nothing was deployed there", names.join(", ")))
            } else {
                None
            };
            if let Some(reason) = reason {
                let reason = if self.destinations().len() > 1 { format!("{reason}; the stack is undone as a whole") } else { reason };
                self.transition(DeployState::Compensating, at_ms, reason, "coordinator")?;
                self.hand_over(cause, at_ms, live)?;
            }
        }
        self.settle(at_ms, "coordinator")?;
        Ok(true)
    }
}
