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
pub mod proxy;
pub mod session;
pub mod state;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;

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
    let state = state::AppState::new(config)?;
    let loader = state.idp.spawn_loader();
    let router = app::app(state);
    let result = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    loader.abort();
    result?;
    Ok(())
}

/// A fresh random session key, base64 (what `tokengate keygen` prints).
pub fn generate_key() -> String {
    use base64::Engine;
    let mut k = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}
