//! Servers of destinations (what the leader's sync task found), the
//! catch-up deployments of servers that joined, and removing a destination.
//! The decisions are [`crate::sync`]'s; this applies them.

use std::collections::BTreeMap;

use super::{Ctx, State, DEST_PREFIX, QUEUE_PREFIX, SERVER_PREFIX};
use crate::command::{Command, Response};
use crate::manifest::QueuePolicy;
use crate::names::validate_name;
use crate::sync::{
    catch_up_due, diff, joined_needs, joins, observe, CatchUp, NodeReport, ObservedServer, ServerRecord, SYNCED_ADAPTERS, SYNC_ACTOR,
};

fn server_key(destination: &str, id: &str) -> String {
    format!("{SERVER_PREFIX}{destination}/{id}")
}

impl State {
    /// The servers of `destination`, by id.
    pub fn servers(&self, destination: &str) -> Option<&BTreeMap<String, ServerRecord>> {
        self.servers.get(destination)
    }

    /// Is a deployment of `app` to `destination` queued or running?
    fn app_busy(&self, app: &str, destination: &str) -> bool {
        self.active_deployments().any(|d| d.app == app && d.destinations().iter().any(|x| x == destination))
    }

    /// `destination` refuses a deployment now (queue policy `reject`, busy).
    fn refuses_busy(&self, destination: &str) -> bool {
        let busy = self.locks.contains_key(destination) || self.queues.get(destination).is_some_and(|q| !q.is_empty());
        busy && self.destinations.get(destination).is_some_and(|d| d.queue == QueuePolicy::Reject)
    }

    /// The pending catch-ups of `destination`, each (server, app) with
    /// what [`catch_up_due`] says of it.
    fn catch_ups(&self, destination: &str) -> Vec<(String, String, CatchUp)> {
        let Some(servers) = self.servers.get(destination) else { return vec![] };
        let current = self.current_releases(destination);
        let refuses = self.refuses_busy(destination);
        let mut out = Vec::new();
        for s in servers.values() {
            for app in &s.catch_up {
                let verdict =
                    catch_up_due(current.get(app).map(String::as_str), s.release_of(app), self.app_busy(app, destination), refuses);
                out.push((s.id.clone(), app.clone(), verdict));
            }
        }
        out
    }

    /// Is a catch-up deployment due on `destination` now? (The sync task
    /// proposes then even when no server changed.)
    pub fn catch_up_due(&self, destination: &str) -> bool {
        self.catch_ups(destination).iter().any(|(_, _, v)| *v == CatchUp::Due)
    }

    /// What the sync task of `destination` must propose now, given the
    /// leader's last report of each node: `SyncServers` with only the
    /// differences, or with none when a catch-up is due; `None` when
    /// nothing changed (no Raft write).
    pub fn sync_command(
        &self,
        destination: &str,
        reports: &BTreeMap<String, NodeReport>,
        now_ms: i64,
        leader_since_ms: i64,
    ) -> Option<Command> {
        let d = self.destinations.get(destination)?;
        if !SYNCED_ADAPTERS.contains(&d.adapter.as_str()) {
            return None;
        }
        let empty = BTreeMap::new();
        let stored = self.servers.get(destination).unwrap_or(&empty);
        let seen = observe(destination, &self.nodes_for(destination), reports, stored, now_ms, leader_since_ms);
        let changes = diff(stored, &seen, now_ms);
        if changes.is_empty() && !self.catch_up_due(destination) {
            return None;
        }
        Some(Command::SyncServers { destination: destination.to_string(), upserts: changes.upserts, removals: changes.removals })
    }

