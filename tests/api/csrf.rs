//! CSRF defences: the required custom header (checked before the session), Sec-Fetch-Site, Origin.

use crate::helpers::*;

/// The three kinds of protected endpoints, as (method, path).
const PROTECTED: [(&str, &str); 3] = [
    ("POST", "/refreshtoken"),
    ("POST", "/logout"),
    ("GET", "/api/x"),
];

fn request(app: &TestApp, method: &str, path: &str) -> reqwest::RequestBuilder {
    match method {
        "POST" => app.client.post(app.url(path)),
        _ => app.client.get(app.url(path)),
    }
}

#[tokio::test]
async fn missing_csrf_header_is_403_before_the_session_is_looked_up() {
    let app = spawn_app().await;
    for (method, path) in PROTECTED {
        // No session at all: 403 (not 401) proves the CSRF check comes first.
        let resp = request(&app, method, path).send().await.expect("send");
        let v = assert_json_error(resp, 403).await;
        assert!(v["error"].is_string(), "{method} {path}");
    }
}

#[tokio::test]
async fn missing_csrf_header_with_a_session_changes_nothing() {
    let app = spawn_app().await;
    app.login().await;
    for (method, path) in PROTECTED {
        let resp = request(&app, method, path).send().await.expect("send");
        assert_eq!(resp.status(), 403, "{method} {path}");
        assert!(
            set_cookies(&resp)
                .iter()
                .all(|c| !is_session_cookie_name(&c.name)),
            "{method} {path} touched the session"
        );
    }
    assert!(
        app.api.requests().is_empty(),
        "the API was called without the CSRF header"
    );
    assert!(
        app.idp.revocations().is_empty(),
        "logout ran without the CSRF header"
    );
    assert_eq!(
        app.idp.refresh_grants(),
        0,
        "refresh ran without the CSRF header"
    );
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "the session was ended by a forged request"
    );
}

#[tokio::test]
async fn cross_site_fetch_metadata_is_403() {
    let app = spawn_app().await;
    app.login().await;
    for (method, path) in PROTECTED {
        let resp = request(&app, method, path)
            .header("X-CSRF", "1")
            .header("Sec-Fetch-Site", "cross-site")
            .send()
            .await
            .expect("send");
        assert_json_error(resp, 403).await;
    }
    assert!(app.api.requests().is_empty());
    assert!(app.idp.revocations().is_empty());
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn same_origin_fetch_metadata_is_allowed() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app
        .client
        .get(app.url("/api/x"))
        .header("X-CSRF", "1")
        .header("Sec-Fetch-Site", "same-origin")
        .header("Origin", app.public_url.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(app.api.requests().len(), 1);
}

#[tokio::test]
async fn foreign_origin_is_403() {
    let app = spawn_app().await;
    app.login().await;
    let public = url::Url::parse(&app.public_url).expect("url");
    let other_port = format!(
        "http://127.0.0.1:{}",
        public.port().unwrap_or(80).wrapping_add(1)
    );
    let https_variant = app.public_url.replace("http://", "https://");
    let origins = [
        "http://evil.example",
        "null",
        other_port.as_str(),
        https_variant.as_str(),
    ];
    for origin in origins {
        for (method, path) in PROTECTED {
            let resp = request(&app, method, path)
                .header("X-CSRF", "1")
                .header("Origin", origin)
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 403, "{method} {path} with Origin {origin}");
        }
    }
    assert!(app.api.requests().is_empty());
    assert!(app.idp.revocations().is_empty());
    assert_eq!(app.idp.refresh_grants(), 0);
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn csrf_rejection_body_is_json_and_secret_free() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app
        .client
        .post(app.url("/refreshtoken"))
        .send()
        .await
        .expect("send");
    let v = assert_json_error(resp, 403).await;
    let text = v.to_string();
    for secret in app.idp.all_issued_secrets() {
        assert!(!text.contains(&secret));
    }
}

#[tokio::test]
async fn get_logout_is_not_a_logout() {
    // A cross-site <img src=/logout> must not end the session.
    let app = spawn_app().await;
    app.login().await;
    let _ = app
        .client
        .get(app.url("/logout"))
        .send()
        .await
        .expect("send");
    assert_eq!(app.get_userinfo().await.status(), 200);
    assert!(app.idp.revocations().is_empty());
}
