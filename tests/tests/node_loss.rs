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
use fleet_tests::harness::{eventually, http_get, release_of, Fleet};
use serde_json::Value;

const DESTS: &str = "destinations:\n  - name: prod\n    selector: { env: prod }\n";

fn manifest(hooks: &str) -> String {
    format!(
        "app: web\ndestination: prod\nrun: [\"fleet-demo-app\"]\n\
         health: {{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 1, deadline: 10s }}\n\
         hooks: {{ pre: [{hooks}] }}\n"
    )
}

fn steps(d: &Value) -> Vec<Value> {
    d["steps"].as_array().cloned().unwrap_or_default()
}

fn route(d: &Value, node: &str) -> anyhow::Result<String> {
    let s = steps(d)
        .into_iter()
        .find(|s| s["action"]["kind"] == "switch_route" && s["node"] == node)
        .with_context(|| format!("no switch step on {node}"))?;
    let out: Value = serde_json::from_str(s["output"].as_str().context("switch step has no output")?)?;
    Ok(out["route"].as_str().context("no route in the switch output")?.to_string())
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
        let on2: Vec<Value> = steps(&d).into_iter().filter(|s| s["node"] == "node-2").collect();
        Ok((on2.first().is_some_and(|s| s["status"] == "done") && on2.get(1).is_some_and(|s| s["status"] == "pending"))
            .then_some(()))
    })
    .await?;
    let killed_at = now_ms();
    let idx = f.nodes.iter().position(|n| n.name == "node-2").context("node-2")?;
    f.nodes[idx].kill9()?;

    let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    watched.expect_code(0)?;
    let d = watched.deployment()?.clone();
    ensure!(d["state"] == "succeeded", "the deployment should complete on the other nodes: {}", d["state"]);
    ensure!(d["epoch"].as_u64() == Some(2), "losing a node bumps the assignment epoch: {}", d["epoch"]);
    let lost_event = d["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["reason"].as_str().is_some_and(|r| r.contains("node node-2 lost"))))
        .context("no event records node-2 as lost")?;
    let lost_at = lost_event["at_ms"].as_i64().context("event time")?;
    ensure!(lost_at - killed_at >= 4_000, "node-2 was declared lost {} ms after the kill, before its 5 s lease", lost_at - killed_at);
    ensure!(lost_at - killed_at < 15_000, "node-2 was declared lost only {} ms after the kill", lost_at - killed_at);
    for s in steps(&d) {
        let want = match (s["node"].as_str(), s["status"].as_str()) {
            (Some("node-2"), Some("done")) => s["name"].as_str().is_some_and(|n| n.starts_with("pre-hook 1")),
            (Some("node-2"), Some("skipped")) => true,
            (Some(_), Some("done")) => true,
            _ => false,
        };
        ensure!(want, "unexpected step state: {} on {} is {}", s["name"], s["node"], s["status"]);
    }
    // The release serves on the surviving nodes.
    for node in ["node-1", "node-3"] {
        let addr = route(&d, node)?;
        let body = http_get(&addr).await?;
        ensure!(release_of(&body).as_deref() == Some("v1"), "{node} answers {body:?}");
    }

    // Invariant 1: no two actions overlapped on the destination, and no
    // step attempt ran twice.
    let mut witness = f.witness();
    witness.sort_by_key(|l| l["start_ms"].as_i64().unwrap_or(0));
    for w in witness.windows(2) {
        ensure!(w[0]["end_ms"].as_i64() <= w[1]["start_ms"].as_i64(), "actions overlapped:\n  {}\n  {}", w[0], w[1]);
    }
    let mut seen = BTreeSet::new();
    for l in &witness {
        let key = (l["deployment"].to_string(), l["step"].to_string(), l["undo"].to_string(), l["attempt"].to_string());
        ensure!(seen.insert(key), "a step attempt ran twice: {l}");
    }

    // A lost node gets no new work: the next deployment plans two nodes.
    let nodes = f.cluster.nodes_json().await?;
    let n2 = nodes.iter().find(|n| n["id"] == "node-2").context("node-2 listed")?;
    ensure!(n2["lost_ms"].is_i64() && n2["connected"] == false, "node-2 should be listed as lost: {n2}");
    let m2 = f.cluster.write_file("fleet2.yaml", &manifest("\"true\""))?;
    let m2_s = m2.to_str().context("path is UTF-8")?.to_string();
    let second = f.cluster.ctl(&["deploy", "-f", &m2_s, "--release", "v2", "-o", "json"]).await?;
    second.expect_code(0)?;
    let planned: BTreeSet<String> =
        steps(second.deployment()?).iter().filter_map(|s| s["node"].as_str().map(str::to_string)).collect();
    ensure!(planned == BTreeSet::from(["node-1".to_string(), "node-3".to_string()]), "planned on {planned:?}");

    // It comes back: registered again, and planned again.
    f.nodes[idx].restart()?;
    eventually("node-2 to be back", Duration::from_secs(30), || async {
        let nodes = f.cluster.nodes_json().await?;
        Ok(nodes.iter().any(|n| n["id"] == "node-2" && n["connected"] == true && n["lost_ms"].is_null()).then_some(()))
    })
    .await?;
    let third = f.cluster.ctl(&["deploy", "-f", &m2_s, "--release", "v3", "--dry-run", "-o", "json"]).await?;
    third.expect_code(0)?;
    let plan = third.lines.iter().find(|l| l["type"] == "plan").context("no plan line")?;
    let planned: BTreeSet<String> =
        steps(&plan["deployment"]).iter().filter_map(|s| s["node"].as_str().map(str::to_string)).collect();
    ensure!(planned.contains("node-2"), "node-2 is back but not planned: {planned:?}");
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
