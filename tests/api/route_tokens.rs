//! One token per API (fake IdP): routes with `resource`/`scopes` get a downscoped token of their
//! own (refresh grant with `resource` + `scope`, RFC 8707 §2.2), cached per (session, resource,
//! scopes); `token = "client" | "user-or-anonymous" | "none"`; the IdP's `invalid_target` /
//! `invalid_scope` as 403 JSON. Runs on both session stores.

use serde_json::Value;

use crate::helpers::*;

const A: &str = "http://api-a.test/";
const B: &str = "http://api-b.test/";

/// `AppOptions::toml` text is placed before the default routes, which name the echo API; the
/// test routes need its URL too, so they are spliced in here.
async fn spawn_with_routes(routes: &str) -> TestApp {
    let api = EchoApi::start().await;
    spawn_app_with(
        AppOptions::default()
            .api(&api)
            .toml(&routes.replace("{api}", api.url())),
    )
    .await
}

fn bearer(rec: &Recorded) -> Option<String> {
    rec.header("authorization")
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).to_owned())
}

fn downscoped_grants(app: &TestApp) -> Vec<TokenRequest> {
    app.idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type() == "refresh_token" && r.get("resource").is_some())
        .collect()
}

fn last_bearer_for(app: &TestApp, prefix: &str) -> String {
    let rec = app
        .api
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.uri.starts_with(prefix))
        .unwrap_or_else(|| panic!("no request reached the API under {prefix}"));
    bearer(&rec).unwrap_or_else(|| panic!("no bearer token on {}", rec.uri))
}

/// Two API routes with their own audience (and /a with narrower scopes), beside the default
/// `/api` route that keeps the session's token.
const TWO_APIS: &str = r#"
[[routes]]
prefix = "/a"
upstream = "{api}"
resource = "http://api-a.test/"
scopes = ["profile"]

[[routes]]
prefix = "/b"
upstream = "{api}"
resource = ["http://api-b.test/"]
"#;

#[tokio::test]
async fn each_route_gets_a_token_for_its_own_audience_and_scopes_by_a_refresh_grant() {
    let app = spawn_with_routes(TWO_APIS).await;
    app.login().await;
    let session_token = app.idp.last_access_token().expect("login token");

    assert_eq!(app.get_api("/a/items").await.status(), 200);
    let grants = downscoped_grants(&app);
    assert_eq!(grants.len(), 1, "one grant for /a");
    assert_eq!(grants[0].all("resource"), vec![A]);
    assert_eq!(grants[0].get("scope"), Some("profile"));
    let token_a = last_bearer_for(&app, "/a/");
    assert_ne!(token_a, session_token, "/a gets a token of its own");

    assert_eq!(app.get_api("/b/items").await.status(), 200);
    let grants = downscoped_grants(&app);
    assert_eq!(grants.len(), 2, "another grant for /b");
    assert_eq!(grants[1].all("resource"), vec![B]);
    assert_eq!(grants[1].get("scope"), None, "/b has no scopes: as granted");
    let token_b = last_bearer_for(&app, "/b/");
    assert_ne!(token_b, token_a, "/b never gets /a's token");
    assert_ne!(token_b, session_token);

    // The default route keeps the session's own token, not either API's.
    assert_eq!(app.get_api("/api/me").await.status(), 200);
    assert_eq!(last_bearer_for(&app, "/api/"), session_token);

    // Each API only ever saw its own token.
    for rec in app.api.requests() {
        let t = bearer(&rec).expect("bearer");
        if rec.uri.starts_with("/a/") {
            assert_eq!(t, token_a, "{}", rec.uri);
        } else if rec.uri.starts_with("/b/") {
            assert_eq!(t, token_b, "{}", rec.uri);
        }
    }
    // The fake IdP rotates refresh tokens on every grant (reuse → invalid_grant): the second
    // downscoped grant and this refresh only work if each rotation was kept in the session.
    assert_eq!(app.post_refresh().await.status(), 200);
    assert_eq!(app.get_api("/api/after").await.status(), 200);
}

