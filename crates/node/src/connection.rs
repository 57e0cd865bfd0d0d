//! The work stream: connect to a coordinator, follow the redirect to the
//! leader, say `Hello`, then heartbeat, take assignments, aborts and
//! forgets, and send results, until the stream breaks; then reconnect.
//!
//! A node that cannot reach a leader stops acting before its lease is gone
//! ([`stop_after`]): the leader presumes it dead [`NODE_LEASE_MS`] after it
//! last heard from it and hands its steps to another node, so whatever
//! still runs here is aborted first. Otherwise a node cut off from the
//! coordinators (not dead) would run its step on, next to the node that
//! took it over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::leader::NODE_LEASE_MS;
use fleet_net::{now_ms, LEADER_METADATA};
use fleet_proto::worker_client::WorkerClient;
use fleet_proto::{leader_message, node_message, Heartbeat, Hello, NodeMessage, StepResult};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::agent::{Agent, RESEND};
use crate::identity::{NodeIdentity, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// Longest pause between connection attempts (plus jitter).
const MAX_BACKOFF: Duration = Duration::from_millis(1000);
/// Longest pause for a while after a stream broke: an election is likely
/// under way, and the saga waits for this node to find the new leader, so
/// it asks often (a refused attempt costs a follower next to nothing).
const ELECTION_BACKOFF: Duration = Duration::from_millis(100);
/// How long after a broken stream `ELECTION_BACKOFF` applies.
const ELECTION_WINDOW: Duration = Duration::from_secs(10);
/// How long to wait for the coordinator to answer the stream / Welcome.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time left between this node aborting its steps and the leader handing
/// them over: for the abort itself (killing a process group) and for
/// scheduling delays.
const STOP_MARGIN: Duration = Duration::from_millis(1000);

/// How long after its work stream broke a node that found no leader again
/// stops what it runs, given the heartbeat period of that stream. The
/// leader presumes the node lost [`NODE_LEASE_MS`] after the last heartbeat
/// it received; that heartbeat is up to one period older than the moment
/// the link failed, and the stream breaks up to a keepalive interval plus
/// its timeout after that moment. [`STOP_MARGIN`] must be left over.
pub fn stop_after(heartbeat: Duration) -> Duration {
    let lease = Duration::from_millis(NODE_LEASE_MS as u64);
    lease.saturating_sub(KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + heartbeat + STOP_MARGIN)
}

/// What the connection loop knows of the streams that got a `Welcome`.
struct Sessions {
    /// How many did (watched by the task that stops work after a break).
    welcomed: watch::Sender<u64>,
    /// The heartbeat period of the last one.
    heartbeat: Duration,
}

pub struct Connector {
    pub identity: NodeIdentity,
    pub addrs: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub agent: Arc<Agent>,
    /// Print `connected` / `lost` lines on stdout.
    pub print: bool,
}

/// How one session on one address ended.
enum End {
    /// A follower named the leader: go there now.
    Redirect(String),
    /// Could not open the stream.
    Failed(String),
    /// The stream was up and broke.
    Broken(String),
}

impl Connector {
    /// Keep a work stream to the leader open, forever.
    pub async fn run(mut self, mut results: mpsc::UnboundedReceiver<StepResult>) {
        let mut idx = 0usize;
        let mut redirect: Option<String> = None;
        let mut backoff = Duration::from_millis(50);
        let mut failed_in_round = 0usize;
        let mut last_error = String::new();
        let mut broke_at: Option<tokio::time::Instant> = None;
        let mut sessions = Sessions { welcomed: watch::channel(0).0, heartbeat: Duration::from_millis(1000) };
        loop {
            let addr = redirect.take().unwrap_or_else(|| self.addrs[idx].clone());
            let welcomed = *sessions.welcomed.borrow();
            let end = self.session(&addr, &mut results, &mut sessions).await;
            if *sessions.welcomed.borrow() != welcomed {
                crate::metrics::leader_connected(false);
                // A stream to the leader was up and ended (broke, or the
                // leader stepped down): stop acting unless another comes up.
                self.stop_unless_reconnected(&sessions);
            }
            match end {
                End::Redirect(leader) if leader != addr => {
                    tracing::info!(from = %addr, to = %leader, "following the redirect to the leader");
                    if !self.addrs.contains(&leader) {
                        self.addrs.push(leader.clone());
                    }
                    if let Some(i) = self.addrs.iter().position(|a| *a == leader) {
                        idx = i;
                    }
                    redirect = Some(leader);
                    continue;
                }
                End::Redirect(_) => {
                    let e = format!("{addr} says it is not the leader but names itself; waiting for the election");
                    log_failure(&mut last_error, &e);
                }
                End::Failed(e) => log_failure(&mut last_error, &format!("{addr}: {e}")),
                End::Broken(e) => {
                    if self.print {
                        println!("fleet-node {} lost the leader at {addr}: {e}; reconnecting", self.agent.node());
                    }
                    tracing::warn!(%addr, error = %e, "work stream broke; reconnecting");
                    last_error.clear();
                    backoff = Duration::from_millis(50);
                    failed_in_round = 0;
                    broke_at = Some(tokio::time::Instant::now());
                    // Try the next coordinator first: the old leader may be
                    // dead or frozen, and any other answers at once (it
                    // redirects to the new leader).
                    idx = (idx + 1) % self.addrs.len();
                    tokio::time::sleep(jitter(backoff)).await;
                    continue;
                }
            }
            failed_in_round += 1;
            idx = (idx + 1) % self.addrs.len();
            if failed_in_round >= self.addrs.len() {
                tokio::time::sleep(jitter(backoff)).await;
                let electing = broke_at.is_some_and(|t| t.elapsed() < ELECTION_WINDOW);
                backoff = (backoff * 2).min(if electing { ELECTION_BACKOFF } else { MAX_BACKOFF });
                failed_in_round = 0;
            }
        }
    }

    /// Abort every running step if no new stream gets a `Welcome` within
    /// [`stop_after`] (in a task of its own).
    fn stop_unless_reconnected(&self, sessions: &Sessions) {
        let after = stop_after(sessions.heartbeat);
        let mut welcomed = sessions.welcomed.subscribe();
        let seen = *welcomed.borrow_and_update();
        let agent = self.agent.clone();
        // Detached: it ends by itself, at the latest after `after`.
        tokio::spawn(async move {
            let reconnected = tokio::time::timeout(after, welcomed.wait_for(|n| *n != seen)).await;
            if matches!(reconnected, Ok(Ok(_))) {
                return;
            }
            let reason = format!(
                "it has not reached a leader for {} since its work stream broke, so its lease runs out and the leader \
                 may hand the step to another node",
                crate::util::human(after)
            );
            let stopped = agent.stop_all(&reason);
            if stopped > 0 {
                tracing::warn!(steps = stopped, "no leader within {after:?} of losing the work stream; stopped every running step");
            }
        });
    }

    async fn session(&self, addr: &str, results: &mut mpsc::UnboundedReceiver<StepResult>, sessions: &mut Sessions) -> End {
        let channel = match self.identity.channel(addr) {
            Ok(c) => c,
            Err(e) => return End::Failed(e.to_string()),
        };
        let mut client = WorkerClient::new(channel);
        let (tx, rx) = mpsc::channel::<NodeMessage>(1024);
        let hello = Hello {
            labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            running: self.agent.running(),
        };
        if tx.send(msg(node_message::Msg::Hello(hello))).await.is_err() {
            return End::Failed("internal: the outgoing stream closed".into());
        }
        let response = match tokio::time::timeout(ANSWER_TIMEOUT, client.work(ReceiverStream::new(rx))).await {
            Err(_) => return End::Failed(format!("no answer within {ANSWER_TIMEOUT:?}")),
            Ok(Err(status)) => return failed(&status),
            Ok(Ok(r)) => r,
        };
        let mut inbound = response.into_inner();
        let welcome = match tokio::time::timeout(ANSWER_TIMEOUT, inbound.message()).await {
            Err(_) => return End::Failed(format!("no Welcome within {ANSWER_TIMEOUT:?}")),
            Ok(Err(status)) => return failed(&status),
            Ok(Ok(None)) => return End::Failed("the coordinator closed the stream before Welcome".into()),
            Ok(Ok(Some(m))) => match m.msg {
                Some(leader_message::Msg::Welcome(w)) => w,
                _ => return End::Failed("the first message was not Welcome; is the coordinator a different version?".into()),
            },
        };
        if self.print {
            println!("fleet-node {} connected to leader {} at {addr} (term {})", self.agent.node(), welcome.leader_id, welcome.term);
        }
        tracing::info!(%addr, leader = welcome.leader_id, term = welcome.term, heartbeat_ms = welcome.heartbeat_ms, "connected");
        sessions.heartbeat = Duration::from_millis(if welcome.heartbeat_ms == 0 { 1000 } else { welcome.heartbeat_ms });
        sessions.welcomed.send_modify(|n| *n += 1);
        crate::metrics::leader_connected(true);

        // Results finished while disconnected are among the recent ones.
        while results.try_recv().is_ok() {}
        for r in self.agent.recent_results(RESEND) {
            if tx.send(msg(node_message::Msg::Result(r))).await.is_err() {
                return End::Broken("the outgoing stream closed".into());
            }
        }
        // What runs here, for the leader's destination sync: now, then on every change.
        let mut reports = self.agent.instance_reports();
        let first = crate::report::message(&reports.borrow_and_update());
        if tx.send(msg(node_message::Msg::Report(first))).await.is_err() {
            return End::Broken("the outgoing stream closed".into());
        }

        let period = Duration::from_millis(if welcome.heartbeat_ms == 0 { 1000 } else { welcome.heartbeat_ms });
        let mut heartbeat = tokio::time::interval(period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(m)) => match m.msg {
                        Some(leader_message::Msg::Assign(a)) => self.agent.assign(a),
                        Some(leader_message::Msg::Abort(a)) => self.agent.abort(a),
                        Some(leader_message::Msg::Forget(f)) => self.agent.forget(f),
                        Some(leader_message::Msg::Welcome(w)) => {
                            let p = Duration::from_millis(w.heartbeat_ms.max(1));
                            if p != heartbeat.period() {
                                heartbeat = tokio::time::interval(p);
                                heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            }
                        }
                        None => {}
                    },
                    Ok(None) => return End::Broken("the leader closed the stream".into()),
                    Err(status) => return match leader_of(&status) {
                        Some(l) => {
                            if self.print {
                                println!("fleet-node {} lost the leader at {addr}: it stepped down; following to {l}", self.agent.node());
                            }
                            End::Redirect(l)
                        }
                        None => End::Broken(describe(&status)),
                    },
                },
                _ = heartbeat.tick() => {
                    let hb = msg(node_message::Msg::Heartbeat(Heartbeat { at_ms: now_ms() }));
                    if tx.send(hb).await.is_err() {
                        return End::Broken("the outgoing stream closed".into());
                    }
                }
                Some(r) = results.recv() => {
                    if tx.send(msg(node_message::Msg::Result(r))).await.is_err() {
                        return End::Broken("the outgoing stream closed".into());
                    }
                }
                Ok(()) = reports.changed() => {
                    let report = crate::report::message(&reports.borrow_and_update());
                    if tx.send(msg(node_message::Msg::Report(report))).await.is_err() {
                        return End::Broken("the outgoing stream closed".into());
                    }
                }
            }
        }
    }
}

