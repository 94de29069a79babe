//! Black-box harness: a controllable fake IdP (axum), an echo API standing in for the upstream, and
//! `spawn_app()` serving the real tokengate router on `127.0.0.1:0` with a cookie-keeping client
//! whose redirects are off (so every 302 can be inspected).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::Rng;
use reqwest::cookie::{CookieStore, Jar};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use url::Url;

pub const CLIENT_ID: &str = "tokengate";
pub const CLIENT_SECRET: &str = "test-client-secret-0123456789abcdef";
pub const DEFAULT_SUB: &str = "user-1";

const RSA1_PEM: &str = include_str!("../fixtures/idp_rsa_1.pem");
const RSA1_PUB_PEM: &str = include_str!("../fixtures/idp_rsa_1.pub.pem");
const RSA2_PEM: &str = include_str!("../fixtures/idp_rsa_2.pem");
const EC1_PEM: &str = include_str!("../fixtures/idp_ec_1.pem");
const ED1_PEM: &str = include_str!("../fixtures/idp_ed25519_1.pem");
const ED1_PUB_PEM: &str = include_str!("../fixtures/idp_ed25519_1.pub.pem");

/// How long any "wait until" loop in the harness may take before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A session key: standard base64 of 32 bytes, all equal to `fill`.
pub fn session_key(fill: u8) -> String {
    STANDARD.encode([fill; 32])
}

fn random_token(prefix: &str) -> String {
    let bytes: [u8; 24] = rand::thread_rng().gen();
    format!("{prefix}-{}", URL_SAFE_NO_PAD.encode(bytes))
}

pub fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Fake IdP
// ---------------------------------------------------------------------------------------------

/// Which key (and algorithm) signs the ID tokens the fake IdP issues.
#[derive(Clone, Debug, PartialEq)]
pub enum Signer {
    /// RS256 with the published key `k1` (the normal case).
    Rsa1,
    /// RS256 with the second RSA key (`k2`), published only after `rotate_keys()`.
    Rsa2,
    /// ES256 with the published EC key `ec1`.
    Ec1,
    /// PS256 (RSASSA-PSS) with the first RSA key, as `ps1` (publish `PublishedKey::Rsa1Ps256`).
    Ps256,
    /// EdDSA with the Ed25519 key `ed1` (publish `PublishedKey::Ed25519`).
    Ed25519,
    /// `alg: none`, empty signature.
    AlgNone,
    /// HS256 keyed with the given secret.
    Hs256(String),
    /// HS256 keyed with the PEM text of the published RSA public key (algorithm confusion).
    Hs256WithRsaPublicKey,
}

/// Keys the fake IdP publishes in its JWKS.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PublishedKey {
    Rsa1,
    Rsa2,
    Ec1,
    /// The first RSA key again, as kid `ps1` with `alg: PS256`.
    Rsa1Ps256,
    /// An OKP (Ed25519) key, kid `ed1`, `alg: EdDSA`.
    Ed25519,
}

/// Which metadata documents the fake IdP serves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DiscoveryMode {
    /// `/.well-known/openid-configuration` only (the normal case).
    Oidc,
    /// Only RFC 8414 `/.well-known/oauth-authorization-server`; OIDC discovery is 404.
    Rfc8414Only,
    /// No metadata at all (both 404): endpoints must be configured explicitly.
    Unavailable,
}

/// What the refresh_token grant does.
#[derive(Clone, Debug, PartialEq)]
pub enum RefreshMode {
    /// Issue a new access token and a new refresh token; the old refresh token dies (reuse → invalid_grant).
    Rotate,
    /// Answer 400 `invalid_grant`.
    InvalidGrant,
    /// Answer 500 with an HTML body.
    ServerError,
}

/// Everything a test can make the fake IdP do. Change it with `idp.behave(|b| ...)`.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Metadata flag of RFC 9207.
    pub iss_param_supported: bool,
    pub revocation_supported: bool,
    pub end_session_supported: bool,
    /// Replaces the `issuer` advertised in the discovery document (discovery mismatch).
    pub metadata_issuer_override: Option<String>,
    pub signer: Signer,
    /// `None`: the key's own kid; `Some(None)`: no kid header; `Some(Some(k))`: kid `k`.
    pub kid: Option<Option<String>>,
    pub published_keys: Vec<PublishedKey>,
    /// Merged into the default ID-token claims; a `null` value removes the claim.
    pub id_token_patch: Map<String, Value>,
    /// `jku` header on signed ID tokens (keys must never be fetched from it).
    pub header_jku: Option<String>,
    /// Embed the signing key's public JWK in the `jwk` header (CVE-2018-0114 style).
    pub header_embed_jwk: bool,
    /// Answer the authorization_code grant with this status and JSON body instead of tokens.
    pub code_grant_error: Option<(u16, Value)>,
    /// Merged into the authorization_code grant's JSON answer; `null` removes the member.
    pub code_grant_patch: Map<String, Value>,
    /// Sleep before answering any token request.
    pub token_delay: Duration,
    /// `expires_in` of issued access tokens.
    pub access_token_ttl: i64,
    pub refresh: RefreshMode,
    /// Sleep before answering a refresh_token grant (widens race windows; never asserted on).
    pub refresh_delay: Duration,
    /// Which discovery documents are served.
    pub discovery: DiscoveryMode,
    /// Treat the client as public (RFC 6749 §2.1): the token endpoint wants `client_id` in the
    /// body and no secret, instead of client_secret_basic/post.
    pub public_client: bool,
    /// Answer refresh and client-credentials grants that carry `resource` or `scope` with this
    /// OAuth error (e.g. `invalid_target`, `invalid_scope`), status 400.
    pub target_error: Option<String>,
    /// DPoP (RFC 9449 §8): token requests whose proof lacks this nonce get `use_dpop_nonce` with
    /// it in `DPoP-Nonce`; tokens are then issued as `token_type: DPoP`.
    pub dpop_nonce: Option<String>,
    /// Advertise a PAR endpoint (RFC 9126) at `/par` that answers with this status and body.
    pub par_answer: Option<(u16, Value)>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            iss_param_supported: true,
            revocation_supported: true,
            end_session_supported: true,
            metadata_issuer_override: None,
            signer: Signer::Rsa1,
            kid: None,
            published_keys: vec![PublishedKey::Rsa1, PublishedKey::Ec1],
            id_token_patch: Map::new(),
            header_jku: None,
            header_embed_jwk: false,
            code_grant_error: None,
            code_grant_patch: Map::new(),
            token_delay: Duration::ZERO,
            access_token_ttl: 3600,
            refresh: RefreshMode::Rotate,
            refresh_delay: Duration::ZERO,
            discovery: DiscoveryMode::Oidc,
            public_client: false,
            target_error: None,
            dpop_nonce: None,
            par_answer: None,
        }
    }
}

impl Behaviour {
    /// Set (or with `Value::Null`, remove) one ID-token claim.
    pub fn claim(&mut self, name: &str, value: Value) -> &mut Self {
        self.id_token_patch.insert(name.to_owned(), value);
        self
    }
}

