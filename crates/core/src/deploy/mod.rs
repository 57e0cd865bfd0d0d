//! A deployment: its lifecycle, its saga's progress and its event log.
//!
//! The lifecycle is a validated state machine; every transition appends an
//! event `{at, from, to, reason, actor}`. The saga engine ([`Deployment::next`])
//! says, from the recorded state alone, which step (or undo) must run next,
//! so any coordinator that becomes leader can continue a saga.
//!
//! ```text
//! queued → running → succeeded
//! running → compensating → failed
//! queued|running → cancelling → cancelled
//! compensating|cancelling → compensation_failed
//! queued → superseded
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manifest::Spec;
use crate::saga::StepPlan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployState {
    Queued,
    Running,
    Compensating,
    Failed,
    Cancelling,
    Cancelled,
    Succeeded,
    CompensationFailed,
    Superseded,
}

impl DeployState {
    pub fn is_terminal(self) -> bool {
        use DeployState::*;
        matches!(self, Failed | Cancelled | Succeeded | CompensationFailed | Superseded)
    }

    /// Does this state hold the destination lock? (From the first step to
    /// the last undo; `compensation_failed` keeps it until a human resolves.)
    pub fn holds_lock(self) -> bool {
        use DeployState::*;
        matches!(self, Running | Compensating | Cancelling | CompensationFailed)
    }

    pub fn can_become(self, to: DeployState) -> bool {
        use DeployState::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelling)
                | (Queued, Superseded)
                | (Running, Succeeded)
                | (Running, Compensating)
                | (Running, Cancelling)
                | (Compensating, Failed)
                | (Compensating, CompensationFailed)
                | (Cancelling, Cancelled)
                | (Cancelling, CompensationFailed)
        )
    }

    pub fn as_str(self) -> &'static str {
        use DeployState::*;
        match self {
            Queued => "queued",
            Running => "running",
            Compensating => "compensating",
            Failed => "failed",
            Cancelling => "cancelling",
            Cancelled => "cancelled",
            Succeeded => "succeeded",
            CompensationFailed => "compensation_failed",
            Superseded => "superseded",
        }
    }
}

impl std::fmt::Display for DeployState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of a deployment's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<DeployState>,
    pub to: DeployState,
    pub reason: String,
    pub actor: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Done,
    Failed,
    Undone,
    UndoFailed,
    /// Its node was lost (missed its heartbeat lease): not run, or not
    /// undone, there. A vanished server is gone, not a failed step.
    Skipped,
}

/// Live nodes per destination (what the state machine's membership says
/// now): the input of [`Deployment::node_lost`] and [`Deployment::resync`].
pub type LiveNodes = BTreeMap<String, Vec<String>>;

impl StepStatus {
    /// Nothing more will happen to this step going forward.
    fn settled_forward(self) -> bool {
        matches!(self, StepStatus::Done | StepStatus::Skipped)
    }
}

/// Error classes, which decide the retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Timeout, connection reset: retry with backoff.
    Transient,
    /// A credential was refused: fail now.
    Auth,
    /// The target changed under us: re-sync, then retry.
    Resource,
    /// The request can never succeed: fail now.
    Invalid,
    /// The step was aborted because the deployment is being cancelled.
    Aborted,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Auth => "auth",
            ErrorClass::Resource => "resource",
            ErrorClass::Invalid => "invalid",
            ErrorClass::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> ErrorClass {
        match s {
            "transient" => ErrorClass::Transient,
            "auth" => ErrorClass::Auth,
            "resource" => ErrorClass::Resource,
            "aborted" => ErrorClass::Aborted,
            _ => ErrorClass::Invalid,
        }
    }
    fn retryable(self) -> bool {
        matches!(self, ErrorClass::Transient | ErrorClass::Resource)
    }
}

