//! The cluster the chaos rounds run against, and what they deploy to it.
//!
//! Three coordinators; worker nodes `node-1..3` (env=dev) and `node-c`
//! (role=ops); destinations `dev` (node-1, node-2) and `edge` (node-3),
//! both `process`, so `dev`+`edge` is a stack over all three, and `ops`
//! (`command`, selecting role=ops: one node, so its steps have nowhere to
//! move when it dies: they wait for it, `node_wait`, see [`TOPOLOGY`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_tests::harness::{eventually, Fleet};
use fleet_tests::json::Line;
use fleet_tests::netns::{self, NetFleet, NodeOnHost, Topology};
use serde::Serialize;

pub const DEV_NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
pub const OPS_NODE: &str = "node-c";
pub const ALL_NODES: [&str; 4] = ["node-1", "node-2", "node-3", OPS_NODE];

const DEV_LABELS: &[(&str, &str)] = &[("env", "dev")];
/// node-3 carries `edge` only, so `dev` and `edge` have disjoint nodes. They
/// could share one now (instances are kept per destination and app); the
/// topology predates that and is kept as it is.
const EDGE_LABELS: &[(&str, &str)] = &[("env", "edge")];
const OPS_LABELS: &[(&str, &str)] = &[("role", "ops")];

pub const DESTINATIONS: &str = "destinations:\n\
  \x20 - name: dev\n    selector: { env: dev }\n\
  \x20 - name: edge\n    selector: { env: edge }\n    node_wait: 60s\n\
  \x20 - name: ops\n    adapter: command\n    selector: { role: ops }\n    node_wait: 60s\n";

/// The topology the checker judges outcomes by: each destination, its
/// nodes, and how long work waits for a lost node there (`node_wait`, as in
/// [`DESTINATIONS`]). A destination whose every node is down waits that
/// long before it may give up; one that keeps a live node skips the lost
/// one's steps and carries on.
pub const TOPOLOGY: [(&str, &[&str], Duration); 3] = [
    ("dev", &["node-1", "node-2"], Duration::from_secs(120)),
    ("edge", &["node-3"], Duration::from_secs(60)),
    ("ops", &[OPS_NODE], Duration::from_secs(60)),
];

/// Deadline of every deployment: a saga that cannot finish is cancelled
/// (exit 5) rather than left running, and invariant 5 reports it.
pub const DEADLINE: &str = "90s";

/// How long the harness waits for a cluster-wide condition before it calls
/// the cluster stuck.
pub const SETTLE: Duration = Duration::from_secs(60);

/// A quick, honest health check of the demo app.
const HEALTH: &str = "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 1, deadline: 10s }";

/// What one round deploys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The demo app to `dev` (blue-green on node-1..3, after two 0.2 s hooks per node).
    Single,
    /// The same kind of release to `dev` and `edge` at once (one saga, both locks).
    Stack,
    /// Shell steps to `ops` (node-c only), each with a `check`.
    Command,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Single, Kind::Stack, Kind::Command];

    /// The destinations it deploys to.
    pub fn destinations(self) -> &'static [&'static str] {
        match self {
            Kind::Single => &["dev"],
            Kind::Stack => &["dev", "edge"],
            Kind::Command => &["ops"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Single => "single",
            Kind::Stack => "stack",
            Kind::Command => "command",
        }
    }

    /// The worker nodes this kind's steps run on (where a node fault hits).
    pub fn nodes(self) -> &'static [&'static str] {
        match self {
            Kind::Single | Kind::Stack => &DEV_NODES,
            Kind::Command => std::slice::from_ref(&OPS_NODE),
        }
    }
}

/// The manifests every round picks from, written once into the test dir.
pub struct Manifests {
    /// Where `apply` of the command deployment leaves `<deployment>.applied`.
    pub marks: PathBuf,
    single: PathBuf,
    stack: PathBuf,
    command: PathBuf,
}

impl Manifests {
    pub fn write(f: &Fleet) -> anyhow::Result<Manifests> {
        let hooks = "hooks: { pre: [\"sleep 0.2\", \"sleep 0.2\"] }\n";
        let single = format!("app: web\ndestination: dev\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH}\n{hooks}");
        // No `destination:` here: the stack's destinations come from
        // `--destination dev --destination edge`. One hook per node and
        // destination keeps the saga (two destinations × three nodes) about
        // as long as a single deployment.
        let stack = format!("app: shop\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH}\nhooks: {{ pre: [\"sleep 0.2\"] }}\n");
        // `apply` marks itself done per deployment; its `check` finds the
        // mark, so a re-run after a lost result is harmless.
        let marks = f.cluster.path().join("ops-marks");
        std::fs::create_dir_all(&marks).with_context(|| format!("creating {}", marks.display()))?;
        let mark = format!("{}/$FLEET_DEPLOYMENT.applied", marks.display());
        let yaml = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let command = format!(
            "app: infra\ndestination: ops\nsteps:\n\
             \x20 - {{ name: prepare, run: {prepare} }}\n\
             \x20 - {{ name: apply, run: {apply}, check: {applied}, undo: {unapply} }}\n\
             \x20 - {{ name: verify, run: {verify} }}\n",
            prepare = yaml("sleep 0.3"),
            apply = yaml(&format!("sleep 0.3 && touch {mark}")),
            applied = yaml(&format!("test -f {mark}")),
            unapply = yaml(&format!("rm -f {mark}")),
            verify = yaml(&format!("sleep 0.3 && test -f {mark}")),
        );
        Ok(Manifests {
            marks,
            single: f.cluster.write_file("chaos-single.yaml", &single)?,
            stack: f.cluster.write_file("chaos-stack.yaml", &stack)?,
            command: f.cluster.write_file("chaos-command.yaml", &command)?,
        })
    }

