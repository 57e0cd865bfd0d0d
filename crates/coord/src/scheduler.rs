//! The leader's scheduler: carries out what `fleet_core::leader` decides.
//!
//! It runs on every coordinator and acts only while this one leads. After
//! applied entries it asks `leader::due_among` what the deployments they
//! changed (or whose work in flight the hub saw finish) need; on a short
//! tick, and when nodes or destinations change, `leader::due` what every
//! active deployment needs (backoffs, deadlines, leases). Both decide from
//! the state machine, the time and the hub (the leader's memory of nodes
//! and steps in flight); the scheduler carries the actions out: sends steps
//! and aborts on node streams, spawns proposals. Nothing here is the source
//! of truth: a step's result is committed through Raft before the next one
//! is sent, so a new leader continues from the state machine.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_core::leader::{self, Action, Assignment, Observed, Proposal, Sent, Tick};
use fleet_core::state::{touched as touched_key, Touched as TouchedKey};
use fleet_core::Command;
use fleet_net::now_ms;
use fleet_proto::{leader_message, Abort, LeaderMessage, StepAssignment, StepKey};
use openraft::ServerState;

use crate::hub::{Hub, WorkKey};
use crate::propose::propose;
use crate::raft_types::Raft;
use crate::store::sm::{StateReader, Taker};

const TICK: Duration = Duration::from_millis(100);
/// Do not repeat the same proposal (a deadline cancel, a synthetic abort)
/// more often than this.
const REPROPOSE_AFTER: Duration = Duration::from_secs(1);

pub fn spawn(raft: Raft, state: StateReader, hub: Arc<Hub>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(raft, state, hub))
}

async fn run(raft: Raft, state: StateReader, hub: Arc<Hub>) {
    // Woken by a change of role (openraft's server metrics: not sent on
    // every write), by applied entries that changed what it acts on (only
    // while leading: it collects from its first take), by the hub, and by
    // the tick. Not by every applied entry: a lock write woke the scheduler
    // of every coordinator for nothing.
    let mut role = raft.server_metrics();
    let mut leading = false;
    let mut leader_since_ms = 0i64;
    let mut proposed: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut full = false;
        tokio::select! {
            r = role.changed() => if r.is_err() { return },
            _ = state.touched(Taker::Scheduler) => {}
            _ = hub.changed.notified() => {}
            _ = tick.tick() => full = true,
        }
        let is_leader = role.borrow_and_update().state == ServerState::Leader;
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
            full = true;
        }
        // What changed since the last look, taken before the state is read
        // (a change in between is looked at twice, never missed). The tick
        // looks at everything: backoffs, deadlines and leases run on time.
        let touched = state.take_touched(Taker::Scheduler);
        let dirty = hub.take_dirty();
        let mut changed: HashSet<String> = dirty.deployments;
        full |= touched.everything || dirty.all;
        for key in &touched.keys {
            match touched_key(key) {
                TouchedKey::Deployment(n) => {
                    changed.insert(format!("d{n}"));
                }
                TouchedKey::Destination(_) | TouchedKey::Nodes => full = true,
                TouchedKey::Other => {}
            }
        }
        if !full && changed.is_empty() {
            continue;
        }
        // Decide under the state's read lock, without copying deployments;
        // act after it.
        let tick = Tick { now_ms: now_ms(), leader_since_ms };
        let seen = HubView(&hub);
        let (ids, actions) = state.read(|a| match full {
            true => {
                let ids: HashSet<String> = a.state.active_deployments().map(|d| d.id.clone()).collect();
                (Some(ids), leader::due(&a.state, tick, &seen))
            }
            false => (None, leader::due_among(&a.state, changed.iter().map(String::as_str), tick, &seen)),
        });
        for action in actions {
            carry_out(&raft, &hub, action, tick.now_ms, &mut proposed);
        }
        if let Some(ids) = ids {
            hub.retain_deployments(&ids);
            proposed.retain(|k, at| ids.iter().any(|id| k.starts_with(&format!("{id}/"))) && at.elapsed() < REPROPOSE_AFTER * 10);
        }
    }
}

/// The hub, as the leader rules see it.
struct HubView<'a>(&'a Hub);

