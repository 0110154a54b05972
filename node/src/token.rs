//! Signed tokens (JWT HS256 compact form) for agents and visitors, and visitor identity verification.
//!
//! Tokens are verified in constant time; the secret never appears in logs or errors.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Claims carried by a Kefu token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Agent or visitor id.
    pub sub: String,
    /// `agent` or `visitor`.
    pub role: String,
    pub iat: u64,
    pub exp: u64,
    /// Agent token epoch; a token whose epoch is below the agent's current one is revoked.
    #[serde(default)]
    pub ep: u32,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadSignature,
    Expired,
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    pub fn new(secret: &[u8]) -> Self {
        Signer { key: secret.to_vec() }
    }

    fn mac(&self, data: &[u8]) -> Vec<u8> {
        // HMAC accepts keys of any length.
        let mut m = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable_hmac());
        m.update(data);
        m.finalize().into_bytes().to_vec()
    }

    /// Mint a token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let signing_input = format!("{}.{}", B64.encode(HEADER), B64.encode(payload));
        let sig = self.mac(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(sig))
    }

    /// Verify signature and expiry at `now_secs`.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, TokenError> {
        if token.len() > 2048 {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        let header = B64.decode(h).map_err(|_| TokenError::Malformed)?;
        if header != HEADER.as_bytes() {
            return Err(TokenError::Malformed);
        }
        let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
        let expected = self.mac(format!("{h}.{p}").as_bytes());
        if !bool::from(expected.ct_eq(&sig)) {
            return Err(TokenError::BadSignature);
        }
        let payload = B64.decode(p).map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now_secs {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// `hex(HMAC-SHA256(secret, user_id))`, the identity hash a site backend computes for its user.
    pub fn identity_hash(&self, user_id: &str) -> String {
        self.mac(user_id.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Constant-time check of a site-supplied identity hash.
    pub fn verify_identity(&self, user_id: &str, hash: &str) -> bool {
        let expected = self.identity_hash(user_id);
        expected.len() == hash.len() && bool::from(expected.as_bytes().ct_eq(hash.to_ascii_lowercase().as_bytes()))
    }
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // new_from_slice only fails for fixed-size-key MACs; HMAC takes any key length.
    panic!("HMAC rejected its key")
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    crate::model::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims { sub: "a1".into(), role: "agent".into(), iat: 0, exp, ep: 0 }
    }

    #[test]
    fn signed_token_verifies_and_tampered_one_does_not() {
        let s = Signer::new(b"0123456789abcdef");
        let t = s.sign(&claims(100));
        assert_eq!(s.verify(&t, 50).unwrap().sub, "a1");
        assert_eq!(s.verify(&t, 100), Err(TokenError::Expired));
        let other = Signer::new(b"another-secret-123");
        assert_eq!(other.verify(&t, 50), Err(TokenError::BadSignature));
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(r#"{"sub":"admin","role":"agent","iat":0,"exp":100}"#);
        parts[1] = &forged;
        assert_eq!(s.verify(&parts.join("."), 50), Err(TokenError::BadSignature));
        assert_eq!(s.verify("garbage", 50), Err(TokenError::Malformed));
        assert_eq!(s.verify("a.b.c.d", 50), Err(TokenError::Malformed));
    }

    #[test]
    fn identity_hash_matches_reference_hmac() {
        // Reference: python3 -c "import hmac,hashlib;print(hmac.new(b'key',b'user-1',hashlib.sha256).hexdigest())"
        let s = Signer::new(b"key");
        assert_eq!(s.identity_hash("user-1"), "8a32e68074948afd0d37d5a1b6be3292eeea7d4096d28dc10aa9f53f7a448b13");
        assert!(s.verify_identity("user-1", &s.identity_hash("user-1")));
        assert!(!s.verify_identity("user-2", &s.identity_hash("user-1")));
    }
}
