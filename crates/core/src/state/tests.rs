use super::*;
use crate::manifest::{QueuePolicy, DEFAULT_NODE_WAIT_MS};

fn req(id: Option<&str>, at_ms: i64, command: Command) -> Request {
    Request { request_id: id.map(str::to_string), at_ms, command, origin: None }
}
fn acquire(dest: &str, holder: &str) -> Command {
    Command::AcquireLock { destination: dest.into(), holder: holder.into(), reason: "r".into() }
}
fn release(dest: &str, holder: &str) -> Command {
    Command::ReleaseLock { destination: dest.into(), holder: holder.into() }
}

/// What kind of answer a step must produce.
#[derive(Debug, PartialEq)]
enum Want {
    Granted(u64),
    Held(&'static str),
    Released,
    NotHeld,
    NotOwner(&'static str),
    Invalid,
}

fn kind(r: &Response) -> Want {
    match r {
        Response::Granted { lock } => Want::Granted(lock.fencing_token),
        Response::Held { lock } => Want::Held(Box::leak(lock.holder.clone().into_boxed_str())),
        Response::Released { .. } => Want::Released,
        Response::NotHeld { .. } => Want::NotHeld,
        Response::NotOwner { lock } => Want::NotOwner(Box::leak(lock.holder.clone().into_boxed_str())),
        Response::Invalid { .. } => Want::Invalid,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn lock_table() {
    // (log index, command, expected answer), applied in order to one state.
    let steps: Vec<(u64, Command, Want)> = vec![
        (1, acquire("web", "alice"), Want::Granted(1)),
        (2, acquire("web", "alice"), Want::Granted(1)), // idempotent for the holder
        (3, acquire("web", "bob"), Want::Held("alice")),
        (4, release("web", "bob"), Want::NotOwner("alice")),
        (5, release("db", "bob"), Want::NotHeld),
        (6, release("web", "alice"), Want::Released),
        (7, release("web", "alice"), Want::NotHeld),
        (8, acquire("web", "bob"), Want::Granted(8)), // token = index of the grant
        (9, acquire("Bad Name", "bob"), Want::Invalid),
        (10, acquire("db", ""), Want::Invalid),
        (11, acquire("db", "alice"), Want::Granted(11)),
    ];
    let mut s = State::default();
    for (index, cmd, want) in steps {
        let (got, _) = s.apply(index, &req(None, 0, cmd.clone()));
        assert_eq!(kind(&got), want, "index {index}: {cmd:?}");
    }
    assert_eq!(s.locks().count(), 2);
}

/// A refused or replayed request changes nothing but the sequence number
/// every request takes.
fn only_the_sequence_number(changes: &[Change]) -> bool {
    changes.iter().all(|c| c.key == SEQ_KEY)
}

#[test]
fn batched_requests_get_strictly_growing_numbers_across_reloads() {
    // Entries as (log index, how many requests the leader batched into it).
    // Every request acquires a lock of its own destination, so each answer
    // carries the request's number as the fencing token.
    let cases: [&[(u64, usize)]; 4] = [
        &[(1, 1), (2, 1), (3, 1)],
        &[(1, 3), (2, 1), (3, 2)],
        &[(5, 4), (6, 4), (7, 1), (20, 2), (21, 1)],
        &[(1, 64), (2, 64), (70, 1), (200, 3)],
    ];
    for entries in cases {
        let mut s = State::default();
        let mut tokens = Vec::new();
        let mut n = 0;
        for (i, &(index, k)) in entries.iter().enumerate() {
            let batch = (0..k)
                .map(|_| {
                    n += 1;
                    req(None, 0, acquire(&format!("d{n}"), "alice"))
                })
                .collect();
            let (answers, _) = s.apply_entry(index, &Proposal(batch));
            assert_eq!(answers.len(), k);
            for a in answers {
                let Response::Granted { lock } = a else { panic!("{entries:?}: {a:?}") };
                tokens.push(lock.fencing_token);
            }
            // Every other entry, continue on a copy rebuilt from a snapshot.
            if i % 2 == 0 {
                s = State::load(s.dump()).unwrap();
            }
        }
        assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{entries:?}: {tokens:?}");
        // Without batching, a request's number is its log index.
        if entries.iter().all(|&(_, k)| k == 1) {
            assert_eq!(tokens, entries.iter().map(|&(i, _)| i).collect::<Vec<_>>());
        }
        // A request's number is never below its entry's index.
        let mut t = tokens.iter();
        for &(index, k) in entries {
            assert!(t.by_ref().take(k).all(|&tok| tok >= index), "{entries:?}: {tokens:?}");
        }
    }
}

#[test]
fn a_batch_persists_what_a_replay_of_its_changes_rebuilds() {
    let mut s = State::default();
    let mut kv = BTreeMap::new();
    for (index, k) in [(1u64, 3usize), (2, 1), (3, 5)] {
        let batch = (0..k).map(|j| req(Some(&format!("r{index}-{j}")), index as i64, acquire(&format!("w{j}"), "alice"))).collect();
        let (_, changes) = s.apply_entry(index, &Proposal(batch));
        for c in changes {
            match c.value {
                Some(v) => kv.insert(c.key, v),
                None => kv.remove(&c.key),
            };
        }
    }
    assert_eq!(State::load(kv).unwrap(), s);
}

#[test]
fn request_ids_apply_once() {
    let mut s = State::default();
    let (first, _) = s.apply(1, &req(Some("c1-1"), 0, acquire("web", "alice")));
    let (_, _) = s.apply(2, &req(Some("c1-2"), 0, release("web", "alice")));
    // The retried acquire must not re-grant the lock that was released since.
    let (again, changes) = s.apply(3, &req(Some("c1-1"), 0, acquire("web", "alice")));
    assert_eq!(first, again);
    assert!(only_the_sequence_number(&changes), "{changes:?}");
    assert!(s.lock("web").is_none());
}

#[test]
fn a_request_id_reused_for_another_command_is_refused_and_changes_nothing() {
    // (first command, second command under the same id, what the second gets)
    let cases = [
        (acquire("web", "alice"), release("web", "alice"), "invalid"),
        (release("web", "alice"), acquire("web", "alice"), "invalid"),
        (acquire("web", "alice"), acquire("web", "alice"), "replay"),
        (acquire("web", "alice"), acquire("api", "alice"), "replay"),
    ];
    for (first, second, want) in cases {
        let mut s = State::default();
        let (answer, _) = s.apply(1, &req(Some("c1"), 0, first.clone()));
        let before = s.clone();
        let (got, changes) = s.apply(2, &req(Some("c1"), 0, second.clone()));
        assert!(only_the_sequence_number(&changes), "{first:?} then {second:?}: {changes:?}");
        assert_eq!(s.last_seq, 2);
        s.last_seq = before.last_seq;
        assert_eq!(s, before, "{first:?} then {second:?} changed the state");
        match want {
            "invalid" => assert!(
                matches!(&got, Response::Invalid { reason } if reason.contains("c1") && reason.contains("new id")),
                "{first:?} then {second:?}: {got:?}"
            ),
            _ => assert_eq!(got, answer, "{first:?} then {second:?}"),
        }
        // The first command's retry still gets its own answer.
        assert_eq!(s.apply(3, &req(Some("c1"), 0, first.clone())).0, answer);
    }
}

#[test]
fn dedup_entries_written_without_a_kind_still_replay() {
    let mut s = State::default();
    let (answer, _) = s.apply(1, &req(Some("old"), 0, acquire("web", "alice")));
    if let Some(e) = s.dedup.get_mut("old") {
        e.action.clear();
    }
    assert_eq!(s.apply(2, &req(Some("old"), 0, release("web", "alice"))).0, answer);
}

#[test]
fn dedup_entries_expire_after_ttl() {
    let mut s = State::default();
    s.apply(1, &req(Some("old"), 0, acquire("web", "alice")));
    let (_, changes) = s.apply(2, &req(Some("new"), DEDUP_TTL_MS, release("web", "alice")));
    assert!(changes.iter().any(|c| c.key == "dedup/old" && c.value.is_none()));
    assert!(!s.dedup.contains_key("old"));
    assert!(s.dedup.contains_key("new"));
}

#[test]
fn changes_replayed_into_load_rebuild_the_same_state() {
    let mut s = State::default();
    let mut kv: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let cmds = [acquire("a", "x"), acquire("b", "y"), release("a", "x"), acquire("c", "x")];
    for (i, c) in cmds.into_iter().enumerate() {
        let (_, changes) = s.apply(i as u64 + 1, &req(Some(&format!("r{i}")), 5, c));
        for ch in changes {
            match ch.value {
                Some(v) => kv.insert(ch.key, v),
                None => kv.remove(&ch.key),
            };
        }
    }
    assert_eq!(State::load(kv.clone()).unwrap(), s);
    assert_eq!(State::load(s.dump()).unwrap(), s);
    assert!(State::load([("nope/x", b"{}")]).is_err());
}

mod deployments {
    use super::*;
    use crate::deploy::{StepOutcome, StepStatus};
    use crate::manifest::{parse_manifest, Overrides};

    fn spec(app: &str, release: &str, dest: &str) -> Spec {
        let text = format!("app: {app}\nrelease: {release}\ndestination: {dest}\nrun: [srv]\nhealth: {{ tcp: true }}\n");
        parse_manifest("f", &text, &Overrides::default()).unwrap()
    }

    struct World {
        s: State,
        index: u64,
        /// What a coordinator would have persisted from the changes.
        kv: BTreeMap<String, Vec<u8>>,
    }

    impl World {
        fn new(policies: &[(&str, QueuePolicy)]) -> World {
            let mut w = World { s: State::default(), index: 0, kv: BTreeMap::new() };
            let labels: BTreeMap<String, String> = [("env".to_string(), "t".to_string())].into();
            w.apply(Command::RegisterNode { id: "n1".into(), labels });
            let destinations = policies
                .iter()
                .map(|(name, queue)| Destination {
                    name: name.to_string(),
                    adapter: "process".into(),
                    selector: [("env".to_string(), "t".to_string())].into(),
                    queue: *queue,
                    node_wait_ms: DEFAULT_NODE_WAIT_MS,
                })
                .collect();
            w.apply(Command::PutDestinations { destinations });
            w
        }
        fn apply(&mut self, c: Command) -> Response {
            self.apply_changes(c).0
        }
        /// Apply `c`; its answer and the changes it persisted.
        fn apply_changes(&mut self, c: Command) -> (Response, Vec<Change>) {
            self.index += 1;
            let (r, changes) = self.s.apply(self.index, &req(None, self.index as i64, c));
            for ch in changes.clone() {
                match ch.value {
                    Some(v) => self.kv.insert(ch.key, v),
                    None => self.kv.remove(&ch.key),
                };
            }
            (r, changes)
        }
        fn submit(&mut self, app: &str, release: &str, dest: &str) -> Response {
            self.apply(Command::SubmitDeployment {
                spec: Box::new(spec(app, release, dest)),
                actor: "op".into(),
                lock_wait_ms: None,
                idempotency_key: None,
            })
        }
        fn state_of(&self, id: &str) -> DeployState {
            self.s.deployment(id).unwrap().state
        }
        /// Complete every step of the running deployment `id`.
        fn finish(&mut self, id: &str) {
            while let Some(c) = self.next_result(id) {
                self.apply(c);
            }
        }
        /// The successful result of the next step of `id`, if one runs next.
        fn next_result(&self, id: &str) -> Option<Command> {
            let d = self.s.deployment(id)?;
            let w = d.next()?;
            let outcome = StepOutcome {
                step: w.step,
                undo: w.undo,
                attempt: w.attempt,
                token: d.token?,
                epoch: d.epoch,
                ok: true,
                output: Some("{}".into()),
                error: None,
                class: None,
                started_ms: 0,
                finished_ms: 0,
                node: "n1".into(),
            };
            Some(Command::StepResult { deployment: id.into(), outcome })
        }
    }

    fn id_of(r: &Response) -> String {
        match r {
            Response::Deployment { id, .. } => id.clone(),
            other => panic!("expected a deployment, got {other:?}"),
        }
    }

    #[test]
    fn a_step_result_writes_only_the_records_it_changed_and_the_inline_layout_still_loads() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let id = id_of(&w.submit("web", "v1", "a"));
        let n = deployment_number(&id).unwrap();
        let header = format!("deploy/{n}");
        let is_record = |k: &str| k.starts_with(&format!("deploy/{n}/step/"));
        let total = w.s.deployment(&id).unwrap().steps.len();
        assert!(total >= 3, "a saga of {total} steps");
        assert_eq!(w.kv.keys().filter(|k| is_record(k)).count(), total, "the grant stored every record");

        // One result: the header and the records that changed, not the saga.
        let c = w.next_result(&id).unwrap();
        let Command::StepResult { outcome, .. } = &c else { unreachable!() };
        let step = outcome.step;
        let (_, changes) = w.apply_changes(c);
        let records: Vec<&str> = changes.iter().map(|c| c.key.as_str()).filter(|k| is_record(k)).collect();
        assert!(records.contains(&format!("deploy/{n}/step/{step}").as_str()), "{records:?}");
        assert!(records.len() < total, "wrote {records:?} of {total}");
        let stored: Deployment = serde_json::from_slice(&w.kv[&header]).unwrap();
        assert!(stored.steps.is_empty(), "the header holds no records");
        assert_eq!(State::load(w.kv.clone()).unwrap(), w.s, "what was persisted rebuilds the state");

        // The layout before: every record inline in `deploy/<n>`.
        let mut old = w.kv.clone();
        old.retain(|k, _| !is_record(k));
        old.insert(header.clone(), serde_json::to_vec(w.s.deployment(&id).unwrap()).unwrap());
        let mut from_old = State::load(old.clone()).unwrap();
        assert_eq!(from_old.deployment(&id), w.s.deployment(&id));
        assert_eq!(from_old.dump(), w.s.dump(), "a snapshot of it is in the new layout");
        // Its next change writes every record, and drops them from the header.
        let c = w.next_result(&id).unwrap();
        let (_, changes) = from_old.apply(w.index + 1, &req(None, w.index as i64 + 1, c.clone()));
        assert_eq!(changes.iter().filter(|c| is_record(&c.key)).count(), total);
        for ch in changes {
            old.insert(ch.key, ch.value.unwrap());
        }
        w.apply(c);
        assert_eq!(State::load(old).unwrap(), w.s);
        assert_eq!(from_old, w.s);

        // Records that do not fit their deployment are refused, not guessed.
        let mut gap = w.kv.clone();
        gap.remove(&format!("deploy/{n}/step/1"));
        let mut both = w.kv.clone();
        both.insert(header.clone(), serde_json::to_vec(w.s.deployment(&id).unwrap()).unwrap());
        let mut orphan = w.kv.clone();
        orphan.insert("deploy/999/step/0".into(), w.kv[&format!("deploy/{n}/step/0")].clone());
        for (what, kv) in [("a gap", gap), ("inline and keyed", both), ("no deployment", orphan)] {
            assert!(matches!(State::load(kv), Err(LoadError::Steps(..))), "{what}");
        }
    }

    #[test]
    fn the_header_is_written_when_it_changed_or_when_nothing_else_was() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let id = id_of(&w.submit("web", "v1", "a"));
        let n = deployment_number(&id).unwrap();
        let header = format!("deploy/{n}");
        let mut left_alone = 0;
        while let Some(c) = w.next_result(&id) {
            let before = w.s.deployment(&id).unwrap().without_steps();
            let (_, changes) = w.apply_changes(c);
            let after = w.s.deployment(&id).unwrap().without_steps();
            let records = changes.iter().filter(|c| c.key.starts_with(&format!("{header}/step/"))).count();
            let wrote_header = changes.iter().any(|c| c.key == header);
            assert_eq!(wrote_header, before != after || records == 0, "{before:?} → {after:?}, {records} records");
            left_alone += usize::from(!wrote_header);
            assert_eq!(State::load(w.kv.clone()).unwrap(), w.s, "what was persisted rebuilds the state");
        }
        assert_eq!(w.state_of(&id), DeployState::Succeeded);
        assert!(left_alone > 0, "a plain step result leaves the header alone");
        // A restart knows the stored header: the next change compares with it.
        let mut w2 = World::new(&[("a", QueuePolicy::Queue)]);
        let id2 = id_of(&w2.submit("web", "v2", "a"));
        let c = w2.next_result(&id2).unwrap();
        let mut reloaded = State::load(w2.kv.clone()).unwrap();
        let (_, changes) = reloaded.apply(w2.index + 1, &req(None, w2.index as i64 + 1, c));
        let header2 = format!("deploy/{}", deployment_number(&id2).unwrap());
        assert!(changes.iter().all(|c| c.key != header2), "{:?}", changes.iter().map(|c| &c.key).collect::<Vec<_>>());
    }

    /// A result writes the step records that differ from before it, and
    /// no other: a plain success writes the one it records.
    #[test]
    fn a_result_writes_exactly_the_records_it_changed() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let id = id_of(&w.submit("web", "v1", "a"));
        let prefix = format!("deploy/{}/step/", deployment_number(&id).unwrap());
        let mut single = 0;
        while let Some(c) = w.next_result(&id) {
            let before = w.s.deployment(&id).unwrap().steps.clone();
            let (_, changes) = w.apply_changes(c);
            let after = &w.s.deployment(&id).unwrap().steps;
            let differ: Vec<String> =
                before.iter().zip(after).enumerate().filter(|(_, (b, a))| b != a).map(|(i, _)| format!("{prefix}{i}")).collect();
            let written: Vec<String> = changes.iter().filter(|c| c.key.starts_with(&prefix)).map(|c| c.key.clone()).collect();
            assert_eq!(written, differ);
            single += usize::from(written.len() == 1);
        }
        assert_eq!(w.state_of(&id), DeployState::Succeeded);
        assert!(single > 0, "a plain step result writes one record");
    }

    #[test]
    fn fifo_queue_grants_in_submission_order_with_growing_tokens() {
        use DeployState::*;
        let mut w = World::new(&[("a", QueuePolicy::Queue), ("b", QueuePolicy::Queue)]);
        let a1 = id_of(&w.submit("web", "v1", "a"));
        let a2 = id_of(&w.submit("web", "v2", "a"));
        let a3 = id_of(&w.submit("api", "v1", "a"));
        let b1 = id_of(&w.submit("web", "v1", "b"));
        assert_eq!([a1.as_str(), a2.as_str(), a3.as_str()].map(|i| w.state_of(i)), [Running, Queued, Queued]);
        assert_eq!(w.state_of(&b1), Running, "another destination does not wait");
        assert_eq!(w.s.queue("a"), vec![a1.clone(), a2.clone(), a3.clone()]);
        let t1 = w.s.deployment(&a1).unwrap().token.unwrap();
        w.finish(&a1);
        assert_eq!(w.state_of(&a1), Succeeded);
        assert_eq!(w.state_of(&a2), Running, "the next in line starts in the same apply");
        let t2 = w.s.deployment(&a2).unwrap().token.unwrap();
        assert!(t2 > t1);
        assert_eq!(w.s.lock("a").unwrap().fencing_token, t2);
        assert_eq!(w.s.deployment(&a2).unwrap().previous_release.as_deref(), Some("v1"));
        w.finish(&a2);
        w.finish(&a3);
        assert!(w.s.lock("a").is_none());
        assert!(w.s.queue("a").is_empty());
    }

    #[test]
    fn policies_and_validation_at_submit() {
        use DeployState::*;
        let mut w = World::new(&[("r", QueuePolicy::Reject), ("c", QueuePolicy::Coalesce)]);
        let r1 = id_of(&w.submit("web", "v1", "r"));
        assert!(matches!(w.submit("web", "v2", "r"), Response::Rejected { .. }), "busy under reject");
        w.finish(&r1);
        assert!(matches!(w.submit("web", "v2", "r"), Response::Deployment { .. }), "free again");

        let c1 = id_of(&w.submit("web", "v1", "c"));
        let c2 = id_of(&w.submit("web", "v2", "c"));
        let c3 = id_of(&w.submit("web", "v3", "c"));
        assert_eq!([&c1, &c2, &c3].map(|i| w.state_of(i)), [Running, Superseded, Queued]);

        assert!(matches!(w.submit("web", "v1", "nowhere"), Response::Invalid { reason } if reason.contains("unknown destination")));
        // A destination no node matches is refused at submit, not left hanging.
        w.apply(Command::PutDestinations {
            destinations: vec![Destination {
                name: "empty".into(),
                adapter: "process".into(),
                selector: [("env".to_string(), "none".to_string())].into(),
                queue: QueuePolicy::Queue,
                node_wait_ms: DEFAULT_NODE_WAIT_MS,
            }],
        });
        assert!(matches!(w.submit("web", "v1", "empty"), Response::Invalid { reason } if reason.contains("no worker node")));
    }

    #[test]
    fn manual_lock_and_deployments_share_the_queue() {
        use DeployState::*;
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        w.apply(acquire("a", "alice"));
        let d = id_of(&w.submit("web", "v1", "a"));
        assert_eq!(w.state_of(&d), Queued, "waits for the maintenance lock");
        // Nobody but its holder may release a deployment's lock.
        assert!(matches!(w.apply(release("a", "alice")), Response::Released { .. }));
        assert_eq!(w.state_of(&d), Running);
        assert!(matches!(w.apply(release("a", "alice")), Response::NotOwner { .. }));
        assert!(matches!(w.apply(acquire("a", "bob")), Response::Held { .. }));
    }

    #[test]
    fn cancel_and_rollback() {
        use DeployState::*;
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let v1 = id_of(&w.submit("web", "v1", "a"));
        w.finish(&v1);
        let v2 = id_of(&w.submit("web", "v2", "a"));
        w.finish(&v2);
        let v3 = id_of(&w.submit("web", "v3", "a"));
        let queued = id_of(&w.submit("web", "v4", "a"));
        let r = w.apply(Command::CancelDeployment { id: queued.clone(), reason: "no".into(), actor: "op".into(), timed_out: false });
        assert!(matches!(r, Response::Deployment { state: Cancelled, .. }));
        assert!(!w.s.queue("a").contains(&queued));
        // Rollback of v2 goes to v1 (the release before it), queued behind v3.
        let rb = id_of(&w.apply(Command::RollbackDeployment { id: v2.clone(), to_release: None, timeout_ms: None, actor: "op".into() }));
        let d = w.s.deployment(&rb).unwrap();
        assert_eq!((d.release.as_str(), d.rollback_of.as_deref(), d.state), ("v1", Some(v2.as_str()), Queued));
        w.finish(&v3);
        w.finish(&rb);
        assert_eq!(w.s.current_release("web", "a").unwrap().release, "v1");
        let none = w.apply(Command::RollbackDeployment { id: v1.clone(), to_release: None, timeout_ms: None, actor: "op".into() });
        assert!(matches!(none, Response::Rejected { .. }), "nothing before v1");
        let missing = w.apply(Command::RollbackDeployment { id: v1, to_release: Some("v9".into()), timeout_ms: None, actor: "op".into() });
        assert!(matches!(missing, Response::Rejected { .. }));
        assert!(w.s.deployment(&rb).unwrap().steps.iter().all(|s| s.status == StepStatus::Done));
    }

    /// Report one outcome for whatever `id` needs next.
    fn report(w: &mut World, id: &str, ok: bool) {
        let d = w.s.deployment(id).unwrap().clone();
        let n = d.next().expect("work to do");
        let outcome = StepOutcome {
            step: n.step,
            undo: n.undo,
            attempt: n.attempt,
            token: d.token.unwrap(),
            epoch: d.epoch,
            ok,
            output: None,
            error: (!ok).then(|| "boom".into()),
            class: (!ok).then_some(crate::deploy::ErrorClass::Invalid),
            started_ms: 0,
            finished_ms: 0,
            node: "n1".into(),
        };
        w.apply(Command::StepResult { deployment: id.into(), outcome });
    }

    #[test]
    fn compensation_failed_keeps_the_destination_until_resolved() {
        use DeployState::*;
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let d = id_of(&w.submit("web", "v1", "a"));
        let next = id_of(&w.submit("web", "v2", "a"));
        report(&mut w, &d, true); // start
        report(&mut w, &d, false); // health fails → compensating
        report(&mut w, &d, false); // undo of start fails for good
        assert_eq!(w.state_of(&d), CompensationFailed);
        assert_eq!(w.state_of(&next), Queued, "a human must look before anything else runs there");
        assert!(w.s.lock("a").is_some());
        let empty = w.apply(Command::ResolveDeployment { id: d.clone(), note: " ".into(), actor: "alice".into() });
        assert!(matches!(empty, Response::Invalid { .. }), "a note is required");
        let ok = w.apply(Command::ResolveDeployment { id: d.clone(), note: "killed it by hand".into(), actor: "alice".into() });
        assert!(matches!(ok, Response::Deployment { state: CompensationFailed, .. }));
        assert_eq!(w.state_of(&next), Running, "resolving frees the destination for the next in line");
        let last = w.s.deployment(&d).unwrap().events.last().unwrap().clone();
        assert!(last.reason.contains("killed it by hand") && last.actor == "alice");
        let again = w.apply(Command::ResolveDeployment { id: d, note: "x".into(), actor: "alice".into() });
        assert!(matches!(again, Response::Rejected { .. }));
    }

    #[test]
    fn idempotency_keys_answer_with_the_same_deployment() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let submit = |w: &mut World, actor: &str| {
            w.apply(Command::SubmitDeployment {
                spec: Box::new(spec("web", "v1", "a")),
                actor: actor.into(),
                lock_wait_ms: None,
                idempotency_key: Some("ci-42".into()),
            })
        };
        let first = id_of(&submit(&mut w, "ci"));
        let again = id_of(&submit(&mut w, "ci"));
        let other = id_of(&submit(&mut w, "someone-else"));
        assert_eq!(first, again);
        assert_ne!(first, other, "keys are scoped by the caller");
        assert_eq!(w.s.deployments().count(), 2);
    }

