//! The `docker` adapter: each release of an app runs as a container on the
//! node's Docker Engine, blue-green on this node, behind the same built-in
//! TCP route as the `process` adapter ([`crate::process::proxy`]).
//!
//! The steps and their exact undos:
//!
//! * `start` ([`StepAction::StartContainer`]): make the image present (per
//!   the manifest's `pull:`), create and start a container with Fleet's
//!   labels (app, release, destination, deployment, fencing token) under
//!   its deterministic name, publishing the container port on an
//!   engine-chosen port of 127.0.0.1. A retried start adopts its own
//!   container. Undo: stop and remove that container (refused while the
//!   route points at it).
//! * `health`: Fleet's HTTP/TCP/command probes against the published port,
//!   or (`health: { image: true }`) the image's own HEALTHCHECK as the
//!   engine reports it. Undo: nothing.
//! * `switch`: point the app's route at the new container's published
//!   port; the previous one is kept running (retired). Undo: point the route
//!   back at the previous container (or close the route if there was none).
//! * `stop-old`: wait up to `drain` for the connections to the previous
//!   container, then stop **and remove** it. Undo: create and start it again
//!   from the spec and labels recorded in the step's output (same name, same
//!   labels, same image): the engine picks a new host port, which the
//!   retired slot records, so undoing the switch afterwards points the route
//!   at the container as it runs now. (Keeping the old container stopped
//!   until the deployment ends would need a "deployment ended" signal the
//!   node does not get; re-creating it needs none.)
//!
//! With `strategy: { type: recreate }`, `stop-current` stops and removes
//! the active container before the new one starts (the route stays, with
//! no backend, until the switch); its undo re-creates it from the recorded
//! spec and points the route back at it. A canary's analysis
//! (`StepAction::CanaryPause`) probes the active container of the release
//! through its published port ([`crate::canary`]). The route listens on
//! `route.listen` (default 127.0.0.1), recorded so a restart listens there
//! again.
//!
//! The adapter connects to the engine on first use (`DOCKER_HOST`, else
//! `/var/run/docker.sock`, or `fleet-node --docker-socket`), so a node that
//! never runs a docker step never needs an engine. A missing or refused
//! socket fails the step with class `transient` and a message naming the
//! socket.
//!
//! State (which container is staged, active, retired; the route's port) is
//! kept per (destination, app) in `<data-dir>/docker/*.json`, rewritten
//! atomically after every change. A restarted `fleet-node`
//! ([`DockerAdapter::open`]) listens on each recorded route again and points
//! it at the recorded active container, which kept running; containers
//! that no step owns any more are removed by `forget` when the leader says
//! so. `forget` leaves running containers it has no record of alone.
//!
//! `discover.rs`: what runs, for the node's instance report (destination sync).

mod discover;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fleet_core::manifest::{ContainerManifest, HealthCheck, Probe, PullPolicy};
use fleet_core::saga::StepAction;
use fleet_docker::{BindMount, ContainerSpec, DockerError, Engine, FleetLabels, Health, LabelFilter, Limits, PortSpec, RestartPolicy};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::adapter::{Adapter, StepContext, StepError};
use crate::probe;
use crate::process::proxy::{route_text, Conns, Route};
use crate::util::{human, safe_file_part, write_atomic};

/// Settings of the docker adapter.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// The engine's socket; `None`: `DOCKER_HOST`, else `/var/run/docker.sock`.
    pub socket: Option<PathBuf>,
    /// This node's id: its containers carry it (label `fleet.node`, and in
    /// their names), so nodes sharing one engine (development) never touch
    /// each other's; `forget` only looks at this node's. Empty: any node's.
    pub node: String,
    /// Where health commands run (their working directory).
    pub data_dir: PathBuf,
    /// Directories put in front of `PATH` for health commands.
    pub path_prepend: Vec<PathBuf>,
    /// SIGTERM → SIGKILL grace when stopping a container.
    pub stop_grace: Duration,
    /// How long undoing `stop-old` waits for the re-created container's port.
    pub restore_wait: Duration,
}

impl DockerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        DockerConfig {
            socket: None,
            node: String::new(),
            data_dir: data_dir.into(),
            path_prepend: crate::proc::exe_dir().into_iter().collect(),
            stop_grace: Duration::from_secs(3),
            restore_wait: Duration::from_secs(10),
        }
    }
}

/// One container this adapter started, as recorded in step outputs (the
/// undo of `stop-old` re-creates it from `spec` and `labels`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub release: String,
    /// The host port (on 127.0.0.1) the container port is published on.
    pub port: u16,
    pub token: u64,
    pub container_port: u16,
    pub labels: FleetLabels,
    pub spec: ContainerSpec,
}

impl Container {
    fn label(&self) -> String {
        format!("{}@{} (container {}, port {})", self.labels.app, self.release, self.name, self.port)
    }
}

/// What `<data-dir>/docker/<destination>+<app>.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerRecord {
    pub destination: String,
    pub app: String,
    pub route_port: Option<u16>,
    /// The IP address the route listens on (`route.listen`; absent: 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_listen: Option<String>,
    pub staged: Option<Container>,
    pub active: Option<Container>,
    pub retired: Option<Container>,
}

