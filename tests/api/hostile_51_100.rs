//! Hostile inputs and faults, cases 51–100 of /work/shared/hostile-cases.md (sessions, CSRF and
//! redirects, proxy paths and headers, refresh and concurrency, faults and load). One test per
//! applicable case, named `case_NNN_...`; docs/security-cases-51-100.md maps every number.
//! Convention asserted where a rejection is expected: no session cookie, no token used, a 4xx
//! JSON answer (never a 5xx for a client fault), nothing secret echoed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use reqwest::cookie::Jar;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use url::Url;

use crate::helpers::*;
use crate::oidc_provider::{futures_join_all, Stack, StackOptions};
use crate::redis_server::RedisServer;

// ---------------------------------------------------------------------------------------------
// Shared helpers of this module
// ---------------------------------------------------------------------------------------------

/// Asserts that `location` (a redirect target tokengate answered with) keeps the browser on the
/// app's own origin, the way a browser would resolve it.
fn assert_stays_on_origin(public_url: &str, location: &str, input: &str) {
    assert!(
        !location.chars().any(|c| c.is_control()) && !location.contains('\\'),
        "return_to {input:?}: Location {location:?} carries control characters or a backslash"
    );
    let base = Url::parse(public_url).expect("public url");
    let resolved = base
        .join(location)
        .unwrap_or_else(|e| panic!("return_to {input:?}: Location {location:?} unparsable: {e}"));
    assert_eq!(
        resolved.origin(),
        base.origin(),
        "return_to {input:?} redirected off our origin: Location {location:?}"
    );
}

/// Full login with `return_to` (any string) in a fresh browser; returns the callback's Location.
async fn landing_after_login(app: &TestApp, return_to: &str) -> String {
    let jar = Arc::new(Jar::default());
    let browser = new_browser(&jar);
    let p = app.start_login_with(&browser, Some(return_to)).await;
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
        "return_to {return_to:?}: callback answered {status}"
    );
    location(&resp)
}

/// Every return_to in `inputs` lands on our origin after a real login.
async fn assert_all_land_on_origin(app: &TestApp, inputs: &[String]) {
    for rt in inputs {
        let loc = landing_after_login(app, rt).await;
        assert_stays_on_origin(&app.public_url, &loc, rt);
    }
}

/// The open-redirect corpora (file name, line), or `None` when the shared folder is absent.
fn corpus_lines() -> Option<Vec<(String, String)>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpora");
    if !dir.is_dir() {
        return None;
    }
    let mut out = Vec::new();
    for name in [
        "open-redirects-oauth2-proxy.txt",
        "open-redirects-mod_auth_openidc.txt",
    ] {
        let text = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("corpus {name} is in {}: {e}", dir.display()));
        let text = String::from_utf8_lossy(&text).into_owned();
        for line in text.lines() {
            out.push((name.to_string(), line.to_string()));
        }
    }
    assert!(out.len() > 1000, "both corpora read ({} lines)", out.len());
    Some(out)
}

/// `s` percent-decoded once (invalid UTF-8 as U+FFFD, the way the query parser reads it).
fn decoded_once(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A second browser (own cookie jar) logged in to `app` as `sub`.
async fn second_browser_login(app: &TestApp, sub: &str) -> (Arc<Jar>, reqwest::Client) {
    let jar = Arc::new(Jar::default());
    let browser = new_browser(&jar);
    let p = app.start_login_with(&browser, None).await;
    let mut grant = p.grant();
    grant.sub = sub.to_string();
    let code = app.idp.mint_code(grant);
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
    assert_eq!(resp.status(), 302, "second browser logs in");
    (jar, browser)
}

async fn userinfo_status(app: &TestApp, browser: &reqwest::Client) -> u16 {
    browser
        .get(app.url("/userinfo"))
        .send()
        .await
        .expect("GET /userinfo")
        .status()
        .as_u16()
}

/// Writes `bytes` on a fresh connection; reads until the server closes or `within` passes.
/// Returns (what arrived, whether the server closed the connection).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    read_until_close(&mut s, within).await
}

fn status_of(raw: &str) -> Option<u16> {
    raw.split_whitespace().nth(1).and_then(|s| s.parse().ok())
}

fn cache_control(resp: &reqwest::Response) -> String {
    resp.headers()
        .get_all("cache-control")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

fn no_cors_grant(resp: &reqwest::Response, what: &str) {
    for (k, v) in resp.headers() {
        assert!(
            !k.as_str().starts_with("access-control-allow-"),
            "{what}: CORS header {k}: {v:?} granted"
        );
    }
}

/// Logs in with an access token that has already expired (1 s lifetime, waited out), then makes
/// new tokens long-lived. Returns the expired access token. Works whatever refresh window applies.
async fn login_with_expired_token(app: &TestApp) -> String {
    app.idp.behave(|b| b.access_token_ttl = 1);
    app.login().await;
    let stale = app.idp.last_access_token().expect("at");
    app.idp.behave(|b| b.access_token_ttl = 3600);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stale
}

/// A minimal async Redis client for inspecting the store from a test.
async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test redis")
}

async fn redis_keys(url: &str, pattern: &str) -> Vec<String> {
    let mut c = redis_conn(url).await;
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut c)
        .await
        .expect("KEYS")
}

/// The session ids stored in Redis (`tg:{sid}:s`).
async fn stored_session_ids(url: &str) -> Vec<String> {
    redis_keys(url, "tg:{*}:s")
        .await
        .into_iter()
        .filter_map(|k| {
            k.strip_prefix("tg:{")
                .and_then(|r| r.strip_suffix("}:s"))
                .map(str::to_string)
        })
        .collect()
}

fn redis_session_lines(redis: &RedisServer) -> String {
    format!("store = \"redis\"\nredis_url = \"{}\"", redis.url())
}

// ---------------------------------------------------------------------------------------------
// A token endpoint shim: authorization_code grants go to the fake IdP, refresh_token grants get
// whatever answer the test sets (to play IdPs that omit or change things on refresh).
// ---------------------------------------------------------------------------------------------

struct ShimInner {
    addr: SocketAddr,
    idp_token_url: String,
    refresh_answer: Mutex<Option<Value>>,
    refresh_requests: Mutex<Vec<Vec<(String, String)>>>,
    http: reqwest::Client,
}

#[derive(Clone)]
struct TokenShim(Arc<ShimInner>);

impl TokenShim {
    async fn start(idp: &FakeIdp) -> TokenShim {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind shim");
        let addr = listener.local_addr().expect("addr");
        let inner = Arc::new(ShimInner {
            addr,
            idp_token_url: format!("{}/token", idp.issuer()),
            refresh_answer: Mutex::new(None),
            refresh_requests: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
        });
        let router = Router::new()
            .route("/token", post(shim_token))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        TokenShim(inner)
    }

    fn url(&self) -> String {
        format!("http://{}/token", self.0.addr)
    }

    fn answer_refresh_with(&self, v: Value) {
        *self.0.refresh_answer.lock().expect("lock") = Some(v);
    }

    fn refresh_requests(&self) -> Vec<Vec<(String, String)>> {
        self.0.refresh_requests.lock().expect("lock").clone()
    }
}

async fn shim_token(
    State(shim): State<Arc<ShimInner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let is_refresh = params
        .iter()
        .any(|(k, v)| k == "grant_type" && v == "refresh_token");
    let canned = shim.refresh_answer.lock().expect("lock").clone();
    if is_refresh {
        if let Some(answer) = canned {
            shim.refresh_requests.lock().expect("lock").push(params);
            return Json(answer).into_response();
        }
    }
    let mut req = shim
        .http
        .post(&shim.idp_token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_vec());
    if let Some(a) = headers.get("authorization") {
        req = req.header("authorization", a.as_bytes());
    }
    match req.send().await {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = r.bytes().await.unwrap_or_default();
            (status, [("content-type", "application/json")], bytes).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// C. Cookies and sessions (51–55)
// ---------------------------------------------------------------------------------------------

const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

fn logout_claims(idp: &FakeIdp, sid: Option<&str>, sub: Option<&str>) -> Value {
    let mut c = json!({
        "iss": idp.issuer(),
        "aud": CLIENT_ID,
        "iat": unix_now(),
        "jti": format!("jti-{}", rand_suffix()),
        "events": { BACKCHANNEL_EVENT: {} },
    });
    if let Some(s) = sid {
        c["sid"] = json!(s);
    }
    if let Some(s) = sub {
        c["sub"] = json!(s);
    }
    c
}

fn rand_suffix() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

async fn post_logout_token(app: &TestApp, token: &str) -> reqwest::Response {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("logout_token", token)
        .finish();
    app.raw_client
        .post(app.url("/backchannel-logout"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("POST /backchannel-logout")
}

#[tokio::test]
async fn case_051_backchannel_logout_token_validation() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim("sid", json!("idp-session-a"));
    });
    app.login().await;
    let good = Behaviour::default();
    if !redis_store() {
        // Cookie sessions cannot be ended from the server: the endpoint says so and ends nothing.
        let token = sign_jwt(
            &good,
            &logout_claims(&app.idp, Some("idp-session-a"), Some(DEFAULT_SUB)),
        );
        let resp = post_logout_token(&app, &token).await;
        let v = assert_json_error(resp, 501).await;
        assert!(
            !v.to_string().contains(&token),
            "the logout token was echoed"
        );
        assert_eq!(app.get_userinfo().await.status(), 200);
        eprintln!("case 051: full matrix runs with TEST_SESSION_STORE=redis");
        return;
    }
    let base = || logout_claims(&app.idp, Some("idp-session-a"), Some(DEFAULT_SUB));
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = base();
        f(&mut c);
        c
    };
    let alg_none = Behaviour {
        signer: Signer::AlgNone,
        ..Behaviour::default()
    };
    let hs_rsa = Behaviour {
        signer: Signer::Hs256WithRsaPublicKey,
        ..Behaviour::default()
    };
    let unpublished = Behaviour {
        signer: Signer::Rsa2,
        kid: Some(Some("k1".into())),
        ..Behaviour::default()
    };
    let bad: Vec<(&str, String)> = vec![
        ("alg none", sign_jwt(&alg_none, &base())),
        (
            "HS256 keyed with the RSA public key",
            sign_jwt(&hs_rsa, &base()),
        ),
        (
            "signature by an unpublished key",
            sign_jwt(&unpublished, &base()),
        ),
        (
            "wrong aud",
            sign_jwt(&good, &with(&|c| c["aud"] = json!("other-client"))),
        ),
        (
            "wrong iss",
            sign_jwt(&good, &with(&|c| c["iss"] = json!("http://evil.example"))),
        ),
        (
            "no events",
            sign_jwt(
                &good,
                &with(&|c| {
                    c.as_object_mut().expect("obj").remove("events");
                }),
            ),
        ),
        (
            "wrong event",
            sign_jwt(
                &good,
                &with(&|c| {
                    c["events"] = json!({"http://schemas.openid.net/event/other": {}});
                }),
            ),
        ),
        (
            "nonce",
            sign_jwt(&good, &with(&|c| c["nonce"] = json!("n-1"))),
        ),
        (
            "no iat",
            sign_jwt(
                &good,
                &with(&|c| {
                    c.as_object_mut().expect("obj").remove("iat");
                }),
            ),
        ),
        (
            "no jti",
            sign_jwt(
                &good,
                &with(&|c| {
                    c.as_object_mut().expect("obj").remove("jti");
                }),
            ),
        ),
        (
            "neither sid nor sub",
            sign_jwt(
                &good,
                &with(&|c| {
                    let o = c.as_object_mut().expect("obj");
                    o.remove("sid");
                    o.remove("sub");
                }),
            ),
        ),
        ("garbage", "not.a.jwt".to_string()),
    ];
    for (what, token) in &bad {
        let resp = post_logout_token(&app, token).await;
        let v = assert_json_error(resp, 400).await;
        assert!(
            !v.to_string().contains(token.as_str()),
            "{what}: token echoed"
        );
        assert_eq!(
            app.get_userinfo().await.status(),
            200,
            "a logout token with {what} ended the session"
        );
    }
    // A valid token for someone else's IdP session, then its replay.
    let other = sign_jwt(&good, &logout_claims(&app.idp, Some("idp-session-x"), None));
    assert_eq!(post_logout_token(&app, &other).await.status(), 200);
    assert_json_error(post_logout_token(&app, &other).await, 400).await;
    // Two more sessions of user-2 (other IdP sessions) and the first one's sid-only token.
    app.idp.behave(|b| {
        b.claim("sid", json!("idp-session-b"));
    });
    let (_j2, b2) = second_browser_login(&app, "user-2").await;
    app.idp.behave(|b| {
        b.claim("sid", json!("idp-session-c"));
    });
    let (_j3, b3) = second_browser_login(&app, "user-2").await;
    let by_sid = sign_jwt(&good, &logout_claims(&app.idp, Some("idp-session-a"), None));
    assert_eq!(post_logout_token(&app, &by_sid).await.status(), 200);
    assert_eq!(
        app.get_userinfo().await.status(),
        401,
        "the named sid ended"
    );
    assert_eq!(
        userinfo_status(&app, &b2).await,
        200,
        "another sid survived"
    );
    assert_eq!(
        userinfo_status(&app, &b3).await,
        200,
        "another sid survived"
    );
    // sub only: every session of that user ends.
    let by_sub = sign_jwt(&good, &logout_claims(&app.idp, None, Some("user-2")));
    assert_eq!(post_logout_token(&app, &by_sub).await.status(), 200);
    assert_eq!(userinfo_status(&app, &b2).await, 401);
    assert_eq!(userinfo_status(&app, &b3).await, 401);
}

