//! Proposing through Raft and sending callers to the leader: the one place
//! where openraft's write errors become gRPC statuses. Used by the Control
//! service, the Worker service and the leader's scheduler alike.

use fleet_core::{Command, Origin, Request as Cmd, Response as Outcome};
use fleet_net::{now_ms, LEADER_METADATA};
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, ServerState};
use tonic::Status;

use crate::raft_types::{NodeId, Raft};

/// `Ok` on the leader; a redirect to the leader elsewhere.
pub(crate) fn leader_redirect_if_follower(raft: &Raft) -> Result<(), Status> {
    let m = raft.metrics().borrow().clone();
    if m.state == ServerState::Leader {
        return Ok(());
    }
    let leader_node = m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).cloned());
    Err(redirect(&ForwardToLeader { leader_id: m.current_leader, leader_node }))
}

/// Propose `command` through Raft on this coordinator (it must lead);
/// answers what the state machine answered and the entry's log index.
/// `origin` is the operator who asked (recorded in the audit log); `None`
/// for the leader's and nodes' own commands.
pub(crate) async fn propose(
    raft: &Raft,
    origin: Option<Origin>,
    request_id: Option<String>,
    command: Command,
) -> Result<(Outcome, u64), Status> {
    let req = Cmd { request_id, at_ms: now_ms(), command, origin };
    let started = std::time::Instant::now();
    let written = raft.client_write(req).await;
    match &written {
        Ok(_) => crate::metrics::proposal_committed(started.elapsed()),
        Err(_) => crate::metrics::proposal_failed(),
    }
    match written {
        Ok(r) => Ok((r.data, r.log_id.index)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(redirect(&f)),
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => Err(Status::failed_precondition(e.to_string())),
        Err(RaftError::Fatal(e)) => Err(Status::unavailable(format!("this coordinator stopped serving: {e}; use another address"))),
    }
}

pub(crate) fn redirect(f: &ForwardToLeader<NodeId, BasicNode>) -> Status {
    match &f.leader_node {
        Some(node) => {
            let mut s = Status::unavailable(format!(
                "not the leader; the leader is coordinator {} at {}",
                f.leader_id.map(|i| i.to_string()).unwrap_or_default(),
                node.addr
            ));
            if let Ok(v) = node.addr.parse() {
                s.metadata_mut().insert(LEADER_METADATA, v);
            }
            s
        }
        None => Status::unavailable("no leader is elected right now; retry in a moment (an election takes about a second)"),
    }
}

pub(crate) fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => redirect(&f),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Status::failed_precondition(format!("{e}; check `fleetctl cluster status` and try again"))
        }
        RaftError::Fatal(e) => Status::unavailable(format!("this coordinator stopped serving: {e}; use another address")),
    }
}
