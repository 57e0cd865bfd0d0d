//! A worker node dies (`kill -9`) in the middle of a rolling deploy across
//! three nodes. The leader presumes it lost after its heartbeat lease, skips
//! what was left for it with a new assignment epoch, and the deployment
//! completes on the other two. The lost node gets no new work until it
//! comes back; then it does again.
//!
//! Build the binaries first (`cargo xtask test` does).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_tests::checks::{assert_witness_safe, now_ms};
use fleet_tests::harness::{eventually, http_get, release_of, Fleet};
use fleet_tests::json::{Line, SwitchOutput};
use fleet_tests::values::{kind, output, status, steps};

const DESTS: &str = "destinations:\n  - name: prod\n    selector: { env: prod }\n";

fn manifest(hooks: &str) -> String {
    format!(
        "app: web\ndestination: prod\nrun: [\"fleet-demo-app\"]\n\
         health: {{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 1, deadline: 10s }}\n\
         hooks: {{ pre: [{hooks}] }}\n"
    )
}

fn route(d: &Deployment, node: &str) -> anyhow::Result<String> {
    let s =
        steps(d).iter().find(|s| kind(s) == "switch_route" && s.plan.node == node).with_context(|| format!("no switch step on {node}"))?;
    Ok(output::<SwitchOutput>(s)?.route)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_rolling_deploy_is_skipped_and_the_rest_completes() {
    let nodes: Vec<(&str, &[(&str, &str)])> =
        vec![("node-1", &[("env", "prod")]), ("node-2", &[("env", "prod")]), ("node-3", &[("env", "prod")])];
    let mut f = Fleet::start(&nodes, DESTS).await.expect("cluster with three nodes");
    let r = run(&mut f).await;
    f.finish(r);
}

async fn run(f: &mut Fleet) -> anyhow::Result<()> {
    // Three slow hooks per node, so node-2 is certainly mid-step when killed.
    let m = f.cluster.write_file("fleet.yaml", &manifest("\"sleep 0.3\", \"sleep 0.3\", \"sleep 0.3\""))?;
    let m_s = m.to_str().context("path is UTF-8")?.to_string();
    let submitted = f.cluster.ctl(&["deploy", "-f", &m_s, "--release", "v1", "--detach", "-o", "json"]).await?;
    submitted.expect_code(0)?;
    let id = submitted.id()?;

    // Wait until node-2 has finished its first hook: its second is in flight.
    eventually("node-2 to be running its second hook", Duration::from_secs(60), || async {
        let d = f.cluster.deployment(&id).await?;
        let on2: Vec<&str> = steps(&d).iter().filter(|s| s.plan.node == "node-2").map(status).collect();
        Ok((on2.first() == Some(&"done") && on2.get(1) == Some(&"pending")).then_some(()))
    })
    .await?;
    let killed_at = now_ms();
    let idx = f.nodes.iter().position(|n| n.name == "node-2").context("node-2")?;
    f.nodes[idx].kill9()?;

    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(0)?;
    let d = watched.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "the deployment should complete on the other nodes: {}", d.state);
    ensure!(d.epoch == 2, "losing a node bumps the assignment epoch: {}", d.epoch);
    let lost_event = d.events.iter().find(|e| e.reason.contains("node node-2 lost")).context("no event records node-2 as lost")?;
    let lost_at = lost_event.at_ms;
    ensure!(lost_at - killed_at >= 4_000, "node-2 was declared lost {} ms after the kill, before its 5 s lease", lost_at - killed_at);
    ensure!(lost_at - killed_at < 15_000, "node-2 was declared lost only {} ms after the kill", lost_at - killed_at);
    for s in steps(&d) {
        let want = match (s.plan.node.as_str(), status(s)) {
            ("node-2", "done") => s.plan.name.starts_with("pre-hook 1"),
            ("node-2", "skipped") => true,
            (_, "done") => true,
            _ => false,
        };
        ensure!(want, "unexpected step state: {} on {} is {}", s.plan.name, s.plan.node, status(s));
    }
    // The release serves on the surviving nodes.
    for node in ["node-1", "node-3"] {
        let addr = route(&d, node)?;
        let body = http_get(&addr).await?;
        ensure!(release_of(&body).as_deref() == Some("v1"), "{node} answers {body:?}");
    }

    // Invariant 1: no two actions overlapped on the destination, and no
    // step attempt ran twice.
    let mut witness = f.witness()?;
    witness.sort_by_key(|l| l.start_ms);
    // One destination: no two actions overlapped, on any node.
    for w in witness.windows(2) {
        ensure!(w[0].end_ms <= w[1].start_ms, "actions overlapped:\n  {}\n  {}", w[0], w[1]);
    }
    assert_witness_safe(&witness, &[&d])?;

    // A lost node gets no new work: the next deployment plans two nodes.
    let nodes = f.cluster.nodes_json().await?;
    let n2 = nodes.iter().find(|n| n.id == "node-2").context("node-2 listed")?;
    ensure!(n2.lost_ms.is_some() && !n2.connected, "node-2 should be listed as lost: {n2:?}");
    let m2 = f.cluster.write_file("fleet2.yaml", &manifest("\"true\""))?;
    let m2_s = m2.to_str().context("path is UTF-8")?.to_string();
    let second = f.cluster.ctl(&["deploy", "-f", &m2_s, "--release", "v2", "-o", "json"]).await?;
    second.expect_code(0)?;
    let planned: BTreeSet<String> = steps(&second.deployment()?).iter().map(|s| s.plan.node.clone()).collect();
    ensure!(planned == BTreeSet::from(["node-1".to_string(), "node-3".to_string()]), "planned on {planned:?}");

    // It comes back: registered again, and planned again.
    f.nodes[idx].restart()?;
    eventually("node-2 to be back", Duration::from_secs(30), || async {
        let nodes = f.cluster.nodes_json().await?;
        Ok(nodes.iter().any(|n| n.id == "node-2" && n.connected && n.lost_ms.is_none()).then_some(()))
    })
    .await?;
    let third = f.cluster.ctl(&["deploy", "-f", &m2_s, "--release", "v3", "--dry-run", "-o", "json"]).await?;
    third.expect_code(0)?;
    let plan = third
        .lines()?
        .into_iter()
        .find_map(|l| match l {
            Line::Plan(p) => Some(p.deployment),
            _ => None,
        })
        .context("no plan line")?;
    let planned: BTreeSet<String> = steps(&plan).iter().map(|s| s.plan.node.clone()).collect();
    ensure!(planned.contains("node-2"), "node-2 is back but not planned: {planned:?}");
    Ok(())
}
