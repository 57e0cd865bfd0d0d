//! The adapter interface: how a node carries out one [`StepAction`] on a
//! target, and which adapter carries out which action.
//!
//! The agent (the `agent` module, which uses this one) owns idempotency of
//! assignments, fencing, timeouts, aborts and witness lines; an adapter
//! only knows how to do, undo and check one action on its target. The
//! target need not be this host: `process` supervises local processes and
//! `command` runs shell commands here, but an adapter for a Docker engine,
//! a Kubernetes API or a cloud API (EC2) implements the same trait against
//! a remote API. So the trait speaks of steps, outputs and fencing tokens,
//! never of pids or ports: what an adapter needs to find its work again
//! goes in the JSON output of a step (given back to its undo) and on the
//! target itself (tagged with the token).
//!
//! DESIGN.md names the operations `discover`, `plan`, `run_step`,
//! `undo_step`, `check_step` and `health`. Here they are
//! [`Adapter::discover`], [`Adapter::run`], [`Adapter::undo`],
//! [`Adapter::check`] and [`Adapter::health`]; `plan` is not a node
//! operation: planning a saga is a pure function every coordinator must
//! agree on, so it lives in `fleet_core::saga`, and the node only executes
//! the steps it is given.
//!
//! **Construction.** An adapter is built once when the node starts, from
//! the node's own settings (`ProcessAdapter::open(ProcessConfig)`,
//! `CommandAdapter::new(CommandConfig)`, `DockerAdapter::new(DockerConfig)`
//! with the engine's socket; a cloud adapter would take its credentials). The trait has no
//! constructor so that it stays object-safe ([`Adapters`] holds
//! `Arc<dyn Adapter>`). Per-destination settings reach it with each step:
//! [`StepContext::destination`] and the action itself. (A destination's
//! adapter config, once the leader sends it, belongs in [`StepContext`].)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::deploy::ErrorClass;
use fleet_core::saga::StepAction;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// What an adapter knows about the step it runs.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// This node's id (its certificate's common name).
    pub node: String,
    pub destination: String,
    pub deployment: String,
    pub step: u32,
    pub attempt: u32,
    pub undo: bool,
    /// Fencing token of the destination lock the deployment holds. Tokens
    /// only grow; an adapter passes it to the target wherever the target
    /// can keep it (an environment variable, a label, an annotation, a
    /// tag), so that a stale writer can be recognised there too.
    pub token: u64,
    /// The step's whole budget (the agent enforces it; adapters may use it
    /// to word messages or to bound their own waits).
    pub timeout: Duration,
}

impl StepContext {
    /// `deployment#step` (with `/undo` for an undo), for log lines and file names.
    pub fn label(&self) -> String {
        format!("{}#{}{}", self.deployment, self.step, if self.undo { "/undo" } else { "" })
    }
}

/// A failed step: what happened and what to do about it, and its class
/// (which decides whether the leader retries).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{message}")]
pub struct StepError {
    pub class: ErrorClass,
    pub message: String,
}

impl StepError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        StepError { class, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        StepError::new(ErrorClass::Invalid, message)
    }
    pub fn transient(message: impl Into<String>) -> Self {
        StepError::new(ErrorClass::Transient, message)
    }
    pub fn auth(message: impl Into<String>) -> Self {
        StepError::new(ErrorClass::Auth, message)
    }
    pub fn resource(message: impl Into<String>) -> Self {
        StepError::new(ErrorClass::Resource, message)
    }
    /// `adapter` cannot do `what` (yet): class `invalid`, never retried.
    pub fn unsupported(adapter: &str, what: &str) -> Self {
        StepError::invalid(format!("the `{adapter}` adapter does not support {what}"))
    }
}

