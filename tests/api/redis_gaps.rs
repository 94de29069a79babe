//! The Redis store's remaining edges, each against a real `redis-server` of its own (so these run
//! in both suite passes): compare-and-swap refusing a stale write, the lease's compare-and-delete
//! release, a frozen (SIGSTOP) Redis, short idle timeouts (both stores) and the key's TTL, and a
//! real three-node Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use oauth2::{AccessToken, RefreshToken};
use serde_json::{json, Value};
use tokengate::session::seal::Sealer;
use tokengate::session::store::StoreError;
use tokengate::session::store_redis::RedisStore;
use tokengate::session::Session;

use crate::helpers::*;
use crate::redis_server::{RedisCluster, RedisServer};

const IDLE: Duration = Duration::from_secs(3600);
const ABSOLUTE: Duration = Duration::from_secs(86400);

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test redis")
}

fn store(redis: &RedisServer) -> Arc<RedisStore> {
    RedisStore::new(&redis.url(), Sealer::new(&[[9u8; 32]])).expect("RedisStore")
}

fn session(id: &str, access_token: &str) -> Session {
    let now = unix_now() as u64;
    Session {
        id: id.into(),
        access_token: AccessToken::new(access_token.into()),
        refresh_token: Some(RefreshToken::new(format!("rt-{access_token}"))),
        id_token: None,
        expires_at: Some(now + 300),
        lifetime: Some(300),
        scope: None,
        subject: DEFAULT_SUB.into(),
        idp_session_id: None,
        created_at: now,
        last_seen: now,
        generation: 0,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// Compare-and-swap and the refresh lease (the library API against a real Redis)
// ---------------------------------------------------------------------------------------------

/// Two replicas read generation 1; one refreshes (generation 2); the other's write of its older
/// copy (an idle touch, or a refresh that lost the race) is refused and the newer tokens stay.
#[tokio::test]
async fn a_stale_write_is_refused_and_the_newer_tokens_stay() {
    let redis = RedisServer::start().await;
    let store = store(&redis);
    let mut first = session("sid-cas", "at-1");
    store.put(&mut first, IDLE, ABSOLUTE).await.expect("put");
    assert_eq!(first.generation, 1);

    let mut a = store.read("sid-cas").await.expect("get").expect("stored");
    let mut b = store.read("sid-cas").await.expect("get").expect("stored");
    assert_eq!((a.generation, b.generation), (1, 1));

    a.access_token = AccessToken::new("at-2".into());
    store
        .put(&mut a, IDLE, ABSOLUTE)
        .await
        .expect("newer write");
    assert_eq!(a.generation, 2);

    b.last_seen += 1; // the idle-touch path
    let stale = store.put(&mut b, IDLE, ABSOLUTE).await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    assert_eq!(b.generation, 1, "a refused write does not advance the copy");
    b.access_token = AccessToken::new("at-lost-race".into()); // a refresh that lost the race
    let stale = store.put(&mut b, IDLE, ABSOLUTE).await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");

    // Generation 0 means "new session": it cannot overwrite an existing one either.
    let mut again = session("sid-cas", "at-evil");
    let fresh = store.put(&mut again, IDLE, ABSOLUTE).await;
    assert!(matches!(fresh, Err(StoreError::Conflict)), "{fresh:?}");

    let now = store.get("sid-cas").await.expect("get").expect("stored");
    assert_eq!(now.access_token.secret(), "at-2");
    assert_eq!(now.generation, 2);

    // Nor can a stale copy bring a deleted (logged out) session back.
    store.delete(&now).await.expect("delete");
    let resurrect = store.put(&mut a, IDLE, ABSOLUTE).await;
    assert!(
        matches!(resurrect, Err(StoreError::Conflict)),
        "{resurrect:?}"
    );
    assert!(store.get("sid-cas").await.expect("get").is_none());
}

/// A lease holder whose lease expired and was taken by another owner must not delete that
/// owner's lease when it finishes.
#[tokio::test]
async fn an_expired_lease_holder_does_not_release_the_next_owners_lease() {
    let redis = RedisServer::start().await;
    let store = store(&redis);
    let mut c = conn(&redis.url()).await;
    let key = "tg:{sid-lease}:lease";

    assert!(store
        .try_lease("sid-lease", "owner-a")
        .await
        .expect("lease"));
    assert!(
        !store
            .try_lease("sid-lease", "owner-b")
            .await
            .expect("lease"),
        "held by a"
    );
    // a's lease runs out (a stalled, e.g. a long GC pause or a slow IdP) ...
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(key)
        .arg(1)
        .query_async(&mut c)
        .await
        .expect("PEXPIRE");
    let mut gone = false;
    for _ in 0..200 {
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("EXISTS");
        if n == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone, "the lease expired");
    // ... and b takes it.
    assert!(store
        .try_lease("sid-lease", "owner-b")
        .await
        .expect("lease"));

    // a wakes up and releases "its" lease: nothing happens to b's.
    assert!(!store
        .release_lease("sid-lease", "owner-a")
        .await
        .expect("release"));
    let holder: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("GET");
    assert_eq!(holder.as_deref(), Some("owner-b"));
    assert!(
        !store
            .try_lease("sid-lease", "owner-c")
            .await
            .expect("lease"),
        "b still holds it"
    );

    // b's own release works.
    assert!(store
        .release_lease("sid-lease", "owner-b")
        .await
        .expect("release"));
    let holder: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("GET");
    assert_eq!(holder, None);
}

/// The per-call read goes over tokengate's own connection (one per thread, commands of
/// concurrent calls written together): sessions read at once on one thread each come back whole
/// and as their own, with credentials and a database number from the URL; a wrong password is
/// an error that does not repeat it.
#[tokio::test]
async fn sessions_read_at_once_on_one_thread_each_come_back_as_their_own() {
    let redis = RedisServer::start().await;
    assert_eq!(
        redis
            .cli(&["ACL", "SETUSER", "tg", "on", ">pw-1", "~*", "&*", "+@all"])
            .trim(),
        "OK"
    );
    let url = format!("redis://tg:pw-1@127.0.0.1:{}/2", redis.port);
    let store = RedisStore::new(&url, Sealer::new(&[[9u8; 32]])).expect("RedisStore");
    for i in 0..40 {
        let mut s = session(&format!("sid-{i}"), &format!("at-{i}"));
        store.put(&mut s, IDLE, ABSOLUTE).await.expect("put");
    }
    let in_db_2 = redis.cli(&["-n", "2", "KEYS", "tg:{*}:s"]);
    assert_eq!(in_db_2.lines().count(), 40, "in database 2: {in_db_2}");
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "0", "none in database 0");
    for _ in 0..3 {
        let reads = (0..40).rev().map(|i| {
            let store = &store;
            async move {
                let s = store
                    .get(&format!("sid-{i}"))
                    .await
                    .expect("read")
                    .expect("stored");
                assert_eq!(s.id, format!("sid-{i}"));
                assert_eq!(s.access_token.secret(), &format!("at-{i}"));
                assert_eq!(s.generation, 1);
            }
        });
        futures_util::future::join_all(reads).await;
    }
    assert!(store.get("sid-none").await.expect("read").is_none());

    let wrong = format!("redis://tg:pw-wrong@127.0.0.1:{}/2", redis.port);
    let store = RedisStore::new(&wrong, Sealer::new(&[[9u8; 32]])).expect("RedisStore");
    match store.get("sid-1").await {
        Err(StoreError::Unavailable(e)) => assert!(!e.contains("pw-wrong"), "{e}"),
        other => panic!("a wrong password read {other:?}"),
    }
}

/// Redis closes connections (`timeout`, `CLIENT KILL`, a proxy in between, a restart): the next
/// read finds its kept connection closed and asks again on a new one, without an error.
#[tokio::test]
async fn a_connection_redis_closed_is_replaced_without_an_error() {
    let redis = RedisServer::start().await;
    let store = store(&redis);
    let mut s = session("sid-kill", "at-kill");
    store.put(&mut s, IDLE, ABSOLUTE).await.expect("put");
    for round in 0..3 {
        let got = store.get("sid-kill").await.expect("read").expect("stored");
        assert_eq!(got.access_token.secret(), "at-kill", "round {round}");
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
        assert!(
            killed.trim().parse::<u32>().is_ok_and(|n| n >= 1),
            "tokengate's connections closed: {killed}"
        );
    }
    let got = store.get("sid-kill").await.expect("read after the kill");
    assert!(got.is_some());
}

// ---------------------------------------------------------------------------------------------
// A slow (frozen) Redis
// ---------------------------------------------------------------------------------------------

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Redis stops answering (SIGSTOP: connections stay open, nothing comes back). Session requests
/// get a 503 `temporarily_unavailable` (bounded by the Redis call timeout, not a hang), while
/// liveness and static files do not wait on Redis; once it resumes, so does service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_answers_503_then_recovers() {
    let redis = RedisServer::start().await;
    let app = spawn_app_with(AppOptions::default().redis(&redis)).await;
    app.login().await;
    assert_eq!(app.get_userinfo().await.status(), 200);

    let frozen = redis.freeze();
    let v = assert_json_error(app.get_userinfo().await, 503).await;
    assert_eq!(v["error"], "temporarily_unavailable", "{v}");
    let v = assert_json_error(app.get_api("/api/during-stall").await, 503).await;
    assert_eq!(v["error"], "temporarily_unavailable", "{v}");
    assert_eq!(get(&app, "/healthz").await.status(), 200);
    let spa = get(&app, "/index.html").await;
    assert_eq!(spa.status(), 200);
    assert!(spa.text().await.expect("body").contains("test spa"));
    let ready = get(&app, "/readyz").await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["checks"]["session_store"], false);
    // Operators see it in the metrics: failed session-store loads.
    let metrics = get(&app, "/metrics").await.text().await.expect("metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with(r#"tokengate_session_store_errors_total{op="load"}"#)
            && !l.ends_with(" 0")),
        "no session store error counted:\n{metrics}"
    );

    frozen.thaw();
    let mut back = false;
    for _ in 0..100 {
        let r = app.get_userinfo().await;
        assert_ne!(r.status(), 401, "the stall ended the session");
        if r.status() == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "session requests succeed again after Redis resumed");
    assert_eq!(app.get_api("/api/after-stall").await.status(), 200);
    let mut ready = false;
    for _ in 0..100 {
        if get(&app, "/readyz").await.status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "/readyz is 200 again");
}

