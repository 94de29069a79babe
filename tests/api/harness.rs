//! Checks of the harness itself (no tokengate involved), so a failing test elsewhere points at the
//! app, not at the fake IdP or the echo API.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
use serde_json::{json, Value};

use crate::helpers::*;

fn grant_for(verifier: &str) -> CodeGrant {
    CodeGrant {
        client_id: CLIENT_ID.into(),
        redirect_uri: "http://127.0.0.1:1/oauth-callback".into(),
        code_challenge: s256(verifier),
        nonce: Some("n-0123456789012345678901".into()),
        sub: DEFAULT_SUB.into(),
    }
}

async fn redeem(idp: &FakeIdp, code: &str, verifier: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/token", idp.issuer()))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier),
            ("redirect_uri", "http://127.0.0.1:1/oauth-callback"),
        ])
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn fake_idp_id_tokens_verify_against_its_published_jwks() {
    let idp = FakeIdp::start().await;
    let jwks: JwkSet = reqwest::get(format!("{}/jwks", idp.issuer()))
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    for signer in [Signer::Rsa1, Signer::Ec1] {
        idp.behave(|b| b.signer = signer.clone());
        let verifier = "v".repeat(43);
        let code = idp.mint_code(grant_for(&verifier));
        let (status, body) = redeem(&idp, &code, &verifier).await;
        assert_eq!(status, 200, "{body}");
        let token = body["id_token"].as_str().expect("id_token");
        let header = decode_header(token).expect("header");
        let kid = header.kid.clone().expect("kid");
        let jwk = jwks.find(&kid).expect("kid published");
        let key = DecodingKey::from_jwk(jwk).expect("decoding key");
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[CLIENT_ID]);
        validation.set_issuer(&[idp.issuer()]);
        let data =
            decode::<Value>(token, &key, &validation).expect("the fake IdP's ID token verifies");
        assert_eq!(data.claims["nonce"], "n-0123456789012345678901");
    }
}

#[tokio::test]
async fn fake_idp_enforces_pkce_and_single_use_codes() {
    let idp = FakeIdp::start().await;
    let verifier = "a".repeat(43);
    let code = idp.mint_code(grant_for(&verifier));
    let (status, body) = redeem(&idp, &code, &"b".repeat(43)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let code = idp.mint_code(grant_for(&verifier));
    assert_eq!(redeem(&idp, &code, &verifier).await.0, 200);
    assert_eq!(
        redeem(&idp, &code, &verifier).await.0,
        400,
        "codes are single use"
    );
}

#[tokio::test]
async fn fake_idp_rotates_refresh_tokens_and_rejects_reuse() {
    let idp = FakeIdp::start().await;
    let verifier = "c".repeat(43);
    let code = idp.mint_code(grant_for(&verifier));
    let (_, body) = redeem(&idp, &code, &verifier).await;
    let rt = body["refresh_token"].as_str().expect("rt").to_owned();
    let refresh = |rt: String| {
        let url = format!("{}/token", idp.issuer());
        async move {
            reqwest::Client::new()
                .post(url)
                .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", rt.as_str()),
                ])
                .send()
                .await
                .expect("refresh")
                .status()
                .as_u16()
        }
    };
    assert_eq!(refresh(rt.clone()).await, 200);
    assert_eq!(
        refresh(rt).await,
        400,
        "a rotated refresh token must not work twice"
    );
    assert_eq!(idp.refresh_grants(), 2);
}

#[tokio::test]
async fn fake_idp_rejects_a_wrong_client_secret() {
    let idp = FakeIdp::start().await;
    let resp = reqwest::Client::new()
        .post(format!("{}/token", idp.issuer()))
        .basic_auth(CLIENT_ID, Some("wrong"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "x")])
        .send()
        .await
        .expect("token");
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn echo_api_records_what_it_receives() {
    let api = EchoApi::start().await;
    let resp = reqwest::Client::new()
        .post(format!("{}/a/b?c=%20d", api.url()))
        .header("X-Test", "1")
        .body("hello")
        .send()
        .await
        .expect("echo");
    assert_eq!(resp.status(), 200);
    let rec = api.last();
    assert_eq!(
        (rec.method.as_str(), rec.uri.as_str(), rec.body_len),
        ("POST", "/a/b?c=%20d", 5)
    );
    assert_eq!(rec.header("x-test"), Some("1"));
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["uri"], json!("/a/b?c=%20d"));
}

#[test]
fn set_cookie_parser_reads_attributes() {
    let c = SetCookie::parse(
        "__Host-tg_session=abc=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0",
    );
    assert_eq!(
        (c.name.as_str(), c.value.as_str()),
        ("__Host-tg_session", "abc=")
    );
    assert!(c.http_only() && c.secure() && c.is_removal());
    assert_eq!(c.same_site().as_deref(), Some("strict"));
    assert!(is_session_cookie_name(&c.name));
    assert!(is_session_cookie_name("tg_session.3"));
    assert!(!is_session_cookie_name("tg_sessionx"));
    assert!(is_tx_cookie_name("__Host-tg_tx_abc"));
}