/// A server an adapter found serving a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// Stable id on the target: a container id, a pod name, an instance id.
    pub id: String,
    /// The app it serves (an adapter that keeps apps per destination, like
    /// `process` and `docker`, finds one server per app on a node).
    #[serde(default)]
    pub app: String,
    /// Where it serves the app (HOST:PORT or URL), if it is known.
    pub address: Option<String>,
    /// The release it runs, if the target records it.
    pub release: Option<String>,
}

/// Carries out step actions on one kind of target.
///
/// Every method must keep these promises; the agent and the leader rely
/// on them to make retries, hand-overs and compensation safe:
///
/// * **Idempotent per step.** The leader may send the same step again (a
///   retry after a lost result, a hand-over after a lost node). `run` of an
///   action that is already done on the target must not do it twice: it
///   either finds it done and answers the same output, or does it again
///   harmlessly. The agent never runs one step key twice on this node;
///   adapters see repeats only across keys (attempts, epochs, nodes).
/// * **Exact undo.** `undo` restores exactly what was there before the
///   `run`, using the output `run` returned, and nothing else: undo of a
///   start stops that instance, not "some instance of the app". Undoing
///   something already gone succeeds.
/// * **Fenced.** [`StepContext::token`] is the deployment's fencing token;
///   pass it to the target where it can be kept, and never act on work
///   recorded with a higher token as if it were this step's.
/// * **Cancellable.** Futures returned by `run`, `undo` and `check` may be
///   dropped at any await point (timeout or abort); the agent then calls
///   [`Adapter::cancelled`], which removes what the interrupted call had
///   started.
/// * **Errors are classified.** `transient` is retried with backoff,
///   `resource` after a re-sync, `auth` and `invalid` fail the step at
///   once; the message says what happened and what to do next.
pub trait Adapter: Send + Sync + 'static {
    /// `process`, `command`, `docker`, ...: the name destinations use.
    fn name(&self) -> &'static str;

    /// Do `action` (DESIGN.md's `run_step`). The output (JSON) is recorded
    /// by the leader and given to this step's undo, so it must name what
    /// was created or changed precisely enough to reverse exactly that.
    fn run<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Value, StepError>>;

    /// Reverse a completed `run` of `action` (DESIGN.md's `undo_step`),
    /// given the output it returned (`None` when the leader has none).
    /// Must be idempotent: undoing something already gone succeeds. Must
    /// refuse (class `invalid`, naming what to do first) rather than undo
    /// something another deployment has changed since.
    fn undo<'a>(
        &'a self,
        ctx: &'a StepContext,
        action: &'a StepAction,
        run_output: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<Value, StepError>>;

    /// A `run` or `undo` of `action` was interrupted (timeout or abort):
    /// stop and remove whatever it had started, so that nothing half-done
    /// is left on the target. Never fails (it logs what it could not do).
    fn cancelled<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, ()>;

    /// Is `action` already done on the target (DESIGN.md's `check_step`)?
    /// Asked before `run` when the step was handed over from a lost node
    /// (`StepAssignment.check_first`), under the same timeout and abort as
    /// a run. `Some(output)` = done: the step succeeds with `output`
    /// without running, so it must be what a `run` would have returned
    /// (its undo is given it). `None` = not done, or cannot tell: the agent
    /// runs it. An error counts as `None`. Must not change the target. The
    /// default cannot tell.
    fn check<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Option<Value>, StepError>> {
        let _ = (ctx, action);
        Box::pin(async { Ok(None) })
    }

    /// This node no longer owns any work of the deployment that held
    /// `token` on `destination` (`LeaderMessage.forget`): remove what its
    /// steps left behind that serves nothing (never what serves traffic).
    /// An API-backed adapter finds it by the token it tagged it with.
    /// Returns a description of each thing removed; nothing left is an
    /// empty list, so a repeated call is harmless. The default removes
    /// nothing (right for an adapter that leaves nothing staged).
    fn forget<'a>(&'a self, destination: &'a str, token: u64) -> BoxFuture<'a, Vec<String>> {
        let _ = (destination, token);
        Box::pin(async { Vec::new() })
    }

    /// The destinations this adapter runs something for on its target
    /// (what the node's instance report walks). Read-only. The default:
    /// none (a `command` destination leaves nothing running).
    fn destinations(&self) -> Vec<String> {
        Vec::new()
    }

    /// The servers that serve `destination` on the target, as the target
    /// reports them (for the leader's destination sync: servers found,
    /// vanished, drifted). Read-only. `process` and `docker` find one per
    /// app of the destination on this node (the node is the destination's
    /// server; the leader keys it by node id), with the release its active
    /// instance or container runs and the route's address. The default
    /// says the adapter cannot discover (a `command` destination has no
    /// servers).
    fn discover<'a>(&'a self, destination: &'a str) -> BoxFuture<'a, Result<Vec<Server>, StepError>> {
        let _ = destination;
        let name = self.name();
        Box::pin(async move { Err(StepError::unsupported(name, "discovering servers")) })
    }

    /// Is `server` of `destination` healthy, per the target? `Ok` when it
    /// is; the error says why not (gone, stopped, changed by hand). Read-only
    /// and quick (the node asks every few seconds). The default says the
    /// adapter cannot tell.
    fn health<'a>(&'a self, destination: &'a str, server: &'a Server) -> BoxFuture<'a, Result<(), StepError>> {
        let _ = (destination, server);
        let name = self.name();
        Box::pin(async move { Err(StepError::unsupported(name, "health checks of servers")) })
    }

    /// Advice appended to "the step timed out" for this action.
    fn timeout_hint(&self, action: &StepAction) -> String {
        let _ = action;
        "check the node's log (stderr) and whether the manifest's `step_timeout` is long enough".to_string()
    }
}

