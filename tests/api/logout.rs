//! POST /logout: end-session URL, token revocation (RFC 7009), cookies cleared.

use serde_json::Value;

use crate::helpers::*;

async fn logout_url(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("JSON logout answer");
    v["logout_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no logout_url in {v}"))
        .to_owned()
}

#[tokio::test]
async fn logout_returns_the_end_session_url_with_id_token_hint_and_post_logout_redirect() {
    let app = spawn_app().await;
    app.login().await;
    let id_token = app.idp.last_id_token().expect("id token issued");
    let resp = app.post_logout().await;
    let url = url::Url::parse(&logout_url(resp).await).expect("absolute logout_url");
    let mut endpoint = url.clone();
    endpoint.set_query(None);
    assert_eq!(
        endpoint.as_str(),
        format!("{}/end-session", app.idp.issuer())
    );
    let get = |n: &str| {
        url.query_pairs()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(get("id_token_hint").as_deref(), Some(id_token.as_str()));
    assert_eq!(
        get("post_logout_redirect_uri"),
        Some(format!("{}/", app.public_url))
    );
}

#[tokio::test]
async fn configured_post_logout_redirect_uri_is_used() {
    let app = spawn_app_with(
        AppOptions::default().oauth(r#"post_logout_redirect_uri = "http://127.0.0.1:1/bye""#),
    )
    .await;
    app.login().await;
    let url = url::Url::parse(&logout_url(app.post_logout().await).await).expect("url");
    let got = url
        .query_pairs()
        .find(|(k, _)| k == "post_logout_redirect_uri")
        .map(|(_, v)| v.into_owned());
    assert_eq!(got.as_deref(), Some("http://127.0.0.1:1/bye"));
}

#[tokio::test]
async fn logout_revokes_the_refresh_token_and_the_access_token() {
    let app = spawn_app().await;
    app.login().await;
    let rt = app.idp.last_refresh_token().expect("rt");
    let at = app.idp.last_access_token().expect("at");
    let resp = app.post_logout().await;
    assert_eq!(resp.status(), 200);
    let revoked = app.idp.revoked_tokens();
    assert!(revoked.contains(&rt), "refresh token not revoked");
    assert!(revoked.contains(&at), "access token not revoked");
}

#[tokio::test]
async fn logout_revokes_the_current_refresh_token_after_rotation() {
    let app = spawn_app().await;
    app.login().await;
    assert_eq!(app.post_refresh().await.status(), 200);
    let rt = app.idp.last_refresh_token().expect("rt");
    assert_eq!(app.post_logout().await.status(), 200);
    assert!(
        app.idp.revoked_tokens().contains(&rt),
        "the rotated refresh token was not revoked"
    );
}

#[tokio::test]
async fn logout_clears_the_session_and_ends_access() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app.post_logout().await;
    assert_clears_session_cookie(&resp);
    assert_no_session_cookie_set(&resp);
    let body = resp.text().await.expect("body");
    for secret in app
        .idp
        .all_issued_secrets()
        .iter()
        .filter(|s| !s.contains('.'))
    {
        assert!(
            !body.contains(secret.as_str()),
            "logout body exposes an access/refresh token"
        );
    }
    assert_eq!(app.get_userinfo().await.status(), 401);
    assert_eq!(app.get_api("/api/after-logout").await.status(), 401);
    assert!(app.api.requests().is_empty());
}

#[tokio::test]
/// Logout is idempotent: without a session it still answers 200 with `/` (the SPA can always
/// navigate on), revokes nothing and clears whatever tokengate cookies the browser still has.
async fn logout_without_a_session_is_200_with_root_and_revokes_nothing() {
    let app = spawn_app().await;
    let resp = app.post_logout().await;
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(v["logout_url"], "/");
    assert!(app.idp.revocations().is_empty());
}

#[tokio::test]
async fn logout_without_end_session_endpoint_returns_root() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| b.end_session_supported = false);
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await;
    app.login().await;
    let url = logout_url(app.post_logout().await).await;
    assert!(
        url == "/" || url == format!("{}/", app.public_url),
        "logout_url {url:?}"
    );
}

#[tokio::test]
async fn logout_without_revocation_endpoint_still_clears_the_session() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| b.revocation_supported = false);
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await;
    app.login().await;
    let resp = app.post_logout().await;
    assert_eq!(resp.status(), 200);
    assert_clears_session_cookie(&resp);
    assert_eq!(app.get_userinfo().await.status(), 401);
}
