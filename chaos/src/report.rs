//! What a run did, round by round, and how fast the cluster recovered.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fleet_core::deploy::DeployState;
use serde::Serialize;

use crate::faults::{FaultKind, Injected};
use crate::scenario::Kind;

/// One round: what was deployed, what was broken when, what came of it.
#[derive(Debug, Clone, Serialize)]
pub struct RoundLine {
    pub round: usize,
    pub kind: Kind,
    pub deployment: String,
    pub release: String,
    /// The fault was injected after this many witness actions of the
    /// deployment had ended ...
    pub after_actions: usize,
    /// ... plus this many milliseconds.
    pub extra_ms: u64,
    pub fault: Injected,
    /// Fault → the first adapter action (of any deployment) that started
    /// after the fault has finished; when none started after it, the
    /// deployment's final commit. `None`: the deployment had already ended.
    pub progress_ms: Option<i64>,
    /// Final state and the `watch` exit code.
    pub state: DeployState,
    pub watch_exit: i32,
    /// Why a deployment that did not succeed is acceptable (invariant 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<String>,
}

/// Nearest-rank percentiles of one fault kind's progress samples.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub seed: u64,
    pub rounds: Vec<RoundLine>,
    /// Per fault kind (its name): progress percentiles.
    pub progress: BTreeMap<String, Percentiles>,
    /// Final state → how many deployments.
    pub outcomes: BTreeMap<String, usize>,
    pub elapsed_ms: u64,
    /// Where logs, data dirs and witness files are (deleted after a
    /// successful run unless FLEET_KEEP_TEST_DIR=1).
    pub test_dir: String,
}

/// p-th percentile (nearest rank) of sorted samples.
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    /// Recompute the summaries from the round lines.
    pub fn summarize(&mut self) {
        let mut by_kind: BTreeMap<FaultKind, Vec<i64>> = BTreeMap::new();
        for r in &self.rounds {
            let samples = by_kind.entry(r.fault.kind).or_default();
            samples.extend(r.progress_ms);
        }
        self.progress = by_kind
            .into_iter()
            .map(|(k, mut v)| {
                v.sort_unstable();
                let p = Percentiles {
                    samples: v.len(),
                    p50_ms: percentile(&v, 50.0),
                    p99_ms: percentile(&v, 99.0),
                    max_ms: v.last().copied().unwrap_or(0),
                };
                (k.name().to_string(), p)
            })
            .collect();
        self.outcomes.clear();
        for r in &self.rounds {
            *self.outcomes.entry(r.state.as_str().to_string()).or_default() += 1;
        }
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "fleet-chaos: {} rounds, seed {:#x}, {:.1} s; test dir {}",
            self.rounds.len(),
            self.seed,
            self.elapsed_ms as f64 / 1000.0,
            self.test_dir
        );
        let _ = writeln!(
            out,
            "{:>5}  {:<7}  {:<6}  {:<17} {:<13} {:<14} {:>9}  outcome",
            "round", "kind", "id", "fault", "target", "at", "progress"
        );
        for r in &self.rounds {
            let progress = r.progress_ms.map(|p| format!("{p} ms")).unwrap_or_else(|| "ended".into());
            let allowed = r.allowed.as_deref().map(|a| format!(" (allowed: {a})")).unwrap_or_default();
            let _ = writeln!(
                out,
                "{:>5}  {:<7}  {:<6}  {:<17} {:<13} {:<14} {:>9}  {} (exit {}){allowed}",
                r.round,
                r.kind.name(),
                r.deployment,
                r.fault.kind.name(),
                r.fault.target,
                format!("{} +{} ms", r.after_actions, r.extra_ms),
                progress,
                r.state,
                r.watch_exit
            );
            let _ = writeln!(out, "       {}", r.fault.detail);
        }
        let _ = writeln!(out, "progress (fault → next action finished), per fault:");
        for (k, p) in &self.progress {
            let _ = writeln!(out, "  {k:<17} n={:<3} p50 {:>5} ms  p99 {:>5} ms  max {:>5} ms", p.samples, p.p50_ms, p.p99_ms, p.max_ms);
        }
        let outcomes: Vec<String> = self.outcomes.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let _ = writeln!(out, "outcomes: {}", outcomes.join(", "));
        out
    }
}
