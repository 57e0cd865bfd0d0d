//! This node's TLS identity: the CA that signs the coordinators, its own
//! certificate and key, loaded by [`fleet_net::tls::TlsMaterial`]. Its id
//! is the certificate's common name; its role (the subject OU) must be
//! `node`. What this module adds: errors that name the node's flags, and
//! the keepalives of the work stream.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_core::auth::Role;
use fleet_net::tls::{TlsError, TlsMaterial};
use thiserror::Error;
use tonic::transport::Channel;

/// How long connecting to a coordinator may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 ping interval on the work stream.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the stream counts as broken.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// A [`TlsError`], with the flag (`--ca`, `--cert`, `--key`, `--coord`)
/// whose value caused it.
#[derive(Debug, Error)]
#[error("{flag}: {source}")]
pub struct IdentityError {
    pub flag: &'static str,
    #[source]
    pub source: TlsError,
}

impl IdentityError {
    /// Which flag `e` is about, given where the CA was read from.
    fn of(e: TlsError, ca: &Path) -> IdentityError {
        let flag = match &e {
            TlsError::Read { what: "CA certificate", .. } => "--ca",
            TlsError::Read { what: "private key", .. } => "--key",
            TlsError::BadCert { path, .. } if path == ca => "--ca",
            TlsError::Read { .. }
            | TlsError::BadCert { .. }
            | TlsError::NoName { .. }
            | TlsError::NoRole { .. }
            | TlsError::WrongRole { .. } => "--cert",
            TlsError::BadAddr { .. } => "--coord",
            TlsError::Unusable { .. } => "--cert/--key",
        };
        IdentityError { flag, source: e }
    }

    /// The address given to `--coord` is not HOST:PORT.
    pub fn is_bad_addr(&self) -> bool {
        matches!(self.source, TlsError::BadAddr { .. })
    }
}

#[derive(Clone)]
pub struct NodeIdentity {
    /// The certificate's common name: this node's id.
    pub node_id: String,
    tls: TlsMaterial,
    ca: PathBuf,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Read and check `--ca`, `--cert` and `--key`: the certificate must
    /// name this node and carry the role `node`.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<NodeIdentity, IdentityError> {
        let tls = TlsMaterial::load(ca, cert, key, Some(Role::Node)).map_err(|e| IdentityError::of(e, ca))?;
        Ok(NodeIdentity { node_id: tls.name.clone(), tls, ca: ca.to_path_buf() })
    }

    /// A lazily connecting mTLS channel to `addr` (HOST:PORT).
    pub fn channel(&self, addr: &str) -> Result<Channel, IdentityError> {
        let endpoint = self
            .tls
            .endpoint(addr, CONNECT_TIMEOUT)
            .map_err(|e| IdentityError::of(e, &self.ca))?
            // Notice a coordinator that vanished (or froze) without closing
            // the stream within ~2 s: well inside the leader's 5 s node
            // lease, so a failover does not make healthy nodes look lost.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_lazy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_flag_whose_file_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = (dir.path().join("ca.pem"), dir.path().join("node.pem"), dir.path().join("node-key.pem"));
        let flag = |ca: &Path, cert: &Path, key: &Path| NodeIdentity::load(ca, cert, key).unwrap_err().flag;
        assert_eq!(flag(&ca, &cert, &key), "--ca", "missing CA");
        std::fs::write(&ca, "not a certificate").unwrap();
        assert_eq!(flag(&ca, &cert, &key), "--cert", "missing certificate");
        std::fs::write(&cert, "not a certificate either").unwrap();
        assert_eq!(flag(&ca, &cert, &key), "--key", "missing key");
        std::fs::write(&key, "no key").unwrap();
        let e = NodeIdentity::load(&ca, &cert, &key).unwrap_err();
        assert_eq!(e.flag, "--ca", "the CA is checked first: {e}");
        assert!(e.to_string().starts_with("--ca: ") && e.to_string().contains("fleetctl certs"), "{e}");
    }
}