    /// `SyncServers`: commit what the sync task observed changed, then
    /// queue a catch-up deployment if one is due.
    pub(super) fn sync_servers(&mut self, cx: &mut Ctx, destination: &str, upserts: &[ObservedServer], removals: &[String]) -> Response {
        if !self.destinations.contains_key(destination) {
            return Response::NotFound { what: format!("destination `{destination}`") };
        }
        for id in upserts.iter().map(|o| &o.id).chain(removals) {
            if let Err(e) = validate_name("server id", id) {
                return Response::Invalid { reason: e.to_string() };
            }
        }
        let current = self.current_releases(destination);
        let servers = self.servers.entry(destination.to_string()).or_default();
        for id in removals {
            if servers.remove(id).is_some() {
                cx.delete(server_key(destination, id));
            }
        }
        let mut done = std::collections::BTreeSet::new();
        for o in upserts {
            // The same server twice in one command is one server.
            if !done.insert(o.id.clone()) {
                continue;
            }
            let before = servers.get(&o.id);
            let mut catch_up = before.map(|b| b.catch_up.clone()).unwrap_or_default();
            if joins(before, o) {
                catch_up.extend(joined_needs(o, &current));
            }
            let rec = ServerRecord {
                id: o.id.clone(),
                health: o.health,
                error: o.error.clone(),
                apps: o.apps.clone(),
                first_seen_ms: before.map(|b| b.first_seen_ms).unwrap_or(cx.at_ms),
                last_seen_ms: cx.at_ms,
                catch_up,
            };
            cx.put(server_key(destination, &o.id), &rec);
            servers.insert(o.id.clone(), rec);
        }
        if servers.is_empty() {
            self.servers.remove(destination);
        }
        self.queue_catch_up(cx, destination);
        Response::Done
    }

    /// Drop catch-ups that are no longer needed and queue one that is due
    /// (one deployment per entry: its number is the entry's index; every
    /// server waiting for the same app is its target).
    fn queue_catch_up(&mut self, cx: &mut Ctx, destination: &str) {
        let verdicts = self.catch_ups(destination);
        let mut settled: Vec<(String, String)> = Vec::new();
        let mut due: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (server, app, verdict) in verdicts {
            match verdict {
                CatchUp::Drop => settled.push((server, app)),
                CatchUp::Due => due.entry(app).or_default().push(server),
                CatchUp::Wait => {}
            }
        }
        if let Some((app, targets)) = due.into_iter().next() {
            if let Some(base) = self.current_release(&app, destination).cloned() {
                let mut spec = base.spec.clone();
                spec.destination = destination.to_string();
                spec.stack.clear();
                let s = if targets.len() > 1 { "s" } else { "" };
                let reason =
                    format!("catch-up: server{s} {} joined; deploying the current release {} there", targets.join(", "), base.release);
                // Queued or refused (e.g. no node matches any more), it is
                // not tried again: a catch-up happens once per joining server.
                let _ = self.submit_to(cx, spec, SYNC_ACTOR, None, &reason, targets.clone());
            }
            settled.extend(targets.into_iter().map(|t| (t, app.clone())));
        }
        for (server, app) in settled {
            if let Some(rec) = self.servers.get_mut(destination).and_then(|m| m.get_mut(&server)) {
                if rec.catch_up.remove(&app) {
                    let rec = rec.clone();
                    cx.put(server_key(destination, &server), &rec);
                }
            }
        }
    }

