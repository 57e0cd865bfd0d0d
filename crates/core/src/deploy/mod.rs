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
//! running → paused → running (a canary: promoted), paused → compensating|cancelling
//! ```
//!
//! The types are here; the behaviour is split by concern: `lifecycle`
//! (transitions, settling, cancel, resolve), `engine` (what runs next, the
//! fencing rule, recording results) and `handover` (a lost node's work moved
//! or skipped).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manifest::Spec;
use crate::saga::StepPlan;

pub use canary::{fmt_clock, Pause, ServedAt};
pub use engine::Cursor;

/// The actor of what the leader decides on its own.
pub const LEADER_ACTOR: &str = "coordinator";

mod canary;
mod engine;
mod handover;
mod lifecycle;

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
    /// A canary waits at its pause step (`fleetctl promote`, its pause
    /// passing, or its analysis decides); it keeps the destination lock.
    Paused,
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
        matches!(self, Running | Compensating | Cancelling | CompensationFailed | Paused)
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
                | (Running, Paused)
                | (Paused, Running)
                | (Paused, Compensating)
                | (Paused, Cancelling)
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
            Paused => "paused",
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

/// Each destination's `node_wait` in milliseconds (a destination missing
/// here waits [`crate::manifest::DEFAULT_NODE_WAIT_MS`]).
pub type NodeWaits = BTreeMap<String, u64>;

/// A step whose node was lost while no other live node of its destination
/// could take it: it waits for its node (or, when movable, any node the
/// destination selects) to register again, at most until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeWait {
    /// When the node was presumed lost.
    pub since_ms: i64,
    /// When the deployment gives up on it: the lost time plus the
    /// destination's `node_wait`, and, going forward, no later than the
    /// deployment's deadline.
    pub until_ms: i64,
}

impl StepStatus {
    /// Nothing more will happen to this step going forward.
    fn settled_forward(self) -> bool {
        matches!(self, StepStatus::Done | StepStatus::Skipped)
    }
}

/// Error classes, which decide the retry policy. On the wire they are the
/// proto enum (`fleet_net::wire` converts, refusing unknown values); the
/// serde names are what the replicated state stores.
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
    /// Its node is lost and nothing else can run it: it waits for a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<NodeWait>,
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
            waiting: None,
            output: None,
            error: None,
            error_class: None,
            started_ms: None,
            finished_ms: None,
            undo_started_ms: None,
            undo_finished_ms: None,
        }
    }

    /// Equal to `other` in all that can change once the step is planned:
    /// its progress, and the node it runs on (a hand-over moves it). The
    /// rest of its plan is fixed when the deployment is granted its lock,
    /// so this is `==` without comparing the plan's action, name and
    /// policies: what the state machine asks for every step of a
    /// deployment on every result it records (`State::put_deployment`),
    /// where comparing whole records was most of a 600-step rollout's
    /// apply (docs/benchmarks.md). A debug build checks it against `==`.
    pub fn same_progress(&self, other: &StepRecord) -> bool {
        // Every field by name: a field added later must be placed here.
        let StepRecord {
            plan,
            status,
            attempt,
            undo_attempt,
            not_before_ms,
            check_first,
            waiting,
            output,
            error,
            error_class,
            started_ms,
            finished_ms,
            undo_started_ms,
            undo_finished_ms,
        } = self;
        *status == other.status
            && *attempt == other.attempt
            && *undo_attempt == other.undo_attempt
            && *not_before_ms == other.not_before_ms
            && *check_first == other.check_first
            && *error_class == other.error_class
            && *started_ms == other.started_ms
            && *finished_ms == other.finished_ms
            && *undo_started_ms == other.undo_started_ms
            && *undo_finished_ms == other.undo_finished_ms
            && *waiting == other.waiting
            && *output == other.output
            && *error == other.error
            && plan.node == other.plan.node
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
    /// A canary's pause (set when it pauses; kept after it is promoted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
    /// The servers (nodes) it deploys to; empty = every node of its
    /// destinations. A catch-up deployment of a server that joined targets
    /// that server only (without hooks: the release already ran them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// The saga's step records. Read freely; change them only through
    /// [`Deployment::step_mut`] or [`Deployment::steps_mut`], which note
    /// what changed for the state to persist.
    pub steps: Vec<StepRecord>,
    pub events: Vec<Event>,
    /// Set when its step records were dropped from the history (only the
    /// newest ended deployments keep them, see
    /// `KEEP_STEP_RECORDS` of the state module); its header, spec and events
    /// stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compacted: Option<Compaction>,
    /// Which step records changed since the state last persisted them.
    #[serde(skip)]
    pub changed: ChangedSteps,
}

/// What became of the step records of a deployment compacted into the
/// history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compaction {
    /// When they were dropped (the time of the entry that dropped them).
    pub at_ms: i64,
    /// How many records there were.
    pub steps: usize,
}

