//! What changed between two snapshots of a deployment, and how to say it.
//!
//! The coordinator streams whole [`Deployment`] snapshots; the CLI turns
//! consecutive snapshots into events (`diff`) and prints them as plain
//! lines, progress bars or JSON objects. Everything here is pure so it can
//! be tested without a cluster.

use fleet_core::deploy::{DeployState, Deployment, StepRecord, StepStatus};
use serde::{Deserialize, Serialize};

/// The state a step event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepEventStatus {
    /// It is the step (or undo) the deployment runs now.
    Running,
    /// An attempt failed with a retryable error; another follows.
    Retrying,
    Done,
    Failed,
    Undone,
    UndoFailed,
    /// Its node was lost: not run (or not undone) there.
    Skipped,
}

impl StepEventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepEventStatus::Running => "running",
            StepEventStatus::Retrying => "retrying",
            StepEventStatus::Done => "done",
            StepEventStatus::Failed => "failed",
            StepEventStatus::Undone => "undone",
            StepEventStatus::UndoFailed => "undo_failed",
            StepEventStatus::Skipped => "skipped",
        }
    }
}

/// One thing that happened to a deployment, as `-o json` prints it (one
/// object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    /// A new line of the deployment's event log (a lifecycle transition).
    Transition {
        id: String,
        at_ms: i64,
        /// `null` for the first event (the deployment was queued).
        from: Option<DeployState>,
        to: DeployState,
        reason: String,
        actor: String,
    },
    /// A step (or its undo) started, finished, failed or is retried.
    Step {
        id: String,
        /// 1-based, as in `[3/8]` and in the server's messages.
        step: usize,
        /// Number of steps in the plan.
        of: usize,
        name: String,
        node: String,
        undo: bool,
        status: StepEventStatus,
        attempt: u32,
        error: Option<String>,
        /// How long the run (or undo) took, when it finished.
        duration_ms: Option<i64>,
    },
}

/// The step (or undo) running now: `(index, undo, attempt)`. While a
/// deployment is being cancelled, that is the forward step still in flight.
pub fn current_work(d: &Deployment) -> Option<(usize, bool, u32)> {
    if let Some(w) = d.next() {
        return Some((w.step, w.undo, w.attempt));
    }
    d.pending_forward_step().map(|i| (i, false, d.steps[i].attempt))
}

fn span(start: Option<i64>, end: Option<i64>) -> Option<i64> {
    Some(end? - start?).filter(|d| *d >= 0)
}

fn step_event(
    d: &Deployment,
    i: usize,
    s: &StepRecord,
    undo: bool,
    status: StepEventStatus,
    attempt: u32,
    error: Option<String>,
) -> WatchEvent {
    let duration_ms = match (undo, status) {
        (_, StepEventStatus::Running) => None,
        (false, _) => span(s.started_ms, s.finished_ms),
        (true, _) => span(s.undo_started_ms, s.undo_finished_ms),
    };
    WatchEvent::Step {
        id: d.id.clone(),
        step: i + 1,
        of: d.steps.len(),
        name: s.plan.name.clone(),
        node: s.plan.node.clone(),
        undo,
        status,
        attempt,
        error,
        duration_ms,
    }
}

