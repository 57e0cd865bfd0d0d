//! The strategy fields of a manifest: `strategy.type` (`blue_green` or
//! `recreate`), `strategy.canary` with its analysis, and `route.listen`,
//! as written and validated. What a canary does at run time is in
//! `deploy::canary`; how it is planned is in `saga`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{fmt_duration_ms as fmt_duration, parse_duration, ManifestError, Probe};

/// `strategy.type`: how one node moves to the new release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Start the new instance beside the old, health-check it, switch the
    /// route, stop the old one (the default).
    #[default]
    BlueGreen,
    /// Stop the old instance first, then start, check and route the new one
    /// (apps that cannot run twice). Undo starts the old release again.
    Recreate,
}

impl StrategyKind {
    pub fn is_blue_green(&self) -> bool {
        *self == StrategyKind::BlueGreen
    }
}

/// `strategy.canary` as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySpec {
    /// How many nodes get the release before the pause (default 1).
    #[serde(default)]
    pub nodes: Option<u32>,
    /// How long to wait before promoting on its own; absent = wait for
    /// `fleetctl promote` (bounded by the deployment's deadline).
    #[serde(default)]
    pub pause: Option<String>,
    #[serde(default)]
    pub analysis: Option<AnalysisSpec>,
}

/// `strategy.canary.analysis` as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    /// HTTP GET of this path on the canary instance must answer 2xx.
    #[serde(default)]
    pub http: Option<String>,
    /// This command (argv) must exit 0; `{port}` is the canary's port.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Time between probes (default 5s).
    #[serde(default)]
    pub interval: Option<String>,
    /// One probe's limit (default 2s).
    #[serde(default)]
    pub timeout: Option<String>,
    /// The analysis fails at this many failed probes (default 1).
    #[serde(default)]
    pub failure_limit: Option<u32>,
}

/// `route:` as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The IP address each node's route listens on (default 127.0.0.1;
    /// `0.0.0.0` serves every interface).
    #[serde(default)]
    pub listen: Option<String>,
}

/// A validated canary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    pub nodes: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
}

/// A validated analysis: probed every `interval_ms` for the pause; fails at
/// `failure_limit` failed probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub failure_limit: u32,
}

impl Analysis {
    /// `GET /healthz every 1s` / `` `./check` every 1s ``.
    pub fn describe(&self) -> String {
        let what = match &self.probe {
            Probe::Http { path } => format!("GET {path}"),
            Probe::Command { argv } => format!("`{}`", argv.join(" ")),
            Probe::Tcp => "TCP connect".to_string(),
            Probe::Image => "the image's HEALTHCHECK".to_string(),
        };
        format!("{what} every {}", fmt_duration(self.interval_ms))
    }
}

/// The strategy fields of a manifest, validated. `is_command`: a
/// `command` destination's manifest (which has neither).
pub fn validate_strategy(
    file: &str,
    kind: Option<StrategyKind>,
    canary: Option<&CanarySpec>,
    is_command: bool,
    deadline_ms: u64,
) -> Result<(StrategyKind, Option<Canary>), ManifestError> {
    let err = |field: &str, reason: String| ManifestError { file: file.to_string(), field: field.to_string(), reason };
    let kind = kind.unwrap_or_default();
    if is_command && kind == StrategyKind::Recreate {
        return Err(err("strategy.type", "a command destination runs its `steps:`; `recreate` is for process and docker manifests".into()));
    }
    let Some(c) = canary else { return Ok((kind, None)) };
    if is_command {
        return Err(err(
            "strategy.canary",
            "a command destination runs its `steps:` once; a canary is for process and docker manifests".into(),
        ));
    }
    if kind == StrategyKind::Recreate {
        return Err(err(
            "strategy.canary",
            "`type: recreate` stops every old instance before its new one starts, so there is nothing to compare a canary with; drop one of them"
                .into(),
        ));
    }
    let nodes = c.nodes.unwrap_or(1);
    if nodes == 0 || nodes > 1000 {
        return Err(err("strategy.canary.nodes", format!("{nodes} is out of range; use 1 or more (the nodes that get the release first)")));
    }
    let pause_ms = match &c.pause {
        None => None,
        Some(p) => {
            let ms = parse_duration(p).map_err(|r| err("strategy.canary.pause", r))?.as_millis().min(u64::MAX as u128) as u64;
            if ms == 0 {
                return Err(err("strategy.canary.pause", "must be longer than zero; leave it out to wait for `fleetctl promote`".into()));
            }
            if ms >= deadline_ms {
                return Err(err(
                    "strategy.canary.pause",
                    format!(
                        "{} is not shorter than the deployment's timeout ({}), which would undo it first; raise `timeout:` or shorten the pause",
                        fmt_duration(ms),
                        fmt_duration(deadline_ms)
                    ),
                ));
            }
            Some(ms)
        }
    };
    let analysis = match &c.analysis {
        None => None,
        Some(a) => {
            if pause_ms.is_none() {
                return Err(err(
                    "strategy.canary.pause",
                    "missing: the analysis runs for the whole pause, so give it a duration, e.g. `pause: 5m`".into(),
                ));
            }
            Some(validate_analysis(file, a)?)
        }
    };
    Ok((kind, Some(Canary { nodes, pause_ms, analysis })))
}

