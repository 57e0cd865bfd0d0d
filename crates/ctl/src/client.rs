//! A `Control` client that knows several coordinator addresses, follows
//! leader redirects, and retries across addresses when one dies.
//!
//! Retrying a write is safe because every write carries a request id that
//! the state machine deduplicates: a request applied before the leader died
//! is answered from the record, not applied again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use fleet_net::tls::TlsMaterial;
use fleet_net::wire::detail_of;
use fleet_net::LEADER_METADATA;
use fleet_proto::control_client::ControlClient;
use fleet_proto::ErrorCode;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long to wait for a coordinator to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// Pause after every address failed once, doubled each round up to
/// [`MAX_BACKOFF`]. Short: while a new leader is being elected the answers
/// are cheap refusals, and the new leader should be found within a few
/// tens of milliseconds of its election.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(50);
/// Largest reply fleetctl accepts.
const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;

/// Where and as whom to connect. Serialized as a context file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Context {
    pub addrs: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Context {
    pub fn load(path: &Path) -> anyhow::Result<Context> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read context file {}; run `fleetctl dev up` or pass --addr/--ca/--cert/--key", path.display())
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("context file {} is not valid JSON of {{addrs, ca, cert, key}}", path.display()))
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("context serializes");
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

pub struct Client {
    addrs: Vec<String>,
    tls: TlsMaterial,
    channels: std::collections::HashMap<String, Channel>,
    /// Index into `addrs` of the coordinator that answered last.
    current: usize,
    /// How long to keep retrying when no coordinator answers.
    pub retry_for: Duration,
    /// Per-call timeout.
    pub call_timeout: Duration,
}

impl Client {
    pub fn new(ctx: &Context) -> anyhow::Result<Client> {
        if ctx.addrs.is_empty() {
            bail!("no coordinator address; pass --addr HOST:PORT[,HOST:PORT...] or set FLEET_ADDR");
        }
        // Any role may connect; the coordinator decides what it may do.
        let tls = TlsMaterial::load(&ctx.ca, &ctx.cert, &ctx.key, None)
            .map_err(|e| anyhow!("{e}; set FLEET_CA/FLEET_CERT/FLEET_KEY (or --ca/--cert/--key) or use a context file"))?;
        Ok(Client {
            addrs: ctx.addrs.clone(),
            tls,
            channels: Default::default(),
            current: 0,
            retry_for: Duration::from_secs(20),
            call_timeout: Duration::from_secs(10),
        })
    }

    fn channel(&mut self, addr: &str) -> anyhow::Result<Channel> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let ch = self.tls.endpoint(addr, CONNECT_TIMEOUT)?.connect_lazy();
        self.channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Run `op` against the cluster: follow redirects to the leader, move
    /// on to the next address when one does not answer, until `retry_for`.
    pub async fn call<T, F, Fut>(&mut self, op: F) -> anyhow::Result<T>
    where
        F: FnMut(ControlClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let timeout = self.call_timeout;
        self.call_with_timeout(timeout, op).await
    }

    /// One unary `Control` call with `req` (cloned per attempt), each
    /// attempt bounded by the client's call timeout; answers the reply.
    pub async fn unary<Req, T, F, Fut>(&mut self, req: Req, mut op: F) -> anyhow::Result<T>
    where
        Req: Clone,
        F: FnMut(ControlClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(|cl, timeout| {
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(timeout);
            let reply = op(cl, r);
            async move { reply.await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Like [`Client::call`], with each attempt bounded by `timeout`
    /// (a call that may legitimately take long, such as adding a learner
    /// that needs a large snapshot, or a lock acquire that waits).
    pub async fn call_with_timeout<T, F, Fut>(&mut self, timeout: Duration, mut op: F) -> anyhow::Result<T>
    where
        F: FnMut(ControlClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut addr = self.addrs[self.current].clone();
        let mut backoff = FIRST_BACKOFF;
        // Failures since the last pause: try every address once before
        // sleeping, so a dead leader costs one refused connection, not a backoff.
        let mut failed_in_round = 0usize;
        // The last address that failed without naming a leader: a follower
        // that has not yet noticed the leader died still points there, and
        // following it would only fail again.
        let mut failed_addr: Option<String> = None;
        loop {
            // Lock status of every lock can be large (reasons are up to 16 KiB each).
            let client = ControlClient::new(self.channel(&addr)?).max_decoding_message_size(MAX_REPLY_BYTES);
            // Bound every attempt here, whatever the caller set: a coordinator
            // that accepted the connection but never answers must not hang us.
            let attempt = tokio::time::timeout(timeout, op(client, timeout)).await;
            let status = match attempt.unwrap_or_else(|_| Err(Status::deadline_exceeded(format!("no answer within {timeout:?}")))) {
                Ok(v) => {
                    if let Some(i) = self.addrs.iter().position(|a| *a == addr) {
                        self.current = i;
                    }
                    return Ok(v);
                }
                Err(s) => s,
            };
            let leader = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok());
            if let Some(leader) = leader {
                if leader != addr && failed_addr.as_deref() != Some(leader) {
                    addr = leader.to_string();
                    if !self.addrs.contains(&addr) {
                        self.addrs.push(addr.clone());
                    }
                    continue;
                }
            } else {
                failed_addr = Some(addr.clone());
            }
            let detail = error_chain(&status);
            if !retryable(&status, &detail) {
                return Err(ServerError::new(&status, &addr).into());
            }
            let last_error = format!("{addr}: {}", describe(&status, &detail, &addr));
            if tokio::time::Instant::now() + backoff > deadline {
                bail!(
                    "no coordinator answered within {:?} (tried {}); last error: {last_error}. Check that the coordinators run, that the addresses are right, and that your certificate comes from this cluster's CA (FLEET_CA/FLEET_CERT/FLEET_KEY)",
                    self.retry_for,
                    self.addrs.join(", ")
                );
            }
            failed_in_round += 1;
            if failed_in_round >= self.addrs.len() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                failed_in_round = 0;
            }
            self.current = (self.current + 1) % self.addrs.len();
            addr = self.addrs[self.current].clone();
        }
    }
}

/// A coordinator's definitive answer to a call (not worth retrying), with
/// its gRPC code so commands can choose their exit code.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub code: Code,
    /// The server's own message.
    pub message: String,
    /// Refused by policy: the answer carries the `rejected` error detail.
    pub rejected: bool,
    /// What fleetctl prints: the message with what it means.
    text: String,
}

impl ServerError {
    pub fn new(status: &Status, addr: &str) -> ServerError {
        let detail = error_chain(status);
        ServerError {
            code: status.code(),
            message: status.message().to_string(),
            rejected: detail_of(status) == Some(ErrorCode::Rejected),
            text: describe(status, &detail, addr),
        }
    }

