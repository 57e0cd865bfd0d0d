//! The `command` adapter: each step is a shell command (`sh -c`) with an
//! optional `undo` and `check` command, which covers terraform, ansible,
//! docker compose and anything else a script can do.
//!
//! It runs the steps of a destination whose adapter is `command`, and the
//! pre and post hooks of a deployment to any destination (hooks are
//! `command` actions whatever the destination's adapter is).
//!
//! * The exit status classifies a failure (sysexits.h): 75 (EX_TEMPFAIL)
//!   is `transient` (retried with backoff), 77 (EX_NOPERM) is `auth`, any
//!   other code `invalid`; killed by a signal is `transient`.
//! * `check` exiting 0 means "already done": the run is skipped (and a
//!   step handed over from a lost node succeeds without running).
//! * A command runs in its own process group, killed with the group if the
//!   step times out or is aborted; nothing of it outlives the step.
//! * Its output goes to `<data-dir>/logs/commands/<deployment>-<step>-<what>-a<attempt>.log`;
//!   a failure quotes the last lines. The command sees `FLEET_DEPLOYMENT`,
//!   `FLEET_DESTINATION`, `FLEET_NODE` and `FLEET_TOKEN` (the fencing token,
//!   to pass on to whatever it changes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleet_core::saga::StepAction;
use futures::future::BoxFuture;
use serde_json::{json, Value};

use crate::adapter::{Adapter, StepContext, StepError};
use crate::proc::{self, GroupGuard};
use crate::util::{indent, safe_file_part, tail};

/// Settings of the command adapter.
#[derive(Debug, Clone)]
pub struct CommandConfig {
    /// The node's data dir: commands run in it, and their logs go to
    /// `logs/commands` under it.
    pub cwd: PathBuf,
    /// Directories put in front of `PATH` (by default the directory of the
    /// running executable).
    pub path_prepend: Vec<PathBuf>,
}

impl CommandConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        CommandConfig { cwd: data_dir.into(), path_prepend: proc::exe_dir().into_iter().collect() }
    }

    fn log_dir(&self) -> PathBuf {
        self.cwd.join("logs").join("commands")
    }
}

/// The `command` adapter. Keeps no state of its own: what a command changes
/// is outside the node, so `forget` has nothing to remove and a restarted
/// node has nothing to adopt.
#[derive(Debug, Clone)]
pub struct CommandAdapter {
    cfg: CommandConfig,
}

impl CommandAdapter {
    pub fn new(cfg: CommandConfig) -> Self {
        CommandAdapter { cfg }
    }

    /// Where the commands' output goes.
    pub fn log_dir(&self) -> PathBuf {
        self.cfg.log_dir()
    }

