//! The replicated state machine.
//!
//! [`State::apply`] is the only way the state changes. It is deterministic
//! (time comes from the entry), validates every command, and returns, next to
//! the answer, the exact key/value [`Change`]s it made, so the coordinator can
//! persist them in the same atomic write as `last_applied` without knowing
//! anything about the domain.
//!
//! Key space (values are JSON):
//! * `lock/<destination>`  -> [`LockView`]
//! * `dedup/<request id>`  -> [`DedupEntry`]
//! * `deploy/<n>`          -> [`Deployment`] (id `d<n>`, n = log index of the submit)
//! * `queue/<destination>` -> deployment numbers in FIFO order (the head holds the lock)
//! * `node/<id>`           -> [`NodeRecord`]
//! * `dest/<name>`         -> [`Destination`]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::command::{Command, LockView, Request, Response};
use crate::deploy::{DeployState, Deployment, ErrorClass, LiveNodes, StepOutcome, StepRecord};
use crate::manifest::{selects, validate_destination, validate_label, Destination, QueuePolicy, Spec};
use crate::names::{validate_name, validate_text, MAX_REASON_LEN};
use crate::saga::plan;

/// How long a request id is remembered. A client retries for seconds, so
/// ten minutes is far beyond any retry, and bounds the table.
pub const DEDUP_TTL_MS: i64 = 10 * 60 * 1000;
/// At most this many expired ids are dropped per applied entry, so one
/// entry's apply cost stays bounded.
const DEDUP_EXPIRE_BATCH: usize = 64;

const LOCK_PREFIX: &str = "lock/";
const DEDUP_PREFIX: &str = "dedup/";
const DEPLOY_PREFIX: &str = "deploy/";
const QUEUE_PREFIX: &str = "queue/";
const NODE_PREFIX: &str = "node/";
const DEST_PREFIX: &str = "dest/";
const IDEM_PREFIX: &str = "idem/";
/// Lock holder name of a deployment.
pub const DEPLOYMENT_HOLDER_PREFIX: &str = "deployment/";

/// A registered worker node (membership is replicated; liveness is not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub registered_ms: i64,
    pub updated_ms: i64,
    /// Set when the leader presumed it dead (missed heartbeat lease);
    /// cleared when it registers again. Lost nodes get no new work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_ms: Option<i64>,
}

/// One persisted key changed by `apply`: `Some(value)` = put, `None` = delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    pub at_ms: i64,
    pub response: Response,
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("state key `{key}` has a value that does not decode: {source}")]
    BadValue { key: String, source: serde_json::Error },
    #[error("state key `{0}` is not one Fleet writes")]
    UnknownKey(String),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    locks: BTreeMap<String, LockView>,
    dedup: BTreeMap<String, DedupEntry>,
    /// (at_ms, id) of every dedup entry: the expiry order. Derived, never persisted.
    dedup_order: BTreeSet<(i64, String)>,
    deployments: BTreeMap<u64, Deployment>,
    queues: BTreeMap<String, VecDeque<u64>>,
    nodes: BTreeMap<String, NodeRecord>,
    destinations: BTreeMap<String, Destination>,
    /// `<actor>/<idempotency key>` → deployment number.
    idempotency: BTreeMap<String, u64>,
}

/// `d42` → 42.
pub fn deployment_number(id: &str) -> Option<u64> {
    id.strip_prefix('d')?.parse().ok()
}