fn msg(m: node_message::Msg) -> NodeMessage {
    NodeMessage { msg: Some(m) }
}

fn leader_of(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map(str::to_string)
}

fn failed(status: &Status) -> End {
    match leader_of(status) {
        Some(l) => End::Redirect(l),
        None => End::Failed(describe(status)),
    }
}

/// The status in one line: its message and the causes under it.
fn detail(status: &Status) -> String {
    let mut out = status.message().to_string();
    let mut src = std::error::Error::source(status);
    while let Some(e) = src {
        let t = e.to_string();
        if !out.contains(&t) && !t.contains("code: '") {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = e.source();
    }
    out
}

fn describe(status: &Status) -> String {
    let detail = detail(status);
    let lower = detail.to_ascii_lowercase();
    if matches!(status.code(), Code::Unavailable | Code::Unknown)
        && (lower.contains("certificate") || lower.contains("handshake") || lower.contains("unknownissuer"))
    {
        return format!(
            "TLS failed: {detail}. The coordinators and this node need certificates from the same cluster CA (--ca, --cert, --key)"
        );
    }
    match status.code() {
        Code::PermissionDenied => format!(
            "permission denied: {}; the work stream needs a certificate of role `node` (`fleetctl certs issue node NAME`)",
            status.message()
        ),
        Code::Unauthenticated => format!("not authenticated: {}", status.message()),
        Code::Unimplemented => "the coordinator has no Worker service; is it an older version?".into(),
        c => format!("{c:?}: {detail}"),
    }
}

fn log_failure(last: &mut String, e: &str) {
    if last != e {
        tracing::warn!("cannot reach the leader: {e}");
        *last = e.to_string();
    } else {
        tracing::debug!("cannot reach the leader: {e}");
    }
}

/// `d` plus up to half of it again, at random.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    d + Duration::from_millis(rand::random_range(0..=ms / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_stops_before_the_leader_can_hand_it_over() {
        // (heartbeat period, how long after the break the node stops)
        let cases = [(500, 1500), (1000, 1000), (100, 1900), (4000, 0), (60_000, 0)];
        for (heartbeat, want) in cases {
            let hb = Duration::from_millis(heartbeat);
            let got = stop_after(hb);
            assert_eq!(got, Duration::from_millis(want), "heartbeat {heartbeat} ms");
            // The leader hands work over no earlier than a lease after the
            // last heartbeat it heard: the node must be done by then.
            let worst_break = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + hb;
            if want > 0 {
                assert!(worst_break + got + STOP_MARGIN <= Duration::from_millis(NODE_LEASE_MS as u64), "heartbeat {heartbeat} ms");
            }
        }
    }
}
