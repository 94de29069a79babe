//! The Redis store with the fake IdP: OIDC Back-Channel Logout tokens (valid, replayed, wrong
//! audience, carrying a nonce, without the event, without sub and sid, badly signed, issued too
//! long ago or in the future), the cookie
//! store's 501, and login states that are single use across replicas.

use serde_json::{json, Value};

use crate::helpers::*;
use crate::redis_server::RedisServer;

const EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

fn logout_claims(idp: &FakeIdp) -> Value {
    let now = unix_now();
    json!({
        "iss": idp.issuer(),
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 120,
        "jti": format!("jti-{}", rand::random::<u64>()),
        "sub": DEFAULT_SUB,
        "events": { EVENT: {} },
    })
}

fn sign(idp: &FakeIdp, claims: &Value) -> String {
    sign_jwt(&idp.behaviour(), claims)
}

async fn post_logout_token(app: &TestApp, token: &str) -> reqwest::Response {
    app.raw_client
        .post(app.url("/backchannel-logout"))
        .form(&[("logout_token", token)])
        .send()
        .await
        .expect("POST /backchannel-logout")
}

/// Two replicas on one Redis, one fake IdP, a session on each.
async fn two_replicas(redis: &RedisServer) -> (TestApp, TestApp) {
    let idp = FakeIdp::start().await;
    let a = spawn_app_with(AppOptions::default().idp(&idp).redis(redis)).await;
    let b = spawn_app_with(AppOptions::default().idp(&idp).redis(redis)).await;
    a.login().await;
    b.login().await;
    assert_eq!(a.get_userinfo().await.status(), 200);
    assert_eq!(b.get_userinfo().await.status(), 200);
    (a, b)
}

#[tokio::test]
async fn back_channel_logout_ends_the_subjects_sessions_on_every_replica() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    let token = sign(&a.idp, &logout_claims(&a.idp));
    let resp = post_logout_token(&b, &token).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(a.get_userinfo().await.status(), 401);
    assert_eq!(b.get_userinfo().await.status(), 401);
}

#[tokio::test]
async fn back_channel_logout_by_sid_ends_only_that_idp_session() {
    let redis = RedisServer::start().await;
    let idp = FakeIdp::start().await;
    let a = spawn_app_with(AppOptions::default().idp(&idp).redis(&redis)).await;
    let b = spawn_app_with(AppOptions::default().idp(&idp).redis(&redis)).await;
    idp.behave(|x| {
        x.claim("sid", json!("idp-session-A"));
    });
    a.login().await;
    idp.behave(|x| {
        x.claim("sid", json!("idp-session-B"));
    });
    b.login().await;
    let mut claims = logout_claims(&idp);
    claims["sid"] = json!("idp-session-A");
    let resp = post_logout_token(&a, &sign(&idp, &claims)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        a.get_userinfo().await.status(),
        401,
        "session of IdP session A ended"
    );
    assert_eq!(
        b.get_userinfo().await.status(),
        200,
        "the user's other IdP session stays"
    );
}

#[tokio::test]
async fn replayed_or_invalid_logout_tokens_are_400_and_end_nothing() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    let idp = a.idp.clone();

    let mut bad: Vec<(&str, String)> = Vec::new();
    let mut wrong_aud = logout_claims(&idp);
    wrong_aud["aud"] = json!("another-client");
    bad.push(("wrong aud", sign(&idp, &wrong_aud)));
    let mut with_nonce = logout_claims(&idp);
    with_nonce["nonce"] = json!("n");
    bad.push(("nonce", sign(&idp, &with_nonce)));
    let mut no_event = logout_claims(&idp);
    no_event["events"] = json!({});
    bad.push(("no event", sign(&idp, &no_event)));
    let mut no_subject = logout_claims(&idp);
    no_subject.as_object_mut().expect("object").remove("sub");
    bad.push(("neither sub nor sid", sign(&idp, &no_subject)));
    let mut no_jti = logout_claims(&idp);
    no_jti.as_object_mut().expect("object").remove("jti");
    bad.push(("no jti", sign(&idp, &no_jti)));
    let mut wrong_iss = logout_claims(&idp);
    wrong_iss["iss"] = json!("https://evil.example");
    bad.push(("wrong iss", sign(&idp, &wrong_iss)));
    let mut stale = logout_claims(&idp);
    stale["iat"] = json!(unix_now() - 7200);
    stale["exp"] = json!(unix_now() - 3600);
    bad.push(("expired", sign(&idp, &stale)));
    let forged = {
        let mut b = idp.behaviour();
        b.signer = Signer::Rsa2; // a key the IdP does not publish
        sign_jwt(&b, &logout_claims(&idp))
    };
    bad.push(("unknown signing key", forged));
    let none = {
        let mut b = idp.behaviour();
        b.signer = Signer::AlgNone;
        sign_jwt(&b, &logout_claims(&idp))
    };
    bad.push(("alg none", none));
    bad.push(("not a JWT", "garbage".to_string()));

    for (what, token) in &bad {
        let resp = post_logout_token(&a, token).await;
        let v = assert_json_error(resp, 400).await;
        assert_eq!(v["error"], "invalid_request", "{what}");
    }
    let missing = a
        .raw_client
        .post(a.url("/backchannel-logout"))
        .form(&[("other", "x")])
        .send()
        .await
        .expect("POST");
    assert_json_error(missing, 400).await;
    assert_eq!(a.get_userinfo().await.status(), 200, "nothing ended");

    // A valid token works once; its replay is refused.
    let token = sign(&idp, &logout_claims(&idp));
    assert_eq!(post_logout_token(&a, &token).await.status(), 200);
    assert_json_error(post_logout_token(&b, &token).await, 400).await;
}

