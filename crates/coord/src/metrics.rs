//! The coordinator's Prometheus metrics (`GET /metrics` on the HTTP API).
//!
//! Two kinds: what is *observed* as it happens (proposal latency, step
//! durations, leader changes) lives in one process-wide registry, recorded
//! by the code that sees it; what is *state* (Raft term and indexes,
//! deployments by state, queue lengths, connected nodes) is read from Raft's
//! metrics, the applied state and the leader's hub when scraped, so it can
//! never drift from what `fleetctl` shows.

use std::sync::OnceLock;
use std::time::Duration;

use fleet_core::deploy::DeployState;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::hub::Hub;
use crate::raft_types::Raft;
use crate::store::sm::StateReader;

/// Content type of [`render`]'s text (OpenMetrics, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    ok,
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub adapter: String,
    pub outcome: Outcome,
    /// `run` or `undo`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabel {
    part: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabel {
    destination: String,
}

struct Metrics {
    registry: Registry,
    proposal_seconds: Histogram,
    proposals_failed: Counter,
    entry_requests: Histogram,
    step_seconds: Family<StepLabels, Histogram>,
    control_seconds: Family<MethodLabel, Histogram>,
    leader_changes: Counter,
    fast_elections: Counter,
    term: Gauge,
    last_log_index: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    is_leader: Gauge,
    deployments: Family<StateLabel, Gauge>,
    queue_length: Family<DestinationLabel, Gauge>,
    nodes_connected: Gauge,
    nodes_registered: Gauge,
    rocksdb_memory: Family<PartLabel, Gauge>,
    resident: Gauge,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("fleet");
        let proposal_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "raft_proposal_seconds",
            "Time from proposing a command to its commit and apply (leader)",
            proposal_seconds.clone(),
        );
        let proposals_failed = Counter::default();
        registry.register("raft_proposals_failed", "Proposals that did not commit (not the leader, shut down)", proposals_failed.clone());
        let entry_requests = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register(
            "raft_entry_requests",
            "Client requests per log entry this leader proposed (it batches what is waiting)",
            entry_requests.clone(),
        );
        registry.register(
            "raft_log_fsync_seconds",
            "Duration of each fsync of the Raft log (one covers every append queued meanwhile)",
            crate::observe::fsync_histogram().clone(),
        );
        registry.register(
            "snapshot_build_hold_seconds",
            "Each snapshot build's hold on the applied state while it takes its view of the state (applies wait meanwhile)",
            crate::observe::snapshot_hold_histogram().clone(),
        );
        for stage in crate::observe::Stage::ALL {
            let (name, help) = stage.describe();
            registry.register(name, help, stage.histogram().clone());
        }
        let step_seconds = Family::<StepLabels, Histogram>::new_with_constructor(step_histogram as fn() -> Histogram);
        registry.register("step_seconds", "Duration of step results recorded by this leader, by adapter and outcome", step_seconds.clone());
        let control_seconds = Family::<MethodLabel, Histogram>::new_with_constructor(control_histogram as fn() -> Histogram);
        registry.register(
            "control_call_seconds",
            "Control calls this coordinator answered, by method: from the call's arrival to its answer (a stream: to its start)",
            control_seconds.clone(),
        );
        let leader_changes = Counter::default();
        registry.register("raft_leader_changes", "Times this coordinator saw the leader change", leader_changes.clone());
        let fast_elections = Counter::default();
        registry.register(
            "raft_fast_elections",
            "Elections this coordinator started because the leader's stream broke and its lease ran out (not on its own timer)",
            fast_elections.clone(),
        );
        let term = Gauge::default();
        registry.register("raft_term", "Current Raft term", term.clone());
        let last_log_index = Gauge::default();
        registry.register("raft_last_log_index", "Last index in this coordinator's Raft log", last_log_index.clone());
        let commit_index = Gauge::default();
        registry.register(
            "raft_commit_index",
            "Highest index a majority holds (leader); the applied index elsewhere",
            commit_index.clone(),
        );
        let applied_index = Gauge::default();
        registry.register("raft_applied_index", "Last index applied to this coordinator's state machine", applied_index.clone());
        let is_leader = Gauge::default();
        registry.register("raft_is_leader", "1 on the leader, 0 elsewhere", is_leader.clone());
        let deployments = Family::<StateLabel, Gauge>::default();
        registry.register("deployments", "Deployments in the replicated state, by lifecycle state", deployments.clone());
        let queue_length = Family::<DestinationLabel, Gauge>::default();
        registry.register("queue_length", "Deployments holding or waiting for each destination", queue_length.clone());
        let nodes_connected = Gauge::default();
        registry.register(
            "nodes_connected",
            "Worker nodes with a work stream open to this coordinator (the leader)",
            nodes_connected.clone(),
        );
        let nodes_registered = Gauge::default();
        registry.register("nodes_registered", "Worker nodes registered and not presumed lost", nodes_registered.clone());
        let rocksdb_memory = Family::<PartLabel, Gauge>::default();
        registry.register(
            "rocksdb_memory_bytes",
            "What this coordinator's RocksDB holds in memory, by part (memtables, block_cache, table_readers)",
            rocksdb_memory.clone(),
        );
        let resident = Gauge::default();
        registry.register("process_resident_bytes", "This coordinator's resident memory (RSS)", resident.clone());
        Metrics {
            registry,
            rocksdb_memory,
            resident,
            proposal_seconds,
            proposals_failed,
            entry_requests,
            step_seconds,
            control_seconds,
            leader_changes,
            fast_elections,
            term,
            last_log_index,
            commit_index,
            applied_index,
            is_leader,
            deployments,
            queue_length,
            nodes_connected,
            nodes_registered,
        }
    })
}

