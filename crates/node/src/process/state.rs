//! The process adapter's persisted state: per (destination, app),
//! `<data-dir>/apps/<destination>+<app>.json` records the route port and
//! three instance slots (`staged`, `active`, `retired`), rewritten
//! atomically after every change; and the in-memory state around it (exit
//! watches, the route, restart counters).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::proxy::Route;
use super::{Inner, ProcessError};
use crate::adapter::StepError;
use crate::proc::ExitWatch;
use crate::util::{safe_file_part, write_atomic};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub release: String,
    pub port: u16,
    pub pid: u32,
    /// The command line, `{release}` and `{port}` already substituted.
    pub argv: Vec<String>,
    /// The manifest's environment (Fleet adds PORT, FLEET_APP,
    /// FLEET_RELEASE and FLEET_TOKEN).
    pub env: BTreeMap<String, String>,
    pub log: PathBuf,
    /// Fencing token of the deployment that started it.
    pub token: u64,
    /// Start time from `/proc/<pid>/stat`, to recognise the process later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_start: Option<u64>,
}

impl Instance {
    pub(super) fn same(&self, other: &Instance) -> bool {
        self.port == other.port && self.release == other.release
    }
    pub(super) fn label(&self, app: &str) -> String {
        format!("{app}@{} (pid {}, port {})", self.release, self.pid, self.port)
    }
}

/// What `<data-dir>/apps/<destination>+<app>.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The destination whose deployments manage these instances. Empty in
    /// the per-app files (`apps/<app>.json`) of older `fleet-node`s, which
    /// are not adopted.
    #[serde(default)]
    pub destination: String,
    pub app: String,
    /// The route's stable port, once chosen (kept forever).
    pub route_port: Option<u16>,
    /// The IP address the route listens on (`route.listen`; absent: 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_listen: Option<String>,
    pub active: Option<Instance>,
    pub staged: Option<Instance>,
    pub retired: Option<Instance>,
}

impl AppRecord {
    /// The recorded instances: active, staged, retired.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        [&self.active, &self.staged, &self.retired].into_iter().flatten()
    }
}

/// One app of one destination on this node: its record and what watches it.
pub(super) struct App {
    pub(super) destination: String,
    pub(super) name: String,
    /// Serializes the actions on this app.
    pub(super) op: tokio::sync::Mutex<()>,
    st: Mutex<AppState>,
}

impl App {
    pub(super) fn lock(&self) -> MutexGuard<'_, AppState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
pub(super) struct AppState {
    pub(super) rec: AppRecord,
    /// Exit watches of the processes of this app, by pid.
    pub(super) procs: BTreeMap<u32, ExitWatch>,
    /// Pids being stopped on purpose (their exit is not a crash).
    pub(super) stopping: BTreeSet<u32>,
    pub(super) route: Option<Route>,
    pub(super) restarts: u32,
    pub(super) last_restart: Option<Instant>,
}

/// Every app record in `<data-dir>/apps`. A record without a destination
/// (written by a `fleet-node` that kept one record per app) is skipped
/// with a warning: its instances are no longer managed.
pub(super) fn load_records(data_dir: &Path) -> Result<Vec<AppRecord>, ProcessError> {
    let apps_dir = data_dir.join("apps");
    let entries = std::fs::read_dir(&apps_dir).map_err(|source| ProcessError::Read { path: apps_dir.clone(), source })?;
    let mut records = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| ProcessError::Read { path: apps_dir.clone(), source })?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|source| ProcessError::Read { path: path.clone(), source })?;
        let rec: AppRecord = serde_json::from_slice(&bytes).map_err(|source| ProcessError::Parse { path: path.clone(), source })?;
        if rec.destination.is_empty() {
            tracing::warn!(
                path = %path.display(),
                app = %rec.app,
                "an app record of an older fleet-node (one per app, no destination) is not adopted: stop its instances by hand \
                 (the pids are in the file), remove the file, and deploy the app again"
            );
            continue;
        }
        records.push(rec);
    }
    Ok(records)
}

pub(super) fn persist_error(path: &Path, e: std::io::Error) -> StepError {
    StepError::resource(format!("cannot write {}: {e}; check the node's data dir (disk full? permissions?)", path.display()))
}

impl Inner {
    /// Every app this adapter knows, as of now (the map's lock is not held
    /// while the caller locks each app).
    pub(super) fn all_apps(&self) -> Vec<Arc<App>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The ports of every instance and route this node has recorded, so a
    /// new instance never gets one ([`super::ports`]).
    pub(super) fn recorded_ports(&self) -> std::collections::HashSet<u16> {
        let mut ports = std::collections::HashSet::new();
        for a in self.all_apps() {
            let st = a.lock();
            ports.extend(st.rec.instances().map(|i| i.port));
            ports.extend(st.rec.route_port);
        }
        ports
    }

    pub(super) fn existing(&self, destination: &str, app: &str) -> Option<Arc<App>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner()).get(&(destination.to_string(), app.to_string())).cloned()
    }

    pub(super) fn app(&self, destination: &str, name: &str) -> Arc<App> {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.entry((destination.to_string(), name.to_string()))
            .or_insert_with(|| {
                let rec = AppRecord { destination: destination.to_string(), app: name.to_string(), ..Default::default() };
                Arc::new(App {
                    destination: destination.to_string(),
                    name: name.to_string(),
                    op: tokio::sync::Mutex::new(()),
                    st: Mutex::new(AppState { rec, ..Default::default() }),
                })
            })
            .clone()
    }

    /// `<data-dir>/apps/<destination>+<app>` with `ext` (`+` is never part
    /// of a name, so two (destination, app) pairs never share a file).
    pub(super) fn app_file(&self, destination: &str, app: &str, ext: &str) -> PathBuf {
        self.cfg.data_dir.join("apps").join(format!("{}+{}.{ext}", safe_file_part(destination), safe_file_part(app)))
    }

    pub(super) fn persist(&self, st: &AppState) -> Result<(), StepError> {
        let path = self.app_file(&st.rec.destination, &st.rec.app, "json");
        let bytes = serde_json::to_vec_pretty(&st.rec).map_err(|e| persist_error(&path, std::io::Error::other(e)))?;
        write_atomic(&path, &bytes).map_err(|e| persist_error(&path, e))
    }

    pub(super) fn log_path(&self, destination: &str, app: &str, release: &str, port: u16) -> PathBuf {
        let (d, a, r) = (safe_file_part(destination), safe_file_part(app), safe_file_part(release));
        self.cfg.data_dir.join("logs").join(format!("{d}+{a}-{r}-{port}.log"))
    }
}
