//! The reverse proxy: what reaches the API, what comes back, path escapes, upstream faults, and
//! refreshing (once) before forwarding.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

#[tokio::test]
async fn proxy_forwards_method_path_query_and_body_unchanged() {
    let app = spawn_app().await;
    app.login().await;
    let body = vec![b'x'; 100_000];
    let resp = app
        .client
        .put(app.url("/api/items/42?x=1&y=a%20b&z=%2Fenc"))
        .header("X-CSRF", "1")
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status(), 200);
    let rec = app.api.last();
    assert_eq!(rec.method, "PUT");
    assert_eq!(rec.uri, "/api/items/42?x=1&y=a%20b&z=%2Fenc");
    assert_eq!(rec.body_len, 100_000);
    assert_eq!(rec.header("content-type"), Some("application/octet-stream"));
}

/// The API sees its own host in `Host`, never the browser's, once: with a body (hyper's client)
/// and without (our own).
#[tokio::test]
async fn the_api_gets_its_own_host_once() {
    let app = spawn_app().await;
    app.login().await;
    let api_host = app.api.url().trim_start_matches("http://").to_string();
    assert_ne!(api_host, app.addr.to_string());
    assert_eq!(app.get_api("/api/no-body").await.status(), 200);
    let rec = app.api.last();
    assert_eq!(
        rec.header_all("host"),
        [api_host.as_str()],
        "{:?}",
        rec.headers
    );
    let resp = app
        .client
        .post(app.url("/api/with-body"))
        .header("X-CSRF", "1")
        .header("Host", "attacker.example")
        .body("{}")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 200);
    let rec = app.api.last();
    assert_eq!(rec.method, "POST");
    assert_eq!(
        rec.header_all("host"),
        [api_host.as_str()],
        "{:?}",
        rec.headers
    );
}

#[tokio::test]
async fn strip_prefix_route_forwards_the_rest_of_the_path() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app.get_api("/stripped/items?q=1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.api.last().uri, "/items?q=1");
}

#[tokio::test]
async fn paths_outside_every_route_prefix_are_not_proxied() {
    let app = spawn_app().await;
    app.login().await;
    let _ = app.get_api("/apix/secret").await;
    let _ = app.get_api("/ap").await;
    assert!(
        app.api.requests().is_empty(),
        "a path that only shares characters with /api was proxied"
    );
}

#[tokio::test]
async fn upstream_status_and_body_pass_through() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app.get_api("/api/status/418").await;
    assert_eq!(resp.status(), 418);
    let v: Value = resp.json().await.expect("echo JSON passes through");
    assert_eq!(v["uri"], "/api/status/418");
}

#[tokio::test]
async fn proxy_replaces_the_browser_authorization_with_the_access_token() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app
        .client
        .get(app.url("/api/me"))
        .header("X-CSRF", "1")
        .header("Authorization", "Basic YXR0YWNrZXI6cHc=")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let at = app.idp.last_access_token().expect("at");
    let rec = app.api.last();
    assert_eq!(
        rec.header_all("authorization"),
        vec![format!("Bearer {at}").as_str()]
    );
}

#[tokio::test]
async fn proxy_removes_tokengate_cookies_and_keeps_the_others() {
    let app = spawn_app().await;
    app.login().await;
    app.add_browser_cookie("theme=dark; Path=/");
    app.add_browser_cookie("tg_tx_leftover=zzz; Path=/");
    app.add_browser_cookie("other=1; Path=/");
    let resp = app.get_api("/api/cookies").await;
    assert_eq!(resp.status(), 200);
    let rec = app.api.last();
    let forwarded: Vec<(String, String)> = rec
        .header_all("cookie")
        .iter()
        .flat_map(|h| parse_cookie_header(h))
        .collect();
    let names: Vec<&str> = forwarded.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"theme") && names.contains(&"other"),
        "the SPA's cookies were dropped: {names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("tg_") || n.starts_with("__Host-tg_")),
        "tokengate cookies forwarded: {names:?}"
    );
    assert!(
        forwarded.iter().any(|(n, v)| n == "theme" && v == "dark"),
        "cookie value changed: {forwarded:?}"
    );
}

#[tokio::test]
async fn proxy_sends_no_cookie_header_of_ours_when_only_tokengate_cookies_exist() {
    let app = spawn_app().await;
    app.login().await;
    assert_eq!(app.get_api("/api/x").await.status(), 200);
    let rec = app.api.last();
    for h in rec.header_all("cookie") {
        assert!(!h.contains("tg_"), "tokengate cookie forwarded: {h}");
    }
}

