//! The connection to the node's Docker Engine and the container operations Fleet's steps use.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::{ClientVersion, Docker};
use futures::StreamExt;

use crate::auth::DockerConfig;
use crate::error::{from_bollard, mentions_port_in_use, DockerError, ErrorKind};
use crate::spec::{split_reference, ContainerSpec, FleetLabels, Protocol, PullPolicy, LABEL_MANAGED, MANAGED_VALUE};

/// Where the engine listens when `DOCKER_HOST` is not set.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// A Docker Engine API version, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiVersion {
    pub major: u32,
    pub minor: u32,
}

impl ApiVersion {
    pub const fn new(major: u32, minor: u32) -> ApiVersion {
        ApiVersion { major, minor }
    }

    pub fn parse(s: &str) -> Option<ApiVersion> {
        let (major, minor) = s.trim().split_once('.')?;
        Some(ApiVersion { major: major.parse().ok()?, minor: minor.parse().ok()? })
    }

    fn to_client(self) -> ClientVersion {
        ClientVersion { major_version: self.major as usize, minor_version: self.minor as usize }
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The oldest engine API Fleet works with (Docker Engine 20.10), and the version Fleet speaks
/// whenever the engine still accepts it: requests and answers then have the shapes Fleet was
/// tested against, whatever newer version bollard knows.
pub const REQUIRED_API: ApiVersion = ApiVersion::new(1, 41);

/// The newest API the bollard release in use describes.
pub fn newest_known_api() -> ApiVersion {
    let v = bollard::API_DEFAULT_VERSION;
    ApiVersion::new(v.major_version as u32, v.minor_version as u32)
}

/// Per-request timeout unless [`Engine::connect_with`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The socket `DOCKER_HOST` names (`unix:///path` or a bare path), else [`DEFAULT_SOCKET`].
/// Other schemes (tcp://, ssh://) are refused: Fleet only talks to the node's own engine.
pub fn socket_from_env() -> Result<PathBuf, DockerError> {
    match std::env::var("DOCKER_HOST") {
        Ok(v) if !v.trim().is_empty() => socket_from_host(v.trim()),
        _ => Ok(PathBuf::from(DEFAULT_SOCKET)),
    }
}

fn socket_from_host(value: &str) -> Result<PathBuf, DockerError> {
    if let Some(path) = value.strip_prefix("unix://") {
        return Ok(PathBuf::from(path));
    }
    if value.starts_with('/') {
        return Ok(PathBuf::from(value));
    }
    Err(DockerError::UnsupportedHost { value: value.to_string() })
}

/// A connected, version-checked Docker Engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    socket: PathBuf,
    engine_api: ApiVersion,
    engine_min_api: ApiVersion,
    client_api: ApiVersion,
    timeout: Duration,
    docker_config: PathBuf,
}

/// What [`Engine::ensure_image`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePresence {
    AlreadyPresent,
    Pulled,
}

/// What [`Engine::create_and_start`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub id: String,
    pub name: String,
    /// The container already existed with this step's labels (a retried create) and was adopted.
    pub adopted: bool,
}

/// What [`Engine::stop_and_remove`] did; both are success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    AlreadyGone,
}

/// A container's lifecycle state as the engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
    Unknown,
}

impl RunState {
    fn parse(s: &str) -> RunState {
        match s {
            "created" => RunState::Created,
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "restarting" => RunState::Restarting,
            "removing" => RunState::Removing,
            "exited" => RunState::Exited,
            "dead" => RunState::Dead,
            _ => RunState::Unknown,
        }
    }
}

/// The image's HEALTHCHECK verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The image (and spec) define no health check.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// A port the engine published for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedPort {
    pub container_port: u16,
    pub protocol: Protocol,
    pub host_ip: IpAddr,
    pub host_port: u16,
}

/// One container, inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    /// The image reference the container was created from.
    pub image: String,
    pub labels: HashMap<String, String>,
    /// Fleet's labels, when the container is one of Fleet's.
    pub fleet: Option<FleetLabels>,
    pub state: RunState,
    pub exit_code: Option<i64>,
    pub health: Health,
    /// Why the engine could not run it (e.g. a failed start), if it says.
    pub error: Option<String>,
    pub ports: Vec<PublishedPort>,
}

impl ContainerInfo {
    pub fn is_running(&self) -> bool {
        self.state == RunState::Running
    }

