//! IdP metadata: OpenID Connect Discovery 1.0, falling back to RFC 8414 authorization-server
//! metadata; explicit endpoints in config win. And the JWKS cache with rate-limited re-fetch on an
//! unknown `kid` (key rotation, OIDC Core §10.1.1).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;
use url::Url;

use crate::config::OAuthConfig;

/// The endpoints and capabilities tokengate uses.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: Url,
    pub token_endpoint: Url,
    pub jwks_uri: Option<Url>,
    pub userinfo_endpoint: Option<Url>,
    pub revocation_endpoint: Option<Url>,
    pub end_session_endpoint: Option<Url>,
    /// RFC 9207 §3: the AS always sends `iss` in authorization responses.
    pub iss_parameter_supported: bool,
    /// RFC 9126 §5: where to push authorization requests, and whether the AS demands it.
    pub par_endpoint: Option<Url>,
    pub par_required: bool,
}

#[derive(Debug, Deserialize)]
struct Document {
    issuer: String,
    authorization_endpoint: Option<Url>,
    token_endpoint: Option<Url>,
    jwks_uri: Option<Url>,
    userinfo_endpoint: Option<Url>,
    revocation_endpoint: Option<Url>,
    end_session_endpoint: Option<Url>,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
    pushed_authorization_request_endpoint: Option<Url>,
    #[serde(default)]
    require_pushed_authorization_requests: bool,
    code_challenge_methods_supported: Option<Vec<String>>,
    dpop_signing_alg_values_supported: Option<Vec<String>>,
}

/// `{issuer}/.well-known/openid-configuration`, then the RFC 8414 §3.1 form
/// `{origin}/.well-known/oauth-authorization-server{path}`.
pub fn well_known_urls(issuer: &str) -> anyhow::Result<Vec<Url>> {
    let trimmed = issuer.trim_end_matches('/');
    let oidc = Url::parse(&format!("{trimmed}/.well-known/openid-configuration"))?;
    let u = Url::parse(issuer)?;
    let path = u.path().trim_end_matches('/');
    let mut rfc8414 = u.clone();
    rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    Ok(vec![oidc, rfc8414])
}

async fn fetch_document(http: &reqwest::Client, url: &Url) -> anyhow::Result<Document> {
    let resp = http
        .get(url.clone())
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url}: HTTP {}", resp.status().as_u16());
    }
    let body = super::client::read_capped(resp)
        .await
        .with_context(|| format!("GET {url}"))?;
    serde_json::from_slice::<Document>(&body)
        .with_context(|| format!("GET {url}: not a metadata document"))
}

/// Builds the metadata from discovery and config.
pub async fn discover(http: &reqwest::Client, cfg: &OAuthConfig) -> anyhow::Result<Metadata> {
    let ex = &cfg.endpoints;
    let explicit_enough = ex.authorization_endpoint.is_some()
        && ex.token_endpoint.is_some()
        && (ex.jwks_uri.is_some() || !cfg.wants_openid());
    let doc = if explicit_enough {
        None
    } else {
        let mut last_err = anyhow!("no discovery URL");
        let mut found = None;
        for url in well_known_urls(&cfg.issuer)? {
            match fetch_document(http, &url).await {
                Ok(d) => {
                    found = Some(d);
                    break;
                }
                Err(e) => last_err = e,
            }
        }
        Some(found.ok_or(last_err)?)
    };
    if let Some(d) = &doc {
        // OIDC Discovery §4.3 / RFC 8414 §3.3: the document must be about the issuer we trust.
        if d.issuer != cfg.issuer {
            bail!(
                "discovery document names issuer `{}`, but oauth.issuer is `{}`",
                d.issuer,
                cfg.issuer
            );
        }
        if let Some(methods) = &d.code_challenge_methods_supported {
            if !methods.iter().any(|m| m == "S256") {
                tracing::warn!("the IdP does not advertise PKCE S256; tokengate sends it anyway");
            }
        }
    }
    let pick = |explicit: &Option<Url>, discovered: Option<&Option<Url>>| {
        explicit
            .clone()
            .or_else(|| discovered.and_then(|d| d.clone()))
    };
    let md = Metadata {
        issuer: cfg.issuer.clone(),
        authorization_endpoint: pick(
            &ex.authorization_endpoint,
            doc.as_ref().map(|d| &d.authorization_endpoint),
        )
        .ok_or_else(|| anyhow!("no authorization_endpoint"))?,
        token_endpoint: pick(&ex.token_endpoint, doc.as_ref().map(|d| &d.token_endpoint))
            .ok_or_else(|| anyhow!("no token_endpoint"))?,
        jwks_uri: pick(&ex.jwks_uri, doc.as_ref().map(|d| &d.jwks_uri)),
        userinfo_endpoint: pick(
            &ex.userinfo_endpoint,
            doc.as_ref().map(|d| &d.userinfo_endpoint),
        ),
        revocation_endpoint: pick(
            &ex.revocation_endpoint,
            doc.as_ref().map(|d| &d.revocation_endpoint),
        ),
        end_session_endpoint: pick(
            &ex.end_session_endpoint,
            doc.as_ref().map(|d| &d.end_session_endpoint),
        ),
        iss_parameter_supported: doc
            .as_ref()
            .is_some_and(|d| d.authorization_response_iss_parameter_supported),
        par_endpoint: doc
            .as_ref()
            .and_then(|d| d.pushed_authorization_request_endpoint.clone()),
        par_required: doc
            .as_ref()
            .is_some_and(|d| d.require_pushed_authorization_requests),
    };
    if cfg.dpop.is_some() {
        // RFC 9449 §5.1: the algorithms the AS takes proofs in; ours are ES256.
        match doc
            .as_ref()
            .and_then(|d| d.dpop_signing_alg_values_supported.as_ref())
        {
            Some(algs) if !algs.iter().any(|a| a == "ES256") => bail!(
                "oauth.dpop: the authorization server takes DPoP proofs signed with {} only, and tokengate signs with ES256",
                algs.iter().map(|a| a.escape_default().to_string()).collect::<Vec<_>>().join(", ")
            ),
            Some(_) => {}
            None => tracing::warn!(
                "oauth.dpop is on, but the authorization server's metadata lists no dpop_signing_alg_values_supported: if it does not support DPoP, its bearer tokens are refused and logins fail"
            ),
        }
    }
    if cfg.wants_openid() && md.jwks_uri.is_none() {
        bail!("scope `openid` needs a jwks_uri to validate ID tokens, and none was found");
    }
    Ok(md)
}

