//! `dev up` / `dev down`: a local cluster on this machine (coordinators,
//! worker nodes and the demo destinations), started with `fleetctl::dev`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use fleet_core::auth::Role;
use fleet_proto::*;
use fleetctl::client::{Client, Context};
use fleetctl::output::DevDown;
use fleetctl::{certs, dev, exit};

use super::cluster::print_status;
use super::common::{print_json, usage, Exit};
use super::destinations::apply_destinations;
use super::nodes::list_nodes;
use crate::cli::{DevCmd, Output};

pub async fn dev(cmd: DevCmd, out: Output) -> Result<i32, Exit> {
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
                Output::Json => print_json(&DevDown {
                    stopped: pids.clone(),
                    stopped_nodes: nodes.clone(),
                    stopped_instances: instances.clone(),
                    purged: purge,
                }),
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
const DEMO_DESTINATIONS: &str = include_str!("../../../../examples/demo/destinations.yaml");

fn read_pids_file(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn read_pids(dir: &Path) -> Vec<u32> {
    read_pids_file(&dir.join("pids"))
}

async fn dev_up(n: u64, nodes: u32, destinations: Option<&Path>, dir: &Path, out: Output) -> Result<i32, Exit> {
    if !(1..=5).contains(&n) {
        return Err(usage(anyhow::anyhow!("--coordinators must be 1 to 5 (3 for a highly available cluster)")));
    }
    if nodes > 26 {
        return Err(usage(anyhow::anyhow!("--nodes must be 0 to 26")));
    }
    // Read and check the destinations before starting anything.
    let (dest_name, dest_text) = match destinations {
        Some(p) => {
            (p.display().to_string(), std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())).map_err(usage)?)
        }
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
        // The HTTP API and dashboard, on the port it had before if restarted.
        let http_file = dir.join(format!("coord-{id}.http"));
        let http_listen = std::fs::read_to_string(&http_file)
            .ok()
            .filter(|_| !fresh)
            .map(|a| a.trim().to_string())
            .unwrap_or_else(|| "127.0.0.1:0".to_string());
        let _ = std::fs::remove_file(&http_file);
        let extra_args = vec!["--http-addr".into(), http_listen, "--http-addr-file".into(), http_file.display().to_string()];
        let spec = dev::CoordSpec { id, dir: dir.clone(), bootstrap: id == 1 && fresh, listen, extra_args };
        let (child, addr) = dev::spawn_coordinator(&bin, &spec, Duration::from_secs(30))?;
        eprintln!("started coordinator {id} at {addr} (pid {}, log {})", child.id(), spec.log_file().display());
        pids.push(child.id());
        addrs.push(addr);
        std::fs::write(dir.join("pids"), pids.iter().map(|p| format!("{p}\n")).collect::<String>()).context("writing the pid file")?;
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
        return Err(
            anyhow::anyhow!("the cluster has {} voters, expected {n}; see the logs in {}", status.members.len(), dir.display()).into()
        );
    }
    let started = dev_nodes(nodes, &dir, &addrs)?;
    dev_destinations(&mut c, &dest_name, &dest_text).await?;
    if !started.is_empty() {
        wait_for_nodes(&mut c, &started, Duration::from_secs(30)).await?;
    }
    let dashboard = dev_dashboard(&mut c, &dir, fresh).await;
    print_status(&status, out);
    if out == Output::Text {
        println!("\nThe cluster is up. Point fleetctl at it:\n  export FLEET_CONTEXT={}", ctx_path.display());
        match &dashboard {
            Ok(url) => println!(
                "The dashboard (your browser will not know the dev CA, {}: accept it or import it):\n  {url}",
                certs_dir.join("ca.pem").display()
            ),
            Err(e) => eprintln!("fleetctl: no dashboard link: {e:#}"),
        }
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

/// The dashboard's address with an operator token to sign in with: made
/// once per dev cluster and kept (mode 0600) in `dashboard-token`.
async fn dev_dashboard(c: &mut Client, dir: &Path, fresh: bool) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let http_file = dir.join("coord-1.http");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let http = loop {
        match std::fs::read_to_string(&http_file) {
            Ok(a) if !a.trim().is_empty() => break a.trim().to_string(),
            _ if std::time::Instant::now() > deadline => anyhow::bail!("coordinator 1 did not write {}", http_file.display()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let token_file = dir.join("dashboard-token");
    let token = match std::fs::read_to_string(&token_file).ok().filter(|_| !fresh) {
        Some(t) => t.trim().to_string(),
        None => {
            let t = super::tokens::make_token(c, "dev-dashboard", "operator", None).await?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&token_file)
                .with_context(|| format!("writing {}", token_file.display()))?;
            std::io::Write::write_all(&mut f, t.as_bytes())?;
            t
        }
    };
    Ok(format!("https://{http}/#token={token}"))
}

/// A started worker node: its name, pid and log file.
struct DevNode {
    name: String,
    pid: u32,
    log: PathBuf,
}

/// Issue certificates for and start `count` worker nodes (node-1 in zone
/// a, node-2 in zone b, ...), recording their pids for `dev down`.
fn dev_nodes(count: u32, dir: &Path, coords: &[String]) -> Result<Vec<DevNode>, Exit> {
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
        match apply_destinations(c, name, text).await {
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
        let listed = list_nodes(c).await.unwrap_or_default();
        for v in &listed {
            let id = v.id.as_str();
            if v.connected && nodes.iter().any(|n| n.name == id) && reported.insert(id.to_string()) {
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
                nodes
                    .iter()
                    .filter(|n| missing.contains(&n.name.as_str()))
                    .map(|n| n.log.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
