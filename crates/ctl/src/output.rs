//! What `fleetctl -o json` prints, one type per kind of object, so that
//! scripts and the integration tests read it typed: a renamed field fails
//! to parse instead of reading as missing.
//!
//! Commands that follow a deployment (`deploy`, `rollback`, `watch`,
//! `cancel --wait`) print one [`Line`] per line. The other commands print
//! one object (or array) of the type named in their doc.

use std::path::PathBuf;

use fleet_core::deploy::{DeployState, Deployment};
use serde::{Deserialize, Serialize};

pub use crate::progress::{StepEventStatus, WatchEvent};

/// One line of a command that follows a deployment, told apart by its
/// `type` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    /// The deployment was accepted (first line; the only one with `--detach`).
    Submitted(Submitted),
    /// `deploy --dry-run`: the plan, nothing submitted.
    Plan(Box<Plan>),
    /// The deployment ended (last line).
    Result(Box<ResultLine>),
    /// The command failed (last line).
    Error(ErrorLine),
    /// A lifecycle transition or a step change (`type` `transition` or `step`).
    #[serde(untagged)]
    Event(WatchEvent),
}

/// `{"type":"submitted",...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub id: String,
    pub state: DeployState,
    pub app: String,
    pub release: String,
    pub destination: String,
    pub destinations: Vec<String>,
    pub rollback_of: Option<String>,
}

impl Submitted {
    pub fn of(d: &Deployment) -> Self {
        Submitted {
            id: d.id.clone(),
            state: d.state,
            app: d.app.clone(),
            release: d.release.clone(),
            destination: d.destination.clone(),
            destinations: d.destinations().to_vec(),
            rollback_of: d.rollback_of.clone(),
        }
    }
}

/// `{"type":"plan","deployment":{...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub deployment: Deployment,
}

/// `{"type":"result","id","state","exit_code","deployment"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultLine {
    pub id: String,
    pub state: DeployState,
    pub exit_code: i32,
    /// Where each node serves the app (its route's address), once switched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served_at: Vec<fleet_core::deploy::ServedAt>,
    pub deployment: Deployment,
}

impl ResultLine {
    pub fn of(d: &Deployment, exit_code: i32) -> Self {
        ResultLine { id: d.id.clone(), state: d.state, exit_code, served_at: d.served_at(), deployment: d.clone() }
    }
}

/// `{"type":"error","exit_code",...}`: a failed call carries `message`
/// (and `id` when following a deployment); an unusable local file carries
/// `error` (`invalid_file` or `unreadable_file`), `file`, `reason` and,
/// for an invalid one, `field`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorLine {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ErrorLine {
    /// A call that failed with `message`.
    pub fn failed(exit_code: i32, id: Option<&str>, message: String) -> Self {
        ErrorLine { exit_code, id: id.map(str::to_string), message: Some(message), error: None, file: None, field: None, reason: None }
    }
}

/// One entry of `fleetctl history -o json` (an array of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub id: String,
    pub app: String,
    pub release: String,
    pub destination: String,
    pub destinations: Vec<String>,
    pub state: DeployState,
    /// The exit code `watch` would give it; `null` while it runs.
    pub exit_code: Option<u8>,
    pub timed_out: bool,
    pub submitted_by: String,
    pub submitted_ms: i64,
    /// When it ended; `null` while it runs.
    pub ended_ms: Option<i64>,
    pub previous_release: Option<String>,
    pub rollback_of: Option<String>,
    /// The reason of its last event.
    pub reason: Option<String>,
}

/// A destination lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockView {
    pub destination: String,
    pub holder: String,
    pub reason: String,
    pub since_ms: i64,
    pub fencing_token: u64,
}

impl From<&fleet_proto::Lock> for LockView {
    fn from(l: &fleet_proto::Lock) -> Self {
        LockView {
            destination: l.destination.clone(),
            holder: l.holder.clone(),
            reason: l.reason.clone(),
            since_ms: l.since_ms,
            fencing_token: l.fencing_token,
        }
    }
}

/// `lock acquire` / `lock release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReplyView {
    /// `granted`, `held`, `released`, `not_held`, `not_owner` (or `unspecified`).
    pub outcome: String,
    pub lock: Option<LockView>,
    pub applied_index: u64,
}

/// `lock status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockStatusView {
    pub locks: Vec<LockView>,
    pub applied_index: u64,
}

/// `lock queue DEST`: the holder and the deployments that hold or wait, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockQueueView {
    pub destination: String,
    pub lock_holder: Option<String>,
    pub lock_token: Option<u64>,
    pub queue: Vec<Deployment>,
}

/// One coordinator in `cluster` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: u64,
    pub addr: String,
    /// `voter` or `learner`.
    pub kind: String,
    /// `leader`, `follower`, `learner` or `unknown`.
    pub role: String,
    pub matched_index: u64,
    /// `null` when unknown (a `--local` answer).
    pub lag: Option<u64>,
}

