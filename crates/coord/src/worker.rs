//! The `Worker` service: the work stream each `fleet-node` keeps open to the
//! Raft leader.
//!
//! The node's id is its certificate's common name. On `Hello` the leader
//! registers the node (a Raft command, only when its labels changed), tells
//! it what it no longer owns (`fleet_core::leader::forgets`), records what
//! it reports running, and from then on the scheduler sends it
//! assignments on this stream. Each `StepResult` is proposed through Raft;
//! the state machine refuses stale ones (token, epoch, step, attempt).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::auth::Access;
use fleet_core::deploy::StepOutcome;
use fleet_core::leader;
use fleet_core::{Command, Response as Outcome};
use fleet_net::wire::class_from_wire;
use fleet_proto::worker_server::Worker;
use fleet_proto::{leader_message, node_message, Forget, LeaderMessage, NodeMessage, StepResult, Welcome};
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::hub::{attempt_of, Hub};
use crate::propose::{leader_redirect_if_follower, propose};
use crate::raft_types::Raft;
use crate::store::sm::StateReader;
use crate::tls::authorize;
use fleet_net::now_ms;

/// How often nodes heartbeat.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long a node may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WorkerService {
    raft: Raft,
    state: StateReader,
    hub: Arc<Hub>,
}

impl WorkerService {
    pub fn new(raft: Raft, state: StateReader, hub: Arc<Hub>) -> Self {
        WorkerService { raft, state, hub }
    }
}