/// A step's plan and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    #[serde(flatten)]
    pub plan: StepPlan,
    pub status: StepStatus,
    /// The attempt that runs next / ran last (1-based), forward direction.
    pub attempt: u32,
    /// Same for the undo.
    #[serde(default)]
    pub undo_attempt: u32,
    /// Earliest time the next attempt may start (backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<i64>,
    /// Handed over from a lost node while it may have been running there:
    /// the next node runs the step's check before running it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_first: bool,
    /// Output of the forward run (JSON), which its undo needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Class of the last error (transient, auth, resource, invalid, aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<ErrorClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_started_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_finished_ms: Option<i64>,
}

impl StepRecord {
    pub fn new(plan: StepPlan) -> Self {
        StepRecord {
            plan,
            status: StepStatus::Pending,
            attempt: 1,
            undo_attempt: 1,
            not_before_ms: None,
            check_first: false,
            output: None,
            error: None,
            error_class: None,
            started_ms: None,
            finished_ms: None,
            undo_started_ms: None,
            undo_finished_ms: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub app: String,
    pub release: String,
    pub destination: String,
    pub spec: Spec,
    pub state: DeployState,
    /// Who submitted it (certificate common name).
    pub submitted_by: String,
    pub submitted_ms: i64,
    /// Past this time the leader cancels it (exit 5 for the submitter).
    pub deadline_ms: i64,
    /// Fencing token of the destination lock, once granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// Assignment epoch: steps carry it; a result with another epoch is stale.
    pub epoch: u64,
    /// Release that was current on the destination when this one started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_release: Option<String>,
    /// Set when this deployment is a rollback of another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
    /// The deployment ended because its deadline (or its lock wait) passed.
    #[serde(default)]
    pub timed_out: bool,
    /// Give up if the destination lock is not granted by this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_wait_until_ms: Option<i64>,
    /// Set when a human resolved a `compensation_failed` deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolution>,
    pub steps: Vec<StepRecord>,
    pub events: Vec<Event>,
}

/// A human's note on a deployment that needed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub at_ms: i64,
    pub by: String,
    pub note: String,
}

/// Which step (or undo) must run next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    pub step: usize,
    pub undo: bool,
    pub attempt: u32,
    /// Backoff: not before this time.
    pub not_before_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeployError {
    #[error("deployment {id} cannot go from {from} to {to}")]
    Transition { id: String, from: DeployState, to: DeployState },
    #[error("stale result for deployment {id}: {why}")]
    Stale { id: String, why: String },
}

/// A step's reported outcome, as the leader proposes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub step: usize,
    pub undo: bool,
    pub attempt: u32,
    pub token: u64,
    pub epoch: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<ErrorClass>,
    pub started_ms: i64,
    pub finished_ms: i64,
    /// The node that reported it.
    pub node: String,
}

