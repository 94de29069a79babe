//! DPoP (RFC 9449) with the fake IdP, for what a real IdP will not do on demand: a `use_dpop_nonce`
//! challenge on the token endpoint answered by exactly one retry carrying the nonce, and an IdP
//! that answers proofs with plain bearer tokens (refused: no session). The flows against a real
//! DPoP-enforcing IdP are in oidc_dpop.rs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

use crate::helpers::*;

/// RFC 7638 thumbprint of the key in a proof's header.
fn proof_jkt(proof: &str) -> String {
    let header: Value = proof
        .split('.')
        .next()
        .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
        .and_then(|h| serde_json::from_slice(&h).ok())
        .expect("a JWS header");
    jwk_thumbprint(&header["jwk"])
}

#[tokio::test]
async fn a_nonce_challenge_at_the_token_endpoint_is_answered_by_one_retry_with_the_nonce() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| b.dpop_nonce = Some("as-nonce-7".into()));
    let app = spawn_app_with(AppOptions::default().idp(&idp).oauth("dpop = true")).await;

    let pending = app.start_login(None).await;
    let jkt = pending
        .location
        .query_pairs()
        .find(|(k, _)| k == "dpop_jkt")
        .map(|(_, v)| v.into_owned())
        .expect("dpop_jkt on the authorization request");
    let r = app.finish_login(&pending).await;
    assert_eq!(r.status(), 302, "{}", r.text().await.unwrap_or_default());

    let codes: Vec<TokenRequest> = idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type() == "authorization_code")
        .collect();
    assert_eq!(codes.len(), 2, "the challenge, then one retry");
    let first = codes[0].dpop.as_deref().expect("a proof");
    let second = codes[1].dpop.as_deref().expect("a proof");
    assert_eq!(jws_claims(first)["nonce"], Value::Null);
    assert_eq!(jws_claims(second)["nonce"], "as-nonce-7");
    for p in [first, second] {
        let c = jws_claims(p);
        assert_eq!(c["htm"], "POST");
        assert_eq!(c["htu"], format!("{}/token", idp.issuer()));
        assert!(c.get("ath").is_none(), "no access token on a token request");
        assert_eq!(proof_jkt(p), jkt, "the key the code is bound to");
    }
    assert_ne!(jws_claims(first)["jti"], jws_claims(second)["jti"]);

    // The nonce is remembered: the refresh grant carries it at once.
    let r = app.post_refresh().await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let refreshes: Vec<TokenRequest> = idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type() == "refresh_token")
        .collect();
    assert_eq!(refreshes.len(), 1);
    assert_eq!(
        jws_claims(refreshes[0].dpop.as_deref().expect("proof"))["nonce"],
        "as-nonce-7"
    );

    // A nonce that keeps changing is not chased forever: one retry per request.
    idp.behave(|b| b.dpop_nonce = Some("as-nonce-8".into()));
    let before = idp.token_requests().len();
    let r = app.post_refresh().await;
    assert_eq!(r.status(), 200, "the retry with the new nonce works");
    assert_eq!(idp.token_requests().len() - before, 2);
}

#[tokio::test]
async fn bearer_tokens_in_answer_to_a_proof_are_refused() {
    // The fake IdP ignores proofs and answers token_type Bearer.
    let idp = FakeIdp::start().await;
    let app = spawn_app_with(AppOptions::default().idp(&idp).oauth("dpop = true")).await;
    let pending = app.start_login(None).await;
    let r = app.finish_login(&pending).await;
    assert_eq!(r.status(), 502);
    assert!(
        r.headers().get_all("set-cookie").iter().all(|c| !c
            .to_str()
            .unwrap_or("")
            .starts_with("tg_session=")
            || c.to_str().unwrap_or("").contains("Max-Age=0")),
        "no session cookie"
    );
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "bad_gateway");
    let issued = idp.all_issued_secrets();
    assert!(!issued.is_empty());
    assert!(
        issued.iter().all(|t| !v.to_string().contains(t.as_str())),
        "no token in the answer"
    );
    assert_eq!(app.get_userinfo().await.status(), 401);
}
