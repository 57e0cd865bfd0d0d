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
    /// The open `AppendEntriesStream` to the peer, kept between calls.
    stream: Option<AppendStream>,
    /// The peer answered `AppendEntriesStream` with UNIMPLEMENTED (an
    /// older release): AppendEntries go as unary calls from then on.
    unary_only: bool,
}

/// One `Raft.AppendEntriesStream`: requests go in on `requests`, answers
/// come back on `answers` in the same order, one request at a time.
struct AppendStream {
    requests: tokio::sync::mpsc::Sender<RaftPayload>,
    answers: tonic::Streaming<RaftPayload>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            target,
            addr: node.addr.clone(),
            client: None,
            tls: self.tls.clone(),
            channels: self.channels.clone(),
            stream: None,
            unary_only: false,
        }
    }
}

/// openraft's result for a Raft RPC, as its `RaftNetwork` methods return
/// it (its error is large: clippy's `result_large_err` is allowed on the
/// helpers below that pass it through).
type Rpc<T, E> = Result<T, RPCError<NodeId, BasicNode, E>>;

#[allow(clippy::result_large_err)]
fn encode<Req: Serialize, E: std::error::Error>(req: &Req) -> Rpc<Vec<u8>, E> {
    serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))
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

    /// A failed call's status as openraft's error. Connection refused,
    /// reset, TLS failure: the peer is not there, and the channel is
    /// dropped so that the next call reconnects (the peer may come back
    /// on the same address).
    fn failed<E: std::error::Error>(&mut self, status: tonic::Status) -> RPCError<NodeId, BasicNode, E> {
        self.stream = None;
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                self.client = None;
                self.channels.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.addr);
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        }
    }

    /// The remote's answer, as openraft's result.
    #[allow(clippy::result_large_err)]
    fn decode<Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(&self, reply: &RaftPayload) -> Rpc<Resp, E> {
        let result: Result<Resp, E> = serde_json::from_slice(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn unary<E: std::error::Error>(&mut self, rpc: &'static str, payload: RaftPayload, option: &RPCOption) -> Rpc<RaftPayload, E> {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        match reply {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => Err(self.failed(status)),
        }
    }

    async fn call<Req, Resp, E>(&mut self, rpc: &'static str, req: &Req, chunk: Vec<u8>, option: &RPCOption) -> Rpc<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = RaftPayload { data: encode(req)?, chunk };
        let reply = self.unary(rpc, payload, option).await?;
        self.decode(&reply)
    }

    /// One AppendEntries on the peer's stream, opening it if there is none.
    ///
    /// The stream is taken out of `self` for the call and put back only
    /// once its answer is read. openraft drops a call that outlives its
    /// own timeout; the stream is dropped with it, so the late answer is
    /// never taken for the next request's.
    async fn streamed<E: std::error::Error>(&mut self, payload: RaftPayload, option: &RPCOption) -> Rpc<RaftPayload, E> {
        let deadline = tokio::time::Instant::now() + option.hard_ttl();
        let no_answer = || RPCError::Network(NetworkError::new(&std::io::Error::other("no answer on the AppendEntries stream in time")));
        let kept = match self.stream.take() {
            // The stream breaks when its connection does (the peer
            // restarted): then the request comes back, and goes on a new one.
            Some(s) => match s.requests.send(payload).await {
                Ok(()) => Ok(s),
                Err(tokio::sync::mpsc::error::SendError(payload)) => Err(payload),
            },
            None => Err(payload),
        };
        let mut stream = match kept {
            Ok(s) => s,
            Err(payload) => {
                let mut client = self.client().map_err(RPCError::Unreachable)?;
                // The first request is queued before the stream opens, so it
                // travels with the call's headers: one round trip, as a unary
                // call. Kept for a peer that does not know the stream.
                let (requests, queue) = tokio::sync::mpsc::channel(1);
                let first = payload.clone();
                requests.try_send(payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                let opened =
                    tokio::time::timeout_at(deadline, client.append_entries_stream(tokio_stream::wrappers::ReceiverStream::new(queue)));
                match opened.await {
                    Err(_) => return Err(no_answer()),
                    Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                        self.unary_only = true;
                        return self.unary("append", first, option).await;
                    }
                    Ok(Err(status)) => return Err(self.failed(status)),
                    Ok(Ok(answers)) => AppendStream { requests, answers: answers.into_inner() },
                }
            }
        };
        match tokio::time::timeout_at(deadline, stream.answers.message()).await {
            Ok(Ok(Some(answer))) => {
                self.stream = Some(stream);
                Ok(answer)
            }
            // Not put back: a late answer would be taken for the next request's.
            Err(_) => Err(no_answer()),
            Ok(Ok(None)) => Err(self.failed(tonic::Status::unavailable("the peer ended the AppendEntries stream"))),
            Ok(Err(status)) => Err(self.failed(status)),
        }
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
        let payload = RaftPayload { data: encode(&rpc)?, chunk: Vec::new() };
        let reply = if self.unary_only { self.unary("append", payload, &option).await } else { self.streamed(payload, &option).await };
        let result = match reply {
            Ok(r) => self.decode(&r),
            Err(e) => Err(e),
        };
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use fleet_proto::raft_server::{Raft as RaftRpc, RaftServer};
    use fleet_proto::{LeadingReply, LeadingRequest};
    use futures::Stream;
    use openraft::Vote;

    use super::*;

    /// A peer that answers every AppendEntries `Success` and counts how
    /// they came. `knows_stream: false` answers the stream UNIMPLEMENTED,
    /// as a coordinator of an older release does; `ends_after` ends each
    /// stream after that many answers, as a restarting peer's does.
    #[derive(Clone, Default)]
    struct FakePeer {
        knows_stream: bool,
        ends_after: usize,
        /// The second request this peer gets is answered `Conflict`, this late.
        slow_first: Option<Duration>,
        unary: Arc<AtomicUsize>,
        streams: Arc<AtomicUsize>,
        streamed: Arc<AtomicUsize>,
    }

    fn success() -> RaftPayload {
        let answer: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = Ok(AppendEntriesResponse::Success);
        RaftPayload { data: serde_json::to_vec(&answer).unwrap(), chunk: Vec::new() }
    }

    fn conflict() -> RaftPayload {
        let answer: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = Ok(AppendEntriesResponse::Conflict);
        RaftPayload { data: serde_json::to_vec(&answer).unwrap(), chunk: Vec::new() }
    }

    type Answers = Pin<Box<dyn Stream<Item = Result<RaftPayload, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl RaftRpc for FakePeer {
        async fn append_entries(&self, _: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            Ok(tonic::Response::new(success()))
        }

        type AppendEntriesStreamStream = Answers;

        async fn append_entries_stream(
            &self,
            req: tonic::Request<tonic::Streaming<RaftPayload>>,
        ) -> Result<tonic::Response<Answers>, tonic::Status> {
            self.streams.fetch_add(1, Ordering::SeqCst);
            if !self.knows_stream {
                return Err(tonic::Status::unimplemented("Raft.AppendEntriesStream"));
            }
            let (streamed, ends_after, slow_first) = (self.streamed.clone(), self.ends_after, self.slow_first);
            let answers = futures::stream::unfold((req.into_inner(), 0), move |(mut inbound, n)| {
                let streamed = streamed.clone();
                async move {
                    if n == ends_after {
                        return None;
                    }
                    inbound.message().await.ok().flatten()?;
                    let answer = match (streamed.fetch_add(1, Ordering::SeqCst), slow_first) {
                        (1, Some(late)) => {
                            tokio::time::sleep(late).await;
                            conflict()
                        }
                        _ => success(),
                    };
                    Some((Ok(answer), (inbound, n + 1)))
                }
            });
            Ok(tonic::Response::new(Box::pin(answers)))
        }

        async fn vote(&self, _: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        async fn install_snapshot(&self, _: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        type LeadingStream = Pin<Box<dyn Stream<Item = Result<LeadingReply, tonic::Status>> + Send>>;

        async fn leading(&self, _: tonic::Request<LeadingRequest>) -> Result<tonic::Response<Self::LeadingStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
    }

    /// A client of `peer`, served in plain gRPC on a free port (the
    /// channel is put where the client looks for it, so no TLS is made).
    async fn client_of(peer: FakePeer) -> PeerClient {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let tls = TlsMaterial {
            ca_pem: Vec::new(),
            cert_pem: Vec::new(),
            key_pem: Vec::new(),
            name: "1".into(),
            role: fleet_core::auth::Role::Coordinator,
        };
        let mut network = Network::new(tls);
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        network.channels.lock().unwrap().insert(addr.clone(), channel);
        network.new_client(2, &BasicNode { addr }).await
    }

    async fn append(client: &mut PeerClient) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let rpc = AppendEntriesRequest { vote: Vote::new(1, 1), prev_log_id: None, entries: Vec::new(), leader_commit: None };
        client.append_entries(rpc, RPCOption::new(Duration::from_secs(5))).await
    }

    #[tokio::test]
    async fn append_entries_go_on_one_stream() {
        let peer = FakePeer { knows_stream: true, ends_after: usize::MAX, ..FakePeer::default() };
        let mut client = client_of(peer.clone()).await;
        for _ in 0..5 {
            assert!(matches!(append(&mut client).await, Ok(AppendEntriesResponse::Success)));
        }
        assert_eq!(peer.streams.load(Ordering::SeqCst), 1, "one stream for every call");
        assert_eq!(peer.streamed.load(Ordering::SeqCst), 5);
        assert_eq!(peer.unary.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_calls() {
        let peer = FakePeer { knows_stream: false, ..FakePeer::default() };
        let mut client = client_of(peer.clone()).await;
        for _ in 0..3 {
            assert!(matches!(append(&mut client).await, Ok(AppendEntriesResponse::Success)));
        }
        assert_eq!(peer.streams.load(Ordering::SeqCst), 1, "the stream is tried once, not before every call");
        assert_eq!(peer.unary.load(Ordering::SeqCst), 3, "the first request too is answered, by a call");
    }

    /// openraft drops a call that outlives its own timeout: the answer
    /// that comes late must not be taken for the next request's.
    #[tokio::test]
    async fn a_dropped_call_leaves_no_answer_for_the_next() {
        let late = Duration::from_millis(300);
        let peer = FakePeer { knows_stream: true, ends_after: usize::MAX, slow_first: Some(late), ..FakePeer::default() };
        let mut client = client_of(peer.clone()).await;
        assert!(append(&mut client).await.is_ok(), "opens the stream");
        // The peer answers the second request late, after the caller gave up.
        assert!(tokio::time::timeout(late / 3, append(&mut client)).await.is_err(), "the call is dropped before its answer");
        assert!(matches!(append(&mut client).await, Ok(AppendEntriesResponse::Success)), "not the dropped call's Conflict");
        assert_eq!(peer.streams.load(Ordering::SeqCst), 2, "the dropped call's stream is not used again");
    }

    #[tokio::test]
    async fn an_ended_stream_is_replaced() {
        let peer = FakePeer { knows_stream: true, ends_after: 2, ..FakePeer::default() };
        let mut client = client_of(peer.clone()).await;
        let (mut answered, mut failed_in_a_row) = (0, 0);
        while answered < 6 {
            match append(&mut client).await {
                Ok(AppendEntriesResponse::Success) => (answered, failed_in_a_row) = (answered + 1, 0),
                other => {
                    // A request sent just as the stream ends fails (openraft
                    // sends it again); the one after goes on a new stream.
                    failed_in_a_row += 1;
                    assert!(failed_in_a_row < 2, "two failures in a row: {other:?}");
                }
            }
        }
        assert_eq!(peer.streams.load(Ordering::SeqCst), 3, "two answers per stream, six answers");
        assert_eq!(peer.streamed.load(Ordering::SeqCst), 6);
        assert_eq!(peer.unary.load(Ordering::SeqCst), 0);
    }
}
