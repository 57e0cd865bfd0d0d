//! The saga engine: from the recorded state alone, which step (or undo)
//! runs next, and recording what a node reported.

use super::{jitter_seed, DeployError, DeployState, Deployment, ErrorClass, StepOutcome, StepStatus, Work};

/// Where the engine stands on a deployment: [`Deployment::next`] and,
/// while it is being cancelled, [`Deployment::pending_forward_step`].
/// Each is a scan of the steps, and the leader's rules ask them several
/// times per decision (`leader::due_among` on every applied result), so
/// they read them from one `Cursor` ([`Deployment::cursor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub next: Option<Work>,
    /// Cancelling only: the forward step that may still be in flight
    /// (its result is awaited before anything is undone).
    pub cancelled_in_flight: Option<usize>,
}

impl Cursor {
    /// The step the deployment is at: the cancelled one still in flight,
    /// else the next to run or undo.
    pub fn step(&self) -> Option<usize> {
        self.cancelled_in_flight.or(self.next.map(|w| w.step))
    }
}

impl Deployment {
    /// [`Deployment::next`] and the step a cancel waits for, in one scan
    /// (two while cancelling).
    pub fn cursor(&self) -> Cursor {
        let cancelled_in_flight = if self.state == DeployState::Cancelling { self.pending_forward_step() } else { None };
        // `next` answers nothing while a cancelled step may run.
        let next = if cancelled_in_flight.is_some() { None } else { self.next() };
        Cursor { next, cancelled_in_flight }
    }

    /// The engine: what runs next, from the recorded state only.
    pub fn next(&self) -> Option<Work> {
        match self.state {
            DeployState::Running => {
                let (i, s) = self.steps.iter().enumerate().find(|(_, s)| !s.status.settled_forward())?;
                // A pause step is never run from `running`: reaching it pauses.
                (s.status == StepStatus::Pending && !s.plan.action.is_pause()).then_some(Work {
                    step: i,
                    undo: false,
                    attempt: s.attempt,
                    not_before_ms: s.not_before_ms,
                })
            }
            DeployState::Paused => {
                // The canary's analysis, if it has one, runs on its node.
                let i = self.pause.as_ref()?.step;
                let s = self.steps.get(i)?;
                (s.status == StepStatus::Pending && s.plan.action.is_sent_pause()).then_some(Work {
                    step: i,
                    undo: false,
                    attempt: s.attempt,
                    not_before_ms: s.not_before_ms,
                })
            }
            DeployState::Compensating | DeployState::Cancelling => {
                if self.pending_forward_step().is_some() {
                    // Its result is awaited first: never undo while a step may run.
                    return None;
                }
                let (i, s) = self.steps.iter().enumerate().rev().find(|(_, s)| s.status == StepStatus::Done)?;
                s.plan.reversible.then_some(Work { step: i, undo: true, attempt: s.undo_attempt, not_before_ms: s.not_before_ms })
            }
            _ => None,
        }
    }

    /// The forward step that may be in flight on a node while the
    /// deployment is being cancelled (its result is still awaited).
    pub fn pending_forward_step(&self) -> Option<usize> {
        if !matches!(self.state, DeployState::Running | DeployState::Cancelling) || self.token.is_none() {
            return None;
        }
        if self.steps.iter().any(|s| matches!(s.status, StepStatus::Failed | StepStatus::Undone | StepStatus::UndoFailed)) {
            return None;
        }
        let (i, s) = self.steps.iter().enumerate().find(|(_, s)| !s.status.settled_forward())?;
        // A pause without analysis is never sent to a node.
        (s.status == StepStatus::Pending && (!s.plan.action.is_pause() || s.plan.action.is_sent_pause())).then_some(i)
    }

    /// The fencing rule, the one staleness test for work of a deployment
    /// (a result being recorded, a step a returning node still runs): it
    /// belongs to the current assignment only when it carries the
    /// deployment's lock token and its current epoch. Any other token or
    /// epoch, older or not, is stale.
    pub fn fence(&self, token: u64, epoch: u64) -> Result<(), DeployError> {
        let stale = |why: String| DeployError::Stale { id: self.id.clone(), why };
        if self.token != Some(token) {
            return Err(stale(format!("token {token} is not the deployment's {:?}", self.token)));
        }
        if self.epoch != epoch {
            return Err(stale(format!("epoch {epoch} is not the current {}", self.epoch)));
        }
        Ok(())
    }

