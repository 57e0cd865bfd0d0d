//! The `Control` gRPC service: what `fleetctl` calls.
//!
//! Writes are proposed on the leader; a follower answers `UNAVAILABLE` with
//! the leader's address in the `fleet-leader` metadata key, and the client
//! follows it. Reads of lock state are linearizable (the leader confirms it
//! still leads before answering).

use std::collections::BTreeSet;
use std::time::Duration;

use fleet_core::auth::Access;
use fleet_core::{Command, LockView, Response as Outcome};
use fleet_proto::control_server::Control;
use fleet_proto::*;
use openraft::error::RaftError;
use openraft::{BasicNode, ChangeMembers, ServerState};
use tonic::{Request, Response, Status};

use crate::propose::{leader_redirect_if_follower, propose, redirect, write_error};
use crate::raft_types::{NodeId, Raft};
use crate::store::sm::StateReader;
use crate::tls::{authorize, KnownCaller};
use fleet_net::wire::bounded;

/// The longest a lock acquire may wait on the server.
const MAX_LOCK_WAIT: Duration = Duration::from_secs(3600);

pub struct ControlService {
    raft: Raft,
    state: StateReader,
    cluster_id: String,
    hub: std::sync::Arc<crate::hub::Hub>,
}

impl ControlService {
    pub fn new(raft: Raft, state: StateReader, cluster_id: String, hub: std::sync::Arc<crate::hub::Hub>) -> Self {
        ControlService { raft, state, cluster_id, hub }
    }

    pub(crate) fn raft(&self) -> &Raft {
        &self.raft
    }

    pub(crate) fn state(&self) -> &StateReader {
        &self.state
    }

    pub(crate) fn hub(&self) -> &crate::hub::Hub {
        &self.hub
    }

    /// A request id scoped by its caller (see [`scoped_id`]).
    pub(crate) fn scoped(&self, holder: &str, id: &str) -> Option<String> {
        scoped_id(holder, id)
    }

    /// Propose `command` for `who` (recorded in the audit log).
    pub(crate) async fn propose(&self, who: &KnownCaller, request_id: Option<String>, command: Command) -> Result<(Outcome, u64), Status> {
        // Scoped ids are `<caller>/<client id>[#attempt]`: bound them before
        // they are written to the log (and remembered for dedup).
        if let Some(id) = request_id.as_deref().filter(|id| id.len() > MAX_REQUEST_ID_LEN) {
            return Err(Status::invalid_argument(format!(
                "request id is {} bytes; keep it under 256 (fleetctl makes a fresh one per call)",
                id.len()
            )));
        }
        // An id already used for another kind of command is refused before
        // it reaches the log (the state machine checks again when it applies).
        if let Some(reason) = request_id.as_deref().and_then(|id| self.state.read(|a| a.state.request_id_conflict(id, &command))) {
            return Err(Status::already_exists(reason));
        }
        propose(&self.raft, Some(who.origin()), request_id, command).await
    }

