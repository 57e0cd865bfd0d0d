//! `fleet-bench catchup`: scale and catch-up on one 3-coordinator cluster.
//!
//! 1. `--destinations` destinations are defined (`process`, each with its
//!    sync task on the leader); each coordinator's RSS and idle CPU.
//! 2. `--sim-nodes` simulated nodes connect (see [`crate::simnode`]: the
//!    real work stream and a certificate each, the steps answered at once);
//!    the time until the leader lists them all connected, then each
//!    coordinator's RSS and CPU while they heartbeat, and how many Raft
//!    entries that idle time cost (heartbeats must not be writes).
//! 3. `--sim-deployments` `command` deployments at once over those nodes:
//!    steps/s and the coordinators' CPU. With `--history N`, N more
//!    deployments follow in waves of as many, reporting the coordinators'
//!    RSS and the snapshot's size as the history grows past what it keeps.
//! 4. The cluster is filled with locks whose reasons are `--reason-kib`
//!    KiB of random letters (each lock and the answer its request id
//!    remembers are state) until about `--state-mb` MB were written; the
//!    coordinators snapshot every `--snapshot-logs` entries and purge the
//!    log behind, so a new member is sent the snapshot and then the
//!    entries after it.
//! 5. `--joins` times, a fresh coordinator starts and `fleetctl cluster
//!    add-learner` adds it; the time until that returns, and until the
//!    learner has applied the leader's last index, is reported with the
//!    leader's snapshot size, and the learner is removed again.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fleet_tests::harness::{acquire, eventually, Cluster};
use serde_json::json;

use crate::locks::{percentile, round3};
use crate::procstat;
use crate::simnode::SimNodes;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// About this much state (MB of lock reasons written) before the first join.
    #[arg(long, default_value_t = 100)]
    pub state_mb: u64,
    /// Size of each lock's reason, in KiB (at most 16, the API's limit).
    #[arg(long, default_value_t = 15)]
    pub reason_kib: usize,
    /// Concurrent clients filling the state.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// The coordinators build a snapshot every this many log entries.
    #[arg(long, default_value_t = 1000)]
    pub snapshot_logs: u64,
    /// New members to time, one after another (each is removed after).
    #[arg(long, default_value_t = 3)]
    pub joins: usize,
    /// Destinations defined before the fill (`process` destinations, each
    /// with its sync task on the leader); the coordinators' RSS and the
    /// leader's idle CPU are measured with them.
    #[arg(long, default_value_t = 10_000)]
    pub destinations: usize,
    /// Simulated worker nodes connected after the destinations are defined
    /// (the real protocol and a certificate each; see `simnode`). They stay
    /// connected through the fill and the joins.
    #[arg(long, default_value_t = 1000)]
    pub sim_nodes: usize,
    /// `command` deployments run at once over the simulated nodes (each on
    /// a destination of its own that selects 10 of them).
    #[arg(long, default_value_t = 100)]
    pub sim_deployments: usize,
    /// Steps of each of those deployments.
    #[arg(long, default_value_t = 20)]
    pub sim_steps: usize,
    /// Then this many more deployments over the simulated nodes, in waves
    /// of `--sim-deployments` (a new release on each of the same
    /// destinations per wave), reporting the coordinators' RSS and the
    /// snapshot's size as the history grows past what it keeps (the
    /// newest 1,000 ended deployments with their step records, 10,000 in
    /// all besides the current releases).
    #[arg(long, default_value_t = 0)]
    pub history: usize,
    /// How long the idle CPU of each coordinator is measured.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub idle: Duration,
}

/// `n` random ASCII letters (the reason must be text; random so that
/// nothing on the way compresses it away).
fn letters(n: usize, seed: &mut u64) -> String {
    (0..n)
        .map(|_| {
            // xorshift64
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (b'a' + (*seed % 26) as u8) as char
        })
        .collect()
}

fn rss_mib(pid: u32) -> f64 {
    fleet_net::resident_bytes(pid).map_or(f64::NAN, |b| b as f64 / 1048576.0)
}

