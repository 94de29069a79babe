//! `session.redis_url = "rediss://..."` against a real TLS-only `redis-server` whose certificate
//! comes from a private CA (made with the `openssl` CLI for each test): trusted through
//! `session.redis_ca_file` it serves the whole session life; without it (webpki roots only) the
//! server is not trusted and tokengate fails closed. The same for a TLS Redis Cluster given as
//! its nodes. And the key's checks at load. Each test starts its own redis-server(s), so these
//! run in both suite passes.

use std::time::Duration;

use serde_json::Value;
use tokengate::config::Config;

use crate::helpers::*;
use crate::redis_server::{RedisCluster, RedisServer, TestCa};

fn ca_line(redis: &RedisServer) -> String {
    format!("redis_ca_file = \"{}\"", redis.ca().ca_file.display())
}

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    app.raw_client
        .get(app.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The session keys (`tg:{sid}:s`) in that Redis, read with redis-cli over TLS.
fn session_keys(redis: &RedisServer) -> Vec<String> {
    redis
        .cli(&["KEYS", "tg:{*}:s"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A TLS-only Redis with a private CA named in `session.redis_ca_file`: ready, and login,
/// /userinfo, a proxied call, refresh and logout all work, with the session stored in (and
/// deleted from) that Redis, as another TLS client (redis-cli) sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_with_a_private_ca_serves_the_whole_session_life() {
    let redis = RedisServer::start_tls().await;
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));
    let app = spawn_app_with(
        AppOptions::default()
            .redis(&redis)
            .session(&ca_line(&redis)),
    )
    .await;
    let ready = get(&app, "/readyz").await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["checks"]["session_store"], true, "{body}");
    assert!(session_keys(&redis).is_empty());

    app.login().await;
    let keys = session_keys(&redis);
    assert_eq!(keys.len(), 1, "one session in the TLS Redis: {keys:?}");
    let key = &keys[0];
    let sealed_at_login = redis.cli(&["HGET", key, "d"]);
    assert!(!sealed_at_login.trim().is_empty());

    let r = app.get_userinfo().await;
    assert_eq!(r.status(), 200);
    let me: Value = r.json().await.expect("json");
    assert_eq!(me["sub"], DEFAULT_SUB);

    let r = app.get_api("/api/over-tls").await;
    assert_eq!(r.status(), 200);
    let at = app.idp.last_access_token().expect("access token");
    assert_eq!(
        app.api.last().header("authorization"),
        Some(format!("Bearer {at}").as_str())
    );

    let r = app.post_refresh().await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.idp.refresh_grants(), 1);
    let refreshed = app.idp.last_access_token().expect("access token");
    assert_ne!(refreshed, at);
    assert_ne!(
        redis.cli(&["HGET", key, "d"]),
        sealed_at_login,
        "the refreshed tokens were written to the TLS Redis"
    );
    assert_eq!(app.get_api("/api/after-refresh").await.status(), 200);
    assert_eq!(
        app.api.last().header("authorization"),
        Some(format!("Bearer {refreshed}").as_str())
    );

    assert_eq!(app.post_logout().await.status(), 200);
    assert_eq!(
        redis.cli(&["EXISTS", key]).trim(),
        "0",
        "logout deleted the session from the TLS Redis"
    );
    assert_json_error(app.get_userinfo().await, 401).await;
}

