//! Positive flows against a real authorization server: panva's `oidc-provider` (pinned in
//! tests/idp/package-lock.json), the echo API that checks every bearer token at the IdP, and
//! tokengate between them — login through the IdP's own pages, callback, userinfo, proxied calls,
//! refresh with rotation, transparent refresh (single-flight), logout with revocation.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use reqwest::cookie::{CookieStore, Jar};
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const SECRET: &str = "real-idp-client-secret";
const KEY: &str = "dGhpcyBpcyBhIDMyIGJ5dGUga2V5IGZvciB0ZXN0cyE=";

/// A node process started for a test; killed when dropped.
pub struct Node {
    _child: Child,
    pub info: Value,
}

pub async fn start_node(script: &str, env: &[(&str, String)]) -> Node {
    let path = format!("{}/tests/idp/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("node");
    cmd.arg(&path)
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .expect("node runs (scripts/test.sh installs tests/idp)");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("node script printed its address in time")
        .expect("read stdout")
        .expect("a line");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Node {
        _child: child,
        info: serde_json::from_str(&line).expect("JSON line"),
    }
}

/// How to start a [`Stack`].
pub struct StackOptions {
    /// Extra TOML lines in `[oauth]`.
    pub extra_oauth: String,
    /// Extra TOML lines in `[session]` (e.g. the Redis store).
    pub extra_session: String,
    /// tokengate instances sharing the IdP, the API, the session keys (and the store).
    pub replicas: usize,
    /// The IdP's access-token lifetime (seconds).
    pub access_token_ttl: Option<u64>,
    /// Client metadata merged into the IdP's client.
    pub client_extra: Value,
    /// Register `{base}/backchannel-logout` at the IdP (sid required).
    pub backchannel_logout: bool,
    /// Delay every IdP token answer (ms), to widen race windows.
    pub token_delay_ms: u64,
    /// Extra environment for the IdP (e.g. `IDP_RESOURCES`).
    pub idp_env: Vec<(&'static str, String)>,
    /// Scopes added to `oauth.scopes`.
    pub extra_scopes: Vec<String>,
    /// Extra `[[routes]]` tables.
    pub extra_routes: String,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            extra_oauth: String::new(),
            extra_session: String::new(),
            replicas: 1,
            access_token_ttl: None,
            client_extra: json!({}),
            backchannel_logout: false,
            token_delay_ms: 0,
            idp_env: Vec::new(),
            extra_scopes: Vec::new(),
            extra_routes: String::new(),
        }
    }
}

