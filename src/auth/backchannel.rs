//! `POST /backchannel-logout`: OpenID Connect Back-Channel Logout 1.0. The IdP posts a signed
//! logout token; the sessions it names (by IdP session id `sid` and/or subject `sub`) end on every
//! replica. Needs a server-side session store: cookie sessions live in browsers and cannot be
//! reached from here.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

use super::QueryParams;
use crate::error::ApiError;
use crate::session::extract::store_error;
use crate::state::AppState;

/// How long a logout token's `jti` is remembered (tokens are accepted up to 10 minutes old).
const JTI_TTL: Duration = Duration::from_secs(900);

/// The IdP sends a small form; a body that is larger or slower is refused.
const MAX_BODY: usize = 64 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn backchannel_logout(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let limited = http_body_util::Limited::new(request.into_body(), MAX_BODY);
    let body: Bytes =
        match tokio::time::timeout(BODY_TIMEOUT, http_body_util::BodyExt::collect(limited)).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request",
                    "the request body did not arrive in time",
                ))
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    "the request body is too large",
                ))
            }
            Ok(Err(_)) => {
                return Err(ApiError::invalid_request(
                    "the request body could not be read",
                ))
            }
            Ok(Ok(c)) => c.to_bytes(),
        };
    let Some(redis) = state.store.redis_store() else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
            "back-channel logout needs session.store = \"redis\": cookie sessions cannot be ended from the server",
        ));
    };
    let body = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid_request("the body must be form-urlencoded"))?;
    let params = QueryParams::parse(Some(body), &["logout_token"])?;
    let token = params
        .get("logout_token")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::invalid_request("the logout_token parameter is missing"))?;
    let claims =
        state.idp.validate_logout_token(token).await.map_err(|e| {
            ApiError::invalid_request("the logout token is not valid").with_cause(e)
        })?;
    if !redis
        .first_jti(&claims.jti, JTI_TTL)
        .await
        .map_err(store_error)?
    {
        return Err(ApiError::invalid_request(
            "the logout token was already used",
        ));
    }
    let ended = redis
        .delete_matching(claims.sub.as_deref(), claims.sid.as_deref())
        .await
        .map_err(store_error)?;
    tracing::info!(sessions_ended = ended, "back-channel logout");
    // §2.8: 200 on success; responses must not be cached.
    let mut resp = StatusCode::OK.into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
