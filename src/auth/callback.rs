//! `GET /oauth-callback`: the authorization response (RFC 6749 §4.1.2). Checks the state against
//! a pending transaction (single use), the `iss` parameter (RFC 9207), redeems the code with the
//! PKCE verifier, validates the ID token, and creates the session.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use subtle::ConstantTimeEq;

use super::login::{is_token_shaped, random_token, LoginTx};
use super::QueryParams;
use crate::error::ApiError;
use crate::idp::IdpError;
use crate::session::cookie::RequestCookies;
use crate::session::tokens::{now_s, Session};
use crate::state::AppState;

const SECURITY_PARAMS: &[&str] = &["state", "code", "iss", "error", "error_description"];

pub async fn callback(
    State(state): State<AppState>,
    cookies: RequestCookies,
    uri: http::Uri,
) -> Result<Response, ApiError> {
    let result = complete_login(&state, &cookies, &uri).await;
    if result.is_err() {
        // A refused callback ends the browser's pending logins: the transaction it names may be
        // unknowable (tampered state), and a broken flow must restart at /login anyway.
        let rules = state.store.rules();
        for name in rules.tx_names(&cookies) {
            rules.clear_tx(&cookies, &name);
        }
    }
    let (outcome, reason) = match &result {
        Ok((_, reason)) => (
            if reason.is_empty() {
                "completed"
            } else {
                "failed"
            },
            *reason,
        ),
        Err(e) => (
            "failed",
            match e.code {
                "invalid_grant" => "code_rejected",
                "invalid_token" => "id_token_invalid",
                "invalid_request" => "invalid_request",
                _ if e.status.is_server_error() => "idp_unavailable",
                _ => "other",
            },
        ),
    };
    state.metrics.login(outcome, reason);
    result.map(|(r, _)| r)
}

/// The callback's work; the `&str` is the failure reason when the IdP sent an error.
async fn complete_login(
    state: &AppState,
    cookies: &RequestCookies,
    uri: &http::Uri,
) -> Result<(Response, &'static str), ApiError> {
    let params = QueryParams::parse(uri.query(), SECURITY_PARAMS)?;
    let tx = take_transaction(state, cookies, params.get("state")).await?;
    let md = state
        .idp
        .metadata()
        .ok_or_else(|| ApiError::unavailable("the identity provider is not reachable yet"))?;

    // RFC 9207 §2.4: simple string comparison; required when the AS says it always sends `iss`.
    match params.get("iss") {
        Some(iss) if iss != md.issuer => {
            return Err(ApiError::invalid_request(
                "the authorization response comes from an unexpected issuer",
            ))
        }
        None if md.iss_parameter_supported => {
            return Err(ApiError::invalid_request(
                "the authorization response lacks the `iss` parameter",
            ))
        }
        _ => {}
    }

    if let Some(error) = params.get("error") {
        // Not proof of anything (RFC 9207 §2.4); shown to the SPA as text, never as HTML.
        let description = params.get("error_description").unwrap_or("");
        tracing::info!(error = %error.escape_default(), "the authorization server returned an error");
        return Ok((redirect_with_error(error, description), "idp_error"));
    }

    let code = params
        .get("code")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::invalid_request("the authorization response has no code"))?;
    let tokens = state
        .idp
        .exchange_code(code, &tx.verifier)
        .await
        .map_err(|e| match &e {
            IdpError::OAuth { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the authorization code could not be redeemed: log in again",
            )
            .with_cause(e),
            _ => idp_failure(e),
        })?;

    let (subject, sid) = match (&tokens.id_token, state.config.oauth.wants_openid()) {
        (Some(t), _) => {
            let c = state
                .idp
                .validate_id_token(
                    t,
                    tx.nonce.as_deref(),
                    state.config.oauth.login_transaction_ttl,
                )
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_token",
                        "the identity provider's ID token was not valid",
                    )
                    .with_cause(e)
                })?;
            (c.sub, c.sid)
        }
        (None, true) => {
            return Err(ApiError::bad_gateway(
                "the identity provider returned no ID token for an openid login",
            ))
        }
        (None, false) => (String::new(), None),
    };

    let now = now_s();
    let mut session = Session {
        id: random_token(),
        expires_at: tokens.expires_in.map(|s| now.saturating_add(s)),
        lifetime: tokens.expires_in,
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
        id_token: tokens.id_token,
        scope: tokens.scope,
        subject,
        idp_session_id: sid,
        created_at: now,
        last_seen: now,
        generation: 0,
    };
    // A fresh session replaces whatever the browser had (no fixation); server-side, the old
    // session is deleted, not just forgotten by this browser.
    let previous = match state.store.load(cookies).await {
        Ok(crate::session::store::Loaded::Some(old)) => Some(old),
        _ => None,
    };
    state.store.remove(cookies, previous.as_deref()).await;
    state
        .store
        .save(cookies, &mut session)
        .await
        .map_err(crate::session::extract::store_error)?;
    tracing::info!("login completed");

    // Re-validated here as well: the transaction cookie is ours, but defence in depth is cheap.
    let target = super::return_to::sanitize(Some(&tx.return_to), &state.config.server.public_url);
    Ok((redirect(&target), ""))
}

