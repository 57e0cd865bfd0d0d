//! Destination sync on the leader: one task per `process`/`docker`
//! destination, started, stopped and restarted as destinations are
//! applied or removed and as this coordinator gains or loses leadership.
//!
//! Each task, every `--sync-interval-ms`, asks the state machine
//! ([`fleet_core::State::sync_command`]) what changed between the
//! committed servers and what the nodes last reported (kept in the hub,
//! not replicated) and proposes only that; nothing changed = no Raft
//! write. Applying it may queue a catch-up deployment for a server that
//! joined: the decision is the state machine's, so two sync rounds (or two
//! leaders) cannot queue it twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::manifest::Destination;
use fleet_core::sync::{AppReport, NodeReport, SYNCED_ADAPTERS};
use fleet_core::{Command, Response as Outcome};
use fleet_net::now_ms;
use openraft::ServerState;
use tokio::task::JoinHandle;

use crate::hub::Hub;
use crate::propose::propose;
use crate::raft_types::Raft;
use crate::store::sm::StateReader;

/// How often the supervisor looks at leadership when no entry is applied.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// A node's `InstanceReport`, received at `now_ms` (leader clock).
pub fn node_report(r: fleet_proto::InstanceReport, now_ms: i64) -> NodeReport {
    let opt = |s: String| (!s.is_empty()).then_some(s);
    NodeReport {
        at_ms: now_ms,
        apps: r
            .instances
            .into_iter()
            .map(|i| AppReport {
                destination: i.destination,
                app: i.app,
                release: opt(i.release),
                healthy: i.healthy,
                error: opt(i.error),
                address: opt(i.address),
            })
            .collect(),
    }
}

/// Start the supervisor of the sync tasks. It runs on every coordinator
/// and keeps tasks only while this one leads; aborting it aborts them.
pub fn spawn(raft: Raft, state: StateReader, hub: Arc<Hub>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(supervise(raft, state, hub, every))
}

/// The running task of one destination, with the definition it runs for.
struct Task {
    def: Destination,
    handle: JoinHandle<()>,
}

/// Aborts the tasks when the supervisor ends (or is aborted).
struct Tasks(BTreeMap<String, Task>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in self.0.values() {
            t.handle.abort();
        }
    }
}

async fn supervise(raft: Raft, state: StateReader, hub: Arc<Hub>, every: Duration) {
    let mut applied = state.applied_index();
    let metrics = raft.metrics();
    let mut tasks = Tasks(BTreeMap::new());
    let mut leader_since: Option<(u64, i64)> = None;
    loop {
        let leading = {
            let m = metrics.borrow();
            (m.state == ServerState::Leader).then_some(m.current_term)
        };
        leader_since = match (leading, leader_since) {
            (Some(term), Some((t, since))) if t == term => Some((t, since)),
            (Some(term), _) => {
                // A new term: every task restarts with the new leader's start.
                for (_, t) in std::mem::take(&mut tasks.0) {
                    t.handle.abort();
                }
                Some((term, now_ms()))
            }
            (None, _) => None,
        };
        let wanted: BTreeMap<String, Destination> = match leader_since {
            Some(_) => state.read(|a| {
                a.state
                    .destinations()
                    .filter(|d| SYNCED_ADAPTERS.contains(&d.adapter.as_str()))
                    .map(|d| (d.name.clone(), d.clone()))
                    .collect()
            }),
            None => BTreeMap::new(),
        };
        tasks.0.retain(|name, t| {
            let keep = wanted.get(name) == Some(&t.def) && !t.handle.is_finished();
            if !keep {
                tracing::info!(destination = %name, "sync task stopped");
                t.handle.abort();
            }
            keep
        });
        if let Some((_, since)) = leader_since {
            for (name, def) in wanted {
                if tasks.0.contains_key(&name) {
                    continue;
                }
                tracing::info!(destination = %name, every_ms = every.as_millis() as u64, "sync task started");
                let handle = tokio::spawn(run(name.clone(), raft.clone(), state.clone(), hub.clone(), every, since));
                tasks.0.insert(name, Task { def, handle });
            }
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
}

/// The sync loop of one destination.
async fn run(destination: String, raft: Raft, state: StateReader, hub: Arc<Hub>, every: Duration, leader_since_ms: i64) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let reports = hub.reports();
        let now = now_ms();
        let Some(command) = state.read(|a| a.state.sync_command(&destination, &reports, now, leader_since_ms)) else { continue };
        if let Command::SyncServers { upserts, removals, .. } = &command {
            let up: Vec<String> = upserts.iter().map(|o| format!("{}={}", o.id, o.health.as_str())).collect();
            tracing::info!(%destination, upserts = ?up, removals = ?removals, "servers changed; committing the differences");
        }
        match propose(&raft, None, None, command).await {
            Ok((Outcome::Done, _)) => {}
            Ok((other, _)) => tracing::warn!(%destination, answer = ?other, "server sync refused"),
            // Not the leader any more: the supervisor stops this task.
            Err(e) => tracing::warn!(%destination, error = %e.message(), "server sync not committed; will retry"),
        }
    }
}
