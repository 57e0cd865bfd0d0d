//! The faults a round injects, and how the harness brings the cluster back
//! afterwards. Every recovery waits on a condition (a new leader, a lease
//! passed, the deployment moved on), never on a fixed time; the only fixed
//! sleep is the length of a SIGSTOP, which *is* the fault.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{Deployment, StepStatus};
use fleet_tests::checks::now_ms;
use fleet_tests::harness::{eventually, CtlRun, Fleet};
use serde::Serialize;
use tokio::task::JoinHandle;

use fleet_tests::netns::Topology;

use crate::scenario::{self, SETTLE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// `kill -9` of the Raft leader; restarted once the survivors elected a new one.
    LeaderKill,
    /// SIGSTOP of the leader for 1.5–3 s (past the election timeout,
    /// inside the nodes' 5 s lease), then SIGCONT: a stale leader wakes up.
    LeaderStop,
    /// `kill -9` of a follower; restarted once the deployment made progress without it.
    FollowerKill,
    /// `kill -9` of a worker node running this deployment; restarted once
    /// the leader presumed it lost (lease passed) and the deployment moved
    /// on, or the deployment ended.
    NodeKill,
    /// Every coordinator's Raft log fsync 150–400 ms slower for 1.5–3 s
    /// (the `raft-log-fsync` failpoint), then normal again.
    SlowDisk,
    /// The leader's host cut off from every other host for 1.5–3 s
    /// (iptables in its network namespace), then healed.
    LeaderPartition,
    /// A worker node's host cut off from every coordinator until the
    /// leader presumed it lost and the deployment moved on, then healed.
    NodePartition,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::LeaderKill,
        FaultKind::LeaderStop,
        FaultKind::FollowerKill,
        FaultKind::NodeKill,
        FaultKind::SlowDisk,
        FaultKind::LeaderPartition,
        FaultKind::NodePartition,
    ];

    /// The kinds a run can inject: partitions need every process on a host
    /// of its own (network namespaces).
    pub fn available(hosts: bool) -> Vec<FaultKind> {
        FaultKind::ALL.into_iter().filter(|k| hosts || !k.needs_hosts()).collect()
    }

    pub fn needs_hosts(self) -> bool {
        matches!(self, FaultKind::LeaderPartition | FaultKind::NodePartition)
    }

    /// Takes a worker node away from the coordinators (killed or cut off).
    pub fn loses_a_node(self) -> bool {
        matches!(self, FaultKind::NodeKill | FaultKind::NodePartition)
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::LeaderKill => "kill -9 leader",
            FaultKind::LeaderStop => "SIGSTOP leader",
            FaultKind::FollowerKill => "kill -9 follower",
            FaultKind::NodeKill => "kill -9 node",
            FaultKind::SlowDisk => "slow disk",
            FaultKind::LeaderPartition => "partition leader",
            FaultKind::NodePartition => "partition node",
        }
    }
}

/// A fault as drawn from the seeded generator, before anything happened:
/// every random choice is made up front so that the sequence of draws, and
/// so the whole run, depends only on the seed.
#[derive(Debug, Clone, Copy)]
pub struct FaultPlan {
    pub kind: FaultKind,
    /// Picks the follower or node (modulo how many there are).
    pub pick: usize,
    /// How long a SIGSTOP or a slow disk lasts.
    pub stop_for: Duration,
}

/// What was done.
#[derive(Debug, Clone, Serialize)]
pub struct Injected {
    pub kind: FaultKind,
    /// `coordinator 2`, `node-3` ...
    pub target: String,
    /// Wall clock of the fault (comparable with witness and event times).
    pub at_ms: i64,
    /// What the recovery saw, for the report.
    pub detail: String,
    /// How long the victim was down (kill → restart), for faults that take
    /// a process away; the checker compares it with `node_wait`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_ms: Option<i64>,
}

