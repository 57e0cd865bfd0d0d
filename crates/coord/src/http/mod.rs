//! The HTTP JSON API of a coordinator (`--http-addr`), over HTTPS with the
//! same mTLS identities and roles as gRPC.
//!
//! * [`listener`]: rustls + hyper; a client certificate is verified when
//!   presented. [`auth`]: the caller is a bearer token's (`fleetctl tokens
//!   create`) or, without one, the certificate's.
//! * [`dashboard`]: `GET /`, the live dashboard (one embedded page that
//!   reads the API with the token its user signs in with).
//! * [`api`]: the routes. Every `/api` call is a call of the `Control`
//!   service's handlers for the same caller ([`forward`]): on this
//!   coordinator, and on the leader when this one redirects (writes, and
//!   the reads `fleetctl` makes linearizable).
//! * [`events`]: `GET /api/events`, server-sent events of deployment and
//!   destination changes, resumable with `Last-Event-ID`.
//! * [`error`]: JSON errors with stable codes.
//!
//! `/healthz`, `/readyz` and `/metrics` are answered locally.

pub mod api;
pub mod auth;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod forward;
pub mod listener;

use std::sync::Arc;

use crate::control::ControlService;
use crate::hub::Hub;
use crate::raft_types::Raft;
use crate::store::sm::StateReader;
use crate::tls::TlsMaterial;

/// What the HTTP handlers need.
#[derive(Clone)]
pub struct HttpApi {
    pub forward: forward::Forwarder,
    pub raft: Raft,
    pub state: StateReader,
    pub hub: Arc<Hub>,
    pub journal: events::Journal,
}

impl HttpApi {
    pub fn new(control: Arc<ControlService>, tls: TlsMaterial, raft: Raft, state: StateReader, hub: Arc<Hub>) -> Self {
        let journal = events::Journal::spawn(state.clone());
        HttpApi { forward: forward::Forwarder::new(control, tls), raft, state, hub, journal }
    }
}

/// Serve the API on `listener` until the returned task is aborted.
pub fn spawn(
    listener: tokio::net::TcpListener,
    tls: &TlsMaterial,
    api: HttpApi,
) -> Result<tokio::task::JoinHandle<()>, listener::ListenerError> {
    let config = listener::server_config(tls)?;
    let router = api::router(api);
    Ok(tokio::spawn(listener::serve(listener, config, router)))
}