    /// `deploy --detach` of `kind` at `release`: the deployment id.
    pub async fn submit(&self, f: &Fleet, kind: Kind, release: &str) -> anyhow::Result<String> {
        let (m, dests): (&PathBuf, &[&str]) = match kind {
            Kind::Single => (&self.single, &[]),
            Kind::Stack => (&self.stack, &["--destination", "dev", "--destination", "edge"]),
            Kind::Command => (&self.command, &[]),
        };
        let mut args = dests.to_vec();
        args.extend_from_slice(&["--release", release, "--timeout", DEADLINE, "--detach"]);
        let run = f.cluster.deploy(m, &args).await?;
        run.expect_code(0)?;
        let lines = run.lines()?;
        ensure!(lines.len() == 1 && matches!(lines[0], Line::Submitted(_)), "--detach prints one `submitted` line: {run}");
        run.id()
    }
}

/// The hosts of coordinators 1, 2, 3 when every process has a host of its own.
pub const COORD_HOSTS: [&str; 3] = ["c1", "c2", "c3"];

/// The host of a coordinator.
pub fn coord_host(id: u64) -> anyhow::Result<&'static str> {
    COORD_HOSTS.get((id as usize).wrapping_sub(1)).copied().with_context(|| format!("no host for coordinator {id}"))
}

/// The host of a worker node: `node-1` on `n1` ... `node-c` on `nc`.
pub fn host_of(node: &str) -> &str {
    match node {
        "node-1" => "n1",
        "node-2" => "n2",
        "node-3" => "n3",
        _ => "nc",
    }
}

/// The cluster: every coordinator and node a host of its own in a network
/// namespace (so links can be cut) when this machine allows it (root,
/// `ip netns`, iptables) and `FLEET_CHAOS_HOSTS` is not `0`; else every
/// process on 127.0.0.1, and no partitions.
pub async fn start() -> anyhow::Result<(Fleet, Option<Topology>)> {
    let nodes: Vec<(&str, &[(&str, &str)])> =
        vec![(DEV_NODES[0], DEV_LABELS), (DEV_NODES[1], DEV_LABELS), (DEV_NODES[2], EDGE_LABELS), (OPS_NODE, OPS_LABELS)];
    let why_not = match std::env::var("FLEET_CHAOS_HOSTS").ok().as_deref() {
        Some("0") => Some("FLEET_CHAOS_HOSTS=0".to_string()),
        _ => netns::skip_reason(),
    };
    if let Some(why) = why_not {
        eprintln!("chaos: every process on 127.0.0.1, no partitions ({why})");
        return Ok((Fleet::start(&nodes, DESTINATIONS).await?, None));
    }
    let on_hosts: Vec<NodeOnHost> = nodes.iter().map(|(name, labels)| (*name, host_of(name), *labels)).collect();
    let NetFleet { fleet, topo } = NetFleet::start(&COORD_HOSTS, &on_hosts, DESTINATIONS).await?;
    eprintln!("chaos: each coordinator and node on a host of its own (network namespaces on 10.77.x.0/24); partitions on");
    Ok((fleet, Some(topo)))
}

/// Wait until the cluster is whole again: every coordinator follows the
/// same leader, and every node is connected and not marked lost. Each round
/// starts from there, so one round's fault does not leak into the next.
pub async fn settle(f: &Fleet) -> anyhow::Result<()> {
    eventually("every coordinator to follow one leader", SETTLE, || async {
        let mut leaders = std::collections::BTreeSet::new();
        for id in f.cluster.coords.keys() {
            leaders.insert(f.cluster.local_status(*id).await.with_context(|| format!("coordinator {id}"))?.leader_id);
        }
        ensure!(leaders.len() == 1 && !leaders.contains(&0), "leaders as each coordinator sees it: {leaders:?}");
        Ok(Some(()))
    })
    .await?;
    eventually("every node to be connected and not lost", SETTLE, || async {
        let nodes = f.cluster.nodes_json().await?;
        let ok = |name: &&str| nodes.iter().any(|n| n.id == *name && n.connected && n.lost_ms.is_none());
        ensure!(ALL_NODES.iter().all(ok), "nodes: {nodes:?}");
        Ok(Some(()))
    })
    .await
}
