//! Fleet's chaos harness: a seeded stream of deployments against a real
//! cluster (3 `fleet-coord`, 4 `fleet-node`, each on a host of its own in a
//! network namespace when the machine allows it, else all on 127.0.0.1), one fault
//! injected into each at a random point, then DESIGN.md's invariants
//! checked over everything that happened.
//!
//! Each round (see [`run`]):
//! 1. waits until every coordinator follows one leader and every node is
//!    connected (so a round's fault does not leak into the next);
//! 2. submits a deployment (`--detach`) of a random [`Kind`]: the demo app
//!    to `dev`, a stack to `dev` + `edge`, or shell steps to `ops`, and
//!    follows it with `fleetctl watch` in a task of its own;
//! 3. waits until a random number of its adapter actions have ended (the
//!    nodes' witness files), plus 0–150 ms, and injects a random
//!    [`FaultKind`], then brings the cluster back (see `faults.rs`);
//! 4. records the time from the fault to the next finished action, the
//!    watch's exit code and the final deployment, and checks invariants 2,
//!    3 and 5 for it at once.
//!
//! At the end it checks invariants 1, 2 and 4 over the whole run:
//! 1. every submitted deployment is listed and ended in a terminal state;
//! 2. witness safety (`fleet_tests::checks::assert_witness_safe`) and each
//!    action carried its deployment's token;
//! 3. every watch's exit code matches its deployment's final state;
//! 4. no lock held; each node runs exactly the instances of the last
//!    succeeded deployment that switched its route there;
//! 5. a deployment that did not succeed was failed by a fault that may fail
//!    it (`invariants::allowed_failure`: the only node of a destination away
//!    longer than its `node_wait`).
//!
//! The first broken invariant ends the run with a [`Violation`]; the test
//! dir (logs, data dirs, witness files) is kept for the post-mortem.

mod faults;
mod invariants;
mod report;
mod scenario;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleet_tests::harness::{eventually, CtlRun, Fleet};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

pub use faults::{FaultKind, Injected};
pub use invariants::{Broken, Invariant};
pub use report::{Percentiles, Report, RoundLine};
pub use scenario::Kind;

use crate::faults::FaultPlan;
use crate::scenario::Manifests;
use fleet_core::deploy::Deployment;

/// The seed `fleet-chaos` and the failure tests use unless told otherwise.
pub const DEFAULT_SEED: u64 = 0xF1EE7;

/// A round's deployment must end within this (its deadline is 90 s).
const ROUND_BOUND: Duration = Duration::from_secs(150);

#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// How many deployments (one fault each).
    pub rounds: usize,
    /// Start no round after this much time (a soak); `None`: `rounds` only.
    pub until: Option<Duration>,
    /// Seeds every random choice: kind, fault point, fault, victim, pause.
    pub seed: u64,
    /// Print one line per round to stderr as it ends.
    pub verbose: bool,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig { rounds: 20, until: None, seed: DEFAULT_SEED, verbose: true }
    }
}

/// A run that broke an invariant (or did not recover from a fault): which,
/// with the evidence, the rounds up to it, and the kept test dir.
#[derive(Debug)]
pub struct Violation {
    pub invariant: Invariant,
    pub what: String,
    /// The round during which it was found (`None`: in the final checks).
    pub round: Option<usize>,
    pub test_dir: PathBuf,
    /// Tail of every coordinator and node log.
    pub logs: String,
    /// The rounds that ran, summarized.
    pub report: Report,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let when = self.round.map(|r| format!("in round {r}")).unwrap_or_else(|| "in the final checks".into());
        write!(
            f,
            "{} broken {when}: {}\ntest dir (kept: coordinator logs coord-N.log, nodes/<name>/node.log and witness.jsonl): {}\n\
             replay with the same --seed {:#x} and --rounds",
            self.invariant.describe(),
            self.what,
            self.test_dir.display(),
            self.report.seed
        )
    }
}

impl std::error::Error for Violation {}

