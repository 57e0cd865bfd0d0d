//! What a container should look like: Fleet's labels, deterministic names, and the container spec
//! taken from a manifest, turned into the engine's create body.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;

use bollard::models::{ContainerCreateBody, HostConfig, PortBinding, RestartPolicy as EngineRestart, RestartPolicyNameEnum};
use serde::{Deserialize, Serialize};

use crate::error::DockerError;

/// Label keys Fleet puts on every container it creates.
pub const LABEL_APP: &str = "fleet.app";
pub const LABEL_RELEASE: &str = "fleet.release";
pub const LABEL_DESTINATION: &str = "fleet.destination";
pub const LABEL_DEPLOYMENT: &str = "fleet.deployment";
/// The fencing token of the step that created the container.
pub const LABEL_TOKEN: &str = "fleet.token";
/// The Fleet node that created the container (several nodes may share one engine in development).
pub const LABEL_NODE: &str = "fleet.node";
/// `fleet.managed=true` marks every container Fleet owns; nothing else carries it.
pub const LABEL_MANAGED: &str = "fleet.managed";
pub const MANAGED_VALUE: &str = "true";
/// Label keys starting with this prefix are Fleet's; a manifest may not set them.
pub const LABEL_PREFIX: &str = "fleet.";
/// The placeholder in `image` replaced by the release being deployed.
pub const RELEASE_PLACEHOLDER: &str = "{release}";

/// Who a container belongs to: the values of Fleet's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FleetLabels {
    pub app: String,
    pub release: String,
    pub destination: String,
    pub deployment: String,
    pub token: u64,
    /// The node that owns the container; empty: not recorded (no `fleet.node` label, and the
    /// name does not carry it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
}

impl FleetLabels {
    /// All of Fleet's labels, `fleet.managed=true` included.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            (LABEL_APP.to_string(), self.app.clone()),
            (LABEL_RELEASE.to_string(), self.release.clone()),
            (LABEL_DESTINATION.to_string(), self.destination.clone()),
            (LABEL_DEPLOYMENT.to_string(), self.deployment.clone()),
            (LABEL_TOKEN.to_string(), self.token.to_string()),
            (LABEL_MANAGED.to_string(), MANAGED_VALUE.to_string()),
        ]);
        if !self.node.is_empty() {
            map.insert(LABEL_NODE.to_string(), self.node.clone());
        }
        map
    }

    /// Reads Fleet's labels back from a container; `None` unless it is a complete Fleet container.
    pub fn from_map(labels: &HashMap<String, String>) -> Option<FleetLabels> {
        if labels.get(LABEL_MANAGED).map(String::as_str) != Some(MANAGED_VALUE) {
            return None;
        }
        Some(FleetLabels {
            app: labels.get(LABEL_APP)?.clone(),
            release: labels.get(LABEL_RELEASE)?.clone(),
            destination: labels.get(LABEL_DESTINATION)?.clone(),
            deployment: labels.get(LABEL_DEPLOYMENT)?.clone(),
            token: labels.get(LABEL_TOKEN)?.parse().ok()?,
            node: labels.get(LABEL_NODE).cloned().unwrap_or_default(),
        })
    }

    /// The container's name, a pure function of (destination, app, token, release): a retried
    /// create finds its own container under the same name and adopts it.
    ///
    /// Shape: `fleet-<destination>-<app>-t<token>-<release>-<hash>`, each part reduced to the
    /// characters Docker allows and shortened; the hash of the exact values keeps two tuples that
    /// reduce to the same text apart.
    ///
    /// With a `node`, it comes after the app (`fleet-<destination>-<app>-<node>-t<token>-...`), so
    /// that nodes sharing one engine never share a container.
    pub fn container_name(&self) -> String {
        if !self.node.is_empty() {
            let exact = format!("{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}", self.destination, self.app, self.node, self.token, self.release);
            return format!(
                "fleet-{}-{}-{}-t{}-{}-{:08x}",
                name_part(&self.destination, 40),
                name_part(&self.app, 40),
                name_part(&self.node, 40),
                self.token,
                name_part(&self.release, 40),
                fnv1a32(exact.as_bytes())
            );
        }
        let exact = format!("{}\u{0}{}\u{0}{}\u{0}{}", self.destination, self.app, self.token, self.release);
        format!(
            "fleet-{}-{}-t{}-{}-{:08x}",
            name_part(&self.destination, 40),
            name_part(&self.app, 40),
            self.token,
            name_part(&self.release, 40),
            fnv1a32(exact.as_bytes())
        )
    }
}

