//! `GET /api/events`: server-sent events of deployment and destination
//! changes, resumable with `Last-Event-ID`.
//!
//! One task (the journal) publishes, whenever entries are applied (at most
//! every [`MIN_INTERVAL`]), the records that changed as one batch, keyed by
//! the Raft log index applied at that moment. It looks only at what the
//! applied entries touched (the state machine hands it the changed keys),
//! so its cost follows the write rate, not the size of the state. A batch
//! names the deployments that changed; each is rendered (as JSON) when it
//! is sent to a client, from the state then, which is at least as new as
//! the batch. So a coordinator no client listens to renders nothing, and
//! a long deployment does not cost a render of every step record on every
//! step (that was most of each coordinator's CPU in a 300-step rollout:
//! docs/benchmarks.md, "The event journal renders only what is sent"). When too
//! much changed at once to list (or a snapshot replaced the state) it
//! publishes a `reset` and clients reload their lists. Every
//! coordinator applies the same log, so indexes mean the same on all of
//! them. A batch's last event carries the index as its SSE `id` (earlier
//! ones carry none), so a client that reconnects with the last id it saw
//! gets every batch after it, and a batch it saw part of again: nothing is
//! lost. The journal keeps recent batches in memory; a client asking for an
//! index older than that (or from before this coordinator started) gets a
//! `reset` event and should reload its lists.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use fleet_core::state::{touched, Touched};
use fleet_core::views::DestinationView;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::store::sm::{StateReader, Taker};

/// Batches kept for clients that reconnect.
const KEEP_BATCHES: usize = 4096;
/// The journal compares at most this often (many entries per batch under load).
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// One record that changed.
#[derive(Debug, Clone)]
pub enum Change {
    /// An event rendered when the batch was made; `kind` is the SSE event name.
    Event { kind: &'static str, data: String },
    /// Deployment `d<n>` changed: a `deployment` event rendered when sent.
    Deployment(u64),
}

/// The changes seen when the applied index reached `index`.
#[derive(Debug)]
pub struct Batch {
    pub index: u64,
    pub changes: Vec<Change>,
}

#[derive(Default)]
struct Ring {
    /// Batches after this index are all in `batches`.
    since: u64,
    batches: VecDeque<Arc<Batch>>,
}

/// A handle on the journal: subscribe to new batches, replay recent ones.
#[derive(Clone)]
pub struct Journal {
    ring: Arc<Mutex<Ring>>,
    tx: broadcast::Sender<Arc<Batch>>,
    /// What deployment events are rendered from.
    state: StateReader,
}

#[derive(Serialize)]
struct Removed<'a> {
    id: &'a str,
}

#[derive(Serialize)]
struct Reset {
    /// The index from which this stream is complete.
    index: u64,
    reason: &'static str,
}

impl Journal {
    /// Start the journal over `state`. Detached: it ends when the state
    /// machine's applied-index channel closes (Raft stopped).
    pub fn spawn(state: StateReader) -> Journal {
        let (tx, _) = broadcast::channel(1024);
        let ring = Arc::new(Mutex::new(Ring::default()));
        let journal = Journal { ring: ring.clone(), tx: tx.clone(), state: state.clone() };
        tokio::spawn(async move {
            let mut applied = state.applied_index();
            let mut destinations: BTreeMap<String, DestinationView> = BTreeMap::new();
            // The first look only fills the memory: the stream is complete from here.
            let first = diff(&state, &mut destinations);
            ring.lock().unwrap_or_else(|p| p.into_inner()).since = first.index;
            loop {
                let tick = tokio::time::Instant::now() + MIN_INTERVAL;
                if applied.changed().await.is_err() {
                    return;
                }
                tokio::time::sleep_until(tick).await;
                applied.borrow_and_update();
                let batch = diff(&state, &mut destinations);
                if batch.changes.is_empty() {
                    continue;
                }
                let batch = Arc::new(batch);
                {
                    let mut r = ring.lock().unwrap_or_else(|p| p.into_inner());
                    r.batches.push_back(batch.clone());
                    while r.batches.len() > KEEP_BATCHES {
                        if let Some(old) = r.batches.pop_front() {
                            r.since = old.index;
                        }
                    }
                }
                // No subscriber is fine.
                let _ = tx.send(batch);
            }
        });
        journal
    }

