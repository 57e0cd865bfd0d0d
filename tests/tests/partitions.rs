//! Network partitions between separate hosts: every coordinator and node
//! runs in a network namespace of its own (`fleet_tests::netns`), and links
//! are cut with iptables rules inside the namespaces.
//!
//! * The leader is isolated from the majority: the majority elects a new
//!   leader and keeps taking writes; a write sent to the old leader is not
//!   acknowledged, and after the heal it changed nothing on any coordinator.
//! * A node is cut off from every coordinator mid-step: it stops the step
//!   before its lease is gone, the leader hands the step to the other node,
//!   and the witness shows no overlap, also after the node is back.
//! * A one-way cut (a follower's packets to the leader dropped) and a
//!   flapping link: writes keep being acknowledged, and every acknowledged
//!   write is on every coordinator after the heal.
//!
//! Needs root (namespaces, iptables); skipped with a printed reason
//! otherwise. Build the binaries first (`cargo xtask test` does).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_core::leader::NODE_LEASE_MS;
use fleet_proto::{ClusterStatusReply, LockOutcome, LockReply};
use fleet_tests::checks::{assert_witness_safe, now_ms, WitnessLine};
use fleet_tests::harness::{acquire, eventually, lock_status, Cluster, TestSlot, FAST_RAFT};
use fleet_tests::netns::{self, NetFleet, Topology};
use fleet_tests::values::{show, status, steps};
use fleetctl::client::Client;

const COORDS: [&str; 3] = ["c1", "c2", "c3"];

/// Coordinator `id` runs on host `c<id>`.
fn host(id: u64) -> String {
    format!("c{id}")
}

/// Print why the test cannot run here, if it cannot.
fn skipped(test: &str) -> bool {
    match netns::skip_reason() {
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            true
        }
        None => false,
    }
}

/// A client that talks only to coordinators `ids` (it follows a redirect
/// only to an address it is given).
fn client_of(cluster: &Cluster, ids: &[u64], retry_for: Duration, call_timeout: Duration) -> anyhow::Result<Client> {
    let mut ctx = cluster.context("operator");
    ctx.addrs = ids.iter().map(|id| cluster.coords[id].addr.clone()).collect();
    let mut c = Client::new(&ctx)?;
    c.retry_for = retry_for;
    c.call_timeout = call_timeout;
    Ok(c)
}

fn granted(r: &LockReply) -> anyhow::Result<u64> {
    ensure!(r.outcome() == LockOutcome::Granted, "expected the lock granted, got {r:?}");
    Ok(r.lock.as_ref().context("a granted lock names itself")?.fencing_token)
}

fn finish(cluster: &Cluster, r: anyhow::Result<()>) {
    if let Err(e) = r {
        eprintln!("\n##### test dir: {}\n{}", cluster.path().display(), cluster.coord_logs(60));
        panic!("{e:#}");
    }
}

/// Every coordinator's own view, once all of them have applied the same
/// log up to at least `applied` under one leader.
async fn converged(cluster: &Cluster, applied: u64) -> anyhow::Result<Vec<ClusterStatusReply>> {
    eventually(&format!("every coordinator to apply the same log up to {applied} or beyond"), Duration::from_secs(60), || async {
        let mut views = vec![];
        for id in cluster.coords.keys() {
            views.push(cluster.local_status(*id).await?);
        }
        let first = &views[0];
        let agreed = first.leader_id != 0
            && first.applied_index >= applied
            && views.iter().all(|v| (v.leader_id, v.term, v.applied_index) == (first.leader_id, first.term, first.applied_index));
        if agreed {
            Ok(Some(views))
        } else {
            let seen: Vec<String> = views
                .iter()
                .map(|v| {
                    format!("c{}: leader {} term {} applied {} locks {}", v.answered_by, v.leader_id, v.term, v.applied_index, v.locks)
                })
                .collect();
            anyhow::bail!("{}", seen.join("; "))
        }
    })
    .await
}

