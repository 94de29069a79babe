//! The upstream APIs: each route's target (where to connect, its `Host`), HTTP/1.1 keep-alive
//! connections pooled per thread and route, and the joining of a route's upstream URL with the
//! request path.
//!
//! The pool is ours rather than hyper-util's general client: a proxied call then costs one `Vec`
//! pop and push under an uncontended lock, with no pool key to hash, no `Host` to format, and no
//! task spawned per request to wait for the connection to come back (a connection returns to the
//! pool when its response body has been read to the end).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{header, HeaderValue, Uri};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use super::path::under_prefix;
use crate::config::RouteConfig;

pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Idle connections kept per thread and route; more are closed when their answer is done.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is not used again (APIs commonly close theirs after
/// 60–75 s: reusing one then would race their close).
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);

/// The routes, where each one's API is, and a pool per thread: with a runtime per core (the
/// binary), every upstream connection is driven on the thread whose requests use it, so a
/// proxied call never wakes another thread.
pub struct Upstreams {
    pub routes: Vec<RouteConfig>,
    targets: Vec<Target>,
    connector: HttpsConnector,
    /// This thread's pool of each route (same index as `routes`).
    pools: thread_local::ThreadLocal<Vec<Pool>>,
}

/// One route's API, prepared at start-up.
struct Target {
    /// `scheme://host[:port]`: what the connector dials.
    origin: Uri,
    /// `host[:port]` (the port only when not the scheme's default).
    host: HeaderValue,
    /// The route's prefix as a `'static` metric label.
    label: &'static str,
}

type Pool = Arc<Mutex<Vec<Idle>>>;

struct Idle {
    conn: SendRequest<Body>,
    since: Instant,
}

/// Why a request did not get an answer from the API.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the API failed")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("the route has no upstream")]
    NoRoute,
}

fn connector() -> anyhow::Result<HttpsConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

impl Upstreams {
    pub fn new(routes: &[RouteConfig]) -> anyhow::Result<Self> {
        let targets = routes
            .iter()
            .map(|r| {
                let host = authority(&r.upstream);
                Ok(Target {
                    origin: format!("{}://{host}", r.upstream.scheme()).parse()?,
                    host: HeaderValue::from_str(&host)?,
                    label: Box::leak(r.prefix.clone().into_boxed_str()),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            routes: routes.to_vec(),
            targets,
            // Built once here so that a TLS set-up problem stops start-up, not the first request.
            connector: connector()?,
            pools: thread_local::ThreadLocal::new(),
        })
    }

    fn index(&self, route: &RouteConfig) -> Option<usize> {
        self.routes.iter().position(|r| std::ptr::eq(r, route))
    }

    /// The metric label of `route` (one of `self.routes`).
    pub fn label(&self, route: &RouteConfig) -> &'static str {
        self.index(route)
            .and_then(|i| self.targets.get(i))
            .map_or("other", |t| t.label)
    }

    /// The route whose prefix `path` falls under (routes are sorted longest prefix first).
    pub fn route_for(&self, path: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| under_prefix(path, &r.prefix))
    }

