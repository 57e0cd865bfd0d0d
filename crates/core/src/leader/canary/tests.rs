use std::collections::BTreeMap;

use super::*;
use crate::command::{Request, Response};
use crate::deploy::{fmt_clock, DeployState, ErrorClass, StepStatus};
use crate::leader::{due_for, Sent, StepKey};
use crate::manifest::{parse_destinations, parse_manifest, Overrides};
use crate::saga::{plan, StepAction};
use crate::state::State;

const BASE: &str = "app: web\nrelease: v2\ndestination: d\nrun: [srv]\nhealth: { tcp: true }\n";

fn spec(extra: &str) -> Result<crate::manifest::Spec, String> {
    parse_manifest("f", &format!("{BASE}{extra}"), &Overrides::default()).map_err(|e| e.field)
}

#[test]
fn strategy_fields_are_validated_naming_the_field() {
    // (manifest extra, Ok(()) or Err(field))
    let cases: Vec<(&str, Result<(), &str>)> = vec![
        ("strategy: { canary: { nodes: 1, pause: 5m } }\n", Ok(())),
        ("strategy: { canary: {} }\n", Ok(())),
        ("strategy: { canary: { pause: 5m, analysis: { http: /healthz, interval: 1s, failure_limit: 3 } } }\n", Ok(())),
        ("strategy: { canary: { pause: 5m, analysis: { command: [\"./check\", \"{port}\"] } } }\n", Ok(())),
        ("strategy: { type: recreate }\n", Ok(())),
        ("strategy: { type: blue_green, max_unavailable: 2 }\n", Ok(())),
        ("route: { listen: 0.0.0.0 }\n", Ok(())),
        ("route: { listen: \"::\" }\n", Ok(())),
        ("strategy: { canary: { nodes: 0 } }\n", Err("strategy.canary.nodes")),
        ("strategy: { canary: { pause: 0s } }\n", Err("strategy.canary.pause")),
        ("strategy: { canary: { pause: 2h } }\n", Err("strategy.canary.pause")),
        ("strategy: { canary: { analysis: { http: /healthz } } }\n", Err("strategy.canary.pause")),
        ("strategy: { canary: { pause: 1m, analysis: { http: healthz } } }\n", Err("strategy.canary.analysis.http")),
        ("strategy: { canary: { pause: 1m, analysis: { http: /a, command: [x] } } }\n", Err("strategy.canary.analysis")),
        ("strategy: { canary: { pause: 1m, analysis: {} } }\n", Err("strategy.canary.analysis")),
        ("strategy: { canary: { pause: 1m, analysis: { http: /a, failure_limit: 0 } } }\n", Err("strategy.canary.analysis.failure_limit")),
        ("strategy: { canary: { pause: 1m, analysis: { http: /a, interval: 0s } } }\n", Err("strategy.canary.analysis.interval")),
        ("strategy: { canary: { pauses: 1m } }\n", Err("strategy.canary.pauses")),
        ("strategy: { type: recreate, canary: { pause: 1m } }\n", Err("strategy.canary")),
        ("strategy: { type: rolling }\n", Err("strategy.type")),
        ("route: { listen: localhost }\n", Err("route.listen")),
    ];
    for (extra, want) in cases {
        let got = spec(extra).map(|_| ());
        assert_eq!(got.as_ref().map(|_| ()).map_err(|f| f.as_str()), want, "manifest extra: {extra:?}");
    }
    // A command destination has neither.
    let cmd = "app: net\nrelease: v1\ndestination: c\nsteps: [{ name: a, run: \"true\" }]\n";
    for (extra, field) in [("strategy: { type: recreate }\n", "strategy.type"), ("strategy: { canary: {} }\n", "strategy.canary")] {
        let e = parse_manifest("f", &format!("{cmd}{extra}"), &Overrides::default()).unwrap_err();
        assert_eq!(e.field, field);
    }
    // Defaults.
    let s = spec("strategy: { canary: { pause: 5m, analysis: { http: /ok } } }\n").unwrap();
    let c = s.canary.unwrap();
    assert_eq!((c.nodes, c.pause_ms), (1, Some(300_000)));
    let a = c.analysis.unwrap();
    assert_eq!((a.interval_ms, a.timeout_ms, a.failure_limit), (5_000, 2_000, 1));
    assert_eq!(spec("route: { listen: 0.0.0.0 }\n").unwrap().route_listen.as_deref(), Some("0.0.0.0"));
    assert_eq!(spec("").unwrap().route_listen, None);
}

