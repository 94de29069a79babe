//! `app(state) -> Router`: tokengate's own endpoints, then everything else (API routes, the SPA)
//! through one fallback. No I/O here.

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, HeaderValue, StatusCode};
use tower_cookies::CookieManagerLayer;

use crate::auth::{callback, login, logout, refresh, userinfo};
use crate::error::json_error;
use crate::proxy::forward;
use crate::state::AppState;

pub fn app(state: AppState) -> Router {
    let redirect_path = state.config.oauth.redirect_path.clone();
    Router::new()
        .route("/login", get(login::login))
        .route(&redirect_path, get(callback::callback))
        .route("/refreshtoken", post(refresh::refresh))
        .route("/userinfo", get(userinfo::userinfo))
        .route("/logout", post(logout::logout))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(forward::fallback)
        // Layers run outside-in for requests: log (request id, one line) → no-store on any
        // cookie change → cookie jar.
        .layer(CookieManagerLayer::new())
        .layer(middleware::from_fn(no_store_when_cookies_change))
        .layer(middleware::from_fn(crate::telemetry::request_log))
        .with_state(state)
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request",
        "method not allowed",
    )
}

/// Any response that sets or clears a cookie must not be stored by a shared cache.
async fn no_store_when_cookies_change(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if resp.headers().contains_key(header::SET_COOKIE) {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let idp_ready = state.idp.metadata().is_some();
    let body = serde_json::json!({
        "status": if idp_ready { "ready" } else { "not_ready" },
        "checks": {
            "idp_metadata": idp_ready,
            "session_store": true,
        }
    });
    let status = if idp_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
