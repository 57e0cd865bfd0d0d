//! Destination sync through the real cluster: the leader's sync task
//! keeps each destination's servers from what the nodes report,
//! commits only differences, queues a catch-up deployment of the current
//! release for a node that joins, shows drift, and `destinations remove`
//! refuses a busy destination.
//!
//! Build the binaries first:
//! `cargo build -p fleet-coord -p fleetctl -p fleet-node -p fleet-demo-app`
//! (or run everything with `cargo xtask test`). The docker test needs the
//! Docker Engine.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use fleet_core::deploy::DeployState;
use fleet_core::sync::{Health, SYNC_ACTOR};
use fleet_docker::testimage::{build_web_image, WebImage, WEB_PORT};
use fleet_docker::{Engine, LabelFilter};
use fleet_tests::harness::{eventually, http_get, release_of, Fleet, FAST_RAFT};
use fleet_tests::json::{ClusterStatusView, HistoryEntry};
use fleetctl::output::ServerRecord;

/// The sync interval the tests run with.
const SYNC_MS: u64 = 500;

fn coord_args() -> Vec<&'static str> {
    let mut args = FAST_RAFT.to_vec();
    args.extend(["--sync-interval-ms", "500"]);
    args
}

const HEALTH: &str = "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 2, deadline: 10s }";
const PROD: &str = "destinations:\n  - name: prod\n    selector: { env: prod }\n";
const LABELS: &[(&str, &str)] = &[("env", "prod")];

fn manifest() -> String {
    format!("app: web\ndestination: prod\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH}\n")
}

async fn servers(f: &Fleet, dest: &str) -> anyhow::Result<Vec<ServerRecord>> {
    let run = f.cluster.ctl(&["servers", dest, "-o", "json"]).await?;
    run.expect_code(0)?;
    run.json()
}

async fn history(f: &Fleet) -> anyhow::Result<Vec<HistoryEntry>> {
    let run = f.cluster.ctl(&["history", "--destination", "prod", "-o", "json"]).await?;
    run.expect_code(0)?;
    run.json()
}

/// `server` runs `release` of web, healthy, without drift (its record, once so).
async fn wait_serving(f: &Fleet, server: &str, release: &str) -> anyhow::Result<ServerRecord> {
    eventually(&format!("{server} to be listed healthy with web@{release}"), Duration::from_secs(30), || async {
        let list = servers(f, "prod").await?;
        Ok(list.into_iter().find(|s| {
            s.id == server
                && s.health == Health::Healthy
                && s.drift.is_empty()
                && s.apps.get("web").and_then(|a| a.release.as_deref()) == Some(release)
        }))
    })
    .await
}

