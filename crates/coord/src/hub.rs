//! The leader's memory of worker nodes: who is connected (and the channel
//! to send them work), when each was last heard from, and which steps are
//! in flight on which node.
//!
//! None of this is replicated: a new leader rebuilds it as nodes reconnect
//! and report, in their `Hello`, the steps they are running.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use fleet_proto::{LeaderMessage, StepKey};
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tonic::Status;

pub type NodeSender = mpsc::Sender<Result<LeaderMessage, Status>>;

/// What the leader remembers of a step it sent: the attempt, without its
/// fencing (`fleet_core::leader::AttemptId`).
pub type WorkKey = fleet_core::leader::AttemptId;

/// The attempt a wire step key names.
pub fn attempt_of(k: &StepKey) -> WorkKey {
    WorkKey { deployment: k.deployment.clone(), step: k.step as usize, undo: k.undo, attempt: k.attempt }
}

#[derive(Debug, Clone)]
pub struct InFlight {
    pub node: String,
    pub sent_ms: i64,
    pub aborted: bool,
}

struct Conn {
    conn_id: u64,
    tx: NodeSender,
    connected_ms: i64,
}

#[derive(Default)]
struct Inner {
    next_conn: u64,
    conns: HashMap<String, Conn>,
    last_seen: HashMap<String, i64>,
    disconnected_at: HashMap<String, i64>,
    in_flight: BTreeMap<WorkKey, InFlight>,
    /// The last `InstanceReport` of each node (what it runs), for the sync tasks.
    reports: HashMap<String, fleet_core::sync::NodeReport>,
    /// What changed for the scheduler since it last looked ([`Hub::take_dirty`]).
    dirty: Dirty,
}

/// Deployments whose work in flight changed, or all of them (a node came
/// or went).
#[derive(Debug, Default)]
pub struct Dirty {
    pub all: bool,
    pub deployments: HashSet<String>,
}

/// What `fleetctl nodes` shows of a node's connection.
#[derive(Debug, Clone, Serialize)]
pub struct Liveness {
    pub connected: bool,
    pub connected_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
}

