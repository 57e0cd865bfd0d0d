//! Deployment, destination and node commands of the `fleetctl` binary.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use fleet_core::deploy::{DeployState, Deployment, StepStatus};
use fleet_core::manifest::{parse_destinations, parse_manifest, ManifestError, Overrides};
use fleet_proto::*;
use fleetctl::client::{exit_code_of, request_id, Client};
use fleetctl::exit;
use fleetctl::progress::{ago, clip, current_work, fmt_ms, table};
use fleetctl::watch::{follow, submitted_json, Style};
use serde_json::{json, Value};

use crate::{client, since, usage, ConnArgs, Exit, Output};

pub const DEPLOY_ABOUT: &str = "\
Deploy a release of an app to a destination, and follow it to the end.

fleetctl reads the manifest (./fleet.yaml unless -f says otherwise) and validates it here first, so a \
typo costs no round trip and submits nothing. The cluster then queues the deployment behind any other \
one on the same destination (one at a time, always), plans it into steps — node by node: start the new \
release next to the old one, health-check it, switch the route, stop the old one — and runs them on the \
destination's worker nodes. If a step fails, every completed step is undone in reverse order.

Several destinations (--destination twice, or `destinations: [a, b]`) make a stack: one saga that takes \
every destination's lock in one step (so two stacks never deadlock) and succeeds or is undone as a whole. \
A `command` destination runs the manifest's `steps:` (terraform, ansible, compose, scripts) once each on \
one of its nodes; if that node dies mid-step, the step moves to another node, which runs its `check` first.

