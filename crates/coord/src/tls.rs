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
    IDENTITIES.get_or_read(der.as_ref())
}

/// Identities read from certificates, by the certificate's bytes: a
/// certificate is parsed once, not on every call (every AppendEntries a
/// follower takes and every request a client makes asks who called). The
/// TLS layer checks the chain on each connection before a call gets here,
/// so the same bytes always name the same caller. Bounded: emptied when
/// full (a few hundred bytes per certificate).
static IDENTITIES: IdentityCache = IdentityCache::new(IDENTITIES_KEPT);
const IDENTITIES_KEPT: usize = 1024;

/// Certificate bytes → (name, role).
type Identities = std::collections::HashMap<Vec<u8>, (String, Role)>;

struct IdentityCache {
    kept: usize,
    map: std::sync::Mutex<Option<Identities>>,
}

impl IdentityCache {
    const fn new(kept: usize) -> Self {
        IdentityCache { kept, map: std::sync::Mutex::new(None) }
    }

    /// The identity in `der`, parsed on its first use. A certificate that
    /// does not parse or names no role is refused each time, never kept.
    fn get_or_read(&self, der: &[u8]) -> Result<(String, Role), tonic::Status> {
        let lock = || self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = lock().as_ref().and_then(|m| m.get(der)) {
            return Ok(known.clone());
        }
        let identity = identity_of_der(der)?;
        let mut g = lock();
        let map = g.get_or_insert_with(Default::default);
        if map.len() >= self.kept {
            map.clear();
        }
        map.insert(der.to_vec(), identity.clone());
        Ok(identity)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |m| m.len())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(role: &str, name: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        if !role.is_empty() {
            params.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, role);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identities_are_read_once_per_certificate_and_bounded() {
        let cache = IdentityCache::new(2);
        let (a, b, c) = (certificate("operator", "alice"), certificate("node", "n1"), certificate("viewer", "v"));
        assert_eq!(cache.get_or_read(&a).unwrap(), ("alice".to_string(), Role::Operator));
        assert_eq!(cache.get_or_read(&a).unwrap(), ("alice".to_string(), Role::Operator), "a kept identity is the same");
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get_or_read(&b).unwrap(), ("n1".to_string(), Role::Node));
        assert_eq!(cache.len(), 2);
        // Full: emptied, then the new one kept.
        assert_eq!(cache.get_or_read(&c).unwrap(), ("v".to_string(), Role::Viewer));
        assert_eq!(cache.len(), 1);
        // A certificate without a role is refused every time and never kept.
        let bad = certificate("", "nobody");
        for _ in 0..2 {
            assert_eq!(cache.get_or_read(&bad).unwrap_err().code(), tonic::Code::PermissionDenied);
        }
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get_or_read(b"not a certificate").unwrap_err().code(), tonic::Code::Unauthenticated);
    }
}
