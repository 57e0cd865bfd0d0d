//! Who may use the HTTP API without a certificate (API tokens) and what
//! operators did (the audit log).
//!
//! * Tokens: `token/<name>` → [`TokenRecord`]. Only the SHA-256 of a
//!   token's secret is kept; the secret is made by `fleetctl` and never
//!   reaches a coordinator's log. Tokens carry the viewer or operator role.
//! * Audit: `audit/<seq>` → [`AuditRecord`], one per request that
//!   carried an [`Origin`], kept for the newest [`MAX_AUDIT_RECORDS`].

use serde::{Deserialize, Serialize};

use super::{Ctx, State, AUDIT_PREFIX, TOKEN_PREFIX};
use crate::auth::Role;
use crate::command::{Command, Origin, Response, Via};
use crate::names::validate_name;

/// The audit log keeps this many records; older ones are dropped (one per
/// new record, so an apply's cost stays bounded).
pub const MAX_AUDIT_RECORDS: usize = 10_000;

/// An API token, as the replicated state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret, lowercase hex.
    pub sha256: String,
    pub created_ms: i64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

impl TokenRecord {
    /// Whether the token is still good at `now_ms` (the caller's clock:
    /// checking is not part of apply).
    pub fn valid_at(&self, now_ms: i64) -> bool {
        self.expires_ms.is_none_or(|e| now_ms < e)
    }
}

/// One operator action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The request's sequence number, its log index unless batched
    /// (orders records, pages with `before`).
    pub index: u64,
    pub at_ms: i64,
    pub actor: String,
    pub via: Via,
    /// `ip:port` of the client as its coordinator saw it; empty if unknown.
    pub from: String,
    /// `deploy`, `cancel`, `lock.acquire`, `tokens.create`, ...
    pub action: String,
    /// What it acted on: a deployment id, a destination, a token name.
    pub target: String,
    /// `ok`, the deployment's id and state, or why nothing happened.
    pub outcome: String,
}

/// Is `s` a SHA-256 in lowercase hex?
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl State {
    pub(super) fn create_token(
        &mut self,
        cx: &mut Ctx,
        name: &str,
        role: Role,
        sha256: &str,
        expires_ms: Option<i64>,
        actor: &str,
    ) -> Response {
        if let Err(e) = validate_name("token name", name) {
            return Response::Invalid { reason: e.to_string() };
        }
        if !matches!(role, Role::Viewer | Role::Operator) {
            return Response::Invalid { reason: format!("a token's role is viewer or operator, not {role}") };
        }
        if !is_sha256_hex(sha256) {
            return Response::Invalid { reason: "the token's hash must be a SHA-256 in lowercase hex (fleetctl makes it)".into() };
        }
        if expires_ms.is_some_and(|e| e <= cx.at_ms) {
            return Response::Invalid { reason: "the token would expire before it is created; give a later expiry".into() };
        }
        if self.tokens.contains_key(name) {
            return Response::Rejected { reason: format!("a token named `{name}` exists; revoke it first or choose another name") };
        }
        if self.token_hashes.contains_key(sha256) {
            return Response::Rejected { reason: "a token with the same secret exists; make a new secret".into() };
        }
        let rec = TokenRecord {
            name: name.to_string(),
            role,
            sha256: sha256.to_string(),
            created_ms: cx.at_ms,
            created_by: actor.to_string(),
            expires_ms,
        };
        cx.put(format!("{TOKEN_PREFIX}{name}"), &rec);
        self.token_hashes.insert(rec.sha256.clone(), rec.name.clone());
        self.tokens.insert(rec.name.clone(), rec);
        Response::TokenCreated { name: name.to_string() }
    }

    pub(super) fn revoke_token(&mut self, cx: &mut Ctx, name: &str) -> Response {
        let Some(rec) = self.tokens.remove(name) else {
            return Response::NotFound { what: format!("token `{name}`") };
        };
        self.token_hashes.remove(&rec.sha256);
        cx.delete(format!("{TOKEN_PREFIX}{name}"));
        Response::Done
    }

    /// Keep the audit record of an entry that carried an origin.
    pub(super) fn record_audit(&mut self, cx: &mut Ctx, origin: &Origin, command: &Command, response: &Response) {
        let (action, target) = command.action();
        let outcome = match command {
            Command::RecordAction { outcome, .. } => crate::names::shorten(outcome),
            _ => response.summary(),
        };
        let rec = AuditRecord {
            index: cx.seq,
            at_ms: cx.at_ms,
            actor: origin.actor.clone(),
            via: origin.via,
            from: origin.from.clone(),
            action: action.to_string(),
            target: crate::names::shorten(&target),
            outcome,
        };
        cx.put(format!("{AUDIT_PREFIX}{}", cx.seq), &rec);
        self.audit.insert(cx.seq, rec);
        while self.audit.len() > MAX_AUDIT_RECORDS {
            let Some((old, _)) = self.audit.pop_first() else { break };
            cx.delete(format!("{AUDIT_PREFIX}{old}"));
        }
    }

    /// The token whose secret hashes to `sha256`.
    pub fn token_by_hash(&self, sha256: &str) -> Option<&TokenRecord> {
        self.tokens.get(self.token_hashes.get(sha256)?)
    }

    /// Every token, by name.
    pub fn tokens(&self) -> impl Iterator<Item = &TokenRecord> {
        self.tokens.values()
    }

    /// Audit records, newest first, older than log index `before` if given.
    pub fn audit(&self, before: Option<u64>) -> impl Iterator<Item = &AuditRecord> {
        self.audit.range(..before.unwrap_or(u64::MAX)).rev().map(|(_, r)| r)
    }
}
