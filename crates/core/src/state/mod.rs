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
//! * `deploy/<n>`          -> [`Deployment`] without its step records (id `d<n>`, n = sequence number of the submit)
//! * `deploy/<n>/step/<i>` -> [`StepRecord`] `i` of deployment `n`, each under its own key so a
//!   step result writes the records it changed, not the whole saga (data written before
//!   held them inline in `deploy/<n>`: still read, rewritten in this layout on the next change)
//!   (ended deployments beyond the newest [`KEEP_STEP_RECORDS`] lose their records; beyond
//!   [`KEEP_DEPLOYMENTS`] that are no current release, they leave the history)
//! * `queue/<destination>` -> deployment numbers in FIFO order (the head holds the lock)
//! * `node/<id>`           -> [`NodeRecord`]
//! * `dest/<name>`         -> [`Destination`]
//! * `idem/<actor>/<key>`  -> deployment number (idempotency keys)
//! * `server/<destination>/<id>` -> [`crate::sync::ServerRecord`] (what the destination's sync task found)
//! * `token/<name>`        -> [`TokenRecord`] (API tokens, their secrets' SHA-256 only)
//! * `audit/<seq>`         -> [`AuditRecord`] (operator actions, the newest [`MAX_AUDIT_RECORDS`])
//! * `seq`                 -> the last request's sequence number (see [`State::apply`])
//!
//! Commands are applied by concern, one submodule each: `locks` (manual
//! locks, destination queues and grants), `deployments` (submit, rollback,
//! cancel, resolve, step results) and `nodes` (membership, destinations).
//! Each works on one `Ctx`: the request's sequence number and time, and the
//! changes made so far.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::command::{Command, LockView, Proposal, Request, Response};
use crate::deploy::{Compaction, DeployState, Deployment, LiveNodes, NodeWaits, StepRecord};
use crate::manifest::{selects, Destination, Spec};
use crate::saga::plan;

mod access;
mod deployments;
mod locks;
mod nodes;
mod promote;
mod servers;

pub use access::{AuditRecord, TokenRecord, MAX_AUDIT_RECORDS};

/// How long a request id is remembered. A client retries for seconds, so
/// ten minutes is far beyond any retry, and bounds the table.
pub const DEDUP_TTL_MS: i64 = 10 * 60 * 1000;
/// At most this many expired ids are dropped per applied entry, so one
/// entry's apply cost stays bounded.
const DEDUP_EXPIRE_BATCH: usize = 64;
/// Ended deployments keep their step records while they are among the
/// newest this many; older ones are compacted into the history: their
/// records are dropped (the bulk of a deployment: one per step, each with
/// its output and errors), their header, spec and events stay. Bounds
/// what every coordinator holds for the deployments of months past.
pub const KEEP_STEP_RECORDS: usize = 1_000;
/// The history keeps this many ended deployments besides the current
/// releases (the last succeeded deployment of each app on each
/// destination, kept whatever their age: rollbacks and catch-ups start
/// from them); older ones are dropped, with their idempotency keys.
pub const KEEP_DEPLOYMENTS: usize = 10_000;
/// At most this many deployments are compacted (and as many dropped) per applied request, so
/// one request's apply cost stays bounded (a data dir from before
/// compaction catches up over its next requests).
const COMPACT_BATCH: usize = 16;

const LOCK_PREFIX: &str = "lock/";
const DEDUP_PREFIX: &str = "dedup/";
const DEPLOY_PREFIX: &str = "deploy/";
const QUEUE_PREFIX: &str = "queue/";
const NODE_PREFIX: &str = "node/";
const DEST_PREFIX: &str = "dest/";
const IDEM_PREFIX: &str = "idem/";
const SERVER_PREFIX: &str = "server/";
const TOKEN_PREFIX: &str = "token/";
const AUDIT_PREFIX: &str = "audit/";
const SEQ_KEY: &str = "seq";
/// Between a deployment's number and its step's: `deploy/<n>/step/<i>`.
const STEP_INFIX: &str = "/step/";

