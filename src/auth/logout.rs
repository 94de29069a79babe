//! `POST /logout`: revokes the refresh and access tokens at the IdP (RFC 7009) when it can, clears
//! every tokengate cookie, and hands the SPA the IdP's end-session URL (OIDC RP-Initiated Logout
//! 1.0 §2) to navigate to, or `/`.

use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderMap, HeaderValue};

use crate::error::ApiError;
use crate::idp::IdpError;
use crate::session::cookie::RequestCookies;
use crate::session::extract::{check_csrf, optional_session};
use crate::state::AppState;

/// Revocation is best effort: logout never hangs on a slow IdP.
const REVOKE_BUDGET: Duration = Duration::from_secs(5);

pub async fn logout(
    State(state): State<AppState>,
    cookies: RequestCookies,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_csrf(&state, &headers)?;
    let session = optional_session(&state, &cookies).await?;
    let rules = state.store.rules();
    let mut logout_url = "/".to_string();
    if let Some(s) = &session {
        state.userinfo_cache.forget(&s.id);
        let revoke = async {
            if let Some(rt) = &s.refresh_token {
                log_revoke(
                    state.idp.revoke(rt.secret(), "refresh_token").await,
                    "refresh_token",
                );
            }
            // Some IdPs do not revoke access tokens together with the refresh token.
            log_revoke(
                state
                    .idp
                    .revoke(s.access_token.secret(), "access_token")
                    .await,
                "access_token",
            );
            // The per-API tokens this instance obtained for the session (downscoped, exchanged).
            for t in state.route_tokens.take_session(&s.id) {
                log_revoke(
                    state.idp.revoke(t.secret(), "access_token").await,
                    "route access_token",
                );
            }
        };
        if tokio::time::timeout(REVOKE_BUDGET, revoke).await.is_err() {
            tracing::warn!("token revocation timed out");
        }
        state.store.remove(&cookies, Some(s)).await;
        if let Some(end) = state
            .idp
            .metadata()
            .and_then(|m| m.end_session_endpoint.clone())
        {
            let mut u = end;
            {
                let mut q = u.query_pairs_mut();
                if let Some(it) = &s.id_token {
                    q.append_pair("id_token_hint", it);
                }
                q.append_pair("client_id", &state.config.oauth.client_id)
                    .append_pair(
                        "post_logout_redirect_uri",
                        &state.config.oauth.post_logout_redirect_uri,
                    );
            }
            logout_url = u.into();
        }
    }
    rules.clear_all(&cookies);
    tracing::info!(had_session = session.is_some(), "logout");
    let mut resp = Json(serde_json::json!({ "logout_url": logout_url })).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

fn log_revoke(r: Result<(), IdpError>, what: &'static str) {
    match r {
        Ok(()) => tracing::debug!(token = what, "revoked"),
        Err(IdpError::Unsupported(_)) => {}
        Err(e) => tracing::warn!(token = what, error = %e, "revocation failed"),
    }
}
