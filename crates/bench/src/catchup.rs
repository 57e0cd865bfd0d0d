//! `fleet-bench catchup`: how long a new coordinator takes to catch up
//! with a cluster holding a large state.
//!
//! A 3-coordinator cluster is filled with locks whose reasons are
//! `--reason-kib` KiB of random letters (each lock and the answer its
//! request id remembers are state) until about `--state-mb` MB were
//! written; the coordinators snapshot every `--snapshot-logs` entries and
//! purge the log behind, so a new member is sent the snapshot and then the
//! entries after it. Then, `--joins` times, a fresh coordinator starts and
//! `fleetctl cluster add-learner` adds it (the call returns once the
//! learner has replicated everything the leader had); the time until it
//! returns, and until the learner has applied that index, is reported with
//! the leader's snapshot size, and the learner is removed again.
//!
//! Before the fill, `--destinations` destinations are defined, and each
//! coordinator's RSS and idle CPU are measured with them.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fleet_tests::harness::{acquire, eventually, Cluster};
use serde_json::json;

use crate::locks::{percentile, round3};
use crate::procstat;

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
    let mut s = String::new();
    let read = std::fs::File::open(format!("/proc/{pid}/status")).and_then(|mut f| f.read_to_string(&mut s));
    if read.is_err() {
        return f64::NAN;
    }
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!((1..=16).contains(&args.reason_kib), "--reason-kib must be 1..=16 (the API refuses longer reasons)");
    let snapshot_logs = args.snapshot_logs.to_string();
    let mut cluster = Cluster::start(3, &["--snapshot-logs", &snapshot_logs]).await?;

    // ---- destinations, applied 1,000 per command
    let started = Instant::now();
    for chunk in (0..args.destinations).collect::<Vec<_>>().chunks(1000) {
        let yaml: String = std::iter::once("destinations:\n".to_string())
            .chain(chunk.iter().map(|i| format!("  - name: scale-{i}\n    selector: {{ pool: p{} }}\n", i % 100)))
            .collect();
        let file = cluster.path().join("scale-destinations.yaml");
        std::fs::write(&file, yaml)?;
        let out = cluster.fleetctl("operator", &["destinations", "apply", "-f", &file.display().to_string(), "-o", "json"])?;
        ensure!(out.status.success(), "destinations apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let applied_s = started.elapsed().as_secs_f64();
    let pids: Vec<(u64, u32)> = cluster.coords.iter().filter_map(|(id, c)| Some((*id, c.child.as_ref()?.id()))).collect();
    let leader_id = cluster.status().await?.leader_id;
    let before: Vec<f64> = pids.iter().map(|(_, p)| procstat::cpu_ms(*p)).collect();
    tokio::time::sleep(args.idle).await;
    let idle_cpu: Vec<f64> =
        pids.iter().zip(&before).map(|((_, p), b)| (procstat::cpu_ms(*p) - b) / args.idle.as_millis() as f64).collect();
    let rss_idle: Vec<f64> = pids.iter().map(|(_, p)| rss_mib(*p)).collect();
    println!(
        "{}",
        json!({"run": "scale_destinations", "destinations": args.destinations, "apply_s": round3(applied_s), "leader": leader_id,
               "idle_cpu_cores": idle_cpu.iter().map(|c| round3(*c)).collect::<Vec<_>>(),
               "rss_mib": rss_idle.iter().map(|r| round3(*r)).collect::<Vec<_>>()})
    );

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
    let leader = eventually("a snapshot on the leader with its log purged behind it", Duration::from_secs(120), || async {
        let s = cluster.status().await?;
        Ok((s.snapshot_index > 0 && s.purged_index > 0 && s.locks as usize >= locks).then_some(s))
    })
    .await?;
    let rss: Vec<f64> = cluster.coords.values().filter_map(|c| c.child.as_ref()).map(|c| rss_mib(c.id())).collect();
    println!(
        "{}",
        json!({"run": "catchup_fill", "locks": locks, "reason_bytes": reason_bytes, "fill_s": round3(fill_s),
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
    println!(
        "{} destinations: coordinators idle at {} of a core (leader {leader_id}), RSS {}",
        args.destinations,
        idle_cpu.iter().map(|c| format!("{c:.3}")).collect::<Vec<_>>().join(", "),
        rss_idle.iter().map(|r| format!("{r:.0} MiB")).collect::<Vec<_>>().join(", ")
    );
    println!("coordinator RSS after the fill: {}", rss.iter().map(|r| format!("{r:.0} MiB")).collect::<Vec<_>>().join(", "));
    println!("\n| new member | joins | p50 s | max s |\n|---|---|---|---|");
    for (what, times) in [("add-learner returned (replicated)", &replicated), ("learner applied the leader's index", &applied)] {
        let q = |f| percentile(times.clone(), f) / 1000.0;
        println!("| {what} | {} | {:.3} | {:.3} |", times.len(), q(0.5), q(1.0));
    }
    Ok(())
}
