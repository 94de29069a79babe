//! GET /login: the authorization request, the login-transaction cookie, parallel tabs, return_to rules.

use crate::helpers::*;

fn is_base64url(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[tokio::test]
async fn login_redirects_to_the_authorize_endpoint_with_pkce_state_and_nonce() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;

    let mut endpoint = p.location.clone();
    endpoint.set_query(None);
    assert_eq!(
        endpoint.as_str(),
        format!("{}/authorize", app.idp.issuer()),
        "authorize endpoint"
    );
    for name in [
        "client_id",
        "response_type",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
    ] {
        assert_eq!(
            p.params_all(name).len(),
            1,
            "parameter {name} must appear exactly once in {}",
            p.location
        );
    }
    assert_eq!(p.param("client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(p.param("response_type").as_deref(), Some("code"));
    assert_eq!(p.redirect_uri, format!("{}/oauth-callback", app.public_url));
    let scope = p.param("scope").unwrap_or_default();
    let scopes: Vec<&str> = scope.split(' ').collect();
    for s in ["openid", "profile", "offline_access"] {
        assert!(scopes.contains(&s), "scope {s} missing from {scope:?}");
    }
    // ≥128 bits of state: at least 22 base64url characters.
    assert!(
        p.state.len() >= 22 && is_base64url(&p.state),
        "weak or odd state {:?}",
        p.state
    );
    let nonce = p
        .nonce
        .clone()
        .expect("nonce is sent when openid is requested");
    assert!(nonce.len() >= 22, "weak nonce {nonce:?}");
    // S256 of a verifier is 32 bytes: exactly 43 base64url characters.
    assert_eq!(
        p.code_challenge.len(),
        43,
        "code_challenge {:?}",
        p.code_challenge
    );
    assert!(is_base64url(&p.code_challenge));
    assert_eq!(p.param("code_challenge_method").as_deref(), Some("S256"));
    assert!(
        p.param("code_verifier").is_none(),
        "the verifier must never appear in a URL"
    );
}

#[tokio::test]
async fn login_sends_every_resource_indicator_and_extra_authorize_params() {
    let app = spawn_app_with(
        AppOptions::default()
            .oauth(r#"resources = ["https://api.one.example/", "https://api.two.example/"]"#)
            .oauth(r#"extra_authorize_params = { prompt = "consent" }"#),
    )
    .await;
    let p = app.start_login(None).await;
    let resources = p.params_all("resource");
    assert!(
        resources.contains(&"https://api.one.example/".to_owned()),
        "resources: {resources:?}"
    );
    assert!(
        resources.contains(&"https://api.two.example/".to_owned()),
        "resources: {resources:?}"
    );
    assert_eq!(
        resources.len(),
        2,
        "each resource exactly once: {resources:?}"
    );
    assert_eq!(p.param("prompt").as_deref(), Some("consent"));
}

#[tokio::test]
async fn every_login_gets_a_fresh_state_nonce_and_challenge() {
    let app = spawn_app().await;
    let a = app.start_login(None).await;
    let b = app.start_login(None).await;
    assert_ne!(a.state, b.state, "state reused");
    assert_ne!(a.nonce, b.nonce, "nonce reused");
    assert_ne!(
        a.code_challenge, b.code_challenge,
        "PKCE challenge (hence verifier) reused"
    );
}

#[tokio::test]
async fn login_sets_one_httponly_lax_short_lived_transaction_cookie() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let tx: Vec<_> = p
        .set_cookies
        .iter()
        .filter(|c| is_tx_cookie_name(&c.name) && !c.is_removal())
        .collect();
    assert_eq!(
        tx.len(),
        1,
        "one transaction cookie per login: {:?}",
        p.set_cookies
    );
    let c = tx[0];
    assert_eq!(
        c.name,
        format!("tg_tx_{}", p.state),
        "transaction cookie is named after the state"
    );
    assert!(c.http_only(), "HttpOnly missing: {}", c.raw);
    assert_eq!(
        c.same_site().as_deref(),
        Some("lax"),
        "SameSite=Lax needed for the IdP redirect: {}",
        c.raw
    );
    assert_eq!(c.path(), Some("/"), "{}", c.raw);
    assert_eq!(c.max_age(), Some(600), "{}", c.raw);
    assert!(c.domain().is_none(), "no Domain attribute: {}", c.raw);
    assert!(
        !c.secure(),
        "no Secure over a plain-http public_url: {}",
        c.raw
    );
    assert!(!c.value.is_empty());
    assert!(
        session_cookies_set_from(&p.set_cookies).is_empty(),
        "/login must not create a session: {:?}",
        p.set_cookies
    );
}

fn session_cookies_set_from(cookies: &[SetCookie]) -> Vec<&SetCookie> {
    cookies
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .collect()
}

#[tokio::test]
async fn login_under_https_uses_a_host_prefixed_secure_transaction_cookie() {
    let app = spawn_app_with(AppOptions::default().https()).await;
    let p = app.start_login(None).await;
    assert_eq!(p.redirect_uri, format!("{}/oauth-callback", app.public_url));
    let c = p
        .set_cookies
        .iter()
        .find(|c| is_tx_cookie_name(&c.name))
        .unwrap_or_else(|| panic!("no transaction cookie: {:?}", p.set_cookies));
    assert_eq!(c.name, format!("__Host-tg_tx_{}", p.state));
    assert!(c.secure(), "Secure missing under https: {}", c.raw);
    assert!(c.http_only(), "{}", c.raw);
    assert_eq!(c.path(), Some("/"), "__Host- requires Path=/: {}", c.raw);
    assert!(c.domain().is_none(), "__Host- forbids Domain: {}", c.raw);
    assert_eq!(c.same_site().as_deref(), Some("lax"), "{}", c.raw);
}

#[tokio::test]
async fn redirect_uri_ignores_host_and_forwarded_host_headers() {
    let app = spawn_app().await;
    let resp = app
        .raw_client
        .get(app.url("/login"))
        .header("Host", "evil.example")
        .header("X-Forwarded-Host", "evil.example")
        .header("X-Forwarded-Proto", "https")
        .send()
        .await
        .expect("GET /login");
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "status {}",
        resp.status()
    );
    let loc = url::Url::parse(&location(&resp)).expect("absolute Location");
    let redirect_uri = loc
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned());
    assert_eq!(
        redirect_uri,
        Some(format!("{}/oauth-callback", app.public_url))
    );
}

#[tokio::test]
async fn login_query_cannot_override_parameters_the_bff_owns() {
    let app = spawn_app().await;
    let url = format!(
        "{}?scope=admin&redirect_uri=https%3A%2F%2Fevil.example%2Fcb&response_type=token&client_id=evil&code_challenge_method=plain&state=attacker",
        app.url("/login")
    );
    let resp = app.client.get(url).send().await.expect("GET /login");
    if resp.status().is_client_error() {
        return; // rejecting the injection outright is fine
    }
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "status {}",
        resp.status()
    );
    let loc = url::Url::parse(&location(&resp)).expect("absolute Location");
    let all = |n: &str| {
        loc.query_pairs()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("client_id"), vec![CLIENT_ID.to_owned()]);
    assert_eq!(all("response_type"), vec!["code".to_owned()]);
    assert_eq!(
        all("redirect_uri"),
        vec![format!("{}/oauth-callback", app.public_url)]
    );
    assert_eq!(all("code_challenge_method"), vec!["S256".to_owned()]);
    assert_eq!(all("state").len(), 1);
    assert_ne!(all("state")[0], "attacker");
    assert!(
        !all("scope").iter().any(|s| s.contains("admin")),
        "scope injected: {:?}",
        all("scope")
    );
}

