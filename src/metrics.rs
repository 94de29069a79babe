//! Prometheus metrics (`GET /metrics`, text format). One registry per running app, so tests can
//! run many apps in one process.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
/// Per-request labels: all static, so counting a request allocates nothing.
type HttpLabels = [(&'static str, &'static str); 3];
type HttpTimeLabels = [(&'static str, &'static str); 2];
/// The session store's labels (every request loads a session): static too.
type OpLabels = [(&'static str, &'static str); 1];

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

fn new_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// (route label address, its length, method, status class).
type RequestKey = (usize, usize, &'static str, &'static str);

/// Handles of metrics counted on every request, found once per label set and thread: a
/// `Family` lookup hashes the whole label set (SipHash) under a lock, which showed up at ~2 % of
/// a proxied call's instructions. A clone of a handle counts into the same series. Label values
/// are `'static` strings from a fixed set (route prefixes made once at start-up, method and status
/// class names), so they are told apart by address and length, and the lists stay short.
#[derive(Default)]
struct Handles {
    requests: Vec<(RequestKey, Counter, Histogram)>,
    store: Vec<((usize, usize), Histogram)>,
}

/// One route's counters of calls that waited for a shared upstream connection
/// ([`Metrics::upstream_waits`]); unregistered ones (the default) count for no one.
#[derive(Clone, Debug, Default)]
pub struct UpstreamWaits {
    pub handed: Counter,
    pub opened: Counter,
    pub timeout: Counter,
}

/// Handles of the session cache's metrics (each an atomic behind an `Arc`: no lookup per call).
#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub up: Gauge,
    pub hit: Counter,
    pub miss: Counter,
    pub off: Counter,
}

