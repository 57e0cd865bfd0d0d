//! Membership: worker nodes registering and being presumed lost, and the
//! destinations that select them.

use std::collections::BTreeMap;

use super::{deployment_number, Ctx, NodeRecord, State, DEST_PREFIX, NODE_PREFIX};
use crate::command::Response;
use crate::manifest::{validate_destination, validate_label, Destination};
use crate::names::validate_name;

impl State {
    /// The leader presumed `node` dead: what was left for it in every
    /// active deployment is handed over, skipped, or waits for a node.
    pub(super) fn node_lost(&mut self, cx: &mut Ctx, node: &str, why: &str) -> Response {
        let Some(rec) = self.nodes.get_mut(node) else {
            return Response::NotFound { what: format!("node `{node}`") };
        };
        if rec.lost_ms.is_none() {
            rec.lost_ms = Some(cx.at_ms);
            let rec = rec.clone();
            cx.put(format!("{NODE_PREFIX}{node}"), &rec);
        }
        let active: Vec<u64> = self.deployments.iter().filter(|(_, d)| !d.state.is_terminal()).map(|(n, _)| *n).collect();
        for n in active {
            let Some((live, waits)) =
                self.deployments.get(&n).map(|d| (self.live_nodes(d.destinations()), self.node_waits(d.destinations())))
            else {
                continue;
            };
            let Some(d) = self.deployments.get_mut(&n) else { continue };
            if let Ok(true) = d.node_lost_with_waits(node, cx.at_ms, why, &live, &waits) {
                self.put_deployment(cx, n);
                self.after_progress(cx, n);
            }
        }
        Response::Done
    }

    /// The leader saw the wait of deployment `id` for a lost node run out:
    /// the work still without a node is skipped (the deployment fails, or
    /// needs a human). Nothing changes if nothing waits, or a node came
    /// back first.
    pub(super) fn node_wait_expired(&mut self, cx: &mut Ctx, id: &str) -> Response {
        let Some(n) = deployment_number(id).filter(|n| self.deployments.contains_key(n)) else {
            return Response::NotFound { what: format!("deployment `{id}`") };
        };
        let Some((live, waits)) = self.deployments.get(&n).map(|d| (self.live_nodes(d.destinations()), self.node_waits(d.destinations())))
        else {
            return Response::NotFound { what: format!("deployment `{id}`") };
        };
        let Some(d) = self.deployments.get_mut(&n) else { return Response::NotFound { what: format!("deployment `{id}`") } };
        match d.give_up_waiting(cx.at_ms, &live, &waits) {
            Ok(true) => {
                let state = d.state;
                self.put_deployment(cx, n);
                self.after_progress(cx, n);
                Response::Deployment { id: id.to_string(), state }
            }
            Ok(false) => Response::Done,
            Err(e) => Response::Rejected { reason: e.to_string() },
        }
    }

    /// `node` registered again: work of active deployments that waited for
    /// a node it can run goes on there.
    fn node_returned(&mut self, cx: &mut Ctx, node: &str) {
        let waiting: Vec<u64> = self
            .deployments
            .iter()
            .filter(|(_, d)| !d.state.is_terminal() && d.steps.iter().any(|s| s.waiting.is_some()))
            .map(|(n, _)| *n)
            .collect();
        for n in waiting {
            let Some(live) = self.deployments.get(&n).map(|d| self.live_nodes(d.destinations())) else { continue };
            let Some(d) = self.deployments.get_mut(&n) else { continue };
            if let Ok(true) = d.node_back(node, cx.at_ms, &live) {
                self.put_deployment(cx, n);
            }
        }
    }

    pub(super) fn register_node(&mut self, cx: &mut Ctx, id: &str, labels: &BTreeMap<String, String>) -> Response {
        if let Err(e) = validate_name("node id", id) {
            return Response::Invalid { reason: e.to_string() };
        }
        for (k, v) in labels {
            if let Err(reason) = validate_label(k, v) {
                return Response::Invalid { reason };
            }
        }
        let registered_ms = self.nodes.get(id).map(|n| n.registered_ms).unwrap_or(cx.at_ms);
        if self.nodes.get(id).is_some_and(|n| &n.labels == labels && n.lost_ms.is_none()) {
            return Response::Done;
        }
        let rec = NodeRecord { id: id.to_string(), labels: labels.clone(), registered_ms, updated_ms: cx.at_ms, lost_ms: None };
        cx.put(format!("{NODE_PREFIX}{id}"), &rec);
        self.nodes.insert(id.to_string(), rec);
        self.node_returned(cx, id);
        Response::Done
    }

    pub(super) fn put_destinations(&mut self, cx: &mut Ctx, list: &[Destination]) -> Response {
        for d in list {
            if let Err((field, reason)) = validate_destination(d) {
                return Response::Invalid { reason: format!("destination `{}`: {field}: {reason}", d.name) };
            }
        }
        for d in list {
            cx.put(format!("{DEST_PREFIX}{}", d.name), d);
            self.destinations.insert(d.name.clone(), d.clone());
        }
        Response::Done
    }
}