/// Finds, opens and consumes the transaction named by `state`. Every outcome clears the cookie.
async fn take_transaction(
    state: &AppState,
    cookies: &RequestCookies,
    param: Option<&str>,
) -> Result<LoginTx, ApiError> {
    let unknown = || {
        ApiError::invalid_request("unknown, expired or already used login: start again at /login")
    };
    let s = param.filter(|s| is_token_shaped(s)).ok_or_else(unknown)?;
    let rules = state.store.rules();
    let name = rules.tx_name(s);
    let value = cookies.sent(&name).map(str::to_string);
    let Some(value) = value else {
        return Err(unknown());
    };
    rules.clear_tx(cookies, &name);
    let tx: LoginTx = state
        .sealer
        .open(name.as_bytes(), &value)
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or_else(unknown)?;
    if !bool::from(tx.state.as_bytes().ct_eq(s.as_bytes())) {
        return Err(unknown());
    }
    let now = now_s();
    let ttl = state.config.oauth.login_transaction_ttl.as_secs();
    if now.saturating_sub(tx.created_at) >= ttl {
        return Err(unknown());
    }
    // A copy of the transaction cookie replayed with the same state is refused too: in this
    // process's ledger, and with Redis across every replica (failing closed when Redis is down).
    let until = tx.created_at.saturating_add(ttl);
    if !state.logins.first_use(s, until, now) {
        return Err(unknown());
    }
    if let Some(redis) = state.store.redis_store() {
        let left = std::time::Duration::from_secs(until.saturating_sub(now).max(1));
        if !redis
            .first_state_use(s, left)
            .await
            .map_err(crate::session::extract::store_error)?
        {
            return Err(unknown());
        }
    }
    Ok(tx)
}

/// Maps an IdP failure to whose fault it is: timeouts 504, everything else 502.
pub fn idp_failure(e: IdpError) -> ApiError {
    match e {
        IdpError::Timeout => {
            ApiError::gateway_timeout("the identity provider did not answer in time").with_cause(e)
        }
        IdpError::NotReady => {
            ApiError::unavailable("the identity provider is not reachable yet").with_cause(e)
        }
        _ => ApiError::bad_gateway("the identity provider failed").with_cause(e),
    }
}

fn redirect(location: &str) -> Response {
    let loc = HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/"));
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, loc),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response()
}

fn redirect_with_error(error: &str, description: &str) -> Response {
    // Only RFC 6749 error-code characters pass; the description is length-capped and
    // percent-encoded, so nothing can break out of the query string.
    let code: String = error
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect();
    let desc: String = description
        .chars()
        .filter(|c| !c.is_control())
        .take(256)
        .collect();
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair(
            "error",
            if code.is_empty() {
                "server_error"
            } else {
                &code
            },
        )
        .append_pair("error_description", &desc)
        .finish();
    redirect(&format!("/?{query}"))
}