// ---------------------------------------------------------------------------------------------
// Idle timeouts shorter than the touch interval
// ---------------------------------------------------------------------------------------------

const SHORT_IDLE_S: u64 = 4;

/// With `idle_timeout_s = 4`, a session used every second for longer than that stays alive
/// (it is touched often enough), while one left alone for longer expires. Both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_idle_timeout_keeps_an_active_session_and_ends_an_idle_one() {
    let line = format!("idle_timeout_s = {SHORT_IDLE_S}");
    let active = spawn_app_with(AppOptions::default().session(&line)).await;
    let idle = spawn_app_with(AppOptions::default().session(&line)).await;
    active.login().await;
    idle.login().await;
    let use_it = async {
        for i in 0..(SHORT_IDLE_S + 2) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let r = active.get_userinfo().await;
            assert_eq!(r.status(), 200, "active session, request {i}");
        }
    };
    let leave_it = tokio::time::sleep(Duration::from_secs(SHORT_IDLE_S + 2));
    tokio::join!(use_it, leave_it);
    assert_eq!(
        active.get_api("/api/still-here").await.status(),
        200,
        "active for longer than the idle timeout, still logged in"
    );
    let r = idle.get_userinfo().await;
    assert_json_error(r, 401).await;
}

async fn session_key_name(c: &mut redis::aio::MultiplexedConnection) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tg:{*}:s")
        .query_async(c)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].clone()
}

