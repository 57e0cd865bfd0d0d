//! Commands about deployments that exist: `watch`, `status`, `list`,
//! `history`, `cancel`, `resolve`.

use fleet_core::deploy::{DeployState, Deployment, StepStatus};
use fleet_net::now_ms;
use fleet_proto::*;
use fleetctl::client::{exit_code_of, request_id, Client};
use fleetctl::exit;
use fleetctl::output::HistoryEntry;
use fleetctl::progress::{ago, clip, current_work, fmt_ms, table};
use fleetctl::watch::{follow, Style};

use super::common::{check_id, client, failed, parse_deployment, print_json, print_json_array, since, usage, Exit};
use crate::cli::{ConnArgs, Output};

pub async fn resolve(id: String, note: String, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    check_id(&id)?;
    if note.trim().is_empty() {
        return Err(usage(anyhow::anyhow!("--note must say what you checked or fixed")));
    }
    let mut c = client(conn)?;
    let req = ResolveDeploymentRequest { id: id.clone(), note, request_id: request_id() };
    let reply = c.unary(req, |mut cl, r| async move { cl.resolve_deployment(r).await }).await.map_err(|e| failed(out, e))?;
    let d = parse_deployment(&reply.deployment_json)?;
    match out {
        Output::Json => print_json(&d),
        Output::Text => println!("{id} resolved; destination(s) {} free for the next deployment", d.destinations().join(", ")),
    }
    Ok(exit::OK)
}

pub async fn watch(id: String, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    check_id(&id)?;
    let mut c = client(conn)?;
    follow(&mut c, &id, None, Style::pick(out == Output::Json)).await.map_err(|e| Exit(exit_code_of(&e), e))
}

pub async fn cancel(id: String, reason: Option<String>, wait: bool, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    check_id(&id)?;
    let mut c = client(conn)?;
    let req = CancelDeploymentRequest { id: id.clone(), reason: reason.unwrap_or_default(), request_id: request_id() };
    let reply = c.unary(req, |mut cl, r| async move { cl.cancel_deployment(r).await }).await.map_err(|e| failed(out, e))?;
    let d = parse_deployment(&reply.deployment_json)?;
    if wait {
        return follow(&mut c, &id, Some((d, reply.applied_index)), Style::pick(out == Output::Json))
            .await
            .map_err(|e| Exit(exit_code_of(&e), e));
    }
    match out {
        Output::Json => print_json(&d),
        Output::Text => match d.state {
            DeployState::Cancelled => println!("{id} cancelled; it had not started, so there was nothing to undo"),
            DeployState::Cancelling => println!(
                "{id} is cancelling: the step in flight finishes, then every completed step is undone in reverse order.\n\
                 `fleetctl watch {id}` follows it (exit 4 once it is cancelled)"
            ),
            s => println!("{id} is {s}"),
        },
    }
    Ok(exit::OK)
}

async fn list_deployments(c: &mut Client, app: &str, destination: &str, limit: u32) -> Result<Vec<String>, Exit> {
    let req = ListDeploymentsRequest {
        app: app.to_string(),
        destination: destination.to_string(),
        limit,
        state: String::new(),
        before: String::new(),
    };
    let r = c.unary(req, |mut cl, r| async move { cl.list_deployments(r).await }).await?;
    Ok(r.deployments_json)
}

fn deployment_rows(list: &[Deployment]) -> Vec<Vec<String>> {
    let now = now_ms();
    list.iter()
        .map(|d| {
            let state = match current_work(d) {
                Some((i, undo, _)) => format!("{} [{}{}/{}]", d.state, if undo { "undo " } else { "" }, i + 1, d.steps.len()),
                None => d.state.to_string(),
            };
            vec![
                d.id.clone(),
                d.app.clone(),
                d.release.clone(),
                d.destinations().join(","),
                state,
                ago(now - d.submitted_ms),
                d.submitted_by.clone(),
            ]
        })
        .collect()
}

const DEPLOYMENT_COLUMNS: [&str; 7] = ["ID", "APP", "RELEASE", "DESTINATION", "STATE", "AGE", "BY"];

pub async fn list(limit: u32, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let items = list_deployments(&mut c, "", "", limit).await?;
    if out == Output::Json {
        print_json_array(&items)?;
        return Ok(exit::OK);
    }
    let list: Vec<Deployment> = items.iter().map(|j| parse_deployment(j)).collect::<Result<_, _>>()?;
    if list.is_empty() {
        println!("no deployments yet; `fleetctl deploy` starts one");
    } else {
        println!("{}", table(&DEPLOYMENT_COLUMNS, &deployment_rows(&list)));
    }
    Ok(exit::OK)
}

