use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::command::{Request, Response};
use crate::manifest::{parse_manifest, Destination, Overrides, QueuePolicy, DEFAULT_NODE_WAIT_MS};

/// Every command is applied at this time.
const T0: i64 = 1_000;
/// `timeout: 1m` in the manifests below.
const DEADLINE: i64 = T0 + 60_000;

const WEB: &str = "app: web\nrelease: v1\ndestination: a\nrun: [srv]\nhealth: { tcp: true }\ntimeout: 1m\n";
const INFRA: &str = "app: infra\nrelease: v1\ndestination: c\ntimeout: 1m\nsteps:\n  - { name: plan, run: tf plan, undo: tf undo }\n  - { name: apply, run: tf apply }\n";

/// Nodes n1 and n2, a process destination `a` and a command destination
/// `c` selecting both.
struct World {
    s: State,
    index: u64,
}

impl World {
    fn new() -> World {
        let mut w = World { s: State::default(), index: 0 };
        for n in ["n1", "n2"] {
            w.apply(Command::RegisterNode { id: n.into(), labels: [("env".to_string(), "t".to_string())].into() });
        }
        let dest = |name: &str, adapter: &str| Destination {
            name: name.into(),
            adapter: adapter.into(),
            selector: [("env".to_string(), "t".to_string())].into(),
            queue: QueuePolicy::Queue,
            node_wait_ms: DEFAULT_NODE_WAIT_MS,
        };
        w.apply(Command::PutDestinations { destinations: vec![dest("a", "process"), dest("c", "command")] });
        w
    }

    fn apply(&mut self, command: Command) -> Response {
        self.apply_at(T0, command)
    }

    fn apply_at(&mut self, at_ms: i64, command: Command) -> Response {
        self.index += 1;
        self.s.apply(self.index, &Request { request_id: None, at_ms, command, origin: None }).0
    }

    fn submit(&mut self, manifest: &str, lock_wait_ms: Option<u64>) -> String {
        let spec = parse_manifest("f", manifest, &Overrides::default()).unwrap();
        match self.apply(Command::SubmitDeployment { spec: Box::new(spec), actor: "op".into(), lock_wait_ms, idempotency_key: None }) {
            Response::Deployment { id, .. } => id,
            other => panic!("not submitted: {other:?}"),
        }
    }

    fn d(&self, id: &str) -> &Deployment {
        self.s.deployment(id).unwrap()
    }

    /// Report what `id` runs next, with this outcome.
    fn report(&mut self, id: &str, ok: bool, class: Option<ErrorClass>) {
        let d = self.d(id).clone();
        let w = d.next().expect("work to do");
        let outcome = StepOutcome {
            step: w.step,
            undo: w.undo,
            attempt: w.attempt,
            token: d.token.unwrap(),
            epoch: d.epoch,
            ok,
            output: ok.then(|| format!("{{\"out\":{}}}", w.step)),
            error: (!ok).then(|| "boom".into()),
            class,
            started_ms: T0,
            finished_ms: T0,
            node: d.steps[w.step].plan.node.clone(),
        };
        let r = self.apply(Command::StepResult { deployment: id.into(), outcome });
        assert!(matches!(r, Response::Deployment { .. }), "{r:?}");
    }

    fn cancel(&mut self, id: &str) {
        self.apply(Command::CancelDeployment { id: id.into(), reason: "no".into(), actor: "op".into(), timed_out: false });
    }
}

/// What the leader has seen, as plain data.
#[derive(Default, Clone)]
struct Seen {
    heard: BTreeMap<String, i64>,
    connected: BTreeSet<String>,
    /// (deployment, step, undo, attempt) → where.
    in_flight: BTreeMap<(String, usize, bool, u32), Sent>,
}

