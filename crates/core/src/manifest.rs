//! The deployment manifest (`fleet.yaml`) and the destinations file.
//!
//! Parsing is strict: an unknown field, a missing required one or a value
//! out of range is an error that names the file, the field (as a dotted
//! path) and the reason, so a typo never deploys something unexpected.
//!
//! ```yaml
//! app: web
//! release: v2
//! destination: staging
//! run: ["fleet-demo-app", "--release", "{release}"]
//! env: { GREETING: hello }
//! strategy: { max_unavailable: 1 }
//! health:
//!   http: /healthz
//!   interval: 200ms
//!   timeout: 1s
//!   healthy_threshold: 2
//!   deadline: 20s
//! ```
//!
//! A `docker` destination's manifest has `image:` instead of `run:`, and the
//! container's settings (named as in `fleet_docker::ContainerSpec`; core
//! does not depend on it, the node converts [`ContainerManifest`]):
//!
//! ```yaml
//! app: web
//! destination: boxes
//! image: "registry.example/web:{release}"
//! container_port: 8080
//! pull: missing            # missing | always | never
//! command: ["/serve"]      # optional, instead of the image's CMD
//! volumes: [{ host_path: /srv/web, container_path: /data, read_only: true }]
//! limits: { memory_bytes: 268435456, nano_cpus: 500000000 }
//! health: { image: true }  # the image's HEALTHCHECK, or http/tcp/command as above
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::{validate_name, validate_text};

mod strategy;
pub use strategy::{check_nodes, validate_route, validate_strategy, Analysis, AnalysisSpec, Canary, CanarySpec, RouteSpec, StrategyKind};

/// A manifest or destinations file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{file}: {field}: {reason}")]
pub struct ManifestError {
    pub file: String,
    /// Dotted path of the offending field (`health.interval`), or `.` for
    /// the document as a whole.
    pub field: String,
    pub reason: String,
}

impl ManifestError {
    fn new(file: &str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ManifestError { file: file.to_string(), field: field.into(), reason: reason.into() }
    }
}

/// A command destination's step as written in `fleet.yaml` (`steps:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    /// Shell command (`sh -c`) that does the step.
    pub run: String,
    /// Shell command that reverses it (absent: nothing to undo).
    #[serde(default)]
    pub undo: Option<String>,
    /// Shell command that exits 0 when the step is already done; run before
    /// `run` (always, and in particular when a step is handed to another
    /// node after its first one was lost).
    #[serde(default)]
    pub check: Option<String>,
    /// Once done, a later failure never undoes it (a migration, a DNS
    /// cut-over): the deployment ends `compensation_failed` for a human.
    #[serde(default)]
    pub irreversible: bool,
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `fleet.yaml` as written by the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub app: String,
    #[serde(default)]
    pub release: Option<String>,
    /// One destination, or `destinations:` for a stack (several
    /// destinations deployed as one saga: all their locks are taken in one
    /// step, and it succeeds or is undone as a whole).
    #[serde(default)]
    pub destination: Option<String>,
    #[serde(default)]
    pub destinations: Vec<String>,
    /// How to run one instance of the release (argv), for `process`
    /// destinations. `{release}` and `{port}` are replaced; the instance
    /// also gets `PORT` and `FLEET_RELEASE` in its environment.
    #[serde(default)]
    pub run: Vec<String>,
    /// The steps of a `command` destination (terraform, ansible, compose,
    /// scripts), instead of `run` and `health`.
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values are secret: the instance gets
    /// them like `env`, but every record a client, a log or an event sees
    /// shows `(secret)` instead (see `Deployment::redacted`).
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Where each node's route listens (`route: { listen: 0.0.0.0 }`).
    #[serde(default)]
    pub route: RouteSpec,
    #[serde(default)]
    pub health: Option<HealthSpec>,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(default)]
    pub retry: RetrySpec,
    /// Deadline of the whole deployment (`fleetctl deploy --timeout` wins).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Per-step timeout for steps that have no timeout of their own.
    #[serde(default)]
    pub step_timeout: Option<String>,
    /// Stable port of the app's route on every node; 0 or absent = the node
    /// picks a free port once and keeps it.
    #[serde(default)]
    pub port: Option<u16>,
    /// How long stopping the old instance waits for its open connections.
    #[serde(default)]
    pub drain: Option<String>,
    /// The image of a `docker` destination's container (`{release}` is
    /// replaced), instead of `run:`.
    #[serde(default)]
    pub image: Option<String>,
    /// The container's command (argv), instead of the image's own CMD.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The port inside the container the route forwards to (published on
    /// an engine-chosen port of 127.0.0.1).
    #[serde(default)]
    pub container_port: Option<u16>,
    /// Bind mounts of host paths into the container.
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    /// Resource limits of the container.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// When the node pulls the image: `missing` (default), `always`, `never`.
    #[serde(default)]
    pub pull: Option<PullPolicy>,
}

