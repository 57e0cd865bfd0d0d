//! Commands proposed through Raft and the answers the state machine gives.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::deploy::{DeployState, StepOutcome};
use crate::manifest::{Destination, Spec};

/// One Raft log entry's payload: the requests the leader proposed together,
/// applied in order, each answered on its own.
///
/// The leader batches the requests waiting to be proposed into one entry
/// (one log append, one fsync, one replication round for all of them).
/// On the wire and on disk a single request is written exactly as a bare
/// [`Request`] (what entries looked like before batching, so logs written
/// by earlier versions read back unchanged) and several as
/// `{"batch": [request, ...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Proposal(pub Vec<Request>);

impl From<Request> for Proposal {
    fn from(r: Request) -> Self {
        Proposal(vec![r])
    }
}

impl Serialize for Proposal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Batch<'a> {
            batch: &'a [Request],
        }
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => Batch { batch: many }.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // One pass over the input: either a batch or a bare request's fields.
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            batch: Option<Vec<Request>>,
            #[serde(default)]
            request_id: Option<String>,
            #[serde(default)]
            at_ms: Option<i64>,
            #[serde(default)]
            command: Option<Command>,
            #[serde(default)]
            origin: Option<Origin>,
        }
        let w = Wire::deserialize(d)?;
        match (w.batch, w.command, w.at_ms) {
            (Some(batch), None, None) => Ok(Proposal(batch)),
            (None, Some(command), Some(at_ms)) => {
                Ok(Proposal(vec![Request { request_id: w.request_id, at_ms, command, origin: w.origin }]))
            }
            (Some(_), _, _) => Err(D::Error::custom("a log entry has both a batch and a command of its own")),
            (None, None, _) => Err(D::Error::missing_field("command")),
            (None, Some(_), None) => Err(D::Error::missing_field("at_ms")),
        }
    }
}

/// One client request, as the state machine applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Client-chosen id. A request whose id was already applied is answered
    /// with the recorded response and changes nothing (a client retrying
    /// across a leader change must not apply an operation twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Unix milliseconds, stamped by the leader when it proposed the entry.
    /// Every replica applies the same value, so `apply` stays deterministic.
    pub at_ms: i64,
    pub command: Command,
    /// Who asked, how they proved it and from where: set on every command
    /// an operator (or a token) caused, absent on the leader's and nodes'
    /// own. The state machine keeps it as an audit record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// A client certificate signed by the cluster CA.
    Certificate,
    /// A bearer token (`fleetctl tokens create`) on the HTTP API.
    Token,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Certificate => "certificate",
            Via::Token => "token",
        }
    }
}

/// The origin of an operator action: what the audit log records of who.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The certificate's common name, or `token:NAME`.
    pub actor: String,
    pub via: Via,
    /// The client's address as the coordinator it connected to saw it
    /// (`ip:port`); empty when unknown.
    #[serde(default)]
    pub from: String,
}

