//! `POST /refreshtoken`: refreshes the access token now (RFC 6749 §6) and tells the SPA how long
//! it lasts. CSRF-checked first, then the session.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderMap, HeaderValue};

use crate::error::ApiError;
use crate::session::cookie::RequestCookies;
use crate::session::extract::{check_csrf, force_refresh, require_session};
use crate::session::tokens::now_s;
use crate::state::AppState;

pub async fn refresh(
    State(state): State<AppState>,
    cookies: RequestCookies,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_csrf(&state, &headers)?;
    let mut session = require_session(&state, &cookies).await?;
    force_refresh(&state, &cookies, std::sync::Arc::make_mut(&mut session)).await?;
    let expires_in = session.expires_in(now_s());
    let mut resp = Json(serde_json::json!({ "expires_in": expires_in })).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