pub async fn status(id: Option<String>, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let Some(id) = id else {
        // Deployments that have not ended are few and recent.
        let items = list_deployments(&mut c, "", "", 1000).await?;
        let list: Vec<Deployment> = items
            .iter()
            .map(|j| parse_deployment(j))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|d| !d.state.is_terminal())
            .collect();
        match out {
            Output::Json => print_json(&list),
            Output::Text if list.is_empty() => println!("nothing is queued or running; `fleetctl list` shows recent deployments"),
            Output::Text => {
                println!("{}", table(&DEPLOYMENT_COLUMNS, &deployment_rows(&list)));
                println!("\n`fleetctl status ID` shows one in detail");
            }
        }
        return Ok(exit::OK);
    };
    check_id(&id)?;
    let reply = c.unary(GetDeploymentRequest { id: id.clone() }, |mut cl, r| async move { cl.get_deployment(r).await }).await?;
    match out {
        Output::Json => println!("{}", reply.deployment_json),
        Output::Text => print_detail(&parse_deployment(&reply.deployment_json)?),
    }
    Ok(exit::OK)
}

fn print_detail(d: &Deployment) {
    let now = now_ms();
    println!("{}  {}", d.id, d.label());
    let at = match current_work(d) {
        Some((i, undo, attempt)) => {
            let s = &d.steps[i];
            let what = if undo { format!("undo {}", s.plan.name) } else { s.plan.name.clone() };
            let n = if attempt > 1 { format!(", attempt {attempt}") } else { String::new() };
            format!("  (step {}/{}: {what}{n})", i + 1, d.steps.len())
        }
        None => String::new(),
    };
    let timed_out = if d.timed_out { " (timed out)" } else { "" };
    println!("state      {}{timed_out}{at}", d.state);
    if let Some(why) = d.paused_reason() {
        println!("paused     {why}");
    }
    println!("submitted  {} by {} ({})", since(d.submitted_ms), d.submitted_by, ago(now - d.submitted_ms));
    if d.state.is_terminal() {
        if let Some(e) = d.events.last() {
            println!("ended      {} after {}", since(e.at_ms), fmt_ms(e.at_ms - d.submitted_ms));
        }
    } else {
        let left = d.deadline_ms - now;
        let when = if left >= 0 { format!("in {}", fmt_ms(left)) } else { format!("{} ago", fmt_ms(-left)) };
        println!("deadline   {} ({when})", since(d.deadline_ms));
    }
    match d.token {
        Some(t) if d.state.holds_lock() => {
            println!("lock       {} held with fencing token {t}, epoch {}", d.destinations().join(", "), d.epoch)
        }
        Some(t) => println!("lock       {} released (it was held with fencing token {t})", d.destinations().join(", ")),
        None if d.state == DeployState::Queued => println!("lock       waiting for {}", d.destinations().join(", ")),
        None => {}
    }
    if let Some(p) = &d.previous_release {
        println!("replaces   {}@{p}", d.app);
    }
    if let Some(of) = &d.rollback_of {
        println!("rollback   of {of}");
    }
    if d.state.is_terminal() {
        println!("outcome    {}", fleetctl::progress::summary(d).0);
    }

    if let Some(c) = &d.compacted {
        println!(
            "steps      {} step records dropped from the history {} (coordinators keep them for the newest {} ended deployments; the events below remain)",
            c.steps,
            since(c.at_ms),
            fleet_core::state::KEEP_STEP_RECORDS
        );
    }
    if !d.steps.is_empty() {
        println!();
        let now_at = current_work(d);
        let rows: Vec<Vec<String>> = d
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let took = |a: Option<i64>, b: Option<i64>| match (a, b) {
                    (Some(a), Some(b)) => fmt_ms(b - a),
                    _ => String::new(),
                };
                let status = match (now_at, s.status) {
                    (Some((j, false, _)), _) if j == i => "running".to_string(),
                    (Some((j, true, _)), _) if j == i => "undoing".to_string(),
                    (_, StepStatus::Pending) if d.state.is_terminal() => "not run".into(),
                    (_, StepStatus::Pending) => "pending".into(),
                    (_, StepStatus::Done) => "done".into(),
                    (_, StepStatus::Failed) => "failed".into(),
                    (_, StepStatus::Undone) => format!("undone ({})", took(s.undo_started_ms, s.undo_finished_ms)),
                    (_, StepStatus::UndoFailed) => "undo failed".into(),
                    (_, StepStatus::Skipped) => "skipped (node lost)".into(),
                };
                let attempt =
                    if s.undo_started_ms.is_some() { format!("{} (undo {})", s.attempt, s.undo_attempt) } else { s.attempt.to_string() };
                let started = s.started_ms.map(|t| format!("+{}", fmt_ms(t - d.submitted_ms))).unwrap_or_default();
                vec![
                    (i + 1).to_string(),
                    s.plan.name.clone(),
                    s.plan.node.clone(),
                    status,
                    attempt,
                    started,
                    took(s.started_ms, s.finished_ms),
                    s.error.as_deref().map(|e| clip(e, 80)).unwrap_or_default(),
                ]
            })
            .collect();
        println!("{}", table(&["#", "STEP", "NODE", "STATUS", "ATTEMPT", "STARTED", "TOOK", "ERROR"], &rows));
        // Errors in full: they can quote a log.
        for (i, s) in d.steps.iter().enumerate() {
            if let (Some(e), true) = (&s.error, matches!(s.status, StepStatus::Failed | StepStatus::UndoFailed)) {
                let what = if s.status == StepStatus::UndoFailed { "undo of step" } else { "step" };
                println!("\n{what} {} ({}) failed:\n  {}", i + 1, s.plan.name, e.trim_end().replace('\n', "\n  "));
            }
        }
    }

    println!();
    let rows: Vec<Vec<String>> = d
        .events
        .iter()
        .map(|e| {
            let change = match e.from {
                Some(f) => format!("{f} → {}", e.to),
                None => e.to.to_string(),
            };
            vec![format!("+{}", fmt_ms(e.at_ms - d.submitted_ms)), change, e.actor.clone(), fleetctl::progress::first_line(&e.reason)]
        })
        .collect();
    println!("{}", table(&["AT", "EVENT", "BY", "REASON"], &rows));
}

