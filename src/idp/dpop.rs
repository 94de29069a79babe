//! Sender-constrained tokens with DPoP (RFC 9449): one EC P-256 key per deployment, a fresh
//! signed proof (`typ: dpop+jwt`, ES256, the public key in the header) for every token request,
//! userinfo call and API call, and the server-provided nonces (§8, §9) remembered per server.
//!
//! The key comes from `oauth.dpop_key_file` or, without it, is derived from the first session
//! key: every replica that can open the sessions then holds the same key, and a restart keeps
//! the tokens usable. Whoever has the session key can read every session's tokens anyway, so the
//! derived key adds no new secret to guard. Neither the key nor a proof is ever logged.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

/// Bound on remembered nonces (one per server; servers come from config, this only caps
/// what a misbehaving set of upstreams could make us hold).
const MAX_NONCES: usize = 256;
/// Longest nonce kept (RFC 9449 §8.1: a nonce is an opaque NQCHAR string).
const MAX_NONCE_LEN: usize = 512;

/// The DPoP key and the nonces servers asked for. `Debug` shows the key's thumbprint only.
pub struct Dpop {
    key: SigningKey,
    /// base64url of the proof's protected header: `{"alg","jwk","typ"}`, the same for every proof.
    header_b64: String,
    /// RFC 7638 thumbprint of the public key, base64url (`dpop_jkt`, the tokens' `cnf.jkt`).
    thumbprint: String,
    nonces: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Dpop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dpop(jkt {}, [key redacted])", self.thumbprint)
    }
}

impl Dpop {
    fn from_key(key: SigningKey) -> Self {
        let point = key.verifying_key().to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            unreachable!("an uncompressed P-256 point has both coordinates")
        };
        let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
        // RFC 7638 §3.2: the required members, in lexicographic order, no white space.
        let jwk = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(jwk.as_bytes()));
        let header = format!(r#"{{"alg":"ES256","jwk":{jwk},"typ":"dpop+jwt"}}"#);
        Self {
            key,
            header_b64: URL_SAFE_NO_PAD.encode(header),
            thumbprint,
            nonces: Mutex::new(HashMap::new()),
        }
    }

    /// A PEM EC P-256 private key (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        use p256::pkcs8::DecodePrivateKey;
        let key = SigningKey::from_pkcs8_pem(pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(pem).map(SigningKey::from))
            .map_err(|_| "not a PEM EC P-256 private key".to_string())?;
        Ok(Self::from_key(key))
    }

    /// The key derived from a session key: SHA-256 over a label, the key and a counter until the
    /// result is a valid scalar (all but a 2^-32 fraction of values are, at the first try).
    pub fn derived(session_key: &[u8; 32]) -> Self {
        for counter in 0u32.. {
            let mut h = Sha256::new();
            h.update(b"tokengate dpop key v1\0");
            h.update(session_key);
            h.update(counter.to_be_bytes());
            let bytes = h.finalize();
            if let Ok(key) = SigningKey::from_slice(&bytes) {
                return Self::from_key(key);
            }
        }
        unreachable!("a valid scalar is found long before the counter wraps")
    }

    /// The JWK thumbprint (RFC 7638) of the public key, base64url: `dpop_jkt` on authorize.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A proof for one request (RFC 9449 §4.2): `htm` the method, `htu` the target URI without
    /// query and fragment, `ath` the access token's hash when one is sent, and the server's
    /// latest nonce for `server` if it gave one.
    pub fn proof(
        &self,
        htm: &str,
        htu: &url::Url,
        access_token: Option<&str>,
        server: &str,
    ) -> String {
        let mut htu = htu.clone();
        htu.set_query(None);
        htu.set_fragment(None);
        let mut claims = serde_json::json!({
            "jti": crate::auth::login::random_token(),
            "htm": htm,
            "htu": htu.as_str(),
            "iat": crate::session::tokens::now_s(),
        });
        if let Some(t) = access_token {
            claims["ath"] = URL_SAFE_NO_PAD.encode(Sha256::digest(t.as_bytes())).into();
        }
        if let Some(n) = self.nonce(server) {
            claims["nonce"] = n.into();
        }
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{}.{payload}", self.header_b64);
        let sig: Signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    /// The nonce `server` (an origin, or "as" for the authorization server) gave last.
    pub fn nonce(&self, server: &str) -> Option<String> {
        self.nonces.lock().ok()?.get(server).cloned()
    }

    /// Records a `DPoP-Nonce` answer header of `server`; returns whether it was a usable nonce
    /// different from the one held (a reason to retry once with it).
    pub fn remember_nonce(&self, server: &str, headers: &http::HeaderMap) -> bool {
        let Some(v) = headers.get("dpop-nonce").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        // NQCHAR (RFC 9449 §8.1): printable ASCII without `"` and `\`.
        let valid = !v.is_empty()
            && v.len() <= MAX_NONCE_LEN
            && v.bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\');
        if !valid {
            return false;
        }
        let Ok(mut map) = self.nonces.lock() else {
            return false;
        };
        if map.get(server).is_some_and(|n| n == v) {
            return false;
        }
        if map.len() >= MAX_NONCES && !map.contains_key(server) {
            map.clear();
        }
        map.insert(server.to_string(), v.to_string());
        true
    }
}