/// What the IdP remembers about a code it minted.
#[derive(Clone, Debug)]
pub struct CodeGrant {
    pub client_id: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    pub nonce: Option<String>,
    pub sub: String,
}

/// One request received at the token endpoint.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub params: Vec<(String, String)>,
    pub authorization: Option<String>,
    /// The `DPoP` proof header, if any.
    pub dpop: Option<String>,
}

/// RFC 7638 thumbprint of an EC public JWK (base64url SHA-256 of its canonical members).
pub fn jwk_thumbprint(jwk: &Value) -> String {
    let canonical = format!(
        r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#,
        jwk["crv"].as_str().unwrap_or(""),
        jwk["kty"].as_str().unwrap_or(""),
        jwk["x"].as_str().unwrap_or(""),
        jwk["y"].as_str().unwrap_or("")
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// The claims of a JWS (no signature check: for looking at what a proof carries).
pub fn jws_claims(jws: &str) -> Value {
    jws.split('.')
        .nth(1)
        .and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
        .and_then(|c| serde_json::from_slice(&c).ok())
        .unwrap_or(Value::Null)
}

impl TokenRequest {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn grant_type(&self) -> &str {
        self.get("grant_type").unwrap_or("")
    }
}

#[derive(Default, Debug)]
pub struct Issued {
    pub access_tokens: Vec<String>,
    pub refresh_tokens: Vec<String>,
    pub id_tokens: Vec<String>,
}

pub struct IdpInner {
    pub base_url: String,
    behaviour: Mutex<Behaviour>,
    codes: Mutex<HashMap<String, CodeGrant>>,
    token_requests: Mutex<Vec<TokenRequest>>,
    /// Requests to `/par`, as received.
    pushed: Mutex<Vec<TokenRequest>>,
    issued: Mutex<Issued>,
    /// refresh token → sub, for the tokens still valid.
    active_refresh: Mutex<HashMap<String, String>>,
    /// access token → sub.
    active_access: Mutex<HashMap<String, String>>,
    revocations: Mutex<Vec<Vec<(String, String)>>>,
    userinfo_calls: AtomicUsize,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
    rfc8414_fetches: AtomicUsize,
    attacker_jwks_fetches: AtomicUsize,
}

/// A fake OpenID provider we can make misbehave. Cheap to clone (shared state).
#[derive(Clone)]
pub struct FakeIdp(pub Arc<IdpInner>);

impl FakeIdp {
    pub async fn start() -> FakeIdp {
        FakeIdp::start_at("127.0.0.1:0").await
    }

    /// Starts on a given address (e.g. one tokengate was told about before the IdP was up).
    pub async fn start_at(addr: &str) -> FakeIdp {
        let listener = TcpListener::bind(addr).await.expect("bind fake idp");
        let addr = listener.local_addr().expect("fake idp addr");
        let inner = Arc::new(IdpInner {
            base_url: format!("http://{addr}"),
            behaviour: Mutex::new(Behaviour::default()),
            codes: Mutex::new(HashMap::new()),
            token_requests: Mutex::new(Vec::new()),
            pushed: Mutex::new(Vec::new()),
            issued: Mutex::new(Issued::default()),
            active_refresh: Mutex::new(HashMap::new()),
            active_access: Mutex::new(HashMap::new()),
            revocations: Mutex::new(Vec::new()),
            userinfo_calls: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
            rfc8414_fetches: AtomicUsize::new(0),
            attacker_jwks_fetches: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(idp_discovery))
            .route(
                "/.well-known/oauth-authorization-server",
                get(idp_rfc8414_metadata),
            )
            .route("/jwks", get(idp_jwks))
            .route("/attacker-jwks", get(idp_attacker_jwks))
            .route("/authorize", get(|| async { "fake authorize page" }))
            .route("/token", post(idp_token))
            .route("/par", post(idp_par))
            .route("/userinfo", get(idp_userinfo).post(idp_userinfo))
            .route("/revoke", post(idp_revoke))
            .route("/end-session", get(|| async { "signed out" }))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeIdp(inner)
    }

    pub fn issuer(&self) -> &str {
        &self.0.base_url
    }

    pub fn behave(&self, f: impl FnOnce(&mut Behaviour)) {
        let mut b = self.0.behaviour.lock().expect("behaviour lock");
        f(&mut b);
    }

    pub fn behaviour(&self) -> Behaviour {
        self.0.behaviour.lock().expect("behaviour lock").clone()
    }

    /// Publishes the second RSA key and signs with it from now on ("the IdP rotated its keys").
    pub fn rotate_keys(&self) {
        self.behave(|b| {
            if !b.published_keys.contains(&PublishedKey::Rsa2) {
                b.published_keys.push(PublishedKey::Rsa2);
            }
            b.signer = Signer::Rsa2;
            b.kid = None;
        });
    }

    /// Mints an authorization code as the IdP's /authorize would have, bound to the challenge and nonce.
    pub fn mint_code(&self, grant: CodeGrant) -> String {
        let code = random_token("code");
        self.0
            .codes
            .lock()
            .expect("codes lock")
            .insert(code.clone(), grant);
        code
    }

    pub fn pushed_requests(&self) -> Vec<TokenRequest> {
        self.0.pushed.lock().expect("lock").clone()
    }

    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.0.token_requests.lock().expect("lock").clone()
    }

    /// Number of token-endpoint requests with this grant_type (attempts, whatever the answer).
    pub fn grants(&self, grant_type: &str) -> usize {
        self.token_requests()
            .iter()
            .filter(|r| r.grant_type() == grant_type)
            .count()
    }

    pub fn code_grants(&self) -> usize {
        self.grants("authorization_code")
    }

    pub fn refresh_grants(&self) -> usize {
        self.grants("refresh_token")
    }

    pub fn revocations(&self) -> Vec<Vec<(String, String)>> {
        self.0.revocations.lock().expect("lock").clone()
    }

    /// The `token` values the revocation endpoint received.
    pub fn revoked_tokens(&self) -> Vec<String> {
        self.revocations()
            .iter()
            .filter_map(|r| r.iter().find(|(k, _)| k == "token").map(|(_, v)| v.clone()))
            .collect()
    }

    pub fn userinfo_calls(&self) -> usize {
        self.0.userinfo_calls.load(Ordering::SeqCst)
    }

    /// Fetches of `/attacker-jwks`, a key set that only a token header points at.
    pub fn attacker_jwks_fetches(&self) -> usize {
        self.0.attacker_jwks_fetches.load(Ordering::SeqCst)
    }

    /// Requests for `/.well-known/openid-configuration` (answered or 404).
    pub fn discovery_fetches(&self) -> usize {
        self.0.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Requests for the RFC 8414 `/.well-known/oauth-authorization-server` (answered or 404).
    pub fn rfc8414_fetches(&self) -> usize {
        self.0.rfc8414_fetches.load(Ordering::SeqCst)
    }

    pub fn jwks_fetches(&self) -> usize {
        self.0.jwks_fetches.load(Ordering::SeqCst)
    }

    pub fn last_access_token(&self) -> Option<String> {
        self.0
            .issued
            .lock()
            .expect("lock")
            .access_tokens
            .last()
            .cloned()
    }

    pub fn last_refresh_token(&self) -> Option<String> {
        self.0
            .issued
            .lock()
            .expect("lock")
            .refresh_tokens
            .last()
            .cloned()
    }

    pub fn last_id_token(&self) -> Option<String> {
        self.0
            .issued
            .lock()
            .expect("lock")
            .id_tokens
            .last()
            .cloned()
    }

    pub fn all_issued_secrets(&self) -> Vec<String> {
        let issued = self.0.issued.lock().expect("lock");
        issued
            .access_tokens
            .iter()
            .chain(issued.refresh_tokens.iter())
            .chain(issued.id_tokens.iter())
            .cloned()
            .collect()
    }

    fn id_token(&self, b: &Behaviour, sub: &str, nonce: Option<&str>) -> String {
        let now = unix_now();
        let mut claims = json!({
            "iss": self.0.base_url,
            "sub": sub,
            "aud": CLIENT_ID,
            "exp": now + 3600,
            "iat": now,
            "auth_time": now,
            "name": "Test User",
        });
        if let Some(nonce) = nonce {
            claims["nonce"] = Value::String(nonce.to_owned());
        }
        let obj = claims.as_object_mut().expect("object");
        for (k, v) in &b.id_token_patch {
            if v.is_null() {
                obj.remove(k);
            } else {
                obj.insert(k.clone(), v.clone());
            }
        }
        sign_jwt(b, &claims)
    }
}

/// Signs `claims` as the behaviour says; public so tests can build tokens by hand.
pub fn sign_jwt(b: &Behaviour, claims: &Value) -> String {
    let (alg, key, default_kid) = match &b.signer {
        Signer::Rsa1 => (Algorithm::RS256, rsa_encoding_key(RSA1_PEM), Some("k1")),
        Signer::Rsa2 => (Algorithm::RS256, rsa_encoding_key(RSA2_PEM), Some("k2")),
        Signer::Ec1 => (Algorithm::ES256, ec_encoding_key(EC1_PEM), Some("ec1")),
        Signer::Ps256 => (Algorithm::PS256, rsa_encoding_key(RSA1_PEM), Some("ps1")),
        Signer::Ed25519 => (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED1_PEM.as_bytes()).expect("ed25519 fixture"),
            Some("ed1"),
        ),
        Signer::Hs256(secret) => (
            Algorithm::HS256,
            EncodingKey::from_secret(secret.as_bytes()),
            None,
        ),
        Signer::Hs256WithRsaPublicKey => (
            Algorithm::HS256,
            EncodingKey::from_secret(RSA1_PUB_PEM.as_bytes()),
            Some("k1"),
        ),
        Signer::AlgNone => {
            let mut header = json!({"alg": "none", "typ": "JWT"});
            if let Some(kid) = b.kid.clone().unwrap_or(Some("k1".to_owned())) {
                header["kid"] = Value::String(kid);
            }
            return format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
        }
    };
    let mut header = Header::new(alg);
    header.kid = b.kid.clone().unwrap_or(default_kid.map(str::to_owned));
    header.jku = b.header_jku.clone();
    if b.header_embed_jwk {
        let public = match &b.signer {
            Signer::Rsa1 => rsa_jwk(RSA1_PEM, "k1"),
            Signer::Ec1 => ec_jwk(EC1_PEM, "ec1"),
            _ => rsa_jwk(RSA2_PEM, "k2"),
        };
        header.jwk = Some(serde_json::from_value(public).expect("jwk"));
    }
    jsonwebtoken::encode(&header, claims, &key).expect("sign id token")
}

/// jsonwebtoken without its `use_pem` feature takes RSA keys as PKCS#1 DER.
fn rsa_encoding_key(pem: &str) -> EncodingKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem).expect("rsa fixture");
    EncodingKey::from_rsa_der(key.to_pkcs1_der().expect("pkcs1 der").as_bytes())
}

