//! A follower's fast path to an election when the leader's process dies.
//!
//! openraft 0.9 lets a follower that knew a leader stand for election only
//! after the leader lease (the maximum election timeout) *plus* its own
//! randomized timeout, checked on a tick of 1.5 heartbeats: 450–675 ms
//! with the default timings. Most of that wait is a guess about whether
//! the leader is gone. A leader whose process died leaves evidence: its
//! connections close. So each voting follower keeps one `Raft.Leading`
//! stream open to the leader it follows (`raft_service` serves
//! it). When that stream breaks while the follower still follows the same
//! leader in the same term, the follower stands for election
//! ([`openraft::Raft::trigger`]) once the lease has run out since it last
//! heard from the leader (an accepted AppendEntries, [`Contact`]), plus a
//! small margin and a stagger by rank, so two followers do not split the
//! vote.
//!
//! Safety is openraft's, unchanged: a voter refuses a vote while its own
//! lease on the leader runs, and grants only to a candidate whose log is
//! at least as up to date. What this changes is liveness: the election
//! starts at lease + margin instead of lease + a random timeout. Without
//! the evidence (a partition, a frozen leader, a host that vanished
//! without closing its sockets) nothing is triggered and openraft's own
//! timers decide, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_proto::raft_client::RaftClient;
use fleet_proto::LeadingRequest;
use openraft::ServerState;
use tokio::task::JoinHandle;

use crate::raft_types::{NodeId, Raft};
use crate::tls::TlsMaterial;

/// Waited past the lease: a voter's lease runs from when *it* accepted
/// the leader's last AppendEntries, which can be a little after us.
const MARGIN: Duration = Duration::from_millis(10);
/// Extra wait per rank: the follower with the lowest id stands first, the
/// next one only if no leader emerged meanwhile.
const STAGGER: Duration = Duration::from_millis(40);
/// Pause before watching again after the stream could not be opened.
const RETRY: Duration = Duration::from_millis(50);

/// When this coordinator last accepted an AppendEntries from a leader.
#[derive(Debug)]
pub struct Contact {
    start: Instant,
    /// Microseconds since `start`, plus one (0 = never).
    at_us: AtomicU64,
}

impl Default for Contact {
    fn default() -> Self {
        Contact { start: Instant::now(), at_us: AtomicU64::new(0) }
    }
}

impl Contact {
    /// An AppendEntries from the leader was accepted just now.
    pub fn touch(&self) {
        self.at_us.store(self.start.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
    }

    /// When that last happened.
    pub fn last(&self) -> Option<Instant> {
        match self.at_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.start + Duration::from_micros(us - 1)),
        }
    }
}

/// The leader this follower follows, as the Raft metrics say.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Followed {
    leader: NodeId,
    term: u64,
    addr: String,
    /// This follower's place among the voters other than the leader, by id.
    rank: u32,
}

fn followed(raft: &Raft, me: NodeId) -> Option<Followed> {
    // Read in place; the server metrics change only with role, vote,
    // leader or membership.
    let m = raft.server_metrics();
    let m = m.borrow();
    if m.state != ServerState::Follower {
        return None;
    }
    let leader = m.current_leader.filter(|l| *l != me)?;
    let membership = m.membership_config.membership();
    let mut voters: Vec<NodeId> = membership.voter_ids().filter(|v| *v != leader).collect();
    voters.sort_unstable();
    let rank = voters.iter().position(|v| *v == me)? as u32;
    let addr = membership.get_node(&leader)?.addr.clone();
    Some(Followed { leader, term: m.vote.leader_id().get_term(), addr, rank })
}

/// Start the watch (runs on every coordinator; acts only while it is a
/// voting follower). `lease` is openraft's leader lease: the maximum
/// election timeout.
pub fn spawn(raft: Raft, me: NodeId, tls: TlsMaterial, contact: Arc<Contact>, lease: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut metrics = raft.server_metrics();
        loop {
            let Some(f) = followed(&raft, me) else {
                if metrics.changed().await.is_err() {
                    return;
                }
                continue;
            };
            if watch(&raft, me, &tls, &contact, lease, &f).await.is_err() {
                tokio::time::sleep(RETRY).await;
            }
        }
    })
}

/// Watch `f` until what this follower follows changes (`Ok`), or the
/// stream could not be opened (`Err`: try again after a pause).
async fn watch(raft: &Raft, me: NodeId, tls: &TlsMaterial, contact: &Contact, lease: Duration, f: &Followed) -> Result<(), ()> {
    let changed = || followed(raft, me).as_ref() != Some(f);
    let channel = crate::network::channel(tls, &f.addr).map_err(|_| ())?;
    let mut client = RaftClient::new(channel);
    let mut stream = match client.leading(LeadingRequest { term: f.term }).await {
        Ok(s) => s.into_inner(),
        Err(_) => return Err(()),
    };
    // Ends when the leader closes it (it stopped leading this term) or the
    // connection breaks; either way, look at what the metrics say.
    let mut metrics = raft.server_metrics();
    loop {
        tokio::select! {
            m = stream.message() => {
                match m {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            r = metrics.changed() => {
                if r.is_err() || changed() {
                    return Ok(());
                }
            }
        }
    }
    if changed() {
        return Ok(());
    }
    // The stream broke under a leader we still follow: stand for election
    // as soon as the lease has run out, unless it is heard from meanwhile.
    // Never heard from it (restarted since): openraft's timers decide.
    let Some(heard) = contact.last() else {
        let _ = metrics.changed().await;
        return Ok(());
    };
    tokio::time::sleep_until((heard + lease + MARGIN + STAGGER * f.rank).into()).await;
    if changed() || contact.last() != Some(heard) {
        return Ok(());
    }
    tracing::info!(
        leader = f.leader,
        term = f.term,
        silent_ms = heard.elapsed().as_millis() as u64,
        "the leader's stream broke and its lease ran out: standing for election"
    );
    crate::metrics::fast_election();
    let _ = raft.trigger().elect().await;
    // Give the election its course before watching again.
    let _ = tokio::time::timeout(lease, async {
        while !changed() {
            if metrics.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    Ok(())
}