/// Acknowledged writes are on every coordinator: all of them hold the same
/// number of locks as the leader's lock table, which has every one of
/// `acked` (held by the operator).
async fn assert_everywhere(cluster: &Cluster, acked: &[String], applied: u64) -> anyhow::Result<()> {
    let views = converged(cluster, applied).await?;
    let mut c = cluster.client("operator")?;
    let table = lock_status(&mut c, "").await?;
    let held: BTreeSet<&str> = table.locks.iter().map(|l| l.destination.as_str()).collect();
    for name in acked {
        ensure!(held.contains(name.as_str()), "the acknowledged lock {name} is not held after the heal; held: {held:?}");
    }
    for v in &views {
        ensure!(
            v.locks as usize == table.locks.len(),
            "coordinator {} holds {} locks in its own state, the leader's table {} ({held:?})",
            v.answered_by,
            v.locks,
            table.locks.len()
        );
    }
    Ok(())
}

// --------------------------------------------- 1. leader isolated from the majority

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_acknowledges_nothing_and_its_late_write_is_discarded() {
    if skipped("isolated_leader_acknowledges_nothing_and_its_late_write_is_discarded") {
        return;
    }
    let _slot = TestSlot::take();
    let topo = Topology::new(&COORDS).expect("network topology");
    let cluster = netns::start_cluster(&topo, &COORDS, FAST_RAFT).await.expect("three coordinators on three hosts");
    let r = isolated_leader(&topo, &cluster).await;
    finish(&cluster, r);
}

async fn isolated_leader(topo: &Topology, cluster: &Cluster) -> anyhow::Result<()> {
    let mut all = client_of(cluster, &[1, 2, 3], Duration::from_secs(30), Duration::from_secs(10))?;
    let before = granted(&acquire(&mut all, "before", "taken before the partition", "p1-before").await?)?;
    let old = cluster.status().await?.leader_id;
    let old_view = cluster.local_status(old).await?;
    ensure!(old_view.leader_id == old && old_view.locks == 1, "the leader's own view: {old_view:?}");
    let others: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    let other_hosts: Vec<String> = others.iter().map(|id| host(*id)).collect();
    let other_hosts: Vec<&str> = other_hosts.iter().map(String::as_str).collect();

    let cut = topo.isolate(&host(old), &other_hosts)?;
    // A write sent to the isolated leader at once, while it still believes
    // it leads: it cannot reach a majority, so it must not acknowledge.
    let mut to_old = client_of(cluster, &[old], Duration::from_secs(2), Duration::from_secs(3))?;
    let late = acquire(&mut to_old, "late", "sent to the isolated leader", "p1-late").await;
    ensure!(late.is_err(), "the isolated leader acknowledged a write: {late:?}");
    eprintln!("the isolated leader did not acknowledge: {:#}", late.err().context("checked above")?);

    // The majority elects a new leader and takes writes.
    let new = eventually("the majority to elect a new leader", Duration::from_secs(30), || async {
        let a = cluster.local_status(others[0]).await?;
        let b = cluster.local_status(others[1]).await?;
        let elected = a.leader_id == b.leader_id && a.leader_id != 0 && a.leader_id != old && a.term > old_view.term;
        Ok(elected.then_some(a.leader_id))
    })
    .await?;
    let mut majority = client_of(cluster, &others, Duration::from_secs(30), Duration::from_secs(10))?;
    let after_reply = acquire(&mut majority, "after", "taken through the new leader", "p1-after").await?;
    let after = granted(&after_reply)?;
    ensure!(after > before, "fencing tokens grow across the failover: {before} then {after}");
    // The isolated coordinator applied neither its own late write nor the
    // majority's.
    let iso = cluster.local_status(old).await?;
    ensure!(iso.locks == 1, "the isolated old leader holds {} locks in its state, want 1 (`before` only): {iso:?}", iso.locks);
    eprintln!(
        "isolated c{old}: believes leader {} in term {}, log up to {}, applied {}; the majority: leader {new}",
        iso.leader_id, iso.term, iso.last_log_index, iso.applied_index
    );

    cut.heal()?;
    let views = converged(cluster, after_reply.applied_index).await?;
    for v in &views {
        ensure!(v.leader_id != old, "the old leader leads again after the heal: {v:?}");
        ensure!(v.locks == 2, "coordinator {} holds {} locks after the heal, want 2 (`before`, `after`): {v:?}", v.answered_by, v.locks);
    }
    let back = views.iter().find(|v| v.answered_by == old).context("the old leader answered")?;
    ensure!(back.term > old_view.term, "the old leader did not move to the new term: {back:?}");
    let table = lock_status(&mut all, "").await?;
    let held: BTreeSet<&str> = table.locks.iter().map(|l| l.destination.as_str()).collect();
    ensure!(held == BTreeSet::from(["before", "after"]), "locks after the heal: {held:?} (the late write must be gone)");
    Ok(())
}

