//! The upstream APIs: each route's target (where to connect, its `Host`), HTTP/1.1 keep-alive
//! connections pooled per thread and route, and the joining of a route's upstream URL with the
//! request path.
//!
//! The pool is ours rather than hyper-util's general client: a proxied call then costs one `Vec`
//! pop and push under an uncontended lock, with no pool key to hash, no `Host` to format, and no
//! task spawned per request to wait for the connection to come back (a connection returns to the
//! pool when its response body has been read to the end). A call without a body (nearly all)
//! goes on our own HTTP/1.1 connection ([`h1`]), read and written by the request's own task; a
//! call with a body on hyper's client connection.
//!
//! Calls without a body share at most [`CONNS_PER_THREAD`] connections per thread and route
//! while the API keeps up: a call that finds them all busy waits for one to come back (they are
//! handed over in turn), for at most [`PATIENCE`]; then it opens one more. Under a burst, a
//! proxy that opens a connection for every call in flight spreads the API's work over hundreds
//! of connections (with 256 browser connections: ~224 upstream, where nginx keeps ~47), and both
//! sides spend more per call; a slow API, or a call that holds its connection long (a stream, a
//! long poll), still gets as many as it needs, each new one after that short wait.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;

use super::added::Added;
use http::{header, HeaderValue, Uri};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

use super::path::under_prefix;
use crate::config::RouteConfig;

mod h1;

pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;
type MaybeHttps = hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// Idle connections kept per thread and route; more are closed when their answer is done.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is not used again (APIs commonly close theirs after
/// 60–75 s: reusing one then would race their close).
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// Connections of a route that calls without a body share on one thread before a call waits for
/// one of them to come back (see the module's documentation).
const CONNS_PER_THREAD: usize = 32;
/// How long a call waits for a busy connection to come back before it opens one more.
const PATIENCE: Duration = Duration::from_millis(20);

/// The routes, where each one's API is, and a pool per thread: with a runtime per core (the
/// binary), every upstream connection is driven on the thread whose requests use it, so a
/// proxied call never wakes another thread.
pub struct Upstreams {
    pub routes: Vec<RouteConfig>,
    targets: Vec<Target>,
    connector: HttpsConnector,
    /// This thread's pool of each route (same index as `routes`).
    pools: thread_local::ThreadLocal<Vec<Pool>>,
    /// [`CONNS_PER_THREAD`] and [`PATIENCE`] (other values in tests).
    share: usize,
    patience: Duration,
}

/// One route's API, prepared at start-up.
struct Target {
    /// `scheme://host[:port]`: what the connector dials.
    origin: Uri,
    /// `host[:port]` (the port only when not the scheme's default).
    host: HeaderValue,
    /// The route's prefix as a `'static` metric label.
    label: &'static str,
    /// Calls that waited for one of the route's shared connections.
    waits: crate::metrics::UpstreamWaits,
}

/// One route's idle connections on one thread: ours (calls without a body) and hyper's.
#[derive(Default)]
struct Idles {
    own: Mutex<Own>,
    hyper: Mutex<Vec<Idle<SendRequest<Body>>>>,
}

/// One route's connections for calls without a body, on one thread.
#[derive(Default)]
struct Own {
    idle: Vec<Idle<h1::Conn>>,
    /// Connections out on a call, or being opened for one.
    busy: usize,
    /// Calls waiting for a busy connection, first come first served: each gets a connection
    /// that came back, or (`None`) the place of one that was closed, to open a new one.
    waiting: VecDeque<tokio::sync::oneshot::Sender<Option<h1::Conn>>>,
}

/// What a call without a body goes on.
enum Checkout {
    Idle(h1::Conn),
    /// A new connection, within the share.
    Dial,
    /// The share is busy: wait for one of them.
    Wait(tokio::sync::oneshot::Receiver<Option<h1::Conn>>),
}

