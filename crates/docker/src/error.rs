//! Errors of the Docker layer, each mapped onto one of Fleet's error classes.
//!
//! Every message says what went wrong *and* what to do next: these strings end up in a step's
//! `error` field and in `fleetctl` output on a developer's terminal.

use std::path::PathBuf;
use std::time::Duration;

use fleet_core::deploy::ErrorClass;

/// The four ways a Docker operation can fail, as far as Fleet's retry logic is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The engine is unreachable, slow, or answered 5xx: retry with backoff.
    Transient,
    /// A registry refused the credentials (401/403): fail now, a human must log in.
    Auth,
    /// Something on the node is in the way (a name or a port in use): re-sync, then retry.
    Resource,
    /// The request can never succeed as written (bad spec, image missing with `pull: never`).
    Invalid,
}

impl ErrorKind {
    pub fn class(self) -> ErrorClass {
        match self {
            ErrorKind::Transient => ErrorClass::Transient,
            ErrorKind::Auth => ErrorClass::Auth,
            ErrorKind::Resource => ErrorClass::Resource,
            ErrorKind::Invalid => ErrorClass::Invalid,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "the Docker socket {} does not exist: start the Docker Engine on this node (e.g. `systemctl start docker`), \
         or point DOCKER_HOST at its socket (unix:///path/to/docker.sock)",
        socket.display()
    )]
    SocketMissing { socket: PathBuf },

    #[error(
        "cannot talk to the Docker Engine at {}: {reason}; check that the daemon is running \
         and that this user may use the socket (root, or a member of the `docker` group)",
        socket.display()
    )]
    Unreachable { socket: PathBuf, reason: String },

    #[error(
        "DOCKER_HOST={value} is not supported: Fleet talks to the node's local engine over a unix socket only; \
         set DOCKER_HOST=unix:///var/run/docker.sock (or unset it)"
    )]
    UnsupportedHost { value: String },

    #[error(
        "the Docker Engine at {} speaks API {engine} but Fleet needs API {required} or newer \
         (Docker Engine 20.10+): upgrade Docker Engine on this node",
        socket.display()
    )]
    EngineTooOld { socket: PathBuf, engine: String, required: String },

    #[error("the Docker Engine did not answer within {after:?} while trying to {op}: it is overloaded or stuck; the step is retried")]
    Timeout { op: String, after: Duration },

    #[error(
        "image {image} is not on this node and the pull policy is `never`: build or `docker load` it on the node, \
         or set `pull: missing`"
    )]
    ImageMissing { image: String },

    #[error(
        "the registry refused to let this node pull {image}: {message}; run `docker login <registry>` on the node \
         (Fleet reads the credentials from {config}) and check that the account may read this repository"
    )]
    Auth { image: String, message: String, config: String },

    #[error(
        "the container name {name} is taken by container {id}, which is not this step's (labels differ): \
         remove it (`docker rm -f {name}`) if nothing needs it, then retry"
    )]
    NameConflict { name: String, id: String },

    #[error(
        "container {name} could not start because a host port it publishes is already in use ({message}): \
         free the port, choose another `host_port`, or leave it out so that the engine picks one"
    )]
    PortInUse { name: String, message: String },

    #[error("invalid container spec: {0}")]
    InvalidSpec(String),

    #[error("cannot read the Docker config file {}: {reason}; fix the file or remove the broken entry", path.display())]
    Config { path: PathBuf, reason: String },

    #[error("building image {tag} failed: {message}")]
    Build { tag: String, message: String },

    /// Any other answer of the engine: `kind` was derived from the HTTP status and message.
    #[error("the Docker Engine refused to {op}: {message} (HTTP {status})")]
    Engine { op: String, status: u16, message: String, kind: ErrorKind },
}

impl DockerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DockerError::SocketMissing { .. } | DockerError::Unreachable { .. } | DockerError::Timeout { .. } => ErrorKind::Transient,
            DockerError::UnsupportedHost { .. } | DockerError::EngineTooOld { .. } => ErrorKind::Invalid,
            DockerError::ImageMissing { .. } | DockerError::InvalidSpec(_) | DockerError::Config { .. } => ErrorKind::Invalid,
            DockerError::Build { .. } => ErrorKind::Invalid,
            DockerError::Auth { .. } => ErrorKind::Auth,
            DockerError::NameConflict { .. } | DockerError::PortInUse { .. } => ErrorKind::Resource,
            DockerError::Engine { kind, .. } => *kind,
        }
    }

    /// The class Fleet's saga engine uses to decide between retry, re-sync and failure.
    pub fn class(&self) -> ErrorClass {
        self.kind().class()
    }

    /// The engine's HTTP status, when the engine answered at all.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            DockerError::Engine { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Words registries and the engine use when credentials are missing or refused.
