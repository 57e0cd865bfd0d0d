//! A destination's only node reboots mid-deploy (DESIGN.md: "a step with no
//! live node to run on waits for one, bounded by the destination's
//! `node_wait` and the deployment's deadline").
//!
//! * `command` and `process` destinations with one node: `kill -9` of the
//!   node mid-step, restarted once the leader presumed it lost; the
//!   deployment waits (an event says for which node and until when), then
//!   goes on on the returning node and succeeds (exit 0).
//! * The same with `node_wait: 2s` and the node not restarted: the wait
//!   runs out; a command step that cannot be undone anywhere ends
//!   `compensation_failed` (exit 6) saying to start the node and `fleetctl
//!   resolve`; a process destination fails cleanly (exit 3).
//!
//! The chaos seeds that found this (issue 12) replay with
//! `cargo xtask chaos --rounds 40 --seed 0xC0FFEE` (chaos/README.md).
//!
//! Build the binaries first (`cargo xtask test` does).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_tests::checks::assert_witness_safe;
use fleet_tests::harness::{eventually, Fleet};
use fleet_tests::values::show;

const OPS: &[(&str, &str)] = &[("role", "ops")];

fn events(d: &Deployment) -> Vec<String> {
    d.events.iter().map(|e| e.reason.clone()).collect()
}

/// A command manifest whose `apply` takes 3 s, then marks `<dir>/applied`;
/// its check looks for the mark, its undo removes it.
fn command_manifest(dir: &Path) -> anyhow::Result<String> {
    let done = dir.join("applied").display().to_string();
    let runs = dir.join("runs.log").display().to_string();
    Ok(format!(
        "app: infra\ndestination: ops\nretry: {{ max_attempts: 1 }}\ntimeout: 90s\nsteps:\n\
         \x20 - {{ name: prepare, run: {prep} }}\n\
         \x20 - {{ name: apply, run: {apply}, check: {check}, undo: {undo} }}\n\
         \x20 - {{ name: verify, run: {verify} }}\n",
        prep = serde_json::to_string(&format!("echo \"prepare $FLEET_NODE\" >> {runs}"))?,
        apply = serde_json::to_string(&format!("echo \"start $FLEET_NODE\" >> {runs}; sleep 3; touch {done}; echo end >> {runs}"))?,
        check = serde_json::to_string(&format!("test -f {done}"))?,
        undo = serde_json::to_string(&format!("rm -f {done}"))?,
        verify = serde_json::to_string(&format!("sleep 2; test -f {done}"))?,
    ))
}

/// Kill `node` once `ready` holds, and wait until the leader lists it lost
/// and the deployment says it waits for it.
async fn kill_and_wait_for_the_wait(f: &mut Fleet, node: &str, id: &str, ready: impl Fn() -> bool) -> anyhow::Result<()> {
    eventually(&format!("{id} to be mid-step on {node}"), Duration::from_secs(60), || async { Ok(ready().then_some(())) }).await?;
    let idx = f.nodes.iter().position(|n| n.name == node).context("no such node")?;
    f.nodes[idx].kill9()?;
    let f = &*f;
    eventually(&format!("{node} presumed lost and {id} waiting for it"), Duration::from_secs(30), || async {
        let nodes = f.cluster.nodes_json().await?;
        let lost = nodes.iter().any(|n| n.id == node && n.lost_ms.is_some() && !n.connected);
        let d = f.cluster.deployment(id).await?;
        let waits = events(&d).iter().any(|r| r.contains(&format!("node {node} lost")) && r.contains("waiting for a node of"));
        Ok((lost && waits).then_some(()))
    })
    .await
}

// ------------------------------------------------ command, node back in time

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_command_node_that_reboots_within_node_wait_finishes_the_deployment() {
    let dests = "destinations:\n  - name: ops\n    adapter: command\n    selector: { role: ops }\n";
    let mut f = Fleet::start(&[("node-c", OPS)], dests).await.expect("cluster with one ops node");
    let r = command_back(&mut f).await;
    f.finish(r);
}

async fn command_back(f: &mut Fleet) -> anyhow::Result<()> {
    let dir = f.cluster.path().to_path_buf();
    let m = f.cluster.write_file("fleet.yaml", &command_manifest(&dir)?)?;
    let submitted = f.cluster.deploy(&m, &["--release", "v1", "--detach"]).await?;
    submitted.expect_code(0)?;
    let id = submitted.id()?;
    let runs = dir.join("runs.log");
    kill_and_wait_for_the_wait(f, "node-c", &id, || std::fs::read_to_string(&runs).unwrap_or_default().contains("start node-c")).await?;
    let d = f.cluster.deployment(&id).await?;
    ensure!(d.state == DeployState::Running, "it waits instead of failing: {}", d.state);
    let wait = events(&d).into_iter().find(|r| r.contains("waiting for a node of ops")).context("no waiting event")?;
    ensure!(wait.contains("node-c lost") && wait.contains("gives up at") && wait.contains("node_wait 2m"), "{wait}");

    f.nodes.iter_mut().find(|n| n.name == "node-c").context("node-c")?.restart()?;
    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(0)?;
    let d = watched.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "{}", show(&d));
    ensure!(
        events(&d).iter().any(|r| r.contains("node node-c registered again") && r.contains("`apply` (check first)")),
        "the returning node takes the work up, checking apply first: {:#?}",
        events(&d)
    );
    ensure!(d.steps.iter().all(|s| s.plan.node == "node-c"), "nothing moved: {}", show(&d));
    ensure!(dir.join("applied").exists(), "apply's change is in place");
    assert_witness_safe(&f.witness()?, &[&d])?;
    Ok(())
}