/// The same TLS Redis without `session.redis_ca_file`: only the webpki roots are trusted, the
/// server's private CA is not, so the connection is refused. tokengate fails closed: /readyz 503,
/// session requests 503 `temporarily_unavailable` (never a 500), and a login does not end in a
/// session held anywhere but Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_whose_ca_is_not_trusted_fails_closed() {
    let redis = RedisServer::start_tls().await;
    let idp = FakeIdp::start().await;
    // A replica that does trust the CA logs in: the browser holds a real session cookie.
    let trusted = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .redis(&redis)
            .session(&ca_line(&redis)),
    )
    .await;
    trusted.login().await;
    let cookie = trusted.session_cookie_header();
    assert!(!cookie.is_empty());
    assert_eq!(session_keys(&redis).len(), 1);

    let app = spawn_app_with(AppOptions::default().idp(&idp).redis(&redis).no_wait()).await;
    // Ready but for the store: the IdP's metadata and keys load, the store check fails.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Ok(r) = app.raw_client.get(app.url("/readyz")).send().await {
            let status = r.status();
            let body: Value = r.json().await.expect("readyz json");
            if body["checks"]["idp_metadata"] == true && body["checks"]["idp_jwks"] == true {
                assert_eq!(status, 503, "{body}");
                break body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the IdP metadata never loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["checks"]["session_store"], false, "{body}");
    assert_eq!(body["status"], "not_ready", "{body}");

    let with_cookie = |method: reqwest::Method, path: &str| {
        app.raw_client
            .request(method, app.url(path))
            .header("Cookie", &cookie)
            .header("X-CSRF", "1")
    };
    for (method, path) in [
        (reqwest::Method::GET, "/userinfo"),
        (reqwest::Method::GET, "/api/untrusted"),
        (reqwest::Method::POST, "/refreshtoken"),
        // Not a 200 that only clears the cookie: the session would live on in Redis.
        (reqwest::Method::POST, "/logout"),
    ] {
        let r = with_cookie(method.clone(), path)
            .send()
            .await
            .expect("request");
        let v = assert_json_error(r, 503).await;
        assert_eq!(
            v["error"], "temporarily_unavailable",
            "{method} {path}: {v}"
        );
    }
    assert_eq!(
        app.api.requests().len(),
        0,
        "nothing reached the API without a session"
    );

    // A login through this replica: the callback cannot consume its state in Redis (nor store
    // the session), so it answers 503 and sets no session cookie.
    let pending = app.start_login(None).await;
    let resp = app.finish_login(&pending).await;
    let no_session = set_cookies(&resp)
        .iter()
        .all(|c| !is_session_cookie_name(&c.name) || c.value.is_empty());
    assert!(no_session, "a session cookie without Redis");
    let v = assert_json_error(resp, 503).await;
    assert_eq!(v["error"], "temporarily_unavailable", "{v}");
    assert_eq!(session_keys(&redis).len(), 1, "no session was stored");
    assert_json_error(app.get_userinfo().await, 401).await;

    // The untrusted replica touched nothing: the session still works where Redis is trusted.
    assert_eq!(trusted.get_userinfo().await.status(), 200);
}

