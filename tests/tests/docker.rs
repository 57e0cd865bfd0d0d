//! Deployments of containers through the real cluster: 3 `fleet-coord`, a
//! `fleet-node` with the `docker` adapter on this machine's Docker Engine,
//! driven through the real `fleetctl`. The images are built here `FROM
//! scratch` (busybox, no registry) by `fleet_docker::testimage`.
//!
//! Needs the Docker Engine (`DOCKER_HOST` or /var/run/docker.sock) and the
//! binaries (`cargo build --workspace --exclude fleet-bench --all-targets`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_docker::testimage::{build_web_image, WebImage, WEB_PORT};
use fleet_docker::{Engine, LabelFilter, RunState, LABEL_DEPLOYMENT, LABEL_MANAGED, LABEL_NODE, LABEL_RELEASE, LABEL_TOKEN};
use fleet_tests::harness::{http_get, CtlRun, Fleet};
use fleet_tests::json::SwitchOutput;
use fleet_tests::values::{kind, output, status, steps};

/// Removes every container of the test's destination when the test ends,
/// whatever happened (a fresh runtime: the test's may be gone).
struct ContainerGuard {
    destination: String,
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let destination = self.destination.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let Ok(engine) = Engine::connect().await else { return };
                let Ok(listed) = engine.list(&LabelFilter::managed().destination(&destination)).await else { return };
                for c in listed {
                    if let Err(e) = engine.stop_and_remove(&c.id, Duration::ZERO).await {
                        eprintln!("could not remove test container {}: {e}", c.name);
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A destination name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{}", std::process::id(), nanos % 100_000)
}

fn destinations(name: &str) -> String {
    format!("destinations:\n  - name: {name}\n    adapter: docker\n    selector: {{ role: boxes }}\n")
}

const NODE: (&str, &[(&str, &str)]) = ("node-1", &[("role", "boxes")]);

fn manifest(destination: &str, image: &str) -> String {
    format!(
        "app: web\ndestination: {destination}\nimage: \"{image}\"\ncontainer_port: {WEB_PORT}\npull: never\n\
         health: {{ image: true, deadline: 30s }}\ndrain: 2s\nretry: {{ max_attempts: 1 }}\n"
    )
}

async fn deploy(f: &Fleet, m: &std::path::Path, release: &str, want: i32) -> anyhow::Result<CtlRun> {
    let run = f.cluster.deploy(m, &["--release", release]).await?;
    run.expect_code(want)?;
    Ok(run)
}

/// The route of the deployment's switch step.
fn route(d: &Deployment) -> anyhow::Result<String> {
    let s = steps(d).iter().find(|s| kind(s) == "switch_route").with_context(|| format!("no switch step in {}", d.id))?;
    Ok(output::<SwitchOutput>(s)?.route)
}

async fn serves(addr: &str) -> anyhow::Result<String> {
    let body = http_get(addr).await?;
    body.trim().strip_prefix("release=").map(str::to_string).with_context(|| format!("{addr} answered {body:?}"))
}

#[derive(Default, Debug)]
struct Counts {
    ok: usize,
    failed: Vec<String>,
    per_release: BTreeMap<String, usize>,
}

/// A client outside Fleet: plain TCP HTTP/1.0 GETs through the route, one
/// connection each, until `stop`, at most `max` requests or `limit`.
fn client(addr: String, stop: Arc<AtomicBool>, counts: Arc<Mutex<Counts>>, max: usize, limit: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let begun = Instant::now();
        for _ in 0..max {
            if stop.load(Ordering::Relaxed) || begun.elapsed() > limit {
                return;
            }
            let answer = (|| -> Result<String, String> {
                let mut s = TcpStream::connect(&addr).map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
                s.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n").map_err(|e| format!("write: {e}"))?;
                let mut buf = String::new();
                s.read_to_string(&mut buf).map_err(|e| format!("read: {e}"))?;
                let (head, body) = buf.split_once("\r\n\r\n").ok_or_else(|| format!("not HTTP: {buf:?}"))?;
                if head.lines().next().and_then(|l| l.split_whitespace().nth(1)) != Some("200") {
                    return Err(format!("status: {head:?}"));
                }
                body.trim().strip_prefix("release=").map(str::to_string).ok_or_else(|| format!("body: {body:?}"))
            })();
            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
            match answer {
                Ok(release) => {
                    c.ok += 1;
                    *c.per_release.entry(release).or_default() += 1;
                }
                Err(e) => c.failed.push(e),
            }
        }
    })
}