/// Events that lead from `prev` (what was printed so far; `None` at the
/// start) to `next`, in the order they happened: finished steps and
/// lifecycle transitions by time, then the step that runs now.
pub fn diff(prev: Option<&Deployment>, next: &Deployment) -> Vec<WatchEvent> {
    // (time, tie-break, event): at equal times a step's result comes before
    // the transition it caused.
    let mut timed: Vec<(i64, u8, WatchEvent)> = Vec::new();
    let unknown_time = next.events.last().map(|e| e.at_ms).unwrap_or(next.submitted_ms);

    let seen = prev.map(|p| p.events.len()).unwrap_or(0).min(next.events.len());
    for e in &next.events[seen..] {
        timed.push((
            e.at_ms,
            1,
            WatchEvent::Transition {
                id: next.id.clone(),
                at_ms: e.at_ms,
                from: e.from,
                to: e.to,
                reason: e.reason.clone(),
                actor: e.actor.clone(),
            },
        ));
    }

    for (i, s) in next.steps.iter().enumerate() {
        let before = prev.and_then(|p| p.steps.get(i));
        let (was, was_attempt, was_undo_attempt) =
            before.map(|b| (b.status, b.attempt, b.undo_attempt)).unwrap_or((StepStatus::Pending, 1, 1));
        let fwd_at = s.finished_ms.unwrap_or(unknown_time);
        let undo_at = s.undo_finished_ms.unwrap_or(unknown_time);
        let undone = matches!(s.status, StepStatus::Undone | StepStatus::UndoFailed);
        let was_undone = matches!(was, StepStatus::Undone | StepStatus::UndoFailed);
        // Forward direction.
        if was == StepStatus::Pending && matches!(s.status, StepStatus::Done | StepStatus::Undone | StepStatus::UndoFailed) {
            timed.push((fwd_at, 0, step_event(next, i, s, false, StepEventStatus::Done, s.attempt, None)));
        } else if was != StepStatus::Skipped && s.status == StepStatus::Skipped {
            timed.push((
                unknown_time,
                0,
                step_event(next, i, s, was == StepStatus::Done, StepEventStatus::Skipped, s.attempt, s.error.clone()),
            ));
        } else if was == StepStatus::Pending && s.status == StepStatus::Failed {
            timed.push((fwd_at, 0, step_event(next, i, s, false, StepEventStatus::Failed, s.attempt, s.error.clone())));
        } else if s.status == StepStatus::Pending && s.attempt > was_attempt {
            let ev = step_event(next, i, s, false, StepEventStatus::Retrying, s.attempt - 1, s.error.clone());
            timed.push((fwd_at, 0, ev));
        }
        // Undo direction.
        if undone && !was_undone {
            let (status, error) = if s.status == StepStatus::Undone {
                (StepEventStatus::Undone, None)
            } else {
                (StepEventStatus::UndoFailed, s.error.clone())
            };
            timed.push((undo_at, 0, step_event(next, i, s, true, status, s.undo_attempt, error)));
        } else if s.status == StepStatus::Done && s.undo_attempt > was_undo_attempt {
            let ev = step_event(next, i, s, true, StepEventStatus::Retrying, s.undo_attempt - 1, s.error.clone());
            timed.push((undo_at, 0, ev));
        }
    }
    timed.sort_by_key(|(t, k, _)| (*t, *k));
    let mut out: Vec<WatchEvent> = timed.into_iter().map(|(_, _, e)| e).collect();

    let now = current_work(next);
    if let Some((i, undo, attempt)) = now {
        if now != prev.and_then(current_work) {
            out.push(step_event(next, i, &next.steps[i], undo, StepEventStatus::Running, attempt, None));
        }
    }
    out
}

