//! Simulated worker nodes: many per process, each with its own node
//! certificate (issued by the cluster's CA, so the leader identifies it by
//! its common name as it does a real `fleet-node`) and its own mTLS
//! connection speaking the real `Worker` protocol: `Hello` with labels,
//! `Welcome`, a `Heartbeat` every period the leader asks for, a redirect to
//! the leader when a follower answers.
//!
//! What is simulated is the work: a `StepAssignment` is answered at once
//! with a successful `StepResult` (an `Abort` with an aborted one), without
//! running anything. So a benchmark measures what the coordinators spend on
//! a thousand nodes (connections, heartbeats, registrations, scheduling
//! over them) and not what a thousand hosts would spend on their steps.
//! This is a load generator for `fleet-bench`, not a node to deploy with.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fleet_core::auth::Role;
use fleet_net::tls::TlsMaterial;
use fleet_net::{now_ms, LEADER_METADATA};
use fleet_proto::worker_client::WorkerClient;
use fleet_proto::{leader_message, node_message, ErrorClass, Heartbeat, Hello, NodeMessage, StepResult};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// What the simulated nodes did, summed over all of them.
#[derive(Default, Debug)]
pub struct Stats {
    /// Nodes whose stream to the leader is up (got `Welcome`) right now.
    pub connected: AtomicUsize,
    /// Streams that got a `Welcome`, over the whole run.
    pub sessions: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Step assignments answered.
    pub steps: AtomicU64,
    pub aborts: AtomicU64,
    /// Streams that could not be opened, or broke.
    pub failures: AtomicU64,
}

/// A set of simulated nodes; dropping it stops them.
pub struct SimNodes {
    pub stats: Arc<Stats>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SimNodes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SimNodes {
    /// Issue a node certificate for each of `nodes` (name, labels) in
    /// `certs` (which holds the cluster's CA) and connect them all to the
    /// coordinators at `addrs`.
    pub fn start(certs: &Path, nodes: &[(String, Vec<(String, String)>)], addrs: &[String]) -> anyhow::Result<SimNodes> {
        let stats = Arc::new(Stats::default());
        let mut tasks = Vec::with_capacity(nodes.len());
        for (i, (name, labels)) in nodes.iter().enumerate() {
            let (cert, key) = fleetctl::certs::issue(certs, Role::Node, name, &[], certs)
                .with_context(|| format!("issuing the certificate of simulated node {name}"))?;
            let tls = TlsMaterial::load(&certs.join("ca.pem"), &cert, &key, Some(Role::Node))?;
            let sim = Sim { tls, labels: labels.clone(), addrs: addrs.to_vec(), first: i % addrs.len(), stats: stats.clone() };
            tasks.push(tokio::spawn(sim.run()));
        }
        Ok(SimNodes { stats, tasks })
    }
}

struct Sim {
    tls: TlsMaterial,
    labels: Vec<(String, String)>,
    addrs: Vec<String>,
    first: usize,
    stats: Arc<Stats>,
}

impl Sim {
    async fn run(self) {
        let mut idx = self.first;
        let mut redirect: Option<String> = None;
        loop {
            let addr = redirect.take().unwrap_or_else(|| self.addrs[idx % self.addrs.len()].clone());
            match self.session(&addr).await {
                Ok(()) => {}
                Err(Some(leader)) => {
                    redirect = Some(leader);
                    continue;
                }
                Err(None) => {}
            }
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            idx += 1;
            // Spread the reconnects of a thousand nodes after a failover.
            let pause = 50 + rand::random::<u64>() % 200;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// One stream: `Ok` when it was up and ended, `Err(Some(leader))` on a
    /// redirect, `Err(None)` when it could not be opened.
    async fn session(&self, addr: &str) -> Result<(), Option<String>> {
        let endpoint = self.tls.endpoint(addr, Duration::from_secs(1)).map_err(|_| None)?;
        let channel = endpoint
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let mut client = WorkerClient::new(channel);
        let (tx, rx) = mpsc::channel::<NodeMessage>(256);
        let hello = Hello { labels: self.labels.iter().cloned().collect(), version: "simulated".into(), running: vec![] };
        tx.send(msg(node_message::Msg::Hello(hello))).await.map_err(|_| None)?;
        let mut inbound = match client.work(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let leader = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
                return Err(leader.filter(|l| l != addr));
            }
        };
        let heartbeat = match inbound.message().await {
            Ok(Some(m)) => match m.msg {
                Some(leader_message::Msg::Welcome(w)) => Duration::from_millis(w.heartbeat_ms.max(10)),
                _ => return Err(None),
            },
            _ => return Err(None),
        };
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if tx.send(msg(node_message::Msg::Heartbeat(Heartbeat { at_ms: now_ms() }))).await.is_err() {
                        break;
                    }
                    self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                m = inbound.message() => {
                    let Ok(Some(m)) = m else { break };
                    let result = match m.msg {
                        Some(leader_message::Msg::Assign(a)) => {
                            self.stats.steps.fetch_add(1, Ordering::Relaxed);
                            let now = now_ms();
                            StepResult { key: a.key, ok: true, started_ms: now, finished_ms: now, ..Default::default() }
                        }
                        Some(leader_message::Msg::Abort(a)) => {
                            self.stats.aborts.fetch_add(1, Ordering::Relaxed);
                            let now = now_ms();
                            StepResult {
                                key: a.key,
                                ok: false,
                                error: format!("aborted: {}", a.reason),
                                error_class: ErrorClass::Aborted as i32,
                                started_ms: now,
                                finished_ms: now,
                                ..Default::default()
                            }
                        }
                        _ => continue,
                    };
                    if tx.send(msg(node_message::Msg::Result(result))).await.is_err() {
                        break;
                    }
                }
            }
        }
        self.stats.connected.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }
}

fn msg(m: node_message::Msg) -> NodeMessage {
    NodeMessage { msg: Some(m) }
}
