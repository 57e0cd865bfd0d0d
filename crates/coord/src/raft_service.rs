//! The server side of the Raft RPCs: only coordinator certificates may call.

use std::pin::Pin;
use std::sync::Arc;

use fleet_core::auth::Access;
use fleet_proto::raft_server::Raft as RaftRpc;
use fleet_proto::{LeadingReply, LeadingRequest, RaftPayload};
use futures::Stream;
use openraft::raft::AppendEntriesResponse;
use openraft::ServerState;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::leader_watch::Contact;
use crate::raft_types::Raft;
use crate::tls::authorize;

pub struct RaftService {
    raft: Raft,
    /// When an AppendEntries was last accepted (for the leader watch).
    contact: Arc<Contact>,
}

impl RaftService {
    pub fn new(raft: Raft, contact: Arc<Contact>) -> Self {
        RaftService { raft, contact }
    }
}

type LeadingStream = Pin<Box<dyn Stream<Item = Result<LeadingReply, Status>> + Send>>;

fn decode<T: DeserializeOwned>(req: Request<RaftPayload>, call: &str) -> Result<(T, Vec<u8>), Status> {
    authorize(&req, Access::Peer, call)?;
    let payload = req.into_inner();
    let msg = serde_json::from_slice(&payload.data).map_err(|e| Status::invalid_argument(format!("{call}: bad payload: {e}")))?;
    Ok((msg, payload.chunk))
}

fn encode<T: Serialize, E: Serialize>(result: Result<T, E>) -> Result<Response<RaftPayload>, Status> {
    let data = serde_json::to_vec(&result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { data, chunk: Vec::new() }))
}

/// One AppendEntries, from decoding its payload to encoding its answer;
/// the same for a unary call and for each message of a stream.
async fn append(raft: &Raft, contact: &Contact, payload: RaftPayload) -> Result<RaftPayload, Status> {
    let started = std::time::Instant::now();
    let rpc: openraft::raft::AppendEntriesRequest<crate::raft_types::TypeConfig> =
        serde_json::from_slice(&payload.data).map_err(|e| Status::invalid_argument(format!("Raft.AppendEntries: bad payload: {e}")))?;
    let carries_entries = !rpc.entries.is_empty();
    let result = raft.append_entries(rpc).await;
    // Any answer but HigherVote means the sender's vote was accepted:
    // it is the leader this coordinator follows, heard from now.
    if matches!(&result, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
        contact.touch();
    }
    let answer = encode(result).map(Response::into_inner);
    if carries_entries {
        crate::observe::Stage::FollowerAppend.observe(started.elapsed());
    }
    answer
}

type AppendStream = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send>>;

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        authorize(&req, Access::Peer, "Raft.AppendEntries")?;
        append(&self.raft, &self.contact, req.into_inner()).await.map(Response::new)
    }

    type AppendEntriesStreamStream = AppendStream;

    async fn append_entries_stream(&self, req: Request<tonic::Streaming<RaftPayload>>) -> Result<Response<AppendStream>, Status> {
        authorize(&req, Access::Peer, "Raft.AppendEntriesStream")?;
        let inbound = req.into_inner();
        let (raft, contact) = (self.raft.clone(), self.contact.clone());
        // Answered in order, one request at a time, on the task that sends
        // the answers: the leader sends the next request only after the
        // answer to the last (openraft 0.9 replicates without pipelining).
        // A bad payload ends the stream with its error; so does the leader
        // closing its side.
        let answers = futures::stream::unfold(Some((inbound, raft, contact)), |open| async move {
            let (mut inbound, raft, contact) = open?;
            let payload = match inbound.message().await {
                Ok(Some(p)) => p,
                Ok(None) => return None,
                Err(status) => return Some((Err(status), None)),
            };
            match append(&raft, &contact, payload).await {
                Ok(answer) => Some((Ok(answer), Some((inbound, raft, contact)))),
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (rpc, _) = decode(req, "Raft.Vote")?;
        encode(self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (mut rpc, chunk): (openraft::raft::InstallSnapshotRequest<crate::raft_types::TypeConfig>, _) =
            decode(req, "Raft.InstallSnapshot")?;
        rpc.data = chunk;
        encode(self.raft.install_snapshot(rpc).await)
    }

    type LeadingStream = LeadingStream;

    async fn leading(&self, req: Request<LeadingRequest>) -> Result<Response<LeadingStream>, Status> {
        authorize(&req, Access::Peer, "Raft.Leading")?;
        let term = req.into_inner().term;
        // Server metrics: they change with role and vote, not with each write.
        let mut metrics = self.raft.server_metrics();
        let leads = move |m: &crate::raft_types::ServerMetrics| m.state == ServerState::Leader && m.vote.leader_id().get_term() == term;
        if !leads(&metrics.borrow_and_update()) {
            return Err(Status::failed_precondition(format!("this coordinator does not lead term {term}")));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Ok(LeadingReply { term })).await.map_err(|_| Status::cancelled("the follower went away"))?;
        // Held while this coordinator leads `term`; dropped (the stream
        // ends) when it stops, or when the follower goes away.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    r = metrics.changed() => {
                        if r.is_err() || !leads(&metrics.borrow_and_update()) {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