impl State {
    /// Rebuild the state from persisted key/value pairs (a data dir or a snapshot).
    pub fn load<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, LoadError>
    where
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        let mut state = State::default();
        for (key, value) in pairs {
            let key = key.as_ref();
            let bad = |source| LoadError::BadValue { key: key.to_string(), source };
            if let Some(dest) = key.strip_prefix(LOCK_PREFIX) {
                let lock: LockView = serde_json::from_slice(value.as_ref()).map_err(bad)?;
                state.locks.insert(dest.to_string(), lock);
            } else if let Some(id) = key.strip_prefix(DEDUP_PREFIX) {
                let entry: DedupEntry = serde_json::from_slice(value.as_ref()).map_err(bad)?;
                state.dedup_order.insert((entry.at_ms, id.to_string()));
                state.dedup.insert(id.to_string(), entry);
            } else if let Some(n) = key.strip_prefix(DEPLOY_PREFIX) {
                let n: u64 = n.parse().map_err(|_| LoadError::UnknownKey(key.to_string()))?;
                state.deployments.insert(n, serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else if let Some(dest) = key.strip_prefix(QUEUE_PREFIX) {
                state.queues.insert(dest.to_string(), serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else if let Some(id) = key.strip_prefix(NODE_PREFIX) {
                state.nodes.insert(id.to_string(), serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else if let Some(k) = key.strip_prefix(IDEM_PREFIX) {
                state.idempotency.insert(k.to_string(), serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else if let Some(name) = key.strip_prefix(DEST_PREFIX) {
                state.destinations.insert(name.to_string(), serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else {
                return Err(LoadError::UnknownKey(key.to_string()));
            }
        }
        Ok(state)
    }

    /// Every persisted key/value pair, in key order (what a snapshot holds).
    pub fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.locks.len() + self.dedup.len());
        for (dest, lock) in &self.locks {
            out.push((format!("{LOCK_PREFIX}{dest}"), encode(lock)));
        }
        for (id, entry) in &self.dedup {
            out.push((format!("{DEDUP_PREFIX}{id}"), encode(entry)));
        }
        for (n, d) in &self.deployments {
            out.push((format!("{DEPLOY_PREFIX}{n}"), encode(d)));
        }
        for (dest, q) in &self.queues {
            out.push((format!("{QUEUE_PREFIX}{dest}"), encode(q)));
        }
        for (id, n) in &self.nodes {
            out.push((format!("{NODE_PREFIX}{id}"), encode(n)));
        }
        for (name, d) in &self.destinations {
            out.push((format!("{DEST_PREFIX}{name}"), encode(d)));
        }
        for (k, n) in &self.idempotency {
            out.push((format!("{IDEM_PREFIX}{k}"), encode(n)));
        }
        out
    }

    pub fn deployment(&self, id: &str) -> Option<&Deployment> {
        self.deployments.get(&deployment_number(id)?)
    }

    /// Every deployment, oldest first.
    pub fn deployments(&self) -> impl DoubleEndedIterator<Item = &Deployment> {
        self.deployments.values()
    }

    /// Deployments that have not ended.
    pub fn active_deployments(&self) -> impl Iterator<Item = &Deployment> {
        self.deployments.values().filter(|d| !d.state.is_terminal())
    }

    /// Deployment numbers waiting for (or holding) a destination, in order.
    pub fn queue(&self, destination: &str) -> Vec<String> {
        self.queues.get(destination).map(|q| q.iter().map(|n| format!("d{n}")).collect()).unwrap_or_default()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub fn node(&self, id: &str) -> Option<&NodeRecord> {
        self.nodes.get(id)
    }

    pub fn destinations(&self) -> impl Iterator<Item = &Destination> {
        self.destinations.values()
    }

    pub fn destination(&self, name: &str) -> Option<&Destination> {
        self.destinations.get(name)
    }

    /// Nodes a destination's deployments run on, sorted by id.
    pub fn nodes_for(&self, destination: &str) -> Vec<String> {
        let Some(d) = self.destinations.get(destination) else { return vec![] };
        self.nodes.values().filter(|n| n.lost_ms.is_none() && selects(&d.selector, &n.labels)).map(|n| n.id.clone()).collect()
    }

    /// The release of `app` that last succeeded on `destination`.
    pub fn current_release(&self, app: &str, destination: &str) -> Option<&Deployment> {
        self.deployments
            .values()
            .rev()
            .find(|d| d.app == app && d.destinations().iter().any(|x| x == destination) && d.state == DeployState::Succeeded)
    }

    /// Live nodes of each of `destinations`.
    pub fn live_nodes(&self, destinations: &[String]) -> LiveNodes {
        destinations.iter().map(|d| (d.clone(), self.nodes_for(d))).collect()
    }

    /// The saga of `spec` planned against the current membership: every
    /// destination in order (what a grant plans, and what a dry run shows).
    pub fn plan(&self, spec: &Spec) -> Vec<StepRecord> {
        spec.destinations().iter().flat_map(|dest| plan(spec, dest, &self.nodes_for(dest))).map(StepRecord::new).collect()
    }

    pub fn lock(&self, destination: &str) -> Option<&LockView> {
        self.locks.get(destination)
    }

    pub fn locks(&self) -> impl Iterator<Item = &LockView> {
        self.locks.values()
    }

    /// Apply one committed entry at log `index`.
    pub fn apply(&mut self, index: u64, req: &Request) -> (Response, Vec<Change>) {
        let mut changes = Vec::new();
        self.expire_dedup(req.at_ms, &mut changes);

        if let Some(id) = &req.request_id {
            if let Some(seen) = self.dedup.get(id) {
                return (seen.response.clone(), changes);
            }
        }

        let response = match &req.command {
            Command::AcquireLock { destination, holder, reason } => {
                self.acquire(index, req.at_ms, destination, holder, reason, &mut changes)
            }
            Command::ReleaseLock { destination, holder } => {
                let r = self.release(destination, holder, &mut changes);
                if matches!(r, Response::Released { .. }) {
                    self.pump(std::slice::from_ref(destination), index, req.at_ms, &mut changes);
                }
                r
            }
            Command::SubmitDeployment { spec, actor, lock_wait_ms, idempotency_key } => {
                let idem = idempotency_key.as_ref().map(|k| format!("{actor}/{k}"));
                match idem.as_ref().and_then(|k| self.idempotency.get(k)).and_then(|n| self.deployments.get(n)) {
                    Some(d) => Response::Deployment { id: d.id.clone(), state: d.state },
                    None => {
                        let r = self.submit(index, req.at_ms, (**spec).clone(), actor, None, "submitted", &mut changes);
                        if let Response::Deployment { .. } = &r {
                            if let Some(d) = self.deployments.get_mut(&index) {
                                if d.state == DeployState::Queued {
                                    d.lock_wait_until_ms = lock_wait_ms.map(|w| req.at_ms.saturating_add(w.min(i64::MAX as u64) as i64));
                                }
                            }
                            self.put_deployment(index, &mut changes);
                            if let Some(k) = idem {
                                changes.push(Change { key: format!("{IDEM_PREFIX}{k}"), value: Some(encode(&index)) });
                                self.idempotency.insert(k, index);
                            }
                        }
                        r
                    }
                }
            }
            Command::ResolveDeployment { id, note, actor } => self.resolve(index, req.at_ms, id, note, actor, &mut changes),
            Command::RollbackDeployment { id, to_release, timeout_ms, actor } => {
                self.rollback(index, req.at_ms, id, to_release.as_deref(), *timeout_ms, actor, &mut changes)
            }
            Command::CancelDeployment { id, reason, actor, timed_out } => {
                self.cancel(index, req.at_ms, id, reason, actor, *timed_out, &mut changes)
            }
            Command::StepResult { deployment, outcome } => {
                self.step_result(index, req.at_ms, deployment, outcome, &mut changes)
            }
            Command::RegisterNode { id, labels } => self.register_node(req.at_ms, id, labels, &mut changes),
            Command::NodeLost { node, why } => self.node_lost(index, req.at_ms, node, why, &mut changes),
            Command::PutDestinations { destinations } => self.put_destinations(destinations, &mut changes),
        };

        if let Some(id) = &req.request_id {
            let entry = DedupEntry { at_ms: req.at_ms, response: response.clone() };
            changes.push(Change { key: format!("{DEDUP_PREFIX}{id}"), value: Some(encode(&entry)) });
            self.dedup_order.insert((req.at_ms, id.clone()));
            self.dedup.insert(id.clone(), entry);
        }
        (response, changes)
    }

    fn acquire(
        &mut self,
        index: u64,
        at_ms: i64,
        destination: &str,
        holder: &str,
        reason: &str,
        changes: &mut Vec<Change>,
    ) -> Response {
        if let Err(e) = validate_name("destination", destination)
            .and_then(|_| validate_text("reason", reason, MAX_REASON_LEN))
        {
            return Response::Invalid { reason: e.to_string() };
        }
        if holder.is_empty() {
            return Response::Invalid { reason: "lock holder is empty".into() };
        }
        match self.locks.get(destination) {
            Some(lock) if lock.holder == holder => Response::Granted { lock: lock.clone() },
            Some(lock) => Response::Held { lock: lock.clone() },
            None => {
                let lock = LockView {
                    destination: destination.to_string(),
                    holder: holder.to_string(),
                    reason: reason.to_string(),
                    since_ms: at_ms,
                    fencing_token: index,
                };
                changes.push(Change { key: format!("{LOCK_PREFIX}{destination}"), value: Some(encode(&lock)) });
                self.locks.insert(destination.to_string(), lock.clone());
                Response::Granted { lock }
            }
        }
    }

    fn release(&mut self, destination: &str, holder: &str, changes: &mut Vec<Change>) -> Response {
        if let Err(e) = validate_name("destination", destination) {
            return Response::Invalid { reason: e.to_string() };
        }
        match self.locks.get(destination) {
            None => Response::NotHeld { destination: destination.to_string() },
            Some(lock) if lock.holder != holder => Response::NotOwner { lock: lock.clone() },
            Some(_) => {
                self.locks.remove(destination);
                changes.push(Change { key: format!("{LOCK_PREFIX}{destination}"), value: None });
                Response::Released { destination: destination.to_string() }
            }
        }
    }

    fn put_deployment(&mut self, n: u64, changes: &mut Vec<Change>) {
        if let Some(d) = self.deployments.get(&n) {
            changes.push(Change { key: format!("{DEPLOY_PREFIX}{n}"), value: Some(encode(d)) });
        }
    }

    fn put_queue(&mut self, destination: &str, changes: &mut Vec<Change>) {
        let key = format!("{QUEUE_PREFIX}{destination}");
        match self.queues.get(destination) {
            Some(q) if !q.is_empty() => changes.push(Change { key, value: Some(encode(q)) }),
            _ => {
                self.queues.remove(destination);
                changes.push(Change { key, value: None });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        index: u64,
        at_ms: i64,
        spec: Spec,
        actor: &str,
        rollback_of: Option<String>,
        reason: &str,
        changes: &mut Vec<Change>,
    ) -> Response {
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
                        if want == "command" { "it has `steps:`" } else { "it has `run:` and `health:`" }
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
        for name in &dests {
            let busy = self.locks.contains_key(name) || self.queues.get(name).is_some_and(|q| !q.is_empty());
            if self.destinations[name].queue == QueuePolicy::Reject && busy {
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
            if self.destinations[name].queue != QueuePolicy::Coalesce {
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
                            self.put_queue(q, changes);
                        }
                        self.put_deployment(n, changes);
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
            steps: vec![],
            events: vec![crate::deploy::Event {
                at_ms,
                from: None,
                to: DeployState::Queued,
                reason: reason.to_string(),
                actor: actor.to_string(),
            }],
        };
        self.deployments.insert(index, d);
        // One apply enqueues it on every destination: queue order is the
        // log order everywhere, so two stacks can never wait on each other.
        for name in &dests {
            self.queues.entry(name.clone()).or_default().push_back(index);
            self.put_queue(name, changes);
        }
        self.put_deployment(index, changes);
        self.pump(&dests, index, at_ms, changes);
        let state = self.deployments[&index].state;
        Response::Deployment { id, state }
    }

    #[allow(clippy::too_many_arguments)]
    fn rollback(
        &mut self,
        index: u64,
        at_ms: i64,
        id: &str,
        to: Option<&str>,
        timeout_ms: Option<u64>,
        actor: &str,
        changes: &mut Vec<Change>,
    ) -> Response {
        let Some(of) = self.deployment(id).cloned() else {
            return Response::NotFound { what: format!("deployment `{id}`; `fleetctl list` shows the deployments") };
        };
        let of_n = deployment_number(id).unwrap_or(0);
        let target = self
            .deployments
            .iter()
            .rev()
            .filter(|(n, d)| d.app == of.app && d.destinations() == of.destinations() && d.state == DeployState::Succeeded && {
                match to {
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
        self.submit(index, at_ms, spec, actor, Some(id.to_string()), &reason, changes)
    }

    #[allow(clippy::too_many_arguments)]
    fn cancel(
        &mut self,
        index: u64,
        at_ms: i64,
        id: &str,
        reason: &str,
        actor: &str,
        timed_out: bool,
        changes: &mut Vec<Change>,
    ) -> Response {
        let Some(n) = deployment_number(id).filter(|n| self.deployments.contains_key(n)) else {
            return Response::NotFound { what: format!("deployment `{id}`; `fleetctl list` shows the deployments") };
        };
        let d = self.deployments.get_mut(&n).expect("checked above");
        if d.state == DeployState::Cancelling {
            return Response::Deployment { id: id.to_string(), state: d.state };
        }
        if let Err(e) = d.cancel(at_ms, reason, actor, timed_out) {
            let state = d.state;
            return Response::Rejected { reason: format!("{e}: it is already {state}") };
        }
        let state = d.state;
        self.put_deployment(n, changes);
        self.after_progress(n, index, at_ms, changes);
        Response::Deployment { id: id.to_string(), state }
    }

    fn step_result(&mut self, index: u64, at_ms: i64, id: &str, outcome: &StepOutcome, changes: &mut Vec<Change>) -> Response {
        let Some(n) = deployment_number(id).filter(|n| self.deployments.contains_key(n)) else {
            return Response::NotFound { what: format!("deployment `{id}`") };
        };
        let live = (!outcome.ok && outcome.class == Some(ErrorClass::Resource)).then(|| self.live_nodes(self.deployments[&n].destinations()));
        let d = self.deployments.get_mut(&n).expect("checked above");
        match d.record(outcome, at_ms) {
            Err(e) => Response::Stale { reason: e.to_string() },
            Ok(_) => {
                // A resource error means the target changed under us:
                // re-sync with the membership before the retry runs.
                if let Some(live) = live {
                    let _ = d.resync(at_ms, &live);
                }
                let state = d.state;
                self.put_deployment(n, changes);
                self.after_progress(n, index, at_ms, changes);
                Response::Deployment { id: id.to_string(), state }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn resolve(&mut self, index: u64, at_ms: i64, id: &str, note: &str, actor: &str, changes: &mut Vec<Change>) -> Response {
        if let Err(e) = validate_text("note", note, MAX_REASON_LEN) {
            return Response::Invalid { reason: e.to_string() };
        }
        if note.trim().is_empty() {
            return Response::Invalid { reason: "a note is required: say what you checked or fixed (`--note \"...\"`)".into() };
        }
        let Some(n) = deployment_number(id).filter(|n| self.deployments.contains_key(n)) else {
            return Response::NotFound { what: format!("deployment `{id}`; `fleetctl list` shows the deployments") };
        };
        let d = self.deployments.get_mut(&n).expect("checked above");
        if let Err(e) = d.resolve(at_ms, note, actor) {
            let state = d.state;
            return Response::Rejected { reason: format!("{e}: only an unresolved compensation_failed deployment can be resolved; it is {state}") };
        }
        let state = d.state;
        self.put_deployment(n, changes);
        self.after_progress(n, index, at_ms, changes);
        Response::Deployment { id: id.to_string(), state }
    }

    /// A deployment moved: when it ended, free its destination (unless a
    /// human must look first) and start the next in line.
    fn after_progress(&mut self, n: u64, index: u64, at_ms: i64, changes: &mut Vec<Change>) {
        let d = &self.deployments[&n];
        if !d.state.is_terminal() {
            return;
        }
        let dests = d.destinations().to_vec();
        let keeps_lock = d.keeps_destination();
        if keeps_lock {
            return;
        }
        let holder = format!("{DEPLOYMENT_HOLDER_PREFIX}d{n}");
        for dest in &dests {
            if let Some(q) = self.queues.get_mut(dest) {
                q.retain(|x| *x != n);
            }
            self.put_queue(dest, changes);
            if self.locks.get(dest).is_some_and(|l| l.holder == holder) {
                self.locks.remove(dest);
                changes.push(Change { key: format!("{LOCK_PREFIX}{dest}"), value: None });
            }
        }
        self.pump(&dests, index, at_ms, changes);
    }

    /// Start what can start now on `destinations`: a queue head whose
    /// every destination is free and has it at the head too is granted all
    /// its locks in this one apply (fencing token = this entry's index).
    fn pump(&mut self, destinations: &[String], index: u64, at_ms: i64, changes: &mut Vec<Change>) {
        let mut todo: Vec<String> = destinations.to_vec();
        while let Some(destination) = todo.pop() {
            if self.locks.contains_key(&destination) {
                continue;
            }
            let Some(&n) = self.queues.get(&destination).and_then(|q| q.front()) else { continue };
            let Some(d) = self.deployments.get(&n) else {
                self.queues.get_mut(&destination).map(|q| q.pop_front());
                self.put_queue(&destination, changes);
                todo.push(destination);
                continue;
            };
            if d.state != DeployState::Queued {
                // Defensive: only queued deployments wait in a queue.
                self.queues.get_mut(&destination).map(|q| q.pop_front());
                self.put_queue(&destination, changes);
                todo.push(destination);
                continue;
            }
            let dests = d.destinations().to_vec();
            let ready = dests.iter().all(|x| !self.locks.contains_key(x) && self.queues.get(x).and_then(|q| q.front()) == Some(&n));
            if !ready {
                // It waits for another of its destinations; that one's
                // release pumps it.
                continue;
            }
            let steps = self.plan(&d.spec);
            let previous = self.current_release(&d.app, &d.destination).map(|p| p.release.clone());
            let bare: Vec<String> = dests.iter().filter(|x| self.nodes_for(x).is_empty()).cloned().collect();
            let d = self.deployments.get_mut(&n).expect("looked up above");
            d.token = Some(index);
            d.previous_release = previous;
            d.steps = steps;
            let node_count: BTreeSet<&str> = d.steps.iter().map(|s| s.plan.node.as_str()).collect();
            let what = if dests.len() > 1 { format!("{} destination locks granted in one step", dests.len()) } else { "destination lock granted".into() };
            let reason = format!("{what} (fencing token {index}) on {} node(s)", node_count.len());
            let _ = d.transition(DeployState::Running, at_ms, reason, "coordinator");
            if !bare.is_empty() {
                let why = format!("no worker node matches destination `{}` any more; start one, then deploy again", bare.join("`, `"));
                let _ = d.transition(DeployState::Compensating, at_ms, why, "coordinator");
                let _ = d.settle(at_ms, "coordinator");
            }
            let ended = d.state.is_terminal();
            let lock = LockView {
                destination: String::new(),
                holder: format!("{DEPLOYMENT_HOLDER_PREFIX}{}", d.id),
                reason: format!("deploy {}@{}", d.app, d.release),
                since_ms: at_ms,
                fencing_token: index,
            };
            self.put_deployment(n, changes);
            for x in &dests {
                if ended {
                    self.queues.get_mut(x).map(|q| q.pop_front());
                    self.put_queue(x, changes);
                    todo.push(x.clone());
                } else {
                    let lock = LockView { destination: x.clone(), ..lock.clone() };
                    changes.push(Change { key: format!("{LOCK_PREFIX}{x}"), value: Some(encode(&lock)) });
                    self.locks.insert(x.clone(), lock);
                }
            }
        }
    }

    fn node_lost(&mut self, index: u64, at_ms: i64, node: &str, why: &str, changes: &mut Vec<Change>) -> Response {
        let Some(rec) = self.nodes.get_mut(node) else {
            return Response::NotFound { what: format!("node `{node}`") };
        };
        if rec.lost_ms.is_none() {
            rec.lost_ms = Some(at_ms);
            let rec = rec.clone();
            changes.push(Change { key: format!("{NODE_PREFIX}{node}"), value: Some(encode(&rec)) });
        }
        let active: Vec<u64> = self.deployments.iter().filter(|(_, d)| !d.state.is_terminal()).map(|(n, _)| *n).collect();
        for n in active {
            let live = self.live_nodes(self.deployments[&n].destinations());
            let d = self.deployments.get_mut(&n).expect("listed above");
            if let Ok(true) = d.node_lost(node, at_ms, why, &live) {
                self.put_deployment(n, changes);
                self.after_progress(n, index, at_ms, changes);
            }
        }
        Response::Done
    }

    fn register_node(&mut self, at_ms: i64, id: &str, labels: &BTreeMap<String, String>, changes: &mut Vec<Change>) -> Response {
        if let Err(e) = validate_name("node id", id) {
            return Response::Invalid { reason: e.to_string() };
        }
        for (k, v) in labels {
            if let Err(reason) = validate_label(k, v) {
                return Response::Invalid { reason };
            }
        }
        let registered_ms = self.nodes.get(id).map(|n| n.registered_ms).unwrap_or(at_ms);
        if self.nodes.get(id).is_some_and(|n| &n.labels == labels && n.lost_ms.is_none()) {
            return Response::Done;
        }
        let rec = NodeRecord { id: id.to_string(), labels: labels.clone(), registered_ms, updated_ms: at_ms, lost_ms: None };
        changes.push(Change { key: format!("{NODE_PREFIX}{id}"), value: Some(encode(&rec)) });
        self.nodes.insert(id.to_string(), rec);
        Response::Done
    }

    fn put_destinations(&mut self, list: &[Destination], changes: &mut Vec<Change>) -> Response {
        for d in list {
            if let Err((field, reason)) = validate_destination(d) {
                return Response::Invalid { reason: format!("destination `{}`: {field}: {reason}", d.name) };
            }
        }
        for d in list {
            changes.push(Change { key: format!("{DEST_PREFIX}{}", d.name), value: Some(encode(d)) });
            self.destinations.insert(d.name.clone(), d.clone());
        }
        Response::Done
    }

    fn expire_dedup(&mut self, now_ms: i64, changes: &mut Vec<Change>) {
        for _ in 0..DEDUP_EXPIRE_BATCH {
            let Some((at, id)) = self.dedup_order.first().cloned() else { break };
            if now_ms - at < DEDUP_TTL_MS {
                break;
            }
            self.dedup_order.pop_first();
            self.dedup.remove(&id);
            changes.push(Change { key: format!("{DEDUP_PREFIX}{id}"), value: None });
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state values are plain structs; serializing them cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: Option<&str>, at_ms: i64, command: Command) -> Request {
        Request { request_id: id.map(str::to_string), at_ms, command }
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

    #[test]
    fn request_ids_apply_once() {
        let mut s = State::default();
        let (first, _) = s.apply(1, &req(Some("c1-1"), 0, acquire("web", "alice")));
        let (_, _) = s.apply(2, &req(Some("c1-2"), 0, release("web", "alice")));
        // The retried acquire must not re-grant the lock that was released since.
        let (again, changes) = s.apply(3, &req(Some("c1-1"), 0, acquire("web", "alice")));
        assert_eq!(first, again);
        assert!(changes.is_empty());
        assert!(s.lock("web").is_none());
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
                    })
                    .collect();
                w.apply(Command::PutDestinations { destinations });
                w
            }
            fn apply(&mut self, c: Command) -> Response {
                self.index += 1;
                let (r, changes) = self.s.apply(self.index, &req(None, self.index as i64, c));
                for ch in changes {
                    match ch.value {
                        Some(v) => self.kv.insert(ch.key, v),
                        None => self.kv.remove(&ch.key),
                    };
                }
                r
            }
            fn submit(&mut self, app: &str, release: &str, dest: &str) -> Response {
                self.apply(Command::SubmitDeployment { spec: Box::new(spec(app, release, dest)), actor: "op".into(), lock_wait_ms: None, idempotency_key: None })
            }
            fn state_of(&self, id: &str) -> DeployState {
                self.s.deployment(id).unwrap().state
            }
            /// Complete every step of the running deployment `id`.
            fn finish(&mut self, id: &str) {
                loop {
                    let d = self.s.deployment(id).unwrap().clone();
                    let Some(w) = d.next() else { break };
                    let outcome = StepOutcome {
                        step: w.step,
                        undo: w.undo,
                        attempt: w.attempt,
                        token: d.token.unwrap(),
                        epoch: d.epoch,
                        ok: true,
                        output: Some("{}".into()),
                        error: None,
                        class: None,
                        started_ms: 0,
                        finished_ms: 0,
                        node: "n1".into(),
                    };
                    self.apply(Command::StepResult { deployment: id.into(), outcome });
                }
            }
        }

        fn id_of(r: &Response) -> String {
            match r {
                Response::Deployment { id, .. } => id.clone(),
                other => panic!("expected a deployment, got {other:?}"),
            }
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

        fn stack(app: &str, release: &str, dests: &[&str]) -> Command {
            let text = format!(
                "app: {app}\nrelease: {release}\ndestinations: [{}]\nrun: [srv]\nhealth: {{ tcp: true }}\n",
                dests.join(", ")
            );
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
    }
}
