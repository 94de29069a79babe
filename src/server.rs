//! The listener loop: accepts connections under a connection limit, serves HTTP/1.1 with a
//! header-read timeout (slowloris) and a bounded header size, and on shutdown stops accepting,
//! lets in-flight requests finish within `server.shutdown_timeout_s`, then returns. Requests
//! without a body are read and answered by our own loop ([`h1`]); from the first request with a
//! body (or anything else that loop leaves alone), hyper serves the connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::session::cookie::CookieFields;

mod h1;

/// Limits applied per connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// One permit per open connection, shared by every worker (`server.max_connections`).
    pub connections: Arc<Semaphore>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_timeout: Duration,
    pub shutdown_delay: Duration,
}

/// Spreads connections evenly over the binary's worker threads. Every worker's event loop waits
/// on the one listening socket and whichever wakes first accepts, which under a burst of new
/// connections left one worker with three quarters of them (measured: 76 % / 24 % of the CPU at
/// 32 connections) while nginx's workers stayed even. So each connection is assigned to the
/// worker holding the fewest; one accepted by another worker is handed over (once per
/// connection, not per request).
#[derive(Debug)]
pub struct Spread {
    /// Connections assigned to each worker and not yet closed.
    assigned: Vec<AtomicUsize>,
    inboxes: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
}

/// One worker's side of [`Spread`].
pub struct Worker {
    pub spread: Arc<Spread>,
    pub me: usize,
    pub inbox: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
}

impl Spread {
    /// A spread over `n` workers, and each worker's side.
    pub fn workers(n: usize) -> Vec<Worker> {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let spread = Arc::new(Spread {
            assigned: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            inboxes: senders,
        });
        receivers
            .into_iter()
            .enumerate()
            .map(|(me, inbox)| Worker {
                spread: Arc::clone(&spread),
                me,
                inbox,
            })
            .collect()
    }

    /// The worker a new connection goes to (counted as assigned to it): `me` unless another
    /// one holds fewer.
    fn assign(&self, me: usize) -> usize {
        let count = |i: usize| {
            self.assigned
                .get(i)
                .map_or(usize::MAX, |a| a.load(Ordering::Relaxed))
        };
        let mut to = me;
        for i in 0..self.assigned.len() {
            if count(i) < count(to) {
                to = i;
            }
        }
        self.opened(to);
        to
    }

