//! Reading the Deployment JSON that `fleetctl -o json` prints.

use anyhow::Context as _;
use serde_json::Value;

/// The deployment's steps.
pub fn steps(d: &Value) -> &[Value] {
    d["steps"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// `start_instance`, `health_check`, `switch_route`, `stop_old`, `command`.
pub fn kind(step: &Value) -> &str {
    step["action"]["kind"].as_str().unwrap_or("?")
}

pub fn status(step: &Value) -> &str {
    step["status"].as_str().unwrap_or("?")
}

/// The `to` of every event, in order.
pub fn transitions(d: &Value) -> Vec<String> {
    d["events"].as_array().map(|e| e.iter().map(|e| e["to"].as_str().unwrap_or("?").to_string()).collect()).unwrap_or_default()
}

/// The first event that moved the deployment to `to`.
pub fn event<'a>(d: &'a Value, to: &str) -> anyhow::Result<&'a Value> {
    d["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["to"] == to))
        .with_context(|| format!("{} has no `{to}` event: {:?}", d["id"], transitions(d)))
}

pub fn event_at(d: &Value, to: &str) -> anyhow::Result<i64> {
    event(d, to)?["at_ms"].as_i64().context("event without at_ms")
}
