//! The `process` adapter: each release of an app runs as a supervised local
//! process, blue-green on this node, behind a built-in TCP route (a small
//! proxy on the app's stable port).
//!
//! Per app, `<data-dir>/apps/<app>.json` records the route port and three
//! instance slots:
//!
//! * `staged`: started, not yet receiving traffic (after `start`);
//! * `active`: the route's backend, restarted if it dies (after `switch`);
//! * `retired`: the previous active, still draining (until `stop-old`).
//!
//! The file is rewritten (temporary file + rename) after every change, so a
//! restarted node adopts the processes that still run (checked through
//! `/proc`, including their start time, so a reused pid is not mistaken for
//! an instance) and listens on the same route port again.

pub mod probe;
pub mod proc;
pub mod proxy;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use fleet_core::manifest::HealthCheck;
use fleet_core::saga::StepAction;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::adapter::{Adapter, StepContext, StepError};
use crate::util::{human, indent, tail, write_atomic};
use proc::{ExitWatch, GroupGuard};
use proxy::{Conns, Route};

/// Settings of the process adapter.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub data_dir: PathBuf,
    /// Directories put in front of `PATH` for instances, commands and
    /// health commands (by default the directory of the running
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
}

impl ProcessConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
        ProcessConfig {
            data_dir: data_dir.into(),
            path_prepend: exe_dir.into_iter().collect(),
            stop_grace: Duration::from_secs(3),
            exit_grace: Duration::from_millis(300),
            restart_max_backoff: Duration::from_secs(5),
            restore_wait: Duration::from_secs(10),
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

/// One running release of an app.
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
    fn same(&self, other: &Instance) -> bool {
        self.port == other.port && self.release == other.release
    }
    fn label(&self, app: &str) -> String {
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

struct App {
    name: String,
    /// Serializes the actions on this app.
    op: tokio::sync::Mutex<()>,
    st: Mutex<AppState>,
}

impl App {
    fn lock(&self) -> MutexGuard<'_, AppState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct AppState {
    rec: AppRecord,
    /// Exit watches of the processes of this app, by pid.
    procs: BTreeMap<u32, ExitWatch>,
    /// Pids being stopped on purpose (their exit is not a crash).
    stopping: std::collections::BTreeSet<u32>,
    route: Option<Route>,
    restarts: u32,
    last_restart: Option<Instant>,
}

struct Inner {
    cfg: ProcessConfig,
    apps: Mutex<BTreeMap<String, Arc<App>>>,
    conns: Conns,
    closed: AtomicBool,
}

/// The `process` adapter. Cheap to clone.
#[derive(Clone)]
pub struct ProcessAdapter {
    inner: Arc<Inner>,
}

fn check_name(field: &'static str, value: &str) -> Result<(), StepError> {
    fleet_core::names::validate_name(field, value).map_err(|e| StepError::invalid(e.to_string()))
}

fn persist_error(path: &Path, e: std::io::Error) -> StepError {
    StepError::resource(format!("cannot write {}: {e}; check the node's data dir (disk full? permissions?)", path.display()))
}

fn free_port() -> Result<u16, StepError> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| StepError::resource(format!("cannot find a free port on 127.0.0.1: {e}; the node may be out of ports or file descriptors")))
}

fn substitute(argv: &[String], app: &str, release: &str, port: u16) -> Vec<String> {
    argv.iter()
        .map(|a| a.replace("{release}", release).replace("{port}", &port.to_string()).replace("{app}", app))
        .collect()
}

