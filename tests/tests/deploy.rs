//! End-to-end deployments: real `fleet-coord` (3), `fleet-node` and
//! `fleet-demo-app` processes on 127.0.0.1, driven through the real
//! `fleetctl` binary, checked through its JSON output, the nodes' witness
//! files, the demo app's HTTP answers and `/proc`.
//!
//! Build the binaries first:
//! `cargo build -p fleet-coord -p fleetctl -p fleet-node -p fleet-demo-app`
//! (or run everything with `cargo xtask test`). `FLEET_KEEP_TEST_DIR=1`
//! keeps the logs, data dirs and witness files of a run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_tests::checks::{assert_witness_safe, WitnessLine};
use fleet_tests::harness::{eventually, http_get, http_get_path, pid_alive, pid_exists, port_refused, release_of, CtlRun, Fleet};
use fleet_tests::json::{DestinationRecord, HistoryEntry, Line, LockStatusView, StartOutput, StepEventStatus, SwitchOutput, WatchEvent};
use fleet_tests::values::{event_at, kind, output, show, status, steps, transitions};

// ------------------------------------------------------------------ helpers

/// A quick, honest health check of the demo app.
const HEALTH: &str = "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 2, deadline: 10s }";

const STAGING: &str = "destinations:\n  - name: staging\n    selector: { env: staging }\n";

fn two_staging_nodes() -> Vec<(&'static str, &'static [(&'static str, &'static str)])> {
    vec![("node-1", &[("env", "staging")]), ("node-2", &[("env", "staging")])]
}

/// `fleet.yaml` for the demo app; the release comes from `--release`.
fn manifest(app: &str, destination: &str, health: &str, extra: &str) -> String {
    format!("app: {app}\ndestination: {destination}\nrun: [\"fleet-demo-app\"]\nhealth: {health}\n{extra}")
}

fn write_manifest(f: &Fleet, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    f.cluster.write_file(name, text)
}

/// Deploy and require exit code `want`; returns the run.
async fn deploy(f: &Fleet, m: &std::path::Path, args: &[&str], want: i32) -> anyhow::Result<CtlRun> {
    let run = f.cluster.deploy(m, args).await?;
    run.expect_code(want)?;
    let result = run.result()?;
    ensure!(result.exit_code == want, "the result line's exit_code disagrees with the exit status: {run}");
    ensure!(result.state == result.deployment.state, "result state vs deployment state: {run}");
    Ok(run)
}

fn step_index(d: &Deployment, kind_: &str, node: &str) -> anyhow::Result<usize> {
    steps(d).iter().position(|s| kind(s) == kind_ && s.plan.node == node).with_context(|| format!("no {kind_} step on {node} in {}", d.id))
}

/// (pid, port) of the instance a deployment started on `node`.
fn instance(d: &Deployment, node: &str) -> anyhow::Result<(u32, u16)> {
    let s = &steps(d)[step_index(d, "start_instance", node)?];
    let out: StartOutput = output(s)?;
    ensure!(out.release == d.release, "start output names release {} for {}", out.release, d.release);
    Ok((out.pid, out.port))
}

/// The stable route address of the app on `node`.
fn route(d: &Deployment, node: &str) -> anyhow::Result<String> {
    let s = &steps(d)[step_index(d, "switch_route", node)?];
    Ok(output::<SwitchOutput>(s)?.route)
}

/// `d42` → 42.
fn number(id: &str) -> u64 {
    id.trim_start_matches('d').parse().unwrap_or_else(|_| panic!("deployment id `{id}` is not d<N>"))
}

/// [first step start, last step end] of a deployment, from its step times.
fn span(d: &Deployment) -> anyhow::Result<(i64, i64)> {
    let mut lo = i64::MAX;
    let mut hi = i64::MIN;
    for s in steps(d) {
        for t in [s.started_ms, s.finished_ms, s.undo_started_ms, s.undo_finished_ms].into_iter().flatten() {
            lo = lo.min(t);
            hi = hi.max(t);
        }
    }
    ensure!(lo <= hi, "{} has no step times", d.id);
    Ok((lo, hi))
}

fn overlap(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0.max(b.0) < a.1.min(b.1)
}