    #[test]
    fn ended_deployments_beyond_the_kept_history_lose_their_step_records_and_nothing_else() {
        use DeployState::*;
        let mut w = World::new(&[("a", QueuePolicy::Queue), ("b", QueuePolicy::Queue), ("c", QueuePolicy::Queue)]);
        // The oldest of all: a stack over `b` and `c` that succeeded, and
        // one on `b` whose undo failed and that nobody resolved yet.
        let stacked = id_of(&w.apply(stack("api", "s1", &["b", "c"])));
        w.finish(&stacked);
        let stuck = id_of(&w.submit("web", "x1", "b"));
        report(&mut w, &stuck, true);
        report(&mut w, &stuck, false);
        report(&mut w, &stuck, false);
        assert_eq!(w.state_of(&stuck), CompensationFailed);
        let extra = 20;
        let ids: Vec<String> = (0..KEEP_STEP_RECORDS + extra)
            .map(|i| {
                let id = id_of(&w.submit("web", &format!("v{i}"), "a"));
                w.finish(&id);
                assert_eq!(w.state_of(&id), Succeeded);
                id
            })
            .collect();
        let n = |id: &str| deployment_number(id).unwrap();
        let has_step_keys = |w: &World, id: &str| w.kv.keys().any(|k| k.starts_with(&format!("deploy/{}/step/", n(id))));
        // 1 + KEEP + extra ended deployments hold records: the stack (the
        // oldest ended one) and the first `extra` of these lose them.
        let first_kept = extra;
        let newest = w.s.deployment(ids.last().unwrap()).unwrap().clone();
        for (i, id) in ids.iter().enumerate() {
            let d = w.s.deployment(id).unwrap();
            if i < first_kept {
                assert!(d.steps.is_empty() && !has_step_keys(&w, id), "{id} is compacted, in memory and on disk");
                assert_eq!(d.compacted.as_ref().map(|c| c.steps), Some(newest.steps.len()), "{id} says how many records it had");
                let transitions = |d: &Deployment| d.events.iter().map(|e| (e.from, e.to)).collect::<Vec<_>>();
                assert_eq!(transitions(d), transitions(&newest), "{id} keeps its events");
                assert_eq!((d.state, d.release.as_str()), (Succeeded, format!("v{i}").as_str()), "{id} keeps the rest");
            } else {
                assert!(!d.steps.is_empty() && d.compacted.is_none() && has_step_keys(&w, id), "{id} is among the newest kept");
            }
        }
        let old_stack = w.s.deployment(&stacked).unwrap();
        assert!(old_stack.steps.is_empty() && old_stack.compacted.is_some());
        let stuck_d = w.s.deployment(&stuck).unwrap();
        assert!(!stuck_d.steps.is_empty() && stuck_d.compacted.is_none(), "an unresolved compensation_failed keeps its records");
        assert_eq!(w.s.with_records.len(), KEEP_STEP_RECORDS);

        // The current release and the destination views come from the index.
        assert_eq!(w.s.current_release("web", "a").map(|d| d.id.clone()), ids.last().cloned());
        assert_eq!(w.s.current_release("api", "c").map(|d| d.id.clone()), Some(stacked.clone()));
        assert_eq!(w.s.current_releases("b"), [("api".to_string(), "s1".to_string())].into());
        // A compacted release can still be rolled back to: its spec stays.
        let rb = id_of(&w.apply(Command::RollbackDeployment {
            id: ids.last().unwrap().clone(),
            to_release: Some("v0".into()),
            timeout_ms: None,
            actor: "op".into(),
        }));
        w.finish(&rb);
        assert_eq!(w.s.current_release("web", "a").map(|d| d.release.clone()), Some("v0".into()));

        // What was persisted, and a snapshot, rebuild the same state
        // (derived indexes included).
        assert_eq!(State::load(w.kv.clone()).unwrap(), w.s);
        assert_eq!(State::load(w.s.dump()).unwrap(), w.s);
    }