/// Inject `plan` into deployment `id` (whose `watch` is `watcher`), with
/// `nodes` the workers its steps run on, and bring the cluster back.
pub async fn inject(
    f: &mut Fleet,
    topo: Option<&Topology>,
    plan: &FaultPlan,
    id: &str,
    nodes: &[&str],
    watcher: &JoinHandle<anyhow::Result<CtlRun>>,
) -> anyhow::Result<Injected> {
    match plan.kind {
        FaultKind::LeaderKill => leader_kill(f).await,
        FaultKind::LeaderStop => leader_stop(f, plan.stop_for).await,
        FaultKind::FollowerKill => follower_kill(f, plan.pick, id, watcher).await,
        FaultKind::NodeKill => node_kill(f, nodes[plan.pick % nodes.len()], id, watcher).await,
        FaultKind::SlowDisk => slow_disk(f, 150 + (plan.pick as u64 % 251), plan.stop_for).await,
        FaultKind::LeaderPartition | FaultKind::NodePartition => {
            let topo = topo.context("a partition needs every process on a host of its own (network namespaces)")?;
            if plan.kind == FaultKind::LeaderPartition {
                leader_partition(f, topo, plan.stop_for).await
            } else {
                node_partition(f, topo, nodes[plan.pick % nodes.len()], id, watcher).await
            }
        }
    }
}

async fn slow_disk(f: &mut Fleet, extra_ms: u64, slow_for: Duration) -> anyhow::Result<Injected> {
    let ids: Vec<u64> = f.cluster.coords.keys().copied().collect();
    let at_ms = now_ms();
    let began = Instant::now();
    let slow = format!("raft-log-fsync=sleep({extra_ms})\n");
    for id in &ids {
        f.cluster.set_failpoints(*id, &slow).await?;
    }
    if let Some(left) = slow_for.checked_sub(began.elapsed()) {
        tokio::time::sleep(left).await; // the length of the fault, not a wait for anything
    }
    for id in &ids {
        f.cluster.set_failpoints(*id, "").await?;
    }
    Ok(Injected {
        kind: FaultKind::SlowDisk,
        target: "every coordinator".into(),
        at_ms,
        detail: format!("fsync {extra_ms} ms slower for {} ms", began.elapsed().as_millis()),
        down_ms: None,
    })
}

async fn leader_kill(f: &mut Fleet) -> anyhow::Result<Injected> {
    let leader = f.cluster.leader_id().await?;
    let at_ms = now_ms();
    let killed = Instant::now();
    f.cluster.kill9(leader)?;
    // A crashed process does not come back within an election timeout:
    // restart it only once the survivors have a leader.
    let (new_leader, _) = new_leader_without(f, leader, "a new leader among the survivors of the kill").await?;
    let elected = killed.elapsed();
    f.cluster.restart(leader).with_context(|| format!("restarting coordinator {leader}"))?;
    Ok(Injected {
        kind: FaultKind::LeaderKill,
        target: format!("coordinator {leader}"),
        at_ms,
        detail: format!("coordinator {new_leader} led {} ms after the kill; {leader} restarted", elected.as_millis()),
        down_ms: None,
    })
}

async fn leader_stop(f: &mut Fleet, stop_for: Duration) -> anyhow::Result<Injected> {
    let leader = f.cluster.leader_id().await?;
    let at_ms = now_ms();
    let stopped = Instant::now();
    f.cluster.signal(leader, "STOP")?;
    // Whatever happens while it is stopped, wake it before reporting.
    let elected = new_leader_without(f, leader, "a new leader while the old one is stopped").await;
    if let Some(left) = stop_for.checked_sub(stopped.elapsed()) {
        tokio::time::sleep(left).await; // the length of the fault, not a wait for anything
    }
    let paused = stopped.elapsed();
    let woke = f.cluster.signal(leader, "CONT");
    let (new_leader, after) = elected?;
    woke?;
    // The woken coordinator learns that it no longer leads.
    follows_another(f, leader, "after SIGCONT").await?;
    Ok(Injected {
        kind: FaultKind::LeaderStop,
        target: format!("coordinator {leader}"),
        at_ms,
        detail: format!("stopped {} ms; coordinator {new_leader} led {} ms after the stop", paused.as_millis(), after.as_millis()),
        down_ms: None,
    })
}