#[tokio::test]
async fn a_route_token_is_cached_until_shortly_before_expiry() {
    let app = spawn_with_routes(TWO_APIS).await;
    app.login().await;
    for i in 0..3 {
        assert_eq!(app.get_api(&format!("/a/call{i}")).await.status(), 200);
    }
    assert_eq!(
        downscoped_grants(&app).len(),
        1,
        "second and third call: cached"
    );
    let tokens: Vec<_> = app.api.requests().iter().filter_map(bearer).collect();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().all(|t| t == &tokens[0]), "{tokens:?}");

    // Short-lived route tokens are fetched again once within the skew window (half the
    // lifetime for tokens shorter than twice the skew).
    let app = spawn_with_routes(TWO_APIS).await;
    app.idp.behave(|b| b.access_token_ttl = 2);
    app.login().await;
    assert_eq!(app.get_api("/a/one").await.status(), 200);
    assert_eq!(app.get_api("/a/two").await.status(), 200);
    assert_eq!(downscoped_grants(&app).len(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(app.get_api("/a/three").await.status(), 200);
    assert_eq!(downscoped_grants(&app).len(), 2, "expiring: fetched again");
}

#[tokio::test]
async fn concurrent_calls_share_one_grant_per_route_and_never_mix_tokens() {
    let app = spawn_with_routes(TWO_APIS).await;
    app.idp
        .behave(|b| b.refresh_delay = std::time::Duration::from_millis(100));
    app.login().await;
    let mut calls = Vec::new();
    for i in 0..6 {
        for prefix in ["/a", "/b"] {
            let req = app
                .client
                .get(app.url(&format!("{prefix}/c{i}")))
                .header("X-CSRF", "1");
            calls.push(tokio::spawn(async move { req.send().await }));
        }
    }
    for c in calls {
        let r = c.await.expect("task").expect("call");
        assert_eq!(r.status(), 200);
    }
    let grants = downscoped_grants(&app);
    assert_eq!(grants.len(), 2, "one grant per (session, resource, scopes)");
    let token_a = last_bearer_for(&app, "/a/");
    let token_b = last_bearer_for(&app, "/b/");
    assert_ne!(token_a, token_b);
    for rec in app.api.requests() {
        let want = if rec.uri.starts_with("/a/") {
            &token_a
        } else {
            &token_b
        };
        assert_eq!(bearer(&rec).as_ref(), Some(want), "{}", rec.uri);
    }
    // Both grants spent the session's (rotating) refresh token one after the other.
    assert_eq!(app.post_refresh().await.status(), 200);
}

#[tokio::test]
async fn sessions_do_not_share_route_tokens() {
    let mut app = spawn_with_routes(TWO_APIS).await;
    app.login().await;
    assert_eq!(app.get_api("/a/first").await.status(), 200);
    let first = last_bearer_for(&app, "/a/");
    // Another browser, another session.
    app.jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    app.client = new_browser(&app.jar);
    app.login().await;
    assert_eq!(app.get_api("/a/second").await.status(), 200);
    assert_ne!(last_bearer_for(&app, "/a/"), first);
    assert_eq!(downscoped_grants(&app).len(), 2);
}

#[tokio::test]
async fn invalid_target_and_invalid_scope_become_403_json_and_keep_the_session() {
    for error in ["invalid_target", "invalid_scope"] {
        let app = spawn_with_routes(TWO_APIS).await;
        app.login().await;
        app.idp.behave(|b| b.target_error = Some(error.to_owned()));
        let v = assert_json_error(app.get_api("/a/items").await, 403).await;
        assert_eq!(v["error"], error, "{v}");
        let desc = v["error_description"].as_str().unwrap_or("");
        assert!(desc.contains("/a"), "names the route: {desc}");
        assert!(app.api.requests().is_empty(), "nothing forwarded");
        // The session is fine: its own routes and /userinfo still work.
        assert_eq!(app.get_userinfo().await.status(), 200);
        assert_eq!(app.get_api("/api/still").await.status(), 200);
    }
}

#[tokio::test]
async fn invalid_grant_on_a_downscoped_grant_ends_the_session() {
    let app = spawn_with_routes(TWO_APIS).await;
    app.login().await;
    app.idp.behave(|b| b.refresh = RefreshMode::InvalidGrant);
    let resp = app.get_api("/a/items").await;
    assert_clears_session_cookie(&resp);
    let v = assert_json_error(resp, 401).await;
    assert_eq!(v["error"], "invalid_grant");
    assert_eq!(app.get_userinfo().await.status(), 401);
}

#[tokio::test]
async fn client_route_uses_a_cached_client_credentials_token_without_a_session() {
    let app = spawn_with_routes(
        r#"
[[routes]]
prefix = "/svc"
upstream = "{api}"
token = "client"
resource = "http://api-c.test/"
scopes = ["api:read"]
"#,
    )
    .await;
    // No login at all.
    assert_eq!(app.get_api("/svc/one").await.status(), 200);
    assert_eq!(app.get_api("/svc/two").await.status(), 200);
    let cc: Vec<_> = app
        .idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type() == "client_credentials")
        .collect();
    assert_eq!(cc.len(), 1, "cached per route");
    assert_eq!(cc[0].all("resource"), vec!["http://api-c.test/"]);
    assert_eq!(cc[0].get("scope"), Some("api:read"));
    let tokens: Vec<_> = app.api.requests().iter().filter_map(bearer).collect();
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[0], tokens[1]);

    // Refused audience: 403 JSON too.
    let app = spawn_with_routes(
        r#"
[[routes]]
prefix = "/svc"
upstream = "{api}"
token = "client"
resource = "http://api-c.test/"
"#,
    )
    .await;
    app.idp
        .behave(|b| b.target_error = Some("invalid_target".into()));
    let v = assert_json_error(app.get_api("/svc/x").await, 403).await;
    assert_eq!(v["error"], "invalid_target");
}

