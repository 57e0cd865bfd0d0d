use super::*;
use crate::manifest::{parse_manifest, Overrides};
use crate::saga::plan;

fn deployment(nodes: &[&str]) -> Deployment {
    let spec = parse_manifest(
        "f",
        "app: web\nrelease: v2\ndestination: d\nrun: [srv]\nhealth: { tcp: true }\nretry: { max_attempts: 2 }\n",
        &Overrides::default(),
    )
    .unwrap();
    let nodes: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
    let steps = plan(&spec, "d", &nodes).into_iter().map(StepRecord::new).collect();
    Deployment {
        id: "d1".into(),
        app: "web".into(),
        release: "v2".into(),
        destination: "d".into(),
        spec,
        state: DeployState::Queued,
        submitted_by: "op".into(),
        submitted_ms: 0,
        deadline_ms: 1_000_000,
        token: None,
        epoch: 1,
        previous_release: None,
        rollback_of: None,
        timed_out: false,
        lock_wait_until_ms: None,
        resolved: None,
        steps,
        events: vec![],
    }
}

/// Destination `d` has these live nodes.
fn live(nodes: &[&str]) -> LiveNodes {
    [("d".to_string(), nodes.iter().map(|s| s.to_string()).collect())].into()
}

fn started(nodes: &[&str]) -> Deployment {
    let mut d = deployment(nodes);
    d.token = Some(7);
    d.transition(DeployState::Running, 1, "lock granted", "leader").unwrap();
    d
}

fn result(w: Work, ok: bool, class: Option<ErrorClass>) -> StepOutcome {
    StepOutcome {
        step: w.step,
        undo: w.undo,
        attempt: w.attempt,
        token: 7,
        epoch: 1,
        ok,
        output: ok.then(|| "{}".into()),
        error: (!ok).then(|| "boom".into()),
        class,
        started_ms: 10,
        finished_ms: 11,
        node: "n1".into(),
    }
}

#[test]
fn lifecycle_transitions() {
    use DeployState::*;
    let all = [Queued, Running, Compensating, Failed, Cancelling, Cancelled, Succeeded, CompensationFailed, Superseded];
    let allowed = [
        (Queued, Running),
        (Queued, Cancelling),
        (Queued, Superseded),
        (Running, Succeeded),
        (Running, Compensating),
        (Running, Cancelling),
        (Compensating, Failed),
        (Compensating, CompensationFailed),
        (Cancelling, Cancelled),
        (Cancelling, CompensationFailed),
    ];
    for from in all {
        for to in all {
            assert_eq!(from.can_become(to), allowed.contains(&(from, to)), "{from} -> {to}");
        }
        // Terminal states go nowhere.
        if from.is_terminal() {
            assert!(all.iter().all(|t| !from.can_become(*t)));
        }
    }
    let mut d = deployment(&["n1"]);
    assert!(d.transition(Succeeded, 1, "x", "y").is_err());
    assert!(d.events.is_empty(), "a refused transition logs nothing");
}