async fn follower_kill(f: &mut Fleet, pick: usize, id: &str, watcher: &JoinHandle<anyhow::Result<CtlRun>>) -> anyhow::Result<Injected> {
    let leader = f.cluster.leader_id().await?;
    let followers: Vec<u64> = f.cluster.coords.keys().copied().filter(|c| *c != leader).collect();
    ensure!(!followers.is_empty(), "no follower to kill: coordinators {:?}", f.cluster.coords.keys().collect::<Vec<_>>());
    let victim = followers[pick % followers.len()];
    let at_ms = now_ms();
    f.cluster.kill9(victim)?;
    // The two survivors are a majority: the deployment must go on without
    // it. Restart it once it has (an action started and finished after the
    // kill), or once the deployment is over.
    let how = eventually(&format!("{id} to make progress with coordinator {victim} dead"), SETTLE, || async {
        if watcher.is_finished() {
            return Ok(Some("the deployment ended".to_string()));
        }
        let next = f.witness()?.into_iter().filter(|l| l.start_ms >= at_ms).min_by_key(|l| l.start_ms);
        Ok(next.map(|l| format!("an action finished {} ms after the kill", l.end_ms - at_ms)))
    })
    .await?;
    f.cluster.restart(victim).with_context(|| format!("restarting coordinator {victim}"))?;
    Ok(Injected {
        kind: FaultKind::FollowerKill,
        target: format!("coordinator {victim}"),
        at_ms,
        detail: format!("leader {leader} kept leading; {how}; {victim} restarted"),
        down_ms: None,
    })
}

async fn node_kill(f: &mut Fleet, victim: &str, id: &str, watcher: &JoinHandle<anyhow::Result<CtlRun>>) -> anyhow::Result<Injected> {
    let epoch = f.cluster.deployment(id).await?.epoch;
    let idx = f.nodes.iter().position(|n| n.name == victim).with_context(|| format!("no node {victim}"))?;
    let at_ms = now_ms();
    f.nodes[idx].kill9()?;
    let how = lost_and_moved_on(f, victim, id, epoch, at_ms, watcher).await?;
    f.nodes[idx].restart().with_context(|| format!("restarting {victim}"))?;
    let down_ms = Some(now_ms() - at_ms);
    Ok(Injected { kind: FaultKind::NodeKill, target: victim.to_string(), at_ms, detail: format!("{how}; restarted"), down_ms })
}

/// Cut a worker node off from every coordinator (it keeps running, and
/// must stop its work on its own), until the leader presumed it lost and
/// the deployment moved on; then heal the link.
async fn node_partition(
    f: &mut Fleet,
    topo: &Topology,
    victim: &str,
    id: &str,
    watcher: &JoinHandle<anyhow::Result<CtlRun>>,
) -> anyhow::Result<Injected> {
    let epoch = f.cluster.deployment(id).await?.epoch;
    let at_ms = now_ms();
    let cut = topo.isolate(scenario::host_of(victim), &scenario::COORD_HOSTS)?;
    let how = lost_and_moved_on(f, victim, id, epoch, at_ms, watcher).await;
    let healed = cut.heal();
    let how = how?;
    healed?;
    let down_ms = Some(now_ms() - at_ms);
    Ok(Injected { kind: FaultKind::NodePartition, target: victim.to_string(), at_ms, detail: format!("{how}; link healed"), down_ms })
}

