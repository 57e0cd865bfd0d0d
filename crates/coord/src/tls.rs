//! Who is calling, and may they: the caller's name and role read from its
//! verified certificate, checked per call. Loading certificates and
//! building TLS configs is `fleet_net::tls`, shared with nodes and fleetctl.

use fleet_core::auth::{Access, Role};
pub use fleet_net::tls::{TlsError, TlsMaterial};

/// Who is calling: name and role from the peer's verified certificate.
///
/// The TLS layer has already checked the chain against the cluster CA, so
/// what the certificate says is what the CA signed.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<(String, Role), tonic::Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("no client certificate; connect with mTLS (FLEET_CERT/FLEET_KEY or --cert/--key)"))?;
    let der = certs.first().ok_or_else(|| {
        tonic::Status::unauthenticated("empty client certificate chain; present a certificate from `fleetctl certs issue`")
    })?;
    let subject = fleet_net::tls::subject_of_der(der.as_ref())
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

/// Check the caller may make a call that needs `access`; returns its name.
pub fn authorize<T>(req: &tonic::Request<T>, access: Access, call: &str) -> Result<(String, Role), tonic::Status> {
    let (name, role) = caller(req)?;
    if !fleet_core::auth::allows(role, access) {
        let need = match access {
            Access::Peer => "a coordinator",
            Access::Read => "a viewer or operator",
            Access::Write => "an operator",
            Access::Work => "a node",
        };
        return Err(tonic::Status::permission_denied(format!(
            "{call} needs {need} certificate; `{name}` presented a `{role}` certificate. Use an operator certificate (`fleetctl certs issue operator NAME`)"
        )));
    }
    Ok((name, role))
}
