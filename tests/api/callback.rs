//! GET /oauth-callback: state, iss (RFC 9207), the code redemption and ID-token validation.
//! A rejection means: a 4xx JSON error, no session cookie, and no session afterwards.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;
use crate::login::assert_redirect_path;

/// The callback answer is a rejection and the browser has no session afterwards.
async fn assert_rejected(
    app: &TestApp,
    resp: reqwest::Response,
    range: std::ops::RangeInclusive<u16>,
) -> Value {
    assert_no_session_cookie_set(&resp);
    let body = assert_json_error_in(resp, range).await;
    let me = app.get_userinfo().await;
    assert_eq!(
        me.status(),
        401,
        "a session exists after a rejected callback"
    );
    assert!(
        app.api.requests().is_empty(),
        "the API was called with tokens from a rejected login"
    );
    body
}

/// Runs a whole login with the IdP as currently configured; expects a 4xx rejection.
async fn assert_login_rejected(app: &TestApp) -> Value {
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_rejected(app, resp, 400..=499).await
}

async fn assert_login_accepted(app: &TestApp) {
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    let status = resp.status();
    if !(status == 302 || status == 303) {
        panic!(
            "login rejected with {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    assert!(
        !session_cookies_set(&resp).is_empty(),
        "accepted login set no session cookie"
    );
    let me = app.get_userinfo().await;
    assert_eq!(me.status(), 200, "no session after an accepted login");
}

// ----- the successful exchange -----------------------------------------------------------------

#[tokio::test]
async fn successful_callback_redeems_the_code_with_the_verifier_and_creates_a_session() {
    let app = spawn_app().await;
    let p = app.start_login(Some("/after")).await;
    let resp = app.finish_login(&p).await;
    assert_redirect_path(&app, &resp, "/after");
    assert!(
        !session_cookies_set(&resp).is_empty(),
        "no session cookie set"
    );
    let tx_cleared = set_cookies(&resp)
        .iter()
        .any(|c| is_tx_cookie_name(&c.name) && c.name.ends_with(&p.state) && c.is_removal());
    assert!(
        tx_cleared,
        "the login-transaction cookie is not cleared: {:?}",
        set_cookies(&resp)
    );
    assert!(
        !app.cookies().iter().any(|(n, _)| is_tx_cookie_name(n)),
        "browser still holds a transaction cookie"
    );

    let reqs = app.idp.token_requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.grant_type(), "authorization_code");
    assert_eq!(r.get("redirect_uri"), Some(p.redirect_uri.as_str()));
    let verifier = r.get("code_verifier").expect("code_verifier sent");
    assert!(
        (43..=128).contains(&verifier.len()),
        "verifier length {}",
        verifier.len()
    );
    assert!(
        verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)),
        "verifier has characters outside RFC 7636's unreserved set"
    );
    assert!(
        r.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic ")),
        "client_secret_basic is the default client authentication"
    );
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn callback_response_body_and_headers_carry_no_tokens() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    let headers = format!("{:?}", resp.headers());
    let body = resp.text().await.unwrap_or_default();
    for secret in app.idp.all_issued_secrets() {
        assert!(
            !headers.contains(&secret),
            "a token appears in the callback's headers"
        );
        assert!(
            !body.contains(&secret),
            "a token appears in the callback's body"
        );
    }
}

// ----- state -----------------------------------------------------------------------------------

#[tokio::test]
async fn tampered_state_is_rejected_without_redeeming_the_code() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let bad_state = format!("{}1", p.state);
    let resp = app
        .callback(&[
            ("code", &code),
            ("state", &bad_state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    let body = assert_rejected(&app, resp, 400..=400).await;
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(
        app.idp.code_grants(),
        0,
        "the code was redeemed despite a bad state"
    );
}

#[tokio::test]
async fn missing_or_empty_state_is_rejected() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let resp = app
        .callback(&[("code", &code), ("iss", app.idp.issuer())])
        .await;
    let body = assert_rejected(&app, resp, 400..=400).await;
    assert_eq!(body["error"], "invalid_request");
    let resp = app
        .callback(&[("code", &code), ("state", ""), ("iss", app.idp.issuer())])
        .await;
    assert_rejected(&app, resp, 400..=400).await;
    assert_eq!(app.idp.code_grants(), 0);
}

#[tokio::test]
async fn replayed_callback_is_rejected_and_the_existing_session_survives() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let params = [
        ("code", code.as_str()),
        ("state", p.state.as_str()),
        ("iss", app.idp.issuer()),
    ];
    let first = app.callback(&params).await;
    assert_redirect_path(&app, &first, "/");
    let replay = app.callback(&params).await;
    assert_no_session_cookie_set(&replay);
    let body = assert_json_error(replay, 400).await;
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(
        app.idp.code_grants(),
        1,
        "the replayed code was sent to the IdP again"
    );
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "the replay destroyed the valid session"
    );
}

