//! `fleet-bench sagas`: how long deployments stand still when the leader
//! is killed in the middle of them.
//!
//! A 3-coordinator cluster (default Raft timings, release binaries) with
//! two real `fleet-node`s and a `command` destination that selects both.
//! `--kills` times: a deployment of `--steps` steps (`--step-cmd` each, run
//! by the nodes' shell) is submitted; once `--after` of its steps have
//! finished, the leader is killed with SIGKILL; the deployment must still
//! succeed, and the killed coordinator is restarted and caught up before
//! the next round.
//!
//! "Progressing again" is read from the deployment's own step records
//! (the nodes' clocks, the same machine as the kill): the steps run one
//! after another, and the first step to start after the kill may already
//! have been assigned by the old leader, so the second one is the first
//! that only a new leader can have sent. Time to progress = its start −
//! the kill (at most one step's run time too long).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use fleet_net::now_ms;
use fleet_tests::harness::{eventually, Fleet};
use serde_json::{json, Value};

use crate::locks::{percentile, round3};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Leader kills (one deployment each).
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Steps of each deployment (at most 256).
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// What each step runs (through the node's shell).
    #[arg(long, default_value = "sleep 0.02")]
    pub step_cmd: String,
    /// Steps finished before the kill.
    #[arg(long, default_value_t = 20)]
    pub after: usize,
}

fn finished(d: &Value) -> usize {
    d["steps"].as_array().map_or(0, |s| s.iter().filter(|x| x["finished_ms"].as_i64().is_some()).count())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!((2..=256).contains(&args.steps) && args.after + 2 < args.steps, "--steps must be 2..=256 and more than --after + 2");
    let dests = "destinations:\n  - name: ops\n    adapter: command\n    selector: { role: ops }\n";
    let nodes: Vec<(&str, &[(&str, &str)])> = vec![("node-1", &[("role", "ops")]), ("node-2", &[("role", "ops")])];
    let mut f = Fleet::start_with(&[], &nodes, dests).await?;
    let steps: String = (0..args.steps)
        .map(|i| format!("  - {{ name: s{i}, run: {} }}\n", serde_json::to_string(&args.step_cmd).unwrap_or_default()))
        .collect();
    let mut progress = Vec::new();
    let mut elected = Vec::new();
    for k in 0..args.kills {
        let manifest = f.cluster.write_file("sagas.yaml", &format!("app: sagas\ndestination: ops\ntimeout: 10m\nsteps:\n{steps}"))?;
        let submitted = f.cluster.deploy(&manifest, &["--release", &format!("v{k}"), "--detach"]).await?;
        submitted.expect_code(0)?;
        let id = submitted.id()?;
        let cluster = &f.cluster;
        eventually(&format!("{} steps of {id} to finish", args.after), Duration::from_secs(120), || async {
            Ok((finished(&serde_json::to_value(cluster.deployment(&id).await?)?) >= args.after).then_some(()))
        })
        .await?;
        let old = f.cluster.status().await?;
        let t = Instant::now();
        let kill_ms = now_ms();
        f.cluster.kill9(old.leader_id)?;
        let cluster = &f.cluster;
        let new = eventually("a new leader", Duration::from_secs(30), || async {
            let s = cluster.status().await?;
            Ok((s.leader_id != 0 && s.leader_id != old.leader_id).then_some(s))
        })
        .await?;
        let leader_s = t.elapsed().as_secs_f64();
        let watched = f.cluster.ctl(&["watch", &id, "-o", "json"]).await?;
        watched.expect_code(0).with_context(|| format!("{id} after the kill of coordinator {}", old.leader_id))?;
        let d = serde_json::to_value(f.cluster.deployment(&id).await?)?;
        ensure!(d["state"] == "succeeded", "{id} ended {} after the kill", d["state"]);
        let mut starts: Vec<i64> =
            d["steps"].as_array().context("no steps")?.iter().filter_map(|s| s["started_ms"].as_i64()).filter(|t| *t > kill_ms).collect();
        starts.sort_unstable();
        let second = *starts.get(1).context("fewer than two steps started after the kill")?;
        let took = Duration::from_millis((second - kill_ms).max(0) as u64);
        println!(
            "{}",
            json!({"run": "saga_leader_kill", "kill": k + 1, "deployment": id, "killed": old.leader_id, "new_leader": new.leader_id,
                   "term": new.term, "leader_found_s": round3(leader_s), "progress_s": round3(took.as_secs_f64())})
        );
        progress.push(took);
        elected.push(Duration::from_secs_f64(leader_s));
        // Back to three before the next round.
        f.cluster.restart(old.leader_id)?;
        let cluster = &f.cluster;
        let target = cluster.status().await?.last_log_index;
        eventually("the restarted coordinator to catch up", Duration::from_secs(60), || async {
            let s = cluster.local_status(old.leader_id).await?;
            Ok((s.applied_index >= target).then_some(()))
        })
        .await?;
    }
    println!("\n| kill -9 of the leader mid-deploy ({} kills) | p50 s | p99 s | max s |\n|---|---|---|---|", args.kills);
    for (what, v) in
        [("a new leader answers cluster status", &elected), ("the saga progressing again (a step started by the new leader)", &progress)]
    {
        let q = |p| percentile(v.clone(), p) / 1000.0;
        println!("| {what} | {:.3} | {:.3} | {:.3} |", q(0.5), q(0.99), q(1.0));
    }
    f.finish(Ok(()));
    Ok(())
}
