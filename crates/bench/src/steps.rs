//! `fleet-bench steps`: the coordinator's overhead per saga step (issue 4).
//!
//! A deployment of N no-op steps costs at least one Raft commit per step
//! (a step's result is the only thing committed per step). This mode
//! measures, in one run and on one cluster (3 coordinators on 127.0.0.1,
//! default Raft timings, release binaries):
//!
//! * **the floor**: p50 of a single client's lock acquire/release through
//!   the gRPC client (one replicated, fsynced commit as a client sees it),
//!   before and after the deployments, plus fdatasync + loopback RTT;
//! * **one destination**: a deployment whose manifest has N pre hooks
//!   `true` (fleet-node answers `true` in-process, no shell). Per-step time =
//!   (finished_ms of the last hook − started_ms of the first) / (N − 1),
//!   from the Deployment's step records; the app's start/health/switch/
//!   stop-old steps are left out;
//! * **many destinations**: D destinations (each selecting one node), D
//!   deployments submitted at once, M hooks each; per-step time p50/p99
//!   across deployments, aggregate steps/s, ratio to the single-destination
//!   time. A light lock probe (one op every 50 ms) measures the commit
//!   latency while they run;
//! * **where the time goes**: CPU and disk writes per step of each
//!   coordinator (leader and followers), of the nodes and of this process
//!   (from /proc), and in-process timings of what `fleet-core` does per step
//!   (record + re-encode of the deployment, the scheduler's clone of every
//!   active deployment) on the deployments the run produced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use fleet_core::deploy::{DeployState, Deployment, StepOutcome, StepStatus};
use fleet_proto::{ClusterStatusRequest, GetDeploymentRequest, SubmitDeploymentRequest};
use fleet_tests::harness::{acquire, release, Cluster, Node};
use fleetctl::client::Client;
use serde_json::{json, Value};

use crate::locks::{floor, percentile, round3};
use crate::procstat;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// No-op steps (pre hooks) of the single-destination deployment.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Single-destination deployments of `--steps` hooks (the median counts).
    #[arg(long, default_value_t = 3)]
    single_runs: usize,
    /// Destinations deploying at once; a comma-separated list runs the
    /// concurrent phase once per value (the largest is the one the aim is about).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    destinations: Vec<usize>,
    /// No-op steps of each of the concurrent deployments.
    #[arg(long, default_value_t = 50)]
    concurrent_steps: usize,
    /// Worker nodes the concurrent destinations are spread over (destination
    /// i selects node i mod K); a comma-separated list runs the concurrent
    /// phase once per value.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    nodes: Vec<usize>,
    /// Lock operations of each floor measurement.
    #[arg(long, default_value_t = 1000)]
    floor_ops: usize,
    /// Skip the lock probe during the concurrent phase.
    #[arg(long)]
    no_probe: bool,
    /// Profile the leader with `perf record` during the largest concurrent
    /// phase and print where its CPU went (perturbs that phase's numbers).
    #[arg(long)]
    perf: bool,
    /// Record every coordinator and node of the largest concurrent phase
    /// with `perf record` (DWARF call graphs) into DIR/<process>.data, for
    /// `perf report -i` (perturbs that phase's numbers).
    #[arg(long, value_name = "DIR")]
    perf_all: Option<std::path::PathBuf>,
    /// Give up on a phase after this long.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    phase_timeout: Duration,
}

/// Per-step figures of one finished deployment.
#[derive(Debug, Clone)]
struct StepTimes {
    id: String,
    hooks: usize,
    per_step_ms: f64,
    /// Mean of (started of hook i) − (finished of hook i−1): the round trip
    /// through the coordinator between two steps.
    gap_mean_ms: f64,
    /// Mean time the node spent in a hook.
    exec_mean_ms: f64,
    first_start_ms: i64,
    last_finish_ms: i64,
    json_bytes: usize,
}

fn step_times(d: &Value, hooks: usize) -> anyhow::Result<StepTimes> {
    let id = d["id"].as_str().unwrap_or("?").to_string();
    anyhow::ensure!(d["state"] == "succeeded", "deployment {id} ended {}; its transitions: {}", d["state"], events(d));
    let steps = d["steps"].as_array().context("no steps")?;
    anyhow::ensure!(steps.len() >= hooks && hooks >= 2, "deployment {id} has {} steps, expected {hooks} hooks first", steps.len());
    let t = |i: usize, f: &str| -> anyhow::Result<i64> {
        anyhow::ensure!(steps[i]["action"]["kind"] == "command", "step {i} of {id} is not a hook: {}", steps[i]["name"]);
        steps[i][f].as_i64().with_context(|| format!("step {i} of {id} has no {f}"))
    };
    let (mut gaps, mut exec) = (0i64, 0i64);
    for i in 0..hooks {
        exec += t(i, "finished_ms")? - t(i, "started_ms")?;
        if i > 0 {
            gaps += t(i, "started_ms")? - t(i - 1, "finished_ms")?;
        }
    }
    let first = t(0, "started_ms")?;
    let last = t(hooks - 1, "finished_ms")?;
    Ok(StepTimes {
        id,
        hooks,
        per_step_ms: (last - first) as f64 / (hooks - 1) as f64,
        gap_mean_ms: gaps as f64 / (hooks - 1) as f64,
        exec_mean_ms: exec as f64 / hooks as f64,
        first_start_ms: first,
        last_finish_ms: last,
        json_bytes: serde_json::to_vec(d)?.len(),
    })
}

