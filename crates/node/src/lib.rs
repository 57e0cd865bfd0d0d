//! `fleet-node`: the worker agent on each host.
//!
//! It keeps one mutually authenticated gRPC stream open to the Raft leader
//! ([`connection`]), runs the steps the leader assigns ([`agent`]: timeouts,
//! aborts, idempotency, fencing, witness lines) through an [`adapter`]; the
//! built-in one is [`process`]: supervised local processes, blue-green,
//! behind a TCP route on a stable port.

pub mod adapter;
pub mod agent;
pub mod connection;
pub mod fencing;
pub mod identity;
pub mod process;
pub mod util;
pub mod witness;
