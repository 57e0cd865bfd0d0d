//! `fleet-chaos`: run the chaos harness and print its report.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use fleet_chaos::{ChaosConfig, Violation};

#[derive(Parser)]
#[command(
    name = "fleet-chaos",
    version,
    about = "Kill and pause Fleet's coordinators and nodes mid-deploy, then check that nothing unsafe happened",
    long_about = "fleet-chaos starts a real Fleet cluster on 127.0.0.1 (3 fleet-coord processes; worker nodes \
node-1..3 labelled env=dev and node-c labelled role=ops; destinations dev and edge (process adapter, env=dev) \
and ops (command adapter, role=ops)) and runs a seeded stream of deployments: the demo app to dev, a stack to \
dev+edge, or shell steps to ops. Each one is followed with `fleetctl watch`, and at a random point (after a \
random number of its adapter actions, plus 0-150 ms) one random fault is injected:\n\
  * kill -9 of the Raft leader (restarted once the survivors elected a new one);\n\
  * SIGSTOP of the leader for 1.5-3 s, then SIGCONT (a stale leader wakes up);\n\
  * kill -9 of a follower (restarted once the deployment made progress without it);\n\
  * kill -9 of a worker node of the deployment (restarted once its lease passed and the deployment moved on).\n\n\
Invariants checked (the first broken one stops the run, exit 1):\n\
  1. every submitted deployment is listed (`fleetctl list`) and ended in a terminal state;\n\
  2. the nodes' witness files: no two actions overlapped on a destination, fencing tokens never went back, \
no step attempt ran twice, every action carried its deployment's token;\n\
  3. each `watch` exit code matches the final state (0 succeeded, 3 failed, 4 cancelled, 5 timed out, \
6 compensation failed);\n\
  4. no destination lock is held at the end, and every node runs exactly the instances of the last succeeded \
deployment that switched its route there (no orphans);\n\
  5. a deployment that did not succeed was failed by a fault that may fail it: only losing node-c, the only \
ops node, may fail a command deployment (exit 3).\n\n\
Not covered yet: network partitions between coordinators (every process shares loopback).\n\n\
Build the binaries first: cargo build --workspace --exclude fleet-bench --all-targets.\n\
Exit codes: 0 every invariant held · 1 an invariant broke (or the cluster did not recover; the test dir is \
kept and printed) · 2 usage · 3 the harness could not run (e.g. binaries not built).",
    after_long_help = "Examples:\n  cargo xtask chaos --rounds 40 --seed 0x1234     # builds first, then runs\n  \
cargo xtask chaos --soak 30m --seed 7           # rounds until 30 minutes have passed\n  \
fleet-chaos --rounds 10 -o json | jq .progress\n  \
FLEET_KEEP_TEST_DIR=1 fleet-chaos      # keep logs and witness files even when every invariant holds"
)]
struct Cli {
    /// How many deployments to run (one fault each).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Instead of a number of rounds: start rounds until this much time
    /// has passed (e.g. 30m), then run the final checks.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "rounds")]
    soak: Option<std::time::Duration>,
    /// Seed of every random choice; the same seed replays the same kinds,
    /// fault points and faults (decimal or 0x hex).
    #[arg(long, default_value = "0xF1EE7", value_parser = parse_seed)]
    seed: u64,
    /// Report format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("`{s}` is not a seed (a u64, decimal or 0x hex): {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleet-chaos: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(cli.rounds > 0, "--rounds must be at least 1");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let cfg = match cli.soak {
        Some(d) => ChaosConfig { rounds: usize::MAX, until: Some(d), seed: cli.seed, verbose: true },
        None => ChaosConfig { rounds: cli.rounds, until: None, seed: cli.seed, verbose: true },
    };
    match rt.block_on(fleet_chaos::run(cfg)) {
        Ok(report) => {
            print_report(cli.output, &report)?;
            eprintln!("fleet-chaos: every invariant held over {} rounds", report.rounds.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => match e.downcast::<Violation>() {
            Ok(v) => {
                print_report(cli.output, &v.report)?;
                eprintln!("\n##### last lines of every log:\n{}\n", v.logs);
                eprintln!("fleet-chaos: {v}");
                Ok(ExitCode::from(1))
            }
            Err(e) => Err(e),
        },
    }
}

fn print_report(out: Output, report: &fleet_chaos::Report) -> anyhow::Result<()> {
    match out {
        Output::Text => print!("{}", report.text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(report).context("serializing the report")?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_in_decimal_and_hex() {
        assert_eq!(parse_seed("0xF1EE7"), Ok(fleet_chaos::DEFAULT_SEED));
        assert_eq!(parse_seed("7"), Ok(7));
        assert!(parse_seed("seven").is_err());
    }
}
