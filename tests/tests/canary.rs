//! Canary, `recreate` and the route's listen address, end to end: real
//! coordinators, `fleet-node`s (process adapter) and `fleet-demo-app`
//! instances, driven through the real `fleetctl` and checked through its
//! JSON output, the exit codes and the demo app's HTTP answers on each
//! node's route.
//!
//! Build the binaries first:
//! `cargo build -p fleet-coord -p fleetctl -p fleet-node -p fleet-demo-app`
//! (or run everything with `cargo xtask test`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment, StepStatus};
use fleet_tests::checks::assert_witness_safe;
use fleet_tests::harness::{eventually, http_get, pid_exists, release_of, CtlRun, Fleet};
use fleet_tests::json::{StartOutput, SwitchOutput};
use fleet_tests::values::{kind, output, steps};

const HEALTH: &str = "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 2, deadline: 10s }";

const STAGING: &str = "destinations:\n  - name: staging\n    selector: { env: staging }\n";

fn two_nodes() -> Vec<(&'static str, &'static [(&'static str, &'static str)])> {
    vec![("node-1", &[("env", "staging")]), ("node-2", &[("env", "staging")])]
}

/// `fleet.yaml` for the demo app with `extra` lines; the release comes from `--release`.
fn manifest(f: &Fleet, name: &str, extra: &str) -> anyhow::Result<PathBuf> {
    let text = format!("app: web\ndestination: staging\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH}\ntimeout: 2m\n{extra}");
    f.cluster.write_file(name, &text)
}

/// `fleetctl deploy` (JSON) and require exit code `want`, the result line agreeing.
async fn deploy(f: &Fleet, m: &std::path::Path, args: &[&str], want: i32) -> anyhow::Result<CtlRun> {
    let run = f.cluster.deploy(m, args).await?;
    run.expect_code(want)?;
    let result = run.result()?;
    ensure!(result.exit_code == want && result.state == result.deployment.state, "{run}");
    Ok(run)
}

/// Submit detached; the deployment id.
async fn submit(f: &Fleet, m: &std::path::Path, release: &str) -> anyhow::Result<String> {
    let run = f.cluster.deploy(m, &["--release", release, "--detach"]).await?;
    run.expect_code(0)?;
    run.id()
}

async fn wait_state(f: &Fleet, id: &str, want: DeployState) -> anyhow::Result<Deployment> {
    eventually(&format!("{id} to be {want}"), Duration::from_secs(60), || async {
        let d = f.cluster.deployment(id).await?;
        ensure!(!d.state.is_terminal() || d.state == want, "{id} ended {} instead of {want}: {:?}", d.state, d.events);
        Ok((d.state == want).then_some(d))
    })
    .await
}

/// The route address each node serves the app on (its last switch step).
fn route(d: &Deployment, node: &str) -> anyhow::Result<String> {
    let s = steps(d)
        .iter()
        .rev()
        .find(|s| kind(s) == "switch_route" && s.plan.node == node && s.status == StepStatus::Done)
        .with_context(|| format!("no completed switch on {node} in {}", d.id))?;
    Ok(output::<SwitchOutput>(s)?.route)
}

async fn serves(addr: &str, want: &str) -> anyhow::Result<()> {
    let body = http_get(addr).await?;
    ensure!(release_in(&body).as_deref() == Some(want), "{addr} answered {body:?}, expected release {want}");
    Ok(())
}

/// What each node's route serves now: `[(node, release)]`.
async fn serving(routes: &[(&str, String)]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = vec![];
    for (node, addr) in routes {
        let body = http_get(addr).await?;
        let release = release_in(&body).unwrap_or(body);
        out.push((node.to_string(), release));
    }
    Ok(out)
}

