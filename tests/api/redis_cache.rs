//! `session.redis_cache_ms`: each replica keeps the sessions it read, and every write or delete
//! on any replica reaches those copies through Redis pub/sub. Two replicas, one real Redis, the
//! real IdP. The cache lifetime is a minute in every test, so whatever ends a copy sooner is the
//! invalidation (or the lost subscription), never its expiry.

use std::time::Duration;

use crate::oidc_provider::{Stack, StackOptions};
use crate::redis_server::RedisServer;

/// The channel tokengate announces session writes on (`session::redis_cache::CHANNEL`).
const CHANNEL: &str = "tg:sessions:changed";

async fn two_caching_replicas(redis: &RedisServer) -> Stack {
    Stack::start_with(StackOptions {
        replicas: 2,
        extra_session: format!(
            "store = \"redis\"\nredis_url = \"{}\"\nredis_cache_ms = 60000",
            redis.url()
        ),
        ..StackOptions::default()
    })
    .await
}

/// How many session reads (HMGET) Redis has answered so far.
fn session_reads(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_hmget:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// Waits (bounded) until both replicas are subscribed to the invalidation channel.
async fn both_subscribed(redis: &RedisServer) {
    for _ in 0..200 {
        let out = redis.cli(&["PUBSUB", "NUMSUB", CHANNEL]);
        if out.lines().nth(1).map(str::trim) == Some("2") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the replicas did not subscribe to {CHANNEL}");
}

async fn status(stack: &Stack, replica: usize, path: &str) -> u16 {
    stack
        .browser
        .get(format!("{}{path}", stack.bases[replica]))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("call")
        .status()
        .as_u16()
}

/// Calls `path` on `replica` until it answers `want` (at most `tries` times, 50 ms apart).
async fn until_status(stack: &Stack, replica: usize, path: &str, want: u16, tries: usize) -> bool {
    for _ in 0..tries {
        if status(stack, replica, path).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn repeat_calls_on_a_replica_read_redis_once_and_a_write_elsewhere_makes_it_read_again() {
    let redis = RedisServer::start().await;
    let stack = two_caching_replicas(&redis).await;
    both_subscribed(&redis).await;
    assert_eq!(stack.login("gina", "/").await.status(), 302);
    assert_eq!(status(&stack, 1, "/api/warm").await, 200);

    let before = session_reads(&redis);
    for i in 0..20 {
        assert_eq!(status(&stack, 1, &format!("/api/call{i}")).await, 200);
    }
    let reads = session_reads(&redis) - before;
    // One read after each (re)subscription at most: on a loaded CI machine a heartbeat that
    // stalls past its timeout makes the replica subscribe again, from an empty cache.
    assert!(
        reads <= 3,
        "20 calls read the session from Redis {reads} times"
    );
    // What an operator sees.
    let metrics = stack
        .browser
        .get(format!("{}/metrics", stack.bases[1]))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("tokengate_session_cache_up 1"),
        "{metrics}"
    );
    let hits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tokengate_session_cache_lookups_total{result=\"hit\"} "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a hit counter");
    assert!(hits >= 17, "{hits} hits in:\n{metrics}");

    // Another replica writes the session (a refresh): this replica's copy is dropped, so its
    // next call reads Redis again, well before the copy would have expired.
    let r = stack
        .browser
        .post(format!("{}/refreshtoken", stack.bases[0]))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("refresh");
    assert_eq!(r.status(), 200);
    let mut reread = false;
    for _ in 0..100 {
        let before = session_reads(&redis);
        assert_eq!(status(&stack, 1, "/api/after").await, 200);
        if session_reads(&redis) > before {
            reread = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reread,
        "the write on the other replica did not reach this one's copy"
    );
}

#[tokio::test]
async fn a_logout_on_one_replica_ends_the_copy_kept_by_the_other() {
    let redis = RedisServer::start().await;
    let stack = two_caching_replicas(&redis).await;
    both_subscribed(&redis).await;
    assert_eq!(stack.login("hank", "/").await.status(), 302);
    let cookie = stack.cookie_header();
    let raw = reqwest::Client::new();
    let userinfo = |base: &str| {
        raw.get(format!("{base}/userinfo"))
            .header("Cookie", &cookie)
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            userinfo(&stack.bases[1]).await.expect("userinfo").status(),
            200
        );
    }
    // A call that reads nothing from Redis: replica 1 serves its own copy (a few tries, in case
    // a stalled heartbeat on a loaded machine just made it subscribe again from empty).
    let mut served_locally = false;
    for _ in 0..5 {
        let before = session_reads(&redis);
        assert_eq!(
            userinfo(&stack.bases[1]).await.expect("userinfo").status(),
            200
        );
        if session_reads(&redis) == before {
            served_locally = true;
            break;
        }
    }
    assert!(served_locally, "replica 1 never served its own copy");

    let r = stack
        .browser
        .post(format!("{}/logout", stack.bases[0]))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 200);
    // The message takes a moment to arrive; the copy would live for a minute.
    let mut ended = false;
    for _ in 0..100 {
        if userinfo(&stack.bases[1]).await.expect("userinfo").status() == 401 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ended, "the copy outlived the logout on the other replica");
    for b in &stack.bases {
        assert_eq!(
            userinfo(b).await.expect("userinfo").status(),
            401,
            "replica {b}"
        );
    }
}

#[tokio::test]
async fn a_frozen_redis_turns_the_copies_off_and_they_come_back_with_it() {
    let redis = RedisServer::start().await;
    let stack = two_caching_replicas(&redis).await;
    both_subscribed(&redis).await;
    assert_eq!(stack.login("ivy", "/").await.status(), 302);
    for _ in 0..3 {
        assert_eq!(status(&stack, 1, "/api/warm").await, 200);
    }
    let frozen = redis.freeze();
    // A silent Redis cannot deliver invalidations: the heartbeat notices, the copy is no longer
    // served, and calls answer 503 like without a cache (long before the copy's minute is up).
    assert!(
        until_status(&stack, 1, "/api/frozen", 503, 100).await,
        "the copy was still served from a silent Redis"
    );
    frozen.thaw();
    assert!(
        until_status(&stack, 1, "/api/back", 200, 200).await,
        "service came back when Redis did"
    );
    both_subscribed(&redis).await;
}

#[tokio::test]
async fn a_killed_redis_turns_the_copies_off_and_the_session_comes_back_with_it() {
    let mut redis = RedisServer::start_persistent().await;
    let stack = two_caching_replicas(&redis).await;
    both_subscribed(&redis).await;
    assert_eq!(stack.login("jack", "/").await.status(), 302);
    for _ in 0..3 {
        assert_eq!(status(&stack, 1, "/api/warm").await, 200);
    }
    redis.kill();
    // The subscription's connection closes with the server: no copy is served after that.
    assert!(
        until_status(&stack, 1, "/api/down", 503, 100).await,
        "a copy was served while Redis was down"
    );
    redis.restart().await;
    assert!(
        until_status(&stack, 1, "/api/back", 200, 200).await,
        "the session came back with Redis"
    );
}

#[test]
fn the_cache_lifetime_is_checked_at_load() {
    let config = |extra: &str| {
        format!(
            "[oauth]\nissuer = \"http://127.0.0.1:9\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[session]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1:9\"\nkeys = [\"{}\"]\n{extra}",
            "A".repeat(43) + "="
        )
    };
    let ok = tokengate::config::Config::load(&config("redis_cache_ms = 2000"), vec![])
        .expect("a valid config");
    assert_eq!(ok.session.redis_cache, Duration::from_millis(2000));
    let off = tokengate::config::Config::load(&config(""), vec![]).expect("a valid config");
    assert_eq!(off.session.redis_cache, Duration::ZERO, "off by default");
    let msg = tokengate::config::Config::load(&config("redis_cache_ms = 600000"), vec![])
        .expect_err("too long")
        .to_string();
    assert!(
        msg.contains("session.redis_cache_ms: at most 60000"),
        "{msg}"
    );
    let env = tokengate::config::Config::load(
        &config(""),
        vec![("TOKENGATE_SESSION__REDIS_CACHE_MS".into(), "500".into())],
    )
    .expect("set from the environment");
    assert_eq!(env.session.redis_cache, Duration::from_millis(500));
}

/// On a Redis Cluster the announcement is published on the node that holds the session and
/// reaches a replica subscribed through another node (cluster-wide pub/sub): a refresh on one
/// replica puts the new token on the other's next API calls, and a logout ends its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_writes_reach_a_replica_subscribed_through_another_node() {
    use crate::helpers::*;
    use crate::redis_server::RedisCluster;

    let cluster = RedisCluster::start().await;
    let idp = FakeIdp::start().await;
    // Every node, starting with `first`: a replica subscribes through the first node it is given.
    let nodes_from = |first: usize| {
        (0..3)
            .map(|i| format!("redis://127.0.0.1:{}", cluster.ports[(first + i) % 3]))
            .collect::<Vec<_>>()
            .join(",")
    };
    let caching = |first: usize| {
        AppOptions {
            redis_url: Some(nodes_from(first)),
            ..AppOptions::default()
        }
        .session("redis_cache_ms = 60000")
    };
    let a = spawn_app_with(caching(0).idp(&idp)).await;
    a.login().await;
    let home = (0..3)
        .find(|i| {
            !cluster
                .cli_on(cluster.ports[*i], &["KEYS", "tg:{*}:s"])
                .trim()
                .is_empty()
        })
        .expect("the session is on one node");
    let other = (home + 1) % 3;
    let b = spawn_app_with(caching(other).idp(&idp)).await;
    // b subscribes (on readiness) through `other`, which does not hold the session; a did on node 0.
    let expected = if other == 0 { "2" } else { "1" };
    let mut subscribed = false;
    for _ in 0..200 {
        let out = cluster.cli_on(cluster.ports[other], &["PUBSUB", "NUMSUB", CHANNEL]);
        if out.lines().nth(1).map(str::trim) == Some(expected) {
            subscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        subscribed,
        "replica b did not subscribe through node {other}"
    );

    let cookie = a.session_cookie_header();
    let api_on_b = |path: &'static str| {
        b.raw_client
            .get(b.url(path))
            .header("Cookie", &cookie)
            .header("X-CSRF", "1")
            .send()
    };
    let first_token = idp.last_access_token().expect("access token");
    for _ in 0..3 {
        assert_eq!(api_on_b("/api/warm").await.expect("api").status(), 200);
    }
    assert_eq!(
        b.api.last().header("authorization"),
        Some(format!("Bearer {first_token}").as_str())
    );

    assert_eq!(a.post_refresh().await.status(), 200);
    let refreshed = idp.last_access_token().expect("access token");
    assert_ne!(refreshed, first_token);
    let mut fresh = false;
    for _ in 0..100 {
        assert_eq!(
            api_on_b("/api/after-refresh").await.expect("api").status(),
            200
        );
        if b.api.last().header("authorization") == Some(format!("Bearer {refreshed}").as_str()) {
            fresh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fresh,
        "replica b kept sending the token from before the refresh"
    );

    assert_eq!(a.post_logout().await.status(), 200);
    let mut ended = false;
    for _ in 0..100 {
        if api_on_b("/api/after-logout").await.expect("api").status() == 401 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ended, "replica b's copy outlived the logout");
}
