//! `State::apply` is total: whatever sequence of commands the log holds
//! (nonsense ids, out-of-range steps, stale or random results, nodes lost
//! and back, cancels, locks, jumps of the clock), it answers and never
//! panics; a panic there would stop every replica at once. And the state
//! rebuilt from a snapshot of it (or from the changes `apply` returned)
//! equals the state it was taken from. And a step result, once accepted,
//! is refused if it comes again at any later point: results carry no
//! request id, so this is what keeps a re-sent one from counting twice.

use std::collections::BTreeMap;

use fleet_core::deploy::{DeployState, ErrorClass, StepOutcome};
use fleet_core::manifest::{parse_manifest, Destination, Overrides, QueuePolicy, Spec, DEFAULT_NODE_WAIT_MS};
use fleet_core::{Command, Request, Response, State};
use proptest::prelude::*;
use proptest::sample::Index;

const NODES: [&str; 4] = ["n1", "n2", "n3", "n4"];
const DESTS: [&str; 3] = ["a", "b", "c"];
const CLASSES: [ErrorClass; 5] = [ErrorClass::Transient, ErrorClass::Auth, ErrorClass::Resource, ErrorClass::Invalid, ErrorClass::Aborted];

/// Which deployment a command names.
#[derive(Debug, Clone)]
enum Target {
    /// One that exists (if any).
    Existing(Index),
    /// An id that names nothing, or is not an id at all.
    Nonsense(&'static str),
}

/// What a step result carries.
#[derive(Debug, Clone)]
enum Report {
    /// What the engine waits for now (or the forward step in flight while
    /// cancelling), with this outcome.
    Expected { ok: bool, class: Option<usize> },
    /// Anything at all.
    Random { step: usize, undo: bool, attempt: u32, token: u64, epoch: u64, ok: bool, class: Option<usize> },
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        node: usize,
        label: usize,
    },
    /// `node` 4 was never registered.
    Lost {
        node: usize,
    },
    PutDestination {
        dest: usize,
        adapter: usize,
        policy: usize,
        label: usize,
    },
    /// A `process` manifest (kind 0), a `command` one (1), a stack of
    /// `a` and `b` (2), a canary (3).
    Submit {
        kind: usize,
        dest: usize,
        release: usize,
        lock_wait_ms: Option<u64>,
        idempotency_key: Option<usize>,
        timeout_ms: Option<u64>,
    },
    Acquire {
        dest: usize,
        holder: usize,
    },
    Release {
        dest: usize,
        holder: usize,
    },
    Cancel {
        target: Target,
        timed_out: bool,
    },
    Resolve {
        target: Target,
        note: usize,
    },
    Rollback {
        target: Target,
        to: Option<usize>,
    },
    Promote {
        target: Target,
    },
    Result {
        target: Target,
        report: Report,
    },
    /// Move the clock: by a few seconds, or anywhere (its extremes included).
    Wait(i64),
    Jump(i64),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => any::<Index>().prop_map(Target::Existing),
        1 => prop::sample::select(vec!["d0", "d99999", "x", "", "d-1", "d18446744073709551615", "d18446744073709551616"]).prop_map(Target::Nonsense),
    ]
}

fn class() -> impl Strategy<Value = Option<usize>> {
    prop::option::weighted(0.9, 0..CLASSES.len())
}

