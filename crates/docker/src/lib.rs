//! Fleet's Docker Engine layer: what the node's `docker` adapter needs from the local engine.
//!
//! * [`Engine::connect`] finds the engine (`DOCKER_HOST`, else `/var/run/docker.sock`), refuses one
//!   older than [`REQUIRED_API`] and settles the API version to speak.
//! * [`ContainerSpec`] is a container as a manifest describes it; [`FleetLabels`] are the labels
//!   Fleet puts on every container and give its deterministic name.
//! * [`Engine::ensure_image`], [`Engine::create_and_start`], [`Engine::inspect`],
//!   [`Engine::wait_for_health`], [`Engine::stop_and_remove`], [`Engine::list`] are the operations
//!   blue-green steps are built from; all are idempotent where a retry can happen.
//! * Every failure is a [`DockerError`] whose [`DockerError::class`] is one of Fleet's error classes.
//! * [`testimage`] builds small `FROM scratch` images for tests, without a registry or the CLI.

pub mod auth;
pub mod engine;
pub mod error;
pub mod spec;
pub mod testimage;

pub use auth::{DockerConfig, RegistryCredentials};
pub use engine::{
    socket_from_env, ApiVersion, ContainerInfo, Engine, Health, ImagePresence, LabelFilter, ListedContainer, PublishedPort, Removal,
    RunState, Started, DEFAULT_SOCKET, DEFAULT_TIMEOUT, REQUIRED_API,
};
pub use error::{DockerError, ErrorKind};
pub use spec::{
    BindMount, ContainerSpec, FleetLabels, Limits, PortSpec, Protocol, PullPolicy, RestartPolicy, LABEL_APP, LABEL_DEPLOYMENT,
    LABEL_DESTINATION, LABEL_MANAGED, LABEL_NODE, LABEL_PREFIX, LABEL_RELEASE, LABEL_TOKEN, MANAGED_VALUE, RELEASE_PLACEHOLDER,
};
