//! fleetctl's library: the cluster client, certificate tooling, the
//! local-cluster launcher, deployment progress and the types of its JSON
//! output. The integration tests use the same code.

pub mod certs;
pub mod client;
pub mod dev;
pub mod exit;
pub mod output;
pub mod progress;
pub mod watch;