// ------------------------------------------------ process, node back in time

const HEALTH_SLOW: &str = "{ command: [\"sh\", \"-c\", \"sleep 3\"], interval: 100ms, timeout: 10s, healthy_threshold: 1, deadline: 30s }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_process_node_that_reboots_within_node_wait_finishes_the_deployment() {
    let dests = "destinations:\n  - name: edge\n    selector: { env: edge }\n";
    let mut f = Fleet::start(&[("node-3", &[("env", "edge")])], dests).await.expect("cluster with one edge node");
    let r = process_back(&mut f).await;
    f.finish(r);
}

async fn process_back(f: &mut Fleet) -> anyhow::Result<()> {
    let manifest = format!("app: web\ndestination: edge\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH_SLOW}\ntimeout: 90s\n");
    let m = f.cluster.write_file("fleet.yaml", &manifest)?;
    let submitted = f.cluster.deploy(&m, &["--release", "v1", "--detach"]).await?;
    submitted.expect_code(0)?;
    let id = submitted.id()?;
    // Killed during the (3 s) health check, after the instance started.
    let started = || {
        let w = f.node("node-3").witness().unwrap_or_default();
        w.iter().any(|l| l.deployment == id && l.action == "start")
    };
    eventually("the instance to start", Duration::from_secs(60), || async { Ok(started().then_some(())) }).await?;
    kill_and_wait_for_the_wait(f, "node-3", &id, || true).await?;
    f.nodes.iter_mut().find(|n| n.name == "node-3").context("node-3")?.restart()?;
    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(0)?;
    let d = watched.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "{}", show(&d));
    ensure!(
        !events(&d).iter().any(|r| r.contains("every node of edge was lost")),
        "a rebooting node is not a lost destination: {:#?}",
        events(&d)
    );
    assert_witness_safe(&f.witness()?, &[&d])?;
    Ok(())
}

// ------------------------------------------------ past node_wait

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_node_wait_the_deployment_gives_up_and_says_what_to_do() {
    let dests = "destinations:\n  - name: ops\n    adapter: command\n    selector: { role: ops }\n    node_wait: 2s\n\
                 \x20 - name: edge\n    selector: { env: edge }\n    node_wait: 2s\n";
    let nodes: Vec<(&str, &[(&str, &str)])> = vec![("node-c", OPS), ("node-3", &[("env", "edge")])];
    let mut f = Fleet::start(&nodes, dests).await.expect("cluster with one ops and one edge node");
    let r = past_node_wait(&mut f).await;
    f.finish(r);
}

async fn past_node_wait(f: &mut Fleet) -> anyhow::Result<()> {
    let listed = f.cluster.ctl(&["destinations"]).await?;
    listed.expect_code(0)?;
    ensure!(listed.stdout.contains("NODE WAIT") && listed.stdout.contains("2s"), "fleetctl destinations shows node_wait: {listed}");

    // Command: node-c dies while `verify` runs, after `apply` changed
    // something that only node-c could undo: exit 6, and the message says
    // what to do.
    let dir = f.cluster.path().to_path_buf();
    let m = f.cluster.write_file("fleet.yaml", &command_manifest(&dir)?)?;
    let submitted = f.cluster.deploy(&m, &["--release", "v1", "--detach"]).await?;
    submitted.expect_code(0)?;
    let id = submitted.id()?;
    let runs = dir.join("runs.log");
    kill_and_wait_for_the_wait(f, "node-c", &id, || std::fs::read_to_string(&runs).unwrap_or_default().contains("end")).await?;
    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(6)?;
    let d = watched.deployment()?;
    ensure!(d.state == DeployState::CompensationFailed, "{}", show(&d));
    let ev = events(&d);
    ensure!(ev.iter().any(|r| r.starts_with("gave up waiting for a node of ops: node-c") && r.contains("(node_wait)")), "{ev:#?}");
    let last = ev.last().context("no events")?;
    // Which completed step it names depends on whether apply's result was
    // committed before the kill; either way a human must act.
    ensure!(last.contains("no live node is left to undo `") && last.contains("start the node"), "{last}");
    ensure!(last.contains(&format!("fleetctl resolve {id}")), "{last}");

    // Process: node-3 dies mid-deploy and stays away: exit 3, nothing
    // half-deployed is claimed.
    let manifest = format!("app: web\ndestination: edge\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH_SLOW}\ntimeout: 90s\n");
    let m = f.cluster.write_file("web.yaml", &manifest)?;
    let submitted = f.cluster.deploy(&m, &["--release", "v1", "--detach"]).await?;
    submitted.expect_code(0)?;
    let id = submitted.id()?;
    let started = || {
        let w = f.node("node-3").witness().unwrap_or_default();
        w.iter().any(|l| l.deployment == id && l.action == "start")
    };
    eventually("the instance to start", Duration::from_secs(60), || async { Ok(started().then_some(())) }).await?;
    kill_and_wait_for_the_wait(f, "node-3", &id, || true).await?;
    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(3)?;
    let d = watched.deployment()?;
    let ev = events(&d);
    ensure!(ev.iter().any(|r| r.starts_with("gave up waiting for a node of edge: node-3")), "{ev:#?}");
    ensure!(ev.iter().any(|r| r.contains("every node of edge was lost") && r.contains("start its nodes, then deploy again")), "{ev:#?}");
    Ok(())
}