/// Destinations select `pool: pN` for N below this, and simulated node j
/// carries `pool: p(j mod POOLS)`: with 10,000 destinations and 1,000
/// nodes, each destination has 10 nodes and each node serves 100.
const POOLS: usize = 100;

/// Define `entries` (YAML list items), 1,000 per `destinations apply`.
fn apply_destinations(cluster: &Cluster, entries: &[String]) -> anyhow::Result<()> {
    for chunk in entries.chunks(1000) {
        let yaml: String = std::iter::once("destinations:\n".to_string()).chain(chunk.iter().cloned()).collect();
        let file = cluster.path().join("scale-destinations.yaml");
        std::fs::write(&file, yaml)?;
        let out = cluster.fleetctl("operator", &["destinations", "apply", "-f", &file.display().to_string(), "-o", "json"])?;
        ensure!(out.status.success(), "destinations apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Each coordinator's CPU (cores) over `span` and its RSS (MiB) after it.
async fn idle(pids: &[(u64, u32)], span: Duration) -> (Vec<f64>, Vec<f64>) {
    let before: Vec<f64> = pids.iter().map(|(_, p)| procstat::cpu_ms(*p)).collect();
    tokio::time::sleep(span).await;
    let cpu = pids.iter().zip(&before).map(|((_, p), b)| (procstat::cpu_ms(*p) - b) / span.as_millis() as f64).collect();
    (cpu, pids.iter().map(|(_, p)| rss_mib(*p)).collect())
}

/// The nodes the leader lists as connected.
async fn connected_nodes(c: &mut fleetctl::client::Client) -> anyhow::Result<usize> {
    let r = c.unary(fleet_proto::ListNodesRequest {}, |mut cl, r| async move { cl.list_nodes(r).await }).await?;
    let mut n = 0;
    for j in &r.nodes_json {
        let node: fleetctl::output::NodeRecord = serde_json::from_str(j)?;
        n += usize::from(node.connected);
    }
    Ok(n)
}

/// No Raft entry for this long: the log has settled (longer than the
/// cluster's sync interval, so a sync round's late writes come before it).
const SETTLED_AFTER: Duration = Duration::from_secs(6);

/// Start `--sim-nodes` simulated nodes, time until the leader lists them
/// all connected, then measure each coordinator's CPU and RSS while they
/// only heartbeat, and how many Raft entries that idle time cost.
async fn sim_nodes(cluster: &Cluster, args: &Args, pids: &[(u64, u32)]) -> anyhow::Result<SimNodes> {
    let n = args.sim_nodes;
    let nodes: Vec<(String, Vec<(String, String)>)> =
        (0..n).map(|j| (format!("sim-{j}"), vec![("pool".to_string(), format!("p{}", j % POOLS))])).collect();
    let t0 = Instant::now();
    let sims = SimNodes::start(&cluster.path().join("certs"), &nodes, &cluster.addrs())?;
    let issued_s = t0.elapsed().as_secs_f64();
    eventually(&format!("the leader to list {n} simulated nodes connected"), Duration::from_secs(300), || async {
        let mut c = cluster.client("operator")?;
        let listed = connected_nodes(&mut c).await?;
        if listed >= n {
            return Ok(Some(()));
        }
        // Said in the timeout's error: how far it got, and whether the
        // leader or the simulated nodes fell short.
        let s = &sims.stats;
        anyhow::bail!(
            "the leader lists {listed} of {n} connected; the simulated nodes count {} streams up, {} sessions, {} stream failures",
            s.connected.load(Ordering::Relaxed),
            s.sessions.load(Ordering::Relaxed),
            s.failures.load(Ordering::Relaxed)
        )
    })
    .await?;
    let connected_s = t0.elapsed().as_secs_f64();
    // The nodes' registrations and the sync's server records (a
    // destination's servers are the nodes it selects) are Raft writes;
    // wait until the log stops growing for longer than a sync round
    // (5 s by default) before measuring the idle: with a shorter wait, a
    // round that finds the reports of nodes that connected late wrote in
    // the idle window (45 and 116 entries in two runs).
    let start_index = cluster.status().await?.last_log_index;
    let mut stable = (start_index, Instant::now());
    let settle_by = Instant::now() + Duration::from_secs(120);
    while stable.1.elapsed() < SETTLED_AFTER && Instant::now() < settle_by {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let index = cluster.status().await?.last_log_index;
        if index != stable.0 {
            stable = (index, Instant::now());
        }
    }
    let settled_s = t0.elapsed().as_secs_f64();
    let leader = cluster.status().await?;
    let beats = sims.stats.heartbeats.load(Ordering::Relaxed);
    let (cpu, rss) = idle(pids, args.idle).await;
    let after = cluster.status().await?;
    let beats = sims.stats.heartbeats.load(Ordering::Relaxed) - beats;
    let sessions = sims.stats.sessions.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({"run": "scale_nodes", "nodes": n, "certificates_issued_s": round3(issued_s), "all_connected_s": round3(connected_s),
               "log_settled_s": round3(settled_s), "raft_entries_until_settled": leader.last_log_index - start_index,
               "heartbeats_per_s": round3(beats as f64 / args.idle.as_secs_f64()), "sessions": sessions,
               "raft_entries_while_idle": after.last_log_index - leader.last_log_index,
               "idle_cpu_cores": cpu.iter().map(|c| round3(*c)).collect::<Vec<_>>(),
               "rss_mib": rss.iter().map(|r| round3(*r)).collect::<Vec<_>>()})
    );
    println!(
        "{n} simulated nodes (+ {} destinations): all connected after {connected_s:.1} s, the log settled after {settled_s:.1} s \
         ({} entries); then {:.0} heartbeats/s; {} Raft entries in {:?} of idle; CPU {} of a core; RSS {}",
        args.destinations,
        leader.last_log_index - start_index,
        beats as f64 / args.idle.as_secs_f64(),
        after.last_log_index - leader.last_log_index,
        args.idle,
        cpu.iter().map(|c| format!("{c:.3}")).collect::<Vec<_>>().join(", "),
        rss.iter().map(|r| format!("{r:.0} MiB")).collect::<Vec<_>>().join(", ")
    );
    Ok(sims)
}

/// `--sim-deployments` `command` deployments at once, each of
/// `--sim-steps` steps, every step run by one of the 10 simulated nodes of
/// its destination's pool; reports steps/s and the coordinators' CPU.
async fn sim_deployments(cluster: &Cluster, args: &Args, pids: &[(u64, u32)], sims: &SimNodes) -> anyhow::Result<()> {
    let k = args.sim_deployments;
    let dests: Vec<String> =
        (0..k).map(|i| format!("  - name: simcmd-{i}\n    adapter: command\n    selector: {{ pool: p{} }}\n", i % POOLS)).collect();
    apply_destinations(cluster, &dests)?;
    let mut c = cluster.client("operator")?;
    let cpu0: Vec<f64> = pids.iter().map(|(_, p)| procstat::cpu_ms(*p)).collect();
    let steps0 = sims.stats.steps.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let (ids, submit_s, all) = wave(cluster, args, "v1").await?;
    let took = t0.elapsed().as_secs_f64();
    // What one (linearizable) read of a deployment costs now, at this scale.
    let mut reads = Vec::new();
    for id in ids.iter().take(20) {
        let t = Instant::now();
        crate::steps::get_deployment(&mut c, id).await?;
        reads.push(t.elapsed());
    }
    let read_p50 = percentile(reads, 0.5);
    let cpu: Vec<f64> = pids.iter().zip(&cpu0).map(|((_, p), b)| (procstat::cpu_ms(*p) - b) / 1000.0 / took).collect();
    let ran = sims.stats.steps.load(Ordering::Relaxed) - steps0;
    // A simulated node answers at once, stamping started = finished = now:
    // the gap from one step's finish to the next one's start is the
    // coordinators' round trip between two steps.
    let mut gaps = Vec::new();
    for d in &all {
        let steps = d["steps"].as_array().context("a deployment without steps")?;
        for w in steps.windows(2) {
            if let (Some(f), Some(s)) = (w[0]["finished_ms"].as_i64(), w[1]["started_ms"].as_i64()) {
                gaps.push(Duration::from_millis((s - f).max(0) as u64));
            }
        }
    }
    ensure!(!gaps.is_empty(), "no step records with times");
    // The sagas' own span: first step started to last step finished.
    let times = |f: &'static str| -> Vec<i64> {
        all.iter().filter_map(|d| d["steps"].as_array()).flat_map(|st| st.iter().filter_map(|x| x[f].as_i64())).collect()
    };
    let (first, last) = (times("started_ms").into_iter().min().unwrap_or(0), times("finished_ms").into_iter().max().unwrap_or(0));
    let span_s = (last - first).max(1) as f64 / 1000.0;
    let (p50, p99) = (percentile(gaps.clone(), 0.5), percentile(gaps, 0.99));
    println!(
        "{}",
        json!({"run": "scale_deployments", "deployments": k, "steps_each": args.sim_steps, "steps_run": ran,
               "submit_s": round3(submit_s), "until_all_ended_s": round3(took), "sagas_span_s": round3(span_s),
               "steps_per_s": round3(ran as f64 / span_s), "step_gap_p50_ms": p50, "step_gap_p99_ms": p99,
               "get_deployment_p50_ms": round3(read_p50),
               "cpu_cores": cpu.iter().map(|c| round3(*c)).collect::<Vec<_>>()})
    );
    println!(
        "{k} command deployments of {} steps over the simulated nodes: all succeeded; submitted in {submit_s:.1} s, \
         first step to last in {span_s:.2} s ({:.0} steps/s), {p50:.1} ms p50 / {p99:.1} ms p99 between steps; \
         coordinator CPU {} of a core until all ended ({took:.1} s); a deployment read then took {read_p50:.1} ms (p50 of 20)",
        args.sim_steps,
        ran as f64 / span_s,
        cpu.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// One deployment of release `release` on each of the `--sim-deployments`
/// `simcmd-` destinations, submitted by 16 clients at once (so the sagas
/// overlap); waits until all ended and checks they succeeded. Returns
/// their ids, how long the submits took (s), and each as it ended.
async fn wave(cluster: &Cluster, args: &Args, release: &str) -> anyhow::Result<(Vec<String>, f64, Vec<serde_json::Value>)> {
    let k = args.sim_deployments;
    let steps: String = (0..args.sim_steps).map(|s| format!("  - {{ name: s{s}, run: \"true\" }}\n")).collect();
    let mut c = cluster.client("operator")?;
    let locks_before = cluster.status().await?.locks;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..16.min(k) {
        let mut c = cluster.client("operator")?;
        let (steps, release) = (steps.clone(), release.to_string());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (w..k).step_by(16) {
                let yaml = format!("app: sim{i}\nrelease: {release}\ndestination: simcmd-{i}\nsteps:\n{steps}");
                ids.push(crate::steps::submit(&mut c, &yaml).await?);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::with_capacity(k);
    for t in tasks {
        ids.extend(t.await??);
    }
    let submit_s = t0.elapsed().as_secs_f64();
    let all = crate::steps::wait_terminal(&mut c, &ids, locks_before, Duration::from_secs(600)).await?;
    let failed: Vec<String> = all
        .iter()
        .filter(|d| d["state"] != "succeeded")
        .map(|d| format!("{} {}: {}", d["id"], d["state"], crate::steps::last_event(d)))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {k} deployments of {release} did not succeed: {}",
        failed.len(),
        failed.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
    );
    Ok((ids, submit_s, all))
}

/// RocksDB's memory by part on coordinator `id`, in MiB, from its
/// `/metrics` (memtables, block cache, table readers); `None` from a build
/// that does not report it.
async fn rocksdb_mib(cluster: &Cluster, id: u64) -> anyhow::Result<Option<[f64; 3]>> {
    let answer = fleet_tests::https::Https::new(cluster, id, "operator")?.get("/metrics").await?;
    answer.expect(200)?;
    let part = |p: &str| {
        let prefix = format!("fleet_rocksdb_memory_bytes{{part=\"{p}\"}} ");
        answer.body.lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse::<f64>().ok()).map(|b| b / 1048576.0)
    };
    Ok(match (part("memtables"), part("block_cache"), part("table_readers")) {
        (Some(m), Some(c), Some(t)) => Some([m, c, t]),
        _ => None,
    })
}

/// Coordinator `id`'s snapshot builds so far, from its `/metrics`: how
/// many, the mean time each held the applied state, and the upper bound of
/// the histogram bucket the longest fell in; `None` from a build that does
/// not report it.
async fn snapshot_holds(cluster: &Cluster, id: u64) -> anyhow::Result<Option<(u64, f64, f64)>> {
    const METRIC: &str = "fleet_snapshot_build_hold_seconds";
    let answer = fleet_tests::https::Https::new(cluster, id, "operator")?.get("/metrics").await?;
    answer.expect(200)?;
    let value =
        |name: String| answer.body.lines().find_map(|l| l.strip_prefix(name.as_str())?.strip_prefix(' ')?.trim().parse::<f64>().ok());
    let (Some(sum), Some(count)) = (value(format!("{METRIC}_sum")), value(format!("{METRIC}_count"))) else { return Ok(None) };
    if count == 0.0 {
        return Ok(Some((0, 0.0, 0.0)));
    }
    // Buckets are cumulative: the first bound that holds every build.
    let bucket = format!("{METRIC}_bucket{{le=\"");
    let longest = answer
        .body
        .lines()
        .filter_map(|l| {
            let (le, n) = l.strip_prefix(bucket.as_str())?.split_once("\"} ")?;
            Some((le.parse::<f64>().unwrap_or(f64::INFINITY), n.trim().parse::<f64>().ok()?))
        })
        .find(|&(_, n)| n >= count)
        .map_or(f64::INFINITY, |(le, _)| le);
    Ok(Some((count as u64, sum / count, longest)))
}

/// `--history` deployments after the first wave, in waves: the
/// coordinators' RSS and the leader's snapshot as the history grows, about
/// ten times along the way.
async fn history(cluster: &Cluster, args: &Args, pids: &[(u64, u32)]) -> anyhow::Result<()> {
    let k = args.sim_deployments;
    let waves = args.history.div_ceil(k);
    let report_every = waves.div_ceil(10).max(1);
    println!(
        "\n| deployments | RSS MiB (each coordinator) | RocksDB MiB: memtables + block cache + table readers (each) | leader snapshot MB | s per wave |\n|---|---|---|---|---|"
    );
    let mut stretch = Instant::now();
    for wv in 1..=waves {
        wave(cluster, args, &format!("h{wv}")).await?;
        if wv % report_every == 0 || wv == waves {
            let per_wave_s = stretch.elapsed().as_secs_f64() / (((wv - 1) % report_every) + 1) as f64;
            let status = cluster.status().await?;
            let rss: Vec<f64> = pids.iter().map(|(_, p)| rss_mib(*p)).collect();
            let mut rocks = Vec::new();
            for (id, _) in pids {
                rocks.push(rocksdb_mib(cluster, *id).await?);
            }
            let done = k * (wv + 1);
            println!(
                "{}",
                json!({"run": "history", "deployments": done, "steps_each": args.sim_steps, "rss_mib": rss.iter().map(|r| round3(*r)).collect::<Vec<_>>(),
                       "rocksdb_mib": rocks.iter().map(|r| r.map(|parts| parts.map(round3))).collect::<Vec<_>>(),
                       "snapshot_bytes": status.snapshot_bytes, "snapshot_index": status.snapshot_index, "s_per_wave": round3(per_wave_s)})
            );
            println!(
                "| {done} | {} | {} | {:.1} | {per_wave_s:.2} |",
                rss.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" / "),
                rocks
                    .iter()
                    .map(|r| r.map(|[m, c, t]| format!("{m:.0}+{c:.0}+{t:.0}")).unwrap_or_else(|| "-".into()))
                    .collect::<Vec<_>>()
                    .join(" / "),
                status.snapshot_bytes as f64 / 1e6
            );
            stretch = Instant::now();
        }
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!((1..=16).contains(&args.reason_kib), "--reason-kib must be 1..=16 (the API refuses longer reasons)");
    let snapshot_logs = args.snapshot_logs.to_string();
    let mut cluster = Cluster::start(3, &["--snapshot-logs", &snapshot_logs]).await?;

    // ---- destinations, applied 1,000 per command
    let started = Instant::now();
    let dests: Vec<String> =
        (0..args.destinations).map(|i| format!("  - name: scale-{i}\n    selector: {{ pool: p{} }}\n", i % POOLS)).collect();
    apply_destinations(&cluster, &dests)?;
    let applied_s = started.elapsed().as_secs_f64();
    let pids: Vec<(u64, u32)> = cluster.coords.iter().filter_map(|(id, c)| Some((*id, c.child.as_ref()?.id()))).collect();
    let leader_id = cluster.status().await?.leader_id;
    let (idle_cpu, rss_idle) = idle(&pids, args.idle).await;
    println!(
        "{}",
        json!({"run": "scale_destinations", "destinations": args.destinations, "apply_s": round3(applied_s), "leader": leader_id,
               "idle_cpu_cores": idle_cpu.iter().map(|c| round3(*c)).collect::<Vec<_>>(),
               "rss_mib": rss_idle.iter().map(|r| round3(*r)).collect::<Vec<_>>()})
    );

    // ---- simulated nodes: connect, then idle with their heartbeats
    let sims = if args.sim_nodes > 0 { Some(sim_nodes(&cluster, &args, &pids).await?) } else { None };
    if let (Some(sims), true) = (&sims, args.sim_deployments > 0) {
        sim_deployments(&cluster, &args, &pids, sims).await?;
        if args.history > 0 {
            history(&cluster, &args, &pids).await?;
        }
    }

    // ---- fill
    let reason_bytes = args.reason_kib * 1024;
    let locks = (args.state_mb as usize * 1_000_000).div_ceil(reason_bytes);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.clients {
        let mut c = cluster.client("operator")?;
        let clients = args.clients;
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
            for i in (w..locks).step_by(clients) {
                let reason = letters(reason_bytes, &mut seed);
                let (dest, id) = (format!("fill-{i}"), format!("fill-{i}"));
                acquire(&mut c, &dest, &reason, &id).await.with_context(|| format!("filling: lock {dest}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let fill_s = started.elapsed().as_secs_f64();
    // The leader batches concurrent requests into one entry, so the fill
    // may have made fewer entries than a purge needs (two snapshots'
    // worth): one client's small writes are one entry each.
    let mut c = cluster.client("operator")?;
    let mut pads = 0;
    while pads < 10 * args.snapshot_logs && (pads % 50 != 0 || cluster.status().await?.purged_index == 0) {
        acquire(&mut c, &format!("pad-{pads}"), "pad", &format!("pad-{pads}")).await?;
        pads += 1;
    }
    let held = locks + pads as usize;
    let leader = eventually("a snapshot on the leader with its log purged behind it", Duration::from_secs(120), || async {
        let s = cluster.status().await?;
        Ok((s.snapshot_index > 0 && s.purged_index > 0 && s.locks as usize >= held).then_some(s))
    })
    .await?;
    let rss: Vec<f64> = cluster.coords.values().filter_map(|c| c.child.as_ref()).map(|c| rss_mib(c.id())).collect();
    println!(
        "{}",
        json!({"run": "catchup_fill", "locks": locks, "small_writes_until_purged": pads, "reason_bytes": reason_bytes, "fill_s": round3(fill_s),
               "mb_per_s": round3(locks as f64 * reason_bytes as f64 / 1e6 / fill_s),
               "leader_last_log_index": leader.last_log_index, "snapshot_index": leader.snapshot_index,
               "snapshot_bytes": leader.snapshot_bytes, "coordinator_rss_mib": rss.iter().map(|r| round3(*r)).collect::<Vec<_>>()})
    );

    // ---- joins
    let mut replicated = Vec::new();
    let mut applied = Vec::new();
    for j in 0..args.joins {
        let id = 4 + j as u64;
        let target = cluster.status().await?;
        cluster.spawn(id, false, "127.0.0.1:0")?;
        let addr = cluster.coords[&id].addr.clone();
        let t0 = Instant::now();
        let out = cluster.fleetctl("operator", &["cluster", "add-learner", &id.to_string(), &addr, "-o", "json"])?;
        let replicated_s = t0.elapsed();
        ensure!(out.status.success(), "add-learner {id}: {}\n{}", String::from_utf8_lossy(&out.stderr), cluster.log_of(id));
        let learner = eventually("the learner to apply what the leader had", Duration::from_secs(120), || async {
            let s = cluster.local_status(id).await?;
            Ok((s.applied_index >= target.last_log_index && s.locks >= target.locks).then_some(s))
        })
        .await?;
        let applied_s = t0.elapsed();
        let pid = cluster.coords[&id].child.as_ref().map(|c| c.id());
        println!(
            "{}",
            json!({"run": "catchup_join", "join": j + 1, "add_learner_returned_s": round3(replicated_s.as_secs_f64()),
                   "applied_s": round3(applied_s.as_secs_f64()), "leader_last_log_index": target.last_log_index,
                   "learner_snapshot_index": learner.snapshot_index, "learner_snapshot_bytes": learner.snapshot_bytes,
                   "learner_locks": learner.locks, "learner_rss_mib": pid.map(|p| round3(rss_mib(p)))})
        );
        replicated.push(replicated_s);
        applied.push(applied_s);
        let out = cluster.fleetctl("operator", &["cluster", "remove", &id.to_string()])?;
        ensure!(out.status.success(), "remove {id}: {}", String::from_utf8_lossy(&out.stderr));
        cluster.kill9(id)?;
    }

    println!(
        "\nstate: {locks} locks of {reason_bytes} B reasons written in {fill_s:.1} s; leader snapshot {:.1} MiB at index {} (log up to {})",
        leader.snapshot_bytes as f64 / (1024.0 * 1024.0),
        leader.snapshot_index,
        leader.last_log_index
    );
    drop(sims);
    println!(
        "{} destinations: coordinators idle at {} of a core (leader {leader_id}), RSS {}",
        args.destinations,
        idle_cpu.iter().map(|c| format!("{c:.3}")).collect::<Vec<_>>().join(", "),
        rss_idle.iter().map(|r| format!("{r:.0} MiB")).collect::<Vec<_>>().join(", ")
    );
    println!("coordinator RSS after the fill: {}", rss.iter().map(|r| format!("{r:.0} MiB")).collect::<Vec<_>>().join(", "));
    let mut holds = Vec::new();
    for id in 1..=3u64 {
        holds.push(match snapshot_holds(&cluster, id).await? {
            Some((n, mean, max)) => format!("c{id}: {n} builds, mean {:.1} ms, longest ≤ {:.0} ms", mean * 1e3, max * 1e3),
            None => format!("c{id}: not reported by this build"),
        });
    }
    println!("snapshot builds' hold on the applied state (writes wait meanwhile): {}", holds.join("; "));
    println!("\n| new member | joins | p50 s | max s |\n|---|---|---|---|");
    for (what, times) in [("add-learner returned (replicated)", &replicated), ("learner applied the leader's index", &applied)] {
        let q = |f| percentile(times.clone(), f) / 1000.0;
        println!("| {what} | {} | {:.3} | {:.3} |", times.len(), q(0.5), q(1.0));
    }
    Ok(())
}