// ------------------------------------------ 2. a node cut off mid-deploy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cut_off_mid_step_stops_before_its_lease_ends_and_does_not_fight_its_successor() {
    if skipped("node_cut_off_mid_step_stops_before_its_lease_ends_and_does_not_fight_its_successor") {
        return;
    }
    let infra: &[(&str, &str)] = &[("env", "infra")];
    let dests = "destinations:\n  - name: infra\n    adapter: command\n    selector: { env: infra }\n";
    let mut net = NetFleet::start(&COORDS, &[("node-1", "n1", infra), ("node-2", "n2", infra)], dests)
        .await
        .expect("three coordinators and two nodes, each on its own host");
    let r = node_cut_off(&mut net).await;
    net.finish(r);
}

async fn node_cut_off(net: &mut NetFleet) -> anyhow::Result<()> {
    let (f, topo) = (&net.fleet, &net.topo);
    let dir = f.cluster.path().to_path_buf();
    let runs = dir.join("runs.log");
    let done = dir.join("applied");
    let (runs_s, done_s) = (runs.display().to_string(), done.display().to_string());
    // `apply` logs its start, works (30 s on node-1, 1 s elsewhere), then
    // marks itself done; its check looks for the mark.
    let apply = format!(
        "echo \"start $FLEET_NODE\" >> {runs_s}; if [ \"$FLEET_NODE\" = node-1 ]; then sleep 30; else sleep 1; fi; \
         touch {done_s}; echo \"end $FLEET_NODE\" >> {runs_s}"
    );
    let manifest = format!(
        "app: infra\ndestination: infra\nretry: {{ max_attempts: 1 }}\nsteps:\n\
         \x20 - {{ name: prepare, run: {prep} }}\n\
         \x20 - {{ name: apply, run: {apply}, check: {check}, undo: {undo} }}\n\
         \x20 - {{ name: verify, run: {check} }}\n",
        prep = serde_json::to_string(&format!("echo \"prepare $FLEET_NODE\" >> {runs_s}"))?,
        apply = serde_json::to_string(&apply)?,
        check = serde_json::to_string(&format!("test -f {done_s}"))?,
        undo = serde_json::to_string(&format!("rm -f {done_s}"))?,
    );
    let m = f.cluster.write_file("fleet.yaml", &manifest)?;
    let submitted = f.cluster.deploy(&m, &["--release", "v1", "--detach"]).await?;
    submitted.expect_code(0)?;
    let id = submitted.id()?;
    let d = f.cluster.deployment(&id).await?;
    ensure!(steps(&d).iter().all(|s| s.plan.node == "node-1" && s.plan.movable), "plan: {}", show(&d));

    eventually("node-1 to be running `apply`", Duration::from_secs(30), || async {
        Ok(std::fs::read_to_string(&runs).unwrap_or_default().contains("start node-1").then_some(()))
    })
    .await?;
    let cut = topo.isolate("n1", &COORDS)?;
    let cut_at = now_ms();

    // node-1 is alive but alone: it stops its step before its lease runs
    // out (its witness line for `apply` is the aborted attempt).
    let stopped = eventually("node-1 to stop `apply`", Duration::from_secs(45), || async {
        Ok(f.node("node-1").witness()?.into_iter().find(|l| l.deployment == id && l.step == 1))
    })
    .await?;
    ensure!(!stopped.ok, "node-1's cut-off attempt of apply must not succeed: {stopped}");
    ensure!(
        stopped.end_ms - cut_at < NODE_LEASE_MS,
        "node-1 stopped apply {} ms after the cut, not within its {NODE_LEASE_MS} ms lease: {stopped}",
        stopped.end_ms - cut_at
    );

    // The leader hands the rest to node-2, which checks, then runs it.
    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(0)?;
    let d = watched.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "the saga should finish on node-2: {}", show(&d));
    ensure!(d.epoch == 2, "the handover bumps the epoch once: {}", d.epoch);
    let handed = d.events.iter().map(|e| e.reason.as_str()).find(|r| r.contains("handed over")).context("no handover event")?;
    ensure!(handed.contains("node node-1 lost") && handed.contains("`apply` from node-1 to node-2"), "handover event: {handed}");
    let s = steps(&d);
    ensure!(status(&s[0]) == "done" && s[0].plan.node == "node-1", "prepare stays node-1's: {}", show(&s[0]));
    for s in &s[1..] {
        ensure!(status(s) == "done" && s.plan.node == "node-2", "the rest ran on node-2: {}", show(s));
    }
    let taken = f.node("node-2").witness()?.into_iter().find(|l| l.deployment == id && l.step == 1).context("node-2 ran no apply")?;
    ensure!(taken.ok && taken.start_ms >= stopped.end_ms, "node-2's apply began before node-1's ended:\n  {stopped}\n  {taken}");
    assert_safe(&f.witness()?, &stopped, &[&d])?;

    // The link heals: node-1 comes back and is trusted again, and what it
    // reports of its old attempt changes nothing.
    cut.heal()?;
    eventually("node-1 to be back", Duration::from_secs(30), || async {
        let nodes = f.cluster.nodes_json().await?;
        Ok(nodes.iter().any(|n| n.id == "node-1" && n.connected && n.lost_ms.is_none()).then_some(()))
    })
    .await?;
    let second = f.cluster.write_file("fleet2.yaml", "app: infra\ndestination: infra\nsteps:\n  - { name: noop, run: \"true\" }\n")?;
    let run2 = f.cluster.deploy(&second, &["--release", "v2"]).await?;
    run2.expect_code(0)?;
    let d2 = run2.deployment()?;
    let again = f.cluster.deployment(&id).await?;
    ensure!(again.state == DeployState::Succeeded && again.epoch == 2, "the first deployment changed after the heal: {}", show(&again));
    let text = std::fs::read_to_string(&runs)?;
    let lines: Vec<&str> = text.lines().collect();
    ensure!(
        lines == ["prepare node-1", "start node-1", "start node-2", "end node-2"],
        "runs: {lines:?} (node-1's attempt must never complete, node-2's must run once)"
    );
    let w1: Vec<_> = f.node("node-1").witness()?.into_iter().filter(|l| l.deployment == id).collect();
    ensure!(w1.len() == 2, "node-1 did more for the first deployment than prepare and its stopped apply: {w1:?}");
    assert_safe(&f.witness()?, &stopped, &[&d, &d2])?;
    Ok(())
}

