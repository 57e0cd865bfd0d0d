//! The `process` adapter: each release of an app runs as a supervised local
//! process, blue-green on this node, behind a built-in TCP route (a small
//! proxy on the app's stable port).
//!
//! * [`state`]: what is recorded per (destination, app) in
//!   `<data-dir>/apps/<destination>+<app>.json` (the route port and the
//!   `staged`, `active` and `retired` instance slots), rewritten atomically
//!   after every change. Two destinations that select this node may deploy
//!   the same app: each has its own instances and its own route;
//! * [`supervise`]: launching, watching and stopping instances, adopting
//!   the ones a previous `fleet-node` left running (recognised through
//!   `/proc`, start time included, so a reused pid is not mistaken for an
//!   instance), restarting a crashed active instance;
//! * [`bluegreen`]: the steps (`start`, `health`, `switch`, `stop-old`),
//!   their undos and checks;
//! * [`proxy`]: the routes;
//! * [`ports`]: the port a new instance listens on.
//!
//! This module holds the [`Adapter`] implementation (a dispatch to those)
//! and the adapter's handle. Shell `command` steps (and hooks) are the
//! [`crate::command`] adapter's.

mod bluegreen;
mod discover;

pub mod ports;
pub mod proxy;
pub mod state;
mod supervise;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_core::saga::StepAction;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use thiserror::Error;

use crate::adapter::{Adapter, StepContext, StepError};
use crate::proc;
use ports::{PortRange, Ports};
use proxy::Conns;
use state::App;
pub use state::{AppRecord, Instance};

/// Settings of the process adapter.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub data_dir: PathBuf,
    /// Directories put in front of `PATH` for instances and health
    /// commands (by default the directory of the running
    /// executable, so `fleet-demo-app` beside `fleet-node` is found).
    pub path_prepend: Vec<PathBuf>,
    /// SIGTERM → SIGKILL grace when stopping an instance.
    pub stop_grace: Duration,
    /// A started instance that exits within this long failed to start.
    pub exit_grace: Duration,
    /// Longest pause between restarts of a crashing active instance.
    pub restart_max_backoff: Duration,
    /// How long undoing `stop-old` waits for the restarted instance's port.
    pub restore_wait: Duration,
    /// The ports new instances listen on ([`ports`]).
    pub instance_ports: PortRange,
}

impl ProcessConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ProcessConfig {
            data_dir: data_dir.into(),
            path_prepend: proc::exe_dir().into_iter().collect(),
            stop_grace: Duration::from_secs(3),
            exit_grace: Duration::from_millis(300),
            restart_max_backoff: Duration::from_secs(5),
            restore_wait: Duration::from_secs(10),
            instance_ports: PortRange::DEFAULT,
        }
    }
}

/// A failure to open the adapter's state.
#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("cannot create {path}: {source}; check that the data dir is writable")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid app state file: {source}; fix it, or move it away (its instances are then no longer managed)")]
    Parse { path: PathBuf, source: serde_json::Error },
}

struct Inner {
    cfg: ProcessConfig,
    /// By (destination, app).
    apps: Mutex<BTreeMap<(String, String), Arc<App>>>,
    conns: Conns,
    ports: Ports,
    closed: AtomicBool,
}

/// The `process` adapter. Cheap to clone.
#[derive(Clone)]
pub struct ProcessAdapter {
    inner: Arc<Inner>,
}

impl ProcessAdapter {
    /// Open the adapter on `cfg.data_dir`: adopt the instances recorded by
    /// a previous run that still run, restart a dead active instance, and
    /// listen on the recorded route ports again. Must run inside a tokio
    /// runtime.
    pub async fn open(cfg: ProcessConfig) -> Result<ProcessAdapter, ProcessError> {
        for dir in [cfg.data_dir.join("apps"), cfg.data_dir.join("logs")] {
            std::fs::create_dir_all(&dir).map_err(|source| ProcessError::CreateDir { path: dir.clone(), source })?;
        }
        let ports = Ports::new(cfg.instance_ports);
        let inner =
            Arc::new(Inner { cfg, apps: Mutex::new(BTreeMap::new()), conns: Conns::default(), ports, closed: AtomicBool::new(false) });
        for rec in state::load_records(&inner.cfg.data_dir)? {
            inner.adopt(rec);
        }
        Ok(ProcessAdapter { inner })
    }

    /// The recorded state of `app` on `destination` (None if this node
    /// never ran it for that destination).
    pub fn record(&self, destination: &str, app: &str) -> Option<AppRecord> {
        self.inner.existing(destination, app).map(|a| a.lock().rec.clone())
    }

    /// The port `app`'s route of `destination` listens on right now, and
    /// the backend port it forwards to.
    pub fn route(&self, destination: &str, app: &str) -> Option<(u16, Option<u16>)> {
        let a = self.inner.existing(destination, app)?;
        let st = a.lock();
        st.route.as_ref().map(|r| (r.port(), r.backend()))
    }

    /// Every instance this adapter manages, as (app, instance).
    pub fn instances(&self) -> Vec<(String, Instance)> {
        let mut out = Vec::new();
        for a in self.inner.all_apps() {
            let st = a.lock();
            out.extend(st.rec.instances().map(|i| (a.name.clone(), i.clone())));
        }
        out
    }

