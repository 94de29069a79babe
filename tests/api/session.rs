//! The session cookie: attributes, sealing, tampering, key rotation, chunking, /userinfo.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn session_cookie_is_httponly_strict_root_path_and_not_secure_over_http() {
    let app = spawn_app().await;
    let cookies = app.login().await;
    let session: Vec<_> = cookies
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .collect();
    assert!(!session.is_empty(), "no session cookie set: {cookies:?}");
    for c in session {
        assert!(
            c.name == "tg_session" || c.name.starts_with("tg_session."),
            "name {}",
            c.name
        );
        assert!(c.http_only(), "HttpOnly missing: {}", c.raw);
        assert_eq!(c.same_site().as_deref(), Some("strict"), "{}", c.raw);
        assert_eq!(c.path(), Some("/"), "{}", c.raw);
        assert!(c.domain().is_none(), "no Domain: {}", c.raw);
        assert!(
            !c.secure(),
            "Secure over a plain-http public_url: {}",
            c.raw
        );
    }
}

#[tokio::test]
async fn session_cookie_under_https_is_host_prefixed_and_secure() {
    let app = spawn_app_with(AppOptions::default().https()).await;
    let p = app.start_login(None).await;
    let tx = p
        .set_cookies
        .iter()
        .find(|c| is_tx_cookie_name(&c.name))
        .expect("tx cookie")
        .clone();
    let code = app.idp.mint_code(p.grant());
    let url = format!(
        "{}?code={code}&state={}&iss={}",
        app.url("/oauth-callback"),
        p.state,
        url::form_urlencoded::byte_serialize(app.idp.issuer().as_bytes()).collect::<String>()
    );
    // The test talks plain http to the server, so the Secure cookie is sent by hand.
    let resp = app
        .raw_client
        .get(url)
        .header("Cookie", format!("{}={}", tx.name, tx.value))
        .send()
        .await
        .expect("cb");
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "callback status {}",
        resp.status()
    );
    let all = set_cookies(&resp);
    let session: Vec<_> = all
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .collect();
    assert!(!session.is_empty(), "no session cookie: {all:?}");
    for c in &session {
        assert!(c.name.starts_with("__Host-tg_session"), "name {}", c.name);
        assert!(c.secure(), "{}", c.raw);
        assert!(c.http_only(), "{}", c.raw);
        assert_eq!(c.same_site().as_deref(), Some("strict"), "{}", c.raw);
        assert_eq!(c.path(), Some("/"), "{}", c.raw);
        assert!(c.domain().is_none(), "{}", c.raw);
    }
    for c in all.iter().filter(|c| c.is_removal()) {
        assert!(
            c.name.starts_with("__Host-"),
            "deletion of a non-prefixed cookie under https: {}",
            c.raw
        );
        assert!(
            c.secure() && c.path() == Some("/"),
            "a __Host- deletion needs Secure and Path=/: {}",
            c.raw
        );
    }
}

#[tokio::test]
async fn userinfo_returns_the_logged_in_subject_without_tokens() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app.get_userinfo().await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("body");
    let v: Value = serde_json::from_str(&body).expect("JSON userinfo");
    assert_eq!(v["sub"], DEFAULT_SUB);
    for secret in app.idp.all_issued_secrets() {
        assert!(!body.contains(&secret), "/userinfo exposes a token");
    }
}

#[tokio::test]
async fn userinfo_without_a_session_is_401_json() {
    let app = spawn_app().await;
    let resp = app.get_userinfo().await;
    assert_json_error(resp, 401).await;
}

#[tokio::test]
async fn session_cookie_does_not_contain_the_tokens() {
    let app = spawn_app().await;
    app.login().await;
    let header = app.cookie_header();
    assert!(!header.is_empty());
    for secret in app.idp.all_issued_secrets() {
        assert!(
            !header.contains(&secret),
            "a token is readable in the cookie"
        );
        // The ID token's payload segment would reveal the claims.
        if let Some(payload) = secret.split('.').nth(1) {
            assert!(
                !header.contains(payload),
                "the ID token payload is readable in the cookie"
            );
        }
    }
}