async fn commit_index(f: &Fleet) -> anyhow::Result<u64> {
    let run = f.cluster.ctl(&["cluster", "status", "-o", "json"]).await?;
    run.expect_code(0)?;
    Ok(run.json::<ClusterStatusView>()?.commit_index)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_joins_is_caught_up_and_listed_once() {
    let mut f = Fleet::start_with(&coord_args(), &[("node-1", LABELS)], PROD).await.expect("cluster with a node");
    let r = joins(&mut f).await;
    f.finish(r);
}

async fn joins(f: &mut Fleet) -> anyhow::Result<()> {
    let m = f.cluster.write_file("web.yaml", &manifest())?;
    let run = f.cluster.deploy(&m, &["--release", "v1"]).await?;
    run.expect_code(0)?;
    let first = wait_serving(f, "node-1", "v1").await?;
    let addr = first.apps["web"].address.clone().context("node-1's address for web")?;
    ensure!(release_of(&http_get(&addr).await?).as_deref() == Some("v1"), "node-1 serves v1 at the address `servers` shows ({addr})");

    // Nothing changes: no Raft write over several sync intervals.
    let before = commit_index(f).await?;
    let watch_until = Instant::now() + Duration::from_millis(6 * SYNC_MS);
    while Instant::now() < watch_until {
        let now = commit_index(f).await?;
        ensure!(now == before, "the commit index moved from {before} to {now} while no server changed");
        tokio::time::sleep(Duration::from_millis(SYNC_MS / 2)).await;
    }

    // node-2 joins with matching labels: a catch-up of v1, with no command.
    let node2 = f.cluster.start_node("node-2", LABELS)?;
    f.nodes.push(node2);
    let catch_up = eventually("a catch-up deployment of v1 to succeed", Duration::from_secs(60), || async {
        let h = history(f).await?;
        Ok(h.into_iter().find(|d| d.submitted_by == SYNC_ACTOR && d.state == DeployState::Succeeded))
    })
    .await?;
    ensure!(catch_up.release == "v1" && catch_up.app == "web", "{catch_up:?}");
    let d = f.cluster.deployment(&catch_up.id).await?;
    ensure!(d.targets == ["node-2"], "the catch-up targets the new server: {:?}", d.targets);
    ensure!(!d.steps.is_empty() && d.steps.iter().all(|s| s.plan.node == "node-2"), "steps only on node-2: {:?}", d.steps);
    ensure!(d.events[0].reason.contains("catch-up: server node-2 joined"), "{}", d.events[0].reason);
    let second = wait_serving(f, "node-2", "v1").await?;
    let addr2 = second.apps["web"].address.clone().context("node-2's address")?;
    ensure!(release_of(&http_get(&addr2).await?).as_deref() == Some("v1"), "node-2 serves v1 at {addr2}");

    // node-2 registers again (killed and restarted under the same id): still one server, no second catch-up.
    let node2 = f.nodes.iter_mut().find(|n| n.name == "node-2").context("node-2")?;
    node2.kill9()?;
    node2.restart()?;
    f.cluster.wait_nodes_connected(&["node-1", "node-2"]).await?;
    wait_serving(f, "node-2", "v1").await?;
    let deadline = Instant::now() + Duration::from_millis(4 * SYNC_MS);
    while Instant::now() < deadline {
        let list = servers(f, "prod").await?;
        let ids: Vec<&str> = list.iter().map(|s| s.id.as_str()).collect();
        ensure!(ids == ["node-1", "node-2"], "servers: {ids:?}");
        tokio::time::sleep(Duration::from_millis(SYNC_MS / 2)).await;
    }
    let catch_ups = history(f).await?.into_iter().filter(|d| d.submitted_by == SYNC_ACTOR).count();
    ensure!(catch_ups == 1, "{catch_ups} catch-up deployments");
    Ok(())
}

/// A destination whose definition is applied is synced at once, not at
/// the next round: with rounds ten minutes apart (the first ran when this
/// coordinator began to lead, before `staging` existed), `servers staging`
/// lists node-1 soon after `staging` is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_applied_is_synced_at_once() {
    let mut args = FAST_RAFT.to_vec();
    args.extend(["--sync-interval-ms", "600000"]);
    let f = Fleet::start_with(&args, &[("node-1", LABELS)], PROD).await.expect("cluster with a node");
    let r = applied(&f).await;
    f.finish(r);
}

async fn applied(f: &Fleet) -> anyhow::Result<()> {
    let unknown = f.cluster.ctl(&["servers", "staging", "-o", "json"]).await?;
    ensure!(unknown.code != 0, "`servers staging` before staging exists: {}", unknown.stdout);
    f.cluster.apply_destinations(&format!("{PROD}  - name: staging\n    selector: {{ env: prod }}\n")).await?;
    let listed = eventually("node-1 to be listed as a server of staging", Duration::from_secs(30), || async {
        let list = servers(f, "staging").await?;
        Ok(list.into_iter().find(|s| s.id == "node-1"))
    })
    .await?;
    ensure!(listed.health == Health::Healthy, "{listed:?}");
    Ok(())
}

/// A node stopped in the middle of a deployment (kill -9, never restarted)
/// is a server that is gone, not a failed step: the deployment succeeds on
/// the others with its steps skipped, and `servers` stops listing it.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_stopped_mid_deploy_is_gone_not_a_failed_step() {
    let mut f = Fleet::start_with(&coord_args(), &[("node-1", LABELS), ("node-2", LABELS)], PROD).await.expect("cluster with two nodes");
    let r = stopped_mid_deploy(&mut f).await;
    f.finish(r);
}

