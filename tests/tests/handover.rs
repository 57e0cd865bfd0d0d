//! Work that outlives its node.
//!
//! * A `command` destination's step is running when its node gets
//!   `kill -9`: after the node's lease the leader hands the rest of the
//!   saga to another node of the destination with the epoch bumped; that
//!   node runs the step's `check` first, then the step, and the deployment
//!   succeeds. The dead node's attempt never finished, nothing ran twice
//!   at once, and the witness agrees.
//! * A `process` node is killed after starting its new instance: the
//!   deployment goes on without it, and when the node comes back the
//!   leader tells it to forget that deployment, so the staged instance it
//!   left behind is stopped while the release it serves keeps serving.
//!
//! Build the binaries first (`cargo xtask test` does).

use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_tests::checks::{assert_witness_safe, instances, now_ms};
use fleet_tests::harness::{eventually, http_get, pid_alive, release_of, Fleet};
use fleet_tests::json::SwitchOutput;
use fleet_tests::values::{kind, output, show, status, steps};

fn events(d: &Deployment) -> Vec<String> {
    d.events.iter().map(|e| e.reason.clone()).collect()
}

// ------------------------------------------------- 1. command step handover

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_step_is_handed_over_when_its_node_is_killed() {
    let infra: &[(&str, &str)] = &[("env", "infra")];
    let nodes = vec![("node-1", infra), ("node-2", infra), ("node-3", infra)];
    let dests = "destinations:\n  - name: infra\n    adapter: command\n    selector: { env: infra }\n";
    let mut f = Fleet::start(&nodes, dests).await.expect("cluster with three nodes");
    let r = handover(&mut f).await;
    f.finish(r);
}

async fn handover(f: &mut Fleet) -> anyhow::Result<()> {
    let dir = f.cluster.path().to_path_buf();
    let runs = dir.join("runs.log");
    let done = dir.join("applied");
    let (runs_s, done_s) = (runs.display().to_string(), done.display().to_string());
    // `apply` logs its start, takes 3 s, then marks itself done; its check
    // looks for that mark. A kill -9 of the node mid-way leaves it unmarked.
    let apply = format!("echo \"start $FLEET_NODE\" >> {runs_s}; sleep 3; touch {done_s}; echo \"end $FLEET_NODE\" >> {runs_s}");
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

    // Every step is planned on the first node of the destination.
    let d = f.cluster.deployment(&id).await?;
    ensure!(steps(&d).iter().all(|s| s.plan.node == "node-1" && s.plan.movable), "plan: {}", show(&d));

    eventually("node-1 to be running `apply`", Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(&runs).unwrap_or_default();
        Ok(text.contains("start node-1").then_some(()))
    })
    .await?;
    let killed_at = now_ms();
    let idx = f.nodes.iter().position(|n| n.name == "node-1").context("node-1")?;
    f.nodes[idx].kill9()?;

    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(0)?;
    let d = watched.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "the saga should finish on another node: {}", d.state);
    ensure!(d.epoch == 2, "the handover bumps the assignment epoch once: {}", d.epoch);
    let handed = events(&d).into_iter().find(|r| r.contains("handed over")).context("no handover event")?;
    ensure!(
        handed.contains("node node-1 lost") && handed.contains("`apply` from node-1 to node-2 (check first)"),
        "the event names the lost node, the step and where it went: {handed}"
    );
    let s = steps(&d);
    ensure!(status(&s[0]) == "done" && s[0].plan.node == "node-1", "prepare stays node-1's: {}", show(&s[0]));
    for s in &s[1..] {
        ensure!(status(s) == "done" && s.plan.node == "node-2", "the rest ran on node-2: {}", show(s));
    }

    // The dead node's attempt never finished (its shell died with it); the
    // new node checked, found nothing done, ran it once, and only after
    // the lease.
    let text = std::fs::read_to_string(&runs)?;
    let lines: Vec<&str> = text.lines().collect();
    ensure!(
        lines == ["prepare node-1", "start node-1", "start node-2", "end node-2"],
        "runs: {lines:?} (node-1's attempt must not complete, node-2's must run once)"
    );
    let w2 = f.node("node-2").witness()?;
    let apply_line = w2.iter().find(|l| l.deployment == id && l.step == 1).context("node-2 has no witness line for apply")?;
    ensure!(apply_line.action == "command" && apply_line.ok, "node-2 ran apply: {apply_line}");
    let start = apply_line.start_ms;
    ensure!(start - killed_at >= 4_000, "node-2 started apply {} ms after the kill, inside node-1's lease", start - killed_at);
    ensure!(f.node("node-3").witness()?.is_empty(), "node-3 got nothing");
    assert_witness_safe(&f.witness()?, &[&d])?;
    Ok(())
}