/// ... and EC keys as PKCS#8 DER.
fn ec_encoding_key(pem: &str) -> EncodingKey {
    use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
    let key = p256::SecretKey::from_pkcs8_pem(pem).expect("ec fixture");
    EncodingKey::from_ec_der(key.to_pkcs8_der().expect("pkcs8 der").as_bytes())
}

fn rsa_jwk(pem: &str, kid: &str) -> Value {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem).expect("rsa fixture");
    json!({
        "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    })
}

/// The OKP JWK (RFC 8037 §2) of an Ed25519 public key: `x` is the raw 32-byte key, the tail of
/// its SubjectPublicKeyInfo DER.
fn ed25519_jwk(pub_pem: &str, kid: &str) -> Value {
    let b64: String = pub_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(b64.trim()).expect("ed25519 public fixture");
    let x = &der[der.len() - 32..];
    json!({
        "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "alg": "EdDSA",
        "x": URL_SAFE_NO_PAD.encode(x),
    })
}

fn ec_jwk(pem: &str, kid: &str) -> Value {
    use p256::pkcs8::DecodePrivateKey;
    let key = p256::SecretKey::from_pkcs8_pem(pem).expect("ec fixture");
    let mut jwk: Value = serde_json::from_str(&key.public_key().to_jwk_string()).expect("jwk json");
    jwk["kid"] = json!(kid);
    jwk["use"] = json!("sig");
    jwk["alg"] = json!("ES256");
    jwk
}

fn oauth_error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": code, "error_description": format!("fake idp: {code}")})),
    )
        .into_response()
}