/// Each node runs exactly these instance pids (and nothing else it started).
fn assert_only_processes(f: &Fleet, want: &[(&str, u32)]) -> anyhow::Result<()> {
    for n in &f.nodes {
        let expected: BTreeSet<u32> = want.iter().filter(|(node, _)| *node == n.name).map(|(_, p)| *p).collect();
        let running = n.processes();
        let pids: BTreeSet<u32> = running.iter().map(|(p, _)| *p).collect();
        ensure!(pids == expected, "node {} should run exactly {expected:?}; it runs {running:?}", n.name);
    }
    Ok(())
}

/// Wait until no process started by the nodes is left but these.
async fn eventually_only_processes(f: &Fleet, want: &[(&str, u32)]) -> anyhow::Result<()> {
    eventually("the nodes to run only the expected processes", Duration::from_secs(10), || async {
        assert_only_processes(f, want).map(Some)
    })
    .await
}

async fn assert_instance_gone(pid: u32, port: u16) -> anyhow::Result<()> {
    eventually(&format!("pid {pid} to be gone"), Duration::from_secs(5), || async { Ok((!pid_exists(pid)).then_some(())) }).await?;
    ensure!(port_refused(port).await, "port {port} of a stopped instance still accepts connections");
    Ok(())
}

async fn assert_release(addr: &str, want: &str) -> anyhow::Result<()> {
    let body = http_get(addr).await?;
    ensure!(release_of(&body).as_deref() == Some(want), "{addr} answered {body:?}, expected release {want}");
    Ok(())
}

// --------------------------------------------------------------- 1. switch

#[derive(Default, Debug)]
struct Hammered {
    ok: usize,
    failures: Vec<String>,
    /// Releases in the order they answered, consecutive repeats collapsed.
    sequence: Vec<String>,
    per_release: BTreeMap<String, usize>,
}