#[tokio::test]
async fn case_051_mismatched_sub_does_not_disarm_a_later_logout() {
    if !redis_store() {
        eprintln!("case 051: runs with TEST_SESSION_STORE=redis");
        return;
    }
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim("sid", json!("idp-session-a"));
    });
    app.login().await;
    let good = Behaviour::default();
    let mismatch = sign_jwt(
        &good,
        &logout_claims(&app.idp, Some("idp-session-a"), Some("someone-else")),
    );
    assert!(post_logout_token(&app, &mismatch)
        .await
        .status()
        .is_success());
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "sub mismatch ended the session"
    );
    let by_sid = sign_jwt(&good, &logout_claims(&app.idp, Some("idp-session-a"), None));
    assert_eq!(post_logout_token(&app, &by_sid).await.status(), 200);
    assert_eq!(
        app.get_userinfo().await.status(),
        401,
        "the IdP's logout for this sid no longer reaches the session"
    );
}

#[tokio::test]
async fn case_052_unauthenticated_logout_triggers_end_nothing() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.claim("sid", json!("idp-session-a"));
    });
    app.login().await;
    let iss = app.idp.issuer().to_owned();
    let attempts: Vec<(&str, String)> = vec![
        ("GET", "/logout?sid=idp-session-a".into()),
        (
            "GET",
            format!("/frontchannel-logout?sid=idp-session-a&iss={iss}"),
        ),
        ("GET", "/logout/frontchannel?sid=idp-session-a".into()),
        ("GET", "/backchannel-logout?sid=idp-session-a".into()),
        ("POST", "/logout?sid=idp-session-a".into()),
        ("POST", "/frontchannel-logout?sid=idp-session-a".into()),
    ];
    for (method, path) in &attempts {
        let req = match *method {
            "POST" => app.client.post(app.url(path)),
            _ => app.client.get(app.url(path)),
        };
        let resp = req.send().await.expect("send");
        assert!(
            !resp.status().is_server_error(),
            "{method} {path}: {}",
            resp.status()
        );
        assert!(
            set_cookies(&resp)
                .iter()
                .all(|c| !is_session_cookie_name(&c.name)),
            "{method} {path} touched the session cookie"
        );
    }
    assert!(
        app.idp.revocations().is_empty(),
        "tokens revoked by an unauthenticated trigger"
    );
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn case_053_session_lifetime_enforced_server_side() {
    // Idle: a cookie replayed after the idle timeout is refused by the server itself.
    let idle = spawn_app_with(
        AppOptions::default()
            .session("idle_timeout_s = 1")
            .session("absolute_timeout_s = 3600"),
    )
    .await;
    let set = idle.login().await;
    let cookie = session_cookie_header_of(&set);
    assert!(!cookie.is_empty(), "the callback set no session cookie");
    for c in set
        .iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
    {
        let max_age = c.max_age().expect("session cookie has a Max-Age");
        assert!(
            max_age <= 3600,
            "cookie outlives the absolute timeout: {}",
            c.raw
        );
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let resp = idle
        .raw_client
        .get(idle.url("/userinfo"))
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("GET");
    assert_clears_session_cookie(&resp);
    assert_json_error(resp, 401).await;

    // Absolute: even a session in use ends at its absolute deadline.
    let abs = spawn_app_with(
        AppOptions::default()
            .session("idle_timeout_s = 3600")
            .session("absolute_timeout_s = 2"),
    )
    .await;
    let cookie = session_cookie_header_of(&abs.login().await);
    assert!(!cookie.is_empty(), "the callback set no session cookie");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let resp = abs
        .raw_client
        .get(abs.url("/api/x"))
        .header("X-CSRF", "1")
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("GET");
    assert_json_error(resp, 401).await;
    assert!(
        abs.api.requests().is_empty(),
        "an expired session reached the API"
    );
}

#[tokio::test]
async fn case_054_auth_responses_are_not_cacheable() {
    let app = spawn_app().await;
    let anon_userinfo = app.get_userinfo().await;
    let anon_api = app.get_api("/api/x").await;
    let login = app
        .client
        .get(app.url("/login"))
        .send()
        .await
        .expect("login");
    let p = app.start_login(None).await;
    let callback = app.finish_login(&p).await;
    let userinfo = app.get_userinfo().await;
    let refresh = app.post_refresh().await;
    let api = app.get_api("/api/x").await;
    let api_401 = app.get_api("/api/status/401").await;
    let api_down = app.get_api("/downapi/x").await;
    let logout = app.post_logout().await;
    for (what, resp) in [
        ("anonymous /userinfo", &anon_userinfo),
        ("anonymous /api", &anon_api),
        ("/login", &login),
        ("callback", &callback),
        ("userinfo", &userinfo),
        ("refreshtoken", &refresh),
        ("api", &api),
        ("api 401", &api_401),
        ("api 502", &api_down),
        ("logout", &logout),
    ] {
        let cc = cache_control(resp);
        // no-store forbids any cache from storing the answer (RFC 9111 §5.2.2.5), which makes a
        // `Vary: Cookie` redundant.
        assert!(cc.contains("no-store"), "{what}: Cache-Control {cc:?}");
    }
}

#[tokio::test]
async fn case_055_redis_session_store_hygiene() {
    if !redis_store() {
        eprintln!("case 055: runs with TEST_SESSION_STORE=redis (the cookie store has no ids)");
        return;
    }
    let app = spawn_app().await;
    app.login().await;
    let (_j2, b2) = second_browser_login(&app, "user-2").await;
    let url = app.redis_url.clone().expect("redis url");
    let sids = stored_session_ids(&url).await;
    assert_eq!(sids.len(), 2, "two sessions stored: {sids:?}");
    assert_ne!(sids[0], sids[1]);
    for sid in &sids {
        assert!(
            sid.len() >= 22
                && sid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "session id is not ≥128 bits of base64url: {sid:?}"
        );
        // The browser's cookie is sealed: it does not carry the id in clear.
        assert!(
            !app.cookie_header().contains(sid.as_str()),
            "cookie exposes the session id"
        );
    }
    // Values are sealed at rest: no token, no subject in clear.
    let mut c = redis_conn(&url).await;
    let mut secrets = app.idp.all_issued_secrets();
    secrets.push(DEFAULT_SUB.to_string());
    for key in redis_keys(&url, "tg:{*}:s").await {
        let data: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("d")
            .query_async(&mut c)
            .await
            .expect("HGET");
        let data = data.expect("sealed data");
        for s in &secrets {
            assert!(!data.contains(s.as_str()), "{key} holds {s} in clear");
        }
    }
    // Crafted cookies cannot reach Redis as commands or crash anything.
    let keys_before = redis_keys(&url, "*").await.len();
    let crafted = [
        "tg_session=*".to_string(),
        "tg_session=%s%s%s%n%x".to_string(),
        "tg_session=*1\\r\\n$8\\r\\nFLUSHALL\\r\\n".to_string(),
        "tg_session=tg:{x}:s".to_string(),
        format!("tg_session={}", "A".repeat(5000)),
    ];
    for h in &crafted {
        let resp = app
            .raw_client
            .get(app.url("/userinfo"))
            .header("Cookie", h)
            .send()
            .await
            .expect("GET");
        assert_json_error(resp, 401).await;
    }
    assert_eq!(
        redis_keys(&url, "*").await.len(),
        keys_before,
        "crafted cookies changed Redis"
    );
    assert_eq!(app.get_userinfo().await.status(), 200);
    assert_eq!(userinfo_status(&app, &b2).await, 200);
}

// ---------------------------------------------------------------------------------------------
// D. CSRF and redirects (56–69)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn case_056_return_to_backslash_tricks() {
    let app = spawn_app().await;
    let explicit: Vec<String> = [
        "//evil.com",
        "///evil.com",
        "/\\evil.com",
        "\\/evil.com",
        "/%2f%2fevil.com",
        "/%5cevil.com",
        "/./\\evil.com",
        "/./../../\\evil.com",
        "/.//evil.com",
        "/../\\evil.com",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_all_land_on_origin(&app, &explicit).await;

    let Some(lines) = corpus_lines() else {
        eprintln!(
            "case 056: SKIPPING the corpora: {}/../shared/corpora is absent",
            env!("CARGO_MANIFEST_DIR")
        );
        return;
    };
    // 1. The validator itself, on every line raw and decoded once, against two origins.
    for public in ["https://www.whitelisteddomain.tld", "http://127.0.0.1:8080"] {
        let base = Url::parse(public).expect("url");
        for (file, line) in &lines {
            for candidate in [line.clone(), decoded_once(line)] {
                let out = tokengate::auth::return_to::sanitize(Some(&candidate), &base);
                assert_stays_on_origin(public, &out, &format!("{file}: {candidate}"));
            }
        }
    }
    // 2. Black box: every line, raw and decoded once, through /login and the callback (several
    //    browsers at once; the flows are independent).
    let mut inputs: Vec<String> = Vec::new();
    for (_, line) in &lines {
        inputs.push(line.clone());
        let d = decoded_once(line);
        if d != *line {
            inputs.push(d);
        }
    }
    let app = Arc::new(app);
    let chunks: Vec<Vec<String>> = inputs
        .chunks(inputs.len() / 4 + 1)
        .map(<[String]>::to_vec)
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in chunks {
        let app = Arc::clone(&app);
        tasks.spawn(async move { assert_all_land_on_origin(&app, &chunk).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("corpus task");
    }
}

#[tokio::test]
async fn case_057_return_to_whitespace_controls_schemes_lookalikes() {
    let app = spawn_app().await;
    let inputs: Vec<String> = [
        "/%09/evil.com",
        "/\t/evil.com",
        "/ /evil.com",
        "/\u{b}\\evil.com",
        "/\r/evil.com",
        "/\n/evil.com",
        "/\t\t/\t/evil.com",
        "/%0b/evil.com",
        "/%0d/evil.com",
        "/%0a/evil.com",
        "javascript:alert(1)",
        "%01javascript:alert(1)",
        "\u{1}javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "vbscript:msgbox(1)",
        "file:///etc/passwd",
        "/\u{3031}evil.com",
        "/\u{3035}evil.com",
        "/\u{309d}evil.com",
        "/\u{30fc}evil.com",
        "/\u{ff70}evil.com",
        "/%E3%80%B1evil.com",
        "/<script>alert(1)</script>",
        "/%68ttp://evil.com",
        "/http://evil.com",
        "/javascript:alert(1)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_all_land_on_origin(&app, &inputs).await;
}

#[tokio::test]
async fn case_058_return_to_host_confusion() {
    let app = spawn_app().await;
    let public = Url::parse(&app.public_url).expect("url");
    let host = public.host_str().expect("host").to_string();
    let port = public.port().expect("port");
    let inputs: Vec<String> = vec![
        format!("{}@evil.com", app.public_url),
        format!("http://{host}:{port}@evil.com/"),
        format!("http://{host}:{port}@evil.com@{host}:{port}/"),
        format!("http://{host}.evil.com:{port}/"),
        format!("http://evil{host}:{port}/"),
        format!("http://{host}:{}/", port.wrapping_add(1)),
        format!("https://{host}:{port}/"),
        format!("{}/", app.public_url.replace("http://", "https://")),
        "https:evil.com".into(),
        "http:evil.com".into(),
        "http:/\\evil.com".into(),
        "http:\\\\evil.com".into(),
        format!("http://[::1]:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        "http://\u{24d4}vil.com/".into(),
        "http://ex\u{0430}mple.com/".into(),
        "http://xn--exmple-4nf.com/".into(),
        format!("//{host}:{port}@evil.com"),
    ];
    assert_all_land_on_origin(&app, &inputs).await;
}

#[tokio::test]
async fn case_059_request_url_never_becomes_an_off_site_redirect() {
    // tokengate never starts a login from a catch-all route (the SPA calls /login itself), so a
    // hostile request path can only be answered, never turned into a redirect target.
    let app = spawn_app().await;
    for path in [
        "//google.com",
        "///google.com",
        "//google.com/%2e%2e",
        "/\\google.com",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/html\r\nConnection: close\r\n\r\n",
            app.addr
        );
        let (status, raw) = raw_http(app.addr, &req).await;
        assert!(status < 500, "{path}: {status}");
        if (300..400).contains(&status) {
            let loc = raw
                .lines()
                .find_map(|l| {
                    l.strip_prefix("location: ")
                        .or_else(|| l.strip_prefix("Location: "))
                })
                .unwrap_or("");
            assert_stays_on_origin(&app.public_url, loc.trim(), path);
        }
    }
    let inputs: Vec<String> = ["//google.com", "///google.com"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_all_land_on_origin(&app, &inputs).await;
}

#[tokio::test]
async fn case_060_stored_return_to_is_integrity_protected_and_revalidated() {
    let app = spawn_app().await;
    let tx_cookie = |p: &PendingLogin| {
        p.set_cookies
            .iter()
            .find(|c| is_tx_cookie_name(&c.name) && !c.is_removal())
            .cloned()
            .expect("a transaction cookie")
    };
    // Tampered transaction cookie: refused before the code is redeemed.
    let p = app.start_login(Some("/a")).await;
    let c = tx_cookie(&p);
    let mut bytes: Vec<char> = c.value.chars().collect();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == 'A' { 'B' } else { 'A' };
    let tampered: String = bytes.into_iter().collect();
    app.add_browser_cookie(&format!("{}={tampered}; Path=/", c.name));
    let resp = app.finish_login(&p).await;
    assert_no_session_cookie_set(&resp);
    assert_json_error(resp, 400).await;
    assert_eq!(
        app.idp.code_grants(),
        0,
        "a code was redeemed with a tampered transaction"
    );

    // Swapped: the transaction of login A under the name of login B (another browser).
    let jar_a = Arc::new(Jar::default());
    let a = new_browser(&jar_a);
    let pa = app
        .start_login_with(&a, Some("https://evil.example/"))
        .await;
    let jar_b = Arc::new(Jar::default());
    let b = new_browser(&jar_b);
    let pb = app.start_login_with(&b, Some("/b")).await;
    let ca = tx_cookie(&pa);
    let cb = tx_cookie(&pb);
    let base = Url::parse(&app.base_url).expect("url");
    jar_b.add_cookie_str(&format!("{}={}; Path=/", cb.name, ca.value), &base);
    let code = app.idp.mint_code(pb.grant());
    let resp = app
        .callback_with(
            &b,
            &[
                ("code", &code),
                ("state", &pb.state),
                ("iss", app.idp.issuer()),
            ],
        )
        .await;
    assert_no_session_cookie_set(&resp);
    assert_json_error(resp, 400).await;
    assert_eq!(app.idp.code_grants(), 0);

    // And the value stored at /login is re-checked at the callback: a hostile one lands on `/`.
    let loc = landing_after_login(&app, "https://evil.example/").await;
    assert_stays_on_origin(&app.public_url, &loc, "https://evil.example/");
}

#[tokio::test]
async fn case_061_logout_redirect_cannot_be_chosen_by_the_request() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app
        .client
        .post(app.url(
            "/logout?returnUrl=https://evil.example/&post_logout_redirect_uri=https://evil.example/&return_to=//evil.example",
        ))
        .header("X-CSRF", "1")
        .form(&[("post_logout_redirect_uri", "https://evil.example/")])
        .send()
        .await
        .expect("POST /logout");
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    let logout_url = v["logout_url"].as_str().expect("logout_url").to_string();
    assert!(!logout_url.contains("evil"), "logout_url {logout_url}");
    let u = Url::parse(&logout_url).expect("absolute end-session URL");
    let plr: Vec<String> = u
        .query_pairs()
        .filter(|(k, _)| k == "post_logout_redirect_uri")
        .map(|(_, v)| v.into_owned())
        .collect();
    assert_eq!(
        plr,
        vec![format!("{}/", app.public_url)],
        "only the configured post-logout URI"
    );
    // Without a session the answer is `/` whatever the request says.
    let resp = app
        .client
        .post(app.url("/logout?returnUrl=https://evil.example/"))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("POST /logout");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["logout_url"], "/");
}

#[tokio::test]
async fn case_062_crlf_never_splits_a_redirect() {
    let app = spawn_app().await;
    for rt in [
        "/x%0d%0aSet-Cookie:%20a=b",
        "/x%0dSet-Cookie:%20a=b",
        "/x%0aSet-Cookie:%20a=b",
        "/x\r\nSet-Cookie: a=b",
        "/x\rSet-Cookie: a=b",
        "/x\nSet-Cookie: a=b",
        "/x%00Set-Cookie:a=b",
    ] {
        let jar = Arc::new(Jar::default());
        let browser = new_browser(&jar);
        let p = app.start_login_with(&browser, Some(rt)).await;
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
        let loc = location(&resp);
        assert_stays_on_origin(&app.public_url, &loc, rt);
        assert!(
            set_cookies(&resp).iter().all(|c| c.name != "a"),
            "{rt:?} injected a Set-Cookie"
        );
    }
    // The IdP's error redirect carries attacker-chosen text: it is encoded, never split.
    let p = app.start_login(None).await;
    let resp = app
        .callback(&[
            ("error", "access_denied\r\nSet-Cookie: a=b"),
            (
                "error_description",
                "x\r\nLocation: https://evil.example/\n\0",
            ),
            ("state", &p.state),
        ])
        .await;
    assert!(resp.status().is_redirection() || resp.status().is_client_error());
    if resp.status().is_redirection() {
        let loc = location(&resp);
        assert_stays_on_origin(&app.public_url, &loc, "IdP error redirect");
    }
    assert!(set_cookies(&resp).iter().all(|c| c.name != "a"));
    assert!(resp.headers().get_all("location").iter().count() <= 1);
}

/// Every method a browser (or a script) could use.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
/// Every configured route prefix of the test deployment.
const ROUTES: [&str; 4] = ["/api/x", "/stripped/x", "/slowapi/x", "/downapi/x"];

#[tokio::test]
async fn case_063_csrf_header_required_on_every_api_route_and_method() {
    let app = spawn_app().await;
    app.login().await;
    for path in ROUTES {
        for m in METHODS {
            let method = reqwest::Method::from_bytes(m.as_bytes()).expect("method");
            let resp = app
                .client
                .request(method, app.url(path))
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 403, "{m} {path} without the CSRF header");
            assert!(
                set_cookies(&resp)
                    .iter()
                    .all(|c| !is_session_cookie_name(&c.name)),
                "{m} {path} touched the session"
            );
        }
    }
    assert!(
        app.api.requests().is_empty(),
        "a request without the header reached the API"
    );
    assert_eq!(app.idp.refresh_grants(), 0);
    // /userinfo is a read (interface.md: no CSRF header); it grants no CORS, so another origin
    // cannot read it.
    let resp = app
        .client
        .get(app.url("/userinfo"))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .expect("GET");
    no_cors_grant(&resp, "/userinfo");
}

#[tokio::test]
async fn case_064_cors_safelisted_cross_site_requests_are_refused() {
    let app = spawn_app().await;
    app.login().await;
    // <form method=POST enctype=text/plain>: no custom header, cross-site metadata.
    // fetch(no-cors, credentials: include), body-less POST: same.
    for path in ["/api/transfer", "/refreshtoken", "/logout"] {
        let form = app
            .client
            .post(app.url(path))
            .header("Content-Type", "text/plain")
            .header("Origin", "http://evil.example")
            .header("Sec-Fetch-Site", "cross-site")
            .header("Sec-Fetch-Mode", "navigate")
            .body("amount=1000&to=attacker")
            .send()
            .await
            .expect("send");
        assert_json_error(form, 403).await;
        let no_cors = app
            .client
            .post(app.url(path))
            .header("Origin", "http://evil.example")
            .header("Sec-Fetch-Site", "cross-site")
            .header("Sec-Fetch-Mode", "no-cors")
            .send()
            .await
            .expect("send");
        assert_json_error(no_cors, 403).await;
        // Even a browser that sent no Origin or Fetch Metadata at all.
        let bare = app.client.post(app.url(path)).send().await.expect("send");
        assert_json_error(bare, 403).await;
    }
    assert!(app.api.requests().is_empty());
    assert_eq!(app.idp.refresh_grants(), 0);
    assert!(app.idp.revocations().is_empty());
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn case_065_cors_preflights_are_never_approved() {
    let app = spawn_app().await;
    app.login().await;
    for origin in ["http://evil.example", "null", app.public_url.as_str()] {
        for path in ["/api/x", "/refreshtoken", "/logout", "/userinfo", "/login"] {
            let resp = app
                .client
                .request(reqwest::Method::OPTIONS, app.url(path))
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "POST")
                .header("Access-Control-Request-Headers", "x-csrf, content-type")
                .send()
                .await
                .expect("OPTIONS");
            assert!(
                !resp.status().is_server_error(),
                "OPTIONS {path}: {}",
                resp.status()
            );
            no_cors_grant(&resp, &format!("OPTIONS {path} from {origin}"));
        }
    }
    // Actual requests from an untrusted origin: refused, and no CORS grant either.
    for (m, path) in [
        ("GET", "/api/x"),
        ("POST", "/refreshtoken"),
        ("POST", "/logout"),
    ] {
        let method = reqwest::Method::from_bytes(m.as_bytes()).expect("method");
        let resp = app
            .client
            .request(method, app.url(path))
            .header("X-CSRF", "1")
            .header("Origin", "http://evil.example")
            .send()
            .await
            .expect("send");
        no_cors_grant(&resp, path);
        assert_json_error(resp, 403).await;
    }
    let resp = app.get_userinfo().await;
    no_cors_grant(&resp, "/userinfo");
    assert!(app.api.requests().is_empty());
}

#[tokio::test]
async fn case_066_same_site_sibling_origin_is_refused() {
    let app = spawn_app_with(AppOptions::default().https()).await;
    app.login().await;
    let public = Url::parse(&app.public_url).expect("url");
    let sibling = format!(
        "https://x.{}:{}",
        public.host_str().expect("host"),
        public.port().expect("port")
    );
    for (m, path) in [
        ("GET", "/api/x"),
        ("POST", "/api/x"),
        ("POST", "/refreshtoken"),
        ("POST", "/logout"),
    ] {
        let method = reqwest::Method::from_bytes(m.as_bytes()).expect("method");
        // SameSite=Strict lets the cookie through for a same-site sibling: the Origin check and
        // the custom header are what stop it.
        for with_header in [false, true] {
            let mut req = app
                .client
                .request(method.clone(), app.url(path))
                .header("Origin", &sibling)
                .header("Sec-Fetch-Site", "same-site");
            if with_header {
                req = req.header("X-CSRF", "1");
            }
            let resp = req.send().await.expect("send");
            no_cors_grant(&resp, path);
            assert_json_error(resp, 403).await;
        }
    }
    assert!(app.api.requests().is_empty());
    assert_eq!(app.idp.refresh_grants(), 0);
    assert!(app.idp.revocations().is_empty());
}

#[tokio::test]
async fn case_067_refreshtoken_csrf_spends_no_grant() {
    let app = spawn_app().await;
    app.login().await;
    let attempts: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("X-CSRF", "1"), ("Sec-Fetch-Site", "cross-site")],
        vec![("X-CSRF", "1"), ("Origin", "http://evil.example")],
        vec![("X-CSRF", "1"), ("Origin", "null")],
        vec![("Origin", "http://evil.example")],
    ];
    for headers in &attempts {
        let mut req = app.client.post(app.url("/refreshtoken"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("send");
        let v = assert_json_error(resp, 403).await;
        for s in app.idp.all_issued_secrets() {
            assert!(!v.to_string().contains(&s));
        }
    }
    // Without any cookie: 401 (CSRF header present) and still no grant.
    let resp = app
        .raw_client
        .post(app.url("/refreshtoken"))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("send");
    assert_json_error(resp, 401).await;
    assert_eq!(
        app.idp.refresh_grants(),
        0,
        "a forged refresh spent the refresh token"
    );
    assert_eq!(
        app.post_refresh().await.status(),
        200,
        "the real SPA still refreshes"
    );
}

#[tokio::test]
async fn case_068_login_flood_is_capped_and_xhr_gets_401() {
    let app = spawn_app().await;
    for i in 0..1000 {
        let resp = app
            .client
            .get(app.url(&format!("/login?return_to=/p{i}")))
            .header("Sec-Fetch-Site", "cross-site")
            .send()
            .await
            .expect("GET /login");
        assert_eq!(resp.status(), 302, "login #{i}");
    }
    let tx: Vec<_> = app
        .cookies()
        .into_iter()
        .filter(|(n, _)| is_tx_cookie_name(n))
        .collect();
    assert!(
        tx.len() <= 5,
        "{} transaction cookies kept after a flood",
        tx.len()
    );
    // The browser's request headers stay small: no 431 for the next request.
    let resp = app.get_userinfo().await;
    assert_json_error(resp, 401).await;
    // XHR/JSON without a session: 401 JSON, never a redirect to the IdP.
    for (m, path) in [
        ("GET", "/api/x"),
        ("POST", "/api/x"),
        ("POST", "/refreshtoken"),
    ] {
        let method = reqwest::Method::from_bytes(m.as_bytes()).expect("method");
        let resp = app
            .client
            .request(method, app.url(path))
            .header("X-CSRF", "1")
            .header("Accept", "application/json")
            .send()
            .await
            .expect("send");
        assert!(!resp.status().is_redirection(), "{m} {path} redirected");
        assert_json_error(resp, 401).await;
    }
    // The newest login still completes.
    let p = app.start_login(Some("/last")).await;
    let resp = app.finish_login(&p).await;
    assert_eq!(location(&resp), "/last");
}

#[tokio::test]
async fn case_069_websocket_upgrade_from_a_foreign_origin_is_refused() {
    let app = spawn_app().await;
    app.login().await;
    let cookie = app.session_cookie_header();
    for (origin, csrf) in [
        ("http://evil.example", ""),
        ("http://evil.example", "X-CSRF: 1\r\n"),
        ("null", "X-CSRF: 1\r\n"),
    ] {
        let req = format!(
            "GET /api/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n{csrf}Cookie: {cookie}\r\n\r\n",
            app.addr
        );
        let (raw, _) = raw_exchange(app.addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&raw), Some(403), "Origin {origin}: {raw}");
    }
    assert!(
        app.api.requests().is_empty(),
        "a hijacking upgrade reached the API"
    );
    // Even from our own origin the upgrade is not passed on (tokengate does not proxy WebSockets).
    let req = format!(
        "GET /api/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: {}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\n\r\n",
        app.addr, app.public_url
    );
    let (raw, _) = raw_exchange(app.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert_ne!(status_of(&raw), Some(101), "{raw}");
    for r in app.api.requests() {
        assert_eq!(r.header("upgrade"), None, "Upgrade forwarded");
    }
}

// ---------------------------------------------------------------------------------------------
// E. Proxy path and header handling (70–83)
// ---------------------------------------------------------------------------------------------

/// Sends each path raw (no client-side normalisation) with a session; all must be 400 and the
/// API must see none of them.
async fn assert_paths_refused(app: &TestApp, paths: &[&str]) {
    let cookie = app.session_cookie_header();
    for path in paths {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
            app.addr
        );
        let (status, raw) = raw_http(app.addr, &req).await;
        assert_eq!(status, 400, "path {path:?}: {raw}");
        assert!(
            raw.contains("\"error\""),
            "path {path:?}: not a JSON error: {raw}"
        );
    }
    let seen: Vec<String> = app.api.requests().iter().map(|r| r.uri.clone()).collect();
    assert!(seen.is_empty(), "escaping paths reached the API: {seen:?}");
}

#[tokio::test]
async fn case_070_dot_segments_are_refused() {
    let app = spawn_app().await;
    app.login().await;
    assert_paths_refused(
        &app,
        &[
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api/.%2e/x",
            "/api/%2e./x",
            "/api/..%2f..%2finternal",
            "/api/..;/admin",
            "/api/.;/admin",
            "/api/public/%2e%2e/admin",
            "/api/./x",
            "/api/x/..",
            "/stripped/../api/x",
        ],
    )
    .await;
}

#[tokio::test]
async fn case_071_encoded_slashes_and_double_encoding_are_refused() {
    let app = spawn_app().await;
    app.login().await;
    assert_paths_refused(
        &app,
        &[
            "/api/a%2F..%2Fadmin",
            "/api/a%2f..%2fadmin",
            "/api/a%5c..%5cadmin",
            "/api/a%5C..%5Cadmin",
            "/api/%252e%252e/admin",
            "/api/a%252fb",
            "/api/%25252e",
            "/api/a\\..\\admin",
            "/api/x%00",
            "/api//admin",
        ],
    )
    .await;
}

#[tokio::test]
async fn case_072_route_matching_ignores_query_and_fragment() {
    let app = spawn_app().await;
    app.login().await;
    let cookie = app.session_cookie_header();
    // Only the path selects a route: a query or an encoded `#` naming /api proxies nothing.
    for target in [
        "/public?x=/api/secret",
        "/api%23/secret",
        "/other%3F/api/x",
        "/x?/api/x",
    ] {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
            app.addr
        );
        let (status, _) = raw_http(app.addr, &req).await;
        assert!(status < 500, "{target}: {status}");
    }
    assert!(
        app.api.requests().is_empty(),
        "a query or fragment routed to the API"
    );
    // A literal fragment in the request line never reaches the API with a different path.
    let req = format!(
        "GET /api/x#/../../admin HTTP/1.1\r\nHost: {}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
        app.addr
    );
    let (status, _) = raw_http(app.addr, &req).await;
    assert!(status < 500, "fragment: {status}");
    for r in app.api.requests() {
        assert!(
            !r.uri.contains("admin") || r.uri.starts_with("/api/"),
            "{}",
            r.uri
        );
        assert!(!r.uri.contains(".."), "dot segments forwarded: {}", r.uri);
    }
    // A protected path with a query naming a "public" one is still protected.
    let resp = app
        .raw_client
        .get(app.url("/api/private?x=/public/status"))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("GET");
    assert_json_error(resp, 401).await;
}

