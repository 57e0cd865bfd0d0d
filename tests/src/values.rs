//! Reading the Deployment that `fleetctl -o json` prints (fleet-core's own
//! [`Deployment`], deserialized): short names for what the tests ask of it.

use anyhow::Context as _;
use fleet_core::deploy::{Deployment, Event, StepRecord, StepStatus};
use fleet_core::saga::StepAction;
use serde::de::DeserializeOwned;

/// The deployment's steps.
pub fn steps(d: &Deployment) -> &[StepRecord] {
    &d.steps
}

/// `start_instance`, `health_check`, `switch_route`, `stop_old`, `command`
/// (the action's `kind` in the JSON).
pub fn kind(step: &StepRecord) -> &'static str {
    match step.plan.action {
        StepAction::StartInstance { .. } => "start_instance",
        StepAction::HealthCheck { .. } => "health_check",
        StepAction::SwitchRoute { .. } => "switch_route",
        StepAction::StopOld { .. } => "stop_old",
        StepAction::Command { .. } => "command",
    }
}

/// The step's status as the JSON names it: `pending`, `done`, `failed`,
/// `undone`, `undo_failed`, `skipped`.
pub fn status(step: &StepRecord) -> &'static str {
    match step.status {
        StepStatus::Pending => "pending",
        StepStatus::Done => "done",
        StepStatus::Failed => "failed",
        StepStatus::Undone => "undone",
        StepStatus::UndoFailed => "undo_failed",
        StepStatus::Skipped => "skipped",
    }
}

/// The app a process step acts on (`None` for a command step).
pub fn app(step: &StepRecord) -> Option<&str> {
    match &step.plan.action {
        StepAction::StartInstance { app, .. }
        | StepAction::HealthCheck { app, .. }
        | StepAction::SwitchRoute { app, .. }
        | StepAction::StopOld { app, .. } => Some(app),
        StepAction::Command { .. } => None,
    }
}

/// The `to` of every event, in order.
pub fn transitions(d: &Deployment) -> Vec<String> {
    d.events.iter().map(|e| e.to.as_str().to_string()).collect()
}

/// The first event that moved the deployment to `to`.
pub fn event<'a>(d: &'a Deployment, to: &str) -> anyhow::Result<&'a Event> {
    d.events.iter().find(|e| e.to.as_str() == to).with_context(|| format!("{} has no `{to}` event: {:?}", d.id, transitions(d)))
}

pub fn event_at(d: &Deployment, to: &str) -> anyhow::Result<i64> {
    Ok(event(d, to)?.at_ms)
}

/// A step's output (a JSON string in the Deployment), read as `T`.
pub fn output<T: DeserializeOwned>(step: &StepRecord) -> anyhow::Result<T> {
    let text = step.output.as_deref().with_context(|| format!("step `{}` on {} has no output", step.plan.name, step.plan.node))?;
    serde_json::from_str(text).with_context(|| format!("the output of step `{}` is not what was expected: {text}", step.plan.name))
}

/// The deployment as one line of JSON, for error messages.
pub fn show<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("(cannot show: {e})"))
}
