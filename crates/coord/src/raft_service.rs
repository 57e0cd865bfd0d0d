//! The server side of the Raft RPCs: only coordinator certificates may call.

use fleet_core::auth::Access;
use fleet_proto::raft_server::Raft as RaftRpc;
use fleet_proto::RaftPayload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::raft_types::Raft;
use crate::tls::authorize;

pub struct RaftService {
    raft: Raft,
}

impl RaftService {
    pub fn new(raft: Raft) -> Self {
        RaftService { raft }
    }
}

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

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (rpc, _) = decode(req, "Raft.AppendEntries")?;
        encode(self.raft.append_entries(rpc).await)
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
}
