//! The pooled HTTP client to upstream APIs (HTTP/1.1 keep-alive, http and https) and the joining
//! of a route's upstream URL with the request path.

use std::time::Duration;

use axum::body::Body;
use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::path::under_prefix;
use crate::config::RouteConfig;

pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The routes, and a pooled client per thread: with a runtime per core (the binary), every
/// upstream connection is driven on the thread whose requests use it, so a proxied call never
/// wakes another thread.
pub struct Upstreams {
    pub routes: Vec<RouteConfig>,
    clients: thread_local::ThreadLocal<Client<HttpsConnector, Body>>,
    /// Each route's prefix as a `'static` metric label (made once at start-up).
    labels: Vec<&'static str>,
}

fn new_client() -> anyhow::Result<Client<HttpsConnector, Body>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector))
}

impl Upstreams {
    pub fn new(routes: &[RouteConfig]) -> anyhow::Result<Self> {
        let clients = thread_local::ThreadLocal::new();
        // Built once here so that a TLS set-up problem stops start-up, not the first request.
        clients.get_or_try(new_client)?;
        Ok(Self {
            routes: routes.to_vec(),
            clients,
            labels: routes
                .iter()
                .map(|r| &*Box::leak(r.prefix.clone().into_boxed_str()))
                .collect(),
        })
    }

    /// This thread's client.
    pub fn client(&self) -> anyhow::Result<&Client<HttpsConnector, Body>> {
        self.clients.get_or_try(new_client)
    }

    /// The metric label of `route` (one of `self.routes`).
    pub fn label(&self, route: &RouteConfig) -> &'static str {
        self.routes
            .iter()
            .position(|r| std::ptr::eq(r, route))
            .and_then(|i| self.labels.get(i).copied())
            .unwrap_or("other")
    }

    /// The route whose prefix `path` falls under (routes are sorted longest prefix first).
    pub fn route_for(&self, path: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| under_prefix(path, &r.prefix))
    }
}

/// upstream base + (path, minus the prefix when `strip_prefix`) + query.
pub fn upstream_uri(
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
    let mut full = format!(
        "{}://{}{}{}",
        route.upstream.scheme(),
        authority(&route.upstream),
        base,
        rest
    );
    if base.is_empty() && rest.is_empty() {
        full.push('/');
    }
    if let Some(q) = query {
        full.push('?');
        full.push_str(q);
    }
    Ok(full.parse::<Uri>()?)
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

    #[test]
    fn joins() {
        let r = route("http://127.0.0.1:3000", false);
        assert_eq!(
            upstream_uri(&r, "/api/x", Some("a=1"))
                .expect("uri")
                .to_string(),
            "http://127.0.0.1:3000/api/x?a=1"
        );
        let s = route("http://up:3000/base/", true);
        assert_eq!(
            upstream_uri(&s, "/api/x", None).expect("uri").to_string(),
            "http://up:3000/base/x"
        );
        assert_eq!(
            upstream_uri(&s, "/api", None).expect("uri").to_string(),
            "http://up:3000/base"
        );
        let root = route("http://up:3000", true);
        assert_eq!(
            upstream_uri(&root, "/api", None).expect("uri").to_string(),
            "http://up:3000/"
        );
    }
}