/// Request `GET /` over a new connection each time until `stop`.
fn hammer(addr: String, stop: Arc<AtomicBool>, stats: Arc<Mutex<Hammered>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let r = http_get_path(&addr, "/", Duration::from_secs(3)).await;
            let mut s = stats.lock().unwrap();
            match r.map(|b| release_of(&b).ok_or(b)) {
                Ok(Ok(release)) => {
                    s.ok += 1;
                    *s.per_release.entry(release.clone()).or_default() += 1;
                    if s.sequence.last() != Some(&release) {
                        s.sequence.push(release);
                    }
                }
                Ok(Err(body)) => s.failures.push(format!("unexpected body {body:?}")),
                Err(e) => s.failures.push(format!("{e:#}")),
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn blue_green_switch_loses_no_request() {
    let f = Fleet::start(&two_staging_nodes(), STAGING).await.expect("cluster with nodes");
    let r = blue_green(&f).await;
    f.finish(r);
}

async fn blue_green(f: &Fleet) -> anyhow::Result<()> {
    let m = write_manifest(f, "web.yaml", &manifest("web", "staging", HEALTH, ""))?;
    let run1 = deploy(f, &m, &["--release", "v1"], 0).await?;
    let d1 = run1.deployment()?;
    ensure!(d1.state == DeployState::Succeeded && d1.release == "v1", "{run1}");
    let nodes = ["node-1", "node-2"];
    let mut routes = vec![];
    for n in nodes {
        let r = route(&d1, n)?;
        assert_release(&r, "v1").await?;
        routes.push(r);
    }
    ensure!(routes[0] != routes[1], "each node has its own route: {routes:?}");

    // Hammer both routes while v2 rolls out.
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Vec<Arc<Mutex<Hammered>>> = routes.iter().map(|_| Arc::default()).collect();
    let tasks: Vec<_> = routes.iter().zip(&stats).map(|(r, s)| hammer(r.clone(), stop.clone(), s.clone())).collect();
    eventually("the clients to get answers from v1", Duration::from_secs(10), || async {
        Ok(stats.iter().all(|s| s.lock().unwrap().per_release.get("v1").copied().unwrap_or(0) >= 5).then_some(()))
    })
    .await?;
    let run2 = deploy(f, &m, &["--release", "v2"], 0).await;
    // Keep going a little after the deployment ended: new connections must
    // find v2, and nothing may fail once v1 is stopped.
    let after: Vec<usize> = stats.iter().map(|s| s.lock().unwrap().ok).collect();
    let more = eventually("more answers after the deployment", Duration::from_secs(10), || async {
        Ok(stats.iter().zip(&after).all(|(s, a)| s.lock().unwrap().ok >= a + 20).then_some(()))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let run2 = run2?;
    more?;
    let d2 = run2.deployment()?;
    ensure!(d2.state == DeployState::Succeeded && d2.previous_release.as_deref() == Some("v1"), "{run2}");

    for ((n, r), s) in nodes.iter().zip(&routes).zip(&stats) {
        let s = std::mem::take(&mut *s.lock().unwrap());
        eprintln!("route {r} on {n}: {} answers {:?}, {} failures", s.ok, s.per_release, s.failures.len());
        ensure!(
            s.failures.is_empty(),
            "{} of {} requests to {r} ({n}) failed during the switch; first: {:?}",
            s.failures.len(),
            s.ok + s.failures.len(),
            &s.failures[..s.failures.len().min(5)]
        );
        ensure!(s.ok >= 50, "only {} requests reached {r}; the test proves little", s.ok);
        ensure!(s.sequence == ["v1", "v2"], "{r} answered {:?}: expected v1 then only v2", s.sequence);
        ensure!(route(&d2, n)? == *r, "the route of {n} moved: {} -> {}", r, route(&d2, n)?);
        assert_release(r, "v2").await?;
    }

    // No v1 process remains; v2 runs, and nothing else.
    let mut live = vec![];
    for n in nodes {
        let (old_pid, old_port) = instance(&d1, n)?;
        let (new_pid, new_port) = instance(&d2, n)?;
        ensure!(old_port != new_port, "v2 started on v1's port {old_port} on {n}");
        assert_instance_gone(old_pid, old_port).await?;
        ensure!(pid_alive(new_pid), "v2's pid {new_pid} on {n} is not running");
        live.push((n, new_pid));
    }
    assert_only_processes(f, &live)?;
    assert_witness_safe(&f.witness()?, &[&d1, &d2])?;

    // The destination shows v2 as current, and is free again.
    let dests = f.cluster.ctl(&["destinations", "-o", "json"]).await?;
    dests.expect_code(0)?;
    let list: Vec<DestinationRecord> = dests.json()?;
    let staging = list.iter().find(|d| d.name == "staging").with_context(|| format!("no staging in {dests}"))?;
    ensure!(staging.current.get("web").map(String::as_str) == Some("v2"), "staging's current release of web: {staging:?}");
    ensure!(staging.lock_holder.is_none(), "staging is still locked: {staging:?}");
    ensure!(staging.queued.is_empty(), "staging's queue is not empty: {staging:?}");
    ensure!(staging.queue == fleet_core::manifest::QueuePolicy::Queue, "staging's queue policy: {staging:?}");
    Ok(())
}

// ---------------------------------------------------------- 2. bad health

#[tokio::test(flavor = "multi_thread")]
async fn failing_health_check_is_rolled_back() {
    let f = Fleet::start(&two_staging_nodes(), STAGING).await.expect("cluster with nodes");
    let r = failing_health(&f).await;
    f.finish(r);
}

async fn failing_health(f: &Fleet) -> anyhow::Result<()> {
    let good = write_manifest(f, "web.yaml", &manifest("web", "staging", HEALTH, ""))?;
    let d2 = deploy(f, &good, &["--release", "v2"], 0).await?.deployment()?;
    let routes = [route(&d2, "node-1")?, route(&d2, "node-2")?];
    let v2 = [instance(&d2, "node-1")?, instance(&d2, "node-2")?];

    // v3 never gets healthy. Pre hooks add two steps before the start, so
    // that "undone in reverse order" has something to prove.
    let broken = manifest(
        "web",
        "staging",
        "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 2, deadline: 2s }",
        "env: { DEMO_FAIL_HEALTH: \"1\" }\nhooks: { pre: [\"true\"] }\n",
    );
    let broken = write_manifest(f, "web-broken.yaml", &broken)?;
    let run = deploy(f, &broken, &["--release", "v3"], 3).await?;
    let d3 = run.deployment()?;
    ensure!(d3.state == DeployState::Failed, "{run}");
    ensure!(transitions(&d3) == ["queued", "running", "compensating", "failed"], "events of {}: {:?}", d3.id, transitions(&d3));
    // The status command tells the same story.
    let shown = f.cluster.deployment(&d3.id).await?;
    ensure!(shown == d3, "`status` differs from the result line:\n{}\nvs\n{}", show(&shown), show(&d3));

    // Steps: hook n1, hook n2, start n1 done then undone; health n1 failed; the rest never ran.
    let start = step_index(&d3, "start_instance", "node-1")?;
    let health = step_index(&d3, "health_check", "node-1")?;
    ensure!(health == start + 1 && start == 2, "unexpected plan: {:?}", steps(&d3).iter().map(kind).collect::<Vec<_>>());
    let st: Vec<&str> = steps(&d3).iter().map(status).collect();
    for (i, s) in st.iter().enumerate() {
        let want = if i <= start {
            "undone"
        } else if i == health {
            "failed"
        } else {
            "pending"
        };
        ensure!(*s == want, "step {i} ({}) is {s}, expected {want}; statuses {st:?}", kind(&steps(&d3)[i]));
    }
    let err = steps(&d3)[health].error.as_deref().unwrap_or("");
    ensure!(err.contains("/healthz"), "the health step's error names the probe: {err:?}");

    // Undo order is the reverse of run order, by the recorded step times...
    let ran: Vec<usize> = {
        let mut v: Vec<(i64, usize)> = (0..=start).map(|i| (steps(&d3)[i].started_ms.unwrap_or(0), i)).collect();
        v.sort();
        v.into_iter().map(|(_, i)| i).collect()
    };
    let undone: Vec<usize> = {
        let mut v: Vec<(i64, usize)> = (0..=start).map(|i| (steps(&d3)[i].undo_started_ms.unwrap_or(0), i)).collect();
        v.sort();
        v.into_iter().map(|(_, i)| i).collect()
    };
    ensure!(ran == [0, 1, 2], "run order {ran:?}");
    ensure!(undone == [2, 1, 0], "undo order {undone:?} is not the reverse of the run order {ran:?}");
    let health_end = steps(&d3)[health].finished_ms.context("the failed health step has no end time")?;
    for i in 0..=start {
        let undone_at = steps(&d3)[i].undo_started_ms.with_context(|| format!("step {i} was undone but has no undo start time"))?;
        ensure!(undone_at >= health_end, "step {i} was undone before the health check ended");
    }
    // ... and by what the nodes actually did.
    let witness: Vec<WitnessLine> = f.witness()?.into_iter().filter(|l| l.deployment == d3.id).collect();
    let mut fwd: Vec<&WitnessLine> = witness.iter().filter(|l| !l.undo).collect();
    let mut back: Vec<&WitnessLine> = witness.iter().filter(|l| l.undo).collect();
    fwd.sort_by_key(|l| l.start_ms);
    back.sort_by_key(|l| l.start_ms);
    let fwd_steps: Vec<u32> = fwd.iter().map(|l| l.step).collect();
    let back_steps: Vec<u32> = back.iter().map(|l| l.step).collect();
    ensure!(fwd_steps == [0, 1, 2, 3], "witness: forward actions {fwd_steps:?}; lines {witness:?}");
    ensure!(back_steps == [2, 1, 0], "witness: undo actions {back_steps:?} are not the reverse of [0, 1, 2]; lines {witness:?}");
    ensure!(back.iter().all(|l| l.ok), "an undo failed: {back:?}");
    ensure!(fwd.last().is_some_and(|l| !l.ok && l.action == "health"), "the health action failed: {fwd:?}");

    // The JSON progress said so as it happened.
    let said_undone = run.lines()?.iter().any(
        |l| matches!(l, Line::Event(WatchEvent::Step { undo: true, status: StepEventStatus::Undone, step, .. }) if *step == start + 1),
    );
    ensure!(said_undone, "no `undone` step line for the start step in the deploy output: {run}");

    // v2 still answers, on the same routes, from the same processes.
    for r in &routes {
        assert_release(r, "v2").await?;
    }
    let (v3_pid, v3_port) = instance(&d3, "node-1")?;
    assert_instance_gone(v3_pid, v3_port).await?;
    for (pid, _) in v2 {
        ensure!(pid_alive(pid), "v2 instance {pid} died");
    }
    assert_only_processes(f, &[("node-1", v2[0].0), ("node-2", v2[1].0)])?;
    assert_witness_safe(&f.witness()?, &[&d2, &d3])?;
    Ok(())
}

// ---------------------------------------------------------- 3. serialize

#[tokio::test(flavor = "multi_thread")]
async fn one_destination_serializes_three_submissions() {
    let nodes: Vec<(&str, &[(&str, &str)])> =
        vec![("node-a", &[("pool", "a")]), ("node-b", &[("pool", "b")]), ("node-c", &[("pool", "c")])];
    let dests = "destinations:\n  - name: dest-a\n    selector: { pool: a }\n  - name: dest-b\n    selector: { pool: b }\n  - name: dest-c\n    selector: { pool: c }\n";
    let f = Fleet::start(&nodes, dests).await.expect("cluster with nodes");
    let r = serialize(&f).await;
    f.finish(r);
}

async fn serialize(f: &Fleet) -> anyhow::Result<()> {
    // Each deployment spends about a second in its health check, so that
    // overlaps (or their absence) are measured in hundreds of milliseconds.
    let slow = "{ command: [\"sh\", \"-c\", \"sleep 1\"], interval: 100ms, timeout: 10s, healthy_threshold: 1, deadline: 30s }";
    let web = write_manifest(f, "web.yaml", &manifest("web", "dest-a", slow, ""))?;
    let api = write_manifest(f, "api.yaml", &manifest("api", "dest-b", slow, ""))?;
    let (web_s, api_s) = (web.to_str().unwrap(), api.to_str().unwrap());
    let submit = |file: &str, release: &str, dest: &str| {
        let args: Vec<String> = ["deploy", "-f", file, "--release", release, "--destination", dest, "--detach", "-o", "json"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let run = f.cluster.ctl(&args).await?;
            run.expect_code(0)?;
            let lines = run.lines()?;
            ensure!(lines.len() == 1 && matches!(lines[0], Line::Submitted(_)), "--detach prints one `submitted` line: {run}");
            run.id()
        }
    };
    // Five fleetctl processes at once: three to dest-a, one each to dest-b and dest-c.
    let (a1, a2, a3, b, c) = tokio::join!(
        submit(web_s, "r1", "dest-a"),
        submit(web_s, "r2", "dest-a"),
        submit(web_s, "r3", "dest-a"),
        submit(api_s, "b1", "dest-b"),
        submit(api_s, "c1", "dest-c"),
    );
    let mut a_ids = vec![a1?, a2?, a3?];
    let (b, c) = (b?, c?);
    a_ids.sort_by_key(|id| number(id)); // submission order = commit order = id order
    eprintln!("submitted to dest-a: {a_ids:?}; dest-b: {b}; dest-c: {c}");

    let watch = |id: String| async move {
        let run = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
        run.expect_code(0)?;
        let d = run.deployment()?;
        ensure!(d.state == DeployState::Succeeded && d.id == id, "{run}");
        anyhow::Ok(d)
    };
    let (wa1, wa2, wa3, wb, wc) =
        tokio::join!(watch(a_ids[0].clone()), watch(a_ids[1].clone()), watch(a_ids[2].clone()), watch(b), watch(c));
    let a = [wa1?, wa2?, wa3?];
    let (db, dc) = (wb?, wc?);

    // dest-a: one after another, in submission order, tokens growing.
    for w in a.windows(2) {
        let (x, y) = (&w[0], &w[1]);
        let (sx, sy) = (span(x)?, span(y)?);
        ensure!(sx.1 <= sy.0, "{} ran {sx:?} and {} ran {sy:?}: they overlap or ran out of order", x.id, y.id);
        ensure!(event_at(x, "succeeded")? <= event_at(y, "running")?, "{} got the lock before {} released it", y.id, x.id);
        let (tx, ty) =
            (x.token.context("a succeeded deployment without a token")?, y.token.context("a succeeded deployment without a token")?);
        ensure!(tx < ty, "tokens do not grow: {tx} then {ty}");
        ensure!(
            y.previous_release.as_deref() == Some(x.release.as_str()),
            "{} replaced {} but says it replaced {:?}",
            y.id,
            x.release,
            y.previous_release
        );
    }
    // The node saw the same: its actions grouped by token do not overlap, in token order.
    let witness = f.witness()?;
    let mut by_token: BTreeMap<u64, (i64, i64)> = BTreeMap::new();
    for l in witness.iter().filter(|l| l.destination == "dest-a") {
        let e = by_token.entry(l.token).or_insert((i64::MAX, i64::MIN));
        e.0 = e.0.min(l.start_ms);
        e.1 = e.1.max(l.end_ms);
    }
    let tokens: Vec<u64> = a.iter().map(|d| d.token.context("a succeeded deployment without a token")).collect::<anyhow::Result<_>>()?;
    ensure!(by_token.keys().copied().collect::<Vec<_>>() == tokens, "witness tokens {:?} vs deployment tokens {tokens:?}", by_token.keys());
    let spans: Vec<(i64, i64)> = by_token.values().copied().collect();
    for w in spans.windows(2) {
        ensure!(w[0].1 <= w[1].0, "witness: actions of consecutive tokens overlap: {spans:?}");
    }

    // dest-b and dest-c ran at the same time (each other's, and dest-a's).
    let (sb, sc) = (span(&db)?, span(&dc)?);
    eprintln!("spans: a {:?}, b {sb:?}, c {sc:?}", a.iter().map(span).collect::<Vec<_>>());
    ensure!(overlap(sb, sc), "dest-b {sb:?} and dest-c {sc:?} did not run in parallel");
    let a_spans: Vec<(i64, i64)> = a.iter().map(span).collect::<anyhow::Result<_>>()?;
    ensure!(
        a_spans.iter().any(|s| overlap(*s, sb) || overlap(*s, sc)),
        "dest-a {a_spans:?} never ran at the same time as dest-b {sb:?} or dest-c {sc:?}"
    );
    let all: Vec<&Deployment> = a.iter().chain([&db, &dc]).collect();
    assert_witness_safe(&witness, &all)?;
    Ok(())
}

// -------------------------------------------------------------- 4. cancel

#[tokio::test(flavor = "multi_thread")]
async fn cancel_during_health_check_compensates() {
    let f = Fleet::start(&two_staging_nodes(), STAGING).await.expect("cluster with nodes");
    let r = cancel(&f).await;
    f.finish(r);
}

async fn cancel(f: &Fleet) -> anyhow::Result<()> {
    // A health probe that takes a minute: the health step is in flight for long.
    let slow = "{ command: [\"sh\", \"-c\", \"sleep 60\"], interval: 100ms, timeout: 60s, healthy_threshold: 1, deadline: 60s }";
    let m = write_manifest(f, "slow.yaml", &manifest("slow", "staging", slow, ""))?;
    let sub = f.cluster.deploy(&m, &["--release", "s1", "--detach"]).await?;
    sub.expect_code(0)?;
    let id = sub.id()?;

    // Wait until the instance started and the probe runs on node-1.
    let d = eventually("the health check to be in flight", Duration::from_secs(30), || async {
        let d = f.cluster.deployment(&id).await?;
        ensure!(d.state == DeployState::Running, "{id} is {}", d.state);
        let start = step_index(&d, "start_instance", "node-1")?;
        ensure!(status(&steps(&d)[start]) == "done", "start is {}", status(&steps(&d)[start]));
        let probing = f.node("node-1").processes().iter().any(|(_, cmd)| cmd.contains("sleep 60"));
        Ok(probing.then_some(d))
    })
    .await?;
    let (pid, port) = instance(&d, "node-1")?;
    ensure!(pid_alive(pid), "the started instance {pid} is not running");

    let c = f.cluster.ctl(&["cancel", &id]).await?;
    c.expect_code(0)?;
    let w = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
    w.expect_code(4)?;
    let d = w.deployment()?;
    ensure!(w.result()?.state == DeployState::Cancelled && d.state == DeployState::Cancelled && !d.timed_out, "{w}");
    ensure!(transitions(&d) == ["queued", "running", "cancelling", "cancelled"], "events: {:?}", transitions(&d));
    let start = step_index(&d, "start_instance", "node-1")?;
    let health = step_index(&d, "health_check", "node-1")?;
    ensure!(status(&steps(&d)[start]) == "undone", "start step is {}", status(&steps(&d)[start]));
    ensure!(status(&steps(&d)[health]) == "failed", "the aborted health step is {}", status(&steps(&d)[health]));
    for (i, s) in steps(&d).iter().enumerate().filter(|(i, _)| *i != start && *i != health) {
        ensure!(status(s) == "pending", "step {i} ({}) is {} but never should have run", kind(s), status(s));
    }
    let took = event_at(&d, "cancelled")? - event_at(&d, "cancelling")?;
    ensure!(took < 10_000, "compensation took {took} ms after the cancel; the probe was not aborted promptly");
    assert_instance_gone(pid, port).await?;
    eventually_only_processes(f, &[]).await?; // neither the instance nor the probe is left
    let again = f.cluster.ctl(&["cancel", &id]).await?;
    ensure!(again.code == 7, "cancelling an ended deployment is refused with exit 7: {again}");

    // The deadline: a 2 s budget for a release whose health check takes a minute.
    let run = f.cluster.deploy(&m, &["--release", "s2", "--timeout", "2s"]).await?;
    run.expect_code(5)?;
    ensure!(run.elapsed < Duration::from_secs(20), "deploy --timeout 2s returned after {:?}", run.elapsed);
    let d2 = run.deployment()?;
    ensure!(d2.state == DeployState::Cancelled && d2.timed_out && run.result()?.exit_code == 5, "{run}");
    let tr = transitions(&d2);
    ensure!(tr.ends_with(&["cancelling".to_string(), "cancelled".to_string()]), "events: {tr:?}");
    for (i, s) in steps(&d2).iter().enumerate() {
        ensure!(matches!(status(s), "pending" | "failed" | "undone"), "step {i} ({}) is left {}", kind(s), status(s));
    }
    if let Ok((pid, port)) = instance(&d2, "node-1") {
        assert_instance_gone(pid, port).await?;
    }
    eventually_only_processes(f, &[]).await?;
    assert_witness_safe(&f.witness()?, &[&d, &d2])?;
    Ok(())
}

// ------------------------------------------------------------ 5. rollback

#[tokio::test(flavor = "multi_thread")]
async fn rollback_restores_previous_release() {
    let f = Fleet::start(&two_staging_nodes(), STAGING).await.expect("cluster with nodes");
    let r = rollback(&f).await;
    f.finish(r);
}

async fn rollback(f: &Fleet) -> anyhow::Result<()> {
    let m = write_manifest(f, "web.yaml", &manifest("web", "staging", HEALTH, ""))?;
    let d1 = deploy(f, &m, &["--release", "v1"], 0).await?.deployment()?;
    let d2 = deploy(f, &m, &["--release", "v2"], 0).await?.deployment()?;
    let routes = [route(&d1, "node-1")?, route(&d1, "node-2")?];
    for r in &routes {
        assert_release(r, "v2").await?;
    }
    let v2_id = d2.id.clone();

    let run = f.cluster.ctl(&["rollback", &v2_id, "-o", "json"]).await?;
    run.expect_code(0)?;
    let rb = run.deployment()?;
    ensure!(rb.state == DeployState::Succeeded && rb.release == "v1" && rb.rollback_of.as_deref() == Some(v2_id.as_str()), "{run}");
    ensure!(rb.previous_release.as_deref() == Some("v2"), "the rollback replaced {:?}", rb.previous_release);
    ensure!(number(&rb.id) > number(&v2_id), "a rollback is a new deployment");
    for r in &routes {
        assert_release(r, "v1").await?;
    }
    let rb_id = rb.id.clone();

    let hist = f.cluster.ctl(&["history", "--app", "web", "-o", "json"]).await?;
    hist.expect_code(0)?;
    let list: Vec<HistoryEntry> = hist.json()?;
    let ids: Vec<&str> = list.iter().map(|d| d.id.as_str()).collect();
    for id in [d1.id.as_str(), &v2_id, &rb_id] {
        ensure!(ids.contains(&id), "history lacks {id}: {ids:?}");
    }
    let entry = list.iter().find(|d| d.id == rb_id).with_context(|| format!("history lacks {rb_id}"))?;
    ensure!(entry.rollback_of.as_deref() == Some(v2_id.as_str()) && entry.release == "v1", "history entry of the rollback: {entry:?}");
    ensure!(list.iter().all(|d| d.app == "web"), "history --app web lists other apps");

    // And forward again with --to.
    let run = f.cluster.ctl(&["rollback", &rb_id, "--to", "v2", "-o", "json"]).await?;
    run.expect_code(0)?;
    let fwd = run.deployment()?;
    ensure!(fwd.state == DeployState::Succeeded && fwd.release == "v2" && fwd.rollback_of.as_deref() == Some(rb_id.as_str()), "{run}");
    for r in &routes {
        assert_release(r, "v2").await?;
    }
    // Only the instances of the last deployment are left.
    let live = [("node-1", instance(&fwd, "node-1")?.0), ("node-2", instance(&fwd, "node-2")?.0)];
    for d in [&d1, &d2, &rb] {
        for n in ["node-1", "node-2"] {
            let (pid, port) = instance(d, n)?;
            assert_instance_gone(pid, port).await?;
        }
    }
    assert_only_processes(f, &live)?;

    // A rollback to a release that never succeeded is refused and changes nothing.
    let before = f.cluster.ctl(&["list", "-o", "json"]).await?.json::<Vec<Deployment>>()?.len();
    let bad = f.cluster.ctl(&["rollback", &rb_id, "--to", "v9", "-o", "json"]).await?;
    ensure!(bad.code != 0 && bad.text().contains("v9"), "rollback --to v9: {bad}");
    ensure!(
        f.cluster.ctl(&["list", "-o", "json"]).await?.json::<Vec<Deployment>>()?.len() == before,
        "a refused rollback added a deployment"
    );
    assert_witness_safe(&f.witness()?, &[&d1, &d2, &rb, &fwd])?;
    Ok(())
}

// ----------------------------------------------------------- 6. bad input

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_changes_nothing() {
    let dests = "destinations:\n  - name: staging\n    selector: { env: staging }\n  - name: ghost\n    selector: { env: nowhere }\n";
    let f = Fleet::start(&[("node-1", &[("env", "staging")])], dests).await.expect("cluster with nodes");
    let r = bad_input(&f).await;
    f.finish(r);
}

async fn bad_input(f: &Fleet) -> anyhow::Result<()> {
    let good = format!("release: v1\n{}", manifest("web", "staging", HEALTH, ""));
    // (file name, manifest, extra args, the field a manifest error names, words the message must contain)
    type Case<'a> = (&'a str, String, Vec<&'a str>, Option<&'a str>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        ("unknown-field.yaml", format!("{good}colour: red\n"), vec![], Some("colour"), vec!["colour", "unknown field"]),
        ("no-release.yaml", good.replace("release: v1\n", ""), vec![], Some("release"), vec!["release", "missing"]),
        (
            "negative-interval.yaml",
            good.replace("interval: 100ms", "interval: -100ms"),
            vec![],
            Some("health.interval"),
            vec!["health.interval", "negative"],
        ),
        ("good.yaml", good.clone(), vec!["--destination", "nowhere"], None, vec!["nowhere", "destination"]),
        ("good.yaml", good.clone(), vec!["--destination", "ghost"], None, vec!["ghost", "node"]),
    ];
    for (file, text, args, field, words) in &cases {
        let m = write_manifest(f, file, text)?;
        let run = f.cluster.deploy(&m, args).await?;
        eprintln!("{file} {args:?}: exit {} after {:?}: {}", run.code, run.elapsed, run.stderr.trim());
        ensure!(run.code == 2, "{file} {args:?}: expected exit 2, got {run}");
        let said = run.text();
        for w in words {
            ensure!(said.contains(w), "{file} {args:?}: the message does not name `{w}`: {run}");
        }
        let lines = run.lines()?;
        let error = lines.iter().find_map(|l| match l {
            Line::Error(e) => Some(e),
            _ => None,
        });
        ensure!(error.is_some_and(|e| e.exit_code == 2), "{file} {args:?}: no JSON error line with exit_code 2: {run}");
        if let Some(field) = field {
            ensure!(
                error.is_some_and(|e| e.field.as_deref() == Some(*field)),
                "{file}: the JSON error does not name field `{field}`: {run}"
            );
        }
        ensure!(run.elapsed < Duration::from_secs(5), "{file} {args:?}: refusing took {:?}", run.elapsed);
        ensure!(!lines.iter().any(|l| matches!(l, Line::Submitted(_) | Line::Result(_))), "{file}: something was submitted: {run}");
    }
    let list = f.cluster.ctl(&["list", "-o", "json"]).await?;
    list.expect_code(0)?;
    ensure!(list.json::<Vec<Deployment>>()?.is_empty(), "refused deployments were recorded: {list}");
    let locks = f.cluster.ctl(&["lock", "status", "-o", "json"]).await?;
    ensure!(locks.json::<LockStatusView>()?.locks.is_empty(), "a destination was locked: {locks}");
    let witness = f.witness()?;
    ensure!(witness.is_empty(), "a node acted: {witness:?}");
    assert_only_processes(f, &[])?;
    // A good deployment still goes through (the refusals left nothing stuck).
    let m = write_manifest(f, "good.yaml", &good)?;
    let d = deploy(f, &m, &[], 0).await?.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "{}", show(&d));
    Ok(())
}

// ------------------------------------------------------ the helpers themselves

#[test]
fn overlap_is_strict() {
    assert!(overlap((0, 10), (5, 15)) && !overlap((0, 10), (10, 15)));
}
