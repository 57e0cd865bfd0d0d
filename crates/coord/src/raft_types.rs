//! openraft's type configuration for Fleet, and the handle every service
//! holds on this coordinator's Raft.

use std::io::Cursor;
use std::ops::Deref;

openraft::declare_raft_types!(
    /// Log entries carry [`fleet_core::Proposal`]s (one or more client
    /// requests); applying one answers a [`fleet_core::Response`] per
    /// request. Snapshots are byte buffers sent in chunks.
    pub TypeConfig:
        D = fleet_core::Proposal,
        R = Vec<fleet_core::Response>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type StorageError = openraft::StorageError<NodeId>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Metrics = openraft::RaftMetrics<NodeId, openraft::BasicNode>;
/// Role, vote, leader and membership only. openraft sends `Metrics` on
/// every turn of its core loop, several times per write; it sends these
/// only when they change. Tasks that wait for a change of role or leader
/// wait on these (`Raft::server_metrics`), so a write does not wake them.
pub type ServerMetrics = openraft::metrics::RaftServerMetrics<NodeId, openraft::BasicNode>;

/// This coordinator's Raft: openraft's handle (everything but proposing
/// goes straight to it) and the queue that batches proposals (see
/// the `propose` module, which starts it). Cheap to clone.
#[derive(Clone)]
pub struct Raft {
    pub(crate) inner: openraft::Raft<TypeConfig>,
    pub(crate) proposals: Queue,
}

impl Deref for Raft {
    type Target = openraft::Raft<TypeConfig>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

/// What a proposer is answered: the state machine's response and the log
/// index of the entry that carried its request.
pub(crate) type Written = Result<(fleet_core::Response, u64), tonic::Status>;

/// A request waiting to be proposed, and where its answer goes.
pub(crate) struct Waiting {
    pub request: fleet_core::Request,
    pub reply: tokio::sync::oneshot::Sender<Written>,
}

/// The queue of requests waiting to be proposed (drained by one task), and
/// the slots of entries being written, shared with callers that write
/// alone.
#[derive(Clone)]
pub(crate) struct Queue {
    pub tx: tokio::sync::mpsc::UnboundedSender<Waiting>,
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
}
