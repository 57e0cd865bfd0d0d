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
/// ...: the action's `kind`, the tag serde gives it in the JSON (so a new
/// kind of action needs no change here).
pub fn kind(step: &StepRecord) -> String {
    #[derive(serde::Deserialize)]
    struct Tagged {
        kind: String,
    }
    serde_json::to_value(&step.plan.action)
        .and_then(serde_json::from_value::<Tagged>)
        .map(|t| t.kind)
        .unwrap_or_else(|e| format!("(an action without a kind tag: {e})"))
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

/// The app a blue-green step acts on (`None` for other actions).
pub fn app(step: &StepRecord) -> Option<&str> {
    match &step.plan.action {
        StepAction::StartInstance { app, .. }
        | StepAction::HealthCheck { app, .. }
        | StepAction::SwitchRoute { app, .. }
        | StepAction::StopOld { app, .. } => Some(app),
        _ => None,
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
