//! Configuration: every problem reported at once, env overrides, the binary's exit code, readiness.

use std::time::Duration;

use tokengate::config::Config;

use crate::helpers::*;

fn toml_with(public_url: &str, keys: &str, prefix: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_url = "{public_url}"
static_dir = "static"

[oauth]
issuer = "http://127.0.0.1:9"
client_id = "tokengate"
client_secret = "secret"
scopes = ["openid"]

[session]
store = "cookie"
keys = [{keys}]

[[routes]]
prefix = "{prefix}"
upstream = "http://127.0.0.1:3000"
"#
    )
}

fn good_key() -> String {
    format!("\"{}\"", session_key(1))
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_valid_config_loads() {
    let toml = toml_with("http://127.0.0.1:8080", &good_key(), "/api");
    if let Err(e) = Config::load(&toml, no_env()) {
        panic!("valid config rejected: {e}");
    }
}

#[test]
fn config_errors_name_every_problem_at_once() {
    // Three independent problems: a non-http(s) public_url, a session key that is not 32 bytes,
    // and a route prefix that is not an absolute path.
    let toml = toml_with("ftp://example.com", "\"dG9vIHNob3J0\"", "api");
    let err = match Config::load(&toml, no_env()) {
        Ok(_) => panic!("config with three problems was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("public_url"),
        "error does not name server.public_url: {err}"
    );
    assert!(
        err.contains("keys"),
        "error does not name session.keys: {err}"
    );
    assert!(
        err.contains("prefix") || err.contains("routes"),
        "error does not name routes[0].prefix: {err}"
    );
}

#[test]
fn env_override_replaces_a_bad_file_value() {
    let toml = toml_with("ftp://example.com", &good_key(), "/api");
    assert!(
        Config::load(&toml, no_env()).is_err(),
        "control: the file alone must be invalid"
    );
    let fixed = Config::load(
        &toml,
        env(&[("TOKENGATE_SERVER__PUBLIC_URL", "http://127.0.0.1:8080")]),
    );
    if let Err(e) = fixed {
        panic!("TOKENGATE_SERVER__PUBLIC_URL did not override server.public_url: {e}");
    }
}

#[test]
fn env_override_is_validated_like_the_file() {
    let toml = toml_with("http://127.0.0.1:8080", &good_key(), "/api");
    let err = match Config::load(
        &toml,
        env(&[("TOKENGATE_SERVER__PUBLIC_URL", "ftp://example.com")]),
    ) {
        Ok(_) => panic!("a bad public_url from the environment was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("public_url"),
        "error does not name server.public_url: {err}"
    );
}

#[test]
fn unrelated_env_vars_are_ignored() {
    let toml = toml_with("http://127.0.0.1:8080", &good_key(), "/api");
    let res = Config::load(
        &toml,
        env(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("OTHERAPP_X__Y", "1"),
        ]),
    );
    if let Err(e) = res {
        panic!("unrelated environment variables broke the config: {e}");
    }
}

#[test]
fn unknown_key_is_rejected_by_name() {
    let toml = toml_with("http://127.0.0.1:8080", &good_key(), "/api").replace(
        "client_secret = \"secret\"",
        "client_secret = \"secret\"\nclient_secrett = \"typo\"",
    );
    let err = match Config::load(&toml, no_env()) {
        Ok(_) => panic!("a misspelt key was silently accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("client_secrett"),
        "error does not name the unknown key: {err}"
    );
}

#[test]
fn session_key_must_be_32_bytes_of_base64() {
    for bad in [
        "\"not base64 !!\"",
        &format!("\"{}\"", base64_of(&[1u8; 16])),
        &format!("\"{}\"", base64_of(&[1u8; 64])),
    ] {
        let toml = toml_with("http://127.0.0.1:8080", bad, "/api");
        let err = match Config::load(&toml, no_env()) {
            Ok(_) => panic!("session key {bad} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("keys"),
            "error does not name session.keys for {bad}: {err}"
        );
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn run_binary(args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(args)
        .env_remove("TOKENGATE_SERVER__PUBLIC_URL")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), child)
        .await
        .expect("tokengate with an invalid config must exit, not serve")
        .expect("run tokengate")
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tokengate-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp config");
    path
}

#[tokio::test]
async fn binary_exits_2_listing_all_problems_on_stderr() {
    let path = temp_file(
        "bad.toml",
        &toml_with("ftp://example.com", "\"dG9vIHNob3J0\"", "api"),
    );
    let out = run_binary(&["--config", path.to_str().expect("utf8 path")]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code (stderr: {stderr})");
    assert!(
        stderr.contains("public_url"),
        "stderr does not name server.public_url: {stderr}"
    );
    assert!(
        stderr.contains("keys"),
        "stderr does not name session.keys: {stderr}"
    );
    assert!(
        stderr.contains("prefix") || stderr.contains("routes"),
        "stderr does not name the route: {stderr}"
    );
    assert!(
        !stderr.contains("dG9vIHNob3J0"),
        "stderr echoes the (bad) session key: {stderr}"
    );
}

#[tokio::test]
async fn binary_fails_on_a_missing_config_file() {
    let out = run_binary(&["--config", "/nonexistent/tokengate-test/config.toml"]).await;
    assert!(
        !out.status.success(),
        "tokengate started without its config file"
    );
}

#[tokio::test]
async fn readyz_is_503_while_the_idp_is_unreachable() {
    let dead = dead_port_url().await;
    let app = spawn_app_with(AppOptions::default().issuer(&dead).no_wait()).await;
    // Give it a moment to try (bounded), then it must still say "not ready".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut last = 0;
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = app.raw_client.get(app.url("/readyz")).send().await {
            last = r.status().as_u16();
            assert_ne!(
                last, 200,
                "/readyz said ready although the IdP is unreachable"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, 503, "/readyz status while the IdP is down");
    let health = app
        .raw_client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(
        health.status(),
        200,
        "/healthz is liveness: it must not depend on the IdP"
    );
}

#[tokio::test]
async fn discovery_issuer_mismatch_keeps_the_app_unready() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| b.metadata_issuer_override = Some("http://evil.example".to_owned()));
    let app = spawn_app_with(AppOptions::default().idp(&idp).no_wait()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut seen = false;
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = app.raw_client.get(app.url("/readyz")).send().await {
            seen = true;
            assert_ne!(
                r.status(),
                200,
                "provider with a mismatching issuer in its metadata was accepted"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen, "/readyz never answered");
    let login = app
        .raw_client
        .get(app.url("/login"))
        .send()
        .await
        .expect("GET /login");
    assert!(
        !login
            .headers()
            .get("location")
            .is_some_and(|l| l.to_str().unwrap_or("").contains("authorize")),
        "login redirected to a provider whose metadata failed validation"
    );
}

// ---- the command line: check, keygen, --help, --version ----

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn help_and_version_print_and_exit_0() {
    for flag in ["--help", "-h"] {
        let out = run_binary(&[flag]).await;
        let (stdout, _) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        for needle in ["Usage:", "check", "keygen", "--config", "TOKENGATE_"] {
            assert!(stdout.contains(needle), "{flag} lacks {needle}: {stdout}");
        }
    }
    for flag in ["--version", "-V"] {
        let out = run_binary(&[flag]).await;
        let (stdout, _) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert_eq!(
            stdout.trim(),
            format!("tokengate {}", env!("CARGO_PKG_VERSION"))
        );
    }
    let out = run_binary(&["--frobnicate"]).await;
    let (_, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown flag is a usage error"
    );
    assert!(
        stderr.contains("--frobnicate") && stderr.contains("Usage:"),
        "{stderr}"
    );
}

#[tokio::test]
async fn keygen_prints_a_fresh_32_byte_key_that_the_config_accepts() {
    use base64::Engine;
    let a = run_binary(&["keygen"]).await;
    let b = run_binary(&["keygen"]).await;
    assert_eq!(a.status.code(), Some(0));
    let (ka, kb) = (text(&a).0.trim().to_string(), text(&b).0.trim().to_string());
    assert_ne!(ka, kb, "two keys in a row are the same");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&ka)
        .expect("keygen prints standard base64");
    assert_eq!(bytes.len(), 32);
    let toml = toml_with("http://127.0.0.1:8080", &format!("\"{ka}\""), "/api");
    Config::load(&toml, no_env()).expect("the config takes the generated key");
}

#[tokio::test]
async fn check_accepts_a_valid_config_and_warns_against_the_bff_recommendations() {
    // Weak but valid: plain http, no keys, a public client, an upstream on a wildcard address
    // and another in plain http across the network.
    let weak = temp_file(
        "weak.toml",
        r#"
[server]
public_url = "http://app.example.com"
[oauth]
issuer = "http://127.0.0.1:9"
client_id = "tg"
client_auth = "none"
scopes = ["openid"]
[[routes]]
prefix = "/api"
upstream = "http://0.0.0.0:3000"
[[routes]]
prefix = "/other"
upstream = "http://api.internal:3000"
"#,
    );
    let out = run_binary(&["check", "--config", weak.to_str().expect("utf8")]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for needle in [
        "use https",
        "session.keys is empty",
        "confidential client",
        "offline_access",
        "wildcard",
        "unencrypted",
        "configuration is valid",
    ] {
        assert!(stdout.contains(needle), "check lacks `{needle}`:\n{stdout}");
    }
    assert!(
        stdout
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .count()
            >= 6
    );

    // What the recommendations ask for: no warning at all.
    let strong = temp_file(
        "strong.toml",
        &format!(
            r#"
[server]
public_url = "https://app.example.com"
[oauth]
issuer = "https://idp.example.com"
client_id = "tg"
client_secret = "s3cret-value"
scopes = ["openid", "offline_access"]
[session]
keys = [{}]
[[routes]]
prefix = "/api"
upstream = "https://api.example.com"
"#,
            good_key()
        ),
    );
    let out = run_binary(&["check", "--config", strong.to_str().expect("utf8")]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("(0 warnings)"), "{stdout}");
    assert!(!stdout.contains("s3cret-value"), "check prints the secret");

    // An invalid one: exit 2, every problem named, as at start-up.
    let bad = temp_file(
        "bad-check.toml",
        &toml_with("ftp://example.com", "\"dG9vIHNob3J0\"", "api"),
    );
    let out = run_binary(&["check", "--config", bad.to_str().expect("utf8")]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("public_url") && stderr.contains("keys"),
        "{stderr}"
    );
}

#[test]
fn a_csrf_header_that_browsers_send_cross_site_is_refused() {
    for name in [
        "Content-Type",
        "accept",
        "User-Agent",
        "Origin",
        "Sec-Fetch-Site",
        "Cookie",
    ] {
        let toml = format!(
            "{}\n[csrf]\nheader = \"{name}\"\n",
            toml_with("http://127.0.0.1:8080", &good_key(), "/api")
        );
        let err = match Config::load(&toml, no_env()) {
            Ok(_) => panic!("csrf.header = {name} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("csrf.header"), "{name}: {err}");
    }
    let toml = format!(
        "{}\n[csrf]\nheader = \"X-Requested-By\"\n",
        toml_with("http://127.0.0.1:8080", &good_key(), "/api")
    );
    Config::load(&toml, no_env()).expect("a custom header name is fine");
}

#[test]
fn no_client_secret_means_a_public_client_unless_a_secret_method_is_named() {
    let without_secret = |auth: &str| {
        format!(
            r#"
[server]
public_url = "http://127.0.0.1:8080"
[oauth]
issuer = "http://127.0.0.1:9"
client_id = "tokengate"
{auth}
[session]
keys = [{}]
"#,
            good_key()
        )
    };
    // interface.md: client_secret absent => public client (PKCE only), said out loud at start.
    let c = Config::load(&without_secret(""), no_env()).expect("a public client loads");
    assert_eq!(c.oauth.client_auth, tokengate::config::ClientAuth::None);
    assert!(
        c.warnings.iter().any(|w| w.contains("public client")),
        "{:?}",
        c.warnings
    );
    // A secret method named explicitly is never quietly downgraded.
    for auth in ["client_secret_basic", "client_secret_post"] {
        let err = match Config::load(
            &without_secret(&format!("client_auth = \"{auth}\"")),
            no_env(),
        ) {
            Ok(_) => panic!("{auth} without a secret accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("client_secret"), "{auth}: {err}");
    }
}