#[tokio::test]
async fn proxy_strips_hop_by_hop_and_connection_listed_request_headers() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app
        .client
        .get(app.url("/api/hop"))
        .header("X-CSRF", "1")
        .header("Connection", "X-Secret-Hop")
        .header("X-Secret-Hop", "private")
        .header("Keep-Alive", "timeout=5")
        .header("Proxy-Authorization", "Basic cHJveHk6cHc=")
        .header("Proxy-Connection", "keep-alive")
        .header("X-Custom-Ok", "kept")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let rec = app.api.last();
    assert_eq!(
        rec.header("x-secret-hop"),
        None,
        "Connection-listed header forwarded"
    );
    assert_eq!(rec.header("keep-alive"), None);
    assert_eq!(rec.header("proxy-authorization"), None);
    assert_eq!(rec.header("proxy-connection"), None);
    for c in rec.header_all("connection") {
        assert!(
            !c.to_ascii_lowercase().contains("x-secret-hop"),
            "Connection header forwarded: {c}"
        );
    }
    assert_eq!(
        rec.header("x-custom-ok"),
        Some("kept"),
        "an end-to-end header was dropped"
    );
}

#[tokio::test]
async fn proxy_strips_hop_by_hop_response_headers_and_upstream_cookies_with_our_names() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app.get_api("/api/hop-response").await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(
        h.get("x-upstream-ok").and_then(|v| v.to_str().ok()),
        Some("yes"),
        "end-to-end response header dropped"
    );
    assert!(
        h.get("x-upstream-private").is_none(),
        "Connection-listed response header passed"
    );
    assert!(h.get("keep-alive").is_none(), "Keep-Alive passed");
    assert!(
        h.get("proxy-authenticate").is_none(),
        "Proxy-Authenticate passed"
    );
    let cookies = set_cookies(&resp);
    assert!(
        !cookies.iter().any(|c| c.value == "from-upstream"),
        "the API could overwrite tokengate's session cookie: {cookies:?}"
    );
    assert!(
        cookies
            .iter()
            .any(|c| c.name == "app_pref" && c.value == "blue"),
        "the API's own cookie was dropped: {cookies:?}"
    );
    // The browser's session survived.
    assert_eq!(app.get_userinfo().await.status(), 200);
}

/// The fields of an answer tokengate's rules do not read reach the browser as they came (ours
/// written past the header map, see `proxy::passthrough`), on both ways an answer leaves: our
/// server loop, and hyper's connection (an HTTP/1.0 request is handed to hyper); the fields the
/// rules do read are still ruled.
#[tokio::test]
async fn end_to_end_answer_fields_arrive_whole_and_the_rules_still_hold() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app.get_api("/api/pass-response").await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    let all = |n: &str| -> Vec<&str> {
        h.get_all(n)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    };
    assert_eq!(all("x-upstream-ok"), ["yes"]);
    assert_eq!(all("x-upstream-multi"), ["a", "b: c"]);
    assert_eq!(all("etag"), ["\"v1\""]);
    // An answer that sets a cookie is never stored by a shared cache: the API's choice is
    // replaced, not joined.
    assert_eq!(all("cache-control"), ["no-store"]);
    assert_eq!(all("date").len(), 1, "one Date: {h:?}");
    assert_eq!(all("content-length").len(), 1, "{h:?}");
    let id = all("x-request-id");
    assert_eq!(id.len(), 1, "{h:?}");
    assert_ne!(id[0], "from-the-api", "the request id is tokengate's");
    let cookies = set_cookies(&resp);
    assert!(
        !cookies.iter().any(|c| c.value == "from-upstream"),
        "the API could overwrite tokengate's session cookie: {cookies:?}"
    );
    assert!(cookies.iter().any(|c| c.name == "app_pref"), "{cookies:?}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["method"], "GET");

    // HTTP/1.0: served by hyper, which knows only the map.
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "GET /api/pass-response HTTP/1.0\r\nHost: {}\r\nCookie: {}\r\nX-CSRF: 1\r\n\r\n",
        app.addr,
        app.session_cookie_header()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("http/1.0 200"), "{head}");
    for field in [
        "\r\nx-upstream-ok: yes\r\n",
        "\r\nx-upstream-multi: a\r\n",
        "\r\nx-upstream-multi: b: c\r\n",
        "\r\netag: \"v1\"\r\n",
        "\r\ncache-control: no-store\r\n",
        "\r\nset-cookie: app_pref=blue; path=/",
    ] {
        assert!(
            format!("{head}\r\n").contains(field),
            "{field:?} missing: {head}"
        );
    }
    assert_eq!(head.matches("\r\ndate:").count(), 1, "{head}");
    assert_eq!(head.matches("\r\ncache-control:").count(), 1, "{head}");
    assert!(!head.contains("from-upstream"), "{head}");
    assert!(!head.contains("from-the-api"), "{head}");
    assert!(body.contains("\"method\":\"get\""), "{body}");
}

