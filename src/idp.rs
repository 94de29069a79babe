//! The only code that talks to the authorization server: metadata discovery and the JWKS
//! ([`discovery`]), token/revocation/userinfo requests ([`client`]) and ID-token validation
//! ([`id_token`]).

pub mod client;
pub mod discovery;
pub mod dpop;
pub mod id_token;

use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use client::{IdpError, TokenResponse, TokenTarget};
pub use discovery::Metadata;

use crate::config::OAuthConfig;

/// Handle on the upstream authorization server: configuration, one HTTP client (redirects off),
/// the loaded metadata and the JWKS cache.
#[derive(Debug)]
pub struct Idp {
    pub config: OAuthConfig,
    http: reqwest::Client,
    metadata: RwLock<Option<Arc<Metadata>>>,
    jwks: discovery::Jwks,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Idp {
    pub fn new(
        config: OAuthConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let http = reqwest::Client::builder()
            // Following redirects from the IdP would be an SSRF hole and could leak credentials.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.http_timeout.min(Duration::from_secs(5)))
            .timeout(config.http_timeout)
            .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Self {
            config,
            http,
            metadata: RwLock::new(None),
            jwks: discovery::Jwks::default(),
            metrics,
        }))
    }

    /// The metadata once loaded (discovery and JWKS done); `None` until then.
    pub fn metadata(&self) -> Option<Arc<Metadata>> {
        self.metadata.read().ok().and_then(|m| m.clone())
    }

    /// Loads metadata and keys once.
    pub async fn load(&self) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let md = discovery::discover(&self.http, &self.config).await;
        self.metrics
            .idp_call("discovery", outcome(&md), started.elapsed());
        let md = md?;
        if let Some(uri) = &md.jwks_uri {
            let started = std::time::Instant::now();
            let r = self.jwks.fetch(&self.http, uri).await;
            self.metrics
                .idp_call("jwks", outcome(&r), started.elapsed());
            r?;
        }
        if let Ok(mut slot) = self.metadata.write() {
            *slot = Some(Arc::new(md));
        }
        Ok(())
    }

    /// Loads metadata in the background, retrying with capped exponential backoff, so tokengate
    /// starts (and answers 503 on /login) while the IdP is unreachable.
    pub fn spawn_loader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let idp = Arc::clone(self);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match idp.load().await {
                    Ok(()) => {
                        tracing::info!(issuer = %idp.config.issuer, "identity provider metadata loaded");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(issuer = %idp.config.issuer, error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "identity provider metadata not loaded yet");
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        })
    }

    /// Whether the JWKS holds at least one key (or none is needed).
    pub fn jwks_loaded(&self) -> bool {
        match self.metadata() {
            Some(m) => m.jwks_uri.is_none() || !self.jwks.current().keys.is_empty(),
            None => false,
        }
    }

    /// The DPoP key when `oauth.dpop` is on.
    pub fn dpop(&self) -> Option<&dpop::Dpop> {
        self.config.dpop.as_deref()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn jwks(&self) -> &discovery::Jwks {
        &self.jwks
    }
}

/// "ok" or "error", for metrics labels.
pub fn outcome<T, E>(r: &Result<T, E>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "error"
    }
}