fn form_params(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

async fn idp_discovery(State(idp): State<Arc<IdpInner>>) -> Response {
    idp.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let b = idp.behaviour.lock().expect("lock").clone();
    if b.discovery != DiscoveryMode::Oidc {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(metadata_document(&idp, &b)).into_response()
}

/// RFC 8414 §3: served only in `DiscoveryMode::Rfc8414Only`.
async fn idp_rfc8414_metadata(State(idp): State<Arc<IdpInner>>) -> Response {
    idp.rfc8414_fetches.fetch_add(1, Ordering::SeqCst);
    let b = idp.behaviour.lock().expect("lock").clone();
    if b.discovery != DiscoveryMode::Rfc8414Only {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(metadata_document(&idp, &b)).into_response()
}

fn metadata_document(idp: &IdpInner, b: &Behaviour) -> Value {
    let base = &idp.base_url;
    let mut doc = json!({
        "issuer": b.metadata_issuer_override.clone().unwrap_or_else(|| base.clone()),
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/jwks"),
        "userinfo_endpoint": format!("{base}/userinfo"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "HS256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["openid", "profile", "offline_access"],
        "authorization_response_iss_parameter_supported": b.iss_param_supported,
    });
    if b.revocation_supported {
        doc["revocation_endpoint"] = json!(format!("{base}/revoke"));
    }
    if b.par_answer.is_some() {
        doc["pushed_authorization_request_endpoint"] = json!(format!("{base}/par"));
    }
    if b.end_session_supported {
        doc["end_session_endpoint"] = json!(format!("{base}/end-session"));
    }
    doc
}

async fn idp_attacker_jwks(State(idp): State<Arc<IdpInner>>) -> Response {
    idp.attacker_jwks_fetches.fetch_add(1, Ordering::SeqCst);
    Json(json!({ "keys": [rsa_jwk(RSA2_PEM, "k2")] })).into_response()
}

async fn idp_jwks(State(idp): State<Arc<IdpInner>>) -> Response {
    idp.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let b = idp.behaviour.lock().expect("lock").clone();
    let keys: Vec<Value> = b
        .published_keys
        .iter()
        .map(|k| match k {
            PublishedKey::Rsa1 => rsa_jwk(RSA1_PEM, "k1"),
            PublishedKey::Rsa2 => rsa_jwk(RSA2_PEM, "k2"),
            PublishedKey::Ec1 => ec_jwk(EC1_PEM, "ec1"),
            PublishedKey::Rsa1Ps256 => {
                let mut k = rsa_jwk(RSA1_PEM, "ps1");
                k["alg"] = json!("PS256");
                k
            }
            PublishedKey::Ed25519 => ed25519_jwk(ED1_PUB_PEM, "ed1"),
        })
        .collect();
    Json(json!({ "keys": keys })).into_response()
}

/// RFC 6749 §2.3.1: client_secret_basic or client_secret_post; for a public client (§2.1),
/// `client_id` in the body and no credentials at all.
fn client_authenticated(b: &Behaviour, headers: &HeaderMap, params: &[(String, String)]) -> bool {
    if b.public_client {
        let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        return !headers.contains_key("authorization")
            && get("client_id") == Some(CLIENT_ID)
            && get("client_secret").is_none()
            && get("client_assertion").is_none();
    }
    if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let Some(b64) = auth
            .strip_prefix("Basic ")
            .or_else(|| auth.strip_prefix("basic "))
        else {
            return false;
        };
        let Ok(decoded) = STANDARD.decode(b64.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((id, secret)) = decoded.split_once(':') else {
            return false;
        };
        let id: String = url::form_urlencoded::parse(format!("a={id}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let secret: String = url::form_urlencoded::parse(format!("a={secret}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        return id == CLIENT_ID && secret == CLIENT_SECRET;
    }
    let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    get("client_id") == Some(CLIENT_ID) && get("client_secret") == Some(CLIENT_SECRET)
}

/// RFC 9126 §2: records the pushed request and answers as the behaviour says.
async fn idp_par(State(idp): State<Arc<IdpInner>>, headers: HeaderMap, body: Bytes) -> Response {
    idp.pushed.lock().expect("lock").push(TokenRequest {
        params: form_params(&body),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        dpop: None,
    });
    let b = idp.behaviour.lock().expect("lock").clone();
    match b.par_answer {
        Some((status, body)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(body),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn idp_token(State(idp): State<Arc<IdpInner>>, headers: HeaderMap, body: Bytes) -> Response {
    let params = form_params(&body);
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let dpop = headers
        .get("dpop")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    idp.token_requests.lock().expect("lock").push(TokenRequest {
        params: params.clone(),
        authorization,
        dpop: dpop.clone(),
    });
    let b = idp.behaviour.lock().expect("lock").clone();
    if !b.token_delay.is_zero() {
        tokio::time::sleep(b.token_delay).await;
    }
    if !client_authenticated(&b, &headers, &params) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    if let Some(nonce) = &b.dpop_nonce {
        let claims = dpop.as_deref().map(jws_claims).unwrap_or(Value::Null);
        if claims["nonce"] != nonce.as_str() {
            let mut r = oauth_error(StatusCode::BAD_REQUEST, "use_dpop_nonce");
            if let Ok(v) = HeaderValue::from_str(nonce) {
                r.headers_mut().insert("dpop-nonce", v);
            }
            return r;
        }
    }
    let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let fake = FakeIdp(idp.clone());
    match get("grant_type").as_deref() {
        Some("authorization_code") => {
            if let Some((status, body)) = b.code_grant_error.clone() {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                if body.is_string() {
                    return (
                        status,
                        [("content-type", "text/html")],
                        body.as_str().unwrap_or("").to_owned(),
                    )
                        .into_response();
                }
                return (status, Json(body)).into_response();
            }
            let Some(code) = get("code") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            // Codes are single use.
            let Some(grant) = idp.codes.lock().expect("lock").remove(&code) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            };
            if get("redirect_uri").as_deref() != Some(grant.redirect_uri.as_str()) {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            }
            // RFC 7636 §4.6: S256(code_verifier) must equal the stored challenge.
            let Some(verifier) = get("code_verifier") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            };
            if s256(&verifier) != grant.code_challenge {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            }
            let id_token = fake.id_token(&b, &grant.sub, grant.nonce.as_deref());
            let mut answer = issue_tokens(&idp, &b, &grant.sub, Some(id_token));
            let obj = answer.as_object_mut().expect("object");
            for (k, v) in &b.code_grant_patch {
                if v.is_null() {
                    obj.remove(k);
                } else {
                    obj.insert(k.clone(), v.clone());
                }
            }
            Json(answer).into_response()
        }
        Some("client_credentials") => {
            if let Some(e) = &b.target_error {
                if get("resource").is_some() || get("scope").is_some() {
                    return oauth_error(StatusCode::BAD_REQUEST, e);
                }
            }
            let mut answer = issue_tokens(&idp, &b, CLIENT_ID, None);
            let obj = answer.as_object_mut().expect("object");
            obj.remove("refresh_token");
            match get("scope") {
                Some(scope) => obj.insert("scope".into(), json!(scope)),
                None => obj.remove("scope"),
            };
            Json(answer).into_response()
        }
        Some("refresh_token") => {
            if !b.refresh_delay.is_zero() {
                tokio::time::sleep(b.refresh_delay).await;
            }
            if let Some(e) = &b.target_error {
                if get("resource").is_some() || get("scope").is_some() {
                    return oauth_error(StatusCode::BAD_REQUEST, e);
                }
            }
            match b.refresh {
                RefreshMode::InvalidGrant => {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant")
                }
                RefreshMode::ServerError => {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [("content-type", "text/html")],
                        "<html><body>Internal Server Error</body></html>",
                    )
                        .into_response()
                }
                RefreshMode::Rotate => {}
            }
            let Some(rt) = get("refresh_token") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            // Rotation with reuse detection: a refresh token works exactly once.
            let Some(sub) = idp.active_refresh.lock().expect("lock").remove(&rt) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            };
            Json(issue_tokens(&idp, &b, &sub, None)).into_response()
        }
        _ => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
    }
}

fn issue_tokens(idp: &IdpInner, b: &Behaviour, sub: &str, id_token: Option<String>) -> Value {
    let access_token = random_token("at");
    let refresh_token = random_token("rt");
    idp.active_access
        .lock()
        .expect("lock")
        .insert(access_token.clone(), sub.to_owned());
    idp.active_refresh
        .lock()
        .expect("lock")
        .insert(refresh_token.clone(), sub.to_owned());
    {
        let mut issued = idp.issued.lock().expect("lock");
        issued.access_tokens.push(access_token.clone());
        issued.refresh_tokens.push(refresh_token.clone());
        if let Some(t) = &id_token {
            issued.id_tokens.push(t.clone());
        }
    }
    let mut answer = json!({
        "access_token": access_token,
        "token_type": if b.dpop_nonce.is_some() { "DPoP" } else { "Bearer" },
        "expires_in": b.access_token_ttl,
        "refresh_token": refresh_token,
        "scope": "openid profile offline_access",
    });
    if let Some(t) = id_token {
        answer["id_token"] = Value::String(t);
    }
    answer
}

async fn idp_userinfo(State(idp): State<Arc<IdpInner>>, headers: HeaderMap) -> Response {
    idp.userinfo_calls.fetch_add(1, Ordering::SeqCst);
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let sub = token.and_then(|t| idp.active_access.lock().expect("lock").get(&t).cloned());
    match sub {
        Some(sub) => Json(json!({"sub": sub, "name": "Test User"})).into_response(),
        None => oauth_error(StatusCode::UNAUTHORIZED, "invalid_token"),
    }
}

async fn idp_revoke(State(idp): State<Arc<IdpInner>>, body: Bytes) -> Response {
    let params = form_params(&body);
    if let Some((_, token)) = params.iter().find(|(k, _)| k == "token") {
        idp.active_refresh.lock().expect("lock").remove(token);
        idp.active_access.lock().expect("lock").remove(token);
    }
    idp.revocations.lock().expect("lock").push(params);
    StatusCode::OK.into_response()
}

// ---------------------------------------------------------------------------------------------
// Echo API (the upstream behind the proxy)
// ---------------------------------------------------------------------------------------------

/// The nonce the echo API's `/dpop-nonce` paths require.
pub const ECHO_DPOP_NONCE: &str = "echo-nonce-1";

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as received.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

pub struct EchoInner {
    pub base_url: String,
    requests: Mutex<Vec<Recorded>>,
}

/// Records every request; answers 200 JSON describing it. Special paths:
/// `.../slow...` sleeps 30 s; `.../status/NNN` answers that status;
/// `.../hop-response` adds hop-by-hop, Connection-listed and tokengate Set-Cookie headers to the answer;
/// `.../pass-response` adds end-to-end fields, `Cache-Control`, `X-Request-Id` and Set-Cookies.
#[derive(Clone)]
pub struct EchoApi(pub Arc<EchoInner>);

impl EchoApi {
    pub async fn start() -> EchoApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo api");
        let addr = listener.local_addr().expect("echo addr");
        let inner = Arc::new(EchoInner {
            base_url: format!("http://{addr}"),
            requests: Mutex::new(Vec::new()),
        });
        let router = Router::new().fallback(echo).with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        EchoApi(inner)
    }

    pub fn url(&self) -> &str {
        &self.0.base_url
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.0.requests.lock().expect("lock").clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .last()
            .cloned()
            .expect("the echo API received no request")
    }
}

async fn echo(
    State(api): State<Arc<EchoInner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let recorded = Recorded {
        method: method.to_string(),
        uri: uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| uri.path().to_owned()),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len: body.len(),
    };
    api.requests.lock().expect("lock").push(recorded.clone());
    let path = uri.path();
    if path.contains("/slow") {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    if let Some(ms) = path
        .split("/delay/")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    }
    let mut status = StatusCode::OK;
    if let Some(rest) = path.split("/status/").nth(1) {
        if let Ok(code) = rest.trim_end_matches('/').parse::<u16>() {
            status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        }
    }
    // An API that hands out DPoP nonces (RFC 9449 §9): a proof without this one gets a 401
    // challenge carrying it.
    if path.contains("/dpop-nonce") {
        let has_nonce = recorded
            .header("dpop")
            .is_some_and(|p| jws_claims(p)["nonce"] == ECHO_DPOP_NONCE);
        if !has_nonce {
            let mut resp = StatusCode::UNAUTHORIZED.into_response();
            let h = resp.headers_mut();
            h.insert(
                "www-authenticate",
                HeaderValue::from_static(
                    "DPoP error=\"use_dpop_nonce\", error_description=\"a nonce is required\"",
                ),
            );
            h.insert("dpop-nonce", HeaderValue::from_static(ECHO_DPOP_NONCE));
            return resp;
        }
    }
    let body = json!({
        "method": recorded.method,
        "uri": recorded.uri,
        "headers": recorded.headers,
        "body_len": recorded.body_len,
    });
    let mut resp = (status, Json(body)).into_response();
    if path.contains("/hop-response") {
        let h = resp.headers_mut();
        h.insert("connection", HeaderValue::from_static("x-upstream-private"));
        h.insert("x-upstream-private", HeaderValue::from_static("secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            "proxy-authenticate",
            HeaderValue::from_static("Basic realm=\"upstream\""),
        );
        h.insert("x-upstream-ok", HeaderValue::from_static("yes"));
        upstream_cookies(h);
    }
    if path.contains("/pass-response") {
        // Fields no rule of tokengate reads (passed on past its map), and the ones it does read.
        let h = resp.headers_mut();
        h.insert("x-upstream-ok", HeaderValue::from_static("yes"));
        h.append("x-upstream-multi", HeaderValue::from_static("a"));
        h.append("x-upstream-multi", HeaderValue::from_static("b: c"));
        h.insert("etag", HeaderValue::from_static("\"v1\""));
        h.insert(
            "cache-control",
            HeaderValue::from_static("private, max-age=5"),
        );
        h.insert("x-request-id", HeaderValue::from_static("from-the-api"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        upstream_cookies(h);
    }
    resp
}

/// The `Set-Cookie`s of the API's special answers: one with tokengate's session cookie name (it
/// must never reach the browser) and one of the API's own (it must).
fn upstream_cookies(h: &mut HeaderMap) {
    h.append(
        "set-cookie",
        HeaderValue::from_static("tg_session=from-upstream; Path=/"),
    );
    h.append(
        "set-cookie",
        HeaderValue::from_static("app_pref=blue; Path=/"),
    );
}

// ---------------------------------------------------------------------------------------------
// The app under test
// ---------------------------------------------------------------------------------------------

/// Knobs for `spawn_app_with`.
pub struct AppOptions {
    pub https_public_url: bool,
    /// Extra TOML lines in the `[oauth]` table.
    pub oauth_lines: Vec<String>,
    /// Extra TOML lines in the `[session]` table.
    pub session_lines: Vec<String>,
    pub session_keys: Vec<String>,
    pub idp: Option<FakeIdp>,
    pub api: Option<EchoApi>,
    /// Replace the issuer (e.g. an unreachable one); the fake IdP still runs.
    pub issuer_override: Option<String>,
    pub wait_ready: bool,
    /// Under the Redis store: use this Redis instead of a fresh one (replicas, restarts).
    pub redis_url: Option<String>,
    /// Run the real binary (`tokengate --config F`) with its stderr captured, instead of
    /// serving in-process.
    pub binary: bool,
    /// Extra TOML appended at the end of the config (e.g. `[server]` limits need their own
    /// table: use `server_lines`).
    pub server_lines: Vec<String>,
    /// Extra TOML lines in the binary's `[log]` table (e.g. `format = "json"`).
    pub log_lines: Vec<String>,
    /// Leave `oauth.client_secret` out of the config (a public client).
    pub no_client_secret: bool,
    /// Extra TOML (whole tables, e.g. `[csrf]` or another `[[routes]]`), placed after `[session]`.
    pub extra_toml: Vec<String>,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            https_public_url: false,
            oauth_lines: Vec::new(),
            session_lines: Vec::new(),
            session_keys: vec![session_key(7)],
            idp: None,
            api: None,
            issuer_override: None,
            wait_ready: true,
            redis_url: None,
            binary: false,
            server_lines: Vec::new(),
            log_lines: Vec::new(),
            no_client_secret: false,
            extra_toml: Vec::new(),
        }
    }
}

impl AppOptions {
    pub fn oauth(mut self, line: &str) -> Self {
        self.oauth_lines.push(line.to_owned());
        self
    }
    pub fn session(mut self, line: &str) -> Self {
        self.session_lines.push(line.to_owned());
        self
    }
    pub fn keys(mut self, keys: &[String]) -> Self {
        self.session_keys = keys.to_vec();
        self
    }
    pub fn https(mut self) -> Self {
        self.https_public_url = true;
        self
    }
    pub fn idp(mut self, idp: &FakeIdp) -> Self {
        self.idp = Some(idp.clone());
        self
    }
    pub fn api(mut self, api: &EchoApi) -> Self {
        self.api = Some(api.clone());
        self
    }
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.issuer_override = Some(issuer.to_owned());
        self
    }
    /// Another instance of the same deployment: under the Redis store it shares `other`'s Redis.
    pub fn same_store_as(mut self, other: &TestApp) -> Self {
        self.redis_url = other
            .redis
            .as_ref()
            .map(|r| r.url())
            .or(other.redis_url.clone());
        self
    }
    /// Use the Redis store on this Redis, whatever store the suite runs on.
    pub fn redis(mut self, redis: &crate::redis_server::RedisServer) -> Self {
        self.redis_url = Some(redis.url());
        self
    }
    /// Run the real binary, capturing its log (stderr).
    pub fn binary(mut self) -> Self {
        self.binary = true;
        self
    }

    /// A line in the binary's `[log]` table (implies [`AppOptions::binary`]).
    pub fn log(mut self, line: &str) -> Self {
        self.binary = true;
        self.log_lines.push(line.to_owned());
        self
    }
    /// Extra TOML lines in the `[server]` table.
    pub fn server(mut self, line: &str) -> Self {
        self.server_lines.push(line.to_owned());
        self
    }
    /// No `oauth.client_secret` in the config.
    pub fn without_client_secret(mut self) -> Self {
        self.no_client_secret = true;
        self
    }
    /// Extra TOML tables after `[session]` (e.g. `[csrf]`, another `[[routes]]`).
    pub fn toml(mut self, text: &str) -> Self {
        self.extra_toml.push(text.to_owned());
        self
    }
    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// Where the test talks to tokengate (always http).
    pub base_url: String,
    /// What tokengate was told its public origin is (https with `AppOptions::https`).
    pub public_url: String,
    /// Browser-like client: cookie store on, redirects off.
    pub client: reqwest::Client,
    pub jar: Arc<Jar>,
    /// Client without cookie store, for hand-made Cookie headers.
    pub raw_client: reqwest::Client,
    pub idp: FakeIdp,
    pub api: EchoApi,
    pub config_toml: String,
    shutdown: Option<oneshot::Sender<()>>,
    /// The Redis behind the session store when the suite runs against it (owned by this app).
    pub redis: Option<crate::redis_server::RedisServer>,
    /// The Redis URL in use (owned or shared).
    pub redis_url: Option<String>,
    /// The binary, when started with `AppOptions::binary`.
    pub process: Option<BinaryProcess>,
}

/// The real `tokengate` binary, its stderr collected; killed when dropped.
pub struct BinaryProcess {
    child: std::process::Child,
    pub logs: Arc<std::sync::Mutex<String>>,
    _config: tempfile_path::TempPath,
}

mod tempfile_path {
    /// A file removed when dropped.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl BinaryProcess {
    fn start(config_toml: &str, log_lines: &[String]) -> BinaryProcess {
        use std::io::BufRead;
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("tokengate-test-{}-{n}.toml", std::process::id()));
        // Debug level for tokengate itself: the log test must see everything it could write.
        let text = format!(
            "{config_toml}\n[log]\nlevel = \"tokengate=debug,info\"\n{}\n",
            log_lines.join("\n")
        );
        std::fs::write(&path, text).expect("write config");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"));
        // The test run's own environment must not reconfigure the binary.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TOKENGATE_")) {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the tokengate binary");
        let logs = Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        BinaryProcess {
            child,
            logs,
            _config: tempfile_path::TempPath(path),
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BinaryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which session store the suite runs against: `TEST_SESSION_STORE=redis` runs every test of
/// this binary against the Redis store (scripts/test.sh runs the suite once per store).
pub fn store_under_test() -> &'static str {
    static STORE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    STORE.get_or_init(|| {
        match std::env::var("TEST_SESSION_STORE").as_deref() {
            Ok("redis") => "redis",
            _ => "cookie",
        }
        .to_string()
    })
}

/// True when the suite runs against the Redis store.
pub fn redis_store() -> bool {
    store_under_test() == "redis"
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

/// A port nobody listens on (bound, then released).
pub async fn dead_port_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

fn static_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tokengate-api-tests-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("index.html"),
        "<!doctype html><title>test spa</title>",
    );
    dir
}

pub fn new_browser(jar: &Arc<Jar>) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_provider(jar.clone())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub async fn spawn_app_with(opts: AppOptions) -> TestApp {
    let idp = match opts.idp {
        Some(idp) => idp,
        None => FakeIdp::start().await,
    };
    let api = match opts.api {
        Some(api) => api,
        None => EchoApi::start().await,
    };
    let dead = dead_port_url().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().expect("app addr");
    let base_url = format!("http://{addr}");
    let public_url = if opts.https_public_url {
        format!("https://{addr}")
    } else {
        base_url.clone()
    };
    let issuer = opts
        .issuer_override
        .clone()
        .unwrap_or_else(|| idp.issuer().to_owned());
    let keys = opts
        .session_keys
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let redis = if redis_store() && opts.redis_url.is_none() {
        Some(crate::redis_server::RedisServer::start().await)
    } else {
        None
    };
    let redis_url = opts
        .redis_url
        .clone()
        .or_else(|| redis.as_ref().map(|r| r.url()));
    let store_lines = match &redis_url {
        Some(u) if redis_store() || opts.redis_url.is_some() => {
            format!("store = \"redis\"\nredis_url = \"{u}\"")
        }
        _ => "store = \"cookie\"".to_string(),
    };
    let config_toml = format!(
        r#"
[server]
listen = "{addr}"
public_url = "{public_url}"
static_dir = "{static_dir}"
{server_lines}

[oauth]
issuer = "{issuer}"
client_id = "{CLIENT_ID}"
{client_secret_line}
scopes = ["openid", "profile", "offline_access"]
{oauth_lines}

[session]
{store_lines}
keys = [{keys}]
{session_lines}

{extra_toml}

[[routes]]
prefix = "/api"
upstream = "{api_url}"

[[routes]]
prefix = "/stripped"
upstream = "{api_url}"
strip_prefix = true

[[routes]]
prefix = "/slowapi"
upstream = "{api_url}"
timeout_s = 1

[[routes]]
prefix = "/downapi"
upstream = "{dead}"
"#,
        static_dir = static_dir().display(),
        oauth_lines = opts.oauth_lines.join("\n"),
        session_lines = opts.session_lines.join("\n"),
        server_lines = opts.server_lines.join("\n"),
        extra_toml = opts.extra_toml.join("\n"),
        client_secret_line = if opts.no_client_secret {
            String::new()
        } else {
            format!("client_secret = \"{CLIENT_SECRET}\"")
        },
        api_url = api.url(),
    );
    let config = tokengate::config::Config::load(&config_toml, Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("test config rejected: {e}\n---\n{config_toml}"));
    let (tx, rx) = oneshot::channel::<()>();
    let mut process = None;
    if opts.binary {
        drop(listener);
        process = Some(BinaryProcess::start(&config_toml, &opts.log_lines));
    } else {
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
            };
            if let Err(e) = tokengate::serve(listener, config, shutdown).await {
                eprintln!("tokengate::serve returned an error: {e:#}");
            }
        });
    }
    let jar = Arc::new(Jar::default());
    let app = TestApp {
        addr,
        base_url,
        public_url,
        client: new_browser(&jar),
        jar,
        raw_client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        idp,
        api,
        config_toml,
        shutdown: Some(tx),
        redis,
        redis_url,
        process,
    };
    if opts.wait_ready {
        app.wait_ready().await;
    }
    app
}