/// Cut the leader off from every other coordinator and node for `cut_for`
/// (past the election timeout, inside the nodes' lease), then heal: the
/// majority elects a new leader, and the old one must change nothing.
async fn leader_partition(f: &mut Fleet, topo: &Topology, cut_for: Duration) -> anyhow::Result<Injected> {
    let leader = f.cluster.leader_id().await?;
    let host = scenario::coord_host(leader)?;
    let peers: Vec<&str> = topo.hosts().iter().map(|h| h.name.as_str()).filter(|h| *h != host).collect();
    let at_ms = now_ms();
    let began = Instant::now();
    let cut = topo.isolate(host, &peers)?;
    let elected = new_leader_without(f, leader, "a new leader on the majority side of the cut").await;
    if let Some(left) = cut_for.checked_sub(began.elapsed()) {
        tokio::time::sleep(left).await; // the length of the fault, not a wait for anything
    }
    let cut_ms = began.elapsed().as_millis();
    let healed = cut.heal();
    let (new_leader, after) = elected?;
    healed?;
    follows_another(f, leader, "once the cut healed").await?;
    Ok(Injected {
        kind: FaultKind::LeaderPartition,
        target: format!("coordinator {leader}"),
        at_ms,
        detail: format!("cut off {cut_ms} ms; coordinator {new_leader} led {} ms after the cut", after.as_millis()),
        down_ms: None,
    })
}

/// Wait until `victim` is listed lost and deployment `id` moved on since
/// `at_ms` (or ended); a description of what was seen.
async fn lost_and_moved_on(
    f: &Fleet,
    victim: &str,
    id: &str,
    epoch: u64,
    at_ms: i64,
    watcher: &JoinHandle<anyhow::Result<CtlRun>>,
) -> anyhow::Result<String> {
    // Restore the node only after its lease has certainly passed: the
    // leader lists it as lost and the deployment has moved on (its record
    // changed after the fault), or the deployment has ended. A quicker
    // return would only test a reconnect.
    eventually(&format!("{victim} to be presumed lost and {id} to move on, or {id} to end"), SETTLE, || async {
        let d = f.cluster.deployment(id).await?;
        let state = d.state;
        if state.is_terminal() {
            return Ok(Some(format!("{id} ended {state} before the node was back")));
        }
        if watcher.is_finished() {
            return Ok(Some(format!("the watch of {id} returned before the node was back")));
        }
        let nodes = f.cluster.nodes_json().await?;
        let lost = nodes.iter().any(|n| n.id == victim && !n.connected && n.lost_ms.is_some());
        let moved = moved_on_since(&d, epoch, at_ms);
        Ok((lost && moved).then(|| {
            let skipped = d.steps.iter().filter(|s| s.plan.node == victim && s.status == StepStatus::Skipped).count();
            let waiting = d.steps.iter().filter(|s| s.plan.node == victim && s.waiting.is_some()).count();
            format!(
                "presumed lost {} ms after the fault; epoch {epoch} → {}; {skipped} of its steps skipped, {waiting} waiting for it",
                now_ms() - at_ms,
                d.epoch
            )
        }))
    })
    .await
}

/// Has the deployment's record changed since `at_ms`: a new epoch, an
/// event, or a step (or undo) finished after it?
fn moved_on_since(d: &Deployment, epoch: u64, at_ms: i64) -> bool {
    let after = |t: Option<i64>| t.is_some_and(|t| t >= at_ms);
    d.epoch > epoch
        || d.events.iter().any(|e| e.at_ms >= at_ms)
        || d.steps.iter().any(|s| after(s.finished_ms) || after(s.undo_finished_ms))
}

/// Wait until the old leader `old` follows another (it learned it no longer leads).
async fn follows_another(f: &Fleet, old: u64, when: &str) -> anyhow::Result<()> {
    eventually(&format!("coordinator {old} to follow a new leader {when}"), SETTLE, || async {
        let s = f.cluster.local_status(old).await?;
        Ok((s.leader_id != 0 && s.leader_id != old).then_some(()))
    })
    .await
}

/// The first leader other than `old` that any other coordinator reports,
/// and how long after the call it was seen.
async fn new_leader_without(f: &Fleet, old: u64, what: &str) -> anyhow::Result<(u64, Duration)> {
    let began = Instant::now();
    let others: BTreeSet<u64> = f.cluster.coords.keys().copied().filter(|c| *c != old).collect();
    eventually(what, Duration::from_secs(20), || async {
        for id in &others {
            if let Ok(s) = f.cluster.local_status(*id).await {
                if s.leader_id != 0 && s.leader_id != old {
                    return Ok(Some((s.leader_id, began.elapsed())));
                }
            }
        }
        Ok(None)
    })
    .await
}
