//! Logging: `tracing` to stderr, human text or JSON (`log.format`). One line per request with a
//! request id; the query string (it carries codes and states at the callback), cookies and
//! `Authorization` are never logged.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderName, HeaderValue};
use tracing::Instrument;

use crate::config::{LogConfig, LogFormat};
use crate::error::LoggedCause;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Installs the global subscriber (once; later calls are ignored, as in tests).
pub fn init(cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// A caller's request id is kept when it is short and plain; otherwise we make one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            // 96 random bits from the thread-local generator (no system call per request).
            let (a, b): (u64, u32) = (rand::random(), rand::random());
            format!("{a:016x}{b:08x}")
        })
}

/// The trace id of a well-formed W3C `traceparent` (the header itself travels on to the API
/// unchanged, like any end-to-end header).
fn trace_id(req: &Request) -> Option<String> {
    let v = req.headers().get("traceparent")?.to_str().ok()?;
    let mut parts = v.split('-');
    let (version, trace, parent, _flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2) && hex(trace, 32) && hex(parent, 16) && trace != "0".repeat(32))
        .then(|| trace.to_ascii_lowercase())
}

/// The request-log middleware: a span carrying the request id around the whole request, the id
/// echoed in the response, and one line at the end (with the error cause, logged here only).
pub async fn request_log(
    State(state): State<crate::state::AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = request_id(&req);
    let route = crate::app::route_label(&state, &req);
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let trace_id = trace_id(&req).unwrap_or_default();
    let span = tracing::info_span!("request", request_id = %id, trace_id = %trace_id);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let took = started.elapsed();
    let micros = took.as_micros() as u64;
    state.metrics.request(route, &method, status, took);
    let _g = span.enter();
    match resp.extensions().get::<LoggedCause>() {
        Some(cause) if status >= 500 => {
            tracing::warn!(%method, path = %path.escape_default(), status, micros, cause = %cause.0, "request failed")
        }
        Some(cause) => {
            tracing::info!(%method, path = %path.escape_default(), status, micros, cause = %cause.0, "request refused")
        }
        None => tracing::info!(%method, path = %path.escape_default(), status, micros, "request"),
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    resp
}