/// Who asks: the subject common name of the caller's certificate.
pub type Holder = String;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Take the manual lock of a destination.
    AcquireLock { destination: String, holder: Holder, reason: String },
    /// Give it back. Only its holder may.
    ReleaseLock { destination: String, holder: Holder },
    /// Queue a deployment of a validated manifest.
    SubmitDeployment {
        /// Boxed: a spec is far larger than every other command.
        spec: Box<Spec>,
        actor: Holder,
        /// Cancel (timed out) if the lock is not granted within this long.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lock_wait_ms: Option<u64>,
        /// The caller's key: the same key answers with the same deployment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// A human checked a `compensation_failed` deployment: free its destination.
    ResolveDeployment { id: String, note: String, actor: Holder },
    /// Queue a new deployment of an earlier succeeded release of the same
    /// app and destination as deployment `id`.
    RollbackDeployment { id: String, to_release: Option<String>, timeout_ms: Option<u64>, actor: Holder },
    /// Cancel (compensate what ran). `timed_out`: the leader cancels it
    /// because its deadline passed.
    CancelDeployment { id: String, reason: String, actor: Holder, timed_out: bool },
    /// A node reported a step's (or an undo's) outcome; the leader proposes it.
    StepResult { deployment: String, outcome: StepOutcome },
    /// A worker node registered (or changed its labels, or came back).
    RegisterNode { id: String, labels: BTreeMap<String, String> },
    /// The leader presumed a node dead (it missed its heartbeat lease).
    NodeLost { node: String, why: String },
    /// The leader saw the bound of a deployment's wait for a lost node
    /// pass (its `node_wait`, or its deadline): stop waiting, skip that
    /// work, which fails the deployment or needs a human.
    NodeWaitExpired { deployment: String },
    /// Continue a paused canary (`fleetctl promote`; the leader, with its
    /// own actor, when the pause passed).
    PromoteDeployment { id: String, actor: Holder },
    /// Create or replace destinations.
    PutDestinations { destinations: Vec<Destination> },
    /// The leader's sync task of `destination` observed these differences
    /// (only the differences: nothing changed = no command). May queue a
    /// catch-up deployment for a server that joined.
    SyncServers {
        destination: String,
        #[serde(default)]
        upserts: Vec<crate::sync::ObservedServer>,
        #[serde(default)]
        removals: Vec<String>,
    },
    /// Remove a destination and its servers (refused while busy).
    RemoveDestination { name: String },
    /// Create an API token. Only the SHA-256 of its secret (hex) is
    /// stored; `fleetctl` makes the secret and never sends it.
    CreateToken {
        name: String,
        role: crate::auth::Role,
        sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_ms: Option<i64>,
        actor: Holder,
    },
    /// Revoke (forget) an API token: it is refused from then on.
    RevokeToken { name: String },
    /// Record an operator action that is not itself a state change (a
    /// Raft membership change): the audit log is its only effect.
    RecordAction { action: String, target: String, outcome: String },
}

impl Command {
    /// What the audit log calls this command, and what it acted on.
    pub fn action(&self) -> (&'static str, String) {
        match self {
            Command::AcquireLock { destination, .. } => ("lock.acquire", destination.clone()),
            Command::ReleaseLock { destination, .. } => ("lock.release", destination.clone()),
            Command::SubmitDeployment { spec, .. } => ("deploy", format!("{} to {}", spec.app, spec.destinations().join(","))),
            Command::ResolveDeployment { id, .. } => ("resolve", id.clone()),
            Command::RollbackDeployment { id, .. } => ("rollback", id.clone()),
            Command::CancelDeployment { id, .. } => ("cancel", id.clone()),
            Command::PromoteDeployment { id, .. } => ("promote", id.clone()),
            Command::StepResult { deployment, .. } => ("step_result", deployment.clone()),
            Command::RegisterNode { id, .. } => ("node.register", id.clone()),
            Command::NodeLost { node, .. } => ("node.lost", node.clone()),
            Command::NodeWaitExpired { deployment } => ("node_wait.expired", deployment.clone()),
            Command::PutDestinations { destinations } => {
                ("destinations.apply", destinations.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(","))
            }
            Command::SyncServers { destination, .. } => ("sync", destination.clone()),
            Command::RemoveDestination { name } => ("destinations.remove", name.clone()),
            Command::CreateToken { name, .. } => ("tokens.create", name.clone()),
            Command::RevokeToken { name } => ("tokens.revoke", name.clone()),
            Command::RecordAction { action, target, .. } => (audit_action_name(action), target.clone()),
        }
    }
}

/// `RecordAction`'s free-text action, as one of the audit log's names.
fn audit_action_name(action: &str) -> &'static str {
    match action {
        "cluster.add_learner" => "cluster.add_learner",
        "cluster.promote" => "cluster.promote",
        "cluster.remove" => "cluster.remove",
        _ => "other",
    }
}

/// A granted lock as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockView {
    pub destination: String,
    pub holder: Holder,
    /// Shared, not copied: the lock and the answer its request's dedup
    /// record keeps for a retry (`Response::Granted`) hold one string. A
    /// reason may be up to 16 KiB; a fill of 20 MB of locks held 38 MB of
    /// reasons when each was copied.
    #[serde(with = "shared_str")]
    pub reason: Arc<str>,
    pub since_ms: i64,
    /// Sequence number of the request that granted the lock (its Raft log
    /// index unless the leader batched it with others, see
    /// [`crate::State::apply`]). It only grows from one grant of a
    /// destination to the next, so a target that remembers the highest
    /// token it has seen can refuse a stale writer.
    pub fencing_token: u64,
}