#[tokio::test]
async fn proxy_sets_x_forwarded_headers_and_ignores_spoofed_ones() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app
        .client
        .get(app.url("/api/fwd"))
        .header("X-CSRF", "1")
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-Host", "evil.example")
        .header("X-Forwarded-Proto", "https")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let rec = app.api.last();
    let xff = rec.header_all("x-forwarded-for").join(",");
    let last_hop = xff.rsplit(',').map(str::trim).next().unwrap_or("");
    assert_eq!(
        last_hop, "127.0.0.1",
        "X-Forwarded-For must end with the real peer: {xff:?}"
    );
    assert_eq!(
        rec.header_all("x-forwarded-proto"),
        vec!["http"],
        "proto from an untrusted peer"
    );
    let public_host = app.public_url.trim_start_matches("http://");
    assert_eq!(
        rec.header_all("x-forwarded-host"),
        vec![public_host],
        "host from an untrusted peer"
    );
}

#[tokio::test]
async fn path_escape_attempts_are_400_and_never_reach_the_api() {
    let app = spawn_app().await;
    app.login().await;
    let cookie = app.session_cookie_header();
    let paths = [
        "/api/../admin",
        "/api/./../admin",
        "/api/%2e%2e/admin",
        "/api/%2E%2E/admin",
        "/api/.%2e/admin",
        "/api/%2e./admin",
        "/api/a%2fb",
        "/api/a%2Fb",
        "/api/..%2fadmin",
        "/api/a%5cb",
        "/api/a%5Cb",
        "/api/a\\b",
        "/api/..\\admin",
    ];
    for path in paths {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nX-CSRF: 1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
            app.addr
        );
        let (status, _) = raw_http(app.addr, &req).await;
        assert_eq!(status, 400, "path {path:?}");
    }
    assert!(
        app.api.requests().is_empty(),
        "escaped paths reached the API: {:?}",
        app.api
            .requests()
            .iter()
            .map(|r| r.uri.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn proxy_without_a_session_is_401_and_the_api_is_not_called() {
    let app = spawn_app().await;
    let resp = app.get_api("/api/x").await;
    assert_json_error(resp, 401).await;
    assert!(app.api.requests().is_empty());
}

#[tokio::test]
async fn upstream_down_is_502_json() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app.get_api("/downapi/x").await;
    let v = assert_json_error(resp, 502).await;
    let text = v.to_string();
    let at = app.idp.last_access_token().expect("at");
    assert!(!text.contains(&at), "token in the error body");
}

#[tokio::test]
async fn slow_upstream_is_504_json() {
    let app = spawn_app().await;
    app.login().await;
    let resp = app.get_api("/slowapi/slow").await;
    assert_json_error(resp, 504).await;
}

/// Logs in with an access token already inside the refresh window, then makes new tokens long-lived.
/// Logs in with a 2 s access token and waits until it is inside its refresh window (the window
/// is min(oauth.refresh_skew_s, half the token's lifetime) = 1 s here): nearly expired.
async fn login_with_nearly_expired_token(app: &TestApp) -> String {
    app.idp.behave(|b| b.access_token_ttl = 2);
    app.login().await;
    let stale = app.idp.last_access_token().expect("at");
    app.idp.behave(|b| b.access_token_ttl = 3600);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    stale
}

#[tokio::test]
async fn nearly_expired_access_token_is_refreshed_before_proxying() {
    let app = spawn_app().await;
    let stale = login_with_nearly_expired_token(&app).await;
    let resp = app.get_api("/api/data").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.idp.refresh_grants(), 1);
    let fresh = app.idp.last_access_token().expect("at");
    assert_ne!(fresh, stale);
    assert_eq!(
        app.api.last().header("authorization"),
        Some(format!("Bearer {fresh}").as_str())
    );
    // The refreshed tokens were stored: the next call needs no refresh.
    assert_eq!(app.get_api("/api/data").await.status(), 200);
    assert_eq!(
        app.idp.refresh_grants(),
        1,
        "the refreshed tokens were not kept in the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_an_expired_token_cause_exactly_one_refresh() {
    let app = spawn_app().await;
    login_with_nearly_expired_token(&app).await;
    // A slow refresh keeps the first grant in flight while the others arrive.
    app.idp
        .behave(|b| b.refresh_delay = Duration::from_millis(500));
    let cookie = app.session_cookie_header();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let client = app.raw_client.clone();
        let url = app.url(&format!("/api/concurrent/{i}"));
        let cookie = cookie.clone();
        tasks.spawn(async move {
            let resp = client
                .get(url)
                .header("X-CSRF", "1")
                .header("Cookie", cookie)
                .send()
                .await
                .expect("GET");
            resp.status().as_u16()
        });
    }
    let mut statuses = Vec::new();
    while let Some(s) = tasks.join_next().await {
        statuses.push(s.expect("task"));
    }
    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");
    assert_eq!(
        app.idp.refresh_grants(),
        1,
        "one session must spend its refresh token once"
    );
    let fresh = app.idp.last_access_token().expect("at");
    let auths: Vec<String> = app
        .api
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap_or("").to_owned())
        .collect();
    assert_eq!(auths.len(), 20);
    assert!(
        auths.iter().all(|a| *a == format!("Bearer {fresh}")),
        "some requests used another token"
    );
}