    #[test]
    fn a_history_from_before_compaction_is_compacted_a_batch_per_request() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let id = id_of(&w.submit("web", "v1", "a"));
        w.finish(&id);
        let d = w.s.deployment(&id).unwrap().clone();
        let n0 = deployment_number(&id).unwrap();
        // A data dir written before compaction: many ended deployments,
        // every one with its records.
        let many = KEEP_STEP_RECORDS + 3 * COMPACT_BATCH;
        let mut old = w.s.dump();
        old.retain(|(k, _)| k != SEQ_KEY);
        for k in 1..many as u64 {
            let mut copy = d.without_steps();
            copy.id = format!("d{}", n0 + k);
            old.push((format!("{DEPLOY_PREFIX}{}", n0 + k), encode(&copy)));
            for (i, rec) in d.steps.iter().enumerate() {
                old.push((step_key(n0 + k, i), encode(rec)));
            }
        }
        let mut index = n0 + many as u64;
        old.push((SEQ_KEY.into(), encode(&index)));
        let mut s = State::load(old).unwrap();
        assert_eq!(s.with_records.len(), many);
        for batch in 1..=3 {
            index += 1;
            let cmd = if batch % 2 == 1 { acquire("a", "me") } else { release("a", "me") };
            let (_, changes) = s.apply(index, &req(None, index as i64, cmd));
            let headers = changes.iter().filter(|c| c.key.starts_with(DEPLOY_PREFIX) && !c.key.contains(STEP_INFIX)).count();
            let deleted = changes.iter().filter(|c| c.key.contains(STEP_INFIX) && c.value.is_none()).count();
            assert_eq!((headers, deleted), (COMPACT_BATCH, COMPACT_BATCH * d.steps.len()), "request {batch} compacts one batch");
            assert_eq!(s.with_records.len(), KEEP_STEP_RECORDS + (3 - batch) * COMPACT_BATCH);
        }
        let (_, changes) = s.apply(index + 1, &req(None, index as i64 + 1, release("a", "me")));
        assert!(!changes.iter().any(|c| c.key.starts_with(DEPLOY_PREFIX)), "nothing more to compact");
        assert_eq!(s.deployment(&id).unwrap().compacted.as_ref().map(|c| c.steps), Some(d.steps.len()), "the oldest went first");
    }

    #[test]
    fn the_oldest_ended_deployments_leave_the_history_with_their_keys_and_current_releases_stay() {
        let mut w = World::new(&[("a", QueuePolicy::Queue), ("b", QueuePolicy::Queue)]);
        let api = id_of(&w.submit("api", "v1", "b"));
        w.finish(&api);
        let keyed = |release: &str| Command::SubmitDeployment {
            spec: Box::new(spec("web", release, "a")),
            actor: "ci".into(),
            lock_wait_ms: None,
            idempotency_key: Some("job-1".into()),
        };
        let web = id_of(&w.apply(keyed("v1")));
        w.finish(&web);
        // Many later ended deployments of web, as a data dir holds them.
        let template = w.s.deployment(&web).unwrap().without_steps();
        let n0 = deployment_number(&web).unwrap();
        let many = KEEP_DEPLOYMENTS + 2 * COMPACT_BATCH + 1;
        let mut data = w.s.dump();
        data.retain(|(k, _)| k != SEQ_KEY);
        for k in 1..many as u64 {
            let mut copy = template.clone();
            copy.id = format!("d{}", n0 + k);
            copy.release = format!("v{}", k + 1);
            data.push((format!("{DEPLOY_PREFIX}{}", n0 + k), encode(&copy)));
        }
        let mut index = n0 + many as u64;
        data.push((SEQ_KEY.into(), encode(&index)));
        let mut s = State::load(data).unwrap();
        // Every web deployment but the newest (the current release) may go;
        // api's only one is its current release.
        assert_eq!(s.droppable.len(), many - 1);
        assert_eq!(s.current_releases("a"), [("web".to_string(), format!("v{many}"))].into());

        index += 1;
        let (_, changes) = s.apply(index, &req(None, index as i64, acquire("a", "me")));
        let deleted: BTreeSet<&str> = changes.iter().filter(|c| c.value.is_none()).map(|c| c.key.as_str()).collect();
        assert!(deleted.contains(format!("deploy/{n0}").as_str()) && deleted.contains("idem/ci/job-1"), "{deleted:?}");
        let headers = deleted.iter().filter(|k| k.starts_with(DEPLOY_PREFIX) && !k.contains(STEP_INFIX)).count();
        assert_eq!(headers, COMPACT_BATCH, "one batch per request");
        assert!(
            !w.s.deployment(&web).unwrap().steps.is_empty() && !s.dump().iter().any(|(k, _)| k.starts_with(&format!("deploy/{n0}/"))),
            "its records went too"
        );
        assert!(s.deployment(&web).is_none() && s.left_history(&web));
        index += 1;
        s.apply(index, &req(None, index as i64, release("a", "me")));
        assert_eq!(s.droppable.len(), KEEP_DEPLOYMENTS);
        index += 1;
        let (_, changes) = s.apply(index, &req(None, index as i64, acquire("a", "me")));
        assert!(!changes.iter().any(|c| c.key.starts_with(DEPLOY_PREFIX)), "nothing more leaves");
        assert!(s.deployment(&api).is_some(), "a current release stays whatever its age");
        assert!(!s.left_history(&api) && !s.left_history(&format!("d{}", index + 1)), "kept, and not issued yet");

        index += 1;
        let rollback = Command::RollbackDeployment { id: web.clone(), to_release: None, timeout_ms: None, actor: "op".into() };
        let (gone, _) = s.apply(index, &req(None, index as i64, rollback));
        assert!(matches!(&gone, Response::NotFound { what } if what.contains("left it") && what.contains("--to RELEASE")), "{gone:?}");
        // Its idempotency key is free again: a new deployment, not the old id.
        index += 1;
        let (again, _) = s.apply(index, &req(None, index as i64, keyed("v1")));
        assert_eq!(id_of(&again), format!("d{index}"));
        assert_eq!(State::load(s.dump()).unwrap(), s);
    }

    fn stack(app: &str, release: &str, dests: &[&str]) -> Command {
        let text = format!("app: {app}\nrelease: {release}\ndestinations: [{}]\nrun: [srv]\nhealth: {{ tcp: true }}\n", dests.join(", "));
        let spec = parse_manifest("f", &text, &Overrides::default()).unwrap();
        Command::SubmitDeployment { spec: Box::new(spec), actor: "op".into(), lock_wait_ms: None, idempotency_key: None }
    }

    #[test]
    fn stacks_take_every_lock_in_one_apply_and_never_deadlock() {
        use DeployState::*;
        let mut w = World::new(&[("a", QueuePolicy::Queue), ("b", QueuePolicy::Queue), ("c", QueuePolicy::Queue)]);
        let s1 = id_of(&w.apply(stack("web", "v1", &["a", "b"])));
        // The same two destinations in the other order: a classic
        // deadlock for one-lock-at-a-time acquisition.
        let s2 = id_of(&w.apply(stack("web", "v2", &["b", "a"])));
        let single = id_of(&w.submit("api", "v1", "a"));
        let other = id_of(&w.submit("api", "v1", "c"));
        assert_eq!([&s1, &s2, &single, &other].map(|i| w.state_of(i)), [Running, Queued, Queued, Running]);
        let t1 = w.s.deployment(&s1).unwrap().token.unwrap();
        assert_eq!((w.s.lock("a").unwrap().fencing_token, w.s.lock("b").unwrap().fencing_token), (t1, t1), "one grant, one token");
        let d1 = w.s.deployment(&s1).unwrap();
        let per_dest: BTreeSet<&str> = d1.steps.iter().map(|s| s.plan.destination.as_str()).collect();
        assert_eq!(per_dest, ["a", "b"].into(), "the saga covers both destinations");
        assert_eq!(w.s.queue("a"), vec![s1.clone(), s2.clone(), single.clone()]);
        assert_eq!(w.s.queue("b"), vec![s1.clone(), s2.clone()]);
        w.finish(&s1);
        assert_eq!((w.state_of(&s1), w.state_of(&s2), w.state_of(&single)), (Succeeded, Running, Queued));
        let t2 = w.s.deployment(&s2).unwrap().token.unwrap();
        assert!(t2 > t1);
        assert_eq!((w.s.lock("a").unwrap().fencing_token, w.s.lock("b").unwrap().fencing_token), (t2, t2));
        w.finish(&s2);
        assert_eq!(w.state_of(&single), Running);
        assert!(w.s.lock("b").is_none(), "a stack that ends frees every destination");
        assert_eq!(w.s.current_release("web", "b").unwrap().id, s2);
    }

    #[test]
    fn a_stack_waits_for_its_busiest_destination_and_is_refused_as_a_whole() {
        use DeployState::*;
        let mut w = World::new(&[("a", QueuePolicy::Queue), ("b", QueuePolicy::Queue), ("r", QueuePolicy::Reject)]);
        w.apply(acquire("b", "alice"));
        let s1 = id_of(&w.apply(stack("web", "v1", &["a", "b"])));
        assert_eq!(w.state_of(&s1), Queued);
        assert!(w.s.lock("a").is_none(), "no lock is taken until all can be");
        w.apply(release("b", "alice"));
        assert_eq!(w.state_of(&s1), Running, "the release of the last one grants them all");
        // A busy `reject` destination refuses the whole stack; nothing is created.
        let before = w.s.deployments().count();
        w.apply(acquire("r", "bob"));
        assert!(matches!(w.apply(stack("web", "v2", &["c0", "r"])), Response::Invalid { .. }), "unknown destination");
        assert!(matches!(w.apply(stack("web", "v2", &["a", "r"])), Response::Rejected { .. }));
        assert_eq!(w.s.deployments().count(), before);
        assert_eq!(w.s.queue("a"), vec![s1.clone()]);
        // A failure anywhere undoes the stack everywhere.
        report(&mut w, &s1, true); // start on a
        report(&mut w, &s1, false); // health on a fails
        while w.s.deployment(&s1).unwrap().next().is_some() {
            report(&mut w, &s1, true);
        }
        assert_eq!(w.state_of(&s1), Failed);
        assert!(w.s.lock("a").is_none() && w.s.lock("b").is_none());
    }

    #[test]
    fn the_manifest_kind_must_match_the_destination_adapter() {
        let mut w = World::new(&[("p", QueuePolicy::Queue)]);
        w.apply(Command::PutDestinations {
            destinations: vec![Destination {
                name: "cmd".into(),
                adapter: "command".into(),
                selector: [("env".to_string(), "t".to_string())].into(),
                queue: QueuePolicy::Queue,
                node_wait_ms: DEFAULT_NODE_WAIT_MS,
            }],
        });
        let text = "app: infra\nrelease: v1\ndestination: DEST\nsteps:\n  - { name: apply, run: \"tf apply\" }\n";
        let command = |dest: &str| Command::SubmitDeployment {
            spec: Box::new(parse_manifest("f", &text.replace("DEST", dest), &Overrides::default()).unwrap()),
            actor: "op".into(),
            lock_wait_ms: None,
            idempotency_key: None,
        };
        assert!(matches!(w.apply(command("p")), Response::Invalid { reason } if reason.contains("`process` adapter")));
        assert!(matches!(w.submit("web", "v1", "cmd"), Response::Invalid { reason } if reason.contains("`command` adapter")));
        let id = id_of(&w.apply(command("cmd")));
        let d = w.s.deployment(&id).unwrap();
        assert_eq!(d.state, DeployState::Running);
        assert_eq!(d.steps.len(), 1);
        assert!(d.steps[0].plan.movable);
    }

    #[test]
    fn a_resource_error_resyncs_before_the_retry() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let id = id_of(&w.submit("web", "v1", "a"));
        // n1's labels change: it is no longer selected by `a`.
        w.apply(Command::RegisterNode { id: "n1".into(), labels: [("env".to_string(), "other".to_string())].into() });
        let d = w.s.deployment(&id).unwrap().clone();
        let n = d.next().unwrap();
        let outcome = StepOutcome {
            step: n.step,
            undo: false,
            attempt: n.attempt,
            token: d.token.unwrap(),
            epoch: d.epoch,
            ok: false,
            output: None,
            error: Some("port taken".into()),
            class: Some(crate::deploy::ErrorClass::Resource),
            started_ms: 0,
            finished_ms: 0,
            node: "n1".into(),
        };
        w.apply(Command::StepResult { deployment: id.clone(), outcome });
        let d = w.s.deployment(&id).unwrap();
        assert!(d.events.iter().any(|e| e.reason.contains("re-synced")), "{:?}", d.events);
        assert_eq!(d.state, DeployState::Failed, "its only node left the destination: nothing can be deployed");
    }

    #[test]
    fn snapshot_round_trip_with_deployments() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let d = id_of(&w.submit("web", "v1", "a"));
        w.submit("web", "v2", "a");
        w.finish(&d);
        let cancelled = id_of(&w.submit("web", "v3", "a"));
        w.apply(Command::CancelDeployment { id: cancelled, reason: "x".into(), actor: "op".into(), timed_out: true });
        assert_eq!(State::load(w.s.dump()).unwrap(), w.s);
        assert_eq!(State::load(w.kv.clone()).unwrap(), w.s, "the changes apply returned rebuild the same state");
    }

    #[test]
    fn nonsense_answers_with_an_error_and_changes_nothing() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let id = id_of(&w.submit("web", "v1", "a"));
        let before = w.s.clone();
        let d = w.s.deployment(&id).unwrap().clone();
        let outcome = |step: usize| StepOutcome {
            step,
            undo: false,
            attempt: 1,
            token: d.token.unwrap(),
            epoch: d.epoch,
            ok: true,
            output: None,
            error: None,
            class: None,
            started_ms: 0,
            finished_ms: 0,
            node: "n1".into(),
        };
        for bad in ["", "x", "d0", "d99999", "d18446744073709551616"] {
            let r = w.apply(Command::StepResult { deployment: bad.into(), outcome: outcome(0) });
            assert!(matches!(r, Response::NotFound { .. }), "{bad}: {r:?}");
            let r = w.apply(Command::CancelDeployment { id: bad.into(), reason: "x".into(), actor: "op".into(), timed_out: false });
            assert!(matches!(r, Response::NotFound { .. }), "{bad}: {r:?}");
            let r = w.apply(Command::ResolveDeployment { id: bad.into(), note: "x".into(), actor: "op".into() });
            assert!(matches!(r, Response::NotFound { .. }), "{bad}: {r:?}");
        }
        for step in [1, 99, usize::MAX] {
            let r = w.apply(Command::StepResult { deployment: id.clone(), outcome: outcome(step) });
            assert!(matches!(r, Response::Stale { .. }), "step {step}: {r:?}");
        }
        assert!(matches!(w.apply(Command::NodeLost { node: "ghost".into(), why: "x".into() }), Response::NotFound { .. }));
        // Every request takes a sequence number, refused or not; nothing else moved.
        let mut after = w.s.clone();
        after.last_seq = before.last_seq;
        assert_eq!(after, before);
    }

    #[test]
    fn the_clock_at_its_extremes_does_not_overflow() {
        let mut w = World::new(&[("a", QueuePolicy::Queue)]);
        let id = id_of(&w.submit("web", "v1", "a"));
        let d = w.s.deployment(&id).unwrap().clone();
        let n = d.next().unwrap();
        let outcome = StepOutcome {
            step: n.step,
            undo: false,
            attempt: n.attempt,
            token: d.token.unwrap(),
            epoch: d.epoch,
            ok: false,
            output: None,
            error: Some("timeout".into()),
            class: Some(crate::deploy::ErrorClass::Transient),
            started_ms: 0,
            finished_ms: 0,
            node: "n1".into(),
        };
        // A retry's backoff is added to the entry's time.
        w.s.apply(100, &req(Some("late"), i64::MAX - 1, Command::StepResult { deployment: id.clone(), outcome }));
        assert_eq!(w.s.deployment(&id).unwrap().steps[0].not_before_ms, Some(i64::MAX));
        // Dedup expiry compares times of both signs.
        w.s.apply(101, &req(Some("early"), i64::MIN, acquire("b", "alice")));
        w.s.apply(102, &req(Some("later"), i64::MAX, acquire("c", "alice")));
    }
}

