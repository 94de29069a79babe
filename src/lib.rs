//! tokengate: a Backend-for-Frontend token handler. The browser never holds an OAuth token.
//!
//! The request's path, module by module:
//!
//! ```text
//! browser ──GET /login──────────▶ auth::login      state + PKCE + nonce, sealed tx cookie, 302 ─▶ IdP
//! IdP ─────GET /oauth-callback──▶ auth::callback   state/iss checks, code → idp::client, idp::id_token
//!                                                   └▶ session::store (sealed cookie) 302 → return_to
//! SPA ─────GET /userinfo────────▶ auth::userinfo   ID-token claims (+ UserInfo), never tokens
//! SPA ─────POST /refreshtoken───▶ auth::refresh    session::refresh (single-flight)
//! SPA ─────ANY /api/...─────────▶ proxy::forward   session::extract (CSRF, session, fresh token)
//!                                                   session::route_token (the route's own token)
//!                                                   └▶ proxy::headers → proxy::upstream ─▶ API
//! SPA ─────POST /logout─────────▶ auth::logout     revoke (RFC 7009), clear cookies, end-session URL
//! ```
//!
//! Module map: [`config`] (typed, validated settings), [`state`] (shared handles), [`app`] (the
//! router), [`error`] (JSON errors), [`telemetry`] (logs), [`auth`], [`idp`], [`session`],
//! [`proxy`].

pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod idp;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod session;
mod spare;
pub mod state;
pub mod sweep;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use config::Config;

/// What serving needs besides the listener: the shared state and the limits, with the start-up
/// warnings logged.
struct Prepared {
    state: state::AppState,
    limits: server::Limits,
}

impl Prepared {
    fn new(config: Config) -> anyhow::Result<Self> {
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(config = %config.redacted_summary(), "starting");
        let limits = server::Limits {
            connections: Arc::new(tokio::sync::Semaphore::new(config.server.max_connections)),
            header_read_timeout: config.server.header_read_timeout,
            max_header_bytes: config.server.max_header_bytes,
            shutdown_timeout: config.server.shutdown_timeout,
            shutdown_delay: config.server.shutdown_delay,
        };
        Ok(Self {
            state: state::AppState::new(config)?,
            limits,
        })
    }

    /// Starts the background work: IdP metadata/JWKS loading and the separate metrics listener.
    async fn start_background(&self) -> anyhow::Result<Background> {
        let loader = self.state.idp.spawn_loader();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = match self.state.config.server.metrics_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await?;
                tracing::info!(%addr, "metrics listening");
                let mut rx = stop_rx;
                Some(tokio::spawn(server::run_plain(
                    l,
                    app::metrics_app(self.state.clone()),
                    async move {
                        let _ = rx.wait_for(|s| *s).await;
                    },
                )))
            }
            None => None,
        };
        Ok(Background {
            loader,
            metrics,
            stop_tx,
        })
    }

    /// Serves on `listener` (as one of the binary's workers, with its side of the spread).
    fn serve_one(
        &self,
        listener: tokio::net::TcpListener,
        worker: Option<server::Worker>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = anyhow::Result<()>> {
        server::run(
            listener,
            app::App::new(self.state.clone()),
            self.limits.clone(),
            Arc::clone(&self.state.lifecycle),
            worker,
            shutdown,
        )
    }
}

struct Background {
    loader: tokio::task::JoinHandle<()>,
    metrics: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
}

impl Background {
    async fn stop(self) {
        let _ = self.stop_tx.send(true);
        if let Some(t) = self.metrics {
            let _ = t.await;
        }
        self.loader.abort();
    }
}

/// Serves tokengate on `listener` until `shutdown` resolves, then finishes in-flight requests.
/// The caller binds the listener (tests use `127.0.0.1:0`) and provides the runtime: everything
/// runs on it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let prepared = Prepared::new(config)?;
    let background = prepared.start_background().await?;
    let result = prepared.serve_one(listener, None, shutdown).await;
    background.stop().await;
    result
}

/// The binary's way to serve: `server.workers` threads, each with its own single-threaded event
/// loop accepting from `listener` (as nginx's workers do), so that a request, its upstream
/// connection and its answer stay on one thread and never wake another. The calling thread runs
/// the background work and waits for `shutdown`; then every worker drains (bounded) and this
/// returns.
pub fn serve_on_threads(
    listener: std::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let workers = config.server.workers.max(1);
    listener.set_nonblocking(true)?;
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    control.block_on(async move {
        let prepared = Arc::new(Prepared::new(config)?);
        let background = prepared.start_background().await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut done = Vec::with_capacity(workers);
        for (i, worker) in server::Spread::workers(workers).into_iter().enumerate() {
            let l = listener.try_clone()?;
            let p = Arc::clone(&prepared);
            let mut rx = stop_rx.clone();
            let (tx, finished) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
            std::thread::Builder::new()
                .name(format!("tokengate-worker-{i}"))
                .spawn(move || {
                    let run = || -> anyhow::Result<()> {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?;
                        rt.block_on(async move {
                            tokio::spawn(keep_a_timer_due_soon());
                            let l = tokio::net::TcpListener::from_std(l)?;
                            p.serve_one(l, Some(worker), async move {
                                let _ = rx.wait_for(|s| *s).await;
                            })
                            .await
                        })
                    };
                    let _ = tx.send(run());
                })?;
            done.push(finished);
        }
        drop(listener);
        tracing::info!(workers, "serving");
        shutdown.await;
        let _ = stop_tx.send(true);
        let mut result = Ok(());
        for finished in done {
            match finished.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(anyhow::anyhow!("a worker thread stopped unexpectedly")),
            }
        }
        background.stop().await;
        result
    })
}

/// Keeps a timer due within the next half second on this worker's runtime, for ever.
///
/// Every request arms timers (the header-read timeout, the route's timeout). Tokio's timer
/// wakes its own event loop through an `eventfd` write whenever a new timer is due before the
/// earliest one it knew of when it last went to sleep, and with nothing else pending that is
/// most new timers: measured, 0.4 `eventfd` writes (and as many extra `epoll_wait` returns)
/// per proxied call. With this one always due sooner, request timers never are.
async fn keep_a_timer_due_soon() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// For a timer kept across many deadlines (one per connection, not one per request): when it
/// goes off before `due` (it was set for an earlier deadline), moves it to `due` and returns
/// true; false once `due` has passed. Moving a timer only when it goes off early costs less than
/// resetting it for every request.
pub(crate) fn went_off_early(
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    due: tokio::time::Instant,
) -> bool {
    if tokio::time::Instant::now() < due {
        timer.reset(due);
        true
    } else {
        false
    }
}

/// A fresh random session key, base64 (what `tokengate keygen` prints).
pub fn generate_key() -> String {
    use base64::Engine;
    let mut k = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}