/// The witness invariants over every line: no two actions overlapped on a
/// destination and tokens never went back, the stopped attempt included;
/// then [`assert_witness_safe`] without the stopped attempt, because it
/// counts an attempt cut short on one node and handed over to another as
/// "carried out twice" (a hand-over keeps the attempt number).
fn assert_safe(witness: &[WitnessLine], stopped: &WitnessLine, deployments: &[&Deployment]) -> anyhow::Result<()> {
    let mut by_dest: BTreeMap<&str, Vec<&WitnessLine>> = BTreeMap::new();
    for l in witness {
        by_dest.entry(l.destination.as_str()).or_default().push(l);
    }
    for (dest, mut lines) in by_dest {
        lines.sort_by_key(|l| (l.start_ms, l.end_ms));
        for w in lines.windows(2) {
            ensure!(w[0].end_ms <= w[1].start_ms, "two actions overlapped on destination {dest}:\n  {}\n  {}", w[0], w[1]);
            ensure!(w[0].token <= w[1].token, "a lower token ran after a higher one on {dest}:\n  {}\n  {}", w[0], w[1]);
        }
    }
    let rest: Vec<WitnessLine> = witness.iter().filter(|l| *l != stopped).cloned().collect();
    ensure!(rest.len() + 1 == witness.len(), "the stopped attempt is not in the witness once: {stopped}");
    assert_witness_safe(&rest, deployments)
}