/// The parts of a /login redirect a test needs to play the IdP.
#[derive(Clone, Debug)]
pub struct PendingLogin {
    pub location: Url,
    pub state: String,
    pub nonce: Option<String>,
    pub code_challenge: String,
    pub redirect_uri: String,
    pub set_cookies: Vec<SetCookie>,
}

impl PendingLogin {
    pub fn param(&self, name: &str) -> Option<String> {
        self.location
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
    pub fn params_all(&self, name: &str) -> Vec<String> {
        self.location
            .query_pairs()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .collect()
    }
    /// A code grant as the IdP would bind it to this authorization request.
    pub fn grant(&self) -> CodeGrant {
        CodeGrant {
            client_id: CLIENT_ID.to_owned(),
            redirect_uri: self.redirect_uri.clone(),
            code_challenge: self.code_challenge.clone(),
            nonce: self.nonce.clone(),
            sub: DEFAULT_SUB.to_owned(),
        }
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = self.raw_client.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                let logs = self.process.as_ref().map(|p| p.logs()).unwrap_or_default();
                panic!(
                    "tokengate did not become ready (GET /readyz != 200) within {READY_TIMEOUT:?}\n{logs}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET /login[?return_to=..] with the browser client and parse the IdP redirect.
    pub async fn start_login(&self, return_to: Option<&str>) -> PendingLogin {
        self.start_login_with(&self.client, return_to).await
    }

    pub async fn start_login_with(
        &self,
        client: &reqwest::Client,
        return_to: Option<&str>,
    ) -> PendingLogin {
        let mut url = Url::parse(&self.url("/login")).expect("url");
        if let Some(rt) = return_to {
            url.query_pairs_mut().append_pair("return_to", rt);
        }
        let resp = client.get(url).send().await.expect("GET /login");
        assert!(
            resp.status() == 302 || resp.status() == 303,
            "GET /login answered {} instead of a redirect",
            resp.status()
        );
        let set_cookies = set_cookies(&resp);
        let location = location(&resp);
        let location = Url::parse(&location)
            .unwrap_or_else(|e| panic!("Location {location:?} not absolute: {e}"));
        let get = |n: &str| {
            location
                .query_pairs()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.into_owned())
        };
        PendingLogin {
            state: get("state").expect("authorize URL has a state"),
            nonce: get("nonce"),
            code_challenge: get("code_challenge").expect("authorize URL has a code_challenge"),
            redirect_uri: get("redirect_uri").expect("authorize URL has a redirect_uri"),
            set_cookies,
            location,
        }
    }

    /// GET /oauth-callback with these query parameters (browser client).
    pub async fn callback(&self, params: &[(&str, &str)]) -> reqwest::Response {
        self.callback_with(&self.client, params).await
    }

    pub async fn callback_with(
        &self,
        client: &reqwest::Client,
        params: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut url = Url::parse(&self.url("/oauth-callback")).expect("url");
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in params {
                q.append_pair(k, v);
            }
        }
        client.get(url).send().await.expect("GET /oauth-callback")
    }

    /// Plays the IdP for `pending`: mints a code bound to its challenge and nonce, returns the callback answer.
    pub async fn finish_login(&self, pending: &PendingLogin) -> reqwest::Response {
        let code = self.idp.mint_code(pending.grant());
        let iss = self.idp.issuer().to_owned();
        self.callback(&[("code", &code), ("state", &pending.state), ("iss", &iss)])
            .await
    }

    /// Full login; panics unless the callback redirects. Returns the callback's Set-Cookies.
    pub async fn login(&self) -> Vec<SetCookie> {
        let pending = self.start_login(None).await;
        let resp = self.finish_login(&pending).await;
        let status = resp.status();
        if !(status == 302 || status == 303) {
            let body = resp.text().await.unwrap_or_default();
            panic!("login callback answered {status}: {body}");
        }
        set_cookies(&resp)
    }

    pub async fn get_api(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("GET api")
    }

    pub async fn get_userinfo(&self) -> reqwest::Response {
        self.client
            .get(self.url("/userinfo"))
            .send()
            .await
            .expect("GET /userinfo")
    }

    pub async fn post_refresh(&self) -> reqwest::Response {
        self.client
            .post(self.url("/refreshtoken"))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("POST /refreshtoken")
    }

    pub async fn post_logout(&self) -> reqwest::Response {
        self.client
            .post(self.url("/logout"))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("POST /logout")
    }

    /// The Cookie header the browser client would send to tokengate now.
    pub fn cookie_header(&self) -> String {
        let url = Url::parse(&self.base_url).expect("url");
        self.jar
            .cookies(&url)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    }

    /// (name, value) of the cookies the browser holds for tokengate.
    pub fn cookies(&self) -> Vec<(String, String)> {
        parse_cookie_header(&self.cookie_header())
    }

    pub fn add_browser_cookie(&self, cookie: &str) {
        let url = Url::parse(&self.base_url).expect("url");
        self.jar.add_cookie_str(cookie, &url);
    }

    /// Only the session cookie(s), as a Cookie header value.
    pub fn session_cookie_header(&self) -> String {
        self.cookies()
            .into_iter()
            .filter(|(n, _)| is_session_cookie_name(n))
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

pub fn parse_cookie_header(header: &str) -> Vec<(String, String)> {
    header
        .split(';')
        .filter_map(|p| {
            let p = p.trim();
            if p.is_empty() {
                return None;
            }
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            Some((n.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Assertions and response helpers
// ---------------------------------------------------------------------------------------------

/// One parsed `Set-Cookie` header (parsed by hand so attribute spelling is visible to tests).
#[derive(Clone, Debug)]
pub struct SetCookie {
    pub raw: String,
    pub name: String,
    pub value: String,
    pub attrs: Vec<(String, Option<String>)>,
}

impl SetCookie {
    pub fn parse(raw: &str) -> SetCookie {
        let mut parts = raw.split(';');
        let first = parts.next().unwrap_or("");
        let (name, value) = first.split_once('=').unwrap_or((first, ""));
        let attrs = parts
            .map(|a| {
                let a = a.trim();
                match a.split_once('=') {
                    Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim().to_owned())),
                    None => (a.to_ascii_lowercase(), None),
                }
            })
            .filter(|(k, _)| !k.is_empty())
            .collect();
        SetCookie {
            raw: raw.to_owned(),
            name: name.trim().to_owned(),
            value: value.trim().to_owned(),
            attrs,
        }
    }

    pub fn attr(&self, name: &str) -> Option<Option<&str>> {
        let name = name.to_ascii_lowercase();
        self.attrs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_deref())
    }
    pub fn has(&self, flag: &str) -> bool {
        self.attr(flag).is_some()
    }
    pub fn http_only(&self) -> bool {
        self.has("httponly")
    }
    pub fn secure(&self) -> bool {
        self.has("secure")
    }
    pub fn same_site(&self) -> Option<String> {
        self.attr("samesite")
            .flatten()
            .map(|s| s.to_ascii_lowercase())
    }
    pub fn path(&self) -> Option<&str> {
        self.attr("path").flatten()
    }
    pub fn domain(&self) -> Option<&str> {
        self.attr("domain").flatten()
    }
    pub fn max_age(&self) -> Option<i64> {
        self.attr("max-age").flatten().and_then(|v| v.parse().ok())
    }
    /// A deletion: Max-Age ≤ 0, or an Expires in 1970.
    pub fn is_removal(&self) -> bool {
        self.max_age().is_some_and(|m| m <= 0)
            || self
                .attr("expires")
                .flatten()
                .is_some_and(|e| e.contains("1970"))
    }
}

/// `tg_session`, `tg_session.N`, with or without `__Host-`.
pub fn is_session_cookie_name(name: &str) -> bool {
    let n = name.strip_prefix("__Host-").unwrap_or(name);
    n == "tg_session"
        || n.strip_prefix("tg_session.")
            .is_some_and(|i| i.chars().all(|c| c.is_ascii_digit()))
}

pub fn is_tx_cookie_name(name: &str) -> bool {
    name.strip_prefix("__Host-")
        .unwrap_or(name)
        .starts_with("tg_tx_")
}

pub fn set_cookies(resp: &reqwest::Response) -> Vec<SetCookie> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| SetCookie::parse(&String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

/// Session cookies this response sets (not deletions).
pub fn session_cookies_set(resp: &reqwest::Response) -> Vec<SetCookie> {
    set_cookies(resp)
        .into_iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.is_removal())
        .collect()
}

/// The Cookie header a browser would send back for the session cookies in `set`, whatever their
/// Max-Age: a test of the server's own expiry check replays what it was given, not what a
/// cookie jar still keeps (a 1 s lifetime can be gone from the jar before the test reads it).
pub fn session_cookie_header_of(set: &[SetCookie]) -> String {
    set.iter()
        .filter(|c| is_session_cookie_name(&c.name) && !c.value.is_empty())
        .map(|c| format!("{}={}", c.name, c.value))
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn assert_no_session_cookie_set(resp: &reqwest::Response) {
    let set = session_cookies_set(resp);
    assert!(
        set.is_empty(),
        "expected no session cookie, got {:?}",
        set.iter().map(|c| &c.raw).collect::<Vec<_>>()
    );
}

pub fn assert_clears_session_cookie(resp: &reqwest::Response) {
    let cleared: Vec<_> = set_cookies(resp)
        .into_iter()
        .filter(|c| is_session_cookie_name(&c.name) && c.is_removal())
        .collect();
    assert!(
        !cleared.is_empty(),
        "expected a Set-Cookie clearing the session, got {:?}",
        set_cookies(resp).iter().map(|c| &c.raw).collect::<Vec<_>>()
    );
}

pub fn location(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("location")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_else(|| panic!("no Location header on a {} answer", resp.status()))
}

/// 302 (or 303: browsers treat both as a GET redirect) to exactly `expected`.
pub fn assert_is_redirect_to(resp: &reqwest::Response, expected: &str) {
    assert!(
        resp.status() == 302 || resp.status() == 303,
        "expected a redirect to {expected}, got status {}",
        resp.status()
    );
    assert_eq!(location(resp), expected, "redirect target");
}

/// Reads a BFF error answer: asserts the status and that the body is `{"error": "<string>", ...}`.
pub async fn assert_json_error(resp: reqwest::Response, status: u16) -> Value {
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(got, status, "status (body: {text})");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    assert!(
        v.get("error").and_then(Value::as_str).is_some(),
        "error body lacks a string `error`: {text}"
    );
    v
}

/// Like `assert_json_error` but for any status in `range`.
pub async fn assert_json_error_in(
    resp: reqwest::Response,
    range: std::ops::RangeInclusive<u16>,
) -> Value {
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        range.contains(&got),
        "status {got} not in {range:?} (body: {text})"
    );
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    assert!(
        v.get("error").and_then(Value::as_str).is_some(),
        "error body lacks a string `error`: {text}"
    );
    v
}

/// Sends a hand-written HTTP/1.1 request (paths a URL parser would normalise) and returns (status, raw answer).
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .expect("raw HTTP answer within 15 s");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in raw answer: {text:?}"));
    (status, text)
}

/// Reads a raw socket until the peer closes it or `within` passes: what arrived, and whether the
/// peer closed (a read error counts as closed).
pub async fn read_until_close(s: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&buf).into_owned(), true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), false),
        }
    }
}