/// OIDC Back-Channel Logout §2.6 item 7 (`iat`): a token issued longer ago than we accept (10
/// minutes, plus the clock skew) is refused even while its `exp` is still in the future, and so
/// is one issued in the future beyond the clock skew (60 s here). Nothing ends; a token with an
/// `iat` inside the window does end the session (the control).
#[tokio::test]
async fn logout_tokens_with_a_stale_or_future_iat_are_400_and_end_nothing() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    let idp = a.idp.clone();
    let now = unix_now();
    let mut old = logout_claims(&idp);
    old["iat"] = json!(now - 700);
    old["exp"] = json!(now + 120);
    let mut future = logout_claims(&idp);
    future["iat"] = json!(now + 300);
    future["exp"] = json!(now + 600);
    for (what, claims) in [("old iat", &old), ("future iat", &future)] {
        let v = assert_json_error(post_logout_token(&a, &sign(&idp, claims)).await, 400).await;
        assert_eq!(v["error"], "invalid_request", "{what}");
        assert_eq!(
            a.get_userinfo().await.status(),
            200,
            "{what}: nothing ended"
        );
        assert_eq!(
            b.get_userinfo().await.status(),
            200,
            "{what}: nothing ended"
        );
    }
    let mut recent = logout_claims(&idp);
    recent["iat"] = json!(now - 300);
    assert_eq!(
        post_logout_token(&a, &sign(&idp, &recent)).await.status(),
        200
    );
    assert_eq!(a.get_userinfo().await.status(), 401);
    assert_eq!(b.get_userinfo().await.status(), 401);
}

#[tokio::test]
async fn back_channel_logout_with_the_cookie_store_is_501_json() {
    let idp = FakeIdp::start().await;
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await;
    if redis_store() {
        return; // this suite run uses Redis for every app: covered above
    }
    let token = sign(&idp, &logout_claims(&idp));
    let v = assert_json_error(post_logout_token(&app, &token).await, 501).await;
    assert!(v["error_description"]
        .as_str()
        .unwrap_or("")
        .contains("redis"));
}

#[tokio::test]
async fn a_login_state_is_single_use_across_replicas() {
    let redis = RedisServer::start().await;
    let idp = FakeIdp::start().await;
    let a = spawn_app_with(AppOptions::default().idp(&idp).redis(&redis)).await;
    let b = spawn_app_with(AppOptions::default().idp(&idp).redis(&redis)).await;
    let pending = a.start_login(None).await;
    let code = idp.mint_code(pending.grant());
    let tx_cookie = a
        .cookies()
        .into_iter()
        .find(|(n, _)| n.starts_with("tg_tx_"))
        .map(|(n, v)| format!("{n}={v}"))
        .expect("transaction cookie");
    let query = [
        ("code", code.as_str()),
        ("state", pending.state.as_str()),
        ("iss", idp.issuer()),
    ];
    let first = a.callback(&query).await;
    assert_eq!(first.status(), 302);
    // The same callback with a copy of the transaction cookie, at the other replica.
    let replay = b
        .raw_client
        .get(b.url("/oauth-callback"))
        .query(&query)
        .header("Cookie", tx_cookie)
        .send()
        .await
        .expect("GET");
    assert_json_error(replay, 400).await;
    assert_eq!(idp.code_grants(), 1, "the code was not redeemed twice");
}
