//! Calls of the `Control` service on behalf of an HTTP client: in-process on
//! this coordinator first (the same handlers `fleetctl`'s calls run), and
//! when that answers with a redirect to the leader, over the coordinators'
//! own mTLS to the leader's `Control` service, naming the client
//! ([`crate::tls::ON_BEHALF_OF`]) so the leader checks the client's role and
//! records the client as the actor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_net::LEADER_METADATA;
use fleet_proto::control_client::ControlClient;
use tonic::transport::Channel;
use tonic::Status;

use crate::control::ControlService;
use crate::tls::{KnownCaller, TlsMaterial, ON_BEHALF_OF, ON_BEHALF_ORIGIN};

/// How many times a call follows a redirect (a leader change mid-call).
const MAX_HOPS: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// This coordinator's `Control` service and clients to the others.
#[derive(Clone)]
pub struct Forwarder {
    control: Arc<ControlService>,
    tls: TlsMaterial,
    clients: Arc<Mutex<HashMap<String, ControlClient<Channel>>>>,
}

/// The leader's address a redirect names, if it names one.
pub fn leader_of(status: &Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string)
}

impl Forwarder {
    pub fn new(control: Arc<ControlService>, tls: TlsMaterial) -> Self {
        Forwarder { control, tls, clients: Arc::default() }
    }

    pub fn control(&self) -> &ControlService {
        &self.control
    }

    fn client(&self, addr: &str) -> Result<ControlClient<Channel>, Status> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let channel = self
            .tls
            .endpoint(addr, CONNECT_TIMEOUT)
            .map_err(|e| Status::unavailable(format!("cannot reach the leader at {addr}: {e}")))?
            .connect_lazy();
        let c = ControlClient::new(channel);
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Run one `Control` call for `caller`: `local` on this coordinator,
    /// `remote` on the leader it redirects to (and so on, a few hops).
    pub async fn call<M, R, L, LF, F, FF>(&self, caller: &KnownCaller, msg: M, local: L, remote: F) -> Result<R, Status>
    where
        M: Clone,
        L: FnOnce(Arc<ControlService>, tonic::Request<M>) -> LF,
        LF: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
        F: Fn(ControlClient<Channel>, tonic::Request<M>) -> FF,
        FF: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let mut req = tonic::Request::new(msg.clone());
        req.extensions_mut().insert(caller.clone());
        let mut status = match local(self.control.clone(), req).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) => s,
        };
        for _ in 0..MAX_HOPS {
            let Some(addr) = leader_of(&status) else { return Err(status) };
            tracing::debug!(leader = %addr, "forwarding an HTTP API call to the leader");
            let mut req = tonic::Request::new(msg.clone());
            let who: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = caller
                .to_metadata()
                .parse()
                .map_err(|_| Status::invalid_argument("the caller's name cannot travel as gRPC metadata; use a plain ASCII name"))?;
            req.metadata_mut().insert(ON_BEHALF_OF, who);
            // How the client proved itself and its address, for the audit log.
            if let Ok(origin) = caller.origin_metadata().parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>() {
                req.metadata_mut().insert(ON_BEHALF_ORIGIN, origin);
            }
            match remote(self.client(&addr)?, req).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => status = s,
            }
        }
        Err(status)
    }
}
