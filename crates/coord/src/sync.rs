//! Destination sync on the leader: one task syncs every `process`/`docker`
//! destination, started when this coordinator gains leadership and
//! stopped when it loses it.
//!
//! Every `--sync-interval-ms`, for each destination, the task asks the
//! state machine ([`fleet_core::State::sync_command`]) what changed
//! between the committed servers and what the nodes last reported (kept in
//! the hub, not replicated) and proposes only that; nothing changed = no
//! Raft write. A destination whose definition is applied, changed or
//! removed is synced at once, between rounds. Applying a sync may queue a
//! catch-up deployment for a server that joined: the decision is the state
//! machine's, so two sync rounds (or two leaders) cannot queue it twice.
//!
//! One task for all destinations, not one each: with 10,000 destinations
//! a round copies the nodes' reports once, not 10,000 times, and nothing
//! is kept per destination between rounds.

use std::sync::Arc;
use std::time::Duration;

use fleet_core::state::defined_destination;
use fleet_core::sync::{AppReport, NodeReport, SYNCED_ADAPTERS};
use fleet_core::{Command, Response as Outcome};
use fleet_net::now_ms;
use futures::StreamExt;
use openraft::ServerState;
use tokio::task::{JoinHandle, JoinSet};

use crate::hub::Hub;
use crate::propose::propose;
use crate::raft_types::Raft;
use crate::store::sm::{StateReader, Taker};

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

/// Start the supervisor of the sync task. It runs on every coordinator
/// and syncs only while this one leads; aborting it aborts the syncs.
pub fn spawn(raft: Raft, state: StateReader, hub: Arc<Hub>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(supervise(raft, state, hub, every))
}

/// Destinations looked at under one read of the state: applies wait for
/// the read lock no longer than this many `sync_command`s.
const CHUNK: usize = 256;

/// Sync proposals in flight at once. The proposer writes at most
/// `MAX_BATCH` (64) requests per entry, two entries at a time: 256 keeps
/// both entries full with as many waiting, so a wave of 10,000 syncs (a
/// new leader, 1,000 nodes connecting) is about 160 entries, not twice
/// that.
const IN_FLIGHT: usize = 256;

/// This coordinator's leadership of one term, and the syncs it runs.
/// Dropping it (leadership lost, a new term, the supervisor ended) aborts
/// them.
struct Leading {
    term: u64,
    syncer: Syncer,
    /// The rounds over every destination.
    rounds: JoinHandle<()>,
    /// Syncs of destinations whose definition was just applied.
    at_once: JoinSet<()>,
}

impl Drop for Leading {
    fn drop(&mut self) {
        self.rounds.abort();
    }
}

/// What one sync needs, shared by the rounds and the syncs at once.
#[derive(Clone)]
struct Syncer {
    raft: Raft,
    state: StateReader,
    hub: Arc<Hub>,
    /// The term's start: the grace for nodes that have not reported to
    /// this leader yet runs from it.
    leader_since_ms: i64,
}

async fn supervise(raft: Raft, state: StateReader, hub: Arc<Hub>, every: Duration) {
    // Woken by a change of role or term (server metrics), by applied
    // destination definitions (only while leading), and every LOOK_EVERY;
    // not by every applied entry.
    let mut role = raft.server_metrics();
    let mut leading: Option<Leading> = None;
    loop {
        let term = {
            let m = role.borrow_and_update();
            (m.state == ServerState::Leader).then_some(m.vote.leader_id().get_term())
        };
        if leading.as_ref().map(|l| l.term) != term {
            if leading.take().is_some() {
                tracing::info!("no longer leading this term: destination sync stopped");
            }
            if let Some(term) = term {
                // The first round looks at every destination, so what was
                // touched before it is covered.
                let _ = state.take_touched(Taker::Sync);
                let syncer = Syncer { raft: raft.clone(), state: state.clone(), hub: hub.clone(), leader_since_ms: now_ms() };
                tracing::info!(term, every_ms = every.as_millis() as u64, "leading: destination sync started");
                let rounds = tokio::spawn(syncer.clone().rounds(every));
                leading = Some(Leading { term, syncer, rounds, at_once: JoinSet::new() });
            }
        } else if let Some(l) = leading.as_mut() {
            // Definitions applied since the last look: sync them now, not
            // at the next round.
            while l.at_once.try_join_next().is_some() {}
            let touched = state.take_touched(Taker::Sync);
            let names: Vec<String> = match touched.everything {
                true => synced_names(&state),
                false => touched.keys.iter().filter_map(|k| defined_destination(k)).map(str::to_string).collect(),
            };
            if !names.is_empty() {
                // A snapshot installed names every destination: log a few.
                let some: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
                tracing::info!(count = names.len(), destinations = ?some, "destinations applied or removed: syncing them now");
                let syncer = l.syncer.clone();
                l.at_once.spawn(async move { syncer.sync(names).await });
            }
        }
        tokio::select! {
            r = role.changed() => if r.is_err() { return },
            _ = state.touched(Taker::Sync) => {}
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
}

/// The synced destinations, by name.
fn synced_names(state: &StateReader) -> Vec<String> {
    state.read(|a| a.state.destinations().filter(|d| SYNCED_ADAPTERS.contains(&d.adapter.as_str())).map(|d| d.name.clone()).collect())
}

impl Syncer {
    /// A round over every synced destination each `every`, the first at once.
    async fn rounds(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sync(synced_names(&self.state)).await;
        }
    }

    /// Sync `names`: what changed, decided by the state machine from one
    /// copy of the nodes' reports, then proposed.
    async fn sync(&self, names: Vec<String>) {
        let reports = self.hub.reports();
        let now = now_ms();
        let mut commands = Vec::new();
        for chunk in names.chunks(CHUNK) {
            self.state.read(|a| {
                let decide = |n: &String| a.state.sync_command(n, &reports, now, self.leader_since_ms);
                commands.extend(chunk.iter().filter_map(decide));
            });
        }
        futures::stream::iter(commands).for_each_concurrent(IN_FLIGHT, |command| self.commit(command)).await;
    }

    async fn commit(&self, command: Command) {
        let mut destination = String::new();
        if let Command::SyncServers { destination: d, upserts, removals } = &command {
            destination.clone_from(d);
            let up: Vec<String> = upserts.iter().map(|o| format!("{}={}", o.id, o.health.as_str())).collect();
            tracing::info!(%destination, upserts = ?up, removals = ?removals, "servers changed; committing the differences");
        }
        match propose(&self.raft, None, None, command).await {
            Ok((Outcome::Done, _)) => {}
            Ok((other, _)) => tracing::warn!(%destination, answer = ?other, "server sync refused"),
            // Not the leader any more: the supervisor stops the syncs.
            Err(e) => tracing::warn!(%destination, error = %e.message(), "server sync not committed; will retry"),
        }
    }
}