fn step_key(n: u64, i: usize) -> String {
    format!("{DEPLOY_PREFIX}{n}{STEP_INFIX}{i}")
}
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
    /// The kind of command the id was used for (`Command::action`'s name):
    /// a retry repeats it, a different command under the same id is a
    /// client's mistake and must not get the other command's answer.
    /// Empty in entries written before it was recorded (any kind matches).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action: String,
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("state key `{key}` has a value that does not decode: {source}")]
    BadValue { key: String, source: serde_json::Error },
    #[error("state key `{0}` is not one Fleet writes")]
    UnknownKey(String),
    #[error("the stored step records of deployment d{0} are inconsistent: {1}")]
    Steps(u64, String),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    locks: BTreeMap<String, LockView>,
    dedup: BTreeMap<String, DedupEntry>,
    /// (at_ms, id) of every dedup entry: the expiry order. Derived, never persisted.
    dedup_order: BTreeSet<(i64, String)>,
    deployments: BTreeMap<u64, Deployment>,
    /// Numbers of the deployments not yet ended: what the leader's
    /// scheduler walks. Derived, never persisted.
    active: BTreeSet<u64>,
    /// The step records of each active deployment as they were last
    /// persisted under `deploy/<n>/step/<i>`, so a change writes only the
    /// records that differ. Missing (a deployment that ended, or one read
    /// from the older inline layout): every record is written. Derived,
    /// never persisted.
    persisted_steps: BTreeMap<u64, Vec<StepRecord>>,
    /// The header (everything but the step records) of each active
    /// deployment as last persisted under `deploy/<n>`, so a change that
    /// leaves it as it was (most step results) does not encode and write
    /// it again. Missing: it is written. Derived, never persisted.
    persisted_headers: BTreeMap<u64, Deployment>,
    /// Numbers of the ended deployments (no longer holding their
    /// destinations) that still have their step records, oldest first:
    /// beyond [`KEEP_STEP_RECORDS`] the oldest are compacted. Derived,
    /// never persisted.
    with_records: BTreeSet<u64>,
    /// Destination → app → the number of the deployment that last
    /// succeeded there (the current release). Derived, never persisted.
    current: BTreeMap<String, BTreeMap<String, u64>>,
    /// Numbers of the ended deployments that are no current release,
    /// oldest first: beyond [`KEEP_DEPLOYMENTS`] the oldest leave the
    /// history. Derived, never persisted.
    droppable: BTreeSet<u64>,
    /// Deployment number → the idempotency keys that name it (the
    /// reverse of `idempotency`, so a deployment that leaves the history
    /// takes its keys along). Derived, never persisted.
    idempotency_of: BTreeMap<u64, Vec<String>>,
    queues: BTreeMap<String, VecDeque<u64>>,
    nodes: BTreeMap<String, NodeRecord>,
    destinations: BTreeMap<String, Destination>,
    /// `<actor>/<idempotency key>` → deployment number.
    idempotency: BTreeMap<String, u64>,
    /// Servers per destination, by id.
    servers: BTreeMap<String, BTreeMap<String, crate::sync::ServerRecord>>,
    /// API tokens by name.
    tokens: BTreeMap<String, TokenRecord>,
    /// Token SHA-256 → name. Derived, never persisted.
    token_hashes: BTreeMap<String, String>,
    /// Audit records by sequence number.
    audit: BTreeMap<u64, AuditRecord>,
    /// The sequence number of the last applied request.
    last_seq: u64,
}

/// What a changed state key is about, as a reader of views needs to know
/// (the change journal behind `/api/events` recomputes only those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touched<'a> {
    /// Deployment `d<n>`.
    Deployment(u64),
    /// Destination `name`: its definition, lock or queue.
    Destination(&'a str),
    /// Node membership: which nodes a destination selects may change.
    Nodes,
    /// Nothing a destination or deployment view shows.
    Other,
}