fn validate_analysis(file: &str, a: &AnalysisSpec) -> Result<Analysis, ManifestError> {
    let err =
        |field: &str, reason: String| ManifestError { file: file.to_string(), field: format!("strategy.canary.analysis{field}"), reason };
    let probe = match (&a.http, &a.command) {
        (Some(path), None) => {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(err(".http", format!("`{path}` is not a URL path; write it like `/healthz`")));
            }
            Probe::Http { path: path.clone() }
        }
        (None, Some(argv)) => {
            if argv.is_empty() || argv[0].trim().is_empty() {
                return Err(err(".command", "empty; give a command such as [\"./check-errors\", \"{port}\"]".into()));
            }
            Probe::Command { argv: argv.clone() }
        }
        _ => return Err(err("", "give exactly one of `http: /path` or `command: [...]`".into())),
    };
    let ms = |field: &str, v: &Option<String>, default: u64| -> Result<u64, ManifestError> {
        let ms = match v {
            None => default,
            Some(v) => parse_duration(v).map_err(|r| err(field, r))?.as_millis().min(u64::MAX as u128) as u64,
        };
        if ms == 0 {
            return Err(err(field, "must be longer than zero".into()));
        }
        Ok(ms)
    };
    let interval_ms = ms(".interval", &a.interval, 5_000)?;
    let timeout_ms = ms(".timeout", &a.timeout, 2_000)?;
    let failure_limit = a.failure_limit.unwrap_or(1);
    if failure_limit == 0 || failure_limit > 10_000 {
        return Err(err(
            ".failure_limit",
            format!("{failure_limit} is out of range; use 1 or more (the failed probes that fail the canary)"),
        ));
    }
    Ok(Analysis { probe, interval_ms, timeout_ms, failure_limit })
}

/// `route.listen`, validated: an IP address (v4 or v6).
pub fn validate_route(file: &str, r: &RouteSpec) -> Result<Option<String>, ManifestError> {
    let Some(listen) = &r.listen else { return Ok(None) };
    let ip: IpAddr = listen.trim().parse().map_err(|_| ManifestError {
        file: file.to_string(),
        field: "route.listen".into(),
        reason: format!("`{listen}` is not an IP address; write `127.0.0.1` (this host only, the default) or `0.0.0.0` (every interface)"),
    })?;
    Ok(Some(ip.to_string()))
}

/// Refuse a canary that would cover every node of a destination (there
/// would be nothing left to promote to): the reason names the field.
pub fn check_nodes(canary: &Canary, destination: &str, nodes: &[String]) -> Result<(), String> {
    if (nodes.len() as u64) > canary.nodes as u64 {
        return Ok(());
    }
    Err(format!(
        "strategy.canary.nodes: {} canary node(s) need at least {} nodes on destination `{destination}`, which has {} ({}); lower `nodes`, start more nodes, or drop `canary:`",
        canary.nodes,
        canary.nodes as u64 + 1,
        nodes.len(),
        nodes.join(", ")
    ))
}