#[tokio::test]
async fn replayed_callback_from_a_cookie_copy_is_rejected() {
    // An attacker who captured the whole request (URL + transaction cookie) replays it after use.
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let tx_cookie = p
        .set_cookies
        .iter()
        .find(|c| is_tx_cookie_name(&c.name))
        .expect("tx cookie")
        .clone();
    let code = app.idp.mint_code(p.grant());
    let url = format!(
        "{}?code={}&state={}&iss={}",
        app.url("/oauth-callback"),
        code,
        p.state,
        url::form_urlencoded::byte_serialize(app.idp.issuer().as_bytes()).collect::<String>()
    );
    let cookie = format!("{}={}", tx_cookie.name, tx_cookie.value);
    let first = app
        .raw_client
        .get(&url)
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("callback");
    assert!(
        first.status() == 302 || first.status() == 303,
        "first use: {}",
        first.status()
    );
    let again = app
        .raw_client
        .get(&url)
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("callback");
    assert_no_session_cookie_set(&again);
    assert_json_error(again, 400).await;
    assert_eq!(
        app.idp.code_grants(),
        1,
        "state is single use even with a copied cookie"
    );
}

#[tokio::test]
async fn callback_without_the_transaction_cookie_is_rejected() {
    // Login CSRF: the victim's browser completes a flow the attacker started.
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let victim_jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let victim = new_browser(&victim_jar);
    let resp = app
        .callback_with(
            &victim,
            &[
                ("code", &code),
                ("state", &p.state),
                ("iss", app.idp.issuer()),
            ],
        )
        .await;
    assert_no_session_cookie_set(&resp);
    let body = assert_json_error(resp, 400).await;
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(app.idp.code_grants(), 0);
}

