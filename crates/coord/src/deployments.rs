//! The deployment, destination and node calls of the `Control` service.
//!
//! Manifests are validated here with the same `fleet-core` code `fleetctl`
//! runs locally, then proposed; the state machine validates again on apply.
//! Records travel as the JSON of `fleet-core`'s serde types.

use std::time::Duration;

use fleet_core::deploy::Deployment;
use fleet_core::manifest::{parse_destinations, parse_manifest, Overrides};
use fleet_core::{Command, Response as Outcome};
use fleet_proto::*;
use openraft::error::RaftError;
use tonic::Status;

use crate::control::ControlService;
use crate::propose::redirect;
use crate::tls::KnownCaller;

const DEFAULT_LIST_LIMIT: usize = 50;

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String, Status> {
    serde_json::to_string(v).map_err(|e| Status::internal(format!("encoding a record: {e}")))
}

/// A deployment as a client may see it: secret values masked.
fn deployment_json(d: &Deployment) -> Result<String, Status> {
    to_json(&d.redacted())
}

/// Map what the state machine answered to a gRPC status.
pub(crate) fn outcome_error(outcome: Outcome) -> Status {
    match outcome {
        Outcome::Invalid { reason } => Status::invalid_argument(reason),
        Outcome::Rejected { reason } => fleet_net::wire::rejected(format!("rejected: {reason}")),
        Outcome::NotFound { what } => Status::not_found(format!("no {what}")),
        other => Status::internal(format!("unexpected answer from the state machine: {other:?}")),
    }
}

/// Longest deployment id a request may name (ids look like `d42`).
const MAX_ID_LEN: usize = 64;

/// A deployment id fit to look up and to repeat in an answer.
fn check_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("deployment id is empty; `fleetctl list` shows the deployments"));
    }
    if id.len() > MAX_ID_LEN {
        let shown = fleet_core::names::shorten(id);
        return Err(Status::invalid_argument(format!(
            "deployment id `{shown}` is not an id (ids look like `d42`); `fleetctl list` shows them"
        )));
    }
    Ok(())
}

impl ControlService {
    /// Before proposing a change to deployment `id`: the leader (this
    /// coordinator, or a redirect to it) knows it. `apply` checks again;
    /// this keeps a request that can only be refused out of the Raft log.
    fn known_deployment(&self, id: &str) -> Result<(), Status> {
        check_id(id)?;
        self.leader_redirect_if_follower()?;
        self.deployment_reply(id).map(drop)
    }

