//! The HTTPS JSON API of the coordinators, against a real cluster: every
//! endpoint's happy path, roles (a viewer cannot cancel, a node certificate
//! cannot deploy), bad input naming its field, writes sent to a follower,
//! server-sent events resumed with `Last-Event-ID`, `/metrics` parsed as
//! Prometheus text while a deployment moves its counters, and
//! `--log-format json`.
//!
//! The client (`fleet_tests::https`) is hyper over tokio-rustls with the
//! certificates `fleetctl certs init` wrote, the way any HTTPS client with a
//! client certificate would call.
//!
//! Build the binaries first:
//! `cargo build -p fleet-coord -p fleetctl -p fleet-node -p fleet-demo-app`.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_core::views::{DestinationView, NodeView, ServerView};
use fleet_tests::harness::{eventually, Cluster, Fleet, FAST_RAFT};
use fleet_tests::https::{ApiError, Https, Sse};
use fleet_tests::json::{ClusterStatusView, LockStatusView};
use serde::Deserialize;

const STAGING: &str = "destinations:\n  - name: staging\n    selector: { env: staging }\n";
const HEALTH: &str = "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 2, deadline: 10s }";

fn manifest(app: &str) -> String {
    format!("app: {app}\ndestination: staging\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH}\n")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Accepted {
    id: String,
    url: String,
    state: DeployState,
    applied_index: u64,
    deployment: Deployment,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentAnswer {
    applied_index: u64,
    deployment: Deployment,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentList {
    applied_index: u64,
    deployments: Vec<Deployment>,
    #[serde(default)]
    next_before: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationList {
    applied_index: u64,
    destinations: Vec<DestinationView>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerList {
    destination: String,
    applied_index: u64,
    servers: Vec<ServerView>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Health {
    status: String,
    id: u64,
    leader_id: Option<u64>,
    term: u64,
    last_log_index: u64,
    applied_index: u64,
    reason: Option<String>,
}

fn deployment_event(e: &Sse) -> Option<Deployment> {
    (e.event == "deployment").then(|| serde_json::from_str(&e.data).ok()).flatten()
}

fn is_terminal_event(id: &str) -> impl Fn(&Sse) -> bool + '_ {
    move |e| deployment_event(e).is_some_and(|d| d.id == id && d.state.is_terminal())
}

// ------------------------------------------------------------------ tests

async fn leader_and_follower(c: &Cluster) -> anyhow::Result<(u64, u64)> {
    let leader = c.leader_id().await?;
    let follower = c.coords.keys().copied().find(|id| *id != leader).context("a follower")?;
    Ok((leader, follower))
}

async fn submit(h: &Https, app: &str, release: &str) -> anyhow::Result<Accepted> {
    let body = serde_json::json!({ "manifest": manifest(app), "release": release });
    let a = h.call("POST", &format!("/api/apps/{app}/deployments"), Some(body)).await?;
    a.expect(202)?;
    let acc: Accepted = a.json()?;
    ensure!(acc.url == format!("/api/deployments/{}", acc.id), "url {} for {}", acc.url, acc.id);
    ensure!(a.location.as_deref() == Some(acc.url.as_str()), "Location {:?} vs {}", a.location, acc.url);
    ensure!(acc.deployment.id == acc.id && acc.deployment.release == release && acc.state == acc.deployment.state, "{acc:?}");
    ensure!(acc.applied_index > 0);
    Ok(acc)
}

async fn wait_state(h: &Https, id: &str, want: DeployState) -> anyhow::Result<Deployment> {
    eventually(&format!("{id} {want}"), Duration::from_secs(60), || async {
        let d = h.get(&format!("/api/deployments/{id}")).await?.expect(200)?.json::<DeploymentAnswer>()?.deployment;
        if d.state.is_terminal() && d.state != want {
            bail!("{id} ended {} instead of {want}", d.state);
        }
        Ok((d.state == want).then_some(d))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn http_api_end_to_end() {
    let f = Fleet::start(&[("node-1", &[("env", "staging")])], STAGING).await.expect("cluster with a node");
    let r = api(&f).await;
    f.finish(r);
}

async fn api(f: &Fleet) -> anyhow::Result<()> {
    let c = &f.cluster;
    let node_before = node_scrape(f).await?;
    let (leader, follower) = leader_and_follower(c).await?;
    let op = Https::new(c, follower, "operator")?;
    let op_leader = Https::new(c, leader, "operator")?;
    let viewer = Https::new(c, follower, "viewer")?;
    let node = Https::new(c, follower, "node")?;

    // Health: alive and ready everywhere.
    for id in [leader, follower] {
        let h = Https::new(c, id, "viewer")?;
        let alive: Health = h.get("/healthz").await?.expect(200)?.json()?;
        ensure!(alive.status == "ok" && alive.id == id, "{alive:?}");
        let ready = eventually("ready", Duration::from_secs(10), || async {
            let a = h.get("/readyz").await?;
            (a.status == 200).then(|| a.json::<Health>()).transpose()
        })
        .await?;
        ensure!(ready.status == "ready" && ready.leader_id == Some(leader) && ready.reason.is_none(), "{ready:?}");
        ensure!(ready.term > 0 && ready.applied_index <= ready.last_log_index, "{ready:?}");
    }

    // The event stream, opened before anything happens.
    let mut stream = viewer.events(None).await?;
    let hello = stream.next(Duration::from_secs(5)).await?;
    ensure!(hello.event == "hello" && hello.id.is_some(), "{hello:?}");

    // Metrics before.
    let before = scrape(&op_leader).await?;
    let follower_before = scrape(&op).await?;

    // Roles: a node certificate cannot deploy; a viewer cannot either.
    let body = serde_json::json!({ "manifest": manifest("web"), "release": "v1" });
    node.call("POST", "/api/apps/web/deployments", Some(body.clone())).await?.error(403, "forbidden")?;
    viewer.call("POST", "/api/apps/web/deployments", Some(body)).await?.error(403, "forbidden")?;

    // Bad input names its field.
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("/api/apps/web/deployments", (serde_json::json!({ "release": "v1" })), "manifest"),
        ("/api/apps/web/deployments", (serde_json::json!({ "manifest": manifest("web"), "release": "no spaces" })), "release"),
        ("/api/apps/web/deployments", (serde_json::json!({ "manifest": manifest("web"), "relase": "v1" })), "relase"),
        ("/api/apps/web/deployments", (serde_json::json!({ "manifest": manifest("web"), "timeout_ms": "soon" })), "timeout_ms"),
        ("/api/apps/api/deployments", (serde_json::json!({ "manifest": manifest("web"), "release": "v1" })), "app"),
        (
            "/api/apps/web/deployments",
            (serde_json::json!({ "manifest": "app: web\ndestination: staging\nrun: [\"x\"]\nhealth: { http: /healthz, interval: often }\n", "release": "v1" })),
            "manifest.health.interval",
        ),
    ];
    for (path, body, field) in cases {
        let e = op.call("POST", path, Some(body.clone())).await?.error(400, "invalid_argument").with_context(|| format!("{body}"))?;
        ensure!(e.field.as_deref() == Some(field), "{body}: expected field {field}, got {e:?}");
    }
    // A deeply nested manifest is refused before it is parsed.
    let deep = format!("app: web\ndestination: staging\nrun: {}x{}\n", "[".repeat(5000), "]".repeat(5000));
    let e = op
        .call("POST", "/api/apps/web/deployments", Some(serde_json::json!({ "manifest": deep })))
        .await?
        .error(400, "invalid_argument")?;
    ensure!(e.field.as_deref() == Some("manifest"), "{e:?}");
    let e = op.get("/api/deployments?state=sleeping").await?.error(400, "invalid_argument")?;
    ensure!(e.field.as_deref() == Some("state"), "{e:?}");
    op.get("/api/deployments/d999999").await?.error(404, "not_found")?;
    op.get("/api/nothing").await?.error(404, "not_found")?;

    // A write sent to a follower succeeds (forwarded to the leader).
    let v1 = submit(&op, "web", "v1").await?;
    let d1 = wait_state(&op, &v1.id, DeployState::Succeeded).await?;
    ensure!(d1.submitted_by == "operator", "the actor is the HTTP caller, not the forwarding coordinator: {}", d1.submitted_by);

    // The event stream saw it run to the end; each deployment event is the full record.
    let seen = stream.until(Duration::from_secs(30), is_terminal_event(&v1.id)).await?;
    let states: Vec<DeployState> = seen.iter().filter_map(deployment_event).filter(|d| d.id == v1.id).map(|d| d.state).collect();
    ensure!(states.last() == Some(&DeployState::Succeeded), "{states:?}");
    ensure!(seen.iter().any(|e| e.event == "destination"), "no destination event while the lock moved: {seen:?}");

    // Reads.
    let list: DeploymentList = op.get("/api/deployments?app=web&state=succeeded").await?.expect(200)?.json()?;
    ensure!(list.deployments.iter().any(|d| d.id == v1.id) && list.applied_index > 0, "{list:?}");
    ensure!(list.deployments.iter().all(|d| d.state == DeployState::Succeeded && d.app == "web"), "filters ignored: {list:?}");
    let none: DeploymentList = op.get("/api/deployments?state=running").await?.expect(200)?.json()?;
    ensure!(none.deployments.is_empty(), "{none:?}");
    let one: DeploymentList = op.get("/api/deployments?destination=staging&limit=1").await?.expect(200)?.json()?;
    ensure!(one.deployments.len() == 1, "{one:?}");

    let dests: DestinationList = viewer.get("/api/destinations").await?.expect(200)?.json()?;
    let staging = dests.destinations.iter().find(|d| d.name == "staging").context("staging listed")?;
    ensure!(
        staging.current.get("web").map(String::as_str) == Some("v1") && staging.nodes == ["node-1"] && dests.applied_index > 0,
        "{dests:?}"
    );
    // Servers as the leader's sync task records them (it reports every few seconds).
    let servers = eventually("node-1 listed as a server running web v1", Duration::from_secs(30), || async {
        let list: ServerList = viewer.get("/api/destinations/staging/servers").await?.expect(200)?.json()?;
        ensure!(list.destination == "staging" && list.applied_index > 0, "{list:?}");
        let runs_v1 = list.servers.iter().any(|s| s.id == "node-1" && s.apps.get("web").and_then(|a| a.release.as_deref()) == Some("v1"));
        Ok(runs_v1.then_some(list))
    })
    .await?;
    ensure!(servers.servers.len() == 1, "{servers:?}");
    viewer.get("/api/destinations/prod/servers").await?.error(404, "not_found")?;
    let nodes: Vec<NodeView> = viewer.get("/api/nodes").await?.expect(200)?.json()?;
    ensure!(nodes.iter().any(|n| n.id == "node-1" && n.connected), "{nodes:?}");
    let locks: LockStatusView = viewer.get("/api/locks").await?.expect(200)?.json()?;
    ensure!(locks.locks.is_empty() && locks.applied_index > 0, "no deployment runs, so no lock: {locks:?}");
    let cluster: ClusterStatusView = viewer.get("/api/cluster").await?.expect(200)?.json()?;
    ensure!(cluster.leader_id == Some(leader) && cluster.members.len() == 3 && cluster.answered_by == leader, "{cluster:?}");

    // Cancel: hold the destination so a deployment waits, then cancel it.
    let lock = c.ctl(&["lock", "acquire", "staging", "-m", "http test"]).await?;
    lock.expect_code(0)?;
    let queued = submit(&op, "web", "v2").await?;
    ensure!(queued.state == DeployState::Queued, "{queued:?}");
    let locks: LockStatusView = viewer.get("/api/locks").await?.expect(200)?.json()?;
    ensure!(locks.locks.iter().any(|l| l.destination == "staging" && l.holder == "operator"), "{locks:?}");
    viewer.call("PUT", &format!("/api/deployments/{}/cancel", queued.id), None).await?.error(403, "forbidden")?;
    let e = op
        .call("PUT", &format!("/api/deployments/{}/cancel", queued.id), Some(serde_json::json!({ "reason": 7 })))
        .await?
        .error(400, "invalid_argument")?;
    ensure!(e.field.as_deref() == Some("reason"), "{e:?}");
    let cancelled: DeploymentAnswer = op
        .call("PUT", &format!("/api/deployments/{}/cancel", queued.id), Some(serde_json::json!({ "reason": "not today" })))
        .await?
        .expect(200)?
        .json()?;
    ensure!(cancelled.deployment.id == queued.id && cancelled.applied_index > 0, "{cancelled:?}");
    wait_state(&op, &queued.id, DeployState::Cancelled).await?;
    c.ctl(&["lock", "release", "staging"]).await?.expect_code(0)?;

    // Rollback of v2 to v1: deploy v2, roll it back, through the follower.
    let v2 = submit(&op, "web", "v2").await?;
    wait_state(&op, &v2.id, DeployState::Succeeded).await?;
    viewer.call("PUT", &format!("/api/deployments/{}/rollback", v2.id), None).await?.error(403, "forbidden")?;
    let rb = op.call("PUT", &format!("/api/deployments/{}/rollback", v2.id), None).await?;
    rb.expect(202)?;
    let rb: Accepted = rb.json()?;
    ensure!(rb.deployment.rollback_of.as_deref() == Some(v2.id.as_str()) && rb.deployment.release == "v1", "{rb:?}");
    wait_state(&op, &rb.id, DeployState::Succeeded).await?;

    // Metrics moved with the deployments.
    let after = scrape(&op_leader).await?;
    let succeeded = |m: &Metrics| m.value("fleet_deployments", &[("state", "succeeded")]);
    ensure!(succeeded(&after) >= succeeded(&before) + 3.0, "succeeded {} → {}", succeeded(&before), succeeded(&after));
    ensure!(after.value("fleet_deployments", &[("state", "cancelled")]) >= 1.0);
    let steps = |m: &Metrics| m.sum_of("fleet_step_seconds_count", &[("adapter", "process"), ("outcome", "ok")]);
    ensure!(steps(&after) > steps(&before), "step count {} → {}", steps(&before), steps(&after));
    ensure!(after.sum_of("fleet_raft_proposal_seconds_count", &[]) > before.sum_of("fleet_raft_proposal_seconds_count", &[]));
    // Each stage of a replicated write is timed where it ran: appended,
    // flushed and applied everywhere, replicated by the leader, appended
    // by the follower on the leader's call.
    let follower_after = scrape(&op).await?;
    let count = |m: &Metrics, stage: &str| m.value(&format!("fleet_raft_{stage}_seconds_count"), &[]);
    for stage in ["log_flush", "replicate", "apply"] {
        ensure!(count(&after, stage) > count(&before, stage), "leader's {stage}: {} → {}", count(&before, stage), count(&after, stage));
    }
    for stage in ["log_flush", "follower_append", "apply"] {
        ensure!(
            count(&follower_after, stage) > count(&follower_before, stage),
            "follower's {stage}: {} → {}",
            count(&follower_before, stage),
            count(&follower_after, stage)
        );
    }
    ensure!(count(&follower_after, "replicate") == count(&follower_before, "replicate"), "a follower replicates nothing");
    // `fleetctl lock acquire` above went over gRPC to the leader: its
    // Control calls are timed by method.
    let calls = |m: &Metrics, method: &str| m.sum_of("fleet_control_call_seconds_count", &[("method", method)]);
    ensure!(
        calls(&after, "AcquireLock") > calls(&before, "AcquireLock"),
        "AcquireLock calls {} → {}",
        calls(&before, "AcquireLock"),
        calls(&after, "AcquireLock")
    );
    ensure!(after.value("fleet_raft_term", &[]) >= 1.0 && after.value("fleet_raft_is_leader", &[]) == 1.0);
    ensure!(after.value("fleet_raft_applied_index", &[]) > before.value("fleet_raft_applied_index", &[]));
    ensure!(after.value("fleet_nodes_connected", &[]) == 1.0, "one node is connected to the leader");
    ensure!(after.value("fleet_queue_length", &[("destination", "staging")]) == 0.0);
    node.get("/metrics").await?.error(403, "forbidden")?;

    // The node's own metrics (`fleet-node --metrics-addr`) moved too.
    let node_after = node_scrape(f).await?;
    let ran = |m: &Metrics| m.sum_of("fleet_node_steps_total", &[("adapter", "process"), ("outcome", "ok"), ("direction", "run")]);
    ensure!(ran(&node_after) > ran(&node_before), "node steps {} → {}", ran(&node_before), ran(&node_after));
    let timed = |m: &Metrics| m.sum_of("fleet_node_step_seconds_count", &[("adapter", "process")]);
    ensure!(timed(&node_after) > timed(&node_before));
    ensure!(node_after.value("fleet_node_leader_connected", &[]) == 1.0, "node-1 is connected to the leader");
    ensure!(node_after.value("fleet_node_steps_running", &[]) == 0.0);
    Ok(())
}

/// node-1's `/metrics`, parsed as Prometheus text.
async fn node_scrape(f: &Fleet) -> anyhow::Result<Metrics> {
    let node = f.nodes.first().context("a node")?;
    let addr = eventually("node-1 to serve its metrics", Duration::from_secs(10), || async { Ok(node.metrics_addr()) }).await?;
    let body = fleet_tests::harness::http_get_path(&addr.to_string(), "/metrics", Duration::from_secs(5)).await?;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).context("parsing the node's /metrics")?;
    ensure!(scrape.samples.iter().any(|s| s.metric == "fleet_node_leader_connected"), "no fleet_node_leader_connected in:\n{body}");
    Ok(Metrics(scrape))
}

/// A Prometheus scrape, parsed with a Prometheus text parser.
struct Metrics(prometheus_parse::Scrape);

impl Metrics {
    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = f64> + 'a {
        self.0.samples.iter().filter(move |s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).map(|s| match s
            .value
        {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
    }

    /// The one sample `name{labels}` (0 when absent).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).next().unwrap_or(0.0)
    }

    /// The sum over samples matching `labels`.
    fn sum_of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).sum()
    }
}

async fn scrape(h: &Https) -> anyhow::Result<Metrics> {
    let a = h.get("/metrics").await?;
    a.expect(200)?;
    ensure!(a.content_type.contains("openmetrics-text") || a.content_type.contains("text/plain"), "content type {}", a.content_type);
    let lines = a.body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).context("parsing /metrics as Prometheus text")?;
    ensure!(!scrape.samples.is_empty(), "no samples in {}", a.body);
    for name in [
        "fleet_raft_term",
        "fleet_raft_commit_index",
        "fleet_raft_applied_index",
        "fleet_raft_leader_changes_total",
        "fleet_nodes_connected",
    ] {
        ensure!(scrape.samples.iter().any(|s| s.metric == name), "/metrics has no {name}:\n{}", a.body);
    }
    let m = Metrics(scrape);
    // Memory, for whoever wonders at 3 a.m. where it went: the process's
    // RSS, and RocksDB's parts of it (a memtable is never empty: its arena).
    ensure!(m.sum_of("fleet_process_resident_bytes", &[]) > (1 << 20) as f64, "no resident memory reported:\n{}", a.body);
    for part in ["memtables", "block_cache", "table_readers"] {
        ensure!(m.matching("fleet_rocksdb_memory_bytes", &[("part", part)]).count() == 1, "/metrics has no RocksDB {part}:\n{}", a.body);
    }
    ensure!(m.sum_of("fleet_rocksdb_memory_bytes", &[("part", "memtables")]) > 0.0, "RocksDB memtables at 0:\n{}", a.body);
    Ok(m)
}

/// Events resumed with `Last-Event-ID` lose nothing: every record the
/// unbroken stream changed after that id comes again, each as it is now
/// (a deployment is rendered when sent, so a record changed several times
/// while the client was away comes once, at its newest), ending where the
/// unbroken stream ends.
#[tokio::test(flavor = "multi_thread")]
async fn events_resume_after_reconnect_without_loss() {
    let f = Fleet::start(&[("node-1", &[("env", "staging")])], STAGING).await.expect("cluster with a node");
    let r = resume(&f).await;
    f.finish(r);
}

/// A record an event names: (event, deployment id or destination name).
fn named(e: &Sse) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(&e.data).ok()?;
    let field = if e.event == "deployment" { "id" } else { "name" };
    let key = v.get(field).and_then(|x| x.as_str())?;
    Some((e.event.clone(), key.to_string()))
}

async fn resume(f: &Fleet) -> anyhow::Result<()> {
    let c = &f.cluster;
    let (_, follower) = leader_and_follower(c).await?;
    let viewer = Https::new(c, follower, "viewer")?;
    let op = Https::new(c, follower, "operator")?;
    let mut whole = viewer.events(None).await?;
    let start = whole.next(Duration::from_secs(5)).await?.id.context("hello has an id")?;

    // A client that drops after the first deployment event reconnects later.
    let mut first = viewer.events(Some(start)).await?;
    let d = submit(&op, "web", "v1").await?;
    let before_drop = first.until(Duration::from_secs(30), |e| deployment_event(e).is_some_and(|x| x.id == d.id)).await?;
    let resume_from = before_drop.last().and_then(|e| e.last_id).context("an id to resume from")?;
    drop(first);

    let reference = whole.until(Duration::from_secs(60), is_terminal_event(&d.id)).await?;
    let mut resumed = viewer.events(Some(resume_from)).await?;
    let replay = resumed.until(Duration::from_secs(30), is_terminal_event(&d.id)).await?;

    // What the unbroken stream had after `resume_from` (a batch partly seen is sent again).
    let tail: Vec<&Sse> = {
        // `start` (the hello's id) was read before `reference` began.
        let from = if resume_from == start {
            0
        } else {
            reference.iter().position(|e| e.id == Some(resume_from)).context("the resume id is on the unbroken stream")? + 1
        };
        reference[from..].iter().collect()
    };
    ensure!(!tail.is_empty(), "nothing happened after {resume_from}");
    // Only what followed the id, in the order of the log.
    let ids: Vec<u64> = replay.iter().filter_map(|e| e.id).collect();
    ensure!(ids.iter().all(|i| *i > resume_from), "the resumed stream repeats batches up to {resume_from}: {ids:?}");
    ensure!(ids.windows(2).all(|w| w[0] < w[1]), "the resumed stream's ids do not grow: {ids:?}");
    // Nothing lost: every record the unbroken stream changed comes again.
    let replayed: std::collections::BTreeSet<(String, String)> = replay.iter().filter_map(named).collect();
    for e in &tail {
        let Some(n) = named(e) else { continue };
        ensure!(
            replayed.contains(&n),
            "{n:?} changed after id {resume_from} but the resumed stream never sent it:\nresumed: {replay:#?}\nunbroken: {tail:#?}"
        );
    }
    // And it ends where the unbroken stream ends: the same record.
    let last = deployment_event(replay.last().context("events")?).context("a deployment")?;
    let reference_last = deployment_event(tail.last().context("events")?).context("a deployment")?;
    ensure!(last.state == DeployState::Succeeded, "{last:?}");
    ensure!(last == reference_last, "the resumed stream ends on {last:?}, the unbroken one on {reference_last:?}");

    // From id 0 (this coordinator started with the cluster): everything again, in order.
    let mut again = viewer.events(Some(0)).await?;
    let first = again.next(Duration::from_secs(5)).await?;
    ensure!(first.event != "reset", "the journal holds everything since index 0: {first:?}");
    let bad = viewer.send("GET", "/api/events", None, &[("last-event-id", "yesterday".into())]).await?;
    ensure!(bad.status() == 400, "a bad Last-Event-ID answered {}", bad.status());
    Ok(())
}

/// `--log-format json`: every line a coordinator writes is one JSON object.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line() {
    let mut args: Vec<&str> = FAST_RAFT.to_vec();
    args.extend(["--log-format", "json"]);
    let f = Fleet::start_with(&args, &[("node-1", &[("env", "staging")])], STAGING).await.expect("cluster with a node");
    let r = json_logs(&f).await;
    f.finish(r);
}

async fn json_logs(f: &Fleet) -> anyhow::Result<()> {
    let c = &f.cluster;
    let (leader, _) = leader_and_follower(c).await?;
    let op = Https::new(c, leader, "operator")?;
    let d = submit(&op, "web", "v1").await?;
    wait_state(&op, &d.id, DeployState::Succeeded).await?;
    let mut with_deployment = 0;
    for id in c.coords.keys() {
        let path = c.path().join(format!("coord-{id}.log"));
        let text = std::fs::read_to_string(&path)?;
        ensure!(!text.trim().is_empty(), "{} is empty", path.display());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON: {line}", path.display()))?;
            let obj = v.as_object().with_context(|| format!("not an object: {line}"))?;
            ensure!(obj.contains_key("timestamp") && obj.contains_key("level") && obj.contains_key("fields"), "{line}");
            if obj["fields"].get("deployment").and_then(|x| x.as_str()) == Some(d.id.as_str()) {
                with_deployment += 1;
            }
        }
    }
    ensure!(with_deployment > 0, "no coordinator log line names deployment {} as a field", d.id);
    Ok(())
}