#[tokio::test]
async fn duplicate_state_or_code_parameters_are_rejected() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let other = app.start_login(None).await;
    let resp = app
        .callback(&[
            ("code", &code),
            ("state", &p.state),
            ("state", &other.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_rejected(&app, resp, 400..=400).await;
    let p2 = app.start_login(None).await;
    let code2 = app.idp.mint_code(p2.grant());
    let resp = app
        .callback(&[
            ("code", "injected"),
            ("code", &code2),
            ("state", &p2.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_rejected(&app, resp, 400..=400).await;
    let p3 = app.start_login(None).await;
    let code3 = app.idp.mint_code(p3.grant());
    let resp = app
        .callback(&[
            ("code", &code3),
            ("state", &p3.state),
            ("iss", app.idp.issuer()),
            ("iss", "http://evil.example"),
        ])
        .await;
    assert_rejected(&app, resp, 400..=400).await;
}

#[tokio::test]
async fn malformed_callback_queries_get_400_not_a_crash() {
    let app = spawn_app().await;
    let long = "a".repeat(9000);
    let targets = [
        "/oauth-callback?&&&".to_owned(),
        "/oauth-callback?state=%zz&code=%zz".to_owned(),
        "/oauth-callback?state=%ff%fe&code=x".to_owned(),
        "/oauth-callback?state=a%00b&code=x".to_owned(),
        format!("/oauth-callback?state={long}&code={long}"),
    ];
    for target in &targets {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            app.addr
        );
        let (status, raw) = raw_http(app.addr, &req).await;
        assert!(
            (400..=499).contains(&status),
            "{:.60}: status {status}",
            target
        );
        assert!(
            !raw.to_ascii_lowercase().contains("set-cookie: tg_session"),
            "{:.60} set a session",
            target
        );
    }
    let health = app
        .raw_client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(
        health.status(),
        200,
        "the server stopped serving after malformed callbacks"
    );
}

#[tokio::test]
async fn front_channel_tokens_without_a_code_do_not_log_in() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let resp = app
        .callback(&[
            ("state", &p.state),
            ("access_token", "at-forged"),
            ("id_token", "a.b.c"),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_rejected(&app, resp, 400..=499).await;
}

#[tokio::test]
async fn expired_login_transaction_is_rejected() {
    let app = spawn_app_with(AppOptions::default().oauth("login_transaction_ttl_s = 1")).await;
    let p = app.start_login(None).await;
    let tx = p
        .set_cookies
        .iter()
        .find(|c| is_tx_cookie_name(&c.name))
        .expect("tx cookie")
        .clone();
    // Past the 1 s TTL with a wide margin; the cookie is replayed by hand so the server's own check is tested.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let code = app.idp.mint_code(p.grant());
    let url = format!(
        "{}?code={code}&state={}&iss={}",
        app.url("/oauth-callback"),
        p.state,
        url::form_urlencoded::byte_serialize(app.idp.issuer().as_bytes()).collect::<String>()
    );
    let resp = app
        .raw_client
        .get(url)
        .header("Cookie", format!("{}={}", tx.name, tx.value))
        .send()
        .await
        .expect("cb");
    assert_no_session_cookie_set(&resp);
    assert_json_error_in(resp, 400..=499).await;
    assert_eq!(
        app.idp.code_grants(),
        0,
        "an expired transaction's code was redeemed"
    );
}

// ----- iss (RFC 9207) --------------------------------------------------------------------------

#[tokio::test]
async fn wrong_iss_parameter_is_rejected_before_any_idp_call() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let wrong = format!("{}1", app.idp.issuer());
    let resp = app
        .callback(&[("code", &code), ("state", &p.state), ("iss", &wrong)])
        .await;
    assert_rejected(&app, resp, 400..=400).await;
    assert_eq!(
        app.idp.code_grants(),
        0,
        "mix-up: the code went to the token endpoint"
    );
}

#[tokio::test]
async fn missing_iss_is_rejected_when_the_idp_advertises_it() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let resp = app.callback(&[("code", &code), ("state", &p.state)]).await;
    assert_rejected(&app, resp, 400..=400).await;
    assert_eq!(app.idp.code_grants(), 0);
}

#[tokio::test]
async fn missing_iss_is_accepted_when_the_idp_does_not_advertise_it() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| b.iss_param_supported = false);
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let resp = app.callback(&[("code", &code), ("state", &p.state)]).await;
    assert_redirect_path(&app, &resp, "/");
}

// ----- error responses -------------------------------------------------------------------------

#[tokio::test]
async fn idp_error_goes_to_the_spa_url_encoded_and_consumes_the_state() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let script = "<script>alert(\"x\")</script>";
    let resp = app
        .callback(&[
            ("error", "access_denied"),
            ("error_description", script),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "status {}",
        resp.status()
    );
    assert_no_session_cookie_set(&resp);
    let loc = location(&resp);
    assert!(loc.starts_with("/?error=access_denied"), "Location {loc:?}");
    assert!(
        !loc.contains('<') && !loc.contains('>') && !loc.contains('"'),
        "unescaped markup in Location {loc:?}"
    );
    let parsed = url::Url::parse("http://x")
        .expect("base")
        .join(&loc)
        .expect("relative Location");
    let desc = parsed
        .query_pairs()
        .find(|(k, _)| k == "error_description")
        .map(|(_, v)| v.into_owned());
    assert!(desc.is_some(), "error_description missing from {loc:?}");
    assert_eq!(
        app.idp.code_grants(),
        0,
        "no token call after an error response"
    );

    // The state was consumed: a code for it now is refused.
    let code = app.idp.mint_code(p.grant());
    let again = app
        .callback(&[
            ("code", &code),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_rejected(&app, again, 400..=400).await;
    assert_eq!(app.idp.code_grants(), 0);
}

#[tokio::test]
async fn idp_error_with_an_unknown_state_is_rejected() {
    let app = spawn_app().await;
    let resp = app
        .callback(&[
            ("error", "access_denied"),
            ("state", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        ])
        .await;
    assert_rejected(&app, resp, 400..=400).await;
}

#[tokio::test]
async fn idp_error_codes_are_not_reflected_raw() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let resp = app
        .callback(&[
            ("error", "x\r\nSet-Cookie: tg_session=evil"),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_no_session_cookie_set(&resp);
    if let Some(loc) = resp.headers().get("location") {
        let loc = String::from_utf8_lossy(loc.as_bytes());
        assert!(
            loc.starts_with('/') && !loc.starts_with("//"),
            "off-site error redirect {loc:?}"
        );
    }
}

// ----- token endpoint failures -----------------------------------------------------------------

#[tokio::test]
async fn code_injection_with_a_foreign_verifier_creates_no_session() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    // The attacker's code is bound to the attacker's own PKCE challenge.
    let mut grant = p.grant();
    grant.code_challenge = s256("attacker-verifier-attacker-verifier-attacker-verifier");
    grant.sub = "attacker".to_owned();
    let code = app.idp.mint_code(grant);
    let resp = app
        .callback(&[
            ("code", &code),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    let body = assert_rejected(&app, resp, 400..=400).await;
    assert_eq!(body["error"], "invalid_grant");
}

#[tokio::test]
async fn invalid_grant_from_the_idp_is_400_invalid_grant() {
    let app = spawn_app().await;
    app.idp
        .behave(|b| b.code_grant_error = Some((400, json!({"error": "invalid_grant"}))));
    let body = assert_login_rejected(&app).await;
    assert_eq!(body["error"], "invalid_grant");
}

#[tokio::test]
async fn token_endpoint_500_is_502() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.code_grant_error = Some((
            500,
            json!("<html><body>Internal Server Error</body></html>"),
        ))
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_rejected(&app, resp, 502..=502).await;
}

#[tokio::test]
async fn token_endpoint_timeout_is_504_or_502() {
    let app = spawn_app_with(AppOptions::default().oauth("http_timeout_s = 1")).await;
    app.idp.behave(|b| b.token_delay = Duration::from_secs(5));
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    let status = resp.status().as_u16();
    assert!(status == 504 || status == 502, "status {status}");
    assert_rejected(&app, resp, 502..=504).await;
}

#[tokio::test]
async fn token_response_without_access_token_is_502() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.code_grant_patch
            .insert("access_token".into(), Value::Null);
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_rejected(&app, resp, 502..=502).await;
}

#[tokio::test]
async fn token_response_with_unknown_token_type_is_502() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.code_grant_patch.insert("token_type".into(), json!("MAC"));
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_rejected(&app, resp, 502..=502).await;
}

#[tokio::test]
async fn token_response_that_is_not_an_object_is_502() {
    let app = spawn_app().await;
    app.idp
        .behave(|b| b.code_grant_error = Some((200, json!(["not", "an", "object"]))));
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_rejected(&app, resp, 502..=502).await;
}

#[tokio::test]
async fn token_type_is_case_insensitive_and_expires_in_optional() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.code_grant_patch
            .insert("token_type".into(), json!("bEARER"));
        b.code_grant_patch.insert("expires_in".into(), Value::Null);
        b.code_grant_patch.insert("scope".into(), Value::Null);
    });
    assert_login_accepted(&app).await;
}

