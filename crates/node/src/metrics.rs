//! The node's Prometheus metrics (`fleet-node --metrics-addr HOST:PORT`,
//! `GET /metrics`, plain HTTP: bind it to loopback or a network only your
//! Prometheus reaches; it shows step counts and timings, no secrets).
//!
//! One process-wide registry, recorded by the code that sees it happen:
//! steps run and undone per adapter and outcome with their durations,
//! steps running now, stale fencing tokens refused, and whether a work
//! stream to a leader is open.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Content type of [`render`]'s text (OpenMetrics, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    adapter: String,
    /// `ok` or `failed`.
    outcome: String,
    /// `run` or `undo`.
    direction: String,
}

struct Metrics {
    registry: Registry,
    steps: Family<StepLabels, Counter>,
    step_seconds: Family<StepLabels, Histogram>,
    running: Gauge,
    stale_tokens: Counter,
    connected: Gauge,
    connects: Counter,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("fleet_node");
        let steps = Family::<StepLabels, Counter>::default();
        registry.register("steps", "Steps (and undos) this node finished, by adapter and outcome", steps.clone());
        let step_seconds = Family::<StepLabels, Histogram>::new_with_constructor(step_histogram as fn() -> Histogram);
        registry.register("step_seconds", "How long this node's steps took, by adapter and outcome", step_seconds.clone());
        let running = Gauge::default();
        registry.register("steps_running", "Steps running on this node now", running.clone());
        let stale_tokens = Counter::default();
        registry.register(
            "stale_tokens_refused",
            "Steps refused because their fencing token is older than one this node has seen",
            stale_tokens.clone(),
        );
        let connected = Gauge::default();
        registry.register("leader_connected", "1 while a work stream to the leader is open, else 0", connected.clone());
        let connects = Counter::default();
        registry.register(
            "leader_connects",
            "Work streams opened to a leader (a reconnect after a failover counts again)",
            connects.clone(),
        );
        Metrics { registry, steps, step_seconds, running, stale_tokens, connected, connects }
    })
}

fn step_histogram() -> Histogram {
    // 10 ms .. ~160 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// A step started running here.
pub fn step_started() {
    metrics().running.inc();
}

/// A step that [`step_started`] ended after `took`.
pub fn step_finished(adapter: &str, ok: bool, undo: bool, took: Duration) {
    let m = metrics();
    m.running.dec();
    let labels = StepLabels {
        adapter: adapter.to_string(),
        outcome: if ok { "ok" } else { "failed" }.to_string(),
        direction: if undo { "undo" } else { "run" }.to_string(),
    };
    m.steps.get_or_create(&labels).inc();
    m.step_seconds.get_or_create(&labels).observe(took.as_secs_f64());
}

pub fn stale_token_refused() {
    metrics().stale_tokens.inc();
}

/// A work stream to a leader opened (`true`) or broke (`false`).
pub fn leader_connected(up: bool) {
    let m = metrics();
    m.connected.set(i64::from(up));
    if up {
        m.connects.inc();
    }
}

/// The metrics text.
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &metrics().registry);
    out
}

/// Serve `GET /metrics` on `addr`; returns the bound address (for port 0).
pub async fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr {addr}: cannot listen there; pick another address or port"))?;
    let bound = listener.local_addr().context("reading the metrics address")?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(|| async { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render()) }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_connections_show_in_the_text() {
        step_started();
        step_finished("process", true, false, Duration::from_millis(120));
        stale_token_refused();
        leader_connected(true);
        let text = render();
        // Other tests of this crate run steps through the same registry:
        // names and labels are checked here, values in tests/http.rs.
        for want in [
            "fleet_node_steps_total{adapter=\"process\",outcome=\"ok\",direction=\"run\"} ",
            "fleet_node_step_seconds_count{adapter=\"process\",outcome=\"ok\",direction=\"run\"} ",
            "fleet_node_steps_running ",
            "fleet_node_stale_tokens_refused_total ",
            "fleet_node_leader_connected ",
            "fleet_node_leader_connects_total ",
        ] {
            assert!(text.contains(want), "no `{want}` in:\n{text}");
        }
    }
}