async fn stopped_mid_deploy(f: &mut Fleet) -> anyhow::Result<()> {
    // Slow pre hooks leave time to stop node-2 while the deployment runs.
    let m = f.cluster.write_file("web.yaml", &format!("{}hooks: {{ pre: [\"sleep 1\"] }}\n", manifest()))?;
    f.cluster.deploy(&m, &["--release", "v1"]).await?.expect_code(0)?;
    wait_serving(f, "node-1", "v1").await?;
    wait_serving(f, "node-2", "v1").await?;

    let submitted = f.cluster.deploy(&m, &["--release", "v2", "--detach"]).await?;
    submitted.expect_code(0)?;
    let id = submitted.id()?;
    // Stop node-2 once the deployment has started on it.
    eventually("v2 to run a step on node-2", Duration::from_secs(30), || async {
        let d = f.cluster.deployment(&id).await?;
        Ok(d.steps.iter().any(|s| s.plan.node == "node-2" && s.status != fleet_core::deploy::StepStatus::Pending).then_some(()))
    })
    .await?;
    let node2 = f.nodes.iter_mut().find(|n| n.name == "node-2").context("node-2")?;
    node2.kill9()?;

    let watched = f.cluster.ctl(&["watch", &id]).await?;
    watched.expect_code(0)?;
    let d = f.cluster.deployment(&id).await?;
    ensure!(d.state == DeployState::Succeeded, "{id} is {}", d.state);
    let skipped = d.steps.iter().filter(|s| s.plan.node == "node-2" && s.status == fleet_core::deploy::StepStatus::Skipped).count();
    ensure!(skipped > 0, "none of node-2's steps were skipped: {:?}", d.steps);
    ensure!(
        !d.steps.iter().any(|s| s.status == fleet_core::deploy::StepStatus::Failed),
        "a vanished server made a step fail: {:?}",
        d.steps
    );
    wait_serving(f, "node-1", "v2").await?;
    eventually("servers to stop listing node-2", Duration::from_secs(30), || async {
        let ids: Vec<String> = servers(f, "prod").await?.into_iter().map(|s| s.id).collect();
        Ok((ids == ["node-1"]).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn destinations_remove_is_refused_while_busy() {
    let f = Fleet::start_with(&coord_args(), &[("node-1", LABELS)], PROD).await.expect("cluster with a node");
    let r = remove(&f).await;
    f.finish(r);
}

async fn remove(f: &Fleet) -> anyhow::Result<()> {
    eventually("prod to list node-1", Duration::from_secs(20), || async {
        Ok(servers(f, "prod").await?.iter().any(|s| s.id == "node-1").then_some(()))
    })
    .await?;
    f.cluster.ctl(&["lock", "acquire", "prod", "-m", "maintenance"]).await?.expect_code(0)?;
    let m = f.cluster.write_file("web.yaml", &manifest())?;
    let queued = f.cluster.deploy(&m, &["--release", "v1", "--detach"]).await?;
    queued.expect_code(0)?;
    let id = queued.id()?;
    let refused = f.cluster.ctl(&["destinations", "remove", "prod"]).await?;
    refused.expect_code(7)?;
    ensure!(refused.text().contains("held by") && refused.text().contains("maintenance"), "{refused}");
    f.cluster.ctl(&["cancel", &id]).await?;
    eventually("the queued deployment to be cancelled", Duration::from_secs(20), || async {
        Ok((f.cluster.deployment(&id).await?.state == DeployState::Cancelled).then_some(()))
    })
    .await?;
    f.cluster.ctl(&["lock", "release", "prod"]).await?.expect_code(0)?;

    // A running deployment (its health check fails for 5 s, then it is undone): refused, naming it.
    let slow = "app: web\ndestination: prod\nrun: [\"fleet-demo-app\"]\nhealth: { http: /missing, interval: 100ms, deadline: 5s }\nretry: { max_attempts: 1 }\n";
    let m = f.cluster.write_file("slow.yaml", slow)?;
    let running = f.cluster.deploy(&m, &["--release", "v2", "--detach"]).await?;
    running.expect_code(0)?;
    let id = running.id()?;
    let refused = f.cluster.ctl(&["destinations", "remove", "prod"]).await?;
    refused.expect_code(7)?;
    ensure!(refused.text().contains(&format!("deployment/{id}")), "{refused}");
    f.cluster.ctl(&["watch", &id]).await?.expect_code(3)?;

    let removed = f.cluster.ctl(&["destinations", "remove", "prod"]).await?;
    removed.expect_code(0)?;
    let listed = f.cluster.ctl(&["destinations", "-o", "json"]).await?;
    ensure!(!listed.text().contains("\"prod\""), "prod is still listed: {listed}");
    f.cluster.ctl(&["servers", "prod"]).await?.expect_code(2)?;
    let again = f.cluster.ctl(&["destinations", "remove", "prod"]).await?;
    again.expect_code(2)?;
    Ok(())
}

/// Removes the test's containers whatever happened.
struct ContainerGuard(String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let destination = self.0.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let Ok(engine) = Engine::connect().await else { return };
                let Ok(listed) = engine.list(&LabelFilter::managed().destination(&destination)).await else { return };
                for c in listed {
                    let _ = engine.stop_and_remove(&c.id, Duration::ZERO).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A container removed by hand shows as unhealthy with drift.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_removed_by_hand_shows_as_drift() {
    let engine = Engine::connect().await.expect("this test needs the Docker Engine");
    build_web_image(&engine, &WebImage::new("fleet-test/web-sync:v1", "v1")).await.expect("building a test image");
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let dest = format!("boxes-{}-{}", std::process::id(), nanos % 100_000);
    let _guard = ContainerGuard(dest.clone());
    let yaml = format!("destinations:\n  - name: {dest}\n    adapter: docker\n    selector: {{ role: boxes }}\n");
    let f = Fleet::start_with(&coord_args(), &[("node-1", &[("role", "boxes")])], &yaml).await.expect("cluster with a node");
    let r = drift(&f, &engine, &dest).await;
    f.finish(r);
}

async fn drift(f: &Fleet, engine: &Engine, dest: &str) -> anyhow::Result<()> {
    let m = f.cluster.write_file(
        "web.yaml",
        &format!(
            "app: web\ndestination: {dest}\nimage: \"fleet-test/web-sync:{{release}}\"\ncontainer_port: {WEB_PORT}\npull: never\n\
             health: {{ image: true, deadline: 30s }}\nretry: {{ max_attempts: 1 }}\n"
        ),
    )?;
    f.cluster.deploy(&m, &["--release", "v1"]).await?.expect_code(0)?;
    eventually("node-1 healthy with web@v1", Duration::from_secs(30), || async {
        let list = servers(f, dest).await?;
        Ok(list.into_iter().find(|s| s.health == Health::Healthy && s.drift.is_empty()).filter(|s| s.apps.contains_key("web")))
    })
    .await?;
    let listed = engine.list(&LabelFilter::managed().destination(dest)).await?;
    ensure!(listed.len() == 1, "one container: {listed:?}");
    engine.stop_and_remove(&listed[0].id, Duration::ZERO).await?;
    let s = eventually("node-1 to show unhealthy with drift", Duration::from_secs(30), || async {
        let list = servers(f, dest).await?;
        Ok(list.into_iter().find(|s| s.health == Health::Unhealthy && s.drift == ["web"]))
    })
    .await?;
    let err = s.error.clone().unwrap_or_default();
    ensure!(err.contains("gone"), "the error says the container is gone: {err}");
    let text = f.cluster.ctl(&["servers", dest]).await?;
    text.expect_code(0)?;
    ensure!(text.text().contains("unhealthy") && text.text().contains("yes (current v1)"), "{text}");
    Ok(())
}