Unless --detach is given, fleetctl follows the deployment until it ends: progress bars on a terminal, one \
plain line per change otherwise, and with -o json one JSON object per line: \
{\"type\":\"submitted\",...}, {\"type\":\"transition\",...} per lifecycle change, {\"type\":\"step\",...} per \
step change, and a final {\"type\":\"result\",\"exit_code\":N,\"deployment\":{...}}. Ctrl-C stops watching, \
not the deployment; `fleetctl watch ID` picks it up again.

Exit codes (CI can rely on them):
  0  succeeded
  1  error talking to the cluster
  2  invalid manifest or usage; nothing was submitted
  3  failed; every completed step was undone
  4  cancelled (or superseded by a newer deployment under the `coalesce` policy)
  5  timed out: the deadline (--timeout) passed; what ran was undone
  6  undoing failed: a human must check the destination (it stays locked)
  7  rejected: the destination is busy and its queue policy is `reject`";

pub const DEPLOY_EXAMPLES: &str = "\
A fleet.yaml:

  app: web
  release: v2
  destination: staging
  # {port} and {release} are filled in; $PORT and $FLEET_RELEASE are set too
  run: [\"./web-server\", \"--port\", \"{port}\"]
  env: { GREETING: hello }
  health:                  # exactly one of http: /path, tcp: true, command: [...]
    http: /healthz
    interval: 200ms
    timeout: 1s
    healthy_threshold: 2   # consecutive passes needed
    deadline: 20s          # give up (and undo) after this long
  # optional: strategy: { max_unavailable: 1 }    nodes switched at once
  #           hooks: { pre: [\"...\"], post: [\"...\"] }
  #           retry: { max_attempts: 3, backoff: 500ms }
  #           timeout: 30m   step_timeout: 5m   port: 8080   drain: 5s

A fleet.yaml for a `command` destination (instead of run: and health:):

  app: network
  release: v7
  destination: infra
  steps:
    - { name: plan,  run: \"terraform plan -out tf.plan\" }
    - { name: apply, run: \"terraform apply tf.plan\", check: \"./applied v7\", undo: \"./restore v6\", timeout: 20m }
    - { name: migrate, run: \"./migrate\", irreversible: true }   # never undone: a failure after it needs a human
  # commands exit 75 for a temporary failure (retried), 77 for a refused credential (fails at once)

Examples:
  fleetctl deploy                                   # ./fleet.yaml; follow it to the end
  fleetctl deploy -f web.yaml --release v3 --destination prod --timeout 15m
  fleetctl deploy --destination db --destination web  # a stack: both or neither
  id=$(fleetctl deploy --detach) && fleetctl watch \"$id\"
  fleetctl deploy -o json | jq -c 'select(.type == \"result\")'
  fleetctl rollback d12                             # back to the release before d12";

#[derive(Args)]
pub struct DeployArgs {
    /// The manifest to deploy.
    #[arg(short = 'f', long = "file", value_name = "FILE", default_value = "fleet.yaml")]
    file: PathBuf,
    /// Deploy to this destination instead of the manifest's `destination:`;
    /// repeat it for a stack (all or nothing, locks taken together).
    #[arg(long = "destination", value_name = "D")]
    destinations: Vec<String>,
    /// Deploy this release instead of the manifest's `release:`.
    #[arg(long, value_name = "R")]
    release: Option<String>,
    /// Print the deployment's id (JSON: the `submitted` object) and return
    /// at once; `fleetctl watch ID` follows it later.
    #[arg(long)]
    detach: bool,
    /// Deadline of the whole deployment, counted from submission (e.g.
    /// 10m). When it passes, the cluster cancels the deployment and undoes
    /// what ran (exit 5). Default: the manifest's `timeout:`, else 30m.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Running the command again with the same key (from the same
    /// certificate) returns the same deployment instead of submitting a
    /// second one, however much later (for CI jobs that retry).
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Give up if the destination lock is not granted within this long
    /// (e.g. 10m): the deployment ends cancelled, exit 5. Default: wait
    /// until the deadline.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    lock_wait: Option<Duration>,
    /// Print the plan (steps per node, what each undo does) against the
    /// cluster's current nodes and change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
pub struct RollbackArgs {
    /// The deployment whose app and destination to roll back (e.g. d12).
    id: String,
    /// Release to go back to (default: the last release that succeeded on
    /// the destination before ID).
    #[arg(long = "to", value_name = "RELEASE")]
    to: Option<String>,
    /// Print the rollback's id and return at once.
    #[arg(long)]
    detach: bool,
    /// Deadline of the rollback, counted from submission.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Subcommand)]
pub enum DestinationsCmd {
    /// List the destinations (what `fleetctl destinations` does).
    List,
    /// Create or replace the destinations a YAML file describes; the others
    /// stay as they are.
    #[command(after_long_help = DESTINATIONS_EXAMPLE)]
    Apply {
        /// The destinations file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
}

pub const DESTINATIONS_EXAMPLE: &str = "\
A destinations file:

  destinations:
    - name: staging
      adapter: process          # the default (and, for now, the only one)
      selector: { env: staging } # nodes whose labels include all of these
      queue: queue               # queue (FIFO, default) | coalesce | reject
    - name: prod
      selector: { env: prod }
      queue: reject

Example:
  fleetctl destinations apply -f destinations.yaml";

// ------------------------------------------------------------------ helpers

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A call's error as an exit: in JSON mode also a `{"type":"error"}` line
/// on stdout, so a CI job parsing the output sees why.
fn failed(out: Output, e: anyhow::Error) -> Exit {
    let code = exit_code_of(&e);
    if out == Output::Json {
        println!("{}", json!({"type": "error", "exit_code": code, "message": format!("{e:#}")}));
    }
    Exit(code, e)
}

/// An invalid local file: `error: fleet.yaml: health.interval: ...` plus a
/// hint, exit 2; nothing was sent.
fn invalid(out: Output, e: &ManifestError, hint: &str) -> i32 {
    eprintln!("error: {e}");
    eprintln!("hint: nothing was submitted; {hint}");
    if out == Output::Json {
        println!(
            "{}",
            json!({"type": "error", "exit_code": exit::USAGE, "error": "invalid_file", "file": e.file, "field": e.field, "reason": e.reason})
        );
    }
    exit::USAGE
}

fn read_file(out: Output, path: &Path, what: &str, hint: &str) -> Result<String, i32> {
    std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: cannot read {what} {}: {e}", path.display());
        eprintln!("hint: {hint}");
        if out == Output::Json {
            println!(
                "{}",
                json!({"type": "error", "exit_code": exit::USAGE, "error": "unreadable_file", "file": path.display().to_string(), "reason": e.to_string()})
            );
        }
        exit::USAGE
    })
}

fn check_id(id: &str) -> Result<(), Exit> {
    if fleet_core::state::deployment_number(id).is_none() {
        return Err(usage(anyhow::anyhow!("`{id}` is not a deployment id; ids look like d12, and `fleetctl list` shows them")));
    }
    Ok(())
}

fn parse_deployment(json: &str) -> Result<Deployment, Exit> {
    serde_json::from_str(json)
        .map_err(|e| anyhow::anyhow!("a coordinator sent a deployment this fleetctl cannot read ({e}); are both the same version?").into())
}

fn ms(d: Option<Duration>) -> u64 {
    d.map(|d| d.as_millis().min(u64::MAX as u128) as u64).unwrap_or(0)
}

/// After a submit (deploy or rollback): print the id and return, or follow.
async fn submitted(c: &mut Client, reply: DeploymentReply, detach: bool, out: Output) -> Result<i32, Exit> {
    let d = parse_deployment(&reply.deployment_json)?;
    if out == Output::Json {
        println!("{}", submitted_json(&d));
    }
    if detach {
        if out == Output::Text {
            println!("{}", d.id);
        }
        return Ok(exit::OK);
    }
    let id = d.id.clone();
    follow(c, &id, Some((d, reply.applied_index)), Style::pick(out == Output::Json))
        .await
        .map_err(|e| Exit(exit_code_of(&e), e))
}

// ----------------------------------------------------------------- commands

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
    let overrides = Overrides { release: a.release.clone(), destinations: a.destinations.clone(), timeout_ms: a.timeout.map(|t| ms(Some(t))) };
    if a.timeout.is_some_and(|t| t.is_zero()) {
        return Err(usage(anyhow::anyhow!("--timeout must be longer than zero, e.g. 10m")));
    }
    if let Err(e) = parse_manifest(&file_name, &text, &overrides) {
        return Ok(invalid(out, &e, &format!("fix `{}` in {file_name} and run again; `fleetctl deploy --help` shows a complete fleet.yaml", e.field)));
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
    let reply = c
        .unary(req, |mut cl, r| async move { cl.submit_deployment(r).await })
        .await
        .map_err(|e| failed(out, e))?;
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
        HealthCheck { .. } => "nothing".into(),
        SwitchRoute { .. } => "point the route back at the previous instance".into(),
        StopOld { .. } => "start the previous release again on its port".into(),
        Command { undo: Some(u), .. } => format!("run `{u}`"),
        Command { undo: None, .. } => "nothing".into(),
    }
}

fn print_plan(reply: &DeploymentReply, out: Output) -> Result<i32, Exit> {
    let d = parse_deployment(&reply.deployment_json)?;
    if out == Output::Json {
        println!("{}", json!({"type": "plan", "deployment": d}));
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
    println!("on failure, completed steps are undone in reverse order");
    Ok(exit::OK)
}

pub async fn resolve(id: String, note: String, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    check_id(&id)?;
    if note.trim().is_empty() {
        return Err(usage(anyhow::anyhow!("--note must say what you checked or fixed")));
    }
    let mut c = client(conn)?;
    let req = ResolveDeploymentRequest { id: id.clone(), note, request_id: request_id() };
    let reply = c
        .unary(req, |mut cl, r| async move { cl.resolve_deployment(r).await })
        .await
        .map_err(|e| failed(out, e))?;
    let d = parse_deployment(&reply.deployment_json)?;
    match out {
        Output::Json => println!("{}", serde_json::to_string(&d).expect("deployments serialize")),
        Output::Text => println!("{id} resolved; destination(s) {} free for the next deployment", d.destinations().join(", ")),
    }
    Ok(exit::OK)
}

/// `lock queue DEST`: who holds the destination and who waits, in order.
pub async fn lock_queue(destination: String, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let r = c
        .unary(ListDestinationsRequest {}, |mut cl, r| async move { cl.list_destinations(r).await })
        .await?;
    let dest = r
        .destinations_json
        .iter()
        .filter_map(|j| serde_json::from_str::<Value>(j).ok())
        .find(|v| v["name"] == destination.as_str())
        .ok_or_else(|| usage(anyhow::anyhow!("no destination `{destination}`; `fleetctl destinations` lists them")))?;
    let ids: Vec<String> = dest["queued"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_string)).collect();
    let mut list = Vec::new();
    for id in &ids {
        let req = GetDeploymentRequest { id: id.clone() };
        let reply = c
            .unary(req, |mut cl, r| async move { cl.get_deployment(r).await })
            .await?;
        list.push(parse_deployment(&reply.deployment_json)?);
    }
    if out == Output::Json {
        println!("{}", json!({"destination": destination, "lock_holder": dest["lock_holder"], "lock_token": dest["lock_token"], "queue": list}));
        return Ok(exit::OK);
    }
    println!("{destination}: lock {}", dest["lock_holder"].as_str().map(|h| format!("held by {h} (token {})", dest["lock_token"])).unwrap_or_else(|| "free".into()));
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

pub async fn rollback(a: RollbackArgs, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    check_id(&a.id)?;
    if let Some(r) = &a.to {
        fleet_core::names::validate_name("release", r).map_err(usage)?;
    }
    let mut c = client(conn)?;
    let req = RollbackDeploymentRequest { id: a.id.clone(), to_release: a.to.unwrap_or_default(), timeout_ms: ms(a.timeout), request_id: request_id() };
    let reply = c
        .unary(req, |mut cl, r| async move { cl.rollback_deployment(r).await })
        .await
        .map_err(|e| failed(out, e))?;
    submitted(&mut c, reply, a.detach, out).await
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
    let reply = c
        .unary(req, |mut cl, r| async move { cl.cancel_deployment(r).await })
        .await
        .map_err(|e| failed(out, e))?;
    let d = parse_deployment(&reply.deployment_json)?;
    if wait {
        return follow(&mut c, &id, Some((d, reply.applied_index)), Style::pick(out == Output::Json))
            .await
            .map_err(|e| Exit(exit_code_of(&e), e));
    }
    match out {
        Output::Json => println!("{}", serde_json::to_string(&d).expect("deployments serialize")),
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
    let req = ListDeploymentsRequest { app: app.to_string(), destination: destination.to_string(), limit };
    let r = c
        .unary(req, |mut cl, r| async move { cl.list_deployments(r).await })
        .await?;
    Ok(r.deployments_json)
}

fn print_json_array(items: &[String]) -> Result<(), Exit> {
    let values: Vec<Value> = items
        .iter()
        .map(|j| serde_json::from_str(j))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("a coordinator sent a record that is not JSON: {e}"))?;
    println!("{}", Value::Array(values));
    Ok(())
}

fn deployment_rows(list: &[Deployment]) -> Vec<Vec<String>> {
    let now = now_ms();
    list.iter()
        .map(|d| {
            let state = match current_work(d) {
                Some((i, undo, _)) => format!("{} [{}{}/{}]", d.state, if undo { "undo " } else { "" }, i + 1, d.steps.len()),
                None => d.state.to_string(),
            };
            vec![d.id.clone(), d.app.clone(), d.release.clone(), d.destinations().join(","), state, ago(now - d.submitted_ms), d.submitted_by.clone()]
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
        let list: Vec<Deployment> =
            items.iter().map(|j| parse_deployment(j)).collect::<Result<Vec<_>, _>>()?.into_iter().filter(|d| !d.state.is_terminal()).collect();
        match out {
            Output::Json => println!("{}", serde_json::to_string(&list).expect("deployments serialize")),
            Output::Text if list.is_empty() => println!("nothing is queued or running; `fleetctl list` shows recent deployments"),
            Output::Text => {
                println!("{}", table(&DEPLOYMENT_COLUMNS, &deployment_rows(&list)));
                println!("\n`fleetctl status ID` shows one in detail");
            }
        }
        return Ok(exit::OK);
    };
    check_id(&id)?;
    let reply = c
        .unary(GetDeploymentRequest { id: id.clone() }, |mut cl, r| async move { cl.get_deployment(r).await })
        .await?;
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
        Some(t) if d.state.holds_lock() => println!("lock       {} held with fencing token {t}, epoch {}", d.destinations().join(", "), d.epoch),
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
                let attempt = if s.undo_started_ms.is_some() { format!("{} (undo {})", s.attempt, s.undo_attempt) } else { s.attempt.to_string() };
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
            let arr: Vec<Value> = list
                .iter()
                .map(|d| {
                    json!({
                        "id": d.id, "app": d.app, "release": d.release, "destination": d.destination, "destinations": d.destinations(),
                        "state": d.state, "exit_code": d.exit_code(), "timed_out": d.timed_out,
                        "submitted_by": d.submitted_by, "submitted_ms": d.submitted_ms, "ended_ms": ended(d),
                        "previous_release": d.previous_release, "rollback_of": d.rollback_of,
                        "reason": d.events.last().map(|e| e.reason.clone()),
                    })
                })
                .collect();
            println!("{}", Value::Array(arr));
        }
        Output::Text if list.is_empty() => println!("no deployments match"),
        Output::Text => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|d| {
                    let outcome = if d.state == DeployState::Cancelled && d.timed_out { "timed out".to_string() } else { d.state.to_string() };
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
                            .find(|e| matches!(e.to, DeployState::Compensating | DeployState::Cancelling | DeployState::Superseded | DeployState::CompensationFailed))
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

// ------------------------------------------------------- destinations, nodes

fn str_of(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One row of `fleetctl destinations` from a destination record (the
/// destination plus `lock_holder`, `queue` (ids), `current`, `nodes`).
pub fn destination_row(v: &Value) -> Vec<String> {
    let selector = match v["selector"].as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","),
        _ => "(every node)".into(),
    };
    // The policy is `queue` in the destinations file; the server's record
    // may use that key for the queued ids instead.
    let policy = [&v["queue_policy"], &v["policy"], &v["queue"]]
        .into_iter()
        .find_map(|p| p.as_str())
        .unwrap_or("-")
        .to_string();
    let queued: Vec<String> = [&v["queue"], &v["queued"]]
        .into_iter()
        .find_map(|q| q.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let lock = match v["lock_holder"].as_str() {
        Some(h) => h.strip_prefix(fleet_core::state::DEPLOYMENT_HOLDER_PREFIX).unwrap_or(h).to_string(),
        None => "free".into(),
    };
    let queued = match queued.len() {
        0 => "0".to_string(),
        n if n <= 3 => format!("{n} ({})", queued.join(",")),
        n => format!("{n} ({},…)", queued[..3].join(",")),
    };
    let current = v["current"]
        .as_object()
        .map(|m| m.iter().map(|(app, r)| format!("{app}@{}", r.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    let nodes = v["nodes"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".into());
    vec![str_of(v, "name"), str_of(v, "adapter"), selector, policy, lock, queued, current, nodes]
}

fn print_destinations(items: &[String], out: Output) -> Result<(), Exit> {
    if out == Output::Json {
        return print_json_array(items);
    }
    let values: Vec<Value> = items.iter().filter_map(|j| serde_json::from_str(j).ok()).collect();
    if values.is_empty() {
        println!("no destinations yet; `fleetctl destinations apply -f FILE` creates them (see `fleetctl destinations apply --help`)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = values.iter().map(destination_row).collect();
    println!("{}", table(&["NAME", "ADAPTER", "SELECTOR", "POLICY", "LOCK", "QUEUED", "CURRENT", "NODES"], &rows));
    if rows.iter().any(|r| r[7] == "none") {
        println!("\nA destination with no nodes cannot take deployments: start `fleet-node` with labels that match its selector");
    }
    Ok(())
}

pub async fn destinations(cmd: Option<DestinationsCmd>, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    match cmd.unwrap_or(DestinationsCmd::List) {
        DestinationsCmd::List => {
            let mut c = client(conn)?;
            let r = c
                .unary(ListDestinationsRequest {}, |mut cl, r| async move { cl.list_destinations(r).await })
                .await?;
            print_destinations(&r.destinations_json, out)?;
        }
        DestinationsCmd::Apply { file } => {
            let name = file.display().to_string();
            let hint = "`fleetctl destinations apply --help` shows an example";
            let text = match read_file(out, &file, "destinations file", hint) {
                Ok(t) => t,
                Err(code) => return Ok(code),
            };
            let parsed = match parse_destinations(&name, &text) {
                Ok(p) => p,
                Err(e) => return Ok(invalid(out, &e, &format!("fix `{}` in {name} and run again; {hint}", e.field))),
            };
            let mut c = client(conn)?;
            let r = apply_destinations(&mut c, &name, &text).await.map_err(|e| failed(out, e))?;
            if out == Output::Text {
                println!("applied {} destination(s) from {name}", parsed.len());
            }
            print_destinations(&r.destinations_json, out)?;
        }
    }
    Ok(exit::OK)
}

pub async fn apply_destinations(c: &mut Client, file_name: &str, text: &str) -> anyhow::Result<DestinationsReply> {
    let req = ApplyDestinationsRequest { destinations_yaml: text.to_string(), file_name: file_name.to_string(), request_id: request_id() };
    c.unary(req, |mut cl, r| async move { cl.apply_destinations(r).await })
    .await
}

pub async fn list_nodes(c: &mut Client) -> anyhow::Result<Vec<Value>> {
    let r = c
        .unary(ListNodesRequest {}, |mut cl, r| async move { cl.list_nodes(r).await })
        .await?;
    r.nodes_json.iter().map(|j| serde_json::from_str(j).map_err(|e| anyhow::anyhow!("a coordinator sent a node record that is not JSON: {e}"))).collect()
}

/// One row of `fleetctl nodes`.
pub fn node_row(v: &Value, now: i64) -> Vec<String> {
    let labels = v["labels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    let connected = match (v["connected"].as_bool().unwrap_or(false), v["lost_ms"].as_i64()) {
        (true, _) => "yes",
        (false, Some(_)) => "no (lost: gets no work until it reconnects)",
        (false, None) => "no",
    };
    let seen = v["last_seen_ms"].as_i64().map(|t| ago(now - t)).unwrap_or_else(|| "never (since this leader)".into());
    vec![str_of(v, "id"), labels, connected.to_string(), seen]
}

pub async fn nodes(conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let list = list_nodes(&mut c).await?;
    match out {
        Output::Json => println!("{}", Value::Array(list)),
        Output::Text if list.is_empty() => {
            println!("no worker node has registered; start one with `fleet-node --coord ADDR,... --label env=staging ...`")
        }
        Output::Text => {
            let now = now_ms();
            let rows: Vec<Vec<String>> = list.iter().map(|v| node_row(v, now)).collect();
            println!("{}", table(&["ID", "LABELS", "CONNECTED", "LAST SEEN"], &rows));
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_rows() {
        // (record as the server sends it, expected row)
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (
                json!({"name": "dev", "adapter": "process", "selector": {"env": "dev"}, "queue": ["d3", "d4"],
                       "lock_holder": "deployment/d3", "lock_token": 9, "current": {"web": "v1"}, "nodes": ["node-1", "node-2"]}),
                vec!["dev", "process", "env=dev", "-", "d3", "2 (d3,d4)", "web@v1", "node-1,node-2"],
            ),
            (
                json!({"name": "prod", "adapter": "process", "selector": {}, "queue": "reject", "queued": [],
                       "lock_holder": null, "current": {}, "nodes": []}),
                vec!["prod", "process", "(every node)", "reject", "free", "0", "-", "none"],
            ),
            (
                json!({"name": "x", "adapter": "process", "queue_policy": "coalesce", "queue": ["d1", "d2", "d3", "d4"],
                       "lock_holder": "alice"}),
                vec!["x", "process", "(every node)", "coalesce", "alice", "4 (d1,d2,d3,…)", "-", "none"],
            ),
        ];
        for (v, want) in cases {
            assert_eq!(destination_row(&v), want, "{v}");
        }
    }

    #[test]
    fn node_rows() {
        let v = json!({"id": "node-1", "labels": {"env": "dev", "zone": "a"}, "registered_ms": 0, "connected": true, "last_seen_ms": 95_000});
        assert_eq!(node_row(&v, 100_000), vec!["node-1", "env=dev,zone=a", "yes", "5s ago"]);
        let v = json!({"id": "node-2", "labels": {}, "connected": false, "last_seen_ms": null});
        assert_eq!(node_row(&v, 100_000), vec!["node-2", "", "no", "never (since this leader)"]);
    }
}