    fn closed(&self, worker: usize) {
        if let Some(a) = self.assigned.get(worker) {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn opened(&self, worker: usize) {
        if let Some(a) = self.assigned.get(worker) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands `stream` to worker `to`: `Err(Some)` gives it back when that worker is gone,
    /// `Err(None)` when it could not be detached from this worker (it is closed).
    fn hand_over(
        &self,
        to: usize,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> Result<(), Option<tokio::net::TcpStream>> {
        let Some(inbox) = self.inboxes.get(to) else {
            return Err(Some(stream));
        };
        let std = stream.into_std().map_err(|e| {
            tracing::debug!(error = %e, "could not hand a connection over");
            None
        })?;
        inbox
            .send((std, peer))
            .map_err(|back| tokio::net::TcpStream::from_std(back.0 .0).ok())
    }
}

/// Counts a connection as its worker's until it closes.
struct Assigned(Option<(Arc<Spread>, usize)>);

impl Drop for Assigned {
    fn drop(&mut self) {
        if let Some((spread, worker)) = &self.0 {
            spread.closed(*worker);
        }
    }
}

/// Where the process is in its life: requests in flight, and whether it is draining.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    in_flight: AtomicUsize,
}

impl Lifecycle {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request as in flight until its response head is produced (or it is dropped).
struct InFlight(Arc<Lifecycle>);

impl InFlight {
    fn new(l: &Arc<Lifecycle>) -> Self {
        l.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(l))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then drains (bounded): /readyz turns
/// 503 while tokengate keeps accepting until no request is in flight (and at least
/// `shutdown_delay`), then it stops accepting and lets open connections finish.
pub async fn run(
    listener: TcpListener,
    app: App,
    limits: Limits,
    lifecycle: Arc<Lifecycle>,
    mut worker: Option<Worker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let permits = Arc::clone(&limits.connections);
    // Every connection holds a receiver: true asks it to close once idle, and the sender sees
    // when the last one is gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let settings = h1::Settings {
        header_read_timeout: limits.header_read_timeout,
        max_head: max_head(&limits),
    };
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper answers 431 itself beyond this; the app checks a tighter limit with a JSON body.
        .max_buf_size(max_head(&limits))
        .keep_alive(true);
    tokio::pin!(shutdown);
    let mut drain_started: Option<tokio::time::Instant> = None;
    loop {
        let (mut stream, peer, handed) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer, false),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some((std, peer)) = handed_over(&mut worker) => {
                match tokio::net::TcpStream::from_std(std) {
                    Ok(stream) => (stream, peer, true),
                    Err(e) => {
                        if let Some(w) = &worker {
                            w.spread.closed(w.me);
                        }
                        tracing::debug!(error = %e, "a handed-over connection could not be served");
                        continue;
                    }
                }
            },
            () = &mut shutdown, if drain_started.is_none() => {
                lifecycle.draining.store(true, Ordering::Relaxed);
                drain_started = Some(tokio::time::Instant::now());
                tracing::info!(in_flight = lifecycle.in_flight(), "draining: /readyz is 503");
                continue;
            }
            () = tokio::time::sleep(Duration::from_millis(20)), if drain_started.is_some() => {
                let elapsed = drain_started.map(|t| t.elapsed()).unwrap_or_default();
                let quiet = lifecycle.in_flight() == 0 && elapsed >= limits.shutdown_delay;
                if quiet || elapsed >= limits.shutdown_timeout {
                    break;
                }
                continue;
            }
        };
        let assigned = match &worker {
            Some(w) => {
                let mut to = w.me;
                if !handed {
                    to = w.spread.assign(w.me);
                }
                if to != w.me {
                    match w.spread.hand_over(to, stream, peer) {
                        Ok(()) => continue,
                        Err(None) => {
                            w.spread.closed(to);
                            continue;
                        }
                        // That worker is gone (shutting down): served here after all.
                        Err(Some(back)) => {
                            w.spread.closed(to);
                            w.spread.opened(w.me);
                            stream = back;
                        }
                    }
                }
                Assigned(Some((Arc::clone(&w.spread), w.me)))
            }
            None => Assigned(None),
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let app = app.clone();
        let life = Arc::clone(&lifecycle);
        let http = http.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let handle = move |req: http::Request<axum::body::Body>, cookies: CookieFields| {
                let guard = InFlight::new(&life);
                let call = app.call(req, cookies, peer);
                async move {
                    let resp = call.await;
                    drop(guard);
                    resp
                }
            };
            connection(stream, peer, settings, &http, &mut stop, handle).await;
            drop(permit);
            drop(assigned);
        });
    }
    drop(listener);
    tracing::info!("stopped accepting; waiting for open connections");
    let spent = drain_started.map(|t| t.elapsed()).unwrap_or_default();
    let left = limits
        .shutdown_timeout
        .saturating_sub(spent)
        .max(Duration::from_millis(100));
    drop(stop_rx);
    stop_tx.send_replace(true);
    if tokio::time::timeout(left, stop_tx.closed()).await.is_err() {
        tracing::warn!(
            timeout_s = limits.shutdown_timeout.as_secs(),
            "in-flight requests did not finish in time"
        );
    }
    Ok(())
}

/// The most a request head may take before hyper (431) and our own loop give up on it.
fn max_head(limits: &Limits) -> usize {
    limits.max_header_bytes.saturating_mul(2).max(8192)
}

/// One connection, from accept to close: our own loop ([`h1`]) serves its requests without a
/// body; from the first request it leaves to hyper, hyper serves the rest.
async fn connection<F, Fut>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    settings: h1::Settings,
    http: &http1::Builder,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(http::Request<axum::body::Body>, CookieFields) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = axum::response::Response> + Send + 'static,
{
    let stream = match h1::serve(stream, settings, stop, &handle).await {
        h1::Ended::Closed => return,
        h1::Ended::TimedOut(stream) => {
            return SharedStream::new(stream, bytes::BytesMut::new())
                .answer_and_close(REQUEST_TIMEOUT)
                .await;
        }
        h1::Ended::HandOver(stream, unread) => SharedStream::new(stream, unread),
    };
    let svc = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        // hyper's request has its cookies in its map.
        let answer = handle(req.map(axum::body::Body::new), CookieFields::default());
        // hyper writes only the map: an API answer's passed fields go into it first.
        async move {
            Ok::<_, std::convert::Infallible>(crate::proxy::passthrough::expanded(answer.await))
        }
    });
    let late = stream.clone();
    let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stopped(stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
        // hyper gives up on a request head that is too slow by closing the connection; a client
        // that had started one is told why (an idle keep-alive one is not).
        if e.is_timeout() && late.request_started() {
            late.answer_and_close(REQUEST_TIMEOUT).await;
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The next connection another worker handed to this one (never, without a spread).
async fn handed_over(worker: &mut Option<Worker>) -> Option<(std::net::TcpStream, SocketAddr)> {
    match worker {
        Some(w) => w.inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// Over the connection limit: a short 503 and close, without reading the request.
async fn refuse(stream: tokio::net::TcpStream) {
    SharedStream::new(stream, bytes::BytesMut::new())
        .answer_and_close(OVERLOADED)
        .await;
}

/// A canned answer written outside hyper: status line and JSON body.
struct Canned {
    status: &'static str,
    body: &'static str,
}

const OVERLOADED: Canned = Canned {
    status: "503 Service Unavailable",
    body: "{\"error\":\"temporarily_unavailable\",\"error_description\":\"too many connections; try again shortly\"}",
};

const REQUEST_TIMEOUT: Canned = Canned {
    status: "408 Request Timeout",
    body: "{\"error\":\"invalid_request\",\"error_description\":\"the request headers did not arrive in time\"}",
};

/// The connection's socket, shared by hyper and the listener loop so that the loop can still
/// answer on it after hyper has given up on the connection. Reads and writes go through tokio's
/// own `TcpStream` I/O: it reads into hyper's buffer without zero-filling it first, and a short
/// read clears the readiness, so no extra `recv` returning `EAGAIN` follows each request. The
/// lock is never contended: the loop touches the socket only after hyper is done with it.
#[derive(Clone)]
struct SharedStream(Arc<SharedInner>);

struct SharedInner {
    stream: std::sync::Mutex<tokio::net::TcpStream>,
    /// Bytes our own loop read and did not answer: read before the socket.
    unread: std::sync::Mutex<bytes::BytesMut>,
    /// Bytes arrived since the last answer was written: a request (head) is under way.
    started: AtomicBool,
}

impl SharedStream {
    fn new(stream: tokio::net::TcpStream, unread: bytes::BytesMut) -> Self {
        Self(Arc::new(SharedInner {
            stream: std::sync::Mutex::new(stream),
            started: AtomicBool::new(!unread.is_empty()),
            unread: std::sync::Mutex::new(unread),
        }))
    }

    /// Moves bytes read before hyper took the connection into `buf`; false when none are left.
    fn take_unread(&self, buf: &mut tokio::io::ReadBuf<'_>) -> bool {
        let Ok(mut unread) = self.0.unread.lock() else {
            return false;
        };
        if unread.is_empty() {
            return false;
        }
        let n = unread.len().min(buf.remaining());
        buf.put_slice(&unread.split_to(n));
        true
    }

    fn request_started(&self) -> bool {
        self.0.started.load(Ordering::Relaxed)
    }

    /// Runs `f` on the socket; a poisoned lock (a panic mid-poll) is an I/O error, not a panic.
    fn with_stream<T>(
        &self,
        f: impl FnOnce(std::pin::Pin<&mut tokio::net::TcpStream>) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match self.0.stream.lock() {
            Ok(mut s) => f(std::pin::Pin::new(&mut *s)),
            Err(_) => std::task::Poll::Ready(Err(std::io::Error::other("connection state lost"))),
        }
    }

    async fn answer_and_close(mut self, canned: Canned) {
        let msg = format!(
            "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{}",
            canned.status,
            canned.body.len(),
            canned.body
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.write_all(msg.as_bytes()).await;
            let _ = self.shutdown().await;
        })
        .await;
    }
}

impl tokio::io::AsyncRead for SharedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.take_unread(buf) {
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = self.with_stream(|s| s.poll_read(cx, buf));
        if matches!(r, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.0.started.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for SharedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = self.with_stream(|s| s.poll_write(cx, data));
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = self.with_stream(|s| s.poll_write_vectored(cx, bufs));
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.with_stream(|s| {
            let r = socket2::SockRef::from(&*s).shutdown(std::net::Shutdown::Write);
            std::task::Poll::Ready(match r {
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
                other => other,
            })
        })
    }
}

impl SharedStream {
    /// An answer went out: the next bytes to arrive start a new request.
    fn wrote(&self, r: &std::task::Poll<std::io::Result<usize>>) {
        if matches!(r, std::task::Poll::Ready(Ok(n)) if *n > 0) {
            self.0.started.store(false, Ordering::Relaxed);
        }
    }
}

/// A plain listener for `/metrics` alone (`server.metrics_listen`).
pub async fn run_plain(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(w: &Worker) -> Vec<usize> {
        w.spread
            .assigned
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn connections_go_to_the_worker_holding_fewest() {
        let workers = Spread::workers(3);
        let s = &workers[0].spread;
        // A burst accepted by worker 0 alone ends up even.
        let to: Vec<usize> = (0..7).map(|_| s.assign(0)).collect();
        assert_eq!(to, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(counts(&workers[0]), [3, 2, 2]);
        // Ties stay where they were accepted.
        assert_eq!(s.assign(1), 1);
        s.closed(2);
        s.closed(2);
        assert_eq!(s.assign(0), 2);
        assert_eq!(counts(&workers[0]), [3, 3, 1]);
    }

    /// One answer with a `Content-Length` from `client`: its status line and body.
    async fn one_answer(
        client: &mut tokio::net::TcpStream,
        pending: &mut Vec<u8>,
    ) -> (String, String) {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.parse().ok())
                    .expect("content-length");
                if pending.len() >= end + 4 + length {
                    let body =
                        String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into_owned();
                    pending.drain(..end + 4 + length);
                    let status = head.lines().next().unwrap_or_default().to_string();
                    return (status, body);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = client.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed mid-answer");
            pending.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn hyper_takes_over_at_the_first_request_with_a_body_and_stops_gracefully() {
        use http_body_util::BodyExt;
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, peer) = listener.accept().await.expect("accept");
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let handle = |req: http::Request<axum::body::Body>, _: CookieFields| async move {
            let method = req.method().clone();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            axum::response::Response::new(axum::body::Body::from(format!(
                "{method} {}",
                String::from_utf8_lossy(&body)
            )))
        };
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new());
        let settings = h1::Settings {
            header_read_timeout: Duration::from_secs(10),
            max_head: 8192,
        };
        let task = tokio::spawn(async move {
            connection(server, peer, settings, &http, &mut stop_rx, handle).await;
        });
        // Served by our loop, then a body: hyper reads it (with the bytes our loop had read).
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
            .await
            .expect("write");
        let mut pending = Vec::new();
        assert_eq!(one_answer(&mut client, &mut pending).await.1, "GET ");
        let (status, body) = one_answer(&mut client, &mut pending).await;
        assert_eq!(status, "http/1.1 200 ok");
        assert_eq!(body, "POST abc");
        // hyper keeps the connection: chunked upload, then a bodiless request.
        client
            .write_all(b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\nGET /d HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(one_answer(&mut client, &mut pending).await.1, "PUT xy");
        assert_eq!(one_answer(&mut client, &mut pending).await.1, "GET ");
        // Stop: the idle connection is closed.
        stop_tx.send_replace(true);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read to end");
        assert!(rest.is_empty());
        task.await.expect("connection task");
    }

    #[tokio::test]
    async fn a_handed_over_connection_arrives_at_its_worker() {
        let mut workers = Spread::workers(2);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let s = Arc::clone(&workers[0].spread);
        assert!(s.hand_over(1, stream, peer).is_ok());
        let (got, from) = workers[1].inbox.recv().await.expect("handed over");
        assert_eq!(from, peer);
        assert_eq!(
            got.peer_addr().expect("peer"),
            client.local_addr().expect("local")
        );
        // A worker that is gone gives the connection back.
        drop(workers.pop());
        let (stream, peer) = {
            let _c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            listener.accept().await.expect("accept")
        };
        assert!(matches!(s.hand_over(1, stream, peer), Err(Some(_))));
    }
}
