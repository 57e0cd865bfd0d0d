//! The agent: turns `StepAssignment`s into calls of the adapter that
//! carries out each action ([`Adapters::for_step`]) and `StepResult`s.
//!
//! It owns the rules that hold whatever the adapter:
//!
//! * **Idempotency.** A step key seen again is not run again: if it is
//!   running, its result will come; if it finished, the recorded result is
//!   sent again.
//! * **Fencing.** Per destination the highest lock token seen is kept on
//!   disk; an assignment with a lower token is refused (class `invalid`).
//! * **Timeouts and aborts.** Every step runs under its `timeout_ms`; on
//!   expiry or on `Abort` its future is dropped and the adapter removes what
//!   it had started.
//! * **Handover.** An assignment with `check_first` (a forward step taken
//!   over from a lost node) asks the adapter's `check` first; when it says
//!   the work is done, the step succeeds with its output without running
//!   again (witness action `check`).
//! * **Forget.** A `Forget` aborts what still runs for a deployment the
//!   node no longer owns and lets every adapter remove what its steps left
//!   behind.
//! * **Witness.** One JSON line per finished action (see [`crate::witness`]).
//!
//! Results go out through an unbounded channel; the connection loop sends
//! them on the current stream, and on every new stream re-sends the results
//! of the last [`RESEND`] steps (duplicates are harmless: the leader
//! ignores stale ones). The last [`JOURNAL_KEEP`] results are also kept in a
//! journal file, so a restarted node still answers a repeated step with its
//! result (instead of running it again) and re-sends results that a crash
//! kept from being delivered. A result is written to the journal before it
//! goes out and synced to disk while it travels (see [`Agent::finish`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fleet_core::deploy::ErrorClass;
use fleet_core::saga::StepAction;
use fleet_net::now_ms;
use fleet_net::wire::{class_from_wire, class_to_wire};
use fleet_proto::{Abort, Forget, StepAssignment, StepKey, StepResult};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::adapter::{Adapters, StepContext, StepError};
use crate::fencing::{Fencing, Verdict};
use crate::journal::{BackgroundSync, Journal, Position};
use crate::util::human;
use crate::witness::{Witness, WitnessLine};

/// Results re-sent on every new stream.
pub const RESEND: usize = 100;
/// Finished steps remembered for idempotency.
const REMEMBER: usize = 2000;
/// Finished steps kept in the journal file across restarts.
pub const JOURNAL_KEEP: usize = 200;
/// Timeout of an assignment that names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The wire's [`StepKey`] as a map key: the one definition of a step key,
/// with the `Eq` and `Hash` that prost does not derive.
#[derive(Debug, Clone, PartialEq)]
pub struct StepId(pub StepKey);

impl Eq for StepId {}

impl std::hash::Hash for StepId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Every field, as `PartialEq` compares them.
        let StepKey { deployment, step, undo, attempt, token, epoch } = &self.0;
        (deployment, step, undo, attempt, token, epoch).hash(state);
    }
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = &self.0;
        write!(f, "{}#{}{} attempt {}", k.deployment, k.step, if k.undo { "/undo" } else { "" }, k.attempt)
    }
}

#[derive(Default)]
struct Steps {
    /// Running steps and how to abort them.
    running: HashMap<StepId, Option<oneshot::Sender<String>>>,
    done: HashMap<StepId, StepResult>,
    /// Finish order of `done`, oldest first.
    order: VecDeque<StepId>,
    /// Running steps this node stopped on its own ([`Agent::stop_all`]).
    stopped: HashSet<StepId>,
}

pub struct Agent {
    node: String,
    adapters: Adapters,
    /// What the adapters run, refreshed in the background (`crate::report`).
    reports: std::sync::OnceLock<crate::report::Reports>,
    fencing: Fencing,
    witness: Option<Witness>,
    /// When this process started; witness lines carry it.
    boot_ms: i64,
    steps: Mutex<Steps>,
    results: mpsc::UnboundedSender<StepResult>,
    /// Where finished results are kept across restarts.
    journal: Option<(Arc<Journal>, BackgroundSync)>,
}