/// A deterministic seed for a retry's jitter (FNV-1a of id, step, attempt).
fn jitter_seed(id: &str, step: usize, attempt: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes().chain(step.to_le_bytes()).chain(attempt.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Deployment {
    pub fn label(&self) -> String {
        format!("{}@{} → {}", self.app, self.release, self.destinations().join(" + "))
    }

    /// Every destination it deploys to (several for a stack).
    pub fn destinations(&self) -> &[String] {
        self.spec.destinations()
    }

    /// The destination a step works on (records from before stacks have
    /// none: the deployment's only one).
    pub fn step_destination(&self, step: usize) -> &str {
        match self.steps.get(step).map(|s| s.plan.destination.as_str()) {
            Some(d) if !d.is_empty() => d,
            _ => &self.destination,
        }
    }

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

    /// The engine: what runs next, from the recorded state only.
    pub fn next(&self) -> Option<Work> {
        match self.state {
            DeployState::Running => {
                let (i, s) = self.steps.iter().enumerate().find(|(_, s)| !s.status.settled_forward())?;
                (s.status == StepStatus::Pending).then_some(Work { step: i, undo: false, attempt: s.attempt, not_before_ms: s.not_before_ms })
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
        self.steps.iter().position(|s| !s.status.settled_forward()).filter(|i| self.steps[*i].status == StepStatus::Pending)
    }

    /// Would [`Deployment::record`] accept this result? (Token, epoch,
    /// step and attempt must be the ones the engine expects now.)
    pub fn check(&self, r: &StepOutcome) -> Result<(), DeployError> {
        let stale = |why: String| DeployError::Stale { id: self.id.clone(), why };
        if self.token != Some(r.token) {
            return Err(stale(format!("token {} is not the deployment's {:?}", r.token, self.token)));
        }
        if self.epoch != r.epoch {
            return Err(stale(format!("epoch {} is not the current {}", r.epoch, self.epoch)));
        }
        let expected = if r.undo {
            self.next().filter(|w| w.undo)
        } else if self.state == DeployState::Cancelling {
            // A forward step that was in flight when cancel arrived.
            self.pending_forward_step()
                .map(|i| Work { step: i, undo: false, attempt: self.steps[i].attempt, not_before_ms: None })
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
        let actor = r.node.clone();
        let step = &mut self.steps[r.step];
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
                step.not_before_ms = Some(at_ms + step.plan.retry.backoff_with_jitter(step.attempt, jitter_seed(&self.id, r.step, step.attempt)) as i64);
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
                step.not_before_ms = Some(at_ms + step.plan.retry.backoff_with_jitter(step.undo_attempt, jitter_seed(&self.id, r.step, step.undo_attempt + 1000)) as i64);
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

    /// After progress: finish when nothing is left to do.
    pub fn settle(&mut self, at_ms: i64, actor: &str) -> Result<(), DeployError> {
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

    /// Ask to cancel. Queued: cancelled at once. Running: compensate what
    /// ran (the in-flight step's result is still awaited).
    pub fn cancel(&mut self, at_ms: i64, reason: &str, actor: &str, timed_out: bool) -> Result<(), DeployError> {
        match self.state {
            DeployState::Queued | DeployState::Running => {
                self.timed_out = timed_out;
                self.transition(DeployState::Cancelling, at_ms, reason, actor)?;
                for s in &mut self.steps {
                    s.not_before_ms = None;
                }
                self.settle(at_ms, actor)
            }
            from => Err(DeployError::Transition { id: self.id.clone(), from, to: DeployState::Cancelling }),
        }
    }

    fn skipped_nodes(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.steps.iter().filter(|s| s.status == StepStatus::Skipped).map(|s| s.plan.node.as_str()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The node that the next piece of work (or the step in flight) needs.
    pub fn node_needed(&self) -> Option<&str> {
        if let Some(i) = self.pending_forward_step().filter(|_| self.state == DeployState::Cancelling) {
            return Some(&self.steps[i].plan.node);
        }
        self.next().map(|w| self.steps[w.step].plan.node.as_str())
    }

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
            let s = &mut self.steps[i];
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
        self.epoch += 1;
        let mut what = vec![];
        if !moved.is_empty() {
            what.push(format!("handed over {}", moved.join(", ")));
        }
        if skipped > 0 {
            what.push(if undoing { format!("{skipped} completed step(s) could not be undone there") } else { format!("{skipped} step(s) skipped") });
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
                .filter(|d| !(0..self.steps.len()).any(|i| self.step_destination(i) == d.as_str() && !lost.contains(self.steps[i].plan.node.as_str())))
                .collect();
            let reason = if !stranded.is_empty() {
                Some(format!("no live node is left to run {}; start a node the destination selects, then deploy again", stranded.join(", ")))
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

    /// Does it still hold (or wait for) its destination's lock?
    pub fn keeps_destination(&self) -> bool {
        !self.state.is_terminal() || (self.state == DeployState::CompensationFailed && self.resolved.is_none())
    }

    /// The exit code `fleetctl deploy/watch` reports for this state.
    pub fn exit_code(&self) -> Option<u8> {
        use DeployState::*;
        Some(match self.state {
            Succeeded => 0,
            Failed => 3,
            Cancelled if self.timed_out => 5,
            Cancelled | Superseded => 4,
            CompensationFailed => 6,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{parse_manifest, Overrides};
    use crate::saga::plan;

    fn deployment(nodes: &[&str]) -> Deployment {
        let spec = parse_manifest(
            "f",
            "app: web\nrelease: v2\ndestination: d\nrun: [srv]\nhealth: { tcp: true }\nretry: { max_attempts: 2 }\n",
            &Overrides::default(),
        )
        .unwrap();
        let nodes: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
        let steps = plan(&spec, "d", &nodes).into_iter().map(StepRecord::new).collect();
        Deployment {
            id: "d1".into(),
            app: "web".into(),
            release: "v2".into(),
            destination: "d".into(),
            spec,
            state: DeployState::Queued,
            submitted_by: "op".into(),
            submitted_ms: 0,
            deadline_ms: 1_000_000,
            token: None,
            epoch: 1,
            previous_release: None,
            rollback_of: None,
            timed_out: false,
            lock_wait_until_ms: None,
            resolved: None,
            steps,
            events: vec![],
        }
    }

    /// Destination `d` has these live nodes.
    fn live(nodes: &[&str]) -> LiveNodes {
        [("d".to_string(), nodes.iter().map(|s| s.to_string()).collect())].into()
    }

    fn started(nodes: &[&str]) -> Deployment {
        let mut d = deployment(nodes);
        d.token = Some(7);
        d.transition(DeployState::Running, 1, "lock granted", "leader").unwrap();
        d
    }

    fn result(w: Work, ok: bool, class: Option<ErrorClass>) -> StepOutcome {
        StepOutcome {
            step: w.step,
            undo: w.undo,
            attempt: w.attempt,
            token: 7,
            epoch: 1,
            ok,
            output: ok.then(|| "{}".into()),
            error: (!ok).then(|| "boom".into()),
            class,
            started_ms: 10,
            finished_ms: 11,
            node: "n1".into(),
        }
    }

    #[test]
    fn lifecycle_transitions() {
        use DeployState::*;
        let all = [Queued, Running, Compensating, Failed, Cancelling, Cancelled, Succeeded, CompensationFailed, Superseded];
        let allowed = [
            (Queued, Running),
            (Queued, Cancelling),
            (Queued, Superseded),
            (Running, Succeeded),
            (Running, Compensating),
            (Running, Cancelling),
            (Compensating, Failed),
            (Compensating, CompensationFailed),
            (Cancelling, Cancelled),
            (Cancelling, CompensationFailed),
        ];
        for from in all {
            for to in all {
                assert_eq!(from.can_become(to), allowed.contains(&(from, to)), "{from} -> {to}");
            }
            // Terminal states go nowhere.
            if from.is_terminal() {
                assert!(all.iter().all(|t| !from.can_become(*t)));
            }
        }
        let mut d = deployment(&["n1"]);
        assert!(d.transition(Succeeded, 1, "x", "y").is_err());
        assert!(d.events.is_empty(), "a refused transition logs nothing");
    }

    /// Drive a deployment by a script of outcomes; check the final state and
    /// the order in which steps ran and were undone.
    #[test]
    fn saga_scripts() {
        use DeployState::*;
        // (script of (ok, class) per executed work item, final state, executed work as (step, undo))
        type Script = Vec<(bool, Option<ErrorClass>)>;
        let ok = (true, None);
        let transient = (false, Some(ErrorClass::Transient));
        let invalid = (false, Some(ErrorClass::Invalid));
        let cases: Vec<(&str, Script, DeployState, Vec<(usize, bool)>)> = vec![
            ("all succeed", vec![ok; 4], Succeeded, vec![(0, false), (1, false), (2, false), (3, false)]),
            (
                "health fails: start undone",
                vec![ok, invalid, ok],
                Failed,
                vec![(0, false), (1, false), (0, true)],
            ),
            (
                "stop-old fails: switch then start undone, in reverse",
                vec![ok, ok, ok, invalid, ok, ok, ok],
                Failed,
                vec![(0, false), (1, false), (2, false), (3, false), (2, true), (1, true), (0, true)],
            ),
            (
                "transient start retried once then succeeds",
                vec![transient, ok, ok, ok, ok],
                Succeeded,
                vec![(0, false), (0, false), (1, false), (2, false), (3, false)],
            ),
            (
                "transient twice exceeds max_attempts 2",
                vec![transient, transient],
                Failed,
                vec![(0, false), (0, false)],
            ),
            (
                "undo fails for good",
                vec![ok, invalid, invalid],
                CompensationFailed,
                vec![(0, false), (1, false), (0, true)],
            ),
        ];
        for (name, script, want, want_order) in cases {
            let mut d = started(&["n1"]);
            let mut order = vec![];
            for (ok, class) in script {
                let w = d.next().unwrap_or_else(|| panic!("{name}: nothing to run in {}", d.state));
                order.push((w.step, w.undo));
                d.record(&result(w, ok, class), 20).unwrap();
            }
            assert_eq!(d.state, want, "{name}");
            assert_eq!(order, want_order, "{name}");
            assert!(d.next().is_none(), "{name}: work left after the end");
            assert!(d.events.windows(2).all(|w| w[0].to == w[1].from.unwrap()), "{name}: event log is a chain");
        }
    }

    #[test]
    fn stale_results_are_refused() {
        let mut d = started(&["n1"]);
        let w = d.next().unwrap();
        let mut r = result(w, true, None);
        r.token = 6;
        assert!(d.record(&r, 1).is_err());
        r.token = 7;
        r.epoch = 0;
        assert!(d.record(&r, 1).is_err());
        r.epoch = 1;
        r.step = 2;
        assert!(d.record(&r, 1).is_err());
        r.step = 0;
        r.attempt = 2;
        assert!(d.record(&r, 1).is_err());
        assert_eq!(d.steps[0].status, StepStatus::Pending, "refused results change nothing");
        r.attempt = 1;
        d.record(&r, 1).unwrap();
        // The same result again is stale now.
        assert!(d.record(&r, 1).is_err());
    }

    #[test]
    fn cancel_waits_for_the_step_in_flight_then_undoes_it() {
        use DeployState::*;
        let mut d = started(&["n1"]);
        let w0 = d.next().unwrap();
        d.record(&result(w0, true, None), 1).unwrap();
        let w1 = d.next().unwrap(); // health check, in flight
        d.cancel(2, "operator asked", "alice", false).unwrap();
        assert_eq!(d.state, Cancelling);
        assert_eq!(d.pending_forward_step(), Some(1));
        assert_eq!(d.next(), None, "nothing is undone while step 1 may still run");
        // An undo result now is stale.
        let early = Work { step: 0, undo: true, attempt: 1, not_before_ms: None };
        assert!(d.record(&result(early, true, None), 2).is_err());
        // The aborted health check reports; then start is undone.
        d.record(&result(w1, false, Some(ErrorClass::Aborted)), 3).unwrap();
        let u = d.next().unwrap();
        assert_eq!((u.step, u.undo), (0, true));
        d.record(&result(u, true, None), 4).unwrap();
        assert_eq!(d.state, Cancelled);
        assert_eq!(d.exit_code(), Some(4));
    }

    #[test]
    fn a_lost_node_is_skipped_and_the_others_continue() {
        use DeployState::*;
        let mut d = started(&["n1", "n2"]);
        // n1: start done, health in flight when n1 is lost.
        let w = d.next().unwrap();
        d.record(&result(w, true, None), 1).unwrap();
        let in_flight = d.next().unwrap();
        assert_eq!(d.node_needed(), Some("n1"));
        assert!(d.node_lost("n1", 2, "no heartbeat for 5s", &live(&["n2"])).unwrap());
        assert_eq!(d.epoch, 2);
        // A late result from n1 (old epoch) is refused.
        assert!(d.record(&result(in_flight, true, None), 3).is_err());
        // n2's steps carry on with the new epoch.
        assert_eq!(d.node_needed(), Some("n2"));
        while let Some(w) = d.next() {
            let mut r = result(w, true, None);
            r.epoch = 2;
            d.record(&r, 4).unwrap();
        }
        assert_eq!(d.state, Succeeded);
        assert!(d.events.last().unwrap().reason.contains("n1"));
        assert_eq!(d.steps.iter().filter(|s| s.status == StepStatus::Skipped).count(), 3);
        assert!(!d.node_lost("n2", 5, "x", &live(&[])).unwrap(), "nothing left to skip");
    }

    #[test]
    fn losing_every_node_is_a_failure_not_a_success() {
        use DeployState::*;
        let mut d = started(&["n1", "n2"]);
        let w = d.next().unwrap();
        d.record(&result(w, true, None), 1).unwrap();
        d.node_lost("n1", 2, "silent", &live(&["n2"])).unwrap();
        assert_eq!(d.state, Running, "n2 still carries the release");
        d.node_lost("n2", 3, "silent", &live(&[])).unwrap();
        assert_eq!(d.state, Failed);
        assert!(d.events.iter().any(|e| e.reason.contains("nothing was deployed")));
        assert_eq!(d.exit_code(), Some(3));
    }

    #[test]
    fn a_node_lost_during_compensation_skips_its_undos() {
        use DeployState::*;
        let mut d = started(&["n1", "n2"]);
        for _ in 0..5 {
            let w = d.next().unwrap();
            d.record(&result(w, true, None), 1).unwrap(); // n1 done, start on n2 done
        }
        let w = d.next().unwrap(); // health on n2 fails
        d.record(&result(w, false, Some(ErrorClass::Invalid)), 2).unwrap();
        assert_eq!(d.state, Compensating);
        let u = d.next().unwrap(); // undo start on n2
        d.record(&result(u, true, None), 3).unwrap();
        assert_eq!(d.node_needed(), Some("n1"));
        assert!(d.node_lost("n1", 4, "no heartbeat", &live(&["n2"])).unwrap());
        assert_eq!(d.state, Failed);
        assert!(d.events.last().unwrap().reason.contains("except on lost node(s) n1"));
    }

    /// A command deployment (movable steps) on n1, n2 and n3 live.
    fn command_deployment(irreversible_second: bool) -> Deployment {
        let text = format!(
            "app: infra\nrelease: v1\ndestination: d\nretry: {{ max_attempts: 1 }}\nsteps:\n  - {{ name: a, run: ra, undo: ua }}\n  - {{ name: b, run: rb{} }}\n  - {{ name: c, run: rc, undo: uc }}\n",
            if irreversible_second { ", irreversible: true" } else { ", undo: ub" }
        );
        let mut d = deployment(&["n1"]);
        d.spec = parse_manifest("f", &text, &Overrides::default()).unwrap();
        d.steps = plan(&d.spec, "d", &["n1".into(), "n2".into()]).into_iter().map(StepRecord::new).collect();
        d.token = Some(7);
        d.transition(DeployState::Running, 1, "lock granted", "leader").unwrap();
        d
    }

    #[test]
    fn movable_steps_are_handed_over_with_a_new_epoch_and_checked_first() {
        use DeployState::*;
        let mut d = command_deployment(false);
        assert!(d.steps.iter().all(|s| s.plan.node == "n1" && s.plan.movable));
        let w = d.next().unwrap();
        d.record(&result(w, true, None), 1).unwrap(); // a done on n1
        let in_flight = d.next().unwrap(); // b in flight on n1
        assert!(d.node_lost("n1", 2, "no heartbeat for 5s", &live(&["n2", "n3"])).unwrap());
        assert_eq!(d.epoch, 2);
        assert_eq!(d.state, Running, "the work goes on elsewhere");
        // Everything not done moves to the first live node; only the step
        // that may have been running there is checked first.
        let nodes: Vec<(&str, bool)> = d.steps.iter().map(|s| (s.plan.node.as_str(), s.check_first)).collect();
        assert_eq!(nodes, [("n1", false), ("n2", true), ("n2", false)]);
        assert!(d.steps.iter().all(|s| s.status != StepStatus::Skipped));
        assert!(d.events.last().unwrap().reason.contains("handed over `b` from n1 to n2 (check first)"));
        // The late result from n1 (old epoch) changes nothing.
        assert!(d.record(&result(in_flight, true, None), 3).is_err());
        assert_eq!(d.node_needed(), Some("n2"));
        let mut r = result(d.next().unwrap(), true, None);
        r.epoch = 2;
        d.record(&r, 4).unwrap();
        assert!(!d.steps[1].check_first, "recorded: the flag is spent");
        // c fails on n2 → compensation; a's undo (done on n1, lost) moves too.
        let mut r = result(d.next().unwrap(), false, Some(ErrorClass::Invalid));
        r.epoch = 2;
        d.record(&r, 5).unwrap();
        assert_eq!(d.state, Compensating);
        let u = d.next().unwrap();
        assert_eq!((u.step, u.undo, d.steps[u.step].plan.node.as_str()), (1, true, "n2"));
        let mut r = result(u, true, None);
        r.epoch = 2;
        d.record(&r, 6).unwrap();
        assert_eq!(d.node_needed(), Some("n1"), "a was done on n1");
        assert!(d.resync(7, &live(&["n3"])).unwrap(), "n1 and n2 gone: a's undo goes to n3");
        assert_eq!((d.node_needed(), d.epoch), (Some("n3"), 3));
        let mut r = result(d.next().unwrap(), true, None);
        r.epoch = 3;
        d.record(&r, 8).unwrap();
        assert_eq!(d.state, Failed);
    }

    #[test]
    fn a_movable_step_with_nowhere_to_go_fails_the_deployment() {
        use DeployState::*;
        let mut d = command_deployment(false);
        let w = d.next().unwrap();
        d.record(&result(w, true, None), 1).unwrap();
        assert!(d.node_lost("n1", 2, "silent", &live(&[])).unwrap());
        assert_eq!(d.state, CompensationFailed, "nothing can run b or c, and a's undo has no node either: a human must look");
        assert!(d.events.iter().any(|e| e.reason.contains("no live node is left to run")));
        assert!(d.events.last().unwrap().reason.contains("no live node is left to undo `a` of d"));
        assert_eq!(d.steps[0].status, StepStatus::Skipped);
        assert!(d.keeps_destination(), "the destination stays locked until resolved");
    }

    #[test]
    fn a_failure_after_an_irreversible_step_needs_a_human() {
        use DeployState::*;
        let mut d = command_deployment(true);
        for _ in 0..2 {
            let w = d.next().unwrap();
            d.record(&result(w, true, None), 1).unwrap();
        }
        let w = d.next().unwrap(); // c fails
        d.record(&result(w, false, Some(ErrorClass::Invalid)), 2).unwrap();
        assert_eq!(d.state, CompensationFailed, "b cannot be undone, so a is not undone blindly either");
        assert_eq!(d.steps[0].status, StepStatus::Done);
        assert!(d.events.last().unwrap().reason.contains("irreversible"));
        assert!(d.keeps_destination());
        d.resolve(3, "checked by hand", "alice").unwrap();
        assert!(!d.keeps_destination());
    }

    #[test]
    fn cancel_of_a_queued_deployment_ends_at_once() {
        let mut d = deployment(&["n1"]);
        d.cancel(1, "deadline passed", "leader", true).unwrap();
        assert_eq!(d.state, DeployState::Cancelled);
        assert_eq!(d.exit_code(), Some(5));
        assert_eq!(d.events.len(), 2);
        assert!(d.cancel(2, "again", "x", false).is_err());
    }
}
