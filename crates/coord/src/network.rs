//! Raft RPCs to other coordinators over gRPC + mTLS.
//!
//! openraft's request and response types travel as JSON inside
//! `RaftPayload`; the reply carries `Result<Response, RaftError>` so a
//! remote Raft error comes back as itself, not as a transport failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_proto::raft_client::RaftClient;
use fleet_proto::RaftPayload;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::raft_types::{NodeId, TypeConfig};
use crate::tls::TlsMaterial;

/// How long to wait for a TCP + TLS connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Largest gRPC message between coordinators (snapshot chunks are smaller).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// One channel per peer address, shared by every client openraft makes.
/// openraft 0.9 asks for a new client per replication stream and for
/// every leadership check (each linearizable read sends a round of
/// heartbeats through fresh clients); without this, each of those paid a
/// TCP connect and an mTLS handshake.
type Channels = Arc<Mutex<HashMap<String, Channel>>>;

#[derive(Clone)]
pub struct Network {
    tls: TlsMaterial,
    channels: Channels,
}

impl Network {
    pub fn new(tls: TlsMaterial) -> Self {
        Network { tls, channels: Channels::default() }
    }
}

/// Build a lazily connecting channel to `addr` ("host:port") over mTLS.
pub fn channel(tls: &TlsMaterial, addr: &str) -> Result<Channel, fleet_net::TlsError> {
    Ok(tls
        .endpoint(addr, CONNECT_TIMEOUT)?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    client: Option<RaftClient<Channel>>,
    tls: TlsMaterial,
    channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient { target, addr: node.addr.clone(), client: None, tls: self.tls.clone(), channels: self.channels.clone() }
    }
}

impl PeerClient {
    fn client(&mut self) -> Result<RaftClient<Channel>, Unreachable> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let ch = {
            let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            match channels.get(&self.addr) {
                Some(ch) => ch.clone(),
                None => {
                    let ch = channel(&self.tls, &self.addr).map_err(|e| Unreachable::new(&e))?;
                    channels.insert(self.addr.clone(), ch.clone());
                    ch
                }
            }
        };
        let c = RaftClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn call<Req, Resp, E>(
        &mut self,
        rpc: &'static str,
        req: &Req,
        chunk: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let mut request = tonic::Request::new(RaftPayload { data, chunk });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                return Err(match status.code() {
                    // Connection refused, reset, TLS failure: the peer is not there.
                    tonic::Code::Unavailable | tonic::Code::Unknown => {
                        // Drop the channel so the next call reconnects (the
                        // peer may come back on the same address).
                        self.client = None;
                        self.channels.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.addr);
                        RPCError::Unreachable(Unreachable::new(&status))
                    }
                    _ => RPCError::Network(NetworkError::new(&status)),
                });
            }
        };
        let result: Result<Resp, E> = serde_json::from_slice(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Heartbeats (no entries) are not a write's stage.
        let started = (!rpc.entries.is_empty()).then(std::time::Instant::now);
        let result = self.call("append", &rpc, Vec::new(), &option).await;
        if let Some(started) = started {
            crate::observe::Stage::Replicate.observe(started.elapsed());
        }
        result
    }

    async fn install_snapshot(
        &mut self,
        mut rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>> {
        let chunk = std::mem::take(&mut rpc.data);
        self.call("snapshot", &rpc, chunk, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, Vec::new(), &option).await
    }
}
