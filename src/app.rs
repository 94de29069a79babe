//! `App`: what the server calls for every request. API calls go straight to the proxy; the rest to
//! `app(state) -> Router`: tokengate's own endpoints, then everything else (API routes, the SPA)
//! through one fallback. No I/O here.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, HeaderValue, StatusCode};
use tower::ServiceExt;
use tower_cookies::CookieManagerLayer;
use tracing::Instrument;

use crate::auth::{backchannel, callback, login, logout, refresh, userinfo};
use crate::error::json_error;
use crate::proxy::forward;
use crate::session::cookie::CookieFields;
use crate::session::tokens::now_s;
use crate::state::AppState;
use crate::telemetry::RequestLog;

/// The whole app as the server calls it: API calls go straight to the proxy, through the same
/// edge ([`edge`]: log, metrics, header limit, no-store) as every other request but without the
/// router's matching, boxed middleware, extractors and cookie manager (the proxy adds the
/// `Set-Cookie`s it writes itself, see [`RequestCookies::standalone`]); everything else goes to
/// the router.
///
/// [`RequestCookies::standalone`]: crate::session::cookie::RequestCookies::standalone
#[derive(Clone)]
pub struct App {
    state: AppState,
    router: Router,
}

impl App {
    pub fn new(state: AppState) -> Self {
        Self {
            router: app(state.clone()),
            state,
        }
    }

    /// Answers one request from `peer`, whose `Cookie` fields are in `cookies` or in its map (see
    /// [`CookieFields`]).
    pub fn call(
        &self,
        mut req: Request,
        cookies: CookieFields,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Response> + Send>> {
        if is_api_call(&self.state, req.uri().path()) {
            let state = self.state.clone();
            return Box::pin(async move {
                let size = cookies.size();
                edge(&state, req, size, |req| {
                    // Boxed where the call starts: inline, the edge's future and the connection's
                    // would each hold the call's kilobyte-sized future and move it on (measured:
                    // 3.9 KB, built and moved level by level, ~20 KB of `memcpy` per call).
                    let state = state.clone();
                    Box::pin(async move { forward::api_call(&state, peer, req, cookies).await })
                })
                .await
            });
        }
        // The router and its cookie manager read cookies from the map only.
        cookies.into_map(req.headers_mut());
        req.extensions_mut().insert(ConnectInfo(peer));
        let answer = self.router.clone().oneshot(req);
        Box::pin(async move { answer.await.unwrap_or_else(|never| match never {}) })
    }
}

/// True when `path` is under an API route and is not one of tokengate's own endpoints (which
/// are exact paths, and win over a route whose prefix contains them, as in the router).
fn is_api_call(state: &AppState, path: &str) -> bool {
    state.upstreams.route_for(path).is_some()
        && path != state.config.oauth.redirect_path
        && !ENDPOINTS.contains(&path)
}

pub fn app(state: AppState) -> Router {
    let redirect_path = state.config.oauth.redirect_path.clone();
    let mut router = Router::new()
        .route("/login", get(login::login))
        .route(&redirect_path, get(callback::callback))
        .route("/refreshtoken", post(refresh::refresh))
        .route("/userinfo", get(userinfo::userinfo))
        .route("/logout", post(logout::logout))
        .route("/backchannel-logout", post(backchannel::backchannel_logout))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if state.config.server.metrics_listen.is_none() {
        router = router.route("/metrics", get(metrics));
    }
    router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(forward::fallback)
        // Layers run outside-in for requests: log + metrics (request id, one line), header size
        // limit and no-store on any cookie change (one layer: each layer costs every API call a
        // clone of the service and a boxed future) → cookie jar.
        .layer(CookieManagerLayer::new())
        .layer(middleware::from_fn_with_state(state.clone(), every_request))
        .with_state(state)
}

/// The router of the separate metrics listener (`server.metrics_listen`).
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// tokengate's own endpoints, as metric labels.
const ENDPOINTS: &[&str] = &[
    "/login",
    "/refreshtoken",
    "/userinfo",
    "/logout",
    "/backchannel-logout",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// The route label for logs and metrics: the matched endpoint, the API route's prefix, or
/// `static` — never the raw path (unbounded label values).
pub fn route_label(state: &AppState, req: &Request) -> &'static str {
    if let Some(m) = req.extensions().get::<MatchedPath>() {
        let m = m.as_str();
        if m == state.config.oauth.redirect_path {
            return "/oauth-callback";
        }
        return ENDPOINTS
            .iter()
            .find(|e| **e == m)
            .copied()
            .unwrap_or("other");
    }
    match state.upstreams.route_for(req.uri().path()) {
        Some(r) => state.upstreams.label(r),
        None => "static",
    }
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request",
        "method not allowed",
    )
}

/// The router's edge: see [`edge`].
async fn every_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    edge(&state, req, 0, |req| next.run(req)).await
}

/// Around every request: the request log and metrics; request headers beyond
/// `server.max_header_bytes` → 431 with a JSON body; and any response that sets or clears a
/// cookie must not be stored by a shared cache. `outside`: the size of the request's fields not
/// in its map.
async fn edge<F, Fut>(state: &AppState, mut req: Request, outside: usize, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let log = RequestLog::begin(state, &mut req);
    let size: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + outside;
    let mut resp = if size > state.config.server.max_header_bytes {
        json_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request",
            "request headers too large",
        )
    } else {
        inner(req).instrument(log.span()).await
    };
    if resp.headers().contains_key(header::SET_COOKIE) {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    log.finish(state, &mut resp);
    resp
}

async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Ready when the IdP metadata and its keys are loaded and the session store answers.
async fn readyz(State(state): State<AppState>) -> Response {
    let metadata = state.idp.metadata().is_some();
    let jwks = state.idp.jwks_loaded();
    let store = state.store.ping().await;
    // While draining after SIGTERM: still serving, but load balancers should stop sending.
    let draining = state.lifecycle.is_draining();
    let ready = metadata && jwks && store && !draining;
    let body = serde_json::json!({
        "status": if draining { "draining" } else if ready { "ready" } else { "not_ready" },
        "checks": {
            "idp_metadata": metadata,
            "idp_jwks": jwks,
            "session_store": store,
            "accepting_traffic": !draining,
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn metrics(State(state): State<AppState>) -> Response {
    state
        .metrics
        .set_pending_logins(state.logins.pending(now_s()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}
