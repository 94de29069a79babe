//! Errors the BFF answers with: `{"error", "error_description"}` in the RFC 6749 §5.2 style.
//! Whose fault it is picks the status (browser → 4xx, IdP/API → 502/504, ours → 500); the cause
//! chain is logged once by the request-log middleware, never shown to the browser.

use std::borrow::Cow;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

/// An error answer of the BFF itself.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub description: Cow<'static, str>,
    /// What went wrong, for the log only.
    pub cause: Option<anyhow::Error>,
}

/// Attached to error responses so the request-log middleware can log the cause once.
#[derive(Clone, Debug)]
pub struct LoggedCause(pub Arc<String>);

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, desc: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            code,
            description: desc.into(),
            cause: None,
        }
    }

    pub fn with_cause(mut self, cause: impl Into<anyhow::Error>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn invalid_request(desc: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", desc)
    }

    pub fn unauthorized(desc: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", desc)
    }

    pub fn forbidden(desc: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "access_denied", desc)
    }

    pub fn bad_gateway(desc: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "bad_gateway", desc)
    }

    pub fn gateway_timeout(desc: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "gateway_timeout", desc)
    }

    pub fn unavailable(desc: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            desc,
        )
    }

    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "an internal error occurred",
        )
        .with_cause(cause)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }
}

/// The JSON error body; `no-store` because errors may relate to a user's session.
pub fn json_error(status: StatusCode, code: &str, description: &str) -> Response {
    let body = serde_json::json!({ "error": code, "error_description": description });
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = json_error(self.status, self.code, &self.description);
        // RFC 9110 §10.2.3: when to try again (our back-offs are a few seconds).
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        if let Some(cause) = &self.cause {
            resp.extensions_mut()
                .insert(LoggedCause(Arc::new(format!("{cause:#}"))));
        }
        resp
    }
}
