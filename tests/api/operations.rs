//! Operating tokengate: the real binary's logs never carry a secret, SIGTERM drains in-flight
//! requests and exits 0, limits answer with the right status and a JSON body, metrics and
//! readiness report what operators need.

use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::*;

#[tokio::test]
async fn logs_of_a_full_login_refresh_logout_never_contain_a_secret() {
    let app = spawn_app_with(AppOptions::default().binary()).await;
    let pending = app.start_login(Some("/after?x=1")).await;
    let callback = app.finish_login(&pending).await;
    assert_eq!(callback.status(), 302);
    let mut cookies: Vec<String> = app.cookies().into_iter().map(|(_, v)| v).collect();
    assert_eq!(app.get_api("/api/one").await.status(), 200);
    assert_eq!(app.post_refresh().await.status(), 200);
    cookies.extend(app.cookies().into_iter().map(|(_, v)| v));
    assert_eq!(app.get_userinfo().await.status(), 200);
    assert_eq!(
        app.get_api("/api/two?token=query-secret-xyz")
            .await
            .status(),
        200
    );
    assert_eq!(app.post_logout().await.status(), 200);
    // A failing login too: errors are where secrets tend to leak.
    let bad = app.start_login(None).await;
    let r = app
        .callback(&[("code", "leaky-code-123456"), ("state", &bad.state)])
        .await;
    assert!(r.status().is_client_error() || r.status().is_server_error());

    let mut secrets: Vec<String> = app.idp.all_issued_secrets();
    for req in app.idp.token_requests() {
        for name in ["code", "code_verifier", "refresh_token"] {
            if let Some(v) = req.get(name) {
                secrets.push(v.to_owned());
            }
        }
    }
    secrets.extend(cookies);
    secrets.push(CLIENT_SECRET.to_owned());
    secrets.push(session_key(7));
    secrets.push(pending.state.clone());
    secrets.push("leaky-code-123456".to_owned());
    secrets.push("query-secret-xyz".to_owned());
    secrets.retain(|s| s.len() >= 8);
    assert!(
        secrets.len() >= 10,
        "the run produced secrets to look for: {secrets:?}"
    );

    // Give the log writer a moment to catch up with the last request line (bounded).
    let process = app.process.as_ref().expect("binary");
    let mut logs = String::new();
    for _ in 0..50 {
        logs = process.logs();
        if logs.contains("/logout") && logs.contains("/oauth-callback") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        logs.contains("/oauth-callback") && logs.contains("request_id"),
        "the log has request lines to search:\n{logs}"
    );
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret appears in the log: {s}\n{logs}"
        );
    }
}

/// Starts `n` slow API calls on the binary and waits until the API holds all of them.
async fn slow_calls_in_flight(
    app: &TestApp,
    n: usize,
    delay_ms: u64,
) -> Vec<tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let req = app
                .client
                .get(app.url(&format!("/api/delay/{delay_ms}?n={i}")))
                .header("X-CSRF", "1")
                .send();
            tokio::spawn(req)
        })
        .collect();
    for _ in 0..250 {
        let held = app
            .api
            .requests()
            .iter()
            .filter(|r| r.uri.contains("/delay/"))
            .count();
        if held >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    calls
}