mod access {
    use super::*;
    use crate::auth::Role;
    use crate::command::{Origin, Via};

    const H1: &str = "0000000000000000000000000000000000000000000000000000000000000001";
    const H2: &str = "00000000000000000000000000000000000000000000000000000000000000a2";

    fn create(name: &str, role: Role, sha256: &str, expires_ms: Option<i64>) -> Command {
        Command::CreateToken { name: name.into(), role, sha256: sha256.into(), expires_ms, actor: "alice".into() }
    }

    fn outcome(r: &Response) -> &'static str {
        match r {
            Response::TokenCreated { .. } => "created",
            Response::Done => "done",
            Response::Invalid { .. } => "invalid",
            Response::Rejected { .. } => "rejected",
            Response::NotFound { .. } => "not_found",
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn token_table() {
        // (command, answer, tokens known by hash afterwards), in order, at t = 100.
        let steps: Vec<(Command, &str, &[&str])> = vec![
            (create("ci", Role::Operator, H1, None), "created", &[H1]),
            (create("ci", Role::Viewer, H2, None), "rejected", &[H1]), // name taken
            (create("other", Role::Viewer, H1, None), "rejected", &[H1]), // same secret
            (create("node", Role::Node, H2, None), "invalid", &[H1]),  // tokens are for people and scripts
            (create("coord", Role::Coordinator, H2, None), "invalid", &[H1]),
            (create("Bad Name", Role::Viewer, H2, None), "invalid", &[H1]),
            (create("short", Role::Viewer, "abc", None), "invalid", &[H1]),
            (create("upper", Role::Viewer, &H2.to_uppercase(), None), "invalid", &[H1]),
            (create("past", Role::Viewer, H2, Some(100)), "invalid", &[H1]), // expires as it is made
            (create("dash", Role::Viewer, H2, Some(1_000)), "created", &[H1, H2]),
            (Command::RevokeToken { name: "ci".into() }, "done", &[H2]),
            (Command::RevokeToken { name: "ci".into() }, "not_found", &[H2]),
            (create("ci", Role::Viewer, H1, None), "created", &[H1, H2]), // a revoked name can be reused
        ];
        let mut s = State::default();
        for (i, (cmd, want, known)) in steps.into_iter().enumerate() {
            let (got, _) = s.apply(i as u64 + 1, &req(None, 100, cmd.clone()));
            assert_eq!(outcome(&got), want, "step {i}: {cmd:?}: {got:?}");
            for h in [H1, H2] {
                assert_eq!(s.token_by_hash(h).is_some(), known.contains(&h), "step {i}: hash {h}");
            }
        }
        let dash = s.token_by_hash(H2).expect("dash exists");
        assert_eq!((dash.name.as_str(), dash.role, dash.created_by.as_str()), ("dash", Role::Viewer, "alice"));
        assert!(dash.valid_at(999) && !dash.valid_at(1_000), "expiry is exclusive");
        assert_eq!(s.token_by_hash(H1).map(|t| t.role), Some(Role::Viewer), "the reused name has its new role");
        // Survives a snapshot, and the derived hash index is rebuilt.
        let loaded = State::load(s.dump()).expect("loads");
        assert_eq!(loaded, s);
    }

    fn with_origin(id: Option<&str>, at_ms: i64, command: Command, actor: &str) -> Request {
        Request {
            request_id: id.map(str::to_string),
            at_ms,
            command,
            origin: Some(Origin { actor: actor.into(), via: Via::Certificate, from: "10.0.0.1:5000".into() }),
        }
    }

    #[test]
    fn operator_actions_are_audited_and_nothing_else() {
        let mut s = State::default();
        // (command, origin actor or none, audit (action, target, outcome) expected)
        type Audited<'a> = Option<(&'a str, &'a str, &'a str)>;
        let steps: Vec<(Command, Option<&str>, Audited)> = vec![
            (acquire("web", "alice"), Some("alice"), Some(("lock.acquire", "web", "granted, fencing token 1"))),
            (acquire("web", "bob"), Some("bob"), Some(("lock.acquire", "web", "refused: held by alice"))),
            (release("web", "alice"), Some("alice"), Some(("lock.release", "web", "ok"))),
            // The leader's and nodes' own commands carry no origin: no record.
            (Command::RegisterNode { id: "n1".into(), labels: BTreeMap::new() }, None, None),
            (
                Command::CancelDeployment { id: "d99".into(), reason: "x".into(), actor: "alice".into(), timed_out: false },
                Some("alice"),
                Some(("cancel", "d99", "not found: deployment `d99`")),
            ),
            (create("ci", Role::Operator, H1, None), Some("alice"), Some(("tokens.create", "ci", "ok"))),
            (Command::RevokeToken { name: "ci".into() }, Some("token:ops"), Some(("tokens.revoke", "ci", "ok"))),
            (
                Command::RecordAction { action: "cluster.promote".into(), target: "4".into(), outcome: "ok".into() },
                Some("alice"),
                Some(("cluster.promote", "4", "ok")),
            ),
        ];
        let mut want = Vec::new();
        for (i, (cmd, actor, audited)) in steps.into_iter().enumerate() {
            let index = i as u64 + 1;
            let r = match actor {
                Some(a) => with_origin(None, 50 + i as i64, cmd, a),
                None => req(None, 50 + i as i64, cmd),
            };
            s.apply(index, &r);
            if let Some((action, target, outcome)) = audited {
                want.push((index, actor.unwrap_or_default().to_string(), action.to_string(), target.to_string(), outcome.to_string()));
            }
        }
        want.reverse();
        // Outcomes are shortened to one line: compare their beginnings.
        let got: Vec<_> = s
            .audit(None)
            .zip(&want)
            .map(|(r, w)| {
                let outcome = if r.outcome.starts_with(&w.4) { w.4.clone() } else { r.outcome.clone() };
                (r.index, r.actor.clone(), r.action.clone(), r.target.clone(), outcome)
            })
            .collect();
        assert_eq!(s.audit(None).count(), want.len(), "one record per operator command");
        assert_eq!(got, want, "newest first, one record per operator command");
        assert!(s.audit(None).all(|r| r.from == "10.0.0.1:5000" && r.via == Via::Certificate));
        assert_eq!(s.audit(Some(3)).map(|r| r.index).collect::<Vec<_>>(), vec![2, 1], "paged with `before`");
        // A retried request (same id) is answered once and recorded once.
        let retry = with_origin(Some("r1"), 100, acquire("db", "alice"), "alice");
        s.apply(20, &retry);
        s.apply(21, &retry);
        assert_eq!(s.audit(None).filter(|r| r.target == "db").count(), 1);
        assert_eq!(State::load(s.dump()).expect("loads"), s);
    }