/// Minimum time between two JWKS fetches triggered by an unknown `kid`: an attacker sending tokens
/// with random `kid`s must not make us hammer the IdP.
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// The IdP's signing keys.
#[derive(Debug)]
pub struct Jwks {
    set: RwLock<Arc<JwkSet>>,
    uri: RwLock<Option<Url>>,
    /// When the last fetch *forced by an unknown kid* happened (the scheduled load does not
    /// count: a rotation right after start-up must still be followed).
    last_forced: tokio::sync::Mutex<Option<Instant>>,
}

impl Default for Jwks {
    fn default() -> Self {
        Self {
            set: RwLock::new(Arc::new(JwkSet { keys: vec![] })),
            uri: RwLock::new(None),
            last_forced: tokio::sync::Mutex::new(None),
        }
    }
}

impl Jwks {
    pub fn current(&self) -> Arc<JwkSet> {
        self.set
            .read()
            .map(|s| Arc::clone(&s))
            .unwrap_or_else(|_| Arc::new(JwkSet { keys: vec![] }))
    }

    pub async fn fetch(&self, http: &reqwest::Client, uri: &Url) -> anyhow::Result<()> {
        let resp = http
            .get(uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .with_context(|| format!("GET {uri}"))?;
        if !resp.status().is_success() {
            bail!("GET {uri}: HTTP {}", resp.status().as_u16());
        }
        // Parse key by key: one key of a type we do not know must not hide the others.
        let body = super::client::read_capped(resp)
            .await
            .with_context(|| format!("GET {uri}"))?;
        let raw: serde_json::Value = serde_json::from_slice(&body).context("JWKS is not JSON")?;
        let keys = raw
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| anyhow!("JWKS has no `keys` array"))?
            .iter()
            .filter_map(|k| serde_json::from_value(k.clone()).ok())
            .collect();
        if let Ok(mut s) = self.set.write() {
            *s = Arc::new(JwkSet { keys });
        }
        if let Ok(mut u) = self.uri.write() {
            *u = Some(uri.clone());
        }
        Ok(())
    }

    /// Re-fetches the JWKS because a token named an unknown `kid`, at most once per
    /// [`FORCED_REFRESH_INTERVAL`]. Returns whether a fetch happened and succeeded.
    pub async fn refresh_for_unknown_kid(&self, http: &reqwest::Client) -> bool {
        let Some(uri) = self.uri.read().ok().and_then(|u| u.clone()) else {
            return false;
        };
        // Held across the fetch: concurrent callers wait, then see the fresh set.
        let mut last = self.last_forced.lock().await;
        if last.is_some_and(|t| t.elapsed() < FORCED_REFRESH_INTERVAL) {
            return false;
        }
        let result = self.fetch(http, &uri).await;
        *last = Some(Instant::now());
        tracing::info!(ok = result.is_ok(), "JWKS re-fetched for an unknown key id");
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "JWKS re-fetch failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_locations() {
        let u = well_known_urls("https://idp.example.com/realms/x").expect("urls");
        assert_eq!(
            u[0].as_str(),
            "https://idp.example.com/realms/x/.well-known/openid-configuration"
        );
        assert_eq!(
            u[1].as_str(),
            "https://idp.example.com/.well-known/oauth-authorization-server/realms/x"
        );
        let root = well_known_urls("http://127.0.0.1:9000").expect("urls");
        assert_eq!(
            root[1].as_str(),
            "http://127.0.0.1:9000/.well-known/oauth-authorization-server"
        );
    }
}
