//! tokengate: a Backend-for-Frontend token handler. The browser never holds an OAuth token.
//!
//! The request's path, module by module:
//!
//! ```text
//! browser ──GET /login──────────▶ auth::login      state + PKCE + nonce, sealed tx cookie, 302 ─▶ IdP
//! IdP ─────GET /oauth-callback──▶ auth::callback   state/iss checks, code → idp::client, idp::id_token
//!                                                   └▶ session::store (sealed cookie) 302 → return_to
//! SPA ─────GET /userinfo────────▶ auth::userinfo   ID-token claims (+ UserInfo), never tokens
//! SPA ─────POST /refreshtoken───▶ auth::refresh    session::refresh (single-flight)
//! SPA ─────ANY /api/...─────────▶ proxy::forward   session::extract (CSRF, session, fresh token)
//!                                                   └▶ proxy::headers → proxy::upstream ─▶ API
//! SPA ─────POST /logout─────────▶ auth::logout     revoke (RFC 7009), clear cookies, end-session URL
//! ```
//!
//! Module map: [`config`] (typed, validated settings), [`state`] (shared handles), [`app`] (the
//! router), [`error`] (JSON errors), [`telemetry`] (logs), [`auth`], [`idp`], [`session`],
//! [`proxy`].

pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod idp;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod session;
pub mod state;
pub mod telemetry;

use std::future::Future;

use config::Config;

/// Serves tokengate on `listener` until `shutdown` resolves, then finishes in-flight requests.
/// The caller binds the listener (tests use `127.0.0.1:0`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(config = %config.redacted_summary(), "starting");
    let limits = server::Limits {
        max_connections: config.server.max_connections,
        header_read_timeout: config.server.header_read_timeout,
        max_header_bytes: config.server.max_header_bytes,
        shutdown_timeout: config.server.shutdown_timeout,
        shutdown_delay: config.server.shutdown_delay,
    };
    let metrics_listen = config.server.metrics_listen;
    let state = state::AppState::new(config)?;
    let loader = state.idp.spawn_loader();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_task = match metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(%addr, "metrics listening");
            let mut rx = stop_rx.clone();
            Some(tokio::spawn(server::run_plain(
                l,
                app::metrics_app(state.clone()),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    let lifecycle = std::sync::Arc::clone(&state.lifecycle);
    let router = app::app(state);
    let result = server::run(listener, router, limits, lifecycle, shutdown).await;
    let _ = stop_tx.send(true);
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    loader.abort();
    drop(stop_rx);
    result
}

/// A fresh random session key, base64 (what `tokengate keygen` prints).
pub fn generate_key() -> String {
    use base64::Engine;
    let mut k = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}
