//! What the cluster lists about its destinations and nodes: the records
//! that coordinators build and `fleetctl` (and its `-o json`, and the
//! tests) read. One type on both sides, so a renamed field cannot go
//! unnoticed by one of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::QueuePolicy;
use crate::state::State;

/// A destination as the cluster lists it (`fleetctl destinations -o json`
/// prints an array of them): its definition, lock, queue, current releases
/// and matching nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationView {
    pub name: String,
    pub adapter: String,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The queue policy.
    pub queue: QueuePolicy,
    /// How long work waits for a lost node (`2m`); older coordinators
    /// did not send it.
    #[serde(rename = "node_wait", default = "crate::manifest::default_node_wait_ms", with = "crate::manifest::node_wait_text")]
    pub node_wait_ms: u64,
    pub lock_holder: Option<String>,
    pub lock_token: Option<u64>,
    /// Deployments that hold or wait for the destination, in order.
    pub queued: Vec<String>,
    /// Release that last succeeded, per app.
    pub current: BTreeMap<String, String>,
    /// Nodes whose labels match the selector.
    pub nodes: Vec<String>,
}

impl DestinationView {
    /// The view of destination `name` in `state`, if it exists.
    pub fn of(state: &State, name: &str) -> Option<DestinationView> {
        let d = state.destination(name)?;
        let current = state.current_releases(name);
        let lock = state.lock(name);
        Some(DestinationView {
            name: d.name.clone(),
            adapter: d.adapter.clone(),
            selector: d.selector.clone(),
            queue: d.queue,
            node_wait_ms: d.node_wait_ms,
            lock_holder: lock.map(|l| l.holder.clone()),
            lock_token: lock.map(|l| l.fencing_token),
            queued: state.queue(name),
            current,
            nodes: state.nodes_for(name),
        })
    }
}

/// A worker node as the leader lists it (`fleetctl nodes -o json` prints
/// an array of them): membership from the state machine, liveness from the
/// leader's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub registered_ms: i64,
    /// Since when the leader counts it lost (it gets no work until it reconnects).
    pub lost_ms: Option<i64>,
    /// Connected to this leader now.
    pub connected: bool,
    pub connected_ms: Option<i64>,
    /// `null` if this leader has not heard from it.
    pub last_seen_ms: Option<i64>,
}

/// A server of a destination as the leader lists it (`fleetctl servers
/// DEST -o json` prints an array of them): the sync task's committed
/// record, with the leader's own last-heard time and the drift against
/// the destination's current releases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerView {
    pub destination: String,
    pub id: String,
    pub health: crate::sync::Health,
    /// Why it is not healthy.
    pub error: Option<String>,
    /// Per app: the release it runs, where it serves it, the
    /// destination's current release and whether they differ.
    pub apps: BTreeMap<String, ServerAppView>,
    /// Apps whose running release is not the destination's current one.
    pub drift: Vec<String>,
    pub first_seen_ms: i64,
    /// When it was last heard of (the leader's memory when it has it).
    pub last_seen_ms: i64,
    /// Apps for which a catch-up deployment is still to be queued.
    pub catch_up: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerAppView {
    pub release: Option<String>,
    pub address: Option<String>,
    /// The destination's current (last succeeded) release of the app.
    pub current: Option<String>,
    pub drift: bool,
}

impl ServerView {
    /// Every server of `destination` (`None` if there is no such destination).
    pub fn list(state: &State, destination: &str) -> Option<Vec<ServerView>> {
        state.destination(destination)?;
        let current = state.current_releases(destination);
        let Some(servers) = state.servers(destination) else { return Some(vec![]) };
        Some(
            servers
                .values()
                .map(|s| {
                    let drift = crate::sync::drifted(s, &current);
                    let names: std::collections::BTreeSet<&String> = s.apps.keys().chain(current.keys()).collect();
                    let apps = names
                        .into_iter()
                        .map(|app| {
                            let on = s.apps.get(app);
                            let v = ServerAppView {
                                release: on.and_then(|a| a.release.clone()),
                                address: on.and_then(|a| a.address.clone()),
                                current: current.get(app).cloned(),
                                drift: drift.contains(app),
                            };
                            (app.clone(), v)
                        })
                        .collect();
                    ServerView {
                        destination: destination.to_string(),
                        id: s.id.clone(),
                        health: s.health,
                        error: s.error.clone(),
                        apps,
                        drift,
                        first_seen_ms: s.first_seen_ms,
                        last_seen_ms: s.last_seen_ms,
                        catch_up: s.catch_up.iter().cloned().collect(),
                    }
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<T: Serialize>(v: &T) -> Vec<String> {
        match serde_json::to_value(v) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            other => panic!("not an object: {other:?}"),
        }
    }

    /// The JSON names are a contract with fleetctl's text output, scripts
    /// reading `-o json`, and older fleetctl builds: changing one is a
    /// deliberate act that updates this list.
    #[test]
    fn the_json_names_are_the_contract() {
        let d = DestinationView {
            name: "web".into(),
            adapter: "process".into(),
            selector: BTreeMap::new(),
            queue: QueuePolicy::Queue,
            node_wait_ms: 120_000,
            lock_holder: None,
            lock_token: None,
            queued: vec![],
            current: BTreeMap::new(),
            nodes: vec![],
        };
        let mut want = ["adapter", "current", "lock_holder", "lock_token", "name", "node_wait", "nodes", "queue", "queued", "selector"];
        want.sort();
        assert_eq!(keys(&d), want);
        assert_eq!(serde_json::to_value(&d).unwrap()["node_wait"], "2m");
        let n = NodeView {
            id: "n1".into(),
            labels: BTreeMap::new(),
            registered_ms: 1,
            lost_ms: None,
            connected: true,
            connected_ms: Some(2),
            last_seen_ms: None,
        };
        let mut want = ["connected", "connected_ms", "id", "labels", "last_seen_ms", "lost_ms", "registered_ms"];
        want.sort();
        assert_eq!(keys(&n), want);
    }

    #[test]
    fn a_destination_that_does_not_exist_has_no_view() {
        assert_eq!(DestinationView::of(&State::default(), "nowhere"), None);
    }
}
