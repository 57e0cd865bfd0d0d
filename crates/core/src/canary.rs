//! Strategies beyond plain blue-green: the canary (`strategy.canary`) and
//! `recreate` (`strategy.type`), and the route's listen address
//! (`route.listen`): their manifest fields, validation, and the canary's
//! decisions (pause, promote, expiry, analysis outcome).
//!
//! A canary deployment is planned as: the release on the first
//! `canary.nodes` nodes (blue-green each), then one *pause* step
//! ([`StepAction::CanaryPause`]), then the other nodes. When the engine
//! reaches the pause step the deployment becomes `paused` (it keeps the
//! destination lock) and waits:
//!
//! * `fleetctl promote ID` (or, with `pause: 5m`, the pause passing:
//!   the leader proposes the promote itself) completes the pause step and
//!   the deployment runs on (`running`);
//! * `fleetctl cancel ID` undoes everything (`cancelled`, exit 4); the
//!   deadline passing does the same (exit 5);
//! * with `analysis:`, the pause step is sent to the first canary node,
//!   which probes the canary instance for the whole pause: a failure ends
//!   the step failed (`compensating` → `failed`, exit 3), passing to the
//!   end promotes. A promote during the analysis aborts it on the node
//!   (the aborted result then counts as promoted), so no step of the
//!   deployment ever runs beside it.
//!
//! A pause step has nothing to undo: compensation marks it undone without
//! sending anything (`Deployment::settle`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::deploy::{DeployError, DeployState, Deployment, Event, StepOutcome, StepStatus};
use crate::leader::{Action, Observed, Proposal, Tick, LEADER_ACTOR};
use crate::manifest::{parse_duration, ManifestError, Probe};
use crate::saga::StepAction;