/// A `StepResult` as the journal stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journaled {
    deployment: String,
    step: u32,
    undo: bool,
    attempt: u32,
    token: u64,
    epoch: u64,
    ok: bool,
    output_json: String,
    error: String,
    /// `None` on success. Journals written before the class became an enum
    /// on the wire hold its name, or `""` on success: both still read.
    #[serde(default, deserialize_with = "class_or_empty")]
    error_class: Option<ErrorClass>,
    started_ms: i64,
    finished_ms: i64,
}

/// An optional error class, where `""` (an old journal's success) is none.
fn class_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ErrorClass>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => ErrorClass::deserialize(serde::de::value::StringDeserializer::<D::Error>::new(s)).map(Some),
    }
}

/// The wire value of a result's class: unset on success.
fn class_wire(class: Option<ErrorClass>) -> i32 {
    class.map_or(fleet_proto::ErrorClass::Unspecified as i32, |c| class_to_wire(c) as i32)
}

impl Journaled {
    fn of(r: &StepResult) -> Option<Journaled> {
        let k = r.key.as_ref()?;
        Some(Journaled {
            deployment: k.deployment.clone(),
            step: k.step,
            undo: k.undo,
            attempt: k.attempt,
            token: k.token,
            epoch: k.epoch,
            ok: r.ok,
            output_json: r.output_json.clone(),
            error: r.error.clone(),
            error_class: if r.ok { None } else { class_from_wire(r.error_class).ok() },
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
        })
    }
    fn result(self) -> StepResult {
        StepResult {
            key: Some(StepKey {
                deployment: self.deployment,
                step: self.step,
                undo: self.undo,
                attempt: self.attempt,
                token: self.token,
                epoch: self.epoch,
            }),
            ok: self.ok,
            output_json: self.output_json,
            error: self.error,
            error_class: class_wire(self.error_class),
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
        }
    }
}

enum Outcome {
    Done(Result<Value, StepError>),
    TimedOut,
    Aborted(String),
}