/// `1.2s`, `350ms`, `2m05s`, `1h02m`.
pub fn fmt_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago` for a time `ms` before now.
pub fn ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3_600 => format!("{}m ago", s / 60),
        3_600..86_400 => format!("{}h ago", s / 3_600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// First line of a text, cut to `max` characters (errors can be long).
pub fn clip(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() <= max && !text.contains('\n') {
        return line.to_string();
    }
    let mut s: String = line.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// The first line of a text, with `…` when more lines follow (a step's
/// error can quote a log; it is printed in full once, with the step).
pub fn first_line(text: &str) -> String {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("").trim_end();
    if lines.next().is_some() {
        format!("{first} …")
    } else {
        first.to_string()
    }
}

/// One line for a step event, after the `d12 web@v2 → staging  ` prefix:
/// `[3/8] health-check web@v2 on node-1 ... done (1.2s)`.
pub fn step_text(ev: &WatchEvent) -> String {
    let WatchEvent::Step { step, of, name, undo, status, attempt, error, duration_ms, .. } = ev else {
        return String::new();
    };
    let what = if *undo { format!("[{step}/{of}] undo {name}") } else { format!("[{step}/{of}] {name}") };
    let took = duration_ms.map(|d| format!(" ({})", fmt_ms(d))).unwrap_or_default();
    let err = error.as_deref().unwrap_or("no message");
    match status {
        StepEventStatus::Running if *attempt > 1 => format!("{what} ... (attempt {attempt})"),
        StepEventStatus::Running => format!("{what} ..."),
        StepEventStatus::Retrying => format!("{what} ... attempt {attempt} failed{took}: {err}; retrying"),
        StepEventStatus::Done => format!("{what} ... done{took}"),
        StepEventStatus::Failed => format!("{what} ... failed{took}: {err}"),
        StepEventStatus::Undone => format!("{what} ... undone{took}"),
        StepEventStatus::UndoFailed => format!("{what} ... undo failed{took}: {err}"),
        StepEventStatus::Skipped => format!("{what} ... {err}"),
    }
}

/// A plain line for any event of deployment `d`.
pub fn event_line(d: &Deployment, ev: &WatchEvent) -> String {
    match ev {
        WatchEvent::Step { .. } => format!("{} {}  {}", d.id, d.label(), step_text(ev)),
        WatchEvent::Transition { from: None, to, reason, actor, .. } => {
            format!("{} {}: {to} ({reason}, by {actor})", d.id, d.label())
        }
        WatchEvent::Transition { from: Some(from), to, reason, actor, .. } => {
            let by =
                if *to == DeployState::Cancelling && !reason.contains(actor.as_str()) { format!(" (by {actor})") } else { String::new() };
            format!("{} {from} → {to}: {}{by}", d.id, first_line(reason))
        }
    }
}

/// What each node of the deployment is doing, for the progress bars:
/// `(node, "[3/8] health-check web@v2 on node-1 ... running")`, nodes in
/// plan order.
pub fn node_lines(d: &Deployment) -> Vec<(String, String)> {
    let mut nodes: Vec<&str> = Vec::new();
    for s in &d.steps {
        if !nodes.contains(&s.plan.node.as_str()) {
            nodes.push(&s.plan.node);
        }
    }
    let now = current_work(d);
    let of = d.steps.len();
    nodes
        .into_iter()
        .map(|node| {
            let text = if let Some((i, undo, attempt)) = now.filter(|(i, ..)| d.steps[*i].plan.node == node) {
                let s = &d.steps[i];
                let verb = if undo { "undoing" } else { "running" };
                let what = if undo { format!("undo {}", s.plan.name) } else { s.plan.name.clone() };
                let retry = match (&s.error, attempt > 1) {
                    (Some(e), true) => format!(" (attempt {attempt}; last: {})", clip(e, 60)),
                    (None, true) => format!(" (attempt {attempt})"),
                    _ => String::new(),
                };
                format!("[{}/{of}] {what} ... {verb}{retry}", i + 1)
            } else {
                // The step of this node that changed last.
                let last = d
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.plan.node == node && s.status != StepStatus::Pending)
                    .max_by_key(|(i, s)| (s.undo_finished_ms.or(s.finished_ms).unwrap_or(0), *i));
                match last {
                    None if d.state.is_terminal() => "nothing ran".to_string(),
                    None => "waiting".to_string(),
                    Some((i, s)) => {
                        let (what, status) = match s.status {
                            StepStatus::Done => (s.plan.name.clone(), "done".to_string()),
                            StepStatus::Failed => (s.plan.name.clone(), format!("failed: {}", clip(s.error.as_deref().unwrap_or(""), 60))),
                            StepStatus::Undone => (format!("undo {}", s.plan.name), "undone".to_string()),
                            StepStatus::UndoFailed => {
                                (format!("undo {}", s.plan.name), format!("undo failed: {}", clip(s.error.as_deref().unwrap_or(""), 60)))
                            }
                            StepStatus::Skipped => (s.plan.name.clone(), "skipped (node lost)".to_string()),
                            StepStatus::Pending => unreachable!("filtered out"),
                        };
                        let idle = if d.state.is_terminal() { "" } else { ", waiting" };
                        format!("[{}/{of}] {what} ... {status}{idle}", i + 1)
                    }
                }
            };
            (node.to_string(), text)
        })
        .collect()
}

/// `running [3/8]` / `queued` / `compensating [2/8]`: the header of a
/// deployment's progress display.
pub fn header(d: &Deployment) -> String {
    let at = current_work(d).map(|(i, undo, _)| format!(" [{}{}/{}]", if undo { "undo " } else { "" }, i + 1, d.steps.len()));
    let queued = match d.state {
        DeployState::Queued => " (waiting for the destination lock)".to_string(),
        DeployState::Paused => d.paused_reason().map(|r| format!(" ({})", first_line(r))).unwrap_or_default(),
        _ => String::new(),
    };
    format!("{} {}  {}{}{}", d.id, d.label(), d.state, at.unwrap_or_default(), queued)
}

/// Final text for an ended deployment: the summary line and, where there
/// is something to do, what to do next.
pub fn summary(d: &Deployment) -> (String, Option<String>) {
    let last = d.events.last();
    let took = last.map(|e| fmt_ms(e.at_ms - d.submitted_ms)).unwrap_or_default();
    let last_reason = first_line(last.map(|e| e.reason.as_str()).unwrap_or(""));
    let why = |to: DeployState| d.events.iter().rev().find(|e| e.to == to).map(|e| first_line(&e.reason));
    let id = &d.id;
    match d.state {
        DeployState::Succeeded => {
            let what = if let Some(of) = &d.rollback_of { format!(" (rollback of {of})") } else { String::new() };
            let mut lost: Vec<&str> = d.steps.iter().filter(|s| s.status == StepStatus::Skipped).map(|s| s.plan.node.as_str()).collect();
            lost.sort_unstable();
            lost.dedup();
            let next = (!lost.is_empty()).then(|| {
                format!(
                    "node(s) {} were lost during the deployment and did not get {}; `fleetctl nodes` shows when they are back, then deploy again",
                    lost.join(", "),
                    d.release
                )
            });
            let served = d.served_at();
            let at = if served.is_empty() {
                String::new()
            } else {
                let each: Vec<String> = served.iter().map(|s| format!("{} {}", s.node, s.address)).collect();
                format!(" ({})", each.join(", "))
            };
            let line = format!("{id} succeeded in {took}: {}@{} is live on {}{at}{what}", d.app, d.release, d.destinations().join(" + "));
            (if lost.is_empty() { line } else { format!("{line}, except on {}", lost.join(", ")) }, next)
        }
        DeployState::Failed => {
            let cause = why(DeployState::Compensating).unwrap_or_else(|| "a step failed".into());
            let live = match &d.previous_release {
                Some(p) => format!("{}@{p} is still live on {}", d.app, d.destinations().join(" + ")),
                None => format!("nothing of {} was left running on {}", d.app, d.destinations().join(" + ")),
            };
            (
                format!("{id} failed: {cause}; {last_reason}"),
                Some(format!("{live}. Fix the cause and deploy again; `fleetctl status {id}` shows every step and its error")),
            )
        }
        DeployState::Cancelled if d.timed_out => {
            let cause = why(DeployState::Cancelling).unwrap_or_else(|| "the deadline passed".into());
            (
                format!("{id} timed out after {took}: {cause}; {last_reason}"),
                Some(format!(
                    "allow more time with `--timeout` (or `timeout:` in the manifest); `fleetctl status {id}` shows which step was slow"
                )),
            )
        }
        DeployState::Cancelled => {
            let ev = d.events.iter().rev().find(|e| e.to == DeployState::Cancelling);
            let (cause, actor) = ev.map(|e| (first_line(&e.reason), e.actor.as_str())).unwrap_or(("cancelled".into(), "?"));
            if cause.contains(actor) {
                (format!("{id} cancelled: {cause}; {last_reason}"), None)
            } else {
                (format!("{id} cancelled by {actor}: {cause}; {last_reason}"), None)
            }
        }
        DeployState::CompensationFailed => (
            format!("{id} needs a human: {last_reason}"),
            Some(format!(
                "{} stays locked until then; `fleetctl status {id}` shows which undo failed and why",
                d.destinations().join(" + ")
            )),
        ),
        DeployState::Superseded => (format!("{id} did not run: {last_reason}"), None),
        s => (format!("{id} is {s}"), Some(format!("`fleetctl watch {id}` follows it"))),
    }
}

/// A text table: columns padded to their widest cell (the last column is
/// not padded), two spaces apart, one line per row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(c);
            if i + 1 < n {
                out.extend(std::iter::repeat_n(' ', widths[i].saturating_sub(c.chars().count()) + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_core::deploy::{Event, StepRecord};
    use fleet_core::manifest::{parse_manifest, Overrides};
    use fleet_core::saga::plan;

    /// A deployment of web@v2 to `staging` over nodes n1 and n2 (8 steps),
    /// queued at time 0.
    fn queued() -> Deployment {
        let spec =
            parse_manifest("f", "app: web\nrelease: v2\ndestination: staging\nrun: [srv]\nhealth: { tcp: true }\n", &Overrides::default())
                .unwrap();
        Deployment {
            id: "d12".into(),
            app: "web".into(),
            release: "v2".into(),
            destination: "staging".into(),
            spec,
            state: DeployState::Queued,
            submitted_by: "alice".into(),
            submitted_ms: 0,
            deadline_ms: 1_000_000,
            token: None,
            epoch: 1,
            previous_release: Some("v1".into()),
            rollback_of: None,
            timed_out: false,
            lock_wait_until_ms: None,
            resolved: None,
            pause: None,
            targets: vec![],
            steps: vec![],
            events: vec![Event { at_ms: 0, from: None, to: DeployState::Queued, reason: "submitted".into(), actor: "alice".into() }],
            compacted: None,
            changed: Default::default(),
        }
    }

    fn started(mut d: Deployment) -> Deployment {
        d.steps = plan(&d.spec, "staging", &["n1".into(), "n2".into()]).into_iter().map(StepRecord::new).collect();
        d.token = Some(41);
        d.transition(DeployState::Running, 10, "lock granted", "leader").unwrap();
        d
    }

    fn done(mut d: Deployment, i: usize, at: i64) -> Deployment {
        let s = &mut d.steps[i];
        s.status = StepStatus::Done;
        s.started_ms = Some(at - 200);
        s.finished_ms = Some(at);
        d
    }

    fn fail(mut d: Deployment, i: usize, at: i64, retry: bool) -> Deployment {
        let s = &mut d.steps[i];
        s.started_ms = Some(at - 100);
        s.finished_ms = Some(at);
        s.error = Some("connection refused".into());
        if retry {
            s.attempt += 1;
        } else {
            s.status = StepStatus::Failed;
            let reason = format!("step {} ({}) failed: connection refused", i + 1, s.plan.name);
            d.transition(DeployState::Compensating, at + 1, reason, "n1").unwrap();
        }
        d
    }

    fn undone(mut d: Deployment, i: usize, at: i64) -> Deployment {
        let s = &mut d.steps[i];
        s.status = StepStatus::Undone;
        s.undo_started_ms = Some(at - 50);
        s.undo_finished_ms = Some(at);
        d
    }

    fn then(mut d: Deployment, to: DeployState, at: i64, reason: &str) -> Deployment {
        d.transition(to, at, reason, "leader").unwrap();
        d
    }

    /// Events in a compact form: `T queued>running`, `S 1 done n1`, `S 2 run undo`.
    fn compact(events: &[WatchEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                WatchEvent::Transition { from, to, .. } => {
                    format!("T {}>{}", from.map(|f| f.as_str()).unwrap_or("-"), to.as_str())
                }
                WatchEvent::Step { step, undo, status, attempt, .. } => {
                    format!("S {step}{} {}#{attempt}", if *undo { " undo" } else { "" }, status.as_str())
                }
            })
            .collect()
    }

    #[test]
    fn diffs_of_consecutive_snapshots() {
        let q = queued();
        let r = started(q.clone());
        let r1 = done(r.clone(), 0, 300);
        let r12 = done(r1.clone(), 1, 500);
        let retry = fail(r12.clone(), 2, 600, true);
        let comp = fail(r12.clone(), 2, 600, false);
        let comp_undone = undone(comp.clone(), 1, 700);
        let failed = then(undone(comp_undone.clone(), 0, 800), DeployState::Failed, 801, "every completed step was undone");
        let mut all_done = r.clone();
        for i in 0..8 {
            all_done = done(all_done, i, 100 * (i as i64 + 3));
        }
        let succeeded = then(all_done.clone(), DeployState::Succeeded, 2000, "every step succeeded");
        let fast = then(undone(undone(fail(done(r1.clone(), 1, 500), 2, 600, false), 1, 700), 0, 800), DeployState::Failed, 801, "x");

        // (name, previous snapshot, next snapshot, expected events)
        let cases: Vec<(&str, Option<&Deployment>, &Deployment, Vec<&str>)> = vec![
            ("first snapshot, queued", None, &q, vec!["T ->queued"]),
            ("no change", Some(&q), &q, vec![]),
            ("lock granted: transition, then the first step runs", Some(&q), &r, vec!["T queued>running", "S 1 running#1"]),
            ("step done, next runs", Some(&r), &r1, vec!["S 1 done#1", "S 2 running#1"]),
            ("two steps at once, in order", Some(&r), &r12, vec!["S 1 done#1", "S 2 done#1", "S 3 running#1"]),
            ("retryable failure", Some(&r12), &retry, vec!["S 3 retrying#1", "S 3 running#2"]),
            (
                "failure: step result before the transition it caused, then the undo runs",
                Some(&r12),
                &comp,
                vec!["S 3 failed#1", "T running>compensating", "S 2 undo running#1"],
            ),
            ("undo done, next undo runs", Some(&comp), &comp_undone, vec!["S 2 undo undone#1", "S 1 undo running#1"]),
            ("last undo and the end", Some(&comp_undone), &failed, vec!["S 1 undo undone#1", "T compensating>failed"]),
            (
                "watching late: the whole history in time order",
                None,
                &failed,
                vec![
                    "T ->queued",
                    "T queued>running",
                    "S 1 done#1",
                    "S 2 done#1",
                    "S 3 failed#1",
                    "T running>compensating",
                    "S 2 undo undone#1",
                    "S 1 undo undone#1",
                    "T compensating>failed",
                ],
            ),
            (
                "a step done and undone between two snapshots",
                Some(&r1),
                &fast,
                vec![
                    "S 2 done#1",
                    "S 3 failed#1",
                    "T running>compensating",
                    "S 2 undo undone#1",
                    "S 1 undo undone#1",
                    "T compensating>failed",
                ],
            ),
            ("success", Some(&all_done), &succeeded, vec!["T running>succeeded"]),
        ];
        for (name, prev, next, want) in cases {
            assert_eq!(compact(&diff(prev, next)), want, "{name}");
        }
    }

    #[test]
    fn step_events_carry_what_json_consumers_need() {
        let r12 = done(done(started(queued()), 0, 300), 1, 500);
        let comp = fail(r12.clone(), 2, 600, false);
        let events = diff(Some(&r12), &comp);
        let v = serde_json::to_value(&events[0]).unwrap();
        assert_eq!(v["type"], "step");
        assert_eq!(v["id"], "d12");
        assert_eq!(v["step"], 3);
        assert_eq!(v["of"], 8);
        assert_eq!(v["node"], "n1");
        assert_eq!(v["undo"], false);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["attempt"], 1);
        assert_eq!(v["error"], "connection refused");
        assert_eq!(v["duration_ms"], 100);
        let t = serde_json::to_value(&events[1]).unwrap();
        assert_eq!(t["type"], "transition");
        assert_eq!((t["from"].as_str(), t["to"].as_str()), (Some("running"), Some("compensating")));
        assert_eq!(t["actor"], "n1");
        assert!(t["reason"].as_str().unwrap().starts_with("step 3 ("));
        let first = serde_json::to_value(&diff(None, &queued())[0]).unwrap();
        assert!(first["from"].is_null());
    }

    #[test]
    fn lines() {
        let r1 = done(started(queued()), 0, 1400);
        let ev = diff(Some(&started(queued())), &r1);
        assert_eq!(event_line(&r1, &ev[0]), "d12 web@v2 → staging  [1/8] start web@v2 on n1 ... done (200ms)");
        assert_eq!(event_line(&r1, &ev[1]), "d12 web@v2 → staging  [2/8] health-check web@v2 on n1 ...");
        let comp = fail(r1.clone(), 1, 3000, false);
        let ev = diff(Some(&r1), &comp);
        assert_eq!(event_line(&comp, &ev[1]), "d12 running → compensating: step 2 (health-check web@v2 on n1) failed: connection refused");
        let q = diff(None, &queued());
        assert_eq!(event_line(&queued(), &q[0]), "d12 web@v2 → staging: queued (submitted, by alice)");
        assert_eq!(header(&r1), "d12 web@v2 → staging  running [2/8]");
        assert_eq!(header(&queued()), "d12 web@v2 → staging  queued (waiting for the destination lock)");
    }

    #[test]
    fn node_lines_show_each_nodes_current_step() {
        let r1 = done(started(queued()), 0, 300);
        assert_eq!(
            node_lines(&r1),
            vec![("n1".to_string(), "[2/8] health-check web@v2 on n1 ... running".to_string()), ("n2".to_string(), "waiting".to_string()),]
        );
        let comp = undone(fail(done(r1, 1, 500), 2, 600, false), 1, 700);
        assert_eq!(node_lines(&comp)[0].1, "[1/8] undo start web@v2 on n1 ... undoing");
    }

    #[test]
    fn summaries() {
        let r12 = done(done(started(queued()), 0, 300), 1, 500);
        let failed =
            then(undone(undone(fail(r12, 2, 600, false), 1, 700), 0, 800), DeployState::Failed, 4200, "every completed step was undone");
        let (line, next) = summary(&failed);
        assert_eq!(line, "d12 failed: step 3 (switch route to web@v2 on n1) failed: connection refused; every completed step was undone");
        assert!(next.unwrap().starts_with("web@v1 is still live on staging."));

        let mut ok = started(queued());
        for i in 0..8 {
            ok = done(ok, i, 300 + i as i64);
        }
        let ok = then(ok, DeployState::Succeeded, 4200, "every step succeeded");
        assert_eq!(summary(&ok), ("d12 succeeded in 4.2s: web@v2 is live on staging".to_string(), None));

        let mut t = queued();
        t.cancel(90_000, "deadline of 1m30s passed", "leader", true).unwrap();
        assert_eq!(t.exit_code(), Some(5));
        assert!(summary(&t).0.starts_with("d12 timed out after 1m30s: deadline of 1m30s passed;"), "{}", summary(&t).0);

        let mut c = queued();
        c.cancel(5, "wrong release", "bob", false).unwrap();
        assert!(summary(&c).0.starts_with("d12 cancelled by bob: wrong release;"));
        let mut c = queued();
        c.cancel(5, "cancelled by bob", "bob", false).unwrap();
        assert!(summary(&c).0.starts_with("d12 cancelled: cancelled by bob;"), "{}", summary(&c).0);
        let ev = diff(None, &c);
        assert_eq!(event_line(&c, &ev[1]), "d12 queued → cancelling: cancelled by bob");
    }

    #[test]
    fn formatting_helpers() {
        let cases = [(0, "0ms"), (350, "350ms"), (1_200, "1.2s"), (125_000, "2m05s"), (3_720_000, "1h02m"), (-5, "0ms")];
        for (ms, want) in cases {
            assert_eq!(fmt_ms(ms), want);
        }
        let cases = [(5_000, "5s ago"), (300_000, "5m ago"), (7_200_000, "2h ago"), (3 * 86_400_000, "3d ago")];
        for (ms, want) in cases {
            assert_eq!(ago(ms), want);
        }
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("a long line of text", 6), "a lon…");
        assert_eq!(clip("two\nlines", 10), "two…");
        assert_eq!(first_line("one line"), "one line");
        assert_eq!(first_line("failed; its log:\n  error: x\n"), "failed; its log: …");
        assert_eq!(
            table(&["ID", "STATE", "NOTE"], &[vec!["d1".into(), "running".into(), "".into()], vec!["d12".into(), "ok".into(), "x".into()]]),
            "ID   STATE    NOTE\nd1   running\nd12  ok       x"
        );
    }
}