#[test]
fn plans_canary_pause_and_recreate() {
    let nodes = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // (manifest extra, nodes, expected verb+node sequence)
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "strategy: { canary: { nodes: 1 } }\n",
            nodes(&["a", "b", "c"]),
            vec![
                "start a",
                "health a",
                "switch a",
                "stop-old a",
                "pause a",
                "start b",
                "health b",
                "switch b",
                "stop-old b",
                "start c",
                "health c",
                "switch c",
                "stop-old c",
            ],
        ),
        (
            "strategy: { max_unavailable: 2, canary: { nodes: 2, pause: 1m, analysis: { http: /ok } } }\n",
            nodes(&["a", "b", "c"]),
            vec![
                "start a",
                "start b",
                "health a",
                "health b",
                "switch a",
                "switch b",
                "stop-old a",
                "stop-old b",
                "analyze a",
                "start c",
                "health c",
                "switch c",
                "stop-old c",
            ],
        ),
        ("strategy: { type: recreate }\n", nodes(&["a"]), vec!["stop-current a", "start a", "health a", "switch a"]),
        (
            "strategy: { type: recreate }\n",
            nodes(&["a", "b"]),
            vec!["stop-current a", "start a", "health a", "switch a", "stop-current b", "start b", "health b", "switch b"],
        ),
    ];
    for (extra, nodes, want) in cases {
        let got = plan(&spec(extra).unwrap(), "d", &nodes);
        let names: Vec<String> = got.iter().map(|s| format!("{} {}", s.action.verb(), s.node)).collect();
        assert_eq!(names, want, "manifest extra: {extra:?}");
        for s in got.iter().filter(|s| s.action.is_pause()) {
            assert_eq!(s.retry.max_attempts, 1, "a pause is never retried");
            assert!(s.reversible && s.adapter == "process");
        }
    }
    // The analysis step outlives its pause; the route carries the listen address.
    let got = plan(
        &spec("strategy: { canary: { pause: 1m, analysis: { http: /ok } } }\nroute: { listen: 0.0.0.0 }\n").unwrap(),
        "d",
        &nodes(&["a", "b"]),
    );
    let pause = got.iter().find(|s| s.action.is_pause()).unwrap();
    assert!(pause.timeout_ms > 60_000 && pause.action.is_sent_pause());
    assert!(got
        .iter()
        .filter_map(|s| match &s.action {
            StepAction::SwitchRoute { listen, .. } => Some(listen.as_deref()),
            _ => None,
        })
        .all(|l| l == Some("0.0.0.0")));
}

#[test]
fn clock_times_are_utc() {
    for (ms, want) in [(0, "00:00:00 UTC"), (3_723_000, "01:02:03 UTC"), (86_400_000 + 59_999, "00:00:59 UTC")] {
        assert_eq!(fmt_clock(ms), want);
    }
}

// ------------------------------------------------------------ the pause, end to end through apply

const T0: i64 = 1_000_000;

struct World {
    s: State,
    index: u64,
    now: i64,
}

/// What the leader has seen: every node connected and just heard from,
/// and which step is in flight where.
#[derive(Default)]
struct Seen {
    in_flight: BTreeMap<(String, usize, bool, u32), Sent>,
}

impl Observed for Seen {
    fn last_heard_ms(&self, _: &str) -> Option<i64> {
        Some(i64::MAX / 2)
    }
    fn is_connected(&self, _: &str) -> bool {
        true
    }
    fn in_flight(&self, k: &StepKey) -> Option<Sent> {
        self.in_flight.get(&(k.deployment.clone(), k.step, k.undo, k.attempt)).cloned()
    }
}

