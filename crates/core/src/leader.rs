//! The leader's rules: what the Raft leader must do now, given the
//! replicated state, the time and what it has observed of the nodes.
//!
//! The leader keeps a memory that is not replicated (which nodes are
//! connected, when each was last heard from, which steps it sent where);
//! the coordinator's scheduler and worker service read it through
//! [`Observed`] and carry out the [`Action`]s decided here (sending on node
//! streams, proposing through Raft). They decide nothing themselves:
//!
//! * [`due`] / [`due_for`]: on every scheduler tick, per active deployment,
//!   at most one action, checked in this order: work waiting for a lost
//!   node whose node is connected and heard from again while the state
//!   still says lost (propose `RegisterNode`, [`due`] only); the wait's
//!   bound passed (propose `NodeWaitExpired`); the node it needs missed
//!   its lease (propose `NodeLost`; not again while its work waits for
//!   it); its lock wait is over (propose a
//!   timed-out cancel); its deadline passed while queued or running
//!   (propose a timed-out cancel; compensation is never cut short); it is
//!   being cancelled with a forward step that may run (abort it on its
//!   node, or record it as not run when it was never sent); else send the
//!   next step or undo to its node.
//! * [`forgets`]: when a node says hello, what it no longer owns.
//!
//! A [`Proposal`] carries a key naming the decision: the leader need not
//! propose the same key again while an earlier proposal is under way
//! (decisions are re-made every tick until the state machine reflects them).

use std::time::Duration;

use crate::command::Command;
use crate::deploy::{Cursor, DeployState, Deployment, ErrorClass, StepOutcome, StepStatus, Work};
use crate::saga::StepAction;
use crate::state::State;

/// A node not heard from for longer than this is presumed dead: its
/// remaining steps are handed over or skipped, and it gets no new work
/// until it registers again.
pub const NODE_LEASE_MS: i64 = 5_000;

/// How many recent deployments a node saying hello is checked against.
pub const FORGET_LOOKBACK: usize = 500;
// The deployments looked back on still have their step records.
const _: () = assert!(FORGET_LOOKBACK <= crate::state::KEEP_STEP_RECORDS);

pub use crate::deploy::LEADER_ACTOR;

mod canary;

/// One attempt of one step (or undo) of a deployment, with the fencing it
/// carries: what a node is sent, runs and reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepKey {
    pub deployment: String,
    pub step: usize,
    pub undo: bool,
    pub attempt: u32,
    pub token: u64,
    pub epoch: u64,
}

impl StepKey {
    /// Which attempt this is, without its fencing.
    pub fn attempt_id(&self) -> AttemptId {
        AttemptId { deployment: self.deployment.clone(), step: self.step, undo: self.undo, attempt: self.attempt }
    }
}

/// One attempt of one step (or undo), without its token and epoch: how the
/// leader remembers what it sent where. A hand-over bumps the epoch but it
/// is still the same attempt, so the leader can tell whom it sent it to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId {
    pub deployment: String,
    pub step: usize,
    pub undo: bool,
    pub attempt: u32,
}

/// A step the leader believes in flight on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub node: String,
    /// The leader already told that node to abort it.
    pub aborted: bool,
}

/// What the leader has observed of the nodes (its own memory, not
/// replicated; a new leader starts with none).
pub trait Observed {
    /// When the leader last heard from `node`: its last message, or its
    /// work stream closing. `None`: not since this coordinator leads.
    fn last_heard_ms(&self, node: &str) -> Option<i64>;
    /// Is `node`'s work stream open to this leader?
    fn is_connected(&self, node: &str) -> bool;
    /// Where this attempt (deployment, step, undo, attempt; the token and
    /// epoch are not compared) is in flight, if anywhere.
    fn in_flight(&self, key: &StepKey) -> Option<Sent>;
}

/// The time of a scheduler tick, and since when this coordinator leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub now_ms: i64,
    pub leader_since_ms: i64,
}

/// What the leader must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Propose a command through Raft.
    Propose(Proposal),
    /// Tell `node` to stop running `key` (and remember it was told).
    Abort { node: String, key: StepKey, reason: String },
    /// Send a step (or undo) to its node (and remember it in flight).
    Send(Assignment),
}

