//! The process adapter's persisted state: per app, `<data-dir>/apps/<app>.json`
//! records the route port and three instance slots (`staged`, `active`,
//! `retired`), rewritten atomically after every change; and the in-memory
//! state around it (exit watches, the route, restart counters).

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

/// What `<data-dir>/apps/<app>.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub app: String,
    /// The route's stable port, once chosen (kept forever).
    pub route_port: Option<u16>,
    pub active: Option<Instance>,
    pub staged: Option<Instance>,
    pub retired: Option<Instance>,
}

/// One app on this node: its record and what watches it.
pub(super) struct App {
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

/// Every app record in `<data-dir>/apps`.
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
        records.push(rec);
    }
    Ok(records)
}

pub(super) fn persist_error(path: &Path, e: std::io::Error) -> StepError {
    StepError::resource(format!("cannot write {}: {e}; check the node's data dir (disk full? permissions?)", path.display()))
}

impl Inner {
    pub(super) fn existing(&self, app: &str) -> Option<Arc<App>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner()).get(app).cloned()
    }

    pub(super) fn app(&self, name: &str) -> Arc<App> {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(App {
                    name: name.to_string(),
                    op: tokio::sync::Mutex::new(()),
                    st: Mutex::new(AppState { rec: AppRecord { app: name.to_string(), ..Default::default() }, ..Default::default() }),
                })
            })
            .clone()
    }

    pub(super) fn state_path(&self, app: &str) -> PathBuf {
        self.cfg.data_dir.join("apps").join(format!("{app}.json"))
    }

    pub(super) fn persist(&self, st: &AppState) -> Result<(), StepError> {
        let path = self.state_path(&st.rec.app);
        let bytes = serde_json::to_vec_pretty(&st.rec).map_err(|e| persist_error(&path, std::io::Error::other(e)))?;
        write_atomic(&path, &bytes).map_err(|e| persist_error(&path, e))
    }

    pub(super) fn log_path(&self, app: &str, release: &str, port: u16) -> PathBuf {
        self.cfg.data_dir.join("logs").join(format!("{}-{}-{port}.log", safe_file_part(app), safe_file_part(release)))
    }
}
