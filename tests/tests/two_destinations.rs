//! Two `process` destinations that select the same node deploy the same
//! app there independently: each has its own instances and its own route,
//! a deployment of one never touches the other's, and the witness shows
//! every action under its own destination's lock.
//!
//! Build the binaries first:
//! `cargo build -p fleet-coord -p fleetctl -p fleet-node -p fleet-demo-app`
//! (or run everything with `cargo xtask test`).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment, StepRecord};
use fleet_tests::checks::assert_witness_safe;
use fleet_tests::harness::{eventually, http_get, pid_alive, pid_exists, release_of, CtlRun, Fleet};
use fleet_tests::json::{StartOutput, SwitchOutput};
use fleet_tests::values::{kind, output, steps};

const HEALTH: &str = "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 2, deadline: 10s }";

/// Both destinations select the one node.
const BLUE_AND_GREEN: &str =
    "destinations:\n  - name: blue\n    selector: { env: shared }\n  - name: green\n    selector: { env: shared }\n";

const NODE: &str = "node-1";

fn manifest(destination: &str) -> String {
    format!("app: web\ndestination: {destination}\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH}\n")
}

async fn deploy(f: &Fleet, m: &std::path::Path, release: &str) -> anyhow::Result<(CtlRun, Deployment)> {
    let run = f.cluster.deploy(m, &["--release", release]).await?;
    run.expect_code(0)?;
    let d = run.deployment()?;
    ensure!(d.state == DeployState::Succeeded && d.release == release, "{run}");
    Ok((run, d))
}

fn step<'a>(d: &'a Deployment, kind_: &str) -> anyhow::Result<&'a StepRecord> {
    steps(d).iter().find(|s| kind(s) == kind_ && s.plan.node == NODE).with_context(|| format!("no {kind_} step on {NODE} in {}", d.id))
}

/// The pid of the instance `d` started.
fn pid(d: &Deployment) -> anyhow::Result<u32> {
    Ok(output::<StartOutput>(step(d, "start_instance")?)?.pid)
}

/// The route address `d` switched.
fn route(d: &Deployment) -> anyhow::Result<String> {
    Ok(output::<SwitchOutput>(step(d, "switch_route")?)?.route)
}

async fn assert_release(addr: &str, want: &str) -> anyhow::Result<()> {
    let body = http_get(addr).await?;
    ensure!(release_of(&body).as_deref() == Some(want), "{addr} answered {body:?}, expected release {want}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_destinations_deploy_the_same_app_on_one_node() {
    let f = Fleet::start(&[(NODE, &[("env", "shared")])], BLUE_AND_GREEN).await.expect("cluster with a node");
    let r = two_destinations(&f).await;
    f.finish(r);
}

async fn two_destinations(f: &Fleet) -> anyhow::Result<()> {
    let blue = f.cluster.write_file("blue.yaml", &manifest("blue"))?;
    let green = f.cluster.write_file("green.yaml", &manifest("green"))?;

    // Both at once: they hold different locks.
    let (b1, g1) = tokio::join!(deploy(f, &blue, "b1"), deploy(f, &green, "g1"));
    let ((_, b1), (_, g1)) = (b1?, g1?);
    let (blue_route, green_route) = (route(&b1)?, route(&g1)?);
    ensure!(blue_route != green_route, "both destinations got the route {blue_route}");
    assert_release(&blue_route, "b1").await?;
    assert_release(&green_route, "g1").await?;
    ensure!(pid(&b1)? != pid(&g1)?, "both destinations share one instance");

    // blue moves on; green keeps serving g1 from the same process.
    let (run, b2) = deploy(f, &blue, "b2").await?;
    ensure!(b2.previous_release.as_deref() == Some("b1"), "blue's previous release: {run}");
    ensure!(route(&b2)? == blue_route, "blue's route moved: {blue_route} -> {}", route(&b2)?);
    assert_release(&blue_route, "b2").await?;
    assert_release(&green_route, "g1").await?;
    let (old, kept) = (pid(&b1)?, pid(&g1)?);
    eventually(&format!("blue's b1 (pid {old}) to be gone"), Duration::from_secs(5), || async { Ok((!pid_exists(old)).then_some(())) })
        .await?;
    ensure!(pid_alive(kept), "green's g1 (pid {kept}) was stopped by blue's deployment");

    // The node runs exactly blue's b2 and green's g1.
    let want: BTreeSet<u32> = [pid(&b2)?, kept].into();
    let node = f.nodes.iter().find(|n| n.name == NODE).context("the node")?;
    eventually("the node to run only blue's b2 and green's g1", Duration::from_secs(10), || async {
        let running: BTreeSet<u32> = node.processes().iter().map(|(p, _)| *p).collect();
        Ok((running == want).then_some(()))
    })
    .await?;

    assert_witness_safe(&f.witness()?, &[&b1, &g1, &b2])?;
    Ok(())
}
