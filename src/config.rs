//! Configuration: `config.toml` layered with `TOKENGATE_A__B` environment overrides, then validated
//! into typed settings. Every problem is collected and reported at once, naming the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use url::Url;

/// The prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "TOKENGATE_";
/// Upper bound of `session.redis_cache_ms`.
const MAX_REDIS_CACHE_MS: u64 = 60_000;

/// All the problems found in a configuration, reported together.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// The file's shape (serde). Unknown keys are collected by `serde_ignored`, not rejected one by one,
// so that they are reported with every other problem.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    server: RawServer,
    oauth: RawOAuth,
    session: RawSession,
    csrf: RawCsrf,
    routes: Vec<RawRoute>,
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawServer {
    listen: String,
    public_url: String,
    static_dir: Option<String>,
    spa_fallback: bool,
    trusted_proxies: Vec<String>,
    metrics_listen: Option<String>,
    shutdown_timeout_s: u64,
    shutdown_delay_s: u64,
    header_read_timeout_s: u64,
    max_header_bytes: usize,
    max_connections: usize,
    max_body_bytes: u64,
    workers: usize,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: "http://localhost:8080".into(),
            static_dir: Some("static".into()),
            spa_fallback: true,
            trusted_proxies: vec![],
            metrics_listen: None,
            shutdown_timeout_s: 30,
            shutdown_delay_s: 0,
            header_read_timeout_s: 10,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            max_body_bytes: 0,
            workers: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawOAuth {
    issuer: Option<String>,
    #[serde(deserialize_with = "lenient_string")]
    client_id: Option<String>,
    #[serde(deserialize_with = "lenient_string")]
    client_secret: Option<String>,
    scopes: Vec<String>,
    resources: Vec<String>,
    redirect_path: String,
    client_auth: Option<String>,
    extra_authorize_params: BTreeMap<String, String>,
    post_logout_redirect_uri: Option<String>,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
    jwks_uri: Option<String>,
    userinfo_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
    end_session_endpoint: Option<String>,
    private_key_file: Option<String>,
    private_key_kid: Option<String>,
    par: String,
    dpop: bool,
    dpop_key_file: Option<String>,
    refresh_skew_s: u64,
    clock_skew_s: u64,
    http_timeout_s: u64,
    login_transaction_ttl_s: u64,
    max_pending_logins: usize,
}

impl Default for RawOAuth {
    fn default() -> Self {
        Self {
            issuer: None,
            client_id: None,
            client_secret: None,
            scopes: vec!["openid".into(), "profile".into(), "offline_access".into()],
            resources: vec![],
            redirect_path: "/oauth-callback".into(),
            client_auth: None,
            extra_authorize_params: BTreeMap::new(),
            post_logout_redirect_uri: None,
            authorization_endpoint: None,
            token_endpoint: None,
            jwks_uri: None,
            userinfo_endpoint: None,
            revocation_endpoint: None,
            end_session_endpoint: None,
            private_key_file: None,
            private_key_kid: None,
            par: "auto".into(),
            dpop: false,
            dpop_key_file: None,
            refresh_skew_s: 30,
            clock_skew_s: 60,
            http_timeout_s: 10,
            login_transaction_ttl_s: 600,
            max_pending_logins: 5,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawSession {
    store: String,
    redis_url: Option<String>,
    redis_ca_file: Option<String>,
    redis_client_cert_file: Option<String>,
    redis_client_key_file: Option<String>,
    redis_cache_ms: u64,
    keys: Vec<String>,
    idle_timeout_s: u64,
    absolute_timeout_s: u64,
}

impl Default for RawSession {
    fn default() -> Self {
        Self {
            store: "cookie".into(),
            redis_url: None,
            redis_ca_file: None,
            redis_client_cert_file: None,
            redis_client_key_file: None,
            redis_cache_ms: 0,
            keys: vec![],
            idle_timeout_s: 3600,
            absolute_timeout_s: 86400,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawCsrf {
    header: String,
}

impl Default for RawCsrf {
    fn default() -> Self {
        Self {
            header: "X-CSRF".into(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawRoute {
    prefix: String,
    upstream: String,
    strip_prefix: bool,
    resource: Option<OneOrMany>,
    scopes: Option<OneOrMany>,
    token: Option<String>,
    exchange: Option<RawExchange>,
    timeout_s: Option<u64>,
}

/// `routes[].exchange = { audience = "...", scope = "..." }` (RFC 8693).
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawExchange {
    audience: String,
    scope: Option<String>,
}

/// A key that takes one string or a list of strings (`resource = "https://a/"` or
/// `resource = ["https://a/", "https://b/"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Accepts a string, or a number/bool written without quotes (an env override like
/// `TOKENGATE_OAUTH__CLIENT_ID=1234` must not become a type error).
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        S(String),
        I(i64),
        F(f64),
        B(bool),
    }
    Ok(Option::<Lenient>::deserialize(d)?.map(|v| match v {
        Lenient::S(s) => s,
        Lenient::I(i) => i.to_string(),
        Lenient::F(f) => f.to_string(),
        Lenient::B(b) => b.to_string(),
    }))
}

// ---------------------------------------------------------------------------------------------
// The validated, typed configuration the service runs with.
// ---------------------------------------------------------------------------------------------

/// A secret string whose `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How tokengate authenticates itself at the token endpoint (RFC 6749 §2.3, OIDC Core §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    ClientSecretBasic,
    ClientSecretPost,
    /// RFC 7523 §2.2: a JWT signed with `oauth.private_key_file`.
    PrivateKeyJwt,
    None,
}

/// Pushed Authorization Requests (RFC 9126).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    /// Used when the IdP advertises a PAR endpoint.
    Auto,
    /// Always; login fails if the IdP has no PAR endpoint.
    Required,
    /// Never (unless the IdP requires it).
    Off,
}

/// The client's private key for `private_key_jwt`; `Debug` never prints it.
#[derive(Clone)]
pub struct ClientKey {
    pub key: jsonwebtoken::EncodingKey,
    pub alg: jsonwebtoken::Algorithm,
    pub kid: Option<String>,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClientKey({:?}, kid {:?}, [redacted])",
            self.alg, self.kid
        )
    }
}

/// Reads a PEM private key: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA).
fn load_client_key(path: &str, kid: Option<String>) -> Result<ClientKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    use jsonwebtoken::{Algorithm, EncodingKey};
    let (key, alg) = if let Ok(k) = EncodingKey::from_rsa_pem(&pem) {
        (k, Algorithm::RS256)
    } else if let Ok(k) = EncodingKey::from_ec_pem(&pem) {
        (k, Algorithm::ES256)
    } else if let Ok(k) = EncodingKey::from_ed_pem(&pem) {
        (k, Algorithm::EdDSA)
    } else {
        return Err(format!(
            "`{path}` is not a PEM RSA, EC P-256 or Ed25519 private key"
        ));
    };
    Ok(ClientKey { key, alg, kid })
}

/// Reads `path` and checks that it holds at least one PEM certificate usable as a trust anchor
/// (the same parsing redis-rs does when it connects, so a bad file fails at start-up, not later).
fn load_ca_roots(path: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("`{path}` is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("`{path}`: a certificate is not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "`{path}` holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(pem)
}

/// A client certificate for mutual TLS to Redis; `Debug` never prints the key.
#[derive(Clone)]
pub struct RedisClientTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for RedisClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisClientTls([certificate], [key redacted])")
    }
}

/// Reads and checks a client certificate chain and its private key (PEM), as rustls will.
fn load_client_tls(cert_path: &str, key_path: &str) -> Result<RedisClientTls, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let cert_pem =
        std::fs::read(cert_path).map_err(|e| format!("cannot read `{cert_path}`: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{cert_path}` is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "`{cert_path}` holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    let key_pem = std::fs::read(key_path).map_err(|e| format!("cannot read `{key_path}`: {e}"))?;
    PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| format!("`{key_path}` holds no PEM private key"))?;
    Ok(RedisClientTls { cert_pem, key_pem })
}

#[derive(Clone, PartialEq, Eq)]
pub enum StoreKind {
    Cookie,
    /// `redis://` / `rediss://` URL; several comma-separated: a Redis Cluster's nodes.
    Redis(String),
}

impl fmt::Debug for StoreKind {
    // The URL may carry a password: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Cookie => f.write_str("cookie"),
            StoreKind::Redis(_) => f.write_str("redis"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub oauth: OAuthConfig,
    pub session: SessionConfig,
    pub csrf: CsrfConfig,
    pub routes: Vec<RouteConfig>,
    pub log: LogConfig,
    /// Non-fatal remarks found while loading (e.g. a generated session key).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The external origin, e.g. `https://app.example.com` (no path).
    pub public_url: Url,
    pub static_dir: Option<String>,
    pub spa_fallback: bool,
    pub trusted_proxies: Vec<Cidr>,
    /// Serve `/metrics` on this separate address instead of the main listener.
    pub metrics_listen: Option<SocketAddr>,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_timeout: Duration,
    /// After SIGTERM, keep accepting (with /readyz = 503) at least this long.
    pub shutdown_delay: Duration,
    /// A client must send its request headers within this (slowloris defence).
    pub header_read_timeout: Duration,
    /// Request headers larger than this are answered 431.
    pub max_header_bytes: usize,
    /// Connections beyond this are answered 503 and closed.
    pub max_connections: usize,
    /// API request bodies larger than this are answered 413 (0: no limit).
    pub max_body_bytes: u64,
    /// Threads serving requests, each with its own event loop (0 in the file: one per core).
    pub workers: usize,
}

impl ServerConfig {
    /// Whether cookies get `Secure` and the `__Host-` prefix.
    pub fn is_https(&self) -> bool {
        self.public_url.scheme() == "https"
    }
    /// `scheme://host[:port]` as a browser sends it in `Origin`.
    pub fn origin(&self) -> String {
        self.public_url.origin().ascii_serialization()
    }
}

#[derive(Debug, Clone)]
pub struct OAuthConfig {
    /// The issuer identifier exactly as configured (compared as a string, RFC 9207 §2.4).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub scopes: Vec<String>,
    pub resources: Vec<String>,
    /// The resource indicators sent on the authorization request: `resources` plus every user
    /// route's `resource` (RFC 8707 §2.1: the grant must cover them for the later downscoped
    /// refresh grants).
    pub authorize_resources: Vec<String>,
    pub redirect_uri: Url,
    pub redirect_path: String,
    pub client_auth: ClientAuth,
    pub client_key: Option<ClientKey>,
    pub par: Par,
    /// `oauth.dpop`: the DPoP key (RFC 9449) that binds every token to this deployment.
    pub dpop: Option<std::sync::Arc<crate::idp::dpop::Dpop>>,
    pub extra_authorize_params: BTreeMap<String, String>,
    pub post_logout_redirect_uri: String,
    pub endpoints: ExplicitEndpoints,
    pub refresh_skew: Duration,
    pub clock_skew: Duration,
    pub http_timeout: Duration,
    pub login_transaction_ttl: Duration,
    pub max_pending_logins: usize,
}

impl OAuthConfig {
    pub fn wants_openid(&self) -> bool {
        self.scopes.iter().any(|s| s == "openid")
    }
}

/// Endpoints set in config; each one wins over discovery.
#[derive(Debug, Clone, Default)]
pub struct ExplicitEndpoints {
    pub authorization_endpoint: Option<Url>,
    pub token_endpoint: Option<Url>,
    pub jwks_uri: Option<Url>,
    pub userinfo_endpoint: Option<Url>,
    pub revocation_endpoint: Option<Url>,
    pub end_session_endpoint: Option<Url>,
}

#[derive(Clone)]
pub struct SessionConfig {
    pub store: StoreKind,
    /// `session.redis_ca_file`, read and checked at load: PEM CA certificates that are then the
    /// only roots trusted for `rediss://` (instead of the webpki roots).
    pub redis_ca_pem: Option<Vec<u8>>,
    /// `session.redis_client_cert_file` + `redis_client_key_file`: the PEM certificate chain and
    /// private key tokengate presents to a `rediss://` server that requires client certificates.
    pub redis_client_tls: Option<RedisClientTls>,
    /// `session.redis_cache_ms`: how long a replica may serve a session it read from Redis
    /// without reading it again; changes reach it at once through Redis pub/sub
    /// (`session::redis_cache`). Zero (the default): every call reads Redis.
    pub redis_cache: Duration,
    /// 32-byte keys: the first seals, all open (rotation).
    pub keys: Vec<[u8; 32]>,
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("store", &self.store)
            .field(
                "redis_ca_pem",
                &format_args!(
                    "{}",
                    if self.redis_ca_pem.is_some() {
                        "set"
                    } else {
                        "none"
                    }
                ),
            )
            .field("redis_client_tls", &self.redis_client_tls)
            .field("redis_cache", &self.redis_cache)
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("idle_timeout", &self.idle_timeout)
            .field("absolute_timeout", &self.absolute_timeout)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct CsrfConfig {
    pub header: http::HeaderName,
}

/// Which access token a route's requests carry (`routes[].token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteToken {
    /// The user's token; no session → 401.
    User,
    /// The client's own token (client-credentials grant, RFC 6749 §4.4); no session needed.
    Client,
    /// The user's token when logged in, no `Authorization` otherwise.
    UserOrAnonymous,
    /// Never a token.
    None,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Normalised: starts with `/`, no trailing `/` (except the root route `/`... which is refused).
    pub prefix: String,
    pub upstream: Url,
    pub strip_prefix: bool,
    /// RFC 8707 resource indicators of this route's API (`resource`, one or a list); empty: none.
    pub resources: Vec<String>,
    /// The scopes this route's token is narrowed to (`scopes`); empty: as granted.
    pub scopes: Vec<String>,
    pub token: RouteToken,
    /// `exchange`: the session's access token is exchanged for one meant for this API (RFC 8693).
    pub exchange: Option<Exchange>,
    pub timeout: Duration,
}

/// What a route's token exchange asks for (RFC 8693 §2.1 `audience`, `scope`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub audience: String,
    /// Space-separated; `None`: what the authorization server grants for the audience.
    pub scope: Option<String>,
}

impl RouteConfig {
    /// True when the route wants a token of its own (audience and/or scopes) rather than the
    /// session's access token.
    pub fn wants_own_token(&self) -> bool {
        !self.resources.is_empty() || !self.scopes.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (
                a.parse::<std::net::IpAddr>().ok()?,
                Some(l.parse::<u8>().ok()?),
            ),
            None => (s.parse::<std::net::IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = len.unwrap_or(max);
        (prefix_len <= max).then_some(Cidr { addr, prefix_len })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map(V4).unwrap_or(V6(v6)),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl Config {
    /// Reads and validates `path`, applying overrides from the process environment.
    pub fn load_file(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("cannot read config file {path}: {e}")],
        })?;
        Config::load(&text, std::env::vars())
    }

    /// Parses `toml_text`, applies `TOKENGATE_A__B` overrides from `env`, and validates everything.
    /// The environment is injected so tests never touch the process environment.
    pub fn load(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut value: toml::Value = match toml::from_str::<toml::Table>(toml_text) {
            Ok(t) => toml::Value::Table(t),
            Err(e) => {
                return Err(ConfigError {
                    problems: vec![format!("config file is not valid TOML: {}", e.message())],
                })
            }
        };
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (k, v) in env {
            if let Err(p) = apply_env_override(&mut value, &k, &v) {
                problems.push(p);
            }
        }
        let mut unknown = Vec::new();
        let raw: RawConfig = match serde_ignored::deserialize(value, |path| {
            unknown.push(path.to_string().replace(".?", ""))
        }) {
            Ok(raw) => raw,
            Err(e) => {
                problems.push(format!("{e}"));
                problems.extend(unknown.iter().map(|k| format!("{k}: unknown key")));
                return Err(ConfigError { problems });
            }
        };
        problems.extend(unknown.iter().map(|k| format!("{k}: unknown key")));
        let cfg = validate(raw, &mut problems);
        if problems.is_empty() {
            cfg.ok_or_else(|| ConfigError {
                problems: vec!["configuration could not be built".into()],
            })
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Departures from the BFF recommendations of the IETF "OAuth 2.0 for Browser-Based
    /// Applications" draft (§6.1) and common deployment advice, each with its reason.
    pub fn recommendations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let s = &self.server;
        if !s.is_https() {
            out.push(format!(
                "server.public_url is {}: use https, so cookies get Secure and the __Host- prefix (a network attacker could otherwise read or plant them)",
                s.public_url.scheme()
            ));
        }
        if self.warnings.iter().any(|w| w.starts_with("session.keys")) {
            out.push("session.keys is empty: set at least one 32-byte key, or every restart logs everybody out and replicas cannot read each other's sessions".into());
        }
        if self.oauth.client_auth == ClientAuth::None {
            out.push("oauth.client_auth = \"none\": a BFF is a confidential client; authenticate it at the token endpoint (client_secret_basic or private_key_jwt)".into());
        }
        if !self.oauth.scopes.iter().any(|x| x == "openid") {
            out.push("oauth.scopes lacks `openid`: without an ID token there is no nonce check and /userinfo has no verified identity".into());
        }
        if !self.oauth.scopes.iter().any(|x| x == "offline_access") {
            out.push("oauth.scopes lacks `offline_access`: many IdPs then issue no refresh token, and sessions end with the first access token".into());
        }
        for c in &s.trusted_proxies {
            if c.prefix_len == 0 {
                out.push(format!("server.trusted_proxies contains {}/0: every client could spoof X-Forwarded-* headers", c.addr));
            }
        }
        for r in &self.routes {
            let host = r.upstream.host_str().unwrap_or("");
            let local = is_loopback_host(&r.upstream);
            if r.upstream.scheme() == "http" && !local {
                out.push(format!("routes `{}`: upstream {} is plain http on a non-local host: access tokens would cross the network unencrypted", r.prefix, r.upstream));
            }
            if host == "0.0.0.0" || host == "[::]" || host.contains('*') {
                out.push(format!(
                    "routes `{}`: upstream host `{host}` is a wildcard, not an API",
                    r.prefix
                ));
            }
        }
        if self.oauth.clock_skew > Duration::from_secs(120) {
            out.push(
                "oauth.clock_skew_s above 120 s widens the window for replayed ID tokens".into(),
            );
        }
        if self.session.absolute_timeout > Duration::from_secs(7 * 86400) {
            out.push("session.absolute_timeout_s above 7 days: a stolen session cookie stays useful for long".into());
        }
        if self.session.idle_timeout > self.session.absolute_timeout {
            out.push(
                "session.idle_timeout_s exceeds absolute_timeout_s: the idle timeout never applies"
                    .into(),
            );
        }
        out
    }

    /// The config as it may be logged: secrets are redacted by their `Debug`.
    pub fn redacted_summary(&self) -> String {
        format!(
            "listen={} public_url={} issuer={} client_id={} client_auth={:?} store={:?} routes={}",
            self.server.listen,
            self.server.public_url,
            self.oauth.issuer,
            self.oauth.client_id,
            self.oauth.client_auth,
            self.session.store,
            self.routes
                .iter()
                .map(|r| format!("{}->{}", r.prefix, r.upstream))
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

/// Fetch: CORS-safelisted request headers, and headers only the browser sets (forbidden request
/// headers, `Sec-` and `Proxy-` prefixes). None of them needs a preflight from a foreign origin.
fn is_unsuitable_csrf_header(lower: &str) -> bool {
    const NAMES: &[&str] = &[
        "accept",
        "accept-language",
        "content-language",
        "content-type",
        "range",
        "accept-charset",
        "accept-encoding",
        "access-control-request-headers",
        "access-control-request-method",
        "connection",
        "content-length",
        "cookie",
        "cookie2",
        "date",
        "dnt",
        "expect",
        "host",
        "keep-alive",
        "origin",
        "referer",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "via",
    ];
    NAMES.contains(&lower) || lower.starts_with("sec-") || lower.starts_with("proxy-")
}

/// `TOKENGATE_OAUTH__CLIENT_SECRET=x` sets `oauth.client_secret`; `TOKENGATE_ROUTES__0__UPSTREAM`
/// indexes arrays. Values are read as TOML when they look like arrays, tables, booleans or numbers,
/// otherwise as strings.
fn apply_env_override(root: &mut toml::Value, key: &str, raw: &str) -> Result<(), String> {
    let path: Vec<String> = key[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(format!("{key}: malformed override name"));
    }
    let value = parse_env_value(raw);
    let mut cur = root;
    for (i, seg) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    // Keep the type of a value that is already there: a string stays a string.
                    let v = match (t.get(seg), &value) {
                        (Some(toml::Value::String(_)), _) => toml::Value::String(raw.to_string()),
                        _ => value.clone(),
                    };
                    t.insert(seg.clone(), v);
                    return Ok(());
                }
                let next_is_index = path[i + 1].parse::<usize>().is_ok();
                t.entry(seg.clone()).or_insert_with(|| {
                    if next_is_index {
                        toml::Value::Array(vec![])
                    } else {
                        toml::Value::Table(toml::Table::new())
                    }
                })
            }
            toml::Value::Array(a) => {
                let idx: usize = seg
                    .parse()
                    .map_err(|_| format!("{key}: `{seg}` is not an array index"))?;
                if idx > a.len() {
                    return Err(format!("{key}: index {idx} leaves a gap in the array"));
                }
                if idx == a.len() {
                    a.push(toml::Value::Table(toml::Table::new()));
                }
                if last {
                    a[idx] = value.clone();
                    return Ok(());
                }
                &mut a[idx]
            }
            _ => return Err(format!("{key}: cannot descend into a non-table value")),
        };
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let t = raw.trim();
    let looks_typed = t.starts_with('[')
        || t.starts_with('{')
        || t == "true"
        || t == "false"
        || (!t.is_empty() && t.chars().all(|c| c.is_ascii_digit()));
    if looks_typed {
        if let Ok(mut tbl) = toml::from_str::<toml::Table>(&format!("v = {t}")) {
            if let Some(v) = tbl.remove("v") {
                return v;
            }
        }
    }
    toml::Value::String(raw.to_string())
}

fn parse_url(key: &str, s: &str, problems: &mut Vec<String>) -> Option<Url> {
    match Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
        Ok(u) => {
            problems.push(format!(
                "{key}: `{s}` must be an http(s) URL with a host (got scheme `{}`)",
                u.scheme()
            ));
            None
        }
        Err(e) => {
            problems.push(format!("{key}: `{s}` is not a valid URL ({e})"));
            None
        }
    }
}

fn opt_url(key: &str, s: &Option<String>, problems: &mut Vec<String>) -> Option<Url> {
    s.as_deref().and_then(|s| parse_url(key, s, problems))
}

fn positive(key: &str, v: u64, problems: &mut Vec<String>) -> Duration {
    if v == 0 {
        problems.push(format!("{key}: must be greater than 0"));
    }
    Duration::from_secs(v)
}

/// Decodes a session key: standard or URL-safe base64 of exactly 32 bytes.
pub fn decode_key(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(s))
        .map_err(|_| "is not valid base64".to_string())?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("must decode to 32 bytes, got {}", bytes.len()))
}

fn validate(raw: RawConfig, problems: &mut Vec<String>) -> Option<Config> {
    let mut warnings = Vec::new();

    // [server]
    let listen = raw
        .server
        .listen
        .parse::<SocketAddr>()
        .map_err(|_| {
            problems.push(format!(
                "server.listen: `{}` is not a socket address like 127.0.0.1:8080",
                raw.server.listen
            ))
        })
        .ok();
    let public_url = parse_url("server.public_url", &raw.server.public_url, problems);
    if let Some(u) = &public_url {
        if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
            problems.push(format!(
                "server.public_url: `{}` must be an origin only (no path, query or fragment)",
                raw.server.public_url
            ));
        }
    }
    let metrics_listen = raw.server.metrics_listen.as_deref().and_then(|m| {
        m.parse::<SocketAddr>()
            .map_err(|_| {
                problems.push(format!(
                    "server.metrics_listen: `{m}` is not a socket address like 127.0.0.1:9090"
                ))
            })
            .ok()
    });
    let shutdown_timeout = positive(
        "server.shutdown_timeout_s",
        raw.server.shutdown_timeout_s,
        problems,
    );
    let header_read_timeout = positive(
        "server.header_read_timeout_s",
        raw.server.header_read_timeout_s,
        problems,
    );
    if raw.server.max_header_bytes < 8192 {
        problems.push(
            "server.max_header_bytes: at least 8192 (session cookies alone can take several KB)"
                .into(),
        );
    }
    if raw.server.max_connections == 0 {
        problems.push("server.max_connections: must be greater than 0".into());
    }
    if raw.server.workers > 256 {
        problems.push("server.workers: at most 256 (0 means one per core)".into());
    }
    let mut trusted_proxies = Vec::new();
    for (i, c) in raw.server.trusted_proxies.iter().enumerate() {
        match Cidr::parse(c) {
            Some(c) => trusted_proxies.push(c),
            None => problems.push(format!(
                "server.trusted_proxies[{i}]: `{c}` is not an IP address or CIDR"
            )),
        }
    }

    // [oauth]
    let o = &raw.oauth;
    let issuer = opt_url("oauth.issuer", &o.issuer, problems).and(o.issuer.clone());
    let endpoints = ExplicitEndpoints {
        authorization_endpoint: opt_url(
            "oauth.authorization_endpoint",
            &o.authorization_endpoint,
            problems,
        ),
        token_endpoint: opt_url("oauth.token_endpoint", &o.token_endpoint, problems),
        jwks_uri: opt_url("oauth.jwks_uri", &o.jwks_uri, problems),
        userinfo_endpoint: opt_url("oauth.userinfo_endpoint", &o.userinfo_endpoint, problems),
        revocation_endpoint: opt_url(
            "oauth.revocation_endpoint",
            &o.revocation_endpoint,
            problems,
        ),
        end_session_endpoint: opt_url(
            "oauth.end_session_endpoint",
            &o.end_session_endpoint,
            problems,
        ),
    };
    if o.issuer.is_none() {
        problems.push(
            "oauth.issuer: missing (the issuer identifier is needed for discovery and to check `iss` in ID tokens)"
                .into(),
        );
    }
    let client_id = match o.client_id.as_deref().map(str::trim) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            problems.push("oauth.client_id: missing".into());
            String::new()
        }
    };
    let client_secret = o
        .client_secret
        .clone()
        .filter(|s| !s.is_empty())
        .map(Secret);
    // Unset: client_secret_basic with a secret; without one, a public client (interface.md:
    // "absent => public client"). Set explicitly, a missing secret is an error, never a downgrade.
    let auth_name = match (&o.client_auth, &client_secret) {
        (Some(a), _) => a.as_str(),
        (None, Some(_)) => "client_secret_basic",
        (None, None) => {
            warnings.push("oauth.client_secret is not set: tokengate runs as a public client (PKCE only). Set the secret (TOKENGATE_OAUTH__CLIENT_SECRET), or client_auth = \"none\" to make this explicit.".into());
            "none"
        }
    };
    let client_auth = match auth_name {
        "client_secret_basic" => Some(ClientAuth::ClientSecretBasic),
        "client_secret_post" => Some(ClientAuth::ClientSecretPost),
        "none" => Some(ClientAuth::None),
        "private_key_jwt" => Some(ClientAuth::PrivateKeyJwt),
        other => {
            problems.push(format!(
                "oauth.client_auth: `{other}` is not one of client_secret_basic, client_secret_post, private_key_jwt, none"
            ));
            None
        }
    };
    if matches!(
        client_auth,
        Some(ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost)
    ) && client_secret.is_none()
    {
        problems.push(format!(
            "oauth.client_secret: missing, but oauth.client_auth = \"{}\" needs it (set TOKENGATE_OAUTH__CLIENT_SECRET, or client_auth = \"none\" for a public client)",
            auth_name
        ));
    }
    let client_key = match (&client_auth, &o.private_key_file) {
        (Some(ClientAuth::PrivateKeyJwt), Some(path)) => {
            match load_client_key(path, o.private_key_kid.clone()) {
                Ok(k) => Some(k),
                Err(e) => {
                    problems.push(format!("oauth.private_key_file: {e}"));
                    None
                }
            }
        }
        (Some(ClientAuth::PrivateKeyJwt), None) => {
            problems.push("oauth.private_key_file: missing, but oauth.client_auth = \"private_key_jwt\" needs it".into());
            None
        }
        _ => None,
    };
    let par = match o.par.as_str() {
        "auto" => Par::Auto,
        "required" => Par::Required,
        "off" => Par::Off,
        other => {
            problems.push(format!(
                "oauth.par: `{other}` is not one of auto, required, off"
            ));
            Par::Auto
        }
    };
    if o.scopes.is_empty() {
        problems.push("oauth.scopes: must not be empty".into());
    }
    for (i, s) in o.scopes.iter().enumerate() {
        if !is_scope_token(s) {
            problems.push(format!(
                "oauth.scopes[{i}]: `{s}` is not a valid scope token"
            ));
        }
    }
    for (i, r) in o.resources.iter().enumerate() {
        match Url::parse(r) {
            Ok(u) if u.fragment().is_none() => {}
            _ => problems.push(format!(
                "oauth.resources[{i}]: `{r}` must be an absolute URI without a fragment (RFC 8707 §2)"
            )),
        }
    }
    if !o.redirect_path.starts_with('/') || o.redirect_path.starts_with("//") {
        problems.push(format!(
            "oauth.redirect_path: `{}` must be an absolute path starting with a single /",
            o.redirect_path
        ));
    }
    const RESERVED: &[&str] = &[
        "client_id",
        "response_type",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
        "resource",
    ];
    for k in o.extra_authorize_params.keys() {
        if RESERVED.contains(&k.as_str()) {
            problems.push(format!(
                "oauth.extra_authorize_params.{k}: tokengate sets this parameter itself"
            ));
        }
    }
    let redirect_uri = public_url.as_ref().and_then(|u| {
        if o.redirect_path.starts_with('/') {
            u.join(&o.redirect_path).ok()
        } else {
            None
        }
    });
    let post_logout_redirect_uri = match &o.post_logout_redirect_uri {
        Some(u) => {
            parse_url("oauth.post_logout_redirect_uri", u, problems);
            u.clone()
        }
        None => public_url
            .as_ref()
            .map(|u| u.as_str().to_string())
            .unwrap_or_default(),
    };
    let refresh_skew = Duration::from_secs(o.refresh_skew_s);
    let clock_skew = Duration::from_secs(o.clock_skew_s);
    if o.clock_skew_s > 600 {
        problems.push("oauth.clock_skew_s: at most 600 seconds".into());
    }
    let http_timeout = positive("oauth.http_timeout_s", o.http_timeout_s, problems);
    let login_transaction_ttl = positive(
        "oauth.login_transaction_ttl_s",
        o.login_transaction_ttl_s,
        problems,
    );
    if o.max_pending_logins == 0 || o.max_pending_logins > 20 {
        problems.push("oauth.max_pending_logins: must be between 1 and 20".into());
    }

    // [session]
    let store = match raw.session.store.as_str() {
        "cookie" => Some(StoreKind::Cookie),
        "redis" => match &raw.session.redis_url {
            Some(u) if !u.trim().is_empty() => Some(StoreKind::Redis(u.clone())),
            _ => {
                problems.push(
                    "session.redis_url: missing, but session.store = \"redis\" needs it".into(),
                );
                None
            }
        },
        other => {
            problems.push(format!(
                "session.store: `{other}` is not one of cookie, redis"
            ));
            None
        }
    };
    if let Some(u) = &raw.session.redis_url {
        for node in u.split(',').map(str::trim) {
            if !(node.starts_with("redis://") || node.starts_with("rediss://"))
                || Url::parse(node).is_err()
            {
                problems.push(
                    "session.redis_url: each (comma-separated) node must be a redis:// or rediss:// URL"
                        .into(),
                );
            }
        }
    }
    let redis_tls_only = raw.session.redis_url.as_deref().is_some_and(|u| {
        u.split(',')
            .map(str::trim)
            .all(|node| node.starts_with("rediss://"))
    });
    let redis_ca_pem = raw.session.redis_ca_file.as_deref().and_then(|path| {
        if !redis_tls_only {
            problems.push("session.redis_ca_file: only for TLS, but session.redis_url is not (every node) a rediss:// URL".into());
        }
        match load_ca_roots(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                problems.push(format!("session.redis_ca_file: {e}"));
                None
            }
        }
    });
    let redis_client_tls = match (
        &raw.session.redis_client_cert_file,
        &raw.session.redis_client_key_file,
    ) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            if !redis_tls_only {
                problems.push("session.redis_client_cert_file: only for TLS, but session.redis_url is not (every node) a rediss:// URL".into());
            }
            match load_client_tls(cert, key) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(format!("session.redis_client_cert_file/key_file: {e}"));
                    None
                }
            }
        }
        (Some(_), None) => {
            problems.push("session.redis_client_key_file: missing; redis_client_cert_file needs its private key".into());
            None
        }
        (None, Some(_)) => {
            problems.push("session.redis_client_cert_file: missing; redis_client_key_file needs its certificate".into());
            None
        }
    };
    let redis_cache = Duration::from_millis(raw.session.redis_cache_ms);
    if raw.session.redis_cache_ms > MAX_REDIS_CACHE_MS {
        problems.push(format!(
            "session.redis_cache_ms: at most {MAX_REDIS_CACHE_MS} (it bounds how long a copy may be served if invalidations were lost)"
        ));
    }
    if raw.session.redis_cache_ms > 0 && raw.session.store != "redis" {
        warnings.push("session.redis_cache_ms: only used with session.store = \"redis\"".into());
    }
    let mut keys = Vec::new();
    for (i, k) in raw.session.keys.iter().enumerate() {
        match decode_key(k) {
            Ok(k) => keys.push(k),
            Err(e) => problems.push(format!(
                "session.keys[{i}]: {e} (generate one with `tokengate keygen`)"
            )),
        }
    }
    if raw.session.keys.is_empty() {
        let mut k = [0u8; 32];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut k);
        keys.push(k);
        warnings.push("session.keys is empty: generated a random key for this process only; sessions will not survive a restart and replicas will not share them. Set session.keys (see `tokengate keygen`).".into());
    }
    let dpop = match (raw.oauth.dpop, &raw.oauth.dpop_key_file) {
        (true, Some(path)) => match std::fs::read_to_string(path) {
            Ok(pem) => match crate::idp::dpop::Dpop::from_pem(&pem) {
                Ok(d) => Some(std::sync::Arc::new(d)),
                Err(e) => {
                    problems.push(format!("oauth.dpop_key_file: `{path}` is {e}"));
                    None
                }
            },
            Err(e) => {
                problems.push(format!("oauth.dpop_key_file: cannot read `{path}`: {e}"));
                None
            }
        },
        (true, None) => {
            if raw.session.keys.is_empty() {
                warnings.push("oauth.dpop without session.keys or oauth.dpop_key_file: the DPoP key is this process's own, so its tokens stop working at a restart and on other replicas".into());
            }
            keys.first()
                .map(|k| std::sync::Arc::new(crate::idp::dpop::Dpop::derived(k)))
        }
        (false, Some(_)) => {
            problems.push(
                "oauth.dpop_key_file: set, but oauth.dpop is false; set oauth.dpop = true or remove it"
                    .into(),
            );
            None
        }
        (false, None) => None,
    };
    let idle_timeout = positive(
        "session.idle_timeout_s",
        raw.session.idle_timeout_s,
        problems,
    );
    let absolute_timeout = positive(
        "session.absolute_timeout_s",
        raw.session.absolute_timeout_s,
        problems,
    );

    // [csrf]
    let header = match http::HeaderName::from_bytes(raw.csrf.header.as_bytes()) {
        // A header a cross-site request can carry without a CORS preflight (safelisted), or one
        // the browser sets itself, proves nothing about who made the request.
        Ok(h) if is_unsuitable_csrf_header(h.as_str()) => {
            problems.push(format!(
                "csrf.header: `{}` is sent by browsers on cross-site requests (CORS-safelisted or set by the browser itself); use a custom name such as X-CSRF",
                raw.csrf.header
            ));
            None
        }
        Ok(h) => Some(h),
        Err(_) => {
            problems.push(format!(
                "csrf.header: `{}` is not a valid header name",
                raw.csrf.header
            ));
            None
        }
    };

    // [[routes]]
    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let prefix = r.prefix.trim_end_matches('/').to_string();
        let mut ok = true;
        if !r.prefix.starts_with('/') || prefix.is_empty() {
            problems.push(format!(
                "routes[{i}].prefix: `{}` must start with / and not be the root",
                r.prefix
            ));
            ok = false;
        } else if prefix
            .split('/')
            .skip(1)
            .any(|seg| seg.is_empty() || seg == "." || seg == ".." || seg.contains(['%', '\\']))
        {
            problems.push(format!(
                "routes[{i}].prefix: `{}` must be a plain path (no empty, dot or encoded segments)",
                r.prefix
            ));
            ok = false;
        }
        let reserved = [
            "/login",
            "/logout",
            "/backchannel-logout",
            "/refreshtoken",
            "/userinfo",
            "/healthz",
            "/readyz",
            "/metrics",
            o.redirect_path.as_str(),
        ];
        if reserved.contains(&prefix.as_str()) {
            problems.push(format!(
                "routes[{i}].prefix: `{prefix}` is one of tokengate's own endpoints"
            ));
            ok = false;
        }
        if routes.iter().any(|x| x.prefix == prefix) {
            problems.push(format!("routes[{i}].prefix: `{prefix}` is used twice"));
            ok = false;
        }
        let upstream = if r.upstream.is_empty() {
            problems.push(format!("routes[{i}].upstream: missing"));
            None
        } else {
            let u = parse_url(&format!("routes[{i}].upstream"), &r.upstream, problems);
            if let Some(u) = &u {
                if u.query().is_some() || u.fragment().is_some() {
                    problems.push(format!(
                        "routes[{i}].upstream: `{}` must not have a query or fragment",
                        r.upstream
                    ));
                }
            }
            u
        };
        let timeout = positive(
            &format!("routes[{i}].timeout_s"),
            r.timeout_s.unwrap_or(30),
            problems,
        );
        let token = match r.token.as_deref().unwrap_or("user") {
            "user" => RouteToken::User,
            "client" => RouteToken::Client,
            "user-or-anonymous" => RouteToken::UserOrAnonymous,
            "none" => RouteToken::None,
            other => {
                problems.push(format!(
                    "routes[{i}].token: `{other}` is not one of user, client, user-or-anonymous, none"
                ));
                RouteToken::User
            }
        };
        let resources = r
            .resource
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        for (j, res) in resources.iter().enumerate() {
            match Url::parse(res) {
                Ok(u) if u.fragment().is_none() => {}
                _ => problems.push(format!(
                    "routes[{i}].resource[{j}]: `{res}` must be an absolute URI without a fragment (RFC 8707 §2)"
                )),
            }
        }
        let scopes = r
            .scopes
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        for (j, sc) in scopes.iter().enumerate() {
            if !is_scope_token(sc) {
                problems.push(format!(
                    "routes[{i}].scopes[{j}]: `{sc}` is not a valid scope token"
                ));
            } else if token != RouteToken::Client && !o.scopes.contains(sc) {
                // A refresh grant can only narrow what the user granted (RFC 6749 §6).
                problems.push(format!(
                    "routes[{i}].scopes[{j}]: `{sc}` is not in oauth.scopes; a route's scopes must be a subset of the scopes requested at login"
                ));
            }
        }
        if token == RouteToken::None && (!resources.is_empty() || !scopes.is_empty()) {
            problems.push(format!(
                "routes[{i}].token: \"none\" sends no token, so routes[{i}].resource and routes[{i}].scopes have no effect; remove them"
            ));
        }
        let exchange = r.exchange.as_ref().and_then(|x| {
            let mut fine = true;
            if x.audience.trim().is_empty() {
                problems.push(format!("routes[{i}].exchange.audience: missing (the API's identifier the exchanged token is meant for)"));
                fine = false;
            }
            let scope = x.scope.as_deref().map(str::trim).filter(|s| !s.is_empty());
            for sc in scope.iter().flat_map(|s| s.split_whitespace()) {
                if !is_scope_token(sc) {
                    problems.push(format!(
                        "routes[{i}].exchange.scope: `{sc}` is not a valid scope token"
                    ));
                    fine = false;
                }
            }
            if !matches!(token, RouteToken::User | RouteToken::UserOrAnonymous) {
                problems.push(format!("routes[{i}].exchange: exchanges the user's token, so routes[{i}].token must be \"user\" or \"user-or-anonymous\""));
                fine = false;
            }
            if !resources.is_empty() || !scopes.is_empty() {
                problems.push(format!("routes[{i}].exchange: use exchange.audience/exchange.scope or resource/scopes, not both (one way to get the route's token)"));
                fine = false;
            }
            fine.then(|| Exchange {
                audience: x.audience.trim().to_string(),
                scope: scope.map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")),
            })
        });
        if let (true, Some(upstream)) = (ok, upstream) {
            routes.push(RouteConfig {
                prefix,
                upstream,
                strip_prefix: r.strip_prefix,
                resources,
                scopes,
                token,
                exchange,
                timeout,
            });
        }
    }
    let mut authorize_resources = o.resources.clone();
    for r in &routes {
        if matches!(r.token, RouteToken::User | RouteToken::UserOrAnonymous) {
            for res in &r.resources {
                if !authorize_resources.contains(res) {
                    authorize_resources.push(res.clone());
                }
            }
        }
    }
    // Longest prefix first, so `/api/admin` wins over `/api`.
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

    // [log]
    let format = match raw.log.format.as_str() {
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        other => {
            problems.push(format!("log.format: `{other}` is not one of text, json"));
            None
        }
    };

    if let Some(u) = &public_url {
        if u.scheme() != "https" && !is_loopback_host(u) {
            warnings.push(format!(
                "server.public_url `{u}` is not https: cookies are sent without Secure and without the __Host- prefix"
            ));
        }
    }

    Some(Config {
        server: ServerConfig {
            listen: listen?,
            public_url: public_url?,
            static_dir: raw.server.static_dir.filter(|s| !s.is_empty()),
            spa_fallback: raw.server.spa_fallback,
            trusted_proxies,
            metrics_listen,
            shutdown_timeout,
            shutdown_delay: Duration::from_secs(raw.server.shutdown_delay_s),
            header_read_timeout,
            max_header_bytes: raw.server.max_header_bytes,
            max_connections: raw.server.max_connections,
            max_body_bytes: raw.server.max_body_bytes,
            workers: match raw.server.workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
        },
        oauth: OAuthConfig {
            issuer: issuer?,
            client_id,
            client_secret,
            scopes: raw.oauth.scopes.clone(),
            resources: raw.oauth.resources.clone(),
            authorize_resources,
            redirect_uri: redirect_uri?,
            redirect_path: raw.oauth.redirect_path.clone(),
            client_auth: client_auth?,
            client_key,
            par,
            dpop,
            extra_authorize_params: raw.oauth.extra_authorize_params.clone(),
            post_logout_redirect_uri,
            endpoints,
            refresh_skew,
            clock_skew,
            http_timeout,
            login_transaction_ttl,
            max_pending_logins: raw.oauth.max_pending_logins,
        },
        session: SessionConfig {
            store: store?,
            redis_ca_pem,
            redis_client_tls,
            redis_cache,
            keys,
            idle_timeout,
            absolute_timeout,
        },
        csrf: CsrfConfig { header: header? },
        routes,
        log: LogConfig {
            format: format?,
            level: raw.log.level,
        },
        warnings,
    })
}

/// RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

fn is_loopback_host(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn minimal() -> String {
        format!(
            r#"
[oauth]
issuer = "http://127.0.0.1:9000"
client_id = "tg"
client_secret = "s"
[session]
keys = ["{KEY}"]
"#
        )
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = Config::load(&minimal(), vec![]).expect("valid");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(
            c.oauth.redirect_uri.as_str(),
            "http://localhost:8080/oauth-callback"
        );
        assert_eq!(c.oauth.client_auth, ClientAuth::ClientSecretBasic);
        assert_eq!(c.csrf.header.as_str(), "x-csrf");
    }

    #[test]
    fn env_overrides_win_and_keep_strings_strings() {
        let env = vec![
            (
                "TOKENGATE_OAUTH__CLIENT_SECRET".to_string(),
                "12345".to_string(),
            ),
            (
                "TOKENGATE_SERVER__LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            (
                "TOKENGATE_ROUTES__0__PREFIX".to_string(),
                "/api".to_string(),
            ),
            (
                "TOKENGATE_ROUTES__0__UPSTREAM".to_string(),
                "http://127.0.0.1:3000".to_string(),
            ),
            ("OTHER_VAR".to_string(), "ignored".to_string()),
        ];
        let c = Config::load(&minimal(), env).expect("valid");
        assert_eq!(
            c.oauth.client_secret.as_ref().map(|s| s.expose()),
            Some("12345")
        );
        assert_eq!(c.server.listen.port(), 9999);
        assert_eq!(c.routes[0].prefix, "/api");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = r#"
[server]
public_url = "not a url"
bogus = 1
[oauth]
issuer = "ftp://x"
[session]
keys = ["c2hvcnQ="]
[[routes]]
prefix = "api"
upstream = "http://127.0.0.1:1"
"#;
        let e = Config::load(text, vec![]).expect_err("invalid");
        let msg = e.to_string();
        for needle in [
            "server.public_url",
            "server.bogus: unknown key",
            "oauth.issuer",
            "oauth.client_id: missing",
            "session.keys[0]",
            "routes[0].prefix",
        ] {
            assert!(msg.contains(needle), "missing {needle} in:\n{msg}");
        }
    }

    #[test]
    fn private_key_jwt_and_par_settings_are_checked() {
        let text = r#"
[oauth]
issuer = "http://127.0.0.1:9000"
client_id = "tg"
client_auth = "private_key_jwt"
par = "sometimes"
"#;
        let msg = Config::load(text, vec![]).expect_err("invalid").to_string();
        assert!(msg.contains("oauth.private_key_file: missing"), "{msg}");
        assert!(msg.contains("oauth.par: `sometimes`"), "{msg}");
        let bad_file = text.replace(
            "par = \"sometimes\"",
            "private_key_file = \"/nonexistent.pem\"",
        );
        let msg = Config::load(&bad_file, vec![])
            .expect_err("invalid")
            .to_string();
        assert!(msg.contains("cannot read `/nonexistent.pem`"), "{msg}");
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let c = Config::load(&minimal(), vec![]).expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(KEY));
        assert!(dbg.contains("[redacted]"));
    }

    #[test]
    fn recommendations_flag_weak_deployments() {
        let weak = Config::load(
            r#"
[server]
public_url = "http://app.example.com"
trusted_proxies = ["0.0.0.0/0"]
[oauth]
issuer = "http://127.0.0.1:9000"
client_id = "tg"
client_auth = "none"
scopes = ["profile"]
[[routes]]
prefix = "/api"
upstream = "http://api.internal:3000"
"#,
            vec![],
        )
        .expect("valid");
        let recs = weak.recommendations().join("\n");
        for needle in [
            "use https",
            "session.keys is empty",
            "confidential client",
            "lacks `openid`",
            "offline_access",
            "0.0.0.0/0",
            "unencrypted",
        ] {
            assert!(recs.contains(needle), "missing {needle} in:\n{recs}");
        }
        let strong = Config::load(
            &format!(
                r#"
[server]
public_url = "https://app.example.com"
[oauth]
issuer = "https://idp.example.com"
client_id = "tg"
client_secret = "s"
scopes = ["openid", "offline_access"]
[session]
keys = ["{KEY}"]
[[routes]]
prefix = "/api"
upstream = "https://api.example.com"
"#
            ),
            vec![],
        )
        .expect("valid");
        assert!(
            strong.recommendations().is_empty(),
            "{:?}",
            strong.recommendations()
        );
    }

    #[test]
    fn route_token_settings_are_read_and_checked() {
        let ok = Config::load(
            &format!(
                r#"{}
[[routes]]
prefix = "/a"
upstream = "http://127.0.0.1:1"
resource = "https://a.example/"
scopes = ["profile"]
[[routes]]
prefix = "/b"
upstream = "http://127.0.0.1:1"
resource = ["https://b.example/", "https://b2.example/"]
token = "user-or-anonymous"
[[routes]]
prefix = "/c"
upstream = "http://127.0.0.1:1"
token = "client"
resource = "https://c.example/"
scopes = ["svc:read"]
[[routes]]
prefix = "/d"
upstream = "http://127.0.0.1:1"
token = "none"
[[routes]]
prefix = "/e"
upstream = "http://127.0.0.1:1"
"#,
                minimal()
            ),
            vec![],
        )
        .expect("valid");
        let r = |p: &str| ok.routes.iter().find(|r| r.prefix == p).expect("route");
        assert_eq!(r("/a").resources, vec!["https://a.example/"]);
        assert_eq!(r("/a").scopes, vec!["profile"]);
        assert_eq!(r("/a").token, RouteToken::User);
        assert_eq!(r("/b").resources.len(), 2);
        assert_eq!(r("/b").token, RouteToken::UserOrAnonymous);
        assert_eq!(r("/c").token, RouteToken::Client);
        assert_eq!(r("/d").token, RouteToken::None);
        assert!(
            !r("/e").wants_own_token(),
            "no keys: the session's token, as before"
        );
        // User routes' resources are asked for at login; the client route's are not.
        assert_eq!(
            ok.oauth.authorize_resources,
            vec![
                "https://a.example/",
                "https://b.example/",
                "https://b2.example/"
            ]
        );

        let bad = format!(
            r#"{}
[[routes]]
prefix = "/a"
upstream = "http://127.0.0.1:1"
scopes = ["admin"]
[[routes]]
prefix = "/b"
upstream = "http://127.0.0.1:1"
token = "sometimes"
[[routes]]
prefix = "/c"
upstream = "http://127.0.0.1:1"
token = "none"
resource = "https://c.example/"
[[routes]]
prefix = "/d"
upstream = "http://127.0.0.1:1"
resource = "not a uri"
"#,
            minimal()
        );
        let msg = Config::load(&bad, vec![]).expect_err("invalid").to_string();
        for needle in [
            "routes[0].scopes[0]: `admin` is not in oauth.scopes",
            "routes[1].token: `sometimes`",
            "routes[2].token: \"none\"",
            "routes[3].resource[0]",
        ] {
            assert!(msg.contains(needle), "missing {needle} in:\n{msg}");
        }
    }

    #[test]
    fn exchange_routes_are_checked() {
        let ok = Config::load(
            &format!(
                r#"{}
[[routes]]
prefix = "/x"
upstream = "http://127.0.0.1:1"
exchange = {{ audience = "https://x.example/", scope = "x:read  x:write" }}
[[routes]]
prefix = "/y"
upstream = "http://127.0.0.1:1"
exchange = {{ audience = "urn:y" }}
"#,
                minimal()
            ),
            vec![],
        )
        .expect("valid");
        let r = |p: &str| ok.routes.iter().find(|r| r.prefix == p).expect("route");
        assert_eq!(
            r("/x").exchange,
            Some(Exchange {
                audience: "https://x.example/".into(),
                scope: Some("x:read x:write".into()),
            })
        );
        assert_eq!(
            r("/y").exchange.as_ref().map(|e| e.scope.clone()),
            Some(None)
        );

        let bad = format!(
            r#"{}
[[routes]]
prefix = "/a"
upstream = "http://127.0.0.1:1"
exchange = {{ scope = "x" }}
[[routes]]
prefix = "/b"
upstream = "http://127.0.0.1:1"
token = "client"
exchange = {{ audience = "urn:b" }}
[[routes]]
prefix = "/c"
upstream = "http://127.0.0.1:1"
resource = "https://c.example/"
exchange = {{ audience = "urn:c" }}
[[routes]]
prefix = "/d"
upstream = "http://127.0.0.1:1"
exchange = {{ audience = "urn:d", scope = "bad\"scope" }}
[[routes]]
prefix = "/e"
upstream = "http://127.0.0.1:1"
exchange = {{ audience = "urn:e", resource = "typo" }}
"#,
            minimal()
        );
        let msg = Config::load(&bad, vec![]).expect_err("invalid").to_string();
        for needle in [
            "routes[0].exchange.audience: missing",
            "routes[1].exchange: exchanges the user's token",
            "routes[2].exchange: use exchange.audience/exchange.scope or resource/scopes",
            "routes[3].exchange.scope: `bad\"scope`",
            "routes.4.exchange.resource",
        ] {
            assert!(msg.contains(needle), "missing {needle} in:\n{msg}");
        }
    }

    #[test]
    fn dpop_key_from_file_or_derived_from_the_session_key() {
        let derived = Config::load(
            &minimal().replace("[session]", "dpop = true\n[session]"),
            vec![],
        )
        .expect("valid");
        let d = derived.oauth.dpop.as_ref().expect("a key");
        let again = Config::load(
            &minimal().replace("[session]", "dpop = true\n[session]"),
            vec![],
        )
        .expect("valid");
        assert_eq!(
            d.thumbprint(),
            again.oauth.dpop.as_ref().expect("key").thumbprint(),
            "every replica with the session key derives the same DPoP key"
        );
        assert!(Config::load(&minimal(), vec![])
            .expect("valid")
            .oauth
            .dpop
            .is_none());

        let dir = std::env::temp_dir().join(format!("tg-dpop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pem = dir.join("dpop.pem");
        let key = p256::SecretKey::from_slice(&[9; 32]).expect("scalar");
        use p256::pkcs8::EncodePrivateKey;
        std::fs::write(
            &pem,
            key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
                .expect("pem")
                .as_bytes(),
        )
        .expect("write");
        let with_file = |path: &std::path::Path, on: bool| {
            minimal().replace(
                "[session]",
                &format!(
                    "dpop = {on}\ndpop_key_file = \"{}\"\n[session]",
                    path.display()
                ),
            )
        };
        let from_file = Config::load(&with_file(&pem, true), vec![]).expect("valid");
        assert_ne!(
            from_file.oauth.dpop.as_ref().expect("key").thumbprint(),
            d.thumbprint()
        );
        let junk = dir.join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let msg = Config::load(&with_file(&junk, true), vec![])
            .expect_err("invalid")
            .to_string();
        assert!(
            msg.contains("oauth.dpop_key_file") && msg.contains("not a PEM EC P-256 private key"),
            "{msg}"
        );
        let msg = Config::load(&with_file(&pem, false), vec![])
            .expect_err("invalid")
            .to_string();
        assert!(msg.contains("oauth.dpop is false"), "{msg}");
        assert!(!format!("{:?}", from_file.oauth).contains("BEGIN"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.0.0.0/8").expect("cidr");
        assert!(c.contains("10.1.2.3".parse().expect("ip")));
        assert!(!c.contains("11.1.2.3".parse().expect("ip")));
        assert!(c.contains("::ffff:10.0.0.1".parse().expect("ip")));
        let one = Cidr::parse("127.0.0.1").expect("cidr");
        assert!(one.contains("127.0.0.1".parse().expect("ip")));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
    }
}