    /// An SSE stream: batches after `last_seen` (if still kept), then live.
    pub fn stream(&self, last_seen: Option<u64>) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
        // Subscribe before reading the ring: a batch published in between
        // is then in both, and the index check drops the copy.
        let mut rx = self.tx.subscribe();
        let (backlog, since, newest) = {
            let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let newest = r.batches.back().map(|b| b.index).unwrap_or(r.since);
            let backlog: Vec<Arc<Batch>> = match last_seen {
                Some(n) if n >= r.since => r.batches.iter().filter(|b| b.index > n).cloned().collect(),
                _ => vec![],
            };
            (backlog, r.since, newest)
        };
        let (tx, out) = tokio::sync::mpsc::channel::<SseEvent>(64);
        let state = self.state.clone();
        // Detached: ends when the client goes away (send fails) or the journal stops.
        tokio::spawn(async move {
            let mut sent = match last_seen {
                Some(n) if n >= since => n,
                Some(n) => {
                    let reason = "the events after this id are no longer kept here; reload the lists";
                    let data = serde_json::to_string(&Reset { index: newest, reason }).unwrap_or_default();
                    tracing::debug!(last_seen = n, since, "SSE client resumed too far back; sent reset");
                    if tx.send(SseEvent::default().event("reset").id(newest.to_string()).data(data)).await.is_err() {
                        return;
                    }
                    newest
                }
                None => {
                    let data = serde_json::to_string(&Reset { index: newest, reason: "start" }).unwrap_or_default();
                    if tx.send(SseEvent::default().event("hello").id(newest.to_string()).data(data)).await.is_err() {
                        return;
                    }
                    newest
                }
            };
            // A deployment is rendered as it is when sent: of the batches
            // replayed, only the last that names it needs to send it.
            let last_mention: HashMap<u64, u64> = backlog.iter().flat_map(|b| b.deployments().map(move |n| (n, b.index))).collect();
            for b in backlog {
                let events = render(&state, &b, |n| last_mention.get(&n) == Some(&b.index));
                if !send_events(&tx, events, b.index).await {
                    return;
                }
                sent = b.index;
            }
            loop {
                match rx.recv().await {
                    Ok(b) if b.index <= sent => {}
                    Ok(b) => {
                        if !send_events(&tx, render(&state, &b, |_| true), b.index).await {
                            return;
                        }
                        sent = b.index;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow a reader: let it resume from what it has.
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(out);
        Sse::new(futures::StreamExt::map(stream, Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
    }
}

impl Batch {
    /// The deployments this batch names.
    fn deployments(&self) -> impl Iterator<Item = u64> + '_ {
        self.changes.iter().filter_map(|c| match c {
            Change::Deployment(n) => Some(*n),
            Change::Event { .. } => None,
        })
    }
}

/// The events of batch `b` as (kind, data): its deployments (those `send`
/// accepts) rendered from the state now, which is at least as new as the
/// batch. A deployment pruned since is left out.
fn render(state: &StateReader, b: &Batch, send: impl Fn(u64) -> bool) -> Vec<(&'static str, String)> {
    state.read(|a| {
        b.changes
            .iter()
            .filter_map(|c| match c {
                Change::Event { kind, data } => Some((*kind, data.clone())),
                Change::Deployment(n) if send(*n) => {
                    let d = a.state.deployment(&format!("d{n}"))?;
                    serde_json::to_string(&d.redacted()).ok().map(|data| ("deployment", data))
                }
                Change::Deployment(_) => None,
            })
            .collect()
    })
}

/// Send one batch's events; the last carries the batch's index as its id.
async fn send_events(tx: &tokio::sync::mpsc::Sender<SseEvent>, events: Vec<(&'static str, String)>, index: u64) -> bool {
    let last = events.len().saturating_sub(1);
    for (i, (kind, data)) in events.into_iter().enumerate() {
        let mut e = SseEvent::default().event(kind).data(data);
        if i == last {
            e = e.id(index.to_string());
        }
        if tx.send(e).await.is_err() {
            return false;
        }
    }
    true
}

/// What changed since the journal last looked; updates its memory of the
/// destination views (a lock or queue change may leave a view as it was).
fn diff(state: &StateReader, destinations: &mut BTreeMap<String, DestinationView>) -> Batch {
    // Take the keys before reading the state: a key applied in between is
    // both seen now and listed next time (sent twice, never lost).
    let took = state.take_touched(Taker::Journal);
    state.read(|a| {
        let index = a.last_applied.map(|l| l.index).unwrap_or(0);
        let mut changes = Vec::new();
        if took.everything {
            destinations.clear();
            for d in a.state.destinations() {
                if let Some(v) = DestinationView::of(&a.state, &d.name) {
                    destinations.insert(d.name.clone(), v);
                }
            }
            // (The journal's first look is not published: it only fills the memory.)
            let reason = "more changed at once than the journal lists; reload the lists";
            if let Ok(data) = serde_json::to_string(&Reset { index, reason }) {
                changes.push(Change::Event { kind: "reset", data });
            }
            return Batch { index, changes };
        }
        let mut dirty: BTreeSet<&str> = BTreeSet::new();
        let mut all_destinations = false;
        // A deployment's header and step records are keys of their own: one
        // event per deployment, however many of its keys changed.
        let mut deployments: BTreeSet<u64> = BTreeSet::new();
        for key in &took.keys {
            match touched(key) {
                Touched::Deployment(n) => {
                    deployments.insert(n);
                }
                Touched::Destination(name) => {
                    dirty.insert(name);
                }
                Touched::Nodes => all_destinations = true,
                Touched::Other => {}
            }
        }
        for n in deployments {
            // Pruned deployments end without an event.
            let Some(d) = a.state.deployment(&format!("d{n}")) else { continue };
            changes.push(Change::Deployment(n));
            // Its destinations show what runs there and what waits.
            dirty.extend(d.destinations().iter().map(String::as_str));
        }
        let names: Vec<String> = match all_destinations {
            true => a.state.destinations().map(|d| d.name.clone()).chain(destinations.keys().cloned()).collect(),
            false => dirty.into_iter().map(str::to_string).collect(),
        };
        for name in names {
            match DestinationView::of(&a.state, &name) {
                Some(v) if destinations.get(&name) != Some(&v) => {
                    if let Ok(data) = serde_json::to_string(&v) {
                        changes.push(Change::Event { kind: "destination", data });
                    }
                    destinations.insert(name, v);
                }
                Some(_) => {}
                // A lock or queue of a name that is no destination is not shown.
                None => {
                    if destinations.remove(&name).is_some() {
                        if let Ok(data) = serde_json::to_string(&Removed { id: &name }) {
                            changes.push(Change::Event { kind: "destination_removed", data });
                        }
                    }
                }
            }
        }
        Batch { index, changes }
    })
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    use fleet_core::manifest::{Destination, QueuePolicy, DEFAULT_NODE_WAIT_MS};
    use fleet_core::{Command, Proposal, Request};

    use super::*;
    use crate::raft_types::TypeConfig;
    use crate::store::{self, sm::StateMachine};

    fn entry(index: u64, commands: Vec<Command>) -> Entry<TypeConfig> {
        let requests = commands.into_iter().map(|command| Request { request_id: None, at_ms: 1_000, command, origin: None }).collect();
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(Proposal(requests)) }
    }

    fn destination(name: &str) -> Destination {
        Destination {
            name: name.into(),
            adapter: "process".into(),
            selector: [("env".to_string(), "t".to_string())].into(),
            queue: QueuePolicy::Queue,
            node_wait_ms: DEFAULT_NODE_WAIT_MS,
        }
    }

    /// An event as (kind, destination name or deployment id).
    type Seen = (&'static str, String);

    /// The events of a batch, rendered now.
    fn seen(reader: &StateReader, b: &Batch) -> Vec<Seen> {
        render(reader, b, |_| true)
            .into_iter()
            .map(|(kind, data)| {
                let v: serde_json::Value = serde_json::from_str(&data).unwrap();
                let key = v.get("name").or_else(|| v.get("id")).and_then(|x| x.as_str()).unwrap_or_default().to_string();
                (kind, key)
            })
            .collect()
    }

    /// A state machine in a new data dir, and the journal's first look at it.
    fn journal() -> (tempfile::TempDir, StateMachine, StateReader, BTreeMap<String, DestinationView>, Batch) {
        let dir = tempfile::tempdir().unwrap();
        let db = store::open(&dir.path().join("data"), "aaaa", 1).unwrap();
        let (sm, reader) = StateMachine::open(db).unwrap();
        let mut views = BTreeMap::new();
        let first = diff(&reader, &mut views);
        (dir, sm, reader, views, first)
    }

    #[tokio::test]
    async fn the_journal_publishes_exactly_what_applied_entries_touched() {
        let (_dir, mut sm, reader, mut views, first) = journal();
        // The first look takes everything (and is not published).
        assert!(seen(&reader, &first).iter().all(|(kind, _)| *kind == "reset"));

        let ci = || "ci".to_string();
        let d = |s: &str| ("destination", s.to_string());
        // (what one applied entry carries, the events it must produce)
        let cases: Vec<(Vec<Command>, Vec<Seen>)> = vec![
            (vec![Command::PutDestinations { destinations: vec![destination("api"), destination("web")] }], vec![d("api"), d("web")]),
            // A lock moves: only that destination's view.
            (vec![Command::AcquireLock { destination: "web".into(), holder: ci(), reason: "r".into() }], vec![d("web")]),
            // A lock on a name that is no destination shows nothing.
            (vec![Command::AcquireLock { destination: "elsewhere".into(), holder: ci(), reason: "r".into() }], vec![]),
            // A batch: both requests' destinations, once each.
            (
                vec![
                    Command::ReleaseLock { destination: "web".into(), holder: ci() },
                    Command::AcquireLock { destination: "api".into(), holder: ci(), reason: "r".into() },
                ],
                vec![d("api"), d("web")],
            ),
            // A node joins: every destination it is selected by.
            (
                vec![Command::RegisterNode { id: "n1".into(), labels: [("env".to_string(), "t".to_string())].into() }],
                vec![d("api"), d("web")],
            ),
            // A refused release changes no view.
            (vec![Command::ReleaseLock { destination: "web".into(), holder: ci() }], vec![]),
            // A destination removed.
            (vec![Command::RemoveDestination { name: "web".into() }], vec![("destination_removed", "web".into())]),
        ];
        for (i, (commands, want)) in cases.into_iter().enumerate() {
            let what = format!("{commands:?}");
            sm.apply([entry(i as u64 + 1, commands)]).await.unwrap();
            let mut got = seen(&reader, &diff(&reader, &mut views));
            got.sort();
            assert_eq!(got, want, "after {what}");
        }
        // Nothing applied since: nothing to publish.
        assert!(diff(&reader, &mut views).changes.is_empty());
    }

    /// The state of the deployment in a `deployment` event.
    fn rendered_state(events: &[(&'static str, String)]) -> Option<fleet_core::deploy::DeployState> {
        let (_, data) = events.iter().find(|(kind, _)| *kind == "deployment")?;
        let d: fleet_core::deploy::Deployment = serde_json::from_str(data).unwrap();
        Some(d.state)
    }

    #[tokio::test]
    async fn a_deployment_is_rendered_as_it_is_when_sent() {
        let (_dir, mut sm, reader, mut views, _) = journal();
        let labels: BTreeMap<String, String> = [("env".to_string(), "t".to_string())].into();
        let manifest = "app: web\nrelease: v1\ndestination: web\nrun: [srv]\nhealth: { tcp: true }\n";
        let spec = fleet_core::manifest::parse_manifest("f", manifest, &Default::default()).unwrap();
        let submit = Command::SubmitDeployment { spec: Box::new(spec), actor: "op".into(), lock_wait_ms: None, idempotency_key: None };
        let setup =
            vec![Command::RegisterNode { id: "n1".into(), labels }, Command::PutDestinations { destinations: vec![destination("web")] }];
        sm.apply([entry(1, setup)]).await.unwrap();
        let answers = sm.apply([entry(2, vec![submit])]).await.unwrap();
        let Some(fleet_core::Response::Deployment { id, state }) = answers[0].first().cloned() else {
            panic!("submit answered {answers:?}")
        };
        let submitted = diff(&reader, &mut views);
        // The batch names the deployment; nothing is rendered until it is sent.
        assert!(submitted.deployments().eq([fleet_core::state::deployment_number(&id).unwrap()]), "{:?}", submitted.changes);
        assert_eq!(rendered_state(&render(&reader, &submitted, |_| true)), Some(state));

        let cancel = Command::CancelDeployment { id: id.clone(), reason: "test".into(), actor: "op".into(), timed_out: false };
        sm.apply([entry(3, vec![cancel])]).await.unwrap();
        let now = reader.read(|a| a.state.deployment(&id).unwrap().state);
        assert_ne!(now, state, "the cancel changed the deployment");
        // The older batch, sent now, shows the deployment as it is now:
        // never older than the batch, and never older than what a later
        // batch already sent.
        assert_eq!(rendered_state(&render(&reader, &submitted, |_| true)), Some(now));
        // Left out where a later batch of a replay sends it anyway.
        assert_eq!(rendered_state(&render(&reader, &submitted, |_| false)), None);
    }
}
