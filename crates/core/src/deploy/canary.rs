//! The canary at run time: its pause, promote, expiry and analysis
//! outcome, and where each node serves the app after a deployment. The
//! canary's manifest fields are in `manifest::strategy`; the leader's rule
//! for a paused deployment is in `leader::canary`.
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

use super::{DeployError, DeployState, Deployment, ErrorClass, Event, StepOutcome, StepStatus, LEADER_ACTOR};
use crate::manifest::Analysis;
use crate::saga::StepAction;

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
        if let Some(s) = self.step_mut(p.step) {
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
        let promoted = r.ok || (requested.is_some() && r.class == Some(ErrorClass::Aborted));
        if promoted {
            if let Some(s) = self.step_mut(r.step) {
                s.started_ms = Some(r.started_ms);
            }
            let actor = if r.ok && requested.is_none() { LEADER_ACTOR.to_string() } else { r.node.clone() };
            let output = r.output.clone().or_else(|| Some(serde_json::json!({ "promoted_by": requested }).to_string()));
            return Some(self.complete_pause(at_ms, &actor, output).map(|_| self.state));
        }
        let error = r.error.clone().unwrap_or_else(|| "the analysis failed without a message".into());
        let on = self.steps.get(r.step).map(|s| s.plan.node.clone()).unwrap_or_default();
        if let Some(s) = self.step_mut(r.step) {
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
        while let Some(i) = self.steps.iter().rposition(|s| s.status == StepStatus::Done) {
            if !self.steps[i].plan.action.is_pause() {
                break;
            }
            let Some(s) = self.step_mut(i) else { break };
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

// ------------------------------------------------------------ formatting

/// `12:34:56 UTC` of a Unix time in milliseconds (pure arithmetic).
pub fn fmt_clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

fn fmt_duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}