fn step_histogram() -> Histogram {
    // 10 ms .. ~160 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

fn control_histogram() -> Histogram {
    // 20 µs .. ~2.6 s.
    Histogram::new(exponential_buckets(0.00002, 2.0, 18))
}

/// This coordinator answered a `Control` call to `method` after `took`.
pub fn control_call(method: &str, took: Duration) {
    metrics().control_seconds.get_or_create(&MethodLabel { method: method.to_string() }).observe(took.as_secs_f64());
}

/// A gRPC service timed call by call (`fleet_control_call_seconds`, by
/// method): from the call's arrival at the service until its answer's
/// head is ready. Set beside a write's Raft stages, the rest of what a
/// client waits is the wire and the tasks on either end.
#[derive(Clone)]
pub struct Timed<S>(pub S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for Timed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Timed<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>, Response = tonic::codegen::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        // `/fleet.Control/AcquireLock` → `AcquireLock`.
        let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let started = std::time::Instant::now();
        let answer = self.0.call(req);
        Box::pin(async move {
            let r = answer.await;
            // A method the service does not have is answered
            // `unimplemented` (gRPC status 12) and not counted: the label
            // would be whatever a caller sent.
            let unimplemented = matches!(&r, Ok(answer) if answer.headers().get("grpc-status").is_some_and(|v| v == "12"));
            if !unimplemented {
                control_call(&method, started.elapsed());
            }
            r
        })
    }
}

/// A proposal committed (and was applied) after `took`.
pub fn proposal_committed(took: Duration) {
    metrics().proposal_seconds.observe(took.as_secs_f64());
}

/// The leader proposed one log entry carrying `requests` client requests.
pub fn entry_proposed(requests: usize) {
    metrics().entry_requests.observe(requests as f64);
}

/// A proposal did not commit.
pub fn proposal_failed() {
    metrics().proposals_failed.inc();
}

/// The leader recorded a step result that took `took` on its node.
pub fn step_recorded(adapter: &str, ok: bool, undo: bool, took: Duration) {
    let labels = StepLabels {
        adapter: adapter.to_string(),
        outcome: if ok { Outcome::ok } else { Outcome::failed },
        direction: if undo { "undo" } else { "run" }.to_string(),
    };
    metrics().step_seconds.get_or_create(&labels).observe(took.as_secs_f64());
}

/// This coordinator stood for election on the fast path
/// (`leader_watch`).
pub fn fast_election() {
    metrics().fast_elections.inc();
}

/// Count leader changes as this coordinator sees them, for as long as Raft
/// runs. Detached: it ends when Raft's metrics channel closes at shutdown.
pub fn watch_leader(raft: &Raft) {
    // Server metrics: they change with the leader, not with each write.
    let mut rx = raft.server_metrics();
    tokio::spawn(async move {
        let mut leader = rx.borrow_and_update().current_leader;
        while rx.changed().await.is_ok() {
            let now = rx.borrow_and_update().current_leader;
            if now != leader && now.is_some() {
                metrics().leader_changes.inc();
            }
            if now.is_some() {
                leader = now;
            }
        }
    });
}

