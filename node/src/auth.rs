//! Turning a `hello` into a [`Principal`]: agent tokens, visitor tokens, and HMAC identity verification.

use crate::config::Config;
use crate::engine::Principal;
use crate::model::{Agent, Role, new_id};
use crate::protocol::{ErrorCode, Hello};
use crate::token::{Claims, Signer, TokenError, now_secs};

/// Authenticates connections and mints tokens.
#[derive(Debug, Clone)]
pub struct Auth {
    signer: Signer,
    identity: Option<Signer>,
    enforce: bool,
    agent_ttl: u64,
    visitor_ttl: u64,
}

impl Auth {
    pub fn new(cfg: &Config, secret: &[u8]) -> Self {
        Auth {
            signer: Signer::new(secret),
            identity: (!cfg.identity.secret.is_empty()).then(|| Signer::new(cfg.identity.secret.as_bytes())),
            enforce: cfg.identity.enforce,
            agent_ttl: cfg.auth.agent_token_ttl_secs,
            visitor_ttl: cfg.auth.visitor_token_ttl_secs,
        }
    }

    /// The token signer (REST verifies agent and visitor bearer tokens with it).
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// A token for `agent`, valid for the configured lifetime.
    pub fn agent_token(&self, agent: &Agent) -> String {
        let now = now_secs();
        self.signer.sign(&Claims {
            sub: agent.id.clone(),
            role: "agent".into(),
            iat: now,
            exp: now + self.agent_ttl,
            ep: agent.token_epoch,
        })
    }

    fn visitor_token(&self, id: &str) -> String {
        let now = now_secs();
        self.signer.sign(&Claims {
            sub: id.into(),
            role: "visitor".into(),
            iat: now,
            exp: now + self.visitor_ttl,
            ep: 0,
        })
    }

    /// Verify a bearer token of an agent (REST API).
    pub fn verify_agent(&self, token: &str) -> Result<Claims, ErrorCode> {
        let claims = self.signer.verify(token, now_secs()).map_err(token_code)?;
        if claims.role != "agent" {
            return Err(ErrorCode::Unauthorized);
        }
        Ok(claims)
    }

    /// Authenticate a `hello` for `role`.
    pub fn authenticate(&self, role: Role, hello: &Hello) -> Result<Principal, (ErrorCode, String)> {
        match role {
            Role::Agent => {
                let token =
                    hello.token.as_deref().ok_or((ErrorCode::Unauthorized, "agent token required".to_owned()))?;
                let claims = self.verify_agent(token).map_err(|c| (c, token_message(c).to_owned()))?;
                Ok(Principal::Agent { id: claims.sub, epoch: claims.ep })
            }
            Role::Visitor => self.visitor(hello),
        }
    }

    fn visitor(&self, hello: &Hello) -> Result<Principal, (ErrorCode, String)> {
        let name = hello.name.clone().filter(|n| !n.trim().is_empty()).map(|n| n.chars().take(64).collect());
        if let Some(user_id) = hello.user_id.as_deref() {
            let Some(identity) = &self.identity else {
                return Err((ErrorCode::Invalid, "identity verification is not configured on this node".into()));
            };
            let hash = hello.identity_hash.as_deref().unwrap_or("");
            if user_id.is_empty() || user_id.len() > 64 || !identity.verify_identity(user_id, hash) {
                return Err((ErrorCode::IdentityRequired, "identity_hash does not match user_id".into()));
            }
            let id = format!("u_{user_id}");
            return Ok(Principal::Visitor { token: Some(self.visitor_token(&id)), id, name });
        }
        if self.enforce {
            return Err((
                ErrorCode::IdentityRequired,
                "this site requires a verified user_id and identity_hash".into(),
            ));
        }
        if let Some(token) = hello.token.as_deref() {
            let claims = self.signer.verify(token, now_secs()).map_err(|e| {
                let c = token_code(e);
                (c, token_message(c).to_owned())
            })?;
            if claims.role != "visitor" {
                return Err((ErrorCode::Unauthorized, "not a visitor token".into()));
            }
            return Ok(Principal::Visitor { id: claims.sub, name, token: None });
        }
        let id = new_id("v");
        Ok(Principal::Visitor { token: Some(self.visitor_token(&id)), id, name })
    }
}

/// Map a token failure to its protocol code.
pub fn token_code(e: TokenError) -> ErrorCode {
    match e {
        TokenError::Expired => ErrorCode::TokenExpired,
        TokenError::Malformed | TokenError::BadSignature => ErrorCode::Unauthorized,
    }
}

fn token_message(c: ErrorCode) -> &'static str {
    match c {
        ErrorCode::TokenExpired => "token expired",
        _ => "invalid token",
    }
}
