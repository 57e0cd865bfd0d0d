//! fleetctl's library: the cluster client, certificate tooling and the
//! local-cluster launcher. The integration tests use the same code.

pub mod certs;
pub mod client;
pub mod dev;
pub mod exit;