impl World {
    fn new(nodes: &[&str]) -> World {
        let mut w = World { s: State::default(), index: 0, now: T0 };
        for n in nodes {
            w.apply(Command::RegisterNode { id: n.to_string(), labels: [("env".to_string(), "t".to_string())].into() });
        }
        let dests = parse_destinations("d.yaml", "destinations:\n  - { name: d, selector: { env: t } }\n").unwrap();
        w.apply(Command::PutDestinations { destinations: dests });
        w
    }

    fn apply(&mut self, command: Command) -> Response {
        self.index += 1;
        self.s.apply(self.index, &Request { request_id: None, at_ms: self.now, command, origin: None }).0
    }

    fn submit(&mut self, extra: &str) -> Response {
        let spec = spec(extra).unwrap();
        self.apply(Command::SubmitDeployment { spec: Box::new(spec), actor: "op".into(), lock_wait_ms: None, idempotency_key: None })
    }

    fn d(&self) -> &Deployment {
        self.s.deployments().next_back().unwrap()
    }

    /// Report the next work's result as its node would.
    fn report(&mut self, ok: bool, class: Option<ErrorClass>, error: &str) {
        let d = self.d().clone();
        let w = d.next().expect("work to do");
        let outcome = StepOutcome {
            step: w.step,
            undo: w.undo,
            attempt: w.attempt,
            token: d.token.unwrap(),
            epoch: d.epoch,
            ok,
            output: ok.then(|| "{}".into()),
            error: (!ok).then(|| error.to_string()),
            class,
            started_ms: self.now,
            finished_ms: self.now,
            node: d.steps[w.step].plan.node.clone(),
        };
        let r = self.apply(Command::StepResult { deployment: d.id.clone(), outcome });
        assert!(matches!(r, Response::Deployment { .. }), "{r:?}");
    }

    /// Run every piece of work successfully until the deployment pauses or
    /// ends (an analysis step is left running).
    fn run_until_paused_or_done(&mut self) {
        while self.d().state != DeployState::Paused && self.d().next().is_some() {
            self.report(true, None, "");
        }
    }

    /// The leader's tick at `now`: carry out what it decides (proposals are
    /// applied; an abort is answered by the node with an aborted result).
    fn tick(&mut self, seen: &Seen) -> Option<&'static str> {
        let d = self.d().clone();
        let tick = Tick { now_ms: self.now, leader_since_ms: T0 };
        match due_for(&d, tick, seen)? {
            Action::Propose(p) => {
                self.apply(p.command);
                Some("propose")
            }
            Action::Abort { key, .. } => {
                let outcome = StepOutcome {
                    step: key.step,
                    undo: key.undo,
                    attempt: key.attempt,
                    token: key.token,
                    epoch: key.epoch,
                    ok: false,
                    output: None,
                    error: Some("aborted by the leader".into()),
                    class: Some(ErrorClass::Aborted),
                    started_ms: self.now,
                    finished_ms: self.now,
                    node: "a".into(),
                };
                self.apply(Command::StepResult { deployment: d.id.clone(), outcome });
                Some("abort")
            }
            Action::Send(_) => Some("send"),
        }
    }

    fn promote(&mut self, actor: &str) -> Response {
        let id = self.d().id.clone();
        self.apply(Command::PromoteDeployment { id, actor: actor.into() })
    }

    fn cancel(&mut self) {
        let id = self.d().id.clone();
        self.apply(Command::CancelDeployment { id, reason: "no".into(), actor: "op".into(), timed_out: false });
    }

    fn nodes_with(&self, status: StepStatus) -> Vec<String> {
        let mut v: Vec<String> =
            self.d().steps.iter().filter(|s| s.status == status && !s.plan.action.is_pause()).map(|s| s.plan.node.clone()).collect();
        v.dedup();
        v
    }
}