// ----------------------------------------- 2. a returning node forgets work

const HEALTH_SLOW: &str = "{ command: [\"sh\", \"-c\", \"sleep 2\"], interval: 100ms, timeout: 5s, healthy_threshold: 1, deadline: 20s }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_forgets_what_the_saga_left_behind() {
    let prod: &[(&str, &str)] = &[("env", "prod")];
    let nodes = vec![("node-1", prod), ("node-2", prod)];
    let dests = "destinations:\n  - name: prod\n    selector: { env: prod }\n";
    let mut f = Fleet::start(&nodes, dests).await.expect("cluster with two nodes");
    let r = forget(&mut f).await;
    f.finish(r);
}

async fn forget(f: &mut Fleet) -> anyhow::Result<()> {
    let manifest = format!("app: web\ndestination: prod\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH_SLOW}\n");
    let m = f.cluster.write_file("fleet.yaml", &manifest)?;
    let v1 = f.cluster.deploy(&m, &["--release", "v1"]).await?;
    v1.expect_code(0)?;
    let v1 = v1.deployment()?;
    let switch2 = steps(&v1).iter().find(|s| kind(s) == "switch_route" && s.plan.node == "node-2").context("no switch step on node-2")?;
    let route2 = output::<SwitchOutput>(switch2).context("node-2's route")?.route;

    let submitted = f.cluster.deploy(&m, &["--release", "v2", "--detach"]).await?;
    submitted.expect_code(0)?;
    let id = submitted.id()?;
    // node-2's new instance is started and its (2 s) health check runs: kill it.
    let staged = eventually("v2 to be started on node-2", Duration::from_secs(60), || async {
        let d = f.cluster.deployment(&id).await?;
        let started = instances(&d)?.into_iter().find(|(n, _)| n == "node-2");
        Ok(started.map(|(_, pid)| pid))
    })
    .await?;
    let idx = f.nodes.iter().position(|n| n.name == "node-2").context("node-2")?;
    f.nodes[idx].kill9()?;
    ensure!(pid_alive(staged), "the staged v2 instance outlives its node's crash (instances are supervised, not children)");

    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(0)?;
    let d = watched.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "v2 completes on node-1: {}", d.state);
    ensure!(steps(&d).iter().any(|s| s.plan.node == "node-2" && status(s) == "skipped"), "node-2's rest is skipped");
    ensure!(pid_alive(staged), "nothing could stop it while node-2 was down");

    f.nodes[idx].restart()?;
    f.cluster.wait_nodes_connected(&["node-2"]).await?;
    // Stopped, and the node's log says what it removed and why.
    let node2 = &f.nodes[idx];
    eventually("node-2 to stop the staged v2 instance it was told to forget", Duration::from_secs(15), || async {
        let logged = node2.log_tail(400).contains(&format!("stopped staged web@v2 (pid {staged}"));
        Ok((!pid_alive(staged) && logged).then_some(()))
    })
    .await?;
    let body = http_get(&route2).await?;
    ensure!(release_of(&body).as_deref() == Some("v1"), "node-2 keeps serving v1 (its active instance): {body}");
    Ok(())
}