/// Keeps `[A-Za-z0-9_.-]`, replaces anything else with `_`, cuts at `max` characters.
fn name_part(s: &str, max: usize) -> String {
    let out: String =
        s.chars().take(max).map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' }).collect();
    if out.is_empty() {
        "_".to_string()
    } else {
        out
    }
}

/// FNV-1a: stable across Rust versions and machines, unlike `DefaultHasher`.
fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// When to pull the image from its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Pull only when the node does not have the image.
    #[default]
    Missing,
    /// Always pull (a moving tag such as `latest`).
    Always,
    /// Never pull: the image must already be on the node.
    Never,
}

impl FromStr for PullPolicy {
    type Err = DockerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            other => Err(DockerError::InvalidSpec(format!("pull: `{other}` is not one of missing, always, never"))),
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::Missing => "missing",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

fn loopback() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// A container port published on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Host address the port is published on; loopback unless the manifest says otherwise.
    #[serde(default = "loopback")]
    pub host_ip: IpAddr,
    /// `None`: the engine picks a free port (read it back with [`crate::ContainerInfo::host_port`]).
    #[serde(default)]
    pub host_port: Option<u16>,
}

impl PortSpec {
    /// `container_port` on an engine-chosen port of 127.0.0.1.
    pub fn loopback(container_port: u16) -> PortSpec {
        PortSpec { container_port, protocol: Protocol::Tcp, host_ip: loopback(), host_port: None }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.container_port, self.protocol.as_str())
    }
}

/// A bind mount of a host path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindMount {
    pub host_path: PathBuf,
    pub container_path: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Hard memory limit in bytes (the engine refuses less than 6 MiB).
    #[serde(default)]
    pub memory_bytes: Option<i64>,
    /// CPU quota in units of 10^-9 CPUs (1.5 CPUs = 1_500_000_000).
    #[serde(default)]
    pub nano_cpus: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Fleet restarts nothing behind the engine's back by default: a crash shows in health.
    #[default]
    No,
    Always,
    UnlessStopped,
    OnFailure {
        #[serde(default)]
        max_retries: Option<u32>,
    },
}

/// A container as a manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// Image reference; `{release}` is replaced by the release being deployed.
    pub image: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Replaces the image's CMD when set.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub volumes: Vec<BindMount>,
    #[serde(default)]
    pub limits: Limits,
    /// Extra labels; keys starting with `fleet.` are reserved.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub pull: PullPolicy,
}

/// The engine's minimum memory limit.
const MIN_MEMORY: i64 = 6 * 1024 * 1024;

impl ContainerSpec {
    /// A spec with just an image; fill in the rest with struct update syntax.
    pub fn new(image: impl Into<String>) -> ContainerSpec {
        ContainerSpec { image: image.into(), ..ContainerSpec::default() }
    }

    /// The image reference for `release` (`{release}` substituted), checked.
    pub fn image_for(&self, release: &str) -> Result<String, DockerError> {
        if self.image.trim().is_empty() {
            return Err(DockerError::InvalidSpec("`image` is empty: name the image to run, e.g. `registry.example/web:{release}`".into()));
        }
        if self.image.contains(RELEASE_PLACEHOLDER) && !is_valid_tag(release) {
            return Err(DockerError::InvalidSpec(format!(
                "release `{release}` cannot be an image tag (`{}`): a tag is 1 to 128 letters, digits, `_`, `.` or `-`, \
                 not starting with `.` or `-`",
                self.image
            )));
        }
        let image = self.image.replace(RELEASE_PLACEHOLDER, release);
        if image.contains('{') || image.contains('}') || image.chars().any(char::is_whitespace) {
            return Err(DockerError::InvalidSpec(format!(
                "image `{}`: only `{RELEASE_PLACEHOLDER}` may be substituted, and an image reference has no spaces",
                self.image
            )));
        }
        Ok(image)
    }

