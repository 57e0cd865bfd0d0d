//! Who is calling the HTTP API: a bearer token (`Authorization: Bearer
//! fleet_...`, made with `fleetctl tokens create`) or, without one, the
//! client certificate the TLS handshake verified.
//!
//! A token is looked up by its SHA-256 in this coordinator's applied
//! state, so a revocation takes effect on each coordinator as soon as it
//! has applied the `RevokeToken` entry (the leader at once, a follower a
//! heartbeat later).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use fleet_core::Via;
use fleet_net::token::{looks_like_token, token_sha256};

use super::error::{ApiError, Code};
use super::listener::Peer;
use super::HttpApi;
use crate::tls::KnownCaller;

/// How long an unknown token waits for this coordinator to apply more
/// entries before it is refused.
const UNKNOWN_TOKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The authenticated caller of a request (the extractor answers 401 when
/// there is none).
pub struct Caller(pub KnownCaller);

fn unauthenticated(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, Code::Unauthenticated, message)
}

/// The caller of a request with these headers on this connection.
pub async fn authenticate(api: &HttpApi, peer: &Peer, headers: &axum::http::HeaderMap) -> Result<KnownCaller, ApiError> {
    let from = peer.addr.to_string();
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return peer.caller.clone().map(|c| KnownCaller { from, ..c }).map_err(|m| {
            unauthenticated(format!(
                "{m}; or send `Authorization: Bearer <token>` with a token from `fleetctl tokens create NAME --role viewer`"
            ))
        });
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| unauthenticated("the Authorization header must be `Bearer fleet_...`"))?;
    if !looks_like_token(token) {
        return Err(unauthenticated(
            "the bearer token is not a Fleet token (they start with `fleet_`); make one with `fleetctl tokens create`",
        ));
    }
    let sha = token_sha256(token);
    let now = fleet_net::now_ms();
    let lookup = || api.state.read(|a| a.state.token_by_hash(&sha).map(|t| (t.name.clone(), t.role, t.valid_at(now))));
    let mut found = lookup();
    if found.is_none() {
        // A token made a moment ago may not have reached this coordinator
        // yet: wait a little for entries to apply before refusing it (which
        // also slows down guessing).
        let mut applied = api.state.applied_index();
        let deadline = tokio::time::Instant::now() + UNKNOWN_TOKEN_WAIT;
        while found.is_none() && matches!(tokio::time::timeout_at(deadline, applied.changed()).await, Ok(Ok(()))) {
            found = lookup();
        }
    }
    match found {
        Some((name, role, true)) => Ok(KnownCaller { name: format!("token:{name}"), role, via: Via::Token, from }),
        Some((name, _, false)) => {
            Err(unauthenticated(format!("token `{name}` has expired; create a new one with `fleetctl tokens create`")))
        }
        None => {
            Err(unauthenticated("unknown or revoked token; `fleetctl tokens list` shows the live ones, `fleetctl tokens create` makes one"))
        }
    }
}

impl FromRequestParts<HttpApi> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &HttpApi) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<Peer>().ok_or_else(|| ApiError::internal("the connection's peer is unknown"))?;
        authenticate(api, peer, &parts.headers).await.map(Caller)
    }
}
