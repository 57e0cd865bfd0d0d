//! openraft's type configuration for Fleet.

use std::io::Cursor;

openraft::declare_raft_types!(
    /// Log entries carry [`fleet_core::Request`]s; applying one answers a
    /// [`fleet_core::Response`]. Snapshots are byte buffers sent in chunks.
    pub TypeConfig:
        D = fleet_core::Request,
        R = fleet_core::Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
