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
        pause: None,
        targets: vec![],
        steps,
        events: vec![],
        compacted: None,
        changed: Default::default(),
    }
}

/// Destination `d` has these live nodes.
fn live(nodes: &[&str]) -> LiveNodes {
    [("d".to_string(), nodes.iter().map(|s| s.to_string()).collect())].into()
}

/// `node_wait` of destination `d`: 10 s.
const NODE_WAIT: i64 = 10_000;

fn waits() -> NodeWaits {
    [("d".to_string(), NODE_WAIT as u64)].into()
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
    assert!(d.node_lost_with_waits("n1", 2, "no heartbeat for 5s", &live(&["n2"]), &waits()).unwrap());
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
    assert!(!d.node_lost_with_waits("n2", 5, "x", &live(&[]), &waits()).unwrap(), "nothing left to skip");
}

#[test]
fn losing_every_node_is_a_failure_not_a_success() {
    use DeployState::*;
    let mut d = started(&["n1", "n2"]);
    let w = d.next().unwrap();
    d.record(&result(w, true, None), 1).unwrap();
    d.node_lost_with_waits("n1", 2, "silent", &live(&["n2"]), &waits()).unwrap();
    assert_eq!(d.state, Running, "n2 still carries the release");
    d.node_lost_with_waits("n2", 3, "silent", &live(&[]), &waits()).unwrap();
    assert_eq!(d.state, Running, "n2 may reboot: its work waits for it");
    assert!(!d.give_up_waiting(3 + NODE_WAIT - 1, &live(&[]), &waits()).unwrap(), "not before node_wait");
    assert!(d.give_up_waiting(3 + NODE_WAIT, &live(&[]), &waits()).unwrap());
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
    assert!(d.node_lost_with_waits("n1", 4, "no heartbeat", &live(&["n2"]), &waits()).unwrap());
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
    assert!(d.node_lost_with_waits("n1", 2, "no heartbeat for 5s", &live(&["n2", "n3"]), &waits()).unwrap());
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
    assert!(d.node_lost_with_waits("n1", 2, "silent", &live(&[]), &waits()).unwrap());
    assert_eq!(d.state, Running, "b and c wait for a node");
    assert!(d.give_up_waiting(2 + NODE_WAIT, &live(&[]), &waits()).unwrap());
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

/// A command deployment (movable steps `a`, `b`, `c`, each undoable) on n1
/// alone, deadline `deadline_ms`.
fn lone_command(deadline_ms: i64) -> Deployment {
    let mut d = command_deployment(false);
    d.steps = plan(&d.spec, "d", &["n1".into()]).into_iter().map(StepRecord::new).collect();
    d.deadline_ms = deadline_ms;
    d
}

/// Report `d`'s next work as succeeded (or failed, `invalid`) at the
/// current epoch.
fn report(d: &mut Deployment, ok: bool, at: i64) {
    let mut r = result(d.next().expect("work to do"), ok, (!ok).then_some(ErrorClass::Invalid));
    r.epoch = d.epoch;
    d.record(&r, at).unwrap();
}

#[test]
fn work_with_no_live_node_waits_for_one() {
    use DeployState::*;
    // (case, process (else command), deadline, node back at (else the wait
    // runs out), state at the end, its reason contains, exit code)
    type Case<'a> = (&'a str, bool, i64, Option<i64>, DeployState, &'a str, u8);
    let cases: [Case; 6] = [
        ("command, node back within node_wait", false, 1_000_000, Some(5_000), Succeeded, "every step succeeded", 0),
        ("command, node back just before the bound", false, 1_000_000, Some(2 + NODE_WAIT - 1), Succeeded, "every step succeeded", 0),
        ("process, node back within node_wait", true, 1_000_000, Some(5_000), Succeeded, "every step succeeded", 0),
        (
            "command, lost past node_wait: `a` cannot be undone",
            false,
            1_000_000,
            None,
            CompensationFailed,
            "start the node, check the destination, then run `fleetctl resolve d1`",
            6,
        ),
        ("process, lost past node_wait", true, 1_000_000, None, Failed, "every completed step was undone except on lost node(s) n1", 3),
        ("command, the deadline comes first", false, 2 + NODE_WAIT / 2, None, CompensationFailed, "fleetctl resolve d1", 6),
    ];
    for (case, process, deadline, back_at, end, reason, code) in cases {
        let mut d = if process {
            let mut d = started(&["n1"]);
            d.deadline_ms = deadline;
            d
        } else {
            lone_command(deadline)
        };
        report(&mut d, true, 1); // the first step is done on n1
        let in_flight = d.next().unwrap();
        assert!(d.node_lost_with_waits("n1", 2, "no heartbeat for 5.1s", &live(&[]), &waits()).unwrap(), "{case}");
        assert_eq!((d.state, d.epoch), (Running, 1), "{case}: it waits, at the same epoch");
        let (i, w) = d.blocking_wait().expect(case);
        let until = (2 + NODE_WAIT).min(deadline);
        assert_eq!((i, w.since_ms, w.until_ms), (in_flight.step, 2, until), "{case}");
        assert!(d.steps[i].check_first, "{case}: the step in flight is checked first");
        let ev = &d.events.last().unwrap().reason;
        assert!(ev.contains("node n1 lost (no heartbeat for 5.1s); waiting for a node of d: n1 lost"), "{case}: {ev}");
        assert!(ev.contains("node_wait 10s") && ev.contains("gives up at 1970-01-01T00:00"), "{case}: {ev}");
        assert!(!d.node_lost_with_waits("n1", 3, "again", &live(&[]), &waits()).unwrap(), "{case}: already waiting");
        match back_at {
            Some(at) => {
                assert!(!d.give_up_waiting(at, &live(&[]), &waits()).unwrap(), "{case}: not before the bound");
                if process {
                    assert!(!d.node_back("n2", at, &live(&["n2"])).unwrap(), "{case}: n1's steps are bound to n1");
                }
                assert!(d.node_back("n1", at, &live(&["n1"])).unwrap(), "{case}");
                assert!(d.blocking_wait().is_none(), "{case}");
                assert!(d.events.last().unwrap().reason.contains("node n1 registered again after the work waited"), "{case}");
                // The node answers the step in flight at the same epoch (from
                // its journal, or after its check).
                let mut r = result(in_flight, true, None);
                r.epoch = d.epoch;
                d.record(&r, at + 1).unwrap();
                while d.next().is_some() {
                    report(&mut d, true, at + 2);
                }
            }
            None => {
                assert!(!d.give_up_waiting(until - 1, &live(&[]), &waits()).unwrap(), "{case}");
                assert!(d.give_up_waiting(until, &live(&[]), &waits()).unwrap(), "{case}");
                let gave_up = d.events.iter().find(|e| e.reason.starts_with("gave up waiting")).expect(case);
                let bound = if deadline < 2 + NODE_WAIT { "the deployment's deadline" } else { "node_wait" };
                assert!(gave_up.reason.contains("n1, lost at 1970-01-01T00:00:00Z, was not back by 1970-01-01T00:00:"), "{case}");
                assert!(gave_up.reason.contains(bound), "{case}: {}", gave_up.reason);
                assert!(d.epoch > 1, "{case}: whatever n1 still reports is stale now");
            }
        }
        assert_eq!(d.state, end, "{case}: {:#?}", d.events);
        assert!(d.events.last().unwrap().reason.contains(reason), "{case}: {}", d.events.last().unwrap().reason);
        assert_eq!(d.exit_code(), Some(code), "{case}");
    }
}

#[test]
fn an_undo_with_no_live_node_waits_then_runs_on_the_returning_node() {
    use DeployState::*;
    let mut d = lone_command(1_000_000);
    report(&mut d, true, 1); // a
    report(&mut d, false, 2); // b fails: undo a next, on n1
    assert_eq!(d.state, Compensating);
    assert!(d.node_lost_with_waits("n1", 3, "silent", &live(&[]), &waits()).unwrap());
    assert_eq!(d.state, Compensating, "not compensation_failed at once");
    let (i, w) = d.blocking_wait().unwrap();
    assert_eq!((i, w.until_ms), (0, 3 + NODE_WAIT));
    assert!(d.events.last().unwrap().reason.contains("`a` must be undone for it"));
    // Another node the destination selects registers: the undo moves there.
    assert!(d.node_back("n2", 4, &live(&["n2"])).unwrap());
    assert_eq!((d.steps[0].plan.node.as_str(), d.epoch), ("n2", 2));
    report(&mut d, true, 5);
    assert_eq!(d.state, Failed);
    assert_eq!(d.exit_code(), Some(3));

    // Compensation is never cut short by the deadline: only node_wait bounds it.
    let mut d = lone_command(2);
    report(&mut d, true, 1);
    report(&mut d, false, 2);
    d.node_lost_with_waits("n1", 3, "silent", &live(&[]), &waits()).unwrap();
    assert_eq!(d.blocking_wait().unwrap().1.until_ms, 3 + NODE_WAIT);
}

#[test]
fn a_cancelled_deployment_waits_for_the_node_of_its_step_in_flight() {
    use DeployState::*;
    let mut d = lone_command(1_000_000);
    report(&mut d, true, 1);
    d.node_lost_with_waits("n1", 2, "silent", &live(&[]), &waits()).unwrap();
    d.cancel(3, "no longer wanted", "op", false).unwrap();
    assert_eq!(d.state, Cancelling);
    assert_eq!(d.blocking_wait().map(|(i, _)| i), Some(1), "b may be running on n1");
    assert!(d.give_up_waiting(2 + NODE_WAIT, &live(&[]), &waits()).unwrap());
    assert_eq!(d.state, CompensationFailed, "a's undo has nowhere to run either");
    assert_eq!(d.exit_code(), Some(6));
}

#[test]
fn redacted_masks_secret_values_everywhere_a_client_looks() {
    let mut d = deployment(&["n1"]);
    let secret = "p@ss\"word\\1";
    d.spec.secret_env.insert("API_TOKEN".into(), secret.into());
    d.steps = plan(&d.spec, "d", &["n1".to_string()]).into_iter().map(StepRecord::new).collect();
    // What nodes write: plain, and inside JSON once and twice.
    let once = serde_json::json!({ "env": { "API_TOKEN": secret } }).to_string();
    let twice = serde_json::json!({ "instance": once }).to_string();
    d.steps[0].output = Some(twice.clone());
    d.steps[1].output = Some(once.clone());
    d.steps[1].error = Some(format!("failed with {secret} in the message"));
    d.events.push(Event { at_ms: 1, from: None, to: DeployState::Queued, reason: format!("x {secret} y"), actor: "op".into() });

    let r = d.redacted();
    let text = serde_json::to_string(&r).unwrap();
    let escaped_once = serde_json::to_string(secret).unwrap();
    for form in [secret.to_string(), escaped_once[1..escaped_once.len() - 1].to_string()] {
        assert!(!text.contains(&form), "{form} in {text}");
    }
    assert_eq!(r.spec.secret_env["API_TOKEN"], crate::manifest::REDACTED);
    let start = r.steps.iter().find_map(|s| match &s.plan.action {
        crate::saga::StepAction::StartInstance { env, .. } => Some(env.clone()),
        _ => None,
    });
    assert_eq!(start.unwrap()["API_TOKEN"], crate::manifest::REDACTED);
    // The real values stay in the state machine's record (nodes need them).
    assert_eq!(d.spec.secret_env["API_TOKEN"], secret);
    assert!(d
        .steps
        .iter()
        .any(|s| matches!(&s.plan.action, crate::saga::StepAction::StartInstance { env, .. } if env["API_TOKEN"] == secret)));
    // Without secrets, nothing changes.
    let plain = deployment(&["n1"]);
    assert_eq!(plain.redacted(), plain);
}

/// `StepRecord::same_progress`: each change a step can go through after
/// its plan is made is seen; the fixed part of the plan is not compared.
#[test]
fn same_progress_sees_every_change_after_planning() {
    let base = deployment(&["n1"]).steps[0].clone();
    type Edit = fn(&mut StepRecord);
    let cases: &[(&str, Edit, bool)] = &[
        ("nothing", |_| {}, true),
        ("status", |s| s.status = StepStatus::Done, false),
        ("attempt", |s| s.attempt += 1, false),
        ("undo attempt", |s| s.undo_attempt += 1, false),
        ("backoff", |s| s.not_before_ms = Some(5), false),
        ("check first", |s| s.check_first = true, false),
        ("waiting", |s| s.waiting = Some(NodeWait { since_ms: 1, until_ms: 2 }), false),
        ("output", |s| s.output = Some("{}".into()), false),
        ("error", |s| s.error = Some("boom".into()), false),
        ("error class", |s| s.error_class = Some(ErrorClass::Transient), false),
        ("started", |s| s.started_ms = Some(1), false),
        ("finished", |s| s.finished_ms = Some(1), false),
        ("undo started", |s| s.undo_started_ms = Some(1), false),
        ("undo finished", |s| s.undo_finished_ms = Some(1), false),
        ("node (a hand-over)", |s| s.plan.node = "n2".into(), false),
        // Fixed once planned: not compared.
        ("name", |s| s.plan.name.push('!'), true),
    ];
    for (what, edit, same) in cases {
        let mut s = base.clone();
        edit(&mut s);
        assert_eq!(base.same_progress(&s), *same, "{what}");
        assert_eq!(s.same_progress(&base), *same, "{what}, the other way round");
    }
}