    /// Run `script` with `sh -c` for `ctx` (`what`: run, undo or check);
    /// the log it wrote, or the failure classified by its exit status.
    async fn shell(&self, ctx: &StepContext, script: &str, what: &str) -> Result<PathBuf, StepError> {
        let dir = self.cfg.log_dir();
        std::fs::create_dir_all(&dir).map_err(|e| {
            StepError::resource(format!("cannot create {}: {e}; check the node's data dir (disk full? permissions?)", dir.display()))
        })?;
        let log = log_file(&dir, ctx, what);
        let sh = PathBuf::from("/bin/sh");
        let args = vec!["-c".to_string(), script.to_string()];
        let env: BTreeMap<String, String> = [
            ("FLEET_DEPLOYMENT", ctx.deployment.clone()),
            ("FLEET_DESTINATION", ctx.destination.clone()),
            ("FLEET_NODE", ctx.node.clone()),
            ("FLEET_TOKEN", ctx.token.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut child = proc::spawn(proc::Spawn {
            program: &sh,
            args: &args,
            env: &env,
            path_prepend: &self.cfg.path_prepend,
            cwd: &self.cfg.cwd,
            log: &log,
            kill_on_drop: true,
        })
        .map_err(|e| StepError::transient(format!("cannot run `sh -c {script}`: {e}")))?;
        // Killed with its whole group if this future is dropped (timeout, abort).
        let _guard = child.id().map(GroupGuard::new);
        let status = child.wait().await.map_err(|e| StepError::transient(format!("waiting for `{script}`: {e}")))?;
        if status.success() {
            return Ok(log);
        }
        let how = proc::describe_exit(&status);
        let next = match status.code() {
            Some(75) => "Exit 75 (EX_TEMPFAIL) means a temporary failure: it is retried with backoff per the manifest's `retry:`",
            Some(77) => {
                "Exit 77 (EX_NOPERM) means a credential or permission was refused: check the credentials the command uses on this node (keys, tokens, file permissions); it is not retried"
            }
            _ => "Fix the command or the node, then deploy again",
        };
        let msg = format!(
            "the {what} command `{script}` {how}; last lines of its output ({}):\n{}\n{next}",
            log.display(),
            indent(&tail(&log, 15))
        );
        // The exit status classifies the error (sysexits.h): 75 EX_TEMPFAIL
        // = transient (retried with backoff), 77 EX_NOPERM = auth (fail
        // now), any other code = invalid; killed by a signal = transient.
        match status.code() {
            Some(75) => Err(StepError::transient(msg)),
            Some(77) => Err(StepError::auth(msg)),
            Some(_) => Err(StepError::invalid(msg)),
            None => Err(StepError::transient(msg)),
        }
    }

    async fn run_step(&self, ctx: &StepContext, run: &str, check: Option<&str>) -> Result<Value, StepError> {
        // `true` and `:` do nothing: answered in-process, without a shell
        // (what the per-step overhead benchmark measures).
        if check.is_none() && matches!(run.trim(), "true" | ":") {
            return Ok(json!({"ran": true, "exit": 0, "builtin": true}));
        }
        if let Some(check) = check {
            // The check failing just means "not done yet".
            if let Ok(log) = self.shell(ctx, check, "check").await {
                return Ok(json!({"ran": false, "reason": format!("the check `{check}` exited 0 (already done)"), "log": log}));
            }
        }
        let log = self.shell(ctx, run, "run").await?;
        Ok(json!({"ran": true, "exit": 0, "log": log, "output": tail(&log, 10)}))
    }

    /// Is the command already done? Its `check` script exiting 0 says so
    /// (the same answer [`Self::run_step`] gives when it skips the run).
    async fn is_done(&self, ctx: &StepContext, check: &str) -> Option<Value> {
        match self.shell(ctx, check, "check").await {
            Ok(log) => Some(json!({"ran": false, "reason": format!("the check `{check}` exited 0 (already done)"), "log": log})),
            Err(e) => {
                tracing::debug!(step = %ctx.label(), error = %e.message, "the check says the command is not done");
                None
            }
        }
    }
}

/// The step is not a command: the agent sent it to the wrong adapter.
fn not_mine(action: &StepAction) -> StepError {
    StepError::invalid(format!(
        "the command adapter cannot run a `{}` step; this is a bug in fleet-node's adapter selection, please report it",
        action.verb()
    ))
}

impl Adapter for CommandAdapter {
    fn name(&self) -> &'static str {
        "command"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            match action {
                StepAction::Command { run, check, .. } => self.run_step(ctx, run, check.as_deref()).await,
                other => Err(not_mine(other)),
            }
        })
    }

    fn undo<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction, out: Option<&'a Value>) -> BoxFuture<'a, Result<Value, StepError>> {
        // The undo command finds what to undo itself: the run's output is
        // not passed to it.
        let _ = out;
        Box::pin(async move {
            match action {
                StepAction::Command { undo: Some(u), .. } => self.shell(ctx, u, "undo").await.map(|log| json!({"ran": true, "log": log})),
                StepAction::Command { undo: None, .. } => Ok(json!({"ran": false})),
                other => Err(not_mine(other)),
            }
        })
    }

    fn cancelled<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, ()> {
        // The dropped future's group guard already killed the command's
        // process group: nothing else was started.
        let _ = (ctx, action);
        Box::pin(async {})
    }

    fn check<'a>(&'a self, ctx: &'a StepContext, action: &'a StepAction) -> BoxFuture<'a, Result<Option<Value>, StepError>> {
        Box::pin(async move {
            Ok(match action {
                StepAction::Command { check: Some(script), .. } => self.is_done(ctx, script).await,
                _ => None,
            })
        })
    }

    fn timeout_hint(&self, action: &StepAction) -> String {
        let _ = action;
        format!(
            "the command was killed; check that it does not wait for input, or raise `step_timeout`; its output is in {}",
            self.log_dir().display()
        )
    }
}

/// Where `script`'s output for `ctx` goes (`what`: run, undo or check).
fn log_file(dir: &Path, ctx: &StepContext, what: &str) -> PathBuf {
    dir.join(format!("{}-{}-{}-a{}.log", safe_file_part(&ctx.deployment), ctx.step, safe_file_part(what), ctx.attempt))
}