// ----------------------------------- 3. a one-way cut and a flapping link

/// Acquire `<prefix>-0`, `<prefix>-1` ... (at least `min`, and until
/// `busy_for` has passed); each must be acknowledged within the client's
/// retry window. Answers the names and the highest applied index.
async fn write_locks(c: &mut Client, prefix: &str, min: usize, busy_for: Duration) -> anyhow::Result<(Vec<String>, u64)> {
    let started = Instant::now();
    let (mut acked, mut applied, mut slowest) = (vec![], 0, Duration::ZERO);
    while acked.len() < min || started.elapsed() < busy_for {
        let name = format!("{prefix}-{}", acked.len());
        let t = Instant::now();
        let r = acquire(c, &name, "written during a partition", &name).await.with_context(|| format!("acquiring {name}"))?;
        granted(&r)?;
        slowest = slowest.max(t.elapsed());
        applied = applied.max(r.applied_index);
        acked.push(name);
    }
    eprintln!("{prefix}: {} writes acknowledged in {:?}, the slowest in {slowest:?}", acked.len(), started.elapsed());
    Ok((acked, applied))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_cut_and_flapping_link_lose_no_acknowledged_write() {
    if skipped("one_way_cut_and_flapping_link_lose_no_acknowledged_write") {
        return;
    }
    let _slot = TestSlot::take();
    let topo = Topology::new(&COORDS).expect("network topology");
    let cluster = netns::start_cluster(&topo, &COORDS, FAST_RAFT).await.expect("three coordinators on three hosts");
    let r = one_way_and_flapping(&topo, &cluster).await;
    finish(&cluster, r);
}

async fn one_way_and_flapping(topo: &Topology, cluster: &Cluster) -> anyhow::Result<()> {
    let mut c = client_of(cluster, &[1, 2, 3], Duration::from_secs(30), Duration::from_secs(5))?;

    // One-way: a follower hears the leader, the leader never hears back.
    let leader = cluster.status().await?.leader_id;
    let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
    let cut = topo.cut_one_way(&host(follower), &host(leader))?;
    let (mut acked, applied) = write_locks(&mut c, "one-way", 20, Duration::from_secs(6)).await?;
    cut.heal()?;
    assert_everywhere(cluster, &acked, applied).await?;

    // Flapping: the (new) leader loses the others for 1.2 s, gets them
    // back for 0.8 s, again and again while clients write.
    let leader = cluster.status().await?.leader_id;
    let others: Vec<String> = (1..=3).filter(|id| *id != leader).map(host).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    let flap = topo.flap(topo.isolation(&host(leader), &others)?, Duration::from_millis(1200), Duration::from_millis(800));
    let written = write_locks(&mut c, "flapping", 20, Duration::from_secs(10)).await;
    let cycles = flap.stop()?;
    let (flapped, applied_flapping) = written?;
    ensure!(cycles >= 4, "the link went down only {cycles} times while clients wrote");
    acked.extend(flapped);
    assert_everywhere(cluster, &acked, applied.max(applied_flapping)).await?;
    Ok(())
}
