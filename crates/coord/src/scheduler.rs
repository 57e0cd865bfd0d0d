//! The leader's scheduler: turns the replicated deployment state into work
//! for nodes.
//!
//! It runs on every coordinator and acts only while this one leads. After
//! every applied entry (and on a short tick, for backoffs and deadlines) it
//! asks the saga engine (`Deployment::next`) what each active deployment
//! needs and sends that step to its node, unless it is already in flight.
//! Nothing here is the source of truth: a step's result is committed through
//! Raft before the next one is sent, so a new leader continues from the
//! state machine.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_core::deploy::{DeployState, Deployment, ErrorClass, StepOutcome};

use fleet_core::Command;
use fleet_proto::{leader_message, Abort, LeaderMessage, StepAssignment, StepKey};
use openraft::ServerState;

use crate::control::{now_ms, propose};
use crate::hub::{Hub, WorkKey};
use crate::raft_types::Raft;
use crate::store::sm::StateReader;

const TICK: Duration = Duration::from_millis(100);
/// A node not heard from for this long is presumed dead: its remaining
/// steps are skipped and it gets no new work until it registers again.
pub const NODE_LEASE: Duration = Duration::from_secs(5);
/// Do not repeat the same proposal (a deadline cancel, a synthetic abort)
/// more often than this.
const REPROPOSE_AFTER: Duration = Duration::from_secs(1);

pub fn spawn(raft: Raft, state: StateReader, hub: Arc<Hub>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(raft, state, hub))
}

async fn run(raft: Raft, state: StateReader, hub: Arc<Hub>) {
    let mut applied = state.applied_index();
    // Leadership is read on each wake, not waited on: openraft publishes
    // metrics on every turn of its loop, and waking on each would make the
    // scheduler spin.
    let metrics = raft.metrics();
    let mut leading = false;
    let mut leader_since_ms = 0i64;
    let mut proposed: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = hub.changed.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        let is_leader = metrics.borrow().state == ServerState::Leader;
        if !is_leader {
            if leading {
                tracing::info!("no longer the leader: dropping node streams");
                hub.drop_all(tonic::Status::unavailable("this coordinator is no longer the leader; reconnect"));
                proposed.clear();
            }
            leading = false;
            continue;
        }
        if !leading {
            tracing::info!("leading: resuming every active deployment from the state machine");
            leading = true;
            leader_since_ms = now_ms();
        }
        // Decide under the state's read lock, without copying deployments:
        // everything `tick` does is non-blocking (channel sends, spawned
        // proposals).
        let now = now_ms();
        let ids: HashSet<String> = state.read(|a| {
            let mut ids = HashSet::new();
            for d in a.state.active_deployments() {
                ids.insert(d.id.clone());
                tick(&raft, &hub, d, now, leader_since_ms, &mut proposed);
            }
            ids
        });
        hub.retain_deployments(&ids);
        proposed.retain(|k, at| ids.iter().any(|id| k.starts_with(&format!("{id}/"))) && at.elapsed() < REPROPOSE_AFTER * 10);
    }
}

fn once(proposed: &mut HashMap<String, Instant>, key: String) -> bool {
    match proposed.get(&key) {
        Some(at) if at.elapsed() < REPROPOSE_AFTER => false,
        _ => {
            proposed.insert(key, Instant::now());
            true
        }
    }
}

fn spawn_proposal(raft: &Raft, hub: &Arc<Hub>, request_id: Option<String>, command: Command) {
    let (raft, hub) = (raft.clone(), hub.clone());
    tokio::spawn(async move {
        if let Err(e) = propose(&raft, request_id, command).await {
            tracing::warn!(error = %e.message(), "scheduler proposal failed; will retry");
        }
        hub.changed.notify_one();
    });
}

fn step_key(d: &Deployment, step: usize, undo: bool, attempt: u32) -> StepKey {
    StepKey {
        deployment: d.id.clone(),
        step: step as u32,
        undo,
        attempt,
        token: d.token.unwrap_or(0),
        epoch: d.epoch,
    }
}