pub struct Stack {
    /// The first replica (its origin is everyone's public_url).
    pub base: String,
    /// Every replica's base URL (cookies on 127.0.0.1 are shared across ports, as behind a
    /// load balancer).
    pub bases: Vec<String>,
    pub issuer: String,
    pub jar: Arc<Jar>,
    pub browser: reqwest::Client,
    _idp: Node,
    _api: Node,
    _shutdown: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Stack {
    async fn start(extra_oauth: &str) -> Stack {
        Stack::start_with(StackOptions {
            extra_oauth: extra_oauth.to_string(),
            ..StackOptions::default()
        })
        .await
    }

    pub async fn start_with(opts: StackOptions) -> Stack {
        let mut listeners = Vec::new();
        for _ in 0..opts.replicas.max(1) {
            listeners.push(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind"),
            );
        }
        let bases: Vec<String> = listeners
            .iter()
            .map(|l| format!("http://127.0.0.1:{}", l.local_addr().expect("addr").port()))
            .collect();
        let base = bases[0].clone();
        let extra_oauth = opts.extra_oauth.as_str();
        let extra_session = opts.extra_session.as_str();
        let mut client = json!({
            "client_id": "tokengate",
            "client_secret": SECRET,
            "redirect_uris": [format!("{base}/oauth-callback")],
            "post_logout_redirect_uris": [format!("{base}/")],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        });
        if opts.backchannel_logout {
            client["backchannel_logout_uri"] = json!(format!("{base}/backchannel-logout"));
            client["backchannel_logout_session_required"] = json!(true);
        }
        if let (Some(c), Some(extra)) = (client.as_object_mut(), opts.client_extra.as_object()) {
            for (k, v) in extra {
                c.insert(k.clone(), v.clone());
            }
        }
        let mut env = vec![("IDP_CLIENTS", json!([client]).to_string())];
        if opts.token_delay_ms > 0 {
            env.push(("IDP_TOKEN_DELAY_MS", opts.token_delay_ms.to_string()));
        }
        if let Some(ttl) = opts.access_token_ttl {
            env.push(("IDP_ACCESS_TOKEN_TTL", ttl.to_string()));
        }
        env.extend(opts.idp_env.iter().cloned());
        let scopes = ["openid", "profile", "email", "offline_access"]
            .iter()
            .map(|s| s.to_string())
            .chain(opts.extra_scopes.iter().cloned())
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let idp = start_node("idp.mjs", &env).await;
        let issuer = idp.info["issuer"].as_str().expect("issuer").to_string();
        let api = start_node("echo-api.mjs", &[("ISSUER", issuer.clone())]).await;
        let api_port = api.info["port"].as_u64().expect("port");
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
public_url = "{base}"
static_dir = "{static_dir}"
[oauth]
issuer = "{issuer}"
client_id = "tokengate"
scopes = [{scopes}]
extra_authorize_params = {{ prompt = "consent" }}
{extra_oauth}
[session]
keys = ["{KEY}"]
{extra_session}
[[routes]]
prefix = "/api"
upstream = "http://127.0.0.1:{api_port}"
{extra_routes}
"#,
            extra_routes = opts.extra_routes,
            static_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/static"),
        );
        let mut shutdown = Vec::new();
        for listener in listeners {
            // The secret comes from the environment, as operators are told to do.
            let config = tokengate::config::Config::load(
                &toml,
                vec![(
                    "TOKENGATE_OAUTH__CLIENT_SECRET".to_string(),
                    SECRET.to_string(),
                )],
            )
            .expect("valid config");
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(tokengate::serve(listener, config, async {
                let _ = rx.await;
            }));
            shutdown.push(tx);
        }
        let jar = Arc::new(Jar::default());
        let browser = reqwest::Client::builder()
            .redirect(Policy::none())
            .cookie_provider(Arc::clone(&jar))
            .build()
            .expect("client");
        let stack = Stack {
            base,
            bases,
            issuer,
            jar,
            browser,
            _idp: idp,
            _api: api,
            _shutdown: shutdown,
        };
        for b in &stack.bases {
            stack.wait_ready(b).await;
        }
        stack
    }

    async fn wait_ready(&self, base: &str) {
        for _ in 0..200 {
            if let Ok(r) = self.browser.get(format!("{base}/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("tokengate did not become ready");
    }

    pub async fn idp_stats(&self) -> Value {
        reqwest::get(format!("{}/__stats", self.issuer))
            .await
            .expect("stats")
            .json()
            .await
            .expect("json")
    }

    pub async fn refresh_grants(&self) -> u64 {
        self.idp_stats().await["grants"]["refresh_token"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Logs in as `user` through the IdP's login and consent pages; returns the callback's answer.
    pub async fn login(&self, user: &str, return_to: &str) -> reqwest::Response {
        let r = self
            .browser
            .get(format!("{}/login?return_to={return_to}", self.base))
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 302, "/login redirects to the IdP");
        let mut next = location(&r, &self.base);
        assert!(next.starts_with(&self.issuer), "to the IdP: {next}");
        for _ in 0..20 {
            if next.starts_with(&format!("{}/oauth-callback", self.base)) {
                return self.browser.get(&next).send().await.expect("callback");
            }
            let r = self.browser.get(&next).send().await.expect("IdP page");
            if r.status().is_redirection() {
                next = location(&r, &self.issuer);
                continue;
            }
            assert_eq!(r.status(), 200, "IdP page {next}");
            let html = r.text().await.expect("html");
            let (action, mut fields) = parse_form(&html);
            if html.contains("name=\"login\"") {
                fields.push(("login".into(), user.into()));
                fields.push(("password".into(), "any-password".into()));
            }
            let r = self
                .browser
                .post(&action)
                .form(&fields)
                .send()
                .await
                .expect("form post");
            assert!(
                r.status().is_redirection(),
                "IdP form answered {}",
                r.status()
            );
            next = location(&r, &self.issuer);
        }
        panic!("login did not reach the callback");
    }

    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.browser
            .request(method, format!("{}{path}", self.base))
            .header("X-CSRF", "1")
    }

    pub fn cookie_header(&self) -> String {
        self.jar
            .cookies(&self.base.parse().expect("url"))
            .map(|h| h.to_str().expect("ascii").to_string())
            .unwrap_or_default()
    }
}

pub fn location(r: &reqwest::Response, base: &str) -> String {
    let loc = r
        .headers()
        .get("location")
        .expect("Location")
        .to_str()
        .expect("ascii");
    url::Url::parse(base)
        .expect("base")
        .join(loc)
        .expect("resolvable")
        .to_string()
}

/// The first form's action and its hidden inputs.
pub fn parse_form(html: &str) -> (String, Vec<(String, String)>) {
    let form_start = html.find("<form").expect("a form");
    let form = &html[form_start..];
    let action = attr(form, "action").expect("form action");
    let form_end = form.find("</form>").unwrap_or(form.len());
    let mut fields = Vec::new();
    for input in form[..form_end].split("<input").skip(1) {
        let tag = &input[..input.find('>').unwrap_or(input.len())];
        if tag.contains("type=\"hidden\"") {
            if let (Some(n), Some(v)) = (attr(tag, "name"), attr(tag, "value")) {
                fields.push((n, v));
            }
        }
    }
    (action.replace("&amp;", "&"), fields)
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(tag[start..start + len].to_string())
}

#[tokio::test]
async fn full_flow_login_userinfo_api_refresh_logout_against_oidc_provider() {
    let stack = Stack::start("").await;

    // Login through the IdP's own pages; the callback lands on return_to with a session cookie.
    let cb = stack.login("alice", "/dashboard?tab=1").await;
    assert_eq!(cb.status(), 302);
    assert_eq!(cb.headers()["location"], "/dashboard?tab=1");
    let set_cookies: Vec<String> = cb
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_string())
        .collect();
    let session_cookie = set_cookies
        .iter()
        .find(|c| c.starts_with("tg_session") && !c.contains("Max-Age=0"))
        .expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session_cookie.contains(attr), "{attr} in {session_cookie}");
    }
    assert!(
        set_cookies
            .iter()
            .any(|c| c.starts_with("tg_tx_") && c.contains("Max-Age=0")),
        "the login transaction cookie is cleared: {set_cookies:?}"
    );
    assert_eq!(stack.idp_stats().await["grants"]["authorization_code"], 1);