/// A TLS-only three-node Redis Cluster (`--tls-cluster yes`), its nodes as rediss:// URLs and
/// its private CA in `session.redis_ca_file`: the cluster client trusts that CA on every node
/// it discovers. Login, a proxied call, refresh from one replica and use from the other, logout;
/// without the CA the cluster is untrusted and /readyz is 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_cluster_with_a_private_ca_serves_sessions() {
    let cluster = RedisCluster::start_tls().await;
    assert!(cluster.url().starts_with("rediss://"));
    let idp = FakeIdp::start().await;
    let ca = format!("redis_ca_file = \"{}\"", cluster.ca().ca_file.display());
    let on_cluster = || AppOptions {
        redis_url: Some(cluster.url()),
        ..AppOptions::default()
    };
    let a = spawn_app_with(on_cluster().idp(&idp).session(&ca)).await;
    let b = spawn_app_with(on_cluster().idp(&idp).session(&ca)).await;
    let session_keys = || -> usize {
        cluster
            .ports
            .iter()
            .map(|p| {
                cluster
                    .cli_on(*p, &["KEYS", "tg:{*}:s"])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .sum()
    };
    assert_eq!(get(&a, "/readyz").await.status(), 200);
    assert_eq!(session_keys(), 0);

    a.login().await;
    assert_eq!(session_keys(), 1, "the session lives in the TLS cluster");
    assert_eq!(a.get_userinfo().await.status(), 200);
    assert_eq!(a.get_api("/api/over-tls-cluster").await.status(), 200);
    assert_eq!(a.post_refresh().await.status(), 200);
    assert_eq!(idp.refresh_grants(), 1);
    let refreshed = idp.last_access_token().expect("access token");
    let cookie = a.session_cookie_header();
    let r = b
        .raw_client
        .get(b.url("/api/from-replica-b"))
        .header("Cookie", &cookie)
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("GET /api on b");
    assert_eq!(r.status(), 200, "replica b reads the session over TLS");
    assert_eq!(
        b.api.last().header("authorization"),
        Some(format!("Bearer {refreshed}").as_str())
    );
    assert_eq!(a.post_logout().await.status(), 200);
    assert_eq!(session_keys(), 0, "logout deleted it from the cluster");

    let untrusted = spawn_app_with(on_cluster().idp(&idp).no_wait()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = untrusted
            .raw_client
            .get(untrusted.url("/readyz"))
            .send()
            .await
        {
            let status = r.status();
            let body: Value = r.json().await.expect("readyz json");
            if body["checks"]["idp_metadata"] == true && body["checks"]["idp_jwks"] == true {
                assert_eq!(status, 503, "{body}");
                assert_eq!(body["checks"]["session_store"], false, "{body}");
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no IdP metadata");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// session.redis_ca_file at load
// ---------------------------------------------------------------------------------------------

fn config_with(redis_url: &str, ca_file: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:8080"
static_dir = "static"

[oauth]
issuer = "http://127.0.0.1:9"
client_id = "tokengate"
client_secret = "secret"
scopes = ["openid"]

[session]
store = "redis"
redis_url = "{redis_url}"
redis_ca_file = "{ca_file}"
keys = ["{key}"]

[[routes]]
prefix = "/api"
upstream = "http://127.0.0.1:3000"
"#,
        key = session_key(1)
    )
}

/// A temp dir of this test's own, removed when dropped.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "tokengate-ca-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_problems(toml: &str) -> Vec<String> {
    match Config::load(toml, Vec::<(String, String)>::new()) {
        Ok(_) => panic!("config accepted:\n{toml}"),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

fn assert_names_the_key(problems: &[String], what: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.contains("session.redis_ca_file") && p.contains(what)),
        "no session.redis_ca_file problem mentioning {what:?}: {problems:#?}"
    );
}

/// A CA file tokengate could not use is a start-up error naming the key: missing, not PEM,
/// PEM without a certificate; and the key is refused with a plain `redis://` URL.
#[test]
fn a_bad_redis_ca_file_is_an_error_naming_the_key() {
    let dir = Dir::new("bad");
    let ca = TestCa::generate(&dir.0);
    let ca_file = ca.ca_file.display().to_string();
    let tls = "rediss://127.0.0.1:6380";
    // The good case first: the same config with a real CA loads.
    let cfg = Config::load(&config_with(tls, &ca_file), Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("a valid CA file rejected: {e}"));
    assert!(cfg.session.redis_ca_pem.is_some());
    // So does a cluster given as a list of rediss:// nodes.
    let nodes = "rediss://127.0.0.1:6380,rediss://127.0.0.1:6381";
    Config::load(
        &config_with(nodes, &ca_file),
        Vec::<(String, String)>::new(),
    )
    .unwrap_or_else(|e| panic!("a rediss:// cluster with a CA file rejected: {e}"));

    let missing = dir.0.join("no-such-ca.pem").display().to_string();
    assert_names_the_key(
        &load_problems(&config_with(tls, &missing)),
        "no-such-ca.pem",
    );

    let garbage = dir.0.join("garbage.pem");
    std::fs::write(&garbage, b"this is not a certificate\n\x00\x01\x02").expect("write");
    assert_names_the_key(
        &load_problems(&config_with(tls, &garbage.display().to_string())),
        "no PEM certificate",
    );

    // PEM, but only a private key: no certificate to trust.
    assert_names_the_key(
        &load_problems(&config_with(tls, &ca.key_file.display().to_string())),
        "no PEM certificate",
    );

    // A certificate block whose base64 is corrupt.
    let corrupt = dir.0.join("corrupt.pem");
    std::fs::write(
        &corrupt,
        "-----BEGIN CERTIFICATE-----\nnot*base64*at*all\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let problems = load_problems(&config_with(tls, &corrupt.display().to_string()));
    assert!(
        problems.iter().any(|p| p.contains("session.redis_ca_file")),
        "{problems:#?}"
    );

    // Only for TLS: a redis:// URL (or one plain node of a cluster) with a CA file is an error.
    assert_names_the_key(
        &load_problems(&config_with("redis://127.0.0.1:6379", &ca_file)),
        "rediss://",
    );
    assert_names_the_key(
        &load_problems(&config_with(
            "rediss://127.0.0.1:6380,redis://127.0.0.1:6381",
            &ca_file,
        )),
        "rediss://",
    );
}

/// A Redis that requires client certificates (`--tls-auth-clients yes`): with
/// `session.redis_client_cert_file` / `_key_file` tokengate presents one and serves the session
/// life; without them the server refuses the handshake and tokengate fails closed (503, never a
/// session elsewhere). Half a pair, or a file that is not what it should be, stops the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_requires_client_certificates_gets_ours() {
    let redis = RedisServer::start_mutual_tls().await;
    let ca = redis.ca();
    let client_lines = format!(
        "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"",
        ca.cert_file.display(),
        ca.key_file.display()
    );
    let idp = FakeIdp::start().await;
    let app = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .redis(&redis)
            .session(&ca_line(&redis))
            .session(&client_lines),
    )
    .await;
    assert_eq!(get(&app, "/readyz").await.status(), 200);
    app.login().await;
    assert_eq!(
        session_keys(&redis).len(),
        1,
        "the session is in the mTLS Redis"
    );
    assert_eq!(app.get_api("/api/over-mtls").await.status(), 200);
    assert_eq!(app.post_refresh().await.status(), 200);
    assert_eq!(app.post_logout().await.status(), 200);
    assert!(session_keys(&redis).is_empty());

    // The CA is trusted but no certificate is presented: refused by the server, fail closed.
    let bare = spawn_app_with(
        AppOptions::default()
            .idp(&idp)
            .redis(&redis)
            .session(&ca_line(&redis))
            .no_wait(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(&bare, "/readyz").await;
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        if body["checks"]["idp_metadata"] == true {
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["checks"]["session_store"], false, "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metadata never loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pending = bare.start_login(None).await;
    let r = bare.finish_login(&pending).await;
    let v = assert_json_error(r, 503).await;
    assert_eq!(v["error"], "temporarily_unavailable");
    assert!(session_keys(&redis).is_empty());

    // Checks at load.
    let base = format!(
        "[oauth]\nissuer = \"http://127.0.0.1:9\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[session]\nstore = \"redis\"\nredis_url = \"{}\"\nkeys = [\"{}\"]\n",
        redis.url(),
        session_key(1)
    );
    let half = format!(
        "{base}redis_client_cert_file = \"{}\"\n",
        ca.cert_file.display()
    );
    let msg = Config::load(&half, vec![])
        .expect_err("half a pair")
        .to_string();
    assert!(
        msg.contains("session.redis_client_key_file: missing"),
        "{msg}"
    );
    let swapped = format!(
        "{base}redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"\n",
        ca.key_file.display(),
        ca.cert_file.display()
    );
    let msg = Config::load(&swapped, vec![])
        .expect_err("swapped")
        .to_string();
    assert!(msg.contains("holds no PEM certificate"), "{msg}");
    assert!(
        !msg.contains("BEGIN PRIVATE"),
        "no key material in the message: {msg}"
    );
    let plain = format!(
        "{}redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"\n",
        base.replace("rediss://", "redis://"),
        ca.cert_file.display(),
        ca.key_file.display()
    );
    let msg = Config::load(&plain, vec![])
        .expect_err("not TLS")
        .to_string();
    assert!(msg.contains("only for TLS"), "{msg}");
}