impl Idles {
    // Nothing panics while these locks are held; a poisoned one holds consistent data.
    fn own(&self) -> MutexGuard<'_, Own> {
        self.own.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hyper(&self) -> MutexGuard<'_, Vec<Idle<SendRequest<Body>>>> {
        self.hyper.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkout(&self, share: usize) -> Checkout {
        let mut own = self.own();
        if let Some(conn) = take(&mut own.idle) {
            own.busy += 1;
            return Checkout::Idle(conn);
        }
        if own.busy < share {
            own.busy += 1;
            return Checkout::Dial;
        }
        while own.waiting.front().is_some_and(|w| w.is_closed()) {
            own.waiting.pop_front();
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        own.waiting.push_back(tx);
        Checkout::Wait(rx)
    }

    /// One more connection out, beyond the share (a waiting call ran out of patience).
    fn grow(&self) {
        self.own().busy += 1;
    }

    /// A busy connection that can carry another call: to the first waiting call, else idle.
    fn check_in(&self, mut conn: h1::Conn) {
        let mut own = self.own();
        while let Some(w) = own.waiting.pop_front() {
            // Refused only by a call that stopped waiting: it is given back.
            let Err(Some(back)) = w.send(Some(conn)) else {
                return;
            };
            conn = back;
        }
        own.busy = own.busy.saturating_sub(1);
        put_back(&mut own.idle, conn);
    }

    /// A busy connection closed: its place goes to the first waiting call.
    fn lost(&self) {
        let mut own = self.own();
        while let Some(w) = own.waiting.pop_front() {
            if w.send(None).is_ok() {
                return;
            }
        }
        own.busy = own.busy.saturating_sub(1);
    }
}

/// A call waiting for a busy connection. Dropped (the call was cancelled) after a connection or
/// a place was handed to it, it passes them on.
struct Waiting<'a> {
    rx: tokio::sync::oneshot::Receiver<Option<h1::Conn>>,
    pool: &'a Pool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Some(conn)) => self.pool.check_in(conn),
            Ok(None) => self.pool.lost(),
            Err(_) => {}
        }
    }
}

/// A call's place among its route's busy connections: given back with the connection
/// ([`Lease::check_in`]), or, dropped, counted as a connection closed.
struct Lease(Option<Pool>);

impl Lease {
    fn check_in(mut self, conn: h1::Conn) {
        if let Some(pool) = self.0.take() {
            pool.check_in(conn);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.lost();
        }
    }
}

type Pool = Arc<Idles>;

struct Idle<C> {
    conn: C,
    since: Instant,
}

/// What the pool needs to know of a connection.
trait Link {
    /// Still open, and nothing unasked-for arrived on it.
    fn usable(&mut self) -> bool;
}

impl Link for SendRequest<Body> {
    fn usable(&mut self) -> bool {
        !self.is_closed()
    }
}

impl Link for h1::Conn {
    fn usable(&mut self) -> bool {
        self.is_usable()
    }
}

/// Why a request did not get an answer from the API.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the API failed")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Wire(#[from] h1::Error),
    #[error("the route has no upstream")]
    NoRoute,
    #[error("the API did not answer within the route's timeout")]
    TimedOut,
}

fn connector() -> anyhow::Result<HttpsConnector> {
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp_connector()))
}

fn tcp_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http
}

impl Upstreams {
    pub fn new(routes: &[RouteConfig]) -> anyhow::Result<Self> {
        // Built once here so that a TLS set-up problem stops start-up, not the first request.
        Self::with_connector(routes, connector()?)
    }