/// A value in `secret_env` reaches the instance and nothing else: not the
/// coordinators' or the node's logs, not `fleetctl deploy/watch/status/list`
/// (gRPC), not the HTTP API's answers, not the event stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_reaches_the_instance_and_no_output() {
    let f = Fleet::start(&[("node-1", &[("env", "staging")])], STAGING).await.expect("cluster with a node");
    let r = secret(&f).await;
    f.finish(r);
}

async fn secret(f: &Fleet) -> anyhow::Result<()> {
    let c = &f.cluster;
    let value = format!("s3cr3t-{:016x}", rand::random::<u64>());
    let m = c.write_file("web.yaml", &format!("{}env: {{ PLAIN: shown }}\nsecret_env: {{ API_TOKEN: \"{value}\" }}\n", manifest("web")))?;
    let leader = c.leader_id().await?;
    let op = Https::new(c, leader, "operator")?;
    let mut events = op.events(None).await?;
    let deployed = c.deploy(&m, &["--release", "v1"]).await?;
    deployed.expect_code(0)?;
    let id = deployed.id()?;

    // The instance got it.
    let d = c.deployment(&id).await?;
    let start = d.steps.iter().find(|s| fleet_tests::values::kind(s) == "start_instance").context("a start step")?;
    let pid = fleet_tests::values::output::<fleet_tests::json::StartOutput>(start)?.pid;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).with_context(|| format!("reading the environment of instance {pid}"))?;
    let environ = String::from_utf8_lossy(&environ);
    ensure!(environ.split('\0').any(|kv| kv == format!("API_TOKEN={value}")), "the instance has API_TOKEN={value}");
    ensure!(environ.split('\0').any(|kv| kv == "PLAIN=shown"));
    ensure!(
        d.spec.secret_env.get("API_TOKEN").map(String::as_str) == Some("(secret)"),
        "status shows the key, masked: {:?}",
        d.spec.secret_env
    );

    // Nothing a client, a log or an event shows has it.
    let mut outputs: Vec<(String, String)> = vec![("fleetctl deploy".into(), deployed.text())];
    for args in [
        vec!["status", id.as_str(), "-o", "json"],
        vec!["list", "-o", "json"],
        vec!["history", "-o", "json"],
        vec!["watch", id.as_str(), "-o", "json"],
    ] {
        let run = c.ctl(&args).await?;
        outputs.push((format!("fleetctl {}", args.join(" ")), run.text()));
    }
    for path in [format!("/api/deployments/{id}"), "/api/deployments".to_string()] {
        let a = op.get(&path).await?;
        a.expect(200)?;
        ensure!(a.body.contains("API_TOKEN"), "{path} lists the secret's name: {}", a.body);
        outputs.push((format!("GET {path}"), a.body));
    }
    let mut seen = String::new();
    loop {
        let e = events.next(Duration::from_secs(10)).await?;
        seen.push_str(&e.data);
        if is_terminal_event(&id)(&e) {
            break;
        }
    }
    outputs.push(("GET /api/events".into(), seen));
    for id in c.coords.keys() {
        outputs.push((format!("coordinator {id}'s log"), std::fs::read_to_string(c.coords[id].spec.log_file())?));
    }
    for n in &f.nodes {
        outputs.push((format!("{}'s log", n.name), std::fs::read_to_string(&n.log_file)?));
    }
    for (what, text) in &outputs {
        let leaks: Vec<&str> = text
            .match_indices(&value)
            .map(|(i, _)| &text[text.floor_char_boundary(i.saturating_sub(300))..text.ceil_char_boundary((i + 60).min(text.len()))])
            .collect();
        ensure!(leaks.is_empty(), "{what} shows the secret value: {leaks:?}");
    }
    ensure!(outputs.iter().any(|(_, t)| t.contains("(secret)")), "no output shows the masked value");
    Ok(())
}