impl Agent {
    /// A new agent and the receiving end of its results. With a
    /// `journal` path, the results recorded there by a previous run are
    /// loaded (and re-sent on the first stream).
    pub fn new(
        node: String,
        adapters: Adapters,
        fencing: Fencing,
        witness: Option<Witness>,
        journal: Option<PathBuf>,
    ) -> (Arc<Agent>, mpsc::UnboundedReceiver<StepResult>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut steps = Steps::default();
        let journal = journal.and_then(|path| match Journal::open::<Journaled>(&path, JOURNAL_KEEP) {
            Ok((journal, list, skipped)) => {
                if skipped > 0 {
                    tracing::warn!(path = %path.display(), skipped, "result journal lines that do not decode were dropped (a crash mid-write leaves one)");
                }
                for j in list {
                    let r = j.result();
                    if let Some(k) = &r.key {
                        let id = StepId(k.clone());
                        if steps.done.insert(id.clone(), r).is_none() {
                            steps.order.push_back(id);
                        }
                    }
                }
                let journal = Arc::new(journal);
                match BackgroundSync::start(journal.clone()) {
                    Ok(syncer) => Some((journal, syncer)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the result journal's sync thread; running without the journal: a restart will forget finished results");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot open the result journal; running without it: a restart will forget finished results (check the data dir's permissions and free space)");
                None
            }
        });
        let agent = Agent {
            node,
            adapters,
            reports: std::sync::OnceLock::new(),
            fencing,
            witness,
            boot_ms: now_ms(),
            steps: Mutex::new(steps),
            results: tx,
            journal,
        };
        (Arc::new(agent), rx)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// What this node's adapters run, per (destination, app), refreshed
    /// every [`crate::report::REPORT_EVERY`] by a task started on the first
    /// call (within a tokio runtime); sent to the leader on every change.
    pub fn instance_reports(&self) -> crate::report::Reports {
        self.reports.get_or_init(|| crate::report::spawn(self.adapters.clone(), crate::report::REPORT_EVERY)).clone()
    }

    fn steps(&self) -> MutexGuard<'_, Steps> {
        self.steps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys of the steps running now (for `Hello.running`).
    pub fn running(&self) -> Vec<StepKey> {
        self.steps().running.keys().map(|id| id.0.clone()).collect()
    }

    /// The results of the last `n` finished steps, oldest first.
    pub fn recent_results(&self, n: usize) -> Vec<StepResult> {
        let s = self.steps();
        let skip = s.order.len().saturating_sub(n);
        s.order.iter().skip(skip).filter_map(|k| s.done.get(k).cloned()).collect()
    }

    /// The recorded result of a finished step.
    pub fn result_of(&self, key: &StepKey) -> Option<StepResult> {
        self.steps().done.get(&StepId(key.clone())).cloned()
    }

    /// Take an assignment: run it (in a task) unless it is a duplicate.
    pub fn assign(self: &Arc<Self>, a: StepAssignment) {
        let Some(key) = a.key.clone() else {
            tracing::warn!("assignment without a step key ignored");
            return;
        };
        let id = StepId(key.clone());
        let (abort_tx, abort_rx) = oneshot::channel();
        {
            let mut s = self.steps();
            if s.running.contains_key(&id) {
                tracing::debug!(step = %id, "assignment repeated while running; its result will follow");
                return;
            }
            if let Some(r) = s.done.get(&id) {
                tracing::debug!(step = %id, "assignment repeated after it finished; sending its result again");
                let _ = self.results.send(r.clone());
                return;
            }
            s.running.insert(id.clone(), Some(abort_tx));
        }
        let fenced = self.fencing.check(&a.destination, key.token);
        let now = now_ms();
        let refuse = |error: String, class: ErrorClass| StepResult {
            key: Some(key.clone()),
            ok: false,
            output_json: String::new(),
            error,
            error_class: class_wire(Some(class)),
            started_ms: now,
            finished_ms: now,
        };
        let sync = match fenced {
            Ok(Verdict::Accept { sync }) => sync,
            Ok(Verdict::Stale { highest }) => {
                let r = refuse(
                    format!(
                        "stale fencing token {} < highest seen {highest} for destination {}; this step belongs to a deployment that no longer holds the lock",
                        key.token, a.destination
                    ),
                    ErrorClass::Invalid,
                );
                tracing::warn!(step = %id, destination = %a.destination, token = key.token, highest, "refused: stale fencing token");
                crate::metrics::stale_token_refused();
                self.finish(id, r);
                return;
            }
            Err(e) => {
                let r = refuse(format!("{e}; the step was not run"), ErrorClass::Resource);
                self.finish(id, r);
                return;
            }
        };
        let agent = self.clone();
        tokio::spawn(async move {
            // A new highest token is on disk before its step acts; steps
            // starting together share the sync, off the runtime's workers.
            if let Some(at) = sync {
                let me = agent.clone();
                let synced = tokio::task::spawn_blocking(move || me.fencing.sync(at).map_err(|e| e.to_string()))
                    .await
                    .unwrap_or_else(|e| Err(format!("the fencing sync did not finish: {e}")));
                if let Err(e) = synced {
                    let r = result(&key, Err(StepError::resource(format!("{e}; the step was not run"))), now, now_ms());
                    agent.finish(id, r);
                    return;
                }
            }
            agent.execute(a, key, id, abort_rx).await
        });
    }

    /// Stop every running step on this node's own account (it has been
    /// without a leader for as long as its lease allows; see
    /// `connection::stop_after`). Each reports a `transient` failure, not
    /// `aborted`: a leader that did not hand the step over retries it.
    /// Answers how many were running.
    pub fn stop_all(&self, reason: &str) -> usize {
        let ids: Vec<StepId> = {
            let mut s = self.steps();
            let ids: Vec<StepId> = s.running.keys().cloned().collect();
            s.stopped.extend(ids.iter().cloned());
            ids
        };
        for id in &ids {
            self.abort(Abort { key: Some(id.0.clone()), reason: reason.to_string() });
        }
        ids.len()
    }

    /// Abort a running step (it reports `aborted`); unknown or finished
    /// steps are left alone.
    pub fn abort(&self, a: Abort) {
        let Some(key) = a.key else { return };
        let id = StepId(key);
        let tx = self.steps().running.get_mut(&id).and_then(Option::take);
        match tx {
            Some(tx) => {
                tracing::info!(step = %id, reason = %a.reason, "aborting");
                let _ = tx.send(a.reason);
            }
            None => tracing::debug!(step = %id, "abort for a step that is not running"),
        }
    }

    /// The node no longer owns any work of `f.deployment`: abort its
    /// running steps fenced by another token or epoch than the deployment's
    /// current one (the same rule as `Deployment::fence`; they report
    /// `aborted`), then let the
    /// adapter remove what its steps left behind (in a task; each removal
    /// is logged). A repeated `Forget` finds nothing to do.
    pub fn forget(&self, f: Forget) {
        let why =
            if f.reason.is_empty() { "the leader says this node no longer owns the deployment".to_string() } else { f.reason.clone() };
        let (stale, current): (Vec<StepId>, Vec<StepId>) = {
            let s = self.steps();
            s.running.keys().filter(|k| k.0.deployment == f.deployment).cloned().partition(|k| (k.0.token, k.0.epoch) != (f.token, f.epoch))
        };
        for id in stale {
            self.abort(Abort { key: Some(id.0), reason: format!("forgotten: {why}") });
        }
        if let Some(step) = current.first() {
            // The leader gave this node work of the deployment at the
            // current epoch: what is staged may be that step's.
            tracing::warn!(
                deployment = %f.deployment, step = %step, epoch = f.epoch,
                "Forget while a step of the current epoch runs here; nothing left behind is removed (the leader will send Forget again if it still applies)"
            );
            return;
        }
        let adapters = self.adapters.clone();
        // Detached: a forget is complete when it returns, and a node that
        // stops meanwhile is sent the Forget again by the leader.
        tokio::spawn(async move {
            let mut removed = Vec::new();
            for adapter in adapters.iter() {
                removed.extend(adapter.forget(&f.destination, f.token).await);
            }
            if removed.is_empty() {
                tracing::debug!(deployment = %f.deployment, destination = %f.destination, token = f.token, "forgotten deployment left nothing behind here");
            }
            for what in removed {
                tracing::info!(deployment = %f.deployment, destination = %f.destination, token = f.token, reason = %why, "removed what a forgotten deployment left behind: {what}");
            }
        });
    }

    fn finish(&self, id: StepId, r: StepResult) {
        {
            let mut s = self.steps();
            s.running.remove(&id);
            if s.done.insert(id.clone(), r.clone()).is_none() {
                s.order.push_back(id);
            }
            while s.order.len() > REMEMBER {
                if let Some(old) = s.order.pop_front() {
                    s.done.remove(&old);
                }
            }
        }
        // Written before it goes out (so a node killed after sending still
        // has it), synced while it travels: the leader needs a commit of
        // its own (longer than this node's fdatasync) before anything
        // depends on it, and until the sync ends the result is only as
        // exposed to a power loss as it was before it was sent.
        let written = self.journal_write(&r);
        let _ = self.results.send(r);
        if let (Some((_, syncer)), Some(at)) = (&self.journal, written) {
            syncer.sync_later(at);
        }
    }

    /// Write a result to the journal (not yet synced: see `finish`).
    fn journal_write(&self, r: &StepResult) -> Option<Position> {
        let (Some((journal, _)), Some(line)) = (&self.journal, Journaled::of(r)) else { return None };
        journal
            .write(&line)
            .inspect_err(|e| tracing::error!(path = %journal.path().display(), error = %e, "cannot write the result journal; a restart would forget this result"))
            .ok()
    }

    async fn execute(self: Arc<Self>, a: StepAssignment, key: StepKey, id: StepId, abort_rx: oneshot::Receiver<String>) {
        let started_ms = now_ms();
        let timeout = if a.timeout_ms == 0 { DEFAULT_TIMEOUT } else { Duration::from_millis(a.timeout_ms) };
        let ctx = StepContext {
            node: self.node.clone(),
            destination: a.destination.clone(),
            deployment: key.deployment.clone(),
            step: key.step,
            attempt: key.attempt,
            undo: key.undo,
            token: key.token,
            timeout,
        };
        let action: StepAction = match serde_json::from_str(&a.action_json) {
            Ok(action) => action,
            Err(e) => {
                let err = StepError::invalid(format!(
                    "this node cannot read the step's action ({e}); is fleet-node ({}) older than the coordinators? Upgrade it",
                    env!("CARGO_PKG_VERSION")
                ));
                let r = result(&key, Err(err), started_ms, now_ms());
                self.finish(id, r);
                return;
            }
        };
        let run_output: Option<Value> = if a.run_output_json.trim().is_empty() {
            None
        } else {
            match serde_json::from_str(&a.run_output_json) {
                Ok(v) => Some(v),
                Err(e) => {
                    let err = StepError::invalid(format!("the recorded output of the forward step is not JSON ({e}); nothing was undone"));
                    let r = result(&key, Err(err), started_ms, now_ms());
                    self.finish(id, r);
                    return;
                }
            }
        };
        let adapter = match self.adapters.for_step(&a.adapter, &action) {
            Ok(adapter) => adapter.clone(),
            Err(err) => {
                let r = result(&key, Err(err), started_ms, now_ms());
                self.finish(id, r);
                return;
            }
        };
        // One line per step at `info`, when it ends (with what it ran on);
        // its start is at `debug` (two lines per step were about a tenth of
        // a busy node's CPU; `fleetctl status` shows a step in flight).
        tracing::debug!(step = %id, action = action.verb(), adapter = adapter.name(), app = %a.app, release = %a.release, "step started");
        crate::metrics::step_started();
        // Set when the check said the work is done (nothing was run).
        let mut checked = false;
        let fut = async {
            if ctx.undo {
                return adapter.undo(&ctx, &action, run_output.as_ref()).await;
            }
            if a.check_first {
                match adapter.check(&ctx, &action).await {
                    Ok(Some(out)) => {
                        tracing::info!(step = %id, action = action.verb(), "step already done on this node per its check; not run again");
                        checked = true;
                        return Ok(out);
                    }
                    Ok(None) => {
                        tracing::info!(step = %id, action = action.verb(), "handed-over step not done here per its check; running it")
                    }
                    Err(e) => tracing::warn!(
                        step = %id, action = action.verb(), class = ?e.class, error = %e.message,
                        "the check of a handed-over step failed, so it is not known to be done; running it"
                    ),
                }
            }
            adapter.run(&ctx, &action).await
        };
        let aborted = async {
            match abort_rx.await {
                Ok(reason) => reason,
                Err(_) => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, fut) => match r {
                Ok(r) => Outcome::Done(r),
                Err(_) => Outcome::TimedOut,
            },
            reason = aborted => Outcome::Aborted(reason),
        };
        let stopped_here = self.steps().stopped.remove(&id);
        let outcome = match outcome {
            Outcome::Done(r) => r,
            Outcome::TimedOut => {
                adapter.cancelled(&ctx, &action).await;
                Err(StepError::transient(format!(
                    "{} {} timed out after {} and was stopped; {}",
                    if ctx.undo { "undo of" } else { "step" },
                    describe(&action),
                    human(timeout),
                    adapter.timeout_hint(&action)
                )))
            }
            Outcome::Aborted(reason) if stopped_here => {
                adapter.cancelled(&ctx, &action).await;
                Err(StepError::transient(format!("{} was stopped on node {} ({reason})", describe(&action), self.node)))
            }
            Outcome::Aborted(reason) => {
                adapter.cancelled(&ctx, &action).await;
                let why = if reason.is_empty() { String::new() } else { format!(" ({reason})") };
                Err(StepError::new(ErrorClass::Aborted, format!("{} was aborted by the leader{why} and stopped", describe(&action))))
            }
        };
        let finished_ms = now_ms();
        crate::metrics::step_finished(
            adapter.name(),
            outcome.is_ok(),
            ctx.undo,
            Duration::from_millis((finished_ms - started_ms).max(0) as u64),
        );
        match &outcome {
            Ok(_) => tracing::info!(
                step = %id, action = action.verb(), adapter = adapter.name(), app = %a.app, release = %a.release,
                ms = finished_ms - started_ms, "step succeeded"
            ),
            Err(e) => tracing::warn!(
                step = %id, action = action.verb(), adapter = adapter.name(), app = %a.app, release = %a.release,
                ms = finished_ms - started_ms, class = ?e.class, error = %e.message, "step failed"
            ),
        }
        if let Some(w) = &self.witness {
            let line = WitnessLine {
                node: self.node.clone(),
                boot_ms: self.boot_ms,
                destination: a.destination.clone(),
                deployment: key.deployment.clone(),
                step: key.step,
                undo: key.undo,
                attempt: key.attempt,
                token: key.token,
                action: if checked { "check".to_string() } else { action.verb().to_string() },
                start_ms: started_ms,
                end_ms: finished_ms,
                ok: outcome.is_ok(),
            };
            if let Err(e) = w.record(&line) {
                tracing::error!(path = %w.path().display(), error = %e, "cannot append to the witness file");
            }
        }
        let r = result(&key, outcome, started_ms, finished_ms);
        self.finish(id, r);
    }
}

fn describe(action: &StepAction) -> String {
    match action {
        StepAction::StartInstance { app, release, .. } => format!("start {app}@{release}"),
        StepAction::StartContainer { app, release, .. } => format!("start of {app}@{release}'s container"),
        StepAction::HealthCheck { app, release, .. } => format!("health check of {app}@{release}"),
        StepAction::SwitchRoute { app, release, .. } => format!("switch of {app}'s route to {release}"),
        StepAction::StopOld { app, .. } => format!("stop of the previous {app}"),
        StepAction::StopCurrent { app, .. } => format!("stop of the current {app}"),
        StepAction::CanaryPause { app, release, .. } => format!("canary analysis of {app}@{release}"),
        StepAction::Command { run, .. } => format!("command `{run}`"),
    }
}

fn result(key: &StepKey, r: Result<Value, StepError>, started_ms: i64, finished_ms: i64) -> StepResult {
    match r {
        Ok(v) => StepResult {
            key: Some(key.clone()),
            ok: true,
            output_json: v.to_string(),
            error: String::new(),
            error_class: class_wire(None),
            started_ms,
            finished_ms,
        },
        Err(e) => StepResult {
            key: Some(key.clone()),
            ok: false,
            output_json: String::new(),
            error: e.message,
            error_class: class_wire(Some(e.class)),
            started_ms,
            finished_ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journaled(class: &str) -> String {
        format!(
            r#"{{"deployment":"d","step":1,"undo":false,"attempt":1,"token":3,"epoch":1,"ok":false,"output_json":"","error":"x","error_class":{class},"started_ms":1,"finished_ms":2}}"#
        )
    }

    #[test]
    fn the_journal_reads_old_class_names_and_writes_typed_classes() {
        let old: Journaled = serde_json::from_str(&journaled(r#""resource""#)).unwrap();
        assert_eq!(old.error_class, Some(ErrorClass::Resource));
        assert_eq!(old.result().error_class, fleet_proto::ErrorClass::Resource as i32);
        let old_ok: Journaled = serde_json::from_str(&journaled(r#""""#)).unwrap();
        assert_eq!((old_ok.error_class, old_ok.result().error_class), (None, 0));
        let new_ok: Journaled = serde_json::from_str(&journaled("null")).unwrap();
        assert_eq!(new_ok.error_class, None);
        // An unknown name is an error, never silently some class.
        assert!(serde_json::from_str::<Journaled>(&journaled(r#""later""#)).is_err());

        // What is written reads back to the same result.
        let r = result(&StepKey::default(), Err(StepError::new(ErrorClass::Aborted, "stop")), 1, 2);
        assert_eq!(r.error_class, fleet_proto::ErrorClass::Aborted as i32);
        let text = serde_json::to_string(&Journaled::of(&r).unwrap()).unwrap();
        assert!(text.contains(r#""error_class":"aborted""#), "{text}");
        assert_eq!(serde_json::from_str::<Journaled>(&text).unwrap().result(), r);
    }
}