#[test]
fn a_canary_pauses_holding_the_lock_and_promote_continues_to_every_node() {
    let mut w = World::new(&["a", "b", "c"]);
    w.submit("strategy: { canary: { nodes: 1 } }\n");
    w.run_until_paused_or_done();
    let d = w.d().clone();
    assert_eq!(d.state, DeployState::Paused);
    assert!(d.state.holds_lock() && !d.state.is_terminal() && d.exit_code().is_none());
    assert_eq!(w.s.lock("d").map(|l| l.holder.clone()), Some(format!("deployment/{}", d.id)));
    let reason = d.paused_reason().unwrap();
    assert!(
        reason.contains("canary on a") && reason.contains(&format!("fleetctl promote {}", d.id)) && reason.contains("no auto promote"),
        "{reason}"
    );
    assert_eq!(w.nodes_with(StepStatus::Done), ["a"], "only the canary node has the release");
    assert_eq!(d.next(), None, "nothing is sent while paused without analysis");
    // Nothing is due while paused (no pause duration): it waits for a human.
    w.now += 29 * 60_000;
    assert_eq!(w.tick(&Seen::default()), None);
    // A promote by someone else than the leader works at any time; a second one is refused.
    assert!(matches!(w.promote("alice"), Response::Deployment { state: DeployState::Running, .. }));
    assert!(w.d().events.iter().any(|e| e.reason == "promoted by alice"));
    assert!(matches!(w.promote("alice"), Response::Rejected { .. }));
    w.run_until_paused_or_done();
    assert_eq!((w.d().state, w.d().exit_code()), (DeployState::Succeeded, Some(0)));
    assert_eq!(w.nodes_with(StepStatus::Done), ["a", "b", "c"]);
    assert!(w.s.lock("d").is_none());
    // Where each node serves it comes from its switch step's output.
    let mut d = w.d().clone();
    assert!(d.served_at().is_empty(), "these switch outputs name no route");
    for s in d.steps.iter_mut().filter(|s| s.plan.action.verb() == "switch") {
        s.output = Some(format!("{{\"route\":\"0.0.0.0:{}\"}}", 4000 + s.plan.node.len()));
    }
    let at: Vec<(String, String)> = d.served_at().into_iter().map(|s| (s.node, s.address)).collect();
    assert_eq!(
        at,
        [("a".to_string(), "0.0.0.0:4001".to_string()), ("b".into(), "0.0.0.0:4001".into()), ("c".into(), "0.0.0.0:4001".into())]
    );
}

