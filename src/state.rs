//! Shared state of the running service: cheap to clone, everything behind `Arc`.

use std::sync::Arc;

use crate::config::{Config, StoreKind};
use crate::idp::Idp;
use crate::metrics::Metrics;
use crate::proxy::upstream::Upstreams;
use crate::session::refresh::Refresher;
use crate::session::seal::Sealer;
use crate::session::store::SessionStore;
use crate::session::store_redis::RedisStore;

/// The handle every request gets: one `Arc`, so cloning it (axum does, several times per
/// request) copies a pointer, not the key schedule or the cookie names.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub config: Arc<Config>,
    /// `public_url`'s origin as browsers send it in `Origin`.
    pub origin: Arc<str>,
    /// `X-Forwarded-Proto` and `-Host` from `public_url` (`host[:port]`), made once: they are
    /// the same for every call.
    pub proto_host: crate::proxy::headers::ProtoHost,
    pub idp: Arc<Idp>,
    /// Seals cookies other than the session (login transactions).
    pub sealer: Sealer,
    pub store: SessionStore,
    pub refresher: Arc<Refresher>,
    /// Per-route tokens (downscoped and client-credentials), cached in memory.
    pub route_tokens: Arc<crate::session::route_token::RouteTokens>,
    pub upstreams: Arc<Upstreams>,
    pub userinfo_cache: Arc<crate::auth::userinfo::Cache>,
    pub logins: Arc<crate::auth::ledger::LoginLedger>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<crate::server::Lifecycle>,
}

impl AppState {
    pub fn new(config: Config) -> anyhow::Result<Self> {
        Shared::new(config).map(|s| AppState(Arc::new(s)))
    }
}

impl Shared {
    fn new(config: Config) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let sealer = Sealer::new(&config.session.keys);
        let rules = crate::session::cookie::CookieRules::new(config.server.is_https());
        let s = &config.session;
        let redis = match &s.store {
            StoreKind::Cookie => None,
            StoreKind::Redis(url) => Some(RedisStore::with_tls(
                url,
                s.redis_ca_pem.as_deref(),
                s.redis_client_tls.as_ref(),
                sealer.clone(),
                (!s.redis_cache.is_zero()).then(|| {
                    crate::session::redis_cache::LocalSessions::new(
                        s.redis_cache,
                        metrics.session_cache(),
                    )
                }),
            )?),
        };
        let store = SessionStore::new(
            redis,
            sealer.clone(),
            rules,
            s.idle_timeout,
            s.absolute_timeout,
            Arc::clone(&metrics),
        );
        let idp = Idp::new(config.oauth.clone(), Arc::clone(&metrics))?;
        let upstreams = Arc::new(Upstreams::new(&config.routes)?.count_waits(&metrics));
        Ok(Self {
            origin: config.server.origin().into(),
            proto_host: {
                let u = &config.server.public_url;
                let host = match (u.host_str(), u.port()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) => h.to_string(),
                    _ => String::new(),
                };
                crate::proxy::headers::ProtoHost::new(u.scheme(), host.as_bytes())
            },
            config: Arc::new(config),
            idp,
            sealer,
            store,
            refresher: Arc::new(Refresher::new(Arc::clone(&metrics))),
            route_tokens: Arc::default(),
            upstreams,
            userinfo_cache: Arc::default(),
            logins: Arc::default(),
            metrics,
            lifecycle: Arc::default(),
        })
    }
}