    /// `RemoveDestination`: refused while a deployment holds or waits for
    /// it, or a manual lock is held; removes it and its servers.
    pub(super) fn remove_destination(&mut self, cx: &mut Ctx, name: &str) -> Response {
        if !self.destinations.contains_key(name) {
            return Response::NotFound { what: format!("destination `{name}`; `fleetctl destinations` lists them") };
        }
        if let Some(l) = self.locks.get(name) {
            return Response::Rejected {
                reason: format!(
                    "destination `{name}` is held by {} ({}); wait for it to finish (or `fleetctl lock release {name}` if it is your manual lock), then remove it",
                    l.holder, l.reason
                ),
            };
        }
        let queued = self.queue(name);
        if !queued.is_empty() {
            return Response::Rejected {
                reason: format!(
                    "destination `{name}` has deployments queued ({}); wait for them or cancel them (`fleetctl cancel ID`), then remove it",
                    queued.join(", ")
                ),
            };
        }
        self.destinations.remove(name);
        cx.delete(format!("{DEST_PREFIX}{name}"));
        if self.queues.remove(name).is_some() {
            cx.delete(format!("{QUEUE_PREFIX}{name}"));
        }
        for id in self.servers.remove(name).map(|m| m.into_keys().collect::<Vec<_>>()).unwrap_or_default() {
            cx.delete(server_key(name, &id));
        }
        Response::Done
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::command::Request;
    use crate::deploy::{DeployState, StepOutcome};
    use crate::manifest::{parse_destinations, parse_manifest, Overrides};
    use crate::sync::{Health, ServerApp};

    /// A state machine driven through `apply` only, one entry per call.
    struct World {
        s: State,
        index: u64,
        at_ms: i64,
    }

    impl World {
        fn new(nodes: &[&str]) -> World {
            let mut w = World { s: State::default(), index: 0, at_ms: 1_000 };
            let text = "destinations:\n  - name: web-prod\n    selector: { env: prod }\n";
            w.apply(Command::PutDestinations { destinations: parse_destinations("d.yaml", text).unwrap() });
            for n in nodes {
                w.apply(Command::RegisterNode { id: n.to_string(), labels: [("env".to_string(), "prod".to_string())].into() });
            }
            w
        }

        fn apply(&mut self, command: Command) -> Response {
            self.index += 1;
            self.at_ms += 100;
            self.s.apply(self.index, &Request { request_id: None, at_ms: self.at_ms, command, origin: None }).0
        }

        fn deploy(&mut self, release: &str) -> String {
            let text = format!("app: web\nrelease: {release}\ndestination: web-prod\nrun: [srv]\nhealth: {{ tcp: true }}\n");
            let spec = parse_manifest("f", &text, &Overrides::default()).unwrap();
            match self.apply(Command::SubmitDeployment {
                spec: Box::new(spec),
                actor: "ci".into(),
                lock_wait_ms: None,
                idempotency_key: None,
            }) {
                Response::Deployment { id, .. } => id,
                other => panic!("not queued: {other:?}"),
            }
        }

        /// Every step of `id` succeeds.
        fn finish(&mut self, id: &str) {
            while let Some(w) = self.s.deployment(id).and_then(|d| d.next()) {
                let d = self.s.deployment(id).unwrap().clone();
                let node = d.steps[w.step].plan.node.clone();
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
                    node,
                };
                self.apply(Command::StepResult { deployment: id.into(), outcome });
            }
        }

        fn sync(&mut self, servers: &[(&str, Health, Option<&str>)]) -> Response {
            let upserts = servers
                .iter()
                .map(|(id, health, release)| ObservedServer {
                    id: id.to_string(),
                    health: *health,
                    error: None,
                    apps: release
                        .map(|r| BTreeMap::from([("web".to_string(), ServerApp { release: Some(r.into()), address: None })]))
                        .unwrap_or_default(),
                })
                .collect();
            self.apply(Command::SyncServers { destination: "web-prod".into(), upserts, removals: vec![] })
        }

        fn catch_ups(&self) -> Vec<(String, Vec<String>)> {
            self.s.deployments().filter(|d| d.submitted_by == SYNC_ACTOR).map(|d| (d.release.clone(), d.targets.clone())).collect()
        }
    }

    #[test]
    fn a_server_that_joins_gets_one_catch_up_of_the_current_release_on_it_alone() {
        let mut w = World::new(&["n1", "n2"]);
        w.sync(&[("n1", Health::Healthy, None), ("n2", Health::Healthy, None)]);
        assert!(w.catch_ups().is_empty(), "no current release: nothing to catch up");
        let d = w.deploy("v1");
        w.finish(&d);
        w.sync(&[("n1", Health::Healthy, Some("v1")), ("n2", Health::Healthy, Some("v1"))]);
        assert!(w.catch_ups().is_empty(), "servers that run the current release need nothing");

        // n3 joins running nothing: one catch-up of v1, planned on n3 only, no hooks.
        w.apply(Command::RegisterNode { id: "n3".into(), labels: [("env".to_string(), "prod".to_string())].into() });
        w.sync(&[("n3", Health::Healthy, None)]);
        assert_eq!(w.catch_ups(), [("v1".to_string(), vec!["n3".to_string()])]);
        let c = w.s.deployments().last().unwrap().clone();
        assert!(c.steps.iter().all(|s| s.plan.node == "n3") && !c.steps.is_empty(), "{:?}", c.steps);
        assert!(c.events[0].reason.starts_with("catch-up: server n3 joined"), "{}", c.events[0].reason);
        assert_eq!(w.s.servers("web-prod").unwrap()["n3"].catch_up.len(), 0, "queued: no longer pending");

        // Seen again (twice in one command, and in the next round): no second catch-up.
        w.sync(&[("n3", Health::Healthy, None), ("n3", Health::Healthy, None)]);
        assert_eq!(w.catch_ups().len(), 1);
        assert!(!w.s.catch_up_due("web-prod"));
        w.finish(&c.id);
        assert_eq!(w.s.deployment(&c.id).unwrap().state, DeployState::Succeeded);
    }

