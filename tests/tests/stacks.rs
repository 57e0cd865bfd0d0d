//! A deployment to several destinations at once (a stack).
//!
//! * It takes every destination's lock in one Raft command: one fencing
//!   token on both, carried by every step on both.
//! * Two stacks over the same destinations in opposite orders, and a
//!   single-destination deployment behind them, never deadlock and never
//!   overlap: they run one after the other in submission order.
//! * A failure on one destination undoes the stack on every destination:
//!   the previous release serves again on both.
//!
//! Build the binaries first (`cargo xtask test` does).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment, StepRecord};
use fleet_tests::checks::{assert_witness_safe, WitnessLine};
use fleet_tests::harness::{eventually, http_get, release_of, Fleet};
use fleet_tests::json::{LockStatusView, SwitchOutput};
use fleet_tests::values::{event, kind, output, show, status, steps};

const DESTS: &str = "destinations:\n  - name: web\n    selector: { env: web }\n  - name: api\n    selector: { env: api }\n";

/// The demo app; `fail-health` in a node's data dir fails its health check there.
const MANIFEST: &str = "app: shop\nrun: [\"fleet-demo-app\"]\n\
    health: { command: [\"sh\", \"-c\", \"test ! -f fail-health\"], interval: 100ms, timeout: 2s, healthy_threshold: 1, deadline: 3s }\n";

/// Routes (`127.0.0.1:P`) per node, from a deployment's switch steps.
fn routes(d: &Deployment) -> anyhow::Result<BTreeMap<String, String>> {
    steps(d).iter().filter(|s| kind(s) == "switch_route").map(|s| Ok((s.plan.node.clone(), output::<SwitchOutput>(s)?.route))).collect()
}

/// The release each route serves, once every route answers.
async fn serving(routes: &BTreeMap<String, String>) -> anyhow::Result<BTreeMap<String, String>> {
    eventually("every route to answer", Duration::from_secs(10), || async {
        let mut out = BTreeMap::new();
        for (node, addr) in routes {
            let body = http_get(addr).await?;
            out.insert(node.clone(), release_of(&body).with_context(|| format!("{node} answered {body}"))?);
        }
        Ok(Some(out))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacks_lock_atomically_serialize_and_undo_as_a_whole() {
    let nodes: Vec<(&str, &[(&str, &str)])> = vec![("node-w", &[("env", "web")]), ("node-a", &[("env", "api")])];
    let mut f = Fleet::start(&nodes, DESTS).await.expect("cluster with two nodes");
    let r = run(&mut f).await;
    f.finish(r);
}

async fn run(f: &mut Fleet) -> anyhow::Result<()> {
    let m = f.cluster.write_file("fleet.yaml", MANIFEST)?;
    let m_s = m.to_str().context("UTF-8 path")?.to_string();

    // 1. v1 to both: one saga, one token on both destinations.
    let v1 =
        f.cluster.ctl(&["deploy", "-f", &m_s, "--destination", "web", "--destination", "api", "--release", "v1", "-o", "json"]).await?;
    v1.expect_code(0)?;
    let d1 = v1.deployment()?;
    let token = d1.token.context("token")?;
    let per_dest: Vec<&str> = steps(&d1).iter().map(|s| s.plan.destination.as_str()).collect();
    ensure!(per_dest.contains(&"web") && per_dest.contains(&"api"), "the saga spans both: {per_dest:?}");
    let grant = event(&d1, "running")?;
    ensure!(grant.reason.contains("2 destination locks granted in one step"), "grant: {grant:?}");
    for l in f.witness()? {
        ensure!(l.token == token, "every step of the stack carries its one token: {l}");
    }
    let routes = routes(&d1)?;
    ensure!(routes.len() == 2, "a route on each node: {routes:?}");
    ensure!(serving(&routes).await?.values().all(|r| r == "v1"), "v1 everywhere");

    // 2. Two stacks in opposite orders, then a single deployment to web,
    //    all submitted at once: no deadlock, no overlap, submission order.
    let mut ids = vec![];
    for args in [
        vec!["--destination", "web", "--destination", "api", "--release", "v2"],
        vec!["--destination", "api", "--destination", "web", "--release", "v3"],
        vec!["--destination", "web", "--release", "v4"],
    ] {
        let mut all = vec!["deploy", "-f", m_s.as_str(), "--detach", "-o", "json"];
        all.extend(args);
        let run = f.cluster.ctl(&all).await?;
        run.expect_code(0)?;
        ids.push(run.id()?);
    }
    let mut ds = vec![];
    for id in &ids {
        let w = f.cluster.ctl(&["watch", id, "-o", "json"]).await?;
        w.expect_code(0)?;
        ds.push(w.deployment()?);
    }
    let tokens: Vec<u64> = ds.iter().filter_map(|d| d.token).collect();
    ensure!(tokens.len() == 3 && tokens.windows(2).all(|w| w[0] < w[1]), "granted in submission order: {tokens:?}");
    // Each one's witness lines lie entirely after the one before.
    let witness = f.witness()?;
    let span = |t: u64| {
        let lines: Vec<&WitnessLine> = witness.iter().filter(|l| l.token == t).collect();
        let start = lines.iter().map(|l| l.start_ms).min().unwrap_or(0);
        let end = lines.iter().map(|l| l.end_ms).max().unwrap_or(0);
        (start, end, lines.len())
    };
    for w in tokens.windows(2) {
        let (a, b) = (span(w[0]), span(w[1]));
        ensure!(a.2 > 0 && b.2 > 0, "both ran steps: {a:?} {b:?}");
        ensure!(a.1 <= b.0, "token {} ran {a:?}, overlapping token {} at {b:?}", w[0], w[1]);
    }
    let all: Vec<&Deployment> = [&d1].into_iter().chain(&ds).collect();
    assert_witness_safe(&witness, &all)?;
    let now = serving(&routes).await?;
    ensure!(now.get("node-w").map(String::as_str) == Some("v4") && now.get("node-a").map(String::as_str) == Some("v3"), "serving {now:?}");

    // 3. A stack that fails on api is undone on web too.
    let node_a_data = f.node("node-a").data_dir.clone();
    std::fs::write(node_a_data.join("fail-health"), b"")?;
    let bad =
        f.cluster.ctl(&["deploy", "-f", &m_s, "--destination", "web", "--destination", "api", "--release", "v5", "-o", "json"]).await?;
    bad.expect_code(3)?;
    let d5 = bad.deployment()?;
    ensure!(d5.state == DeployState::Failed, "{}", d5.state);
    let web_steps: Vec<&StepRecord> = steps(&d5).iter().filter(|s| s.plan.destination == "web").collect();
    ensure!(
        !web_steps.is_empty() && web_steps.iter().all(|s| status(s) == "undone"),
        "web's completed steps are undone: {}",
        show(&web_steps)
    );
    let after = serving(&routes).await?;
    ensure!(
        after.get("node-w").map(String::as_str) == Some("v4") && after.get("node-a").map(String::as_str) == Some("v3"),
        "previous releases serve again: {after:?}"
    );
    for d in ["web", "api"] {
        let l = f.cluster.ctl(&["lock", "status", d, "-o", "json"]).await?;
        l.expect_code(0)?;
        let held = l.json::<LockStatusView>()?.locks;
        ensure!(!held.iter().any(|l| l.holder.starts_with("deployment/")), "{d} is free after the stack ended: {held:?}");
        ensure!(!l.stdout.contains("deployment/"), "{d} is free after the stack ended: {}", l.stdout);
    }
    Ok(())
}