fn signal(process: &BinaryProcess, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(process.pid().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn signal_drains_in_flight_requests_then_exits_0(sig: &str) {
    let mut app = spawn_app_with(AppOptions::default().binary()).await;
    app.login().await;
    let calls = slow_calls_in_flight(&app, 5, 1500).await;
    let process = app.process.as_mut().expect("binary");
    signal(process, sig);
    for call in calls {
        let resp = call
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("an in-flight request was dropped on SIG{sig}: {e}"));
        assert_eq!(resp.status(), 200, "an in-flight request completed");
    }
    let code = process.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "exit code after SIG{sig}");
    assert!(
        TcpStream::connect(app.addr).await.is_err(),
        "no longer accepting connections"
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    signal_drains_in_flight_requests_then_exits_0("TERM").await;
}

#[tokio::test]
async fn sigint_lets_in_flight_requests_finish_then_exits_0() {
    signal_drains_in_flight_requests_then_exits_0("INT").await;
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_shutdown_timeout() {
    let mut app = spawn_app_with(
        AppOptions::default()
            .binary()
            .server("shutdown_timeout_s = 1"),
    )
    .await;
    app.login().await;
    // A call the API holds for a minute: far beyond the one-second drain bound.
    let calls = slow_calls_in_flight(&app, 1, 60_000).await;
    let process = app.process.as_mut().expect("binary");
    signal(process, "TERM");
    let code = process.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        code,
        Some(0),
        "tokengate exits once the drain bound has passed"
    );
    let cut = calls
        .into_iter()
        .next()
        .expect("one call")
        .await
        .expect("task");
    assert!(
        cut.is_err() || cut.is_ok_and(|r| r.status() != 200),
        "the over-long request was cut, not completed"
    );
}

#[tokio::test]
async fn oversized_headers_are_431_json() {
    let app = spawn_app_with(AppOptions::default().server("max_header_bytes = 8192")).await;
    let resp = app
        .raw_client
        .get(app.url("/userinfo"))
        .header("X-Big", "a".repeat(9000))
        .send()
        .await
        .expect("GET");
    assert_json_error(resp, 431).await;
}

#[tokio::test]
async fn too_many_connections_are_503_json() {
    let app = spawn_app_with(AppOptions::default().server("max_connections = 1")).await;
    // The only permitted connection, held open.
    let _held = TcpStream::connect(app.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = TcpStream::connect(app.addr).await.expect("connect");
    second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (answer, closed) = read_until_close(&mut second, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("\"error\":\"temporarily_unavailable\""),
        "{answer}"
    );
    assert!(closed, "the refused connection is closed");
}

#[tokio::test]
async fn slow_headers_are_cut_off_after_the_header_read_timeout() {
    let app = spawn_app_with(AppOptions::default().server("header_read_timeout_s = 1")).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let (answer, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "a slowloris connection is closed by the server");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"invalid_request\""), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");

    // A kept-alive connection that simply goes quiet after its answer is closed without a 408.
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (answer, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "an idle keep-alive connection is closed too");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // (The status line, not any "408": the answer's random x-request-id can hold those digits.)
    assert!(
        !answer.contains("HTTP/1.1 408"),
        "an idle connection got a 408: {answer}"
    );
}

#[tokio::test]
async fn api_bodies_over_the_limit_are_413_json() {
    let app = spawn_app_with(AppOptions::default().server("max_body_bytes = 16")).await;
    app.login().await;
    let resp = app
        .client
        .post(app.url("/api/upload"))
        .header("X-CSRF", "1")
        .body(vec![b'x'; 100])
        .send()
        .await
        .expect("POST");
    assert_json_error(resp, 413).await;
    let small = app
        .client
        .post(app.url("/api/upload"))
        .header("X-CSRF", "1")
        .body(vec![b'x'; 10])
        .send()
        .await
        .expect("POST");
    assert_eq!(small.status(), 200);
}

#[tokio::test]
async fn metrics_count_requests_logins_refreshes_and_idp_calls() {
    let app = spawn_app().await;
    app.login().await;
    assert_eq!(app.get_api("/api/m").await.status(), 200);
    assert_eq!(app.post_refresh().await.status(), 200);
    let resp = app
        .raw_client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("text");
    for needle in [
        r#"tokengate_http_requests_total{route="/api",method="GET",status="2xx"} 1"#,
        r#"tokengate_logins_total{outcome="started",reason=""} 1"#,
        r#"tokengate_logins_total{outcome="completed",reason=""} 1"#,
        r#"tokengate_token_refreshes_total{outcome="ok"} 1"#,
        r#"tokengate_idp_request_duration_seconds_count{endpoint="token",outcome="ok"} 2"#,
        r#"tokengate_session_store_duration_seconds_count{op="load"}"#,
        "tokengate_pending_logins 0",
        "tokengate_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[tokio::test]
async fn metrics_can_live_on_their_own_listener() {
    let port = crate::redis_server::free_ports(1)[0];
    let app = spawn_app_with(
        AppOptions::default().server(&format!("metrics_listen = \"127.0.0.1:{port}\"")),
    )
    .await;
    let main = app
        .raw_client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("GET");
    assert_eq!(main.status(), 404, "not on the main listener");
    let own = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET");
    assert_eq!(own.status(), 200);
    assert!(own
        .text()
        .await
        .expect("text")
        .contains("tokengate_http_requests_total"));
}

#[tokio::test]
async fn readyz_names_each_check_and_is_503_until_the_idp_is_loaded() {
    let dead = dead_port_url().await;
    let app = spawn_app_with(AppOptions::default().issuer(&dead).no_wait()).await;
    let resp = app
        .raw_client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["checks"]["idp_metadata"], false);
    assert_eq!(v["checks"]["idp_jwks"], false);
    assert_eq!(v["checks"]["session_store"], true);
    let health = app
        .raw_client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("GET");
    assert_eq!(health.status(), 200, "alive even when not ready");
}

#[tokio::test]
async fn request_ids_are_accepted_or_generated_and_echoed() {
    let app = spawn_app().await;
    let given = app
        .raw_client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "abc-123")
        .send()
        .await
        .expect("GET");
    assert_eq!(given.headers()["x-request-id"], "abc-123");
    let made = app
        .raw_client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "bad id\twith tab")
        .send()
        .await
        .expect("GET");
    let id = made.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
}

