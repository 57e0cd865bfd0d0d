//! The lifecycle: validated transitions, settling when the saga is done,
//! cancelling and a human resolving.

use super::{DeployError, DeployState, Deployment, Event, Resolution, StepStatus};

impl Deployment {
    /// Move to `to`, appending an event; refuses transitions the lifecycle
    /// does not have.
    pub fn transition(&mut self, to: DeployState, at_ms: i64, reason: impl Into<String>, actor: &str) -> Result<(), DeployError> {
        if !self.state.can_become(to) {
            return Err(DeployError::Transition { id: self.id.clone(), from: self.state, to });
        }
        self.events.push(Event { at_ms, from: Some(self.state), to, reason: reason.into(), actor: actor.to_string() });
        self.state = to;
        Ok(())
    }

    /// After progress: finish when nothing is left to do; pause at a
    /// canary's pause step (see `deploy::canary`).
    pub fn settle(&mut self, at_ms: i64, actor: &str) -> Result<(), DeployError> {
        self.lost_canary(at_ms, actor)?;
        self.undo_pauses(at_ms);
        if self.maybe_pause(at_ms, actor)? || self.state == DeployState::Paused {
            return Ok(());
        }
        if self.next().is_some() || (self.state == DeployState::Cancelling && self.pending_forward_step().is_some()) {
            return Ok(());
        }
        match self.state {
            DeployState::Running if self.steps.iter().all(|s| s.status.settled_forward()) => {
                let skipped: Vec<&str> = self.skipped_nodes();
                let reason = if skipped.is_empty() {
                    "every step succeeded".to_string()
                } else {
                    format!("every step succeeded except on lost node(s) {}, where steps were skipped", skipped.join(", "))
                };
                self.transition(DeployState::Succeeded, at_ms, reason, actor)?;
            }
            DeployState::Compensating | DeployState::Cancelling => {
                let blocked = self.steps.iter().rev().find(|s| s.status == StepStatus::Done);
                if let Some(s) = blocked {
                    // Only an irreversible step can stop compensation here.
                    let reason = format!(
                        "step `{}` is irreversible and cannot be undone; a human must check the destination, then run `fleetctl resolve {}`",
                        s.plan.name, self.id
                    );
                    self.transition(DeployState::CompensationFailed, at_ms, reason, actor)?;
                } else {
                    let to = if self.state == DeployState::Compensating { DeployState::Failed } else { DeployState::Cancelled };
                    let skipped = self.skipped_nodes();
                    let reason = if skipped.is_empty() {
                        "every completed step was undone".to_string()
                    } else {
                        format!("every completed step was undone except on lost node(s) {}", skipped.join(", "))
                    };
                    self.transition(to, at_ms, reason, actor)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Ask to cancel. Queued: cancelled at once. Running or paused:
    /// compensate what ran (the in-flight step's result is still awaited).
    pub fn cancel(&mut self, at_ms: i64, reason: &str, actor: &str, timed_out: bool) -> Result<(), DeployError> {
        match self.state {
            DeployState::Queued | DeployState::Running | DeployState::Paused => {
                self.timed_out = timed_out;
                self.transition(DeployState::Cancelling, at_ms, reason, actor)?;
                for s in self.steps_mut() {
                    s.not_before_ms = None;
                }
                self.settle(at_ms, actor)
            }
            from => Err(DeployError::Transition { id: self.id.clone(), from, to: DeployState::Cancelling }),
        }
    }

    pub(super) fn skipped_nodes(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.steps.iter().filter(|s| s.status == StepStatus::Skipped).map(|s| s.plan.node.as_str()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// A human looked at a `compensation_failed` deployment: record it (an
    /// event, the state stays) so the destination can be freed.
    pub fn resolve(&mut self, at_ms: i64, note: &str, actor: &str) -> Result<(), DeployError> {
        if self.state != DeployState::CompensationFailed || self.resolved.is_some() {
            return Err(DeployError::Transition { id: self.id.clone(), from: self.state, to: DeployState::CompensationFailed });
        }
        self.resolved = Some(Resolution { at_ms, by: actor.to_string(), note: note.to_string() });
        self.events.push(Event {
            at_ms,
            from: Some(self.state),
            to: self.state,
            reason: format!("resolved by {actor}: {note}; the destination lock is released"),
            actor: actor.to_string(),
        });
        Ok(())
    }
}