/// Which step records of a deployment changed since the state last
/// persisted it: `State::put_deployment` writes those and compares no
/// other (comparing every record on every result was 5–15 % of a
/// coordinator's CPU on 50- to 150-step sagas, docs/benchmarks.md).
/// Derived, never persisted, and not part of `==`: deployments with equal
/// records are equal whatever was noted.
#[derive(Debug, Clone, Default)]
pub struct ChangedSteps {
    every: bool,
    steps: Vec<usize>,
}

impl ChangedSteps {
    /// Was record `i` noted as changed?
    pub fn contains(&self, i: usize) -> bool {
        self.every || self.steps.contains(&i)
    }

    /// Noted as changed: every record.
    pub fn is_every(&self) -> bool {
        self.every
    }

    fn one(&mut self, i: usize) {
        if !self.every && !self.steps.contains(&i) {
            self.steps.push(i);
        }
    }
}

impl PartialEq for ChangedSteps {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ChangedSteps {}

impl Deployment {
    /// A copy without its step records: what the state stores under
    /// `deploy/<n>` (each record has a key of its own). Every field is
    /// named, so a new one cannot be left out silently.
    pub fn without_steps(&self) -> Deployment {
        Deployment {
            id: self.id.clone(),
            app: self.app.clone(),
            release: self.release.clone(),
            destination: self.destination.clone(),
            spec: self.spec.clone(),
            state: self.state,
            submitted_by: self.submitted_by.clone(),
            submitted_ms: self.submitted_ms,
            deadline_ms: self.deadline_ms,
            token: self.token,
            epoch: self.epoch,
            previous_release: self.previous_release.clone(),
            rollback_of: self.rollback_of.clone(),
            timed_out: self.timed_out,
            lock_wait_until_ms: self.lock_wait_until_ms,
            resolved: self.resolved.clone(),
            pause: self.pause.clone(),
            targets: self.targets.clone(),
            steps: Vec::new(),
            events: self.events.clone(),
            compacted: self.compacted.clone(),
            changed: ChangedSteps::default(),
        }
    }

    /// Step record `i`, to change it (noted for the state to persist).
    pub fn step_mut(&mut self, i: usize) -> Option<&mut StepRecord> {
        if i < self.steps.len() {
            self.changed.one(i);
        }
        self.steps.get_mut(i)
    }

    /// Every step record, to change any of them (all noted).
    pub fn steps_mut(&mut self) -> &mut Vec<StepRecord> {
        self.changed.every = true;
        &mut self.steps
    }

    /// What was noted since the last call, cleared.
    pub fn take_changed(&mut self) -> ChangedSteps {
        std::mem::take(&mut self.changed)
    }
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
    /// The record as clients, logs and events may see it: the values of
    /// `secret_env` masked in the spec and in every start step's
    /// environment. The state machine keeps the real values (nodes need
    /// them); everything that leaves a coordinator for a client goes
    /// through this.
    pub fn redacted(&self) -> Deployment {
        let mut d = self.clone();
        if d.spec.secret_env.is_empty() {
            return d;
        }
        d.spec = d.spec.redacted();
        let secret = |k: &String| self.spec.secret_env.contains_key(k);
        // Step outputs and errors are the nodes' own text (a process
        // adapter's switch output records the instance it started, env
        // included): mask the values wherever they appear, also as they
        // read inside JSON strings (escaped once or twice).
        let mut forms: Vec<String> = vec![];
        for v in self.spec.secret_env.values().filter(|v| !v.is_empty()) {
            let once = serde_json::to_string(v).map(|q| q[1..q.len() - 1].to_string()).unwrap_or_default();
            let twice = serde_json::to_string(&once).map(|q| q[1..q.len() - 1].to_string()).unwrap_or_default();
            forms.extend([twice, once, v.clone()]);
        }
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        let mask = |text: &mut String| {
            for f in forms.iter().filter(|f| !f.is_empty()) {
                if text.contains(f.as_str()) {
                    *text = text.replace(f.as_str(), crate::manifest::REDACTED);
                }
            }
        };
        for s in &mut d.steps {
            if let Some(o) = s.output.as_mut() {
                mask(o);
            }
            if let Some(e) = s.error.as_mut() {
                mask(e);
            }
        }
        for e in &mut d.events {
            mask(&mut e.reason);
        }
        for s in &mut d.steps {
            if let crate::saga::StepAction::StartInstance { env, .. } | crate::saga::StepAction::StartContainer { env, .. } =
                &mut s.plan.action
            {
                for (k, v) in env.iter_mut() {
                    if secret(k) {
                        *v = crate::manifest::REDACTED.to_string();
                    }
                }
            }
        }
        d
    }

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
mod tests;