    /// Where `container_port/tcp` is published (the first binding; IPv4 preferred).
    pub fn host_port(&self, container_port: u16) -> Option<SocketAddr> {
        let mut matching: Vec<&PublishedPort> =
            self.ports.iter().filter(|p| p.container_port == container_port && p.protocol == Protocol::Tcp).collect();
        matching.sort_by_key(|p| !p.host_ip.is_ipv4());
        matching.first().map(|p| SocketAddr::new(p.host_ip, p.host_port))
    }
}

/// One container as listed (no health, no ports: inspect it for those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedContainer {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub fleet: Option<FleetLabels>,
    pub state: RunState,
}

/// A label filter for [`Engine::list`]; every condition must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelFilter {
    conditions: Vec<String>,
}

impl LabelFilter {
    /// Every container Fleet manages on this engine.
    pub fn managed() -> LabelFilter {
        LabelFilter::default().label(LABEL_MANAGED, MANAGED_VALUE)
    }

    /// `key=value` must be set.
    pub fn label(mut self, key: &str, value: &str) -> LabelFilter {
        self.conditions.push(format!("{key}={value}"));
        self
    }

    /// `key` must be present, with any value.
    pub fn has(mut self, key: &str) -> LabelFilter {
        self.conditions.push(key.to_string());
        self
    }

    pub fn app(self, app: &str) -> LabelFilter {
        self.label(crate::spec::LABEL_APP, app)
    }

    pub fn destination(self, destination: &str) -> LabelFilter {
        self.label(crate::spec::LABEL_DESTINATION, destination)
    }

    pub fn release(self, release: &str) -> LabelFilter {
        self.label(crate::spec::LABEL_RELEASE, release)
    }

    pub fn deployment(self, deployment: &str) -> LabelFilter {
        self.label(crate::spec::LABEL_DEPLOYMENT, deployment)
    }

    pub fn token(self, token: u64) -> LabelFilter {
        self.label(crate::spec::LABEL_TOKEN, &token.to_string())
    }

    pub fn node(self, node: &str) -> LabelFilter {
        self.label(crate::spec::LABEL_NODE, node)
    }
}

impl Engine {
    /// Connects to the engine `DOCKER_HOST` names, else `/var/run/docker.sock`.
    pub async fn connect() -> Result<Engine, DockerError> {
        Engine::connect_with(&socket_from_env()?, DEFAULT_TIMEOUT).await
    }

    /// Connects to the engine on `socket` with the default timeout.
    pub async fn connect_socket(socket: impl AsRef<Path>) -> Result<Engine, DockerError> {
        Engine::connect_with(socket.as_ref(), DEFAULT_TIMEOUT).await
    }

    /// Connects to the engine on `socket`, checks that it speaks at least [`REQUIRED_API`] and
    /// settles the version to speak: [`REQUIRED_API`] when the engine still accepts it, else the
    /// newest version both sides know.
    pub async fn connect_with(socket: &Path, timeout: Duration) -> Result<Engine, DockerError> {
        if !socket.exists() {
            return Err(DockerError::SocketMissing { socket: socket.to_path_buf() });
        }
        let path = socket.to_str().ok_or_else(|| DockerError::UnsupportedHost { value: socket.display().to_string() })?;
        let secs = timeout.as_secs().max(1);
        let connect = |v: ApiVersion| {
            Docker::connect_with_socket(path, secs, &v.to_client())
                .map(|docker| pin_version(docker, v))
                .map_err(|e| from_bollard("connect", socket, timeout, e))
        };
        let newest = newest_known_api();
        // Ask the engine what it speaks. An engine that no longer accepts 1.41 says "too old":
        // ask again in the newest version bollard knows.
        let mut docker = connect(REQUIRED_API)?;
        let version = match docker.version().await {
            Ok(v) => v,
            Err(e) => {
                let err = from_bollard("report its version", socket, timeout, e);
                match &err {
                    DockerError::Engine { status: 400, message, .. } if message.contains("too old") => {
                        docker = connect(newest)?;
                        docker.version().await.map_err(|e| from_bollard("report its version", socket, timeout, e))?
                    }
                    _ => return Err(err),
                }
            }
        };
        let engine_api = version.api_version.as_deref().and_then(ApiVersion::parse).ok_or_else(|| DockerError::Engine {
            op: "report its API version".into(),
            status: 200,
            message: format!("unreadable ApiVersion {:?}", version.api_version),
            kind: ErrorKind::Invalid,
        })?;
        if engine_api < REQUIRED_API {
            return Err(DockerError::EngineTooOld {
                socket: socket.to_path_buf(),
                engine: engine_api.to_string(),
                required: REQUIRED_API.to_string(),
            });
        }
        let engine_min = version.min_api_version.as_deref().and_then(ApiVersion::parse).unwrap_or(REQUIRED_API);
        let client_api = if engine_min <= REQUIRED_API { REQUIRED_API } else { engine_api.min(newest) };
        let docker = connect(client_api)?;
        Ok(Engine {
            docker,
            socket: socket.to_path_buf(),
            engine_api,
            engine_min_api: engine_min,
            client_api,
            timeout,
            docker_config: DockerConfig::default_path(),
        })
    }