/// A bind mount as written in `fleet.yaml` (`volumes:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub host_path: String,
    pub container_path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Resource limits of a container (`limits:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Memory limit in bytes (at least 6 MiB, the engine's minimum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
    /// CPU limit in billionths of a CPU (1 CPU = 1000000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nano_cpus: Option<i64>,
}

/// When a node pulls a container's image from its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Pull only when the node does not have the image.
    #[default]
    Missing,
    /// Always pull (a moving tag).
    Always,
    /// Never pull: the image must already be on the node.
    Never,
}

/// A validated container of a `docker` manifest: what the node's docker
/// adapter turns into a container spec (field names follow it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerManifest {
    /// Image reference, `{release}` not yet replaced.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    #[serde(default)]
    pub limits: LimitsSpec,
    #[serde(default)]
    pub pull: PullPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    /// Nodes switched at once (blue-green on each node, rolling across).
    #[serde(default)]
    pub max_unavailable: Option<u32>,
    /// `blue_green` (default) or `recreate` (see `strategy`).
    #[serde(default, rename = "type")]
    pub kind: Option<StrategyKind>,
    /// The release on a few nodes first, then a pause (see `strategy`).
    #[serde(default)]
    pub canary: Option<CanarySpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// HTTP GET of this path must answer 2xx.
    #[serde(default)]
    pub http: Option<String>,
    /// A TCP connect to the instance's port must succeed.
    #[serde(default)]
    pub tcp: Option<bool>,
    /// This command (argv) must exit 0; `{port}` is replaced.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub healthy_threshold: Option<u32>,
    /// Give up after this long.
    #[serde(default)]
    pub deadline: Option<String>,
    /// `docker` destinations only: the image's own HEALTHCHECK must report
    /// the container healthy.
    #[serde(default)]
    pub image: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Commands (run by `sh -c` on each node) before the first step.
    #[serde(default)]
    pub pre: Vec<String>,
    /// Commands after the last step.
    #[serde(default)]
    pub post: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
    /// Multiplier of the backoff between attempts, e.g. `2` or `1.5`.
    #[serde(default)]
    pub backoff_multiplier: Option<f64>,
}

/// How a health check probes an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "probe", rename_all = "snake_case")]
pub enum Probe {
    Http {
        path: String,
    },
    Tcp,
    Command {
        argv: Vec<String>,
    },
    /// The container image's own HEALTHCHECK (`docker` destinations).
    Image,
}

/// A validated health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub deadline_ms: u64,
}

/// Retry policy of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_ms: u64,
    /// Backoff multiplier in percent (200 = doubles), kept integral so the
    /// replicated state has no floats.
    pub multiplier_pct: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 1, backoff_ms: 500, multiplier_pct: 200 }
    }
}

impl RetryPolicy {
    /// Backoff before attempt `attempt` (2 = the first retry), without jitter.
    pub fn backoff_before(&self, attempt: u32) -> u64 {
        let mut b = self.backoff_ms as u128;
        for _ in 2..attempt {
            b = b.saturating_mul(self.multiplier_pct as u128) / 100;
        }
        b.min(5 * 60 * 1000) as u64
    }

    /// The backoff with jitter: between 75 % and 100 % of it, picked by
    /// `seed` (a hash of the deployment, step and attempt), so retries of
    /// many deployments do not move in lockstep, while every replica of
    /// the state machine computes the same value.
    pub fn backoff_with_jitter(&self, attempt: u32, seed: u64) -> u64 {
        let b = self.backoff_before(attempt);
        // splitmix64: a well-mixed 64-bit value from the seed.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        b - (b / 4) * (z % 1001) / 1000
    }
}

/// A validated command step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandStep {
    pub name: String,
    pub run: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    #[serde(default)]
    pub irreversible: bool,
    pub timeout_ms: u64,
}

/// What a manifest deploys: a supervised process (`run` + `health`), a
/// container (`image` + `health`) or a list of command steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Process,
    Command,
    Docker,
}

impl Kind {
    /// The destination adapter that runs this kind.
    pub fn adapter(self) -> &'static str {
        match self {
            Kind::Process => "process",
            Kind::Command => "command",
            Kind::Docker => "docker",
        }
    }

    /// What in a manifest makes it this kind, for error messages.
    pub fn because(self) -> &'static str {
        match self {
            Kind::Process => "it has `run:` and `health:`",
            Kind::Command => "it has `steps:`",
            Kind::Docker => "it has `image:` and `health:`",
        }
    }
}

/// A manifest after validation, with defaults filled in and the release and
/// destination decided. This is what a deployment records and plans from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub app: String,
    pub release: String,
    /// The first (for most deployments the only) destination.
    pub destination: String,
    /// Every destination of a stack, `destination` first; empty for one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack: Vec<String>,
    pub run: Vec<String>,
    /// Command steps (for `command` destinations); empty for `process`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CommandStep>,
    pub env: BTreeMap<String, String>,
    /// Secret variables (`secret_env:`), stored replicated like the rest of
    /// the spec and shown to nobody: `Deployment::redacted` masks them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
    pub max_unavailable: u32,
    /// Absent for command manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    pub pre_hooks: Vec<String>,
    pub post_hooks: Vec<String>,
    pub retry: RetryPolicy,
    pub timeout_ms: u64,
    pub step_timeout_ms: u64,
    pub port: u16,
    pub drain_ms: u64,
    /// The container of a `docker` manifest; absent for the other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerManifest>,
    /// `strategy.type` (`blue_green` unless `recreate`).
    #[serde(default, skip_serializing_if = "StrategyKind::is_blue_green")]
    pub strategy: StrategyKind,
    /// `strategy.canary`, validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// `route.listen`: the IP address routes listen on (absent: 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_listen: Option<String>,
}

/// A variable name an instance can be given: letters, digits and `_`, not starting with a digit.
fn is_env_name(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !k.starts_with(|c: char| c.is_ascii_digit())
}

/// What a client, a log or an event sees instead of a secret value.
pub const REDACTED: &str = "(secret)";

impl Spec {
    /// The environment an instance starts with: `env` and `secret_env`.
    pub fn instance_env(&self) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.extend(self.secret_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// The same spec with every secret value replaced by [`REDACTED`].
    pub fn redacted(&self) -> Spec {
        let mut s = self.clone();
        for v in s.secret_env.values_mut() {
            *v = REDACTED.to_string();
        }
        s
    }

    /// Every destination, in order.
    pub fn destinations(&self) -> &[String] {
        if self.stack.is_empty() {
            std::slice::from_ref(&self.destination)
        } else {
            &self.stack
        }
    }

    pub fn kind(&self) -> Kind {
        if self.container.is_some() {
            Kind::Docker
        } else if self.steps.is_empty() {
            Kind::Process
        } else {
            Kind::Command
        }
    }
}

/// Most destinations one stack may span.
pub const MAX_STACK: usize = 16;

pub const DEFAULT_DEPLOY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const MAX_ARGS: usize = 256;
const MAX_ENV: usize = 256;

/// Overrides given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub release: Option<String>,
    pub destinations: Vec<String>,
    pub timeout_ms: Option<u64>,
}

/// Parse and validate `fleet.yaml`.
pub fn parse_manifest(file: &str, text: &str, overrides: &Overrides) -> Result<Spec, ManifestError> {
    let m: Manifest = parse_yaml(file, text)?;
    validate_manifest(file, m, overrides)
}

fn parse_yaml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, ManifestError> {
    if text.trim().is_empty() {
        return Err(ManifestError::new(file, ".", "the file is empty; see `fleetctl deploy --help` for an example"));
    }
    check_bounds(text).map_err(|reason| ManifestError::new(file, ".", reason))?;
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        let mut reason = text.strip_prefix(&format!("{path}: ")).unwrap_or(&text).to_string();
        if let Some(loc) = inner.location() {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if !reason.contains(&suffix) {
                reason.push_str(&suffix);
            }
        }
        ManifestError::new(file, path, reason)
    })
}

fn validate_manifest(file: &str, m: Manifest, o: &Overrides) -> Result<Spec, ManifestError> {
    let err = |field: &str, reason: String| ManifestError::new(file, field, reason);
    validate_name("app", &m.app).map_err(|e| err("app", e.to_string()))?;

    let release = o
        .release
        .clone()
        .or(m.release.clone())
        .ok_or_else(|| err("release", "missing; set `release:` in the manifest or pass `--release R`".into()))?;
    validate_name("release", &release).map_err(|e| err("release", e.to_string()))?;

    let dests: Vec<String> = if !o.destinations.is_empty() {
        o.destinations.clone()
    } else {
        m.destination.iter().cloned().chain(m.destinations.iter().cloned()).collect()
    };
    let field = if dests.len() > 1 { "destinations" } else { "destination" };
    if dests.is_empty() {
        return Err(err("destination", "missing; set `destination:` (or `destinations:` for a stack) or pass `--destination D`".into()));
    }
    if dests.len() > MAX_STACK {
        return Err(err(field, format!("{} destinations; a stack spans at most {MAX_STACK}", dests.len())));
    }
    for (i, d) in dests.iter().enumerate() {
        validate_name("destination", d).map_err(|e| err(field, e.to_string()))?;
        if dests[..i].contains(d) {
            return Err(err(field, format!("`{d}` is listed twice")));
        }
    }
    let destination = dests[0].clone();
    let stack = if dests.len() > 1 { dests } else { vec![] };

    if m.image.is_some() && !m.run.is_empty() {
        return Err(err(
            "image",
            "a manifest has either `run:` (a process destination) or `image:` (a docker destination), not both; drop one".into(),
        ));
    }
    if m.image.is_some() && !m.steps.is_empty() {
        return Err(err(
            "image",
            "a manifest has either `steps:` (a command destination) or `image:` (a docker destination), not both; drop one".into(),
        ));
    }
    let container = match &m.image {
        Some(image) => Some(validate_container(file, image, &m)?),
        None => {
            for (given, field) in [
                (m.command.is_some(), "command"),
                (m.container_port.is_some(), "container_port"),
                (!m.volumes.is_empty(), "volumes"),
                (m.limits != LimitsSpec::default(), "limits"),
                (m.pull.is_some(), "pull"),
            ] {
                if given {
                    return Err(err(field, format!("only a docker manifest (one with `image:`) has `{field}:`; add `image:` or drop it")));
                }
            }
            if m.health.as_ref().is_some_and(|h| h.image.is_some()) {
                return Err(err("health.image", "only a docker manifest (one with `image:`) can use the image's HEALTHCHECK".into()));
            }
            None
        }
    };

    let (kind, health) = match (m.steps.is_empty(), &m.health) {
        (true, Some(h)) if container.is_some() => (Kind::Docker, Some(validate_health(file, h)?)),
        (true, Some(h)) => (Kind::Process, Some(validate_health(file, h)?)),
        (true, None) => {
            return Err(err(
                "health",
                "missing; give `health:` (how to tell a new instance is up), or `steps:` for a command destination".into(),
            ))
        }
        (false, None) if m.run.is_empty() => (Kind::Command, None),
        (false, _) => {
            return Err(err(
                "steps",
                "a manifest has either `run:` and `health:` (a process destination) or `steps:` (a command destination), not both".into(),
            ))
        }
    };

    if kind == Kind::Process && (m.run.is_empty() || m.run[0].trim().is_empty()) {
        return Err(err("run", "empty; give the command that starts one instance, e.g. [\"./server\", \"--port\", \"{port}\"]".into()));
    }
    if m.run.len() > MAX_ARGS {
        return Err(err("run", format!("{} arguments; at most {MAX_ARGS}", m.run.len())));
    }
    for (i, a) in m.run.iter().enumerate() {
        validate_text("argument", a, 4096).map_err(|e| err(&format!("run[{i}]"), e.to_string()))?;
    }
    if m.env.len() > MAX_ENV {
        return Err(err("env", format!("{} variables; at most {MAX_ENV}", m.env.len())));
    }
    for (k, v) in &m.env {
        if !is_env_name(k) {
            return Err(err(&format!("env.{k}"), "not a valid variable name; use letters, digits and `_`".into()));
        }
        validate_text("value", v, 16 * 1024).map_err(|e| err(&format!("env.{k}"), e.to_string()))?;
    }
    if m.env.len() + m.secret_env.len() > MAX_ENV {
        return Err(err("secret_env", format!("{} variables with env; at most {MAX_ENV} in all", m.env.len() + m.secret_env.len())));
    }
    for (k, v) in &m.secret_env {
        if !is_env_name(k) {
            return Err(err(&format!("secret_env.{k}"), "not a valid variable name; use letters, digits and `_`".into()));
        }
        if m.env.contains_key(k) {
            return Err(err(&format!("secret_env.{k}"), "is also in env; give each variable once".into()));
        }
        // The value itself is never repeated in an error.
        validate_text("value", v, 16 * 1024).map_err(|e| err(&format!("secret_env.{k}"), e.to_string()))?;
    }

    let max_unavailable = m.strategy.max_unavailable.unwrap_or(1);
    if max_unavailable == 0 {
        return Err(err("strategy.max_unavailable", "must be at least 1".into()));
    }

    let retry_max = m.retry.max_attempts.unwrap_or(3);
    if retry_max == 0 || retry_max > 100 {
        return Err(err("retry.max_attempts", format!("{retry_max} is out of range; use 1 to 100 (1 = no retry)")));
    }
    let backoff_ms = duration_ms(file, "retry.backoff", m.retry.backoff.as_deref(), 500)?;
    let mult = m.retry.backoff_multiplier.unwrap_or(2.0);
    if !mult.is_finite() || !(1.0..=10.0).contains(&mult) {
        return Err(err("retry.backoff_multiplier", format!("{mult} is out of range; use 1 to 10")));
    }

    let timeout_ms = match o.timeout_ms {
        Some(t) => t,
        None => duration_ms(file, "timeout", m.timeout.as_deref(), DEFAULT_DEPLOY_TIMEOUT.as_millis() as u64)?,
    };
    if timeout_ms == 0 {
        return Err(err("timeout", "must be longer than zero".into()));
    }
    let step_timeout_ms = duration_ms(file, "step_timeout", m.step_timeout.as_deref(), DEFAULT_STEP_TIMEOUT.as_millis() as u64)?;
    if step_timeout_ms == 0 {
        return Err(err("step_timeout", "must be longer than zero".into()));
    }
    let drain_ms = duration_ms(file, "drain", m.drain.as_deref(), 5_000)?;
    let (strategy, canary) = validate_strategy(file, m.strategy.kind, m.strategy.canary.as_ref(), kind == Kind::Command, timeout_ms)?;
    let route_listen = validate_route(file, &m.route)?;
    for (i, h) in m.hooks.pre.iter().enumerate() {
        validate_text("hook", h, 4096).map_err(|e| err(&format!("hooks.pre[{i}]"), e.to_string()))?;
    }
    for (i, h) in m.hooks.post.iter().enumerate() {
        validate_text("hook", h, 4096).map_err(|e| err(&format!("hooks.post[{i}]"), e.to_string()))?;
    }
    if m.steps.len() > MAX_ARGS {
        return Err(err("steps", format!("{} steps; at most {MAX_ARGS}", m.steps.len())));
    }
    let mut steps = Vec::with_capacity(m.steps.len());
    for (i, st) in m.steps.iter().enumerate() {
        let at = |f: &str| format!("steps[{i}].{f}");
        validate_name("step name", &st.name).map_err(|e| err(&at("name"), e.to_string()))?;
        if m.steps[..i].iter().any(|o| o.name == st.name) {
            return Err(err(&at("name"), format!("`{}` is used by two steps; step names must be unique", st.name)));
        }
        if st.run.trim().is_empty() {
            return Err(err(&at("run"), "empty; give the shell command that does this step".into()));
        }
        for (f, v) in [("run", Some(&st.run)), ("undo", st.undo.as_ref()), ("check", st.check.as_ref())] {
            if let Some(v) = v {
                validate_text("command", v, 16 * 1024).map_err(|e| err(&at(f), e.to_string()))?;
            }
        }
        if st.irreversible && st.undo.is_some() {
            return Err(err(&at("undo"), "an irreversible step has no undo; drop `undo:` or `irreversible: true`".into()));
        }
        let timeout_ms = duration_ms(file, &at("timeout"), st.timeout.as_deref(), step_timeout_ms)?;
        if timeout_ms == 0 {
            return Err(err(&at("timeout"), "must be longer than zero".into()));
        }
        steps.push(CommandStep {
            name: st.name.clone(),
            run: st.run.clone(),
            undo: st.undo.clone(),
            check: st.check.clone(),
            irreversible: st.irreversible,
            timeout_ms,
        });
    }

    Ok(Spec {
        app: m.app,
        release,
        destination,
        stack,
        run: m.run,
        steps,
        env: m.env,
        secret_env: m.secret_env,
        max_unavailable,
        health,
        pre_hooks: m.hooks.pre,
        post_hooks: m.hooks.post,
        retry: RetryPolicy { max_attempts: retry_max, backoff_ms, multiplier_pct: (mult * 100.0).round() as u32 },
        timeout_ms,
        step_timeout_ms,
        port: m.port.unwrap_or(0),
        drain_ms,
        container,
        strategy,
        canary,
        route_listen,
    })
}

/// Most bind mounts one container may have.
const MAX_VOLUMES: usize = 64;

fn validate_container(file: &str, image: &str, m: &Manifest) -> Result<ContainerManifest, ManifestError> {
    let err = |field: &str, reason: String| ManifestError::new(file, field, reason);
    let image = image.trim();
    if image.is_empty() {
        return Err(err("image", "empty; name the image to run, e.g. `registry.example/web:{release}`".into()));
    }
    validate_text("image", image, 1024).map_err(|e| err("image", e.to_string()))?;
    let rest = image.replace("{release}", "");
    if rest.contains(['{', '}']) || rest.chars().any(char::is_whitespace) {
        return Err(err("image", format!("`{image}`: only `{{release}}` may be substituted, and an image reference has no spaces")));
    }
    if let Some(cmd) = &m.command {
        if cmd.is_empty() {
            return Err(err("command", "an empty list; leave `command` out to run the image's own CMD".into()));
        }
        if cmd.len() > MAX_ARGS {
            return Err(err("command", format!("{} arguments; at most {MAX_ARGS}", cmd.len())));
        }
        for (i, a) in cmd.iter().enumerate() {
            validate_text("argument", a, 4096).map_err(|e| err(&format!("command[{i}]"), e.to_string()))?;
        }
    }
    let container_port =
        match m.container_port {
            None => return Err(err(
                "container_port",
                "missing; give the port the app listens on inside the container (the route forwards to it), e.g. `container_port: 8080`"
                    .into(),
            )),
            Some(0) => return Err(err("container_port", "0 is not a port; give the port the app listens on inside the container".into())),
            Some(p) => p,
        };
    if m.volumes.len() > MAX_VOLUMES {
        return Err(err("volumes", format!("{} volumes; at most {MAX_VOLUMES}", m.volumes.len())));
    }
    for (i, v) in m.volumes.iter().enumerate() {
        for (f, path) in [("host_path", &v.host_path), ("container_path", &v.container_path)] {
            let at = format!("volumes[{i}].{f}");
            validate_text("path", path, 4096).map_err(|e| err(&at, e.to_string()))?;
            if !path.starts_with('/') {
                return Err(err(&at, format!("`{path}` is not an absolute path; write it like `/srv/data`")));
            }
            if path.contains(':') {
                return Err(err(&at, format!("`{path}` contains `:`, which Docker's bind syntax cannot carry")));
            }
        }
    }
    if let Some(mem) = m.limits.memory_bytes {
        if mem < 6 * 1024 * 1024 {
            return Err(err("limits.memory_bytes", format!("{mem} is below the engine's minimum of 6291456 (6 MiB)")));
        }
    }
    if let Some(c) = m.limits.nano_cpus {
        if c <= 0 {
            return Err(err("limits.nano_cpus", format!("{c} must be positive (1 CPU = 1000000000)")));
        }
    }
    Ok(ContainerManifest {
        image: image.to_string(),
        command: m.command.clone(),
        container_port,
        volumes: m.volumes.clone(),
        limits: m.limits,
        pull: m.pull.unwrap_or_default(),
    })
}

fn validate_health(file: &str, h: &HealthSpec) -> Result<HealthCheck, ManifestError> {
    let err = |field: &str, reason: String| ManifestError::new(file, field, reason);
    let given = [h.http.is_some(), h.tcp == Some(true), h.command.is_some(), h.image == Some(true)].iter().filter(|x| **x).count();
    if given != 1 {
        return Err(err("health", "give exactly one of `http: /path`, `tcp: true`, `command: [...]` or (docker) `image: true`".into()));
    }
    let probe = if h.image == Some(true) {
        Probe::Image
    } else if let Some(path) = &h.http {
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("health.http", format!("`{path}` is not a URL path; write it like `/healthz`")));
        }
        Probe::Http { path: path.clone() }
    } else if let Some(argv) = &h.command {
        if argv.is_empty() {
            return Err(err("health.command", "empty; give a command such as [\"./check\", \"{port}\"]".into()));
        }
        Probe::Command { argv: argv.clone() }
    } else {
        Probe::Tcp
    };
    let interval_ms = duration_ms(file, "health.interval", h.interval.as_deref(), 1_000)?;
    let timeout_ms = duration_ms(file, "health.timeout", h.timeout.as_deref(), 2_000)?;
    let deadline_ms = duration_ms(file, "health.deadline", h.deadline.as_deref(), 60_000)?;
    if interval_ms == 0 {
        return Err(err("health.interval", "must be longer than zero".into()));
    }
    if timeout_ms == 0 {
        return Err(err("health.timeout", "must be longer than zero".into()));
    }
    if deadline_ms < interval_ms {
        return Err(err("health.deadline", "is shorter than health.interval; the check could never run".into()));
    }
    let healthy_threshold = h.healthy_threshold.unwrap_or(1);
    if healthy_threshold == 0 || healthy_threshold > 1000 {
        return Err(err("health.healthy_threshold", format!("{healthy_threshold} is out of range; use 1 to 1000")));
    }
    Ok(HealthCheck { probe, interval_ms, timeout_ms, healthy_threshold, deadline_ms })
}

/// Parse a duration such as `500ms`, `10s`, `5m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("`{t}` is negative; durations must be positive, e.g. `500ms` or `10s`"));
    }
    humantime::parse_duration(t).map_err(|e| format!("`{t}` is not a duration ({e}); write it like `500ms`, `10s` or `5m`"))
}