/// Redis TTL and expire time: `(now_ms measured before the query, PTTL)`.
async fn pttl(c: &mut redis::aio::MultiplexedConnection, key: &str) -> (u64, i64) {
    let before = now_ms();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(c)
        .await
        .expect("PTTL");
    (before, ttl)
}

/// The session key's TTL is the idle timeout and slides forward with use, but never past the
/// absolute deadline: the tokens leave Redis when the session's life ends.
#[tokio::test]
async fn the_session_keys_ttl_slides_with_use_but_never_past_the_absolute_deadline() {
    const ABS_S: u64 = 7;
    let redis = RedisServer::start().await;
    let app = spawn_app_with(
        AppOptions::default()
            .redis(&redis)
            .session(&format!("idle_timeout_s = {SHORT_IDLE_S}"))
            .session(&format!("absolute_timeout_s = {ABS_S}")),
    )
    .await;
    app.login().await;
    // The session was created at or before this second: its deadline is at or before this.
    let deadline_ms = (unix_now() as u64 + ABS_S) * 1000;
    let idle_ms = (SHORT_IDLE_S * 1000) as i64;
    let mut c = conn(&redis.url()).await;
    let key = session_key_name(&mut c).await;
    // The TTL is relative (PEXPIRE, immune to clock differences between hosts), so the key may
    // outlive the deadline by the time the write took to reach Redis: at most `write_ms`, the
    // duration of the request that wrote it.
    let within_deadline = |(at, ttl): (u64, i64), write_ms: u64, what: &str| {
        assert!(ttl > 0, "{what}: the key has a TTL ({ttl})");
        assert!(
            at + ttl as u64 <= deadline_ms + write_ms,
            "{what}: the key outlives the absolute deadline by {} ms (the write took {write_ms} ms)",
            at + ttl as u64 - deadline_ms
        );
    };
    let touch = || async {
        let started = now_ms();
        assert_eq!(app.get_userinfo().await.status(), 200);
        now_ms() - started
    };

    let t0 = pttl(&mut c, &key).await;
    assert!(t0.1 <= idle_ms, "TTL at login: {}", t0.1);
    within_deadline(t0, 0, "at login");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let t1 = pttl(&mut c, &key).await;
    assert!(t1.1 < t0.1, "the TTL runs down while unused");
    let write_ms = touch().await;
    let t2 = pttl(&mut c, &key).await;
    assert!(
        t2.1 > t1.1,
        "use slid the TTL forward ({} → {})",
        t1.1,
        t2.1
    );
    assert!(t2.1 <= idle_ms);
    within_deadline(t2, write_ms, "after a touch");

    // Less than the idle timeout is left of the session's life: a touch gives only that.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let write_ms = touch().await;
    let t3 = pttl(&mut c, &key).await;
    assert!(
        t3.1 < idle_ms,
        "capped by the absolute deadline: {} ms",
        t3.1
    );
    within_deadline(t3, write_ms, "near the deadline");

    // Past the deadline the key is gone by itself (before any request could delete it).
    while now_ms() < deadline_ms + 1000 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut c)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "the session's tokens left Redis at the deadline");
    assert_json_error(app.get_userinfo().await, 401).await;
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------------

