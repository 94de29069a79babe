//! Token and key parsing: JWT headers, the unverified claims of a stored ID token, JWKS documents
//! and keys built from them, and verification with those keys never panic on hostile input.
//! Input: `<token>` or `<token>\n<jwks json>`.
#![no_main]

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
use libfuzzer_sys::fuzz_target;
use tokengate::idp::id_token::unverified_claims;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s: &str = &s;
    let (token, jwks) = s.split_once('\n').unwrap_or((s, s));
    let header = decode_header(token).ok();
    let _ = unverified_claims(token);
    let _ = unverified_claims(s);
    let _ = decode_header(s);
    for doc in [jwks, s] {
        let Ok(set) = serde_json::from_str::<JwkSet>(doc) else {
            continue;
        };
        for jwk in &set.keys {
            let _ = set.find(jwk.common.key_id.as_deref().unwrap_or(""));
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            if let Some(h) = &header {
                let mut v = Validation::new(h.alg);
                v.validate_exp = false;
                v.validate_aud = false;
                v.required_spec_claims.clear();
                let _ = decode::<serde_json::Value>(token, &key, &v);
            }
        }
    }
});