    /// Reads registry credentials from `path` instead of the node's default Docker config.
    pub fn with_docker_config(mut self, path: impl Into<PathBuf>) -> Engine {
        self.docker_config = path.into();
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The newest API the engine speaks.
    pub fn engine_api(&self) -> ApiVersion {
        self.engine_api
    }

    /// The oldest API the engine still accepts.
    pub fn engine_min_api(&self) -> ApiVersion {
        self.engine_min_api
    }

    /// The API version this client speaks to it.
    pub fn client_api(&self) -> ApiVersion {
        self.client_api
    }

    /// The bollard client, for what this crate does not wrap (building images in tests).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    pub(crate) fn err(&self, op: &str, e: bollard::errors::Error) -> DockerError {
        from_bollard(op, &self.socket, self.timeout, e)
    }

    /// Whether the engine has `image`.
    pub async fn image_exists(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match self.err(&format!("inspect image {image}"), e) {
                e if e.status() == Some(404) => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Makes `image` present according to `policy`. Pulls use the credentials of the node's
    /// Docker config for the image's registry, if it has some.
    pub async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<ImagePresence, DockerError> {
        match policy {
            PullPolicy::Never if self.image_exists(image).await? => Ok(ImagePresence::AlreadyPresent),
            PullPolicy::Never => Err(DockerError::ImageMissing { image: image.to_string() }),
            PullPolicy::Missing if self.image_exists(image).await? => Ok(ImagePresence::AlreadyPresent),
            PullPolicy::Missing | PullPolicy::Always => {
                self.pull(image).await?;
                Ok(ImagePresence::Pulled)
            }
        }
    }

    async fn pull(&self, image: &str) -> Result<(), DockerError> {
        let config = DockerConfig::load(&self.docker_config)?;
        let credentials = config.bollard_credentials(image);
        let (repo, tag) = split_reference(image);
        let options = CreateImageOptions { from_image: Some(repo), tag: Some(tag), ..CreateImageOptions::default() };
        let op = format!("pull image {image}");
        let mut stream = self.docker.create_image(Some(options), None, credentials);
        while let Some(item) = stream.next().await {
            let err = match item {
                Ok(info) => match info.error_detail.and_then(|d| d.message) {
                    Some(message) => self.err(&op, bollard::errors::Error::DockerStreamError { error: message }),
                    None => continue,
                },
                Err(e) => self.err(&op, e),
            };
            return Err(match err {
                e if e.kind() == ErrorKind::Auth => DockerError::Auth {
                    image: image.to_string(),
                    message: match e {
                        DockerError::Engine { message, .. } => message,
                        other => other.to_string(),
                    },
                    config: config.path.display().to_string(),
                },
                e => e,
            });
        }
        Ok(())
    }

    /// Makes sure the image is there (per `spec.pull`), creates the container named
    /// [`FleetLabels::container_name`] with Fleet's labels, and starts it.
    ///
    /// Idempotent: a container already under that name with the same app, destination, release
    /// and token (a retried step) is adopted and started if needed. One that is not this step's
    /// is a [`DockerError::NameConflict`]. If the start fails, the container is removed again
    /// (nothing is left behind) and the error returned.
    pub async fn create_and_start(&self, spec: &ContainerSpec, fleet: &FleetLabels) -> Result<Started, DockerError> {
        let body = spec.to_create_body(fleet)?;
        let image = spec.image_for(&fleet.release)?;
        self.ensure_image(&image, spec.pull).await?;
        let name = fleet.container_name();
        let options = CreateContainerOptions { name: Some(name.clone()), ..CreateContainerOptions::default() };
        let (id, adopted) = match self.docker.create_container(Some(options), body).await {
            Ok(created) => (created.id, false),
            Err(e) => match self.err(&format!("create container {name} from image {image}"), e) {
                e if e.status() == Some(409) => match self.inspect(&name).await? {
                    Some(existing) if is_same_step(existing.fleet.as_ref(), fleet) => (existing.id, true),
                    Some(existing) => return Err(DockerError::NameConflict { name, id: existing.id }),
                    // Removed between our create and our look: the next attempt creates it.
                    None => return Err(e),
                },
                e if e.status() == Some(404) => return Err(DockerError::ImageMissing { image }),
                e => return Err(e),
            },
        };
        if let Err(e) = self.docker.start_container(&id, None).await {
            let err = self.err(&format!("start container {name}"), e);
            // Exact undo of this step's create: leave nothing behind.
            self.remove_force(&id).await?;
            return Err(match err {
                DockerError::Engine { message, .. } if mentions_port_in_use(&message) => DockerError::PortInUse { name, message },
                other => other,
            });
        }
        Ok(Started { id, name, adopted })
    }

    async fn remove_force(&self, id: &str) -> Result<Removal, DockerError> {
        let options = RemoveContainerOptions { force: true, v: true, link: false };
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(Removal::Removed),
            Err(e) => match self.err(&format!("remove container {id}"), e) {
                e if e.status() == Some(404) => Ok(Removal::AlreadyGone),
                // "removal of container … is already in progress": someone else is finishing it.
                DockerError::Engine { status: 409, message, .. } if message.contains("already in progress") => Ok(Removal::Removed),
                e => Err(e),
            },
        }
    }

    /// The container's state, health and published ports; `None` if there is no such container.
    pub async fn inspect(&self, name_or_id: &str) -> Result<Option<ContainerInfo>, DockerError> {
        let c = match self.docker.inspect_container(name_or_id, None).await {
            Ok(c) => c,
            Err(e) => {
                return match self.err(&format!("inspect container {name_or_id}"), e) {
                    e if e.status() == Some(404) => Ok(None),
                    e => Err(e),
                }
            }
        };
        let config = c.config.unwrap_or_default();
        let labels = config.labels.unwrap_or_default();
        let state = c.state.unwrap_or_default();
        let health = match state.health.and_then(|h| h.status).map(|s| s.to_string()).as_deref() {
            Some("starting") => Health::Starting,
            Some("healthy") => Health::Healthy,
            Some("unhealthy") => Health::Unhealthy,
            _ => Health::None,
        };
        let mut ports = Vec::new();
        for (key, bindings) in c.network_settings.and_then(|n| n.ports).unwrap_or_default() {
            let (port, proto) = key.split_once('/').unwrap_or((key.as_str(), "tcp"));
            let (Ok(container_port), protocol) = (port.parse::<u16>(), if proto == "udp" { Protocol::Udp } else { Protocol::Tcp }) else {
                continue;
            };
            for b in bindings.unwrap_or_default() {
                let host_ip = b.host_ip.as_deref().and_then(|ip| ip.parse().ok());
                let host_port = b.host_port.as_deref().and_then(|p| p.parse().ok());
                if let (Some(host_ip), Some(host_port)) = (host_ip, host_port) {
                    ports.push(PublishedPort { container_port, protocol, host_ip, host_port });
                }
            }
        }
        ports.sort_by_key(|p| (p.container_port, p.host_port));
        Ok(Some(ContainerInfo {
            id: c.id.unwrap_or_default(),
            name: c.name.unwrap_or_default().trim_start_matches('/').to_string(),
            image: config.image.unwrap_or_default(),
            fleet: FleetLabels::from_map(&labels),
            labels,
            state: state.status.map(|s| RunState::parse(s.as_ref())).unwrap_or(RunState::Unknown),
            exit_code: state.exit_code,
            health,
            error: state.error.filter(|e| !e.is_empty()),
            ports,
        }))
    }

    /// Polls until the container's health is settled: healthy or unhealthy, running without a
    /// health check, or no longer running; or until `within` has passed. Returns what it saw last
    /// (`None`: the container is gone).
    pub async fn wait_for_health(&self, name_or_id: &str, within: Duration) -> Result<Option<ContainerInfo>, DockerError> {
        let deadline = Instant::now() + within;
        loop {
            let info = self.inspect(name_or_id).await?;
            let settled = match &info {
                None => true,
                Some(i) if !i.is_running() && i.state != RunState::Created && i.state != RunState::Restarting => true,
                Some(i) => matches!(i.health, Health::Healthy | Health::Unhealthy) || (i.health == Health::None && i.is_running()),
            };
            if settled || Instant::now() >= deadline {
                return Ok(info);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the container (SIGTERM, then SIGKILL after `grace`) and removes it with its
    /// anonymous volumes. A container that is already gone is success.
    pub async fn stop_and_remove(&self, name_or_id: &str, grace: Duration) -> Result<Removal, DockerError> {
        let grace_secs = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptions { t: Some(grace_secs), signal: None };
        // The engine answers only after the grace period: give the request that much more time.
        let docker = self.docker.clone().with_timeout(self.timeout.saturating_add(grace));
        if let Err(e) = docker.stop_container(name_or_id, Some(options)).await {
            match self.err(&format!("stop container {name_or_id}"), e) {
                e if e.status() == Some(404) => return Ok(Removal::AlreadyGone),
                // A container being removed by someone else answers 409 here too; removing decides.
                e if e.status() == Some(409) => {}
                e => return Err(e),
            }
        }
        self.remove_force(name_or_id).await
    }

    /// Every container (running or not) whose labels satisfy `filter`.
    pub async fn list(&self, filter: &LabelFilter) -> Result<Vec<ListedContainer>, DockerError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), filter.conditions.clone())])),
            ..ListContainersOptions::default()
        };
        let listed = self.docker.list_containers(Some(options)).await.map_err(|e| self.err("list containers", e))?;
        Ok(listed
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                ListedContainer {
                    id: c.id.unwrap_or_default(),
                    name: c.names.unwrap_or_default().first().map(|n| n.trim_start_matches('/').to_string()).unwrap_or_default(),
                    image: c.image.unwrap_or_default(),
                    fleet: FleetLabels::from_map(&labels),
                    labels,
                    state: c.state.map(|s| RunState::parse(s.as_ref())).unwrap_or(RunState::Unknown),
                }
            })
            .collect())
    }
}