/// `1m 30s` of a length in milliseconds.
pub(crate) fn fmt_duration_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

fn duration_ms(file: &str, field: &str, value: Option<&str>, default_ms: u64) -> Result<u64, ManifestError> {
    match value {
        None => Ok(default_ms),
        Some(v) => {
            parse_duration(v).map(|d| d.as_millis().min(u64::MAX as u128) as u64).map_err(|reason| ManifestError::new(file, field, reason))
        }
    }
}

// ------------------------------------------------------------ destinations

/// What to do with a deployment submitted while the destination is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueuePolicy {
    /// Wait in FIFO order.
    #[default]
    Queue,
    /// A queued deployment is superseded by a newer one of the same app.
    Coalesce,
    /// Refuse at once.
    Reject,
}

/// A destination: where deployments go, and how they are serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub name: String,
    /// `process` (supervised local processes on every selected node),
    /// `docker` (containers on every selected node's Docker Engine) or
    /// `command` (the manifest's `steps:`, each run once on one selected
    /// node, handed to another if that node is lost).
    #[serde(default = "default_adapter")]
    pub adapter: String,
    /// Worker nodes whose labels include all of these run the deployment.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub queue: QueuePolicy,
    /// How long work that has no live node to run on waits for one (a
    /// node that reboots) before the deployment gives up on it: `node_wait`
    /// in the file (`30s`, `2m`), milliseconds here. Records written before
    /// it existed read as the default.
    #[serde(rename = "node_wait", default = "default_node_wait_ms", with = "node_wait_text")]
    pub node_wait_ms: u64,
}