pub async fn history(app: Option<String>, destination: Option<String>, limit: u32, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let items = list_deployments(&mut c, app.as_deref().unwrap_or(""), destination.as_deref().unwrap_or(""), limit).await?;
    let list: Vec<Deployment> = items.iter().map(|j| parse_deployment(j)).collect::<Result<_, _>>()?;
    let ended = |d: &Deployment| d.state.is_terminal().then(|| d.events.last().map(|e| e.at_ms)).flatten();
    match out {
        Output::Json => {
            let entries: Vec<HistoryEntry> = list
                .iter()
                .map(|d| HistoryEntry {
                    id: d.id.clone(),
                    app: d.app.clone(),
                    release: d.release.clone(),
                    destination: d.destination.clone(),
                    destinations: d.destinations().to_vec(),
                    state: d.state,
                    exit_code: d.exit_code(),
                    timed_out: d.timed_out,
                    submitted_by: d.submitted_by.clone(),
                    submitted_ms: d.submitted_ms,
                    ended_ms: ended(d),
                    previous_release: d.previous_release.clone(),
                    rollback_of: d.rollback_of.clone(),
                    reason: d.events.last().map(|e| e.reason.clone()),
                })
                .collect();
            print_json(&entries);
        }
        Output::Text if list.is_empty() => println!("no deployments match"),
        Output::Text => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|d| {
                    let outcome =
                        if d.state == DeployState::Cancelled && d.timed_out { "timed out".to_string() } else { d.state.to_string() };
                    let took = ended(d).map(|e| fmt_ms(e - d.submitted_ms)).unwrap_or_default();
                    let mut note = Vec::new();
                    if let Some(of) = &d.rollback_of {
                        note.push(format!("rollback of {of}"));
                    }
                    if let Some(p) = &d.previous_release {
                        note.push(format!("replaced {p}"));
                    }
                    if !matches!(d.state, DeployState::Succeeded | DeployState::Queued | DeployState::Running) {
                        let cause = d
                            .events
                            .iter()
                            .rev()
                            .find(|e| {
                                matches!(
                                    e.to,
                                    DeployState::Compensating
                                        | DeployState::Cancelling
                                        | DeployState::Superseded
                                        | DeployState::CompensationFailed
                                )
                            })
                            .map(|e| e.reason.as_str());
                        if let Some(c) = cause {
                            note.push(clip(c, 70));
                        }
                    }
                    vec![
                        d.id.clone(),
                        since(d.submitted_ms),
                        d.app.clone(),
                        d.release.clone(),
                        d.destinations().join(","),
                        outcome,
                        took,
                        note.join("; "),
                    ]
                })
                .collect();
            println!("{}", table(&["ID", "SUBMITTED", "APP", "RELEASE", "DESTINATION", "OUTCOME", "TOOK", "NOTE"], &rows));
        }
    }
    Ok(exit::OK)
}