/// A failure to open the adapter's state.
#[derive(Debug, thiserror::Error)]
pub enum DockerStateError {
    #[error("cannot create {path}: {source}; check that the data dir is writable")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid docker app state file: {source}; fix it, or move it away (its containers are then no longer managed)")]
    Parse { path: PathBuf, source: serde_json::Error },
}

#[derive(Default)]
struct AppState {
    route: Option<Route>,
    route_port: Option<u16>,
    route_listen: Option<String>,
    staged: Option<Container>,
    active: Option<Container>,
    retired: Option<Container>,
}

struct App {
    destination: String,
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

struct Inner {
    cfg: DockerConfig,
    engine: tokio::sync::OnceCell<Engine>,
    /// By (destination, app).
    apps: Mutex<BTreeMap<(String, String), Arc<App>>>,
    conns: Conns,
}

/// The `docker` adapter. Cheap to clone.
#[derive(Clone)]
pub struct DockerAdapter {
    inner: Arc<Inner>,
}

fn docker_err(e: DockerError) -> StepError {
    StepError::new(e.class(), e.to_string())
}

/// The container spec of a manifest's container for one release. Fleet
/// adds `PORT` (the container port), `FLEET_APP`, `FLEET_RELEASE` and
/// `FLEET_TOKEN` to the environment, as it does for processes.
pub fn container_spec(c: &ContainerManifest, env: &BTreeMap<String, String>, app: &str, release: &str, token: u64) -> ContainerSpec {
    let mut env = env.clone();
    env.insert("PORT".into(), c.container_port.to_string());
    env.insert("FLEET_APP".into(), app.to_string());
    env.insert("FLEET_RELEASE".into(), release.to_string());
    env.insert("FLEET_TOKEN".into(), token.to_string());
    ContainerSpec {
        image: c.image.clone(),
        env,
        command: c.command.clone(),
        ports: vec![PortSpec::loopback(c.container_port)],
        volumes: c
            .volumes
            .iter()
            .map(|v| BindMount { host_path: PathBuf::from(&v.host_path), container_path: v.container_path.clone(), read_only: v.read_only })
            .collect(),
        limits: Limits { memory_bytes: c.limits.memory_bytes, nano_cpus: c.limits.nano_cpus },
        labels: BTreeMap::new(),
        // Supervision is Fleet's route and health steps; a container the
        // engine restarted could come back on another host port.
        restart: RestartPolicy::No,
        pull: match c.pull {
            PullPolicy::Missing => fleet_docker::PullPolicy::Missing,
            PullPolicy::Always => fleet_docker::PullPolicy::Always,
            PullPolicy::Never => fleet_docker::PullPolicy::Never,
        },
    }
}

fn labels_of(ctx: &StepContext, app: &str, release: &str) -> FleetLabels {
    FleetLabels {
        app: app.to_string(),
        release: release.to_string(),
        destination: ctx.destination.clone(),
        deployment: ctx.deployment.clone(),
        token: ctx.token,
        node: ctx.node.clone(),
    }
}

fn not_started(app: &str, release: &str) -> StepError {
    StepError::invalid(format!(
        "no container of {app}@{release} is running for this destination on this node (it was not started here, or it was removed); the start step must run first"
    ))
}

fn parse_slot(output: Option<&Value>, key: &str, step: &str) -> Result<Option<Container>, StepError> {
    match output.and_then(|o| o.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            StepError::invalid(format!("the {step} step's recorded output has an unreadable `{key}` ({e}); nothing was changed"))
        }),
    }
}

impl DockerAdapter {
    /// The adapter without recorded state (it records nothing until its
    /// first step). [`DockerAdapter::open`] is what `fleet-node` uses.
    pub fn new(cfg: DockerConfig) -> DockerAdapter {
        DockerAdapter {
            inner: Arc::new(Inner {
                cfg,
                engine: tokio::sync::OnceCell::new(),
                apps: Mutex::new(BTreeMap::new()),
                conns: Conns::default(),
            }),
        }
    }

    /// Open the adapter on `cfg.data_dir`: read the recorded apps and
    /// listen on their routes again, pointed at the recorded active
    /// containers (which kept running while no fleet-node was there). Must
    /// run inside a tokio runtime. Does not contact the engine.
    pub fn open(cfg: DockerConfig) -> Result<DockerAdapter, DockerStateError> {
        let dir = cfg.data_dir.join("docker");
        std::fs::create_dir_all(&dir).map_err(|source| DockerStateError::CreateDir { path: dir.clone(), source })?;
        let adapter = DockerAdapter::new(cfg);
        let entries = std::fs::read_dir(&dir).map_err(|source| DockerStateError::Read { path: dir.clone(), source })?;
        for entry in entries {
            let path = entry.map_err(|source| DockerStateError::Read { path: dir.clone(), source })?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|source| DockerStateError::Read { path: path.clone(), source })?;
            let rec: DockerRecord =
                serde_json::from_slice(&bytes).map_err(|source| DockerStateError::Parse { path: path.clone(), source })?;
            adapter.inner.adopt(rec);
        }
        Ok(adapter)
    }

    /// The recorded state of `app` on `destination` (None if never deployed here).
    pub fn record(&self, destination: &str, app: &str) -> Option<DockerRecord> {
        let a = self.inner.existing(destination, app)?;
        let st = a.lock();
        Some(record_of(&a, &st))
    }

    /// The port `app`'s route of `destination` listens on, and the host
    /// port of the container it forwards to.
    pub fn route(&self, destination: &str, app: &str) -> Option<(u16, Option<u16>)> {
        let a = self.inner.existing(destination, app)?;
        let st = a.lock();
        st.route.as_ref().map(|r| (r.port(), r.backend()))
    }

    /// Stop listening on the routes; the containers keep running.
    pub async fn shutdown(&self) {
        let apps: Vec<Arc<App>> = self.inner.apps.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for a in apps {
            let route = a.lock().route.take();
            if let Some(r) = route {
                r.close().await;
            }
        }
    }
}