/// A command the leader proposes on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// Names the decision (it starts with `<deployment id>/`): proposing
    /// the same key again while the first is under way is pointless.
    pub key: String,
    /// Raft request id: the state machine applies it at most once.
    pub request_id: Option<String>,
    pub command: Command,
}

/// A step (or undo) for a node to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub node: String,
    pub key: StepKey,
    pub destination: String,
    /// The node adapter that carries the action out
    /// ([`crate::saga::StepPlan::adapter`]; empty for plans recorded before
    /// it existed).
    pub adapter: String,
    pub app: String,
    pub release: String,
    pub action: StepAction,
    /// Undo only: the output the forward run recorded.
    pub run_output: Option<String>,
    pub timeout_ms: u64,
    /// Handed over while it may have run: run the action's check first.
    pub check_first: bool,
    /// The same attempt is remembered in flight on this other node (it was
    /// handed over from there): that is dead to the leader now, since the
    /// other node's results carry the old epoch and are refused.
    pub handed_over_from: Option<String>,
}

/// Tell a node that it no longer owns a deployment's work on a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forget {
    pub deployment: String,
    pub destination: String,
    /// The deployment's lock token (0 when it never got one).
    pub token: u64,
    /// The deployment's assignment epoch now.
    pub epoch: u64,
    pub reason: String,
}

/// How long `node` has been silent at `tick`: counted from when it was
/// last heard from, but never from before this coordinator led (nodes get
/// a full lease to reconnect after a failover).
pub fn silence_ms(tick: Tick, last_heard_ms: Option<i64>) -> i64 {
    let heard = last_heard_ms.unwrap_or(tick.leader_since_ms).max(tick.leader_since_ms);
    tick.now_ms.saturating_sub(heard)
}

/// Has a node silent this long missed its lease?
pub fn lease_expired(silence_ms: i64) -> bool {
    silence_ms > NODE_LEASE_MS
}

/// Every action due now, over every active deployment.
pub fn due(state: &State, tick: Tick, seen: &impl Observed) -> Vec<Action> {
    state.active_deployments().filter_map(|d| due_one(state, d, tick, seen)).collect()
}

/// The actions due now for the deployments named `ids` (those whose state
/// or work in flight just changed; unknown and ended ones are skipped):
/// what [`due`] would answer for them.
pub fn due_among<'a>(state: &State, ids: impl IntoIterator<Item = &'a str>, tick: Tick, seen: &impl Observed) -> Vec<Action> {
    ids.into_iter().filter_map(|id| state.deployment(id)).filter_map(|d| due_one(state, d, tick, seen)).collect()
}

fn due_one(state: &State, d: &Deployment, tick: Tick, seen: &impl Observed) -> Option<Action> {
    // Where the engine stands, found once for every rule below.
    let c = d.cursor();
    back_again(state, d, &c, tick, seen).or_else(|| due_at(d, &c, tick, seen))
}

/// Deployment `d` waits for a node that the state still records as lost,
/// but that is connected and heard from within its lease (it came back on
/// a stream that outlived its lease, e.g. after a SIGSTOP, or its
/// `NodeLost` was applied after it had registered again): register it
/// again, which lets the work go on there.
fn back_again(state: &State, d: &Deployment, c: &Cursor, tick: Tick, seen: &impl Observed) -> Option<Action> {
    let (i, _) = d.blocking_wait_at(c)?;
    let node = d.steps.get(i)?.plan.node.as_str();
    let rec = state.node(node).filter(|n| n.lost_ms.is_some())?;
    if !seen.is_connected(node) || lease_expired(silence_ms(tick, seen.last_heard_ms(node))) {
        return None;
    }
    let command = Command::RegisterNode { id: node.to_string(), labels: rec.labels.clone() };
    Some(propose(format!("{}/back/{node}", d.id), None, command))
}

/// The action due now for deployment `d`, if any (see the module docs for
/// the order in which the rules are checked).
pub fn due_for(d: &Deployment, tick: Tick, seen: &impl Observed) -> Option<Action> {
    due_at(d, &d.cursor(), tick, seen)
}

