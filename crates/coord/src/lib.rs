//! The Fleet coordinator: Raft (openraft) over RocksDB, mTLS gRPC services.
//!
//! * [`config`]: two-stage configuration (raw → validated).
//! * [`store`]: RocksDB log, vote and state machine; snapshots.
//! * [`network`] / [`raft_service`]: Raft RPCs between coordinators;
//!   [`leader_watch`]: a follower's election as soon as the leader's
//!   process is gone (its stream broke) and its lease ran out.
//! * [`control`] / [`deployments`]: the `Control` service `fleetctl` talks to;
//!   [`access`]: its API-token and audit-log calls.
//! * [`propose`]: proposing through Raft, redirects to the leader.
//! * [`worker`]: the `Worker` service nodes keep a work stream open to.
//! * [`hub`]: the leader's memory of connected nodes and steps in flight.
//! * [`scheduler`]: the leader's loop that turns saga state into node work.
//! * [`tls`]: per-call role checks on the caller's certificate (loading
//!   certificates is `fleet_net::tls`).
//! * [`http`]: the HTTPS JSON API, server-sent events, health and
//!   `/metrics` (`--http-addr`); [`metrics`]: what `/metrics` reports;
//!   [`observe`]: measurements the store records for it.
//! * [`sync`]: the leader's destination sync, one task for every
//!   destination (servers from the nodes' reports, catch-up deployments);
//!   [`servers`]: `ListServers` and
//!   `RemoveDestination`.
//! * [`faults`]: failpoints in the log's write and fsync paths, set at run
//!   time through a file (builds with the `failpoints` feature only).
//! * [`server`]: wiring it together; a coordinator whose storage fails
//!   stops serving.

pub mod access;
pub mod config;
pub mod control;
pub mod deployments;
pub mod faults;
pub mod http;
pub mod hub;
pub mod leader_watch;
pub mod metrics;
pub mod network;
pub mod observe;
pub mod propose;
pub mod raft_service;
pub mod raft_types;
pub mod scheduler;
pub mod server;
pub mod servers;
pub mod store;
pub mod sync;
pub mod tls;
pub mod worker;
