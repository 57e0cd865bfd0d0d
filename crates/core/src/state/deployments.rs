//! Deployment commands: submit (with idempotency keys and queue policies),
//! rollback, cancel, resolve and step results.

use super::{deployment_number, Ctx, State, IDEM_PREFIX};
use crate::command::Response;
use crate::deploy::{DeployState, Deployment, ErrorClass, Event, StepOutcome};
use crate::manifest::{QueuePolicy, Spec};
use crate::names::{validate_text, MAX_REASON_LEN};

impl State {
    /// `SubmitDeployment`: the same idempotency key of the same actor
    /// answers with the deployment it created.
    pub(super) fn submit_command(
        &mut self,
        cx: &mut Ctx,
        spec: &Spec,
        actor: &str,
        lock_wait_ms: Option<u64>,
        idempotency_key: Option<&str>,
    ) -> Response {
        let idem = idempotency_key.map(|k| format!("{actor}/{k}"));
        if let Some(d) = idem.as_ref().and_then(|k| self.idempotency.get(k)).and_then(|n| self.deployments.get(n)) {
            return Response::Deployment { id: d.id.clone(), state: d.state };
        }
        let r = self.submit(cx, spec.clone(), actor, None, "submitted");
        if let Response::Deployment { .. } = &r {
            let index = cx.seq;
            if let Some(d) = self.deployments.get_mut(&index) {
                if d.state == DeployState::Queued {
                    d.lock_wait_until_ms = lock_wait_ms.map(|w| cx.at_ms.saturating_add(w.min(i64::MAX as u64) as i64));
                }
            }
            self.put_deployment(cx, index);
            if let Some(k) = idem {
                cx.put(format!("{IDEM_PREFIX}{k}"), &index);
                self.idempotency_of.entry(index).or_default().push(k.clone());
                self.idempotency.insert(k, index);
            }
        }
        r
    }

    /// Queue a deployment of `spec` (number = this request's sequence number) and start
    /// it if its destinations are free.
    fn submit(&mut self, cx: &mut Ctx, spec: Spec, actor: &str, rollback_of: Option<String>, reason: &str) -> Response {
        self.submit_to(cx, spec, actor, rollback_of, reason, vec![])
    }