/// Every transition's reason, in order (the one that failed a deployment
/// names the step and its error; the last only says what was undone).
fn events(d: &Value) -> String {
    let reasons: Vec<String> = d["events"].as_array().into_iter().flatten().map(|e| e["reason"].to_string()).collect();
    reasons.join(" → ")
}

pub(crate) fn last_event(d: &Value) -> String {
    d["events"].as_array().and_then(|e| e.last()).map(|e| e["reason"].to_string()).unwrap_or_default()
}

fn manifest(app: &str, release: &str, destination: &str, hooks: usize) -> String {
    let pre = vec!["\"true\""; hooks].join(", ");
    format!(
        "app: {app}\nrelease: {release}\ndestination: {destination}\nrun: [\"fleet-demo-app\"]\n\
         health: {{ tcp: true, interval: 20ms, timeout: 1s, deadline: 60s }}\n\
         drain: 100ms\nhooks: {{ pre: [{pre}] }}\n"
    )
}

pub(crate) async fn submit(c: &mut Client, yaml: &str) -> anyhow::Result<String> {
    let rid = fleetctl::client::request_id();
    let reply = c
        .call(|mut cl, _| {
            let req = SubmitDeploymentRequest {
                manifest_yaml: yaml.to_string(),
                file_name: "bench.yaml".into(),
                request_id: rid.clone(),
                ..Default::default()
            };
            async move { cl.submit_deployment(req).await.map(|r| r.into_inner()) }
        })
        .await?;
    let d: Value = serde_json::from_str(&reply.deployment_json)?;
    Ok(d["id"].as_str().context("submit answered without an id")?.to_string())
}

pub(crate) async fn get_deployment(c: &mut Client, id: &str) -> anyhow::Result<Value> {
    let reply = c
        .call(|mut cl, _| {
            let req = GetDeploymentRequest { id: id.to_string() };
            async move { cl.get_deployment(req).await.map(|r| r.into_inner()) }
        })
        .await?;
    Ok(serde_json::from_str(&reply.deployment_json)?)
}

async fn leader_locks(c: &mut Client) -> anyhow::Result<u64> {
    let s =
        c.call(|mut cl, _| async move { cl.cluster_status(ClusterStatusRequest { local: false }).await.map(|r| r.into_inner()) }).await?;
    Ok(s.locks)
}

