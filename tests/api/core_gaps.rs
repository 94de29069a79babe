//! Gaps the audit of the core flows found: client authentication variants at the token endpoint,
//! ID-token algorithms, metadata without OIDC discovery, the UserInfo cache, the pending-login
//! cap, logout and pending logins, a custom CSRF header, and proxy bodies that stream both ways.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::helpers::*;

/// How long a streaming step may take before the test concludes the body was buffered.
const STREAM_STEP: Duration = Duration::from_secs(20);

/// The one authorization_code request the IdP received.
fn code_grant_request(app: &TestApp) -> TokenRequest {
    let reqs: Vec<_> = app
        .idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type() == "authorization_code")
        .collect();
    assert_eq!(reqs.len(), 1, "authorization_code requests: {reqs:?}");
    reqs[0].clone()
}

async fn assert_logged_in_as(app: &TestApp, sub: &str) {
    let resp = app.get_userinfo().await;
    assert_eq!(resp.status(), 200, "GET /userinfo after the login");
    let v: Value = resp.json().await.expect("userinfo JSON");
    assert_eq!(v["sub"], sub);
}

// ---- 1. client_secret_post -------------------------------------------------------------------

#[tokio::test]
async fn client_secret_post_sends_the_credentials_in_the_body_and_no_authorization_header() {
    let app =
        spawn_app_with(AppOptions::default().oauth(r#"client_auth = "client_secret_post""#)).await;
    app.login().await;
    let r = code_grant_request(&app);
    assert_eq!(
        r.authorization, None,
        "client_secret_post must not send an Authorization header"
    );
    assert_eq!(r.all("client_id"), vec![CLIENT_ID], "client_id in the body");
    assert_eq!(
        r.all("client_secret"),
        vec![CLIENT_SECRET],
        "client_secret in the body"
    );
    assert_logged_in_as(&app, DEFAULT_SUB).await;

    // The refresh grant authenticates the same way.
    assert_eq!(app.post_refresh().await.status(), 200);
    let refresh = app
        .idp
        .token_requests()
        .into_iter()
        .find(|r| r.grant_type() == "refresh_token")
        .expect("a refresh_token request");
    assert_eq!(refresh.authorization, None);
    assert_eq!(refresh.all("client_id"), vec![CLIENT_ID]);
    assert_eq!(refresh.all("client_secret"), vec![CLIENT_SECRET]);
}

// ---- 2. public client ------------------------------------------------------------------------

async fn spawn_public_client(idp: &FakeIdp) -> TestApp {
    idp.behave(|b| b.public_client = true);
    spawn_app_with(
        AppOptions::default()
            .idp(idp)
            .without_client_secret()
            .oauth(r#"client_auth = "none""#),
    )
    .await
}

#[tokio::test]
async fn public_client_sends_client_id_and_pkce_verifier_but_no_secret() {
    let idp = FakeIdp::start().await;
    let app = spawn_public_client(&idp).await;
    let pending = app.start_login(None).await;
    let resp = app.finish_login(&pending).await;
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "public-client login answered {}",
        resp.status()
    );
    let r = code_grant_request(&app);
    assert_eq!(
        r.authorization, None,
        "a public client sends no credentials"
    );
    assert_eq!(r.all("client_id"), vec![CLIENT_ID], "client_id in the body");
    assert!(
        r.get("client_secret").is_none() && r.get("client_assertion").is_none(),
        "a public client sends no secret: {:?}",
        r.params
    );
    let verifier = r.get("code_verifier").expect("PKCE code_verifier sent");
    assert_eq!(
        s256(verifier),
        pending.code_challenge,
        "the verifier matches the challenge sent to /authorize"
    );
    assert_logged_in_as(&app, DEFAULT_SUB).await;
}

// ---- 3. HS256 without a client secret --------------------------------------------------------

#[tokio::test]
async fn hs256_id_token_is_refused_for_a_public_client() {
    let idp = FakeIdp::start().await;
    let app = spawn_public_client(&idp).await;
    // Whatever the MAC key, a client without a secret has nothing to verify it with.
    for key in [CLIENT_SECRET, ""] {
        app.idp.behave(|b| b.signer = Signer::Hs256(key.to_owned()));
        let pending = app.start_login(None).await;
        let resp = app.finish_login(&pending).await;
        assert_no_session_cookie_set(&resp);
        let v = assert_json_error_in(resp, 400..=499).await;
        assert!(v["error"].is_string());
        assert_eq!(
            app.get_userinfo().await.status(),
            401,
            "an HS256 ID token (key {key:?}) made a session"
        );
    }
    // Control: the same app logs in with an RS256 token.
    app.idp.behave(|b| b.signer = Signer::Rsa1);
    app.login().await;
    assert_logged_in_as(&app, DEFAULT_SUB).await;
}

// ---- 4. PS256 and EdDSA ----------------------------------------------------------------------

async fn login_signed_by(signer: Signer, published: Vec<PublishedKey>) -> (TestApp, u16) {
    let idp = FakeIdp::start().await;
    idp.behave(|b| {
        b.signer = signer;
        b.published_keys = published;
    });
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await;
    let pending = app.start_login(None).await;
    let status = app.finish_login(&pending).await.status().as_u16();
    (app, status)
}

fn id_token_alg(app: &TestApp) -> String {
    let t = app.idp.last_id_token().expect("an ID token was issued");
    jsonwebtoken::decode_header(&t)
        .map(|h| format!("{:?}", h.alg))
        .expect("ID token header")
}

#[tokio::test]
async fn ps256_and_eddsa_id_tokens_are_accepted_with_the_matching_published_key() {
    let all = vec![
        PublishedKey::Rsa1,
        PublishedKey::Ec1,
        PublishedKey::Rsa1Ps256,
        PublishedKey::Ed25519,
    ];
    for (signer, alg) in [(Signer::Ps256, "PS256"), (Signer::Ed25519, "EdDSA")] {
        let (app, status) = login_signed_by(signer.clone(), all.clone()).await;
        assert_eq!(id_token_alg(&app), alg);
        assert!(
            status == 302 || status == 303,
            "{alg}: a valid ID token was refused ({status})"
        );
        assert_logged_in_as(&app, DEFAULT_SUB).await;

        // Control: without the matching key in the JWKS the same kind of token is refused, so
        // the signature really was checked against that key.
        let without: Vec<_> = all
            .iter()
            .copied()
            .filter(|k| {
                !matches!(
                    (k, &signer),
                    (PublishedKey::Rsa1Ps256, Signer::Ps256)
                        | (PublishedKey::Ed25519, Signer::Ed25519)
                )
            })
            .collect();
        let (app, status) = login_signed_by(signer, without).await;
        assert!(
            (400..500).contains(&status),
            "{alg}: accepted without its key ({status})"
        );
        assert_eq!(app.get_userinfo().await.status(), 401);
    }
}

// ---- 5. metadata without OIDC discovery ------------------------------------------------------

#[tokio::test]
async fn rfc8414_metadata_alone_is_enough_to_become_ready_and_log_in() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| b.discovery = DiscoveryMode::Rfc8414Only);
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await; // waits for /readyz = 200
    assert!(
        idp.rfc8414_fetches() >= 1,
        "ready without fetching the RFC 8414 document"
    );
    let pending = app.start_login(None).await;
    assert!(
        pending
            .location
            .as_str()
            .starts_with(&format!("{}/authorize?", idp.issuer())),
        "authorize URL {} is not the RFC 8414 one",
        pending.location
    );
    let resp = app.finish_login(&pending).await;
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "login answered {}",
        resp.status()
    );
    assert_logged_in_as(&app, DEFAULT_SUB).await;
}

