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
    /// Verifies a JWT from the IdP: algorithm allowed, signature with a JWKS key (or the client
    /// secret for HS*), `iss` = our issuer, `aud` contains our client id, `exp` (when
    /// `require_exp` or present), `iat` within the window. Returns the header and claims.
    pub async fn verify_jwt(
        &self,
        token: &str,
        required: &[&str],
        max_age: Duration,
    ) -> Result<(jsonwebtoken::Header, Map<String, Value>), IdTokenError> {
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
        v.set_required_spec_claims(required);
        v.leeway = self.config.clock_skew.as_secs();
        // exp is checked whenever present (jsonwebtoken checks it only when required).
        v.validate_exp = true;
        v.validate_nbf = true;
        let data = decode::<Map<String, Value>>(token, &key, &v)
            .map_err(|e| IdTokenError::Invalid(format!("{:?}", e.kind())))?;
        let claims = data.claims;
        // OIDC Core §2: `iss` is a case-sensitive string (jsonwebtoken would accept an array
        // containing it).
        if claims.get("iss").and_then(Value::as_str) != Some(self.config.issuer.as_str()) {
            return Err(IdTokenError::Invalid("iss".into()));
        }
        // A claim named twice is ambiguous (which one did the signer mean?): refused.
        if has_duplicate_claims(token) {
            return Err(IdTokenError::Invalid("duplicate claim".into()));
        }

        let now = now_s();
        let skew = self.config.clock_skew.as_secs();
        // RFC 7519 §2: NumericDate may be fractional; absurd values must not overflow.
        let iat = claims
            .get("iat")
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or(IdTokenError::IssuedAt)? as u64;
        if iat > now.saturating_add(skew)
            || iat.saturating_add(max_age.as_secs()).saturating_add(skew) < now
        {
            return Err(IdTokenError::IssuedAt);
        }
        Ok((data.header, claims))
    }

    /// OIDC Core §3.1.3.7 items 4–5: several audiences need an `azp`, and any `azp` must be us.
    fn check_azp(&self, claims: &Map<String, Value>) -> Result<(), IdTokenError> {
        let several_aud = claims
            .get("aud")
            .and_then(Value::as_array)
            .is_some_and(|a| a.len() > 1);
        match claims.get("azp") {
            Some(Value::String(azp)) if azp == &self.config.client_id => Ok(()),
            None if !several_aud => Ok(()),
            _ => Err(IdTokenError::AuthorizedParty),
        }
    }

    /// Validates an ID token. `nonce` is the value sent at /login (required when `Some`).
    /// `max_age` bounds how old `iat` may be.
    pub async fn validate_id_token(
        &self,
        token: &str,
        nonce: Option<&str>,
        max_age: Duration,
    ) -> Result<IdClaims, IdTokenError> {
        let (_, claims) = self
            .verify_jwt(token, &["exp", "iat", "iss", "aud", "sub"], max_age)
            .await?;

        self.check_azp(&claims)?;

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

/// True when the JWT payload names a top-level member more than once.
fn has_duplicate_claims(token: &str) -> bool {
    use base64::Engine;
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Dup;
    impl<'de> Visitor<'de> for Dup {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = false;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                dup |= !seen.insert(k);
            }
            Ok(dup)
        }
    }
    let Some(payload) = token.split('.').nth(1) else {
        return true;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return true;
    };
    serde_json::Deserializer::from_slice(&bytes)
        .deserialize_map(Dup)
        .unwrap_or(true)
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

/// The event a back-channel logout token must carry (OIDC Back-Channel Logout 1.0 §2.4).
pub const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// What a valid logout token asks to end.
#[derive(Debug, Clone)]
pub struct LogoutClaims {
    pub sub: Option<String>,
    pub sid: Option<String>,
    pub jti: String,
}

impl Idp {
    /// Validates a back-channel logout token (OIDC Back-Channel Logout 1.0 §2.6): verified like an
    /// ID token (signature, `iss`, `aud`, `iat`), with the logout event, `sid` and/or `sub`, a `jti`,
    /// and no `nonce`.
    pub async fn validate_logout_token(&self, token: &str) -> Result<LogoutClaims, IdTokenError> {
        let (header, claims) = self
            .verify_jwt(token, &["iat", "iss", "aud"], Duration::from_secs(600))
            .await?;
        // §2.4: explicit typing, when used, is `logout+jwt`.
        if let Some(typ) = &header.typ {
            if !typ.eq_ignore_ascii_case("logout+jwt") && !typ.eq_ignore_ascii_case("JWT") {
                return Err(IdTokenError::Invalid("typ".into()));
            }
        }
        if claims.contains_key("nonce") {
            return Err(IdTokenError::Invalid(
                "a logout token must not carry a nonce".into(),
            ));
        }
        let has_event = claims
            .get("events")
            .and_then(Value::as_object)
            .and_then(|e| e.get(BACKCHANNEL_EVENT))
            .is_some_and(Value::is_object);
        if !has_event {
            return Err(IdTokenError::Invalid(
                "missing the back-channel logout event".into(),
            ));
        }
        self.check_azp(&claims)?;
        let text = |k: &str| {
            claims
                .get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let (sub, sid) = (text("sub"), text("sid"));
        if sub.is_none() && sid.is_none() {
            return Err(IdTokenError::Invalid("neither sub nor sid".into()));
        }
        let jti = text("jti").ok_or(IdTokenError::Invalid("missing jti".into()))?;
        Ok(LogoutClaims { sub, sid, jti })
    }
}