    fn with_connector(routes: &[RouteConfig], connector: HttpsConnector) -> anyhow::Result<Self> {
        let targets = routes
            .iter()
            .map(|r| {
                let host = authority(&r.upstream);
                Ok(Target {
                    origin: format!("{}://{host}", r.upstream.scheme()).parse()?,
                    host: HeaderValue::from_str(&host)?,
                    label: Box::leak(r.prefix.clone().into_boxed_str()),
                    waits: crate::metrics::UpstreamWaits::default(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            routes: routes.to_vec(),
            targets,
            connector,
            pools: thread_local::ThreadLocal::new(),
            share: CONNS_PER_THREAD,
            patience: PATIENCE,
        })
    }

    /// Counts, in `metrics`, the calls of each route that wait for a shared connection.
    pub fn count_waits(mut self, metrics: &crate::metrics::Metrics) -> Self {
        for t in &mut self.targets {
            t.waits = metrics.upstream_waits(t.label);
        }
        self
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
    /// connection, or a new one, and waits for the head of the answer until `due` (then
    /// [`UpstreamError::TimedOut`]). A pooled connection that turns out closed before the request
    /// went out is set aside and the request goes on another; once sent, a request is never
    /// sent again. `pass`: the answer may carry the fields tokengate does not inspect outside its
    /// map (calls without a body; see [`super::passthrough`]).
    pub async fn send(
        &self,
        route: &RouteConfig,
        mut req: http::Request<Body>,
        added: &mut Added,
        due: tokio::time::Instant,
        pass: bool,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let i = self.index(route).ok_or(UpstreamError::NoRoute)?;
        let target = self.targets.get(i).ok_or(UpstreamError::NoRoute)?;
        let pool = self
            .pools
            .get_or(|| (0..self.routes.len()).map(|_| Pool::default()).collect())
            .get(i)
            .ok_or(UpstreamError::NoRoute)?;
        if bodiless(&req) {
            let (parts, _) = req.into_parts();
            let head = h1::encode_head(
                &parts.method,
                &parts.uri,
                &target.host,
                &parts.headers,
                added.lines(),
            );
            crate::spare::give_back_map(parts.headers);
            return self
                .send_own(target, pool, &head, parts.method, due, pass)
                .await;
        }
        req.headers_mut().insert(header::HOST, target.host.clone());
        added.insert_into(req.headers_mut());
        // Boxed: a call with a body is the rare one; inline, hyper's futures would make every
        // call's future larger.
        tokio::time::timeout_at(due, Box::pin(self.send_hyper(target, pool, req)))
            .await
            .unwrap_or(Err(UpstreamError::TimedOut))
    }

    /// A call with a body (or anything else not bodiless), on a hyper client connection.
    async fn send_hyper(
        &self,
        target: &Target,
        pool: &Pool,
        mut req: http::Request<Body>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        loop {
            let idle = take(&mut pool.hyper());
            let (mut conn, reused) = match idle {
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
                Ok(resp) => return Ok(resp.map(|body| UpstreamBody::hyper(body, conn, pool))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// A call without a body, on our own connection. On a pooled connection that turns out
    /// closed, the request goes again on another only when it did not go out whole, or when it
    /// is safe (GET, HEAD, OPTIONS) and the API closed without answering a byte: the race of a
    /// keep-alive connection closed by the API just as the request went (RFC 9112 §9.3.1).
    async fn send_own(
        &self,
        target: &Target,
        pool: &Pool,
        head: &[u8],
        method: http::Method,
        due: tokio::time::Instant,
        pass: bool,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let (mut next, lease) = self.lease(target, pool, due).await?;
        loop {
            let (mut conn, reused) = match next.take() {
                Some(c) => (c, true),
                None => {
                    let dialed = tokio::time::timeout_at(due, Box::pin(self.dial(target)))
                        .await
                        .map_err(|_| UpstreamError::TimedOut)??;
                    (h1::Conn::new(dialed), false)
                }
            };
            match conn.exchange(head, &method, due, pass).await {
                Ok((resp, framing, keep)) => {
                    let answer = h1::Answer::new(conn, framing, keep);
                    return Ok(resp.map(|()| UpstreamBody::own(answer, lease)));
                }
                Err(f) if f.retry && reused => next = take(&mut pool.own().idle),
                Err(h1::Failed {
                    error: h1::Error::TimedOut,
                    ..
                }) => return Err(UpstreamError::TimedOut),
                Err(f) => return Err(f.error.into()),
            }
        }
    }

    /// A place among `pool`'s busy connections, with an idle connection to go on (`None`: open
    /// one). Waits, when the share is busy, for at most the patience, and never past `due`.
    async fn lease(
        &self,
        target: &Target,
        pool: &Pool,
        due: tokio::time::Instant,
    ) -> Result<(Option<h1::Conn>, Lease), UpstreamError> {
        let lease = || Lease(Some(pool.clone()));
        let rx = match pool.checkout(self.share) {
            Checkout::Idle(conn) => return Ok((Some(conn), lease())),
            Checkout::Dial => return Ok((None, lease())),
            Checkout::Wait(rx) => rx,
        };
        let mut waiting = Waiting { rx, pool };
        let until = due.min(tokio::time::Instant::now() + self.patience);
        let handed = match tokio::time::timeout_at(until, &mut waiting.rx).await {
            Ok(Ok(handed)) => Some(handed),
            // Handed over just as the patience ran out: taken all the same.
            _ => {
                waiting.rx.close();
                waiting.rx.try_recv().ok()
            }
        };
        if let Some(handed) = handed {
            target.waits.handed.inc();
            return Ok((handed, lease()));
        }
        if tokio::time::Instant::now() >= due {
            target.waits.timeout.inc();
            return Err(UpstreamError::TimedOut);
        }
        target.waits.opened.inc();
        pool.grow();
        Ok((None, lease()))
    }

    /// A new TCP (and maybe TLS) connection to `target`.
    async fn dial(&self, target: &Target) -> Result<MaybeHttps, UpstreamError> {
        self.connector
            .clone()
            .oneshot(target.origin.clone())
            .await
            .map_err(UpstreamError::Connect)
    }

    /// A new connection to `target`, driven by a task on this thread's runtime.
    async fn connect(&self, target: &Target) -> Result<SendRequest<Body>, UpstreamError> {
        let io = self.dial(target).await?;
        let (conn, driver) = http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(conn)
    }
}

/// Whether `req` has no body: it can go on our own connection ([`h1`]).
fn bodiless(req: &http::Request<Body>) -> bool {
    hyper::body::Body::is_end_stream(req.body())
        && !req.headers().contains_key(header::TRANSFER_ENCODING)
        && req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// The newest idle connection of `idle` that is still usable and young enough.
fn take<C: Link>(idle: &mut Vec<Idle<C>>) -> Option<C> {
    let now = Instant::now();
    while let Some(mut i) = idle.pop() {
        if now.saturating_duration_since(i.since) < IDLE_TIMEOUT && i.conn.usable() {
            return Some(i.conn);
        }
    }
    None
}

/// Back into `idle` once its answer has been read; the oldest idle one goes when it is stale.
fn put_back<C>(idle: &mut Vec<Idle<C>>, conn: C) {
    let now = Instant::now();
    if idle
        .first()
        .is_some_and(|o| now.saturating_duration_since(o.since) >= IDLE_TIMEOUT)
    {
        idle.remove(0);
    }
    if idle.len() < MAX_IDLE {
        idle.push(Idle { conn, since: now });
    }
}

/// An API's response body, streamed as it comes; when it has been read to the end, its
/// connection goes back to the pool. Dropped before the end, the connection is closed.
pub struct UpstreamBody(Answer);

enum Answer {
    Hyper {
        inner: Incoming,
        back: Option<(SendRequest<Body>, Pool)>,
    },
    Own {
        answer: h1::Answer,
        lease: Option<Lease>,
    },
}

impl UpstreamBody {
    fn hyper(inner: Incoming, conn: SendRequest<Body>, pool: &Pool) -> Self {
        let mut body = Self(Answer::Hyper {
            inner,
            back: Some((conn, pool.clone())),
        });
        body.release();
        body
    }

    fn own(answer: h1::Answer, lease: Lease) -> Self {
        let mut body = Self(Answer::Own {
            answer,
            lease: Some(lease),
        });
        body.release();
        body
    }

    /// Gives the connection back once the body is complete.
    fn release(&mut self) {
        match &mut self.0 {
            Answer::Hyper { inner, back } => {
                if hyper::body::Body::is_end_stream(inner) {
                    if let Some((conn, pool)) = back.take() {
                        if !conn.is_closed() {
                            put_back(&mut pool.hyper(), conn);
                        }
                    }
                }
            }
            Answer::Own { answer, lease } => {
                // A body that has not ended keeps its lease: dropped, it counts as closed.
                if answer.is_end_stream() {
                    if let Some(lease) = lease.take() {
                        match answer.take_idle() {
                            Some(conn) => lease.check_in(conn),
                            None => drop(lease),
                        }
                    }
                }
            }
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let polled = match &mut self.0 {
            Answer::Hyper { inner, back } => {
                let polled = Pin::new(inner).poll_frame(cx);
                // A broken answer: its connection is not used again.
                if let Poll::Ready(Some(Err(_))) = &polled {
                    *back = None;
                }
                polled.map_err(UpstreamError::from)
            }
            Answer::Own { answer, .. } => answer.poll_frame(cx).map_err(UpstreamError::from),
        };
        if polled.is_ready() {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Answer::Hyper { inner, .. } => inner.is_end_stream(),
            Answer::Own { answer, .. } => answer.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Answer::Hyper { inner, .. } => inner.size_hint(),
            Answer::Own { answer, .. } => answer.size_hint(),
        }
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

/// The request target sent upstream for a request to `uri` ([`origin_form`]): `uri` itself when
/// that is already it (origin-form, and a route that neither strips its prefix nor has a base
/// path: the usual API route), which spares building and checking the same bytes again.
pub fn upstream_target(route: &RouteConfig, uri: Uri) -> Result<Uri, http::Error> {
    let unchanged = !route.strip_prefix
        && route.upstream.path().trim_end_matches('/').is_empty()
        && uri.scheme().is_none()
        && uri.authority().is_none()
        && uri.path().starts_with('/');
    if unchanged {
        return Ok(uri);
    }
    origin_form(route, uri.path(), uri.query())
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

    /// The target kept as it came is the one [`origin_form`] builds, for every kind of route
    /// and request target; an absolute-form target is always rebuilt.
    #[test]
    fn a_target_kept_as_it_came_is_the_one_built() {
        let routes = [
            route("http://127.0.0.1:3000", false),
            route("http://127.0.0.1:3000/", false),
            route("http://127.0.0.1:3000", true),
            route("http://up:3000/base/", false),
            route("http://up:3000/base", true),
        ];
        let targets = [
            "/api",
            "/api/",
            "/api/x",
            "/api/x?",
            "/api/x?a=1&b=%20",
            "/api/a%2Fb/c?q",
            "http://elsewhere:9/api/x?a=1",
        ];
        for r in &routes {
            for t in targets {
                let uri: Uri = t.parse().expect("uri");
                assert!(under_prefix(uri.path(), &r.prefix), "{t}");
                let built = origin_form(r, uri.path(), uri.query()).expect("built");
                let kept = upstream_target(r, uri.clone()).expect("kept");
                assert_eq!(kept.to_string(), built.to_string(), "{} {t}", r.upstream);
                assert!(kept.scheme().is_none() && kept.authority().is_none(), "{t}");
            }
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

    /// How the scripted API of [`scripted`] treats its n-th request (over all connections).
    #[derive(Clone, Copy)]
    enum Script {
        /// Writes this and waits for the next request on the connection.
        Reply(&'static str),
        /// Writes this and closes the connection.
        ReplyThenClose(&'static str),
        /// Closes the connection without a byte.
        Close,
        /// Keeps the connection open and answers nothing.
        Silent,
    }

    /// An API on 127.0.0.1 following `script`; the requests it read, each with the number of
    /// the connection it came on.
    async fn scripted(
        script: Vec<Script>,
    ) -> (String, std::sync::Arc<Mutex<Vec<(usize, String)>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let script = std::sync::Arc::new(script);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            let mut conns = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                conns += 1;
                let (id, log, script, next) = (conns, log.clone(), script.clone(), next.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("end") + 4;
                        let head: Vec<u8> = buf.drain(..end).collect();
                        log.lock()
                            .expect("log")
                            .push((id, String::from_utf8_lossy(&head).into_owned()));
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        match script.get(n).copied().unwrap_or(Script::Close) {
                            Script::Reply(r) => {
                                if s.write_all(r.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            Script::ReplyThenClose(r) => {
                                let _ = s.write_all(r.as_bytes()).await;
                                return;
                            }
                            Script::Close => return,
                            Script::Silent => std::future::pending::<()>().await,
                        }
                    }
                });
            }
        });
        (url, seen)
    }

    async fn call(u: &Upstreams, method: &str, path: &str) -> Result<(u16, String), UpstreamError> {
        call_within(u, method, path, Duration::from_secs(30)).await
    }

    async fn call_within(
        u: &Upstreams,
        method: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, String), UpstreamError> {
        use http_body_util::BodyExt;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("x-call", path)
            .body(Body::empty())
            .expect("request");
        let due = tokio::time::Instant::now() + timeout;
        let resp = u
            .send(&u.routes[0], req, &mut Added::default(), due, false)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    fn conns(seen: &Mutex<Vec<(usize, String)>>) -> Vec<usize> {
        seen.lock().expect("seen").iter().map(|(c, _)| *c).collect()
    }

    fn heads(seen: &Mutex<Vec<(usize, String)>>) -> Vec<String> {
        seen.lock()
            .expect("seen")
            .iter()
            .map(|(_, h)| h.clone())
            .collect()
    }

    #[tokio::test]
    async fn calls_without_a_body_reuse_a_connection_only_after_a_cleanly_framed_answer() {
        let (url, seen) = scripted(vec![
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            Script::Reply("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n"),
            // Bytes after the framed body: that connection is not used again.
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"),
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nfresh"),
            Script::Reply("HTTP/1.1 204 No Content\r\n\r\n"),
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"),
            Script::ReplyThenClose("HTTP/1.1 200 OK\r\n\r\nuntil the end"),
        ])
        .await;
        let u = Upstreams::new(&[route(&url, false)]).expect("upstreams");
        assert_eq!(call(&u, "GET", "/a").await.expect("a"), (200, "ok".into()));
        assert_eq!(
            call(&u, "GET", "/b").await.expect("b"),
            (200, "abcde".into())
        );
        assert_eq!(call(&u, "GET", "/c").await.expect("c"), (200, "ok".into()));
        assert_eq!(
            call(&u, "GET", "/d").await.expect("d"),
            (200, "fresh".into())
        );
        assert_eq!(
            call(&u, "DELETE", "/e").await.expect("e"),
            (204, String::new())
        );
        assert_eq!(
            call(&u, "HEAD", "/f").await.expect("f"),
            (200, String::new())
        );
        assert_eq!(
            call(&u, "GET", "/g").await.expect("g"),
            (200, "until the end".into())
        );
        // a, b and c on the first connection; d on a new one (c's was spoiled); e, f on a new
        // one (d's said close); g on it too (HEAD's answer has no body).
        assert_eq!(conns(&seen), [1, 1, 1, 2, 3, 3, 3]);
        let heads = heads(&seen);
        assert!(heads[0].starts_with("GET /a HTTP/1.1\r\n"), "{}", heads[0]);
        assert!(heads[0].contains("\r\nhost: 127.0.0.1:"), "{}", heads[0]);
        assert!(!heads[4].contains("content-length"), "{}", heads[4]);
    }

    /// The route timeout's timer lives with the connection and is moved only when it goes off
    /// early: a call on a connection idle for longer than the timeout still gets its full time,
    /// and a call the API leaves unanswered still ends at its timeout.
    #[tokio::test]
    async fn the_route_timeout_holds_on_a_kept_connection_and_only_then() {
        let (url, seen) = scripted(vec![
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"),
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2"),
            Script::Silent,
        ])
        .await;
        let u = Upstreams::new(&[route(&url, false)]).expect("upstreams");
        let timeout = Duration::from_millis(300);
        let a = call_within(&u, "GET", "/a", timeout).await.expect("a");
        assert_eq!(a, (200, "1".into()));
        // Idle past the timeout: the connection's timer goes off meanwhile.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let b = call_within(&u, "GET", "/b", timeout).await.expect("b");
        assert_eq!(b, (200, "2".into()));
        let c = call_within(&u, "GET", "/c", timeout).await;
        assert!(matches!(c, Err(UpstreamError::TimedOut)), "{c:?}");
        assert_eq!(conns(&seen), [1, 1, 1]);
    }

    #[tokio::test]
    async fn a_safe_call_goes_again_when_a_pooled_connection_closes_unanswered() {
        let (url, seen) = scripted(vec![
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"),
            // The API drops the kept-alive connection just as the next request arrives.
            Script::Close,
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2"),
            Script::Close,
        ])
        .await;
        let u = Upstreams::new(&[route(&url, false)]).expect("upstreams");
        assert_eq!(call(&u, "GET", "/a").await.expect("a"), (200, "1".into()));
        assert_eq!(call(&u, "GET", "/b").await.expect("b"), (200, "2".into()));
        assert_eq!(conns(&seen), [1, 1, 2]);
        // An unsafe one is not sent twice: the API may have acted on it.
        let post = call(&u, "POST", "/c").await;
        assert!(
            matches!(post, Err(UpstreamError::Wire(h1::Error::Closed))),
            "{post:?}"
        );
        let heads = heads(&seen);
        assert_eq!(heads.len(), 4);
        assert!(heads[3].starts_with("POST /c HTTP/1.1\r\n"), "{}", heads[3]);
        assert!(
            heads[3].contains("\r\ncontent-length: 0\r\n"),
            "{}",
            heads[3]
        );
    }

    #[tokio::test]
    async fn malformed_answers_fail_and_their_connection_is_not_used_again() {
        let (url, seen) = scripted(vec![
            Script::Reply(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
            ),
            Script::Reply(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
            ),
            Script::ReplyThenClose("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ])
        .await;
        let u = Upstreams::new(&[route(&url, false)]).expect("upstreams");
        assert!(call(&u, "GET", "/a").await.is_err());
        assert!(call(&u, "GET", "/b").await.is_err());
        assert!(call(&u, "GET", "/c").await.is_err());
        assert_eq!(call(&u, "GET", "/d").await.expect("d"), (200, "ok".into()));
        assert_eq!(conns(&seen), [1, 2, 3, 4]);
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    fn shared(url: &str, share: usize, patience: Duration) -> (Upstreams, crate::metrics::Metrics) {
        let metrics = crate::metrics::Metrics::new();
        let mut u = Upstreams::new(&[route(url, false)])
            .expect("upstreams")
            .count_waits(&metrics);
        u.share = share;
        u.patience = patience;
        (u, metrics)
    }

    /// The calls of route `/api` that waited, by outcome, as `/metrics` shows them.
    fn waits(metrics: &crate::metrics::Metrics) -> Vec<(String, u64)> {
        let prefix = "tokengate_upstream_connection_waits_total{route=\"/api\",outcome=\"";
        let mut out: Vec<_> = metrics
            .render()
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|l| l.split_once("\"} "))
            .map(|(o, n)| (o.to_string(), n.parse().expect("count")))
            .collect();
        out.sort();
        out
    }

    fn counted(handed: u64, opened: u64, timeout: u64) -> Vec<(String, u64)> {
        vec![
            ("handed".into(), handed),
            ("opened".into(), opened),
            ("timeout".into(), timeout),
        ]
    }

    /// Twenty calls at once with a share of two: the API sees two connections, each call
    /// waiting for one to come back.
    #[tokio::test]
    async fn calls_beyond_the_share_wait_for_a_connection_to_come_back() {
        let (url, seen) = scripted(vec![Script::Reply(OK); 20]).await;
        let (u, metrics) = shared(&url, 2, Duration::from_secs(30));
        let calls = (0..20).map(|i| {
            let u = &u;
            async move { call(u, "GET", &format!("/{i}")).await }
        });
        for answer in futures_util::future::join_all(calls).await {
            assert_eq!(answer.expect("answer"), (200, "ok".into()));
        }
        let mut used = conns(&seen);
        assert_eq!(used.len(), 20);
        used.sort_unstable();
        used.dedup();
        assert_eq!(used, [1, 2]);
        assert_eq!(waits(&metrics), counted(18, 0, 0));
    }

    /// A call the API holds keeps its connection; another call waits for it only as long as
    /// the patience, then goes on a new one. The held call's place comes back when it ends.
    #[tokio::test]
    async fn a_call_the_share_cannot_serve_soon_opens_one_more() {
        let (url, seen) =
            scripted(vec![Script::Silent, Script::Reply(OK), Script::Reply(OK)]).await;
        let (u, metrics) = shared(&url, 1, Duration::from_millis(50));
        let held = call_within(&u, "GET", "/held", Duration::from_millis(800));
        let other = async {
            // After the held call took the connection.
            tokio::task::yield_now().await;
            call(&u, "GET", "/other").await
        };
        let (held, other) = tokio::join!(held, other);
        assert!(matches!(held, Err(UpstreamError::TimedOut)), "{held:?}");
        assert_eq!(other.expect("other"), (200, "ok".into()));
        assert_eq!(
            call(&u, "GET", "/then").await.expect("then"),
            (200, "ok".into())
        );
        // The second connection, idle again, carries the third call.
        assert_eq!(conns(&seen), [1, 2, 2]);
        let pool = u.pools.get().expect("this thread's pools")[0].clone();
        assert_eq!(pool.own().busy, 0);
        assert_eq!(waits(&metrics), counted(0, 1, 0));
    }

    /// A body dropped before its end closes its connection and gives up its place: with a
    /// share of one and no patience to speak of, the next call goes on a new connection at
    /// once instead of waiting for a place that would never come back.
    #[tokio::test]
    async fn a_body_dropped_before_its_end_gives_its_place_back() {
        let (url, seen) = scripted(vec![
            Script::Reply("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
            Script::Reply(OK),
        ])
        .await;
        let (u, metrics) = shared(&url, 1, Duration::from_secs(30));
        let req = http::Request::get("/partial")
            .body(Body::empty())
            .expect("request");
        let due = tokio::time::Instant::now() + Duration::from_secs(30);
        let partial = u
            .send(&u.routes[0], req, &mut Added::default(), due, false)
            .await
            .expect("head");
        assert_eq!(partial.status(), 200);
        drop(partial);
        let next = call_within(&u, "GET", "/next", Duration::from_secs(2)).await;
        assert_eq!(next.expect("next"), (200, "ok".into()));
        assert_eq!(conns(&seen), [1, 2]);
        assert_eq!(waits(&metrics), counted(0, 0, 0));
    }

    /// A call still waiting when the route timeout runs out is a 504, counted as such.
    #[tokio::test]
    async fn a_wait_ends_at_the_route_timeout() {
        let (url, _seen) = scripted(vec![Script::Silent]).await;
        let (u, metrics) = shared(&url, 1, Duration::from_secs(30));
        let held = call_within(&u, "GET", "/held", Duration::from_secs(30));
        let waiting = async {
            tokio::task::yield_now().await;
            call_within(&u, "GET", "/waiting", Duration::from_millis(200)).await
        };
        tokio::select! {
            _ = held => panic!("the API answers nothing"),
            waited = waiting => assert!(matches!(waited, Err(UpstreamError::TimedOut)), "{waited:?}"),
        }
        assert_eq!(waits(&metrics), counted(0, 0, 1));
    }

    /// A waiting call cancelled after a place was handed to it passes the place on.
    #[test]
    fn a_cancelled_waiting_call_passes_on_what_it_was_handed() {
        let pool = Pool::default();
        assert!(matches!(pool.checkout(1), Checkout::Dial));
        let Checkout::Wait(rx) = pool.checkout(1) else {
            panic!("the share of one is busy");
        };
        let waiting = Waiting { rx, pool: &pool };
        // The busy connection closes: its place is handed to the waiting call...
        pool.lost();
        assert_eq!(pool.own().busy, 1);
        // ...which is cancelled before it took it.
        drop(waiting);
        assert_eq!(pool.own().busy, 0);
        assert!(matches!(pool.checkout(1), Checkout::Dial));
    }

    #[tokio::test]
    async fn an_https_api_is_read_the_same_way_and_its_connection_reused() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("tg-upstream-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args([
                "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .current_dir(&dir)
            .output()
            .expect("the openssl CLI runs");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let cert = CertificateDer::from_pem_file(dir.join("cert.pem")).expect("cert");
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).expect("key");
        let _ = std::fs::remove_dir_all(&dir);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (mut buf, mut n) = (Vec::new(), 0);
                    loop {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            n += 1;
                            let answer = if n % 2 == 1 {
                                format!("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nreply{n}")
                            } else {
                                format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nreply{n}\r\n0\r\n\r\n")
                            };
                            if s.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp_connector());
        let u = Upstreams::with_connector(&[route(&format!("https://{addr}"), false)], connector)
            .expect("upstreams");
        for n in 1..=4 {
            let got = call(&u, "GET", &format!("/{n}")).await.expect("answer");
            assert_eq!(got, (200, format!("reply{n}")));
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one TLS connection for all"
        );
    }
}