/// The metrics text: state read now, observations so far.
pub fn render(raft: &Raft, state: &StateReader, hub: &Hub) -> String {
    let m = metrics();
    let rm = raft.metrics().borrow().clone();
    let commit_index = commit_index(&rm);
    m.term.set(rm.current_term as i64);
    m.last_log_index.set(rm.last_log_index.unwrap_or(0) as i64);
    m.applied_index.set(rm.last_applied.map(|l| l.index).unwrap_or(0) as i64);
    m.commit_index.set(commit_index as i64);
    m.is_leader.set(i64::from(rm.state == openraft::ServerState::Leader));
    state.read(|a| {
        m.deployments.clear();
        for s in ALL_STATES {
            m.deployments.get_or_create(&StateLabel { state: s.as_str().into() }).set(0);
        }
        for d in a.state.deployments() {
            m.deployments.get_or_create(&StateLabel { state: d.state.as_str().into() }).inc();
        }
        m.queue_length.clear();
        for d in a.state.destinations() {
            m.queue_length.get_or_create(&DestinationLabel { destination: d.name.clone() }).set(a.state.queue(&d.name).len() as i64);
        }
        let nodes = a.state.nodes().collect::<Vec<_>>();
        m.nodes_registered.set(nodes.iter().filter(|n| n.lost_ms.is_none()).count() as i64);
        m.nodes_connected.set(nodes.iter().filter(|n| hub.liveness(&n.id).connected).count() as i64);
    });
    let rocks = state.rocksdb_memory();
    for (part, bytes) in [("memtables", rocks.memtables), ("block_cache", rocks.block_cache), ("table_readers", rocks.table_readers)] {
        m.rocksdb_memory.get_or_create(&PartLabel { part }).set(bytes as i64);
    }
    m.resident.set(fleet_net::resident_bytes("self").unwrap_or(0) as i64);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

/// The highest index a majority of voters hold, as the leader sees it; a
/// follower answers its applied index (it cannot know more).
pub fn commit_index(m: &openraft::RaftMetrics<crate::raft_types::NodeId, openraft::BasicNode>) -> u64 {
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    if m.state != openraft::ServerState::Leader {
        return applied;
    }
    let last = m.last_log_index.unwrap_or(0);
    let mut matched: Vec<u64> =
        m.membership_config
            .membership()
            .voter_ids()
            .map(|id| {
                if id == m.id {
                    last
                } else {
                    m.replication.as_ref().and_then(|r| r.get(&id)).and_then(|l| l.map(|l| l.index)).unwrap_or(0)
                }
            })
            .collect();
    if matched.is_empty() {
        return applied;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched[matched.len() / 2]
}

const ALL_STATES: [DeployState; 9] = [
    DeployState::Queued,
    DeployState::Running,
    DeployState::Compensating,
    DeployState::Failed,
    DeployState::Cancelling,
    DeployState::Cancelled,
    DeployState::Succeeded,
    DeployState::CompensationFailed,
    DeployState::Superseded,
];

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tonic::codegen::http::{Request, Response};
    use tonic::codegen::Service;

    use super::*;

    /// Answers `Nope` the way a generated server answers a method it does
    /// not have (gRPC status 12 in the head), anything else with an empty OK.
    #[derive(Clone)]
    struct Fake;

    impl Service<Request<()>> for Fake {
        type Response = Response<()>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<()>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<()>) -> Self::Future {
            let mut answer = Response::new(());
            if req.uri().path().ends_with("/Nope") {
                answer.headers_mut().insert("grpc-status", "12".parse().expect("a header value"));
            }
            Box::pin(async move { Ok(answer) })
        }
    }

    fn exposition() -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics().registry).expect("metrics encode to text");
        text
    }

    #[tokio::test]
    async fn control_calls_are_timed_by_method_and_unknown_methods_are_not_labels() {
        let mut timed = Timed(Fake);
        for path in ["/fleet.Control/TimedProbe", "/fleet.Control/TimedProbe", "/fleet.Control/Nope"] {
            timed.call(Request::builder().uri(path).body(()).expect("a request")).await.expect("the fake answers");
        }
        let text = exposition();
        assert!(text.contains(r#"fleet_control_call_seconds_count{method="TimedProbe"} 2"#), "{text}");
        assert!(!text.contains(r#"method="Nope""#), "a method the service does not have became a label:\n{text}");
    }
}
