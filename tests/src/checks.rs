//! Checks shared by the failure tests and the chaos harness: the witness
//! invariants, the instances a deployment started, the wall clock.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::ensure;
use fleet_core::deploy::Deployment;

pub use fleet_core::witness::WitnessLine;

use crate::json::StartOutput;
use crate::values::{kind, output, steps};

/// Milliseconds since the epoch (to compare with event and witness times):
/// the cluster's one wall clock.
pub use fleet_net::now_ms;

/// The witness checker (DESIGN.md invariant 1 and fencing), over every
/// witness line there is:
/// * on each destination no two actions overlapped in time;
/// * on each destination no action carried a token lower than one already
///   used there;
/// * no step attempt (or undo attempt) was carried out twice, except by the
///   same node again after it restarted (it was killed after the run and
///   before it stored the result, so it could not know; steps are idempotent);
/// * every action of one of `deployments` carried that deployment's fencing
///   token (one that never got a token has no actions at all).
pub fn assert_witness_safe(witness: &[WitnessLine], deployments: &[&Deployment]) -> anyhow::Result<()> {
    let tokens: BTreeMap<&str, Option<u64>> = deployments.iter().map(|d| (d.id.as_str(), d.token)).collect();
    check_witness(witness, &tokens)
}

/// [`assert_witness_safe`] with the tokens given as deployment id → token.
fn check_witness(witness: &[WitnessLine], tokens: &BTreeMap<&str, Option<u64>>) -> anyhow::Result<()> {
    let mut by_dest: BTreeMap<&str, Vec<&WitnessLine>> = BTreeMap::new();
    for l in witness {
        by_dest.entry(l.destination.as_str()).or_default().push(l);
    }
    for (dest, mut lines) in by_dest {
        lines.sort_by_key(|l| (l.start_ms, l.end_ms));
        for w in lines.windows(2) {
            let (a, b) = (w[0], w[1]);
            ensure!(a.end_ms <= b.start_ms, "two actions overlapped on destination {dest}:\n  {a}\n  {b}");
            ensure!(a.token <= b.token, "an action with a lower token ran after a higher one on destination {dest}:\n  {a}\n  {b}");
        }
    }
    // Who ran each attempt (deployment, step, undo, attempt): (node, boot).
    type Attempt<'a> = (&'a str, u32, bool, u32);
    let mut ran_by: BTreeMap<Attempt, BTreeSet<(&str, i64)>> = BTreeMap::new();
    for l in witness {
        // A `check` (a handed-over or resumed step found already done) reads
        // the target and changes nothing: it may follow the run of the same
        // attempt whose result a killed node never delivered. Two runs may
        // not, unless one node ran it once per boot: killed after the run
        // and before its result was stored, a restarted node cannot know.
        if l.action == "check" {
            continue;
        }
        let runs = ran_by.entry((l.deployment.as_str(), l.step, l.undo, l.attempt)).or_default();
        let legit = runs.iter().all(|(node, boot)| *node == l.node && *boot != l.boot_ms);
        ensure!(legit && runs.insert((l.node.as_str(), l.boot_ms)), "a step attempt was carried out twice: {l}");
        if let Some(token) = tokens.get(l.deployment.as_str()) {
            ensure!(
                *token == Some(l.token),
                "an action of {} carried token {}, the deployment's is {}: {l}",
                l.deployment,
                l.token,
                token.map(|t| t.to_string()).unwrap_or_else(|| "none (it never got the lock)".into())
            );
        }
    }
    Ok(())
}