    pub(crate) async fn linearizable(&self) -> Result<(), Status> {
        self.leader_redirect_if_follower()?;
        match self.raft().ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => Err(redirect(&f)),
            Err(e) => Err(Status::unavailable(format!("{e}; retry in a moment"))),
        }
    }

    fn deployment_reply(&self, id: &str) -> Result<DeploymentReply, Status> {
        self.state().read(|a| {
            let d = a
                .state
                .deployment(id)
                .ok_or_else(|| Status::not_found(format!("no deployment `{id}`; `fleetctl list` shows the deployments")))?;
            Ok(DeploymentReply { deployment_json: deployment_json(d)?, applied_index: a.last_applied.map(|l| l.index).unwrap_or(0) })
        })
    }

    pub(crate) async fn submit(&self, who: &KnownCaller, r: SubmitDeploymentRequest) -> Result<DeploymentReply, Status> {
        let actor = who.name.clone();
        let file = if r.file_name.is_empty() { "fleet.yaml" } else { r.file_name.as_str() };
        let overrides = Overrides {
            release: (!r.release.is_empty()).then_some(r.release.clone()),
            destinations: r.destinations.clone(),
            timeout_ms: (r.timeout_ms > 0).then_some(r.timeout_ms),
        };
        let spec = parse_manifest(file, &r.manifest_yaml, &overrides).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.dry_run {
            return self.dry_run(spec, actor).await;
        }
        let idempotency_key = (!r.idempotency_key.is_empty()).then(|| r.idempotency_key.clone());
        if let Some(k) = &idempotency_key {
            fleet_core::names::validate_text("idempotency key", k, 256).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let id = self.scoped(&actor, &r.request_id);
        let command = Command::SubmitDeployment {
            spec: Box::new(spec),
            actor,
            lock_wait_ms: (r.lock_wait_ms > 0).then_some(r.lock_wait_ms),
            idempotency_key,
        };
        let (outcome, _) = self.propose(who, id, command).await?;
        match outcome {
            Outcome::Deployment { id, .. } => self.deployment_reply(&id),
            other => Err(outcome_error(other)),
        }
    }

    /// Plan against the current state without proposing anything: apply
    /// the submit to a copy of the state machine and answer what it made.
    async fn dry_run(&self, spec: fleet_core::manifest::Spec, actor: String) -> Result<DeploymentReply, Status> {
        self.linearizable().await?;
        self.state().read(|a| {
            let mut copy = a.state.clone();
            let index = a.last_applied.map(|l| l.index).unwrap_or(0) + 1;
            let req = fleet_core::Request {
                request_id: None,
                at_ms: fleet_net::now_ms(),
                command: Command::SubmitDeployment { spec: Box::new(spec), actor, lock_wait_ms: None, idempotency_key: None },
                origin: None,
            };
            match copy.apply(index, &req).0 {
                Outcome::Deployment { id, .. } => {
                    let mut d = copy.deployment(&id).cloned().ok_or_else(|| Status::internal("dry run lost its deployment"))?;
                    if d.steps.is_empty() {
                        // Queued behind another deployment: plan as it would be planned now.
                        d.steps = copy.plan(&d.spec);
                    }
                    d.id = "dry-run".into();
                    Ok(DeploymentReply { deployment_json: deployment_json(&d)?, applied_index: index - 1 })
                }
                other => Err(outcome_error(other)),
            }
        })
    }

    pub(crate) async fn resolve(&self, who: &KnownCaller, r: ResolveDeploymentRequest) -> Result<DeploymentReply, Status> {
        let actor = who.name.clone();
        fleet_core::names::validate_text("note", &r.note, fleet_core::names::MAX_REASON_LEN)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.note.trim().is_empty() {
            return Err(Status::invalid_argument("a note is required: say what you checked or fixed (`--note \"...\"`)"));
        }
        self.known_deployment(&r.id)?;
        let id = self.scoped(&actor, &r.request_id);
        let (outcome, _) = self.propose(who, id, Command::ResolveDeployment { id: r.id.clone(), note: r.note.clone(), actor }).await?;
        match outcome {
            Outcome::Deployment { id, .. } => self.deployment_reply(&id),
            other => Err(outcome_error(other)),
        }
    }

    pub(crate) async fn get(&self, id: &str) -> Result<DeploymentReply, Status> {
        check_id(id)?;
        self.linearizable().await?;
        self.deployment_reply(id)
    }

    pub(crate) async fn list(&self, r: ListDeploymentsRequest) -> Result<ListDeploymentsReply, Status> {
        self.linearizable().await?;
        let limit = if r.limit == 0 { DEFAULT_LIST_LIMIT } else { r.limit as usize };
        let before = match r.before.as_str() {
            "" => None,
            b => Some(fleet_core::state::deployment_number(b).ok_or_else(|| {
                Status::invalid_argument(format!("before: `{b}` is not a deployment id (d42); pass the `next_before` of the previous page"))
            })?),
        };
        self.state().read(|a| {
            let mut out = Vec::new();
            let mut next_before = String::new();
            let mut out_last_id = String::new();
            for d in a.state.deployments_before(before) {
                if (!r.app.is_empty() && d.app != r.app) || (!r.destination.is_empty() && !d.destinations().contains(&r.destination)) {
                    continue;
                }
                if !r.state.is_empty() && d.state.as_str() != r.state {
                    continue;
                }
                if out.len() >= limit {
                    // One more matches: the next page starts below the last one shown.
                    next_before = out_last_id;
                    break;
                }
                out.push(deployment_json(d)?);
                out_last_id.clone_from(&d.id);
            }
            Ok(ListDeploymentsReply { deployments_json: out, applied_index: a.last_applied.map(|l| l.index).unwrap_or(0), next_before })
        })
    }

    /// The deployment now and after every change until it is terminal.
    /// Answered from this coordinator's applied state (any coordinator).
    pub(crate) async fn watch(
        &self,
        id: String,
    ) -> Result<tokio_stream::wrappers::ReceiverStream<Result<DeploymentReply, Status>>, Status> {
        check_id(&id)?;
        // This coordinator may be a little behind the one that acknowledged
        // the submit: give it a moment to apply before saying "no such".
        if self.deployment_reply(&id).is_err() {
            let mut applied = self.state().applied_index();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while self.deployment_reply(&id).is_err() {
                if tokio::time::timeout_at(deadline, applied.changed()).await.is_err() {
                    break;
                }
            }
            if self.deployment_reply(&id).is_err() && self.leader_redirect_if_follower().is_ok() {
                self.linearizable().await?;
            }
            self.deployment_reply(&id)?;
        }
        let state = self.state().clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut applied = state.applied_index();
            let mut last: Option<Deployment> = None;
            loop {
                applied.borrow_and_update();
                let now = state.read(|a| a.state.deployment(&id).cloned().map(|d| (d, a.last_applied.map(|l| l.index).unwrap_or(0))));
                let Some((d, index)) = now else { return };
                if last.as_ref() != Some(&d) {
                    let json = match serde_json::to_string(&d.redacted()) {
                        Ok(j) => j,
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                            return;
                        }
                    };
                    if tx.send(Ok(DeploymentReply { deployment_json: json, applied_index: index })).await.is_err() {
                        return;
                    }
                    if d.state.is_terminal() {
                        return;
                    }
                    last = Some(d);
                }
                // Wake on the next applied entry; a slow tick also notices
                // a client that went away.
                match tokio::time::timeout(Duration::from_secs(5), applied.changed()).await {
                    Ok(Err(_)) => return,
                    Ok(Ok(())) => {}
                    Err(_) if tx.is_closed() => return,
                    Err(_) => {}
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// `fleetctl promote`: a paused canary continues.
    pub(crate) async fn promote_canary(&self, who: &KnownCaller, r: PromoteDeploymentRequest) -> Result<DeploymentReply, Status> {
        let actor = who.name.clone();
        self.known_deployment(&r.id)?;
        let id = self.scoped(&actor, &r.request_id);
        let (outcome, _) = self.propose(who, id, Command::PromoteDeployment { id: r.id.clone(), actor }).await?;
        match outcome {
            Outcome::Deployment { id, .. } => self.deployment_reply(&id),
            other => Err(outcome_error(other)),
        }
    }

    pub(crate) async fn cancel(&self, who: &KnownCaller, r: CancelDeploymentRequest) -> Result<DeploymentReply, Status> {
        let actor = who.name.clone();
        let reason = if r.reason.is_empty() { format!("cancelled by {actor}") } else { r.reason.clone() };
        fleet_core::names::validate_text("reason", &reason, fleet_core::names::MAX_REASON_LEN)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.known_deployment(&r.id)?;
        let id = self.scoped(&actor, &r.request_id);
        let command = Command::CancelDeployment { id: r.id.clone(), reason, actor, timed_out: false };
        let (outcome, _) = self.propose(who, id, command).await?;
        match outcome {
            Outcome::Deployment { id, .. } => self.deployment_reply(&id),
            other => Err(outcome_error(other)),
        }
    }

    pub(crate) async fn rollback(&self, who: &KnownCaller, r: RollbackDeploymentRequest) -> Result<DeploymentReply, Status> {
        let actor = who.name.clone();
        if !r.to_release.is_empty() {
            fleet_core::names::validate_name("release", &r.to_release).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        self.known_deployment(&r.id)?;
        let id = self.scoped(&actor, &r.request_id);
        let command = Command::RollbackDeployment {
            id: r.id.clone(),
            to_release: (!r.to_release.is_empty()).then_some(r.to_release.clone()),
            timeout_ms: (r.timeout_ms > 0).then_some(r.timeout_ms),
            actor,
        };
        let (outcome, _) = self.propose(who, id, command).await?;
        match outcome {
            Outcome::Deployment { id, .. } => self.deployment_reply(&id),
            other => Err(outcome_error(other)),
        }
    }

    pub(crate) async fn apply_destinations(&self, who: &KnownCaller, r: ApplyDestinationsRequest) -> Result<DestinationsReply, Status> {
        let actor = who.name.clone();
        let file = if r.file_name.is_empty() { "destinations.yaml" } else { r.file_name.as_str() };
        let destinations = parse_destinations(file, &r.destinations_yaml).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let names: Vec<String> = destinations.iter().map(|d| d.name.clone()).collect();
        let id = self.scoped(&actor, &r.request_id);
        let (outcome, _) = self.propose(who, id, Command::PutDestinations { destinations }).await?;
        if !matches!(outcome, Outcome::Done) {
            return Err(outcome_error(outcome));
        }
        self.destinations(Some(&names))
    }

    pub(crate) async fn list_destinations(&self) -> Result<DestinationsReply, Status> {
        self.linearizable().await?;
        self.destinations(None)
    }

    fn destinations(&self, only: Option<&[String]>) -> Result<DestinationsReply, Status> {
        self.state().read(|a| {
            let mut out = Vec::new();
            for d in a.state.destinations() {
                if only.is_some_and(|o| !o.contains(&d.name)) {
                    continue;
                }
                if let Some(v) = fleet_core::views::DestinationView::of(&a.state, &d.name) {
                    out.push(to_json(&v)?);
                }
            }
            Ok(DestinationsReply { destinations_json: out, applied_index: a.last_applied.map(|l| l.index).unwrap_or(0) })
        })
    }

    /// Nodes: membership from the state machine, liveness from the leader.
    pub(crate) fn list_nodes(&self) -> Result<NodesReply, Status> {
        self.leader_redirect_if_follower()?;
        let hub = self.hub();
        self.state().read(|a| {
            let mut out = Vec::new();
            for n in a.state.nodes() {
                let live = hub.liveness(&n.id);
                let v = fleet_core::views::NodeView {
                    id: n.id.clone(),
                    labels: n.labels.clone(),
                    registered_ms: n.registered_ms,
                    lost_ms: n.lost_ms,
                    connected: live.connected,
                    connected_ms: live.connected_ms,
                    last_seen_ms: live.last_seen_ms,
                };
                out.push(to_json(&v)?);
            }
            Ok(NodesReply { nodes_json: out })
        })
    }
}