/// Classify one key of a [`Change`].
pub fn touched(key: &str) -> Touched<'_> {
    if let Some(rest) = key.strip_prefix(DEPLOY_PREFIX) {
        let n = rest.split_once(STEP_INFIX).map_or(rest, |(n, _)| n);
        return n.parse().map(Touched::Deployment).unwrap_or(Touched::Other);
    }
    for prefix in [LOCK_PREFIX, QUEUE_PREFIX, DEST_PREFIX] {
        if let Some(name) = key.strip_prefix(prefix) {
            return Touched::Destination(name);
        }
    }
    if key.starts_with(NODE_PREFIX) {
        return Touched::Nodes;
    }
    Touched::Other
}

/// The destination whose definition `key` holds, if it holds one (not
/// its lock, queue or servers): the leader syncs a destination at once
/// when its definition is applied, changed or removed.
pub fn defined_destination(key: &str) -> Option<&str> {
    key.strip_prefix(DEST_PREFIX)
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
        let mut steps: BTreeMap<u64, BTreeMap<usize, StepRecord>> = BTreeMap::new();
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
            } else if let Some(rest) = key.strip_prefix(DEPLOY_PREFIX) {
                let unknown = || LoadError::UnknownKey(key.to_string());
                if let Some((n, i)) = rest.split_once(STEP_INFIX) {
                    let (n, i): (u64, usize) = (n.parse().map_err(|_| unknown())?, i.parse().map_err(|_| unknown())?);
                    steps.entry(n).or_default().insert(i, serde_json::from_slice(value.as_ref()).map_err(bad)?);
                } else {
                    let n: u64 = rest.parse().map_err(|_| unknown())?;
                    state.deployments.insert(n, serde_json::from_slice(value.as_ref()).map_err(bad)?);
                }
            } else if let Some(dest) = key.strip_prefix(QUEUE_PREFIX) {
                state.queues.insert(dest.to_string(), serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else if let Some(id) = key.strip_prefix(NODE_PREFIX) {
                state.nodes.insert(id.to_string(), serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else if let Some(k) = key.strip_prefix(IDEM_PREFIX) {
                state.idempotency.insert(k.to_string(), serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else if let Some(name) = key.strip_prefix(DEST_PREFIX) {
                state.destinations.insert(name.to_string(), serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else if let Some(rest) = key.strip_prefix(SERVER_PREFIX) {
                let (dest, id) = rest.split_once('/').ok_or_else(|| LoadError::UnknownKey(key.to_string()))?;
                let rec = serde_json::from_slice(value.as_ref()).map_err(bad)?;
                state.servers.entry(dest.to_string()).or_default().insert(id.to_string(), rec);
            } else if let Some(name) = key.strip_prefix(TOKEN_PREFIX) {
                let rec: TokenRecord = serde_json::from_slice(value.as_ref()).map_err(bad)?;
                state.token_hashes.insert(rec.sha256.clone(), name.to_string());
                state.tokens.insert(name.to_string(), rec);
            } else if key == SEQ_KEY {
                state.last_seq = serde_json::from_slice(value.as_ref()).map_err(bad)?;
            } else if let Some(n) = key.strip_prefix(AUDIT_PREFIX) {
                let n: u64 = n.parse().map_err(|_| LoadError::UnknownKey(key.to_string()))?;
                state.audit.insert(n, serde_json::from_slice(value.as_ref()).map_err(bad)?);
            } else {
                return Err(LoadError::UnknownKey(key.to_string()));
            }
        }
        for (n, records) in steps {
            let d = state
                .deployments
                .get_mut(&n)
                .ok_or_else(|| LoadError::Steps(n, "step records of a deployment that is not stored".into()))?;
            if !d.steps.is_empty() {
                return Err(LoadError::Steps(n, "step records both inline and under their own keys".into()));
            }
            if records.keys().copied().ne(0..records.len()) {
                return Err(LoadError::Steps(
                    n,
                    format!("records {:?} are not numbered 0..{}", records.keys().collect::<Vec<_>>(), records.len()),
                ));
            }
            d.steps = records.into_values().collect();
            if !d.state.is_terminal() {
                state.persisted_steps.insert(n, d.steps.clone());
            }
        }
        for (k, n) in &state.idempotency {
            state.idempotency_of.entry(*n).or_default().push(k.clone());
        }
        let numbers: Vec<u64> = state.deployments.keys().copied().collect();
        for n in numbers {
            state.index_ended(n);
        }
        for (n, d) in &state.deployments {
            if d.state.is_terminal() {
                continue;
            }
            state.active.insert(*n);
            // A deployment without records is stored the same way in both
            // layouts: nothing of it needs writing again.
            if d.steps.is_empty() {
                state.persisted_steps.entry(*n).or_default();
            }
            // Its header is known to be stored as it is only in the layout
            // of records under their own keys (an inline header holds the
            // records too, so it is written again on the next change).
            if state.persisted_steps.contains_key(n) {
                state.persisted_headers.insert(*n, d.without_steps());
            }
        }
        state.share_reasons();
        Ok(state)
    }

    /// Make each dedup record that answered a grant of a lock still held
    /// share that lock's reason instead of a copy (as `apply` leaves them;
    /// stored, the two are written apart and decode as two strings).
    fn share_reasons(&mut self) {
        for entry in self.dedup.values_mut() {
            if let Response::Granted { lock: answered } = &mut entry.response {
                if let Some(held) = self.locks.get(&answered.destination) {
                    if held.fencing_token == answered.fencing_token && held.reason == answered.reason {
                        answered.reason = held.reason.clone();
                    }
                }
            }
        }
    }

    /// Every persisted key/value pair, in key order (what a snapshot holds).
    pub fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.locks.len() + self.dedup.len());
        self.for_each_pair(|k, v| out.push((k.to_string(), v.to_vec())));
        out
    }

    /// [`dump`](Self::dump)'s pairs, in the same order, handed to `each`
    /// one at a time: a key and its encoded value, both reused for the
    /// next pair.
    fn for_each_pair(&self, each: impl FnMut(&str, &[u8])) {
        let mut p = Pairs { each, key: String::new(), value: Vec::new() };
        for (dest, lock) in &self.locks {
            p.put(format_args!("{LOCK_PREFIX}{dest}"), lock);
        }
        for (id, entry) in &self.dedup {
            p.put(format_args!("{DEDUP_PREFIX}{id}"), entry);
        }
        for (n, d) in &self.deployments {
            p.put(format_args!("{DEPLOY_PREFIX}{n}"), &d.without_steps());
            for (i, s) in d.steps.iter().enumerate() {
                p.put_key(step_key(*n, i), s);
            }
        }
        for (dest, q) in &self.queues {
            p.put(format_args!("{QUEUE_PREFIX}{dest}"), q);
        }
        for (id, n) in &self.nodes {
            p.put(format_args!("{NODE_PREFIX}{id}"), n);
        }
        for (name, d) in &self.destinations {
            p.put(format_args!("{DEST_PREFIX}{name}"), d);
        }
        for (k, n) in &self.idempotency {
            p.put(format_args!("{IDEM_PREFIX}{k}"), n);
        }
        for (dest, servers) in &self.servers {
            for (id, rec) in servers {
                p.put(format_args!("{SERVER_PREFIX}{dest}/{id}"), rec);
            }
        }
        for (name, rec) in &self.tokens {
            p.put(format_args!("{TOKEN_PREFIX}{name}"), rec);
        }
        for (n, rec) in &self.audit {
            p.put(format_args!("{AUDIT_PREFIX}{n}"), rec);
        }
        if self.last_seq > 0 {
            p.put(format_args!("{SEQ_KEY}"), &self.last_seq);
        }
    }

    pub fn deployment(&self, id: &str) -> Option<&Deployment> {
        self.deployments.get(&deployment_number(id)?)
    }

    /// Was deployment `id` submitted here and has since left the history
    /// (see [`KEEP_DEPLOYMENTS`])? Deployment numbers are sequence
    /// numbers: one at or below the last applied was issued.
    pub fn left_history(&self, id: &str) -> bool {
        deployment_number(id).is_some_and(|n| n <= self.last_seq && !self.deployments.contains_key(&n))
    }

    /// Every deployment, oldest first.
    pub fn deployments(&self) -> impl DoubleEndedIterator<Item = &Deployment> {
        self.deployments.values()
    }

    /// Deployments numbered below `before` (all when `None`), newest first:
    /// one page of a listing starts where the last one ended.
    pub fn deployments_before(&self, before: Option<u64>) -> impl Iterator<Item = &Deployment> {
        self.deployments.range(..before.unwrap_or(u64::MAX)).rev().map(|(_, d)| d)
    }

    /// Deployments that have not ended.
    pub fn active_deployments(&self) -> impl Iterator<Item = &Deployment> {
        self.active.iter().filter_map(|n| self.deployments.get(n))
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

    /// The deployment of `app` that last succeeded on `destination` (the
    /// highest-numbered one).
    pub fn current_release(&self, app: &str, destination: &str) -> Option<&Deployment> {
        self.deployments.get(self.current.get(destination)?.get(app)?)
    }

    /// Release that last succeeded on `destination`, per app.
    pub fn current_releases(&self, destination: &str) -> BTreeMap<String, String> {
        let Some(apps) = self.current.get(destination) else { return BTreeMap::new() };
        apps.iter().filter_map(|(app, n)| Some((app.clone(), self.deployments.get(n)?.release.clone()))).collect()
    }

    /// Keep the derived indexes of ended deployments true for deployment
    /// `n` as it is now: whether it waits for compaction, whether it is a
    /// current release (and which one it replaced), and whether it may
    /// leave the history. Every change to a deployment passes here
    /// (through [`State::put_deployment`] or [`State::load`], oldest
    /// first).
    fn index_ended(&mut self, n: u64) {
        let Some(d) = self.deployments.get(&n) else { return };
        let settled = !d.keeps_destination();
        if settled && !d.steps.is_empty() {
            self.with_records.insert(n);
        } else {
            self.with_records.remove(&n);
        }
        let mut replaced = Vec::new();
        if d.state == DeployState::Succeeded {
            for dest in d.destinations() {
                let last = self.current.entry(dest.clone()).or_default().entry(d.app.clone()).or_insert(n);
                if *last < n {
                    replaced.push(std::mem::replace(last, n));
                }
            }
        }
        for m in replaced.into_iter().chain([n]) {
            let ended = self.deployments.get(&m).is_some_and(|d| !d.keeps_destination());
            if ended && !self.is_current(m) {
                self.droppable.insert(m);
            } else {
                self.droppable.remove(&m);
            }
        }
    }

    /// Is deployment `n` the current release of its app on one of its
    /// destinations?
    fn is_current(&self, n: u64) -> bool {
        let Some(d) = self.deployments.get(&n) else { return false };
        d.state == DeployState::Succeeded
            && d.destinations().iter().any(|dest| self.current.get(dest).and_then(|apps| apps.get(&d.app)) == Some(&n))
    }

    /// Trim the history, a bounded batch per request: compact the oldest
    /// ended deployments beyond [`KEEP_STEP_RECORDS`] (delete their step
    /// records, keep the rest, see [`Compaction`]), and drop the oldest
    /// beyond [`KEEP_DEPLOYMENTS`] that are no current release.
    fn trim_history(&mut self, cx: &mut Ctx) {
        for _ in 0..COMPACT_BATCH {
            if self.droppable.len() <= KEEP_DEPLOYMENTS {
                break;
            }
            let Some(n) = self.droppable.pop_first() else { break };
            let Some(d) = self.deployments.remove(&n) else { continue };
            self.with_records.remove(&n);
            for i in 0..d.steps.len() {
                cx.delete(step_key(n, i));
            }
            cx.delete(format!("{DEPLOY_PREFIX}{n}"));
            for k in self.idempotency_of.remove(&n).unwrap_or_default() {
                // A key reused after its deployment left names another.
                if self.idempotency.get(&k) == Some(&n) {
                    self.idempotency.remove(&k);
                    cx.delete(format!("{IDEM_PREFIX}{k}"));
                }
            }
        }
        for _ in 0..COMPACT_BATCH {
            if self.with_records.len() <= KEEP_STEP_RECORDS {
                break;
            }
            let Some(n) = self.with_records.pop_first() else { break };
            let Some(d) = self.deployments.get_mut(&n) else { continue };
            let steps = std::mem::take(&mut d.steps);
            for i in 0..steps.len() {
                cx.delete(step_key(n, i));
            }
            d.compacted = Some(Compaction { at_ms: cx.at_ms, steps: steps.len() });
            cx.put(format!("{DEPLOY_PREFIX}{n}"), &*d);
        }
    }

    /// Live nodes of each of `destinations`.
    pub fn live_nodes(&self, destinations: &[String]) -> LiveNodes {
        destinations.iter().map(|d| (d.clone(), self.nodes_for(d))).collect()
    }

    /// The `node_wait` of each of `destinations`.
    pub fn node_waits(&self, destinations: &[String]) -> NodeWaits {
        destinations.iter().filter_map(|d| Some((d.clone(), self.destinations.get(d)?.node_wait_ms))).collect()
    }

    /// The saga of `spec` planned against the current membership: every
    /// destination in order (what a grant plans, and what a dry run shows).
    pub fn plan(&self, spec: &Spec) -> Vec<StepRecord> {
        spec.destinations().iter().flat_map(|dest| plan(spec, dest, &self.nodes_for(dest))).map(StepRecord::new).collect()
    }

    /// The saga of deployment `d` as its grant plans it: [`State::plan`],
    /// narrowed to its `targets` when it has some (their own steps only,
    /// no hooks).
    pub fn plan_for(&self, d: &Deployment) -> Vec<StepRecord> {
        let mut steps = self.plan(&d.spec);
        if !d.targets.is_empty() {
            steps.retain(|s| d.targets.contains(&s.plan.node) && !matches!(s.plan.action, crate::saga::StepAction::Command { .. }));
        }
        steps
    }

    pub fn lock(&self, destination: &str) -> Option<&LockView> {
        self.locks.get(destination)
    }

    pub fn locks(&self) -> impl Iterator<Item = &LockView> {
        self.locks.values()
    }

    /// Why `command` may not be sent under request id `id`: the id was used
    /// for a different kind of command (a retry repeats its request; a new
    /// request needs a new id). Coordinators ask before proposing, and the
    /// state machine again when it applies (a race between the two).
    pub fn request_id_conflict(&self, id: &str, command: &Command) -> Option<String> {
        let seen = self.dedup.get(id)?;
        let action = command.action().0;
        (!seen.action.is_empty() && seen.action != action).then(|| {
            format!(
                "request id `{id}` was already used for a `{}` request, not `{action}`: a retry repeats the same request; give a new request a new id",
                seen.action
            )
        })
    }

    /// Apply one committed entry at log `index`: each of its requests in
    /// order, one answer each, and every key they changed.
    pub fn apply_entry(&mut self, index: u64, proposal: &Proposal) -> (Vec<Response>, Vec<Change>) {
        let mut changes = Vec::new();
        let responses = proposal
            .0
            .iter()
            .map(|req| {
                let (response, mut c) = self.apply(index, req);
                changes.append(&mut c);
                response
            })
            .collect();
        (responses, changes)
    }

    /// Apply one committed request of the entry at log `index`.
    ///
    /// Every request gets a sequence number: its entry's log index, or one
    /// more than the previous request's when that is larger (the second
    /// and later requests of a batched entry). Sequence numbers strictly
    /// grow from one request to the next on every replica, across restarts
    /// and snapshots (the last one is persisted with the changes), and a
    /// log index is never below an earlier request's number; they are the
    /// deployment numbers (`d<seq>`), the fencing tokens and the audit
    /// keys. Without batching, a request's number is its log index.
    pub fn apply(&mut self, index: u64, req: &Request) -> (Response, Vec<Change>) {
        let seq = index.max(self.last_seq + 1);
        self.last_seq = seq;
        let mut cx = Ctx { seq, at_ms: req.at_ms, changes: Vec::new() };
        cx.put(SEQ_KEY.to_string(), &seq);
        self.expire_dedup(&mut cx);

        if let Some(id) = &req.request_id {
            if let Some(reason) = self.request_id_conflict(id, &req.command) {
                return (Response::Invalid { reason }, cx.changes);
            }
            if let Some(seen) = self.dedup.get(id) {
                return (seen.response.clone(), cx.changes);
            }
        }

        let response = match &req.command {
            Command::AcquireLock { destination, holder, reason } => self.acquire(&mut cx, destination, holder, reason),
            Command::ReleaseLock { destination, holder } => self.release(&mut cx, destination, holder),
            Command::SubmitDeployment { spec, actor, lock_wait_ms, idempotency_key } => {
                self.submit_command(&mut cx, spec, actor, *lock_wait_ms, idempotency_key.as_deref())
            }
            Command::ResolveDeployment { id, note, actor } => self.resolve(&mut cx, id, note, actor),
            Command::RollbackDeployment { id, to_release, timeout_ms, actor } => {
                self.rollback(&mut cx, id, to_release.as_deref(), *timeout_ms, actor)
            }
            Command::CancelDeployment { id, reason, actor, timed_out } => self.cancel(&mut cx, id, reason, actor, *timed_out),
            Command::StepResult { deployment, outcome } => self.step_result(&mut cx, deployment, outcome),
            Command::RegisterNode { id, labels } => self.register_node(&mut cx, id, labels),
            Command::NodeLost { node, why } => self.node_lost(&mut cx, node, why),
            Command::NodeWaitExpired { deployment } => self.node_wait_expired(&mut cx, deployment),
            Command::PutDestinations { destinations } => self.put_destinations(&mut cx, destinations),
            Command::SyncServers { destination, upserts, removals } => self.sync_servers(&mut cx, destination, upserts, removals),
            Command::RemoveDestination { name } => self.remove_destination(&mut cx, name),
            Command::PromoteDeployment { id, actor } => self.promote(&mut cx, id, actor),
            Command::CreateToken { name, role, sha256, expires_ms, actor } => {
                self.create_token(&mut cx, name, *role, sha256, *expires_ms, actor)
            }
            Command::RevokeToken { name } => self.revoke_token(&mut cx, name),
            Command::RecordAction { .. } => Response::Done,
        };
        if let Some(origin) = &req.origin {
            self.record_audit(&mut cx, origin, &req.command, &response);
        }
        self.trim_history(&mut cx);

        if let Some(id) = &req.request_id {
            // Named only for entries with an id: `action()` formats its target.
            let entry = DedupEntry { at_ms: req.at_ms, response: response.clone(), action: req.command.action().0.to_string() };
            cx.put(format!("{DEDUP_PREFIX}{id}"), &entry);
            self.dedup_order.insert((req.at_ms, id.clone()));
            self.dedup.insert(id.clone(), entry);
        }
        (response, cx.changes)
    }

    /// Persist deployment `n`: its header when it changed, and the step
    /// records that differ from what was persisted last (keeps the index
    /// of active ones true: every change to a deployment goes through
    /// here).
    fn put_deployment(&mut self, cx: &mut Ctx, n: u64) {
        let Some(d) = self.deployments.get_mut(&n) else { return };
        // While its records are out, `d` is the header.
        let steps = std::mem::take(&mut d.steps);
        let changed = d.take_changed();
        let header_changed = self.persisted_headers.get(&n) != Some(&*d);
        // No record remembered (an ended deployment, or one read from the
        // inline layout) is the same as none persisted: every record is
        // written.
        let remembered = self.persisted_steps.remove(&n);
        // Only the records noted as changed can differ from what is
        // persisted, unless there is no such memory or the saga's length
        // changed: then every record is compared.
        let every = changed.is_every() || remembered.as_ref().is_none_or(|p| p.len() != steps.len());
        let mut persisted = remembered.unwrap_or_default();
        // (Records are planned once, at the grant, and never dropped; a
        // saga that shrank would leave none behind either.)
        for i in steps.len()..persisted.len() {
            cx.delete(step_key(n, i));
        }
        persisted.truncate(steps.len());
        let mut records_written = false;
        for (i, s) in steps.iter().enumerate() {
            if !every && !changed.contains(i) {
                // In a debug build every change is checked to have been
                // noted: one missed would never reach the store.
                debug_assert!(
                    persisted.get(i) == Some(s),
                    "step {i} of d{n} changed without being noted; change records through Deployment::step_mut or steps_mut"
                );
                continue;
            }
            match persisted.get_mut(i) {
                Some(p) if p.same_progress(s) => {
                    debug_assert!(p == s, "step {i} of d{n} changed beyond its progress and node; see StepRecord::same_progress");
                    continue;
                }
                Some(p) => *p = s.clone(),
                None => persisted.push(s.clone()),
            }
            cx.put(step_key(n, i), s);
            records_written = true;
        }
        // Also written when nothing else was: every put leaves a key of the
        // deployment in the change, which wakes the scheduler and the
        // event journal.
        if header_changed || !records_written {
            cx.put(format!("{DEPLOY_PREFIX}{n}"), &*d);
        }
        if d.state.is_terminal() {
            self.active.remove(&n);
            self.persisted_headers.remove(&n);
        } else {
            self.active.insert(n);
            self.persisted_steps.insert(n, persisted);
            if header_changed {
                self.persisted_headers.insert(n, d.clone());
            }
        }
        d.steps = steps;
        self.index_ended(n);
    }

    /// Persist the queue of `destination` (an empty queue is deleted).
    fn put_queue(&mut self, cx: &mut Ctx, destination: &str) {
        let key = format!("{QUEUE_PREFIX}{destination}");
        match self.queues.get(destination) {
            Some(q) if !q.is_empty() => cx.put(key, q),
            _ => {
                self.queues.remove(destination);
                cx.delete(key);
            }
        }
    }

    fn expire_dedup(&mut self, cx: &mut Ctx) {
        for _ in 0..DEDUP_EXPIRE_BATCH {
            let Some((at, id)) = self.dedup_order.first().cloned() else { break };
            if cx.at_ms.saturating_sub(at) < DEDUP_TTL_MS {
                break;
            }
            self.dedup_order.pop_first();
            self.dedup.remove(&id);
            cx.delete(format!("{DEDUP_PREFIX}{id}"));
        }
    }
}

/// One request being applied: its sequence number (a grant's fencing
/// token, a submit's deployment number, see [`State::apply`]) and time, and
/// the changes made so far.
struct Ctx {
    seq: u64,
    at_ms: i64,
    changes: Vec<Change>,
}

impl Ctx {
    fn put<T: Serialize>(&mut self, key: String, value: &T) {
        self.changes.push(Change { key, value: Some(encode(value)) });
    }

    fn delete(&mut self, key: String) {
        self.changes.push(Change { key, value: None });
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state values are plain structs; serializing them cannot fail")
}

/// [`State::for_each_pair`]'s visitor, with the key and value buffers it
/// reuses.
struct Pairs<F> {
    each: F,
    key: String,
    value: Vec<u8>,
}

impl<F: FnMut(&str, &[u8])> Pairs<F> {
    fn put(&mut self, key: std::fmt::Arguments<'_>, value: &impl Serialize) {
        use std::fmt::Write;
        self.key.clear();
        self.key.write_fmt(key).expect("writing to a String cannot fail");
        self.encode_and_hand(value);
    }

    fn put_key(&mut self, key: String, value: &impl Serialize) {
        self.key = key;
        self.encode_and_hand(value);
    }

    fn encode_and_hand(&mut self, value: &impl Serialize) {
        self.value.clear();
        serde_json::to_writer(&mut self.value, value).expect("state values are plain structs; serializing them cannot fail");
        (self.each)(&self.key, &self.value);
    }
}

#[cfg(test)]
mod tests;
