//! The token and audit calls of the `Control` service: `CreateToken`,
//! `ListTokens`, `RevokeToken` (API tokens for the HTTP API) and
//! `ListAudit` (operator actions, newest first).
//!
//! Tokens are managed with an operator certificate only: a token cannot
//! make or revoke tokens, so a leaked token cannot outlive its revocation.

use fleet_core::auth::Role;
use fleet_core::state::{AuditRecord, TokenRecord};
use fleet_core::{Command, Response as Outcome, Via};
use fleet_proto::*;
use serde::Serialize;
use tonic::Status;

use crate::control::ControlService;
use crate::deployments::{outcome_error, to_json};
use crate::tls::KnownCaller;

const DEFAULT_AUDIT_LIMIT: usize = 50;
const MAX_AUDIT_LIMIT: usize = 1000;

/// A token as clients see it: everything but its hash.
#[derive(Serialize)]
struct TokenView<'a> {
    name: &'a str,
    role: Role,
    created_ms: i64,
    created_by: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_ms: Option<i64>,
}

impl<'a> From<&'a TokenRecord> for TokenView<'a> {
    fn from(t: &'a TokenRecord) -> Self {
        TokenView { name: &t.name, role: t.role, created_ms: t.created_ms, created_by: &t.created_by, expires_ms: t.expires_ms }
    }
}

fn certificate_only(who: &KnownCaller, call: &str) -> Result<(), Status> {
    match who.via {
        Via::Certificate => Ok(()),
        Via::Token => Err(Status::permission_denied(format!(
            "{call} needs an operator certificate; a token cannot manage tokens. Run `fleetctl tokens` with an operator certificate"
        ))),
    }
}

impl ControlService {
    fn tokens_reply(&self, only: Option<&str>) -> Result<TokensReply, Status> {
        self.state().read(|a| {
            let tokens_json = a
                .state
                .tokens()
                .filter(|t| only.is_none_or(|n| t.name == n))
                .map(|t| to_json(&TokenView::from(t)))
                .collect::<Result<_, _>>()?;
            Ok(TokensReply { tokens_json, applied_index: a.last_applied.map(|l| l.index).unwrap_or(0) })
        })
    }

    pub(crate) async fn create_token(&self, who: &KnownCaller, r: CreateTokenRequest) -> Result<TokensReply, Status> {
        certificate_only(who, "tokens create")?;
        // Checked again on apply; here so that nonsense never reaches the log.
        fleet_core::names::validate_name("token name", &r.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.sha256.len() != 64 || !r.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Status::invalid_argument("sha256: the token's hash must be a SHA-256 in lowercase hex (fleetctl makes it)"));
        }
        if r.expires_ms != 0 && r.expires_ms <= fleet_net::now_ms() {
            return Err(Status::invalid_argument("expires_ms: the token would expire before it is made; give a later expiry"));
        }
        let role = r
            .role
            .parse::<Role>()
            .ok()
            .filter(|r| matches!(r, Role::Viewer | Role::Operator))
            .ok_or_else(|| Status::invalid_argument(format!("role: `{}` is not a token role; use viewer or operator", r.role)))?;
        let command = Command::CreateToken {
            name: r.name.clone(),
            role,
            sha256: r.sha256,
            expires_ms: (r.expires_ms != 0).then_some(r.expires_ms),
            actor: who.name.clone(),
        };
        let id = self.scoped(&who.name, &r.request_id);
        match self.propose(who, id, command).await?.0 {
            Outcome::TokenCreated { name } => self.tokens_reply(Some(&name)),
            other => Err(outcome_error(other)),
        }
    }

    pub(crate) async fn list_tokens(&self) -> Result<TokensReply, Status> {
        self.linearizable().await?;
        self.tokens_reply(None)
    }

    pub(crate) async fn revoke_token(&self, who: &KnownCaller, r: RevokeTokenRequest) -> Result<TokensReply, Status> {
        certificate_only(who, "tokens revoke")?;
        fleet_core::names::validate_name("token name", &r.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = self.scoped(&who.name, &r.request_id);
        match self.propose(who, id, Command::RevokeToken { name: r.name.clone() }).await?.0 {
            Outcome::Done => self.tokens_reply(None),
            other => Err(outcome_error(other)),
        }
    }

    pub(crate) async fn list_audit(&self, r: ListAuditRequest) -> Result<AuditReply, Status> {
        self.linearizable().await?;
        let limit = match r.limit as usize {
            0 => DEFAULT_AUDIT_LIMIT,
            n => n.min(MAX_AUDIT_LIMIT),
        };
        let before = (r.before != 0).then_some(r.before);
        self.state().read(|a| {
            let mut page: Vec<&AuditRecord> = a.state.audit(before).take(limit + 1).collect();
            let more = page.len() > limit;
            page.truncate(limit);
            let next_before = if more { page.last().map(|r| r.index).unwrap_or(0) } else { 0 };
            let records_json = page.into_iter().map(to_json).collect::<Result<_, _>>()?;
            Ok(AuditReply { records_json, applied_index: a.last_applied.map(|l| l.index).unwrap_or(0), next_before })
        })
    }

    /// Record a Raft membership change an operator made (it is not a
    /// state-machine command, so it is recorded beside it). Best effort:
    /// the change stands whether or not its record commits.
    pub(crate) async fn record_action(&self, who: &KnownCaller, action: &str, target: String, outcome: String) {
        let command = Command::RecordAction { action: action.to_string(), target, outcome };
        if let Err(e) = self.propose(who, None, command).await {
            tracing::warn!(action, error = %e.message(), "recording an operator action in the audit log failed");
        }
    }
}