fn report() -> impl Strategy<Value = Report> {
    prop_oneof![
        4 => (prop::bool::weighted(0.75), class()).prop_map(|(ok, class)| Report::Expected { ok, class }),
        1 => (
            prop_oneof![0..12usize, any::<usize>()],
            any::<bool>(),
            prop_oneof![0..4u32, any::<u32>()],
            prop_oneof![0..200u64, any::<u64>()],
            prop_oneof![0..4u64, any::<u64>()],
            any::<bool>(),
            class(),
        )
            .prop_map(|(step, undo, attempt, token, epoch, ok, class)| Report::Random { step, undo, attempt, token, epoch, ok, class }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NODES.len(), 0..2usize).prop_map(|(node, label)| Op::Register { node, label }),
        2 => (0..NODES.len() + 1).prop_map(|node| Op::Lost { node }),
        1 => (0..DESTS.len(), 0..2usize, 0..3usize, 0..2usize).prop_map(|(dest, adapter, policy, label)| Op::PutDestination { dest, adapter, policy, label }),
        5 => (
            0..4usize,
            0..DESTS.len() + 1,
            0..3usize,
            prop::option::weighted(0.3, prop_oneof![0..60_000u64, any::<u64>()]),
            prop::option::weighted(0.3, 0..3usize),
            prop::option::weighted(0.3, prop_oneof![1..120_000u64, 1..=u64::MAX]),
        )
            .prop_map(|(kind, dest, release, lock_wait_ms, idempotency_key, timeout_ms)| Op::Submit {
                kind,
                dest,
                release,
                lock_wait_ms,
                idempotency_key,
                timeout_ms
            }),
        2 => (0..DESTS.len() + 1, 0..3usize).prop_map(|(dest, holder)| Op::Acquire { dest, holder }),
        2 => (0..DESTS.len() + 1, 0..3usize).prop_map(|(dest, holder)| Op::Release { dest, holder }),
        2 => (target(), any::<bool>()).prop_map(|(target, timed_out)| Op::Cancel { target, timed_out }),
        1 => (target(), 0..2usize).prop_map(|(target, note)| Op::Resolve { target, note }),
        1 => (target(), prop::option::of(0..3usize)).prop_map(|(target, to)| Op::Rollback { target, to }),
        1 => target().prop_map(|target| Op::Promote { target }),
        14 => (target(), report()).prop_map(|(target, report)| Op::Result { target, report }),
        2 => (0..10_000i64).prop_map(Op::Wait),
        1 => prop_oneof![any::<i64>(), Just(i64::MAX), Just(i64::MAX - 1_000), Just(i64::MIN), Just(0), Just(-1)].prop_map(Op::Jump),
    ]
}

fn manifest(kind: usize, dest: &str, release: usize, timeout_ms: Option<u64>) -> Spec {
    let text = match kind {
        0 => format!("app: web\nrelease: v{release}\ndestination: {dest}\nrun: [srv]\nhealth: {{ tcp: true }}\nretry: {{ max_attempts: 3 }}\n"),
        1 => format!(
            "app: infra\nrelease: v{release}\ndestination: {dest}\nretry: {{ max_attempts: 2 }}\nsteps:\n  - {{ name: a, run: ra, undo: ua }}\n  - {{ name: b, run: rb, irreversible: true }}\n  - {{ name: c, run: rc, undo: uc }}\n"
        ),
        2 => format!("app: web\nrelease: v{release}\ndestinations: [a, b]\nrun: [srv]\nhealth: {{ tcp: true }}\n"),
        _ => format!(
            "app: web\nrelease: v{release}\ndestination: {dest}\nrun: [srv]\nhealth: {{ tcp: true }}\nstrategy: {{ canary: {{ nodes: 1, pause: 5m, analysis: {{ http: /healthz, interval: 1s }} }} }}\n"
        ),
    };
    // (A canary's pause must be shorter than the deployment's timeout.)
    let timeout_ms = timeout_ms.filter(|_| kind != 3);
    parse_manifest("f", &text, &Overrides { timeout_ms, ..Overrides::default() }).expect("the test's manifests are valid")
}

