//! Logging: `tracing` to stderr, human text or JSON (`log.format`). One line per request with a
//! request id; the query string (it carries codes and states at the callback), cookies and
//! `Authorization` are never logged.

use std::time::Instant;

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderName, HeaderValue};

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
fn request_id(req: &Request) -> HeaderValue {
    if let Some(v) = req.headers().get(&REQUEST_ID).filter(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    }) {
        return v.clone();
    }
    // 96 random bits from the thread-local generator (no system call per request), as 24
    // lower-case hex digits.
    let (a, b): (u64, u32) = (rand::random(), rand::random());
    let mut hex = [0u8; 24];
    let digits = b"0123456789abcdef";
    let bits = (u128::from(a) << 32) | u128::from(b);
    for (i, d) in hex.iter_mut().enumerate() {
        *d = digits[((bits >> (4 * (23 - i))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
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

/// What the request log keeps of a request while it runs: its id (echoed in the response), its
/// route label, method and URI (for the line at the end), when it started, and its span.
pub struct RequestLog {
    id: HeaderValue,
    route: &'static str,
    method: http::Method,
    uri: http::Uri,
    started: Instant,
    span: tracing::Span,
}

impl RequestLog {
    /// Starts the log of `req`: the request id is set on the request (the API sees it too).
    pub fn begin(state: &crate::state::AppState, req: &mut Request) -> Self {
        let id = request_id(req);
        let route = crate::app::route_label(state, req);
        req.headers_mut().insert(REQUEST_ID.clone(), id.clone());
        let span = if tracing::enabled!(tracing::Level::INFO) {
            let trace_id = trace_id(req).unwrap_or_default();
            let shown = id.to_str().unwrap_or_default();
            tracing::info_span!("request", request_id = %shown, trace_id = %trace_id)
        } else {
            tracing::Span::none()
        };
        Self {
            id,
            route,
            method: req.method().clone(),
            // Cheap: the URI's bytes are shared with the request's, not copied.
            uri: req.uri().clone(),
            started: Instant::now(),
            span,
        }
    }

    /// The span to run the request in.
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Ends the log: metrics, one line (with the error cause, logged here only), and the id
    /// echoed in the response.
    pub fn finish(self, state: &crate::state::AppState, resp: &mut Response) {
        let status = resp.status().as_u16();
        let took = self.started.elapsed();
        state
            .metrics
            .request(self.route, &self.method, status, took);
        let method = &self.method;
        let path = self.uri.path();
        let micros = took.as_micros() as u64;
        let _g = self.span.enter();
        match resp.extensions().get::<LoggedCause>() {
            // The id is on the line itself too: at `log.level = "warn"` the (info) span is off.
            Some(cause) if status >= 500 => {
                let request_id = self.id.to_str().unwrap_or_default();
                tracing::warn!(request_id, %method, path = %path.escape_default(), status, micros, cause = %cause.0, "request failed")
            }
            Some(cause) => {
                tracing::info!(%method, path = %path.escape_default(), status, micros, cause = %cause.0, "request refused")
            }
            None => {
                tracing::info!(%method, path = %path.escape_default(), status, micros, "request")
            }
        }
        resp.headers_mut().insert(REQUEST_ID.clone(), self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_id(id: Option<&[u8]>) -> Request {
        let mut req = Request::new(axum::body::Body::empty());
        if let Some(id) = id {
            let v = HeaderValue::from_bytes(id).expect("value");
            req.headers_mut().insert(REQUEST_ID.clone(), v);
        }
        req
    }

    #[test]
    fn a_plain_caller_id_is_kept_others_are_replaced() {
        assert_eq!(request_id(&with_id(Some(b"abc-1.2:x_y"))), "abc-1.2:x_y");
        let made = [
            request_id(&with_id(None)),
            request_id(&with_id(Some(b"has space"))),
            request_id(&with_id(Some(b""))),
            request_id(&with_id(Some("x".repeat(129).as_bytes()))),
        ];
        for id in &made {
            let b = id.as_bytes();
            assert_eq!(b.len(), 24, "{id:?}");
            assert!(b
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)));
        }
        assert_ne!(made[0], made[1], "ids are random");
    }
}
