//! A canary's analysis on its node (`StepAction::CanaryPause` with
//! `analysis:`): probe the canary instance every `interval` for the whole
//! pause. The step fails (and the leader undoes the deployment) at the
//! `failure_limit`-th failed probe; passing to the end promotes it. The
//! leader aborts the step (the future is dropped) when someone promotes or
//! cancels during the pause. Shared by the `process` and `docker` adapters,
//! which only find the port of the canary instance.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_core::manifest::Analysis;
use serde_json::{json, Value};

use crate::adapter::StepError;
use crate::probe;
use crate::util::human;

/// Probe `port` (the canary of `label`, `web@v2`) per `analysis` for `pause`.
pub async fn analyze(
    label: &str,
    analysis: &Analysis,
    port: u16,
    pause: Duration,
    path_prepend: &[PathBuf],
    cwd: &Path,
) -> Result<Value, StepError> {
    let started = Instant::now();
    let end = tokio::time::Instant::now() + pause;
    let timeout = Duration::from_millis(analysis.timeout_ms);
    let mut interval = tokio::time::interval(Duration::from_millis(analysis.interval_ms.max(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut probes, mut failures) = (0u32, 0u32);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = tokio::time::sleep_until(end) => break,
        }
        let result = tokio::select! {
            r = probe::probe(&analysis.probe, port, timeout, path_prepend, cwd) => r,
            _ = tokio::time::sleep_until(end) => break,
        };
        probes += 1;
        if let Err(e) = result {
            failures += 1;
            tracing::info!(canary = label, probes, failures, error = %e, "canary analysis probe failed");
            if failures >= analysis.failure_limit {
                return Err(StepError::invalid(format!(
                    "{e} ({failures} of {probes} probes failed after {}; the limit is {}); the canary {label} is undone. Fix the release, then deploy again",
                    human(started.elapsed()),
                    analysis.failure_limit
                )));
            }
        }
    }
    Ok(json!({ "probes": probes, "failures": failures, "elapsed_ms": started.elapsed().as_millis() as u64, "port": port }))
}

#[cfg(test)]
mod tests {
    use fleet_core::manifest::Probe;

    use super::*;

    fn analysis(argv: &[&str], failure_limit: u32) -> Analysis {
        Analysis {
            probe: Probe::Command { argv: argv.iter().map(|s| s.to_string()).collect() },
            interval_ms: 20,
            timeout_ms: 1_000,
            failure_limit,
        }
    }

    #[tokio::test]
    async fn passes_for_the_whole_pause_or_fails_at_its_limit() {
        let dir = std::env::temp_dir();
        // (probe, failure limit, passes?)
        let cases = [(["true"], 1, true), (["false"], 1, false), (["false"], 3, false)];
        for (argv, limit, passes) in cases {
            let started = Instant::now();
            let r = analyze("web@v2", &analysis(&argv, limit), 1, Duration::from_millis(300), &[], &dir).await;
            match r {
                Ok(out) => {
                    assert!(passes, "{argv:?} passed");
                    assert!(started.elapsed() >= Duration::from_millis(300), "it ran for the whole pause");
                    assert!(out["probes"].as_u64().unwrap_or(0) >= 3 && out["failures"] == 0, "{out}");
                }
                Err(e) => {
                    assert!(!passes, "{argv:?} failed: {e}");
                    assert!(e.message.contains(&format!("{limit} of {limit} probes failed")), "{}", e.message);
                    assert_eq!(e.class, fleet_core::deploy::ErrorClass::Invalid, "never retried");
                }
            }
        }
    }
}
