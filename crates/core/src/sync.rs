//! Destination sync: the pure decisions behind the leader's per-destination
//! sync task (`fleet-coord`'s `sync.rs` carries them out).
//!
//! Every few seconds each node reports what it runs per (destination,
//! app): the release, whether it is healthy, where it serves it
//! ([`AppReport`]). The leader keeps the last report of each node in
//! memory (not replicated). The sync task of a destination turns that into
//! the destination's servers:
//!
//! * [`observe`]: the servers of a `process`/`docker` destination are the
//!   live nodes its selector matches, with what their last report says
//!   (a node seen twice is one server: servers are keyed by id);
//! * [`diff`]: only the differences from the committed
//!   [`ServerRecord`]s are proposed (`Command::SyncServers`); when nothing
//!   changed there is no Raft write at all. `last_seen_ms` is committed
//!   coarsely (when something else changes, or every [`TOUCH_EVERY_MS`]);
//!   the leader overlays its own memory when listing;
//! * [`joined_needs`] and [`catch_up_due`]: when a server joins a
//!   destination that has a current (last succeeded) release it does not
//!   run, a catch-up deployment of that release is queued for it through
//!   the destination's normal FIFO queue and lock (actor [`SYNC_ACTOR`]),
//!   once, and never while another deployment of that app to the
//!   destination is queued or running;
//! * [`drifted`]: a server whose running release is not the destination's
//!   current one.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Adapters whose destinations' servers are their nodes, synced from the
/// nodes' reports (a `command` destination has no servers).
pub const SYNCED_ADAPTERS: &[&str] = &["process", "docker"];

/// The actor of deployments the sync task queues.
pub const SYNC_ACTOR: &str = "sync";
/// A committed `last_seen_ms` older than this is refreshed even when
/// nothing else changed (one write per server per minute at most).
pub const TOUCH_EVERY_MS: i64 = 60_000;
/// A node report older than this says nothing any more: the server's
/// health becomes `unknown`.
pub const REPORT_STALE_MS: i64 = 10_000;

/// A server's health, per its node's last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// No recent report (a node that just connected, or a leader that just
    /// took over).
    #[default]
    Unknown,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unknown => "unknown",
        }
    }
}

/// One app of one destination as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppReport {
    pub destination: String,
    pub app: String,
    /// The release it runs (`None`: it runs nothing of that app now).
    pub release: Option<String>,
    pub healthy: bool,
    /// Why it is not healthy.
    pub error: Option<String>,
    /// Where it serves the app (the route's address).
    pub address: Option<String>,
}

/// The last report of one node, in the leader's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    pub at_ms: i64,
    pub apps: Vec<AppReport>,
}

/// An app on a server.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServerApp {
    pub release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A server as the sync task observed it (what `SyncServers` carries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedServer {
    pub id: String,
    pub health: Health,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub apps: BTreeMap<String, ServerApp>,
}

/// A server of a destination, as committed (`server/<destination>/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: String,
    pub health: Health,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub apps: BTreeMap<String, ServerApp>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Apps whose current release this server did not run when it joined:
    /// a catch-up deployment is due for each (removed once it is queued,
    /// or once the server runs the current release).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub catch_up: BTreeSet<String>,
}

impl ServerRecord {
    /// The observed part of the record.
    pub fn observed(&self) -> ObservedServer {
        ObservedServer { id: self.id.clone(), health: self.health, error: self.error.clone(), apps: self.apps.clone() }
    }

    /// The release of `app` it runs.
    pub fn release_of(&self, app: &str) -> Option<&str> {
        self.apps.get(app).and_then(|a| a.release.as_deref())
    }
}

/// The differences to commit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncDiff {
    pub upserts: Vec<ObservedServer>,
    pub removals: Vec<String>,
}