/// Serde for an `Arc<str>` written as a plain string (serde's own needs
/// its `rc` feature, which would rebuild every crate that uses serde).
mod shared_str {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Arc<str>, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_str(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        String::deserialize(d).map(Arc::from)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Response {
    /// Acquire succeeded (or the caller already held it: same token).
    Granted { lock: LockView },
    /// Acquire refused: someone else holds it.
    Held { lock: LockView },
    /// Release succeeded.
    Released { destination: String },
    /// Release of a lock that nobody holds.
    NotHeld { destination: String },
    /// Release refused: someone else holds it.
    NotOwner { lock: LockView },
    /// The command was malformed; nothing changed.
    Invalid { reason: String },
    /// A deployment was queued, or changed, and stands in this state.
    Deployment { id: String, state: DeployState },
    /// Refused by policy (destination busy under `reject`, deployment
    /// already ended); nothing changed.
    Rejected { reason: String },
    /// No such deployment.
    NotFound { what: String },
    /// A step result with a stale token, epoch, step or attempt; ignored.
    Stale { reason: String },
    /// Applied; nothing to report.
    Done,
    /// A non-command entry (blank or membership change) was applied.
    Noop,
    /// An API token was created.
    TokenCreated { name: String },
}

impl Response {
    /// One line for the audit log: `ok`, or why nothing (or not all) happened.
    pub fn summary(&self) -> String {
        match self {
            Response::Granted { lock } => format!("granted, fencing token {}", lock.fencing_token),
            Response::Held { lock } => format!("refused: held by {}", lock.holder),
            Response::Released { .. } | Response::Done | Response::Noop | Response::TokenCreated { .. } => "ok".into(),
            Response::NotHeld { .. } => "refused: not held".into(),
            Response::NotOwner { lock } => format!("refused: held by {}", lock.holder),
            Response::Invalid { reason } => format!("invalid: {}", crate::names::shorten(reason)),
            Response::Deployment { id, state } => format!("{id} {}", state.as_str()),
            Response::Rejected { reason } => format!("rejected: {}", crate::names::shorten(reason)),
            Response::NotFound { what } => format!("not found: {}", crate::names::shorten(what)),
            Response::Stale { reason } => format!("stale: {}", crate::names::shorten(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, at_ms: i64) -> Request {
        Request {
            request_id: Some(id.into()),
            at_ms,
            command: Command::ReleaseLock { destination: "web".into(), holder: "ci".into() },
            origin: None,
        }
    }

    #[test]
    fn proposals_round_trip_and_read_entries_written_before_batching() {
        let one = Proposal(vec![req("a", 1)]);
        let many = Proposal(vec![req("a", 1), req("b", 2), req("c", 3)]);
        // (what is encoded, what it must look like on disk)
        let cases: [(&Proposal, serde_json::Value); 2] = [
            (&one, serde_json::to_value(&one.0[0]).unwrap()),
            (&many, serde_json::json!({ "batch": serde_json::to_value(&many.0).unwrap() })),
        ];
        for (p, on_disk) in cases {
            let raw = serde_json::to_vec(p).unwrap();
            assert_eq!(serde_json::from_slice::<serde_json::Value>(&raw).unwrap(), on_disk);
            assert_eq!(&serde_json::from_slice::<Proposal>(&raw).unwrap(), p);
        }
        // An entry an earlier version wrote: a bare request.
        let old = serde_json::to_vec(&req("z", 9)).unwrap();
        assert_eq!(serde_json::from_slice::<Proposal>(&old).unwrap(), Proposal(vec![req("z", 9)]));
    }

    #[test]
    fn malformed_entries_are_refused_with_a_reason() {
        let cases = [
            (r#"{"at_ms": 1}"#, "command"),
            (r#"{"command": {"op": "release_lock", "destination": "w", "holder": "h"}}"#, "at_ms"),
            (r#"{"batch": [], "at_ms": 1, "command": {"op": "release_lock", "destination": "w", "holder": "h"}}"#, "both"),
        ];
        for (raw, says) in cases {
            let e = serde_json::from_str::<Proposal>(raw).unwrap_err().to_string();
            assert!(e.contains(says), "{raw}: {e}");
        }
    }
}