fn logout_token(idp: &FakeIdp, sub: &str) -> String {
    let now = unix_now();
    let claims = json!({
        "iss": idp.issuer(),
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 120,
        "jti": format!("jti-{}", rand::random::<u64>()),
        "sub": sub,
        "events": { "http://schemas.openid.net/event/backchannel-logout": {} },
    });
    sign_jwt(&idp.behaviour(), &claims)
}

/// `session.redis_url` with every node of a real three-node cluster, comma-separated: login,
/// proxying, refresh, logout and back-channel logout work across two replicas (the session's
/// keys share a hash tag; the indexes live in other slots and are used key by key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_given_as_a_list_of_nodes_serves_the_whole_session_life() {
    let cluster = RedisCluster::start().await;
    let idp = FakeIdp::start().await;
    let on_cluster = || AppOptions {
        redis_url: Some(cluster.url()),
        ..AppOptions::default()
    };
    let a = spawn_app_with(on_cluster().idp(&idp)).await;
    let b = spawn_app_with(on_cluster().idp(&idp)).await;
    let ready = get(&a, "/readyz").await;
    assert_eq!(ready.status(), 200, "the cluster answers PING");

    a.login().await;
    assert_eq!(a.get_userinfo().await.status(), 200);
    let r = a.get_api("/api/on-the-cluster").await;
    assert_eq!(r.status(), 200);
    let at = idp.last_access_token().expect("access token");
    assert_eq!(
        a.api.last().header("authorization"),
        Some(format!("Bearer {at}").as_str())
    );
    // The same session from the other replica (the browser's cookie, as behind a balancer).
    let copied = a.session_cookie_header();
    let r = b
        .raw_client
        .get(b.url("/userinfo"))
        .header("Cookie", &copied)
        .send()
        .await
        .expect("userinfo");
    assert_eq!(
        r.status(),
        200,
        "replica b reads the session from the cluster"
    );

    let r = a.post_refresh().await;
    assert_eq!(r.status(), 200);
    assert_eq!(idp.refresh_grants(), 1);
    let refreshed = idp.last_access_token().expect("access token");
    assert_ne!(refreshed, at);
    assert_eq!(a.get_api("/api/after-refresh").await.status(), 200);
    assert_eq!(
        a.api.last().header("authorization"),
        Some(format!("Bearer {refreshed}").as_str())
    );

    let cookie = a.session_cookie_header();
    assert_eq!(a.post_logout().await.status(), 200);
    let r = b
        .raw_client
        .get(b.url("/userinfo"))
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("userinfo");
    assert_eq!(
        r.status(),
        401,
        "logout deleted the session from the cluster"
    );

    // Back-channel logout: two sessions of the subject, ended by a token posted to one replica.
    a.login().await;
    b.login().await;
    assert_eq!(a.get_userinfo().await.status(), 200);
    assert_eq!(b.get_userinfo().await.status(), 200);
    let r = a
        .raw_client
        .post(a.url("/backchannel-logout"))
        .form(&[("logout_token", logout_token(&idp, DEFAULT_SUB))])
        .send()
        .await
        .expect("POST /backchannel-logout");
    assert_eq!(r.status(), 200);
    assert_eq!(a.get_userinfo().await.status(), 401);
    assert_eq!(b.get_userinfo().await.status(), 401);
}