impl SyncDiff {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// The servers of `destination` now: one per live node its selector
/// matches (`nodes`, ids unique), as the node's last report describes
/// them. A node without a fresh report keeps what was committed for it
/// while this leader has led for less than [`REPORT_STALE_MS`] (nodes
/// report within seconds of reconnecting), and is `unknown` after.
pub fn observe(
    destination: &str,
    nodes: &[String],
    reports: &BTreeMap<String, NodeReport>,
    stored: &BTreeMap<String, ServerRecord>,
    now_ms: i64,
    leader_since_ms: i64,
) -> Vec<ObservedServer> {
    let ids: BTreeSet<&String> = nodes.iter().collect();
    let mut out = Vec::new();
    for id in ids {
        let fresh = reports.get(id.as_str()).filter(|r| now_ms.saturating_sub(r.at_ms) <= REPORT_STALE_MS);
        let Some(report) = fresh else {
            let young = now_ms.saturating_sub(leader_since_ms) <= REPORT_STALE_MS;
            out.push(match stored.get(id.as_str()) {
                Some(s) if young || s.health == Health::Unknown => s.observed(),
                Some(s) => ObservedServer {
                    id: id.clone(),
                    health: Health::Unknown,
                    error: Some(format!("no report from node {id} for more than {}s", REPORT_STALE_MS / 1000)),
                    apps: s.apps.clone(),
                },
                None => ObservedServer { id: id.clone(), health: Health::Unknown, error: None, apps: BTreeMap::new() },
            });
            continue;
        };
        let mut apps = BTreeMap::new();
        let mut errors = Vec::new();
        for a in report.apps.iter().filter(|a| a.destination == destination) {
            if !a.healthy {
                errors.push(format!("{}: {}", a.app, a.error.as_deref().unwrap_or("unhealthy")));
            }
            apps.insert(a.app.clone(), ServerApp { release: a.release.clone(), address: a.address.clone() });
        }
        let (health, error) = if errors.is_empty() { (Health::Healthy, None) } else { (Health::Unhealthy, Some(errors.join("; "))) };
        out.push(ObservedServer { id: id.clone(), health, error, apps });
    }
    out
}

/// What to commit so that `stored` matches `observed`: a server observed
/// twice counts once (the first); an unchanged server is not written
/// unless its committed `last_seen_ms` is older than [`TOUCH_EVERY_MS`];
/// a server no longer observed is removed.
pub fn diff(stored: &BTreeMap<String, ServerRecord>, observed: &[ObservedServer], now_ms: i64) -> SyncDiff {
    let mut seen: BTreeMap<&str, &ObservedServer> = BTreeMap::new();
    for o in observed {
        seen.entry(o.id.as_str()).or_insert(o);
    }
    let mut out = SyncDiff::default();
    for (id, o) in &seen {
        let changed = match stored.get(*id) {
            None => true,
            Some(s) => s.observed() != **o || now_ms.saturating_sub(s.last_seen_ms) >= TOUCH_EVERY_MS,
        };
        if changed {
            out.upserts.push((*o).clone());
        }
    }
    out.removals = stored.keys().filter(|id| !seen.contains_key(id.as_str())).cloned().collect();
    out
}

/// Did this upsert make the server known (it joined)? A server is new
/// when nothing was committed for it, or only an `unknown` record that
/// ran nothing: what it runs is known from now on.
pub fn joins(before: Option<&ServerRecord>, now: &ObservedServer) -> bool {
    now.health != Health::Unknown && before.is_none_or(|b| b.health == Health::Unknown && b.apps.is_empty())
}

/// The apps a joining server needs a catch-up of: those with a current
/// release on its destination (`current`: app → release) that it does not
/// run.
pub fn joined_needs(server: &ObservedServer, current: &BTreeMap<String, String>) -> BTreeSet<String> {
    current
        .iter()
        .filter(|(app, release)| server.apps.get(*app).and_then(|a| a.release.as_ref()) != Some(*release))
        .map(|(app, _)| app.clone())
        .collect()
}

/// Where a pending catch-up of one app to one server stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// Queue it now.
    Due,
    /// Not now: another deployment of the app to the destination is
    /// queued or running, or the destination refuses a busy queue.
    Wait,
    /// Not needed any more: there is no current release, or the server
    /// runs it already.
    Drop,
}

/// Should the catch-up of an app to a server be queued now? `current`:
/// the destination's current release of the app; `runs`: what the server
/// runs; `app_busy`: a deployment of that app to the destination is
/// queued or running; `refuses_busy`: the destination's queue policy is
/// `reject` and it is busy.
pub fn catch_up_due(current: Option<&str>, runs: Option<&str>, app_busy: bool, refuses_busy: bool) -> CatchUp {
    match current {
        None => CatchUp::Drop,
        Some(c) if runs == Some(c) => CatchUp::Drop,
        Some(_) if app_busy || refuses_busy => CatchUp::Wait,
        Some(_) => CatchUp::Due,
    }
}