#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// Woken when something the scheduler reacts to happened.
    pub changed: Notify,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node opened its work stream. A second stream from the same node
    /// replaces the first. `running` are the steps it reports in flight.
    pub fn connect(&self, node: &str, tx: NodeSender, running: &[StepKey], now_ms: i64) -> u64 {
        let mut g = self.lock();
        g.next_conn += 1;
        let conn_id = g.next_conn;
        g.conns.insert(node.to_string(), Conn { conn_id, tx, connected_ms: now_ms });
        g.last_seen.insert(node.to_string(), now_ms);
        g.disconnected_at.remove(node);
        // What we believed in flight on this node but it does not report is
        // sent again (the node answers a finished step from its cache).
        g.in_flight.retain(|_, f| f.node != node);
        for k in running {
            g.in_flight.insert(attempt_of(k), InFlight { node: node.to_string(), sent_ms: now_ms, aborted: false });
        }
        g.dirty.all = true;
        drop(g);
        self.changed.notify_one();
        conn_id
    }

    pub fn disconnect(&self, node: &str, conn_id: u64) {
        let mut g = self.lock();
        if g.conns.get(node).is_some_and(|c| c.conn_id == conn_id) {
            g.conns.remove(node);
            g.disconnected_at.insert(node.to_string(), fleet_net::now_ms());
        }
        g.dirty.all = true;
        drop(g);
        self.changed.notify_one();
    }

    /// Drop every stream (this coordinator stopped leading); nodes
    /// reconnect and are redirected to the new leader.
    pub fn drop_all(&self, why: Status) {
        let mut g = self.lock();
        for (_, c) in g.conns.drain() {
            let _ = c.tx.try_send(Err(why.clone()));
        }
        g.in_flight.clear();
        g.reports.clear();
    }

    /// What changed since the last call (see [`Dirty`]).
    pub fn take_dirty(&self) -> Dirty {
        std::mem::take(&mut self.lock().dirty)
    }

    pub fn seen(&self, node: &str, now_ms: i64) {
        self.lock().last_seen.insert(node.to_string(), now_ms);
    }

    /// What `fleetctl nodes` shows. A stream that has been silent for
    /// longer than the node lease does not count as connected: the node is
    /// cut off (a partition its TCP connection has not noticed yet) or
    /// frozen, and the leader has presumed it dead.
    pub fn liveness(&self, node: &str) -> Liveness {
        let g = self.lock();
        let c = g.conns.get(node);
        let last_seen_ms = g.last_seen.get(node).copied();
        let silent = last_seen_ms.is_some_and(|t| fleet_net::now_ms().saturating_sub(t) > fleet_core::leader::NODE_LEASE_MS);
        Liveness { connected: c.is_some() && !silent, connected_ms: c.map(|c| c.connected_ms), last_seen_ms }
    }

    /// When `node` was last known alive: its last message, or its stream
    /// closing (`fleet_core::leader` decides when that is too long ago).
    pub fn last_heard(&self, node: &str) -> Option<i64> {
        let g = self.lock();
        let seen = g.last_seen.get(node).copied();
        if g.conns.contains_key(node) {
            seen
        } else {
            seen.max(g.disconnected_at.get(node).copied())
        }
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.lock().conns.contains_key(node)
    }

    pub fn in_flight(&self, key: &WorkKey) -> Option<InFlight> {
        self.lock().in_flight.get(key).cloned()
    }

    /// Send `msg` to `node` and, for an assignment, remember it in flight.
    /// False when the node is not connected (or its stream is full).
    pub fn send(&self, node: &str, msg: LeaderMessage, track: Option<WorkKey>, now_ms: i64) -> bool {
        let mut g = self.lock();
        let Some(c) = g.conns.get(node) else { return false };
        if c.tx.try_send(Ok(msg)).is_err() {
            return false;
        }
        if let Some(k) = track {
            g.in_flight.insert(k, InFlight { node: node.to_string(), sent_ms: now_ms, aborted: false });
        }
        true
    }

    /// `node` reported what it runs.
    pub fn report(&self, node: &str, report: fleet_core::sync::NodeReport) {
        self.lock().reports.insert(node.to_string(), report);
    }

    /// The last report of every node that sent one to this leader. Nodes
    /// send it when it changes: it holds as long as the node is heard
    /// from, so its time is the node's last message.
    pub fn reports(&self) -> BTreeMap<String, fleet_core::sync::NodeReport> {
        let g = self.lock();
        g.reports
            .iter()
            .map(|(k, v)| {
                let heard = g.last_seen.get(k).copied().unwrap_or(v.at_ms).max(v.at_ms);
                (k.clone(), fleet_core::sync::NodeReport { at_ms: heard, apps: v.apps.clone() })
            })
            .collect()
    }

    pub fn mark_aborted(&self, key: &WorkKey) {
        if let Some(f) = self.lock().in_flight.get_mut(key) {
            f.aborted = true;
        }
    }

    /// A result for `key` was committed (or refused as stale).
    pub fn finished(&self, key: &WorkKey) {
        let mut g = self.lock();
        g.in_flight.remove(key);
        g.dirty.deployments.insert(key.deployment.clone());
        drop(g);
        self.changed.notify_one();
    }

    /// A stale result for `key` came from `node`: forget the work only if
    /// it is `node`'s (after a hand-over the same step may be in flight on
    /// its new node).
    pub fn finished_by(&self, key: &WorkKey, node: &str) {
        let mut g = self.lock();
        if g.in_flight.get(key).is_some_and(|f| f.node == node) {
            g.in_flight.remove(key);
        }
        g.dirty.deployments.insert(key.deployment.clone());
        drop(g);
        self.changed.notify_one();
    }

    /// Forget in-flight work of deployments that are no longer active.
    pub fn retain_deployments(&self, active: &std::collections::HashSet<String>) {
        self.lock().in_flight.retain(|k, _| active.contains(&k.deployment));
    }
}