    /// Wait until `destination` is free (or held by `holder`), or `deadline`.
    /// Returns false at the deadline.
    async fn wait_free(&self, destination: &str, holder: &str, deadline: tokio::time::Instant) -> bool {
        let mut applied = self.state.applied_index();
        loop {
            applied.borrow_and_update();
            let free = self.state.read(|a| a.state.lock(destination).is_none_or(|l| l.holder == holder));
            if free {
                return true;
            }
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    fn members(&self, leader_view: bool) -> Vec<Member> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let last = m.last_log_index.unwrap_or(0);
        membership
            .nodes()
            .map(|(id, node)| {
                let matched = if *id == m.id {
                    Some(last)
                } else {
                    m.replication.as_ref().and_then(|r| r.get(id)).map(|l| l.map(|l| l.index).unwrap_or(0))
                };
                let role = if m.current_leader == Some(*id) {
                    "leader"
                } else if !voters.contains(id) {
                    "learner"
                } else if leader_view || *id == m.id {
                    "follower"
                } else {
                    "unknown"
                };
                Member {
                    id: *id,
                    addr: node.addr.clone(),
                    kind: if voters.contains(id) { "voter" } else { "learner" }.into(),
                    role: role.into(),
                    matched_index: matched.unwrap_or(0),
                    lag: matched.map(|x| last.saturating_sub(x)).unwrap_or(u64::MAX),
                }
            })
            .collect()
    }

    async fn change_membership(&self, change: ChangeMembers<NodeId, BasicNode>) -> Result<Response<MembershipReply>, Status> {
        match self.raft.change_membership(change, false).await {
            Ok(r) => Ok(Response::new(MembershipReply { members: self.members(true), applied_index: r.log_id.index })),
            Err(e) => Err(write_error(e)),
        }
    }

    pub(crate) fn leader_redirect_if_follower(&self) -> Result<(), Status> {
        leader_redirect_if_follower(&self.raft)
    }
}

fn lock_pb(l: &LockView) -> Lock {
    Lock {
        destination: l.destination.clone(),
        holder: l.holder.clone(),
        reason: l.reason.to_string(),
        since_ms: l.since_ms,
        fencing_token: l.fencing_token,
    }
}

fn lock_reply(outcome: Outcome, applied_index: u64) -> Result<Response<LockReply>, Status> {
    let (o, lock) = match outcome {
        Outcome::Granted { lock } => (LockOutcome::Granted, Some(lock_pb(&lock))),
        Outcome::Held { lock } => (LockOutcome::Held, Some(lock_pb(&lock))),
        Outcome::Released { .. } => (LockOutcome::Released, None),
        Outcome::NotHeld { .. } => (LockOutcome::NotHeld, None),
        Outcome::NotOwner { lock } => (LockOutcome::NotOwner, Some(lock_pb(&lock))),
        Outcome::Invalid { reason } => return Err(Status::invalid_argument(reason)),
        other => return Err(Status::internal(format!("a lock command was answered with {other:?}"))),
    };
    Ok(Response::new(LockReply { outcome: o as i32, lock, applied_index }))
}

/// Longest scoped request id: a caller name (at most 64), `/`, a client id
/// of at most 256 bytes and a lock attempt suffix.
const MAX_REQUEST_ID_LEN: usize = 64 + 1 + 256 + 16;

/// Request ids are scoped by the caller, so one client can never be
/// answered with another client's recorded response.
fn scoped_id(holder: &str, id: &str) -> Option<String> {
    (!id.is_empty()).then(|| format!("{holder}/{id}"))
}

fn validate(destination: &str) -> Result<(), Status> {
    fleet_core::names::validate_name("destination", destination).map_err(|e| Status::invalid_argument(e.to_string()))
}

type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<DeploymentReply, Status>>;

#[tonic::async_trait]
impl Control for ControlService {
    type WatchDeploymentStream = WatchStream;