/// The release a body names: the demo app says "fleet demo app, release R",
/// the container test image "release=R".
fn release_in(body: &str) -> Option<String> {
    release_of(body).or_else(|| body.trim().strip_prefix("release=").map(str::to_string))
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

fn has_event(d: &Deployment, to: DeployState, text: &str) -> bool {
    d.events.iter().any(|e| e.to == to && e.reason.contains(text))
}

// ------------------------------------------------------------------ canary

#[tokio::test(flavor = "multi_thread")]
async fn canary_pauses_then_promote_cancel_auto_promote_and_analysis_decide() {
    let f = Fleet::start(&two_nodes(), STAGING).await.expect("cluster with nodes");
    let r = canary(&f).await;
    f.finish(r);
}

async fn canary(f: &Fleet) -> anyhow::Result<()> {
    let plain = manifest(f, "web.yaml", "")?;
    let d1 = deploy(f, &plain, &["--release", "v1"], 0).await?.deployment()?;
    let mut ids = vec![d1.id.clone()];
    let routes = vec![("node-1", route(&d1, "node-1")?), ("node-2", route(&d1, "node-2")?)];

    // 1. Pause (no duration), then promote: exit 0 for the watcher.
    let manual = manifest(f, "manual.yaml", "strategy: { canary: { nodes: 1 } }\n")?;
    let id = submit(f, &manual, "v2").await?;
    ids.push(id.clone());
    let d = wait_state(f, &id, DeployState::Paused).await?;
    let watcher = f.cluster.spawn_ctl(&["watch", &id, "-o", "json"])?;
    let reason = d.paused_reason().unwrap_or_default().to_string();
    ensure!(reason.contains("canary on node-1") && reason.contains(&format!("fleetctl promote {id}")), "pause reason: {reason}");
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v2"), ("node-2", "v1")]), "only the canary has v2");
    let lock = f.cluster.ctl(&["lock", "status", "staging"]).await?;
    ensure!(lock.code == 0 && lock.text().contains(&format!("deployment/{id}")), "the paused canary holds the lock: {lock}");
    let status = f.cluster.ctl(&["status", &id]).await?;
    ensure!(
        status.text().contains("paused") && status.text().contains("waiting for `fleetctl promote"),
        "status shows the pause: {status}"
    );
    // A paused deployment keeps `watch` waiting: it was started before the checks above and runs on.
    ensure!(!watcher.is_finished(), "watch ended while the deployment is paused");
    let promoted = f.cluster.ctl(&["promote", &id]).await?;
    promoted.expect_code(0)?;
    let watched = watcher.await??;
    watched.expect_code(0)?;
    let d2 = watched.deployment()?;
    ensure!(d2.state == DeployState::Succeeded && has_event(&d2, DeployState::Running, "promoted by"), "{:?}", d2.events);
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v2"), ("node-2", "v2")]));
    let again = f.cluster.ctl(&["promote", &id]).await?;
    ensure!(again.code == 7, "promoting an ended deployment is refused (exit 7): {again}");

    // 2. Pause, then cancel: every node back on v2, exit 4.
    let id = submit(f, &manual, "v3").await?;
    ids.push(id.clone());
    wait_state(f, &id, DeployState::Paused).await?;
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v3"), ("node-2", "v2")]));
    let cancelled = f.cluster.ctl(&["cancel", &id, "--wait", "-o", "json"]).await?;
    cancelled.expect_code(4)?;
    ensure!(cancelled.deployment()?.state == DeployState::Cancelled, "{cancelled}");
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v2"), ("node-2", "v2")]), "the canary is undone");

    // 3. A short pause promotes on its own.
    let timed = manifest(f, "timed.yaml", "strategy: { canary: { nodes: 1, pause: 2s } }\n")?;
    let d4 = deploy(f, &timed, &["--release", "v4"], 0).await?.deployment()?;
    ids.push(d4.id.clone());
    ensure!(has_event(&d4, DeployState::Paused, "auto promote at"), "{:?}", d4.events);
    ensure!(has_event(&d4, DeployState::Running, "the pause of 2s passed; promoted automatically"), "{:?}", d4.events);
    let paused = d4.events.iter().find(|e| e.to == DeployState::Paused).context("paused")?.at_ms;
    let resumed = d4.events.iter().rev().find(|e| e.to == DeployState::Running).context("running")?.at_ms;
    ensure!(resumed - paused >= 2_000, "promoted after {} ms, before its 2s pause", resumed - paused);
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v4"), ("node-2", "v4")]));

    // 4. An analysis that fails undoes it: exit 3, the reason names it.
    let failing = manifest(
        f,
        "failing.yaml",
        "strategy: { canary: { nodes: 1, pause: 30s, analysis: { http: /no-such-page, interval: 200ms, failure_limit: 2 } } }\n",
    )?;
    let run = deploy(f, &failing, &["--release", "v5"], 3).await?;
    let d5 = run.deployment()?;
    ids.push(d5.id.clone());
    ensure!(has_event(&d5, DeployState::Compensating, "canary analysis failed on node-1"), "{:?}", d5.events);
    ensure!(has_event(&d5, DeployState::Compensating, "GET /no-such-page"), "{:?}", d5.events);
    ensure!(d5.steps.iter().all(|s| s.plan.node == "node-1" || s.status == StepStatus::Pending), "node-2 never got v5");
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v4"), ("node-2", "v4")]), "the canary is undone");

    // 5. An analysis that keeps passing promotes on its own.
    let passing =
        manifest(f, "passing.yaml", "strategy: { canary: { nodes: 1, pause: 2s, analysis: { http: /healthz, interval: 200ms } } }\n")?;
    let d6 = deploy(f, &passing, &["--release", "v6"], 0).await?.deployment()?;
    ids.push(d6.id.clone());
    ensure!(has_event(&d6, DeployState::Running, "the canary analysis passed for 2s; promoted automatically"), "{:?}", d6.events);
    let analysis = d6.steps.iter().find(|s| kind(s) == "canary_pause").context("an analysis step")?;
    let probes = serde_json::from_str::<serde_json::Value>(analysis.output.as_deref().unwrap_or("{}"))?["probes"].as_u64().unwrap_or(0);
    ensure!(probes >= 5, "the analysis probed the canary {probes} times in 2s every 200ms");
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v6"), ("node-2", "v6")]));

    // 6. More canary nodes than the destination can spare: exit 2 naming the field.
    let greedy = manifest(f, "greedy.yaml", "strategy: { canary: { nodes: 2 } }\n")?;
    let run = f.cluster.deploy(&greedy, &["--release", "v7"]).await?;
    ensure!(run.code == 2 && run.text().contains("strategy.canary.nodes"), "{run}");
    let dry = f.cluster.ctl(&["deploy", "-f", greedy.to_str().context("utf-8")?, "--release", "v7", "--dry-run"]).await?;
    ensure!(dry.code == 2 && dry.text().contains("strategy.canary.nodes"), "{dry}");

    witness_safe(f, &ids).await
}

/// No two actions overlapped on the destination, each with its deployment's token.
async fn witness_safe(f: &Fleet, ids: &[String]) -> anyhow::Result<()> {
    let mut all = vec![];
    for id in ids {
        all.push(f.cluster.deployment(id).await?);
    }
    assert_witness_safe(&f.witness()?, &all.iter().collect::<Vec<_>>())
}

// ------------------------------------------------------------------ recreate

#[tokio::test(flavor = "multi_thread")]
async fn recreate_stops_the_old_instance_first_and_its_undo_restores_it() {
    let f = Fleet::start(&[("node-1", &[("env", "staging")])], STAGING).await.expect("cluster with a node");
    let r = recreate(&f).await;
    f.finish(r);
}

fn start_of(d: &Deployment) -> anyhow::Result<StartOutput> {
    let s = steps(d).iter().find(|s| kind(s) == "start_instance").context("a start step")?;
    output(s)
}

async fn recreate(f: &Fleet) -> anyhow::Result<()> {
    let m = manifest(f, "web.yaml", "strategy: { type: recreate }\n")?;
    let d1 = deploy(f, &m, &["--release", "v1"], 0).await?.deployment()?;
    let addr = route(&d1, "node-1")?;
    serves(&addr, "v1").await?;
    let v1 = start_of(&d1)?;

    let d2 = deploy(f, &m, &["--release", "v2"], 0).await?.deployment()?;
    let kinds: Vec<String> = steps(&d2).iter().map(kind).collect();
    ensure!(kinds == ["stop_current", "start_instance", "health_check", "switch_route"], "recreate plan: {kinds:?}");
    let stop = &steps(&d2)[0];
    let start = &steps(&d2)[1];
    ensure!(stop.finished_ms <= start.started_ms, "v1 was stopped before v2 started: {:?} vs {:?}", stop.finished_ms, start.started_ms);
    ensure!(!pid_exists(v1.pid), "v1 (pid {}) still runs after a recreate", v1.pid);
    serves(&addr, "v2").await?;
    ensure!(route(&d2, "node-1")? == addr, "the route keeps its address");
    let v2 = start_of(&d2)?;

    // A release that fails its health check: undone exactly, v2 runs again on its port.
    let failing = manifest(f, "failing.yaml", "strategy: { type: recreate }\nenv: { DEMO_FAIL_HEALTH: \"1\" }\n")?;
    let d3 = deploy(f, &failing, &["--release", "v3"], 3).await?.deployment()?;
    ensure!(steps(&d3)[0].status == StepStatus::Undone, "stop-current was undone: {:?}", steps(&d3)[0]);
    serves(&addr, "v2").await?;
    let back: serde_json::Value = serde_json::from_str(steps(&d3)[0].output.as_deref().unwrap_or("{}"))?;
    ensure!(back["stopped"]["port"].as_u64() == Some(v2.port as u64), "stop-current stopped v2: {back}");
    ensure!(!pid_exists(start_of(&d3)?.pid), "the failed v3 instance is gone");

    // `recreate` and `canary` together: exit 2 naming the field.
    let both = manifest(f, "both.yaml", "strategy: { type: recreate, canary: { nodes: 1 } }\n")?;
    let run = f.cluster.deploy(&both, &["--release", "v4"]).await?;
    ensure!(run.code == 2 && run.text().contains("strategy.canary"), "{run}");
    witness_safe(f, &[d1.id, d2.id, d3.id]).await
}

// ------------------------------------------------------------------ route.listen

#[tokio::test(flavor = "multi_thread")]
async fn the_route_listens_where_the_manifest_says_and_the_deploy_says_where() {
    let f = Fleet::start(&[("node-1", &[("env", "staging")])], STAGING).await.expect("cluster with a node");
    let r = listen(&f).await;
    f.finish(r);
}

async fn listen(f: &Fleet) -> anyhow::Result<()> {
    // Loopback by default: 127.0.0.1 only (127.0.0.2 is loopback too, but another address).
    let m = manifest(f, "web.yaml", "")?;
    let run = deploy(f, &m, &["--release", "v1"], 0).await?;
    let served = run.result()?.served_at;
    ensure!(served.len() == 1 && served[0].node == "node-1" && served[0].address.starts_with("127.0.0.1:"), "{served:?}");
    let port = served[0].address.rsplit(':').next().context("a port")?.to_string();
    serves(&served[0].address, "v1").await?;
    ensure!(http_get(&format!("127.0.0.2:{port}")).await.is_err(), "a loopback route answered on 127.0.0.2");

    // `route: { listen: 0.0.0.0 }`: every interface, same port; the final line says where.
    let open = manifest(f, "open.yaml", "route: { listen: 0.0.0.0 }\n")?;
    let run = deploy(f, &open, &["--release", "v2"], 0).await?;
    let served = run.result()?.served_at;
    ensure!(served.len() == 1 && served[0].address == format!("0.0.0.0:{port}"), "{served:?}");
    serves(&format!("127.0.0.2:{port}"), "v2").await?;
    serves(&format!("127.0.0.1:{port}"), "v2").await?;
    if let Some(ip) = non_loopback_ip() {
        serves(&format!("{ip}:{port}"), "v2").await?;
    }
    let text = f.cluster.ctl(&["deploy", "-f", open.to_str().context("utf-8")?, "--release", "v3"]).await?;
    text.expect_code(0)?;
    ensure!(text.text().contains(&format!("(node-1 0.0.0.0:{port})")), "the final line names the address: {text}");

    // A deploy that moves the route back to loopback and then fails (its post hook) is undone:
    // the route listens on 0.0.0.0 again.
    let back = manifest(f, "back.yaml", "hooks: { post: [\"false\"] }\nretry: { max_attempts: 1 }\n")?;
    deploy(f, &back, &["--release", "v4"], 3).await?;
    serves(&format!("127.0.0.2:{port}"), "v3").await?;
    Ok(())
}

/// This host's address on its default route, if it has one (no packet is sent).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

// ------------------------------------------------------------------ containers

/// Removes every container of the test's destination when the test ends.
struct ContainerGuard(String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let destination = self.0.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let Ok(engine) = fleet_docker::Engine::connect().await else { return };
                let Ok(listed) = engine.list(&fleet_docker::LabelFilter::managed().destination(&destination)).await else { return };
                for c in listed {
                    let _ = engine.stop_and_remove(&c.id, Duration::ZERO).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// The releases of the destination's containers, sorted (running or not).
async fn containers(engine: &fleet_docker::Engine, destination: &str) -> anyhow::Result<Vec<String>> {
    let listed = engine.list(&fleet_docker::LabelFilter::managed().destination(destination)).await?;
    let mut releases: Vec<String> = listed.into_iter().map(|c| c.fleet.map(|f| f.release).unwrap_or_default()).collect();
    releases.sort();
    Ok(releases)
}

/// Canary (pause + cancel, analysis + auto promote), `recreate` and
/// `route.listen` with the `docker` adapter on this machine's engine.
#[tokio::test(flavor = "multi_thread")]
async fn containers_canary_recreate_and_listen() {
    use fleet_docker::testimage::{build_web_image, WebImage, WEB_PORT};
    let engine = fleet_docker::Engine::connect().await.expect("this test needs the Docker Engine");
    for r in ["v1", "v2", "v3"] {
        build_web_image(&engine, &WebImage::new(format!("fleet-test/web-canary:{r}"), r)).await.expect("building a test image");
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let dest = format!("canary-boxes-{}-{}", std::process::id(), nanos % 100_000);
    let _guard = ContainerGuard(dest.clone());
    let yaml = format!("destinations:\n  - name: {dest}\n    adapter: docker\n    selector: {{ role: boxes }}\n");
    let nodes: Vec<(&str, &[(&str, &str)])> = vec![("node-1", &[("role", "boxes")]), ("node-2", &[("role", "boxes")])];
    let f = Fleet::start(&nodes, &yaml).await.expect("cluster with nodes");
    let r = containers_canary(&f, &engine, &dest, WEB_PORT).await;
    f.finish(r);
}

async fn containers_canary(f: &Fleet, engine: &fleet_docker::Engine, dest: &str, port: u16) -> anyhow::Result<()> {
    let m = |name: &str, extra: &str| {
        let text = format!(
            "app: web\ndestination: {dest}\nimage: \"fleet-test/web-canary:{{release}}\"\ncontainer_port: {port}\npull: never\n\
             health: {{ http: /healthz, interval: 200ms, deadline: 30s }}\ndrain: 1s\ntimeout: 3m\n{extra}"
        );
        f.cluster.write_file(name, &text)
    };
    let plain = m("c-web.yaml", "")?;
    let d1 = deploy(f, &plain, &["--release", "v1"], 0).await?.deployment()?;
    let routes = vec![("node-1", route(&d1, "node-1")?), ("node-2", route(&d1, "node-2")?)];
    let mut ids = vec![d1.id.clone()];

    // Paused on node-1, then cancelled: v1 everywhere again, and only v1's containers.
    let manual = m("c-manual.yaml", "strategy: { canary: { nodes: 1 } }\n")?;
    let id = submit(f, &manual, "v2").await?;
    ids.push(id.clone());
    let paused = wait_state(f, &id, DeployState::Paused).await?;
    let now = serving(&routes).await?;
    ensure!(now == pairs(&[("node-1", "v2"), ("node-2", "v1")]), "only the canary has v2: serving {now:?}; {:?}", paused.events);
    f.cluster.ctl(&["cancel", &id, "--wait", "-o", "json"]).await?.expect_code(4)?;
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v1"), ("node-2", "v1")]));
    ensure!(containers(engine, dest).await? == ["v1", "v1"], "containers: {:?}", containers(engine, dest).await?);

    // An analysis that keeps passing promotes it.
    let analysed = m("c-analysed.yaml", "strategy: { canary: { nodes: 1, pause: 2s, analysis: { http: /healthz, interval: 200ms } } }\n")?;
    let d2 = deploy(f, &analysed, &["--release", "v2"], 0).await?.deployment()?;
    ids.push(d2.id.clone());
    ensure!(has_event(&d2, DeployState::Running, "promoted automatically"), "{:?}", d2.events);
    ensure!(serving(&routes).await? == pairs(&[("node-1", "v2"), ("node-2", "v2")]));
    ensure!(containers(engine, dest).await? == ["v2", "v2"], "containers: {:?}", containers(engine, dest).await?);

    // Recreate, listening on every interface.
    let recreate = m("c-recreate.yaml", "strategy: { type: recreate }\nroute: { listen: 0.0.0.0 }\n")?;
    let run = deploy(f, &recreate, &["--release", "v3"], 0).await?;
    let d3 = run.deployment()?;
    ids.push(d3.id.clone());
    ensure!(kind(&steps(&d3)[0]) == "stop_current", "recreate stops first: {:?}", steps(&d3).iter().map(kind).collect::<Vec<_>>());
    for s in run.result()?.served_at {
        ensure!(s.address.starts_with("0.0.0.0:"), "{s:?}");
        let p = s.address.rsplit(':').next().context("a port")?;
        serves(&format!("127.0.0.2:{p}"), "v3").await?;
    }
    ensure!(containers(engine, dest).await? == ["v3", "v3"], "containers: {:?}", containers(engine, dest).await?);
    witness_safe(f, &ids).await
}
