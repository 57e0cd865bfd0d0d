//! `lock acquire|release|status|queue`: manual destination locks.

use fleet_core::deploy::DeployState;
use fleet_net::now_ms;
use fleet_proto::*;
use fleetctl::client::request_id;
use fleetctl::exit;
use fleetctl::output::{DestinationRecord, LockQueueView, LockReplyView, LockStatusView, LockView};
use fleetctl::progress::{ago, table};

use super::common::{client, parse_deployment, print_json, since, usage, Exit};
use crate::cli::{ConnArgs, LockCmd, Output};

fn outcome_name(o: LockOutcome) -> &'static str {
    match o {
        LockOutcome::Granted => "granted",
        LockOutcome::Held => "held",
        LockOutcome::Released => "released",
        LockOutcome::NotHeld => "not_held",
        LockOutcome::NotOwner => "not_owner",
        LockOutcome::Unspecified => "unspecified",
    }
}

pub async fn lock(cmd: LockCmd, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    if let LockCmd::Queue { destination } = cmd {
        return lock_queue(destination, conn, out).await;
    }
    let mut c = client(conn)?;
    match cmd {
        LockCmd::Queue { .. } => unreachable!("answered above"),
        LockCmd::Acquire { destination, message, wait } => {
            fleet_core::names::validate_name("destination", &destination).map_err(usage)?;
            let id = request_id();
            let wait = wait.unwrap_or_default();
            let started = tokio::time::Instant::now();
            // The server waits; a retry after a leader change waits only
            // for what is left.
            let bound = c.call_timeout + wait;
            c.call_with_timeout(bound, |mut cl, timeout| {
                let left = wait.saturating_sub(started.elapsed());
                let mut req = tonic::Request::new(AcquireLockRequest {
                    destination: destination.clone(),
                    reason: message.clone(),
                    wait_ms: left.as_millis() as u64,
                    request_id: id.clone(),
                });
                req.set_timeout(timeout);
                async move { cl.acquire_lock(req).await.map(|r| r.into_inner()) }
            })
            .await
            .map(|r| Ok(print_lock_reply(&r, out, !wait.is_zero())))?
        }
        LockCmd::Release { destination } => {
            fleet_core::names::validate_name("destination", &destination).map_err(usage)?;
            let id = request_id();
            let r = c
                .call(|mut cl, timeout| {
                    let mut req = tonic::Request::new(ReleaseLockRequest { destination: destination.clone(), request_id: id.clone() });
                    req.set_timeout(timeout);
                    async move { cl.release_lock(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            if out == Output::Json && r.outcome() == LockOutcome::NotHeld {
                // fall through to the common printer
            } else if r.outcome() == LockOutcome::NotHeld && out == Output::Text {
                println!("{destination} was not locked; nothing to release");
                return Ok(exit::OK);
            }
            Ok(print_lock_reply(&r, out, false))
        }
        LockCmd::Status { destination } => {
            let dest = destination.unwrap_or_default();
            let r = c
                .call(|mut cl, timeout| {
                    let mut req = tonic::Request::new(LockStatusRequest { destination: dest.clone() });
                    req.set_timeout(timeout);
                    async move { cl.lock_status(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            match out {
                Output::Json => {
                    print_json(&LockStatusView { locks: r.locks.iter().map(LockView::from).collect(), applied_index: r.applied_index })
                }
                Output::Text if r.locks.is_empty() => {
                    println!("{}", if dest.is_empty() { "no destination is locked".to_string() } else { format!("{dest} is not locked") })
                }
                Output::Text => {
                    println!("{:<24} {:<16} {:<22} {:>8}  REASON", "DESTINATION", "HOLDER", "SINCE", "TOKEN");
                    for l in &r.locks {
                        let reason: String = l.reason.chars().take(60).collect();
                        println!("{:<24} {:<16} {:<22} {:>8}  {}", l.destination, l.holder, since(l.since_ms), l.fencing_token, reason);
                    }
                }
            }
            Ok(exit::OK)
        }
    }
}

fn print_lock_reply(r: &LockReply, out: Output, waited: bool) -> i32 {
    let outcome = r.outcome();
    let code = match outcome {
        LockOutcome::Granted | LockOutcome::Released | LockOutcome::NotHeld => exit::OK,
        LockOutcome::Held if waited => exit::TIMED_OUT,
        _ => exit::REJECTED,
    };
    if out == Output::Json {
        print_json(&LockReplyView {
            outcome: outcome_name(outcome).to_string(),
            lock: r.lock.as_ref().map(LockView::from),
            applied_index: r.applied_index,
        });
        return code;
    }
    match (outcome, &r.lock) {
        (LockOutcome::Granted, Some(l)) => {
            println!("locked {} (fencing token {}, since {})", l.destination, l.fencing_token, since(l.since_ms))
        }
        (LockOutcome::Held, Some(l)) => eprintln!(
            "{} is locked by {} since {}: {}\n{}",
            l.destination,
            l.holder,
            since(l.since_ms),
            l.reason,
            if waited {
                "gave up waiting; try again later or wait longer with --wait"
            } else {
                "wait for it with --wait 10m, or ask the holder to release it"
            }
        ),
        (LockOutcome::Released, _) => println!("released"),
        (LockOutcome::NotOwner, Some(l)) => {
            eprintln!("refused: {} is held by {}, not you; only the holder can release it", l.destination, l.holder)
        }
        _ => println!("{}", outcome_name(outcome)),
    }
    code
}

/// `lock queue DEST`: who holds the destination and who waits, in order.
pub async fn lock_queue(destination: String, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let r = c.unary(ListDestinationsRequest {}, |mut cl, r| async move { cl.list_destinations(r).await }).await?;
    let records: Vec<DestinationRecord> =
        r.destinations_json.iter().map(|j| serde_json::from_str(j)).collect::<Result<_, _>>().map_err(|e| {
            anyhow::anyhow!("a coordinator sent a destination record this fleetctl cannot read ({e}); are both the same version?")
        })?;
    let dest = records
        .into_iter()
        .find(|d| d.name == destination)
        .ok_or_else(|| usage(anyhow::anyhow!("no destination `{destination}`; `fleetctl destinations` lists them")))?;
    let mut list = Vec::new();
    for id in &dest.queued {
        let req = GetDeploymentRequest { id: id.clone() };
        let reply = c.unary(req, |mut cl, r| async move { cl.get_deployment(r).await }).await?;
        list.push(parse_deployment(&reply.deployment_json)?);
    }
    if out == Output::Json {
        print_json(&LockQueueView { destination, lock_holder: dest.lock_holder, lock_token: dest.lock_token, queue: list });
        return Ok(exit::OK);
    }
    let token = dest.lock_token.map(|t| t.to_string()).unwrap_or_else(|| "null".into());
    println!(
        "{destination}: lock {}",
        dest.lock_holder.as_ref().map(|h| format!("held by {h} (token {token})")).unwrap_or_else(|| "free".into())
    );
    if list.is_empty() {
        println!("nobody waits");
        return Ok(exit::OK);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = list
        .iter()
        .enumerate()
        .map(|(i, d)| {
            vec![
                if i == 0 && d.state != DeployState::Queued { "holds".into() } else { format!("{i}") },
                d.id.clone(),
                format!("{}@{}", d.app, d.release),
                d.state.to_string(),
                d.submitted_by.clone(),
                ago(now - d.submitted_ms),
            ]
        })
        .collect();
    println!("{}", table(&["POS", "ID", "RELEASE", "STATE", "BY", "WAITING"], &rows));
    Ok(exit::OK)
}