fn record_of(app: &App, st: &AppState) -> DockerRecord {
    DockerRecord {
        destination: app.destination.clone(),
        app: app.name.clone(),
        route_port: st.route_port,
        route_listen: st.route_listen.clone(),
        staged: st.staged.clone(),
        active: st.active.clone(),
        retired: st.retired.clone(),
    }
}

impl Inner {
    fn adopt(&self, rec: DockerRecord) {
        let app = self.app(&rec.destination, &rec.app);
        let mut st = app.lock();
        st.route_port = rec.route_port;
        st.route_listen = rec.route_listen;
        st.staged = rec.staged;
        st.retired = rec.retired;
        st.active = rec.active;
        if let (Some(active), Some(port)) = (&st.active, st.route_port) {
            match Route::bind(&rec.app, st.route_listen.as_deref(), port, self.conns.clone()) {
                Ok(r) => {
                    r.set_backend(Some(active.port));
                    tracing::info!(app = %rec.app, destination = %rec.destination, route = port, container = %active.name, "docker route adopted");
                    st.route = Some(r);
                }
                Err(e) => {
                    tracing::warn!(app = %rec.app, port, error = %e, "cannot listen on the recorded route port again; the next switch binds it")
                }
            }
        }
    }

    fn state_path(&self, destination: &str, app: &str) -> PathBuf {
        self.cfg.data_dir.join("docker").join(format!("{}+{}.json", safe_file_part(destination), safe_file_part(app)))
    }