#[tokio::test]
async fn user_or_anonymous_and_none_routes() {
    let app = spawn_with_routes(
        r#"
[[routes]]
prefix = "/maybe"
upstream = "{api}"
token = "user-or-anonymous"

[[routes]]
prefix = "/public"
upstream = "{api}"
token = "none"
"#,
    )
    .await;
    // Anonymous: no 401, no Authorization, not even the browser's own.
    for path in ["/maybe/x", "/public/x"] {
        let r = app
            .client
            .get(app.url(path))
            .header("X-CSRF", "1")
            .header("Authorization", "Bearer from-the-browser")
            .send()
            .await
            .expect("call");
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(app.api.last().header("authorization"), None, "{path}");
    }
    // The CSRF check still comes first.
    let r = app
        .client
        .get(app.url("/public/x"))
        .send()
        .await
        .expect("call");
    assert_eq!(r.status(), 403);

    app.login().await;
    app.add_browser_cookie("theme=dark");
    let session_token = app.idp.last_access_token().expect("token");
    assert_eq!(app.get_api("/maybe/y").await.status(), 200);
    assert_eq!(
        bearer(&app.api.last()).as_deref(),
        Some(session_token.as_str()),
        "logged in: the user's token"
    );
    assert_eq!(app.get_api("/public/y").await.status(), 200);
    let rec = app.api.last();
    assert_eq!(rec.header("authorization"), None, "none: never a token");
    let cookie = rec.header("cookie").unwrap_or("");
    assert!(
        !cookie.contains("tg_"),
        "our cookies stay with us: {cookie}"
    );
    assert!(cookie.contains("theme=dark"), "{cookie}");
}

#[tokio::test]
async fn a_session_without_refresh_token_cannot_get_a_route_token() {
    let app = spawn_with_routes(TWO_APIS).await;
    app.idp.behave(|b| {
        b.code_grant_patch
            .insert("refresh_token".into(), Value::Null);
    });
    app.login().await;
    let v = assert_json_error(app.get_api("/a/x").await, 401).await;
    assert_eq!(v["error"], "unauthorized");
    assert!(app.api.requests().is_empty());
}

#[tokio::test]
async fn login_asks_for_every_user_route_resource() {
    let app = two_api_app_with_client_route().await;
    let p = app.start_login(None).await;
    let mut resources = p.params_all("resource");
    resources.sort();
    assert_eq!(
        resources,
        vec![A.to_owned(), B.to_owned()],
        "not the client route's"
    );
}

async fn two_api_app_with_client_route() -> TestApp {
    spawn_with_routes(&format!(
        "{TWO_APIS}\n[[routes]]\nprefix = \"/svc\"\nupstream = \"{{api}}\"\ntoken = \"client\"\nresource = \"http://api-c.test/\"\n"
    ))
    .await
}

#[tokio::test]
async fn a_refresh_token_rotated_by_a_downscoped_grant_is_kept_in_the_session() {
    let app = spawn_with_routes(TWO_APIS).await;
    app.login().await;
    let first_rt = app.idp.last_refresh_token().expect("login refresh token");
    assert_eq!(app.get_api("/a/x").await.status(), 200);
    let rotated = app.idp.last_refresh_token().expect("rotated");
    assert_ne!(rotated, first_rt, "the fake IdP rotated it");
    // Another instance of the deployment (no in-process memory of the rotation) refreshes with
    // what the session holds: it must be the rotated token (the old one is dead).
    let other = spawn_app_with(
        AppOptions::default()
            .idp(&app.idp)
            .api(&app.api)
            .same_store_as(&app),
    )
    .await;
    let r = other
        .raw_client
        .post(other.url("/refreshtoken"))
        .header("Cookie", app.cookie_header())
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("refresh");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let last = app.idp.token_requests().pop().expect("request");
    assert_eq!(last.get("refresh_token"), Some(rotated.as_str()));
}

#[tokio::test]
async fn logout_revokes_the_sessions_route_tokens_and_forgets_them() {
    let app = spawn_with_routes(TWO_APIS).await;
    app.login().await;
    assert_eq!(app.get_api("/a/items").await.status(), 200);
    assert_eq!(app.get_api("/b/items").await.status(), 200);
    let (token_a, token_b) = (last_bearer_for(&app, "/a/"), last_bearer_for(&app, "/b/"));

    assert_eq!(app.post_logout().await.status(), 200);
    let revoked = app.idp.revoked_tokens();
    for (name, t) in [("/a", &token_a), ("/b", &token_b)] {
        assert!(
            revoked.contains(t),
            "{name}'s token is revoked at logout: {} revocations",
            revoked.len()
        );
    }

    // A new session never gets the old session's cached tokens.
    app.login().await;
    assert_eq!(app.get_api("/a/again").await.status(), 200);
    assert_ne!(last_bearer_for(&app, "/a/"), token_a);
    assert_eq!(downscoped_grants(&app).len(), 3);
}
