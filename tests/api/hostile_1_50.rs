//! Hostile inputs and faults, cases 1–50 of `hostile-cases.md` (one `case_NNN_*` test per
//! applicable case; see docs/security-cases.md for the map and the cases that do not apply).
//!
//! A rejection means the convention of hostile-cases.md: no session cookie, no token used (no
//! UserInfo call, nothing reaches the API), the login transaction consumed where one was named, a
//! 4xx JSON error (never a 5xx or a panic), and nothing secret echoed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use rand::RngCore;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;
use crate::login::assert_redirect_path;

const RSA1_PEM: &str = include_str!("../fixtures/idp_rsa_1.pem");
const RSA2_PEM: &str = include_str!("../fixtures/idp_rsa_2.pem");

// =============================================================================================
// Shared helpers of this module
// =============================================================================================

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn random_blob(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    b64(&bytes)
}

/// An RSA fixture as a jsonwebtoken key (PKCS#1 DER, as jsonwebtoken without `use_pem` wants).
fn rsa_key(pem: &str) -> EncodingKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem).expect("rsa fixture");
    EncodingKey::from_rsa_der(key.to_pkcs1_der().expect("pkcs1 der").as_bytes())
}

/// The public JWK of an RSA fixture with the given `kid` and `use`.
fn rsa_public_jwk(pem: &str, kid: &str, use_: &str) -> Value {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem).expect("rsa fixture");
    json!({
        "kty": "RSA", "kid": kid, "use": use_, "alg": "RS256",
        "n": b64(&key.n().to_bytes_be()),
        "e": b64(&key.e().to_bytes_be()),
    })
}

/// `base64url(header).base64url(payload).signature`, signed as given (any header, any payload).
fn sign_raw(header: &Value, payload: &[u8], key: &EncodingKey, alg: Algorithm) -> String {
    let msg = format!("{}.{}", b64(header.to_string().as_bytes()), b64(payload));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).expect("sign");
    format!("{msg}.{sig}")
}

/// Replaces the first character of the signature segment (the token no longer verifies).
fn break_signature(token: &str) -> String {
    let (msg, sig) = token.rsplit_once('.').expect("three segments");
    let mut chars: Vec<char> = sig.chars().collect();
    chars[0] = if chars[0] == 'A' { 'B' } else { 'A' };
    format!("{msg}.{}", chars.into_iter().collect::<String>())
}

/// Valid ID-token claims for `p` (what the fake IdP itself would sign).
fn id_claims(app: &TestApp, p: &PendingLogin) -> Value {
    let now = unix_now();
    json!({
        "iss": app.idp.issuer(),
        "sub": DEFAULT_SUB,
        "aud": CLIENT_ID,
        "exp": now + 3600,
        "iat": now,
        "nonce": p.nonce,
    })
}

/// Starts a login and completes it with the code grant answering `make(p)` as the ID token.
async fn login_with_id_token(
    app: &TestApp,
    make: impl FnOnce(&PendingLogin) -> String,
) -> (PendingLogin, reqwest::Response) {
    let p = app.start_login(None).await;
    let token = make(&p);
    app.idp.behave(|b| {
        b.code_grant_patch.insert("id_token".into(), json!(token));
    });
    let resp = app.finish_login(&p).await;
    app.idp.behave(|b| {
        b.code_grant_patch.remove("id_token");
    });
    (p, resp)
}

/// Nothing a browser should never see (tokens, codes, verifiers, the client secret) is in `text`.
fn assert_no_secret_in(app: &TestApp, text: &str) {
    let mut secrets = app.idp.all_issued_secrets();
    for r in app.idp.token_requests() {
        for name in ["code", "code_verifier", "refresh_token"] {
            if let Some(v) = r.get(name) {
                secrets.push(v.to_owned());
            }
        }
    }
    secrets.push(CLIENT_SECRET.to_owned());
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(
            !text.contains(s.as_str()),
            "a secret is echoed: {text:.200}"
        );
    }
}

/// The convention's rejection: no session cookie, a JSON error with a status `status_ok` accepts,
/// nothing secret echoed, no session afterwards, no token used (UserInfo, API).
async fn assert_rejected_if(
    app: &TestApp,
    resp: reqwest::Response,
    what: &str,
    status_ok: impl Fn(u16) -> bool,
) -> Value {
    let set = session_cookies_set(&resp);
    assert!(set.is_empty(), "{what}: a session cookie was issued");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert!(status_ok(status), "{what}: status {status} ({text:.300})");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {text:.300}"));
    assert!(v["error"].is_string(), "{what}: no `error` in {text:.300}");
    assert_no_secret_in(app, &text);
    assert_eq!(
        app.get_userinfo().await.status(),
        401,
        "{what}: a session exists after a rejection"
    );
    assert_eq!(
        app.idp.userinfo_calls(),
        0,
        "{what}: a token from a rejected login was used at the UserInfo endpoint"
    );
    assert!(
        app.api.requests().is_empty(),
        "{what}: a token from a rejected login reached the API"
    );
    v
}

async fn assert_rejected(
    app: &TestApp,
    resp: reqwest::Response,
    what: &str,
    range: std::ops::RangeInclusive<u16>,
) -> Value {
    assert_rejected_if(app, resp, what, |s| range.contains(&s)).await
}

/// 4xx, or 502 when the IdP's answer itself is unusable.
fn client_error_or_bad_gateway(s: u16) -> bool {
    (400..=499).contains(&s) || s == 502
}

/// The response clears the login-transaction cookie of `state`.
fn clears_tx(resp: &reqwest::Response, state: &str) -> bool {
    set_cookies(resp)
        .iter()
        .any(|c| is_tx_cookie_name(&c.name) && c.name.ends_with(state) && c.is_removal())
}

/// The browser no longer holds the transaction cookie of `state`.
fn browser_holds_tx(app: &TestApp, state: &str) -> bool {
    app.cookies()
        .iter()
        .any(|(n, _)| is_tx_cookie_name(n) && n.ends_with(state))
}