type WorkStream = Pin<Box<dyn Stream<Item = Result<LeaderMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type WorkStream = WorkStream;

    async fn work(&self, req: Request<Streaming<NodeMessage>>) -> Result<Response<WorkStream>, Status> {
        let node = authorize(&req, Access::Work, "the work stream")?.name;
        leader_redirect_if_follower(&self.raft)?;
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(NodeMessage { msg: Some(node_message::Msg::Hello(h)) }))) => h,
            Ok(Some(Err(e))) => return Err(e),
            Ok(_) => return Err(Status::invalid_argument("the first message on a work stream must be Hello")),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
        };
        // Heard from now: the lease counts from here, so the registration
        // below is not followed by a NodeLost for the silence before it.
        self.hub.seen(&node, now_ms());
        let labels: std::collections::BTreeMap<String, String> = hello.labels.into_iter().collect();
        let known = self.state.read(|a| a.state.node(&node).filter(|n| n.lost_ms.is_none()).map(|n| n.labels.clone()));
        if known.as_ref() != Some(&labels) {
            let (outcome, _) = propose(&self.raft, None, None, Command::RegisterNode { id: node.clone(), labels }).await?;
            if let Outcome::Invalid { reason } = outcome {
                return Err(Status::invalid_argument(format!("node `{node}` cannot register: {reason}")));
            }
        }

        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let m = self.raft.metrics().borrow().clone();
        let welcome = LeaderMessage {
            msg: Some(leader_message::Msg::Welcome(Welcome {
                leader_id: m.id,
                term: m.current_term,
                heartbeat_ms: HEARTBEAT.as_millis() as u64,
            })),
        };
        tx.send(Ok(welcome)).await.map_err(|_| Status::cancelled("node went away"))?;
        // Before any new work: tell the node what it no longer owns.
        let running: Vec<leader::StepKey> = hello.running.iter().map(core_key).collect();
        let forgets = self.state.read(|a| leader::forgets(&a.state, &node, &running));
        for f in forgets {
            tracing::info!(%node, deployment = %f.deployment, destination = %f.destination, reason = %f.reason, "telling the node to forget stale work");
            let f = Forget { deployment: f.deployment, destination: f.destination, token: f.token, epoch: f.epoch, reason: f.reason };
            let msg = LeaderMessage { msg: Some(leader_message::Msg::Forget(f)) };
            tx.send(Ok(msg)).await.map_err(|_| Status::cancelled("node went away"))?;
        }
        let conn_id = self.hub.connect(&node, tx, &hello.running, now_ms());
        tracing::info!(%node, running = hello.running.len(), "node connected");

        let (raft, hub, state) = (self.raft.clone(), self.hub.clone(), self.state.clone());
        tokio::spawn(async move {
            loop {
                match inbound.next().await {
                    Some(Ok(NodeMessage { msg: Some(node_message::Msg::Heartbeat(_)) })) => hub.seen(&node, now_ms()),
                    Some(Ok(NodeMessage { msg: Some(node_message::Msg::Report(r)) })) => {
                        let now = now_ms();
                        hub.seen(&node, now);
                        hub.report(&node, crate::sync::node_report(r, now));
                    }
                    Some(Ok(NodeMessage { msg: Some(node_message::Msg::Result(r)) })) => {
                        hub.seen(&node, now_ms());
                        // Concurrently: results of different deployments
                        // are independent, and group commit batches them.
                        let (raft, hub, state, node) = (raft.clone(), hub.clone(), state.clone(), node.clone());
                        tokio::spawn(async move { handle_result(&raft, &hub, &state, &node, r).await });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::info!(%node, error = %e, "work stream broke");
                        break;
                    }
                    None => break,
                }
            }
            hub.disconnect(&node, conn_id);
            tracing::info!(%node, "node disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn core_key(k: &fleet_proto::StepKey) -> leader::StepKey {
    leader::StepKey {
        deployment: k.deployment.clone(),
        step: k.step as usize,
        undo: k.undo,
        attempt: k.attempt,
        token: k.token,
        epoch: k.epoch,
    }
}

/// Commit one step result through Raft.
///
/// A node re-sends its recent results on every new stream; results the
/// state machine would refuse (`Deployment::check`: stale token, epoch,
/// step or attempt, or an ended deployment) are dropped here without a Raft
/// entry, so a reconnect does not flood the log and the awaited result is
/// not queued behind them.
///
/// A failure whose error class this coordinator does not know (unset, or
/// added by a newer node) is refused, never guessed: the class decides the
/// retry policy. It is logged and not proposed; the step stays in flight,
/// so it is not sent again, and the node re-sends the result on its next
/// stream, which a coordinator that knows the class records. Until then the
/// deployment waits for that result.
async fn handle_result(raft: &Raft, hub: &Hub, state: &StateReader, node: &str, r: StepResult) {
    let Some(key) = r.key else { return };
    tracing::debug!(%node, deployment = %key.deployment, step = key.step, undo = key.undo, "step result received");
    let work = attempt_of(&key);
    let mut outcome = StepOutcome {
        step: key.step as usize,
        undo: key.undo,
        attempt: key.attempt,
        token: key.token,
        epoch: key.epoch,
        ok: r.ok,
        output: (!r.output_json.is_empty()).then_some(r.output_json),
        error: (!r.error.is_empty()).then_some(r.error),
        class: None,
        started_ms: r.started_ms,
        finished_ms: r.finished_ms,
        node: node.to_string(),
    };
    let accepted = state.read(|a| a.state.deployment(&key.deployment).is_some_and(|d| d.check(&outcome).is_ok()));
    if !accepted {
        tracing::debug!(%node, deployment = %key.deployment, step = key.step, "result not expected now; dropped");
        hub.finished_by(&work, node);
        return;
    }
    if !r.ok {
        match class_from_wire(r.error_class) {
            Ok(class) => outcome.class = Some(class),
            Err(e) => {
                tracing::error!(%node, deployment = %key.deployment, step = key.step, error = %e, "failed step result refused");
                return;
            }
        }
    }
    // A result the node sends again (after a reconnect, or to a new
    // leader) is refused by the engine itself once one copy is applied
    // (`Deployment::check`: its step and attempt are no longer the ones
    // expected; `apply_properties` checks this over random histories), so
    // results carry no request id: no dedup record is written, kept for ten
    // minutes and deleted on every coordinator for each step.
    let took = std::time::Duration::from_millis(outcome.finished_ms.saturating_sub(outcome.started_ms).max(0) as u64);
    let (ok, undo) = (outcome.ok, outcome.undo);
    let command = Command::StepResult { deployment: key.deployment.clone(), outcome };
    match propose(raft, None, None, command).await {
        Ok((Outcome::Stale { reason }, _)) => {
            tracing::info!(%node, deployment = %key.deployment, step = key.step, token = key.token, %reason, "stale step result ignored");
            hub.finished_by(&work, node);
        }
        Ok(_) => {
            let adapter = state
                .read(|a| a.state.deployment(&key.deployment).and_then(|d| d.steps.get(key.step as usize)).map(|s| s.plan.adapter.clone()));
            crate::metrics::step_recorded(adapter.as_deref().unwrap_or("unknown"), ok, undo, took);
            hub.finished(&work);
        }
        // Not the leader any more: the node sends it again to the next one.
        Err(e) => tracing::warn!(%node, deployment = %key.deployment, error = %e.message(), "step result not committed"),
    }
}