// ----- ID token validation ---------------------------------------------------------------------

#[tokio::test]
async fn id_token_with_a_bad_signature_is_rejected() {
    let app = spawn_app().await;
    // Signed by a key the IdP never published, under the published key's kid.
    app.idp.behave(|b| {
        b.signer = Signer::Rsa2;
        b.kid = Some(Some("k1".into()));
    });
    assert_login_rejected(&app).await;
}

#[tokio::test]
async fn id_token_with_alg_none_is_rejected() {
    let app = spawn_app().await;
    app.idp.behave(|b| b.signer = Signer::AlgNone);
    assert_login_rejected(&app).await;
}

#[tokio::test]
async fn id_token_hmac_signed_with_the_rsa_public_key_is_rejected() {
    let app = spawn_app().await;
    app.idp.behave(|b| b.signer = Signer::Hs256WithRsaPublicKey);
    assert_login_rejected(&app).await;
}

#[tokio::test]
async fn id_token_hs256_with_the_client_secret_is_accepted() {
    let app = spawn_app().await;
    app.idp
        .behave(|b| b.signer = Signer::Hs256(CLIENT_SECRET.to_owned()));
    assert_login_accepted(&app).await;
}

#[tokio::test]
async fn id_token_hs256_with_a_wrong_secret_is_rejected() {
    let app = spawn_app().await;
    app.idp
        .behave(|b| b.signer = Signer::Hs256("not-the-client-secret".to_owned()));
    assert_login_rejected(&app).await;
}