    /// Exit code (DESIGN.md) for this answer: invalid input or an unknown
    /// id → 2, refused by policy (the `rejected` error detail) → 7,
    /// anything else → 1.
    pub fn exit_code(&self) -> i32 {
        match self.code {
            _ if self.rejected => crate::exit::REJECTED,
            Code::InvalidArgument | Code::NotFound => crate::exit::USAGE,
            _ => crate::exit::CLUSTER,
        }
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for ServerError {}

/// Exit code for an error from a call: the server's answer decides
/// ([`ServerError::exit_code`]); an error without one (nobody answered)
/// is a cluster error.
pub fn exit_code_of(e: &anyhow::Error) -> i32 {
    e.chain().find_map(|c| c.downcast_ref::<ServerError>()).map(ServerError::exit_code).unwrap_or(crate::exit::CLUSTER)
}

fn error_chain(status: &Status) -> String {
    let mut out = status.message().to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(status);
    while let Some(e) = src {
        out.push_str(": ");
        out.push_str(&e.to_string());
        src = e.source();
    }
    out
}

/// Worth another try elsewhere: the coordinator is gone, not elected yet,
/// or the call timed out (writes are deduplicated, so repeating is safe).
fn retryable(status: &Status, detail: &str) -> bool {
    if is_tls_rejection(status, detail) {
        return false;
    }
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted)
}

/// A handshake refused by either side surfaces as a transport error whose
/// cause mentions the certificate; a server's own answers never do.
fn is_tls_rejection(status: &Status, detail: &str) -> bool {
    if !matches!(status.code(), Code::Unavailable | Code::Unknown) {
        return false;
    }
    let d = detail.to_ascii_lowercase();
    d.contains("certificate") || d.contains("handshake") || d.contains("unknownissuer") || d.contains("bad_certificate")
}

fn describe(status: &Status, detail: &str, addr: &str) -> String {
    if is_tls_rejection(status, detail) {
        return format!(
            "TLS with {addr} failed: {detail}. The server and this client must use certificates from the same cluster CA (FLEET_CA, FLEET_CERT, FLEET_KEY)"
        );
    }
    match status.code() {
        Code::PermissionDenied => format!("permission denied: {}", status.message()),
        Code::Unauthenticated => format!("not authenticated: {}", status.message()),
        Code::InvalidArgument => format!("invalid request: {}", status.message()),
        // The server's messages say what was not found, or why it refused.
        Code::NotFound | Code::FailedPrecondition => status.message().to_string(),
        _ => format!("{:?}: {detail}", status.code()),
    }
}

/// A fresh request id for one logical operation (reused on every retry).
pub fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_follows_the_answer() {
        let code = |s: Status| ServerError::new(&s, "c1").exit_code();
        assert_eq!(code(fleet_net::wire::rejected("rejected: web is busy")), crate::exit::REJECTED);
        // The detail decides, not the wording.
        assert_eq!(code(Status::failed_precondition("rejected: web is busy")), crate::exit::CLUSTER);
        assert_eq!(code(Status::invalid_argument("bad manifest")), crate::exit::USAGE);
        assert_eq!(code(Status::not_found("no deployment d9")), crate::exit::USAGE);
        assert_eq!(code(Status::permission_denied("viewer")), crate::exit::CLUSTER);
    }

    #[test]
    fn unreadable_credentials_say_how_to_pass_them() {
        let tmp = std::env::temp_dir().join("fleetctl-client-test-missing");
        let ctx = Context { addrs: vec!["127.0.0.1:1".into()], ca: tmp.join("ca.pem"), cert: tmp.join("c.pem"), key: tmp.join("k.pem") };
        let msg = format!("{:#}", Client::new(&ctx).err().expect("no files"));
        assert!(msg.contains("ca.pem") && msg.contains("FLEET_CA/FLEET_CERT/FLEET_KEY") && msg.contains("context file"), "{msg}");
    }
}