    // Who is logged in: claims, never tokens.
    let me = stack
        .browser
        .get(format!("{}/userinfo", stack.base))
        .send()
        .await
        .expect("userinfo");
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["sub"], "alice");
    assert_eq!(me["name"], "Alice");
    assert_eq!(me["email"], "alice@example.com");
    for forbidden in ["access_token", "refresh_token", "id_token", "nonce"] {
        assert!(
            me.get(forbidden).is_none(),
            "{forbidden} must not be in /userinfo"
        );
    }
    assert!(me["session"]["expires_at"].as_u64().is_some());

    // A proxied call: the echo API verified the bearer token at the IdP.
    stack
        .jar
        .add_cookie_str("theme=dark", &stack.base.parse().expect("url"));
    let r = stack
        .api(reqwest::Method::GET, "/api/hello?x=1")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.expect("json");
    assert_eq!(echo["token_verified"], true);
    assert_eq!(echo["sub"], "alice");
    assert_eq!(echo["path"], "/api/hello?x=1");
    assert_eq!(echo["authorization_lines"], 1);
    let fwd_cookie = echo["headers"]["cookie"].as_str().unwrap_or("");
    assert!(
        !fwd_cookie.contains("tg_"),
        "our cookies stay with us: {fwd_cookie}"
    );
    assert!(
        fwd_cookie.contains("theme=dark"),
        "the SPA's cookies pass: {fwd_cookie}"
    );

    // Refresh with rotation: twice in a row works only if the rotated token replaced the old one
    // (oidc-provider answers a reused rotated token with invalid_grant and revokes the grant).
    for n in 1..=2 {
        let r = stack
            .api(reqwest::Method::POST, "/refreshtoken")
            .send()
            .await
            .expect("refresh");
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        assert!(body["expires_in"].as_u64().expect("expires_in") > 0);
        assert_eq!(stack.refresh_grants().await, n);
    }
    let r = stack
        .api(reqwest::Method::GET, "/api/after-refresh")
        .send()
        .await
        .expect("api");
    assert_eq!(
        r.status(),
        200,
        "the refreshed access token is accepted by the API"
    );

    // Logout: tokens revoked at the IdP, cookies cleared, end-session URL for the SPA.
    let r = stack
        .api(reqwest::Method::POST, "/logout")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    let logout_url = body["logout_url"].as_str().expect("logout_url");
    assert!(logout_url.starts_with(&stack.issuer), "{logout_url}");
    assert!(logout_url.contains("id_token_hint="));
    assert!(logout_url.contains("post_logout_redirect_uri="));
    let stats = stack.idp_stats().await;
    assert_eq!(stats["revoked"]["refresh_token"], 1, "{stats}");
    let after = stack
        .browser
        .get(format!("{}/userinfo", stack.base))
        .send()
        .await
        .expect("userinfo");
    assert_eq!(after.status(), 401);
    let api_after = stack
        .api(reqwest::Method::GET, "/api/x")
        .send()
        .await
        .expect("api");
    assert_eq!(api_after.status(), 401);
}