#[tokio::test]
async fn id_token_es256_is_accepted() {
    let app = spawn_app().await;
    app.idp.behave(|b| b.signer = Signer::Ec1);
    assert_login_accepted(&app).await;
}

#[tokio::test]
async fn id_token_with_an_unpublished_kid_is_rejected() {
    let app = spawn_app().await;
    app.idp.behave(|b| b.signer = Signer::Rsa2); // kid k2, not in the JWKS
    assert_login_rejected(&app).await;
}

#[tokio::test]
async fn key_rotation_at_the_idp_is_followed() {
    let app = spawn_app().await;
    assert_login_accepted(&app).await;
    app.idp.rotate_keys();
    let fresh = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let browser = new_browser(&fresh);
    let p = app.start_login_with(&browser, None).await;
    let code = app.idp.mint_code(p.grant());
    let resp = app
        .callback_with(
            &browser,
            &[
                ("code", &code),
                ("state", &p.state),
                ("iss", app.idp.issuer()),
            ],
        )
        .await;
    let status = resp.status();
    assert!(
        status == 302 || status == 303,
        "ID token signed with the newly published key k2 rejected: {status} {}",
        resp.text().await.unwrap_or_default()
    );
}

async fn rejected_with_claim(name: &str, value: Value) {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim(name, value.clone());
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_no_session_cookie_set(&resp);
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        (400..=499).contains(&status),
        "claim {name}={value}: status {status} ({text})"
    );
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("claim {name}: non-JSON error {text}"));
    assert!(
        v["error"].is_string(),
        "claim {name}: no error field in {text}"
    );
    assert_eq!(
        app.get_userinfo().await.status(),
        401,
        "claim {name}={value}: session created"
    );
}

#[tokio::test]
async fn id_token_with_the_wrong_audience_is_rejected() {
    rejected_with_claim("aud", json!("someone-else")).await;
}

#[tokio::test]
async fn id_token_without_audience_is_rejected() {
    rejected_with_claim("aud", Value::Null).await;
}

#[tokio::test]
async fn id_token_with_several_audiences_and_no_azp_is_rejected() {
    rejected_with_claim("aud", json!([CLIENT_ID, "other-client"])).await;
}

#[tokio::test]
async fn id_token_with_azp_of_another_client_is_rejected() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim("aud", json!([CLIENT_ID, "other-client"]));
        b.claim("azp", json!("other-client"));
    });
    assert_login_rejected(&app).await;
}

#[tokio::test]
async fn id_token_with_audience_array_of_one_is_accepted() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim("aud", json!([CLIENT_ID]));
    });
    assert_login_accepted(&app).await;
}

#[tokio::test]
async fn id_token_with_several_audiences_and_our_azp_is_accepted() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim("aud", json!([CLIENT_ID, "other-client"]));
        b.claim("azp", json!(CLIENT_ID));
    });
    assert_login_accepted(&app).await;
}

#[tokio::test]
async fn id_token_from_the_wrong_issuer_is_rejected() {
    rejected_with_claim("iss", json!("http://evil.example")).await;
}

#[tokio::test]
async fn id_token_without_issuer_is_rejected() {
    rejected_with_claim("iss", Value::Null).await;
}

#[tokio::test]
async fn id_token_with_the_wrong_nonce_is_rejected() {
    rejected_with_claim(
        "nonce",
        json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    )
    .await;
}

#[tokio::test]
async fn id_token_without_nonce_is_rejected() {
    rejected_with_claim("nonce", Value::Null).await;
}

#[tokio::test]
async fn expired_id_token_is_rejected() {
    // The conformance suite's value: six minutes ago, well beyond any sane leeway.
    rejected_with_claim("exp", json!(unix_now() - 360)).await;
}

#[tokio::test]
async fn id_token_without_exp_is_rejected() {
    rejected_with_claim("exp", Value::Null).await;
}

#[tokio::test]
async fn id_token_issued_in_the_future_is_rejected() {
    rejected_with_claim("iat", json!(unix_now() + 3600)).await;
}

#[tokio::test]
async fn id_token_with_a_string_exp_is_rejected() {
    rejected_with_claim("exp", json!((unix_now() + 3600).to_string())).await;
}

#[tokio::test]
async fn id_token_without_sub_is_rejected() {
    rejected_with_claim("sub", Value::Null).await;
}

