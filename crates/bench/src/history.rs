//! `fleet-bench history`: what the replicated state holds as deployments
//! accumulate, in one process, without a cluster: the state machine
//! (`fleet_core::state::State`) applies submits and step results for
//! `--deployments` deployments of `--hooks` pre hooks on three nodes, one
//! after another, as a leader would commit them; every `--every`
//! deployments it reports the state's size (what a snapshot holds: keys
//! and bytes), how many deployments still hold their step records, this
//! process's RSS, and the apply time per deployment in that stretch.
//! Compaction and the history bound (`KEEP_STEP_RECORDS`,
//! `KEEP_DEPLOYMENTS`) show as the size levelling off.

use std::time::Instant;

use anyhow::Context;
use fleet_core::command::{Command, Request, Response};
use fleet_core::deploy::StepOutcome;
use fleet_core::manifest::{parse_manifest, Destination, Overrides, QueuePolicy};
use fleet_core::state::State;

#[derive(clap::Args)]
pub struct Args {
    /// Deployments to run, one after another.
    #[arg(long, default_value_t = 20_000)]
    deployments: usize,
    /// Pre hooks per deployment (each a step; three nodes add their own).
    #[arg(long, default_value_t = 10)]
    hooks: usize,
    /// Report every this many deployments.
    #[arg(long, default_value_t = 2_500)]
    every: usize,
}

struct Machine {
    state: State,
    index: u64,
}

impl Machine {
    fn apply(&mut self, command: Command) -> Response {
        self.index += 1;
        let req = Request { request_id: None, at_ms: self.index as i64 * 10, command, origin: None };
        self.state.apply(self.index, &req).0
    }
}

fn rss_mib() -> f64 {
    fleet_net::resident_bytes("self").map_or(0.0, |b| b as f64 / 1048576.0)
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.every > 0 && a.deployments > 0, "--deployments and --every must be positive");
    let mut m = Machine { state: State::default(), index: 0 };
    for n in 1..=3 {
        m.apply(Command::RegisterNode { id: format!("n{n}"), labels: [("env".to_string(), "bench".to_string())].into() });
    }
    let destination = Destination {
        name: "web".into(),
        adapter: "process".into(),
        selector: [("env".to_string(), "bench".to_string())].into(),
        queue: QueuePolicy::Queue,
        node_wait_ms: 120_000,
    };
    m.apply(Command::PutDestinations { destinations: vec![destination] });
    let pre = vec!["\"./migrate --check\""; a.hooks].join(", ");
    println!("| deployments | state MB | keys | with step records | RSS MiB | apply ms per deployment |");
    println!("|---|---|---|---|---|---|");
    let mut stretch = Instant::now();
    for i in 0..a.deployments {
        let text = format!(
            "app: shop\nrelease: v{i}\ndestination: web\nrun: [\"./shop\", \"--port\", \"$PORT\"]\nhealth: {{ http: /healthz }}\nhooks: {{ pre: [{pre}] }}\n"
        );
        let spec = parse_manifest("fleet.yaml", &text, &Overrides::default()).context("the benchmark's manifest")?;
        let submitted =
            m.apply(Command::SubmitDeployment { spec: Box::new(spec), actor: "ci".into(), lock_wait_ms: None, idempotency_key: None });
        let Response::Deployment { id, .. } = submitted else { anyhow::bail!("submit {i} was answered {submitted:?}") };
        loop {
            let d = m.state.deployment(&id).context("the deployment just submitted")?;
            let Some(w) = d.next() else { break };
            let port = 20_000 + i % 1_000;
            let outcome = StepOutcome {
                step: w.step,
                undo: w.undo,
                attempt: w.attempt,
                token: d.token.context("a running deployment has a token")?,
                epoch: d.epoch,
                ok: true,
                output: Some(format!("{{\"pid\":{},\"port\":{port},\"address\":\"10.0.0.{}:{port}\",\"log\":\"ok\"}}", 1_000 + i, w.step)),
                error: None,
                class: None,
                started_ms: m.index as i64 * 10,
                finished_ms: m.index as i64 * 10 + 3,
                node: d.steps[w.step].plan.node.clone(),
            };
            m.apply(Command::StepResult { deployment: id.clone(), outcome });
        }
        if (i + 1) % a.every == 0 || i + 1 == a.deployments {
            let per_ms = stretch.elapsed().as_secs_f64() * 1e3 / ((i % a.every) + 1) as f64;
            let dump = m.state.dump();
            let bytes: usize = dump.iter().map(|(k, v)| k.len() + v.len()).sum();
            let with_records = m.state.deployments().filter(|d| !d.steps.is_empty()).count();
            let steps = m.state.deployment(&id).map_or(0, |d| d.steps.len());
            let line = serde_json::json!({
                "bench": "history", "deployments": i + 1, "steps_each": steps, "state_bytes": bytes, "keys": dump.len(),
                "kept": m.state.deployments().count(), "with_step_records": with_records, "rss_mib": rss_mib(), "apply_ms_per_deployment": per_ms,
            });
            eprintln!("{line}");
            println!("| {} | {:.1} | {} | {with_records} | {:.1} | {per_ms:.2} |", i + 1, bytes as f64 / 1e6, dump.len(), rss_mib());
            stretch = Instant::now();
        }
    }
    Ok(())
}
