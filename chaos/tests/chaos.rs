//! Six chaos rounds with a fixed seed: a leader killed or paused, a
//! follower or a worker node killed mid-deploy; every invariant must hold.
//! Short enough for CI (`cargo test --workspace`); `fleet-chaos --rounds N`
//! runs longer streams.
//!
//! Build the binaries first:
//! `cargo build -p fleet-coord -p fleetctl -p fleet-node -p fleet-demo-app`.
//! `FLEET_KEEP_TEST_DIR=1` keeps logs and witness files of a passing run too.

use fleet_chaos::{ChaosConfig, Violation};

const ROUNDS: usize = 6;
const SEED: u64 = 0xC4A05;

#[tokio::test(flavor = "multi_thread")]
async fn six_faulty_rounds_keep_every_invariant() {
    let cfg = ChaosConfig { rounds: ROUNDS, seed: SEED, verbose: true };
    match fleet_chaos::run(cfg).await {
        Ok(report) => {
            eprintln!("{}", report.text());
            assert_eq!(report.rounds.len(), ROUNDS, "every round ran");
            let faults: usize = report.progress.values().map(|p| p.samples).sum();
            assert!(faults > 0, "no round measured progress after its fault: {}", report.text());
        }
        Err(e) => match e.downcast_ref::<Violation>() {
            Some(v) => panic!("{}\n##### last lines of every log:\n{}\n{v}", v.report.text(), v.logs),
            None => panic!("the chaos harness could not run: {e:#}"),
        },
    }
}