// ------------------------------------------------------- tokens and audit

/// What `fleetctl tokens create NAME --role ROLE -o json` prints.
#[derive(Debug, Deserialize)]
struct TokenCreated {
    name: String,
    role: String,
    token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhoAmI {
    name: String,
    role: String,
    via: String,
    from: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditRecord {
    index: u64,
    at_ms: i64,
    actor: String,
    via: String,
    from: String,
    action: String,
    target: String,
    outcome: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditList {
    applied_index: u64,
    records: Vec<AuditRecord>,
    #[serde(default)]
    next_before: Option<u64>,
}

async fn make_token(c: &Cluster, name: &str, role: &str, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["tokens", "create", name, "--role", role, "-o", "json"];
    args.extend_from_slice(extra);
    let run = c.ctl(&args).await?;
    run.expect_code(0)?;
    let t: TokenCreated = run.json()?;
    ensure!(t.name == name && t.role == role && t.token.starts_with("fleet_"), "{t:?}");
    Ok(t.token)
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_roles_revocation_and_the_audit_log() {
    let f = Fleet::start(&[("node-1", &[("env", "staging")])], STAGING).await.expect("cluster with a node");
    let r = tokens_and_audit(&f).await;
    f.finish(r);
}

async fn tokens_and_audit(f: &Fleet) -> anyhow::Result<()> {
    let c = &f.cluster;
    let (leader, follower) = leader_and_follower(c).await?;

    // Neither a certificate nor a token: 401, saying how to get one.
    let anonymous = Https::with_token(c, follower, None)?;
    let e = anonymous.get("/api/deployments").await?.error(401, "unauthenticated")?;
    ensure!(e.message.contains("fleetctl tokens create"), "{e:?}");
    Https::with_token(c, follower, Some("fleet_0123456789abcdef0123456789abcdef"))?
        .get("/api/whoami")
        .await?
        .error(401, "unauthenticated")?;
    Https::with_token(c, follower, Some("not-a-token"))?.get("/api/whoami").await?.error(401, "unauthenticated")?;

    let ops = make_token(c, "ops", "operator", &[]).await?;
    let look = make_token(c, "look", "viewer", &[]).await?;
    // A token's secret is never stored or shown again.
    let listed = c.ctl(&["tokens", "list", "-o", "json"]).await?;
    listed.expect_code(0)?;
    ensure!(!listed.stdout.contains(&ops) && !listed.stdout.contains(&look), "tokens list shows a secret");
    let names: Vec<String> =
        listed.json::<Vec<serde_json::Value>>()?.iter().filter_map(|t| t["name"].as_str().map(str::to_string)).collect();
    ensure!(names == ["look", "ops"], "{names:?}");
    ensure!(!listed.stdout.contains("sha256"), "tokens list shows the hash: {}", listed.stdout);
    // Two of the same name are refused.
    c.ctl(&["tokens", "create", "ops", "--role", "viewer"]).await?.expect_code(7)?;

    // whoami, on a follower (the token was made on the leader).
    let viewer = Https::with_token(c, follower, Some(&look))?;
    let me: WhoAmI = viewer.get("/api/whoami").await?.expect(200)?.json()?;
    ensure!(me.name == "token:look" && me.role == "viewer" && me.via == "token" && me.from.starts_with("127.0.0.1:"), "{me:?}");
    let cert: WhoAmI = Https::new(c, follower, "operator")?.get("/api/whoami").await?.expect(200)?.json()?;
    ensure!(cert.name == "operator" && cert.role == "operator" && cert.via == "certificate", "{cert:?}");

    // A viewer token reads but cannot deploy, cancel or promote.
    viewer.get("/api/destinations").await?.expect(200)?;
    let body = serde_json::json!({ "manifest": manifest("web"), "release": "v1" });
    let e = viewer.call("POST", "/api/apps/web/deployments", Some(body.clone())).await?.error(403, "forbidden")?;
    ensure!(e.message.contains("token"), "the refusal should speak of tokens: {e:?}");

    // An operator token deploys through a follower (forwarded to the leader).
    let op = Https::with_token(c, follower, Some(&ops))?;
    let v1 = submit(&op, "web", "v1").await?;
    let d1 = wait_state(&op, &v1.id, DeployState::Succeeded).await?;
    ensure!(d1.submitted_by == "token:ops", "submitted by {}", d1.submitted_by);
    viewer.call("PUT", &format!("/api/deployments/{}/cancel", v1.id), Some(serde_json::json!({}))).await?.error(403, "forbidden")?;
    viewer.call("PUT", &format!("/api/deployments/{}/promote", v1.id), None).await?.error(403, "forbidden")?;
    // Promote is for a paused canary: a succeeded deployment is refused, naming why.
    let e = op.call("PUT", &format!("/api/deployments/{}/promote", v1.id), None).await?;
    ensure!(e.status == 409 || e.status == 400, "promoting a succeeded deployment answered {}: {}", e.status, e.body);

    // Pages: newest first, `next_before` leads to the older ones.
    let v2 = submit(&op, "web", "v2").await?;
    wait_state(&op, &v2.id, DeployState::Succeeded).await?;
    let page1: DeploymentList = viewer.get("/api/deployments?limit=1").await?.expect(200)?.json()?;
    ensure!(page1.deployments.iter().map(|d| d.id.as_str()).collect::<Vec<_>>() == [v2.id.as_str()], "{page1:?}");
    let next = page1.next_before.clone().context("a first page of one of two has a next page")?;
    ensure!(next == v2.id, "next_before {next}");
    let page2: DeploymentList = viewer.get(&format!("/api/deployments?limit=1&before={next}")).await?.expect(200)?.json()?;
    ensure!(page2.deployments.iter().map(|d| d.id.as_str()).collect::<Vec<_>>() == [v1.id.as_str()], "{page2:?}");
    ensure!(page2.next_before.is_none(), "the last page has no next: {page2:?}");
    let e = viewer.get("/api/deployments?before=yesterday").await?.error(400, "invalid_argument")?;
    ensure!(e.field.as_deref() == Some("before"), "{e:?}");

    // The audit log: who (certificate or token), how, from where, what, outcome.
    let audit: AuditList = viewer.get("/api/audit?limit=100").await?.expect(200)?.json()?;
    ensure!(audit.applied_index > 0 && audit.records.windows(2).all(|w| w[0].index > w[1].index), "newest first: {audit:?}");
    let find = |action: &str, target: &str| audit.records.iter().find(|r| r.action == action && r.target.starts_with(target));
    let deploy = find("deploy", "web").context("the HTTP deploy is audited")?;
    ensure!(deploy.actor == "token:ops" && deploy.via == "token" && deploy.from.starts_with("127.0.0.1:"), "{deploy:?}");
    ensure!(deploy.outcome.starts_with(&v2.id) && deploy.at_ms > 0, "{deploy:?}");
    let made = find("tokens.create", "ops").context("making a token is audited")?;
    ensure!(made.actor == "operator" && made.via == "certificate" && made.from.starts_with("127.0.0.1:"), "{made:?}");
    let refused = audit.records.iter().filter(|r| r.action == "tokens.create" && r.outcome.starts_with("rejected")).count();
    ensure!(refused == 1, "the refused duplicate is audited once with its outcome: {audit:?}");
    ensure!(
        !audit.records.iter().any(|r| r.action == "step_result" || r.action == "node.register"),
        "the system's own entries are not operator actions"
    );
    // Paged, and the same through fleetctl.
    let first: AuditList = viewer.get("/api/audit?limit=1").await?.expect(200)?.json()?;
    let before = first.next_before.context("more than one record")?;
    let second: AuditList = viewer.get(&format!("/api/audit?limit=1&before={before}")).await?.expect(200)?.json()?;
    ensure!(second.records.first().map(|r| r.index) == audit.records.get(1).map(|r| r.index), "{first:?} then {second:?}");
    let cli = c.ctl(&["history", "--audit", "-o", "json"]).await?;
    cli.expect_code(0)?;
    let cli: Vec<serde_json::Value> = cli.json()?;
    ensure!(
        cli.iter().any(|r| r["actor"] == "token:ops" && r["action"] == "deploy" && r["index"] == deploy.index),
        "fleetctl history --audit lacks the deploy: {cli:?}"
    );

    // Revoked: refused by the leader at once, by every follower once applied.
    let before_revoke = op.get("/api/whoami").await?.expect(200)?.json::<WhoAmI>()?;
    ensure!(before_revoke.name == "token:ops");
    c.ctl(&["tokens", "revoke", "ops"]).await?.expect_code(0)?;
    let e = Https::with_token(c, leader, Some(&ops))?.get("/api/whoami").await?.error(401, "unauthenticated")?;
    ensure!(e.message.contains("revoked"), "{e:?}");
    for id in c.coords.keys().copied() {
        let h = Https::with_token(c, id, Some(&ops))?;
        eventually(&format!("coordinator {id} refuses the revoked token"), Duration::from_secs(10), || async {
            Ok((h.get("/api/whoami").await?.status == 401).then_some(()))
        })
        .await?;
    }
    // The viewer's token still works; revoking an unknown token is refused.
    viewer.get("/api/whoami").await?.expect(200)?;
    c.ctl(&["tokens", "revoke", "ops"]).await?.expect_code(2)?;

    // An expiring token stops working by itself.
    let brief = make_token(c, "brief", "viewer", &["--expires", "2s"]).await?;
    let h = Https::with_token(c, leader, Some(&brief))?;
    h.get("/api/whoami").await?.expect(200)?;
    let e = eventually("the brief token expires", Duration::from_secs(15), || async {
        let a = h.get("/api/whoami").await?;
        (a.status == 401).then(|| a.json::<ApiError>()).transpose()
    })
    .await?;
    ensure!(e.message.contains("expired"), "{e:?}");
    Ok(())
}

// ------------------------------------------------- the OpenAPI document

/// schemathesis, as `cargo xtask test` installs it (a virtualenv under the
/// cargo target dir), or `FLEET_SCHEMATHESIS`.
fn schemathesis() -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("FLEET_SCHEMATHESIS") {
        return Ok(p.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    let p = target.join("tools").join("venv").join("bin").join("schemathesis");
    ensure!(p.is_file(), "{} is missing: `cargo xtask test` installs schemathesis there (or set FLEET_SCHEMATHESIS)", p.display());
    Ok(p)
}

/// The running API against the OpenAPI document it serves, by schemathesis
/// (property-based: examples, boundary values and random inputs for every
/// operation, valid and invalid), with an operator token. Every answer must
/// have a documented status and content type and match its schema, and no
/// input may cause a server error.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_conforms_to_its_openapi_document() {
    let f = Fleet::start(&[("node-1", &[("env", "staging")])], STAGING).await.expect("cluster with a node");
    let r = conformance(&f).await;
    f.finish(r);
}

async fn conformance(f: &Fleet) -> anyhow::Result<()> {
    let c = &f.cluster;
    let tool = schemathesis()?;
    let (_, follower) = leader_and_follower(c).await?;
    let token = make_token(c, "schemathesis", "operator", &[]).await?;
    let op = Https::with_token(c, follower, Some(&token))?;
    // Something to read: one deployment that succeeded.
    let v1 = submit(&op, "web", "v1").await?;
    wait_state(&op, &v1.id, DeployState::Succeeded).await?;

    let doc: serde_json::Value = op.get("/api/openapi.json").await?.expect(200)?.json()?;
    ensure!(doc["openapi"] == "3.1.0", "{}", doc["openapi"]);
    ensure!(doc["paths"]["/api/apps/{app}/deployments"]["post"].is_object(), "the submit operation is missing");

    let addr = c.http_addr(follower)?;
    let report = c.path().join("schemathesis");
    let out = tokio::process::Command::new(&tool)
        .args(["run", &format!("https://{addr}/api/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .arg("--tls-verify")
        .arg(c.path().join("certs").join("ca.pem"))
        // The event stream never ends by design (tests above cover it).
        .args(["--exclude-path", "/api/events"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
        ])
        .args(["--max-examples", "25", "--seed", "1", "--workers", "1", "--request-timeout", "20", "--no-color"])
        .args(["--generation-database", "none"])
        .arg("--report-dir")
        .arg(&report)
        .args(["--report", "junit"])
        .env("SCHEMATHESIS_HOOKS", "")
        // Its cache goes in the working directory: the test's own.
        .current_dir(c.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), out).await.context("schemathesis ran over 10 minutes")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "schemathesis found answers that do not match the document ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // It really tested: every operation, many cases.
    ensure!(stdout.contains("passed") && !stdout.contains("0 passed"), "{stdout}");
    println!("{stdout}");
    Ok(())
}
