//! fleetctl's library: the cluster client, certificate tooling, the
//! local-cluster launcher and deployment progress. The integration tests
//! use the same code.

pub mod certs;
pub mod client;
pub mod dev;
pub mod exit;
pub mod progress;
pub mod watch;