/// Deploy v1, v2 while a client counts failures (none allowed), then a v3
/// whose image fails its HEALTHCHECK (exit 3, v2 still serving); afterwards
/// the engine holds exactly v2's container, with Fleet's labels.
#[tokio::test(flavor = "multi_thread")]
async fn containers_blue_green_through_the_cluster() {
    let engine = Engine::connect().await.expect("this test needs the Docker Engine");
    let tag = |r: &str| format!("fleet-test/web-bg:{r}");
    for (r, healthy) in [("v1", true), ("v2", true), ("v3", false)] {
        let image = if healthy { WebImage::new(tag(r), r) } else { WebImage::unhealthy(tag(r), r) };
        build_web_image(&engine, &image).await.expect("building a test image");
    }
    let dest = unique("boxes");
    let _guard = ContainerGuard { destination: dest.clone() };
    let f = Fleet::start(&[NODE], &destinations(&dest)).await.expect("cluster with a node");
    let r = blue_green(&f, &engine, &dest).await;
    f.finish(r);
}

async fn blue_green(f: &Fleet, engine: &Engine, dest: &str) -> anyhow::Result<()> {
    let m = f.cluster.write_file("web.yaml", &manifest(dest, "fleet-test/web-bg:{release}"))?;
    let run1 = deploy(f, &m, "v1", 0).await?;
    let d1 = run1.deployment()?;
    ensure!(d1.state == DeployState::Succeeded, "{run1}");
    let addr = route(&d1)?;
    ensure!(serves(&addr).await? == "v1", "v1 serves through the route");

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let t = client(addr.clone(), stop.clone(), counts.clone(), 20_000, Duration::from_secs(120));
    let run2 = deploy(f, &m, "v2", 0).await;
    // A few more requests after the switch, so the client sees v2 too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts.lock().unwrap_or_else(|p| p.into_inner()).per_release.get("v2").copied().unwrap_or(0) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    t.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))?;
    let run2 = run2?;
    let d2 = run2.deployment()?;
    let c = std::mem::take(&mut *counts.lock().unwrap_or_else(|p| p.into_inner()));
    eprintln!("client during v1 → v2: {} ok, {} failed, per release {:?}", c.ok, c.failed.len(), c.per_release);
    ensure!(
        c.failed.is_empty(),
        "{} requests failed during the switch, e.g. {:?}",
        c.failed.len(),
        c.failed.iter().take(3).collect::<Vec<_>>()
    );
    ensure!(c.per_release.get("v1").is_some_and(|n| *n > 0) && c.per_release.get("v2").is_some_and(|n| *n > 0), "{c:?}");
    ensure!(route(&d2)? == addr, "the route keeps its address across releases");
    ensure!(serves(&addr).await? == "v2");

    let run3 = deploy(f, &m, "v3", 3).await?;
    let d3 = run3.deployment()?;
    ensure!(d3.state != DeployState::Succeeded, "{run3}");
    let health = steps(&d3).iter().find(|s| kind(s) == "health_check").context("a health step")?;
    let err = health.error.clone().unwrap_or_default();
    ensure!(err.contains("unhealthy") && err.contains("HEALTHCHECK"), "the health step says why: {err}");
    let start = steps(&d3).iter().find(|s| kind(s) == "start_container").context("a start step")?;
    ensure!(status(start) == "undone", "the v3 container's start was undone: {}", status(start));
    ensure!(serves(&addr).await? == "v2", "v2 still serves after the failed v3");

    // Exactly v2's container is left, running, with Fleet's labels.
    let listed = engine.list(&LabelFilter::managed().destination(dest)).await?;
    ensure!(listed.len() == 1, "expected only v2's container, found {:?}", listed.iter().map(|c| (&c.name, &c.state)).collect::<Vec<_>>());
    let c = &listed[0];
    let labels = c.fleet.as_ref().context("Fleet's labels")?;
    ensure!(c.state == RunState::Running, "{c:?}");
    ensure!(labels.app == "web" && labels.release == "v2" && labels.destination == dest, "{labels:?}");
    ensure!(labels.deployment == d2.id && Some(labels.token) == d2.token, "labels {labels:?} vs deployment {} token {:?}", d2.id, d2.token);
    for key in [LABEL_MANAGED, LABEL_RELEASE, LABEL_DEPLOYMENT, LABEL_TOKEN, LABEL_NODE] {
        ensure!(c.labels.contains_key(key), "label {key} missing: {:?}", c.labels);
    }
    ensure!(c.image == "fleet-test/web-bg:v2", "{}", c.image);
    Ok(())
}