    /// Sends `req` (origin-form URI, see [`origin_form`]) to `route`'s API on a pooled
    /// connection, or a new one. A pooled connection that turns out closed before the request
    /// went out is set aside and the request goes on another; once sent, a request is never
    /// sent again.
    pub async fn send(
        &self,
        route: &RouteConfig,
        mut req: http::Request<Body>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let i = self.index(route).ok_or(UpstreamError::NoRoute)?;
        let target = self.targets.get(i).ok_or(UpstreamError::NoRoute)?;
        let pool = self
            .pools
            .get_or(|| (0..self.routes.len()).map(|_| Pool::default()).collect())
            .get(i)
            .ok_or(UpstreamError::NoRoute)?;
        req.headers_mut().insert(header::HOST, target.host.clone());
        loop {
            let (mut conn, reused) = match take(pool) {
                Some(c) => (c, true),
                // Boxed: connecting (TCP, maybe TLS) makes a large future, and it is rare; inline,
                // every call's future would carry (and move) it.
                None => (Box::pin(self.connect(target)).await?, false),
            };
            if let Err(e) = conn.ready().await {
                if reused {
                    continue;
                }
                return Err(e.into());
            }
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|body| UpstreamBody::new(body, conn, pool))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// A new connection to `target`, driven by a task on this thread's runtime.
    async fn connect(&self, target: &Target) -> Result<SendRequest<Body>, UpstreamError> {
        let io = self
            .connector
            .clone()
            .oneshot(target.origin.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        let (conn, driver) = http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(conn)
    }
}

/// The newest idle connection of `pool` that is still open and young enough.
fn take(pool: &Pool) -> Option<SendRequest<Body>> {
    let mut idle = pool.lock().ok()?;
    let now = Instant::now();
    while let Some(i) = idle.pop() {
        if !i.conn.is_closed() && now.saturating_duration_since(i.since) < IDLE_TIMEOUT {
            return Some(i.conn);
        }
    }
    None
}

/// Back into `pool` once its answer has been read; the oldest idle one goes when it is stale.
fn put_back(pool: &Pool, conn: SendRequest<Body>) {
    if conn.is_closed() {
        return;
    }
    let Ok(mut idle) = pool.lock() else { return };
    let now = Instant::now();
    if idle.first().is_some_and(|o| {
        o.conn.is_closed() || now.saturating_duration_since(o.since) >= IDLE_TIMEOUT
    }) {
        idle.remove(0);
    }
    if idle.len() < MAX_IDLE {
        idle.push(Idle { conn, since: now });
    }
}

/// An API's response body, streamed as it comes; when it has been read to the end, its
/// connection goes back to the pool. Dropped before the end, the connection is closed.
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<(SendRequest<Body>, Pool)>,
}

impl UpstreamBody {
    fn new(inner: Incoming, conn: SendRequest<Body>, pool: &Pool) -> Self {
        let mut body = Self {
            inner,
            back: Some((conn, pool.clone())),
        };
        if hyper::body::Body::is_end_stream(&body.inner) {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some((conn, pool)) = self.back.take() {
            put_back(&pool, conn);
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            // A broken answer: its connection is not used again.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request target sent upstream (origin-form): the upstream URL's path + (the request path,
/// minus the prefix when `strip_prefix`) + query.
pub fn origin_form(
    route: &RouteConfig,
    path: &str,
    query: Option<&str>,
) -> Result<Uri, http::Error> {
    let rest = if route.strip_prefix {
        &path[route.prefix.len().min(path.len())..]
    } else {
        path
    };
    let base = route.upstream.path().trim_end_matches('/');
    let mut target =
        String::with_capacity(base.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1);
    target.push_str(base);
    target.push_str(rest);
    if target.is_empty() {
        target.push('/');
    }
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    Ok(Uri::try_from(target)?)
}

/// The full URL of a request target of `route` (what a DPoP proof names).
pub fn upstream_url(route: &RouteConfig, target: &Uri) -> String {
    let path = target.path_and_query().map_or("/", |p| p.as_str());
    format!(
        "{}://{}{path}",
        route.upstream.scheme(),
        authority(&route.upstream)
    )
}

fn authority(u: &url::Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(upstream: &str, strip: bool) -> RouteConfig {
        RouteConfig {
            prefix: "/api".into(),
            upstream: url::Url::parse(upstream).expect("url"),
            strip_prefix: strip,
            resources: vec![],
            scopes: vec![],
            token: crate::config::RouteToken::User,
            exchange: None,
            timeout: Duration::from_secs(1),
        }
    }

    fn joined(r: &RouteConfig, path: &str, query: Option<&str>) -> (String, String) {
        let target = origin_form(r, path, query).expect("target");
        (target.to_string(), upstream_url(r, &target))
    }

    #[test]
    fn joins() {
        let r = route("http://127.0.0.1:3000", false);
        assert_eq!(
            joined(&r, "/api/x", Some("a=1")),
            (
                "/api/x?a=1".into(),
                "http://127.0.0.1:3000/api/x?a=1".into()
            )
        );
        let s = route("http://up:3000/base/", true);
        assert_eq!(
            joined(&s, "/api/x", None),
            ("/base/x".into(), "http://up:3000/base/x".into())
        );
        assert_eq!(
            joined(&s, "/api", None),
            ("/base".into(), "http://up:3000/base".into())
        );
        let root = route("http://up:3000", true);
        assert_eq!(
            joined(&root, "/api", None),
            ("/".into(), "http://up:3000/".into())
        );
        let tls = route("https://api.example.com:443/v1", true);
        assert_eq!(
            joined(&tls, "/api/me", None),
            ("/v1/me".into(), "https://api.example.com/v1/me".into())
        );
    }

    #[test]
    fn the_host_header_names_the_port_only_when_not_the_default() {
        let u = Upstreams::new(&[
            route("http://up:3000/x", false),
            route("https://api.example.com:443", false),
            route("http://[::1]:8080", false),
        ])
        .expect("upstreams");
        let hosts: Vec<_> = u.targets.iter().map(|t| t.host.clone()).collect();
        assert_eq!(hosts, ["up:3000", "api.example.com", "[::1]:8080"]);
        assert_eq!(u.targets[1].origin, "https://api.example.com");
        assert_eq!(u.label(&u.routes[2]), "/api");
    }
}
