//! A short chaos profile for CI: a few rounds with a seed drawn at random on
//! every run (and printed, so that a failure can be replayed), each with a
//! leader killed or paused, a follower or a worker node killed, or slow
//! disks, mid-deploy; every invariant must hold. `cargo test --workspace`
//! runs it; `fleet-chaos --rounds N --seed S` runs longer streams.
//!
//! Replay a run: `FLEET_CHAOS_SEED=<seed> cargo xtask test --test chaos`, or
//! `cargo xtask chaos --rounds 8 --seed <seed>`.
//! `FLEET_CHAOS_ROUNDS=N` changes the length. Build the binaries first:
//! `cargo build --workspace --exclude fleet-bench --all-targets`.
//! `FLEET_KEEP_TEST_DIR=1` keeps logs and witness files of a passing run too.

use fleet_chaos::{ChaosConfig, Violation};

const ROUNDS: usize = 8;

fn from_env<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?.to_string().parse().ok(),
        None => v.parse().ok(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_few_faulty_rounds_on_a_random_seed_keep_every_invariant() {
    let seed: u64 = from_env("FLEET_CHAOS_SEED").unwrap_or_else(rand::random);
    let rounds: usize = from_env("FLEET_CHAOS_ROUNDS").unwrap_or(ROUNDS);
    eprintln!("chaos: seed {seed:#x}, {rounds} rounds (replay: FLEET_CHAOS_SEED={seed:#x} cargo xtask test --test chaos)");
    let cfg = ChaosConfig { rounds, until: None, seed, verbose: true };
    match fleet_chaos::run(cfg).await {
        Ok(report) => {
            eprintln!("{}", report.text());
            assert_eq!(report.rounds.len(), rounds, "every round ran (seed {seed:#x})");
            let faults: usize = report.progress.values().map(|p| p.samples).sum();
            assert!(faults > 0, "no round measured progress after its fault (seed {seed:#x}): {}", report.text());
        }
        Err(e) => match e.downcast_ref::<Violation>() {
            Some(v) => panic!(
                "{}\n##### last lines of every log:\n{}\n{v}\nreplay: FLEET_CHAOS_SEED={seed:#x} cargo xtask test --test chaos",
                v.report.text(),
                v.logs
            ),
            None => panic!("the chaos harness could not run (seed {seed:#x}): {e:#}"),
        },
    }
}
