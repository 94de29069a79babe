//! The checks in front of every session-using endpoint: CSRF defence (custom header, Fetch
//! Metadata, Origin), then the session itself with its timeouts.

use std::sync::Arc;

use http::{header, HeaderMap};

use super::cookie::RequestCookies;
use super::store::{Loaded, StoreError};
use super::tokens::{now_s, Session};
use crate::error::ApiError;
use crate::state::AppState;

/// Re-save the session (sliding the idle timeout) at most this often, not on every request.
const MAX_TOUCH_INTERVAL_S: u64 = 60;

/// How often an active session is re-saved: every [`MAX_TOUCH_INTERVAL_S`] for long idle timeouts
/// (few store writes), but at least four times per idle timeout, so that a session in use never
/// reaches its idle timeout between two touches (e.g. `idle_timeout_s = 10`: every 2 s).
pub fn touch_interval_s(idle: std::time::Duration) -> u64 {
    (idle.as_secs() / 4).clamp(1, MAX_TOUCH_INTERVAL_S)
}

/// Compared as a ready name on every API call (a `&str` is parsed as a name first).
static SEC_FETCH_SITE: http::HeaderName = http::HeaderName::from_static("sec-fetch-site");

/// CSRF defence for state-changing and API requests:
/// 1. the configured custom header must be present: a cross-site form or `<img>` cannot add it,
///    and a cross-origin `fetch` that adds it needs a CORS preflight we never approve;
/// 2. `Sec-Fetch-Site: cross-site` is refused (Fetch Metadata);
/// 3. an `Origin` header, when sent, must be our own origin.
pub fn check_csrf(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    // One pass over the fields (a request has a few dozen at most) instead of three lookups,
    // each hashing its name; each name's first value counts, as with `get`.
    let csrf = &state.config.csrf.header;
    let (mut custom, mut site, mut origin) = (false, None, None);
    for (name, value) in headers {
        if name == csrf {
            custom = true;
        } else if name == SEC_FETCH_SITE {
            site = site.or(Some(value));
        } else if name == header::ORIGIN {
            origin = origin.or(Some(value));
        }
    }
    if !custom {
        return Err(ApiError::forbidden(format!(
            "the {} header is required",
            state.config.csrf.header
        )));
    }
    if site.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site")) {
        return Err(ApiError::forbidden("cross-site requests are not allowed"));
    }
    if let Some(origin) = origin {
        if origin.as_bytes() != state.origin.as_bytes() {
            return Err(ApiError::forbidden("the request's Origin is not allowed"));
        }
    }
    Ok(())
}

/// Loads the session or answers 401 (clearing a cookie that is unreadable or expired).
pub async fn require_session(
    state: &AppState,
    cookies: &RequestCookies,
) -> Result<Arc<Session>, ApiError> {
    match optional_session(state, cookies).await? {
        Some(s) => Ok(s),
        None => Err(ApiError::unauthorized("no session: log in first")),
    }
}

/// Loads the session if there is a usable one; unreadable or expired cookies are cleared.
///
/// The session is shared with the store's cache of opened sessions (no copy per request); a
/// caller that changes it gets its own copy (`Arc::make_mut`).
pub async fn optional_session(
    state: &AppState,
    cookies: &RequestCookies,
) -> Result<Option<Arc<Session>>, ApiError> {
    let store = &state.store;
    let mut session = match store.load(cookies).await.map_err(store_error)? {
        Loaded::None => return Ok(None),
        Loaded::Unreadable => {
            tracing::info!("unreadable session cookie cleared");
            store.remove(cookies, None).await;
            return Ok(None);
        }
        Loaded::Some(s) => s,
    };
    let now = now_s();
    let cfg = &state.config.session;
    if let Err(why) = session.check_timeouts(now, cfg.idle_timeout, cfg.absolute_timeout) {
        tracing::info!(reason = ?why, "session expired");
        store.remove(cookies, Some(&session)).await;
        return Ok(None);
    }
    if now.saturating_sub(session.last_seen) >= touch_interval_s(cfg.idle_timeout) {
        let session = Arc::make_mut(&mut session);
        session.last_seen = now;
        match store.save(cookies, session).await {
            // Another request wrote the session meanwhile (e.g. a refresh): its write stands.
            Ok(()) | Err(StoreError::Conflict) => {}
            Err(e) => return Err(store_error(e)),
        }
    }
    Ok(Some(session))
}

