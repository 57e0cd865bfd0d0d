use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use fleet_core::auth::Role;
use fleet_proto::*;
use fleetctl::client::{request_id, Client, Context};
use fleetctl::{certs, dev, exit};
use serde_json::json;

mod deploy_cmd;
use deploy_cmd::{DeployArgs, DestinationsCmd, RollbackArgs};

#[derive(Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Fleet: deployments that never overlap on a destination",
    long_about = "fleetctl talks to a Fleet coordinator cluster.\n\n\
Connection: --addr (or FLEET_ADDR) lists coordinators, any of them; fleetctl follows the leader and \
retries across the list when one dies. Credentials: --ca/--cert/--key (or FLEET_CA, FLEET_CERT, \
FLEET_KEY), or a context file (--context / FLEET_CONTEXT) such as the one `fleetctl dev up` writes.\n\n\
Quick start on one machine (from the repository root):\n  fleetctl dev up\n  export FLEET_CONTEXT=.fleet-dev/context.json\n  \
fleetctl deploy -f examples/demo/fleet.yaml\n  fleetctl deploy -f examples/demo/fleet-broken.yaml   # fails, undone: exit 3\n  \
fleetctl history\n  fleetctl dev down\n\n\
Exit codes: 0 ok · 1 cluster error · 2 usage or invalid input · 3 deployment failed and was undone · \
4 cancelled · 5 timed out · 6 undo failed, a human must act · 7 rejected (busy)"
)]
struct Cli {
    /// Output format: text for people, json for scripts (one object, or one
    /// object per line for commands that follow a deployment).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
#[command(next_help_heading = "Connection")]
struct ConnArgs {
    /// Coordinator addresses, comma-separated (any coordinator will do).
    #[arg(long, env = "FLEET_ADDR", value_delimiter = ',', global = true)]
    addr: Vec<String>,
    /// CA certificate of the cluster.
    #[arg(long, env = "FLEET_CA", global = true)]
    ca: Option<PathBuf>,
    /// Your certificate (role operator for changes, viewer to read).
    #[arg(long, env = "FLEET_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Your private key.
    #[arg(long, env = "FLEET_KEY", global = true)]
    key: Option<PathBuf>,
    /// Context file with addrs, ca, cert and key (JSON). Default:
    /// .fleet-dev/context.json when it exists.
    #[arg(long, env = "FLEET_CONTEXT", global = true)]
    context: Option<PathBuf>,
    /// Keep retrying for this long when no coordinator answers.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, global = true)]
    retry_for: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Deploy a release (fleet.yaml) and follow it to the end; exit code = outcome.
    #[command(long_about = deploy_cmd::DEPLOY_ABOUT, after_long_help = deploy_cmd::DEPLOY_EXAMPLES)]
    Deploy(DeployArgs),
    /// Follow a deployment until it ends; same output and exit codes as deploy.
    #[command(after_long_help = "Examples:\n  fleetctl watch d12\n  fleetctl watch d12 -o json   # one JSON object per event, then {\"type\":\"result\",...}")]
    Watch {
        /// Deployment id, e.g. d12 (`fleetctl list` shows them).
        id: String,
    },
    /// One deployment in detail (steps, errors, event log), or, without ID,
    /// every deployment that is queued or running.
    #[command(after_long_help = "Examples:\n  fleetctl status            # what is queued or running\n  fleetctl status d12        # steps with node, attempt, times, errors; the event log\n  fleetctl status d12 -o json")]
    Status {
        /// Deployment id, e.g. d12.
        id: Option<String>,
    },
    /// Recent deployments, newest first.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Which releases were deployed where, and how each ended.
    #[command(after_long_help = "Examples:\n  fleetctl history --app web --destination prod\n  fleetctl history -o json | jq '.[] | select(.state == \"succeeded\") | .release'")]
    History {
        /// Only this app.
        #[arg(long)]
        app: Option<String>,
        /// Only this destination.
        #[arg(long)]
        destination: Option<String>,
        /// How many, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a deployment: the step in flight finishes, then every
    /// completed step is undone. Refused (exit 7) when it already ended.
    #[command(after_long_help = "Examples:\n  fleetctl cancel d12 --reason \"wrong release\"\n  fleetctl cancel d12 --wait     # follow the undo; exit 4 once cancelled")]
    Cancel {
        /// Deployment id, e.g. d12.
        id: String,
        /// Why (recorded in the deployment's event log).
        #[arg(long)]
        reason: Option<String>,
        /// Follow the cancellation to its end, like `watch` (exit 4 when cancelled).
        #[arg(long)]
        wait: bool,
    },
    /// Record that a human checked a deployment whose compensation failed
    /// (state compensation_failed), and free its destination.
    #[command(after_long_help = "Examples:\n  fleetctl resolve d12 --note \"removed the half-started container by hand\"")]
    Resolve {
        /// Deployment id, e.g. d12.
        id: String,
        /// What you checked or fixed (recorded in the event log).
        #[arg(long)]
        note: String,
    },
    /// Deploy an earlier release again: a new deployment of the release that
    /// succeeded before ID (or --to RELEASE) on the same app and destination.
    #[command(after_long_help = "Examples:\n  fleetctl rollback d12              # to the release that was live before d12\n  fleetctl rollback d12 --to v1 --timeout 5m\n\nExit codes as for deploy; 7 when there is no earlier succeeded release.")]
    Rollback(RollbackArgs),
    /// Destinations: selector, queue policy, lock holder, queue, current
    /// releases and matching nodes. `destinations apply -f FILE` changes them.
    #[command(args_conflicts_with_subcommands = true)]
    Destinations {
        #[command(subcommand)]
        cmd: Option<DestinationsCmd>,
    },
    /// Worker nodes: labels, whether connected to the leader, last seen.
    Nodes,
    /// Manual destination locks (maintenance windows, migrations).
    #[command(subcommand)]
    Lock(LockCmd),
    /// Coordinator membership and health.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Create the cluster CA and certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// A local cluster on this machine for trying Fleet out.
    #[command(subcommand)]
    Dev(DevCmd),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum LockCmd {
    /// Take the lock of DEST. Exit 0 when granted (also if you already hold
    /// it), 7 when someone else holds it, 5 when --wait expired.
    Acquire {
        destination: String,
        /// Why (shown to everyone who finds the lock taken).
        #[arg(short = 'm', long)]
        message: String,
        /// Wait up to this long for the holder to release it (e.g. 30s, 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
    },
    /// Release a lock you hold. Refused (exit 7) when someone else holds it.
    Release { destination: String },
    /// Who holds which lock, since when, with which fencing token.
    Status { destination: Option<String> },
    /// Who holds DEST and which deployments wait for it, in order.
    Queue { destination: String },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, roles, leader, term, commit/applied index, lag per member.
    Status {
        /// Ask only the coordinator(s) given, without following the leader.
        #[arg(long)]
        local: bool,
    },
    /// Add a coordinator as a non-voting learner; returns once it caught up.
    AddLearner {
        id: u64,
        #[arg(value_name = "ADDR")]
        address: String,
    },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Remove a coordinator (voter or learner) from the cluster.
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a CA and one certificate per role (coordinator, node, operator, viewer).
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing CA in --out.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for ROLE (coordinator, node, operator, viewer) named NAME.
    Issue {
        role: String,
        name: String,
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        /// Where to write NAME.pem and NAME-key.pem (default: --ca-dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Extra DNS name or IP for the certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// Start a local cluster: certificates, N coordinators on free ports,
    /// worker nodes (node-1 in zone a, node-2 in zone b, all labelled
    /// env=dev) and a destination `dev` that selects them.
    #[command(after_long_help = "Then:\n  export FLEET_CONTEXT=.fleet-dev/context.json\n  fleetctl nodes\n  fleetctl deploy -f examples/demo/fleet.yaml\n  fleetctl dev down            # --purge also deletes .fleet-dev")]
    Up {
        #[arg(long, default_value_t = 3)]
        coordinators: u64,
        /// Worker nodes to start (fleet-node); 0 for coordinators only.
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Destinations file to apply (default: the demo's, which defines
        /// `dev` with selector env=dev and queue policy `queue`).
        #[arg(long, value_name = "FILE")]
        destinations: Option<PathBuf>,
        /// Where certificates, data and logs go.
        #[arg(long, default_value = ".fleet-dev")]
        dir: PathBuf,
    },
    /// Stop the local cluster (data stays; `dev up` starts it again).
    Down {
        #[arg(long, default_value = ".fleet-dev")]
        dir: PathBuf,
        /// Also delete its data, certificates and logs.
        #[arg(long)]
        purge: bool,
    },
}

/// An error carrying the exit code to use.
struct Exit(i32, anyhow::Error);

impl From<anyhow::Error> for Exit {
    /// The server's answer decides the code (invalid → 2, rejected → 7);
    /// no answer at all is a cluster error (1).
    fn from(e: anyhow::Error) -> Self {
        Exit(fleetctl::client::exit_code_of(&e), e)
    }
}

fn usage(e: impl Into<anyhow::Error>) -> Exit {
    Exit(exit::USAGE, e.into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetctl: cannot start the async runtime: {e}");
            return ExitCode::from(exit::CLUSTER as u8);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(Exit(code, e)) => {
            eprintln!("fleetctl: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}

fn context(conn: &ConnArgs) -> Result<Context, Exit> {
    let file = conn.context.clone().or_else(|| {
        let p = PathBuf::from(".fleet-dev/context.json");
        p.is_file().then_some(p)
    });
    let base = match &file {
        Some(p) => Some(Context::load(p).map_err(usage)?),
        None => None,
    };
    let need = |flag: &str, v: Option<PathBuf>, from: Option<&PathBuf>| -> Result<PathBuf, Exit> {
        v.or_else(|| from.cloned())
            .ok_or_else(|| usage(anyhow::anyhow!("no {flag} given; pass --{flag} (or FLEET_{}), or a context file from `fleetctl dev up`", flag.to_uppercase())))
    };
    let addrs = if conn.addr.is_empty() { base.as_ref().map(|b| b.addrs.clone()).unwrap_or_default() } else { conn.addr.clone() };
    if addrs.is_empty() {
        return Err(usage(anyhow::anyhow!("no coordinator address; pass --addr HOST:PORT[,...], set FLEET_ADDR, or run `fleetctl dev up`")));
    }
    Ok(Context {
        addrs,
        ca: need("ca", conn.ca.clone(), base.as_ref().map(|b| &b.ca))?,
        cert: need("cert", conn.cert.clone(), base.as_ref().map(|b| &b.cert))?,
        key: need("key", conn.key.clone(), base.as_ref().map(|b| &b.key))?,
    })
}

fn client(conn: &ConnArgs) -> Result<Client, Exit> {
    let mut c = Client::new(&context(conn)?).map_err(usage)?;
    c.retry_for = conn.retry_for;
    Ok(c)
}

async fn run(cli: Cli) -> Result<i32, Exit> {
    match cli.cmd {
        Cmd::Deploy(a) => deploy_cmd::deploy(a, &cli.conn, cli.output).await,
        Cmd::Watch { id } => deploy_cmd::watch(id, &cli.conn, cli.output).await,
        Cmd::Status { id } => deploy_cmd::status(id, &cli.conn, cli.output).await,
        Cmd::List { limit } => deploy_cmd::list(limit, &cli.conn, cli.output).await,
        Cmd::History { app, destination, limit } => deploy_cmd::history(app, destination, limit, &cli.conn, cli.output).await,
        Cmd::Cancel { id, reason, wait } => deploy_cmd::cancel(id, reason, wait, &cli.conn, cli.output).await,
        Cmd::Rollback(a) => deploy_cmd::rollback(a, &cli.conn, cli.output).await,
        Cmd::Resolve { id, note } => deploy_cmd::resolve(id, note, &cli.conn, cli.output).await,
        Cmd::Destinations { cmd } => deploy_cmd::destinations(cmd, &cli.conn, cli.output).await,
        Cmd::Nodes => deploy_cmd::nodes(&cli.conn, cli.output).await,
        Cmd::Lock(cmd) => lock(cmd, &cli.conn, cli.output).await,
        Cmd::Cluster(cmd) => cluster(cmd, &cli.conn, cli.output).await,
        Cmd::Certs(cmd) => certs_cmd(cmd, cli.output),
        Cmd::Dev(cmd) => dev_cmd(cmd, cli.output).await,
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "fleetctl", &mut std::io::stdout());
            Ok(exit::OK)
        }
    }
}

fn lock_json(l: &Lock) -> serde_json::Value {
    json!({
        "destination": l.destination,
        "holder": l.holder,
        "reason": l.reason,
        "since_ms": l.since_ms,
        "fencing_token": l.fencing_token,
    })
}

fn since(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

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

async fn lock(cmd: LockCmd, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    if let LockCmd::Queue { destination } = cmd {
        return deploy_cmd::lock_queue(destination, conn, out).await;
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
                Output::Json => println!(
                    "{}",
                    json!({"locks": r.locks.iter().map(lock_json).collect::<Vec<_>>(), "applied_index": r.applied_index})
                ),
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
        println!(
            "{}",
            json!({"outcome": outcome_name(outcome), "lock": r.lock.as_ref().map(lock_json), "applied_index": r.applied_index})
        );
        return code;
    }
    match (outcome, &r.lock) {
        (LockOutcome::Granted, Some(l)) => println!("locked {} (fencing token {}, since {})", l.destination, l.fencing_token, since(l.since_ms)),
        (LockOutcome::Held, Some(l)) => eprintln!(
            "{} is locked by {} since {}: {}\n{}",
            l.destination,
            l.holder,
            since(l.since_ms),
            l.reason,
            if waited { "gave up waiting; try again later or wait longer with --wait" } else { "wait for it with --wait 10m, or ask the holder to release it" }
        ),
        (LockOutcome::Released, _) => println!("released"),
        (LockOutcome::NotOwner, Some(l)) => {
            eprintln!("refused: {} is held by {}, not you; only the holder can release it", l.destination, l.holder)
        }
        _ => println!("{}", outcome_name(outcome)),
    }
    code
}

async fn cluster(cmd: ClusterCmd, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    match cmd {
        ClusterCmd::Status { local } => {
            let r = c
                .call(|mut cl, timeout| {
                    let mut req = tonic::Request::new(ClusterStatusRequest { local });
                    req.set_timeout(timeout);
                    async move { cl.cluster_status(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_status(&r, out);
        }
        ClusterCmd::AddLearner { id, address: addr } => {
            // Catching up may mean sending a large snapshot.
            let r = c
                .call_with_timeout(Duration::from_secs(300), |mut cl, timeout| {
                    let mut req = tonic::Request::new(AddLearnerRequest { id, addr: addr.clone() });
                    req.set_timeout(timeout);
                    async move { cl.add_learner(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_members(&r, out, &format!("coordinator {id} added as a learner and caught up; promote it with `fleetctl cluster promote {id}`"));
        }
        ClusterCmd::Promote { id } => {
            let r = c
                .call(|mut cl, timeout| {
                    let mut req = tonic::Request::new(PromoteRequest { id });
                    req.set_timeout(timeout);
                    async move { cl.promote(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_members(&r, out, &format!("coordinator {id} is now a voter"));
        }
        ClusterCmd::Remove { id } => {
            let r = c
                .call(|mut cl, timeout| {
                    let mut req = tonic::Request::new(RemoveMemberRequest { id });
                    req.set_timeout(timeout);
                    async move { cl.remove_member(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_members(&r, out, &format!("coordinator {id} removed; stop its process and delete its data dir"));
        }
    }
    Ok(exit::OK)
}

fn member_json(m: &Member) -> serde_json::Value {
    json!({"id": m.id, "addr": m.addr, "kind": m.kind, "role": m.role, "matched_index": m.matched_index,
           "lag": if m.lag == u64::MAX { serde_json::Value::Null } else { m.lag.into() }})
}

fn print_members_table(members: &[Member]) {
    println!("{:<4} {:<22} {:<8} {:<9} {:>9} {:>6}", "ID", "ADDR", "KIND", "ROLE", "MATCHED", "LAG");
    for m in members {
        let lag = if m.lag == u64::MAX { "?".to_string() } else { m.lag.to_string() };
        println!("{:<4} {:<22} {:<8} {:<9} {:>9} {:>6}", m.id, m.addr, m.kind, m.role, m.matched_index, lag);
    }
}

fn print_members(r: &MembershipReply, out: Output, msg: &str) {
    match out {
        Output::Json => println!(
            "{}",
            json!({"members": r.members.iter().map(member_json).collect::<Vec<_>>(), "applied_index": r.applied_index})
        ),
        Output::Text => {
            println!("{msg}");
            print_members_table(&r.members);
        }
    }
}

fn print_status(r: &ClusterStatusReply, out: Output) {
    match out {
        Output::Json => println!(
            "{}",
            json!({
                "cluster_id": r.cluster_id, "leader_id": if r.leader_id == 0 { serde_json::Value::Null } else { r.leader_id.into() },
                "leader_addr": r.leader_addr, "term": r.term, "last_log_index": r.last_log_index,
                "commit_index": r.commit_index, "applied_index": r.applied_index, "snapshot_index": r.snapshot_index,
                "purged_index": r.purged_index, "answered_by": r.answered_by,
                "members": r.members.iter().map(member_json).collect::<Vec<_>>(),
            })
        ),
        Output::Text => {
            let leader = if r.leader_id == 0 { "none (election in progress)".to_string() } else { format!("{} at {}", r.leader_id, r.leader_addr) };
            println!("cluster {}   leader {}   term {}", r.cluster_id, leader, r.term);
            println!(
                "log {}   commit {}   applied {}   snapshot {}   purged {}   (answered by {})",
                r.last_log_index, r.commit_index, r.applied_index, r.snapshot_index, r.purged_index, r.answered_by
            );
            print_members_table(&r.members);
        }
    }
}

fn certs_cmd(cmd: CertsCmd, out: Output) -> Result<i32, Exit> {
    let written = match cmd {
        CertsCmd::Init { out: dir, force } => certs::init(&dir, force).map_err(usage)?,
        CertsCmd::Issue { role, name, ca_dir, out: dir, san } => {
            let role: Role = role.parse().map_err(usage)?;
            let dir = dir.unwrap_or_else(|| ca_dir.clone());
            let (c, k) = certs::issue(&ca_dir, role, &name, &san, &dir).map_err(usage)?;
            vec![c, k]
        }
    };
    match out {
        Output::Json => println!("{}", json!({"written": written})),
        Output::Text => {
            for p in &written {
                println!("wrote {}", p.display());
            }
        }
    }
    Ok(exit::OK)
}

async fn dev_cmd(cmd: DevCmd, out: Output) -> Result<i32, Exit> {
    match cmd {
        DevCmd::Up { coordinators, nodes, destinations, dir } => dev_up(coordinators, nodes, destinations.as_deref(), &dir, out).await,
        DevCmd::Down { dir, purge } => {
            // Nodes first (and the releases they run), so they do not spend
            // the coordinators' shutdown reconnecting.
            let nodes = read_pids_file(&dir.join(NODE_PIDS));
            for pid in &nodes {
                dev::stop_group(*pid, Duration::from_secs(5));
            }
            let _ = std::fs::remove_file(dir.join(NODE_PIDS));
            // Then the releases they ran: a node keeps its instances running
            // across its own restarts (and would adopt them), but a dev
            // cluster that is down must leave nothing behind.
            let mut instances = Vec::new();
            for node_dir in std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()) {
                let is_node = node_dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("node-")) && node_dir.is_dir();
                if is_node {
                    instances.extend(dev::node_instances(&node_dir));
                }
            }
            for pid in &instances {
                dev::stop_group(*pid, Duration::from_secs(5));
            }
            let pids = read_pids(&dir);
            for pid in &pids {
                dev::stop(*pid, Duration::from_secs(5));
            }
            let _ = std::fs::remove_file(dir.join("pids"));
            if purge && dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            match out {
                Output::Json => println!("{}", json!({"stopped": pids, "stopped_nodes": nodes, "stopped_instances": instances, "purged": purge})),
                Output::Text => println!(
                    "stopped {} node(s), {} app instance(s) and {} coordinator(s){}",
                    nodes.len(),
                    instances.len(),
                    pids.len(),
                    if purge { format!("; removed {}", dir.display()) } else { format!("; data kept in {}", dir.display()) }
                ),
            }
            Ok(exit::OK)
        }
    }
}

/// Pid file of the dev cluster's worker nodes (coordinators: `pids`).
const NODE_PIDS: &str = "node-pids";
/// The destinations `dev up` applies unless told otherwise.
const DEMO_DESTINATIONS: &str = include_str!("../../../examples/demo/destinations.yaml");

fn read_pids_file(path: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn read_pids(dir: &std::path::Path) -> Vec<u32> {
    read_pids_file(&dir.join("pids"))
}

async fn dev_up(n: u64, nodes: u32, destinations: Option<&std::path::Path>, dir: &std::path::Path, out: Output) -> Result<i32, Exit> {
    if !(1..=5).contains(&n) {
        return Err(usage(anyhow::anyhow!("--coordinators must be 1 to 5 (3 for a highly available cluster)")));
    }
    if nodes > 26 {
        return Err(usage(anyhow::anyhow!("--nodes must be 0 to 26")));
    }
    // Read and check the destinations before starting anything.
    let (dest_name, dest_text) = match destinations {
        Some(p) => (p.display().to_string(), std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())).map_err(usage)?),
        None => ("examples/demo/destinations.yaml".to_string(), DEMO_DESTINATIONS.to_string()),
    };
    fleet_core::manifest::parse_destinations(&dest_name, &dest_text).map_err(usage)?;
    if read_pids(dir).into_iter().chain(read_pids_file(&dir.join(NODE_PIDS))).any(dev::alive) {
        return Err(usage(anyhow::anyhow!("a dev cluster is already running in {}; stop it with `fleetctl dev down`", dir.display())));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let certs_dir = dir.join("certs");
    if !certs_dir.join("ca.pem").exists() {
        certs::init(&certs_dir, false)?;
        eprintln!("created a CA and certificates in {}", certs_dir.display());
    }
    let bin = dev::find_binary("fleet-coord")?;
    let fresh = !dir.join("data-1").exists();
    let mut pids = Vec::new();
    let mut addrs = Vec::new();
    for id in 1..=n {
        // A restarted member must come back on the address the others know.
        let listen = std::fs::read_to_string(dir.join(format!("coord-{id}.addr")))
            .ok()
            .filter(|_| !fresh)
            .map(|a| a.trim().to_string())
            .unwrap_or_else(|| "127.0.0.1:0".to_string());
        let spec = dev::CoordSpec { id, dir: dir.clone(), bootstrap: id == 1 && fresh, listen, extra_args: vec![] };
        let (child, addr) = dev::spawn_coordinator(&bin, &spec, Duration::from_secs(30))?;
        eprintln!("started coordinator {id} at {addr} (pid {}, log {})", child.id(), spec.log_file().display());
        pids.push(child.id());
        addrs.push(addr);
        std::fs::write(dir.join("pids"), pids.iter().map(|p| format!("{p}\n")).collect::<String>())
            .context("writing the pid file")?;
    }
    let ctx = Context {
        addrs: addrs.clone(),
        ca: certs_dir.join("ca.pem"),
        cert: certs_dir.join("operator.pem"),
        key: certs_dir.join("operator-key.pem"),
    };
    let ctx_path = dir.join("context.json");
    ctx.save(&ctx_path)?;

    let mut c = Client::new(&ctx)?;
    if fresh {
        for (i, addr) in addrs.iter().enumerate().skip(1) {
            let id = i as u64 + 1;
            let addr = addr.clone();
            c.call_with_timeout(Duration::from_secs(60), |mut cl, timeout| {
                let mut req = tonic::Request::new(AddLearnerRequest { id, addr: addr.clone() });
                req.set_timeout(timeout);
                async move { cl.add_learner(req).await.map(|r| r.into_inner()) }
            })
            .await?;
            c.call(|mut cl, t| {
                let mut req = tonic::Request::new(PromoteRequest { id });
                req.set_timeout(t);
                async move { cl.promote(req).await.map(|r| r.into_inner()) }
            })
            .await?;
            eprintln!("coordinator {id} joined as a voter");
        }
    }
    let status = c
        .call(|mut cl, t| {
            let mut req = tonic::Request::new(ClusterStatusRequest { local: false });
            req.set_timeout(t);
            async move { cl.cluster_status(req).await.map(|r| r.into_inner()) }
        })
        .await?;
    if status.members.iter().filter(|m| m.kind == "voter").count() as u64 != n {
        return Err(anyhow::anyhow!("the cluster has {} voters, expected {n}; see the logs in {}", status.members.len(), dir.display()).into());
    }
    let started = dev_nodes(nodes, &dir, &addrs)?;
    dev_destinations(&mut c, &dest_name, &dest_text).await?;
    if !started.is_empty() {
        wait_for_nodes(&mut c, &started, Duration::from_secs(30)).await?;
    }
    print_status(&status, out);
    if out == Output::Text {
        println!("\nThe cluster is up. Point fleetctl at it:\n  export FLEET_CONTEXT={}", ctx_path.display());
        if started.is_empty() {
            println!("Then try:\n  fleetctl lock acquire web -m \"maintenance\"\n  fleetctl lock status\n  fleetctl dev down");
        } else {
            println!(
                "Then, from the repository root:\n  fleetctl nodes\n  fleetctl deploy -f examples/demo/fleet.yaml\n  \
                 fleetctl deploy -f examples/demo/fleet.yaml --release v2\n  fleetctl deploy -f examples/demo/fleet-broken.yaml   # fails; exit 3\n  \
                 fleetctl history\n  fleetctl dev down"
            );
        }
    }
    Ok(exit::OK)
}

/// A started worker node: its name, pid and log file.
struct DevNode {
    name: String,
    pid: u32,
    log: PathBuf,
}

/// Issue certificates for and start `count` worker nodes (node-1 in zone
/// a, node-2 in zone b, ...), recording their pids for `dev down`.
fn dev_nodes(count: u32, dir: &std::path::Path, coords: &[String]) -> Result<Vec<DevNode>, Exit> {
    if count == 0 {
        return Ok(vec![]);
    }
    let bin = match dev::find_binary("fleet-node") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("warning: {e:#}; started no worker nodes, so deployments have nowhere to run");
            return Ok(vec![]);
        }
    };
    let certs_dir = dir.join("certs");
    let mut started = Vec::new();
    for i in 1..=count {
        let name = format!("node-{i}");
        if !certs_dir.join(format!("{name}.pem")).exists() {
            certs::issue(&certs_dir, Role::Node, &name, &[], &certs_dir)?;
        }
        let zone = (b'a' + ((i - 1) % 26) as u8) as char;
        let spec = dev::NodeSpec {
            name: name.clone(),
            dir: dir.to_path_buf(),
            coords: coords.to_vec(),
            labels: vec!["env=dev".into(), format!("zone={zone}")],
        };
        let child = dev::spawn_node(&bin, &spec)?;
        eprintln!("started {name} (labels env=dev, zone={zone}; pid {}, log {})", child.id(), spec.log_file().display());
        started.push(DevNode { name, pid: child.id(), log: spec.log_file() });
        std::fs::write(dir.join(NODE_PIDS), started.iter().map(|n| format!("{}\n", n.pid)).collect::<String>())
            .context("writing the node pid file")?;
    }
    Ok(started)
}

/// Apply the dev destinations; the cluster may still be settling its
/// leadership, so retry until a deadline.
async fn dev_destinations(c: &mut Client, name: &str, text: &str) -> Result<(), Exit> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match deploy_cmd::apply_destinations(c, name, text).await {
            Ok(r) => {
                eprintln!("applied {} destination(s) from {name}", r.destinations_json.len());
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(anyhow::anyhow!("could not apply the destinations in {name} within 30s: {e:#}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Wait until the leader sees every started node connected; fail early
/// with its log when a node process exits.
async fn wait_for_nodes(c: &mut Client, nodes: &[DevNode], limit: Duration) -> Result<(), Exit> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut reported: std::collections::BTreeSet<String> = Default::default();
    eprintln!("waiting for {} to connect ...", nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "));
    let left_running = "the coordinators and other nodes keep running; `fleetctl dev down` stops them";
    loop {
        for n in nodes {
            if !dev::alive(n.pid) {
                return Err(anyhow::anyhow!(
                    "{} exited; its log ({}) ends with:\n{}\n{left_running}",
                    n.name,
                    n.log.display(),
                    dev::tail_of(&n.log, 20)
                )
                .into());
            }
        }
        let listed = deploy_cmd::list_nodes(c).await.unwrap_or_default();
        for v in &listed {
            let id = v["id"].as_str().unwrap_or_default();
            if v["connected"].as_bool() == Some(true) && nodes.iter().any(|n| n.name == id) && reported.insert(id.to_string()) {
                eprintln!("{id} connected");
            }
        }
        if nodes.iter().all(|n| reported.contains(&n.name)) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let missing: Vec<&str> = nodes.iter().filter(|n| !reported.contains(&n.name)).map(|n| n.name.as_str()).collect();
            return Err(anyhow::anyhow!(
                "{} did not connect within {limit:?}; see {} ({left_running})",
                missing.join(", "),
                nodes.iter().filter(|n| missing.contains(&n.name.as_str())).map(|n| n.log.display().to_string()).collect::<Vec<_>>().join(", ")
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