impl Observed for HubView<'_> {
    fn last_heard_ms(&self, node: &str) -> Option<i64> {
        self.0.last_heard(node)
    }

    fn is_connected(&self, node: &str) -> bool {
        self.0.is_connected(node)
    }

    fn in_flight(&self, key: &leader::StepKey) -> Option<Sent> {
        self.0.in_flight(&work_key(key)).map(|f| Sent { node: f.node, aborted: f.aborted })
    }
}

fn work_key(k: &leader::StepKey) -> WorkKey {
    k.attempt_id()
}

fn wire_key(k: leader::StepKey) -> StepKey {
    StepKey { deployment: k.deployment, step: k.step as u32, undo: k.undo, attempt: k.attempt, token: k.token, epoch: k.epoch }
}

fn carry_out(raft: &Raft, hub: &Arc<Hub>, action: Action, now: i64, proposed: &mut HashMap<String, Instant>) {
    match action {
        Action::Propose(p) => {
            if once(proposed, &p.key) {
                log_proposal(&p);
                spawn_proposal(raft, hub, p.request_id, p.command);
            }
        }
        Action::Abort { node, key, reason } => {
            let work = work_key(&key);
            let msg = LeaderMessage { msg: Some(leader_message::Msg::Abort(Abort { key: Some(wire_key(key)), reason })) };
            hub.send(&node, msg, None, now);
            hub.mark_aborted(&work);
        }
        Action::Send(a) => send(hub, a, now),
    }
}

fn log_proposal(p: &Proposal) {
    match &p.command {
        Command::NodeLost { node, why } => tracing::warn!(%node, %why, "node missed its lease; presumed dead"),
        Command::NodeWaitExpired { deployment } => {
            tracing::warn!(%deployment, "the wait for a lost node ran out (node_wait or deadline); giving up on that work")
        }
        Command::RegisterNode { id, .. } => tracing::info!(node = %id, "node recorded lost is back on its stream; registering it again"),
        Command::CancelDeployment { id, reason, .. } => tracing::info!(deployment = %id, %reason, "time limit passed; cancelling"),
        Command::StepResult { deployment, outcome } => {
            tracing::info!(%deployment, step = outcome.step, "cancelled before it was sent; recording it as not run")
        }
        other => tracing::debug!(command = ?other, "proposing"),
    }
}

fn send(hub: &Hub, a: Assignment, now: i64) {
    let work = work_key(&a.key);
    if let Some(from) = &a.handed_over_from {
        // What the old node had is dead to us (its results carry the old
        // epoch and are refused).
        tracing::info!(deployment = %a.key.deployment, step = a.key.step, %from, to = %a.node, "step handed over; sending it to its new node");
        hub.finished(&work);
    }
    let action_json = match serde_json::to_string(&a.action) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(deployment = %a.key.deployment, error = %e, "step action does not serialize");
            return;
        }
    };
    let (deployment, step, undo) = (a.key.deployment.clone(), a.key.step, a.key.undo);
    let assign = StepAssignment {
        key: Some(wire_key(a.key)),
        destination: a.destination,
        adapter: a.adapter,
        app: a.app,
        release: a.release,
        action_json,
        run_output_json: a.run_output.unwrap_or_default(),
        timeout_ms: a.timeout_ms,
        check_first: a.check_first,
    };
    let msg = LeaderMessage { msg: Some(leader_message::Msg::Assign(assign)) };
    if hub.send(&a.node, msg, Some(work), now) {
        tracing::debug!(%deployment, step, undo, node = %a.node, "step sent");
    }
}

fn once(proposed: &mut HashMap<String, Instant>, key: &str) -> bool {
    match proposed.get(key) {
        Some(at) if at.elapsed() < REPROPOSE_AFTER => false,
        _ => {
            proposed.insert(key.to_string(), Instant::now());
            true
        }
    }
}

fn spawn_proposal(raft: &Raft, hub: &Arc<Hub>, request_id: Option<String>, command: Command) {
    let (raft, hub) = (raft.clone(), hub.clone());
    tokio::spawn(async move {
        if let Err(e) = propose(&raft, None, request_id, command).await {
            tracing::warn!(error = %e.message(), "scheduler proposal failed; will retry");
        }
        hub.changed.notify_one();
    });
}