    #[test]
    fn a_catch_up_waits_for_a_deployment_of_the_app_and_takes_its_release() {
        let mut w = World::new(&["n1"]);
        let v1 = w.deploy("v1");
        w.finish(&v1);
        w.sync(&[("n1", Health::Healthy, Some("v1"))]);
        let v2 = w.deploy("v2");
        // n2 joins while v2 runs (planned without it): wait, then catch up v2.
        w.apply(Command::RegisterNode { id: "n2".into(), labels: [("env".to_string(), "prod".to_string())].into() });
        w.sync(&[("n2", Health::Healthy, None)]);
        assert!(w.catch_ups().is_empty(), "waits while v2 runs");
        assert!(!w.s.catch_up_due("web-prod"));
        w.finish(&v2);
        assert!(w.s.catch_up_due("web-prod"), "due once v2 ended: the sync task proposes even with no change");
        // No server changed (a leader that just took over keeps them): the command carries no difference.
        let cmd = w.s.sync_command("web-prod", &BTreeMap::new(), w.at_ms, w.at_ms);
        assert!(
            matches!(&cmd, Some(Command::SyncServers { upserts, removals, .. }) if removals.is_empty() && upserts.is_empty()),
            "{cmd:?}"
        );
        w.apply(cmd.unwrap());
        assert_eq!(w.catch_ups(), [("v2".to_string(), vec!["n2".to_string()])]);
    }

    #[test]
    fn an_unknown_server_is_not_caught_up_until_what_it_runs_is_known() {
        let mut w = World::new(&["n1"]);
        let v1 = w.deploy("v1");
        w.finish(&v1);
        w.sync(&[("n1", Health::Unknown, None)]);
        assert!(w.catch_ups().is_empty(), "unknown: it may well run v1");
        w.sync(&[("n1", Health::Healthy, Some("v1"))]);
        assert!(w.catch_ups().is_empty(), "it does");
    }

    #[test]
    fn remove_destination_is_refused_while_busy() {
        let mut w = World::new(&["n1"]);
        w.sync(&[("n1", Health::Healthy, None)]);
        let d = w.deploy("v1");
        let remove = Command::RemoveDestination { name: "web-prod".into() };
        assert!(matches!(w.apply(remove.clone()), Response::Rejected { reason } if reason.contains("held by deployment/")));
        w.finish(&d);
        w.apply(Command::AcquireLock { destination: "web-prod".into(), holder: "alice".into(), reason: "maintenance".into() });
        assert!(matches!(w.apply(remove.clone()), Response::Rejected { reason } if reason.contains("alice")));
        w.apply(Command::ReleaseLock { destination: "web-prod".into(), holder: "alice".into() });
        assert_eq!(w.apply(remove.clone()), Response::Done);
        assert!(w.s.destination("web-prod").is_none() && w.s.servers("web-prod").is_none());
        assert!(matches!(w.apply(remove), Response::NotFound { .. }));
        // Nothing of it is left in what a snapshot holds.
        assert!(w.s.dump().iter().all(|(k, _)| !k.starts_with("server/") && !k.starts_with("dest/")), "{:?}", w.s.dump());
    }

    #[test]
    fn servers_survive_a_snapshot() {
        let mut w = World::new(&["n1", "n2"]);
        w.sync(&[("n1", Health::Healthy, None), ("n2", Health::Unhealthy, None)]);
        let copy = State::load(w.s.dump()).unwrap();
        assert_eq!(copy, w.s);
        w.apply(Command::SyncServers { destination: "web-prod".into(), upserts: vec![], removals: vec!["n2".into()] });
        assert_eq!(w.s.servers("web-prod").unwrap().keys().collect::<Vec<_>>(), ["n1"]);
    }
}