impl From<&fleet_proto::Member> for MemberView {
    fn from(m: &fleet_proto::Member) -> Self {
        MemberView {
            id: m.id,
            addr: m.addr.clone(),
            kind: m.kind.clone(),
            role: m.role.clone(),
            matched_index: m.matched_index,
            lag: (m.lag != u64::MAX).then_some(m.lag),
        }
    }
}

/// `cluster add-learner`, `promote`, `remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipView {
    pub members: Vec<MemberView>,
    pub applied_index: u64,
}

impl From<&fleet_proto::MembershipReply> for MembershipView {
    fn from(r: &fleet_proto::MembershipReply) -> Self {
        MembershipView { members: r.members.iter().map(MemberView::from).collect(), applied_index: r.applied_index }
    }
}

/// `cluster status` (and `dev up`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatusView {
    pub cluster_id: String,
    /// `null` while an election is in progress.
    pub leader_id: Option<u64>,
    pub leader_addr: String,
    pub term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// Size of the answering coordinator's current snapshot.
    pub snapshot_bytes: u64,
    pub purged_index: u64,
    pub answered_by: u64,
    pub members: Vec<MemberView>,
}

impl From<&fleet_proto::ClusterStatusReply> for ClusterStatusView {
    fn from(r: &fleet_proto::ClusterStatusReply) -> Self {
        ClusterStatusView {
            cluster_id: r.cluster_id.clone(),
            leader_id: (r.leader_id != 0).then_some(r.leader_id),
            leader_addr: r.leader_addr.clone(),
            term: r.term,
            last_log_index: r.last_log_index,
            commit_index: r.commit_index,
            applied_index: r.applied_index,
            snapshot_index: r.snapshot_index,
            snapshot_bytes: r.snapshot_bytes,
            purged_index: r.purged_index,
            answered_by: r.answered_by,
            members: r.members.iter().map(MemberView::from).collect(),
        }
    }
}

/// `certs init` / `certs issue`: the files written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertsWritten {
    pub written: Vec<PathBuf>,
}

/// `dev down`: the pids stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevDown {
    /// Coordinators.
    pub stopped: Vec<u32>,
    pub stopped_nodes: Vec<u32>,
    pub stopped_instances: Vec<u32>,
    pub purged: bool,
}

/// A worker node (`fleetctl nodes -o json`) and a destination
/// (`fleetctl destinations -o json`), as the coordinators build them.
pub use fleet_core::views::{DestinationView as DestinationRecord, NodeView as NodeRecord, ServerView as ServerRecord};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_by_their_type() {
        let lines = [
            r#"{"type":"error","exit_code":2,"error":"invalid_file","file":"f.yaml","field":"app","reason":"missing"}"#,
            r#"{"type":"error","exit_code":1,"message":"no coordinator answered"}"#,
            r#"{"type":"error","id":"d3","exit_code":1,"message":"lost the watch"}"#,
            r#"{"type":"transition","id":"d1","at_ms":5,"from":null,"to":"queued","reason":"submitted","actor":"alice"}"#,
            r#"{"type":"step","id":"d1","step":1,"of":2,"name":"start","node":"n1","undo":false,"status":"running","attempt":1,"error":null,"duration_ms":null}"#,
        ];
        for text in lines {
            let line: Line = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let back: serde_json::Value = serde_json::to_value(&line).unwrap();
            let want: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(back, want, "{text}");
        }
        assert!(matches!(serde_json::from_str::<Line>(lines[3]).unwrap(), Line::Event(WatchEvent::Transition { .. })));
        // A renamed field fails loudly.
        assert!(serde_json::from_str::<Line>(r#"{"type":"error","exitcode":1}"#).is_err());
        assert!(serde_json::from_str::<Line>(r#"{"type":"nonsense"}"#).is_err());
    }

    #[test]
    fn node_and_destination_records_read_what_the_coordinator_sends() {
        let n: NodeRecord = serde_json::from_str(
            r#"{"id":"node-1","labels":{"env":"dev"},"registered_ms":1,"lost_ms":null,"connected":true,"connected_ms":2,"last_seen_ms":3}"#,
        )
        .unwrap();
        assert_eq!(n.last_seen_ms, Some(3));
        let d: DestinationRecord = serde_json::from_str(
            r#"{"name":"dev","adapter":"process","selector":{"env":"dev"},"queue":"queue","lock_holder":"deployment/d3",
                "lock_token":9,"queued":["d3","d4"],"current":{"web":"v1"},"nodes":["node-1"]}"#,
        )
        .unwrap();
        assert_eq!((d.lock_token, d.queued.len()), (Some(9), 2));
    }
}
