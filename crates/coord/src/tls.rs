//! Certificates: loading the PEM files, building tonic's TLS configs, and
//! reading the caller's identity (name, role) from its verified certificate.

use std::path::{Path, PathBuf};

use fleet_core::auth::Role;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}; check the path, or create certificates with `fleetctl certs init --out DIR`")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a PEM certificate: {reason}; point it at a file written by `fleetctl certs`")]
    BadCert { path: PathBuf, reason: String },
    #[error("certificate {path} has no role (subject OU); issue it with `fleetctl certs issue ROLE NAME`")]
    NoRole { path: PathBuf },
    #[error("certificate {path} is for role `{found}`, but this needs a `{wanted}` certificate; issue one with `fleetctl certs issue {wanted} NAME`")]
    WrongRole { path: PathBuf, found: String, wanted: Role },
}

/// The certificate, key and CA a process presents and trusts.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Common name of our own certificate.
    pub name: String,
    pub role: Role,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsMaterial").field("name", &self.name).field("role", &self.role).finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

impl TlsMaterial {
    /// Load and check: the certificate must parse and carry `wanted` as its role.
    pub fn load(ca: &Path, cert: &Path, key: &Path, wanted: Option<Role>) -> Result<Self, TlsError> {
        let ca_pem = read("CA certificate", ca)?;
        let cert_pem = read("certificate", cert)?;
        let key_pem = read("private key", key)?;
        // The CA must parse too: a wrong file here would otherwise surface as
        // an opaque handshake failure much later.
        parse_pem_identity(&ca_pem).map_err(|reason| TlsError::BadCert { path: ca.to_path_buf(), reason })?;
        let (name, role) =
            parse_pem_identity(&cert_pem).map_err(|reason| TlsError::BadCert { path: cert.to_path_buf(), reason })?;
        let role = role.ok_or_else(|| TlsError::NoRole { path: cert.to_path_buf() })?;
        let role: Role = role.parse().map_err(|_| TlsError::WrongRole {
            path: cert.to_path_buf(),
            found: role.clone(),
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

/// (common name, organizational unit) of the first certificate in `pem`.
fn parse_pem_identity(pem: &[u8]) -> Result<(String, Option<String>), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    Ok(subject_identity(&cert))
}

fn subject_identity(cert: &x509_parser::certificate::X509Certificate<'_>) -> (String, Option<String>) {
    let subject = cert.subject();
    let cn = subject.iter_common_name().next().and_then(|a| a.as_str().ok()).unwrap_or("").to_string();
    let ou = subject.iter_organizational_unit().next().and_then(|a| a.as_str().ok()).map(str::to_string);
    (cn, ou)
}

/// Who is calling: name and role from the peer's verified certificate.
///
/// The TLS layer has already checked the chain against the cluster CA, so
/// what the certificate says is what the CA signed.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<(String, Role), tonic::Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        tonic::Status::unauthenticated("no client certificate; connect with mTLS (FLEET_CERT/FLEET_KEY or --cert/--key)")
    })?;
    let der = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("empty client certificate chain; present a certificate from `fleetctl certs issue`"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| tonic::Status::unauthenticated(format!("client certificate does not parse: {e}")))?;
    let (name, ou) = subject_identity(&cert);
    let role = ou
        .as_deref()
        .and_then(|r| r.parse::<Role>().ok())
        .ok_or_else(|| tonic::Status::permission_denied("client certificate carries no Fleet role (subject OU); issue one with `fleetctl certs issue ROLE NAME`"))?;
    if name.is_empty() {
        return Err(tonic::Status::permission_denied("client certificate has no common name; issue one with `fleetctl certs issue ROLE NAME`"));
    }
    Ok((name, role))
}

/// Check the caller may make a call that needs `access`; returns its name.
pub fn authorize<T>(req: &tonic::Request<T>, access: fleet_core::auth::Access, call: &str) -> Result<(String, Role), tonic::Status> {
    let (name, role) = caller(req)?;
    if !fleet_core::auth::allows(role, access) {
        let need = match access {
            fleet_core::auth::Access::Peer => "a coordinator",
            fleet_core::auth::Access::Read => "a viewer or operator",
            fleet_core::auth::Access::Write => "an operator",
            fleet_core::auth::Access::Work => "a node",
        };
        return Err(tonic::Status::permission_denied(format!(
            "{call} needs {need} certificate; `{name}` presented a `{role}` certificate. Use an operator certificate (`fleetctl certs issue operator NAME`)"
        )));
    }
    Ok((name, role))
}