pub(crate) fn mentions_auth(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "incorrect username or password",
        "access denied",
        "denied: requested access",
        "pull access denied",
        "forbidden",
    ]
    .iter()
    .any(|w| m.contains(w))
}

pub(crate) fn mentions_port_in_use(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("port is already allocated") || m.contains("address already in use")
}

/// The kind of an engine answer with this status and message.
pub(crate) fn kind_of_status(status: u16, message: &str) -> ErrorKind {
    match status {
        401 | 403 => ErrorKind::Auth,
        409 => ErrorKind::Resource,
        400 | 404 | 406 | 422 => ErrorKind::Invalid,
        _ if mentions_auth(message) => ErrorKind::Auth,
        _ if mentions_port_in_use(message) => ErrorKind::Resource,
        _ => ErrorKind::Transient,
    }
}

/// Turns a bollard error into ours. `op` says what we were doing ("create container web-1"),
/// `socket` which engine we were talking to.
pub(crate) fn from_bollard(op: &str, socket: &std::path::Path, timeout: Duration, err: bollard::errors::Error) -> DockerError {
    use bollard::errors::Error as B;
    match err {
        B::DockerResponseServerError { status_code, message } => {
            DockerError::Engine { op: op.to_string(), status: status_code, kind: kind_of_status(status_code, &message), message }
        }
        B::DockerStreamError { error } => {
            // Errors reported inside a 200 stream (pull, build): no status, judge by the words.
            let kind = if mentions_auth(&error) {
                ErrorKind::Auth
            } else if error.to_ascii_lowercase().contains("not found") || error.contains("manifest unknown") {
                ErrorKind::Invalid
            } else {
                ErrorKind::Transient
            };
            DockerError::Engine { op: op.to_string(), status: 200, message: error, kind }
        }
        B::RequestTimeoutError => DockerError::Timeout { op: op.to_string(), after: timeout },
        B::SocketNotFoundError(path) => DockerError::SocketMissing { socket: PathBuf::from(path) },
        B::IOError { err } => DockerError::Unreachable { socket: socket.to_path_buf(), reason: err.to_string() },
        B::HyperResponseError { err } => DockerError::Unreachable { socket: socket.to_path_buf(), reason: err.to_string() },
        B::HyperLegacyError { err } => DockerError::Unreachable { socket: socket.to_path_buf(), reason: error_chain(&err) },
        B::JsonDataError { message, .. } => DockerError::Engine {
            op: op.to_string(),
            status: 200,
            message: format!("unexpected answer: {message}"),
            kind: ErrorKind::Transient,
        },
        other => DockerError::Engine { op: op.to_string(), status: 0, message: error_chain(&other), kind: ErrorKind::Invalid },
    }
}

/// "outer: inner: innermost", so that "connection refused" is not hidden behind "client error (Connect)".
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_onto_fleet_classes() {
        assert_eq!(kind_of_status(401, "unauthorized"), ErrorKind::Auth);
        assert_eq!(kind_of_status(403, ""), ErrorKind::Auth);
        assert_eq!(kind_of_status(409, "Conflict. The container name is already in use"), ErrorKind::Resource);
        assert_eq!(kind_of_status(404, "No such image: x"), ErrorKind::Invalid);
        assert_eq!(kind_of_status(400, "bad parameter"), ErrorKind::Invalid);
        assert_eq!(kind_of_status(500, "Bind for 127.0.0.1:8080 failed: port is already allocated"), ErrorKind::Resource);
        assert_eq!(kind_of_status(500, "Head \"https://r/v2/x/manifests/1\": unauthorized: authentication required"), ErrorKind::Auth);
        assert_eq!(kind_of_status(500, "context deadline exceeded"), ErrorKind::Transient);
        assert_eq!(kind_of_status(503, ""), ErrorKind::Transient);
    }

    #[test]
    fn every_kind_has_its_class() {
        let e = DockerError::ImageMissing { image: "fleet-test/web:v9".into() };
        assert_eq!(e.class(), ErrorClass::Invalid);
        assert!(e.to_string().contains("fleet-test/web:v9"));
        let e = DockerError::SocketMissing { socket: "/nowhere/docker.sock".into() };
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(e.to_string().contains("/nowhere/docker.sock"));
        let e = DockerError::NameConflict { name: "n".into(), id: "abc".into() };
        assert_eq!(e.class(), ErrorClass::Resource);
        let e = DockerError::Auth { image: "r.example/x:1".into(), message: "unauthorized".into(), config: "c".into() };
        assert_eq!(e.class(), ErrorClass::Auth);
    }
}