    #[test]
    fn the_audit_log_is_bounded_and_drops_the_oldest() {
        let mut s = State::default();
        let mut kv: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let extra = 5;
        for i in 0..(MAX_AUDIT_RECORDS + extra) as u64 {
            let cmd = Command::RecordAction { action: "cluster.remove".into(), target: i.to_string(), outcome: "ok".into() };
            let (_, changes) = s.apply(i + 1, &with_origin(None, 1, cmd, "alice"));
            for c in changes {
                match c.value {
                    Some(v) => kv.insert(c.key, v),
                    None => kv.remove(&c.key),
                };
            }
        }
        assert_eq!(s.audit(None).count(), MAX_AUDIT_RECORDS);
        assert_eq!(s.audit(None).last().map(|r| r.index), Some(extra as u64 + 1), "the oldest were dropped");
        assert_eq!(State::load(kv).expect("the persisted changes load"), s, "deletions were persisted too");
    }
}

#[test]
fn changed_keys_name_what_they_touch() {
    let cases = [
        ("deploy/42", Touched::Deployment(42)),
        ("deploy/x", Touched::Other),
        ("deploy/42/step/7", Touched::Deployment(42)),
        ("deploy/x/step/7", Touched::Other),
        ("lock/web", Touched::Destination("web")),
        ("queue/web", Touched::Destination("web")),
        ("dest/web", Touched::Destination("web")),
        ("node/n1", Touched::Nodes),
        ("server/web/i-1", Touched::Other),
        ("dedup/a/b", Touched::Other),
        (SEQ_KEY, Touched::Other),
    ];
    for (key, want) in cases {
        assert_eq!(touched(key), want, "{key}");
    }
}

