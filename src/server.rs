//! The listener loop: accepts connections under a connection limit, serves HTTP/1.1 with a
//! header-read timeout (slowloris) and a bounded header size, and on shutdown stops accepting,
//! lets in-flight requests finish within `server.shutdown_timeout_s`, then returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Limits applied per connection.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_timeout: Duration,
    pub shutdown_delay: Duration,
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

const OVERLOADED: &str = "{\"error\":\"temporarily_unavailable\",\"error_description\":\"too many connections; try again shortly\"}";

/// Serves `router` on `listener` until `shutdown` resolves; then drains (bounded): /readyz turns
/// 503 while tokengate keeps accepting until no request is in flight (and at least
/// `shutdown_delay`), then it stops accepting and lets open connections finish.
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    lifecycle: Arc<Lifecycle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper answers 431 itself beyond this; the app checks a tighter limit with a JSON body.
        .max_buf_size(limits.max_header_bytes.saturating_mul(2).max(8192))
        .keep_alive(true);
    tokio::pin!(shutdown);
    let mut drain_started: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
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
        let _ = stream.set_nodelay(true);
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let app = router.clone();
        let life = Arc::clone(&lifecycle);
        let svc = tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let guard = InFlight::new(&life);
            let call = app.clone().oneshot(req.map(axum::body::Body::new));
            async move {
                let resp = call.await;
                drop(guard);
                resp
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("stopped accepting; waiting for open connections");
    let spent = drain_started.map(|t| t.elapsed()).unwrap_or_default();
    let left = limits
        .shutdown_timeout
        .saturating_sub(spent)
        .max(Duration::from_millis(100));
    if tokio::time::timeout(left, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_s = limits.shutdown_timeout.as_secs(),
            "in-flight requests did not finish in time"
        );
    }
    Ok(())
}

/// Over the connection limit: a short 503 and close, without reading the request.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        OVERLOADED.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(OVERLOADED.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
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