#[tokio::test]
async fn idp_down_at_start_login_is_503_json_then_service_resumes_when_it_comes_up() {
    // Reserve an address, start tokengate against it while nothing listens there.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], crate::redis_server::free_ports(1)[0]));
    let issuer = format!("http://{addr}");
    let app = spawn_app_with(AppOptions::default().issuer(&issuer).no_wait()).await;
    let resp = app
        .raw_client
        .get(app.url("/login"))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2"),
        "a 503 says when to try again"
    );
    let v = assert_json_error(resp, 503).await;
    assert_eq!(v["error"], "temporarily_unavailable");

    // The IdP comes up; tokengate's retry loop (bounded backoff) loads its metadata by itself.
    let idp = FakeIdp::start_at(&addr.to_string()).await;
    let mut ready = false;
    for _ in 0..150 {
        let status = app
            .raw_client
            .get(app.url("/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if matches!(status, Ok(200)) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "tokengate became ready once the IdP was reachable");
    let resp = app
        .raw_client
        .get(app.url("/login"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 302);
    let location = resp.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(location.starts_with(idp.issuer()), "{location}");
}

#[tokio::test]
async fn json_logs_carry_the_request_and_trace_ids_which_also_reach_the_api() {
    let app = spawn_app_with(AppOptions::default().log("format = \"json\"")).await;
    app.login().await;
    let trace = "4bf92f3577b34da6a3ce929b0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let resp = app
        .client
        .get(app.url("/api/traced"))
        .header("X-CSRF", "1")
        .header("X-Request-Id", "req-42.a")
        .header("traceparent", &traceparent)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-42.a");
    // The API sees the same ids: one request can be followed across both logs.
    let seen = app.api.last();
    assert_eq!(seen.header("x-request-id"), Some("req-42.a"));
    assert_eq!(seen.header("traceparent"), Some(traceparent.as_str()));

    // A generated id is sent upstream too.
    let resp = app.get_api("/api/untraced").await;
    let made = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(app.api.last().header("x-request-id"), Some(made.as_str()));

    // Every log line is one JSON object; the request's line names its ids.
    let mut logs = String::new();
    for _ in 0..50 {
        logs = app.process.as_ref().expect("binary").logs();
        if logs.contains("/api/untraced") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines: Vec<Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let line = lines
        .iter()
        .find(|v| v["path"] == "/api/traced" && v["message"] == "request")
        .unwrap_or_else(|| panic!("no request line for /api/traced in:\n{logs}"));
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    let text = line.to_string();
    assert!(text.contains("req-42.a"), "request id missing: {text}");
    assert!(text.contains(trace), "trace id missing: {text}");
    assert!(
        lines
            .iter()
            .any(|v| v["path"] == "/api/untraced" && v.to_string().contains(&made)),
        "generated id not logged"
    );
}

#[tokio::test]
async fn metrics_count_failures_by_reason_and_every_idp_endpoint() {
    let app = spawn_app().await;
    // A login that fails (unknown state), then one that completes.
    let bad = app.callback(&[("code", "c"), ("state", "forged")]).await;
    assert_eq!(bad.status(), 400);
    app.login().await;
    assert_eq!(app.get_userinfo().await.status(), 200);
    // Upstream failures: unreachable (502) and too slow (504).
    assert_eq!(app.get_api("/downapi/x").await.status(), 502);
    assert_eq!(app.get_api("/slowapi/slow").await.status(), 504);
    // A refresh the IdP fails (transient), then one it refuses (fatal).
    app.idp.behave(|b| b.refresh = RefreshMode::ServerError);
    assert_eq!(app.post_refresh().await.status(), 503);
    tokio::time::sleep(Duration::from_millis(2100)).await; // past the back-off
    app.idp.behave(|b| b.refresh = RefreshMode::InvalidGrant);
    assert_eq!(app.post_refresh().await.status(), 401);
    // A logout revokes at the IdP (after a fresh login).
    app.idp.behave(|b| b.refresh = RefreshMode::Rotate);
    app.login().await;
    assert_eq!(app.post_logout().await.status(), 200);

    let text = app
        .raw_client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("text");
    for needle in [
        r#"tokengate_logins_total{outcome="failed",reason="invalid_request"} 1"#,
        r#"tokengate_logins_total{outcome="completed",reason=""} 2"#,
        r#"tokengate_http_requests_total{route="/oauth-callback",method="GET",status="4xx"} 1"#,
        r#"tokengate_upstream_errors_total{route="/downapi",kind="error"} 1"#,
        r#"tokengate_upstream_errors_total{route="/slowapi",kind="timeout"} 1"#,
        r#"tokengate_http_requests_total{route="/downapi",method="GET",status="5xx"} 1"#,
        r#"tokengate_token_refreshes_total{outcome="transient"} 1"#,
        r#"tokengate_token_refreshes_total{outcome="fatal"} 1"#,
        r#"tokengate_idp_request_duration_seconds_count{endpoint="discovery",outcome="ok"}"#,
        r#"tokengate_idp_request_duration_seconds_count{endpoint="jwks",outcome="ok"}"#,
        r#"tokengate_idp_request_duration_seconds_count{endpoint="userinfo",outcome="ok"}"#,
        r#"tokengate_idp_request_duration_seconds_count{endpoint="revocation",outcome="ok"}"#,
        r#"tokengate_idp_request_duration_seconds_count{endpoint="token",outcome="error"}"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[tokio::test]
async fn an_api_calls_cookies_count_toward_the_header_limit() {
    // Our server loop keeps a request's Cookie fields out of its header map: the limit must
    // still count them.
    let app = spawn_app_with(AppOptions::default().server("max_header_bytes = 8192")).await;
    app.login().await;
    let session = app.session_cookie_header();
    let call = |spa_cookie: String| {
        app.raw_client
            .get(app.url("/api/data"))
            .header("X-CSRF", "1")
            .header("Cookie", format!("{session}; big={spa_cookie}"))
            .send()
    };
    let seen = app.api.requests().len();
    let resp = call("a".repeat(9000)).await.expect("GET");
    assert_json_error(resp, 431).await;
    assert_eq!(
        app.api.requests().len(),
        seen,
        "the API got an oversized call"
    );

    let resp = call("b".repeat(2000)).await.expect("GET");
    assert_eq!(resp.status(), 200);
    let rec = app.api.last();
    assert_eq!(
        rec.header_all("cookie"),
        [format!("big={}", "b".repeat(2000))]
    );
    assert!(rec
        .header("authorization")
        .is_some_and(|a| a.starts_with("Bearer ")));
}
