//! The adapter interface: how a node carries out one [`StepAction`].
//!
//! The agent ([`crate::agent`]) owns idempotency, fencing, timeouts, aborts
//! and witness lines; an adapter only knows how to do (and undo) one action
//! on this host. `process` (local supervised processes behind a TCP route)
//! is the built-in one; a docker or kubernetes adapter implements the same
//! trait.

use std::time::Duration;

use fleet_core::deploy::ErrorClass;
use fleet_core::saga::StepAction;
use futures::future::BoxFuture;
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
    /// Fencing token of the destination lock the deployment holds.
    pub token: u64,
    /// The step's whole budget (the agent enforces it; adapters may use it
    /// to word messages).
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
}

/// Carries out step actions on this host.
///
/// Futures returned by `run`, `check` and `undo` may be dropped at any await point
/// (timeout or abort); the agent then calls [`Adapter::cancelled`] so the
/// adapter can remove what the interrupted call had started.
pub trait Adapter: Send + Sync + 'static {
    /// `process`, `docker`, ...
    fn name(&self) -> &'static str;

    /// Do `action`; the output (JSON) is what its undo will be given.
    fn run<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Value, StepError>>;

    /// Reverse a completed `run` of `action`, given the output it returned
    /// (`None` when the leader has none). Must be idempotent: undoing
    /// something already gone succeeds.
    fn undo<'a>(
        &'a self,
        ctx: &'a StepContext,
        action: &'a StepAction,
        run_output: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<Value, StepError>>;

    /// A `run` or `undo` of `action` was interrupted (timeout or abort):
    /// stop and remove whatever it had started.
    fn cancelled<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, ()>;

    /// Is `action` already done on this host? Asked before `run` when the
    /// step was handed over from a lost node (`StepAssignment.check_first`),
    /// under the same timeout and abort as a run. `Some(output)` = done:
    /// the step succeeds with `output` without running, so it must be what
    /// a `run` would have returned (its undo is given it). `None` = not
    /// done, or cannot tell: the agent runs it. An error counts as `None`.
    /// The default cannot tell.
    fn check<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Option<Value>, StepError>> {
        let _ = (ctx, action);
        Box::pin(async { Ok(None) })
    }

    /// This node no longer owns any work of the deployment that held
    /// `token` on `destination` (`LeaderMessage.forget`): remove what its
    /// steps left behind that serves nothing (never what serves traffic).
    /// Returns a description of each thing removed; nothing left is an
    /// empty list, so a repeated call is harmless. The default removes
    /// nothing.
    fn forget<'a>(&'a self, destination: &'a str, token: u64) -> BoxFuture<'a, Vec<String>> {
        let _ = (destination, token);
        Box::pin(async { Vec::new() })
    }

    /// Advice appended to "the step timed out" for this action.
    fn timeout_hint(&self, action: &StepAction) -> String {
        let _ = action;
        "check the node's log (stderr) and whether the manifest's `step_timeout` is long enough".to_string()
    }
}
