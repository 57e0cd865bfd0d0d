//! Who is calling, and may they: the caller's name and role read from its
//! verified certificate, checked per call. Loading certificates and
//! building TLS configs is `fleet_net::tls`, shared with nodes and fleetctl.

use fleet_core::auth::{Access, Role};
use fleet_core::{Origin, Via};
pub use fleet_net::tls::{TlsError, TlsMaterial};

/// Metadata key under which a coordinator forwarding a call for a client
/// of its HTTP API names that client (`ROLE/NAME`). Honoured only on a call
/// whose own certificate is a coordinator's: coordinators already append
/// Raft entries, so trusting their word adds no power.
pub const ON_BEHALF_OF: &str = "fleet-on-behalf-of";
/// Beside [`ON_BEHALF_OF`]: how that client proved who it is and its
/// address (`VIA ADDR`, e.g. `token 10.0.0.5:51234`), for the audit log.
pub const ON_BEHALF_ORIGIN: &str = "fleet-on-behalf-origin";

/// A caller already identified by this process (the HTTP API read its
/// certificate), set as a request extension for in-process calls of the
/// `Control` service. Extensions never come from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownCaller {
    /// The certificate's common name, or `token:NAME`.
    pub name: String,
    pub role: Role,
    pub via: Via,
    /// The client's address (`ip:port`) as this process saw it; empty if unknown.
    pub from: String,
}

impl KnownCaller {
    /// `ROLE/NAME`, the [`ON_BEHALF_OF`] value.
    pub fn to_metadata(&self) -> String {
        format!("{}/{}", self.role, self.name)
    }

    /// `VIA ADDR`, the [`ON_BEHALF_ORIGIN`] value.
    pub fn origin_metadata(&self) -> String {
        format!("{} {}", self.via.as_str(), self.from)
    }

    /// What the audit log records of this caller.
    pub fn origin(&self) -> Origin {
        Origin { actor: self.name.clone(), via: self.via, from: self.from.clone() }
    }
}

/// Name and role from a verified DER certificate (a TLS peer's).
pub fn identity_of_der(der: &[u8]) -> Result<(String, Role), tonic::Status> {
    let subject = fleet_net::tls::subject_of_der(der)
        .map_err(|e| tonic::Status::unauthenticated(format!("client certificate does not parse: {e}")))?;
    let role = subject.role.as_deref().and_then(|r| r.parse::<Role>().ok()).ok_or_else(|| {
        tonic::Status::permission_denied(
            "client certificate carries no Fleet role (subject OU); issue one with `fleetctl certs issue ROLE NAME`",
        )
    })?;
    let name = subject.name.ok_or_else(|| {
        tonic::Status::permission_denied("client certificate has no common name; issue one with `fleetctl certs issue ROLE NAME`")
    })?;
    Ok((name, role))
}

/// Who is calling: name and role from the peer's verified certificate (or
/// the client a coordinator's HTTP API called or forwarded for).
///
/// The TLS layer has already checked the chain against the cluster CA, so
/// what the certificate says is what the CA signed.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<KnownCaller, tonic::Status> {
    if let Some(k) = req.extensions().get::<KnownCaller>() {
        return Ok(k.clone());
    }
    let (name, role) = peer_identity(req)?;
    let from = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    if role == Role::Coordinator {
        if let Some(v) = req.metadata().get(ON_BEHALF_OF) {
            let (r, n) = v.to_str().ok().and_then(|v| v.split_once('/')).ok_or_else(|| {
                tonic::Status::invalid_argument(format!("`{ON_BEHALF_OF}` must be ROLE/NAME; upgrade the forwarding coordinator"))
            })?;
            let role = r.parse::<Role>().map_err(|e| tonic::Status::invalid_argument(format!("`{ON_BEHALF_OF}`: {e}")))?;
            // An older forwarder sends no origin: a certificate, address unknown.
            let (via, from) = match req.metadata().get(ON_BEHALF_ORIGIN).and_then(|v| v.to_str().ok()) {
                Some(o) => {
                    let (via, from) = o.split_once(' ').unwrap_or((o, ""));
                    (if via == "token" { Via::Token } else { Via::Certificate }, from.to_string())
                }
                None => (Via::Certificate, String::new()),
            };
            return Ok(KnownCaller { name: n.to_string(), role, via, from });
        }
    }
    Ok(KnownCaller { name, role, via: Via::Certificate, from })
}

fn peer_identity<T>(req: &tonic::Request<T>) -> Result<(String, Role), tonic::Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("no client certificate; connect with mTLS (FLEET_CERT/FLEET_KEY or --cert/--key)"))?;
    let der = certs.first().ok_or_else(|| {
        tonic::Status::unauthenticated("empty client certificate chain; present a certificate from `fleetctl certs issue`")
    })?;
    identity_of_der(der.as_ref())
}

/// Check the caller may make a call that needs `access`; returns who it is.
pub fn authorize<T>(req: &tonic::Request<T>, access: Access, call: &str) -> Result<KnownCaller, tonic::Status> {
    let who = caller(req)?;
    let (name, role) = (&who.name, who.role);
    if !fleet_core::auth::allows(role, access) {
        let need = match access {
            Access::Peer => "a coordinator",
            Access::Read => "a viewer or operator",
            Access::Write => "an operator",
            Access::Work => "a node",
        };
        return Err(tonic::Status::permission_denied(match who.via {
            Via::Certificate => format!(
                "{call} needs {need} certificate; `{name}` presented a `{role}` certificate. Use an operator certificate (`fleetctl certs issue operator NAME`)"
            ),
            Via::Token => format!(
                "{call} needs {need} token; `{name}` is a `{role}` token. Use an operator token (`fleetctl tokens create NAME --role operator`)"
            ),
        }));
    }
    Ok(who)
}
