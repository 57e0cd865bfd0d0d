//! `fleet-node`: the worker agent on each host.
//!
//! It keeps one mutually authenticated gRPC stream open to the Raft leader
//! ([`connection`], with the TLS identity of [`identity`]), runs the steps
//! the leader assigns ([`agent`]: timeouts, aborts, idempotency, [`fencing`],
//! [`witness`] lines, an append-only [`journal`] of results) through the [`adapter`] that carries out each action.
//! The built-in adapters are [`process`] (supervised local processes,
//! blue-green, behind a TCP route on a stable port) and [`command`] (shell
//! commands: the steps of `command` destinations, and every pre/post hook)
//! and [`docker`] (containers on the node's Docker Engine, blue-green behind
//! the same route).
//! [`proc`] is what both know of local child processes. [`report`]: what
//! the adapters run, reported to the leader for destination sync.
//! [`metrics`]: Prometheus metrics (`--metrics-addr`).

pub mod adapter;
pub mod agent;
pub mod canary;
pub mod command;
pub mod connection;
pub mod docker;
pub mod fencing;
pub mod identity;
pub mod journal;
pub mod metrics;
pub mod probe;
pub mod proc;
pub mod process;
pub mod report;
pub mod util;
pub mod witness;