    /// Record `app`'s state on disk.
    fn save(&self, app: &App) -> Result<(), StepError> {
        let rec = record_of(app, &app.lock());
        let path = self.state_path(&app.destination, &app.name);
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            write_atomic(&path, &serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?)
        };
        write().map_err(|e| {
            StepError::resource(format!("cannot write {}: {e}; check the node's data dir (disk full? permissions?)", path.display()))
        })
    }

    async fn engine(&self) -> Result<&Engine, StepError> {
        self.engine
            .get_or_try_init(|| async {
                match &self.cfg.socket {
                    Some(s) => Engine::connect_socket(s).await,
                    None => Engine::connect().await,
                }
            })
            .await
            .map_err(docker_err)
    }

    fn existing(&self, destination: &str, app: &str) -> Option<Arc<App>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner()).get(&(destination.to_string(), app.to_string())).cloned()
    }

    fn app(&self, destination: &str, app: &str) -> Arc<App> {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.entry((destination.to_string(), app.to_string()))
            .or_insert_with(|| {
                Arc::new(App {
                    destination: destination.to_string(),
                    name: app.to_string(),
                    op: tokio::sync::Mutex::new(()),
                    st: Mutex::new(AppState::default()),
                })
            })
            .clone()
    }

    /// Create and start (or adopt) the container, and read its host port.
    async fn launch(&self, spec: &ContainerSpec, labels: &FleetLabels, container_port: u16) -> Result<(Container, bool), StepError> {
        let engine = self.engine().await?;
        let started = engine.create_and_start(spec, labels).await.map_err(docker_err)?;
        let info = engine.inspect(&started.name).await.map_err(docker_err)?;
        let failed = |why: String| async {
            if let Err(e) = engine.stop_and_remove(&started.name, Duration::ZERO).await {
                tracing::warn!(container = %started.name, error = %e, "could not remove a container that failed to start");
            }
            StepError::invalid(why)
        };
        let Some(info) = info else {
            return Err(failed(format!("container {} vanished right after it started", started.name)).await);
        };
        if !info.is_running() {
            let why = format!(
                "container {} of {}@{} is {:?} right after it started (exit code {:?}{}); check `docker logs {}` and the image's command, then deploy again",
                started.name,
                labels.app,
                labels.release,
                info.state,
                info.exit_code,
                info.error.as_deref().map(|e| format!(", {e}")).unwrap_or_default(),
                started.name
            );
            return Err(failed(why).await);
        }
        let Some(addr) = info.host_port(container_port) else {
            return Err(failed(format!("container {} does not publish port {container_port}", started.name)).await);
        };
        let c = Container {
            name: started.name,
            release: labels.release.clone(),
            port: addr.port(),
            token: labels.token,
            container_port,
            labels: labels.clone(),
            spec: spec.clone(),
        };
        Ok((c, started.adopted))
    }

    async fn remove(&self, c: &Container) -> Result<(), StepError> {
        let engine = self.engine().await?;
        engine.stop_and_remove(&c.name, self.cfg.stop_grace).await.map_err(docker_err)?;
        Ok(())
    }

    async fn start(
        &self,
        ctx: &StepContext,
        name: &str,
        release: &str,
        c: &ContainerManifest,
        env: &BTreeMap<String, String>,
    ) -> Result<Value, StepError> {
        fleet_core::names::validate_name("release", release).map_err(|e| StepError::invalid(e.to_string()))?;
        let app = self.app(&ctx.destination, name);
        let _op = app.op.lock().await;
        let labels = labels_of(ctx, name, release);
        let wanted = labels.container_name();
        let leftover = app.lock().staged.clone();
        if let Some(old) = leftover.filter(|o| o.name != wanted) {
            tracing::info!(app = name, container = %old.name, "removing a leftover staged container before starting {release}");
            self.remove(&old).await?;
            app.lock().staged = None;
            self.save(&app)?;
        }
        let spec = container_spec(c, env, name, release, ctx.token);
        let (cont, adopted) = self.launch(&spec, &labels, c.container_port).await?;
        let out = json!({"container": cont.name, "port": cont.port, "release": release, "image": spec.image_for(release).unwrap_or_default(), "adopted": adopted});
        app.lock().staged = Some(cont);
        self.save(&app)?;
        Ok(out)
    }

    async fn undo_start(&self, ctx: &StepContext, name: &str, release: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let container = output
            .and_then(|o| o.get("container"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| labels_of(ctx, name, release).container_name());
        let app = self.app(&ctx.destination, name);
        let _op = app.op.lock().await;
        if let Some(a) = app.lock().active.as_ref().filter(|a| a.name == container) {
            return Err(StepError::invalid(format!(
                "{} is serving {name}'s route, so it is not removed; undo the route switch first (the leader does this in order)",
                a.label()
            )));
        }
        let engine = self.engine().await?;
        let removal = engine.stop_and_remove(&container, self.cfg.stop_grace).await.map_err(docker_err)?;
        {
            let mut st = app.lock();
            if st.staged.as_ref().is_some_and(|s| s.name == container) {
                st.staged = None;
            }
            if st.retired.as_ref().is_some_and(|s| s.name == container) {
                st.retired = None;
            }
        }
        self.save(&app)?;
        Ok(json!({"removed": container, "already_gone": removal == fleet_docker::Removal::AlreadyGone}))
    }

    async fn cancelled_start(&self, ctx: &StepContext, name: &str, release: &str) {
        let container = labels_of(ctx, name, release).container_name();
        let Some(app) = self.existing(&ctx.destination, name) else {
            // The start may have created it before any state was recorded.
            if let Ok(engine) = self.engine().await {
                let _ = engine.stop_and_remove(&container, Duration::ZERO).await;
            }
            return;
        };
        let _op = app.op.lock().await;
        if app.lock().active.as_ref().is_some_and(|a| a.name == container) {
            return;
        }
        tracing::info!(app = name, release, %container, "removing the container an interrupted start left behind");
        match self.engine().await {
            Ok(engine) => {
                if let Err(e) = engine.stop_and_remove(&container, Duration::ZERO).await {
                    tracing::warn!(%container, error = %e, "could not remove it; remove it by hand (`docker rm -f`)");
                }
            }
            Err(e) => tracing::warn!(%container, error = %e, "could not reach the engine to remove it"),
        }
        {
            let mut st = app.lock();
            if st.staged.as_ref().is_some_and(|s| s.name == container) {
                st.staged = None;
            }
        }
        if let Err(e) = self.save(&app) {
            tracing::warn!(app = name, error = %e, "could not record it");
        }
    }

    async fn health(&self, ctx: &StepContext, name: &str, release: &str, check: &HealthCheck) -> Result<Value, StepError> {
        let app = self.existing(&ctx.destination, name).ok_or_else(|| not_started(name, release))?;
        let _op = app.op.lock().await;
        let cont = {
            let st = app.lock();
            let found = [&st.staged, &st.active].into_iter().flatten().find(|c| c.release == release).cloned();
            found.ok_or_else(|| not_started(name, release))?
        };
        let engine = self.engine().await?;
        let started = Instant::now();
        let deadline_d = Duration::from_millis(check.deadline_ms);
        if check.probe == Probe::Image {
            let info = engine.wait_for_health(&cont.name, deadline_d).await.map_err(docker_err)?;
            let Some(info) = info else {
                return Err(StepError::invalid(format!(
                    "{} was removed during its health check; the route was not switched",
                    cont.label()
                )));
            };
            return match info.health {
                Health::Healthy => Ok(json!({"release": release, "container": cont.name, "port": cont.port, "health": "healthy", "elapsed_ms": started.elapsed().as_millis() as u64})),
                Health::Unhealthy => Err(StepError::invalid(format!(
                    "{} reports unhealthy (the image's HEALTHCHECK failed); the route was not switched. See `docker inspect {}` (State.Health) and `docker logs {}`",
                    cont.label(), cont.name, cont.name
                ))),
                Health::None if info.is_running() => Err(StepError::invalid(format!(
                    "{} has no HEALTHCHECK in its image; use `health: {{ http: /path }}` or `tcp: true` instead of `image: true`",
                    cont.label()
                ))),
                _ if !info.is_running() => Err(StepError::invalid(format!(
                    "{} stopped during its health check ({:?}, exit code {:?}); the route was not switched. See `docker logs {}`",
                    cont.label(), info.state, info.exit_code, cont.name
                ))),
                _ => Err(StepError::invalid(format!(
                    "{} was still starting after {} (the image's HEALTHCHECK had not passed); the route was not switched",
                    cont.label(),
                    human(deadline_d)
                ))),
            };
        }
        let deadline = tokio::time::Instant::now() + deadline_d;
        let timeout = Duration::from_millis(check.timeout_ms);
        let mut interval = tokio::time::interval(Duration::from_millis(check.interval_ms.max(1)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut passes, mut probes) = (0u32, 0u32);
        let mut last = String::from("no probe finished");
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
            let result = tokio::select! {
                r = probe::probe(&check.probe, cont.port, timeout, &self.cfg.path_prepend, &self.cfg.data_dir) => r,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            probes += 1;
            match result {
                Ok(()) => {
                    passes += 1;
                    if passes >= check.healthy_threshold {
                        return Ok(
                            json!({"release": release, "container": cont.name, "port": cont.port, "probes": probes, "elapsed_ms": started.elapsed().as_millis() as u64}),
                        );
                    }
                }
                Err(e) => {
                    passes = 0;
                    last = e;
                    if let Ok(Some(info)) = engine.inspect(&cont.name).await {
                        if !info.is_running() {
                            return Err(StepError::invalid(format!(
                                "{} stopped during its health check ({:?}, exit code {:?}); the route was not switched. See `docker logs {}`",
                                cont.label(),
                                info.state,
                                info.exit_code,
                                cont.name
                            )));
                        }
                    }
                }
            }
        }
        let need = if check.healthy_threshold > 1 { format!(" {} times in a row", check.healthy_threshold) } else { String::new() };
        Err(StepError::invalid(format!(
            "{} did not pass its health check{need} ({last}) within {}; the route was not switched. See `docker logs {}`",
            cont.label(),
            human(deadline_d),
            cont.name
        )))
    }

    /// Listen on `listen`:`port` (None: keep the recorded address).
    fn bind_route(&self, name: &str, st: &mut AppState, port: u16, listen: Option<Option<&str>>) -> Result<Option<Route>, StepError> {
        let want = if port != 0 { port } else { st.route_port.unwrap_or(0) };
        let listen: Option<String> = match listen {
            Some(l) => l.map(str::to_string),
            None => st.route_listen.clone(),
        };
        let rebind = match &st.route {
            None => true,
            Some(r) => (port != 0 && r.port() != port) || !r.listens_on(listen.as_deref()),
        };
        if !rebind {
            return Ok(None);
        }
        let r = Route::bind(name, listen.as_deref(), want, self.conns.clone()).map_err(|e| {
            StepError::resource(format!(
                "cannot listen on {} for {name}'s route: {e}; free that port or set another `port:` (or `route.listen`) in the manifest",
                route_text(listen.as_deref(), want)
            ))
        })?;
        st.route_port = Some(r.port());
        st.route_listen = listen;
        Ok(st.route.replace(r))
    }

    async fn switch(&self, ctx: &StepContext, name: &str, release: &str, port: u16, listen: Option<&str>) -> Result<Value, StepError> {
        let app = self.existing(&ctx.destination, name).ok_or_else(|| not_started(name, release))?;
        let _op = app.op.lock().await;
        // Another listen address on the same port: the old listener must go
        // first (0.0.0.0:P and 127.0.0.1:P cannot both be bound).
        let moved = {
            let mut st = app.lock();
            let staged = st.staged.as_ref().is_some_and(|s| s.release == release);
            match st.route.as_ref() {
                Some(r) if staged && !r.listens_on(listen) && (port == 0 || r.port() == port) => {
                    Some((st.route.take(), st.route_listen.clone()))
                }
                _ => None,
            }
        };
        let listen_before = match moved {
            Some((r, before)) => {
                if let Some(r) = r {
                    r.close().await;
                }
                Some(before)
            }
            None => None,
        };
        let (old_route, displaced, mut out) = {
            let mut st = app.lock();
            let target = match &st.staged {
                Some(s) if s.release == release => s.clone(),
                _ => match &st.active {
                    Some(a) if a.release == release && st.staged.is_none() => {
                        let route = st.route.as_ref().map(|r| r.port()).or(st.route_port).unwrap_or(0);
                        let at = route_text(st.route_listen.as_deref(), route);
                        return Ok(json!({"route": at, "previous": st.retired, "instance": a}));
                    }
                    _ => return Err(not_started(name, release)),
                },
            };
            let old_route = match self.bind_route(name, &mut st, port, Some(listen)) {
                Ok(r) => r,
                Err(e) => {
                    if listen_before.is_some() {
                        // The route was closed to move it: listen where it did again.
                        if let Err(again) = self.bind_route(name, &mut st, 0, None) {
                            tracing::warn!(app = name, error = %again, "cannot listen on the route again; the next switch binds it");
                        }
                        if let (Some(r), Some(a)) = (&st.route, &st.active) {
                            r.set_backend(Some(a.port));
                        }
                    }
                    return Err(e);
                }
            };
            if let Some(r) = &st.route {
                r.set_backend(Some(target.port));
            }
            let route_port = st.route.as_ref().map(|r| r.port()).unwrap_or(0);
            let displaced = st.retired.take();
            let previous = st.active.take();
            st.retired = previous.clone();
            st.active = Some(target.clone());
            st.staged = None;
            let at = route_text(st.route_listen.as_deref(), route_port);
            tracing::info!(app = name, release, route = %at, backend = target.port, container = %target.name, "route switched");
            (old_route, displaced, json!({"route": at, "previous": previous, "instance": target}))
        };
        if let Some(before) = listen_before {
            // Its undo listens there again.
            out["listen_before"] = json!(before.unwrap_or_else(|| "127.0.0.1".into()));
        }
        self.save(&app)?;
        if let Some(r) = old_route {
            r.close().await;
        }
        if let Some(d) = displaced {
            // A retired container an earlier deployment never stopped:
            // nothing routes to it any more.
            self.conns.of(d.port).drained(self.cfg.stop_grace).await;
            self.remove(&d).await?;
        }
        Ok(out)
    }

    async fn undo_switch(&self, ctx: &StepContext, name: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let previous = parse_slot(output, "previous", "switch")?;
        let Some(instance) = parse_slot(output, "instance", "switch")? else {
            return Err(StepError::invalid("the switch step's recorded output names no container; the route was left as it is"));
        };
        let Some(app) = self.existing(&ctx.destination, name) else { return Ok(json!({"active": null})) };
        let _op = app.op.lock().await;
        // The switch moved the route to another listen address: back to the old one.
        if let Some(before) = output.and_then(|o| o.get("listen_before")).and_then(Value::as_str) {
            let moving = {
                let mut st = app.lock();
                let before = Some(before).filter(|b| *b != "127.0.0.1");
                let r = st.route.take_if(|r| !r.listens_on(before));
                if r.is_some() {
                    st.route_listen = before.map(str::to_string);
                }
                r
            };
            if let Some(r) = moving {
                r.close().await;
            }
        }
        let closing = {
            let mut st = app.lock();
            let active = st.active.clone();
            if active.as_ref().is_none_or(|a| a.name != instance.name) {
                let undone = match (&active, &previous) {
                    (Some(a), Some(p)) => a.name == p.name,
                    (None, None) => true,
                    _ => false,
                };
                if undone {
                    return Ok(json!({"active": active}));
                }
                return Err(StepError::invalid(format!(
                    "{name}'s route now points at {}, not at {}; another deployment changed it since, so it was left as it is",
                    active.map(|a| a.label()).unwrap_or_else(|| "nothing".into()),
                    instance.label()
                )));
            }
            let current = active.unwrap_or(instance);
            let mut closing = None;
            match &previous {
                Some(p) => {
                    // The retired slot has the container as it runs now
                    // (a re-created one has another host port).
                    let Some(back) = st.retired.clone().filter(|r| r.name == p.name) else {
                        return Err(StepError::invalid(format!(
                            "cannot point {name}'s route back at {}: that container is not running any more; undo `stop-old` first (it re-creates it)",
                            p.label()
                        )));
                    };
                    if st.route.is_none() {
                        self.bind_route(name, &mut st, 0, None)?;
                    }
                    if let Some(r) = &st.route {
                        r.set_backend(Some(back.port));
                    }
                    st.active = Some(back);
                    st.retired = None;
                }
                None => {
                    closing = st.route.take();
                    st.active = None;
                }
            }
            st.staged = Some(current);
            closing
        };
        self.save(&app)?;
        if let Some(r) = closing {
            r.close().await;
        }
        let st = app.lock();
        Ok(json!({"active": st.active}))
    }

    async fn stop_old(&self, ctx: &StepContext, name: &str, drain_ms: u64) -> Result<Value, StepError> {
        let Some(app) = self.existing(&ctx.destination, name) else { return Ok(json!({"stopped": null})) };
        let _op = app.op.lock().await;
        let Some(old) = app.lock().retired.clone() else { return Ok(json!({"stopped": null})) };
        let open = self.conns.of(old.port).drained(Duration::from_millis(drain_ms)).await;
        if open > 0 {
            tracing::info!(app = name, container = %old.name, open, "connections still open after the drain time; stopping anyway");
        }
        self.remove(&old).await?;
        {
            let mut st = app.lock();
            if st.retired.as_ref().is_some_and(|r| r.name == old.name) {
                st.retired = None;
            }
        }
        self.save(&app)?;
        Ok(json!({"stopped": old, "open_connections_cut": open}))
    }

    async fn undo_stop_old(&self, ctx: &StepContext, name: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let Some(old) = parse_slot(output, "stopped", "stop-old")? else { return Ok(json!({"restored": null})) };
        let app = self.app(&ctx.destination, name);
        let _op = app.op.lock().await;
        if let Some(r) = app.lock().retired.clone().filter(|r| r.name == old.name) {
            return Ok(json!({"restored": r}));
        }
        let (cont, _) = self.launch(&old.spec, &old.labels, old.container_port).await?;
        let deadline = Instant::now() + self.cfg.restore_wait;
        // Its image's HEALTHCHECK first, if it has one; then the port.
        let engine = self.engine().await?;
        engine.wait_for_health(&cont.name, self.cfg.restore_wait).await.map_err(docker_err)?;
        while !port_serves(cont.port).await {
            if Instant::now() >= deadline {
                return Err(StepError::transient(format!(
                    "{} was re-created but its port did not accept connections within {}; see `docker logs {}`",
                    cont.label(),
                    human(self.cfg.restore_wait),
                    cont.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.lock().retired = Some(cont.clone());
        self.save(&app)?;
        Ok(json!({"restored": cont}))
    }

    /// Remove the containers of `destination` labelled with `token` that no
    /// route points at. A running container of an app this node has no
    /// record of is left alone (it may be what serves after a restart).
    async fn forget(&self, destination: &str, token: u64) -> Vec<String> {
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "no Docker Engine: nothing of docker destinations to forget");
                return Vec::new();
            }
        };
        let mut filter = LabelFilter::managed().destination(destination).token(token);
        if !self.cfg.node.is_empty() {
            filter = filter.node(&self.cfg.node);
        }
        let listed = match engine.list(&filter).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(destination, token, error = %e, "cannot list the containers of a forgotten deployment");
                return Vec::new();
            }
        };
        let mut removed = Vec::new();
        for c in listed {
            let Some(fl) = &c.fleet else { continue };
            let app = self.existing(destination, &fl.app);
            let _op = match &app {
                Some(a) => Some(a.op.lock().await),
                None => None,
            };
            let active = app.as_ref().is_some_and(|a| a.lock().active.as_ref().is_some_and(|x| x.name == c.name));
            if active || (app.is_none() && c.state == fleet_docker::RunState::Running) {
                continue;
            }
            match engine.stop_and_remove(&c.name, self.cfg.stop_grace).await {
                Ok(_) => {
                    if let Some(a) = &app {
                        {
                            let mut st = a.lock();
                            if st.staged.as_ref().is_some_and(|s| s.name == c.name) {
                                st.staged = None;
                            }
                            if st.retired.as_ref().is_some_and(|s| s.name == c.name) {
                                st.retired = None;
                            }
                        }
                        if let Err(e) = self.save(a) {
                            tracing::warn!(container = %c.name, error = %e, "the removed container is still recorded");
                        }
                    }
                    removed.push(format!("removed container {} ({}@{}, token {token})", c.name, fl.app, fl.release));
                }
                Err(e) => {
                    tracing::warn!(container = %c.name, error = %e, "could not remove a container of a forgotten deployment; remove it by hand")
                }
            }
        }
        removed
    }
}

/// `recreate` and the canary's analysis.
impl Inner {
    /// `recreate`: stop and remove the active container before the new one
    /// starts. It stays recorded as retired (gone), so a retry answers the
    /// same output; the route has no backend until the switch.
    async fn stop_current(&self, ctx: &StepContext, name: &str, drain_ms: u64) -> Result<Value, StepError> {
        let Some(app) = self.existing(&ctx.destination, name) else { return Ok(json!({"stopped": null})) };
        let _op = app.op.lock().await;
        let current = {
            let mut st = app.lock();
            match st.active.take() {
                Some(a) => {
                    if let Some(r) = &st.route {
                        r.set_backend(None);
                    }
                    st.retired = Some(a.clone());
                    Some(a)
                }
                None => st.retired.clone(),
            }
        };
        self.save(&app)?;
        let Some(old) = current else { return Ok(json!({"stopped": null})) };
        let open = self.conns.of(old.port).drained(Duration::from_millis(drain_ms)).await;
        self.remove(&old).await?;
        tracing::info!(app = name, container = %old.name, "current container removed (recreate)");
        Ok(json!({"stopped": old, "open_connections_cut": open}))
    }

    /// Undo of `stop_current`: re-create the container from its recorded
    /// spec (a retry adopts it by name), wait until it serves, and point
    /// the route back at it.
    async fn undo_stop_current(&self, ctx: &StepContext, name: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let Some(old) = parse_slot(output, "stopped", "stop-current")? else { return Ok(json!({"restored": null})) };
        let app = self.app(&ctx.destination, name);
        let _op = app.op.lock().await;
        match app.lock().active.clone() {
            Some(a) if a.name == old.name => return Ok(json!({"restored": a})),
            Some(a) => {
                return Err(StepError::invalid(format!(
                    "{name}'s route now points at {}; another deployment changed it since, so {} was not re-created",
                    a.label(),
                    old.label()
                )))
            }
            None => {}
        }
        let (cont, _) = self.launch(&old.spec, &old.labels, old.container_port).await?;
        let engine = self.engine().await?;
        engine.wait_for_health(&cont.name, self.cfg.restore_wait).await.map_err(docker_err)?;
        let deadline = Instant::now() + self.cfg.restore_wait;
        while !port_serves(cont.port).await {
            if Instant::now() >= deadline {
                return Err(StepError::transient(format!(
                    "{} was re-created but its port did not accept connections within {}; see `docker logs {}`",
                    cont.label(),
                    human(self.cfg.restore_wait),
                    cont.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        {
            let mut st = app.lock();
            if st.retired.as_ref().is_some_and(|r| r.name == cont.name) {
                st.retired = None;
            }
            if st.route.is_none() && st.route_port.is_some() {
                self.bind_route(name, &mut st, 0, None)?;
            }
            if let Some(r) = &st.route {
                r.set_backend(Some(cont.port));
            }
            st.active = Some(cont.clone());
        }
        self.save(&app)?;
        Ok(json!({"restored": cont}))
    }

    /// The canary's analysis against the active container of `release`.
    async fn analyze(
        &self,
        ctx: &StepContext,
        name: &str,
        release: &str,
        analysis: &fleet_core::manifest::Analysis,
        pause_ms: u64,
    ) -> Result<Value, StepError> {
        let app = self.existing(&ctx.destination, name).ok_or_else(|| not_started(name, release))?;
        let port = app.lock().active.as_ref().filter(|a| a.release == release).map(|a| a.port).ok_or_else(|| not_started(name, release))?;
        let label = format!("{name}@{release}");
        crate::canary::analyze(&label, analysis, port, Duration::from_millis(pause_ms), &self.cfg.path_prepend, &self.cfg.data_dir).await
    }
}

/// Does something serve on 127.0.0.1:`port`? The engine's port proxy
/// accepts connections before the container listens, and then closes them
/// at once: a connection that is accepted and not closed within a moment
/// (or that the server greets) counts.
async fn port_serves(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else { return false };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(200), tokio::io::AsyncReadExt::read(&mut s, &mut byte)).await {
        Err(_) => true,
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
    }
}

fn not_mine(action: &StepAction) -> StepError {
    StepError::invalid(format!(
        "the docker adapter cannot run a `{}` step of this kind; this is a bug in fleet-node's adapter selection, please report it",
        action.verb()
    ))
}

impl Adapter for DockerAdapter {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let i = &self.inner;
            match action {
                StepAction::StartContainer { app, release, container, env } => i.start(ctx, app, release, container, env).await,
                StepAction::HealthCheck { app, release, check } => i.health(ctx, app, release, check).await,
                StepAction::SwitchRoute { app, release, port, listen } => i.switch(ctx, app, release, *port, listen.as_deref()).await,
                StepAction::StopOld { app, drain_ms, .. } => i.stop_old(ctx, app, *drain_ms).await,
                StepAction::StopCurrent { app, drain_ms, .. } => i.stop_current(ctx, app, *drain_ms).await,
                StepAction::CanaryPause { app, release, pause_ms, analysis, .. } => match analysis {
                    Some(a) => i.analyze(ctx, app, release, a, pause_ms.unwrap_or(0)).await,
                    None => Ok(json!({})),
                },
                StepAction::StartInstance { .. } | StepAction::Command { .. } => Err(not_mine(action)),
            }
        })
    }

    fn undo<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction, out: Option<&'a Value>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let i = &self.inner;
            match action {
                StepAction::StartContainer { app, release, .. } => i.undo_start(ctx, app, release, out).await,
                StepAction::HealthCheck { .. } => Ok(json!({})),
                StepAction::SwitchRoute { app, .. } => i.undo_switch(ctx, app, out).await,
                StepAction::StopOld { app, .. } => i.undo_stop_old(ctx, app, out).await,
                StepAction::StopCurrent { app, .. } => i.undo_stop_current(ctx, app, out).await,
                StepAction::CanaryPause { .. } => Ok(json!({})),
                StepAction::StartInstance { .. } | StepAction::Command { .. } => Err(not_mine(action)),
            }
        })
    }

    fn destinations(&self) -> Vec<String> {
        self.inner.destinations()
    }

    /// One server per app of `destination` on this node (see `docker/discover.rs`).
    fn discover<'a>(&'a self, destination: &'a str) -> BoxFuture<'a, Result<Vec<crate::adapter::Server>, StepError>> {
        Box::pin(self.inner.discover(destination))
    }

    fn health<'a>(&'a self, destination: &'a str, server: &'a crate::adapter::Server) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(self.inner.server_health(destination, server))
    }

    fn cancelled<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let (StepAction::StartContainer { app, release, .. }, false) = (action, ctx.undo) {
                self.inner.cancelled_start(ctx, app, release).await;
            }
        })
    }

    fn forget<'a>(&'a self, destination: &'a str, token: u64) -> BoxFuture<'a, Vec<String>> {
        Box::pin(self.inner.forget(destination, token))
    }

    fn timeout_hint(&self, action: &StepAction) -> String {
        match action {
            StepAction::StartContainer { .. } => {
                "the container was removed; a large image may need longer to pull: raise `step_timeout`, or pull it on the node beforehand"
                    .into()
            }
            StepAction::HealthCheck { .. } => {
                "the health check outlived its step; check the manifest's `health.deadline` against the step timeout".into()
            }
            StepAction::SwitchRoute { .. } => "switching a route should take milliseconds; check the node's own log (stderr)".into(),
            StepAction::StopOld { .. } | StepAction::StopCurrent { .. } => {
                "the old container did not drain and stop in time; check `drain` in the manifest".into()
            }
            StepAction::CanaryPause { .. } => "the canary analysis outlived its pause; check the node's own log (stderr)".into(),
            StepAction::StartInstance { .. } | StepAction::Command { .. } => "this step is another adapter's".into(),
        }
    }
}