#[tokio::test]
async fn refresh_refused_while_proxying_is_401_and_clears_the_session() {
    let app = spawn_app().await;
    login_with_nearly_expired_token(&app).await;
    app.idp.behave(|b| b.refresh = RefreshMode::InvalidGrant);
    let resp = app.get_api("/api/data").await;
    assert_clears_session_cookie(&resp);
    assert_json_error(resp, 401).await;
    assert!(
        app.api.requests().is_empty(),
        "a stale token was forwarded after the refresh was refused"
    );
}

#[tokio::test]
async fn refreshed_session_cookie_is_sent_back_with_the_proxied_answer() {
    let app = spawn_app().await;
    login_with_nearly_expired_token(&app).await;
    let resp = app.get_api("/api/data").await;
    assert_eq!(resp.status(), 200);
    if redis_store() {
        // Server-side store: the cookie (a sealed id) stays; the new tokens are in Redis and were
        // the ones forwarded.
        assert_eq!(app.idp.refresh_grants(), 1);
        let fresh = app
            .idp
            .last_access_token()
            .expect("a refreshed access token");
        assert_eq!(
            app.api.last().header("authorization"),
            Some(format!("Bearer {fresh}").as_str())
        );
        return;
    }
    let set = session_cookies_set(&resp);
    assert!(
        !set.is_empty(),
        "the refreshed tokens were not written back to the cookie"
    );
    for c in set {
        assert!(
            c.http_only() && c.same_site().as_deref() == Some("strict"),
            "{}",
            c.raw
        );
    }
}

/// A bare HTTP/1.1 API on a raw socket: counts the connections it accepts and answers each
/// request `200 {"n":N}` (keep-alive); with `close_idle_after`, it closes a connection that has
/// been idle that long (as APIs do with their keep-alive timeout).
struct CountingApi {
    url: String,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingApi {
    async fn start(close_idle_after: Option<Duration>) -> CountingApi {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let read = match close_idle_after {
                            Some(idle) if buf.is_empty() => {
                                match tokio::time::timeout(idle, sock.read(&mut chunk)).await {
                                    Ok(r) => r,
                                    Err(_) => return, // idle too long: close
                                }
                            }
                            _ => sock.read(&mut chunk).await,
                        };
                        let Ok(got) = read else { return };
                        if got == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..got]);
                        // GET requests only: a request ends at its blank line.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let body = format!("{{\"n\":{n}}}");
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if sock.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        CountingApi { url, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn api_calls_reuse_the_upstream_connection() {
    let api = CountingApi::start(None).await;
    let app = spawn_app_with(AppOptions::default().toml(&format!(
        "[[routes]]\nprefix = \"/counted\"\nupstream = \"{}\"\n",
        api.url
    )))
    .await;
    app.login().await;
    for _ in 0..20 {
        let resp = app.get_api("/counted/x").await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["n"], 1, "every call on the first connection");
    }
    assert_eq!(api.connections(), 1);
}

#[tokio::test]
async fn an_upstream_that_closed_its_idle_connection_gets_a_new_one() {
    let api = CountingApi::start(Some(Duration::from_millis(100))).await;
    let app = spawn_app_with(AppOptions::default().toml(&format!(
        "[[routes]]\nprefix = \"/counted\"\nupstream = \"{}\"\n",
        api.url
    )))
    .await;
    app.login().await;
    for i in 1..=3 {
        let resp = app.get_api("/counted/x").await;
        assert_eq!(resp.status(), 200, "call {i}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["n"], i, "call {i} on a new connection");
        // Longer than the API keeps an idle connection open.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(api.connections(), 3);
}