// ------------------------------------------------------------ manifest

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
    let ip: std::net::IpAddr = listen.trim().parse().map_err(|_| ManifestError {
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

// ------------------------------------------------------------ the pause

/// Where a deployment stands in its canary pause (recorded in the
/// deployment when it pauses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// The pause step's index.
    pub step: usize,
    pub since_ms: i64,
    /// When it promotes on its own (a pause with a duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
    /// Someone asked to promote while the analysis runs: it is being
    /// stopped, and then counts as promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_requested_by: Option<String>,
    /// Who (or what) promoted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_by: Option<String>,
}

fn pause_parts(a: &StepAction) -> Option<(&[String], Option<u64>, Option<&Analysis>)> {
    match a {
        StepAction::CanaryPause { canary, pause_ms, analysis, .. } => Some((canary.as_slice(), *pause_ms, analysis.as_ref())),
        _ => None,
    }
}

impl StepAction {
    /// A canary pause step.
    pub fn is_pause(&self) -> bool {
        matches!(self, StepAction::CanaryPause { .. })
    }

    /// A pause step that a node runs (its analysis); a pause without
    /// analysis is never sent anywhere.
    pub fn is_sent_pause(&self) -> bool {
        matches!(self, StepAction::CanaryPause { analysis: Some(_), .. })
    }
}

impl Deployment {
    /// The first pause step that has not run (or been skipped).
    fn pause_at(&self, i: usize) -> bool {
        self.steps.get(i).is_some_and(|s| s.plan.action.is_pause())
    }

    /// Enter the pause when the next step is a pause step (from `running`).
    /// Called by `settle`. Returns true when it paused.
    pub(crate) fn maybe_pause(&mut self, at_ms: i64, actor: &str) -> Result<bool, DeployError> {
        if self.state != DeployState::Running {
            return Ok(false);
        }
        let Some(i) = self.steps.iter().position(|s| !matches!(s.status, StepStatus::Done | StepStatus::Skipped)) else {
            return Ok(false);
        };
        if !self.pause_at(i) || self.steps[i].status != StepStatus::Pending {
            return Ok(false);
        }
        let Some((canary, pause_ms, analysis)) = pause_parts(&self.steps[i].plan.action) else { return Ok(false) };
        let until_ms = pause_ms.map(|p| at_ms.saturating_add(p.min(i64::MAX as u64) as i64));
        let on = canary.join(", ");
        let reason = match (analysis, until_ms) {
            (Some(a), Some(until)) => format!(
                "canary on {on}; analysis ({}) must keep passing until {} (then it is promoted automatically); `fleetctl promote {}` promotes now, `fleetctl cancel {}` undoes it",
                a.describe(),
                fmt_clock(until),
                self.id,
                self.id
            ),
            (_, Some(until)) => format!("canary on {on}; waiting for `fleetctl promote {}` (auto promote at {})", self.id, fmt_clock(until)),
            (_, None) => format!(
                "canary on {on}; waiting for `fleetctl promote {}` (no auto promote; the deadline at {} undoes it)",
                self.id,
                fmt_clock(self.deadline_ms)
            ),
        };
        self.pause = Some(Pause { step: i, since_ms: at_ms, until_ms, promote_requested_by: None, promoted_by: None });
        self.transition(DeployState::Paused, at_ms, reason, actor)?;
        Ok(true)
    }

    /// Why a `paused` deployment waits (its latest pause event).
    pub fn paused_reason(&self) -> Option<&str> {
        if self.state != DeployState::Paused {
            return None;
        }
        self.events.iter().rev().find(|e| e.to == DeployState::Paused).map(|e| e.reason.as_str())
    }

    /// `fleetctl promote` (or the leader when the pause passed: actor
    /// [`LEADER_ACTOR`], refused before `until_ms`). Without analysis the
    /// pause step completes and the deployment runs on; with analysis
    /// running, the promote is recorded and the leader stops the analysis
    /// first (its aborted result then completes the step).
    pub fn promote(&mut self, at_ms: i64, actor: &str) -> Result<(), String> {
        if self.state != DeployState::Paused {
            return Err(format!("{} is {}, not paused: only a paused canary can be promoted", self.id, self.state));
        }
        let Some(p) = self.pause.clone() else { return Err(format!("{} records no pause", self.id)) };
        let auto = actor == LEADER_ACTOR;
        if auto && p.until_ms.is_none_or(|u| at_ms < u) {
            return Err(format!("the pause of {} has not passed yet", self.id));
        }
        let sent = self.steps.get(p.step).is_some_and(|s| s.plan.action.is_sent_pause());
        if sent {
            if p.promote_requested_by.is_some() {
                return Ok(());
            }
            if let Some(pause) = &mut self.pause {
                pause.promote_requested_by = Some(actor.to_string());
            }
            self.events.push(Event {
                at_ms,
                from: Some(self.state),
                to: self.state,
                reason: format!("promote requested by {actor}; stopping the canary analysis first"),
                actor: actor.to_string(),
            });
            return Ok(());
        }
        let output = serde_json::json!({ "promoted_by": actor }).to_string();
        self.complete_pause(at_ms, actor, Some(output)).map_err(|e| e.to_string())
    }

    /// The pause step is done: back to `running`, and on.
    fn complete_pause(&mut self, at_ms: i64, actor: &str, output: Option<String>) -> Result<(), DeployError> {
        let Some(p) = self.pause.clone() else { return Ok(()) };
        let by = p.promote_requested_by.clone().unwrap_or_else(|| actor.to_string());
        let reason = if by == LEADER_ACTOR {
            match self.steps.get(p.step).and_then(|s| pause_parts(&s.plan.action)) {
                Some((_, Some(ms), Some(_))) => format!("the canary analysis passed for {}; promoted automatically", fmt_duration(ms)),
                Some((_, Some(ms), None)) => format!("the pause of {} passed; promoted automatically", fmt_duration(ms)),
                _ => "promoted automatically".to_string(),
            }
        } else {
            format!("promoted by {by}")
        };
        if let Some(s) = self.steps.get_mut(p.step) {
            s.status = StepStatus::Done;
            s.output = output;
            s.error = None;
            s.started_ms = s.started_ms.or(Some(p.since_ms));
            s.finished_ms = Some(at_ms);
        }
        if let Some(pause) = &mut self.pause {
            pause.promoted_by = Some(by);
        }
        self.transition(DeployState::Running, at_ms, reason, actor)?;
        self.settle(at_ms, actor)
    }

    /// Record the result of the pause step (the analysis) while paused.
    /// `None`: not a pause result, the engine records it as usual.
    pub(crate) fn record_pause(&mut self, r: &StepOutcome, at_ms: i64) -> Option<Result<DeployState, DeployError>> {
        if self.state != DeployState::Paused || r.undo || !self.pause_at(r.step) {
            return None;
        }
        let requested = self.pause.as_ref().and_then(|p| p.promote_requested_by.clone());
        let promoted = r.ok || (requested.is_some() && r.class == Some(crate::deploy::ErrorClass::Aborted));
        if promoted {
            if let Some(s) = self.steps.get_mut(r.step) {
                s.started_ms = Some(r.started_ms);
            }
            let actor = if r.ok && requested.is_none() { LEADER_ACTOR.to_string() } else { r.node.clone() };
            let output = r.output.clone().or_else(|| Some(serde_json::json!({ "promoted_by": requested }).to_string()));
            return Some(self.complete_pause(at_ms, &actor, output).map(|_| self.state));
        }
        let error = r.error.clone().unwrap_or_else(|| "the analysis failed without a message".into());
        let on = self.steps.get(r.step).map(|s| s.plan.node.clone()).unwrap_or_default();
        if let Some(s) = self.steps.get_mut(r.step) {
            s.status = StepStatus::Failed;
            s.error = Some(error.clone());
            s.error_class = r.class;
            s.started_ms = Some(r.started_ms);
            s.finished_ms = Some(r.finished_ms);
        }
        let reason = format!("canary analysis failed on {on}: {error}; undoing the canary");
        Some(
            self.transition(DeployState::Compensating, at_ms, reason, &r.node)
                .and_then(|_| self.settle(at_ms, &r.node))
                .map(|_| self.state),
        )
    }

    /// Pause steps have nothing to undo: while compensating, a completed
    /// pause step that is next to undo is marked undone at once.
    pub(crate) fn undo_pauses(&mut self, at_ms: i64) {
        if !matches!(self.state, DeployState::Compensating | DeployState::Cancelling) {
            return;
        }
        while let Some(s) = self.steps.iter_mut().rev().find(|s| s.status == StepStatus::Done) {
            if !s.plan.action.is_pause() {
                break;
            }
            s.status = StepStatus::Undone;
            s.undo_started_ms = Some(at_ms);
            s.undo_finished_ms = Some(at_ms);
        }
    }

    /// A pause step skipped (its canary node was lost): the release has
    /// nothing left to be judged by, so it is undone, never promoted blindly.
    pub(crate) fn lost_canary(&mut self, at_ms: i64, actor: &str) -> Result<bool, DeployError> {
        if !matches!(self.state, DeployState::Running | DeployState::Paused) {
            return Ok(false);
        }
        let Some(s) = self.steps.iter().find(|s| s.plan.action.is_pause() && s.status == StepStatus::Skipped) else { return Ok(false) };
        let reason = format!("the canary node {} was lost, so there is no canary to judge the release by; undoing it", s.plan.node);
        self.transition(DeployState::Compensating, at_ms, reason, actor)?;
        Ok(true)
    }
}

// ------------------------------------------------------------ where it is served

/// Where a node serves the app after a deployment: the address its route
/// listens on, as the switch step reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedAt {
    pub node: String,
    pub destination: String,
    /// `127.0.0.1:41233` (or `0.0.0.0:41233` with `route.listen: 0.0.0.0`).
    pub address: String,
}

