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

/// This coordinator's Raft: openraft's handle (everything but proposing
/// goes straight to it) and the queue that batches proposals (see
/// [`crate::propose`]). Cheap to clone.
#[derive(Clone)]
pub struct Raft {
    inner: openraft::Raft<TypeConfig>,
    pub(crate) proposals: crate::propose::Queue,
}

impl Raft {
    /// Wrap a started openraft instance and start its proposer task (it
    /// ends when the last handle is dropped).
    pub fn start(inner: openraft::Raft<TypeConfig>) -> Raft {
        let proposals = crate::propose::Queue::start(inner.clone());
        Raft { inner, proposals }
    }
}

impl Deref for Raft {
    type Target = openraft::Raft<TypeConfig>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}
