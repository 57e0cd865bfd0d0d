//! `GET /api/events`: server-sent events of deployment and destination
//! changes, resumable with `Last-Event-ID`.
//!
//! One task (the journal) publishes, whenever entries are applied (at most
//! every [`MIN_INTERVAL`]), the records that changed as one batch, keyed by
//! the Raft log index applied at that moment. It looks only at what the
//! applied entries touched (the state machine hands it the changed keys),
//! so its cost follows the write rate, not the size of the state; when too
//! much changed at once to list (or a snapshot replaced the state) it
//! publishes a `reset` and clients reload their lists. Every
//! coordinator applies the same log, so indexes mean the same on all of
//! them. A batch's last event carries the index as its SSE `id` (earlier
//! ones carry none), so a client that reconnects with the last id it saw
//! gets every batch after it, and a batch it saw part of again: nothing is
//! lost. The journal keeps recent batches in memory; a client asking for an
//! index older than that (or from before this coordinator started) gets a
//! `reset` event and should reload its lists.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
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

/// One record that changed. `kind` is the SSE event name.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: &'static str,
    pub data: String,
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
        let journal = Journal { ring: ring.clone(), tx: tx.clone() };
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
            for b in backlog {
                if !send_batch(&tx, &b).await {
                    return;
                }
                sent = b.index;
            }
            loop {
                match rx.recv().await {
                    Ok(b) if b.index <= sent => {}
                    Ok(b) => {
                        if !send_batch(&tx, &b).await {
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

async fn send_batch(tx: &tokio::sync::mpsc::Sender<SseEvent>, b: &Batch) -> bool {
    let last = b.changes.len().saturating_sub(1);
    for (i, c) in b.changes.iter().enumerate() {
        let mut e = SseEvent::default().event(c.kind).data(c.data.clone());
        if i == last {
            e = e.id(b.index.to_string());
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
                changes.push(Change { kind: "reset", data });
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
            if let Ok(data) = serde_json::to_string(&d.redacted()) {
                changes.push(Change { kind: "deployment", data });
            }
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
                        changes.push(Change { kind: "destination", data });
                    }
                    destinations.insert(name, v);
                }
                Some(_) => {}
                // A lock or queue of a name that is no destination is not shown.
                None => {
                    if destinations.remove(&name).is_some() {
                        if let Ok(data) = serde_json::to_string(&Removed { id: &name }) {
                            changes.push(Change { kind: "destination_removed", data });
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

    /// The events of a batch.
    fn seen(b: &Batch) -> Vec<Seen> {
        b.changes
            .iter()
            .map(|c| {
                let v: serde_json::Value = serde_json::from_str(&c.data).unwrap();
                let key = v.get("name").or_else(|| v.get("id")).and_then(|x| x.as_str()).unwrap_or_default().to_string();
                (c.kind, key)
            })
            .collect()
    }

    #[tokio::test]
    async fn the_journal_publishes_exactly_what_applied_entries_touched() {
        let dir = tempfile::tempdir().unwrap();
        let db = store::open(&dir.path().join("data"), "aaaa", 1).unwrap();
        let (mut sm, reader) = StateMachine::open(db).unwrap();
        let mut views = BTreeMap::new();
        // The first look takes everything (and is not published).
        assert!(diff(&reader, &mut views).changes.iter().all(|c| c.kind == "reset"));

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
            let mut got = seen(&diff(&reader, &mut views));
            got.sort();
            assert_eq!(got, want, "after {what}");
        }
        // Nothing applied since: nothing to publish.
        assert!(diff(&reader, &mut views).changes.is_empty());
    }
}