#[tokio::test]
async fn two_logins_of_the_same_user_get_different_cookie_values() {
    let app = spawn_app().await;
    let first = app.login().await;
    let second = app.login().await;
    let v1: Vec<_> = first
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .map(|c| c.value.clone())
        .collect();
    let v2: Vec<_> = second
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .map(|c| c.value.clone())
        .collect();
    assert!(!v1.is_empty() && !v2.is_empty());
    assert_ne!(v1, v2, "a new login must issue a new session cookie");
}

fn tamper_variants(value: &str) -> Vec<(&'static str, String)> {
    let mut flipped: Vec<char> = value.chars().collect();
    let mid = flipped.len() / 2;
    flipped[mid] = if flipped[mid] == 'A' { 'B' } else { 'A' };
    let mut last_flipped: Vec<char> = value.chars().collect();
    let end = last_flipped.len() - 1;
    last_flipped[end] = if last_flipped[end] == 'A' { 'B' } else { 'A' };
    let mut first_flipped: Vec<char> = value.chars().collect();
    first_flipped[0] = if first_flipped[0] == 'A' { 'B' } else { 'A' };
    vec![
        (
            "one character flipped in the middle",
            flipped.into_iter().collect(),
        ),
        (
            "last character flipped (tag)",
            last_flipped.into_iter().collect(),
        ),
        (
            "first character flipped (nonce/version)",
            first_flipped.into_iter().collect(),
        ),
        ("truncated", value[..value.len() / 2].to_owned()),
        ("base64 garbage", "!!!not-base64***".to_owned()),
        ("empty", String::new()),
        ("random bytes", URL_SAFE_NO_PAD.encode([0x5au8; 90])),
    ]
}

#[tokio::test]
async fn tampered_session_cookie_is_401_and_cleared() {
    let app = spawn_app().await;
    app.login().await;
    let cookies = app.cookies();
    let (name, value) = cookies
        .iter()
        .find(|(n, _)| is_session_cookie_name(n))
        .cloned()
        .expect("session cookie in the jar");
    let others: Vec<String> = cookies
        .iter()
        .filter(|(n, _)| is_session_cookie_name(n) && *n != name)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    for (what, bad) in tamper_variants(&value) {
        let mut header = vec![format!("{name}={bad}")];
        header.extend(others.iter().cloned());
        let resp = app
            .raw_client
            .get(app.url("/userinfo"))
            .header("Cookie", header.join("; "))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 401, "{what}: status");
        assert_clears_session_cookie(&resp);
        assert_no_session_cookie_set(&resp);
        let v: Value = resp
            .json()
            .await
            .unwrap_or_else(|_| panic!("{what}: non-JSON body"));
        assert!(v["error"].is_string(), "{what}: {v}");
    }
    // The intact cookie still works (the tampering, not the test, caused the 401s).
    let ok = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", app.session_cookie_header())
        .send()
        .await
        .expect("GET");
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn tampered_session_cookie_on_the_proxy_is_401_and_the_api_is_not_called() {
    let app = spawn_app().await;
    app.login().await;
    let header = app.session_cookie_header();
    let (first, rest) = header.split_at(header.len() / 2);
    let mut chars: Vec<char> = rest.chars().collect();
    chars[0] = if chars[0] == 'A' { 'B' } else { 'A' };
    let bad = format!("{first}{}", chars.into_iter().collect::<String>());
    let resp = app
        .raw_client
        .get(app.url("/api/x"))
        .header("X-CSRF", "1")
        .header("Cookie", bad)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);
    assert!(
        app.api.requests().is_empty(),
        "a tampered session reached the API"
    );
}

#[tokio::test]
async fn session_cookie_from_another_deployment_is_rejected() {
    let idp = FakeIdp::start().await;
    let a = spawn_app_with(AppOptions::default().idp(&idp).keys(&[session_key(1)])).await;
    let b = spawn_app_with(AppOptions::default().idp(&idp).keys(&[session_key(2)])).await;
    a.login().await;
    let resp = b
        .raw_client
        .get(b.url("/userinfo"))
        .header("Cookie", a.session_cookie_header())
        .send()
        .await
        .expect("GET");
    assert_eq!(
        resp.status(),
        401,
        "a cookie sealed with another key was accepted"
    );
    assert_clears_session_cookie(&resp);
}