/// The apps of `server` that do not run the destination's current release
/// (`current`: app → release). An app the destination never deployed is
/// no drift.
pub fn drifted(server: &ServerRecord, current: &BTreeMap<String, String>) -> Vec<String> {
    current.iter().filter(|(app, release)| server.release_of(app) != Some(release.as_str())).map(|(app, _)| app.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(release: Option<&str>) -> ServerApp {
        ServerApp { release: release.map(str::to_string), address: Some("127.0.0.1:9000".into()) }
    }

    fn observed(id: &str, health: Health, apps: &[(&str, Option<&str>)]) -> ObservedServer {
        ObservedServer {
            id: id.into(),
            health,
            error: (health == Health::Unhealthy).then(|| "web: down".to_string()),
            apps: apps.iter().map(|(a, r)| (a.to_string(), app(*r))).collect(),
        }
    }

    fn record(o: &ObservedServer, last_seen_ms: i64) -> ServerRecord {
        ServerRecord {
            id: o.id.clone(),
            health: o.health,
            error: o.error.clone(),
            apps: o.apps.clone(),
            first_seen_ms: 0,
            last_seen_ms,
            catch_up: BTreeSet::new(),
        }
    }

    fn stored(list: &[ServerRecord]) -> BTreeMap<String, ServerRecord> {
        list.iter().map(|r| (r.id.clone(), r.clone())).collect()
    }

    #[test]
    fn diff_commits_only_what_changed() {
        let n1 = observed("n1", Health::Healthy, &[("web", Some("v1"))]);
        let n2 = observed("n2", Health::Healthy, &[("web", Some("v1"))]);
        let now = 100_000;
        let fresh = now - 1_000;
        // (what, committed, observed, upserts, removals)
        type Case<'a> = (&'a str, Vec<ServerRecord>, Vec<ObservedServer>, Vec<&'a str>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            ("nothing changed: no write", vec![record(&n1, fresh), record(&n2, fresh)], vec![n1.clone(), n2.clone()], vec![], vec![]),
            ("a new server", vec![record(&n1, fresh)], vec![n1.clone(), n2.clone()], vec!["n2"], vec![]),
            ("a vanished server", vec![record(&n1, fresh), record(&n2, fresh)], vec![n1.clone()], vec![], vec!["n2"]),
            (
                "health changed",
                vec![record(&n1, fresh)],
                vec![observed("n1", Health::Unhealthy, &[("web", Some("v1"))])],
                vec!["n1"],
                vec![],
            ),
            (
                "release changed",
                vec![record(&n1, fresh)],
                vec![observed("n1", Health::Healthy, &[("web", Some("v2"))])],
                vec!["n1"],
                vec![],
            ),
            ("last seen a minute ago: touched", vec![record(&n1, now - TOUCH_EVERY_MS)], vec![n1.clone()], vec!["n1"], vec![]),
            ("the same server observed twice is one", vec![], vec![n1.clone(), n1.clone()], vec!["n1"], vec![]),
            ("the same server twice, known: no write", vec![record(&n1, fresh)], vec![n1.clone(), n1.clone()], vec![], vec![]),
        ];
        for (what, before, now_seen, upserts, removals) in cases {
            let d = diff(&stored(&before), &now_seen, now);
            let got: Vec<&str> = d.upserts.iter().map(|o| o.id.as_str()).collect();
            assert_eq!(got, upserts, "{what}: upserts");
            assert_eq!(d.removals, removals, "{what}: removals");
            assert_eq!(d.is_empty(), upserts.is_empty() && removals.is_empty(), "{what}");
        }
    }

    #[test]
    fn observe_reads_the_reports_of_the_selected_nodes() {
        let report = |at_ms, apps: Vec<AppReport>| NodeReport { at_ms, apps };
        let web = |dest: &str, release: &str, healthy: bool| AppReport {
            destination: dest.into(),
            app: "web".into(),
            release: Some(release.into()),
            healthy,
            error: (!healthy).then(|| "container is gone".into()),
            address: Some("127.0.0.1:9000".into()),
        };
        let now = 1_000_000;
        let reports: BTreeMap<String, NodeReport> = [
            ("n1".to_string(), report(now - 500, vec![web("prod", "v1", true), web("staging", "v9", true)])),
            ("n2".to_string(), report(now - 500, vec![web("prod", "v1", false)])),
            ("n3".to_string(), report(now - REPORT_STALE_MS - 1, vec![web("prod", "v1", true)])),
            ("n4".to_string(), report(now - 500, vec![])),
        ]
        .into();
        let nodes: Vec<String> = ["n1", "n2", "n3", "n4", "n1"].iter().map(|s| s.to_string()).collect();
        let old_n3 = record(&observed("n3", Health::Healthy, &[("web", Some("v1"))]), now - 20_000);
        let long_ago = now - 60_000;
        let got = observe("prod", &nodes, &reports, &stored(std::slice::from_ref(&old_n3)), now, long_ago);
        let ids: Vec<&str> = got.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(ids, ["n1", "n2", "n3", "n4"], "one server per node, a node listed twice once");
        assert_eq!((got[0].health, got[0].apps.len()), (Health::Healthy, 1), "only this destination's apps");
        assert_eq!(got[0].apps["web"].release.as_deref(), Some("v1"));
        assert_eq!(got[1].health, Health::Unhealthy);
        assert!(got[1].error.as_deref().is_some_and(|e| e.contains("container is gone")), "{:?}", got[1].error);
        assert_eq!(got[2].health, Health::Unknown, "a stale report says nothing");
        assert_eq!(got[2].apps, old_n3.apps, "what it ran is kept");
        assert_eq!((got[3].health, got[3].apps.len()), (Health::Healthy, 0), "a node that runs nothing yet");

        // A leader that just took over keeps the committed record until the node reports.
        let got = observe("prod", &nodes[2..3], &BTreeMap::new(), &stored(std::slice::from_ref(&old_n3)), now, now - 1_000);
        assert_eq!(got, vec![old_n3.observed()]);
        // A node never seen, with no report: unknown, runs nothing known.
        let got = observe("prod", &["n9".to_string()], &BTreeMap::new(), &BTreeMap::new(), now, long_ago);
        assert_eq!((got[0].health, got[0].apps.len()), (Health::Unknown, 0));
    }

    #[test]
    fn joining_and_what_a_joined_server_needs() {
        let current: BTreeMap<String, String> = [("web".to_string(), "v2".to_string()), ("api".to_string(), "a1".to_string())].into();
        let fresh = observed("n3", Health::Healthy, &[]);
        let runs_web = observed("n3", Health::Healthy, &[("web", Some("v2"))]);
        let unknown = record(&observed("n3", Health::Unknown, &[]), 0);
        let known = record(&runs_web, 0);
        // (what, committed before, observed now, joins, needs)
        type Case<'a> = (&'a str, Option<&'a ServerRecord>, &'a ObservedServer, bool, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            ("never seen", None, &fresh, true, vec!["api", "web"]),
            ("was unknown", Some(&unknown), &runs_web, true, vec!["api"]),
            ("already known", Some(&known), &runs_web, false, vec!["api"]),
        ];
        for (what, before, now, joined, needs) in cases {
            assert_eq!(joins(before, now), joined, "{what}");
            assert_eq!(joined_needs(now, &current).into_iter().collect::<Vec<_>>(), needs, "{what}");
        }
        assert!(!joins(None, &observed("n3", Health::Unknown, &[])), "unknown is not joined: what it runs is not known yet");
    }

    #[test]
    fn when_a_catch_up_is_queued() {
        use CatchUp::*;
        let cases = [
            (None, None, false, false, Drop),
            (Some("v2"), Some("v2"), false, false, Drop),
            (Some("v2"), None, false, false, Due),
            (Some("v2"), Some("v1"), false, false, Due),
            (Some("v2"), None, true, false, Wait),
            (Some("v2"), None, false, true, Wait),
            (Some("v2"), Some("v2"), true, false, Drop),
        ];
        for (current, runs, busy, refuses, want) in cases {
            assert_eq!(catch_up_due(current, runs, busy, refuses), want, "{current:?} {runs:?} busy={busy} refuses={refuses}");
        }
    }

    #[test]
    fn drift_is_a_current_release_not_run() {
        let current: BTreeMap<String, String> = [("web".to_string(), "v2".to_string())].into();
        let cases = [
            (vec![("web", Some("v2"))], vec![]),
            (vec![("web", Some("v1"))], vec!["web"]),
            (vec![("web", None)], vec!["web"]),
            (vec![], vec!["web"]),
            (vec![("web", Some("v2")), ("other", Some("x"))], vec![]),
        ];
        for (apps, want) in cases {
            let r = record(&observed("n", Health::Healthy, &apps), 0);
            assert_eq!(drifted(&r, &current), want, "{apps:?}");
        }
    }
}
