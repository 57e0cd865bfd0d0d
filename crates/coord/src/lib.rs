//! The Fleet coordinator: Raft (openraft) over RocksDB, mTLS gRPC services.
//!
//! * [`config`]: two-stage configuration (raw → validated).
//! * [`store`]: RocksDB log, vote and state machine; snapshots.
//! * [`network`] / [`raft_service`]: Raft RPCs between coordinators.
//! * [`control`]: the `Control` service `fleetctl` talks to.
//! * [`tls`]: certificates and per-call role checks.
//! * [`server`]: wiring it together.

pub mod config;
pub mod control;
pub mod network;
pub mod raft_service;
pub mod raft_types;
pub mod server;
pub mod store;
pub mod tls;
