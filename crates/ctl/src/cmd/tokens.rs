//! `tokens create|list|revoke`: API tokens for the HTTP API and the
//! dashboard, and `history --audit`: who did what, when, from where.
//!
//! The secret of a token is made here (256 random bits) and printed once;
//! the cluster keeps only its SHA-256, so a lost token cannot be shown
//! again, only revoked and replaced.

use std::time::Duration;

use fleet_core::state::AuditRecord;
use fleet_net::now_ms;
use fleet_net::token::{token_sha256, TOKEN_PREFIX};
use fleet_proto::*;
use fleetctl::client::{request_id, Client};
use fleetctl::exit;
use fleetctl::progress::table;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

use super::common::{client, print_json, since, usage, Exit};
use crate::cli::{ConnArgs, Output, TokensCmd};

/// A token as `tokens list -o json` prints it (no secret, no hash).
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: String,
    pub created_ms: i64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

/// What `tokens create -o json` prints: the secret, once.
#[derive(Debug, Serialize)]
struct Created<'a> {
    name: &'a str,
    role: &'a str,
    token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_ms: Option<i64>,
}

/// A fresh secret: the prefix and 256 random bits in hex.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

fn parse_tokens(r: &TokensReply) -> anyhow::Result<Vec<TokenInfo>> {
    r.tokens_json
        .iter()
        .map(|j| serde_json::from_str(j).map_err(|e| anyhow::anyhow!("a coordinator sent a token record this fleetctl cannot read ({e})")))
        .collect()
}

pub async fn tokens(cmd: TokensCmd, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    match cmd {
        TokensCmd::Create { name, role, expires } => create(&mut c, &name, role.as_str(), expires, out).await,
        TokensCmd::List => {
            let r = c.unary(ListTokensRequest {}, |mut cl, r| async move { cl.list_tokens(r).await }).await?;
            let list = parse_tokens(&r)?;
            match out {
                Output::Json => print_json(&list),
                Output::Text if list.is_empty() => println!("no tokens; `fleetctl tokens create NAME --role viewer` makes one"),
                Output::Text => {
                    let now = now_ms();
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|t| {
                            let expires = match t.expires_ms {
                                None => "never".to_string(),
                                Some(e) if e <= now => format!("{} (expired)", since(e)),
                                Some(e) => since(e),
                            };
                            vec![t.name.clone(), t.role.clone(), since(t.created_ms), t.created_by.clone(), expires]
                        })
                        .collect();
                    println!("{}", table(&["NAME", "ROLE", "CREATED", "BY", "EXPIRES"], &rows));
                }
            }
            Ok(exit::OK)
        }
        TokensCmd::Revoke { name } => {
            fleet_core::names::validate_name("token name", &name).map_err(usage)?;
            let req = RevokeTokenRequest { name: name.clone(), request_id: request_id() };
            c.unary(req, |mut cl, r| async move { cl.revoke_token(r).await }).await?;
            match out {
                Output::Json => print_json(&serde_json::json!({ "name": name, "revoked": true })),
                Output::Text => {
                    println!("revoked token {name}: each coordinator refuses it once it has applied the revocation (at once on the leader)")
                }
            }
            Ok(exit::OK)
        }
    }
}

/// Make a token on the cluster; returns its secret (shown nowhere else).
pub async fn make_token(c: &mut Client, name: &str, role: &str, expires_ms: Option<i64>) -> anyhow::Result<String> {
    let secret = new_secret();
    let req = CreateTokenRequest {
        name: name.to_string(),
        role: role.to_string(),
        sha256: token_sha256(&secret),
        expires_ms: expires_ms.unwrap_or(0),
        request_id: request_id(),
    };
    c.unary(req, |mut cl, r| async move { cl.create_token(r).await }).await?;
    Ok(secret)
}

async fn create(c: &mut Client, name: &str, role: &str, expires: Option<Duration>, out: Output) -> Result<i32, Exit> {
    fleet_core::names::validate_name("token name", name).map_err(usage)?;
    let expires_ms = expires.map(|d| now_ms().saturating_add(d.as_millis().min(i64::MAX as u128) as i64));
    let secret = make_token(c, name, role, expires_ms).await?;
    match out {
        Output::Json => print_json(&Created { name, role, token: &secret, expires_ms }),
        Output::Text => {
            println!("{secret}");
            eprintln!(
                "created {role} token {name}{}. It is shown only now: store it in your secret manager.\n\
                 Use it as `Authorization: Bearer <token>`, or open https://COORDINATOR:HTTP_PORT/#token=<token>.\n\
                 `fleetctl tokens revoke {name}` ends it.",
                expires_ms.map(|e| format!(" (expires {})", since(e))).unwrap_or_default()
            );
        }
    }
    Ok(exit::OK)
}

/// `history --audit`: operator actions, newest first.
pub async fn audit(limit: u32, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let req = ListAuditRequest { limit: limit.clamp(1, 1000), before: 0 };
    let r = c.unary(req, |mut cl, r| async move { cl.list_audit(r).await }).await?;
    let records: Vec<AuditRecord> = r
        .records_json
        .iter()
        .map(|j| serde_json::from_str(j).map_err(|e| anyhow::anyhow!("a coordinator sent an audit record this fleetctl cannot read ({e})")))
        .collect::<anyhow::Result<_>>()?;
    match out {
        Output::Json => print_json(&records),
        Output::Text if records.is_empty() => println!("no operator actions recorded yet"),
        Output::Text => {
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|a| {
                    let from = if a.from.is_empty() { "-".to_string() } else { a.from.clone() };
                    vec![
                        since(a.at_ms),
                        a.actor.clone(),
                        a.via.as_str().to_string(),
                        from,
                        a.action.clone(),
                        a.target.clone(),
                        a.outcome.clone(),
                    ]
                })
                .collect();
            println!("{}", table(&["WHEN", "WHO", "VIA", "FROM", "ACTION", "TARGET", "OUTCOME"], &rows));
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_and_look_like_tokens() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(fleet_net::token::looks_like_token(&a), "{a}");
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(token_sha256(&a).len(), 64);
    }
}
