//! Several tokengate replicas sharing one Redis and one real IdP (oidc-provider, which rotates
//! refresh tokens): one session, many concurrent calls spread over the replicas right after the
//! access token expired → every call succeeds and the IdP sees exactly ONE refresh grant.
//! Logout on one replica ends the session on all; the IdP's back-channel logout reaches them too.

use std::time::Duration;

use serde_json::Value;

use crate::oidc_provider::{futures_join_all, parse_form, Stack, StackOptions};
use crate::redis_server::RedisServer;

fn redis_session(redis: &RedisServer) -> String {
    format!("store = \"redis\"\nredis_url = \"{}\"", redis.url())
}

async fn three_replicas(redis: &RedisServer, ttl: u64) -> Stack {
    Stack::start_with(StackOptions {
        replicas: 3,
        // A slow token endpoint: every replica sees the expired token while the refresh is
        // under way, so only coordination can keep it to one grant.
        token_delay_ms: 300,
        access_token_ttl: Some(ttl),
        // Refresh only once the token has really expired.
        extra_oauth: "refresh_skew_s = 0".into(),
        extra_session: redis_session(redis),
        ..StackOptions::default()
    })
    .await
}

/// Waits (bounded) until the IdP's access tokens issued at login have expired.
async fn wait_past(seconds: u64) {
    tokio::time::sleep(Duration::from_secs(seconds)).await;
}

async fn concurrent_calls_over_replicas(stack: &Stack, n: usize) -> Vec<u16> {
    let calls = (0..n).map(|i| {
        let base = &stack.bases[i % stack.bases.len()];
        stack
            .browser
            .get(format!("{base}/api/call{i}"))
            .header("X-CSRF", "1")
            .send()
    });
    futures_join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("api call").status().as_u16())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_concurrent_calls_on_three_replicas_after_expiry_make_one_refresh_grant() {
    let redis = RedisServer::start().await;
    let stack = three_replicas(&redis, 4).await;
    assert_eq!(stack.login("carol", "/").await.status(), 302);
    // Every replica reads the same session.
    for b in &stack.bases {
        let r = stack
            .browser
            .get(format!("{b}/userinfo"))
            .send()
            .await
            .expect("userinfo");
        assert_eq!(r.status(), 200, "replica {b}");
    }
    wait_past(5).await;
    let statuses = concurrent_calls_over_replicas(&stack, 60).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        stack.refresh_grants().await,
        1,
        "60 calls over 3 replicas share ONE refresh grant"
    );
    // The rotated refresh token was stored for all: a later refresh on another replica works.
    let r = stack
        .browser
        .post(format!("{}/refreshtoken", stack.bases[2]))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("refresh");
    assert_eq!(r.status(), 200);
    assert_eq!(stack.refresh_grants().await, 2);
}

#[tokio::test]
async fn logout_on_one_replica_ends_the_session_on_all() {
    let redis = RedisServer::start().await;
    let stack = three_replicas(&redis, 300).await;
    assert_eq!(stack.login("dave", "/").await.status(), 302);
    let before = stack.cookie_header();
    let r = stack
        .browser
        .post(format!("{}/logout", stack.bases[1]))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 200);
    // Even a copy of the old cookie is worthless now, on every replica.
    let raw = reqwest::Client::new();
    for b in &stack.bases {
        let r = raw
            .get(format!("{b}/userinfo"))
            .header("Cookie", &before)
            .send()
            .await
            .expect("userinfo");
        assert_eq!(r.status(), 401, "replica {b}");
    }
}

#[tokio::test]
async fn idp_back_channel_logout_ends_the_session_on_every_replica() {
    let redis = RedisServer::start().await;
    let stack = Stack::start_with(StackOptions {
        replicas: 3,
        extra_session: redis_session(&redis),
        backchannel_logout: true,
        ..StackOptions::default()
    })
    .await;
    assert_eq!(stack.login("erin", "/").await.status(), 302);
    for b in &stack.bases {
        let r = stack
            .browser
            .get(format!("{b}/userinfo"))
            .send()
            .await
            .expect("userinfo");
        assert_eq!(r.status(), 200);
    }
    // The user signs out at the IdP itself (not through tokengate): the IdP posts a logout token
    // to /backchannel-logout.
    let r = stack
        .browser
        .get(format!("{}/session/end", stack.issuer))
        .send()
        .await
        .expect("end session");
    assert_eq!(r.status(), 200);
    let (action, mut fields) = parse_form(&r.text().await.expect("html"));
    fields.push(("logout".into(), "yes".into()));
    let r = stack
        .browser
        .post(&action)
        .form(&fields)
        .send()
        .await
        .expect("confirm");
    assert!(
        r.status().is_redirection() || r.status() == 200,
        "{}",
        r.status()
    );
    let mut ended = false;
    for _ in 0..100 {
        let r = stack
            .browser
            .get(format!("{}/userinfo", stack.bases[2]))
            .send()
            .await
            .expect("userinfo");
        if r.status() == 401 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ended, "the back-channel logout ended the session");
    for b in &stack.bases {
        let r = stack
            .browser
            .get(format!("{b}/userinfo"))
            .send()
            .await
            .expect("userinfo");
        assert_eq!(r.status(), 401, "replica {b}");
    }
}

#[tokio::test]
async fn redis_outage_answers_503_and_recovers_with_sessions_intact() {
    let mut redis = RedisServer::start_persistent().await;
    let stack = three_replicas(&redis, 300).await;
    assert_eq!(stack.login("frank", "/").await.status(), 302);
    let ok = |v: Vec<u16>| v.iter().all(|s| *s == 200);
    assert!(ok(concurrent_calls_over_replicas(&stack, 6).await));

    redis.kill();
    let down = concurrent_calls_over_replicas(&stack, 6).await;
    assert!(
        down.iter().all(|s| *s == 503),
        "while Redis is down: {down:?}"
    );
    for path in ["/userinfo", "/api/down"] {
        let r = stack
            .browser
            .get(format!("{}{path}", stack.bases[2]))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("call while down");
        assert_eq!(r.status(), 503, "{path}");
        let body: Value = r.json().await.expect("json error body");
        assert_eq!(body["error"], "temporarily_unavailable", "{path}: {body}");
    }
    let r = stack
        .browser
        .get(format!("{}/readyz", stack.base))
        .send()
        .await
        .expect("readyz");
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["checks"]["session_store"], false);
    // Unrelated requests do not wait on Redis.
    let r = stack
        .browser
        .get(format!("{}/healthz", stack.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);

    redis.restart().await;
    let mut recovered = false;
    for _ in 0..100 {
        if ok(concurrent_calls_over_replicas(&stack, 3).await) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        recovered,
        "service came back with the same session after Redis returned"
    );
    let r = stack
        .browser
        .get(format!("{}/userinfo", stack.bases[1]))
        .send()
        .await
        .expect("userinfo");
    assert_eq!(r.status(), 200, "the session survived the outage");
    for base in &stack.bases {
        let mut ready = false;
        for _ in 0..100 {
            let r = stack
                .browser
                .get(format!("{base}/readyz"))
                .send()
                .await
                .expect("readyz");
            if r.status() == 200 {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "{base}: /readyz is 200 again after Redis returned");
    }
}
