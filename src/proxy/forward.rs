//! Forwarding one API call, in phases:
//! `request_filter` (CSRF, path, session, the route's token) → `upstream_request_filter` (URI, header
//! rules, bearer token) → send (timeout) → `response_filter` (hop-by-hop, our cookies).
//! Bodies stream both ways; nothing is buffered.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue};
use tower::ServiceExt;

use super::added::Added;
use super::headers;
use super::path::is_clean;
use super::upstream::{upstream_target, upstream_url, UpstreamBody, UpstreamError};
use crate::config::{RouteConfig, RouteToken};
use crate::error::ApiError;
use crate::session::cookie::{CookieFields, RequestCookies};
use crate::session::extract::{check_csrf, optional_session, require_session};
use crate::session::route_token::{client_token, user_token};
use crate::state::AppState;

/// Everything that is not one of tokengate's own endpoints: an API route, or the SPA.
pub async fn fallback(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cookies: RequestCookies,
    req: Request,
) -> Response {
    match proxied(&state, peer, &cookies, req, false).await {
        Ok(answer) => answer,
        Err(req) => static_files(&state, req).await,
    }
}

/// An API call straight from the server ([`crate::app::App`]): no router, and no cookie
/// manager — the cookies it writes (idle touch, refresh) are added to the answer here. Its
/// answer may carry the API's fields outside its map (see [`super::passthrough`]): the server
/// writes them. Its cookies are those in `fields`, or without any there, those in its map.
pub async fn api_call(
    state: &AppState,
    peer: SocketAddr,
    req: Request,
    fields: CookieFields,
) -> Response {
    let cookies = RequestCookies::standalone(req.headers(), fields);
    let mut answer = proxied(state, peer, &cookies, req, true)
        .await
        .unwrap_or_else(|_| ApiError::not_found().into_response());
    cookies.set_cookies(answer.headers_mut());
    answer
}

/// The answer to `req` when its path is refused or falls under an API route; otherwise the
/// request back (it is no API call). `pass`: the answer's fields no rule reads may stay out of
/// its map ([`super::passthrough`]).
async fn proxied(
    state: &AppState,
    peer: SocketAddr,
    cookies: &RequestCookies,
    req: Request,
    pass: bool,
) -> Result<Response, Request> {
    let path = req.uri().path();
    if !is_clean(path) {
        return Ok(ApiError::invalid_request("the request path is not allowed").into_response());
    }
    let Some(route) = state.upstreams.route_for(path) else {
        return Err(req);
    };
    // Boxed: the proxy's future is kilobytes; inline, every layer above would carry and move it
    // again.
    Ok(
        match Box::pin(proxy(state, route, peer, cookies, req, pass)).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
    )
}