#[test]
fn paused_outcomes() {
    // (manifest extra, what happens while paused, final state, exit code, a reason the events must contain)
    #[derive(Debug, Clone, Copy)]
    enum Then {
        Cancel,
        /// Ticks of the leader at pause + this many ms.
        LeaderAt(i64),
        /// The analysis' node reports this.
        Analysis(bool),
        /// A human promotes while the analysis runs (in flight on its node).
        PromoteDuringAnalysis,
        /// A human promotes before the analysis was sent.
        PromoteBeforeAnalysisSent,
        /// The canary node is lost.
        LoseCanary,
    }
    use DeployState::*;
    let manual = "strategy: { canary: { nodes: 1 } }\ntimeout: 10m\n";
    let timed = "strategy: { canary: { nodes: 1, pause: 5s } }\n";
    let analysed = "strategy: { canary: { nodes: 1, pause: 5s, analysis: { http: /ok } } }\n";
    let cases: Vec<(&str, Then, DeployState, Option<u8>, &str)> = vec![
        (manual, Then::Cancel, Cancelled, Some(4), "every completed step was undone"),
        (timed, Then::LeaderAt(4_999), Paused, None, "auto promote at"),
        (timed, Then::LeaderAt(5_000), Succeeded, Some(0), "the pause of 5s passed; promoted automatically"),
        (manual, Then::LeaderAt(10 * 60_000 + 1), Cancelled, Some(5), "deadline of 10m passed"),
        (analysed, Then::Analysis(true), Succeeded, Some(0), "the canary analysis passed for 5s; promoted automatically"),
        (analysed, Then::Analysis(false), Failed, Some(3), "canary analysis failed on a: GET /ok answered 500"),
        (analysed, Then::PromoteDuringAnalysis, Succeeded, Some(0), "promoted by alice"),
        (analysed, Then::PromoteBeforeAnalysisSent, Succeeded, Some(0), "promoted by alice"),
        (analysed, Then::Cancel, Cancelled, Some(4), "every completed step was undone"),
        (timed, Then::LoseCanary, Failed, Some(3), "the canary node a was lost"),
    ];
    for (extra, then, want, code, reason) in cases {
        let mut w = World::new(&["a", "b"]);
        w.submit(extra);
        w.run_until_paused_or_done();
        assert_eq!(w.d().state, Paused, "{then:?}");
        let paused_at = w.now;
        match then {
            Then::Cancel => {
                w.cancel();
                // An analysis that may run is stopped first (here: never sent, so recorded as not run).
                w.tick(&Seen::default());
            }
            Then::LeaderAt(dt) => {
                w.now = paused_at + dt;
                w.tick(&Seen::default());
            }
            Then::Analysis(ok) => {
                assert_eq!(w.tick(&Seen::default()), Some("send"), "the analysis is sent to its node");
                w.report(ok, (!ok).then_some(ErrorClass::Invalid), "GET /ok answered 500");
            }
            Then::PromoteDuringAnalysis | Then::PromoteBeforeAnalysisSent => {
                let d = w.d().clone();
                let p = d.pause.clone().unwrap();
                let mut seen = Seen::default();
                if matches!(then, Then::PromoteDuringAnalysis) {
                    seen.in_flight.insert((d.id.clone(), p.step, false, 1), Sent { node: "a".into(), aborted: false });
                }
                assert!(matches!(w.promote("alice"), Response::Deployment { state: Paused, .. }), "it waits for the analysis to stop");
                let did = w.tick(&seen);
                let want = if matches!(then, Then::PromoteDuringAnalysis) { "abort" } else { "propose" };
                assert_eq!(did, Some(want));
            }
            Then::LoseCanary => {
                let live = [("d".to_string(), vec!["b".to_string()])].into();
                let mut d = w.d().clone();
                d.node_lost("a", w.now, "test", &live).unwrap();
                // As the state machine would persist it.
                assert_eq!(d.state, Compensating, "{:?}", d.events.last());
                w.apply(Command::NodeLost { node: "a".into(), why: "no heartbeat".into() });
            }
        }
        w.run_until_paused_or_done();
        let d = w.d();
        assert_eq!((d.state, d.exit_code()), (want, code), "{then:?}: {:#?}", d.events);
        assert!(d.events.iter().any(|e| e.reason.contains(reason)), "{then:?}: no event says {reason:?}: {:#?}", d.events);
        if want.is_terminal() && want != Succeeded {
            assert!(w.nodes_with(StepStatus::Done).is_empty(), "{then:?}: everything that ran is undone");
            let pause = d.steps.iter().find(|s| s.plan.action.is_pause()).unwrap();
            assert_ne!(pause.status, StepStatus::Done, "{then:?}: a pause is never left done");
        }
    }
}

#[test]
fn a_canary_needs_more_nodes_than_its_canary_nodes() {
    let mut w = World::new(&["a"]);
    match w.submit("strategy: { canary: { nodes: 1 } }\n") {
        Response::Invalid { reason } => assert!(reason.starts_with("strategy.canary.nodes:") && reason.contains("at least 2"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut w = World::new(&["a", "b"]);
    assert!(matches!(w.submit("strategy: { canary: { nodes: 1 } }\n"), Response::Deployment { .. }));
}

#[test]
fn only_a_paused_deployment_is_promoted_and_the_leader_only_after_the_pause() {
    let mut w = World::new(&["a", "b"]);
    w.submit("strategy: { canary: { nodes: 1, pause: 5s } }\n");
    assert!(matches!(w.promote("alice"), Response::Rejected { .. }), "running, not paused");
    w.run_until_paused_or_done();
    w.now += 4_000;
    assert!(matches!(w.promote(LEADER_ACTOR), Response::Rejected { .. }), "the leader's promote before the pause passed");
    w.now += 1_000;
    assert!(matches!(w.promote(LEADER_ACTOR), Response::Deployment { state: DeployState::Running, .. }));
    assert!(matches!(w.apply(Command::PromoteDeployment { id: "d999".into(), actor: "alice".into() }), Response::NotFound { .. }));
}