/// Wait until every deployment is terminal; return them. Polls only the
/// leader's lock count (a running deployment holds its destination's lock)
/// so that polling does not load the coordinators; fetches the
/// deployments once it drops to `other_locks`, or every 5 s.
pub(crate) async fn wait_terminal(c: &mut Client, ids: &[String], other_locks: u64, timeout: Duration) -> anyhow::Result<Vec<Value>> {
    let start = Instant::now();
    let mut last_fetch = Instant::now();
    loop {
        let locks = leader_locks(c).await?;
        if locks <= other_locks || last_fetch.elapsed() > Duration::from_secs(5) {
            last_fetch = Instant::now();
            let mut all = Vec::new();
            for id in ids {
                all.push(get_deployment(c, id).await?);
            }
            let open: Vec<String> = all
                .iter()
                .filter(|d| {
                    !matches!(d["state"].as_str(), Some("succeeded" | "failed" | "cancelled" | "compensation_failed" | "superseded"))
                })
                .map(|d| format!("{} {}", d["id"], d["state"]))
                .collect();
            if open.is_empty() {
                return Ok(all);
            }
            if start.elapsed() > timeout {
                bail!(
                    "after {timeout:?}, {} deployments have not ended: {}",
                    open.len(),
                    open.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Latencies of `ops` alternating acquire/release by one client.
async fn commit_floor(cluster: &Cluster, ops: usize, tag: &str) -> anyhow::Result<Vec<Duration>> {
    let mut c = cluster.client("operator")?;
    let dest = format!("floor-{tag}");
    let mut lat = Vec::with_capacity(ops);
    // One warm-up pair: the connection and the redirect to the leader.
    acquire(&mut c, &dest, "bench", &format!("{tag}-warm-a")).await?;
    release(&mut c, &dest, &format!("{tag}-warm-r")).await?;
    for i in 0..ops {
        let t = Instant::now();
        if i % 2 == 0 {
            acquire(&mut c, &dest, "bench", &format!("{tag}-{i}")).await?;
        } else {
            release(&mut c, &dest, &format!("{tag}-{i}")).await?;
        }
        lat.push(t.elapsed());
    }
    if ops % 2 == 1 {
        release(&mut c, &dest, &format!("{tag}-last")).await?;
    }
    Ok(lat)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// The processes whose CPU a phase is charged to.
struct Procs {
    /// (label, pid): `leader`, `follower-N`, `node-NAME`, `bench`.
    list: Vec<(String, u32)>,
}

impl Procs {
    async fn of(cluster: &Cluster, nodes: &[Node]) -> anyhow::Result<Procs> {
        let leader = cluster.status().await?.leader_id;
        let mut list = Vec::new();
        for (id, c) in &cluster.coords {
            let pid = c.child.as_ref().context("coordinator not running")?.id();
            list.push((if *id == leader { format!("leader(c{id})") } else { format!("follower(c{id})") }, pid));
        }
        for n in nodes {
            list.push((format!("node({})", n.name), n.pid().context("node not running")?));
        }
        list.push(("bench".into(), std::process::id()));
        Ok(Procs { list })
    }
    fn sample(&self) -> Vec<procstat::Sample> {
        self.list.iter().map(|(_, pid)| procstat::sample(*pid)).collect()
    }
    fn pids(&self) -> Vec<u32> {
        self.list.iter().map(|(_, p)| *p).collect()
    }
    /// Per-process CPU within the hook windows (from the sampler), and disk
    /// writes and the busiest threads over the whole phase, per hook step.
    fn report(
        &self,
        phase: &str,
        before: &[procstat::Sample],
        after: &[procstat::Sample],
        samples: &procstat::Samples,
        windows: &[(i64, i64)],
        steps: usize,
    ) -> (Value, String) {
        let mut cpu = vec![0.0; self.list.len() + 1];
        let mut span_ms = 0i64;
        for (from, to) in windows {
            let (w, span) = samples.window(*from, *to);
            for (c, x) in cpu.iter_mut().zip(w) {
                *c += x;
            }
            span_ms += span;
        }
        let mut rows = Vec::new();
        let mut md = String::new();
        let machine = cpu.pop().unwrap_or(0.0);
        let total: f64 = cpu.iter().sum();
        // Everything else on the machine: the demo app instances, and any
        // other workload (which would make the numbers unreliable).
        let others = (machine - total).max(0.0);
        for (i, (label, _)) in self.list.iter().enumerate() {
            let d = procstat::delta(&before[i], &after[i]);
            let mut top: Vec<(String, f64)> = d.threads.clone().into_iter().collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<String> = top.iter().take(3).map(|(n, v)| format!("{n} {v:.0} ms")).collect();
            rows.push(json!({
                "proc": label,
                "hook_window_cpu_ms": round3(cpu[i]),
                "cpu_us_per_step": (cpu[i] * 1000.0 / steps as f64).round(),
                "phase_cpu_ms": round3(d.cpu_ms),
                "disk_write_bytes_per_step": d.write_bytes / steps as u64,
                "write_syscall_bytes_per_step": d.wchar / steps as u64,
                "phase_top_threads": top,
            }));
            md.push_str(&format!(
                "| {phase} | {label} | {:.0} | {:.0} | {:.1} | {} |\n",
                cpu[i],
                cpu[i] * 1000.0 / steps as f64,
                d.write_bytes as f64 / steps as f64 / 1024.0,
                top.join(", ")
            ));
        }
        let util = total / (span_ms.max(1) as f64 * cores() as f64);
        let others_util = others / (span_ms.max(1) as f64 * cores() as f64);
        md.push_str(&format!(
            "| {phase} | other processes | {others:.0} | {:.0} | | {:.0} % of {} cores (demo app instances; anything else running) |\n",
            others * 1000.0 / steps as f64,
            others_util * 100.0,
            cores()
        ));
        md.push_str(&format!(
            "| {phase} | **all** | {total:.0} | {:.0} | | {:.0} % of {} cores over {:.2} s of hook steps |\n",
            total * 1000.0 / steps as f64,
            util * 100.0,
            cores(),
            span_ms as f64 / 1000.0
        ));
        if others_util > 0.10 {
            eprintln!(
                "WARNING: other processes used {:.0} % of the {} cores during `{phase}`: something else is running on this machine; its numbers are not reliable",
                others_util * 100.0,
                cores()
            );
        }
        let v = json!({"mode": "steps", "run": "cpu", "phase": phase, "steps": steps, "hook_window_s": round3(span_ms as f64 / 1000.0),
                       "cpu_utilization": round3(util), "other_processes_cpu_ms": round3(others),
                       "other_processes_utilization": round3(others_util), "procs": rows});
        (v, md)
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// In-process timings of what fleet-core does per step, on a deployment
/// this run produced (reset to "running, nothing done").
struct CoreCosts {
    /// `Deployment::record` + `serde_json::to_vec(deployment)`: what
    /// `State::step_result` → `put_deployment` does on every coordinator for
    /// every step result (crates/core/src/state.rs), mean per step.
    record_encode_us: f64,
    /// Encoded size of the deployment, mean over the run of steps.
    encoded_bytes: f64,
    /// `Deployment::clone` + `next()` + drop: what the leader's scheduler
    /// does for every active deployment every time it wakes
    /// (crates/coord/src/scheduler.rs `run`: `active_deployments().cloned()`).
    clone_next_us: f64,
}

fn core_costs(d: &Value) -> anyhow::Result<CoreCosts> {
    let done: Deployment = serde_json::from_value(d.clone()).context("the Deployment JSON does not match fleet-core's type")?;
    let outputs: Vec<(Option<String>, i64, i64)> =
        done.steps.iter().map(|s| (s.output.clone(), s.started_ms.unwrap_or(0), s.finished_ms.unwrap_or(0))).collect();
    let mut fresh = done.clone();
    fresh.state = DeployState::Running;
    for s in &mut fresh.steps {
        s.status = StepStatus::Pending;
        s.attempt = 1;
        s.output = None;
        s.started_ms = None;
        s.finished_ms = None;
    }
    fresh.events.retain(|e| e.to != DeployState::Succeeded);
    let token = fresh.token.context("no token")?;
    let node = fresh.steps.first().map(|s| s.plan.node.clone()).unwrap_or_default();
    let mut total = Duration::ZERO;
    let mut bytes = 0usize;
    let mut clone_total = Duration::ZERO;
    let reps = 5;
    for _ in 0..reps {
        let mut dep = fresh.clone();
        for (i, (output, started, finished)) in outputs.iter().enumerate() {
            let outcome = StepOutcome {
                step: i,
                undo: false,
                attempt: 1,
                token,
                epoch: dep.epoch,
                ok: true,
                output: output.clone(),
                error: None,
                class: None,
                started_ms: *started,
                finished_ms: *finished,
                node: node.clone(),
            };
            let t = Instant::now();
            dep.record(&outcome, *finished).map_err(|e| anyhow::anyhow!("replaying step {i}: {e}"))?;
            let enc = serde_json::to_vec(&dep)?;
            total += t.elapsed();
            bytes += enc.len();
            let t = Instant::now();
            let c = std::hint::black_box(dep.clone());
            std::hint::black_box(c.next());
            drop(c);
            clone_total += t.elapsed();
        }
        anyhow::ensure!(dep.state == DeployState::Succeeded, "the replay ended {}", dep.state);
    }
    let n = (reps * outputs.len()) as f64;
    Ok(CoreCosts {
        record_encode_us: total.as_secs_f64() * 1e6 / n,
        encoded_bytes: bytes as f64 / n,
        clone_next_us: clone_total.as_secs_f64() * 1e6 / n,
    })
}

/// What fleet-node does before it sends each result (agent.rs `finish` →
/// journal.rs `Journal::append`): encode the result as one JSON line,
/// append it to the journal and fdatasync (the rewrite to the last 200
/// results every 200 appends is left out). Timed with the last line of the
/// node's own journal, on a file in its data dir. Returns (line bytes, p50
/// ms of append + fdatasync, p50 ms of the JSON).
fn journal_cost(node: &Node) -> anyhow::Result<(usize, f64, f64)> {
    use std::io::Write;
    let bytes = std::fs::read(node.data_dir.join("results.json")).context("the node's result journal")?;
    let last = bytes.split(|b| *b == b'\n').rfind(|l| !l.is_empty()).context("the node's result journal is empty")?;
    let parsed: Value = serde_json::from_slice(last).context("the last line of the node's result journal")?;
    let path = node.data_dir.join("bench-journal-probe.jsonl");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let (mut files, mut encode) = (Vec::new(), Vec::new());
    let mut line = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        line = serde_json::to_vec(&parsed)?;
        line.push(b'\n');
        encode.push(t.elapsed());
        let t = Instant::now();
        file.write_all(&line)?;
        file.sync_data()?;
        files.push(t.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok((line.len(), percentile(files, 0.5), percentile(encode, 0.5)))
}

/// p50 of append + fdatasync on the cluster's disk, by append size: a
/// commit's fsync also flushes the state-machine batch written since the
/// previous one (store/sm.rs), whose size grows with the deployment.
fn fsync_by_size(dir: &std::path::Path) -> anyhow::Result<Vec<(usize, f64)>> {
    use std::io::Write;
    let sizes = [128usize, 16 * 1024, 64 * 1024];
    let paths: Vec<_> = sizes.iter().map(|s| dir.join(format!("fsync-size-probe-{s}"))).collect();
    let mut files = paths.iter().map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p)).collect::<Result<Vec<_>, _>>()?;
    let mut lat = vec![Vec::new(); sizes.len()];
    // Interleaved, so that anything else using the disk hits every size alike.
    for _ in 0..300 {
        for (i, size) in sizes.iter().enumerate() {
            let buf = vec![7u8; *size];
            let t = Instant::now();
            files[i].write_all(&buf)?;
            files[i].sync_data()?;
            lat[i].push(t.elapsed());
        }
    }
    drop(files);
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(sizes.iter().zip(lat).map(|(s, l)| (*s, percentile(l, 0.5))).collect())
}

/// `perf record` of one process (DWARF call graphs, so inlined Rust frames
/// are attributed), stopped with SIGINT.
struct Perf {
    child: std::process::Child,
    out: std::path::PathBuf,
}

fn perf_start(pid: u32, out: std::path::PathBuf) -> anyhow::Result<Perf> {
    let child = std::process::Command::new("perf")
        .args(["record", "-F", "299", "--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting `perf record` (apt-get install linux-perf)")?;
    Ok(Perf { child, out })
}

impl Perf {
    /// Stop recording (SIGINT) and wait until the data file is complete.
    fn stop(&mut self) -> anyhow::Result<()> {
        std::process::Command::new("kill").args(["-INT", &self.child.id().to_string()]).status()?;
        self.child.wait()?;
        Ok(())
    }
}

/// Share of the profiled process's samples spent in (under) each of the
/// functions that matter for a step.
fn perf_stop(mut p: Perf) -> anyhow::Result<Vec<(String, f64)>> {
    p.stop()?;
    let out = std::process::Command::new("perf")
        .args(["report", "--children", "--stdio", "--sort", "symbol", "-g", "none", "-i"])
        .arg(&p.out)
        .output()
        .context("perf report")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let wanted = [
        ("scheduler loop (scheduler.rs `run`)", "fleet_coord::scheduler::run::{{closure}}"),
        ("  state read lock held: clone of every active deployment", "fleet_coord::store::sm::StateReader::read"),
        ("  `Deployment::clone`", "<fleet_core::deploy::Deployment as core::clone::Clone>::clone"),
        ("  drop of the clones", "core::ptr::drop_in_place<fleet_core::deploy::Deployment>"),
        ("state machine worker (openraft → store/sm.rs apply)", "openraft::core::sm::worker::"),
        ("  `State::apply` (fleet-core)", "fleet_core::state::State::apply"),
        ("Raft core loop (openraft)", "openraft::core::raft_core::RaftCore<C,N,LS,SM>::runtime_loop::{{closure}}::{{closure}}"),
        ("replication to followers (openraft)", "openraft::replication::"),
        ("log flusher thread: WAL fsync (store/log.rs)", "fleet_coord::store::log::flusher"),
        ("node work streams (worker.rs)", "fleet_coord::worker::"),
        ("gRPC server (h2)", "h2::server::"),
    ];
    let mut found = Vec::new();
    for (label, needle) in wanted {
        let line = text.lines().find(|l| !l.starts_with('#') && l.contains(needle));
        let pct = line.and_then(|l| l.split_whitespace().next()).and_then(|p| p.trim_end_matches('%').parse::<f64>().ok());
        found.push((label.to_string(), pct.unwrap_or(0.0)));
    }
    let _ = std::fs::remove_file(&p.out);
    Ok(found)
}

/// One lock op every 50 ms while `stop` is false: commit latency under load.
fn spawn_probe(cluster: &Cluster, stop: Arc<AtomicBool>) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Vec<Duration>>>> {
    let mut c = cluster.client("operator")?;
    Ok(tokio::spawn(async move {
        let mut lat = Vec::new();
        let mut i = 0u64;
        acquire(&mut c, "probe", "bench", "probe-warm").await?;
        release(&mut c, "probe", "probe-warm-r").await?;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            if i.is_multiple_of(2) {
                acquire(&mut c, "probe", "bench", &format!("probe-{i}")).await?;
            } else {
                release(&mut c, "probe", &format!("probe-{i}")).await?;
            }
            lat.push(t.elapsed());
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if i % 2 == 1 {
            release(&mut c, "probe", "probe-last").await?;
        }
        anyhow::Ok(lat)
    }))
}

struct Row {
    run: String,
    destinations: usize,
    nodes: usize,
    steps: usize,
    p50: f64,
    p99: f64,
    steps_per_s: f64,
    floor_ratio: f64,
    single_ratio: Option<f64>,
    gap: f64,
    exec: f64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.steps >= 2 && args.concurrent_steps >= 2, "--steps and --concurrent-steps must be at least 2");
    let max_nodes = args.nodes.iter().copied().max().unwrap_or(1).max(1);
    let started = Instant::now();

    // ---- cluster, nodes, destinations
    let cluster = Cluster::start(3, &[]).await.context("starting 3 coordinators (default Raft timings)")?;
    let mut nodes: Vec<Node> = Vec::new();
    let result = async {
        let physical = floor(cluster.path())?;
        println!("{}", json!({"mode": "steps", "run": "physical_floor", "detail": physical}));
        for k in 0..max_nodes {
            let name = format!("n{k}");
            nodes.push(cluster.start_node(&name, &[("slot", &k.to_string())])?);
        }
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        cluster.wait_nodes_connected(&names).await?;
        let mut dests = String::from("destinations:\n  - { name: single, selector: { slot: \"0\" } }\n  - { name: warm, selector: { slot: \"0\" } }\n");
        for &n in &args.destinations {
            for &k in &args.nodes {
                for i in 0..n {
                    dests.push_str(&format!("  - {{ name: d{n}k{k}-b{i}, selector: {{ slot: \"{}\" }} }}\n", i % k.max(1)));
                }
            }
        }
        cluster.apply_destinations(&dests).await?;
        let mut c = cluster.client("operator")?;

        // ---- floor before, with what one commit costs in CPU
        let procs = Procs::of(&cluster, &nodes).await?;
        let cpu0 = procs.sample();
        let sampler = procstat::Sampler::start(procs.pids(), Duration::from_millis(20));
        let from = procstat::unix_ms();
        let before = commit_floor(&cluster, args.floor_ops, "before").await?;
        let to = procstat::unix_ms();
        let samples = sampler.finish();
        let cpu1 = procs.sample();
        let floor_before = percentile(before.clone(), 0.5);
        println!("{}", json!({"mode": "steps", "run": "commit_floor", "when": "before", "ops": before.len(),
                              "p50_ms": round3(floor_before), "p99_ms": round3(percentile(before, 0.99))}));
        let (cpu_floor, md_floor) = procs.report("1 lock op (commit floor)", &cpu0, &cpu1, &samples, &[(from, to)], args.floor_ops);
        println!("{cpu_floor}");
        let fsyncs = fsync_by_size(cluster.path())?;
        println!("{}", json!({"mode": "steps", "run": "fdatasync_by_append_size",
            "p50_ms": fsyncs.iter().map(|(b, ms)| json!({"bytes": b, "p50_ms": round3(*ms)})).collect::<Vec<_>>()}));

        // ---- warm-up (first instance start, first stream use)
        let id = submit(&mut c, &manifest("warm", "w1", "warm", 10)).await?;
        wait_terminal(&mut c, &[id], 0, args.phase_timeout).await?;

        // ---- one destination
        let mut singles: Vec<StepTimes> = Vec::new();
        let mut single_values: Vec<Value> = Vec::new();
        let cpu0 = procs.sample();
        let sampler = procstat::Sampler::start(procs.pids(), Duration::from_millis(20));
        for r in 0..args.single_runs.max(1) {
            let id = submit(&mut c, &manifest("single", &format!("r{r}"), "single", args.steps)).await?;
            let d = wait_terminal(&mut c, &[id], 0, args.phase_timeout).await?.remove(0);
            let st = step_times(&d, args.steps)?;
            println!("{}", json!({"mode": "steps", "run": "single", "deployment": st.id, "destinations": 1, "steps": st.hooks,
                                  "per_step_ms": round3(st.per_step_ms), "gap_mean_ms": round3(st.gap_mean_ms), "exec_mean_ms": round3(st.exec_mean_ms),
                                  "ratio_to_commit_p50": round3(st.per_step_ms / floor_before), "deployment_json_bytes": st.json_bytes}));
            singles.push(st);
            single_values.push(d);
        }
        let samples = sampler.finish();
        let cpu1 = procs.sample();
        let single_hook_steps: usize = singles.iter().map(|s| s.hooks).sum();
        let single_span: f64 = singles.iter().map(|s| (s.last_finish_ms - s.first_start_ms) as f64).sum();
        let windows: Vec<(i64, i64)> = singles.iter().map(|s| (s.first_start_ms, s.last_finish_ms)).collect();
        let (cpu_single, md_single) = procs.report(&format!("1 dest, N={}", args.steps), &cpu0, &cpu1, &samples, &windows, single_hook_steps);
        println!("{cpu_single}");
        let single_med = median(&singles.iter().map(|s| s.per_step_ms).collect::<Vec<_>>());

        // The same destination with the concurrent runs' step count, for a
        // ratio at equal N.
        let id = submit(&mut c, &manifest("single", "rm", "single", args.concurrent_steps)).await?;
        let d = wait_terminal(&mut c, &[id], 0, args.phase_timeout).await?.remove(0);
        let single_m = step_times(&d, args.concurrent_steps)?;
        println!("{}", json!({"mode": "steps", "run": "single", "deployment": single_m.id, "destinations": 1, "steps": single_m.hooks,
                              "per_step_ms": round3(single_m.per_step_ms), "gap_mean_ms": round3(single_m.gap_mean_ms), "exec_mean_ms": round3(single_m.exec_mean_ms),
                              "ratio_to_commit_p50": round3(single_m.per_step_ms / floor_before), "deployment_json_bytes": single_m.json_bytes}));

        let mut rows = vec![Row {
            run: format!("single ×{}", singles.len()),
            destinations: 1,
            nodes: 1,
            steps: args.steps,
            p50: single_med,
            p99: quantile(&singles.iter().map(|s| s.per_step_ms).collect::<Vec<_>>(), 0.99),
            steps_per_s: single_hook_steps as f64 / (single_span / 1000.0),
            floor_ratio: single_med / floor_before,
            single_ratio: None,
            gap: median(&singles.iter().map(|s| s.gap_mean_ms).collect::<Vec<_>>()),
            exec: median(&singles.iter().map(|s| s.exec_mean_ms).collect::<Vec<_>>()),
        }];
        rows.push(Row {
            run: "single".into(),
            destinations: 1,
            nodes: 1,
            steps: args.concurrent_steps,
            p50: single_m.per_step_ms,
            p99: single_m.per_step_ms,
            steps_per_s: single_m.hooks as f64 / ((single_m.last_finish_ms - single_m.first_start_ms) as f64 / 1000.0),
            floor_ratio: single_m.per_step_ms / floor_before,
            single_ratio: None,
            gap: single_m.gap_mean_ms,
            exec: single_m.exec_mean_ms,
        });

        // ---- many destinations at once
        let mut md_cpu = md_floor + &md_single;
        let mut concurrent_values: Vec<Value> = Vec::new();
        let mut probes: Vec<(usize, usize, Vec<Duration>)> = Vec::new();
        let mut md_perf = String::new();
        let max_dests = args.destinations.iter().copied().max().unwrap_or(1);
        let phases: Vec<(usize, usize)> = args.destinations.iter().flat_map(|&n| args.nodes.iter().map(move |&k| (n, k))).collect();
        for &(n, k) in &phases {
            // One client (own connection) per submitter, connected and
            // pointed at the leader before the clock starts.
            let mut clients = Vec::with_capacity(n);
            for _ in 0..n {
                let mut cl = cluster.client("operator")?;
                leader_locks(&mut cl).await?;
                clients.push(cl);
            }
            let manifests: Vec<String> =
                (0..n).map(|i| manifest(&format!("d{n}k{k}-a{i}"), "r1", &format!("d{n}k{k}-b{i}"), args.concurrent_steps)).collect();
            let stop = Arc::new(AtomicBool::new(false));
            let probe = if args.no_probe { None } else { Some(spawn_probe(&cluster, stop.clone())?) };
            let profile = args.perf && n == max_dests && k == args.nodes[0];
            let perf = if profile {
                let leader = procs.list.iter().find(|(l, _)| l.starts_with("leader")).map(|(_, p)| *p).context("no leader")?;
                Some(perf_start(leader, cluster.path().join("perf-leader.data"))?)
            } else {
                None
            };
            let recorders = match &args.perf_all {
                Some(dir) if n == max_dests && k == args.nodes[0] => {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                    let mut list = Vec::new();
                    for (label, pid) in procs.list.iter().filter(|(l, _)| !l.starts_with("bench")) {
                        list.push(perf_start(*pid, dir.join(format!("{}.data", label.replace('(', "-").replace(')', ""))))?);
                    }
                    list
                }
                _ => Vec::new(),
            };
            let cpu0 = procs.sample();
            let sampler = procstat::Sampler::start(procs.pids(), Duration::from_millis(20));
            let t0 = Instant::now();
            let gate = Arc::new(tokio::sync::Barrier::new(n));
            let mut tasks = Vec::new();
            for (mut cl, yaml) in clients.into_iter().zip(manifests) {
                let gate = gate.clone();
                tasks.push(tokio::spawn(async move {
                    gate.wait().await;
                    submit(&mut cl, &yaml).await
                }));
            }
            let mut ids = Vec::new();
            for t in tasks {
                ids.push(t.await??);
            }
            let submitted = t0.elapsed();
            let all = wait_terminal(&mut c, &ids, u64::from(probe.is_some()), args.phase_timeout).await?;
            let wall = t0.elapsed();
            let samples = sampler.finish();
            let cpu1 = procs.sample();
            for mut r in recorders {
                r.stop()?;
                eprintln!("perf profile kept: perf report -i {}", r.out.display());
            }
            if let Some(p) = perf {
                let shares = perf_stop(p)?;
                println!("{}", json!({"mode": "steps", "run": "leader_profile", "destinations": n, "nodes": k,
                    "share_of_leader_samples_pct": shares.iter().map(|(l, v)| json!({"what": l.trim(), "pct": v})).collect::<Vec<_>>()}));
                md_perf = format!("\nleader CPU profile (perf, {n} destinations, {k} node(s); this phase ran under perf):\n\n| where (inclusive) | % of leader samples |\n|---|---|\n");
                for (l, v) in &shares {
                    md_perf.push_str(&format!("| {} | {v:.1} |\n", l.replace("  ", "↳ ")));
                }
            }
            stop.store(true, Ordering::Relaxed);
            let probe_lat = match probe {
                Some(p) => p.await??,
                None => vec![],
            };
            let times: Vec<StepTimes> = all.iter().map(|d| step_times(d, args.concurrent_steps)).collect::<anyhow::Result<_>>()?;
            let per: Vec<f64> = times.iter().map(|t| t.per_step_ms).collect();
            let first = times.iter().map(|t| t.first_start_ms).min().unwrap_or(0);
            let last = times.iter().map(|t| t.last_finish_ms).max().unwrap_or(0);
            let total_steps: usize = times.iter().map(|t| t.hooks).sum();
            let steps_per_s = total_steps as f64 / ((last - first).max(1) as f64 / 1000.0);
            // How far apart the deployments' hook phases began and ended:
            // the part of the phase that is not every destination stepping.
            let first_spread = times.iter().map(|t| t.first_start_ms).max().unwrap_or(0) - first;
            let last_spread = last - times.iter().map(|t| t.last_finish_ms).min().unwrap_or(0);
            let p50 = quantile(&per, 0.5);
            let probe_p50 = if probe_lat.is_empty() { f64::NAN } else { percentile(probe_lat.clone(), 0.5) };
            println!("{}", json!({"mode": "steps", "run": "concurrent", "destinations": n, "nodes": k, "steps": args.concurrent_steps,
                "per_step_p50_ms": round3(p50), "per_step_p99_ms": round3(quantile(&per, 0.99)),
                "per_step_min_ms": round3(quantile(&per, 0.0)), "per_step_max_ms": round3(quantile(&per, 1.0)),
                "gap_mean_p50_ms": round3(quantile(&times.iter().map(|t| t.gap_mean_ms).collect::<Vec<_>>(), 0.5)),
                "steps_per_s": steps_per_s.round(), "hook_phase_s": round3((last - first) as f64 / 1000.0),
                "first_hook_spread_ms": first_spread, "last_hook_spread_ms": last_spread,
                "submit_all_s": round3(submitted.as_secs_f64()), "submit_to_all_ended_s": round3(wall.as_secs_f64()),
                "ratio_to_single_same_steps": round3(p50 / single_m.per_step_ms), "ratio_to_single_200": round3(p50 / single_med),
                "ratio_to_commit_p50": round3(p50 / floor_before),
                "probe_commit_p50_ms": round3(probe_p50), "probe_ops": probe_lat.len()}));
            let (cpu, md) = procs.report(&format!("{n} dest, {k} node(s), N={}", args.concurrent_steps), &cpu0, &cpu1, &samples, &[(first, last)], total_steps);
            println!("{cpu}");
            md_cpu.push_str(&md);
            rows.push(Row {
                run: "concurrent".into(),
                destinations: n,
                nodes: k,
                steps: args.concurrent_steps,
                p50,
                p99: quantile(&per, 0.99),
                steps_per_s,
                floor_ratio: p50 / floor_before,
                single_ratio: Some(p50 / single_m.per_step_ms),
                gap: quantile(&times.iter().map(|t| t.gap_mean_ms).collect::<Vec<_>>(), 0.5),
                exec: quantile(&times.iter().map(|t| t.exec_mean_ms).collect::<Vec<_>>(), 0.5),
            });
            probes.push((n, k, probe_lat));
            if n == max_dests && concurrent_values.is_empty() {
                concurrent_values = all;
            }
        }

        // ---- floor after
        let after = commit_floor(&cluster, args.floor_ops, "after").await?;
        let floor_after = percentile(after.clone(), 0.5);
        println!("{}", json!({"mode": "steps", "run": "commit_floor", "when": "after", "ops": after.len(),
                              "p50_ms": round3(floor_after), "p99_ms": round3(percentile(after, 0.99))}));

        // ---- what fleet-core does per step, on this run's deployments
        let big = core_costs(single_values.last().context("no single run")?)?;
        let small = core_costs(concurrent_values.first().unwrap_or(&d))?;
        let active = max_dests as f64;
        let (journal_bytes, journal_file_ms, journal_json_ms) = journal_cost(&nodes[0])?;
        println!("{}", json!({"mode": "steps", "run": "node_journal", "line_bytes": journal_bytes,
            "append_fdatasync_p50_ms": round3(journal_file_ms), "json_encode_p50_ms": round3(journal_json_ms)}));
        println!("{}", json!({"mode": "steps", "run": "core_costs", "steps": args.steps,
            "record_encode_us_per_step": round3(big.record_encode_us), "encoded_bytes_mean": big.encoded_bytes.round(),
            "clone_next_us_per_deployment": round3(big.clone_next_us)}));
        println!("{}", json!({"mode": "steps", "run": "core_costs", "steps": args.concurrent_steps,
            "record_encode_us_per_step": round3(small.record_encode_us), "encoded_bytes_mean": small.encoded_bytes.round(),
            "clone_next_us_per_deployment": round3(small.clone_next_us),
            "scheduler_pass_us_with_all_active": round3(small.clone_next_us * active)}));

        // ---- tables
        println!("\nmachine: {} cores; 3 coordinators (default Raft timings), release build", cores());
        println!("commit floor (1 client, lock acquire/release p50): before {floor_before:.3} ms, after {floor_after:.3} ms; physical: {physical}");
        println!(
            "append + fdatasync p50 by size: {}",
            fsyncs.iter().map(|(b, ms)| format!("{} B {ms:.3} ms", b)).collect::<Vec<_>>().join(", ")
        );
        for (n, k, p) in &probes {
            if !p.is_empty() {
                println!("commit latency during the concurrent run ({n} destinations, {k} node(s)): p50 {:.3} ms, p99 {:.3} ms ({} probe ops)", percentile(p.clone(), 0.5), percentile(p.clone(), 0.99), p.len());
            }
        }
        println!("\n| run | destinations | nodes | hooks each | per-step p50 ms | per-step p99 ms | gap ms | exec ms | steps/s | × commit p50 | × single (same N) |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.2} | {} |",
                r.run, r.destinations, r.nodes, r.steps, r.p50, r.p99, r.gap, r.exec, r.steps_per_s, r.floor_ratio,
                r.single_ratio.map(|x| format!("{x:.2}")).unwrap_or_else(|| "—".into())
            );
        }
        println!("\n| phase | process | CPU ms (hook steps) | CPU µs/step | disk KiB/step (phase) | busiest threads (phase) |\n|---|---|---|---|---|---|");
        print!("{md_cpu}");
        println!("\n| fleet-core per step (in-process) | N={} | N={} |\n|---|---|---|", args.steps, args.concurrent_steps);
        println!("| `record` + re-encode deployment (state.rs `step_result`/`put_deployment`), µs | {:.1} | {:.1} |", big.record_encode_us, small.record_encode_us);
        println!("| encoded deployment, bytes (mean over the run) | {:.0} | {:.0} |", big.encoded_bytes, small.encoded_bytes);
        println!("| clone + `next()` + drop of one deployment (scheduler.rs, per active deployment per wake), µs | {:.1} | {:.1} |", big.clone_next_us, small.clone_next_us);
        println!("| one scheduler pass with {max_dests} active deployments, µs | | {:.0} |", small.clone_next_us * active);
        print!("{md_perf}");
        println!("\nfleet-node, per result before it is sent (journal.rs `Journal::append`): a line of {journal_bytes} bytes, append + fdatasync p50 {journal_file_ms:.3} ms (shared by results finishing together), JSON encode p50 {journal_json_ms:.3} ms");

        let aim1 = single_med <= 1.5 * floor_before;
        println!("\naim: per-step ≤ 1.5 × commit p50: {:.3} ms vs {:.3} ms → {:.2}× — {}", single_med, floor_before, single_med / floor_before, if aim1 { "met" } else { "NOT met" });
        for r in rows.iter().filter(|r| r.run == "concurrent") {
            let x = r.single_ratio.unwrap_or(f64::NAN);
            println!(
                "aim: {} destinations at once ({} node(s)) ≤ 2 × single per-step: {:.2}× (vs N={}), {:.2}× (vs N={}) — {}",
                r.destinations, r.nodes, x, args.concurrent_steps, r.p50 / single_med, args.steps, if x <= 2.0 { "met" } else { "NOT met" }
            );
        }
        println!("total bench time {:.1} s", started.elapsed().as_secs_f64());
        anyhow::Ok(())
    }
    .await;
    // Nodes (and the app instances they started) go before the cluster.
    drop(nodes);
    drop(cluster);
    result
}