#[tokio::test]
async fn case_073_upstream_authority_comes_only_from_config() {
    let app = spawn_app().await;
    let evil = EchoApi::start().await;
    app.login().await;
    let cookie = app.session_cookie_header();
    let evil_authority = evil.url().trim_start_matches("http://").to_string();
    let requests = [
        format!(
            "GET {}/api/x HTTP/1.1\r\nHost: {evil_authority}\r\n",
            evil.url()
        ),
        format!(
            "GET http://{evil_authority}/api/x HTTP/1.1\r\nHost: {}\r\n",
            app.addr
        ),
        format!(
            "GET //{evil_authority}/api/x HTTP/1.1\r\nHost: {}\r\n",
            app.addr
        ),
        format!(
            "GET /api/@{evil_authority}/x HTTP/1.1\r\nHost: {}\r\n",
            app.addr
        ),
        "GET /api/x HTTP/1.1\r\nHost: internal-admin\r\n".to_string(),
        format!("GET /api/x HTTP/1.1\r\nHost: {evil_authority}\r\n"),
        format!(
            "GET /api/http:%2F%2F{evil_authority}/x HTTP/1.1\r\nHost: {}\r\n",
            app.addr
        ),
    ];
    for r in &requests {
        let req = format!("{r}X-CSRF: 1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
        let (status, _) = raw_http(app.addr, &req).await;
        assert!(status < 500 || status == 502, "{r:?}: {status}");
    }
    assert!(
        evil.requests().is_empty(),
        "a request (and its bearer token) went to a host that is not configured: {:?}",
        evil.requests()
            .iter()
            .map(|r| r.uri.clone())
            .collect::<Vec<_>>()
    );
    for r in app.api.requests() {
        assert!(
            r.uri.starts_with("/api/"),
            "forwarded outside the route: {}",
            r.uri
        );
    }
}

#[tokio::test]
async fn case_074_trace_and_connect_are_always_rejected() {
    let app = spawn_app().await;
    app.login().await;
    let cookie = app.session_cookie_header();
    for req in [
        format!("TRACE /api/x HTTP/1.1\r\nHost: {}\r\n", app.addr),
        format!("TRACE /stripped/x HTTP/1.1\r\nHost: {}\r\n", app.addr),
        format!("CONNECT /api/x HTTP/1.1\r\nHost: {}\r\n", app.addr),
        format!(
            "CONNECT {} HTTP/1.1\r\nHost: {}\r\n",
            app.api.url().trim_start_matches("http://"),
            app.addr
        ),
    ] {
        let full = format!("{req}X-CSRF: 1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
        let (status, raw) = raw_http(app.addr, &full).await;
        let at = app.idp.last_access_token().expect("at");
        assert!(
            !raw.contains(&at),
            "{req:?}: the access token came back to the client"
        );
        assert!((400..=499).contains(&status), "{req:?}: {status}");
    }
    assert!(
        app.api.requests().is_empty(),
        "TRACE/CONNECT reached the API: {:?}",
        app.api
            .requests()
            .iter()
            .map(|r| r.method.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn case_075_browser_authorization_is_replaced() {
    let app = spawn_app().await;
    app.login().await;
    let at = app.idp.last_access_token().expect("at");
    let cookie = app.session_cookie_header();
    for extra in [
        "Authorization: Bearer attacker-token\r\n",
        "Authorization: Basic YXR0YWNrZXI6cHc=\r\n",
        "Authorization: Bearer attacker-token\r\nAuthorization: Bearer second\r\n",
        "authorization: bearer attacker-token\r\n",
    ] {
        let req = format!(
            "GET /api/me HTTP/1.1\r\nHost: {}\r\n{extra}X-CSRF: 1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
            app.addr
        );
        let (status, _) = raw_http(app.addr, &req).await;
        assert_eq!(status, 200);
        let rec = app.api.last();
        assert_eq!(
            rec.header_all("authorization"),
            vec![format!("Bearer {at}").as_str()],
            "{extra:?}"
        );
    }
    // Without a session the browser's token is not forwarded "instead".
    let resp = app
        .raw_client
        .get(app.url("/api/me"))
        .header("X-CSRF", "1")
        .header("Authorization", "Bearer attacker-token")
        .send()
        .await
        .expect("GET");
    assert_json_error(resp, 401).await;
    assert_eq!(app.api.requests().len(), 4);
}

#[tokio::test]
async fn case_076_bff_cookies_are_stripped_upstream() {
    let app = spawn_app().await;
    app.login().await;
    app.add_browser_cookie("theme=dark; Path=/");
    app.add_browser_cookie("tg_session.0=chunk0; Path=/");
    app.add_browser_cookie("tg_session.7=chunk7; Path=/");
    app.add_browser_cookie("tg_tx_leftover=zzz; Path=/");
    app.add_browser_cookie("__Host-tg_session=hostile; Path=/");
    assert_eq!(app.get_api("/api/cookies").await.status(), 200);
    let rec = app.api.last();
    let forwarded: Vec<(String, String)> = rec
        .header_all("cookie")
        .iter()
        .flat_map(|h| parse_cookie_header(h))
        .collect();
    let names: Vec<&str> = forwarded.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"theme"),
        "the SPA's cookie was dropped: {names:?}"
    );
    for (n, _) in &forwarded {
        assert!(
            !(n == "tg_session" || n.starts_with("tg_session.") || n.starts_with("tg_tx_")),
            "tokengate cookie {n} forwarded"
        );
    }
    for (_, v) in app.cookies() {
        if v.len() > 20 {
            assert!(
                rec.header_all("cookie").iter().all(|h| !h.contains(&v)),
                "a session cookie value was forwarded"
            );
        }
    }
}

#[tokio::test]
async fn case_077_spoofed_identity_headers_are_stripped() {
    let app = spawn_app().await;
    app.login().await;
    let cookie = app.session_cookie_header();
    let spoofed = [
        "X-Forwarded-User",
        "X-Forwarded-Email",
        "X-Auth-Request-Email",
        "X-Auth-Request-User",
        "X-User-Id",
        "X_Forwarded_Email",
        "X_Forwarded_User",
        "x_auth_request_email",
        "X-Forwarded_Preferred-Username",
        "OIDC_CLAIM_sub",
        "OIDC_CLAIM_email",
        "OIDC_access_token",
        "Remote-User",
        "X-Remote-User",
    ];
    let headers: String = spoofed.iter().map(|h| format!("{h}: admin\r\n")).collect();
    let req = format!(
        "GET /api/who HTTP/1.1\r\nHost: {}\r\n{headers}X-CSRF: 1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
        app.addr
    );
    let (status, _) = raw_http(app.addr, &req).await;
    assert_eq!(status, 200);
    let rec = app.api.last();
    let leaked: Vec<&str> = spoofed
        .iter()
        .copied()
        .filter(|h| rec.header(h).is_some())
        .collect();
    assert!(
        leaked.is_empty(),
        "identity headers reached the API: {leaked:?}"
    );
    assert_eq!(rec.header("x-custom-ok"), None);
}

#[tokio::test]
async fn case_078_untrusted_forwarding_headers_are_ignored() {
    let app = spawn_app().await;
    let spoof = [
        ("X-Forwarded-Uri", "/healthz"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Original-URL", "/healthz"),
        ("X-Rewrite-URL", "/healthz"),
        ("Forwarded", "for=127.0.0.1;host=evil.example;proto=https"),
    ];
    // Not for auth: still 401 without a session.
    let mut req = app
        .raw_client
        .get(app.url("/api/secret"))
        .header("X-CSRF", "1");
    for (k, v) in spoof {
        req = req.header(k, v);
    }
    assert_json_error(req.send().await.expect("GET"), 401).await;
    // Not for redirect building or Secure-cookie decisions.
    let mut req = app.client.get(app.url("/login"));
    for (k, v) in spoof {
        req = req.header(k, v);
    }
    let resp = req.send().await.expect("GET /login");
    assert_eq!(resp.status(), 302);
    let loc = Url::parse(&location(&resp)).expect("authorize URL");
    let redirect_uri = loc
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned());
    assert_eq!(
        redirect_uri,
        Some(format!("{}/oauth-callback", app.public_url))
    );
    for c in set_cookies(&resp) {
        assert!(!c.name.starts_with("__Host-"), "{}", c.raw);
        assert!(
            !c.secure(),
            "Secure chosen from X-Forwarded-Proto: {}",
            c.raw
        );
    }
    // Not for routing: a non-API path with X-Forwarded-Uri naming the API proxies nothing.
    app.login().await;
    let mut req = app
        .client
        .get(app.url("/static-page"))
        .header("X-CSRF", "1");
    for (k, v) in [("X-Forwarded-Uri", "/api/x"), ("X-Original-URL", "/api/x")] {
        req = req.header(k, v);
    }
    assert!(!req.send().await.expect("GET").status().is_server_error());
    assert!(
        app.api.requests().is_empty(),
        "routed by a forwarding header"
    );
    // Replaced on the way to the API (no `Forwarded` from an untrusted peer).
    let mut req = app.client.get(app.url("/api/fwd")).header("X-CSRF", "1");
    for (k, v) in spoof {
        req = req.header(k, v);
    }
    assert_eq!(req.send().await.expect("GET").status(), 200);
    let rec = app.api.last();
    assert_eq!(rec.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(rec.header_all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(rec.header("forwarded"), None);
    // No Forwarded header at all: fine.
    assert_eq!(app.get_api("/api/plain").await.status(), 200);

    // From a configured trusted proxy the chain is kept.
    let trusted =
        spawn_app_with(AppOptions::default().server("trusted_proxies = [\"127.0.0.1/32\"]")).await;
    trusted.login().await;
    let resp = trusted
        .client
        .get(trusted.url("/api/fwd"))
        .header("X-CSRF", "1")
        .header("X-Forwarded-For", "203.0.113.9")
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "app.example.com")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let rec = trusted.api.last();
    assert_eq!(
        rec.header_all("x-forwarded-for").join(","),
        "203.0.113.9, 127.0.0.1"
    );
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn case_079_health_routes_are_no_auth_bypass() {
    let app = spawn_app().await;
    for ua in ["kube-probe/1.29", "ELB-HealthChecker/2.0", "GoogleHC/1.0"] {
        let resp = app
            .raw_client
            .get(app.url("/api/secret"))
            .header("X-CSRF", "1")
            .header("User-Agent", ua)
            .send()
            .await
            .expect("GET");
        assert_json_error(resp, 401).await;
    }
    for path in [
        "/healthz/../api/secret",
        "/readyz/../api/secret",
        "/healthz/%2e%2e/api/secret",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nX-CSRF: 1\r\nConnection: close\r\n\r\n",
            app.addr
        );
        let (status, _) = raw_http(app.addr, &req).await;
        assert!((400..=499).contains(&status), "{path}: {status}");
    }
    let resp = app
        .raw_client
        .get(app.url("/healthz/api/secret"))
        .send()
        .await
        .expect("GET");
    assert_ne!(resp.status(), 200, "health matched a longer path");
    assert!(app.api.requests().is_empty());
}

#[tokio::test]
async fn case_080_clients_cannot_nominate_security_headers_as_hop_by_hop() {
    let app = spawn_app().await;
    app.login().await;
    let at = app.idp.last_access_token().expect("at");
    let cookie = app.session_cookie_header();
    let req = format!(
        "GET /api/hop HTTP/1.1\r\nHost: {}\r\nConnection: close, Authorization, X-CSRF, Cookie, X-Forwarded-For, X-Forwarded-Proto\r\nAuthorization: Bearer attacker\r\nX-CSRF: 1\r\nCookie: {cookie}; theme=dark\r\nTE: trailers\r\nTrailer: X-Evil\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\n\r\n",
        app.addr
    );
    let (status, _) = raw_http(app.addr, &req).await;
    assert_eq!(status, 200);
    let rec = app.api.last();
    assert_eq!(
        rec.header_all("authorization"),
        vec![format!("Bearer {at}").as_str()]
    );
    assert_eq!(rec.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(rec.header_all("x-forwarded-proto"), vec!["http"]);
    for h in [
        "te",
        "trailer",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ] {
        assert_eq!(rec.header(h), None, "hop-by-hop {h} forwarded");
    }
    // Naming the CSRF header as hop-by-hop does not make its absence acceptable.
    let req = format!(
        "GET /api/hop HTTP/1.1\r\nHost: {}\r\nConnection: close, X-CSRF\r\nCookie: {cookie}\r\n\r\n",
        app.addr
    );
    let (status, _) = raw_http(app.addr, &req).await;
    assert_eq!(status, 403);
    assert_eq!(app.api.requests().len(), 1);
}

#[tokio::test]
async fn case_081_request_smuggling_and_malformed_framing() {
    let app = spawn_app().await;
    app.login().await;
    let cookie = app.session_cookie_header();
    let host = app.addr;
    let smuggled = format!(
        "GET /api/smuggled HTTP/1.1\r\nHost: {host}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\n\r\n"
    );
    let head = |extra: &str| {
        format!("POST /api/s HTTP/1.1\r\nHost: {host}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\n{extra}")
    };
    // Each must be refused with 400 (and the connection closed), or framed by
    // Transfer-Encoding alone with the connection closed (RFC 9112 §6.1).
    let cases: Vec<(&str, String, bool)> = vec![
        (
            "CL and TE",
            format!("{}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}", head("")),
            false,
        ),
        (
            "two different CLs",
            format!("{}Content-Length: 5\r\nContent-Length: 40\r\n\r\nhello{smuggled}", head("")),
            true,
        ),
        (
            "CL list",
            format!("{}Content-Length: 5, 40\r\n\r\nhello{smuggled}", head("")),
            true,
        ),
        (
            "TE xchunked",
            format!("{}Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}", head("")),
            true,
        ),
        (
            "TE chunked, identity",
            format!("{}Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}", head("")),
            true,
        ),
        (
            "obs-fold",
            format!("{}X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n", head("")),
            true,
        ),
        (
            "invalid header name",
            format!("{}Bad Header: x\r\nContent-Length: 0\r\n\r\n", head("")),
            true,
        ),
        (
            "space before colon",
            format!("{}Content-Length : 40\r\n\r\nhello{smuggled}", head("")),
            true,
        ),
        (
            "path with a space",
            format!("GET /api/a b HTTP/1.1\r\nHost: {host}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\n\r\n"),
            true,
        ),
        (
            "NUL in a header value",
            format!("{}X-Nul: a\0b\r\nContent-Length: 0\r\n\r\n", head("")),
            true,
        ),
    ];
    for (what, req, must_be_400) in &cases {
        let (raw, closed) = raw_exchange(app.addr, req.as_bytes(), Duration::from_secs(5)).await;
        let status = status_of(&raw);
        if *must_be_400 {
            assert_eq!(status, Some(400), "{what}: {raw}");
        } else {
            assert!(matches!(status, Some(400) | Some(200)), "{what}: {raw}");
        }
        assert!(
            closed,
            "{what}: the connection was kept open after a malformed request"
        );
        assert_eq!(
            raw.matches("HTTP/1.1 ").count(),
            1,
            "{what}: a second request was served: {raw}"
        );
    }
    let seen: Vec<(String, usize)> = app
        .api
        .requests()
        .iter()
        .map(|r| (r.uri.clone(), r.body_len))
        .collect();
    assert!(
        seen.iter().all(|(u, _)| u != "/api/smuggled"),
        "a smuggled request reached the API: {seen:?}"
    );
    for r in app.api.requests() {
        // Whatever was forwarded was framed consistently: the chunked body "hello".
        assert_eq!(
            r.body_len, 5,
            "{} forwarded with body {}",
            r.uri, r.body_len
        );
        if let Some(cl) = r.header("content-length") {
            assert_eq!(cl, "5", "stale Content-Length forwarded");
        }
    }
    // HTTP/2 prior knowledge is not spoken at all (no h2 header smuggling path).
    let (raw, _) = raw_exchange(
        app.addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        raw.is_empty() || status_of(&raw).is_some_and(|s| s >= 400),
        "{raw}"
    );
}

#[tokio::test]
async fn case_082_emitted_values_cannot_carry_header_injection() {
    let app = spawn_app().await;
    // Redirect targets: return_to and the IdP's error are re-encoded (see cases 62 and 9).
    let p = app.start_login(None).await;
    let resp = app
        .callback(&[
            ("error", "access_denied"),
            (
                "error_description",
                "a\r\nX-Injected: 1\r\n\r\n<script>x</script>\0",
            ),
            ("state", &p.state),
        ])
        .await;
    assert!(resp.headers().get("x-injected").is_none());
    if let Some(loc) = resp.headers().get("location") {
        let loc = loc.to_str().expect("ASCII Location");
        assert!(!loc.contains('\r') && !loc.contains('\n') && !loc.contains('\0'));
        assert!(
            !loc.contains("<script>"),
            "unencoded markup in Location {loc}"
        );
    }
    // Error bodies: JSON-encoded, whatever the input.
    let resp = app
        .callback(&[
            ("code", "c\r\nX-Injected: 1"),
            ("state", "s\r\nX-Injected: 1"),
        ])
        .await;
    assert!(resp.headers().get("x-injected").is_none());
    assert!(resp.status().is_client_error());
    let text = resp.text().await.expect("body");
    let _: Value = serde_json::from_str(&text).expect("JSON error body");
    // Request ids are echoed only when well-formed.
    let resp = app
        .raw_client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "abc def;evil=\"1\"")
        .send()
        .await
        .expect("GET");
    let id = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id:?}");
}

#[tokio::test]
async fn case_083_upstream_response_hygiene() {
    let app = spawn_app().await;
    app.login().await;
    for code in [401u16, 403] {
        let resp = app.get_api(&format!("/api/status/{code}")).await;
        assert_eq!(
            resp.status().as_u16(),
            code,
            "upstream {code} passed through"
        );
        assert!(
            set_cookies(&resp)
                .iter()
                .all(|c| !is_session_cookie_name(&c.name)),
            "an upstream {code} touched the session"
        );
    }
    assert_eq!(
        app.idp.refresh_grants(),
        0,
        "an upstream 401/403 triggered a refresh"
    );
    assert!(
        app.idp.revocations().is_empty(),
        "an upstream 401/403 logged the user out"
    );
    assert_eq!(app.get_userinfo().await.status(), 200);
    // Upstream redirects are handed to the browser, not followed with the token.
    let before = app.api.requests().len();
    let resp = app.get_api("/api/status/302").await;
    assert_eq!(resp.status(), 302);
    assert_eq!(
        app.api.requests().len(),
        before + 1,
        "the redirect was followed"
    );
    // Set-Cookie with our names from the API is dropped.
    let resp = app.get_api("/api/hop-response").await;
    assert!(set_cookies(&resp)
        .iter()
        .all(|c| c.value != "from-upstream"));
    assert_eq!(app.get_userinfo().await.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// F. Refresh and concurrency (84–91)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_084_concurrent_expired_calls_share_one_refresh() {
    let app = spawn_app().await;
    login_with_expired_token(&app).await;
    app.idp
        .behave(|b| b.refresh_delay = Duration::from_millis(400));
    let cookie = app.session_cookie_header();
    let calls = (0..25).map(|i| {
        app.raw_client
            .get(app.url(&format!("/api/c/{i}")))
            .header("X-CSRF", "1")
            .header("Cookie", cookie.clone())
            .send()
    });
    let statuses: Vec<u16> = futures_join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("call").status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        app.idp.refresh_grants(),
        1,
        "one session spent its refresh token once"
    );
    let fresh = app.idp.last_access_token().expect("at");
    assert!(app
        .api
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some(format!("Bearer {fresh}").as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case_085_same_session_refreshed_on_two_replicas_makes_one_grant() {
    let redis = RedisServer::start().await;
    let stack = Stack::start_with(StackOptions {
        replicas: 2,
        token_delay_ms: 300,
        extra_session: redis_session_lines(&redis),
        ..StackOptions::default()
    })
    .await;
    assert_eq!(stack.login("case85", "/").await.status(), 302);
    let calls = (0..8).map(|i| {
        stack
            .browser
            .post(format!("{}/refreshtoken", stack.bases[i % 2]))
            .header("X-CSRF", "1")
            .send()
    });
    let statuses: Vec<u16> = futures_join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("refresh").status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        stack.refresh_grants().await,
        1,
        "both replicas shared one grant"
    );
    // The rotated refresh token was stored for both: each replica can refresh again in turn.
    for b in &stack.bases {
        let r = stack
            .browser
            .post(format!("{b}/refreshtoken"))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("refresh");
        assert_eq!(r.status(), 200, "replica {b}");
    }
    assert_eq!(stack.refresh_grants().await, 3);
    let r = stack
        .api(reqwest::Method::GET, "/api/after")
        .send()
        .await
        .expect("api");
    assert_eq!(
        r.status(),
        200,
        "the IdP did not revoke the grant (no reuse)"
    );
}

#[tokio::test]
async fn case_086_two_tabs_with_the_same_cookie_do_not_double_spend() {
    let app = spawn_app().await;
    app.login().await;
    let c1 = app.session_cookie_header();
    // Tab A refreshes (the browser's jar gets the new cookie).
    assert_eq!(app.post_refresh().await.status(), 200);
    let grants_after_a = app.idp.refresh_grants();
    // Tab B still sends the pre-rotation cookie.
    let resp = app
        .raw_client
        .post(app.url("/refreshtoken"))
        .header("X-CSRF", "1")
        .header("Cookie", &c1)
        .send()
        .await
        .expect("tab B");
    assert_eq!(
        resp.status(),
        200,
        "tab B was logged out by tab A's refresh"
    );
    assert!(
        set_cookies(&resp)
            .iter()
            .all(|c| !(is_session_cookie_name(&c.name) && c.is_removal())),
        "tab B's answer clears the newer cookie"
    );
    if !redis_store() {
        assert_eq!(
            app.idp.refresh_grants(),
            grants_after_a,
            "the rotated refresh token was replayed"
        );
    }
    // And the newer cookie keeps working.
    assert_eq!(app.get_api("/api/after").await.status(), 200);
    assert_eq!(app.post_refresh().await.status(), 200);
}

#[tokio::test]
async fn case_086_two_tabs_on_two_cookie_store_replicas_keep_the_newer_cookie() {
    if !redis_store() {
        // By design: cookie-store replicas share no refresh state, so a pre-rotation cookie on
        // another replica replays a spent refresh token (the IdP says invalid_grant and the
        // session ends). The README's "Running several replicas" says to use the Redis store
        // (or sticky sessions) with several replicas; this test runs in the Redis pass.
        return;
    }
    let idp = FakeIdp::start().await;
    let api = EchoApi::start().await;
    let a = spawn_app_with(AppOptions::default().idp(&idp).api(&api)).await;
    let b = spawn_app_with(AppOptions::default().idp(&idp).api(&api).same_store_as(&a)).await;
    a.login().await;
    let c1 = a.session_cookie_header();
    assert_eq!(a.post_refresh().await.status(), 200);
    let resp = b
        .raw_client
        .post(b.url("/refreshtoken"))
        .header("X-CSRF", "1")
        .header("Cookie", &c1)
        .send()
        .await
        .expect("tab B on replica 2");
    assert!(
        set_cookies(&resp)
            .iter()
            .all(|c| !(is_session_cookie_name(&c.name) && c.is_removal())),
        "tab B's answer ({}) clears the cookie tab A just received",
        resp.status()
    );
    assert_eq!(a.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn case_087_stuck_refresh_lease_is_bounded_and_released() {
    let redis = RedisServer::start().await;
    let stack = Stack::start_with(StackOptions {
        replicas: 2,
        extra_session: redis_session_lines(&redis),
        ..StackOptions::default()
    })
    .await;
    assert_eq!(stack.login("case87", "/").await.status(), 302);
    let sids = stored_session_ids(&redis.url()).await;
    assert_eq!(sids.len(), 1, "{sids:?}");
    let lease = format!("tg:{{{}}}:lease", sids[0]);
    let mut c = redis_conn(&redis.url()).await;
    // A replica "crashed" holding the lease: the lease expires, a waiter takes over.
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("crashed-replica")
        .arg("PX")
        .arg(1500)
        .query_async(&mut c)
        .await
        .expect("SET lease");
    let r = stack
        .browser
        .post(format!("{}/refreshtoken", stack.bases[1]))
        .header("X-CSRF", "1")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("refresh behind a stuck lease");
    assert_eq!(r.status(), 200);
    assert_eq!(stack.refresh_grants().await, 1);
    let left: Vec<String> = redis_keys(&redis.url(), "tg:*:lease").await;
    assert!(
        left.is_empty(),
        "lease not released after a refresh: {left:?}"
    );
    // A lease that never expires in time: the waiter gives up within its bound, the session stays.
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("hung-replica")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .expect("SET lease");
    let r = stack
        .browser
        .post(format!("{}/refreshtoken", stack.bases[0]))
        .header("X-CSRF", "1")
        .timeout(Duration::from_secs(45))
        .send()
        .await
        .expect("the waiter answered within its bound");
    assert_eq!(r.status(), 503, "a waiter behind a hung lease");
    assert_eq!(
        stack.refresh_grants().await,
        1,
        "no grant while another holds the lease"
    );
    let _: () = redis::cmd("DEL")
        .arg(&lease)
        .query_async(&mut c)
        .await
        .expect("DEL");
    let r = stack
        .browser
        .get(format!("{}/userinfo", stack.base))
        .send()
        .await
        .expect("userinfo");
    assert_eq!(r.status(), 200, "the session survived");

    // Failure path (fake IdP, Redis store): the lease is released after a failed refresh too.
    if redis_store() {
        let app = spawn_app().await;
        app.login().await;
        app.idp.behave(|b| b.refresh = RefreshMode::ServerError);
        assert_eq!(app.post_refresh().await.status(), 503);
        let url = app.redis_url.clone().expect("redis");
        assert!(
            redis_keys(&url, "tg:*:lease").await.is_empty(),
            "lease kept after a failure"
        );
        app.idp.behave(|b| b.refresh = RefreshMode::Rotate);
        // Past the per-session back-off after a transient failure (case 89: 2 s at first), the
        // next refresh goes through: no lease was left behind to block it.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            app.post_refresh().await.status(),
            200,
            "the next refresh is not blocked"
        );
    }
}

#[tokio::test]
async fn case_088_permanent_refresh_failure_ends_the_session_once() {
    let app = spawn_app().await;
    app.login().await;
    let old = app.session_cookie_header();
    app.idp.behave(|b| b.refresh = RefreshMode::InvalidGrant);
    let resp = app.post_refresh().await;
    assert_clears_session_cookie(&resp);
    assert_json_error(resp, 401).await;
    assert_eq!(app.idp.refresh_grants(), 1);
    // No retry loop, and a copy of the old cookie does not bring the session back.
    for path in ["/userinfo", "/api/x"] {
        let resp = app
            .raw_client
            .get(app.url(path))
            .header("X-CSRF", "1")
            .header("Cookie", &old)
            .send()
            .await
            .expect("GET");
        let s = resp.status().as_u16();
        if redis_store() {
            assert_eq!(s, 401, "{path}: the session was not deleted server-side");
        } else {
            // A stateless cookie cannot be revoked; it must at least not spend another grant.
            assert!(s == 200 || s == 401, "{path}: {s}");
        }
    }
    let resp = app
        .raw_client
        .post(app.url("/refreshtoken"))
        .header("X-CSRF", "1")
        .header("Cookie", &old)
        .send()
        .await
        .expect("POST");
    assert_json_error(resp, 401).await;
    assert_eq!(
        app.idp.refresh_grants(),
        1,
        "the refused refresh token was tried again"
    );
}

#[tokio::test]
async fn case_089_transient_refresh_failure_keeps_the_session_and_backs_off() {
    let app = spawn_app().await;
    login_with_expired_token(&app).await;
    app.idp.behave(|b| b.refresh = RefreshMode::ServerError);
    for i in 0..5 {
        let resp = app.get_api(&format!("/api/during-outage/{i}")).await;
        assert!(
            set_cookies(&resp)
                .iter()
                .all(|c| !(is_session_cookie_name(&c.name) && c.is_removal())),
            "a transient failure cleared the session"
        );
        assert_json_error(resp, 503).await;
    }
    assert!(
        app.api.requests().is_empty(),
        "an expired token was forwarded"
    );
    assert!(
        !app.session_cookie_header().is_empty(),
        "the session cookie is gone"
    );
    let grants = app.idp.refresh_grants();
    assert!(
        grants <= 2,
        "{grants} refresh grants hammered a failing IdP within seconds"
    );
}

#[tokio::test]
async fn case_090_refresh_response_handling() {
    let idp = FakeIdp::start().await;
    let shim = TokenShim::start(&idp).await;
    let app = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .oauth(&format!("token_endpoint = \"{}\"", shim.url())),
    )
    .await;
    app.login().await;
    // A new ID token must be valid and about the same user; otherwise it is not used.
    let now = unix_now();
    let claims = |sub: &str, iss: &str| json!({"iss": iss, "sub": sub, "aud": CLIENT_ID, "iat": now, "exp": now + 3600});
    let issuer = idp.issuer().to_string();
    let bad_sig = Behaviour {
        signer: Signer::Rsa2,
        kid: Some(Some("k1".into())),
        ..Behaviour::default()
    };
    let cases = [
        (
            "another sub",
            sign_jwt(&Behaviour::default(), &claims("attacker", &issuer)),
        ),
        (
            "another iss",
            sign_jwt(
                &Behaviour::default(),
                &claims(DEFAULT_SUB, "http://evil.example"),
            ),
        ),
        (
            "bad signature",
            sign_jwt(&bad_sig, &claims("attacker", &issuer)),
        ),
        (
            "alg none",
            sign_jwt(
                &Behaviour {
                    signer: Signer::AlgNone,
                    ..Behaviour::default()
                },
                &claims("attacker", &issuer),
            ),
        ),
    ];
    for (what, id_token) in cases {
        // A new refresh token each time: refreshes of one refresh token within the reuse window
        // are coalesced by design.
        shim.answer_refresh_with(json!({
            "access_token": format!("at-{what}"), "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": format!("rt-{what}"), "id_token": id_token,
        }));
        let resp = app.post_refresh().await;
        let s = resp.status().as_u16();
        assert!(s == 200 || s == 401, "{what}: {s}");
        let ui = app.get_userinfo().await;
        if ui.status() == 200 {
            let v: Value = ui.json().await.expect("json");
            assert_eq!(v["sub"], DEFAULT_SUB, "{what}: the identity changed");
        }
        if app.get_api("/api/after").await.status() == 200 {
            assert_ne!(
                app.api.last().header("authorization"),
                Some(format!("Bearer at-{what}").as_str()),
                "{what}: tokens from a refused refresh were used"
            );
        }
        if s == 401 {
            // Ended: log in again for the next case.
            app.login().await;
        }
    }

    // No refresh token (and no ID token) in the answer: the new access token is used and the
    // old refresh token is kept (it is the one revoked at logout).
    app.login().await;
    let rt_login = idp.last_refresh_token().expect("rt");
    shim.answer_refresh_with(
        json!({"access_token": "at-keep", "token_type": "Bearer", "expires_in": 3600}),
    );
    assert_eq!(app.post_refresh().await.status(), 200);
    let last = shim.refresh_requests().last().cloned().expect("request");
    assert!(last.contains(&("refresh_token".into(), rt_login.clone())));
    assert_eq!(app.get_api("/api/x").await.status(), 200);
    assert_eq!(
        app.api.last().header("authorization"),
        Some("Bearer at-keep")
    );
    assert_eq!(app.post_logout().await.status(), 200);
    assert!(
        idp.revoked_tokens().contains(&rt_login),
        "the refresh token was dropped when the refresh answer had none: {:?}",
        idp.revoked_tokens()
    );
}

#[tokio::test]
async fn case_091_refresh_tokens_are_not_spent_needlessly() {
    // Non-401 upstream errors do not trigger refresh-and-retry.
    let app = spawn_app().await;
    app.login().await;
    for code in [401u16, 403, 500, 502, 503] {
        let before = app.api.requests().len();
        assert_eq!(
            app.get_api(&format!("/api/status/{code}"))
                .await
                .status()
                .as_u16(),
            code
        );
        assert_eq!(app.api.requests().len(), before + 1, "{code} was retried");
    }
    assert_eq!(app.idp.refresh_grants(), 0);

    // Huge expires_in: no overflow, no refresh.
    let huge = spawn_app().await;
    huge.idp.behave(|b| {
        b.code_grant_patch
            .insert("expires_in".into(), json!(1_000_000_000_000_000u64));
    });
    huge.login().await;
    assert_eq!(huge.get_api("/api/x").await.status(), 200);
    assert_eq!(huge.get_api("/api/y").await.status(), 200);
    assert_eq!(huge.idp.refresh_grants(), 0);

    // Negative expires_in: refused cleanly, or used without a refresh loop.
    let neg = spawn_app().await;
    neg.idp.behave(|b| {
        b.code_grant_patch.insert("expires_in".into(), json!(-5));
    });
    let p = neg.start_login(None).await;
    let resp = neg.finish_login(&p).await;
    if resp.status().is_redirection() {
        for i in 0..3 {
            let _ = neg.get_api(&format!("/api/n{i}")).await;
        }
        assert!(neg.idp.refresh_grants() <= 1, "refresh on every request");
    } else {
        assert_json_error_in(resp, 400..=502).await;
    }
}

#[tokio::test]
async fn case_091_no_refresh_token_uses_the_valid_token_then_401() {
    let app = spawn_app().await;
    app.idp.behave(|b| {
        b.access_token_ttl = 5;
        b.code_grant_patch
            .insert("refresh_token".into(), Value::Null);
    });
    app.login().await;
    let resp = app.post_refresh().await;
    assert!(resp.status().is_client_error(), "{}", resp.status());
    let resp = app.get_api("/api/x").await;
    assert_eq!(
        resp.status(),
        200,
        "the still-valid access token was not used"
    );
    assert_eq!(app.idp.refresh_grants(), 0);
}

#[tokio::test]
async fn case_091_short_lived_tokens_do_not_refresh_on_every_request() {
    let app = spawn_app().await;
    app.idp.behave(|b| b.access_token_ttl = 20);
    app.login().await;
    for i in 0..4 {
        assert_eq!(app.get_api(&format!("/api/s{i}")).await.status(), 200);
    }
    let grants = app.idp.refresh_grants();
    assert!(
        grants <= 1,
        "{grants} refresh grants for 4 calls with a 20 s token"
    );
}

// ---------------------------------------------------------------------------------------------
// G. Faults and load (92–100)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn case_092_idp_slow_or_down_during_login() {
    // Token endpoint slower than oauth.http_timeout_s: 502/504 JSON, the code is not redeemed twice.
    let app = spawn_app_with(AppOptions::default().oauth("http_timeout_s = 1")).await;
    app.idp.behave(|b| b.token_delay = Duration::from_secs(3));
    let p = app.start_login(None).await;
    let resp = app.finish_login(&p).await;
    assert_no_session_cookie_set(&resp);
    assert_json_error_in(resp, 502..=504).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        app.idp.code_grants(),
        1,
        "the code exchange was retried after a timeout"
    );
    // A retry path: a new login works once the IdP is fast again.
    app.idp.behave(|b| b.token_delay = Duration::ZERO);
    app.login().await;
    assert_eq!(app.get_userinfo().await.status(), 200);

    // IdP unreachable from the start: /login answers 503 JSON (no half-built redirect).
    let dead = dead_port_url().await;
    let down = spawn_app_with(AppOptions::default().issuer(&dead).no_wait()).await;
    let resp = down
        .client
        .get(down.url("/login"))
        .send()
        .await
        .expect("GET");
    assert_json_error(resp, 503).await;
}

#[tokio::test]
async fn case_093_unknown_kid_flood_is_rate_limited_and_fails_closed() {
    let app = spawn_app().await;
    app.login().await;
    let fetches_before = app.idp.jwks_fetches();
    for i in 0..10 {
        app.idp
            .behave(|b| b.kid = Some(Some(format!("random-kid-{i}"))));
        let jar = Arc::new(Jar::default());
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
        assert_no_session_cookie_set(&resp);
        let s = resp.status().as_u16();
        assert!((400..=499).contains(&s), "unknown kid #{i}: {s}");
    }
    let extra = app.idp.jwks_fetches() - fetches_before;
    assert!(extra <= 1, "{extra} JWKS fetches for 10 unknown kids");
    assert_eq!(
        app.idp.userinfo_calls(),
        0,
        "a token from a refused login was used"
    );
}

#[tokio::test]
async fn case_094_clock_skew_within_and_outside_the_leeway() {
    let app = spawn_app_with(AppOptions::default().oauth("clock_skew_s = 180")).await;
    let now = unix_now();
    // IdP clock 2 minutes ahead or behind: within the leeway.
    for (iat, exp) in [(now + 120, now + 120 + 3600), (now - 120, now - 120 + 3600)] {
        app.idp.behave(|b| {
            b.claim("iat", json!(iat)).claim("exp", json!(exp));
        });
        let p = app.start_login(None).await;
        let resp = app.finish_login(&p).await;
        assert_eq!(
            resp.status(),
            302,
            "iat {iat} (now {now}) refused within the leeway"
        );
    }
    // 10 minutes off: a clear 4xx, no session.
    for (iat, exp) in [(now + 600, now + 600 + 3600), (now - 3600 - 600, now - 600)] {
        app.idp.behave(|b| {
            b.claim("iat", json!(iat)).claim("exp", json!(exp));
        });
        let p = app.start_login(None).await;
        let resp = app.finish_login(&p).await;
        assert_no_session_cookie_set(&resp);
        let v = assert_json_error_in(resp, 400..=499).await;
        assert!(v["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case_095_redis_down_is_503_never_anonymous_never_a_cleared_cookie() {
    let mut redis = RedisServer::start_persistent().await;
    let stack = Stack::start_with(StackOptions {
        replicas: 2,
        extra_session: redis_session_lines(&redis),
        ..StackOptions::default()
    })
    .await;
    assert_eq!(stack.login("case95", "/").await.status(), 302);
    let cookie_before = stack.cookie_header();
    redis.kill();
    let b = &stack.bases[1];
    let checks = [
        stack
            .browser
            .get(format!("{b}/userinfo"))
            .send()
            .await
            .expect("userinfo"),
        stack
            .browser
            .get(format!("{b}/api/x"))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("api"),
        stack
            .browser
            .post(format!("{b}/refreshtoken"))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("refresh"),
        stack
            .browser
            .post(format!("{b}/logout"))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("logout"),
    ];
    for resp in checks {
        let url = resp.url().path().to_string();
        assert!(
            set_cookies(&resp)
                .iter()
                .all(|c| !(is_session_cookie_name(&c.name) && c.is_removal())),
            "{url}: the session cookie was cleared during an outage"
        );
        let v = assert_json_error(resp, 503).await;
        assert_eq!(v["error"], "temporarily_unavailable", "{url}: {v}");
    }
    assert_eq!(
        stack.cookie_header(),
        cookie_before,
        "the browser's cookie changed"
    );
    redis.restart().await;
    let mut back = false;
    for _ in 0..100 {
        let r = stack
            .browser
            .get(format!("{b}/userinfo"))
            .send()
            .await
            .expect("userinfo");
        if r.status() == 200 {
            back = true;
            break;
        }
        assert_ne!(r.status(), 401, "bounced to login after Redis came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the session came back with Redis (pool reconnected)");
    let mut ready = false;
    for _ in 0..100 {
        let r = stack
            .browser
            .get(format!("{b}/readyz"))
            .send()
            .await
            .expect("readyz");
        if r.status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/readyz is 200 again after Redis returned");
    // "No such key" is told apart from "backend error": a session lost from the store is 401.
    let mut c = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut c)
        .await
        .expect("FLUSHALL");
    let r = stack
        .browser
        .get(format!("{b}/userinfo"))
        .send()
        .await
        .expect("userinfo");
    assert_eq!(r.status(), 401);

    // Replay caches fail closed: a back-channel logout token while Redis is down is not accepted.
    if redis_store() {
        let mut app = spawn_app().await;
        app.idp.behave(|b| {
            b.claim("sid", json!("idp-session-a"));
        });
        app.login().await;
        app.redis.as_mut().expect("owned redis").kill();
        let token = sign_jwt(
            &Behaviour::default(),
            &logout_claims(&app.idp, Some("idp-session-a"), None),
        );
        let resp = post_logout_token(&app, &token).await;
        assert_json_error(resp, 503).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_096_upstream_slow_or_down() {
    let app = spawn_app().await;
    app.login().await;
    let at = app.idp.last_access_token().expect("at");
    for (path, status) in [("/downapi/x", 502u16), ("/slowapi/slow", 504)] {
        let resp = app.get_api(path).await;
        let v = assert_json_error(resp, status).await;
        assert!(
            !v.to_string().contains(&at),
            "{path}: token in the error body"
        );
    }
    assert_eq!(
        app.idp.refresh_grants(),
        0,
        "an upstream fault triggered a refresh"
    );
    assert_eq!(
        app.get_userinfo().await.status(),
        200,
        "an upstream fault touched the session"
    );
    // A slow API does not starve the others: with 20 calls hanging on it, the rest still answer.
    let cookie = app.session_cookie_header();
    let mut hanging = tokio::task::JoinSet::new();
    for i in 0..20 {
        let c = app.raw_client.clone();
        let url = app.url(&format!("/slowapi/slow/{i}"));
        let cookie = cookie.clone();
        hanging.spawn(async move {
            c.get(url)
                .header("X-CSRF", "1")
                .header("Cookie", cookie)
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
    }
    for _ in 0..50 {
        if app
            .api
            .requests()
            .iter()
            .filter(|r| r.uri.contains("/slow/"))
            .count()
            >= 20
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.get_api("/api/fast").await.status(), 200);
    assert_eq!(
        app.raw_client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
    while let Some(r) = hanging.join_next().await {
        assert_eq!(r.expect("task").expect("answered"), 504);
    }
}

#[tokio::test]
async fn case_097_sigterm_drains_and_persists_a_rotated_refresh_token() {
    let mut app = spawn_app_with(AppOptions::default().binary()).await;
    app.login().await;
    app.idp
        .behave(|b| b.refresh_delay = Duration::from_millis(1500));
    let refresh = {
        let req = app
            .client
            .post(app.url("/refreshtoken"))
            .header("X-CSRF", "1")
            .send();
        tokio::spawn(req)
    };
    for _ in 0..100 {
        if app.idp.refresh_grants() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let process = app.process.as_mut().expect("binary");
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(process.pid().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let resp = refresh
        .await
        .expect("task")
        .expect("the in-flight refresh was answered");
    assert_eq!(resp.status(), 200, "the in-flight refresh completed");
    let rotated = app.idp.last_refresh_token().expect("rotated rt");
    assert_eq!(process.wait_exit(Duration::from_secs(10)).await, Some(0));
    // The rotated refresh token reached the browser (cookie store) or the store (Redis): a new
    // instance refreshes with it.
    app.idp.behave(|b| b.refresh_delay = Duration::ZERO);
    let next = spawn_app_with(
        AppOptions::default()
            .idp(&app.idp)
            .api(&app.api)
            .same_store_as(&app),
    )
    .await;
    let r = next
        .raw_client
        .post(next.url("/refreshtoken"))
        .header("X-CSRF", "1")
        .header("Cookie", app.session_cookie_header())
        .send()
        .await
        .expect("refresh on the new instance");
    assert_eq!(
        r.status(),
        200,
        "the rotated refresh token was lost at shutdown"
    );
    let used = app
        .idp
        .token_requests()
        .last()
        .and_then(|t| t.get("refresh_token").map(str::to_string));
    assert_eq!(used, Some(rotated));
}

#[tokio::test]
async fn case_097_readiness_is_503_while_draining() {
    let mut app = spawn_app_with(AppOptions::default().binary()).await;
    app.login().await;
    let slow = {
        let req = app
            .client
            .get(app.url("/api/delay/3000"))
            .header("X-CSRF", "1")
            .send();
        tokio::spawn(req)
    };
    for _ in 0..100 {
        if app.api.requests().iter().any(|r| r.uri.contains("/delay/")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let process = app.process.as_mut().expect("binary");
    let pid = process.pid().to_string();
    assert!(std::process::Command::new("kill")
        .arg("-TERM")
        .arg(&pid)
        .status()
        .expect("kill")
        .success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = reqwest::Client::new()
        .get(app.url("/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match ready {
        Ok(r) => assert_eq!(r.status(), 503, "readiness while draining"),
        Err(e) => panic!("/readyz unreachable while in-flight requests drain: {e}"),
    }
    let _ = slow.await;
}

#[tokio::test]
async fn case_098_oversized_inputs() {
    let app = spawn_app_with(
        AppOptions::default()
            .server("max_header_bytes = 8192")
            .server("max_body_bytes = 1024"),
    )
    .await;
    app.login().await;
    // Header limit.
    let resp = app
        .client
        .get(app.url("/api/x"))
        .header("X-CSRF", "1")
        .header("X-Big", "a".repeat(9000))
        .send()
        .await
        .expect("GET");
    assert_json_error(resp, 431).await;
    // Many cookies adding up past the limit.
    let cookies: String = (0..200)
        .map(|i| format!("c{i}={}; ", "v".repeat(60)))
        .collect();
    let resp = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", cookies)
        .send()
        .await
        .expect("GET");
    assert!(resp.status().is_client_error(), "{}", resp.status());
    // URL limit: a 100 KB and a 300 KB request target.
    for n in [100_000usize, 300_000] {
        let req = format!(
            "GET /api/{} HTTP/1.1\r\nHost: {}\r\nX-CSRF: 1\r\nConnection: close\r\n\r\n",
            "a".repeat(n),
            app.addr
        );
        let (raw, _) = raw_exchange(app.addr, req.as_bytes(), Duration::from_secs(10)).await;
        let s = status_of(&raw);
        assert!(
            raw.is_empty() || s.is_some_and(|s| (400..=499).contains(&s)),
            "{n}-byte URL: {:.200}",
            raw
        );
    }
    // Body limit with a declared length, and streamed (chunked) without one.
    let resp = app
        .client
        .post(app.url("/api/upload"))
        .header("X-CSRF", "1")
        .body(vec![b'x'; 4096])
        .send()
        .await
        .expect("POST");
    assert_json_error(resp, 413).await;
    for r in app.api.requests() {
        assert!(
            r.body_len <= 1024,
            "{} bytes reached the API over a 1024-byte limit",
            r.body_len
        );
    }
    assert_eq!(app.get_userinfo().await.status(), 200);
}

#[tokio::test]
async fn case_098_streamed_body_over_the_limit_is_413() {
    let app = spawn_app_with(AppOptions::default().server("max_body_bytes = 1024")).await;
    app.login().await;
    let cookie = app.session_cookie_header();
    let mut req = format!(
        "POST /api/upload-chunked HTTP/1.1\r\nHost: {}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.addr
    );
    for _ in 0..8 {
        req.push_str(&format!("400\r\n{}\r\n", "y".repeat(1024)));
    }
    req.push_str("0\r\n\r\n");
    let (raw, _) = raw_exchange(app.addr, req.as_bytes(), Duration::from_secs(10)).await;
    let s = status_of(&raw);
    assert_eq!(s, Some(413), "a chunked body over the limit: {raw:.300}");
    for r in app.api.requests() {
        assert!(r.body_len <= 1024, "{} bytes reached the API", r.body_len);
    }
}

#[tokio::test]
async fn case_099_slow_headers_and_bodies_are_cut_off() {
    let app = spawn_app_with(AppOptions::default().server("header_read_timeout_s = 1")).await;
    app.login().await;
    // Headers one byte at a time, never finished: closed.
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    for b in b"GET /healthz HTTP/1.1\r\nHo" {
        if s.write_all(&[*b]).await.is_err() {
            break; // already closed by the server
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "a slowloris connection stays open");
    // A body trickled to an API route: bounded by the route's timeout (504), never unbounded.
    let cookie = app.session_cookie_header();
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "POST /slowapi/upload HTTP/1.1\r\nHost: {}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\nContent-Length: 1000\r\n\r\nabc",
        app.addr
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let (raw, _) = read_until_close(&mut s, Duration::from_secs(20)).await;
    assert!(
        status_of(&raw).is_some_and(|st| st == 504 || st == 408 || st == 400),
        "a trickled body was not cut off in time: {raw:?}"
    );
}

#[tokio::test]
async fn case_099_stalled_body_on_own_endpoint_is_cut_off() {
    let app = spawn_app_with(AppOptions::default().server("header_read_timeout_s = 1")).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "POST /backchannel-logout HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nlogout_token=",
        app.addr
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(20)).await;
    assert!(
        closed,
        "a stalled request body keeps the connection for more than 20 s"
    );
}

#[tokio::test]
async fn case_100_secrets_never_reach_the_logs_even_on_failures() {
    let app = spawn_app_with(AppOptions::default().binary()).await;
    let mut secrets: Vec<String> = vec![CLIENT_SECRET.to_string(), session_key(7)];
    // A normal login, then failures of every stage.
    let p = app.start_login(Some("/after?x=1")).await;
    secrets.push(p.state.clone());
    secrets.extend(p.nonce.clone());
    assert_eq!(app.finish_login(&p).await.status(), 302);
    secrets.extend(app.cookies().into_iter().map(|(_, v)| v));
    // Wrong state, foreign code, IdP error, bad iss.
    let bad = app.start_login(None).await;
    secrets.push(bad.state.clone());
    let _ = app
        .callback(&[("code", "leaky-code-0123456789"), ("state", &bad.state)])
        .await;
    let _ = app
        .callback(&[
            ("code", "leaky-code-abcdefghij"),
            ("state", "leaky-state-0123456789"),
        ])
        .await;
    let other = app.start_login(None).await;
    secrets.push(other.state.clone());
    let _ = app
        .callback(&[
            ("error", "access_denied"),
            ("error_description", "leaky-desc-0123456789"),
            ("state", &other.state),
        ])
        .await;
    // Tampered and foreign session cookies.
    let _ = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("Cookie", "tg_session=leaky-cookie-0123456789abcdef")
        .send()
        .await;
    // Bad ID token at a login.
    app.idp.behave(|b| b.signer = Signer::AlgNone);
    let p2 = app.start_login(None).await;
    secrets.push(p2.state.clone());
    let _ = app.finish_login(&p2).await;
    app.idp.behave(|b| b.signer = Signer::Rsa1);
    // API with a secret query, an upstream failure, a refresh refused.
    let _ = app
        .get_api("/api/q?access_token=leaky-query-0123456789")
        .await;
    let _ = app
        .get_api("/downapi/x?secret=leaky-query-abcdefghij")
        .await;
    app.idp.behave(|b| b.refresh = RefreshMode::InvalidGrant);
    let _ = app.post_refresh().await;
    // A back-channel logout token.
    let lt = sign_jwt(
        &Behaviour::default(),
        &logout_claims(&app.idp, Some("s"), Some(DEFAULT_SUB)),
    );
    let _ = post_logout_token(&app, &lt).await;
    secrets.push(lt);
    secrets.extend(app.idp.all_issued_secrets());
    for req in app.idp.token_requests() {
        for name in ["code", "code_verifier", "refresh_token", "client_secret"] {
            if let Some(v) = req.get(name) {
                secrets.push(v.to_string());
            }
        }
        if let Some(a) = &req.authorization {
            secrets.push(a.trim_start_matches("Basic ").to_string());
        }
    }
    for s in [
        "leaky-code-0123456789",
        "leaky-code-abcdefghij",
        "leaky-state-0123456789",
        "leaky-cookie-0123456789abcdef",
        "leaky-query-0123456789",
        "leaky-query-abcdefghij",
    ] {
        secrets.push(s.to_string());
    }
    secrets.retain(|s| s.len() >= 12);
    let process = app.process.as_ref().expect("binary");
    let mut logs = String::new();
    for _ in 0..50 {
        logs = process.logs();
        if logs.contains("/backchannel-logout") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        logs.contains("/oauth-callback"),
        "the log has request lines:\n{logs}"
    );
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret appears in the log: {s}\n{logs}"
        );
    }
}
