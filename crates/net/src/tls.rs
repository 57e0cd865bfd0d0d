//! TLS identities: the CA a process trusts, its own certificate and key,
//! loaded once from PEM files, with the holder's name (subject CN) and role
//! (subject OU) read from the certificate. Coordinators, nodes and
//! `fleetctl` all load theirs here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_core::auth::Role;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}; check the path, or create certificates with `fleetctl certs init --out DIR`")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a PEM certificate: {reason}; point it at a file written by `fleetctl certs`")]
    BadCert { path: PathBuf, reason: String },
    #[error("certificate {path} has no common name; issue one with `fleetctl certs issue ROLE NAME`")]
    NoName { path: PathBuf },
    #[error("certificate {path} has no role (subject OU); issue it with `fleetctl certs issue ROLE NAME`")]
    NoRole { path: PathBuf },
    #[error("certificate {path} is for role `{found}`, but this needs a `{wanted}` certificate; issue one with `fleetctl certs issue {wanted} NAME`")]
    WrongRole { path: PathBuf, found: String, wanted: Role },
    #[error("coordinator address `{addr}` is not HOST:PORT: {reason}")]
    BadAddr { addr: String, reason: String },
    #[error("the TLS settings are not usable: {reason}; check that the key belongs to the certificate and both are PEM")]
    Unusable { reason: String },
}

/// The certificate, key and CA a process presents and trusts.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Common name of our own certificate: a coordinator's or node's id,
    /// an operator's name.
    pub name: String,
    pub role: Role,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsMaterial").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

impl TlsMaterial {
    /// Load and check: the CA and certificate must parse, the certificate
    /// must name its holder and, when `wanted` is given, carry that role.
    pub fn load(ca: &Path, cert: &Path, key: &Path, wanted: Option<Role>) -> Result<Self, TlsError> {
        let ca_pem = read("CA certificate", ca)?;
        let cert_pem = read("certificate", cert)?;
        let key_pem = read("private key", key)?;
        // The CA must parse too: a wrong file here would otherwise surface as
        // an opaque handshake failure much later.
        subject_of_pem(&ca_pem).map_err(|reason| TlsError::BadCert { path: ca.to_path_buf(), reason })?;
        let subject = subject_of_pem(&cert_pem).map_err(|reason| TlsError::BadCert { path: cert.to_path_buf(), reason })?;
        let name = subject.name.ok_or_else(|| TlsError::NoName { path: cert.to_path_buf() })?;
        let found = subject.role.ok_or_else(|| TlsError::NoRole { path: cert.to_path_buf() })?;
        let role: Role = found.parse().map_err(|_| TlsError::WrongRole {
            path: cert.to_path_buf(),
            found: found.clone(),
            wanted: wanted.unwrap_or(Role::Operator),
        })?;
        if let Some(wanted) = wanted {
            if role != wanted {
                return Err(TlsError::WrongRole { path: cert.to_path_buf(), found: role.to_string(), wanted });
            }
        }
        Ok(TlsMaterial { ca_pem, cert_pem, key_pem, name, role })
    }

    /// Servers require a client certificate signed by the cluster CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// `host` is checked against the server certificate's names.
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(host.to_string())
    }

    /// An mTLS endpoint for a coordinator at `addr` (HOST:PORT), with a
    /// connect timeout and TCP_NODELAY; callers add keepalives as they need.
    pub fn endpoint(&self, addr: &str, connect_timeout: Duration) -> Result<Endpoint, TlsError> {
        let bad = |reason: String| TlsError::BadAddr { addr: addr.to_string(), reason };
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no `:PORT`".into()))?;
        port.parse::<u16>().map_err(|e| bad(format!("port `{port}`: {e}")))?;
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() {
            return Err(bad("no host".into()));
        }
        Ok(Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .tls_config(self.client_config(host))
            .map_err(|e| TlsError::Unusable { reason: error_chain(&e) })?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true))
    }

    /// A stable id of the cluster: the hash of its CA certificate. A data
    /// dir records it, so a directory of another cluster is refused.
    pub fn cluster_id(&self) -> String {
        cluster_id_of(&self.ca_pem)
    }
}

pub fn cluster_id_of(ca_pem: &[u8]) -> String {
    let digest = Sha256::digest(ca_pem);
    hex::encode(&digest[..8])
}

/// Who a certificate names: its holder (subject CN) and Fleet role (subject OU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub name: Option<String>,
    pub role: Option<String>,
}

/// The subject of the first certificate in `pem`.
pub fn subject_of_pem(pem: &[u8]) -> Result<Subject, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    Ok(subject_of(&cert))
}

/// The subject of a DER certificate (a peer's, as the TLS layer verified it).
pub fn subject_of_der(der: &[u8]) -> Result<Subject, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(subject_of(&cert))
}

fn subject_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Subject {
    let s = cert.subject();
    let name = s.iter_common_name().next().and_then(|a| a.as_str().ok()).filter(|n| !n.is_empty()).map(str::to_string);
    let role = s.iter_organizational_unit().next().and_then(|a| a.as_str().ok()).map(str::to_string);
    Subject { name, role }
}

/// An error and its sources, each once, joined with `: `.
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