#[test]
fn only_definition_keys_name_a_defined_destination() {
    let cases = [
        ("dest/web", Some("web")),
        ("lock/web", None),
        ("queue/web", None),
        ("server/web/i-1", None),
        ("deploy/42", None),
        ("node/n1", None),
        (SEQ_KEY, None),
    ];
    for (key, want) in cases {
        assert_eq!(defined_destination(key), want, "{key}");
    }
}

/// Whether the dedup record of request `id` answers with the very string
/// (not a copy) the lock on `dest` holds as its reason.
fn shares_reason(s: &State, id: &str, dest: &str) -> bool {
    let held = &s.locks.get(dest).expect("lock held").reason;
    match &s.dedup.get(id).expect("dedup record").response {
        Response::Granted { lock } => std::sync::Arc::ptr_eq(&lock.reason, held),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_lock_and_the_answer_kept_for_its_retry_share_one_reason() {
    let mut s = State::default();
    let long = "x".repeat(4096);
    let grant = Command::AcquireLock { destination: "web".into(), holder: "alice".into(), reason: long.clone() };
    s.apply(1, &req(Some("g1"), 0, grant.clone()));
    s.apply(2, &req(Some("g2"), 0, acquire("db", "bob")));
    assert!(shares_reason(&s, "g1", "web"));

    // Read back from its stored pairs (a restart, a snapshot): shared again.
    let mut loaded = State::load(s.dump()).expect("load");
    assert!(shares_reason(&loaded, "g1", "web"));
    assert!(shares_reason(&loaded, "g2", "db"));
    assert_eq!(loaded, s);

    // A retry still gets the grant with the whole reason.
    let (again, _) = loaded.apply(3, &req(Some("g1"), 0, grant));
    assert!(matches!(&again, Response::Granted { lock } if *lock.reason == *long && lock.fencing_token == 1), "{again:?}");

    // Released and granted to someone else: the old answer is not tied to
    // the new holder's lock.
    loaded.apply(4, &req(None, 0, release("web", "alice")));
    loaded.apply(5, &req(Some("g3"), 0, acquire("web", "carol")));
    let reloaded = State::load(loaded.dump()).expect("load");
    assert!(!shares_reason(&reloaded, "g1", "web"));
    assert!(shares_reason(&reloaded, "g3", "web"));
}
