//! `deploy` and `rollback`: submit a deployment, then print its id or
//! follow it to the end; `deploy --dry-run` prints the plan.

use fleet_core::manifest::{parse_manifest, Overrides};
use fleet_proto::*;
use fleetctl::client::{exit_code_of, request_id, Client};
use fleetctl::exit;
use fleetctl::output::{Line, Plan, Submitted};
use fleetctl::progress::{fmt_ms, table};
use fleetctl::watch::{follow, Style};

use super::common::{check_id, client, failed, invalid, ms, parse_deployment, print_json, read_file, usage, Exit};
use crate::cli::{ConnArgs, DeployArgs, Output, RollbackArgs};
use fleet_core::deploy::DeployState;

pub async fn deploy(a: DeployArgs, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let file_name = a.file.display().to_string();
    let text = match read_file(
        out,
        &a.file,
        "manifest",
        "run fleetctl in the directory that holds fleet.yaml, or pass -f FILE; `fleetctl deploy --help` shows an example",
    ) {
        Ok(t) => t,
        Err(code) => return Ok(code),
    };
    let overrides =
        Overrides { release: a.release.clone(), destinations: a.destinations.clone(), timeout_ms: a.timeout.map(|t| ms(Some(t))) };
    if a.timeout.is_some_and(|t| t.is_zero()) {
        return Err(usage(anyhow::anyhow!("--timeout must be longer than zero, e.g. 10m")));
    }
    if let Err(e) = parse_manifest(&file_name, &text, &overrides) {
        return Ok(invalid(
            out,
            &e,
            &format!("fix `{}` in {file_name} and run again; `fleetctl deploy --help` shows a complete fleet.yaml", e.field),
        ));
    }
    let key = match a.idempotency_key {
        Some(k) if k.is_empty() || k.len() > 128 || k.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            return Err(usage(anyhow::anyhow!("--idempotency-key must be 1 to 128 printable characters without spaces")));
        }
        Some(k) => k,
        None => String::new(),
    };
    if a.lock_wait.is_some_and(|t| t.is_zero()) {
        return Err(usage(anyhow::anyhow!("--lock-wait must be longer than zero, e.g. 10m")));
    }
    let mut c = client(conn)?;
    let req = SubmitDeploymentRequest {
        manifest_yaml: text,
        file_name,
        release: a.release.unwrap_or_default(),
        destinations: a.destinations,
        timeout_ms: ms(a.timeout),
        request_id: request_id(),
        lock_wait_ms: ms(a.lock_wait),
        idempotency_key: key,
        dry_run: a.dry_run,
    };
    let reply = c.unary(req, |mut cl, r| async move { cl.submit_deployment(r).await }).await.map_err(|e| failed(out, e))?;
    if a.dry_run {
        return print_plan(&reply, out);
    }
    submitted(&mut c, reply, a.detach, out).await
}

/// What each step's undo does, for the dry-run plan.
fn undo_of(action: &fleet_core::saga::StepAction) -> String {
    use fleet_core::saga::StepAction::*;
    match action {
        StartInstance { .. } => "stop the new instance, free its port".into(),
        StartContainer { .. } => "stop and remove the new container".into(),
        HealthCheck { .. } => "nothing".into(),
        SwitchRoute { .. } => "point the route back at the previous instance".into(),
        StopOld { .. } => "start the previous release again on its port".into(),
        StopCurrent { .. } => "start the stopped release again and route to it".into(),
        CanaryPause { .. } => "nothing (the canary's nodes are undone by their own steps)".into(),
        Command { undo: Some(u), .. } => format!("run `{u}`"),
        Command { undo: None, .. } => "nothing".into(),
    }
}

fn print_plan(reply: &DeploymentReply, out: Output) -> Result<i32, Exit> {
    let d = parse_deployment(&reply.deployment_json)?;
    if out == Output::Json {
        print_json(&Line::Plan(Box::new(Plan { deployment: d })));
        return Ok(exit::OK);
    }
    println!("plan for {}@{} → {} (dry run: nothing was submitted)", d.app, d.release, d.destinations().join(" + "));
    let rows: Vec<Vec<String>> = d
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vec![
                format!("{}", i + 1),
                s.plan.name.clone(),
                s.plan.node.clone(),
                if s.plan.reversible { undo_of(&s.plan.action) } else { "irreversible".into() },
                fmt_ms(s.plan.timeout_ms as i64),
            ]
        })
        .collect();
    println!("{}", table(&["#", "STEP", "NODE", "UNDO", "TIMEOUT"], &rows));
    if let Some(c) = &d.spec.canary {
        let how = match (c.pause_ms, &c.analysis) {
            (Some(p), Some(a)) => format!("for {} while its analysis ({}) passes", fmt_ms(p as i64), a.describe()),
            (Some(p), None) => format!("for {} (or until `fleetctl promote`)", fmt_ms(p as i64)),
            (None, _) => "until `fleetctl promote` (bounded by the deadline)".into(),
        };
        println!("canary: the deployment pauses after {} node(s) {how}; `fleetctl cancel` undoes it", c.nodes);
    }
    println!("on failure, completed steps are undone in reverse order");
    Ok(exit::OK)
}

pub async fn rollback(a: RollbackArgs, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    check_id(&a.id)?;
    if let Some(r) = &a.to {
        fleet_core::names::validate_name("release", r).map_err(usage)?;
    }
    let mut c = client(conn)?;
    let req = RollbackDeploymentRequest {
        id: a.id.clone(),
        to_release: a.to.unwrap_or_default(),
        timeout_ms: ms(a.timeout),
        request_id: request_id(),
    };
    let reply = c.unary(req, |mut cl, r| async move { cl.rollback_deployment(r).await }).await.map_err(|e| failed(out, e))?;
    submitted(&mut c, reply, a.detach, out).await
}

/// `promote ID`: a paused canary goes on (with `--wait`, followed to its end).
pub async fn promote(id: String, wait: bool, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    check_id(&id)?;
    let mut c = client(conn)?;
    let req = PromoteDeploymentRequest { id: id.clone(), request_id: request_id() };
    let reply = c.unary(req, |mut cl, r| async move { cl.promote_deployment(r).await }).await.map_err(|e| failed(out, e))?;
    let d = parse_deployment(&reply.deployment_json)?;
    if wait {
        return follow(&mut c, &id, Some((d, reply.applied_index)), Style::pick(out == Output::Json))
            .await
            .map_err(|e| Exit(exit_code_of(&e), e));
    }
    match out {
        Output::Json => print_json(&d),
        Output::Text => match d.state {
            DeployState::Paused => println!("{id}: promote requested; its canary analysis is being stopped, then it goes on"),
            s => println!("{id} promoted; it is {s}. `fleetctl watch {id}` follows it (exit 0 once it succeeds)"),
        },
    }
    Ok(exit::OK)
}

/// After a submit (deploy or rollback): print the id and return, or follow.
async fn submitted(c: &mut Client, reply: DeploymentReply, detach: bool, out: Output) -> Result<i32, Exit> {
    let d = parse_deployment(&reply.deployment_json)?;
    if out == Output::Json {
        print_json(&Line::Submitted(Submitted::of(&d)));
    }
    if detach {
        if out == Output::Text {
            println!("{}", d.id);
        }
        return Ok(exit::OK);
    }
    let id = d.id.clone();
    follow(c, &id, Some((d, reply.applied_index)), Style::pick(out == Output::Json)).await.map_err(|e| Exit(exit_code_of(&e), e))
}
