//! What this node runs, per (destination, app), for the leader's
//! destination sync: every [`REPORT_EVERY`] a background task asks each
//! adapter which destinations it runs something for
//! ([`Adapter::destinations`]), what it finds there ([`Adapter::discover`])
//! and whether each is healthy ([`Adapter::health`]). The connection sends
//! the latest report to the leader whenever it changes, and right after
//! `Hello` (a new leader learns it within seconds).

use std::sync::Arc;
use std::time::Duration;

use fleet_net::now_ms;
use fleet_proto::{Instance, InstanceReport};
use tokio::sync::watch;

use crate::adapter::Adapters;

/// How often the adapters are asked.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Longest a discover or a health check may take before the app is
/// reported unhealthy (a hung engine must not stall the report).
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// The latest report (empty until the first round finished).
pub type Reports = watch::Receiver<Arc<Vec<Instance>>>;

/// Start the reporting task. Detached: it runs as long as a receiver does
/// (the agent keeps one for the node's lifetime).
pub fn spawn(adapters: Adapters, every: Duration) -> Reports {
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = collect(&adapters).await;
            // Only a change wakes the connection (the leader keeps the last one).
            let changed = tx.send_if_modified(|old| {
                if **old == now {
                    return false;
                }
                *old = Arc::new(now);
                true
            });
            if changed {
                tracing::debug!("instance report changed");
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// One report round over every adapter.
pub async fn collect(adapters: &Adapters) -> Vec<Instance> {
    let mut out = Vec::new();
    for adapter in adapters.iter() {
        for destination in adapter.destinations() {
            let servers = match tokio::time::timeout(ASK_TIMEOUT, adapter.discover(&destination)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(adapter = adapter.name(), %destination, error = %e, "cannot discover what runs");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(adapter = adapter.name(), %destination, "discovering what runs took longer than {ASK_TIMEOUT:?}");
                    continue;
                }
            };
            for server in servers {
                let health = match tokio::time::timeout(ASK_TIMEOUT, adapter.health(&destination, &server)).await {
                    Ok(r) => r.map_err(|e| e.message),
                    Err(_) => Err(format!("its health check took longer than {}s", ASK_TIMEOUT.as_secs())),
                };
                out.push(Instance {
                    destination: destination.clone(),
                    app: server.app.clone(),
                    release: server.release.clone().unwrap_or_default(),
                    healthy: health.is_ok(),
                    error: health.err().unwrap_or_default(),
                    address: server.address.clone().unwrap_or_default(),
                    adapter: adapter.name().to_string(),
                });
            }
        }
    }
    out
}

/// The report as sent on the work stream.
pub fn message(instances: &[Instance]) -> InstanceReport {
    InstanceReport { at_ms: now_ms(), instances: instances.to_vec() }
}