/// [`due_for`], given `d`'s cursor now.
fn due_at(d: &Deployment, c: &Cursor, tick: Tick, seen: &impl Observed) -> Option<Action> {
    if d.state.is_terminal() {
        return None;
    }
    let now = tick.now_ms;

    // Node wait: the work it needs waits for a lost node; past the wait's
    // bound, give up on it (the state machine checks the bound again).
    let waiting = d.blocking_wait_at(c);
    if let Some((_, w)) = waiting.filter(|(_, w)| now >= w.until_ms) {
        let key = format!("{}/node-wait/{}", d.id, w.until_ms);
        let request_id = Some(format!("{LEADER_ACTOR}/node-wait/{}/{}", d.id, w.until_ms));
        return Some(propose(key, request_id, Command::NodeWaitExpired { deployment: d.id.clone() }));
    }

    // Node lease: the node this deployment needs has been silent too long.
    if let Some(node) = d.node_needed_at(c).filter(|_| waiting.is_none()) {
        let silent = silence_ms(tick, seen.last_heard_ms(node));
        if lease_expired(silent) {
            let why = format!("no heartbeat for {:.1}s", silent as f64 / 1000.0);
            return Some(propose(format!("{}/lost/{node}", d.id), None, Command::NodeLost { node: node.to_string(), why }));
        }
    }

    // Lock wait: a queued deployment gives up when its wait is over.
    if let Some(until) = d.lock_wait_until_ms.filter(|t| d.state == DeployState::Queued && now > *t) {
        let waited = humantime::format_duration(Duration::from_millis(until.saturating_sub(d.submitted_ms).max(0) as u64));
        let reason = format!(
            "waited {waited} (--lock-wait) for the destination lock; `fleetctl lock status {}` shows who holds it",
            d.destinations().join("`, `fleetctl lock status ")
        );
        return Some(timed_out(d, "lock-wait", reason));
    }

    // Deadline: cancel and compensate; compensation itself is never cut short.
    if now > d.deadline_ms && matches!(d.state, DeployState::Queued | DeployState::Running | DeployState::Paused) {
        let reason =
            format!("deadline of {} passed; compensating what ran", humantime::format_duration(Duration::from_millis(d.spec.timeout_ms)));
        return Some(timed_out(d, "deadline", reason));
    }

    // Cancelling: the forward step that may be in flight is stopped first.
    if let Some(i) = c.cancelled_in_flight {
        return stop_in_flight(d, i, tick, seen);
    }

    // A paused canary: promote when its pause passed, stop its analysis
    // when a promote was asked for (`canary::due`).
    if let Some(action) = canary::due(d, tick, seen) {
        return action;
    }

    next_work(d, c.next, now, seen)
}

fn propose(key: String, request_id: Option<String>, command: Command) -> Action {
    Action::Propose(Proposal { key, request_id, command })
}

/// Cancel `d` because a time limit (`what`) passed.
fn timed_out(d: &Deployment, what: &str, reason: String) -> Action {
    let command = Command::CancelDeployment { id: d.id.clone(), reason, actor: LEADER_ACTOR.into(), timed_out: true };
    propose(format!("{}/{what}", d.id), Some(format!("{LEADER_ACTOR}/{what}/{}", d.id)), command)
}

fn key_of(d: &Deployment, step: usize, undo: bool, attempt: u32) -> StepKey {
    StepKey { deployment: d.id.clone(), step, undo, attempt, token: d.token.unwrap_or(0), epoch: d.epoch }
}

/// A cancelled deployment's forward step `i` may still run: abort it where
/// it runs; record it as not run when it was never sent (its node, which
/// is connected, does not report it running); when its node is away, wait
/// for the node to report (or to miss its lease).
fn stop_in_flight(d: &Deployment, i: usize, tick: Tick, seen: &impl Observed) -> Option<Action> {
    let s = d.steps.get(i)?;
    let key = key_of(d, i, false, s.attempt);
    match seen.in_flight(&key) {
        Some(f) if !f.aborted => Some(Action::Abort { node: f.node, key, reason: "the deployment is being cancelled".into() }),
        Some(_) => None,
        None if seen.is_connected(&s.plan.node) => {
            let outcome = StepOutcome {
                step: i,
                undo: false,
                attempt: s.attempt,
                token: key.token,
                epoch: key.epoch,
                ok: false,
                output: None,
                error: Some("cancelled before it started".into()),
                class: Some(ErrorClass::Aborted),
                started_ms: tick.now_ms,
                finished_ms: tick.now_ms,
                node: LEADER_ACTOR.into(),
            };
            Some(propose(format!("{}/abort/{i}/{}", d.id, s.attempt), None, Command::StepResult { deployment: d.id.clone(), outcome }))
        }
        None => None,
    }
}