    async fn submit_deployment(&self, req: Request<SubmitDeploymentRequest>) -> Result<Response<DeploymentReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "deploy")?;
            self.submit(&who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn get_deployment(&self, req: Request<GetDeploymentRequest>) -> Result<Response<DeploymentReply>, Status> {
        async move {
            authorize(&req, Access::Read, "status")?;
            self.get(&req.into_inner().id).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn list_deployments(&self, req: Request<ListDeploymentsRequest>) -> Result<Response<ListDeploymentsReply>, Status> {
        async move {
            authorize(&req, Access::Read, "list")?;
            self.list(req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn watch_deployment(&self, req: Request<GetDeploymentRequest>) -> Result<Response<WatchStream>, Status> {
        async move {
            authorize(&req, Access::Read, "watch")?;
            self.watch(req.into_inner().id).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn cancel_deployment(&self, req: Request<CancelDeploymentRequest>) -> Result<Response<DeploymentReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "cancel")?;
            self.cancel(&who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn rollback_deployment(&self, req: Request<RollbackDeploymentRequest>) -> Result<Response<DeploymentReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "rollback")?;
            self.rollback(&who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn resolve_deployment(&self, req: Request<ResolveDeploymentRequest>) -> Result<Response<DeploymentReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "resolve")?;
            self.resolve(&who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn promote_deployment(&self, req: Request<PromoteDeploymentRequest>) -> Result<Response<DeploymentReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "promote")?;
            self.promote_canary(&who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn apply_destinations(&self, req: Request<ApplyDestinationsRequest>) -> Result<Response<DestinationsReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "destinations apply")?;
            ControlService::apply_destinations(self, &who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn list_destinations(&self, req: Request<ListDestinationsRequest>) -> Result<Response<DestinationsReply>, Status> {
        async move {
            authorize(&req, Access::Read, "destinations")?;
            ControlService::list_destinations(self).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn remove_destination(&self, req: Request<RemoveDestinationRequest>) -> Result<Response<DestinationsReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "destinations remove")?;
            ControlService::remove_destination(self, &who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn list_servers(&self, req: Request<ListServersRequest>) -> Result<Response<ServersReply>, Status> {
        async move {
            authorize(&req, Access::Read, "servers")?;
            ControlService::list_servers(self, req.into_inner()).map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn list_nodes(&self, req: Request<ListNodesRequest>) -> Result<Response<NodesReply>, Status> {
        async move {
            authorize(&req, Access::Read, "nodes")?;
            ControlService::list_nodes(self).map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn acquire_lock(&self, req: Request<AcquireLockRequest>) -> Result<Response<LockReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "lock acquire")?;
            let holder = who.name.clone();
            let r = req.into_inner();
            validate(&r.destination)?;
            fleet_core::names::validate_text("reason", &r.reason, fleet_core::names::MAX_REASON_LEN)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let wait = Duration::from_millis(r.wait_ms).min(MAX_LOCK_WAIT);
            let deadline = tokio::time::Instant::now() + wait;
            // Each attempt has its own id: a retried RPC replays the attempts
            // already applied (same answers) and only then proposes new ones.
            let mut attempt = 0u32;
            loop {
                let id = scoped_id(&holder, &r.request_id).map(|id| format!("{id}#{attempt}"));
                let command = Command::AcquireLock { destination: r.destination.clone(), holder: holder.clone(), reason: r.reason.clone() };
                let (outcome, index) = self.propose(&who, id, command).await?;
                let held = matches!(outcome, Outcome::Held { .. });
                if !held || wait.is_zero() || !self.wait_free(&r.destination, &holder, deadline).await {
                    return lock_reply(outcome, index);
                }
                attempt += 1;
            }
        }
        .await
        .map_err(bounded)
    }

    async fn release_lock(&self, req: Request<ReleaseLockRequest>) -> Result<Response<LockReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "lock release")?;
            let holder = who.name.clone();
            let r = req.into_inner();
            validate(&r.destination)?;
            let command = Command::ReleaseLock { destination: r.destination.clone(), holder: holder.clone() };
            let (outcome, index) = self.propose(&who, scoped_id(&holder, &r.request_id), command).await?;
            lock_reply(outcome, index)
        }
        .await
        .map_err(bounded)
    }

    async fn lock_status(&self, req: Request<LockStatusRequest>) -> Result<Response<LockStatusReply>, Status> {
        async move {
            authorize(&req, Access::Read, "lock status")?;
            let r = req.into_inner();
            if !r.destination.is_empty() {
                validate(&r.destination)?;
            }
            match self.raft.ensure_linearizable().await {
                Ok(_) => {}
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => return Err(redirect(&f)),
                Err(e) => return Err(Status::unavailable(format!("{e}; retry in a moment"))),
            }
            let (locks, applied_index) = self.state.read(|a| {
                let locks = if r.destination.is_empty() {
                    a.state.locks().map(lock_pb).collect()
                } else {
                    a.state.lock(&r.destination).map(lock_pb).into_iter().collect()
                };
                (locks, a.last_applied.map(|l| l.index).unwrap_or(0))
            });
            Ok(Response::new(LockStatusReply { locks, applied_index }))
        }
        .await
        .map_err(bounded)
    }

    async fn cluster_status(&self, req: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatusReply>, Status> {
        async move {
            authorize(&req, Access::Read, "cluster status")?;
            let local = req.into_inner().local;
            if !local {
                self.leader_redirect_if_follower()?;
            }
            let m = self.raft.metrics().borrow().clone();
            let members = self.members(m.state == ServerState::Leader);
            // The commit index is the highest index a majority of voters hold.
            let voters: Vec<&Member> = members.iter().filter(|x| x.kind == "voter").collect();
            let commit_index = if m.state == ServerState::Leader && !voters.is_empty() {
                let mut matched: Vec<u64> = voters.iter().map(|x| x.matched_index).collect();
                matched.sort_unstable_by(|a, b| b.cmp(a));
                matched[voters.len() / 2]
            } else {
                m.last_applied.map(|l| l.index).unwrap_or(0)
            };
            let leader_addr =
                m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())).unwrap_or_default();
            Ok(Response::new(ClusterStatusReply {
                cluster_id: self.cluster_id.clone(),
                leader_id: m.current_leader.unwrap_or(0),
                leader_addr,
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                commit_index,
                applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
                purged_index: m.purged.map(|l| l.index).unwrap_or(0),
                members,
                answered_by: m.id,
                locks: self.state.read(|a| a.state.locks().count() as u64),
                snapshot_bytes: self.state.snapshot_bytes(),
            }))
        }
        .await
        .map_err(bounded)
    }

    async fn add_learner(&self, req: Request<AddLearnerRequest>) -> Result<Response<MembershipReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "cluster add-learner")?;
            let r = req.into_inner();
            if r.id == 0 {
                return Err(Status::invalid_argument("coordinator ids start at 1"));
            }
            r.addr
                .parse::<std::net::SocketAddr>()
                .map_err(|e| Status::invalid_argument(format!("address `{}` is not HOST:PORT with an IP host: {e}", r.addr)))?;
            // Blocking: answer once the leader has replicated to the learner
            // (through a snapshot when the log it needs was purged). The
            // learner may still be applying a large snapshot then (measured:
            // answered after 0.12 s, applied after 8 s, for 162 MiB).
            let target = format!("{} at {}", r.id, r.addr);
            match self.raft.add_learner(r.id, BasicNode::new(r.addr), true).await {
                Ok(resp) => {
                    self.record_action(&who, "cluster.add_learner", target, "ok".into()).await;
                    Ok(Response::new(MembershipReply { members: self.members(true), applied_index: resp.log_id.index }))
                }
                Err(e) => Err(write_error(e)),
            }
        }
        .await
        .map_err(bounded)
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<MembershipReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "cluster promote")?;
            let id = req.into_inner().id;
            let reply = self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await?;
            self.record_action(&who, "cluster.promote", id.to_string(), "ok".into()).await;
            Ok(reply)
        }
        .await
        .map_err(bounded)
    }

    async fn remove_member(&self, req: Request<RemoveMemberRequest>) -> Result<Response<MembershipReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "cluster remove")?;
            let id = req.into_inner().id;
            let is_voter = self.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == id);
            let change =
                if is_voter { ChangeMembers::RemoveVoters(BTreeSet::from([id])) } else { ChangeMembers::RemoveNodes(BTreeSet::from([id])) };
            let reply = self.change_membership(change).await?;
            self.record_action(&who, "cluster.remove", id.to_string(), "ok".into()).await;
            Ok(reply)
        }
        .await
        .map_err(bounded)
    }

    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<TokensReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "tokens create")?;
            ControlService::create_token(self, &who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn list_tokens(&self, req: Request<ListTokensRequest>) -> Result<Response<TokensReply>, Status> {
        async move {
            authorize(&req, Access::Read, "tokens list")?;
            ControlService::list_tokens(self).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn revoke_token(&self, req: Request<RevokeTokenRequest>) -> Result<Response<TokensReply>, Status> {
        async move {
            let who = authorize(&req, Access::Write, "tokens revoke")?;
            ControlService::revoke_token(self, &who, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }

    async fn list_audit(&self, req: Request<ListAuditRequest>) -> Result<Response<AuditReply>, Status> {
        async move {
            authorize(&req, Access::Read, "history --audit")?;
            ControlService::list_audit(self, req.into_inner()).await.map(Response::new)
        }
        .await
        .map_err(bounded)
    }
}