#[tokio::test]
async fn cookies_sealed_with_a_retired_key_still_work_during_rotation() {
    let idp = FakeIdp::start().await;
    let old = spawn_app_with(AppOptions::default().idp(&idp).keys(&[session_key(1)])).await;
    // New deployment: new key first (encrypts), old key second (still decrypts).
    let new = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .keys(&[session_key(2), session_key(1)])
            .same_store_as(&old),
    )
    .await;
    old.login().await;
    let resp = new
        .raw_client
        .get(new.url("/userinfo"))
        .header("Cookie", old.session_cookie_header())
        .send()
        .await
        .expect("GET");
    assert_eq!(
        resp.status(),
        200,
        "a cookie under the previous key was rejected during the overlap"
    );

    // And the new deployment seals with the new key: the old one cannot read its cookies.
    new.login().await;
    let resp = old
        .raw_client
        .get(old.url("/userinfo"))
        .header("Cookie", new.session_cookie_header())
        .send()
        .await
        .expect("GET");
    assert_eq!(
        resp.status(),
        401,
        "new cookies must be sealed with the first key"
    );
}

fn random_blob(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

async fn login_with_large_id_token(app: &TestApp) -> Vec<SetCookie> {
    // Random (incompressible) claim so the sealed session cannot fit in one 4 KB cookie.
    let blob = random_blob(4500);
    app.idp.behave(|b| {
        b.claim("profile_blob", json!(blob));
    });
    app.login().await
}

#[tokio::test]
async fn large_session_is_split_into_chunk_cookies_that_still_work() {
    if redis_store() {
        // Cookie store only: with Redis the cookie is a small sealed id, never split.
        return;
    }
    let app = spawn_app().await;
    let cookies = login_with_large_id_token(&app).await;
    let session: Vec<_> = cookies
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .collect();
    let names: Vec<&str> = session.iter().map(|c| c.name.as_str()).collect();
    assert!(
        names.contains(&"tg_session.0") && names.contains(&"tg_session.1"),
        "chunk cookies: {names:?}"
    );
    assert!(
        !names.contains(&"tg_session"),
        "the unsplit name must be absent when chunked: {names:?}"
    );
    for c in &session {
        assert!(
            c.raw.len() <= 4096,
            "Set-Cookie for {} is {} bytes, over the browser limit",
            c.name,
            c.raw.len()
        );
        assert!(c.http_only() && c.path() == Some("/"), "{}", c.raw);
        assert_eq!(c.same_site().as_deref(), Some("strict"), "{}", c.raw);
    }
    let resp = app.get_userinfo().await;
    assert_eq!(resp.status(), 200, "chunked session not reassembled");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["sub"], DEFAULT_SUB);
}

#[tokio::test]
async fn a_missing_chunk_means_no_session() {
    if redis_store() {
        // Cookie store only: with Redis the cookie is a small sealed id, never split.
        return;
    }
    let app = spawn_app().await;
    login_with_large_id_token(&app).await;
    let chunks: Vec<(String, String)> = app
        .cookies()
        .into_iter()
        .filter(|(n, _)| is_session_cookie_name(n))
        .collect();
    assert!(
        chunks.len() >= 2,
        "expected chunked cookies, got {chunks:?}"
    );
    for skip in 0..chunks.len() {
        let header = chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, (n, v))| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let resp = app
            .raw_client
            .get(app.url("/userinfo"))
            .header("Cookie", header)
            .send()
            .await
            .expect("GET");
        assert_eq!(
            resp.status(),
            401,
            "session accepted without chunk {}",
            chunks[skip].0
        );
    }
}

#[tokio::test]
async fn logout_of_a_chunked_session_clears_every_chunk() {
    let app = spawn_app().await;
    login_with_large_id_token(&app).await;
    let chunk_names: Vec<String> = app
        .cookies()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| is_session_cookie_name(n))
        .collect();
    let resp = app.post_logout().await;
    assert_eq!(resp.status(), 200);
    let cleared: Vec<String> = set_cookies(&resp)
        .into_iter()
        .filter(|c| c.is_removal())
        .map(|c| c.name)
        .collect();
    for n in &chunk_names {
        assert!(
            cleared.contains(n),
            "chunk {n} not cleared at logout: {cleared:?}"
        );
    }
    assert!(
        app.cookies()
            .iter()
            .all(|(n, _)| !is_session_cookie_name(n)),
        "browser still holds chunks"
    );
}