/// `pull: never` with an image the node does not have: the start fails
/// naming the image (exit 3) and leaves no container.
#[tokio::test(flavor = "multi_thread")]
async fn pull_never_with_a_missing_image_fails_naming_it() {
    let engine = Engine::connect().await.expect("this test needs the Docker Engine");
    let dest = unique("never");
    let _guard = ContainerGuard { destination: dest.clone() };
    let f = Fleet::start(&[NODE], &destinations(&dest)).await.expect("cluster with a node");
    let r = async {
        let image = format!("fleet-test/not-built-{}:{{release}}", std::process::id());
        let m = f.cluster.write_file("missing.yaml", &manifest(&dest, &image))?;
        let run = deploy(&f, &m, "v1", 3).await?;
        let wanted = image.replace("{release}", "v1");
        ensure!(run.text().contains(&wanted), "the failure names the image {wanted}: {run}");
        let d = run.deployment()?;
        let start = steps(&d).iter().find(|s| kind(s) == "start_container").context("a start step")?;
        ensure!(start.error.as_deref().is_some_and(|e| e.contains(&wanted) && e.contains("pull")), "{:?}", start.error);
        let listed = engine.list(&LabelFilter::managed().destination(&dest)).await?;
        ensure!(listed.is_empty(), "nothing is left: {listed:?}");

        // A manifest with both `run:` and `image:` is refused (exit 2), naming the field.
        let mixed = f.cluster.write_file("mixed.yaml", &(manifest(&dest, "fleet-test/web-bg:{release}") + "run: [\"srv\"]\n"))?;
        let run = deploy(&f, &mixed, "v1", 2).await?;
        ensure!(run.text().contains("image") && run.text().contains("not both"), "{run}");
        Ok(())
    }
    .await;
    f.finish(r);
}

/// Containers of `dest` that `node` created, as (release, running).
async fn on_node(engine: &Engine, dest: &str, node: &str) -> anyhow::Result<Vec<(String, bool)>> {
    let listed = engine.list(&LabelFilter::managed().destination(dest).node(node)).await?;
    let mut v: Vec<(String, bool)> =
        listed.into_iter().map(|c| (c.fleet.map(|f| f.release).unwrap_or_default(), c.state == RunState::Running)).collect();
    v.sort();
    Ok(v)
}