/// Run `cfg.rounds` chaos rounds against a fresh cluster and check the
/// invariants. `Err` is a [`Violation`] when the cluster broke one (or did
/// not recover); any other error means the harness could not run at all
/// (binaries not built, no free ports ...).
pub async fn run(cfg: ChaosConfig) -> anyhow::Result<Report> {
    let began = Instant::now();
    let (fleet, topo) = scenario::start().await.context(
        "starting 3 coordinators and 4 nodes; build the binaries first: \
         cargo build --workspace --exclude fleet-bench --all-targets (with the same CARGO_TARGET_DIR)",
    )?;
    let mut chaos = Chaos {
        rng: StdRng::seed_from_u64(cfg.seed),
        report: Report { seed: cfg.seed, test_dir: fleet.cluster.path().display().to_string(), ..Report::default() },
        f: fleet,
        kinds: FaultKind::available(topo.is_some()),
        topo,
        ended: BTreeMap::new(),
        round: None,
        cfg,
    };
    let outcome = chaos.all().await;
    chaos.report.elapsed_ms = began.elapsed().as_millis() as u64;
    chaos.report.summarize();
    match outcome {
        Ok(()) => Ok(chaos.report),
        Err(e) => {
            chaos.f.cluster.dir.disable_cleanup(true);
            let (invariant, what) = match e.downcast_ref::<Broken>() {
                Some(b) => (b.invariant, b.what.clone()),
                None => (Invariant::Recovery, format!("{e:#}")),
            };
            Err(Violation {
                invariant,
                what,
                round: chaos.round,
                test_dir: chaos.f.cluster.path().to_path_buf(),
                logs: chaos.f.logs(),
                report: chaos.report,
            }
            .into())
        }
    }
}

struct Chaos {
    cfg: ChaosConfig,
    /// Dropped before `topo`: the processes go before their namespaces.
    f: Fleet,
    /// The hosts, when every process has one (partitions possible).
    topo: Option<fleet_tests::netns::Topology>,
    /// The fault kinds this run draws from.
    kinds: Vec<FaultKind>,
    rng: StdRng,
    report: Report,
    /// Every deployment a round followed to its end, by id (for the
    /// witness check's tokens).
    ended: BTreeMap<String, Deployment>,
    /// The round in progress (`None` once the final checks run).
    round: Option<usize>,
}

impl Chaos {
    async fn all(&mut self) -> anyhow::Result<()> {
        let manifests = Manifests::write(&self.f)?;
        let began = Instant::now();
        for round in 1..=self.cfg.rounds {
            if self.cfg.until.is_some_and(|d| began.elapsed() >= d) {
                break;
            }
            self.round = Some(round);
            // `one` records the round in the report before checking it, so a
            // broken invariant is reported with the round that broke it.
            let checked = self.one(round, &manifests).await;
            if let (true, Some(line)) = (self.cfg.verbose, self.report.rounds.last().filter(|l| l.round == round)) {
                eprintln!(
                    "round {round:>3}: {} {} | {} of {} after {} actions +{} ms | progress {} | {} (exit {}) | {}",
                    line.kind.name(),
                    line.deployment,
                    line.fault.kind.name(),
                    line.fault.target,
                    line.after_actions,
                    line.extra_ms,
                    line.progress_ms.map(|p| format!("{p} ms")).unwrap_or_else(|| "-".into()),
                    line.state,
                    line.watch_exit,
                    line.fault.detail
                );
            }
            checked?;
        }
        self.round = None;
        self.final_checks().await
    }