#[tokio::test]
async fn crafted_cookie_headers_do_not_crash_the_server() {
    let app = spawn_app().await;
    let many: String = (0..300)
        .map(|i| format!("c{i}=v{i}"))
        .collect::<Vec<_>>()
        .join("; ");
    let headers = [
        ";;;".to_owned(),
        "=".to_owned(),
        "a".to_owned(),
        "tg_session".to_owned(),
        "tg_session=".to_owned(),
        "tg_session.0=AAAA; tg_session.99999999=AAAA".to_owned(),
        "tg_session.0=AAAA; tg_session.1=".to_owned(),
        "tg_session=a; tg_session=b".to_owned(),
        "   =   ; tg_session.x=1".to_owned(),
        many,
    ];
    for h in &headers {
        let resp = app
            .raw_client
            .get(app.url("/userinfo"))
            .header("Cookie", h)
            .send()
            .await
            .expect("GET");
        let s = resp.status().as_u16();
        assert!((400..=499).contains(&s), "Cookie {:.40?}: status {s}", h);
    }
    // Non-ASCII bytes in the Cookie header.
    let req = format!(
        "GET /userinfo HTTP/1.1\r\nHost: {}\r\nCookie: tg_session=\u{00ff}\u{00fe}\r\nConnection: close\r\n\r\n",
        app.addr
    );
    let (status, _) = raw_http(app.addr, &req).await;
    assert!(
        (400..=499).contains(&status),
        "non-ASCII cookie: status {status}"
    );
    assert_eq!(
        app.raw_client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
}

#[tokio::test]
async fn logging_in_as_another_user_replaces_the_identity() {
    let app = spawn_app().await;
    app.login().await;
    let p = app.start_login(None).await;
    let mut grant = p.grant();
    grant.sub = "user-2".to_owned();
    let code = app.idp.mint_code(grant);
    let resp = app
        .callback(&[
            ("code", &code),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "status {}",
        resp.status()
    );
    let v: Value = app.get_userinfo().await.json().await.expect("json");
    assert_eq!(
        v["sub"], "user-2",
        "identities merged or the old session kept"
    );
}

#[tokio::test]
async fn planted_session_cookie_is_replaced_at_login() {
    let app = spawn_app().await;
    app.add_browser_cookie("tg_session=planted-by-attacker; Path=/");
    let cookies = app.login().await;
    let set: Vec<_> = cookies
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .collect();
    assert!(!set.is_empty());
    assert!(set.iter().all(|c| c.value != "planted-by-attacker"));
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn session_survives_a_restart_with_the_same_key() {
    // Stateless cookie sessions: a second instance with the same key reads the first one's cookie.
    let idp = FakeIdp::start().await;
    let api = EchoApi::start().await;
    let a = spawn_app_with(AppOptions::default().idp(&idp).api(&api)).await;
    a.login().await;
    let b = spawn_app_with(AppOptions::default().idp(&idp).api(&api).same_store_as(&a)).await;
    let resp = b
        .raw_client
        .get(b.url("/userinfo"))
        .header("Cookie", a.session_cookie_header())
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn session_past_its_absolute_lifetime_is_rejected_server_side() {
    // The cookie is replayed by hand after its lifetime, so the server's own check is what is tested.
    let app = spawn_app_with(
        AppOptions::default()
            .session("idle_timeout_s = 1")
            .session("absolute_timeout_s = 1"),
    )
    .await;
    let cookie = session_cookie_header_of(&app.login().await);
    assert!(!cookie.is_empty(), "the callback set no session cookie");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let resp = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", cookie)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401, "an expired session was still accepted");
}

#[tokio::test]
async fn responses_carrying_sessions_or_user_data_are_not_cacheable() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let callback = app.finish_login(&p).await;
    let userinfo = app.get_userinfo().await;
    let refresh = app.post_refresh().await;
    let api = app.get_api("/api/x").await;
    let logout = app.post_logout().await;
    for (what, resp) in [
        ("callback", &callback),
        ("userinfo", &userinfo),
        ("refreshtoken", &refresh),
        ("api", &api),
        ("logout", &logout),
    ] {
        let cc = resp
            .headers()
            .get_all("cache-control")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(",");
        assert!(
            cc.contains("no-store") || cc.contains("private"),
            "{what}: Cache-Control {cc:?}"
        );
    }
}
