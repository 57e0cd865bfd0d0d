//! What this adapter runs, for the node's instance report (destination
//! sync): one server per app of a destination, the release of its active
//! instance and the route's address; healthy when that instance's process
//! is alive (the same process: its start time is checked) and accepts a
//! TCP connection on its port.

use std::time::Duration;

use super::Inner;
use crate::adapter::{Server, StepError};

/// How long the TCP probe of an instance may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl Inner {
    /// Destinations with at least one app recorded here.
    pub(super) fn destinations(&self) -> Vec<String> {
        let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = apps.keys().map(|(d, _)| d.clone()).collect();
        out.dedup();
        out
    }

    /// One server per app of `destination`; `id` names the active instance.
    pub(super) fn discover(&self, destination: &str) -> Vec<Server> {
        let apps: Vec<_> = {
            let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
            apps.iter().filter(|((d, _), _)| d == destination).map(|(_, a)| a.clone()).collect()
        };
        apps.iter()
            .map(|a| {
                let st = a.lock();
                let active = st.rec.active.as_ref();
                Server {
                    id: active.map(|i| format!("pid {} port {}", i.pid, i.port)).unwrap_or_default(),
                    app: a.name.clone(),
                    address: st.route.as_ref().map(|r| r.addr().to_string()),
                    release: active.map(|i| i.release.clone()),
                }
            })
            .collect()
    }

    /// The active instance of `server.app` runs and accepts connections.
    pub(super) async fn server_health(&self, destination: &str, server: &Server) -> Result<(), StepError> {
        let app =
            self.existing(destination, &server.app).ok_or_else(|| StepError::resource(format!("{} is not deployed here", server.app)))?;
        let active = app.lock().rec.active.clone();
        let Some(i) = active else {
            return Err(StepError::resource(format!("no active instance of {} runs here", server.app)));
        };
        if !crate::proc::alive(i.pid, i.proc_start) {
            return Err(StepError::resource(format!("{} is not running (the node restarts it)", i.label(&server.app))));
        }
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(("127.0.0.1", i.port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StepError::resource(format!("{} refuses connections on port {}: {e}", i.label(&server.app), i.port))),
            Err(_) => Err(StepError::resource(format!("{} did not accept a connection within {PROBE_TIMEOUT:?}", i.label(&server.app)))),
        }
    }
}
