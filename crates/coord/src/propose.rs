//! Proposing through Raft and sending callers to the leader: the one place
//! where openraft's write errors become gRPC statuses. Used by the Control
//! service, the Worker service and the leader's scheduler alike.
//!
//! Proposals are batched. Every caller's request goes into one queue; a
//! task takes whatever is waiting (up to [`MAX_BATCH`]) and writes it as
//! ONE log entry, so one append, one fsync on each coordinator and one
//! replication round answer all of them. At most [`IN_FLIGHT`] entries are
//! being written at once: while they are, new requests gather into the
//! next one, so a busy leader writes few large entries. When nothing is
//! being written at all, a caller writes its request itself at once: a
//! lone request never waits for a batch, nor pays a hop through the task. Each
//! request still gets its own answer and its own sequence number (see
//! `fleet_core::State::apply`); a request is acknowledged only once its
//! entry is committed, as before.

use std::sync::Arc;

use fleet_core::{Command, Origin, Proposal, Request as Cmd, Response as Outcome};
use fleet_net::{now_ms, LEADER_METADATA};
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, ServerState};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

use crate::raft_types::{NodeId, Queue, Raft, TypeConfig, Waiting, Written};

/// Requests in one log entry at most (bounds an entry's size and its apply).
pub const MAX_BATCH: usize = 64;
/// Entries being written at once. Two let the leader append the next entry
/// while the previous one is being replicated.
pub const IN_FLIGHT: usize = 2;

/// Wrap a started openraft instance and start its proposer task (it ends
/// when the last handle is dropped).
pub fn start(inner: openraft::Raft<TypeConfig>) -> Raft {
    let (tx, rx) = mpsc::unbounded_channel();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    tokio::spawn(batch(inner.clone(), rx, slots.clone()));
    Raft { inner, proposals: Queue { tx, slots } }
}

/// Take what is waiting, write it as one entry, repeat; never more than
/// [`IN_FLIGHT`] entries at once. Ends when every [`Queue`] is dropped.
async fn batch(raft: openraft::Raft<TypeConfig>, mut queue: mpsc::UnboundedReceiver<Waiting>, slots: Arc<Semaphore>) {
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        // Whatever arrived while the slot was busy joins this entry.
        let mut waiting = vec![first];
        while waiting.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(w) => waiting.push(w),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write(&raft, waiting).await;
            drop(slot);
        });
    }
}

async fn write(raft: &openraft::Raft<TypeConfig>, waiting: Vec<Waiting>) {
    let (requests, replies): (Vec<Cmd>, Vec<_>) = waiting.into_iter().map(|w| (w.request, w.reply)).unzip();
    for (reply, answer) in replies.into_iter().zip(write_entry(raft, requests).await) {
        // A caller that gave up is fine: its request was applied anyway.
        let _ = reply.send(answer);
    }
}

/// Write `requests` as one log entry: one answer per request, in order.
async fn write_entry(raft: &openraft::Raft<TypeConfig>, requests: Vec<Cmd>) -> Vec<Written> {
    let n = requests.len();
    crate::metrics::entry_proposed(n);
    let failed = |status: Status| vec![Err(status); n];
    let started = std::time::Instant::now();
    match raft.client_write(Proposal(requests)).await {
        Ok(r) if r.data.len() == n => {
            let index = r.log_id.index;
            tracing::debug!(requests = n, index, took_us = started.elapsed().as_micros() as u64, "entry committed");
            r.data.into_iter().map(|outcome| Ok((outcome, index))).collect()
        }
        Ok(r) => failed(Status::internal(format!(
            "the state machine answered {} of {n} requests in entry {}; this is a bug, please report it",
            r.data.len(),
            r.log_id.index
        ))),
        Err(e) => failed(write_error(e)),
    }
}

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
/// answers what the state machine answered and the index of the log entry
/// that carried it, once that entry is committed and applied. `origin` is
/// the operator who asked (recorded in the audit log); `None` for the
/// leader's and nodes' own commands.
pub(crate) async fn propose(
    raft: &Raft,
    origin: Option<Origin>,
    request_id: Option<String>,
    command: Command,
) -> Result<(Outcome, u64), Status> {
    let request = Cmd { request_id, at_ms: now_ms(), command, origin };
    let started = std::time::Instant::now();
    let q = &raft.proposals;
    // Nothing being written: write alone, now. (Dropped with its caller,
    // the slot comes back; only this request was in the entry.)
    let alone = (q.slots.available_permits() == IN_FLIGHT).then(|| q.slots.clone().try_acquire_owned().ok()).flatten();
    let written = match alone {
        Some(_slot) => {
            write_entry(raft, vec![request]).await.pop().unwrap_or_else(|| Err(Status::internal("no answer for a lone request")))
        }
        None => {
            let (reply, answer) = oneshot::channel();
            let stopped = || Status::unavailable("this coordinator is shutting down; use another address");
            q.tx.send(Waiting { request, reply }).map_err(|_| stopped())?;
            answer.await.unwrap_or_else(|_| Err(stopped()))
        }
    };
    match &written {
        Ok(_) => crate::metrics::proposal_committed(started.elapsed()),
        Err(_) => crate::metrics::proposal_failed(),
    }
    written
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