#[tokio::test]
async fn explicit_endpoints_work_without_any_discovery_document() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| b.discovery = DiscoveryMode::Unavailable);
    let base = idp.issuer().to_owned();
    let app = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .oauth(&format!(r#"authorization_endpoint = "{base}/authorize""#))
            .oauth(&format!(r#"token_endpoint = "{base}/token""#))
            .oauth(&format!(r#"jwks_uri = "{base}/jwks""#)),
    )
    .await;
    let pending = app.start_login(None).await;
    assert!(pending
        .location
        .as_str()
        .starts_with(&format!("{base}/authorize?")));
    let resp = app.finish_login(&pending).await;
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "login answered {}",
        resp.status()
    );
    assert_logged_in_as(&app, DEFAULT_SUB).await;
    assert_eq!(
        code_grant_request(&app).get("grant_type"),
        Some("authorization_code")
    );
}

// ---- 6. UserInfo cache -----------------------------------------------------------------------

#[tokio::test]
async fn userinfo_endpoint_answers_are_cached_per_session() {
    let app = spawn_app().await;
    app.login().await;
    for _ in 0..2 {
        let resp = app.get_userinfo().await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.expect("userinfo JSON");
        assert_eq!(v["sub"], DEFAULT_SUB);
        assert_eq!(v["name"], "Test User");
    }
    assert_eq!(
        app.idp.userinfo_calls(),
        1,
        "two /userinfo calls in one session asked the IdP more than once"
    );
    // Another session (another browser) has its own entry.
    let jar = Arc::new(reqwest::cookie::Jar::default());
    let other = new_browser(&jar);
    let p = app.start_login_with(&other, None).await;
    let code = app.idp.mint_code(p.grant());
    let iss = app.idp.issuer().to_owned();
    let resp = app
        .callback_with(
            &other,
            &[("code", &code), ("state", &p.state), ("iss", &iss)],
        )
        .await;
    assert!(resp.status() == 302 || resp.status() == 303);
    let resp = other
        .get(app.url("/userinfo"))
        .send()
        .await
        .expect("GET /userinfo");
    assert_eq!(resp.status(), 200);
    assert_eq!(app.idp.userinfo_calls(), 2);
}

// ---- 7. pending-login cap --------------------------------------------------------------------

#[tokio::test]
async fn over_the_pending_login_cap_the_oldest_transaction_is_dropped() {
    let app = spawn_app_with(AppOptions::default().oauth("max_pending_logins = 3")).await;
    let mut pending = Vec::new();
    for _ in 0..4 {
        pending.push(app.start_login(None).await);
    }
    let held: Vec<String> = app
        .cookies()
        .into_iter()
        .filter(|(n, _)| is_tx_cookie_name(n))
        .map(|(n, _)| n)
        .collect();
    let name = |p: &PendingLogin| format!("tg_tx_{}", p.state);
    assert_eq!(held.len(), 3, "the browser holds {held:?}");
    assert!(
        !held.contains(&name(&pending[0])),
        "the oldest login survived the cap: {held:?}"
    );
    for p in &pending[1..] {
        assert!(
            held.contains(&name(p)),
            "a newer login was dropped: {held:?}"
        );
    }

    // The newest completes (a successful callback leaves other pending logins alone) ...
    let resp = app.finish_login(&pending[3]).await;
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "newest login answered {}",
        resp.status()
    );
    assert_logged_in_as(&app, DEFAULT_SUB).await;
    // ... and the oldest one's callback is refused.
    let resp = app.finish_login(&pending[0]).await;
    let v = assert_json_error(resp, 400).await;
    assert_eq!(v["error"], "invalid_request");
}

// ---- 8. logout and pending logins ------------------------------------------------------------

fn tx_cookies_held(app: &TestApp) -> Vec<String> {
    app.cookies()
        .into_iter()
        .filter(|(n, _)| is_tx_cookie_name(n))
        .map(|(n, _)| n)
        .collect()
}

#[tokio::test]
async fn logout_clears_pending_login_transaction_cookies() {
    let app = spawn_app().await;
    app.login().await;
    // Another tab started a login that never came back.
    let pending = app.start_login(None).await;
    assert_eq!(tx_cookies_held(&app).len(), 1);

    let resp = app.post_logout().await;
    assert_eq!(resp.status(), 200);
    let cleared: Vec<_> = set_cookies(&resp)
        .into_iter()
        .filter(|c| is_tx_cookie_name(&c.name) && c.is_removal())
        .map(|c| c.name)
        .collect();
    assert_eq!(
        cleared,
        vec![format!("tg_tx_{}", pending.state)],
        "logout must clear the pending transaction cookie"
    );
    assert!(tx_cookies_held(&app).is_empty());
    // The abandoned login cannot be completed after logout.
    let v = assert_json_error(app.finish_login(&pending).await, 400).await;
    assert_eq!(v["error"], "invalid_request");
    assert_eq!(app.get_userinfo().await.status(), 401);
}

#[tokio::test]
async fn logout_without_a_session_still_clears_pending_logins() {
    let app = spawn_app().await;
    app.start_login(None).await;
    app.start_login(None).await;
    assert_eq!(tx_cookies_held(&app).len(), 2);
    let resp = app.post_logout().await;
    assert_eq!(resp.status(), 200);
    assert!(
        tx_cookies_held(&app).is_empty(),
        "pending logins survived logout: {:?}",
        tx_cookies_held(&app)
    );
}

// ---- 9. custom CSRF header -------------------------------------------------------------------

#[tokio::test]
async fn a_custom_csrf_header_name_is_the_one_required() {
    let app =
        spawn_app_with(AppOptions::default().toml("[csrf]\nheader = \"X-Requested-By\"")).await;
    app.login().await;
    let send = |method: &str, path: &str, header: &str| {
        let req = match method {
            "POST" => app.client.post(app.url(path)),
            _ => app.client.get(app.url(path)),
        };
        req.header(header, "1").send()
    };
    // Logout last: it ends the session.
    let protected = [
        ("GET", "/api/x"),
        ("POST", "/refreshtoken"),
        ("POST", "/logout"),
    ];
    for (method, path) in protected {
        let resp = send(method, path, "X-CSRF").await.expect("send");
        let v = assert_json_error(resp, 403).await;
        assert!(v["error"].is_string(), "{method} {path}");
    }
    assert!(
        app.api.requests().is_empty(),
        "X-CSRF alone reached the API"
    );
    assert_eq!(app.idp.refresh_grants(), 0);
    for (method, path) in protected {
        let resp = send(method, path, "X-Requested-By").await.expect("send");
        assert_eq!(
            resp.status(),
            200,
            "{method} {path} with the configured header"
        );
    }
    assert_eq!(app.api.requests().len(), 1);
    assert_eq!(app.idp.refresh_grants(), 1);
    assert_eq!(app.get_userinfo().await.status(), 401, "logout ran");
}

// ---- 10. streaming bodies --------------------------------------------------------------------

/// An upstream for uploads: tells the test when the first body bytes arrived, then reads the
/// rest and answers how many bytes it got.
struct UploadUpstream {
    url: String,
    first_bytes: oneshot::Receiver<usize>,
}

async fn upload_upstream() -> UploadUpstream {
    type Tx = Arc<Mutex<Option<oneshot::Sender<usize>>>>;
    async fn handler(State(tx): State<Tx>, body: Body) -> Json<Value> {
        let mut body = body;
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                if total == 0 && !data.is_empty() {
                    if let Some(tx) = tx.lock().expect("lock").take() {
                        let _ = tx.send(data.len());
                    }
                }
                total += data.len();
            }
        }
        Json(json!({ "received": total }))
    }
    let (tx, rx) = oneshot::channel();
    let state: Tx = Arc::new(Mutex::new(Some(tx)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = Router::new()
        .route("/stream/upload", post(handler))
        .with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    UploadUpstream {
        url: format!("http://{addr}"),
        first_bytes: rx,
    }
}

fn stream_route(upstream: &str) -> String {
    format!("[[routes]]\nprefix = \"/stream\"\nupstream = \"{upstream}\"\ntimeout_s = 60")
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

#[tokio::test]
async fn proxied_upload_reaches_the_upstream_before_the_client_has_sent_it_all() {
    let mut upstream = upload_upstream().await;
    let app = spawn_app_with(AppOptions::default().toml(&stream_route(&upstream.url))).await;
    app.login().await;

    let mut conn = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "POST /stream/upload HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\nX-CSRF: 1\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        app.addr,
        app.session_cookie_header()
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    let first = vec![b'a'; 16 * 1024];
    conn.write_all(&chunk(&first)).await.expect("first chunk");
    conn.flush().await.expect("flush");

    // The client holds the rest back until the upstream has the first bytes: a proxy that
    // buffered the body would wait for the end forever.
    let got = tokio::time::timeout(STREAM_STEP, &mut upstream.first_bytes)
        .await
        .expect(
            "the upstream got no byte while the client was still sending: the upload is buffered",
        )
        .expect("upload handler");
    assert!(got > 0);

    let rest = vec![b'b'; 64 * 1024];
    for _ in 0..16 {
        conn.write_all(&chunk(&rest)).await.expect("chunk");
    }
    conn.write_all(b"0\r\n\r\n").await.expect("last chunk");
    let mut answer = Vec::new();
    tokio::time::timeout(STREAM_STEP, conn.read_to_end(&mut answer))
        .await
        .expect("an answer after the upload")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "answer: {text:.300}");
    let expected = first.len() + 16 * rest.len();
    assert!(
        text.contains(&format!("\"received\":{expected}")),
        "the upstream did not get the whole body ({expected} bytes): {text:.300}"
    );
}

/// A raw HTTP/1.1 upstream that sends the head and a first chunk, then holds the rest of the
/// body until `release` fires.
async fn download_upstream(
    first: Vec<u8>,
    rest: Vec<u8>,
    rest_chunks: usize,
    release: oneshot::Receiver<()>,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                        Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
        out.extend(chunk(&first));
        if conn.write_all(&out).await.is_err() || conn.flush().await.is_err() {
            return;
        }
        // Nothing more until the test client has the first chunk in hand.
        if tokio::time::timeout(STREAM_STEP, release).await.is_err() {
            return;
        }
        for _ in 0..rest_chunks {
            if conn.write_all(&chunk(&rest)).await.is_err() {
                return;
            }
        }
        let _ = conn.write_all(b"0\r\n\r\n").await;
        let _ = conn.flush().await;
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn proxied_download_reaches_the_client_while_the_upstream_still_holds_the_rest() {
    let first = vec![b'a'; 8 * 1024];
    let rest = vec![b'b'; 64 * 1024];
    let rest_chunks = 16;
    let (release, held) = oneshot::channel();
    let upstream = download_upstream(first.clone(), rest.clone(), rest_chunks, held).await;
    let app = spawn_app_with(AppOptions::default().toml(&stream_route(&upstream))).await;
    app.login().await;

    let send = app
        .raw_client
        .get(app.url("/stream/download"))
        .header("Cookie", app.session_cookie_header())
        .header("X-CSRF", "1")
        .send();
    let mut resp = tokio::time::timeout(STREAM_STEP, send)
        .await
        .expect("no response head while the upstream held its body back: the download is buffered")
        .expect("GET /stream/download");
    assert_eq!(resp.status(), 200);
    let mut received = tokio::time::timeout(STREAM_STEP, resp.chunk())
        .await
        .expect("no body bytes while the upstream held the rest back: the download is buffered")
        .expect("read")
        .expect("a first chunk")
        .to_vec();
    assert!(!received.is_empty() && received.iter().all(|b| *b == b'a'));
    release.send(()).expect("upstream waiting");

    while let Some(c) = tokio::time::timeout(STREAM_STEP, resp.chunk())
        .await
        .expect("the rest of the download")
        .expect("read")
    {
        received.extend_from_slice(&c);
    }
    assert_eq!(received.len(), first.len() + rest_chunks * rest.len());
    assert!(received[first.len()..].iter().all(|b| *b == b'b'));
}