/// `session.redis_url` with ONE node of a three-node cluster (as a managed Redis hands out one
/// configuration endpoint): tokengate finds out it is a cluster node and discovers the rest, so
/// sessions whose keys hash to the other nodes' slots work too (a plain connection to the seed
/// would get MOVED for two thirds of them). Six browsers log in, refresh, call the API and log
/// out; their sessions are seen spread over more than one node, and all gone at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_seed_node_of_a_redis_cluster_is_enough() {
    let cluster = RedisCluster::start().await;
    let seed = format!("redis://127.0.0.1:{}", cluster.ports[0]);
    let idp = FakeIdp::start().await;
    // Six browsers (one app each, all on the seed URL): six live sessions.
    let mut apps = Vec::new();
    for _ in 0..6 {
        let app = spawn_app_with(AppOptions {
            redis_url: Some(seed.clone()),
            ..AppOptions::default().idp(&idp)
        })
        .await;
        assert_eq!(get(&app, "/readyz").await.status(), 200);
        app.login().await;
        assert_eq!(app.get_userinfo().await.status(), 200);
        assert_eq!(app.post_refresh().await.status(), 200);
        apps.push(app);
    }
    let holding: Vec<u16> = cluster
        .ports
        .iter()
        .copied()
        .filter(|p| !cluster.cli_on(*p, &["KEYS", "tg:{*}:s"]).trim().is_empty())
        .collect();
    assert!(
        holding.len() > 1,
        "six sessions all on one node: {holding:?} (the cluster's slots were not used)"
    );
    for app in &apps {
        assert_eq!(app.get_api("/api/again").await.status(), 200);
        assert_eq!(app.post_logout().await.status(), 200);
        assert_eq!(app.get_userinfo().await.status(), 401);
    }
    for p in &cluster.ports {
        assert_eq!(
            cluster.cli_on(*p, &["KEYS", "tg:{*}:s"]).trim(),
            "",
            "every session deleted at logout (node {p})"
        );
    }
}

#[tokio::test]
async fn a_standalone_redis_whose_acl_refuses_info_is_still_used() {
    let redis = RedisServer::start().await;
    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "default", "-info"]).trim(),
        "OK"
    );
    assert!(
        redis.cli(&["INFO", "cluster"]).contains("NOPERM"),
        "the ACL refuses INFO"
    );
    let idp = FakeIdp::start().await;
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        ..AppOptions::default().idp(&idp)
    })
    .await;
    assert_eq!(get(&app, "/readyz").await.status(), 200);
    app.login().await;
    assert_eq!(app.get_userinfo().await.status(), 200);
    assert!(
        !redis.cli(&["KEYS", "tg:{*}:s"]).trim().is_empty(),
        "the session lives in this Redis"
    );
    assert_eq!(app.post_logout().await.status(), 200);
    assert_eq!(redis.cli(&["KEYS", "tg:{*}:s"]).trim(), "");
}