/// Sets one ID-token claim, runs a login, expects a full rejection; the claim is reset after.
async fn assert_claim_rejected(app: &TestApp, name: &str, value: Value) {
    app.idp.behave(|b| {
        b.claim(name, value.clone());
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    app.idp.behave(|b| b.id_token_patch.clear());
    assert!(
        clears_tx(&resp, &p.state),
        "claim {name}={value}: the login transaction was not consumed"
    );
    assert_rejected(app, resp, &format!("claim {name}={value}"), 400..=499).await;
}

async fn assert_login_accepted(app: &TestApp, what: &str) {
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    let status = resp.status();
    assert!(
        status == 302 || status == 303,
        "{what}: login rejected with {status}: {}",
        resp.text().await.unwrap_or_default()
    );
    assert!(
        !session_cookies_set(&resp).is_empty(),
        "{what}: accepted login set no session cookie"
    );
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "{what}: no session after an accepted login"
    );
}

/// The callback URL with these parameters, for clients that send cookies by hand.
fn callback_url(app: &TestApp, params: &[(&str, &str)]) -> String {
    let mut url = url::Url::parse(&app.url("/oauth-callback")).expect("url");
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    url.into()
}

/// The callback for `code` and `state` (with the right `iss`), sent with exactly this `Cookie`
/// header (no jar): for replaying, swapping or forging the transaction cookie.
async fn callback_with_cookie(
    app: &TestApp,
    code: &str,
    state: &str,
    cookie: impl AsRef<str>,
) -> reqwest::Response {
    app.raw_client
        .get(callback_url(
            app,
            &[("code", code), ("state", state), ("iss", app.idp.issuer())],
        ))
        .header("Cookie", cookie.as_ref())
        .send()
        .await
        .expect("callback")
}

fn tx_cookie(p: &PendingLogin) -> SetCookie {
    p.set_cookies
        .iter()
        .find(|c| is_tx_cookie_name(&c.name) && !c.is_removal())
        .cloned()
        .expect("the login set a transaction cookie")
}

/// Sends raw bytes as one HTTP/1.1 request; returns the status (0 when the server just closed).
async fn raw_bytes(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .expect("raw HTTP answer within 15 s");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

async fn assert_still_serving(app: &TestApp) {
    let health = app
        .raw_client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200, "the server stopped serving");
}

/// A tiny JSON server standing in for IdP endpoints the fake IdP cannot misconfigure
/// (a JWKS with an encryption key, a lying UserInfo endpoint).
#[derive(Clone)]
struct SideServer {
    base: String,
    bodies: Arc<Mutex<HashMap<String, Value>>>,
    hits: Arc<AtomicUsize>,
}

impl SideServer {
    async fn start() -> SideServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let side = SideServer {
            base: format!("http://{addr}"),
            bodies: Arc::new(Mutex::new(HashMap::new())),
            hits: Arc::new(AtomicUsize::new(0)),
        };
        let router = axum::Router::new()
            .fallback(side_handler)
            .with_state(side.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        side
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn set(&self, path: &str, body: Value) {
        self.bodies
            .lock()
            .expect("lock")
            .insert(path.to_owned(), body);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn side_handler(State(side): State<SideServer>, uri: Uri) -> Response {
    side.hits.fetch_add(1, Ordering::SeqCst);
    let body = side.bodies.lock().expect("lock").get(uri.path()).cloned();
    match body {
        Some(v) => axum::Json(v).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

// =============================================================================================
// A. Authorization response and callback
// =============================================================================================

#[tokio::test]
async fn case_001_state_tampered_or_missing() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let tampered = format!("{}1", p.state);
    let cases: [(&str, Vec<(&str, &str)>); 3] = [
        ("state + \"1\"", vec![("state", tampered.as_str())]),
        ("no state", vec![]),
        ("empty state", vec![("state", "")]),
    ];
    for (what, state) in cases {
        let mut params = vec![("code", code.as_str()), ("iss", app.idp.issuer())];
        params.extend(state);
        let resp = app.callback(&params).await;
        let v = assert_rejected(&app, resp, what, 400..=400).await;
        assert_eq!(v["error"], "invalid_request", "{what}");
    }
    assert!(
        app.idp.token_requests().is_empty(),
        "the code was sent to the token endpoint despite a bad state"
    );
}

#[tokio::test]
async fn case_001_state_tampered_or_missing_consumes_the_transaction() {
    let app = spawn_app().await;
    for bad in ["tampered", "missing"] {
        let p = app.start_login(None).await;
        let code = app.idp.mint_code(p.grant());
        let tampered = format!("{}1", p.state);
        let mut params = vec![("code", code.as_str()), ("iss", app.idp.issuer())];
        if bad == "tampered" {
            params.push(("state", tampered.as_str()));
        }
        let resp = app.callback(&params).await;
        assert_eq!(resp.status(), 400, "{bad}");
        assert!(
            clears_tx(&resp, &p.state) && !browser_holds_tx(&app, &p.state),
            "{bad} state: the pending login-transaction cookie was not cleared: {:?}",
            set_cookies(&resp)
        );
        // Consumed: the genuine state now fails too.
        let again = app
            .callback(&[
                ("code", &code),
                ("state", &p.state),
                ("iss", app.idp.issuer()),
            ])
            .await;
        assert_rejected(&app, again, bad, 400..=400).await;
    }
    assert_eq!(app.idp.code_grants(), 0);
}

#[tokio::test]
async fn case_002_callback_without_transaction_cookie() {
    // The attacker starts a login in their own browser and makes the victim's browser finish it.
    let app = spawn_app().await;
    let attacker = app.start_login(None).await;
    let code = app.idp.mint_code(attacker.grant());
    let victim_jar = Arc::new(reqwest::cookie::Jar::default());
    let victim = new_browser(&victim_jar);
    // The victim even has a login of their own pending: it must not be mistaken for the attacker's.
    let victims_own = app.start_login_with(&victim, None).await;
    for client in [&victim, &app.raw_client] {
        let resp = app
            .callback_with(
                client,
                &[
                    ("code", &code),
                    ("state", &attacker.state),
                    ("iss", app.idp.issuer()),
                ],
            )
            .await;
        assert_no_session_cookie_set(&resp);
        let v = assert_json_error(resp, 400).await;
        assert_eq!(v["error"], "invalid_request");
        assert!(
            v["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "a descriptive error is expected: {v}"
        );
    }
    assert_eq!(app.idp.code_grants(), 0, "the attacker's code was redeemed");
    let me = victim
        .get(app.url("/userinfo"))
        .send()
        .await
        .expect("GET /userinfo");
    assert_eq!(me.status(), 401, "the victim got a session");
    assert_ne!(victims_own.state, attacker.state);
}

#[tokio::test]
async fn case_003_callback_replayed() {
    let app = spawn_app().await;
    let p = app.start_login(Some("/home")).await;
    let tx = tx_cookie(&p);
    let code = app.idp.mint_code(p.grant());
    let params = [
        ("code", code.as_str()),
        ("state", p.state.as_str()),
        ("iss", app.idp.issuer()),
    ];
    let first = app.callback(&params).await;
    assert_redirect_path(&app, &first, "/home");
    // Back button (same browser, cookie already consumed) and a leaked copy of URL + cookie.
    let replay = app.callback(&params).await;
    assert_no_session_cookie_set(&replay);
    assert!(
        !set_cookies(&replay)
            .iter()
            .any(|c| is_session_cookie_name(&c.name) && c.is_removal()),
        "the replay cleared the user's valid session"
    );
    let v = assert_json_error(replay, 400).await;
    assert_eq!(v["error"], "invalid_request");
    let copied = app
        .raw_client
        .get(callback_url(&app, &params))
        .header("Cookie", format!("{}={}", tx.name, tx.value))
        .send()
        .await
        .expect("callback");
    assert_no_session_cookie_set(&copied);
    assert_json_error(copied, 400).await;
    assert_eq!(
        app.idp.code_grants(),
        1,
        "the replayed code went to the IdP"
    );
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "the replay ended the existing session"
    );
}

#[tokio::test]
async fn case_004_expired_login_transaction() {
    let app = spawn_app_with(AppOptions::default().oauth("login_transaction_ttl_s = 1")).await;
    let p = app.start_login(None).await;
    let tx = tx_cookie(&p);
    assert!(
        tx.max_age().is_some_and(|m| m <= 1),
        "the cookie lives no longer than the transaction: {}",
        tx.raw
    );
    // Past the 1 s TTL with a margin; the cookie is replayed by hand so the server's own check counts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let code = app.idp.mint_code(p.grant());
    let resp =
        callback_with_cookie(&app, &code, &p.state, format!("{}={}", tx.name, tx.value)).await;
    assert!(
        clears_tx(&resp, &p.state),
        "the expired transaction cookie is not cleared"
    );
    let v = assert_rejected(&app, resp, "expired transaction", 400..=400).await;
    assert!(
        v["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("/login")),
        "the error tells the SPA to start again: {v}"
    );
    assert_eq!(app.idp.code_grants(), 0);
    // Restarting works.
    let again = app.start_login(None).await;
    let resp = app.finish_login(&again).await;
    assert_redirect_path(&app, &resp, "/");
}

#[tokio::test]
async fn case_005_authorization_code_injection() {
    let app = spawn_app().await;
    // 1. The attacker's code is bound to the attacker's PKCE challenge: the IdP refuses the victim's verifier.
    let p = app.start_login(None).await;
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
    assert!(clears_tx(&resp, &p.state));
    let v = assert_rejected(&app, resp, "foreign PKCE", 400..=400).await;
    assert_eq!(v["error"], "invalid_grant");

    // 2. An IdP that does not enforce PKCE: the ID token carries the attacker's nonce instead.
    let attacker = app
        .start_login_with(
            &new_browser(&Arc::new(reqwest::cookie::Jar::default())),
            None,
        )
        .await;
    let victim = app.start_login(None).await;
    let mut grant = victim.grant(); // passes PKCE
    grant.nonce = attacker.nonce.clone();
    grant.sub = "attacker".to_owned();
    let code = app.idp.mint_code(grant);
    let resp = app
        .callback(&[
            ("code", &code),
            ("state", &victim.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert!(clears_tx(&resp, &victim.state));
    assert_rejected(&app, resp, "foreign nonce", 400..=499).await;
}

#[tokio::test]
async fn case_006_pkce_hygiene() {
    let app = spawn_app_with(AppOptions::default().binary()).await;
    let a = app.start_login(None).await;
    let b = app.start_login(None).await;
    for p in [&a, &b] {
        assert_eq!(p.param("code_challenge_method").as_deref(), Some("S256"));
        assert_eq!(p.params_all("code_challenge_method").len(), 1);
        assert!(p.param("code_verifier").is_none(), "verifier in a URL");
    }
    assert_ne!(a.code_challenge, b.code_challenge, "challenge reused");
    // Finish both in reverse order: each verifier is the one bound to its own transaction.
    for p in [&b, &a] {
        let resp = app.finish_login(p).await;
        assert_redirect_path(&app, &resp, "/");
    }
    let verifiers: Vec<String> = app
        .idp
        .token_requests()
        .iter()
        .map(|r| {
            r.get("code_verifier")
                .expect("code_verifier sent")
                .to_owned()
        })
        .collect();
    assert_eq!(verifiers.len(), 2);
    assert_eq!(s256(&verifiers[0]), b.code_challenge);
    assert_eq!(s256(&verifiers[1]), a.code_challenge);
    assert_ne!(verifiers[0], verifiers[1]);
    for v in &verifiers {
        // 43 unreserved characters carry 256 bits.
        assert!((43..=128).contains(&v.len()), "verifier length {}", v.len());
        assert!(v
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c)));
        for p in [&a, &b] {
            assert!(!p.location.as_str().contains(v.as_str()));
            for c in &p.set_cookies {
                assert!(!c.raw.contains(v.as_str()), "verifier readable in a cookie");
            }
        }
    }
    let process = app.process.as_ref().expect("binary");
    let mut logs = String::new();
    for _ in 0..50 {
        logs = process.logs();
        if logs.matches("/oauth-callback").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logs.contains("/oauth-callback"), "no request log:\n{logs}");
    for v in &verifiers {
        assert!(!logs.contains(v.as_str()), "the PKCE verifier is logged");
    }
}

#[tokio::test]
async fn case_007_mix_up_iss_wrong() {
    let app = spawn_app().await;
    let issuer = app.idp.issuer().to_owned();
    let variants = [
        format!("{issuer}1"),
        format!("{issuer}/"),
        "http://evil.example".to_owned(),
        String::new(),
    ];
    for wrong in &variants {
        let p = app.start_login(None).await;
        let code = app.idp.mint_code(p.grant());
        let resp = app
            .callback(&[("code", &code), ("state", &p.state), ("iss", wrong)])
            .await;
        assert!(clears_tx(&resp, &p.state), "iss {wrong:?}: tx not consumed");
        assert_rejected(&app, resp, &format!("iss {wrong:?}"), 400..=400).await;
    }
    assert!(
        app.idp.token_requests().is_empty(),
        "mix-up: the code went to the token endpoint"
    );
}

#[tokio::test]
async fn case_008_iss_missing_while_advertised() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let resp = app.callback(&[("code", &code), ("state", &p.state)]).await;
    assert!(clears_tx(&resp, &p.state));
    assert_rejected(&app, resp, "no iss", 400..=400).await;
    assert!(app.idp.token_requests().is_empty());
}

#[tokio::test]
async fn case_009_error_response_at_the_callback() {
    let app = spawn_app().await;
    for (error, desc) in [
        ("access_denied", "<script>alert(\"x\")</script>"),
        ("login_required", "silent authentication failed"),
    ] {
        let p = app.start_login(None).await;
        let resp = app
            .callback(&[
                ("error", error),
                ("error_description", desc),
                ("state", &p.state),
                ("iss", app.idp.issuer()),
            ])
            .await;
        assert!(clears_tx(&resp, &p.state), "{error}: state not consumed");
        assert_no_session_cookie_set(&resp);
        assert!(
            resp.status() == 302 || resp.status() == 303,
            "{error}: status {}",
            resp.status()
        );
        // To the SPA, never back to /login or the IdP (no redirect loop), markup encoded.
        let loc = location(&resp);
        assert!(
            loc.starts_with(&format!("/?error={error}")),
            "{error}: Location {loc:?}"
        );
        assert!(
            !loc.contains('<') && !loc.contains('>') && !loc.contains('"'),
            "{error}: unescaped markup in {loc:?}"
        );
        // The state is consumed: a code for it now is refused.
        let code = app.idp.mint_code(p.grant());
        let again = app
            .callback(&[
                ("code", &code),
                ("state", &p.state),
                ("iss", app.idp.issuer()),
            ])
            .await;
        assert_rejected(&app, again, error, 400..=400).await;
    }
    // `error` is no proof of origin: with a wrong or missing `iss` it is refused like anything else.
    for iss in [Some("http://evil.example"), None] {
        let p = app.start_login(None).await;
        let mut params = vec![("error", "access_denied"), ("state", p.state.as_str())];
        if let Some(i) = iss {
            params.push(("iss", i));
        }
        let resp = app.callback(&params).await;
        assert_rejected(&app, resp, &format!("error with iss {iss:?}"), 400..=400).await;
    }
    assert!(app.idp.token_requests().is_empty(), "a token call was made");
}

#[tokio::test]
async fn case_010_duplicate_parameters() {
    let app = spawn_app().await;
    let issuer = app.idp.issuer().to_owned();
    for dup in ["state", "same state twice", "code", "iss", "error"] {
        let p = app.start_login(None).await;
        let other = app.start_login(None).await;
        let code = app.idp.mint_code(p.grant());
        let params: Vec<(&str, &str)> = match dup {
            "state" => vec![
                ("code", &code),
                ("state", &p.state),
                ("state", &other.state),
                ("iss", &issuer),
            ],
            "same state twice" => vec![
                ("code", &code),
                ("state", &p.state),
                ("state", &p.state),
                ("iss", &issuer),
            ],
            "code" => vec![
                ("code", "injected-code-0123456789"),
                ("code", &code),
                ("state", &p.state),
                ("iss", &issuer),
            ],
            "iss" => vec![
                ("code", &code),
                ("state", &p.state),
                ("iss", &issuer),
                ("iss", "http://evil.example"),
            ],
            _ => vec![
                ("error", "access_denied"),
                ("error", "login_required"),
                ("state", &p.state),
                ("iss", &issuer),
            ],
        };
        let resp = app.callback(&params).await;
        let v = assert_rejected(&app, resp, dup, 400..=400).await;
        assert_eq!(v["error"], "invalid_request", "{dup}");
    }
    assert!(
        app.idp.token_requests().is_empty(),
        "a duplicated parameter was resolved as \"one wins\""
    );
}

#[tokio::test]
async fn case_010_duplicate_parameters_consume_the_transaction() {
    let app = spawn_app().await;
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let resp = app
        .callback(&[
            ("code", "injected-code-0123456789"),
            ("code", &code),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_eq!(resp.status(), 400);
    assert!(
        clears_tx(&resp, &p.state) && !browser_holds_tx(&app, &p.state),
        "the login transaction survived a refused callback: {:?}",
        set_cookies(&resp)
    );
    let again = app
        .callback(&[
            ("code", &code),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_rejected(&app, again, "after duplicate", 400..=400).await;
}

#[tokio::test]
async fn case_011_malformed_query() {
    let app = spawn_app().await;
    let long = "a".repeat(9000);
    let huge = "b".repeat(100_000);
    let mut targets: Vec<Vec<u8>> = [
        "/oauth-callback?&&&".to_owned(),
        "/oauth-callback?".to_owned(),
        "/oauth-callback?=&=".to_owned(),
        "/oauth-callback?state=%zz&code=%zz".to_owned(),
        "/oauth-callback?state=%ff%fe&code=%c3%28".to_owned(),
        "/oauth-callback?state=a%00b&code=x%00".to_owned(),
        format!("/oauth-callback?state={long}&code={long}"),
        format!("/oauth-callback?state={huge}"),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    // Raw invalid UTF-8 and a raw NUL in the request target.
    targets.push(b"/oauth-callback?state=\xff\xfe&code=\xc3\x28".to_vec());
    targets.push(b"/oauth-callback?state=a\x00b".to_vec());
    for target in &targets {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(
            format!(
                " HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                app.addr
            )
            .as_bytes(),
        );
        let (status, raw) = raw_bytes(app.addr, &req).await;
        let shown = String::from_utf8_lossy(&target[..target.len().min(60)]).into_owned();
        assert!(
            (400..=499).contains(&status),
            "{shown}: status {status} (a closed connection counts as 0)"
        );
        assert!(
            !raw.to_ascii_lowercase().contains("set-cookie: tg_session"),
            "{shown} set a session"
        );
    }
    assert!(app.idp.token_requests().is_empty());
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn case_012_front_channel_token_injection() {
    let app = spawn_app().await;
    let forged_id = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(
            json!({"iss": app.idp.issuer(), "sub": "attacker", "aud": CLIENT_ID})
                .to_string()
                .as_bytes()
        )
    );
    // 1. Tokens without a code never log in.
    let p = app.start_login(None).await;
    let resp = app
        .callback(&[
            ("state", &p.state),
            ("access_token", "at-forged-0123456789"),
            ("token_type", "Bearer"),
            ("id_token", &forged_id),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert!(clears_tx(&resp, &p.state));
    assert_rejected(&app, resp, "tokens without a code", 400..=499).await;
    // 2. form_post is not a response mode tokengate accepts.
    let p = app.start_login(None).await;
    let code = app.idp.mint_code(p.grant());
    let form = [
        ("code", code.as_str()),
        ("state", p.state.as_str()),
        ("iss", app.idp.issuer()),
        ("id_token", forged_id.as_str()),
    ];
    let resp = app
        .client
        .post(app.url("/oauth-callback"))
        .form(&form)
        .send()
        .await
        .expect("POST callback");
    assert_rejected(&app, resp, "form_post", 400..=499).await;
    assert!(app.idp.token_requests().is_empty());
    // 3. Next to a real code, front-channel tokens are ignored: only the redeemed ones are used.
    let resp = app
        .callback(&[
            ("code", &code),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
            ("access_token", "at-forged-0123456789"),
            ("id_token", &forged_id),
        ])
        .await;
    if resp.status().is_client_error() {
        assert_no_session_cookie_set(&resp);
        return; // refusing the whole response is fine too
    }
    assert_redirect_path(&app, &resp, "/");
    let me: Value = app.get_userinfo().await.json().await.expect("json");
    assert_eq!(
        me["sub"], DEFAULT_SUB,
        "identity taken from a front-channel token"
    );
    assert_eq!(app.get_api("/api/x").await.status(), 200);
    let at = app.idp.last_access_token().expect("at");
    assert_eq!(
        app.api.last().header("authorization"),
        Some(format!("Bearer {at}").as_str()),
        "the API got a token that was not redeemed at the token endpoint"
    );
}

#[tokio::test]
async fn case_013_parameter_injection_at_login() {
    let app = spawn_app_with(
        AppOptions::default().oauth(r#"extra_authorize_params = { prompt = "consent" }"#),
    )
    .await;
    let injected = "scope=admin&prompt=foo&prompt=none&redirect_uri=https%3A%2F%2Fevil.example%2Fcb\
        &response_type=token&client_id=evil&code_challenge_method=plain&code_challenge=evilchallenge\
        &state=attacker-state&nonce=attacker-nonce&response_mode=form_post&resource=https%3A%2F%2Fevil.example\
        &request_uri=https%3A%2F%2Fevil.example%2Freq&claims=%7B%7D&login_hint=evil";
    let resp = app
        .client
        .get(format!("{}?{injected}", app.url("/login")))
        .send()
        .await
        .expect("GET /login");
    if resp.status().is_client_error() {
        assert_json_error_in(resp, 400..=499).await;
        return; // refusing the injection outright is fine
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
    assert_eq!(
        all("prompt"),
        vec!["consent".to_owned()],
        "prompt overridden"
    );
    for owned in ["state", "nonce", "code_challenge", "scope"] {
        assert_eq!(all(owned).len(), 1, "{owned} duplicated: {loc}");
    }
    for (name, value) in [
        ("state", "attacker-state"),
        ("nonce", "attacker-nonce"),
        ("code_challenge", "evilchallenge"),
    ] {
        assert_ne!(all(name)[0], value, "{name} taken from the query");
    }
    assert!(!all("scope")[0].contains("admin"), "scope injected");
    for foreign in [
        "response_mode",
        "resource",
        "request_uri",
        "claims",
        "login_hint",
    ] {
        assert!(
            all(foreign).is_empty(),
            "{foreign} passed through to the IdP"
        );
    }
    // A duplicated return_to is refused rather than resolved.
    let resp = app
        .client
        .get(format!("{}?return_to=/a&return_to=/b", app.url("/login")))
        .send()
        .await
        .expect("GET /login");
    assert_json_error(resp, 400).await;
}

#[tokio::test]
async fn case_014_odd_token_endpoint_responses() {
    let app = spawn_app().await;
    // Accepted oddities.
    for (what, member, value) in [
        ("token_type bEARER", "token_type", json!("bEARER")),
        ("no expires_in", "expires_in", Value::Null),
        ("no scope", "scope", Value::Null),
    ] {
        app.idp.behave(|b| {
            b.code_grant_patch.clear();
            b.code_grant_patch.insert(member.into(), value.clone());
        });
        assert_login_accepted(&app, what).await;
        assert_eq!(app.get_api("/api/x").await.status(), 200, "{what}");
    }
    let app = spawn_app().await;
    // Rejected with 502: nothing from such an answer may be used.
    let patches: [(&str, &str, Value); 5] = [
        ("unknown token_type", "token_type", json!("MAC")),
        ("empty token_type", "token_type", json!("")),
        ("no token_type", "token_type", Value::Null),
        ("no access_token", "access_token", Value::Null),
        ("empty access_token", "access_token", json!("")),
    ];
    for (what, member, value) in patches {
        app.idp.behave(|b| {
            b.code_grant_patch.clear();
            b.code_grant_patch.insert(member.into(), value.clone());
        });
        let p = app.start_login(None).await;
        let resp = app.finish_login(&p).await;
        assert_rejected(&app, resp, what, 502..=502).await;
    }
    app.idp.behave(|b| b.code_grant_patch.clear());
    let bodies: [(&str, u16, Value); 6] = [
        ("JSON array", 200, json!(["not", "an", "object"])),
        ("object without token members", 200, json!({"nested": "x"})),
        ("JSON number", 200, json!(42)),
        ("HTML 200", 200, json!("<html><body>hello</body></html>")),
        (
            "HTML 500",
            500,
            json!("<html><body>Internal Server Error</body></html>"),
        ),
        (
            "HTML 503",
            503,
            json!("<html><body>Service Unavailable</body></html>"),
        ),
    ];
    for (what, status, body) in bodies {
        app.idp
            .behave(|b| b.code_grant_error = Some((status, body.clone())));
        let p = app.start_login(None).await;
        let resp = app.finish_login(&p).await;
        assert!(clears_tx(&resp, &p.state), "{what}");
        assert_rejected(&app, resp, what, 502..=502).await;
    }
}

#[tokio::test]
async fn case_014_token_response_over_the_size_cap_is_502() {
    let app = spawn_app().await;
    // A well-formed token response padded to 8 MB: far above any sane cap for a token answer.
    app.idp.behave(|b| {
        b.code_grant_patch
            .insert("padding".into(), json!("x".repeat(8 * 1024 * 1024)));
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_rejected(&app, resp, "8 MB token response", 502..=502).await;
}

#[tokio::test]
async fn case_015_redirect_uri_from_host_or_forwarded_host() {
    let app = spawn_app().await;
    let spoof = |rb: reqwest::RequestBuilder| {
        rb.header("Host", "evil.example")
            .header("X-Forwarded-Host", "evil.example")
            .header("X-Forwarded-Proto", "https")
            .header("Forwarded", "host=evil.example;proto=https")
    };
    let resp = spoof(
        app.raw_client
            .get(format!("{}?return_to=/next", app.url("/login"))),
    )
    .send()
    .await
    .expect("GET /login");
    assert!(resp.status() == 302 || resp.status() == 303);
    let tx = set_cookies(&resp)
        .into_iter()
        .find(|c| is_tx_cookie_name(&c.name))
        .expect("tx cookie");
    assert!(tx.domain().is_none(), "cookie scoped by a spoofed host");
    let loc = url::Url::parse(&location(&resp)).expect("absolute Location");
    let get = |n: &str| {
        loc.query_pairs()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.into_owned())
    };
    let redirect_uri = format!("{}/oauth-callback", app.public_url);
    assert_eq!(get("redirect_uri"), Some(redirect_uri.clone()));
    assert!(loc.as_str().starts_with(app.idp.issuer()));
    // The callback, with the same spoofed headers: the code is redeemed for the configured
    // redirect_uri and the browser stays on the configured origin.
    let state = get("state").expect("state");
    let grant = CodeGrant {
        client_id: CLIENT_ID.to_owned(),
        redirect_uri: redirect_uri.clone(),
        code_challenge: get("code_challenge").expect("challenge"),
        nonce: get("nonce"),
        sub: DEFAULT_SUB.to_owned(),
    };
    let code = app.idp.mint_code(grant);
    let resp = spoof(app.raw_client.get(callback_url(
        &app,
        &[
            ("code", &code),
            ("state", &state),
            ("iss", app.idp.issuer()),
        ],
    )))
    .header("Cookie", format!("{}={}", tx.name, tx.value))
    .send()
    .await
    .expect("callback");
    assert_redirect_path(&app, &resp, "/next");
    let reqs = app.idp.token_requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].get("redirect_uri"), Some(redirect_uri.as_str()));
    // And the post-logout redirect is the configured one too.
    let session = session_cookies_set(&resp)
        .iter()
        .map(|c| format!("{}={}", c.name, c.value))
        .collect::<Vec<_>>()
        .join("; ");
    let resp = spoof(app.raw_client.post(app.url("/logout")))
        .header("X-CSRF", "1")
        .header("Cookie", session)
        .send()
        .await
        .expect("POST /logout");
    let v: Value = resp.json().await.expect("json");
    let logout_url = v["logout_url"].as_str().expect("logout_url").to_owned();
    assert!(!logout_url.contains("evil.example"), "{logout_url}");
}

#[tokio::test]
async fn case_017_discovery_issuer_mismatch() {
    for variant in ["trailing slash", "suffix", "other host"] {
        let idp = FakeIdp::start().await;
        let issuer = idp.issuer().to_owned();
        let advertised = match variant {
            "trailing slash" => format!("{issuer}/"),
            "suffix" => format!("{issuer}1"),
            _ => "http://evil.example".to_owned(),
        };
        idp.behave(|b| b.metadata_issuer_override = Some(advertised.clone()));
        let app = spawn_app_with(AppOptions::default().idp(&idp).no_wait()).await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut answered = false;
        while tokio::time::Instant::now() < deadline {
            if let Ok(r) = app.raw_client.get(app.url("/readyz")).send().await {
                answered = true;
                assert_eq!(r.status(), 503, "{variant}: provider accepted");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert!(answered, "{variant}: /readyz never answered");
        let login = app
            .raw_client
            .get(app.url("/login"))
            .send()
            .await
            .expect("GET /login");
        assert_json_error(login, 503).await;
    }
}

// =============================================================================================
// B. ID token validation
// =============================================================================================

#[tokio::test]
async fn case_018_bad_signature() {
    let app = spawn_app().await;
    let signers = [
        ("RS256", Signer::Rsa1),
        ("ES256", Signer::Ec1),
        (
            "HS256 (client secret)",
            Signer::Hs256(CLIENT_SECRET.to_owned()),
        ),
    ];
    for (what, signer) in signers {
        let (p, resp) = login_with_id_token(&app, |p| {
            let b = Behaviour {
                signer: signer.clone(),
                ..Behaviour::default()
            };
            break_signature(&sign_jwt(&b, &id_claims(&app, p)))
        })
        .await;
        assert!(clears_tx(&resp, &p.state), "{what}");
        assert_rejected(&app, resp, what, 400..=499).await;
    }
    // Validly shaped, signed by a key the IdP never published, under a published kid.
    app.idp.behave(|b| {
        b.signer = Signer::Rsa2;
        b.kid = Some(Some("k1".into()));
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_rejected(&app, resp, "RS256 by an unpublished key", 400..=499).await;
}

#[tokio::test]
async fn case_019_alg_none_or_no_alg() {
    let app = spawn_app().await;
    for alg in [Some("none"), Some("None"), Some("NONE"), Some(""), None] {
        let (_, resp) = login_with_id_token(&app, |p| {
            let mut header = json!({"typ": "JWT", "kid": "k1"});
            if let Some(a) = alg {
                header["alg"] = json!(a);
            }
            let claims = id_claims(&app, p).to_string();
            format!(
                "{}.{}.",
                b64(header.to_string().as_bytes()),
                b64(claims.as_bytes())
            )
        })
        .await;
        assert_rejected(&app, resp, &format!("alg {alg:?}"), 400..=499).await;
    }
    // With a signature segment that is a valid RS256 signature of the same input.
    let (_, resp) = login_with_id_token(&app, |p| {
        let claims = id_claims(&app, p).to_string();
        let valid = sign_raw(
            &json!({"alg": "RS256", "kid": "k1"}),
            claims.as_bytes(),
            &rsa_key(RSA1_PEM),
            Algorithm::RS256,
        );
        let sig = valid.rsplit('.').next().expect("sig").to_owned();
        format!(
            "{}.{}.{sig}",
            b64(br#"{"alg":"none","kid":"k1"}"#),
            b64(claims.as_bytes())
        )
    })
    .await;
    assert_rejected(&app, resp, "alg none with a signature", 400..=499).await;
}

#[tokio::test]
async fn case_020_algorithm_confusion() {
    let app = spawn_app().await;
    let rsa1 = rsa_key(RSA1_PEM);
    for (what, alg, name) in [
        ("PS256 where the key says RS256", Algorithm::PS256, "PS256"),
        ("RS384 where the key says RS256", Algorithm::RS384, "RS384"),
    ] {
        let (_, resp) = login_with_id_token(&app, |p| {
            sign_raw(
                &json!({"alg": name, "kid": "k1", "typ": "JWT"}),
                id_claims(&app, p).to_string().as_bytes(),
                &rsa1,
                alg,
            )
        })
        .await;
        assert_rejected(&app, resp, what, 400..=499).await;
    }
    // Key type must match the algorithm: an ES256 token naming the RSA key, an RS256 one naming the EC key.
    for (what, signer, kid) in [
        ("ES256 naming the RSA key", Signer::Ec1, "k1"),
        ("RS256 naming the EC key", Signer::Rsa1, "ec1"),
    ] {
        let (_, resp) = login_with_id_token(&app, |p| {
            let b = Behaviour {
                signer: signer.clone(),
                kid: Some(Some(kid.to_owned())),
                ..Behaviour::default()
            };
            sign_jwt(&b, &id_claims(&app, p))
        })
        .await;
        assert_rejected(&app, resp, what, 400..=499).await;
    }
    // HS256 keyed with the RSA public key (PEM text).
    let (_, resp) = login_with_id_token(&app, |p| {
        let b = Behaviour {
            signer: Signer::Hs256WithRsaPublicKey,
            ..Behaviour::default()
        };
        sign_jwt(&b, &id_claims(&app, p))
    })
    .await;
    assert_rejected(&app, resp, "HS256 with the RSA public key", 400..=499).await;
}

#[tokio::test]
async fn case_021_key_material_in_the_token_header() {
    let app = spawn_app().await;
    let attacker_url = format!("{}/attacker-jwks", app.idp.issuer());
    let rsa1 = rsa_key(RSA1_PEM);
    let rsa2 = rsa_key(RSA2_PEM);
    let rsa2_jwk = rsa_public_jwk(RSA2_PEM, "k2", "sig");
    let headers: Vec<(&str, Value, &EncodingKey)> = vec![
        (
            "jku + jwk of the signing key",
            json!({"alg": "RS256", "kid": "k2", "jku": attacker_url, "jwk": rsa2_jwk}),
            &rsa2,
        ),
        (
            "embedded jwk under a published kid",
            json!({"alg": "RS256", "kid": "k1", "jwk": rsa_public_jwk(RSA2_PEM, "k1", "sig")}),
            &rsa2,
        ),
        (
            "x5u + x5c",
            json!({"alg": "RS256", "kid": "k2", "x5u": attacker_url, "x5c": [b64(b"not a certificate")]}),
            &rsa2,
        ),
        (
            "path-looking kid",
            json!({"alg": "RS256", "kid": "../../../../etc/passwd"}),
            &rsa1,
        ),
        (
            "SQL-looking kid",
            json!({"alg": "RS256", "kid": "k1' OR '1'='1"}),
            &rsa1,
        ),
        (
            "kid with a NUL",
            json!({"alg": "RS256", "kid": "k1\u{0}"}),
            &rsa1,
        ),
    ];
    for (what, header, key) in headers {
        let (_, resp) = login_with_id_token(&app, |p| {
            sign_raw(
                &header,
                id_claims(&app, p).to_string().as_bytes(),
                key,
                Algorithm::RS256,
            )
        })
        .await;
        assert_rejected(&app, resp, what, 400..=499).await;
    }
    assert_eq!(
        app.idp.attacker_jwks_fetches(),
        0,
        "tokengate fetched a URL named in a token header (SSRF)"
    );
}

#[tokio::test]
async fn case_022_issuer_mismatch_or_missing() {
    let app = spawn_app().await;
    let issuer = app.idp.issuer().to_owned();
    for value in [
        json!(format!("{issuer}1")),
        json!(format!("{issuer}/")),
        json!("http://evil.example"),
        json!(""),
        json!(42),
        Value::Null,
    ] {
        assert_claim_rejected(&app, "iss", value).await;
    }
}

#[tokio::test]
async fn case_022_issuer_as_an_array_is_rejected() {
    let app = spawn_app().await;
    let issuer = app.idp.issuer().to_owned();
    assert_claim_rejected(&app, "iss", json!([issuer, "http://evil.example"])).await;
    assert_claim_rejected(&app, "iss", json!([issuer])).await;
}

#[tokio::test]
async fn case_023_audience_wrong_or_missing() {
    let app = spawn_app().await;
    for value in [
        json!("someone-else"),
        json!(format!("{CLIENT_ID}x")),
        json!(CLIENT_ID.to_uppercase()),
        json!([]),
        json!(["someone-else"]),
        json!(""),
        Value::Null,
    ] {
        assert_claim_rejected(&app, "aud", value).await;
    }
}

#[tokio::test]
async fn case_024_multiple_audiences() {
    let app = spawn_app().await;
    // Several audiences without azp, or with someone else's azp.
    assert_claim_rejected(&app, "aud", json!([CLIENT_ID, "other"])).await;
    app.idp.behave(|b| {
        b.claim("azp", json!("other"));
    });
    assert_claim_rejected(&app, "aud", json!([CLIENT_ID, "other"])).await;
    // An azp that is not us is refused even with a single audience.
    app.idp.behave(|b| {
        b.claim("azp", json!("other"));
    });
    assert_claim_rejected(&app, "aud", json!(CLIENT_ID)).await;
    // An array of one is the single audience.
    app.idp.behave(|b| {
        b.claim("aud", json!([CLIENT_ID]));
    });
    assert_login_accepted(&app, "aud = [client_id]").await;
}

#[tokio::test]
async fn case_025_expiry() {
    let app = spawn_app().await;
    let now = unix_now();
    for value in [Value::Null, json!(now - 360), json!(now - 301)] {
        assert_claim_rejected(&app, "exp", value).await;
    }
}

#[tokio::test]
async fn case_026_issued_at() {
    let app = spawn_app().await;
    let now = unix_now();
    for value in [
        Value::Null,
        json!(now - 7 * 24 * 3600),
        json!(now + 3600),
        json!(now + 600),
        json!(-5),
        json!(now.to_string()),
    ] {
        assert_claim_rejected(&app, "iat", value).await;
    }
}

#[tokio::test]
async fn case_027_odd_numeric_dates() {
    let app = spawn_app().await;
    let now = unix_now();
    // Non-numbers and negatives: rejected.
    for value in [
        json!(-1),
        json!((now + 3600).to_string()),
        json!(null),
        json!(true),
        json!([now + 3600]),
    ] {
        assert_claim_rejected(&app, "exp", value).await;
    }
    // Absurd numbers: no overflow, no 5xx.
    for value in [json!(1e300), json!(u64::MAX), json!(f64::MAX)] {
        app.idp.behave(|b| {
            b.claim("exp", value.clone());
        });
        let p = app.start_login(None).await;
        let resp = app.finish_login(&p).await;
        app.idp.behave(|b| b.id_token_patch.clear());
        assert!(
            resp.status().as_u16() < 500,
            "exp {value}: status {}",
            resp.status()
        );
    }
    // Fractions and dates after 2038 are valid.
    let fresh = spawn_app().await;
    fresh.idp.behave(|b| {
        b.claim("exp", json!(now as f64 + 3600.5));
        b.claim("iat", json!(now as f64 - 0.25));
    });
    assert_login_accepted(&fresh, "fractional exp/iat").await;
    fresh.idp.behave(|b| {
        b.id_token_patch.clear();
        b.claim("exp", json!(4_102_444_800u64)); // 2100-01-01
    });
    assert_login_accepted(&fresh, "exp in 2100").await;
    // Session timestamps past 2038 do not wrap: an access token valid for 5e9 seconds.
    fresh.idp.behave(|b| {
        b.id_token_patch.clear();
        b.access_token_ttl = 5_000_000_000;
    });
    assert_login_accepted(&fresh, "expires_in past 2038").await;
    let me: Value = fresh.get_userinfo().await.json().await.expect("json");
    let left = me["session"]["access_token_expires_in"]
        .as_u64()
        .unwrap_or_else(|| panic!("access_token_expires_in missing: {me}"));
    assert!(left > u64::from(u32::MAX), "expiry wrapped: {left}");
    assert_eq!(fresh.get_api("/api/x").await.status(), 200);
    assert_eq!(
        fresh.idp.refresh_grants(),
        0,
        "a far-future expiry looked expired"
    );
}

#[tokio::test]
async fn case_028_missing_sub() {
    let app = spawn_app().await;
    for value in [Value::Null, json!(""), json!(42), json!(["user-1"])] {
        assert_claim_rejected(&app, "sub", value).await;
    }
}

#[tokio::test]
async fn case_029_nonce_wrong_or_missing() {
    let app = spawn_app().await;
    for value in [
        json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        json!(""),
        json!(["x"]),
        Value::Null,
    ] {
        assert_claim_rejected(&app, "nonce", value).await;
    }
    // The nonce of another of this browser's own transactions (tab A's nonce completing tab B).
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
    assert_rejected(&app, resp, "nonce of another tab", 400..=499).await;
}

#[tokio::test]
async fn case_030_nonce_or_id_token_replay() {
    let app = spawn_app().await;
    app.login().await;
    let old = app.idp.last_id_token().expect("id token");
    // A later login of another browser gets the earlier login's (valid, signed) ID token.
    let jar = Arc::new(reqwest::cookie::Jar::default());
    let browser = new_browser(&jar);
    let p = app.start_login_with(&browser, None).await;
    app.idp.behave(|b| {
        b.code_grant_patch.insert("id_token".into(), json!(old));
    });
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
    assert_no_session_cookie_set(&resp);
    let status = resp.status().as_u16();
    assert!((400..=499).contains(&status), "replayed ID token: {status}");
    let me = browser
        .get(app.url("/userinfo"))
        .send()
        .await
        .expect("GET /userinfo");
    assert_eq!(me.status(), 401, "a replayed ID token created a session");
}

#[tokio::test]
async fn case_031_kid_absent() {
    // One key: accepted.
    let idp = FakeIdp::start().await;
    idp.behave(|b| {
        b.published_keys = vec![PublishedKey::Rsa1];
        b.kid = Some(None);
    });
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await;
    assert_login_accepted(&app, "no kid, one key").await;
    // Several keys of the same type: rejecting or trying the matching ones are both fine; no 5xx.
    idp.behave(|b| b.published_keys = vec![PublishedKey::Rsa1, PublishedKey::Rsa2]);
    let fresh = spawn_app_with(AppOptions::default().idp(&idp)).await;
    let p = fresh.start_login(None).await;
    let resp = fresh.finish_login(&p).await;
    let s = resp.status().as_u16();
    assert!(
        s == 302 || s == 303 || (400..=499).contains(&s),
        "status {s}"
    );
    // Never an encryption key: the JWKS publishes the signing key only with use=enc.
    let side = SideServer::start().await;
    side.set(
        "/jwks",
        json!({"keys": [rsa_public_jwk(RSA1_PEM, "k1", "enc")]}),
    );
    let idp = FakeIdp::start().await;
    let app = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .oauth(&format!("jwks_uri = \"{}\"", side.url("/jwks"))),
    )
    .await;
    for kid in [Some(Some("k1".to_owned())), Some(None)] {
        idp.behave(|b| b.kid = kid.clone());
        let p = app.start_login(None).await;
        let resp = app.finish_login(&p).await;
        assert_rejected(&app, resp, &format!("use=enc key, kid {kid:?}"), 400..=499).await;
    }
    assert!(side.hits() >= 1, "the configured jwks_uri was not used");
}

#[tokio::test]
async fn case_032_key_rotation() {
    let app = spawn_app().await;
    let fetched_at_start = app.idp.jwks_fetches();
    // Rotated right after start-up, before the first login ("just before signing").
    app.idp.rotate_keys();
    assert_login_accepted(&app, "first token signed by the new key").await;
    assert_eq!(
        app.idp.jwks_fetches(),
        fetched_at_start + 1,
        "an unknown kid must cause exactly one JWKS re-fetch"
    );
    // The new key is now known: no further fetches.
    let jar = Arc::new(reqwest::cookie::Jar::default());
    let browser = new_browser(&jar);
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
    assert!(resp.status() == 302 || resp.status() == 303);
    assert_eq!(app.idp.jwks_fetches(), fetched_at_start + 1);
}

#[tokio::test]
async fn case_033_malformed_jwt() {
    let app = spawn_app().await;
    let rsa1 = rsa_key(RSA1_PEM);
    let header = json!({"alg": "RS256", "kid": "k1"});
    let big_header = format!(
        "{}{}.e30.c2ln",
        b64(br#"{"alg":"RS256","kid":"k1","x":""#),
        "A".repeat(1_000_000)
    );
    let mut bomb = vec![0x78u8, 0x9c];
    bomb.extend(std::iter::repeat_n(0u8, 4096));
    let cases: Vec<(&str, String)> = vec![
        ("2 segments", "a.b".to_owned()),
        ("4 segments", "a.b.c.d".to_owned()),
        (
            "5 segments (a JWE)",
            format!(
                "{}.a.b.c.d",
                b64(br#"{"alg":"RSA-OAEP","enc":"A256GCM","kid":"k1"}"#)
            ),
        ),
        ("not base64url", "!!!.@@@.###".to_owned()),
        ("empty", String::new()),
        (
            "payload not JSON (validly signed)",
            sign_raw(&header, b"not json at all", &rsa1, Algorithm::RS256),
        ),
        (
            "payload a top-level array (validly signed)",
            sign_raw(&header, b"[1,2,3]", &rsa1, Algorithm::RS256),
        ),
        ("1 MB header", big_header),
        (
            "zip DEF (validly signed)",
            sign_raw(
                &json!({"alg": "RS256", "kid": "k1", "zip": "DEF"}),
                &bomb,
                &rsa1,
                Algorithm::RS256,
            ),
        ),
    ];
    for (what, token) in cases {
        let (_, resp) = login_with_id_token(&app, |_| token).await;
        assert_rejected_if(&app, resp, what, client_error_or_bad_gateway).await;
    }
    // Not a string at all.
    app.idp.behave(|b| {
        b.code_grant_patch.insert("id_token".into(), json!(42));
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_rejected_if(&app, resp, "id_token 42", client_error_or_bad_gateway).await;
    assert_still_serving(&app).await;
}

/// A login whose ID token (validly signed) names `dup` twice: a hostile value first, the
/// expected one last.
async fn login_with_duplicate_claim(app: &TestApp, dup: &str) -> reqwest::Response {
    let rsa1 = rsa_key(RSA1_PEM);
    let header = json!({"alg": "RS256", "kid": "k1"});
    let (_, resp) = login_with_id_token(app, |p| {
        let claims = id_claims(app, p);
        let obj = claims.as_object().expect("object");
        let hostile = match dup {
            "sub" => json!("attacker"),
            "nonce" => json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            "aud" => json!("someone-else"),
            "exp" => json!(unix_now() - 3600),
            "iat" => json!(unix_now() - 7 * 24 * 3600),
            _ => json!("http://evil.example"),
        };
        let mut text = format!("{{\"{dup}\":{hostile}");
        for (k, v) in obj {
            text.push_str(&format!(",\"{k}\":{v}"));
        }
        text.push('}');
        sign_raw(&header, text.as_bytes(), &rsa1, Algorithm::RS256)
    })
    .await;
    resp
}

#[tokio::test]
async fn case_033_duplicate_claim_names_are_rejected() {
    let app = spawn_app().await;
    for dup in ["sub", "aud", "iss", "exp"] {
        let resp = login_with_duplicate_claim(&app, dup).await;
        let what = format!("duplicate {dup}");
        assert_rejected_if(&app, resp, &what, client_error_or_bad_gateway).await;
    }
}

#[tokio::test]
async fn case_033_duplicate_nonce_or_iat_is_rejected() {
    let app = spawn_app().await;
    for dup in ["nonce", "iat"] {
        let resp = login_with_duplicate_claim(&app, dup).await;
        let what = format!("duplicate {dup}");
        assert_rejected_if(&app, resp, &what, client_error_or_bad_gateway).await;
    }
}

#[tokio::test]
async fn case_034_userinfo_sub_mismatch_or_not_an_object() {
    let side = SideServer::start().await;
    let app = spawn_app_with(AppOptions::default().oauth(&format!(
        "userinfo_endpoint = \"{}\"",
        side.url("/userinfo")
    )))
    .await;
    let answers = [
        (
            "another sub",
            json!({"sub": "attacker", "email": "attacker@evil.example", "name": "Evil"}),
        ),
        ("no sub", json!({"email": "attacker@evil.example"})),
        (
            "a JSON array",
            json!([{"sub": DEFAULT_SUB, "email": "attacker@evil.example"}]),
        ),
        ("a JSON string", json!("attacker@evil.example")),
    ];
    for (what, answer) in answers {
        side.set("/userinfo", answer);
        let hits = side.hits();
        app.login().await;
        let resp = app.get_userinfo().await;
        assert_eq!(resp.status(), 200, "{what}");
        let me: Value = resp.json().await.expect("json");
        assert!(
            side.hits() > hits,
            "{what}: the UserInfo endpoint was not asked"
        );
        assert_eq!(me["sub"], DEFAULT_SUB, "{what}: {me}");
        assert!(
            me.get("email").is_none(),
            "{what}: UserInfo claims used: {me}"
        );
        assert_ne!(me["name"], "Evil", "{what}: {me}");
    }
    // A truthful UserInfo is merged (so the test above can fail).
    side.set(
        "/userinfo",
        json!({"sub": DEFAULT_SUB, "email": "user@example.com"}),
    );
    app.login().await;
    let me: Value = app.get_userinfo().await.json().await.expect("json");
    assert_eq!(me["email"], "user@example.com", "{me}");
}

#[tokio::test]
async fn case_035_different_user_on_reauthentication() {
    let app = spawn_app().await;
    app.login().await;
    let first_at = app.idp.last_access_token().expect("at");
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
    assert_redirect_path(&app, &resp, "/");
    let me: Value = app.get_userinfo().await.json().await.expect("json");
    assert_eq!(
        me["sub"], "user-2",
        "identities merged or the old session kept"
    );
    assert_eq!(app.get_api("/api/x").await.status(), 200);
    let auth = app.api.last().header("authorization").map(str::to_owned);
    assert_ne!(
        auth,
        Some(format!("Bearer {first_at}")),
        "the first user's token is used for the second user"
    );
    assert_eq!(
        auth,
        Some(format!(
            "Bearer {}",
            app.idp.last_access_token().expect("at")
        ))
    );
}

#[tokio::test]
async fn case_035_old_server_side_session_is_deleted_at_relogin() {
    // Redis store whatever the suite runs on: the cookie store keeps nothing server-side.
    let redis = crate::redis_server::RedisServer::start().await;
    let app = spawn_app_with(AppOptions::default().redis(&redis)).await;
    app.login().await;
    let old_cookie = app.session_cookie_header();
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
    assert_redirect_path(&app, &resp, "/");
    let replay = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", old_cookie)
        .send()
        .await
        .expect("GET");
    assert_eq!(
        replay.status(),
        401,
        "the replaced session still works server-side"
    );
}

#[tokio::test]
async fn case_036_missing_at_hash_is_accepted_in_code_flow() {
    // Only the code-flow part applies (no hybrid/implicit flow: c_hash/s_hash never arrive).
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim("at_hash", Value::Null);
        b.claim("c_hash", Value::Null);
    });
    assert_login_accepted(&app, "no at_hash").await;
}

// =============================================================================================
// C. Cookies and sessions
// =============================================================================================

fn assert_host_cookie(c: &SetCookie) {
    assert!(
        c.name.starts_with("__Host-"),
        "no __Host- prefix: {}",
        c.raw
    );
    assert!(c.secure(), "Secure missing: {}", c.raw);
    assert!(c.http_only(), "HttpOnly missing: {}", c.raw);
    assert_eq!(c.path(), Some("/"), "{}", c.raw);
    assert!(c.domain().is_none(), "Domain set: {}", c.raw);
    let ss = c.same_site();
    if is_tx_cookie_name(&c.name) {
        assert_eq!(ss.as_deref(), Some("lax"), "{}", c.raw);
    } else {
        assert_eq!(ss.as_deref(), Some("strict"), "{}", c.raw);
    }
}

#[tokio::test]
async fn case_038_session_cookie_attributes_on_every_set_cookie() {
    let app = spawn_app_with(AppOptions::default().https()).await;
    // A large ID token, so that (with the cookie store) the session is chunked.
    let blob = random_blob(4500);
    app.idp.behave(|b| {
        b.claim("profile_blob", json!(blob));
    });
    let mut all: Vec<SetCookie> = Vec::new();
    let p = app.start_login(None).await;
    all.extend(p.set_cookies.iter().cloned());
    let tx = tx_cookie(&p);
    let code = app.idp.mint_code(p.grant());
    let cb = callback_with_cookie(&app, &code, &p.state, format!("{}={}", tx.name, tx.value)).await;
    assert!(cb.status() == 302 || cb.status() == 303, "{}", cb.status());
    let session: Vec<SetCookie> = session_cookies_set(&cb);
    assert!(!session.is_empty());
    if !redis_store() {
        assert!(session.len() >= 2, "expected chunks: {session:?}");
    }
    all.extend(set_cookies(&cb));
    let session_header = session
        .iter()
        .map(|c| format!("{}={}", c.name, c.value))
        .collect::<Vec<_>>()
        .join("; ");
    // An error that clears (tampered value), then logout.
    let bad = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", "__Host-tg_session=garbage; __Host-tg_session.1=x")
        .send()
        .await
        .expect("GET");
    assert_eq!(bad.status(), 401);
    all.extend(set_cookies(&bad));
    let out = app
        .raw_client
        .post(app.url("/logout"))
        .header("X-CSRF", "1")
        .header("Cookie", &session_header)
        .send()
        .await
        .expect("logout");
    assert_eq!(out.status(), 200);
    all.extend(set_cookies(&out));
    assert!(
        all.iter().filter(|c| c.is_removal()).count() >= 3,
        "deletions were checked: {all:?}"
    );
    for c in &all {
        assert_host_cookie(c);
    }
    // No configuration can make a __Host- cookie invalid: there is no cookie domain/path/secure knob.
    for line in [
        "cookie_domain = \".example.com\"",
        "cookie_path = \"/app\"",
        "cookie_secure = false",
    ] {
        let toml = app
            .config_toml
            .replacen("[session]\n", &format!("[session]\n{line}\n"), 1);
        assert!(
            tokengate::config::Config::load(&toml, Vec::<(String, String)>::new()).is_err(),
            "config accepted `{line}`"
        );
    }
}

#[tokio::test]
async fn case_039_login_transaction_cookie() {
    let app = spawn_app().await;
    let a = app.start_login(Some("/secret-path")).await;
    let b = app.start_login(None).await;
    let (ta, tb) = (tx_cookie(&a), tx_cookie(&b));
    assert_ne!(ta.name, tb.name, "one cookie per transaction");
    for (p, c) in [(&a, &ta), (&b, &tb)] {
        assert!(c.http_only(), "{}", c.raw);
        assert_eq!(c.same_site().as_deref(), Some("lax"), "{}", c.raw);
        assert!(
            c.max_age().is_some_and(|m| (1..=600).contains(&m)),
            "{}",
            c.raw
        );
        // Sealed: nothing of the transaction is readable.
        let decoded = URL_SAFE_NO_PAD
            .decode(c.value.as_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&decoded);
        for plain in [
            p.nonce.clone().expect("nonce"),
            p.state.clone(),
            "secret-path".to_owned(),
        ] {
            assert!(
                !c.value.contains(&plain) && !text.contains(&plain),
                "{plain} readable"
            );
        }
    }
    // Tampered (one bit) or moved to the other transaction's name: refused, code never redeemed.
    let mut bytes = URL_SAFE_NO_PAD
        .decode(ta.value.as_bytes())
        .expect("base64url");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let tampered = b64(&bytes);
    let code = app.idp.mint_code(a.grant());
    for (what, cookie) in [
        ("one bit flipped", format!("{}={tampered}", ta.name)),
        ("moved to another name", format!("{}={}", ta.name, tb.value)),
    ] {
        let resp = callback_with_cookie(&app, &code, &a.state, cookie).await;
        assert_rejected(&app, resp, what, 400..=400).await;
    }
    assert_eq!(app.idp.code_grants(), 0);
    // Both tabs (untouched cookies) still complete, in any order.
    let resp = app.finish_login(&b).await;
    assert_redirect_path(&app, &resp, "/");
}

/// One byte of the sealed value changed at `index` (from the end when negative).
fn flip_byte(value: &str, index: isize) -> String {
    let mut bytes = URL_SAFE_NO_PAD.decode(value.as_bytes()).expect("base64url");
    let i = if index < 0 {
        bytes.len() - index.unsigned_abs()
    } else {
        index.unsigned_abs()
    };
    bytes[i] ^= 0x01;
    b64(&bytes)
}

#[tokio::test]
async fn case_040_tampered_or_undecryptable_cookie() {
    let idp = FakeIdp::start().await;
    let api = EchoApi::start().await;
    let app = spawn_app_with(AppOptions::default().idp(&idp).api(&api)).await;
    let other = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .api(&api)
            .keys(&[session_key(99)]),
    )
    .await;
    app.login().await;
    other.login().await;
    let (name, value) = app
        .cookies()
        .into_iter()
        .find(|(n, _)| is_session_cookie_name(n))
        .expect("session cookie");
    let foreign = other.session_cookie_header();
    let variants = [
        ("version byte", format!("{name}={}", flip_byte(&value, 0))),
        ("nonce bit", format!("{name}={}", flip_byte(&value, 5))),
        (
            "ciphertext bit",
            format!("{name}={}", flip_byte(&value, 30)),
        ),
        ("tag bit", format!("{name}={}", flip_byte(&value, -1))),
        ("truncated", format!("{name}={}", &value[..value.len() / 2])),
        ("base64 garbage", format!("{name}=!!!not-base64***")),
        ("empty", format!("{name}=")),
        ("another deployment's key", foreign),
    ];
    let refresh_before = idp.refresh_grants();
    for (what, cookie) in &variants {
        for (method, path) in [
            ("GET", "/userinfo"),
            ("GET", "/api/x"),
            ("POST", "/refreshtoken"),
        ] {
            let rb = match method {
                "POST" => app.raw_client.post(app.url(path)),
                _ => app.raw_client.get(app.url(path)),
            };
            let resp = rb
                .header("X-CSRF", "1")
                .header("Cookie", cookie)
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 401, "{what} on {path}");
            assert_clears_session_cookie(&resp);
            assert_no_session_cookie_set(&resp);
            assert_json_error(resp, 401).await;
        }
    }
    assert!(
        api.requests().is_empty(),
        "a tampered session reached the API"
    );
    assert_eq!(
        idp.refresh_grants(),
        refresh_before,
        "a tampered session was refreshed"
    );
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "the intact cookie works"
    );
}

#[tokio::test]
async fn case_041_aead_nonce_uniqueness() {
    let app = spawn_app().await;
    let mut sealed: Vec<String> = Vec::new();
    for _ in 0..4 {
        let p = app.start_login(None).await;
        sealed.push(tx_cookie(&p).value);
        let resp = app.finish_login(&p).await;
        sealed.extend(session_cookies_set(&resp).into_iter().map(|c| c.value));
    }
    let mut nonces = Vec::new();
    for v in &sealed {
        let raw = URL_SAFE_NO_PAD.decode(v.as_bytes()).expect("base64url");
        assert!(
            raw.len() > 1 + 24 + 16,
            "too short to carry a nonce and a tag"
        );
        nonces.push(raw[1..25].to_vec());
    }
    let mut unique = nonces.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), nonces.len(), "an AEAD nonce was reused");
    assert!(sealed.len() >= 8);
    // The associated data binds a value to its cookie: a session value under a transaction name fails.
    let p = app.start_login(None).await;
    let tx = tx_cookie(&p);
    let code = app.idp.mint_code(p.grant());
    let session_value = app
        .cookies()
        .into_iter()
        .find(|(n, _)| is_session_cookie_name(n))
        .map(|(_, v)| v)
        .expect("session");
    let resp = callback_with_cookie(
        &app,
        &code,
        &p.state,
        format!("{}={session_value}", tx.name),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(app.idp.code_grants(), 4);
}

#[tokio::test]
async fn case_042_key_rotation_for_cookie_encryption() {
    let idp = FakeIdp::start().await;
    let old = spawn_app_with(AppOptions::default().idp(&idp).keys(&[session_key(1)])).await;
    let new = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .keys(&[session_key(2), session_key(1)])
            .same_store_as(&old),
    )
    .await;
    old.login().await;
    let get = |app: &TestApp, cookie: String| {
        app.raw_client
            .get(app.url("/userinfo"))
            .header("Cookie", cookie)
            .send()
    };
    let resp = get(&new, old.session_cookie_header()).await.expect("GET");
    assert_eq!(
        resp.status(),
        200,
        "old-key cookie refused during the overlap"
    );
    new.login().await;
    let resp = get(&old, new.session_cookie_header()).await.expect("GET");
    assert_eq!(
        resp.status(),
        401,
        "new cookies are not sealed with the first key"
    );
    assert_clears_session_cookie(&resp);
    // An unknown key is "logged out", not an error.
    let stranger = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .keys(&[session_key(3)])
            .same_store_as(&old),
    )
    .await;
    let resp = get(&stranger, new.session_cookie_header())
        .await
        .expect("GET");
    assert_clears_session_cookie(&resp);
    assert_json_error(resp, 401).await;
}

#[tokio::test]
async fn case_043_session_fixation() {
    let app = spawn_app().await;
    // A junk cookie and, worse, a real session of the attacker's planted in the victim's browser.
    let attacker = spawn_app_with(AppOptions::default().idp(&app.idp).same_store_as(&app)).await;
    attacker.login().await;
    let (an, av) = attacker
        .cookies()
        .into_iter()
        .find(|(n, _)| is_session_cookie_name(n))
        .expect("attacker session");
    app.add_browser_cookie(&format!("{an}={av}; Path=/"));
    let p = app.start_login(None).await;
    let mut grant = p.grant();
    grant.sub = "victim".to_owned();
    let code = app.idp.mint_code(grant);
    let resp = app
        .callback(&[
            ("code", &code),
            ("state", &p.state),
            ("iss", app.idp.issuer()),
        ])
        .await;
    assert_redirect_path(&app, &resp, "/");
    let set = session_cookies_set(&resp);
    assert!(!set.is_empty());
    assert!(
        set.iter().all(|c| c.value != av),
        "the planted session was kept"
    );
    let me: Value = app.get_userinfo().await.json().await.expect("json");
    assert_eq!(me["sub"], "victim");
    // The attacker's copy does not see the victim.
    let theirs = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", format!("{an}={av}"))
        .send()
        .await
        .expect("GET");
    if theirs.status() == 200 {
        let v: Value = theirs.json().await.expect("json");
        assert_ne!(
            v["sub"], "victim",
            "fixation: the planted cookie now carries the victim"
        );
    }
}

#[tokio::test]
async fn case_043_planted_session_record_is_deleted_at_login() {
    // Redis store whatever the suite runs on: the cookie store keeps nothing server-side.
    let redis = crate::redis_server::RedisServer::start().await;
    let app = spawn_app_with(AppOptions::default().redis(&redis)).await;
    app.login().await;
    let planted = app.session_cookie_header();
    app.login().await;
    let resp = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", planted)
        .send()
        .await
        .expect("GET");
    assert_eq!(
        resp.status(),
        401,
        "the pre-login session record survived the login"
    );
}

/// Session cookie (chunk) names the browser holds.
fn session_names(app: &TestApp) -> Vec<String> {
    app.cookies()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| is_session_cookie_name(n))
        .collect()
}

fn cleared_names(resp: &reqwest::Response) -> Vec<String> {
    set_cookies(resp)
        .into_iter()
        .filter(|c| c.is_removal())
        .map(|c| c.name)
        .collect()
}

async fn login_big(app: &TestApp) {
    let blob = random_blob(4500);
    app.idp.behave(|b| {
        b.claim("profile_blob", json!(blob));
    });
    app.login().await;
    app.idp.behave(|b| b.id_token_patch.clear());
}

#[tokio::test]
async fn case_044_cookie_clearing_reaches_the_browser() {
    // Logout.
    let app = spawn_app().await;
    login_big(&app).await;
    let names = session_names(&app);
    assert!(!names.is_empty());
    let resp = app.post_logout().await;
    let cleared = cleared_names(&resp);
    for n in &names {
        assert!(cleared.contains(n), "logout left {n}: {cleared:?}");
    }
    assert!(session_names(&app).is_empty());
    // invalid_grant on refresh.
    let app = spawn_app().await;
    login_big(&app).await;
    let names = session_names(&app);
    app.idp.behave(|b| b.refresh = RefreshMode::InvalidGrant);
    let resp = app.post_refresh().await;
    let cleared = cleared_names(&resp);
    for n in &names {
        assert!(cleared.contains(n), "invalid_grant left {n}: {cleared:?}");
    }
    assert_json_error(resp, 401).await;
    assert!(session_names(&app).is_empty());
    // A tampered chunk: every chunk the browser sent is cleared.
    let app = spawn_app().await;
    login_big(&app).await;
    let mut cookies: Vec<(String, String)> = app
        .cookies()
        .into_iter()
        .filter(|(n, _)| is_session_cookie_name(n))
        .collect();
    cookies[0].1 = format!("x{}", cookies[0].1);
    let header = cookies
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let resp = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", header)
        .send()
        .await
        .expect("GET");
    let cleared = cleared_names(&resp);
    for (n, _) in &cookies {
        assert!(cleared.contains(n), "error left {n}: {cleared:?}");
    }
    assert_json_error(resp, 401).await;
    // A new sign-in with a smaller session removes the stale chunks of the bigger one.
    let app = spawn_app().await;
    login_big(&app).await;
    let before = session_names(&app);
    app.login().await;
    let after = session_names(&app);
    assert!(!after.is_empty());
    if !redis_store() {
        assert!(before.len() >= 2, "{before:?}");
        assert_eq!(
            after,
            vec!["tg_session".to_owned()],
            "stale chunks left: {after:?}"
        );
    }
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn case_045_duplicate_or_shadowed_cookie_names() {
    let app = spawn_app().await;
    app.login().await;
    let (name, value) = app
        .cookies()
        .into_iter()
        .find(|(n, _)| is_session_cookie_name(n))
        .expect("session");
    let garbage =
        format!("{name}=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let valid = format!("{name}={value}");
    for headers in [
        vec![format!("{garbage}; {valid}")],
        vec![format!("{valid}; {garbage}")],
        vec![garbage.clone(), valid.clone()],
        vec![format!("{valid}; {valid}")],
    ] {
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let mut rb = app.raw_client.get(app.url("/userinfo"));
            for h in &headers {
                rb = rb.header("Cookie", h);
            }
            let resp = rb.send().await.expect("GET");
            let s = resp.status().as_u16();
            assert!(s == 200 || s == 401, "{headers:.60?}: status {s}");
            if s == 401 {
                assert!(
                    resp.headers().get("location").is_none(),
                    "a redirect loop starts"
                );
                assert_json_error(resp, 401).await;
            }
            statuses.push(s);
        }
        statuses.dedup();
        assert_eq!(statuses.len(), 1, "{headers:.60?}: not deterministic");
    }
    // The same for a login transaction: at most one redemption, never a 5xx.
    let p = app.start_login(None).await;
    let tx = tx_cookie(&p);
    let code = app.idp.mint_code(p.grant());
    let grants = app.idp.code_grants();
    let resp = callback_with_cookie(
        &app,
        &code,
        &p.state,
        format!(
            "{}=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA; {}={}",
            tx.name, tx.name, tx.value
        ),
    )
    .await;
    let s = resp.status().as_u16();
    assert!(s == 302 || s == 400, "status {s}");
    assert!(app.idp.code_grants() <= grants + 1);
}

#[tokio::test]
async fn case_046_forged_chunk_count() {
    let app = spawn_app().await;
    let many: String = (0..64)
        .map(|i| format!("tg_session.{i}=AAAA"))
        .collect::<Vec<_>>()
        .join("; ");
    for header in [
        "tg_session.0=AAAA; tg_session.99999999=AAAA".to_owned(),
        "tg_session.99999999=AAAA".to_owned(),
        "tg_session.18446744073709551616=AAAA".to_owned(),
        "tg_session.-1=AAAA; tg_session.0=AAAA".to_owned(),
        many,
    ] {
        let resp = app
            .raw_client
            .get(app.url("/userinfo"))
            .header("Cookie", &header)
            .send()
            .await
            .expect("GET");
        assert_json_error(resp, 401).await;
    }
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn case_047_missing_or_oversized_chunks() {
    if redis_store() {
        return; // the Redis store's cookie is a small sealed id: nothing is chunked
    }
    // A missing middle chunk means no session.
    let app = spawn_app().await;
    login_big(&app).await;
    let chunks: Vec<(String, String)> = app
        .cookies()
        .into_iter()
        .filter(|(n, _)| is_session_cookie_name(n))
        .collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    let header = chunks
        .iter()
        .filter(|(n, _)| !n.ends_with(".1"))
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let resp = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", header)
        .send()
        .await
        .expect("GET");
    assert_json_error(resp, 401).await;

    // A sealed value that is an exact multiple of the chunk size round-trips. The sealed length is
    // measured once, then the session is grown by exactly the bytes needed (via the stored scope).
    let app = spawn_app().await;
    let blob = random_blob(3000);
    app.idp.behave(|b| {
        b.claim("profile_blob", json!(blob));
    });
    let first = app.login().await;
    let sealed_len: usize = first
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .map(|c| c.value.len())
        .sum();
    let chunk = first
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .map(|c| c.value.len())
        .max()
        .expect("chunks");
    let k = sealed_len.div_ceil(chunk);
    assert!(k >= 2, "expected a chunked session ({sealed_len} chars)");
    let bytes = sealed_len * 3 / 4;
    let target = k * chunk * 3 / 4;
    let pad = target - bytes;
    if pad > 0 {
        app.idp.behave(|b| {
            b.code_grant_patch.insert(
                "scope".into(),
                json!(format!(
                    "openid profile offline_access {}",
                    "x".repeat(pad - 1)
                )),
            );
        });
    }
    let second = app.login().await;
    let parts: Vec<&SetCookie> = second
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .collect();
    assert_eq!(
        parts.len(),
        k,
        "{:?}",
        parts.iter().map(|c| &c.name).collect::<Vec<_>>()
    );
    assert!(
        parts.iter().all(|c| c.value.len() == chunk),
        "not an exact multiple: {:?}",
        parts.iter().map(|c| c.value.len()).collect::<Vec<_>>()
    );
    for c in &parts {
        assert!(c.raw.len() <= 4096, "{} is {} bytes", c.name, c.raw.len());
    }
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "exact multiple did not round-trip"
    );

    // Bigger than all allowed chunks: fails loudly at write time, no partial cookies, no redirect.
    let app = spawn_app().await;
    let blob = random_blob(40_000);
    app.idp.behave(|b| {
        b.claim("profile_blob", json!(blob));
    });
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert!(
        resp.headers().get("location").is_none(),
        "a login loop starts"
    );
    assert!(
        session_cookies_set(&resp).is_empty(),
        "partial session cookies were written"
    );
    let v = assert_json_error_in(resp, 400..=599).await;
    assert_no_secret_in(&app, &v.to_string());
    assert_eq!(app.get_userinfo().await.status(), 401);
}

#[tokio::test]
async fn case_048_crafted_cookie_header() {
    let app = spawn_app().await;
    let many: String = (0..300)
        .map(|i| format!("c{i}=v{i}"))
        .collect::<Vec<_>>()
        .join("; ");
    let headers = [
        ";;;".to_owned(),
        "=".to_owned(),
        "a".to_owned(),
        "   =   ".to_owned(),
        " \t ; tg_session= ; =x".to_owned(),
        "tg_tx_=x; tg_tx_AAAA=".to_owned(),
        many,
    ];
    let endpoints = [
        ("GET", "/userinfo"),
        ("GET", "/api/x"),
        ("POST", "/refreshtoken"),
        ("POST", "/logout"),
        (
            "GET",
            "/oauth-callback?state=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA&code=x",
        ),
        ("GET", "/login"),
    ];
    for h in &headers {
        for (method, path) in endpoints {
            let rb = match method {
                "POST" => app.raw_client.post(app.url(path)),
                _ => app.raw_client.get(app.url(path)),
            };
            let resp = rb
                .header("X-CSRF", "1")
                .header("Cookie", h)
                .send()
                .await
                .expect("send");
            let s = resp.status().as_u16();
            assert!(s < 500, "Cookie {h:.40?} on {path}: status {s}");
            if s >= 400 {
                assert_json_error(resp, s).await;
            }
        }
    }
    // Non-ASCII bytes, and a 70 KB Cookie header.
    for cookie in [
        b"tg_session=\xff\xfe; \xc3\x28=1".to_vec(),
        format!("big={}", "a".repeat(70_000)).into_bytes(),
    ] {
        let mut req =
            format!("GET /userinfo HTTP/1.1\r\nHost: {}\r\nCookie: ", app.addr).into_bytes();
        req.extend_from_slice(&cookie);
        req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let (status, raw) = raw_bytes(app.addr, &req).await;
        assert!((400..=499).contains(&status), "status {status}: {raw:.200}");
        if cookie.len() > 65_536 {
            assert_eq!(status, 431, "oversized Cookie header");
        }
    }
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn case_049_logout_really_ends_access() {
    let app = spawn_app().await;
    app.login().await;
    let old = app.session_cookie_header();
    let rt = app.idp.last_refresh_token().expect("rt");
    let at = app.idp.last_access_token().expect("at");
    let resp = app.post_logout().await;
    assert_eq!(resp.status(), 200);
    let revoked = app.idp.revoked_tokens();
    assert!(revoked.contains(&rt), "refresh token not revoked");
    assert!(revoked.contains(&at), "access token not revoked");
    // The old cookie, replayed.
    let send = |method: &str, path: &str| {
        let rb = match method {
            "POST" => app.raw_client.post(app.url(path)),
            _ => app.raw_client.get(app.url(path)),
        };
        rb.header("X-CSRF", "1")
            .header("Cookie", old.clone())
            .send()
    };
    let refresh = send("POST", "/refreshtoken").await.expect("refresh");
    assert_eq!(refresh.status(), 401, "the replayed cookie could refresh");
    let api = send("GET", "/api/after-logout").await.expect("api");
    if redis_store() {
        assert_eq!(api.status(), 401, "the deleted Redis session still works");
        assert!(app.api.requests().is_empty());
    } else {
        // A stateless cookie cannot be recalled; what it carries must be dead at the AS.
        for r in app.api.requests() {
            let bearer = r
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_owned();
            assert!(
                app.idp.revoked_tokens().contains(&bearer),
                "a live token reached the API after logout"
            );
        }
    }
    let me = send("GET", "/userinfo").await.expect("userinfo");
    if redis_store() {
        assert_eq!(me.status(), 401);
    }
}

#[tokio::test]
async fn case_050_logout_csrf() {
    let app = spawn_app().await;
    app.login().await;
    let cross_site = [
        ("GET /logout", app.client.get(app.url("/logout"))),
        (
            "POST without the header",
            app.client.post(app.url("/logout")),
        ),
        (
            "cross-site form POST",
            app.client
                .post(app.url("/logout"))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .header("Origin", "http://evil.example")
                .body("sid=anything"),
        ),
        (
            "header, foreign Origin",
            app.client
                .post(app.url("/logout"))
                .header("X-CSRF", "1")
                .header("Origin", "http://evil.example"),
        ),
        (
            "header, Sec-Fetch-Site cross-site",
            app.client
                .post(app.url("/logout"))
                .header("X-CSRF", "1")
                .header("Sec-Fetch-Site", "cross-site"),
        ),
    ];
    for (what, rb) in cross_site {
        let resp = rb.send().await.expect("send");
        let s = resp.status().as_u16();
        assert!((400..=499).contains(&s), "{what}: status {s}");
        assert!(
            !set_cookies(&resp)
                .iter()
                .any(|c| is_session_cookie_name(&c.name)),
            "{what} touched the session cookie"
        );
        assert_json_error(resp, s).await;
        assert_eq!(
            app.get_userinfo().await.status(),
            200,
            "{what} ended the session"
        );
    }
    assert!(
        app.idp.revocations().is_empty(),
        "tokens revoked by a forged logout"
    );
    // The genuine logout still works.
    let resp = app.post_logout().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.get_userinfo().await.status(), 401);
}
