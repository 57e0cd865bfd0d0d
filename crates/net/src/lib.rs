//! What every Fleet process that talks to the cluster shares, defined once:
//! the wall clock (`now_ms`), the metadata keys and structured error details
//! of the wire contract, and loading TLS identities from PEM files.
//!
//! `fleet-core` stays pure (no clock, no I/O); this crate is the thin layer
//! of I/O that coordinators, nodes and `fleetctl` have in common.

pub mod tls;
pub mod token;
pub mod wire;

pub use tls::{error_chain, TlsError, TlsMaterial};
pub use wire::LEADER_METADATA;

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