impl Seen {
    /// n1 and n2 connected and heard from at `at`.
    fn all_heard(at: i64) -> Seen {
        let mut s = Seen::default();
        for n in ["n1", "n2"] {
            s.heard.insert(n.into(), at);
            s.connected.insert(n.into());
        }
        s
    }
    fn sent(mut self, id: &str, step: usize, undo: bool, attempt: u32, node: &str, aborted: bool) -> Seen {
        self.in_flight.insert((id.into(), step, undo, attempt), Sent { node: node.into(), aborted });
        self
    }
}

impl Observed for Seen {
    fn last_heard_ms(&self, node: &str) -> Option<i64> {
        self.heard.get(node).copied()
    }
    fn is_connected(&self, node: &str) -> bool {
        self.connected.contains(node)
    }
    fn in_flight(&self, key: &StepKey) -> Option<Sent> {
        self.in_flight.get(&(key.deployment.clone(), key.step, key.undo, key.attempt)).cloned()
    }
}

/// One line per action, for tables.
fn show(a: Option<Action>) -> String {
    match a {
        None => "nothing".into(),
        Some(Action::Propose(p)) => match p.command {
            Command::NodeLost { node, why } => format!("lost {node}: {why}"),
            Command::NodeWaitExpired { deployment } => format!("give up waiting: {deployment} (key {})", p.key),
            Command::RegisterNode { id, .. } => format!("register {id} again"),
            Command::CancelDeployment { reason, timed_out: true, .. } => format!("timed out: {reason}"),
            Command::StepResult { outcome, .. } => {
                format!("not run: step {} attempt {} ({:?}, {:?})", outcome.step, outcome.attempt, outcome.class, outcome.error)
            }
            other => format!("propose {other:?}"),
        },
        Some(Action::Abort { node, key, reason }) => format!("abort step {} on {node}: {reason}", key.step),
        Some(Action::Send(a)) => format!(
            "send {}step {} attempt {} to {}{}",
            if a.key.undo { "undo of " } else { "" },
            a.key.step,
            a.key.attempt,
            a.node,
            a.handed_over_from.map(|f| format!(" (from {f})")).unwrap_or_default()
        ),
    }
}

fn tick(now_ms: i64, leader_since_ms: i64) -> Tick {
    Tick { now_ms, leader_since_ms }
}

#[test]
fn lease_rules() {
    // A running deployment whose first step runs on n1.
    let mut w = World::new();
    let id = w.submit(WEB, None);
    let d = w.d(&id);
    assert_eq!(d.node_needed(), Some("n1"));
    let now = T0 + 30_000;
    let heard = |at: Option<i64>| {
        let mut s = Seen::all_heard(now);
        match at {
            Some(at) => s.heard.insert("n1".into(), at),
            None => s.heard.remove("n1"),
        };
        s
    };
    // (case, last heard of n1, leader since, what is due)
    let cases: Vec<(&str, Option<i64>, i64, &str)> = vec![
        ("heard 1 s ago", Some(now - 1_000), T0, "send step 0 attempt 1 to n1"),
        ("silent 6 s", Some(now - 6_000), T0, "lost n1: no heartbeat for 6.0s"),
        ("silent exactly the lease: not yet", Some(now - NODE_LEASE_MS), T0, "send step 0 attempt 1 to n1"),
        ("silent 1 ms past the lease", Some(now - NODE_LEASE_MS - 1), T0, "lost n1: no heartbeat for 5.0s"),
        ("never heard, leading for 6 s", None, now - 6_000, "lost n1: no heartbeat for 6.0s"),
        ("never heard, leading for 1 s: counted from leadership start", None, now - 1_000, "send step 0 attempt 1 to n1"),
        ("heard a minute ago, but leading for 2 s", Some(now - 60_000), now - 2_000, "send step 0 attempt 1 to n1"),
    ];
    for (case, last, since, want) in cases {
        assert_eq!(show(due_for(d, tick(now, since), &heard(last))), want, "{case}");
    }
    assert_eq!(silence_ms(tick(10_000, 4_000), Some(1_000)), 6_000);
    assert_eq!(silence_ms(tick(10_000, 4_000), Some(8_000)), 2_000);
    assert_eq!(silence_ms(tick(10_000, 4_000), None), 6_000);
    assert!(!lease_expired(NODE_LEASE_MS) && lease_expired(NODE_LEASE_MS + 1));
}