    /// [`State::submit`] to the servers `targets` only (empty = all).
    pub(super) fn submit_to(
        &mut self,
        cx: &mut Ctx,
        spec: Spec,
        actor: &str,
        rollback_of: Option<String>,
        reason: &str,
        targets: Vec<String>,
    ) -> Response {
        let (index, at_ms) = (cx.seq, cx.at_ms);
        let dests: Vec<String> = spec.destinations().to_vec();
        for name in &dests {
            let Some(dest) = self.destinations.get(name) else {
                return Response::Invalid {
                    reason: format!(
                        "unknown destination `{name}`; `fleetctl destinations` lists the known ones and `fleetctl destinations apply -f FILE` adds one"
                    ),
                };
            };
            let want = spec.kind().adapter();
            if dest.adapter != want {
                return Response::Invalid {
                    reason: format!(
                        "destination `{name}` uses the `{}` adapter, but this manifest is for `{want}` ({}); deploy it to a `{want}` destination",
                        dest.adapter,
                        spec.kind().because()
                    ),
                };
            }
            if self.nodes_for(name).is_empty() {
                return Response::Invalid {
                    reason: format!(
                        "no worker node matches destination `{name}` (selector {:?}); start a node with those labels (`fleet-node --label KEY=VALUE`) or change the destination's selector; `fleetctl nodes` lists the nodes",
                        dest.selector
                    ),
                };
            }
        }
        if let Some(canary) = &spec.canary {
            for name in &dests {
                if let Err(reason) = crate::manifest::check_nodes(canary, name, &self.nodes_for(name)) {
                    return Response::Invalid { reason };
                }
            }
        }
        for name in &dests {
            let busy = self.locks.contains_key(name) || self.queues.get(name).is_some_and(|q| !q.is_empty());
            if self.destinations.get(name).is_some_and(|d| d.queue == QueuePolicy::Reject) && busy {
                let by = self.locks.get(name).map(|l| l.holder.clone()).unwrap_or_else(|| "a queued deployment".into());
                return Response::Rejected {
                    reason: format!(
                        "destination `{name}` is busy (held by {by}) and its queue policy is `reject`; retry when `fleetctl lock status {name}` shows it free"
                    ),
                };
            }
        }
        let id = format!("d{index}");
        // Coalesce: a queued deployment of the same app to the same
        // destinations is replaced by this one.
        for name in &dests {
            if self.destinations.get(name).is_none_or(|d| d.queue != QueuePolicy::Coalesce) {
                continue;
            }
            let waiting: Vec<u64> = self.queues.get(name).map(|q| q.iter().copied().collect()).unwrap_or_default();
            for n in waiting {
                let Some(d) = self.deployments.get_mut(&n) else { continue };
                if d.state == DeployState::Queued && d.app == spec.app && d.destinations() == dests.as_slice() {
                    let why = format!("superseded by {id} (queue policy `coalesce`)");
                    if d.transition(DeployState::Superseded, at_ms, why, actor).is_ok() {
                        for q in &dests {
                            self.queues.entry(q.clone()).or_default().retain(|x| *x != n);
                            self.put_queue(cx, q);
                        }
                        self.put_deployment(cx, n);
                    }
                }
            }
        }
        let deadline_ms = at_ms.saturating_add(spec.timeout_ms.min(i64::MAX as u64) as i64);
        let d = Deployment {
            id: id.clone(),
            app: spec.app.clone(),
            release: spec.release.clone(),
            destination: spec.destination.clone(),
            spec,
            state: DeployState::Queued,
            submitted_by: actor.to_string(),
            submitted_ms: at_ms,
            deadline_ms,
            token: None,
            epoch: 1,
            previous_release: None,
            rollback_of,
            timed_out: false,
            lock_wait_until_ms: None,
            resolved: None,
            pause: None,
            targets,
            steps: vec![],
            events: vec![Event { at_ms, from: None, to: DeployState::Queued, reason: reason.to_string(), actor: actor.to_string() }],
            compacted: None,
            changed: Default::default(),
        };
        self.deployments.insert(index, d);
        // One apply enqueues it on every destination: queue order is the
        // log order everywhere, so two stacks can never wait on each other.
        for name in &dests {
            self.queues.entry(name.clone()).or_default().push_back(index);
            self.put_queue(cx, name);
        }
        self.put_deployment(cx, index);
        self.pump(cx, &dests);
        match self.deployments.get(&index) {
            Some(d) => Response::Deployment { id, state: d.state },
            None => Response::NotFound { what: format!("deployment `{id}`") },
        }
    }

    pub(super) fn rollback(&mut self, cx: &mut Ctx, id: &str, to: Option<&str>, timeout_ms: Option<u64>, actor: &str) -> Response {
        let Some(of) = self.deployment(id).cloned() else {
            if self.left_history(id) {
                return Response::NotFound {
                    what: format!(
                        "deployment `{id}` in the history: it ended long ago and left it (the newest {} ended deployments and every current release are kept); roll back a newer deployment of the app with `--to RELEASE`",
                        super::KEEP_DEPLOYMENTS
                    ),
                };
            }
            return Response::NotFound { what: format!("deployment `{id}`; `fleetctl list` shows the deployments") };
        };
        let of_n = deployment_number(id).unwrap_or(0);
        let target = self
            .deployments
            .iter()
            .rev()
            .filter(|(n, d)| {
                d.app == of.app
                    && d.destinations() == of.destinations()
                    && d.state == DeployState::Succeeded
                    && match to {
                        Some(r) => d.release == r,
                        None => **n < of_n && d.release != of.release,
                    }
            })
            .map(|(_, d)| d.clone())
            .next();
        let Some(target) = target else {
            return Response::Rejected {
                reason: match to {
                    Some(r) => format!(
                        "release `{r}` of {} never succeeded on {}; `fleetctl history --app {} --destination {}` lists the releases",
                        of.app, of.destination, of.app, of.destination
                    ),
                    None => format!(
                        "no earlier succeeded release of {} on {} to roll back to; `fleetctl history --app {}` lists them, or use --to RELEASE",
                        of.app, of.destination, of.app
                    ),
                },
            };
        };
        let mut spec = target.spec.clone();
        if let Some(t) = timeout_ms {
            spec.timeout_ms = t;
        }
        let reason = format!("rollback of {id} to release {}", target.release);
        self.submit(cx, spec, actor, Some(id.to_string()), &reason)
    }