/// `kill -9` of a node while its new container is being health-checked,
/// then its restart: the deployment ends honestly (done on node-1, the
/// lost node's steps skipped), and the restarted node listens on its route
/// again (still the previous release, which kept running) and removes the
/// container no step owns any more; nothing is orphaned.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_mid_deploy_adopts_what_is_active_and_removes_what_no_step_owns() {
    let engine = Engine::connect().await.expect("this test needs the Docker Engine");
    let tag = |r: &str| format!("fleet-test/web-bg:{r}");
    for r in ["v1", "v2"] {
        build_web_image(&engine, &WebImage::new(tag(r), r)).await.expect("building a test image");
    }
    let dest = unique("kill");
    let _guard = ContainerGuard { destination: dest.clone() };
    let nodes: [(&str, &[(&str, &str)]); 2] = [("node-1", &[("role", "boxes")]), ("node-2", &[("role", "boxes")])];
    let mut f = Fleet::start(&nodes, &destinations(&dest)).await.expect("cluster with two nodes");
    let r = killed_mid_deploy(&mut f, &engine, &dest).await;
    f.finish(r);
}

async fn killed_mid_deploy(f: &mut Fleet, engine: &Engine, dest: &str) -> anyhow::Result<()> {
    // A health check that takes about 3 s, so node-2 is certainly in it when killed.
    let slow = format!(
        "app: web\ndestination: {dest}\nimage: \"fleet-test/web-bg:{{release}}\"\ncontainer_port: {WEB_PORT}\npull: never\n\
         health: {{ http: /healthz, interval: 100ms, healthy_threshold: 30, deadline: 30s }}\ndrain: 1s\n"
    );
    let m = f.cluster.write_file("slow.yaml", &slow)?;
    let d1 = deploy(f, &m, "v1", 0).await?.deployment()?;
    let route2 = {
        let s = steps(&d1).iter().find(|s| kind(s) == "switch_route" && s.plan.node == "node-2").context("node-2's switch")?;
        output::<SwitchOutput>(s)?.route
    };
    ensure!(serves(&route2).await? == "v1");

    let idx = f.nodes.iter().position(|n| n.name == "node-2").context("node-2")?;
    let (cluster, nodes) = (&f.cluster, &mut f.nodes);
    let killer = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if on_node(engine, dest, "node-2").await?.contains(&("v2".to_string(), true)) {
                break;
            }
            ensure!(Instant::now() < deadline, "node-2 never started v2");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nodes[idx].kill9()?;
        anyhow::Ok(())
    };
    let (run2, killed) = tokio::join!(cluster.deploy(&m, &["--release", "v2"]), killer);
    killed?;
    let run2 = run2?;
    run2.expect_code(0)?;
    let d2 = run2.deployment()?;
    ensure!(d2.state == DeployState::Succeeded, "{run2}");
    for s in steps(&d2) {
        let ok = match (s.plan.node.as_str(), status(s)) {
            ("node-1", "done") => true,
            // The kill lands while the start is finishing (its container
            // exists, its result may not have been sent) or in the health check.
            ("node-2", "skipped") => true,
            ("node-2", "done") => kind(s) == "start_container",
            _ => false,
        };
        ensure!(ok, "unexpected: {} on {} is {}", s.plan.name, s.plan.node, status(s));
    }
    // The kill took node-2's route with it, not its containers: v1 (active) and v2 (staged) run on.
    ensure!(on_node(engine, dest, "node-2").await? == [("v1".to_string(), true), ("v2".to_string(), true)]);

    f.nodes[idx].restart()?;
    f.cluster.wait_nodes_connected(&["node-1", "node-2"]).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = on_node(engine, dest, "node-2").await?;
        if left == [("v1".to_string(), true)] {
            break;
        }
        ensure!(Instant::now() < deadline, "node-2 still has {left:?}; the v2 container no step owns should be gone");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(serves(&route2).await? == "v1", "the restarted node listens on its route again, on the container that kept running");
    ensure!(on_node(engine, dest, "node-1").await? == [("v2".to_string(), true)]);
    let all = engine.list(&LabelFilter::managed().destination(dest)).await?;
    ensure!(all.len() == 2, "exactly node-1's v2 and node-2's v1: {:?}", all.iter().map(|c| &c.name).collect::<Vec<_>>());
    Ok(())
}