/// Puts `/v<major>.<minor>` in front of every request path.
///
/// bollard 0.21 records a client version but sends unversioned paths (`/containers/json`), so the
/// engine would answer in its own newest API. With the prefix, the engine speaks exactly the
/// version settled at connect time, and an engine that no longer accepts it says so.
fn pin_version(docker: Docker, v: ApiVersion) -> Docker {
    let prefix = format!("/v{v}");
    docker.with_request_modifier(move |mut request| {
        let uri = request.uri();
        if !uri.path().starts_with(&format!("{prefix}/")) {
            let path_and_query = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
            let pinned =
                format!("{}://{}{prefix}{path_and_query}", uri.scheme_str().unwrap_or("unix"), uri.authority().map_or("", |a| a.as_str()));
            if let Ok(pinned) = pinned.parse() {
                *request.uri_mut() = pinned;
            }
        }
        request
    })
}

/// Whether an existing container is the one this step would create: same app, destination,
/// release and fencing token.
fn is_same_step(existing: Option<&FleetLabels>, wanted: &FleetLabels) -> bool {
    existing.is_some_and(|e| {
        e.app == wanted.app
            && e.destination == wanted.destination
            && e.release == wanted.release
            && e.token == wanted.token
            && e.node == wanted.node
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_values() {
        assert_eq!(socket_from_host("unix:///run/user/1000/docker.sock").unwrap(), PathBuf::from("/run/user/1000/docker.sock"));
        assert_eq!(socket_from_host("/var/run/docker.sock").unwrap(), PathBuf::from("/var/run/docker.sock"));
        let e = socket_from_host("tcp://10.0.0.1:2375").unwrap_err();
        assert!(e.to_string().contains("tcp://10.0.0.1:2375"), "{e}");
        assert_eq!(e.class(), fleet_core::deploy::ErrorClass::Invalid);
    }

    /// The prefix really reaches the engine: a version it does not speak is refused.
    #[tokio::test]
    async fn the_pinned_version_is_on_the_wire() {
        let socket = socket_from_env().unwrap();
        assert!(socket.exists(), "this test needs the Docker Engine at {}", socket.display());
        let path = socket.to_str().unwrap();
        let too_new = ApiVersion::new(1, 999);
        let docker = pin_version(Docker::connect_with_socket(path, 30, &too_new.to_client()).unwrap(), too_new);
        let err = from_bollard("report its version", &socket, DEFAULT_TIMEOUT, docker.version().await.unwrap_err());
        assert_eq!(err.status(), Some(400), "{err}");
        assert!(err.to_string().contains("1.999"), "{err}");
        let ok = pin_version(Docker::connect_with_socket(path, 30, &REQUIRED_API.to_client()).unwrap(), REQUIRED_API);
        ok.version().await.unwrap();
    }

    #[test]
    fn api_versions_order_numerically() {
        assert!(ApiVersion::parse("1.41").unwrap() < ApiVersion::parse("1.100").unwrap());
        assert!(ApiVersion::parse("1.9").unwrap() < REQUIRED_API);
        assert_eq!(ApiVersion::parse("x"), None);
        assert!(newest_known_api() >= REQUIRED_API);
    }
}