    /// Stop listening on the routes and stop supervising; the instances
    /// keep running for the next `fleet-node` on this data dir to adopt.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let apps = self.inner.all_apps();
        for a in apps {
            let route = a.lock().route.take();
            if let Some(r) = route {
                r.close().await;
            }
        }
    }

    /// Stop every instance of every app and close the routes (state files
    /// are updated). For tests and for decommissioning a node.
    pub async fn stop_all(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let apps = self.inner.all_apps();
        for a in apps {
            let _op = a.op.lock().await;
            let (route, instances) = {
                let mut st = a.lock();
                let list: Vec<Instance> =
                    [st.rec.active.take(), st.rec.staged.take(), st.rec.retired.take()].into_iter().flatten().collect();
                (st.route.take(), list)
            };
            if let Some(r) = route {
                r.close().await;
            }
            for i in instances {
                if let Err(e) = self.inner.stop_instance(&a, &i).await {
                    tracing::warn!(app = %a.name, error = %e, "could not stop an instance");
                }
            }
            let st = a.lock();
            if let Err(e) = self.inner.persist(&st) {
                tracing::warn!(app = %a.name, error = %e, "could not record the stopped state");
            }
        }
    }
}

/// The step is not one of this adapter's: the agent sent it to the wrong one.
fn not_mine(action: &StepAction) -> StepError {
    StepError::invalid(format!(
        "the process adapter cannot run a `{}` step; this is a bug in fleet-node's adapter selection, please report it",
        action.verb()
    ))
}

impl Adapter for ProcessAdapter {
    fn name(&self) -> &'static str {
        "process"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let i = &self.inner;
            match action {
                StepAction::StartInstance { app, release, run, env } => i.start(ctx, app, release, run, env).await,
                StepAction::HealthCheck { app, release, check } => i.health(ctx, app, release, check).await,
                StepAction::SwitchRoute { app, release, port, listen } => i.switch(ctx, app, release, *port, listen.as_deref()).await,
                StepAction::StopOld { app, drain_ms, .. } => i.stop_old(ctx, app, *drain_ms).await,
                StepAction::StopCurrent { app, drain_ms, .. } => i.stop_current(ctx, app, *drain_ms).await,
                StepAction::CanaryPause { app, release, pause_ms, analysis, .. } => match analysis {
                    Some(a) => i.analyze(ctx, app, release, a, pause_ms.unwrap_or(0)).await,
                    None => Ok(json!({})),
                },
                StepAction::StartContainer { .. } | StepAction::Command { .. } => Err(not_mine(action)),
            }
        })
    }

    fn undo<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction, out: Option<&'a Value>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let i = &self.inner;
            match action {
                StepAction::StartInstance { app, release, .. } => i.undo_start(ctx, app, release, out).await,
                StepAction::HealthCheck { .. } => Ok(json!({})),
                StepAction::SwitchRoute { app, .. } => i.undo_switch(ctx, app, out).await,
                StepAction::StopOld { app, .. } => i.undo_stop_old(ctx, app, out).await,
                StepAction::StopCurrent { app, .. } => i.undo_stop_current(ctx, app, out).await,
                StepAction::CanaryPause { .. } => Ok(json!({})),
                StepAction::StartContainer { .. } | StepAction::Command { .. } => Err(not_mine(action)),
            }
        })
    }

    fn check<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Option<Value>, StepError>> {
        Box::pin(async move {
            let i = &self.inner;
            Ok(match action {
                StepAction::StartInstance { app, release, .. } => i.check_start(ctx, app, release).await,
                _ => None,
            })
        })
    }

    /// Stops every staged instance of `destination` started with `token`:
    /// nothing routes to it. Active (and retired) instances, and every
    /// other destination's, are left alone.
    fn forget<'a>(&'a self, destination: &'a str, token: u64) -> BoxFuture<'a, Vec<String>> {
        Box::pin(self.inner.forget(destination, token))
    }

    fn destinations(&self) -> Vec<String> {
        self.inner.destinations()
    }

    /// One server per app of `destination` on this node (see `discover.rs`).
    fn discover<'a>(&'a self, destination: &'a str) -> BoxFuture<'a, Result<Vec<crate::adapter::Server>, StepError>> {
        Box::pin(async move { Ok(self.inner.discover(destination)) })
    }

    fn health<'a>(&'a self, destination: &'a str, server: &'a crate::adapter::Server) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(self.inner.server_health(destination, server))
    }

    fn cancelled<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let (StepAction::StartInstance { app, release, .. }, false) = (action, ctx.undo) {
                self.inner.cancelled_start(ctx, app, release).await;
            }
        })
    }

    fn timeout_hint(&self, action: &StepAction) -> String {
        let logs = self.inner.cfg.data_dir.join("logs");
        match action {
            StepAction::StartInstance { .. } => format!("the instance was stopped; check its log in {}", logs.display()),
            StepAction::HealthCheck { .. } => {
                "the health check outlived its step; check the manifest's `health.deadline` against the step timeout".into()
            }
            StepAction::SwitchRoute { .. } => "switching a route should take milliseconds; check the node's own log (stderr)".into(),
            StepAction::StopOld { .. } | StepAction::StopCurrent { .. } => {
                "the old instance did not drain and stop in time; check `drain` in the manifest against the step timeout".into()
            }
            StepAction::CanaryPause { .. } => "the canary analysis outlived its pause; check the node's own log (stderr)".into(),
            StepAction::StartContainer { .. } | StepAction::Command { .. } => "this step is another adapter's".into(),
        }
    }
}