/// The adapter that carries out `action` when the assignment does not say
/// (plans recorded before `StepAssignment.adapter` existed): the
/// blue-green actions of a supervised process belong to `process`, a
/// container start to `docker`, and a `Command` to `command`. A `docker`
/// destination's health, switch and stop steps share their kinds with
/// `process`, so for them the leader's `adapter` field decides
/// ([`Adapters::for_step`]).
pub fn adapter_for(action: &StepAction) -> &'static str {
    match action {
        StepAction::StartInstance { .. }
        | StepAction::HealthCheck { .. }
        | StepAction::SwitchRoute { .. }
        | StepAction::StopOld { .. }
        | StepAction::StopCurrent { .. }
        | StepAction::CanaryPause { .. } => "process",
        StepAction::StartContainer { .. } => "docker",
        StepAction::Command { .. } => "command",
    }
}

/// The adapters this node has, by name.
#[derive(Clone, Default)]
pub struct Adapters {
    by_name: BTreeMap<&'static str, Arc<dyn Adapter>>,
}

impl std::fmt::Debug for Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Adapters {
    /// The given adapters; a later one replaces an earlier one of the same name.
    pub fn new(list: impl IntoIterator<Item = Arc<dyn Adapter>>) -> Self {
        Adapters { by_name: list.into_iter().map(|a| (a.name(), a)).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Adapter>> {
        self.by_name.get(name)
    }

    /// The adapter that carries out `action` ([`adapter_for`]), or an
    /// `invalid` error when this node does not have it.
    pub fn for_action(&self, action: &StepAction) -> Result<&Arc<dyn Adapter>, StepError> {
        self.for_step("", action)
    }

    /// The adapter the assignment names (`StepAssignment.adapter`, planned
    /// by the leader), or by the action's kind when it names none; an
    /// `invalid` error when this node does not have it.
    pub fn for_step(&self, adapter: &str, action: &StepAction) -> Result<&Arc<dyn Adapter>, StepError> {
        let name = if adapter.is_empty() { adapter_for(action) } else { adapter };
        self.get(name).ok_or_else(|| {
            StepError::invalid(format!(
                "this node has no `{name}` adapter (it has {:?}), so it cannot run a `{}` step; run a fleet-node that has it",
                self.by_name.keys().collect::<Vec<_>>(),
                action.verb()
            ))
        })
    }

    /// Every adapter, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Adapter>> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A scripted fake: answers every action with its own name.
    struct Fake(&'static str);

    impl Adapter for Fake {
        fn name(&self) -> &'static str {
            self.0
        }
        fn run<'a>(&'a self, _: &'a StepContext, _: &'a StepAction) -> BoxFuture<'a, Result<Value, StepError>> {
            Box::pin(async move { Ok(json!(self.0)) })
        }
        fn undo<'a>(&'a self, _: &'a StepContext, _: &'a StepAction, _: Option<&'a Value>) -> BoxFuture<'a, Result<Value, StepError>> {
            Box::pin(async move { Ok(json!(self.0)) })
        }
        fn cancelled<'a>(&'a self, _: &'a StepContext, _: &'a StepAction) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
    }

    fn fakes(names: &[&'static str]) -> Adapters {
        Adapters::new(names.iter().map(|n| Arc::new(Fake(n)) as Arc<dyn Adapter>))
    }

    #[test]
    fn commands_and_hooks_go_to_the_command_adapter_and_instances_to_process() {
        let hook = StepAction::Command { run: "echo pre".into(), undo: None, check: None };
        let start = StepAction::StartInstance { app: "web".into(), release: "v1".into(), run: vec![], env: BTreeMap::new() };
        let stop = StepAction::StopOld { app: "web".into(), release: "v1".into(), drain_ms: 0 };
        let all = fakes(&["process", "command"]);
        assert_eq!(all.for_action(&hook).map(|a| a.name()), Ok("command"));
        assert_eq!(all.for_action(&start).map(|a| a.name()), Ok("process"));
        assert_eq!(all.for_action(&stop).map(|a| a.name()), Ok("process"));

        // The assignment's adapter decides: a docker destination's stop step.
        let all = fakes(&["process", "command", "docker"]);
        assert_eq!(all.for_step("docker", &stop).map(|a| a.name()), Ok("docker"));
        assert_eq!(all.for_step("", &stop).map(|a| a.name()), Ok("process"));
        assert_eq!(all.for_step("command", &hook).map(|a| a.name()), Ok("command"));
        let err = fakes(&["process"]).for_step("docker", &stop).map(|a| a.name()).unwrap_err();
        assert!(err.message.contains("no `docker` adapter"), "{}", err.message);

        // A node without the adapter refuses the step (invalid), naming it.
        let err = fakes(&["process"]).for_action(&hook).map(|a| a.name()).unwrap_err();
        assert_eq!(err.class, ErrorClass::Invalid);
        assert!(err.message.contains("no `command` adapter"), "{}", err.message);
    }

    #[tokio::test]
    async fn the_defaults_say_what_an_adapter_does_not_support() {
        let fake = Fake("docker");
        let err = fake.discover("web").await.unwrap_err();
        assert_eq!((err.class, err.message.as_str()), (ErrorClass::Invalid, "the `docker` adapter does not support discovering servers"));
        let server = Server { id: "c1".into(), app: "web".into(), address: None, release: None };
        assert_eq!(fake.health("web", &server).await.unwrap_err().class, ErrorClass::Invalid);
        let ctx = StepContext {
            node: "n".into(),
            destination: "web".into(),
            deployment: "d".into(),
            step: 0,
            attempt: 1,
            undo: false,
            token: 1,
            timeout: Duration::from_secs(1),
        };
        let hook = StepAction::Command { run: "true".into(), undo: None, check: None };
        assert_eq!(fake.check(&ctx, &hook).await, Ok(None), "the default check cannot tell");
        assert!(fake.forget("web", 1).await.is_empty(), "the default forget removes nothing");
    }
}