    /// Would [`Deployment::record`] accept this result? (It must pass
    /// [`Deployment::fence`], and its step and attempt must be the ones the
    /// engine expects now.)
    pub fn check(&self, r: &StepOutcome) -> Result<(), DeployError> {
        self.fence(r.token, r.epoch)?;
        let stale = |why: String| DeployError::Stale { id: self.id.clone(), why };
        let expected = if r.undo {
            self.next().filter(|w| w.undo)
        } else if self.state == DeployState::Cancelling {
            // A forward step that was in flight when cancel arrived.
            self.pending_forward_step()
                .and_then(|i| Some(Work { step: i, undo: false, attempt: self.steps.get(i)?.attempt, not_before_ms: None }))
        } else {
            self.next().filter(|w| !w.undo)
        };
        let Some(w) = expected else {
            return Err(stale(format!("no {} is expected in state {}", if r.undo { "undo" } else { "step" }, self.state)));
        };
        if w.step != r.step || w.attempt != r.attempt {
            return Err(stale(format!("expected step {} attempt {}, got step {} attempt {}", w.step, w.attempt, r.step, r.attempt)));
        }
        Ok(())
    }

    /// Record one step result. Returns the state reached (which may be
    /// terminal). Stale results (other token, epoch, step or attempt) are
    /// refused and change nothing.
    pub fn record(&mut self, r: &StepOutcome, at_ms: i64) -> Result<DeployState, DeployError> {
        self.check(r)?;
        if let Some(done) = self.record_pause(r, at_ms) {
            return done;
        }
        let actor = r.node.clone();
        // Noted here, not through `step_mut`: the record is changed
        // while the deployment's other fields are read.
        if r.step < self.steps.len() {
            self.changed.one(r.step);
        }
        let Some(step) = self.steps.get_mut(r.step) else {
            return Err(DeployError::Stale { id: self.id.clone(), why: format!("there is no step {}", r.step) });
        };
        step.check_first = false;
        let class = r.class.unwrap_or(ErrorClass::Invalid);
        let max = step.plan.retry.max_attempts;
        let error_text = || r.error.clone().unwrap_or_else(|| "the step failed without a message".into());
        if !r.ok {
            step.error_class = Some(class);
        }
        if !r.undo {
            step.started_ms = Some(r.started_ms);
            step.finished_ms = Some(r.finished_ms);
            if r.ok {
                step.status = StepStatus::Done;
                step.output = r.output.clone();
                step.error = None;
                step.not_before_ms = None;
            } else if class.retryable() && r.attempt < max && self.state == DeployState::Running {
                step.attempt += 1;
                step.error = Some(error_text());
                let backoff = step.plan.retry.backoff_with_jitter(step.attempt, jitter_seed(&self.id, r.step, step.attempt));
                step.not_before_ms = Some(at_ms.saturating_add(backoff as i64));
                return Ok(self.state);
            } else {
                step.status = StepStatus::Failed;
                step.error = Some(error_text());
                step.not_before_ms = None;
                if self.state == DeployState::Running {
                    let reason = format!("step {} ({}) failed ({} error): {}", r.step + 1, step.plan.name, class.as_str(), error_text());
                    self.transition(DeployState::Compensating, at_ms, reason, &actor)?;
                }
            }
        } else {
            step.undo_started_ms = Some(r.started_ms);
            step.undo_finished_ms = Some(r.finished_ms);
            if r.ok {
                step.status = StepStatus::Undone;
                step.not_before_ms = None;
            } else if class.retryable() && r.attempt < max.max(3) {
                step.undo_attempt += 1;
                step.error = Some(error_text());
                let seed = jitter_seed(&self.id, r.step, step.undo_attempt.saturating_add(1000));
                let backoff = step.plan.retry.backoff_with_jitter(step.undo_attempt, seed);
                step.not_before_ms = Some(at_ms.saturating_add(backoff as i64));
                return Ok(self.state);
            } else {
                step.status = StepStatus::UndoFailed;
                step.error = Some(error_text());
                let reason = format!(
                    "undo of step {} ({}) failed: {}; a human must check the destination, then run `fleetctl resolve {}`",
                    r.step + 1,
                    step.plan.name,
                    error_text(),
                    self.id
                );
                self.transition(DeployState::CompensationFailed, at_ms, reason, &actor)?;
                return Ok(self.state);
            }
        }
        self.settle(at_ms, &actor)?;
        Ok(self.state)
    }

    /// The node that the next piece of work (or the step in flight) needs.
    pub fn node_needed(&self) -> Option<&str> {
        self.node_needed_at(&self.cursor())
    }

    /// [`Deployment::node_needed`], given the deployment's cursor now.
    pub fn node_needed_at(&self, c: &Cursor) -> Option<&str> {
        self.steps.get(c.step()?).map(|s| s.plan.node.as_str())
    }
}