#[test]
fn the_lease_of_a_node_away_counts_too() {
    // n1 is not connected and silent: still the node the saga needs, so
    // the lease runs out; nothing is sent to it meanwhile.
    let mut w = World::new();
    let id = w.submit(WEB, None);
    let mut seen = Seen::all_heard(T0);
    seen.connected.remove("n1");
    let a = due_for(w.d(&id), tick(T0 + 5_500, 0), &seen);
    match a {
        Some(Action::Propose(p)) => {
            assert_eq!(p.key, format!("{id}/lost/n1"));
            assert_eq!(p.request_id, None);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn time_limit_rules() {
    let mut w = World::new();
    // Queued behind a maintenance lock, with and without --lock-wait 30s.
    w.apply(Command::AcquireLock { destination: "a".into(), holder: "alice".into(), reason: "maintenance".into() });
    let waiting = w.submit(WEB, Some(30_000));
    let queued = w.submit(WEB, None);
    w.apply(Command::ReleaseLock { destination: "a".into(), holder: "alice".into() });
    // `waiting` runs now; hold `c` and queue more behind it.
    let running = w.submit(INFRA, None);
    let queued_on_c = w.submit(INFRA, Some(30_000));
    // A compensating one: infra on a second command destination.
    let mut w2 = World::new();
    let compensating = w2.submit(INFRA, None);
    w2.report(&compensating, true, None);
    w2.report(&compensating, false, Some(ErrorClass::Invalid));
    assert_eq!(w2.d(&compensating).state, DeployState::Compensating);
    let mut w3 = World::new();
    let cancelling = w3.submit(WEB, None);
    w3.cancel(&cancelling);
    assert_eq!(w3.d(&cancelling).state, DeployState::Cancelling);

    assert_eq!(w.d(&waiting).state, DeployState::Running);
    assert_eq!(w.d(&queued).state, DeployState::Queued);
    assert_eq!(w.d(&running).state, DeployState::Running);
    assert_eq!(w.d(&queued_on_c).state, DeployState::Queued);

    let waited = "timed out: waited 30s (--lock-wait) for the destination lock; `fleetctl lock status c` shows who holds it";
    let deadline = "timed out: deadline of 1m passed; compensating what ran";
    let seen = Seen::all_heard(DEADLINE + 10);
    let at = |now: i64| tick(now, T0);
    // (case, deployment, time, what is due)
    let cases: Vec<(&str, &Deployment, i64, &str)> = vec![
        ("lock wait not over", w.d(&queued_on_c), T0 + 30_000, "nothing"),
        ("lock wait over", w.d(&queued_on_c), T0 + 30_001, waited),
        ("a lock wait is only for the lock: granted, it no longer counts", w.d(&waiting), T0 + 30_001, "send step 0 attempt 1 to n1"),
        ("queued, no lock wait, before the deadline", w.d(&queued), DEADLINE, "nothing"),
        ("queued past the deadline", w.d(&queued), DEADLINE + 1, deadline),
        ("running at the deadline", w.d(&running), DEADLINE, "send step 0 attempt 1 to n1"),
        ("running past the deadline", w.d(&running), DEADLINE + 1, deadline),
        ("compensation is never cut short", w2.d(&compensating), DEADLINE + 1, "send undo of step 0 attempt 1 to n1"),
        (
            "cancelling is never cancelled again",
            w3.d(&cancelling),
            DEADLINE + 1,
            "not run: step 0 attempt 1 (Some(Aborted), Some(\"cancelled before it started\"))",
        ),
    ];
    for (case, d, now, want) in cases {
        assert_eq!(show(due_for(d, at(now), &seen)), want, "{case}");
    }
    // The proposals are named once per deployment and carry a request id,
    // so a repeated proposal is applied once.
    let Some(Action::Propose(p)) = due_for(w.d(&queued), at(DEADLINE + 1), &seen) else { panic!() };
    assert_eq!(
        (p.key.as_str(), p.request_id.as_deref()),
        (format!("{queued}/deadline").as_str(), Some(format!("coordinator/deadline/{queued}").as_str()))
    );
    assert!(matches!(p.command, Command::CancelDeployment { ref actor, timed_out: true, .. } if actor == "coordinator"));
    let Some(Action::Propose(p)) = due_for(w.d(&queued_on_c), at(T0 + 30_001), &seen) else { panic!() };
    assert_eq!(p.request_id, Some(format!("coordinator/lock-wait/{queued_on_c}")));
}

#[test]
fn cancelling_rules() {
    let mut w = World::new();
    let id = w.submit(WEB, None);
    w.report(&id, true, None); // start on n1 done; health (step 1) is next
    w.cancel(&id);
    let d = w.d(&id);
    assert_eq!((d.state, d.pending_forward_step()), (DeployState::Cancelling, Some(1)));
    let now = T0 + 1_000;
    let away = {
        let mut s = Seen::all_heard(now);
        s.connected.remove("n1");
        s
    };
    // (case, what the leader has seen, what is due)
    let cases: Vec<(&str, Seen, &str)> = vec![
        (
            "in flight: abort it where it runs",
            Seen::all_heard(now).sent(&id, 1, false, 1, "n1", false),
            "abort step 1 on n1: the deployment is being cancelled",
        ),
        ("in flight, already told", Seen::all_heard(now).sent(&id, 1, false, 1, "n1", true), "nothing"),
        (
            "never sent, its node is here",
            Seen::all_heard(now),
            "not run: step 1 attempt 1 (Some(Aborted), Some(\"cancelled before it started\"))",
        ),
        ("never sent, its node is away: wait for it", away, "nothing"),
    ];
    for (case, seen, want) in cases {
        assert_eq!(show(due_for(d, tick(now, T0), &seen)), want, "{case}");
    }
    let Some(Action::Propose(p)) = due_for(d, tick(now, T0), &Seen::all_heard(now)) else { panic!() };
    assert_eq!((p.key, p.request_id), (format!("{id}/abort/1/1"), None));
    let Command::StepResult { deployment, outcome } = p.command else { panic!() };
    assert_eq!(deployment, id);
    assert_eq!((outcome.token, outcome.epoch, outcome.node.as_str(), outcome.started_ms), (d.token.unwrap(), d.epoch, "coordinator", now));
    assert!(d.check(&outcome).is_ok(), "the state machine takes it");
}

#[test]
fn sending_rules() {
    let mut w = World::new();
    let id = w.submit(WEB, None);
    let now = T0 + 1_000;
    let d = w.d(&id).clone();
    // (case, what the leader has seen, what is due)
    let cases: Vec<(&str, Seen, &str)> = vec![
        ("not sent yet", Seen::all_heard(now), "send step 0 attempt 1 to n1"),
        ("in flight on its node", Seen::all_heard(now).sent(&id, 0, false, 1, "n1", false), "nothing"),
        (
            "another attempt in flight does not count",
            Seen::all_heard(now).sent(&id, 0, false, 2, "n1", false),
            "send step 0 attempt 1 to n1",
        ),
        (
            "in flight elsewhere: handed over",
            Seen::all_heard(now).sent(&id, 0, false, 1, "n2", false),
            "send step 0 attempt 1 to n1 (from n2)",
        ),
    ];
    for (case, seen, want) in cases {
        assert_eq!(show(due_for(&d, tick(now, T0), &seen)), want, "{case}");
    }
    let Some(Action::Send(a)) = due_for(&d, tick(now, T0), &Seen::all_heard(now)) else { panic!() };
    let want_key = StepKey { deployment: id.clone(), step: 0, undo: false, attempt: 1, token: d.token.unwrap(), epoch: 1 };
    assert_eq!(a.key, want_key);
    assert_eq!((a.destination.as_str(), a.app.as_str(), a.release.as_str()), ("a", "web", "v1"));
    assert_eq!(
        (&a.action, a.timeout_ms, a.check_first, &a.run_output),
        (&d.steps[0].plan.action, d.steps[0].plan.timeout_ms, false, &None)
    );

    // Backoff: a transient failure is retried, not before its time.
    w.report(&id, false, Some(ErrorClass::Transient));
    let d = w.d(&id);
    let not_before = d.steps[0].not_before_ms.unwrap();
    assert!(not_before > T0);
    assert_eq!(show(due_for(d, tick(not_before - 1, T0), &Seen::all_heard(not_before))), "nothing");
    assert_eq!(show(due_for(d, tick(not_before, T0), &Seen::all_heard(not_before))), "send step 0 attempt 2 to n1");

    // An undo carries the output of the forward run.
    w.report(&id, true, None);
    w.report(&id, false, Some(ErrorClass::Invalid));
    let d = w.d(&id);
    let Some(Action::Send(a)) = due_for(d, tick(now, T0), &Seen::all_heard(now)) else { panic!() };
    assert_eq!((a.key.step, a.key.undo, a.run_output.as_deref()), (0, true, Some("{\"out\":0}")));
}

#[test]
fn a_handed_over_step_goes_to_its_new_node_checked_first() {
    let mut w = World::new();
    let id = w.submit(INFRA, None);
    assert_eq!(w.d(&id).node_needed(), Some("n1"));
    w.apply(Command::NodeLost { node: "n1".into(), why: "silent".into() });
    let d = w.d(&id);
    assert_eq!((d.epoch, d.node_needed()), (2, Some("n2")));
    // n1 was sent step 0 before it was lost.
    let seen = Seen::all_heard(T0).sent(&id, 0, false, 1, "n1", false);
    let Some(Action::Send(a)) = due_for(d, tick(T0, T0), &seen) else { panic!() };
    assert_eq!((a.node.as_str(), a.handed_over_from.as_deref(), a.check_first, a.key.epoch), ("n2", Some("n1"), true, 2));
}

#[test]
fn due_covers_every_active_deployment() {
    let mut w = World::new();
    let web = w.submit(WEB, None);
    let infra = w.submit(INFRA, None);
    let done = w.submit(INFRA, None);
    w.cancel(&done); // queued: cancelled at once
    let seen = Seen::all_heard(T0);
    let actions = due(&w.s, tick(T0, T0), &seen);
    let to: Vec<&str> = actions
        .iter()
        .map(|a| match a {
            Action::Send(a) => a.key.deployment.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(to, [web.as_str(), infra.as_str()]);
}

#[test]
fn due_among_answers_what_due_would_for_the_named_deployments_only() {
    let mut w = World::new();
    let web = w.submit(WEB, None);
    let infra = w.submit(INFRA, None);
    let done = w.submit(INFRA, None);
    w.cancel(&done);
    let seen = Seen::all_heard(T0);
    let all: Vec<String> = due(&w.s, tick(T0, T0), &seen).into_iter().map(|a| show(Some(a))).collect();
    let cases: [(&[&str], &[usize]); 5] = [
        (&[], &[]),
        (&[&infra], &[1]),
        (&[&web, &infra], &[0, 1]),
        // Ended and unknown deployments have nothing due.
        (&[&done, "d999", "nonsense"], &[]),
        (&[&infra, &done], &[1]),
    ];
    for (ids, want) in cases {
        let got: Vec<String> = due_among(&w.s, ids.iter().copied(), tick(T0, T0), &seen).into_iter().map(|a| show(Some(a))).collect();
        let want: Vec<String> = want.iter().map(|&i| all[i].clone()).collect();
        assert_eq!(got, want, "due_among {ids:?}");
    }
    // Past the deadline both have their cancel due, as `due` says.
    let late = tick(DEADLINE + 1, T0);
    let all: Vec<String> = due(&w.s, late, &seen).into_iter().map(|a| show(Some(a))).collect();
    let got: Vec<String> = due_among(&w.s, [web.as_str(), infra.as_str()], late, &seen).into_iter().map(|a| show(Some(a))).collect();
    assert_eq!(got, all);
}

#[test]
fn forget_rules() {
    let mut w = World::new();
    // d_web: process steps on n1 and n2; n1 is lost and its steps skipped.
    let web = w.submit(WEB, None);
    w.apply(Command::NodeLost { node: "n1".into(), why: "silent".into() });
    w.apply(Command::RegisterNode { id: "n1".into(), labels: [("env".to_string(), "t".to_string())].into() });
    // infra: a command deployment still running on n1 at epoch 1.
    let infra = w.submit(INFRA, None);
    // ended: succeeded.
    let ended = w.submit("app: api\nrelease: v1\ndestination: c\nsteps:\n  - { name: x, run: x }\n", None);
    let web_d = w.d(&web).clone();
    assert_eq!(web_d.epoch, 2);
    let infra_d = w.d(&infra).clone();
    assert_eq!(infra_d.state, DeployState::Running);
    let key = |d: &Deployment, step: usize, token: u64, epoch: u64| StepKey {
        deployment: d.id.clone(),
        step,
        undo: false,
        attempt: 1,
        token,
        epoch,
    };
    let t = infra_d.token.unwrap();
    let web_forget = format!("{web}@a: {web} went on without this node (running); its steps here were skipped");
    // (case, node, what it reports running, the forgets as "deployment@destination: reason")
    let cases: Vec<(&str, &str, Vec<StepKey>, Vec<String>)> = vec![
        ("skipped steps", "n1", vec![], vec![web_forget.clone()]),
        ("nothing skipped on n2", "n2", vec![], vec![]),
        ("current work is kept", "n2", vec![key(&infra_d, 0, t, 1)], vec![]),
        (
            "stale token",
            "n2",
            vec![key(&infra_d, 0, t - 1, 1)],
            vec![format!("{infra}@c: step 1 of {infra} is stale (deployment running, epoch 1 now)")],
        ),
        (
            "another epoch, older",
            "n2",
            vec![key(&web_d, 4, web_d.token.unwrap(), 1)],
            vec![format!("{web}@a: step 5 of {web} is stale (deployment running, epoch 2 now)")],
        ),
        (
            "another epoch, newer: stale too",
            "n2",
            vec![key(&infra_d, 0, t, 2)],
            vec![format!("{infra}@c: step 1 of {infra} is stale (deployment running, epoch 1 now)")],
        ),
        (
            "unknown deployment",
            "n2",
            vec![StepKey { deployment: "d999".into(), step: 0, undo: false, attempt: 1, token: 1, epoch: 1 }],
            vec![],
        ),
        (
            "out-of-range step",
            "n2",
            vec![key(&infra_d, usize::MAX, t, 9)],
            vec![format!("{infra}@c: step {} of {infra} is stale (deployment running, epoch 1 now)", usize::MAX)],
        ),
        ("one forget per deployment and destination", "n1", vec![key(&web_d, 0, 0, 1), key(&web_d, 1, 0, 1)], vec![web_forget.clone()]),
    ];
    for (case, node, running, want) in cases {
        let got: Vec<String> =
            forgets(&w.s, node, &running).into_iter().map(|f| format!("{}@{}: {}", f.deployment, f.destination, f.reason)).collect();
        assert_eq!(got, want, "{case}");
    }
    // Ended deployments: whatever a node still runs of them is stale.
    w.report(&infra, true, None);
    w.report(&infra, true, None);
    w.report(&ended, true, None);
    let (infra_d, ended_d) = (w.d(&infra).clone(), w.d(&ended).clone());
    assert_eq!((infra_d.state, ended_d.state), (DeployState::Succeeded, DeployState::Succeeded));
    let got = forgets(&w.s, "n2", &[key(&infra_d, 1, t, 1), key(&ended_d, 0, ended_d.token.unwrap(), ended_d.epoch)]);
    let reasons: Vec<&str> = got.iter().map(|f| f.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            format!("step 2 of {infra} is stale (deployment succeeded, epoch 1 now)"),
            format!("step 1 of {ended} is stale (deployment succeeded, epoch 1 now)")
        ]
    );
    assert_eq!((got[1].token, got[1].epoch), (ended_d.token.unwrap(), 1));
}

#[test]
fn forgets_for_deployments_compacted_or_gone_from_the_history() {
    let mut w = World::new();
    let b = Destination {
        name: "b".into(),
        adapter: "process".into(),
        selector: [("env".to_string(), "t".to_string())].into(),
        queue: QueuePolicy::Queue,
        node_wait_ms: DEFAULT_NODE_WAIT_MS,
    };
    w.apply(Command::PutDestinations { destinations: vec![b] });
    let stack = w.submit("app: web\nrelease: v1\ndestinations: [a, b]\nrun: [srv]\nhealth: { tcp: true }\ntimeout: 1m\n", None);
    while w.d(&stack).state == DeployState::Running {
        w.report(&stack, true, None);
    }
    let d = w.d(&stack).clone();
    assert_eq!(d.state, DeployState::Succeeded);
    let n = crate::state::deployment_number(&stack).unwrap();
    let running = StepKey { deployment: stack.clone(), step: 3, undo: false, attempt: 1, token: d.token.unwrap(), epoch: d.epoch };
    let show = |s: &State| -> Vec<String> {
        forgets(s, "n2", std::slice::from_ref(&running))
            .iter()
            .map(|f| format!("{}@{} {}/{}", f.deployment, f.destination, f.token, f.epoch))
            .collect()
    };
    let t = d.token.unwrap();
    assert_eq!(show(&w.s), [format!("{stack}@a {t}/1")], "with its records: the step's own destination");

    // Compacted (as the state compacts it): the records that named the
    // step's destination are gone, so every destination of it is named.
    let mut data = w.s.dump();
    data.retain(|(k, _)| !k.starts_with(&format!("deploy/{n}/")));
    let header = data.iter_mut().find(|(k, _)| *k == format!("deploy/{n}")).unwrap();
    let mut compacted = d.without_steps();
    compacted.compacted = Some(crate::deploy::Compaction { at_ms: T0, steps: d.steps.len() });
    header.1 = serde_json::to_vec(&compacted).unwrap();
    let s = State::load(data.clone()).unwrap();
    assert_eq!(show(&s), [format!("{stack}@a {t}/1"), format!("{stack}@b {t}/1")]);

    // Gone from the history: every destination that selects the node, at
    // an epoch past the step's, with the step's own token.
    data.retain(|(k, _)| *k != format!("deploy/{n}"));
    let s = State::load(data).unwrap();
    assert!(s.left_history(&stack));
    assert_eq!(show(&s), [format!("{stack}@a {t}/2"), format!("{stack}@b {t}/2"), format!("{stack}@c {t}/2")]);
    // Once per destination, however many of its steps the node runs.
    let twice = forgets(&s, "n2", &[running.clone(), StepKey { step: 4, ..running.clone() }]);
    assert_eq!(twice.len(), 3);
    // A node that no destination selects is told nothing.
    assert!(forgets(&s, "nobody", std::slice::from_ref(&running)).is_empty());
}

#[test]
fn work_with_no_live_node_waits_then_goes_on_or_gives_up() {
    let labels: BTreeMap<String, String> = [("env".to_string(), "t".to_string())].into();
    let mut w = World::new();
    let id = w.submit(INFRA, None); // command steps on n1, deadline 1m
    w.apply(Command::NodeLost { node: "n2".into(), why: "silent".into() });
    w.apply(Command::NodeLost { node: "n1".into(), why: "no heartbeat for 5.2s".into() });
    let d = w.d(&id).clone();
    assert_eq!((d.state, d.epoch), (DeployState::Running, 1));
    let (step, wait) = d.blocking_wait().expect("plan waits for a node");
    // node_wait (2m by default) is longer than the deadline: the deadline bounds it.
    assert_eq!((step, wait.since_ms, wait.until_ms), (0, T0, DEADLINE));
    let ev = &d.events.last().unwrap().reason;
    assert!(ev.contains("waiting for a node of c: n1 lost, `plan`, `apply` wait for it") && ev.contains("bounded by the deadline"), "{ev}");

    let n1_gone = |at: i64| {
        let mut s = Seen::all_heard(at);
        s.heard.insert("n1".into(), T0 - 6_000);
        s.connected.remove("n1");
        s
    };
    let n1_back = |at: i64| {
        let mut s = Seen::all_heard(at);
        s.heard.insert("n1".into(), at - 100);
        s
    };
    let give_up = format!("give up waiting: {id} (key {id}/node-wait/{DEADLINE})");
    // (case, now, what the leader saw, expected action)
    let cases: Vec<(&str, i64, Seen, String)> = vec![
        ("waiting: n1 is not proposed lost again, nothing is sent", T0 + 30_000, n1_gone(T0 + 30_000), "nothing".into()),
        ("the bound passed (before the deadline cancel)", DEADLINE, n1_gone(DEADLINE), give_up.clone()),
        ("long after", DEADLINE + 60_000, n1_gone(DEADLINE + 60_000), give_up),
        ("n1 back on a stream while recorded lost", T0 + 30_000, n1_back(T0 + 30_000), "register n1 again".into()),
    ];
    for (case, now, seen, want) in cases {
        let got: Vec<String> = due(&w.s, tick(now, T0), &seen).into_iter().map(|a| show(Some(a))).collect();
        let want: Vec<String> = if want == "nothing" { vec![] } else { vec![want] };
        assert_eq!(got, want, "{case}");
    }

    // n1 registers again: the work goes on there, same epoch, checked first.
    w.apply_at(T0 + 30_000, Command::RegisterNode { id: "n1".into(), labels: labels.clone() });
    let d = w.d(&id).clone();
    assert!(d.blocking_wait().is_none());
    let ev = &d.events.last().unwrap().reason;
    assert!(ev.contains("node n1 registered again after the work waited 30s: `plan` (check first), `apply` go(es) on there"), "{ev}");
    let Some(Action::Send(a)) = due_for(&d, tick(T0 + 30_000, T0), &n1_back(T0 + 30_000)) else { panic!("nothing sent") };
    assert_eq!((a.node.as_str(), a.key.step, a.key.epoch, a.check_first), ("n1", 0, 1, true));

    // The same again, and this time nobody comes back: past the bound the
    // give-up fails it (nothing was done, so nothing needs undoing).
    let id = {
        w.report(&id, true, None);
        w.report(&id, true, None);
        assert_eq!(w.d(&id).state, DeployState::Succeeded);
        w.submit(INFRA, None)
    };
    w.apply(Command::NodeLost { node: "n1".into(), why: "silent".into() });
    assert!(w.d(&id).blocking_wait().is_some());
    assert_eq!(w.apply_at(DEADLINE - 1, Command::NodeWaitExpired { deployment: id.clone() }), Response::Done, "not before the bound");
    assert_eq!(w.d(&id).state, DeployState::Running);
    let r = w.apply_at(DEADLINE, Command::NodeWaitExpired { deployment: id.clone() });
    assert_eq!(r, Response::Deployment { id: id.clone(), state: DeployState::Failed });
    let d = w.d(&id);
    assert!(d
        .events
        .iter()
        .any(|e| e.reason.starts_with("gave up waiting for a node of c: n1") && e.reason.contains("the deployment's deadline")));
    assert!(d
        .events
        .iter()
        .any(|e| e.reason.contains("no live node is left to run `plan` of c, `apply` of c; start a node the destination selects")));
    assert_eq!(d.exit_code(), Some(3));
    assert!(w.s.lock("c").is_none(), "the lock is released");
}