/// A session-store failure as the browser sees it.
pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(_) => {
            ApiError::unavailable("the session store is unavailable; try again shortly")
                .with_cause(e)
        }
        StoreError::Conflict => {
            ApiError::unavailable("the session changed meanwhile; try again").with_cause(e)
        }
        StoreError::TooLarge => ApiError::internal(e),
    }
}

/// Makes sure `session`'s access token is usable for a while (`oauth.refresh_skew_s`), refreshing
/// it (single-flight) and saving the result when needed.
///
/// Failure handling: `invalid_grant` ends the session (401, cookies cleared); an IdP outage keeps
/// the session and answers 503 only when the current token has already expired.
pub async fn ensure_fresh(
    state: &AppState,
    cookies: &RequestCookies,
    session: &mut Arc<Session>,
) -> Result<(), ApiError> {
    let now = now_s();
    if !session.needs_refresh(now, state.config.oauth.refresh_skew) {
        return Ok(());
    }
    let session = Arc::make_mut(session);
    // Boxed: the refresh path's future is large and rarely taken; inline, it would make every
    // API call's future (moved several times through the middleware) kilobytes bigger.
    Box::pin(refresh_now(state, cookies, session, true))
        .await
        .or_else(|e| {
            // Still valid: a transient failure does not stop the request.
            if e.status == http::StatusCode::SERVICE_UNAVAILABLE
                && session.expires_in(now) > Some(0)
            {
                Ok(())
            } else {
                Err(e)
            }
        })
}

/// Refreshes now (single-flight) and saves the session (`POST /refreshtoken`).
pub async fn force_refresh(
    state: &AppState,
    cookies: &RequestCookies,
    session: &mut Session,
) -> Result<(), ApiError> {
    Box::pin(refresh_now(state, cookies, session, false)).await
}

/// `proactive`: refreshing ahead of expiry before using the token; then a session without a
/// refresh token simply keeps using its still-valid token.
async fn refresh_now(
    state: &AppState,
    cookies: &RequestCookies,
    session: &mut Session,
    proactive: bool,
) -> Result<(), ApiError> {
    use super::refresh::RefreshError;
    match state
        .refresher
        .refresh(&state.idp, &state.store, session)
        .await
    {
        Ok(fresh) => {
            *session = (*fresh).clone();
            // A server-side store persisted it already (compare-and-swap, once for all replicas).
            if !state.store.is_server_side() {
                state
                    .store
                    .save(cookies, session)
                    .await
                    .map_err(store_error)?;
            }
            Ok(())
        }
        Err(RefreshError::NoRefreshToken) => {
            if session.expires_in(now_s()) == Some(0) {
                state.store.remove(cookies, Some(session)).await;
                Err(ApiError::unauthorized(
                    "the session's access token expired and cannot be refreshed: log in again",
                ))
            } else if proactive {
                // Nothing to refresh with: the still-valid token is used until it expires.
                Ok(())
            } else {
                Err(ApiError::invalid_request(
                    "the session has no refresh token",
                ))
            }
        }
        Err(RefreshError::Fatal(why)) => {
            tracing::info!(reason = %why, "session ended by the authorization server");
            state.store.remove(cookies, Some(session)).await;
            Err(ApiError::new(
                http::StatusCode::UNAUTHORIZED,
                "invalid_grant",
                "the session has ended: log in again",
            ))
        }
        Err(RefreshError::Refused(e)) => Err(ApiError::new(
            http::StatusCode::FORBIDDEN,
            "invalid_scope",
            "the authorization server refused the session's scopes",
        )
        .with_cause(e)),
        Err(RefreshError::Transient(e)) => Err(ApiError::unavailable(
            "the authorization server is unavailable; try again shortly",
        )
        .with_cause(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::touch_interval_s;
    use std::time::Duration;

    #[test]
    fn touch_interval_is_a_quarter_of_the_idle_timeout_between_1_and_60_s() {
        let t = |s| touch_interval_s(Duration::from_secs(s));
        assert_eq!(t(1), 1);
        assert_eq!(t(3), 1);
        assert_eq!(t(10), 2);
        assert_eq!(t(120), 30);
        assert_eq!(t(240), 60);
        assert_eq!(t(3600), 60);
    }
}