impl Deployment {
    /// Every node's route address, from its completed switch steps (the
    /// last one per node and destination), in plan order.
    pub fn served_at(&self) -> Vec<ServedAt> {
        let mut out: Vec<ServedAt> = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            if s.status != StepStatus::Done || !matches!(s.plan.action, StepAction::SwitchRoute { .. }) {
                continue;
            }
            let address = s
                .output
                .as_deref()
                .and_then(|o| serde_json::from_str::<serde_json::Value>(o).ok())
                .and_then(|v| v.get("route").and_then(|r| r.as_str()).map(str::to_string));
            let Some(address) = address else { continue };
            let destination = self.step_destination(i).to_string();
            out.retain(|x| !(x.node == s.plan.node && x.destination == destination));
            out.push(ServedAt { node: s.plan.node.clone(), destination, address });
        }
        out
    }
}

// ------------------------------------------------------------ leader rule

/// The leader's canary rule for `d` (checked after the lease, lock-wait,
/// deadline and cancel rules, before sending work): a paused deployment
/// without analysis whose pause passed is promoted; one whose promote was
/// requested while its analysis runs gets the analysis aborted (or, when
/// it was never sent and its node is connected, recorded as promoted).
/// `None`: nothing canary-specific is due (the analysis step is then sent
/// like any step).
pub fn due(d: &Deployment, tick: Tick, seen: &impl Observed) -> Option<Option<Action>> {
    if d.state != DeployState::Paused {
        return None;
    }
    let p = d.pause.as_ref()?;
    let s = d.steps.get(p.step)?;
    if !s.plan.action.is_sent_pause() {
        let expired = p.until_ms.is_some_and(|u| tick.now_ms >= u);
        return Some(expired.then(|| {
            Action::Propose(Proposal {
                key: format!("{}/promote", d.id),
                request_id: Some(format!("{LEADER_ACTOR}/promote/{}", d.id)),
                command: Command::PromoteDeployment { id: d.id.clone(), actor: LEADER_ACTOR.into() },
            })
        }));
    }
    p.promote_requested_by.as_ref()?;
    let key = crate::leader::StepKey {
        deployment: d.id.clone(),
        step: p.step,
        undo: false,
        attempt: s.attempt,
        token: d.token.unwrap_or(0),
        epoch: d.epoch,
    };
    Some(match seen.in_flight(&key) {
        Some(f) if !f.aborted => Some(Action::Abort { node: f.node, key, reason: "the canary was promoted".into() }),
        Some(_) => None,
        None if seen.is_connected(&s.plan.node) => {
            let outcome = StepOutcome {
                step: p.step,
                undo: false,
                attempt: s.attempt,
                token: key.token,
                epoch: key.epoch,
                ok: false,
                output: None,
                error: Some("promoted before the analysis ran".into()),
                class: Some(crate::deploy::ErrorClass::Aborted),
                started_ms: tick.now_ms,
                finished_ms: tick.now_ms,
                node: LEADER_ACTOR.into(),
            };
            Some(Action::Propose(Proposal {
                key: format!("{}/promote-unsent/{}", d.id, s.attempt),
                request_id: None,
                command: Command::StepResult { deployment: d.id.clone(), outcome },
            }))
        }
        None => None,
    })
}

// ------------------------------------------------------------ formatting

/// `12:34:56 UTC` of a Unix time in milliseconds (pure arithmetic).
pub fn fmt_clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

fn fmt_duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests;