/// (node, pid) of the instance a deployment started on each node.
pub fn instances(d: &Deployment) -> anyhow::Result<Vec<(String, u32)>> {
    let mut out = vec![];
    for s in steps(d).iter().filter(|s| kind(s) == "start_instance") {
        let started: StartOutput = output(s)?;
        out.push((s.plan.node.clone(), started.pid));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(dest: &str, dep: &str, step: u32, token: u64, start: i64, end: i64) -> WitnessLine {
        WitnessLine {
            node: "n".into(),
            boot_ms: 1,
            destination: dest.into(),
            deployment: dep.into(),
            step,
            undo: false,
            attempt: 1,
            token,
            action: "start".into(),
            start_ms: start,
            end_ms: end,
            ok: true,
        }
    }

    fn check(lines: &[WitnessLine], tokens: &[(&str, Option<u64>)]) -> anyhow::Result<()> {
        check_witness(lines, &tokens.iter().copied().collect())
    }

    #[test]
    fn a_good_witness_passes() {
        // Back to back on one destination, tokens growing; overlapping
        // across destinations; an undo of the same step is another attempt.
        let mut undo = line("a", "d2", 0, 2, 15, 20);
        undo.undo = true;
        let good = [line("a", "d1", 0, 1, 0, 10), line("a", "d2", 0, 2, 10, 15), line("b", "d3", 0, 3, 5, 15), undo];
        check(&good, &[("d1", Some(1)), ("d2", Some(2)), ("d3", Some(3))]).unwrap();
        check(&good, &[]).unwrap();
        check(&[], &[("d1", None)]).unwrap();
    }

    #[test]
    fn an_overlap_fails() {
        let e = check(&[line("a", "d2", 0, 2, 5, 15), line("a", "d1", 0, 1, 0, 10)], &[]).unwrap_err();
        assert!(e.to_string().contains("overlapped on destination a"), "{e}");
        // Overlapping by one millisecond is an overlap.
        assert!(check(&[line("a", "d1", 0, 1, 0, 10), line("a", "d1", 1, 1, 9, 12)], &[]).is_err());
    }

    #[test]
    fn a_token_going_back_fails() {
        let e = check(&[line("a", "d2", 0, 2, 0, 10), line("a", "d1", 0, 1, 10, 15)], &[]).unwrap_err();
        assert!(e.to_string().contains("lower token"), "{e}");
    }

    #[test]
    fn an_attempt_twice_fails() {
        let e = check(&[line("a", "d1", 0, 1, 0, 10), line("b", "d1", 0, 1, 10, 15)], &[]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        // A check that found the attempt done is not a second run (a node
        // killed after the run, before its result was committed).
        let mut checked = line("a", "d1", 0, 1, 20, 21);
        checked.action = "check".into();
        check(&[line("a", "d1", 0, 1, 0, 10), checked.clone()], &[]).unwrap();
        let mut rerun = checked;
        rerun.action = "start".into();
        assert!(check(&[line("a", "d1", 0, 1, 0, 10), rerun.clone()], &[]).is_err());
        // The same node after a restart may run it again (it could not know
        // it had); another node, or the same boot twice, may not.
        let mut rebooted = rerun.clone();
        rebooted.boot_ms = 2;
        check(&[line("a", "d1", 0, 1, 0, 10), rebooted.clone()], &[]).unwrap();
        let mut elsewhere = rebooted;
        elsewhere.node = "m".into();
        assert!(check(&[line("a", "d1", 0, 1, 0, 10), elsewhere], &[]).is_err());
    }

    #[test]
    fn a_foreign_token_fails() {
        assert!(check(&[line("a", "d1", 0, 2, 0, 10)], &[("d1", Some(1))]).is_err());
        // A deployment that never got the lock has no actions.
        assert!(check(&[line("a", "d1", 0, 2, 0, 10)], &[("d1", None)]).is_err());
    }

    #[test]
    fn a_witness_with_a_missing_field_fails() {
        // Without `end_ms` the overlap check cannot run: reading the file fails.
        let good = line("a", "d1", 0, 1, 0, 10).to_string();
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v.as_object_mut().unwrap().remove("end_ms");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.jsonl");
        std::fs::write(&path, format!("{good}\n{v}\n")).unwrap();
        let e = crate::harness::read_witness(&path).unwrap_err();
        assert!(format!("{e:#}").contains("end_ms"), "{e:#}");
        // A renamed field fails the same way.
        std::fs::write(&path, format!("{}\n", good.replace("start_ms", "started_ms"))).unwrap();
        assert!(crate::harness::read_witness(&path).is_err());
        // The good line alone reads (and a missing file is an empty witness).
        std::fs::write(&path, format!("{good}\n")).unwrap();
        assert_eq!(crate::harness::read_witness(&path).unwrap().len(), 1);
        assert!(crate::harness::read_witness(&dir.path().join("none")).unwrap().is_empty());
    }
}