/// Drive a deployment by a script of outcomes; check the final state and
/// the order in which steps ran and were undone.
#[test]
fn saga_scripts() {
    use DeployState::*;
    // (script of (ok, class) per executed work item, final state, executed work as (step, undo))
    type Script = Vec<(bool, Option<ErrorClass>)>;
    type Order = Vec<(usize, bool)>;
    let ok = (true, None);
    let transient = (false, Some(ErrorClass::Transient));
    let invalid = (false, Some(ErrorClass::Invalid));
    let cases: Vec<(&str, Script, DeployState, Order)> = vec![
        ("all succeed", vec![ok; 4], Succeeded, vec![(0, false), (1, false), (2, false), (3, false)]),
        ("health fails: start undone", vec![ok, invalid, ok], Failed, vec![(0, false), (1, false), (0, true)]),
        (
            "stop-old fails: switch then start undone, in reverse",
            vec![ok, ok, ok, invalid, ok, ok, ok],
            Failed,
            vec![(0, false), (1, false), (2, false), (3, false), (2, true), (1, true), (0, true)],
        ),
        (
            "transient start retried once then succeeds",
            vec![transient, ok, ok, ok, ok],
            Succeeded,
            vec![(0, false), (0, false), (1, false), (2, false), (3, false)],
        ),
        ("transient twice exceeds max_attempts 2", vec![transient, transient], Failed, vec![(0, false), (0, false)]),
        ("undo fails for good", vec![ok, invalid, invalid], CompensationFailed, vec![(0, false), (1, false), (0, true)]),
    ];
    for (name, script, want, want_order) in cases {
        let mut d = started(&["n1"]);
        let mut order = vec![];
        for (ok, class) in script {
            let w = d.next().unwrap_or_else(|| panic!("{name}: nothing to run in {}", d.state));
            order.push((w.step, w.undo));
            d.record(&result(w, ok, class), 20).unwrap();
        }
        assert_eq!(d.state, want, "{name}");
        assert_eq!(order, want_order, "{name}");
        assert!(d.next().is_none(), "{name}: work left after the end");
        assert!(d.events.windows(2).all(|w| w[0].to == w[1].from.unwrap()), "{name}: event log is a chain");
    }
}

#[test]
fn stale_results_are_refused() {
    let mut d = started(&["n1"]);
    let w = d.next().unwrap();
    let mut r = result(w, true, None);
    r.token = 6;
    assert!(d.record(&r, 1).is_err());
    r.token = 7;
    r.epoch = 0;
    assert!(d.record(&r, 1).is_err());
    r.epoch = 1;
    r.step = 2;
    assert!(d.record(&r, 1).is_err());
    r.step = 0;
    r.attempt = 2;
    assert!(d.record(&r, 1).is_err());
    assert_eq!(d.steps[0].status, StepStatus::Pending, "refused results change nothing");
    r.attempt = 1;
    d.record(&r, 1).unwrap();
    // The same result again is stale now.
    assert!(d.record(&r, 1).is_err());
}

#[test]
fn cancel_waits_for_the_step_in_flight_then_undoes_it() {
    use DeployState::*;
    let mut d = started(&["n1"]);
    let w0 = d.next().unwrap();
    d.record(&result(w0, true, None), 1).unwrap();
    let w1 = d.next().unwrap(); // health check, in flight
    d.cancel(2, "operator asked", "alice", false).unwrap();
    assert_eq!(d.state, Cancelling);
    assert_eq!(d.pending_forward_step(), Some(1));
    assert_eq!(d.next(), None, "nothing is undone while step 1 may still run");
    // An undo result now is stale.
    let early = Work { step: 0, undo: true, attempt: 1, not_before_ms: None };
    assert!(d.record(&result(early, true, None), 2).is_err());
    // The aborted health check reports; then start is undone.
    d.record(&result(w1, false, Some(ErrorClass::Aborted)), 3).unwrap();
    let u = d.next().unwrap();
    assert_eq!((u.step, u.undo), (0, true));
    d.record(&result(u, true, None), 4).unwrap();
    assert_eq!(d.state, Cancelled);
    assert_eq!(d.exit_code(), Some(4));
}