#[tokio::test]
async fn nonce_from_another_transaction_is_rejected() {
    // The ID token carries the nonce of tab A while the callback completes tab B.
    let app = spawn_app().await;
    let a = app.start_login(None).await;
    let b = app.start_login(None).await;
    let mut grant = b.grant();
    grant.nonce = a.nonce.clone();
    let code = app.idp.mint_code(grant);
    let resp = app
        .callback(&[
            ("code", &code),
            ("state", &b.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_rejected(&app, resp, 400..=499).await;
}

// ----- hardening cases from hostile-cases.md group B -----------------------------------------

#[tokio::test]
async fn keys_named_in_the_token_header_are_never_trusted_or_fetched() {
    // RFC 8725 §3.10: `jku`/`jwk` point at attacker keys; keys come only from the configured jwks_uri.
    let app = spawn_app().await;
    let jku = format!("{}/attacker-jwks", app.idp.issuer());
    app.idp.behave(|b| {
        b.signer = Signer::Rsa2;
        b.header_jku = Some(jku.clone());
        b.header_embed_jwk = true;
    });
    assert_login_rejected(&app).await;
    assert_eq!(
        app.idp.attacker_jwks_fetches(),
        0,
        "tokengate fetched keys from a token header URL (SSRF)"
    );
}

#[tokio::test]
async fn id_token_without_kid_is_accepted_when_one_rsa_key_is_published() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| {
        b.published_keys = vec![PublishedKey::Rsa1];
        b.kid = Some(None);
    });
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await;
    assert_login_accepted(&app).await;
}

#[tokio::test]
async fn id_token_with_a_fractional_exp_is_accepted() {
    // RFC 7519 §2: a NumericDate may be non-integer.
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim("exp", json!(unix_now() as f64 + 3600.5));
    });
    assert_login_accepted(&app).await;
}

#[tokio::test]
async fn id_token_with_absurd_numeric_dates_never_causes_a_5xx() {
    for exp in [json!(1e300), json!(-1), json!(u64::MAX), json!(null)] {
        let app = spawn_app().await;
        app.idp.behave(|b| {
            b.claim("exp", exp.clone());
        });
        let p = app.start_login(None).await;
        let resp = app.finish_login(&p).await;
        assert!(
            resp.status().as_u16() < 500,
            "exp {exp}: status {}",
            resp.status()
        );
        if exp == json!(-1) || exp.is_null() {
            assert_no_session_cookie_set(&resp);
            assert!(resp.status().is_client_error(), "exp {exp} accepted");
        }
    }
}

#[tokio::test]
async fn id_token_issued_a_week_ago_is_rejected() {
    rejected_with_claim("iat", json!(unix_now() - 7 * 24 * 3600)).await;
}

#[tokio::test]
async fn malformed_id_tokens_are_rejected_without_a_crash() {
    let big_header = format!(
        "{}{}.e30.sig",
        base64_url("{\"alg\":\"RS256\",\"x\":\""),
        "A".repeat(1_000_000)
    );
    let cases = [
        "not-a-jwt".to_owned(),
        "a.b".to_owned(),
        "a.b.c.d.e".to_owned(),
        format!(
            "{}.{}.",
            base64_url("{\"alg\":\"RS256\"}"),
            base64_url("[1,2,3]")
        ),
        format!(
            "{}.{}.c2ln",
            base64_url("{\"alg\":\"RS256\",\"kid\":\"k1\"}"),
            "!!!notbase64"
        ),
        big_header,
    ];
    for id_token in cases {
        let app = spawn_app().await;
        app.idp.behave(|b| {
            b.code_grant_patch
                .insert("id_token".into(), json!(id_token));
        });
        let p = app.start_login(None).await;
        let resp = app.finish_login(&p).await;
        let status = resp.status().as_u16();
        assert!(
            (400..=499).contains(&status) || status == 502,
            "id_token {:.30}: status {status}",
            id_token
        );
        assert_no_session_cookie_set(&resp);
        assert_eq!(app.get_userinfo().await.status(), 401);
    }
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn token_response_without_id_token_is_rejected_when_openid_was_requested() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.code_grant_patch.insert("id_token".into(), Value::Null);
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    let status = resp.status().as_u16();
    assert!(
        (400..=499).contains(&status) || status == 502,
        "status {status}"
    );
    assert_no_session_cookie_set(&resp);
    assert_eq!(app.get_userinfo().await.status(), 401);
}
