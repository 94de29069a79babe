//! ID-token validation (OIDC Core §3.1.3.7): signature with a key from the JWKS (asymmetric
//! algorithms; HS* only with the client secret; never `none`), `iss`, `aud`, `azp`, `exp`, `iat`
//! within a bounded skew, and `nonce`.

use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::Idp;
use crate::session::tokens::now_s;

/// Why an ID token was refused. Kept coarse: the browser learns only that it was invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdTokenError {
    #[error("malformed ID token")]
    Malformed,
    #[error("ID token algorithm `{0}` is not accepted")]
    Algorithm(String),
    #[error("no key in the JWKS matches the ID token")]
    UnknownKey,
    #[error("ID token signature or claims invalid: {0}")]
    Invalid(String),
    #[error("ID token `iat` is out of the accepted window")]
    IssuedAt,
    #[error("ID token `azp` does not name this client")]
    AuthorizedParty,
    #[error("ID token `nonce` does not match the login")]
    Nonce,
    #[error("ID token has no `sub`")]
    Subject,
}

/// What a validated ID token tells us.
#[derive(Debug, Clone)]
pub struct IdClaims {
    pub sub: String,
    pub sid: Option<String>,
    pub claims: Map<String, Value>,
}

const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

const SYMMETRIC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// Whether `jwk` can verify `alg` (its `alg`, when present, must agree; its key type must fit).
fn jwk_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    if let Some(ka) = jwk.common.key_algorithm {
        if format!("{ka:?}") != format!("{alg:?}") {
            return false;
        }
    }
    if let Some(use_) = &jwk.common.public_key_use {
        if *use_ != jsonwebtoken::jwk::PublicKeyUse::Signature {
            return false;
        }
    }
    matches!(
        (&jwk.algorithm, alg),
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512,
        ) | (
            AlgorithmParameters::EllipticCurve(_),
            Algorithm::ES256 | Algorithm::ES384
        ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
    )
}

fn find_key(
    set: &jsonwebtoken::jwk::JwkSet,
    kid: Option<&str>,
    alg: Algorithm,
) -> Option<DecodingKey> {
    let mut candidates = set.keys.iter().filter(|k| jwk_fits(k, alg));
    let jwk = match kid {
        Some(kid) => candidates.find(|k| k.common.key_id.as_deref() == Some(kid)),
        // No kid: only unambiguous when exactly one key fits.
        None => {
            let first = candidates.next();
            if candidates.next().is_some() {
                None
            } else {
                first
            }
        }
    }?;
    DecodingKey::from_jwk(jwk).ok()
}

impl Idp {
    /// Validates `token`. `nonce` is the value sent at /login (required when `Some`).
    /// `max_age` bounds how old `iat` may be.
    pub async fn validate_id_token(
        &self,
        token: &str,
        nonce: Option<&str>,
        max_age: Duration,
    ) -> Result<IdClaims, IdTokenError> {
        let header = decode_header(token).map_err(|_| IdTokenError::Malformed)?;
        let alg = header.alg;
        let key = if SYMMETRIC.contains(&alg) {
            // OIDC Core §10.1: MACed ID tokens use the client secret as the key.
            let secret = self
                .config
                .client_secret
                .as_ref()
                .ok_or_else(|| IdTokenError::Algorithm(format!("{alg:?}")))?;
            DecodingKey::from_secret(secret.expose().as_bytes())
        } else if ASYMMETRIC.contains(&alg) {
            let kid = header.kid.as_deref();
            match find_key(&self.jwks().current(), kid, alg) {
                Some(k) => k,
                None => {
                    // Maybe the IdP rotated its keys: one rate-limited re-fetch, then fail closed.
                    self.jwks().refresh_for_unknown_kid(self.http()).await;
                    find_key(&self.jwks().current(), kid, alg).ok_or(IdTokenError::UnknownKey)?
                }
            }
        } else {
            return Err(IdTokenError::Algorithm(format!("{alg:?}")));
        };

        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.set_issuer(&[self.config.issuer.as_str()]);
        v.set_audience(&[self.config.client_id.as_str()]);
        v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        v.leeway = self.config.clock_skew.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        let data = decode::<Map<String, Value>>(token, &key, &v)
            .map_err(|e| IdTokenError::Invalid(format!("{:?}", e.kind())))?;
        let claims = data.claims;

        let now = now_s();
        let skew = self.config.clock_skew.as_secs();
        let iat = claims
            .get("iat")
            .and_then(Value::as_u64)
            .ok_or(IdTokenError::IssuedAt)?;
        if iat > now + skew || iat + max_age.as_secs() + skew < now {
            return Err(IdTokenError::IssuedAt);
        }

        // §3.1.3.7 items 4–5: several audiences need an azp, and any azp must be us.
        let several_aud = claims
            .get("aud")
            .and_then(Value::as_array)
            .is_some_and(|a| a.len() > 1);
        match claims.get("azp") {
            Some(Value::String(azp)) if azp == &self.config.client_id => {}
            None if !several_aud => {}
            _ => return Err(IdTokenError::AuthorizedParty),
        }

        if let Some(expected) = nonce {
            let got = claims.get("nonce").and_then(Value::as_str).unwrap_or("");
            if !bool::from(got.as_bytes().ct_eq(expected.as_bytes())) {
                return Err(IdTokenError::Nonce);
            }
        }

        let sub = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(IdTokenError::Subject),
        };
        let sid = claims
            .get("sid")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(IdClaims { sub, sid, claims })
    }
}

/// Reads the claims of a token we validated earlier (kept in the session), without re-verifying.
pub fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