    /// Checks everything the engine would otherwise refuse with a less helpful message.
    pub fn validate(&self, release: &str) -> Result<(), DockerError> {
        self.image_for(release)?;
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') {
                return Err(DockerError::InvalidSpec(format!("env: `{key}` is not a variable name (no `=`, not empty)")));
            }
        }
        if let Some(cmd) = &self.command {
            if cmd.is_empty() {
                return Err(DockerError::InvalidSpec("command: an empty list; leave `command` out to run the image's own CMD".into()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.ports {
            if p.container_port == 0 {
                return Err(DockerError::InvalidSpec("ports: container_port 0 is not a port".into()));
            }
            if !seen.insert(p.key()) {
                return Err(DockerError::InvalidSpec(format!("ports: {} is listed twice", p.key())));
            }
        }
        for v in &self.volumes {
            if !v.host_path.is_absolute() {
                return Err(DockerError::InvalidSpec(format!("volumes: host_path `{}` must be an absolute path", v.host_path.display())));
            }
            if !v.container_path.starts_with('/') {
                return Err(DockerError::InvalidSpec(format!("volumes: container_path `{}` must be an absolute path", v.container_path)));
            }
            if v.host_path.to_string_lossy().contains(':') || v.container_path.contains(':') {
                return Err(DockerError::InvalidSpec("volumes: paths may not contain `:`".into()));
            }
        }
        if let Some(m) = self.limits.memory_bytes {
            if m < MIN_MEMORY {
                return Err(DockerError::InvalidSpec(format!(
                    "limits: memory_bytes {m} is below the engine's minimum of {MIN_MEMORY} (6 MiB)"
                )));
            }
        }
        if let Some(c) = self.limits.nano_cpus {
            if c <= 0 {
                return Err(DockerError::InvalidSpec(format!("limits: nano_cpus {c} must be positive (1 CPU = 1000000000)")));
            }
        }
        if let Some(k) = self.labels.keys().find(|k| k.starts_with(LABEL_PREFIX)) {
            return Err(DockerError::InvalidSpec(format!("labels: `{k}` is reserved for Fleet (keys starting with `{LABEL_PREFIX}`)")));
        }
        Ok(())
    }

    /// The engine's create body for this spec, carrying Fleet's labels.
    pub fn to_create_body(&self, fleet: &FleetLabels) -> Result<ContainerCreateBody, DockerError> {
        self.validate(&fleet.release)?;
        let image = self.image_for(&fleet.release)?;
        let mut labels: HashMap<String, String> = self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.extend(fleet.to_map());
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for p in &self.ports {
            let binding = PortBinding {
                host_ip: Some(p.host_ip.to_string()),
                // An empty host port asks the engine to choose one.
                host_port: Some(p.host_port.map(|h| h.to_string()).unwrap_or_default()),
            };
            port_bindings.insert(p.key(), Some(vec![binding]));
        }
        let binds: Vec<String> = self
            .volumes
            .iter()
            .map(|v| format!("{}:{}{}", v.host_path.display(), v.container_path, if v.read_only { ":ro" } else { "" }))
            .collect();
        let restart = match self.restart {
            RestartPolicy::No => EngineRestart { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None },
            RestartPolicy::Always => EngineRestart { name: Some(RestartPolicyNameEnum::ALWAYS), maximum_retry_count: None },
            RestartPolicy::UnlessStopped => EngineRestart { name: Some(RestartPolicyNameEnum::UNLESS_STOPPED), maximum_retry_count: None },
            RestartPolicy::OnFailure { max_retries } => {
                EngineRestart { name: Some(RestartPolicyNameEnum::ON_FAILURE), maximum_retry_count: max_retries.map(i64::from) }
            }
        };
        Ok(ContainerCreateBody {
            image: Some(image),
            env: (!env.is_empty()).then_some(env),
            cmd: self.command.clone(),
            labels: Some(labels),
            exposed_ports: (!self.ports.is_empty()).then(|| self.ports.iter().map(PortSpec::key).collect()),
            host_config: Some(HostConfig {
                port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
                binds: (!binds.is_empty()).then_some(binds),
                memory: self.limits.memory_bytes,
                nano_cpus: self.limits.nano_cpus,
                restart_policy: Some(restart),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        })
    }
}

/// Docker's tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {}
        _ => return false,
    }
    tag.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Splits `repo[:tag]` / `repo@digest` into what the pull API wants (`fromImage`, `tag`).
/// A reference without tag or digest means `latest`, as with `docker pull`.
pub(crate) fn split_reference(image: &str) -> (String, String) {
    if let Some((repo, digest)) = image.split_once('@') {
        return (repo.to_string(), digest.to_string());
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (image[..last_slash + i].to_string(), image[last_slash + i + 1..].to_string()),
        None => (image.to_string(), "latest".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> FleetLabels {
        FleetLabels {
            app: "web".into(),
            release: "v1".into(),
            destination: "prod".into(),
            deployment: "d-1".into(),
            token: 7,
            node: String::new(),
        }
    }

    #[test]
    fn labels_round_trip_and_require_managed() {
        let l = labels();
        let map = l.to_map();
        assert_eq!(map[LABEL_MANAGED], "true");
        assert_eq!(map[LABEL_TOKEN], "7");
        assert_eq!(FleetLabels::from_map(&map), Some(l));
        let mut unmanaged = map.clone();
        unmanaged.remove(LABEL_MANAGED);
        assert_eq!(FleetLabels::from_map(&unmanaged), None);
        let mut bad_token = map;
        bad_token.insert(LABEL_TOKEN.into(), "x".into());
        assert_eq!(FleetLabels::from_map(&bad_token), None);
    }

    #[test]
    fn names_are_deterministic_valid_and_distinct() {
        let a = labels();
        assert_eq!(a.container_name(), a.clone().container_name());
        assert!(a.container_name().starts_with("fleet-prod-web-t7-v1-"));
        // A different deployment id under the same token and release is the same container.
        let same = FleetLabels { deployment: "d-2".into(), ..a.clone() };
        assert_eq!(a.container_name(), same.container_name());
        let other_token = FleetLabels { token: 8, ..a.clone() };
        assert_ne!(a.container_name(), other_token.container_name());
        // Two nodes on one engine get two containers; the node is a label too.
        let n1 = FleetLabels { node: "node-1".into(), ..a.clone() };
        let n2 = FleetLabels { node: "node-2".into(), ..a.clone() };
        assert!(n1.container_name().starts_with("fleet-prod-web-node-1-t7-v1-"), "{}", n1.container_name());
        assert_ne!(n1.container_name(), n2.container_name());
        assert_eq!(FleetLabels::from_map(&n1.to_map()), Some(n1.clone()));
        assert_eq!(n1.to_map()[LABEL_NODE], "node-1");
        assert!(!a.to_map().contains_key(LABEL_NODE));
        // Two tuples that reduce to the same text stay apart.
        let x = FleetLabels { destination: "a/b".into(), ..a.clone() };
        let y = FleetLabels { destination: "a_b".into(), ..a.clone() };
        assert_ne!(x.container_name(), y.container_name());
        let weird = FleetLabels { destination: "".into(), app: "ünï cödé".into(), release: "x".repeat(300), ..a };
        let name = weird.container_name();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')), "{name}");
        assert!(name.len() < 200, "{name}");
    }

    #[test]
    fn image_substitution_and_validation() {
        let spec = ContainerSpec::new("registry.example:5000/team/web:{release}");
        assert_eq!(spec.image_for("v2").unwrap(), "registry.example:5000/team/web:v2");
        assert!(matches!(spec.image_for("-bad"), Err(DockerError::InvalidSpec(_))));
        assert!(matches!(spec.image_for("a b"), Err(DockerError::InvalidSpec(_))));
        assert!(matches!(ContainerSpec::new("web:{version}").image_for("v1"), Err(DockerError::InvalidSpec(_))));
        assert!(matches!(ContainerSpec::new(" ").image_for("v1"), Err(DockerError::InvalidSpec(_))));
        let e = ContainerSpec { labels: BTreeMap::from([("fleet.app".into(), "x".into())]), ..ContainerSpec::new("web:1") }
            .validate("v1")
            .unwrap_err();
        assert!(e.to_string().contains("fleet.app"), "{e}");
        let e = ContainerSpec { limits: Limits { memory_bytes: Some(1024), nano_cpus: None }, ..ContainerSpec::new("web:1") }
            .validate("v1")
            .unwrap_err();
        assert!(e.to_string().contains("memory_bytes"), "{e}");
        let e = ContainerSpec {
            volumes: vec![BindMount { host_path: "data".into(), container_path: "/data".into(), read_only: false }],
            ..ContainerSpec::new("web:1")
        }
        .validate("v1")
        .unwrap_err();
        assert!(e.to_string().contains("host_path"), "{e}");
        assert_eq!(e.class(), fleet_core::deploy::ErrorClass::Invalid);
    }

    #[test]
    fn create_body_carries_everything() {
        let spec = ContainerSpec {
            env: BTreeMap::from([("A".into(), "1".into())]),
            command: Some(vec!["serve".into()]),
            ports: vec![PortSpec::loopback(8080), PortSpec { host_port: Some(9000), protocol: Protocol::Udp, ..PortSpec::loopback(53) }],
            volumes: vec![BindMount { host_path: "/srv/data".into(), container_path: "/data".into(), read_only: true }],
            limits: Limits { memory_bytes: Some(64 << 20), nano_cpus: Some(500_000_000) },
            labels: BTreeMap::from([("team".into(), "blue".into())]),
            restart: RestartPolicy::OnFailure { max_retries: Some(3) },
            ..ContainerSpec::new("web:{release}")
        };
        let body = spec.to_create_body(&labels()).unwrap();
        assert_eq!(body.image.as_deref(), Some("web:v1"));
        assert_eq!(body.env, Some(vec!["A=1".to_string()]));
        let l = body.labels.unwrap();
        assert_eq!(l["team"], "blue");
        assert_eq!(l[LABEL_APP], "web");
        let hc = body.host_config.unwrap();
        let pb = hc.port_bindings.unwrap();
        assert_eq!(pb["8080/tcp"], Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]));
        assert_eq!(pb["53/udp"].as_ref().unwrap()[0].host_port.as_deref(), Some("9000"));
        assert_eq!(hc.binds, Some(vec!["/srv/data:/data:ro".to_string()]));
        assert_eq!(hc.memory, Some(64 << 20));
        assert_eq!(hc.nano_cpus, Some(500_000_000));
        assert_eq!(hc.restart_policy.unwrap().maximum_retry_count, Some(3));
    }

    #[test]
    fn spec_reads_from_a_manifest_like_document() {
        let spec: ContainerSpec = serde_json::from_str(
            r#"{"image": "web:{release}", "pull": "never", "ports": [{"container_port": 8080}],
                "restart": "unless-stopped", "limits": {"memory_bytes": 67108864}}"#,
        )
        .unwrap();
        assert_eq!(spec.pull, PullPolicy::Never);
        assert_eq!(spec.ports[0], PortSpec::loopback(8080));
        assert_eq!(spec.restart, RestartPolicy::UnlessStopped);
        assert!(serde_json::from_str::<ContainerSpec>(r#"{"image": "x", "imgae": "y"}"#).is_err());
        assert_eq!("always".parse::<PullPolicy>().unwrap(), PullPolicy::Always);
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }

    #[test]
    fn references_split_like_docker_pull() {
        assert_eq!(split_reference("web"), ("web".into(), "latest".into()));
        assert_eq!(split_reference("web:v1"), ("web".into(), "v1".into()));
        assert_eq!(split_reference("localhost:5000/web"), ("localhost:5000/web".into(), "latest".into()));
        assert_eq!(split_reference("localhost:5000/web:v2"), ("localhost:5000/web".into(), "v2".into()));
        assert_eq!(split_reference("web@sha256:abc"), ("web".into(), "sha256:abc".into()));
    }
}