    pub(super) fn cancel(&mut self, cx: &mut Ctx, id: &str, reason: &str, actor: &str, timed_out: bool) -> Response {
        let Some((n, d)) = deployment_number(id).and_then(|n| Some((n, self.deployments.get_mut(&n)?))) else {
            return Response::NotFound { what: format!("deployment `{id}`; `fleetctl list` shows the deployments") };
        };
        if d.state == DeployState::Cancelling {
            return Response::Deployment { id: id.to_string(), state: d.state };
        }
        if let Err(e) = d.cancel(cx.at_ms, reason, actor, timed_out) {
            let state = d.state;
            return Response::Rejected { reason: format!("{e}: it is already {state}") };
        }
        let state = d.state;
        self.put_deployment(cx, n);
        self.after_progress(cx, n);
        Response::Deployment { id: id.to_string(), state }
    }

    pub(super) fn step_result(&mut self, cx: &mut Ctx, id: &str, outcome: &StepOutcome) -> Response {
        let Some(n) = deployment_number(id) else {
            return Response::NotFound { what: format!("deployment `{id}`") };
        };
        // A resource error means the target changed under us: re-sync with
        // the membership before the retry runs.
        let resync = !outcome.ok && outcome.class == Some(ErrorClass::Resource);
        let live = self.deployments.get(&n).filter(|_| resync).map(|d| self.live_nodes(d.destinations()));
        let Some(d) = self.deployments.get_mut(&n) else {
            return Response::NotFound { what: format!("deployment `{id}`") };
        };
        match d.record(outcome, cx.at_ms) {
            Err(e) => Response::Stale { reason: e.to_string() },
            Ok(_) => {
                if let Some(live) = live {
                    let _ = d.resync(cx.at_ms, &live);
                }
                let state = d.state;
                self.put_deployment(cx, n);
                self.after_progress(cx, n);
                Response::Deployment { id: id.to_string(), state }
            }
        }
    }

    pub(super) fn resolve(&mut self, cx: &mut Ctx, id: &str, note: &str, actor: &str) -> Response {
        if let Err(e) = validate_text("note", note, MAX_REASON_LEN) {
            return Response::Invalid { reason: e.to_string() };
        }
        if note.trim().is_empty() {
            return Response::Invalid { reason: "a note is required: say what you checked or fixed (`--note \"...\"`)".into() };
        }
        let Some((n, d)) = deployment_number(id).and_then(|n| Some((n, self.deployments.get_mut(&n)?))) else {
            return Response::NotFound { what: format!("deployment `{id}`; `fleetctl list` shows the deployments") };
        };
        if let Err(e) = d.resolve(cx.at_ms, note, actor) {
            let state = d.state;
            return Response::Rejected {
                reason: format!("{e}: only an unresolved compensation_failed deployment can be resolved; it is {state}"),
            };
        }
        let state = d.state;
        self.put_deployment(cx, n);
        self.after_progress(cx, n);
        Response::Deployment { id: id.to_string(), state }
    }
}
