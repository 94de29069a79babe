//! POST /refreshtoken: rotation, expires_in, and what an IdP refusal or failure does to the session.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn refresh_rotates_the_tokens_and_reports_expires_in() {
    let app = spawn_app().await;
    app.login().await;
    let first_rt = app.idp.last_refresh_token().expect("refresh token issued");
    app.idp.behave(|b| b.access_token_ttl = 120);

    let resp = app.post_refresh().await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("body");
    for secret in app.idp.all_issued_secrets() {
        assert!(!body.contains(&secret), "/refreshtoken exposes a token");
    }
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let expires_in = v["expires_in"]
        .as_i64()
        .unwrap_or_else(|| panic!("no numeric expires_in in {body}"));
    assert!(
        (60..=120).contains(&expires_in),
        "expires_in {expires_in} for a 120 s token"
    );

    let refreshes: Vec<_> = app
        .idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type() == "refresh_token")
        .collect();
    assert_eq!(refreshes.len(), 1);
    assert_eq!(refreshes[0].get("refresh_token"), Some(first_rt.as_str()));
    assert!(
        refreshes[0].authorization.is_some() || refreshes[0].get("client_secret").is_some(),
        "refresh without client auth"
    );

    // The rotated refresh token replaced the old one: a second refresh uses it (the fake IdP
    // rejects any reuse of a rotated token).
    let second_rt = app.idp.last_refresh_token().expect("rotated");
    assert_ne!(first_rt, second_rt);
    let resp = app.post_refresh().await;
    assert_eq!(
        resp.status(),
        200,
        "second refresh failed: the rotated refresh token was not kept"
    );
    let refreshes: Vec<_> = app
        .idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type() == "refresh_token")
        .collect();
    assert_eq!(refreshes[1].get("refresh_token"), Some(second_rt.as_str()));

    // And the API now receives the newest access token.
    let resp = app.get_api("/api/whoami").await;
    assert_eq!(resp.status(), 200);
    let latest = app.idp.last_access_token().expect("at");
    assert_eq!(
        app.api.last().header("authorization"),
        Some(format!("Bearer {latest}").as_str())
    );
}

#[tokio::test]
async fn refresh_without_a_session_is_401() {
    let app = spawn_app().await;
    let resp = app.post_refresh().await;
    assert_json_error(resp, 401).await;
    assert_eq!(app.idp.refresh_grants(), 0);
}

#[tokio::test]
async fn refresh_refused_by_the_idp_ends_the_session() {
    let app = spawn_app().await;
    app.login().await;
    app.idp.behave(|b| b.refresh = RefreshMode::InvalidGrant);
    let resp = app.post_refresh().await;
    assert_clears_session_cookie(&resp);
    assert_no_session_cookie_set(&resp);
    assert_json_error(resp, 401).await;
    assert_eq!(
        app.get_userinfo().await.status(),
        401,
        "the session outlived its refresh token"
    );
}

#[tokio::test]
/// A transient IdP failure is not the user's fault and not fatal: 503 (try again), session kept.
async fn refresh_when_the_idp_fails_is_503_and_keeps_the_session() {
    let app = spawn_app().await;
    app.login().await;
    app.idp.behave(|b| b.refresh = RefreshMode::ServerError);
    let resp = app.post_refresh().await;
    let v = assert_json_error(resp, 503).await;
    assert_eq!(v["error"], "temporarily_unavailable");
    let text = v.to_string();
    assert!(
        !text.contains("Internal Server Error</body>"),
        "the IdP's HTML leaked into the error: {text}"
    );
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "a transient IdP failure logged the user out"
    );
}

#[tokio::test]
async fn refresh_timeout_is_504_or_502() {
    let app = spawn_app_with(AppOptions::default().oauth("http_timeout_s = 1")).await;
    app.login().await;
    app.idp
        .behave(|b| b.refresh_delay = std::time::Duration::from_secs(5));
    let resp = app.post_refresh().await;
    assert_json_error_in(resp, 502..=504).await;
}

#[tokio::test]
async fn tampered_cookie_at_refresh_is_401_and_cleared_without_idp_call() {
    let app = spawn_app().await;
    let resp = app
        .raw_client
        .post(app.url("/refreshtoken"))
        .header("X-CSRF", "1")
        .header(
            "Cookie",
            "tg_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .send()
        .await
        .expect("POST");
    assert_clears_session_cookie(&resp);
    assert_json_error(resp, 401).await;
    assert_eq!(app.idp.refresh_grants(), 0);
}