/// Runs the ops; returns the state and what a coordinator would have
/// persisted from the changes.
fn run(ops: &[Op]) -> (State, BTreeMap<String, Vec<u8>>) {
    let mut s = State::default();
    let mut kv: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut at_ms: i64 = 1_000_000;
    let mut index = 0u64;
    // Every step result the state machine accepted so far.
    let mut accepted: Vec<(String, StepOutcome)> = Vec::new();
    let mut apply = |s: &mut State, at_ms: i64, request_id: Option<String>, command: Command| {
        index += 1;
        let result = match &command {
            Command::StepResult { deployment, outcome } => Some((deployment.clone(), outcome.clone())),
            _ => None,
        };
        let (response, changes) = s.apply(index, &Request { request_id, at_ms, command, origin: None });
        if let (Some(r), Response::Deployment { .. }) = (result, &response) {
            accepted.push(r);
        }
        // A result the node sends again (after a reconnect, or to a new
        // leader) is proposed without a request id: the engine itself must
        // refuse it, at any later point of any history, or a step would be
        // counted twice (a retry's attempt spent, an undo recorded twice).
        for (id, outcome) in &accepted {
            if let Some(d) = s.deployment(id) {
                assert!(d.check(outcome).is_err(), "{id} ({}) would accept again the result {outcome:?}", d.state);
            }
        }
        // The leader's rules read the engine through a cursor: it must say
        // what the engine's own answers say, in every state reached.
        for d in s.deployments() {
            let c = d.cursor();
            assert_eq!(c.next, d.next(), "cursor of {} ({})", d.id, d.state);
            let in_flight = d.pending_forward_step().filter(|_| d.state == DeployState::Cancelling);
            assert_eq!(c.cancelled_in_flight, in_flight, "cursor of {} ({})", d.id, d.state);
        }
        for c in changes {
            match c.value {
                Some(v) => kv.insert(c.key, v),
                None => kv.remove(&c.key),
            };
        }
    };
    let labels = |label: usize| -> BTreeMap<String, String> { [("env".to_string(), ["t", "u"][label].to_string())].into() };
    // Start with something to deploy to.
    for n in &NODES[..2] {
        apply(&mut s, at_ms, None, Command::RegisterNode { id: n.to_string(), labels: labels(0) });
    }
    let dest = |name: &str, adapter: usize, policy: usize, label: usize| Destination {
        name: name.into(),
        adapter: ["process", "command"][adapter].into(),
        selector: labels(label),
        queue: [QueuePolicy::Queue, QueuePolicy::Coalesce, QueuePolicy::Reject][policy],
        node_wait_ms: DEFAULT_NODE_WAIT_MS,
    };
    apply(&mut s, at_ms, None, Command::PutDestinations { destinations: vec![dest("a", 0, 0, 0), dest("b", 0, 0, 0), dest("c", 1, 0, 0)] });

    for (i, op) in ops.iter().enumerate() {
        let pick = |s: &State, t: &Target| -> String {
            match t {
                Target::Existing(ix) => {
                    let ids: Vec<&str> = s.deployments().map(|d| d.id.as_str()).collect();
                    if ids.is_empty() {
                        "d1".to_string()
                    } else {
                        ids[ix.index(ids.len())].to_string()
                    }
                }
                Target::Nonsense(id) => id.to_string(),
            }
        };
        // Every fifth command carries a request id from a small set, so
        // some are answered from the dedup table. Step results carry none,
        // as coordinators propose them.
        let request_id = (i % 5 == 0 && !matches!(op, Op::Result { .. })).then(|| format!("r{}", i % 15));
        let command = match op {
            Op::Register { node, label } => Command::RegisterNode { id: NODES[*node].into(), labels: labels(*label) },
            Op::Lost { node } => Command::NodeLost { node: NODES.get(*node).copied().unwrap_or("ghost").into(), why: "silent".into() },
            Op::PutDestination { dest: d, adapter, policy, label } => {
                Command::PutDestinations { destinations: vec![dest(DESTS[*d], *adapter, *policy, *label)] }
            }
            Op::Submit { kind, dest, release, lock_wait_ms, idempotency_key, timeout_ms } => Command::SubmitDeployment {
                spec: Box::new(manifest(*kind, DESTS.get(*dest).copied().unwrap_or("nowhere"), *release, *timeout_ms)),
                actor: "op".into(),
                lock_wait_ms: *lock_wait_ms,
                idempotency_key: idempotency_key.map(|k| format!("k{k}")),
            },
            Op::Acquire { dest, holder } => Command::AcquireLock {
                destination: DESTS.get(*dest).copied().unwrap_or("Not A Name").into(),
                holder: ["alice", "bob", ""][*holder].into(),
                reason: "maintenance".into(),
            },
            Op::Release { dest, holder } => Command::ReleaseLock {
                destination: DESTS.get(*dest).copied().unwrap_or("Not A Name").into(),
                holder: ["alice", "bob", "deployment/d5"][*holder].into(),
            },
            Op::Cancel { target, timed_out } => {
                Command::CancelDeployment { id: pick(&s, target), reason: "stop".into(), actor: "op".into(), timed_out: *timed_out }
            }
            Op::Resolve { target, note } => {
                Command::ResolveDeployment { id: pick(&s, target), note: ["checked", " "][*note].into(), actor: "op".into() }
            }
            Op::Rollback { target, to } => Command::RollbackDeployment {
                id: pick(&s, target),
                to_release: to.map(|r| format!("v{r}")),
                timeout_ms: None,
                actor: "op".into(),
            },
            Op::Promote { target } => Command::PromoteDeployment { id: pick(&s, target), actor: "op".into() },
            Op::Result { target, report } => {
                let id = pick(&s, target);
                let d = s.deployment(&id);
                let outcome = |step, undo, attempt, token, epoch, ok: bool, class: &Option<usize>| StepOutcome {
                    step,
                    undo,
                    attempt,
                    token,
                    epoch,
                    ok,
                    output: ok.then(|| "{}".into()),
                    error: (!ok).then(|| "boom".into()),
                    class: class.map(|c| CLASSES[c]),
                    started_ms: at_ms,
                    finished_ms: at_ms,
                    node: "n1".into(),
                };
                let outcome = match (report, d) {
                    (Report::Expected { ok, class }, Some(d)) => {
                        let (token, epoch) = (d.token.unwrap_or(0), d.epoch);
                        match (d.next(), d.pending_forward_step()) {
                            (Some(w), _) => outcome(w.step, w.undo, w.attempt, token, epoch, *ok, class),
                            (None, Some(i)) => outcome(i, false, d.steps[i].attempt, token, epoch, *ok, class),
                            (None, None) => outcome(0, false, 1, token, epoch, *ok, class),
                        }
                    }
                    (Report::Expected { ok, class }, None) => outcome(0, false, 1, 1, 1, *ok, class),
                    (Report::Random { step, undo, attempt, token, epoch, ok, class }, _) => {
                        outcome(*step, *undo, *attempt, *token, *epoch, *ok, class)
                    }
                };
                Command::StepResult { deployment: id, outcome }
            }
            Op::Wait(ms) => {
                at_ms = at_ms.saturating_add(*ms);
                continue;
            }
            Op::Jump(to) => {
                at_ms = *to;
                continue;
            }
        };
        apply(&mut s, at_ms, request_id, command);
    }
    (s, kv)
}

proptest! {
    // Enough to reach deep sagas (retries, compensation, hand-overs) while
    // staying within a few seconds in CI.
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn apply_is_total_and_snapshots_round_trip(ops in prop::collection::vec(op(), 1..80)) {
        let (s, kv) = run(&ops);
        let from_snapshot = State::load(s.dump());
        prop_assert!(from_snapshot.is_ok(), "snapshot does not load: {:?}", from_snapshot.err());
        prop_assert_eq!(from_snapshot.ok(), Some(s.clone()), "the state rebuilt from a snapshot differs");
        let from_changes = State::load(kv);
        prop_assert!(from_changes.is_ok(), "persisted changes do not load: {:?}", from_changes.err());
        prop_assert_eq!(from_changes.ok(), Some(s), "the state rebuilt from the persisted changes differs");
    }
}