async fn proxy(
    state: &AppState,
    route: &RouteConfig,
    peer: SocketAddr,
    cookies: &RequestCookies,
    req: Request,
    pass: bool,
) -> Result<Response, ApiError> {
    // request_filter
    // TRACE would echo the bearer token back to the caller; CONNECT is no API call.
    if matches!(req.method().as_str(), "TRACE" | "CONNECT") {
        return Err(ApiError::new(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "this method is not forwarded",
        ));
    }
    check_csrf(state, req.headers())?;
    let limit = state.config.server.max_body_bytes;
    if limit > 0 {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::new(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "the request body is too large",
            ));
        }
    }
    let token = match route.token {
        RouteToken::None => None,
        RouteToken::Client => Some(client_token(state, route).await?),
        RouteToken::User => {
            let mut session = require_session(state, cookies).await?;
            Some(user_token(state, cookies, &mut session, route).await?)
        }
        RouteToken::UserOrAnonymous => match optional_session(state, cookies).await? {
            Some(mut session) => match user_token(state, cookies, &mut session, route).await {
                Ok(t) => Some(t),
                // The session ended on the way: the call goes on as an anonymous one.
                Err(e) if e.status == http::StatusCode::UNAUTHORIZED => None,
                Err(e) => return Err(e),
            },
            None => None,
        },
    };

    // upstream_request_filter
    let (mut parts, body) = req.into_parts();
    let dpop = token.as_ref().and(state.idp.dpop());
    // A request without a body can be sent again if the API asks for a DPoP nonce.
    let replayable = dpop.is_some() && axum::body::HttpBody::is_end_stream(&body);
    // Without a declared length the limit is enforced while streaming.
    let body = if limit > 0 {
        Body::new(http_body_util::Limited::new(
            body,
            usize::try_from(limit).unwrap_or(usize::MAX),
        ))
    } else {
        body
    };
    let uri = upstream_target(route, std::mem::take(&mut parts.uri)).map_err(|e| {
        ApiError::invalid_request("the request URI cannot be forwarded").with_cause(e)
    })?;
    let h = &mut parts.headers;
    headers::strip_hop_by_hop(h);
    // The browser's `Host` stays in the map: the head gets the route's instead (`Upstreams::send`).
    let mut added = Added::with_capacity(160);
    headers::strip_our_cookies(h, cookies, state.store.rules(), &mut added);
    match &token {
        Some(t) => {
            let proof = dpop.and_then(|d| dpop_proof(d, &parts.method, route, &uri, t.secret()));
            headers::set_authorization(h, t.secret(), proof.as_deref(), &mut added);
        }
        None => headers::strip_credentials(h),
    }
    let cfg = &state.config.server;
    let trusted = cfg.trusted_proxies.iter().any(|c| c.contains(peer.ip()));
    headers::set_forwarded(h, peer.ip(), trusted, &state.proto_host, &mut added);
    if dpop.is_some() {
        // It may go again with a fresh proof (replacing the map's `DPoP`).
        added.insert_into(h);
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let again = replayable.then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let upstream_req = http::Request::from_parts(parts, body);

    // send
    // DPoP reads the answer's `DPoP-Nonce` and `WWW-Authenticate`: such answers keep every
    // field in their map.
    let pass = pass && dpop.is_none();
    let mut resp = send(state, route, upstream_req, &mut added, pass).await?;
    if let (Some(d), Some(t)) = (dpop, &token) {
        // RFC 9449 §9: a nonce the API hands out is used from the next proof on; a 401 asking
        // for one gets the (bodiless) request once more with it.
        let origin = route.upstream.origin().ascii_serialization();
        let fresh = d.remember_nonce(&origin, resp.headers());
        if fresh
            && resp.status() == http::StatusCode::UNAUTHORIZED
            && crate::idp::dpop::asks_for_nonce(resp.headers())
        {
            if let Some((method, uri, mut h)) = again {
                if let Some(p) = dpop_proof(d, &method, route, &uri, t.secret()) {
                    if let Ok(mut v) = HeaderValue::from_str(&p) {
                        v.set_sensitive(true);
                        h.insert(headers::DPOP, v);
                    }
                }
                let mut retry = http::Request::new(Body::empty());
                *retry.method_mut() = method;
                *retry.uri_mut() = uri;
                *retry.headers_mut() = h;
                resp = send(state, route, retry, &mut added, pass).await?;
                d.remember_nonce(&origin, resp.headers());
            }
        }
    }

    // response_filter
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_our_set_cookies(&mut parts.headers, state.store.rules());
    // An answer made for one user's token must not land in a shared cache unless the API says
    // otherwise.
    if !parts.headers.contains_key(header::CACHE_CONTROL) {
        parts
            .headers
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// A DPoP proof for a request to `target` of `route` carrying `token`, with the API's latest
/// nonce.
fn dpop_proof(
    d: &crate::idp::dpop::Dpop,
    method: &http::Method,
    route: &RouteConfig,
    target: &http::Uri,
    token: &str,
) -> Option<String> {
    let url = url::Url::parse(&upstream_url(route, target)).ok()?;
    let origin = url.origin().ascii_serialization();
    Some(d.proof(method.as_str(), &url, Some(token), &origin))
}

/// Sends one request upstream within the route's timeout, with the `added` fields (`pass`: see
/// [`proxied`]).
async fn send(
    state: &AppState,
    route: &RouteConfig,
    upstream_req: http::Request<Body>,
    added: &mut Added,
    pass: bool,
) -> Result<http::Response<UpstreamBody>, ApiError> {
    let due = tokio::time::Instant::now() + route.timeout;
    match state
        .upstreams
        .send(route, upstream_req, added, due, pass)
        .await
    {
        Ok(r) => Ok(r),
        Err(UpstreamError::TimedOut) => {
            state.metrics.upstream_error(&route.prefix, "timeout");
            Err(ApiError::gateway_timeout("the API did not answer in time"))
        }
        Err(e) => {
            // The browser's body outgrew server.max_body_bytes while streaming: its fault.
            if caused_by::<http_body_util::LengthLimitError>(&e) {
                return Err(ApiError::new(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    "the request body is too large",
                ));
            }
            state.metrics.upstream_error(&route.prefix, "error");
            Err(ApiError::bad_gateway("the API could not be reached").with_cause(e))
        }
    }
}

/// Whether `T` is anywhere in `e`'s source chain.
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The SPA: files from `server.static_dir`; unknown paths of HTML navigations get `index.html`
/// (client-side routing) when `server.spa_fallback` is on.
async fn static_files(state: &AppState, req: Request) -> Response {
    let Some(dir) = state.config.server.static_dir.clone() else {
        return ApiError::not_found().into_response();
    };
    let wants_html = req.method() == http::Method::GET
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
    let serve = tower_http::services::ServeDir::new(&dir).append_index_html_on_directories(true);
    let resp = match serve.oneshot(req).await {
        Ok(r) => r.map(Body::new),
        Err(never) => match never {},
    };
    let resp = if resp.status() == http::StatusCode::NOT_FOUND {
        if state.config.server.spa_fallback && wants_html {
            let index = std::path::Path::new(&dir).join("index.html");
            match tokio::fs::read(&index).await {
                Ok(bytes) => {
                    let mut r = Response::new(Body::from(bytes));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    );
                    r
                }
                Err(_) => ApiError::not_found().into_response(),
            }
        } else {
            ApiError::not_found().into_response()
        }
    } else {
        resp
    };
    with_static_security_headers(resp)
}

fn with_static_security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    resp
}