/// Whether a `WWW-Authenticate` answer asks for a DPoP nonce (RFC 9449 §9).
pub fn asks_for_nonce(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("use_dpop_nonce"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::VerifyingKey;

    fn b64json(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("b64")).expect("json")
    }

    #[test]
    fn a_proof_verifies_with_its_embedded_key_and_carries_the_request() {
        let d = Dpop::derived(&[7; 32]);
        let url = url::Url::parse("https://api.test/v1/items?q=1#f").expect("url");
        let p = d.proof("GET", &url, Some("tok"), "https://api.test");
        let parts: Vec<&str> = p.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = b64json(parts[0]);
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert!(header["jwk"].get("d").is_none(), "no private part");
        let claims = b64json(parts[1]);
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://api.test/v1/items");
        assert_eq!(
            claims["ath"],
            URL_SAFE_NO_PAD.encode(Sha256::digest(b"tok"))
        );
        assert!(claims.get("nonce").is_none());

        let x = URL_SAFE_NO_PAD
            .decode(header["jwk"]["x"].as_str().expect("x"))
            .expect("x");
        let y = URL_SAFE_NO_PAD
            .decode(header["jwk"]["y"].as_str().expect("y"))
            .expect("y");
        let point = p256::EncodedPoint::from_affine_coordinates(
            x.as_slice().into(),
            y.as_slice().into(),
            false,
        );
        let vk = VerifyingKey::from_encoded_point(&point).expect("point");
        let sig =
            Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).expect("sig")).expect("sig");
        let input = format!("{}.{}", parts[0], parts[1]);
        assert!(vk.verify(input.as_bytes(), &sig).is_ok());
        assert!(vk.verify(b"something else", &sig).is_err());

        // Two proofs never share a jti.
        let q = d.proof("GET", &url, Some("tok"), "https://api.test");
        assert_ne!(
            b64json(q.split('.').nth(1).expect("p"))["jti"],
            claims["jti"]
        );
    }

    #[test]
    fn the_derived_key_is_stable_per_session_key_and_differs_across_keys() {
        assert_eq!(
            Dpop::derived(&[1; 32]).thumbprint(),
            Dpop::derived(&[1; 32]).thumbprint()
        );
        assert_ne!(
            Dpop::derived(&[1; 32]).thumbprint(),
            Dpop::derived(&[2; 32]).thumbprint()
        );
        assert!(!format!("{:?}", Dpop::derived(&[1; 32])).contains("d\""));
    }

    #[test]
    fn nonces_are_kept_per_server_and_checked() {
        let d = Dpop::derived(&[3; 32]);
        let mut h = http::HeaderMap::new();
        h.insert("dpop-nonce", http::HeaderValue::from_static("n-1"));
        assert!(d.remember_nonce("as", &h));
        assert!(
            !d.remember_nonce("as", &h),
            "the same nonce is no reason to retry"
        );
        assert_eq!(d.nonce("as").as_deref(), Some("n-1"));
        assert_eq!(d.nonce("https://api.test"), None);
        let url = url::Url::parse("https://as.test/token").expect("url");
        let p = d.proof("POST", &url, None, "as");
        assert_eq!(b64json(p.split('.').nth(1).expect("p"))["nonce"], "n-1");
        h.insert("dpop-nonce", http::HeaderValue::from_static("bad\"nonce"));
        assert!(!d.remember_nonce("as", &h));
        assert_eq!(d.nonce("as").as_deref(), Some("n-1"));
    }
}