#[tokio::test]
async fn expiring_token_is_refreshed_once_for_concurrent_calls_and_old_cookie_still_works() {
    // Short-lived tokens, waited past: every call finds the token expired.
    let stack = Stack::start_with(StackOptions {
        access_token_ttl: Some(2),
        ..StackOptions::default()
    })
    .await;
    assert_eq!(stack.login("bob", "/").await.status(), 302);
    let before = stack.cookie_header();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let calls = (0..12).map(|i| {
        stack
            .api(reqwest::Method::GET, &format!("/api/c{i}"))
            .send()
    });
    let results = futures_join_all(calls).await;
    for r in results {
        let r = r.expect("api");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        stack.refresh_grants().await,
        1,
        "12 concurrent calls with one session share one refresh grant"
    );

    // The pre-rotation cookie, replayed right after the refresh: served with the new tokens,
    // not sent to the IdP again (which would be a rotated-token reuse).
    let stale = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client");
    let r = stale
        .get(format!("{}/api/stale", stack.base))
        .header("Cookie", &before)
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
    assert_eq!(stack.refresh_grants().await, 1);
}

pub async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn login_pushes_the_authorization_request_when_the_idp_offers_par() {
    let stack = Stack::start("").await;
    let r = stack
        .browser
        .get(format!("{}/login", stack.base))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 302);
    let loc = location(&r, &stack.base);
    let url = url::Url::parse(&loc).expect("url");
    let names: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
    assert_eq!(names, vec!["client_id", "request_uri"], "{loc}");
    // And the whole login still completes through the pushed request.
    assert_eq!(stack.login("gina", "/").await.status(), 302);

    let off = Stack::start("par = \"off\"").await;
    let r = off
        .browser
        .get(format!("{}/login", off.base))
        .send()
        .await
        .expect("login");
    let loc = location(&r, &off.base);
    assert!(
        loc.contains("code_challenge=") && !loc.contains("request_uri="),
        "{loc}"
    );
}

#[tokio::test]
async fn private_key_jwt_client_authentication_against_oidc_provider() {
    use p256::pkcs8::EncodePrivateKey;
    let key = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let pem = key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF).expect("pem");
    let path = std::env::temp_dir().join(format!("tokengate-pkjwt-{}.pem", std::process::id()));
    std::fs::write(&path, pem.as_bytes()).expect("write key");
    let mut jwk: Value =
        serde_json::from_str(&key.public_key().to_jwk_string()).expect("public jwk");
    jwk["kid"] = json!("tg-1");
    jwk["alg"] = json!("ES256");
    jwk["use"] = json!("sig");
    let stack = Stack::start_with(StackOptions {
        extra_oauth: format!(
            "client_auth = \"private_key_jwt\"\nprivate_key_file = \"{}\"\nprivate_key_kid = \"tg-1\"",
            path.display()
        ),
        client_extra: json!({
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "ES256",
            "jwks": { "keys": [jwk] },
        }),
        ..StackOptions::default()
    })
    .await;
    // Code redemption, refresh and revocation all authenticate with the signed assertion.
    assert_eq!(stack.login("hank", "/").await.status(), 302);
    let r = stack
        .api(reqwest::Method::POST, "/refreshtoken")
        .send()
        .await
        .expect("refresh");
    assert_eq!(r.status(), 200);
    let r = stack
        .api(reqwest::Method::POST, "/logout")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 200);
    let stats = stack.idp_stats().await;
    assert_eq!(stats["grants"]["authorization_code"], 1, "{stats}");
    assert_eq!(stats["grants"]["refresh_token"], 1, "{stats}");
    assert_eq!(stats["revoked"]["refresh_token"], 1, "{stats}");
    let _ = std::fs::remove_file(&path);
}