fn safe_file_part(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
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
        let inner = Arc::new(Inner { cfg, apps: Mutex::new(BTreeMap::new()), conns: Conns::default(), closed: AtomicBool::new(false) });
        let apps_dir = inner.cfg.data_dir.join("apps");
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
        for rec in records {
            inner.adopt(rec);
        }
        Ok(ProcessAdapter { inner })
    }

    /// The recorded state of `app` (None if this node never ran it).
    pub fn record(&self, app: &str) -> Option<AppRecord> {
        self.inner.existing(app).map(|a| a.lock().rec.clone())
    }

    /// The port `app`'s route listens on right now, and the backend port it
    /// forwards to.
    pub fn route(&self, app: &str) -> Option<(u16, Option<u16>)> {
        let a = self.inner.existing(app)?;
        let st = a.lock();
        st.route.as_ref().map(|r| (r.port(), r.backend()))
    }

    /// Every instance this adapter manages, as (app, instance).
    pub fn instances(&self) -> Vec<(String, Instance)> {
        let apps: Vec<Arc<App>> = self.inner.apps.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut out = Vec::new();
        for a in apps {
            let st = a.lock();
            for i in [&st.rec.active, &st.rec.staged, &st.rec.retired].into_iter().flatten() {
                out.push((a.name.clone(), i.clone()));
            }
        }
        out
    }

    /// Stop listening on the routes and stop supervising; the instances
    /// keep running for the next `fleet-node` on this data dir to adopt.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let apps: Vec<Arc<App>> = self.inner.apps.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
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
        let apps: Vec<Arc<App>> = self.inner.apps.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for a in apps {
            let _op = a.op.lock().await;
            let (route, instances) = {
                let mut st = a.lock();
                let list: Vec<Instance> = [st.rec.active.take(), st.rec.staged.take(), st.rec.retired.take()].into_iter().flatten().collect();
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

impl Inner {
    fn existing(&self, app: &str) -> Option<Arc<App>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner()).get(app).cloned()
    }

    fn app(&self, name: &str) -> Arc<App> {
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

    fn state_path(&self, app: &str) -> PathBuf {
        self.cfg.data_dir.join("apps").join(format!("{app}.json"))
    }

    fn persist(&self, st: &AppState) -> Result<(), StepError> {
        let path = self.state_path(&st.rec.app);
        let bytes = serde_json::to_vec_pretty(&st.rec).map_err(|e| persist_error(&path, std::io::Error::other(e)))?;
        write_atomic(&path, &bytes).map_err(|e| persist_error(&path, e))
    }

    fn log_path(&self, app: &str, release: &str, port: u16) -> PathBuf {
        self.cfg.data_dir.join("logs").join(format!("{}-{}-{port}.log", safe_file_part(app), safe_file_part(release)))
    }

    /// Spawn `tmpl` (its pid is ignored) and watch it. Synchronous, so the
    /// caller records the instance under the same lock it spawned it.
    fn launch(self: &Arc<Self>, app: &str, st: &mut AppState, tmpl: &Instance) -> Result<Instance, StepError> {
        let Some(first) = tmpl.argv.first() else {
            return Err(StepError::invalid(format!("{app}@{}: `run` is empty; give the command that starts one instance", tmpl.release)));
        };
        let program = proc::resolve_program(first, &self.cfg.path_prepend).map_err(|e| {
            StepError::invalid(format!("cannot start {app}@{}: {e}; install it on this node or give its full path in the manifest's `run`", tmpl.release))
        })?;
        let mut env = tmpl.env.clone();
        env.insert("PORT".into(), tmpl.port.to_string());
        env.insert("FLEET_APP".into(), app.to_string());
        env.insert("FLEET_RELEASE".into(), tmpl.release.clone());
        env.insert("FLEET_TOKEN".into(), tmpl.token.to_string());
        let child = proc::spawn(proc::Spawn {
            program: &program,
            args: &tmpl.argv[1..],
            env: &env,
            path_prepend: &self.cfg.path_prepend,
            cwd: &self.cfg.data_dir,
            log: &tmpl.log,
            kill_on_drop: false,
        })
        .map_err(|e| StepError::invalid(format!("cannot start {app}@{} (`{}`): {e}", tmpl.release, tmpl.argv.join(" "))))?;
        let Some(pid) = child.id() else {
            return Err(StepError::transient(format!("{app}@{} exited before its pid could be read; try again", tmpl.release)));
        };
        let weak = Arc::downgrade(self);
        let name = app.to_string();
        let exit = proc::watch_child(child, move |how| on_exit(weak, name, pid, how));
        st.procs.insert(pid, exit);
        let inst = Instance { pid, proc_start: proc::proc_start_time(pid), ..tmpl.clone() };
        tracing::info!(app, release = %inst.release, pid, port = inst.port, log = %inst.log.display(), "instance started");
        Ok(inst)
    }

    /// The exit watch of `inst`, creating a `/proc` poller for a process
    /// that is not (or no longer) our child.
    fn exit_watch(&self, st: &mut AppState, inst: &Instance) -> ExitWatch {
        if let Some(w) = st.procs.get(&inst.pid) {
            return w.clone();
        }
        let w = proc::watch_pid(inst.pid, inst.proc_start, |_| {});
        st.procs.insert(inst.pid, w.clone());
        w
    }

    /// Stop `inst` (SIGTERM to its group, SIGKILL after the grace) and
    /// wait until it is gone. Already gone is fine.
    async fn stop_instance(&self, app: &App, inst: &Instance) -> Result<(), StepError> {
        let exit = {
            let mut st = app.lock();
            if !st.procs.contains_key(&inst.pid) && !proc::alive(inst.pid, inst.proc_start) {
                return Ok(());
            }
            st.stopping.insert(inst.pid);
            self.exit_watch(&mut st, inst)
        };
        let r = proc::stop(inst.pid, exit, self.cfg.stop_grace).await;
        match r {
            Ok(how) => {
                let mut st = app.lock();
                st.procs.remove(&inst.pid);
                st.stopping.remove(&inst.pid);
                drop(st);
                tracing::info!(app = %app.name, release = %inst.release, pid = inst.pid, port = inst.port, "instance stopped ({how})");
                Ok(())
            }
            Err(e) => Err(StepError::resource(format!("cannot stop {}: {e}", inst.label(&app.name)))),
        }
    }

    fn adopt(self: &Arc<Self>, rec: AppRecord) {
        let app = self.app(&rec.app);
        let mut st = app.lock();
        st.rec = rec;
        let mut restart = None;
        for slot in ["active", "staged", "retired"] {
            let inst = match slot {
                "active" => st.rec.active.clone(),
                "staged" => st.rec.staged.clone(),
                _ => st.rec.retired.clone(),
            };
            let Some(inst) = inst else { continue };
            if proc::alive(inst.pid, inst.proc_start) {
                let weak = Arc::downgrade(self);
                let name = app.name.clone();
                let pid = inst.pid;
                let w = proc::watch_pid(pid, inst.proc_start, move |how| on_exit(weak, name, pid, how));
                st.procs.insert(pid, w);
                tracing::info!(app = %app.name, slot, release = %inst.release, pid, port = inst.port, "adopted a running instance");
            } else if slot == "active" {
                tracing::warn!(app = %app.name, release = %inst.release, pid = inst.pid, "the active instance is no longer running; restarting it");
                restart = Some(inst);
            } else {
                tracing::warn!(app = %app.name, slot, release = %inst.release, pid = inst.pid, "a recorded instance is no longer running; forgetting it");
                match slot {
                    "staged" => st.rec.staged = None,
                    _ => st.rec.retired = None,
                }
            }
        }
        if let (Some(port), Some(active)) = (st.rec.route_port, st.rec.active.clone()) {
            match Route::bind(&app.name, port, self.conns.clone()) {
                Ok(r) => {
                    r.set_backend(Some(active.port));
                    tracing::info!(app = %app.name, port, backend = active.port, "route listening again");
                    st.route = Some(r);
                }
                Err(e) => {
                    tracing::error!(app = %app.name, port, error = %e, "cannot listen on the route port again; will keep trying");
                    tokio::spawn(rebind_route(Arc::downgrade(self), app.name.clone(), port));
                }
            }
        }
        if let Err(e) = self.persist(&st) {
            tracing::warn!(app = %app.name, error = %e, "cannot record the adopted state");
        }
        drop(st);
        if let Some(inst) = restart {
            tokio::spawn(restart_active(Arc::downgrade(self), app.name.clone(), inst.pid, Duration::ZERO));
        }
    }

    // ------------------------------------------------------------ actions

    async fn start(self: &Arc<Self>, ctx: &StepContext, name: &str, release: &str, run: &[String], env: &BTreeMap<String, String>) -> Result<Value, StepError> {
        check_name("app", name)?;
        check_name("release", release)?;
        let app = self.app(name);
        let _op = app.op.lock().await;
        let leftover = app.lock().rec.staged.clone();
        if let Some(old) = leftover {
            tracing::info!(app = name, release = %old.release, pid = old.pid, "stopping a leftover staged instance before starting {release}");
            self.stop_instance(&app, &old).await?;
            let mut st = app.lock();
            st.rec.staged = None;
            self.persist(&st)?;
        }
        let port = free_port()?;
        let tmpl = Instance {
            release: release.to_string(),
            port,
            pid: 0,
            argv: substitute(run, name, release, port),
            env: env.clone(),
            log: self.log_path(name, release, port),
            token: ctx.token,
            proc_start: None,
        };
        let (inst, mut exit) = {
            let mut st = app.lock();
            let inst = self.launch(name, &mut st, &tmpl)?;
            st.rec.staged = Some(inst.clone());
            if let Err(e) = self.persist(&st) {
                proc::signal_group(inst.pid, libc::SIGKILL);
                st.rec.staged = None;
                return Err(e);
            }
            let exit = self.exit_watch(&mut st, &inst);
            (inst, exit)
        };
        let token_path = self.cfg.data_dir.join("apps").join(format!("{name}.token"));
        write_atomic(&token_path, format!("{}\n", ctx.token).as_bytes()).map_err(|e| persist_error(&token_path, e))?;
        if let Some(how) = proc::wait_exit(&mut exit, self.cfg.exit_grace).await {
            let mut st = app.lock();
            if st.rec.staged.as_ref().is_some_and(|s| s.same(&inst)) {
                st.rec.staged = None;
                self.persist(&st)?;
            }
            st.procs.remove(&inst.pid);
            return Err(StepError::invalid(format!(
                "{name}@{release} {how} right after it started (`{}`); last lines of its log {}:\n{}\nFix the release or the manifest's `run`, then deploy again",
                inst.argv.join(" "),
                inst.log.display(),
                indent(&tail(&inst.log, 15)),
            )));
        }
        Ok(json!({"port": inst.port, "pid": inst.pid, "release": inst.release}))
    }

    async fn undo_start(&self, name: &str, release: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let Some(app) = self.existing(name) else { return Ok(json!({"stopped": null})) };
        let _op = app.op.lock().await;
        let port = output.and_then(|o| o.get("port")).and_then(Value::as_u64).map(|p| p as u16);
        let matches = |i: &Option<Instance>| i.as_ref().is_some_and(|i| i.release == release && port.is_none_or(|p| p == i.port));
        let (slot, inst) = {
            let st = app.lock();
            if matches(&st.rec.active) {
                let a = st.rec.active.clone().map(|a| a.label(name)).unwrap_or_default();
                return Err(StepError::invalid(format!(
                    "{a} is serving {name}'s route, so it is not stopped; undo the route switch first (the leader does this in order)"
                )));
            }
            if matches(&st.rec.staged) {
                ("staged", st.rec.staged.clone())
            } else if matches(&st.rec.retired) {
                ("retired", st.rec.retired.clone())
            } else {
                ("", None)
            }
        };
        let Some(inst) = inst else { return Ok(json!({"stopped": null})) };
        self.stop_instance(&app, &inst).await?;
        let mut st = app.lock();
        match slot {
            "staged" => st.rec.staged = None,
            _ => st.rec.retired = None,
        }
        self.persist(&st)?;
        Ok(json!({"stopped": inst}))
    }

    async fn health(&self, name: &str, release: &str, check: &HealthCheck) -> Result<Value, StepError> {
        let app = self.existing(name).ok_or_else(|| not_started(name, release))?;
        let _op = app.op.lock().await;
        let (inst, mut exit) = {
            let mut st = app.lock();
            let inst = [&st.rec.staged, &st.rec.active]
                .into_iter()
                .flatten()
                .find(|i| i.release == release)
                .cloned()
                .ok_or_else(|| not_started(name, release))?;
            let exit = self.exit_watch(&mut st, &inst);
            (inst, exit)
        };
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(check.deadline_ms);
        let timeout = Duration::from_millis(check.timeout_ms);
        let mut interval = tokio::time::interval(Duration::from_millis(check.interval_ms.max(1)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let exited = |how: String, inst: &Instance| {
            StepError::invalid(format!(
                "{name}@{release} {how} during its health check; the route was not switched. Last lines of its log {}:\n{}",
                inst.log.display(),
                indent(&tail(&inst.log, 15))
            ))
        };
        let mut passes = 0u32;
        let mut probes = 0u32;
        let mut last = String::from("no probe finished");
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                how = exit.wait_for(|e| e.is_some()) => {
                    let how = how.ok().and_then(|h| h.clone()).unwrap_or_else(|| "exited".into());
                    return Err(exited(how, &inst));
                }
            }
            let result = tokio::select! {
                r = probe::probe(&check.probe, inst.port, timeout, &self.cfg.path_prepend, &self.cfg.data_dir) => r,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            probes += 1;
            match result {
                Ok(()) => {
                    passes += 1;
                    if passes >= check.healthy_threshold {
                        return Ok(json!({
                            "release": release, "port": inst.port, "pid": inst.pid,
                            "probes": probes, "elapsed_ms": started.elapsed().as_millis() as u64,
                        }));
                    }
                }
                Err(e) => {
                    passes = 0;
                    last = e;
                }
            }
        }
        if let Some(how) = exit.borrow().clone() {
            return Err(exited(how, &inst));
        }
        let need = if check.healthy_threshold > 1 { format!(" {} times in a row", check.healthy_threshold) } else { String::new() };
        Err(StepError::invalid(format!(
            "{name}@{release} did not pass its health check{need} ({last}) within {}; the route was not switched. Its log is {}",
            human(Duration::from_millis(check.deadline_ms)),
            inst.log.display()
        )))
    }

    async fn switch(self: &Arc<Self>, name: &str, release: &str, port: u16) -> Result<Value, StepError> {
        let app = self.existing(name).ok_or_else(|| not_started(name, release))?;
        let _op = app.op.lock().await;
        let (old_route, displaced, out) = {
            let mut st = app.lock();
            let target = match &st.rec.staged {
                Some(s) if s.release == release => s.clone(),
                _ => match &st.rec.active {
                    // Already switched (a retry after a lost result).
                    Some(a) if a.release == release && st.rec.staged.is_none() => {
                        let route = st.route.as_ref().map(|r| r.port()).or(st.rec.route_port).unwrap_or(0);
                        return Ok(json!({"route": format!("127.0.0.1:{route}"), "previous": st.rec.retired, "instance": a}));
                    }
                    _ => return Err(not_started(name, release)),
                },
            };
            let exit = self.exit_watch(&mut st, &target);
            if let Some(how) = exit.borrow().clone() {
                return Err(StepError::invalid(format!(
                    "{} {how} before the route could be switched to it; the route still points at the previous release. Its log is {}",
                    target.label(name),
                    target.log.display()
                )));
            }
            let want = if port != 0 { port } else { st.rec.route_port.unwrap_or(0) };
            let rebind = match &st.route {
                None => true,
                Some(r) => port != 0 && r.port() != port,
            };
            let mut old_route = None;
            if rebind {
                let r = Route::bind(name, want, self.conns.clone()).map_err(|e| {
                    StepError::resource(format!(
                        "cannot listen on 127.0.0.1:{want} for {name}'s route: {e}; free that port or set another `port:` in the manifest"
                    ))
                })?;
                r.set_backend(Some(target.port));
                if st.rec.route_port.is_some_and(|p| p != r.port()) {
                    tracing::warn!(app = name, from = ?st.rec.route_port, to = r.port(), "the route moves to another port");
                }
                st.rec.route_port = Some(r.port());
                old_route = st.route.replace(r);
            } else if let Some(r) = &st.route {
                r.set_backend(Some(target.port));
            }
            let route_port = st.route.as_ref().map(|r| r.port()).unwrap_or(want);
            let displaced = st.rec.retired.take();
            let previous = st.rec.active.take();
            st.rec.retired = previous.clone();
            st.rec.active = Some(target.clone());
            st.rec.staged = None;
            self.persist(&st)?;
            tracing::info!(app = name, release, route = route_port, backend = target.port, "route switched");
            (old_route, displaced, json!({"route": format!("127.0.0.1:{route_port}"), "previous": previous, "instance": target}))
        };
        if let Some(r) = old_route {
            r.close().await;
        }
        if let Some(d) = displaced {
            // A retired instance left by an earlier deployment that never
            // stopped it: nothing routes to it any more.
            tracing::info!(app = name, release = %d.release, pid = d.pid, "stopping an older retired instance");
            self.conns.of(d.port).drained(self.cfg.stop_grace).await;
            self.stop_instance(&app, &d).await?;
        }
        Ok(out)
    }

    async fn undo_switch(&self, name: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let Some(app) = self.existing(name) else { return Ok(json!({"active": null})) };
        let parse = |k: &str| -> Result<Option<Instance>, StepError> {
            match output.and_then(|o| o.get(k)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                    StepError::invalid(format!("the switch step's recorded output has an unreadable `{k}` ({e}); the route was left as it is"))
                }),
            }
        };
        let previous = parse("previous")?;
        let Some(instance) = parse("instance")? else {
            return Err(StepError::invalid("the switch step's recorded output names no instance; the route was left as it is"));
        };
        let _op = app.op.lock().await;
        let closing = {
            let mut st = app.lock();
            let active = st.rec.active.clone();
            let in_effect = active.as_ref().is_some_and(|a| a.same(&instance));
            if !in_effect {
                let undone = match (&active, &previous) {
                    (Some(a), Some(p)) => a.same(p),
                    (None, None) => true,
                    _ => false,
                };
                if undone {
                    return Ok(json!({"active": active}));
                }
                return Err(StepError::invalid(format!(
                    "{name}'s route now points at {}, not at {}@{}; another deployment changed it since, so it was left as it is",
                    active.map(|a| a.label(name)).unwrap_or_else(|| "nothing".into()),
                    instance.release,
                    instance.port
                )));
            }
            let current = active.unwrap_or(instance);
            let mut closing = None;
            match &previous {
                Some(p) => {
                    let back = st.rec.retired.clone().filter(|r| r.same(p));
                    let Some(back) = back else {
                        return Err(StepError::invalid(format!(
                            "cannot point {name}'s route back at {}: that instance is not running any more; undo `stop-old` first (it starts it again)",
                            p.label(name)
                        )));
                    };
                    let exit = self.exit_watch(&mut st, &back);
                    if let Some(how) = exit.borrow().clone() {
                        return Err(StepError::invalid(format!(
                            "cannot point {name}'s route back at {}: it {how}; undo `stop-old` first (it starts it again)",
                            back.label(name)
                        )));
                    }
                    match &st.route {
                        Some(r) => r.set_backend(Some(back.port)),
                        None => {
                            let port = st.rec.route_port.unwrap_or(0);
                            let r = Route::bind(name, port, self.conns.clone()).map_err(|e| {
                                StepError::resource(format!("cannot listen on 127.0.0.1:{port} for {name}'s route: {e}; free that port"))
                            })?;
                            r.set_backend(Some(back.port));
                            st.route = Some(r);
                        }
                    }
                    st.rec.active = Some(back);
                    st.rec.retired = None;
                }
                None => {
                    closing = st.route.take();
                    st.rec.active = None;
                }
            }
            st.rec.staged = Some(current);
            self.persist(&st)?;
            tracing::info!(app = name, back_to = ?st.rec.active.as_ref().map(|a| &a.release), "route switched back");
            closing
        };
        if let Some(r) = closing {
            r.close().await;
        }
        let st = app.lock();
        Ok(json!({"active": st.rec.active}))
    }

    async fn stop_old(&self, name: &str, drain_ms: u64) -> Result<Value, StepError> {
        let Some(app) = self.existing(name) else { return Ok(json!({"stopped": null})) };
        let _op = app.op.lock().await;
        let Some(old) = app.lock().rec.retired.clone() else { return Ok(json!({"stopped": null})) };
        let open = self.conns.of(old.port).drained(Duration::from_millis(drain_ms)).await;
        if open > 0 {
            tracing::info!(app = name, release = %old.release, open, "connections still open after the drain time; stopping anyway");
        }
        self.stop_instance(&app, &old).await?;
        let mut st = app.lock();
        if st.rec.retired.as_ref().is_some_and(|r| r.same(&old)) {
            st.rec.retired = None;
        }
        self.persist(&st)?;
        Ok(json!({"stopped": old, "open_connections_cut": open}))
    }

    async fn undo_stop_old(self: &Arc<Self>, name: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let stopped: Option<Instance> = match output.and_then(|o| o.get("stopped")) {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                StepError::invalid(format!("the stop-old step's recorded output is unreadable ({e}); nothing was restarted"))
            })?),
        };
        let Some(old) = stopped else { return Ok(json!({"restarted": null})) };
        let app = self.app(name);
        let _op = app.op.lock().await;
        let (inst, mut exit) = {
            let mut st = app.lock();
            let existing = st.rec.retired.clone().filter(|r| r.same(&old));
            let running = existing.filter(|r| {
                let w = self.exit_watch(&mut st, r);
                let up = w.borrow().is_none();
                up
            });
            match running {
                Some(r) => {
                    let w = self.exit_watch(&mut st, &r);
                    (r, w)
                }
                None => {
                    let clash = [&st.rec.active, &st.rec.staged].into_iter().flatten().find(|i| i.port == old.port).cloned();
                    if let Some(c) = clash {
                        return Err(StepError::invalid(format!(
                            "cannot start {name}@{} again on port {}: {} uses that port now",
                            old.release,
                            old.port,
                            c.label(name)
                        )));
                    }
                    let inst = self.launch(name, &mut st, &old)?;
                    st.rec.retired = Some(inst.clone());
                    self.persist(&st)?;
                    let w = self.exit_watch(&mut st, &inst);
                    (inst, w)
                }
            }
        };
        let deadline = tokio::time::Instant::now() + self.cfg.restore_wait;
        let mut wait = Duration::from_millis(20);
        loop {
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, inst.port)).await.is_ok() {
                return Ok(json!({"restarted": inst}));
            }
            if let Some(how) = exit.borrow().clone() {
                let mut st = app.lock();
                if st.rec.retired.as_ref().is_some_and(|r| r.same(&inst)) {
                    st.rec.retired = None;
                    self.persist(&st)?;
                }
                return Err(StepError::invalid(format!(
                    "{name}@{} {how} when started again on port {}; last lines of its log {}:\n{}",
                    inst.release,
                    inst.port,
                    inst.log.display(),
                    indent(&tail(&inst.log, 15))
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StepError::transient(format!(
                    "{} was started again but its port {} did not accept connections within {}; its log is {}",
                    inst.label(name),
                    inst.port,
                    human(self.cfg.restore_wait),
                    inst.log.display()
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = exit.changed() => {}
            }
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    async fn command(&self, ctx: &StepContext, script: &str, what: &str) -> Result<(bool, PathBuf), StepError> {
        let dir = self.cfg.data_dir.join("logs").join("commands");
        std::fs::create_dir_all(&dir).map_err(|e| persist_error(&dir, e))?;
        let log = dir.join(format!(
            "{}-{}-{}-a{}.log",
            safe_file_part(&ctx.deployment),
            ctx.step,
            safe_file_part(what),
            ctx.attempt
        ));
        let sh = PathBuf::from("/bin/sh");
        let args = vec!["-c".to_string(), script.to_string()];
        let env: BTreeMap<String, String> = [
            ("FLEET_DEPLOYMENT", ctx.deployment.clone()),
            ("FLEET_DESTINATION", ctx.destination.clone()),
            ("FLEET_NODE", ctx.node.clone()),
            ("FLEET_TOKEN", ctx.token.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut child = proc::spawn(proc::Spawn {
            program: &sh,
            args: &args,
            env: &env,
            path_prepend: &self.cfg.path_prepend,
            cwd: &self.cfg.data_dir,
            log: &log,
            kill_on_drop: true,
        })
        .map_err(|e| StepError::transient(format!("cannot run `sh -c {script}`: {e}")))?;
        // Killed with its whole group if this future is dropped (timeout, abort).
        let _guard = child.id().map(GroupGuard::new);
        let status = child.wait().await.map_err(|e| StepError::transient(format!("waiting for `{script}`: {e}")))?;
        if status.success() {
            return Ok((true, log));
        }
        let how = proc::describe_exit(&status);
        let next = match status.code() {
            Some(75) => "Exit 75 (EX_TEMPFAIL) means a temporary failure: it is retried with backoff per the manifest's `retry:`",
            Some(77) => {
                "Exit 77 (EX_NOPERM) means a credential or permission was refused: check the credentials the command uses on this node (keys, tokens, file permissions); it is not retried"
            }
            _ => "Fix the command or the node, then deploy again",
        };
        let msg = format!(
            "the {what} command `{script}` {how}; last lines of its output ({}):\n{}\n{next}",
            log.display(),
            indent(&tail(&log, 15))
        );
        // The exit status classifies the error (sysexits.h): 75 EX_TEMPFAIL
        // = transient (retried with backoff), 77 EX_NOPERM = auth (fail
        // now), any other code = invalid; killed by a signal = transient.
        match status.code() {
            Some(75) => Err(StepError::transient(msg)),
            Some(77) => Err(StepError::auth(msg)),
            Some(_) => Err(StepError::invalid(msg)),
            None => Err(StepError::transient(msg)),
        }
    }

    async fn run_command(&self, ctx: &StepContext, run: &str, check: Option<&str>) -> Result<Value, StepError> {
        // `true` and `:` do nothing: answered in-process, without a shell
        // (what the per-step overhead benchmark measures).
        if check.is_none() && matches!(run.trim(), "true" | ":") {
            return Ok(json!({"ran": true, "exit": 0, "builtin": true}));
        }
        if let Some(check) = check {
            // The check failing just means "not done yet".
            if let Ok((_, log)) = self.command(ctx, check, "check").await {
                return Ok(json!({"ran": false, "reason": format!("the check `{check}` exited 0 (already done)"), "log": log}));
            }
        }
        let (_, log) = self.command(ctx, run, "run").await?;
        Ok(json!({"ran": true, "exit": 0, "log": log, "output": tail(&log, 10)}))
    }

    /// Is the command already done? Its `check` script exiting 0 says so
    /// (the same answer `run_command` gives when it skips the run).
    async fn check_command(&self, ctx: &StepContext, check: &str) -> Option<Value> {
        match self.command(ctx, check, "check").await {
            Ok((_, log)) => Some(json!({"ran": false, "reason": format!("the check `{check}` exited 0 (already done)"), "log": log})),
            Err(e) => {
                tracing::debug!(step = %ctx.label(), error = %e.message, "the check says the command is not done");
                None
            }
        }
    }

    /// Is `release` of `name` already started for this deployment? Yes
    /// when the staged instance is that release, was started with this
    /// token and still runs: the output is the one `start` returned.
    async fn check_start(&self, ctx: &StepContext, name: &str, release: &str) -> Option<Value> {
        let app = self.existing(name)?;
        let _op = app.op.lock().await;
        let st = app.lock();
        let inst = st.rec.staged.as_ref().filter(|s| s.release == release && s.token == ctx.token)?;
        let exited = st.procs.get(&inst.pid).is_some_and(|w| w.borrow().is_some());
        if exited || !proc::alive(inst.pid, inst.proc_start) {
            return None;
        }
        Some(json!({"port": inst.port, "pid": inst.pid, "release": inst.release}))
    }

    /// Stop every staged instance started with `token`: nothing routes to
    /// it. Active (and retired) instances are left alone.
    async fn forget(&self, token: u64) -> Vec<String> {
        let apps: Vec<Arc<App>> = self.apps.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut removed = Vec::new();
        for app in apps {
            let _op = app.op.lock().await;
            let staged = app.lock().rec.staged.clone();
            let Some(inst) = staged.filter(|s| s.token == token) else { continue };
            if let Err(e) = self.stop_instance(&app, &inst).await {
                tracing::warn!(app = %app.name, error = %e, "could not stop a staged instance of a forgotten deployment; stop it by hand (kill its process group)");
                continue;
            }
            let mut st = app.lock();
            if st.rec.staged.as_ref().is_some_and(|s| s.same(&inst)) {
                st.rec.staged = None;
            }
            if let Err(e) = self.persist(&st) {
                tracing::warn!(app = %app.name, error = %e, "the stopped staged instance is still recorded; a restarted node forgets it as not running");
            }
            removed.push(format!("stopped staged {}", inst.label(&app.name)));
        }
        removed
    }

    async fn cancelled_start(&self, ctx: &StepContext, name: &str, release: &str) {
        let Some(app) = self.existing(name) else { return };
        let _op = app.op.lock().await;
        let staged = app.lock().rec.staged.clone();
        let Some(inst) = staged.filter(|s| s.release == release && s.token == ctx.token) else { return };
        tracing::info!(app = name, release, pid = inst.pid, "stopping the instance an interrupted start left behind");
        if let Err(e) = self.stop_instance(&app, &inst).await {
            tracing::warn!(app = name, error = %e, "could not stop it");
        }
        let mut st = app.lock();
        if st.rec.staged.as_ref().is_some_and(|s| s.same(&inst)) {
            st.rec.staged = None;
        }
        if let Err(e) = self.persist(&st) {
            tracing::warn!(app = name, error = %e, "could not record it");
        }
    }
}

fn not_started(app: &str, release: &str) -> StepError {
    StepError::invalid(format!(
        "no instance of {app}@{release} is running on this node (it was not started here, or it was stopped); the start step must run first"
    ))
}

/// A process of `app` exited: if it was the active instance, restart it.
fn on_exit(weak: Weak<Inner>, app: String, pid: u32, how: String) {
    let Some(inner) = weak.upgrade() else { return };
    if inner.closed.load(Ordering::SeqCst) {
        return;
    }
    let Some(a) = inner.existing(&app) else { return };
    let st = a.lock();
    if st.stopping.contains(&pid) {
        return;
    }
    let active = st.rec.active.as_ref().is_some_and(|i| i.pid == pid);
    if active {
        let delay = Duration::from_millis(100);
        tracing::warn!(app, pid, "the active instance {how} unexpectedly; restarting it on the same port");
        drop(st);
        tokio::spawn(restart_active(weak, app, pid, delay));
    } else if st.rec.staged.as_ref().is_some_and(|i| i.pid == pid) {
        tracing::warn!(app, pid, "a staged instance {how}; it is not restarted (the health check fails)");
    } else {
        tracing::debug!(app, pid, "process {how}");
    }
}

/// Restart the active instance of `app` (whose dead pid was `dead_pid`) on
/// its port, with a growing pause between attempts (at most
/// `restart_max_backoff`).
async fn restart_active(weak: Weak<Inner>, app: String, dead_pid: u32, first_delay: Duration) {
    let mut delay = first_delay;
    loop {
        let (wait, max) = {
            let Some(inner) = weak.upgrade() else { return };
            let Some(a) = inner.existing(&app) else { return };
            let mut st = a.lock();
            if st.last_restart.is_some_and(|t| t.elapsed() > Duration::from_secs(30)) {
                st.restarts = 0;
            }
            let grow = Duration::from_millis(200).saturating_mul(1u32 << st.restarts.min(8));
            st.restarts += 1;
            st.last_restart = Some(Instant::now());
            (delay.max(grow).min(inner.cfg.restart_max_backoff), inner.cfg.restart_max_backoff)
        };
        tokio::time::sleep(wait).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(a) = inner.existing(&app) else { return };
        let mut st = a.lock();
        let Some(active) = st.rec.active.clone().filter(|i| i.pid == dead_pid) else { return };
        match inner.launch(&app, &mut st, &active) {
            Ok(new) => {
                tracing::warn!(app, release = %new.release, pid = new.pid, port = new.port, "the active instance was restarted");
                st.procs.remove(&dead_pid);
                st.rec.active = Some(new);
                if let Err(e) = inner.persist(&st) {
                    tracing::warn!(app, error = %e, "cannot record the restarted instance");
                }
                return;
            }
            Err(e) => {
                tracing::error!(app, error = %e, "cannot restart the active instance; trying again");
                delay = (wait * 2).min(max);
            }
        }
    }
}

/// After a node restart the route port was busy: keep trying to listen.
async fn rebind_route(weak: Weak<Inner>, app: String, port: u16) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(a) = inner.existing(&app) else { return };
        let mut st = a.lock();
        if st.route.is_some() || st.rec.route_port != Some(port) {
            return;
        }
        let Some(active) = st.rec.active.clone() else { return };
        if let Ok(r) = Route::bind(&app, port, inner.conns.clone()) {
            r.set_backend(Some(active.port));
            tracing::info!(app, port, "route listening again");
            st.route = Some(r);
            return;
        }
    }
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
                StepAction::HealthCheck { app, release, check } => i.health(app, release, check).await,
                StepAction::SwitchRoute { app, release, port } => i.switch(app, release, *port).await,
                StepAction::StopOld { app, drain_ms, .. } => i.stop_old(app, *drain_ms).await,
                StepAction::Command { run, check, .. } => i.run_command(ctx, run, check.as_deref()).await,
            }
        })
    }

    fn undo<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction, out: Option<&'a Value>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let i = &self.inner;
            match action {
                StepAction::StartInstance { app, release, .. } => i.undo_start(app, release, out).await,
                StepAction::HealthCheck { .. } => Ok(json!({})),
                StepAction::SwitchRoute { app, .. } => i.undo_switch(app, out).await,
                StepAction::StopOld { app, .. } => i.undo_stop_old(app, out).await,
                StepAction::Command { undo: Some(u), .. } => {
                    i.command(ctx, u, "undo").await.map(|(_, log)| json!({"ran": true, "log": log}))
                }
                StepAction::Command { undo: None, .. } => Ok(json!({"ran": false})),
            }
        })
    }

    fn check<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Option<Value>, StepError>> {
        Box::pin(async move {
            let i = &self.inner;
            Ok(match action {
                StepAction::Command { check: Some(script), .. } => i.check_command(ctx, script).await,
                StepAction::StartInstance { app, release, .. } => i.check_start(ctx, app, release).await,
                _ => None,
            })
        })
    }

    fn forget<'a>(&'a self, destination: &'a str, token: u64) -> BoxFuture<'a, Vec<String>> {
        // Instances do not record their destination; the token (a log
        // index) identifies the deployment on its own.
        let _ = destination;
        Box::pin(self.inner.forget(token))
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
            StepAction::StopOld { .. } => {
                "the old instance did not drain and stop in time; check `drain` in the manifest against the step timeout".into()
            }
            StepAction::Command { .. } => format!(
                "the command was killed; check that it does not wait for input, or raise `step_timeout`; its output is in {}",
                logs.join("commands").display()
            ),
        }
    }
}