#[tokio::test]
async fn two_tabs_can_log_in_at_the_same_time() {
    let app = spawn_app().await;
    let tab_a = app.start_login(Some("/a")).await;
    let tab_b = app.start_login(Some("/b")).await;
    // Finish in the opposite order they were started.
    let resp_b = app.finish_login(&tab_b).await;
    assert_redirect_path(&app, &resp_b, "/b");
    let resp_a = app.finish_login(&tab_a).await;
    assert_redirect_path(&app, &resp_a, "/a");
    assert_eq!(app.idp.code_grants(), 2);
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn pending_logins_are_capped_and_the_newest_still_completes() {
    let app = spawn_app().await;
    let mut last = None;
    for _ in 0..8 {
        last = Some(app.start_login(None).await);
    }
    let tx_count = app
        .cookies()
        .iter()
        .filter(|(n, _)| is_tx_cookie_name(n))
        .count();
    assert!(
        tx_count <= 5,
        "the browser holds {tx_count} login-transaction cookies; cap is 5"
    );
    let resp = app.finish_login(&last.expect("started")).await;
    assert_redirect_path(&app, &resp, "/");
    assert_eq!(app.get_userinfo().await.status(), 200);
}

/// Accepts the path itself or the same path on the public origin.
pub fn assert_redirect_path(app: &TestApp, resp: &reqwest::Response, path: &str) {
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "expected a redirect to {path}, got {}",
        resp.status()
    );
    let loc = location(resp);
    assert!(
        loc == path || loc == format!("{}{}", app.public_url, path),
        "redirect to {loc:?}, expected {path:?}"
    );
}

async fn login_with_return_to(app: &TestApp, return_to: &str) -> reqwest::Response {
    let p = app.start_login(Some(return_to)).await;
    app.finish_login(&p).await
}

#[tokio::test]
async fn login_without_return_to_lands_on_root() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_redirect_path(&app, &resp, "/");
}

#[tokio::test]
async fn same_origin_return_to_with_query_is_kept() {
    let app = spawn_app().await;
    let resp = login_with_return_to(&app, "/dashboard?x=1").await;
    assert_redirect_path(&app, &resp, "/dashboard?x=1");
}

#[tokio::test]
async fn hostile_return_to_values_fall_back_to_root() {
    let app = spawn_app().await;
    let own_origin_userinfo = format!("{}@evil.com", app.public_url);
    let cases = [
        "//evil.com",
        "///evil.com",
        "/\\evil.com",
        "\\/evil.com",
        "\\\\evil.com",
        "https://evil.com",
        "http://evil.com/path",
        "https:evil.com",
        "/%2f%2fevil.com",
        "/%5cevil.com",
        "/./\\evil.com",
        "/a\r\nLocation: https://evil.com",
        "/%0d%0aLocation:%20https://evil.com",
        "/\t/evil.com",
        "/%09/evil.com",
        "javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        own_origin_userinfo.as_str(),
        "evil.com",
    ];
    for rt in cases {
        let resp = login_with_return_to(&app, rt).await;
        let status = resp.status();
        assert!(
            status == 302 || status == 303,
            "return_to {rt:?}: status {status}"
        );
        let loc = location(&resp);
        assert!(
            loc == "/" || loc == format!("{}/", app.public_url),
            "return_to {rt:?} led to Location {loc:?} instead of /"
        );
    }
}