fn default_adapter() -> String {
    "process".into()
}

/// `node_wait` of a destination that names none.
pub const DEFAULT_NODE_WAIT_MS: u64 = 2 * 60 * 1000;
/// The longest `node_wait` accepted.
pub const MAX_NODE_WAIT_MS: u64 = 24 * 60 * 60 * 1000;

pub fn default_node_wait_ms() -> u64 {
    DEFAULT_NODE_WAIT_MS
}

/// `node_wait` as text (`2m`), read from text or a number of milliseconds
/// (`#[serde(with = "fleet_core::manifest::node_wait_text")]`).
pub mod node_wait_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(std::time::Duration::from_millis(*ms)).to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Ms(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Ms(ms) => Ok(ms),
            Raw::Text(t) => super::parse_duration(&t).map(|d| d.as_millis().min(u64::MAX as u128) as u64).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationsFile {
    destinations: Vec<Destination>,
}

pub const ADAPTERS: &[&str] = &["process", "command", "docker"];

/// Parse and validate a destinations file.
pub fn parse_destinations(file: &str, text: &str) -> Result<Vec<Destination>, ManifestError> {
    let f: DestinationsFile = parse_yaml(file, text)?;
    let mut seen = std::collections::BTreeSet::new();
    for (i, d) in f.destinations.iter().enumerate() {
        let at = |f: &str| format!("destinations[{i}].{f}");
        validate_destination(d).map_err(|(field, reason)| ManifestError::new(file, at(field), reason))?;
        if !seen.insert(d.name.clone()) {
            return Err(ManifestError::new(file, at("name"), format!("`{}` is listed twice", d.name)));
        }
    }
    Ok(f.destinations)
}

/// Check one destination; the error is (field, reason).
pub fn validate_destination(d: &Destination) -> Result<(), (&'static str, String)> {
    validate_name("destination", &d.name).map_err(|e| ("name", e.to_string()))?;
    if !ADAPTERS.contains(&d.adapter.as_str()) {
        return Err(("adapter", format!("`{}` is not an adapter this build has; use one of {ADAPTERS:?}", d.adapter)));
    }
    for (k, v) in &d.selector {
        validate_label(k, v).map_err(|r| ("selector", r))?;
    }
    if d.node_wait_ms == 0 || d.node_wait_ms > MAX_NODE_WAIT_MS {
        let given = humantime::format_duration(std::time::Duration::from_millis(d.node_wait_ms));
        return Err(("node_wait", format!("`{given}` is out of range; use more than 0 and at most 24h (default 2m)")));
    }
    Ok(())
}

/// Labels: `key=value`, both short printable words.
pub fn validate_label(k: &str, v: &str) -> Result<(), String> {
    let ok = |s: &str| !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if !ok(k) || !(v.is_empty() || ok(v)) {
        return Err(format!("label `{k}={v}` is not valid; use letters, digits, `-`, `_`, `.`, `/` (at most 63 each)"));
    }
    Ok(())
}

/// Do `labels` satisfy `selector`?
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The largest manifest or destinations file accepted, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// The deepest nesting accepted (flow `[`/`{` plus indented blocks). Real
/// manifests nest four or five levels.
pub const MAX_NESTING: usize = 64;

/// Bound size and nesting before the YAML parser sees the text: its time
/// grows faster than linearly with depth, and the coordinator parses what
/// any authenticated client sends. One pass over the bytes, no allocation
/// beyond a stack of at most [`MAX_NESTING`] indents.
pub fn check_bounds(text: &str) -> Result<(), String> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(format!(
            "the document is {} bytes; at most {MAX_DOCUMENT_BYTES} are accepted. Split it, or move large values into files the steps read",
            text.len()
        ));
    }
    let too_deep = |line: usize| {
        Err(format!("line {line}: nested more than {MAX_NESTING} levels deep; a manifest needs a handful. Flatten the structure"))
    };
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let content = line.trim_start_matches([' ', '\t']);
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        // Block nesting: the stack of indents seen on the way in. List items
        // (`- `) open a level too, at the indent of their content.
        if flow == 0 {
            let mut indent = line.len() - content.len();
            let mut rest = content;
            loop {
                while indents.last().is_some_and(|&top| top > indent) {
                    indents.pop();
                }
                if indents.last() != Some(&indent) {
                    indents.push(indent);
                }
                if indents.len() > MAX_NESTING {
                    return too_deep(n + 1);
                }
                match rest.strip_prefix("- ").or_else(|| (rest == "-").then_some("")) {
                    Some(after) => {
                        let skipped = rest.len() - after.trim_start().len();
                        indent += skipped;
                        rest = after.trim_start();
                        if rest.is_empty() {
                            break;
                        }
                    }
                    None => break,
                }
            }
        }
        // Flow nesting, outside quoted strings and comments.
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in content.chars() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '\'' | '"' => quote = Some(c),
                    '#' if prev == ' ' || prev == '\t' => break,
                    '[' | '{' => {
                        flow += 1;
                        if flow + indents.len() > MAX_NESTING {
                            return too_deep(n + 1);
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = c;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn bounds_refuse_deep_or_huge_documents_and_accept_real_ones() {
        let deep_flow = format!("app: {}x{}", "[".repeat(100_000), "]".repeat(100_000));
        let deep_block: String = (0..200).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        let deep_list: String = (0..200).map(|i| format!("{}- \n", " ".repeat(i * 2))).collect();
        let huge = format!("app: web\nenv: {{ A: \"{}\" }}\n", "x".repeat(MAX_DOCUMENT_BYTES));
        let quoted = format!("app: web\nrelease: \"{}\"\n", "[".repeat(1000));
        let commented = format!("app: web # {}\n", "{".repeat(1000));
        let cases: [(&str, &str, bool); 7] = [
            ("deep flow nesting", &deep_flow, false),
            ("deep block nesting", &deep_block, false),
            ("deep list nesting", &deep_list, false),
            ("over the size bound", &huge, false),
            ("brackets inside quotes", &quoted, true),
            ("brackets inside a comment", &commented, true),
            ("a real manifest", "app: web\nrelease: v1\nrun: [\"x\", \"{port}\"]\nenv: { A: b }\nhealth:\n  http: /healthz\nsteps:\n  - name: a\n    run: [\"true\"]\n", true),
        ];
        for (what, text, ok) in cases {
            assert_eq!(check_bounds(text).is_ok(), ok, "{what}: {:?}", check_bounds(text));
        }
        // Through the parser: refused with the document named, before YAML.
        let e = parse_manifest("fleet.yaml", &deep_flow, &Overrides::default()).unwrap_err();
        assert_eq!((e.file.as_str(), e.field.as_str()), ("fleet.yaml", "."));
        assert!(e.reason.contains("nested more than"), "{}", e.reason);
        let e = parse_destinations("d.yaml", &deep_block).unwrap_err();
        assert!(e.reason.contains("nested more than"), "{}", e.reason);
    }

    use super::*;

    const GOOD: &str = r#"
app: web
release: v1
destination: staging
run: ["fleet-demo-app", "--release", "{release}"]
env: { GREETING: hello }
health:
  http: /healthz
  interval: 200ms
  timeout: 1s
  healthy_threshold: 2
  deadline: 20s
"#;

    const CMD: &str = "app: infra\nrelease: v3\ndestination: net\nsteps:\n  - { name: one, run: r1, undo: u1 }\n  - { name: two, run: r2, timeout: 5s }\n";

    #[test]
    fn stacks_and_command_manifests() {
        let s =
            parse_manifest("fleet.yaml", &GOOD.replace("destination: staging", "destinations: [db, web]"), &Overrides::default()).unwrap();
        assert_eq!((s.destination.as_str(), s.destinations()), ("db", &["db".to_string(), "web".to_string()][..]));
        assert_eq!(s.kind(), Kind::Process);
        let one = parse_manifest("fleet.yaml", GOOD, &Overrides::default()).unwrap();
        assert_eq!(one.destinations(), &["staging".to_string()][..]);
        assert!(one.stack.is_empty());
        let o = Overrides { destinations: vec!["x".into(), "y".into()], ..Overrides::default() };
        assert_eq!(parse_manifest("fleet.yaml", GOOD, &o).unwrap().stack, ["x", "y"]);
        let c = parse_manifest("fleet.yaml", CMD, &Overrides::default()).unwrap();
        assert_eq!(c.kind(), Kind::Command);
        assert!(c.health.is_none() && c.run.is_empty());
        assert_eq!(c.steps[1].timeout_ms, 5000);
        assert_eq!(c.steps[0].timeout_ms, c.step_timeout_ms);
        assert_eq!(c.steps[0].undo.as_deref(), Some("u1"));
    }

    const DOCKER: &str = "app: web\nrelease: v1\ndestination: boxes\nimage: \"reg.example/web:{release}\"\ncontainer_port: 8080\nhealth: { http: /healthz, deadline: 5s }\n";

    #[test]
    fn docker_manifests() {
        let s = parse_manifest("fleet.yaml", DOCKER, &Overrides::default()).unwrap();
        assert_eq!(s.kind(), Kind::Docker);
        assert_eq!(s.kind().adapter(), "docker");
        let c = s.container.as_ref().unwrap();
        assert_eq!(
            (c.image.as_str(), c.container_port, c.pull, c.command.as_ref()),
            ("reg.example/web:{release}", 8080, PullPolicy::Missing, None)
        );
        let full = DOCKER.to_string()
            + "command: [\"/bin/serve\", \"--port\", \"8080\"]\npull: never\nvolumes: [{ host_path: /srv/data, container_path: /data, read_only: true }]\nlimits: { memory_bytes: 67108864, nano_cpus: 500000000 }\nenv: { A: b }\n";
        let s = parse_manifest("fleet.yaml", &full, &Overrides::default()).unwrap();
        // The spec a deployment records round-trips through JSON.
        assert_eq!(serde_json::from_str::<Spec>(&serde_json::to_string(&s).unwrap()).unwrap(), s);
        let c = s.container.unwrap();
        assert_eq!(c.pull, PullPolicy::Never);
        assert_eq!(c.volumes, [VolumeSpec { host_path: "/srv/data".into(), container_path: "/data".into(), read_only: true }]);
        assert_eq!(c.limits, LimitsSpec { memory_bytes: Some(64 << 20), nano_cpus: Some(500_000_000) });
        assert_eq!(c.command.unwrap().len(), 3);
        let own = parse_manifest("fleet.yaml", &DOCKER.replace("http: /healthz", "image: true"), &Overrides::default()).unwrap();
        assert_eq!(own.health.unwrap().probe, Probe::Image);
    }

    /// (manifest, field the error must name, words its reason must contain)
    #[test]
    fn bad_docker_manifests_name_the_field() {
        let cases: Vec<(String, &str, &str)> = vec![
            (DOCKER.to_string() + "run: [srv]\n", "image", "not both"),
            (DOCKER.to_string() + "steps: [{ name: x, run: y }]\n", "image", "not both"),
            (DOCKER.replace("container_port: 8080\n", ""), "container_port", "missing"),
            (DOCKER.replace("container_port: 8080", "container_port: 0"), "container_port", "not a port"),
            (DOCKER.replace("container_port: 8080", "container_port: 70000"), "container_port", "u16"),
            (DOCKER.replace("reg.example/web:{release}", "reg/{app}:x"), "image", "only `{release}`"),
            (DOCKER.replace("reg.example/web:{release}", " "), "image", "empty"),
            (DOCKER.to_string() + "pull: sometimes\n", "pull", "unknown variant"),
            (DOCKER.to_string() + "command: []\n", "command", "empty"),
            (DOCKER.to_string() + "volumes: [{ host_path: data, container_path: /d }]\n", "volumes[0].host_path", "absolute"),
            (DOCKER.to_string() + "volumes: [{ host_path: /a:b, container_path: /d }]\n", "volumes[0].host_path", "`:`"),
            (DOCKER.to_string() + "limits: { memory_bytes: 1000 }\n", "limits.memory_bytes", "minimum"),
            (DOCKER.to_string() + "limits: { nano_cpus: 0 }\n", "limits.nano_cpus", "positive"),
            (DOCKER.to_string() + "limits: { cpus: 1 }\n", "limits.cpus", "unknown field"),
            (DOCKER.replace("http: /healthz", "http: /healthz, image: true"), "health", "exactly one"),
            (DOCKER.replace("health: { http: /healthz, deadline: 5s }\n", ""), "health", "missing"),
            (GOOD.to_string() + "container_port: 80\n", "container_port", "only a docker manifest"),
            (GOOD.to_string() + "pull: never\n", "pull", "only a docker manifest"),
            (GOOD.replace("http: /healthz", "image: true"), "health.image", "only a docker manifest"),
        ];
        for (text, field, words) in cases {
            let e = parse_manifest("fleet.yaml", &text, &Overrides::default()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(words), "`{}` should contain `{words}`", e.reason);
        }
        let d = parse_destinations("d.yaml", "destinations:\n  - name: boxes\n    adapter: docker\n").unwrap();
        assert_eq!(d[0].adapter, "docker");
    }

    #[test]
    fn a_good_manifest_gets_defaults() {
        let s = parse_manifest("fleet.yaml", GOOD, &Overrides::default()).unwrap();
        assert_eq!(s.app, "web");
        assert_eq!(s.release, "v1");
        assert_eq!(s.destination, "staging");
        let h = s.health.as_ref().unwrap();
        assert_eq!(h.interval_ms, 200);
        assert_eq!(h.healthy_threshold, 2);
        assert_eq!(h.probe, Probe::Http { path: "/healthz".into() });
        assert_eq!(s.max_unavailable, 1);
        assert_eq!(s.retry.max_attempts, 3);
        assert_eq!(s.timeout_ms, DEFAULT_DEPLOY_TIMEOUT.as_millis() as u64);
    }

    #[test]
    fn overrides_win() {
        let o = Overrides { release: Some("v9".into()), destinations: vec!["prod".into()], timeout_ms: Some(1000) };
        let s = parse_manifest("fleet.yaml", GOOD, &o).unwrap();
        assert_eq!((s.release.as_str(), s.destination.as_str(), s.timeout_ms), ("v9", "prod", 1000));
    }

    /// (edit applied to GOOD, field the error must name, words its reason must contain)
    #[test]
    fn bad_manifests_name_file_field_and_reason() {
        let cases: Vec<(String, &str, &str)> = vec![
            (GOOD.replace("env:", "colour: red\nenv:"), "colour", "unknown field `colour`"),
            (GOOD.replace("  interval: 200ms", "  intervall: 200ms"), "health.intervall", "unknown field `intervall`"),
            (GOOD.replace("release: v1\n", ""), "release", "missing"),
            (GOOD.replace("200ms", "-1s"), "health.interval", "negative"),
            (GOOD.replace("200ms", "soon"), "health.interval", "not a duration"),
            (GOOD.replace("20s", "100ms"), "health.deadline", "shorter"),
            (GOOD.replace("  http: /healthz\n", ""), "health", "exactly one"),
            (GOOD.replace("  http: /healthz\n", "  http: /x\n  tcp: true\n"), "health", "exactly one"),
            (GOOD.replace("app: web", "app: Web App"), "app", "character"),
            (GOOD.replace("destination: staging\n", ""), "destination", "missing"),
            (GOOD.replace("healthy_threshold: 2", "healthy_threshold: -2"), "health.healthy_threshold", "expected u32"),
            (GOOD.replace("GREETING", "1BAD"), "env.1BAD", "variable name"),
            (GOOD.replace("destination: staging", "destinations: [a, b, a]"), "destinations", "listed twice"),
            (GOOD.replace("destination: staging", "destinations: [a, \"B C\"]"), "destinations", "character"),
            (GOOD.replace("health:", "steps: [{ name: x, run: y }]\nhealth:"), "steps", "not both"),
            (
                GOOD.replace("release: v1", "release: v1\nsteps: [{ name: x, run: y }]")
                    .replace("run: [\"fleet-demo-app\", \"--release\", \"{release}\"]\n", ""),
                "steps",
                "not both",
            ),
            (CMD.replace("undo: u1", "undo: u1, irreversible: true"), "steps[0].undo", "irreversible"),
            (CMD.replace("name: two", "name: one"), "steps[1].name", "unique"),
            (CMD.replace("run: r2", "run: \" \""), "steps[1].run", "empty"),
            (CMD.replace("timeout: 5s", "timeout: -5s"), "steps[1].timeout", "negative"),
            (CMD.replace("timeout: 5s", "timeout: 5s, colour: x"), "steps[1].colour", "unknown field"),
            ("".into(), ".", "empty"),
            ("app: [".into(), "app", "line"),
        ];
        for (text, field, words) in cases {
            let e = parse_manifest("fleet.yaml", &text, &Overrides::default()).unwrap_err();
            assert_eq!(e.file, "fleet.yaml");
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(words), "`{}` should contain `{words}`", e.reason);
        }
    }

    #[test]
    fn destinations_file() {
        let text = "destinations:\n  - name: staging\n    selector: { env: staging }\n  - name: prod\n    queue: reject\n";
        let d = parse_destinations("d.yaml", text).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].queue, QueuePolicy::Reject);
        assert_eq!(d[0].adapter, "process");
        let dup = "destinations:\n  - name: a\n  - name: a\n";
        assert_eq!(parse_destinations("d.yaml", dup).unwrap_err().field, "destinations[1].name");
        let bad = "destinations:\n  - name: a\n    adapter: warp\n";
        assert_eq!(parse_destinations("d.yaml", bad).unwrap_err().field, "destinations[0].adapter");
        let unknown = "destinations:\n  - name: a\n    colour: red\n";
        assert!(parse_destinations("d.yaml", unknown).unwrap_err().reason.contains("unknown field"));
    }

    #[test]
    fn destination_node_wait() {
        // (node_wait line, Ok(ms) or Err(field, reason contains))
        type Want<'a> = Result<u64, (&'a str, &'a str)>;
        let cases: [(&str, Want); 6] = [
            ("", Ok(DEFAULT_NODE_WAIT_MS)),
            ("    node_wait: 30s\n", Ok(30_000)),
            ("    node_wait: 24h\n", Ok(MAX_NODE_WAIT_MS)),
            ("    node_wait: 0s\n", Err(("destinations[0].node_wait", "more than 0 and at most 24h"))),
            ("    node_wait: 25h\n", Err(("destinations[0].node_wait", "out of range"))),
            ("    node_wait: soon\n", Err(("", "`soon` is not a duration"))),
        ];
        for (line, want) in cases {
            let text = format!("destinations:\n  - name: ops\n    adapter: command\n{line}");
            match (parse_destinations("d.yaml", &text), want) {
                (Ok(d), Ok(ms)) => assert_eq!(d[0].node_wait_ms, ms, "{line}"),
                (Err(e), Err((field, reason))) => {
                    assert!(e.field.contains(field) && e.reason.contains(reason), "{line}: {e:?}");
                }
                (got, want) => panic!("{line}: got {got:?}, want {want:?}"),
            }
        }
        // Stored as text; records written before node_wait existed still load.
        let d = parse_destinations("d.yaml", "destinations:\n  - name: ops\n    node_wait: 90s\n").unwrap();
        let json = serde_json::to_string(&d[0]).unwrap();
        assert!(json.contains("\"node_wait\":\"1m 30s\""), "{json}");
        assert_eq!(serde_json::from_str::<Destination>(&json).unwrap(), d[0]);
        let old: Destination = serde_json::from_str(r#"{"name":"ops","adapter":"command","selector":{},"queue":"queue"}"#).unwrap();
        assert_eq!(old.node_wait_ms, DEFAULT_NODE_WAIT_MS);
    }

    #[test]
    fn selector_matching() {
        let sel: BTreeMap<_, _> = [("env".to_string(), "staging".to_string())].into();
        let yes: BTreeMap<_, _> = [("env".to_string(), "staging".to_string()), ("zone".into(), "a".into())].into();
        let no: BTreeMap<_, _> = [("env".to_string(), "prod".to_string())].into();
        assert!(selects(&sel, &yes));
        assert!(!selects(&sel, &no));
        assert!(selects(&BTreeMap::new(), &no));
    }

    #[test]
    fn backoff_grows_by_the_multiplier() {
        let p = RetryPolicy { max_attempts: 5, backoff_ms: 100, multiplier_pct: 200 };
        assert_eq!([2, 3, 4].map(|a| p.backoff_before(a)), [100, 200, 400]);
        let jittered: std::collections::BTreeSet<u64> = (0..50).map(|seed| p.backoff_with_jitter(3, seed)).collect();
        assert!(jittered.iter().all(|b| (150..=200).contains(b)), "{jittered:?}");
        assert!(jittered.len() > 10, "jitter spreads retries: {jittered:?}");
    }
}