fn tick(raft: &Raft, hub: &Arc<Hub>, d: &Deployment, now: i64, leader_since_ms: i64, proposed: &mut HashMap<String, Instant>) {
    // Node lease: the node this deployment needs has been silent too long.
    if let Some(node) = d.node_needed() {
        let silent = hub.silent_for(node, now, leader_since_ms);
        if silent > NODE_LEASE.as_millis() as i64 {
            if once(proposed, format!("{}/lost/{node}", d.id)) {
                tracing::warn!(%node, deployment = %d.id, silent_ms = silent, "node missed its lease; presumed dead");
                let why = format!("no heartbeat for {:.1}s", silent as f64 / 1000.0);
                spawn_proposal(raft, hub, None, Command::NodeLost { node: node.to_string(), why });
            }
            return;
        }
    }

    // Lock wait: a queued deployment gives up when its wait is over.
    if d.state == DeployState::Queued && d.lock_wait_until_ms.is_some_and(|t| now > t) {
        if once(proposed, format!("{}/lock-wait", d.id)) {
            let waited = humantime::format_duration(Duration::from_millis((d.lock_wait_until_ms.unwrap_or(now) - d.submitted_ms).max(0) as u64));
            let reason = format!(
                "waited {waited} (--lock-wait) for the destination lock; `fleetctl lock status {}` shows who holds it",
                d.destinations().join("`, `fleetctl lock status ")
            );
            let command = Command::CancelDeployment { id: d.id.clone(), reason, actor: "coordinator".into(), timed_out: true };
            spawn_proposal(raft, hub, Some(format!("coordinator/lock-wait/{}", d.id)), command);
        }
        return;
    }

    // Deadline: cancel and compensate; compensation itself is never cut short.
    if now > d.deadline_ms && matches!(d.state, DeployState::Queued | DeployState::Running) {
        if once(proposed, format!("{}/deadline", d.id)) {
            let reason = format!(
                "deadline of {} passed; compensating what ran",
                humantime::format_duration(Duration::from_millis(d.spec.timeout_ms))
            );
            tracing::info!(deployment = %d.id, "deadline passed; cancelling");
            let command = Command::CancelDeployment { id: d.id.clone(), reason, actor: "coordinator".into(), timed_out: true };
            spawn_proposal(raft, hub, Some(format!("coordinator/deadline/{}", d.id)), command);
        }
        return;
    }

    // Cancelling: the forward step that may be in flight is stopped first.
    if d.state == DeployState::Cancelling {
        if let Some(i) = d.pending_forward_step() {
            let s = &d.steps[i];
            let key = step_key(d, i, false, s.attempt);
            let work = WorkKey::of(&key);
            match hub.in_flight(&work) {
                Some(f) if !f.aborted => {
                    let msg = LeaderMessage {
                        msg: Some(leader_message::Msg::Abort(Abort { key: Some(key), reason: "the deployment is being cancelled".into() })),
                    };
                    hub.send(&f.node, msg, None, now);
                    hub.mark_aborted(&work);
                }
                Some(_) => {}
                None if hub.is_connected(&s.plan.node) && once(proposed, format!("{}/abort/{i}/{}", d.id, s.attempt)) => {
                    // Never sent (or the node, which is connected, did not
                    // report it running): record it as not run.
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
                        started_ms: now,
                        finished_ms: now,
                        node: "coordinator".into(),
                    };
                    let command = Command::StepResult { deployment: d.id.clone(), outcome };
                    spawn_proposal(raft, hub, None, command);
                }
                None => {} // its node is away; wait for it to report
            }
            return;
        }
    }

    let Some(w) = d.next() else { return };
    if w.not_before_ms.is_some_and(|t| t > now) {
        return;
    }
    let s = &d.steps[w.step];
    let key = step_key(d, w.step, w.undo, w.attempt);
    let work = WorkKey::of(&key);
    match hub.in_flight(&work) {
        Some(f) if f.node == s.plan.node => return,
        // Handed over from a lost node: what that node had is dead to us
        // (its results carry the old epoch and are refused).
        Some(f) => {
            tracing::info!(deployment = %d.id, step = w.step, from = %f.node, to = %s.plan.node, "step handed over; sending it to its new node");
            hub.finished(&work);
        }
        None => {}
    }
    let action_json = match serde_json::to_string(&s.plan.action) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(deployment = %d.id, error = %e, "step action does not serialize");
            return;
        }
    };
    let assign = StepAssignment {
        key: Some(key),
        destination: d.step_destination(w.step).to_string(),
        app: d.app.clone(),
        release: d.release.clone(),
        action_json,
        run_output_json: if w.undo { s.output.clone().unwrap_or_default() } else { String::new() },
        timeout_ms: s.plan.timeout_ms,
        check_first: s.check_first && !w.undo,
    };
    let msg = LeaderMessage { msg: Some(leader_message::Msg::Assign(assign)) };
    if hub.send(&s.plan.node, msg, Some(work), now) {
        tracing::debug!(deployment = %d.id, step = w.step, undo = w.undo, node = %s.plan.node, "step sent");
    }
}