    async fn one(&mut self, round: usize, manifests: &Manifests) -> anyhow::Result<()> {
        scenario::settle(&self.f).await.with_context(|| format!("before round {round}"))?;
        let kind = Kind::ALL[self.rng.random_range(0..Kind::ALL.len())];
        let release = format!("r{round}");
        let id = manifests.submit(&self.f, kind, &release).await?;
        // Followed at once, as CI does (`id=$(fleetctl deploy --detach) &&
        // fleetctl watch "$id"`), through every fault of the round.
        let watcher = self.f.cluster.spawn_ctl(&["watch", &id, "-o", "json"])?;
        let planned = self.f.cluster.deployment(&id).await?;
        let n_steps = planned.steps.len();
        // Every draw happens here, in a fixed order, whatever the timing.
        let after_actions = self.rng.random_range(0..n_steps.max(1));
        let extra_ms = self.rng.random_range(0..150u64);
        let plan = FaultPlan {
            kind: self.kinds[self.rng.random_range(0..self.kinds.len())],
            pick: self.rng.random_range(0..1000usize),
            stop_for: Duration::from_millis(self.rng.random_range(1500..=3000u64)),
        };

        let f = &self.f;
        eventually(&format!("{id} to finish {after_actions} actions"), ROUND_BOUND, || async {
            let done = f.witness()?.iter().filter(|l| l.deployment == id).count();
            Ok((done >= after_actions || watcher.is_finished()).then_some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(extra_ms)).await; // the random fault point, not a wait for anything
        let fault = faults::inject(&mut self.f, self.topo.as_ref(), &plan, &id, kind.nodes(), &watcher)
            .await
            .with_context(|| format!("round {round}: injecting `{}` into {id} ({})", plan.kind.name(), kind.name()))?;

        let watched: CtlRun = tokio::time::timeout(ROUND_BOUND, watcher)
            .await
            .map_err(|_| {
                anyhow::Error::from(Broken {
                    invariant: Invariant::NoneLostAllEnded,
                    what: format!("`fleetctl watch {id}` had not returned {ROUND_BOUND:?} after the fault ({})", fault.detail),
                })
            })?
            .context("the watch task")??;
        let result = watched.result().map_err(|e| {
            anyhow::Error::from(Broken { invariant: Invariant::ExitCodes, what: format!("`watch {id}` printed no result line: {e:#}") })
        })?;
        let d = result.deployment.clone();
        self.ended.insert(id.clone(), d.clone());
        let line = RoundLine {
            round,
            kind,
            deployment: id.clone(),
            release,
            after_actions,
            extra_ms,
            progress_ms: progress_after(&self.f, &d, fault.at_ms)?,
            state: d.state,
            watch_exit: watched.code,
            fault,
            allowed: None,
        };
        self.report.rounds.push(line.clone());
        if !line.state.is_terminal() {
            return Err(Broken {
                invariant: Invariant::NoneLostAllEnded,
                what: format!("`watch {id}` returned (exit {}) while the deployment is {}", watched.code, line.state),
            }
            .into());
        }
        invariants::exit_code_matches(&line, watched.code, &result)?;
        invariants::command_undone(&line, &d, &manifests.marks)?;
        let allowed = invariants::failure_explained(&line, &d)?;
        if let Some(last) = self.report.rounds.last_mut() {
            last.allowed = allowed;
        }
        invariants::witness_safe(&self.f, &self.ended)
    }

    async fn final_checks(&mut self) -> anyhow::Result<()> {
        // A node restarted in the last round must be back before its
        // leftovers can be judged.
        scenario::settle(&self.f).await.context("after the last round")?;
        let ids: Vec<String> = self.report.rounds.iter().map(|r| r.deployment.clone()).collect();
        let finals = invariants::none_lost(&self.f, &ids).await?;
        // For the post-mortem of a failed run (the test dir is kept then).
        let dump = self.f.cluster.path().join("chaos-deployments.json");
        let text = serde_json::to_string_pretty(&finals).context("serializing the final deployments")?;
        std::fs::write(&dump, text).with_context(|| format!("writing {}", dump.display()))?;
        for r in &self.report.rounds {
            let state = finals.get(&r.deployment).map(|d| d.state.as_str()).unwrap_or("not listed");
            if state != r.state.as_str() {
                return Err(Broken {
                    invariant: Invariant::NoneLostAllEnded,
                    what: format!("round {}: `watch {}` reported {}, `status` now says {state}", r.round, r.deployment, r.state),
                }
                .into());
            }
        }
        invariants::witness_safe(&self.f, &finals)?;
        invariants::no_locks_no_orphans(&self.f, &finals).await
    }
}

/// Fault → the end of the first adapter action (of any deployment) that
/// started after it; if none did, the deployment's final commit after it.
fn progress_after(f: &Fleet, d: &Deployment, at_ms: i64) -> anyhow::Result<Option<i64>> {
    let next = f.witness()?.into_iter().filter(|l| l.start_ms >= at_ms).min_by_key(|l| l.start_ms);
    if let Some(l) = next {
        return Ok(Some(l.end_ms - at_ms));
    }
    Ok(d.events.last().map(|e| e.at_ms).filter(|t| *t >= at_ms).map(|t| t - at_ms))
}