/// Every metric tokengate exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<HttpLabels, Counter>,
    request_seconds: Family<HttpTimeLabels, Histogram, fn() -> Histogram>,
    logins: Family<Labels, Counter>,
    refreshes: Family<Labels, Counter>,
    upstream_errors: Family<Labels, Counter>,
    upstream_waits: Family<Labels, Counter>,
    store_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    store_errors: Family<OpLabels, Counter>,
    /// Per thread, the handles of the per-request metrics already looked up (see [`Handles`]).
    handles: thread_local::ThreadLocal<std::cell::RefCell<Handles>>,
    idp_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pending_logins: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("tokengate");
        let requests = Family::<HttpLabels, Counter>::default();
        r.register(
            "http_requests",
            "HTTP requests answered, by route, method and status class",
            requests.clone(),
        );
        let request_seconds: Family<HttpTimeLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(new_histogram);
        r.register(
            "http_request_duration_seconds",
            "Time to answer (until response headers), by route and status class",
            request_seconds.clone(),
        );
        let logins = Family::<Labels, Counter>::default();
        r.register(
            "logins",
            "Logins by outcome: started, completed, failed (with reason)",
            logins.clone(),
        );
        let refreshes = Family::<Labels, Counter>::default();
        r.register(
            "token_refreshes",
            "Access-token refreshes by outcome: ok, fatal, transient, coalesced (joined a refresh under way)",
            refreshes.clone(),
        );
        let upstream_errors = Family::<Labels, Counter>::default();
        r.register(
            "upstream_errors",
            "API calls that failed, by route and kind (error, timeout)",
            upstream_errors.clone(),
        );
        let upstream_waits = Family::<Labels, Counter>::default();
        r.register(
            "upstream_connection_waits",
            "API calls that found their route's shared upstream connections on their thread all busy, by route and outcome: handed (one came back within the patience), opened (one more was opened), timeout (the route timeout ran out while waiting)",
            upstream_waits.clone(),
        );
        let store_seconds: Family<OpLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(new_histogram);
        r.register(
            "session_store_duration_seconds",
            "Session store operation latency, by operation",
            store_seconds.clone(),
        );
        let store_errors = Family::<OpLabels, Counter>::default();
        r.register(
            "session_store_errors",
            "Session store operations that failed, by operation",
            store_errors.clone(),
        );
        let idp_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(new_histogram);
        r.register(
            "idp_request_duration_seconds",
            "Identity provider call latency, by endpoint and outcome",
            idp_seconds.clone(),
        );
        let pending_logins = Gauge::default();
        r.register(
            "pending_logins",
            "Login transactions started and neither completed nor expired",
            pending_logins.clone(),
        );
        Self {
            registry: Mutex::new(r),
            requests,
            request_seconds,
            logins,
            refreshes,
            upstream_errors,
            upstream_waits,
            store_seconds,
            store_errors,
            handles: thread_local::ThreadLocal::new(),
            idp_seconds,
            pending_logins,
        }
    }

    pub fn request(&self, route: &'static str, method: &http::Method, status: u16, took: Duration) {
        let class = match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        let method = match *method {
            http::Method::GET => "GET",
            http::Method::POST => "POST",
            http::Method::PUT => "PUT",
            http::Method::PATCH => "PATCH",
            http::Method::DELETE => "DELETE",
            http::Method::HEAD => "HEAD",
            http::Method::OPTIONS => "OPTIONS",
            // Unbounded label values are refused: every other method counts as one.
            _ => "other",
        };
        let key = (route.as_ptr() as usize, route.len(), method, class);
        let cell = self.handles.get_or_default();
        let Ok(mut h) = cell.try_borrow_mut() else {
            return;
        };
        let i = match h.requests.iter().position(|(k, ..)| *k == key) {
            Some(i) => i,
            None => {
                let count = self
                    .requests
                    .get_or_create(&[("route", route), ("method", method), ("status", class)])
                    .clone();
                let seconds = self
                    .request_seconds
                    .get_or_create(&[("route", route), ("status", class)])
                    .clone();
                h.requests.push((key, count, seconds));
                h.requests.len() - 1
            }
        };
        if let Some((_, count, seconds)) = h.requests.get(i) {
            count.inc();
            seconds.observe(took.as_secs_f64());
        }
    }

    pub fn login(&self, outcome: &'static str, reason: &'static str) {
        self.logins
            .get_or_create(&vec![
                ("outcome", outcome.into()),
                ("reason", reason.into()),
            ])
            .inc();
    }

    pub fn refresh(&self, outcome: &'static str) {
        self.refreshes
            .get_or_create(&vec![("outcome", outcome.into())])
            .inc();
    }

    pub fn upstream_error(&self, route: &str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&vec![("route", route.into()), ("kind", kind.into())])
            .inc();
    }

    /// The counters of calls to `route` that waited for a shared upstream connection.
    pub fn upstream_waits(&self, route: &str) -> UpstreamWaits {
        let counter = |outcome: &'static str| {
            self.upstream_waits
                .get_or_create(&vec![("route", route.into()), ("outcome", outcome.into())])
                .clone()
        };
        UpstreamWaits {
            handed: counter("handed"),
            opened: counter("opened"),
            timeout: counter("timeout"),
        }
    }

    pub fn store_op(&self, op: &'static str, took: Duration, ok: bool) {
        let cell = self.handles.get_or_default();
        if let Ok(mut h) = cell.try_borrow_mut() {
            let key = (op.as_ptr() as usize, op.len());
            match h.store.iter().find(|(k, _)| *k == key) {
                Some((_, seconds)) => seconds.observe(took.as_secs_f64()),
                None => {
                    let seconds = self.store_seconds.get_or_create(&[("op", op)]).clone();
                    seconds.observe(took.as_secs_f64());
                    h.store.push((key, seconds));
                }
            }
        }
        if !ok {
            self.store_errors.get_or_create(&[("op", op)]).inc();
        }
    }

    pub fn idp_call(&self, endpoint: &'static str, outcome: &'static str, took: Duration) {
        self.idp_seconds
            .get_or_create(&vec![
                ("endpoint", endpoint.into()),
                ("outcome", outcome.into()),
            ])
            .observe(took.as_secs_f64());
    }

    /// The metrics of a replica's Redis session cache (`session.redis_cache_ms`), registered on
    /// first use: deployments without the cache do not export them.
    pub fn session_cache(&self) -> CacheMetrics {
        let up = Gauge::default();
        let lookups = Family::<OpLabels, Counter>::default();
        if let Ok(mut r) = self.registry.lock() {
            r.register(
                "session_cache_up",
                "1 while the session cache's invalidation subscription is up (copies are served), else 0",
                up.clone(),
            );
            r.register(
                "session_cache_lookups",
                "Session cache lookups by result: hit (no Redis round trip), miss, off (subscription down)",
                lookups.clone(),
            );
        }
        let counter = |result: &'static str| lookups.get_or_create(&[("result", result)]).clone();
        let (hit, miss, off) = (counter("hit"), counter("miss"), counter("off"));
        CacheMetrics { up, hit, miss, off }
    }

    pub fn set_pending_logins(&self, n: usize) {
        self.pending_logins
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = encode(&mut out, &r);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_recorded_values() {
        let m = Metrics::new();
        m.request("/api", &http::Method::GET, 204, Duration::from_millis(3));
        m.login("failed", "invalid_state");
        m.refresh("coalesced");
        m.set_pending_logins(2);
        let text = m.render();
        assert!(
            text.contains(
                r#"tokengate_http_requests_total{route="/api",method="GET",status="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"tokengate_logins_total{outcome="failed",reason="invalid_state"} 1"#)
        );
        assert!(text.contains(r#"tokengate_token_refreshes_total{outcome="coalesced"} 1"#));
        assert!(text.contains("tokengate_pending_logins 2"));
        assert!(text.contains("tokengate_http_request_duration_seconds_bucket"));
    }

    #[test]
    fn cached_handles_count_into_the_exported_series() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.request("/api", &http::Method::GET, 200, Duration::from_millis(1));
            m.store_op("load", Duration::from_millis(1), true);
        }
        m.request("/api", &http::Method::POST, 502, Duration::from_millis(1));
        // Another thread has handles of its own, counting into the same series.
        std::thread::scope(|t| {
            t.spawn(|| m.request("/api", &http::Method::GET, 201, Duration::from_millis(1)));
        });
        let text = m.render();
        for line in [
            r#"tokengate_http_requests_total{route="/api",method="GET",status="2xx"} 4"#,
            r#"tokengate_http_requests_total{route="/api",method="POST",status="5xx"} 1"#,
            r#"tokengate_http_request_duration_seconds_count{route="/api",status="2xx"} 4"#,
            r#"tokengate_session_store_duration_seconds_count{op="load"} 3"#,
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
    }
}
