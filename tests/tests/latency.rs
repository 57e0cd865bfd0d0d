//! Slow links (issue 12): a worker node reaches its coordinator through a
//! userspace proxy that adds latency (`fleet_tests::proxy`; `tc netem` is
//! not available here). One coordinator, so the node never follows a
//! redirect around the proxy.
//!
//! * 150 ms each way: a deployment succeeds, its witness is safe.
//! * The link stalls (8 s each way, past the 5 s node lease) in the middle
//!   of a deployment to the node's destination (its only node): the leader
//!   presumes the node lost and the step waits for it (`node_wait`); when
//!   the link is fast again the node comes back and the deployment
//!   succeeds, with no step run twice and no overlap.

use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_core::deploy::DeployState;
use fleet_tests::checks::assert_witness_safe;
use fleet_tests::harness::{eventually, Cluster, FAST_RAFT};
use fleet_tests::proxy::DelayProxy;

const DESTINATIONS: &str = "destinations:\n  - name: far\n    selector: { site: far }\n    node_wait: 60s\n";

fn manifest() -> String {
    "app: web\ndestination: far\nrun: [\"fleet-demo-app\"]\n\
     health: { http: /healthz, interval: 100ms, timeout: 2s, healthy_threshold: 1, deadline: 20s }\n\
     hooks: { pre: [\"sleep 1\"] }\n"
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_then_stalled_link_to_the_node_loses_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, FAST_RAFT).await?;
    let proxy = DelayProxy::start(&cluster.addrs()[0]).await?;
    proxy.set_delay(Duration::from_millis(150));
    let mut node = cluster.start_node_via("node-far", &[("site", "far")], std::slice::from_ref(&proxy.addr))?;
    let r = slow_link(&cluster, &proxy).await;
    if r.is_err() {
        eprintln!("node log:\n{}", node.log_tail(60));
    }
    let witness = node.witness();
    node.kill9()?;
    let (ids, run) = r?;
    let mut ds = vec![];
    for id in &ids {
        ds.push(cluster.deployment(id).await?);
    }
    assert_witness_safe(&witness?, &ds.iter().collect::<Vec<_>>())?;
    ensure!(run, "the stalled deployment ran");
    Ok(())
}

async fn slow_link(cluster: &Cluster, proxy: &DelayProxy) -> anyhow::Result<(Vec<String>, bool)> {
    cluster.wait_nodes_connected(&["node-far"]).await?;
    cluster.apply_destinations(DESTINATIONS).await?.expect_code(0)?;
    let m = cluster.write_file("web.yaml", &manifest())?;
    let v1 = cluster.deploy(&m, &["--release", "v1"]).await?;
    v1.expect_code(0)?;
    let v1 = v1.id()?;

    // v2, with the link stalled once its pre hook runs.
    let submitted = cluster.deploy(&m, &["--release", "v2", "--detach"]).await?;
    submitted.expect_code(0)?;
    let v2 = submitted.id()?;
    eventually("v2's pre hook to be sent", Duration::from_secs(20), || async {
        Ok((cluster.deployment(&v2).await?.state == DeployState::Running).then_some(()))
    })
    .await?;
    proxy.set_delay(Duration::from_secs(8));
    let lost = eventually("the leader to presume node-far lost", Duration::from_secs(30), || async {
        let nodes = cluster.nodes_json().await?;
        Ok(nodes.into_iter().find(|n| n.id == "node-far" && n.lost_ms.is_some() && !n.connected))
    })
    .await?;
    eprintln!("node-far presumed lost at {:?}", lost.lost_ms);
    proxy.set_delay(Duration::from_millis(20));
    let d = eventually("v2 to end", Duration::from_secs(90), || async {
        let d = cluster.deployment(&v2).await?;
        Ok(d.state.is_terminal().then_some(d))
    })
    .await?;
    ensure!(d.state == DeployState::Succeeded, "v2 ended {} after the link came back: {:?}", d.state, d.events);
    ensure!(
        d.events.iter().any(|e| e.reason.contains("waiting for a node")),
        "v2 waited for its only node while the link was stalled: {:?}",
        d.events.iter().map(|e| &e.reason).collect::<Vec<_>>()
    );
    let nodes = cluster.nodes_json().await?;
    let back = nodes.iter().find(|n| n.id == "node-far").context("node-far listed")?;
    ensure!(back.connected && back.lost_ms.is_none(), "node-far is back: {back:?}");
    Ok((vec![v1, v2], true))
}