#[test]
fn a_lost_node_is_skipped_and_the_others_continue() {
    use DeployState::*;
    let mut d = started(&["n1", "n2"]);
    // n1: start done, health in flight when n1 is lost.
    let w = d.next().unwrap();
    d.record(&result(w, true, None), 1).unwrap();
    let in_flight = d.next().unwrap();
    assert_eq!(d.node_needed(), Some("n1"));
    assert!(d.node_lost("n1", 2, "no heartbeat for 5s", &live(&["n2"])).unwrap());
    assert_eq!(d.epoch, 2);
    // A late result from n1 (old epoch) is refused.
    assert!(d.record(&result(in_flight, true, None), 3).is_err());
    // n2's steps carry on with the new epoch.
    assert_eq!(d.node_needed(), Some("n2"));
    while let Some(w) = d.next() {
        let mut r = result(w, true, None);
        r.epoch = 2;
        d.record(&r, 4).unwrap();
    }
    assert_eq!(d.state, Succeeded);
    assert!(d.events.last().unwrap().reason.contains("n1"));
    assert_eq!(d.steps.iter().filter(|s| s.status == StepStatus::Skipped).count(), 3);
    assert!(!d.node_lost("n2", 5, "x", &live(&[])).unwrap(), "nothing left to skip");
}

#[test]
fn losing_every_node_is_a_failure_not_a_success() {
    use DeployState::*;
    let mut d = started(&["n1", "n2"]);
    let w = d.next().unwrap();
    d.record(&result(w, true, None), 1).unwrap();
    d.node_lost("n1", 2, "silent", &live(&["n2"])).unwrap();
    assert_eq!(d.state, Running, "n2 still carries the release");
    d.node_lost("n2", 3, "silent", &live(&[])).unwrap();
    assert_eq!(d.state, Failed);
    assert!(d.events.iter().any(|e| e.reason.contains("nothing was deployed")));
    assert_eq!(d.exit_code(), Some(3));
}

#[test]
fn a_node_lost_during_compensation_skips_its_undos() {
    use DeployState::*;
    let mut d = started(&["n1", "n2"]);
    for _ in 0..5 {
        let w = d.next().unwrap();
        d.record(&result(w, true, None), 1).unwrap(); // n1 done, start on n2 done
    }
    let w = d.next().unwrap(); // health on n2 fails
    d.record(&result(w, false, Some(ErrorClass::Invalid)), 2).unwrap();
    assert_eq!(d.state, Compensating);
    let u = d.next().unwrap(); // undo start on n2
    d.record(&result(u, true, None), 3).unwrap();
    assert_eq!(d.node_needed(), Some("n1"));
    assert!(d.node_lost("n1", 4, "no heartbeat", &live(&["n2"])).unwrap());
    assert_eq!(d.state, Failed);
    assert!(d.events.last().unwrap().reason.contains("except on lost node(s) n1"));
}

/// A command deployment (movable steps) on n1, n2 and n3 live.
fn command_deployment(irreversible_second: bool) -> Deployment {
    let text = format!(
        "app: infra\nrelease: v1\ndestination: d\nretry: {{ max_attempts: 1 }}\nsteps:\n  - {{ name: a, run: ra, undo: ua }}\n  - {{ name: b, run: rb{} }}\n  - {{ name: c, run: rc, undo: uc }}\n",
        if irreversible_second { ", irreversible: true" } else { ", undo: ub" }
    );
    let mut d = deployment(&["n1"]);
    d.spec = parse_manifest("f", &text, &Overrides::default()).unwrap();
    d.steps = plan(&d.spec, "d", &["n1".into(), "n2".into()]).into_iter().map(StepRecord::new).collect();
    d.token = Some(7);
    d.transition(DeployState::Running, 1, "lock granted", "leader").unwrap();
    d
}