/// The engine's next step or undo, unless it waits for its backoff or is
/// already in flight on its node.
fn next_work(d: &Deployment, next: Option<Work>, now: i64, seen: &impl Observed) -> Option<Action> {
    let w = next?;
    if w.not_before_ms.is_some_and(|t| t > now) {
        return None;
    }
    let s = d.steps.get(w.step)?;
    if s.waiting.is_some() {
        // Its node is lost: nothing to send until a node registers again.
        return None;
    }
    let key = key_of(d, w.step, w.undo, w.attempt);
    let handed_over_from = match seen.in_flight(&key) {
        Some(f) if f.node == s.plan.node => return None,
        Some(f) => Some(f.node),
        None => None,
    };
    Some(Action::Send(Assignment {
        node: s.plan.node.clone(),
        destination: d.step_destination(w.step).to_string(),
        adapter: s.plan.adapter.clone(),
        app: d.app.clone(),
        release: d.release.clone(),
        action: s.plan.action.clone(),
        run_output: if w.undo { s.output.clone() } else { None },
        timeout_ms: s.plan.timeout_ms,
        check_first: s.check_first && !w.undo,
        handed_over_from,
        key,
    }))
}

/// What `node`, saying hello, no longer owns: deployments in which its
/// steps were skipped (it was presumed lost, or left the destination, and
/// the saga went on without it), and deployments of steps it reports
/// running that are stale: the deployment ended, or the step fails
/// [`Deployment::fence`] (another token or epoch). One forget per
/// deployment and destination; the most recent [`FORGET_LOOKBACK`]
/// deployments are checked for skipped steps.
pub fn forgets(state: &State, node: &str, running: &[StepKey]) -> Vec<Forget> {
    let mut out: Vec<Forget> = Vec::new();
    // One forget per deployment and destination.
    let mut push = |f: Forget| {
        if !out.iter().any(|o| o.deployment == f.deployment && o.destination == f.destination) {
            out.push(f);
        }
    };
    let of = |d: &Deployment, destination: &str, reason: String| Forget {
        deployment: d.id.clone(),
        destination: destination.to_string(),
        token: d.token.unwrap_or(0),
        epoch: d.epoch,
        reason,
    };
    for d in state.deployments().rev().take(FORGET_LOOKBACK) {
        if d.token.is_none() {
            continue;
        }
        for (i, s) in d.steps.iter().enumerate() {
            if s.plan.node == node && s.status == StepStatus::Skipped {
                let why = format!("{} went on without this node ({}); its steps here were skipped", d.id, d.state);
                push(of(d, d.step_destination(i), why));
            }
        }
    }
    for k in running {
        let Some(d) = state.deployment(&k.deployment) else {
            if state.left_history(&k.deployment) {
                // It ended long ago and left the history: nothing says
                // which destination the step was on, so it is forgotten on
                // every destination of this node, at an epoch past the
                // step's (its token is its own: no later grant has it).
                let labels = state.node(node).map(|n| n.labels.clone()).unwrap_or_default();
                for destination in state.destinations().filter(|dest| crate::manifest::selects(&dest.selector, &labels)) {
                    push(Forget {
                        deployment: k.deployment.clone(),
                        destination: destination.name.clone(),
                        token: k.token,
                        epoch: k.epoch.saturating_add(1),
                        reason: format!("{} ended long ago and is no longer in the history", k.deployment),
                    });
                }
            }
            continue;
        };
        if d.state.is_terminal() || d.fence(k.token, k.epoch).is_err() {
            let why = format!("step {} of {} is stale (deployment {}, epoch {} now)", k.step.saturating_add(1), d.id, d.state, d.epoch);
            if d.compacted.is_some() {
                // Its records, and with them the step's destination, are
                // gone from the history: it ended long ago, so every
                // destination of it is stale.
                for destination in d.destinations() {
                    push(of(d, destination, why.clone()));
                }
            } else {
                push(of(d, d.step_destination(k.step), why));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
