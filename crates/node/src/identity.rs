//! This node's TLS identity: the CA that signs the coordinators, its own
//! certificate and key. Its id is the certificate's common name; its role
//! (the subject OU) must be `node`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("{flag} {path}: cannot read: {source}")]
    Read { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("--cert {path}: not a PEM certificate ({reason}); give the NAME.pem that `fleetctl certs issue node NAME` wrote")]
    BadCert { path: PathBuf, reason: String },
    #[error("--cert {path}: the certificate has no common name; issue one with `fleetctl certs issue node NAME`")]
    NoName { path: PathBuf },
    #[error("--cert {path}: the certificate is for role `{role}`, not `node`; issue one with `fleetctl certs issue node {name}`")]
    WrongRole { path: PathBuf, role: String, name: String },
    #[error("coordinator address `{addr}` is not HOST:PORT: {reason}")]
    BadAddr { addr: String, reason: String },
    #[error("--cert/--key: the TLS settings are not usable: {reason}; check that the key belongs to the certificate and both are PEM")]
    Tls { reason: String },
}

#[derive(Clone)]
pub struct NodeIdentity {
    /// The certificate's common name: this node's id.
    pub node_id: String,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read { flag, path: path.to_path_buf(), source })
}

impl NodeIdentity {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<NodeIdentity, IdentityError> {
        let ca_pem = read("--ca", ca)?;
        let cert_pem = read("--cert", cert)?;
        let key_pem = read("--key", key)?;
        let (node_id, role) = subject(&cert_pem).map_err(|reason| IdentityError::BadCert { path: cert.to_path_buf(), reason })?;
        let node_id = node_id.ok_or_else(|| IdentityError::NoName { path: cert.to_path_buf() })?;
        if let Some(role) = role.filter(|r| r != "node") {
            return Err(IdentityError::WrongRole { path: cert.to_path_buf(), role, name: node_id });
        }
        Ok(NodeIdentity { node_id, ca: ca_pem, cert: cert_pem, key: key_pem })
    }

    /// A lazily connecting mTLS channel to `addr` (HOST:PORT).
    pub fn channel(&self, addr: &str) -> Result<Channel, IdentityError> {
        let bad = |reason: String| IdentityError::BadAddr { addr: addr.to_string(), reason };
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no `:PORT`".into()))?;
        port.parse::<u16>().map_err(|e| bad(format!("port `{port}`: {e}")))?;
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() {
            return Err(bad("no host".into()));
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(TlsIdentity::from_pem(&self.cert, &self.key))
            .domain_name(host.to_string());
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| IdentityError::Tls { reason: error_chain(&e) })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            // Notice a coordinator that vanished (or froze) without closing
            // the stream within ~2 s: well inside the leader's 5 s node
            // lease, so a failover does not make healthy nodes look lost.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_lazy())
    }
}

/// (common name, role) of the first certificate in `pem`.
fn subject(pem: &[u8]) -> Result<(Option<String>, Option<String>), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    let s = cert.subject();
    let cn = s.iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_string);
    let ou = s.iter_organizational_unit().next().and_then(|a| a.as_str().ok()).map(str::to_string);
    Ok((cn, ou))
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}