#[test]
fn movable_steps_are_handed_over_with_a_new_epoch_and_checked_first() {
    use DeployState::*;
    let mut d = command_deployment(false);
    assert!(d.steps.iter().all(|s| s.plan.node == "n1" && s.plan.movable));
    let w = d.next().unwrap();
    d.record(&result(w, true, None), 1).unwrap(); // a done on n1
    let in_flight = d.next().unwrap(); // b in flight on n1
    assert!(d.node_lost("n1", 2, "no heartbeat for 5s", &live(&["n2", "n3"])).unwrap());
    assert_eq!(d.epoch, 2);
    assert_eq!(d.state, Running, "the work goes on elsewhere");
    // Everything not done moves to the first live node; only the step
    // that may have been running there is checked first.
    let nodes: Vec<(&str, bool)> = d.steps.iter().map(|s| (s.plan.node.as_str(), s.check_first)).collect();
    assert_eq!(nodes, [("n1", false), ("n2", true), ("n2", false)]);
    assert!(d.steps.iter().all(|s| s.status != StepStatus::Skipped));
    assert!(d.events.last().unwrap().reason.contains("handed over `b` from n1 to n2 (check first)"));
    // The late result from n1 (old epoch) changes nothing.
    assert!(d.record(&result(in_flight, true, None), 3).is_err());
    assert_eq!(d.node_needed(), Some("n2"));
    let mut r = result(d.next().unwrap(), true, None);
    r.epoch = 2;
    d.record(&r, 4).unwrap();
    assert!(!d.steps[1].check_first, "recorded: the flag is spent");
    // c fails on n2 → compensation; a's undo (done on n1, lost) moves too.
    let mut r = result(d.next().unwrap(), false, Some(ErrorClass::Invalid));
    r.epoch = 2;
    d.record(&r, 5).unwrap();
    assert_eq!(d.state, Compensating);
    let u = d.next().unwrap();
    assert_eq!((u.step, u.undo, d.steps[u.step].plan.node.as_str()), (1, true, "n2"));
    let mut r = result(u, true, None);
    r.epoch = 2;
    d.record(&r, 6).unwrap();
    assert_eq!(d.node_needed(), Some("n1"), "a was done on n1");
    assert!(d.resync(7, &live(&["n3"])).unwrap(), "n1 and n2 gone: a's undo goes to n3");
    assert_eq!((d.node_needed(), d.epoch), (Some("n3"), 3));
    let mut r = result(d.next().unwrap(), true, None);
    r.epoch = 3;
    d.record(&r, 8).unwrap();
    assert_eq!(d.state, Failed);
}

#[test]
fn a_movable_step_with_nowhere_to_go_fails_the_deployment() {
    use DeployState::*;
    let mut d = command_deployment(false);
    let w = d.next().unwrap();
    d.record(&result(w, true, None), 1).unwrap();
    assert!(d.node_lost("n1", 2, "silent", &live(&[])).unwrap());
    assert_eq!(d.state, CompensationFailed, "nothing can run b or c, and a's undo has no node either: a human must look");
    assert!(d.events.iter().any(|e| e.reason.contains("no live node is left to run")));
    assert!(d.events.last().unwrap().reason.contains("no live node is left to undo `a` of d"));
    assert_eq!(d.steps[0].status, StepStatus::Skipped);
    assert!(d.keeps_destination(), "the destination stays locked until resolved");
}

#[test]
fn a_failure_after_an_irreversible_step_needs_a_human() {
    use DeployState::*;
    let mut d = command_deployment(true);
    for _ in 0..2 {
        let w = d.next().unwrap();
        d.record(&result(w, true, None), 1).unwrap();
    }
    let w = d.next().unwrap(); // c fails
    d.record(&result(w, false, Some(ErrorClass::Invalid)), 2).unwrap();
    assert_eq!(d.state, CompensationFailed, "b cannot be undone, so a is not undone blindly either");
    assert_eq!(d.steps[0].status, StepStatus::Done);
    assert!(d.events.last().unwrap().reason.contains("irreversible"));
    assert!(d.keeps_destination());
    d.resolve(3, "checked by hand", "alice").unwrap();
    assert!(!d.keeps_destination());
}

#[test]
fn cancel_of_a_queued_deployment_ends_at_once() {
    let mut d = deployment(&["n1"]);
    d.cancel(1, "deadline passed", "leader", true).unwrap();
    assert_eq!(d.state, DeployState::Cancelled);
    assert_eq!(d.exit_code(), Some(5));
    assert_eq!(d.events.len(), 2);
    assert!(d.cancel(2, "again", "x", false).is_err());
}
