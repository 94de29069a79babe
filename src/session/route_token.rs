//! One token per API: routes with `resource`/`scopes` get an access token for exactly that
//! audience and those scopes (a downscoped refresh grant, RFC 8707 §2.2), `token = "client"`
//! routes a client-credentials token (RFC 6749 §4.4). Tokens are cached in memory until shortly
//! before they expire, and each cache key is single-flight: one grant per (session, resource,
//! scopes) however many requests wait for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cookie::RequestCookies;
use oauth2::AccessToken;
use sha2::{Digest, Sha256};

use super::extract::store_error;
use super::refresh::RefreshError;
use super::tokens::Session;
use crate::config::RouteConfig;
use crate::error::ApiError;
use crate::idp::{IdpError, TokenTarget};
use crate::state::AppState;

/// Bound on cached tokens (memory stays flat whatever the number of sessions).
const MAX_ENTRIES: usize = 10_000;
/// How long a token whose lifetime the IdP did not state is used.
const UNKNOWN_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Cached {
    token: AccessToken,
    fresh_until: Instant,
}

/// An error answer, kept so that the requests that waited for a failed grant get the same answer
/// without a grant of their own (the cause is logged once, with the request that made the grant).
#[derive(Clone)]
struct Failure {
    status: http::StatusCode,
    code: &'static str,
    description: String,
    /// Until when the same answer is given without asking the IdP again (back-off): a refusal
    /// will not change soon, and an IdP that is down should not get a grant per API call.
    until: Option<Instant>,
}

/// How long an IdP failure (503) is answered from the cache.
const TRANSIENT_BACKOFF: Duration = Duration::from_secs(2);
/// How long a refusal (403 `invalid_target` / `invalid_scope`) is.
const REFUSAL_BACKOFF: Duration = Duration::from_secs(10);

impl From<&ApiError> for Failure {
    fn from(e: &ApiError) -> Self {
        let backoff = match e.status {
            http::StatusCode::SERVICE_UNAVAILABLE => Some(TRANSIENT_BACKOFF),
            http::StatusCode::FORBIDDEN => Some(REFUSAL_BACKOFF),
            _ => None,
        };
        Failure {
            status: e.status,
            code: e.code,
            description: e.description.to_string(),
            until: backoff.map(|b| Instant::now() + b),
        }
    }
}

#[derive(Default)]
struct Flight {
    /// The session whose token this is (`None`: the client's own), so that logout finds it.
    session: Option<String>,
    /// Grants attempted under this key: a waiter that sees it move took no part in the attempt's
    /// start, and takes its outcome instead of starting another.
    attempts: AtomicU64,
    slot: tokio::sync::Mutex<Option<Result<Cached, Failure>>>,
}

/// The per-route token cache. Tokens never leave it but into an upstream `Authorization` header;
/// `Debug` shows nothing.
#[derive(Default)]
pub struct RouteTokens {
    flights: Mutex<HashMap<[u8; 32], Arc<Flight>>>,
}

impl std::fmt::Debug for RouteTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteTokens")
    }
}

/// The cache key: who the token is for, and its exact audience and scopes.
fn key(owner: &str, target: &TokenTarget) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(owner.as_bytes());
    for part in [&target.resources, &target.scopes] {
        h.update([0xff]);
        for s in part {
            h.update(s.as_bytes());
            h.update([0]);
        }
    }
    h.finalize().into()
}

/// Until when a token that lives `expires_in` seconds is used: like the session's own token
/// (`oauth.refresh_skew_s`, at most half the lifetime), so it is never sent about to expire.
fn fresh_until(obtained: Instant, expires_in: Option<u64>, skew: Duration) -> Instant {
    match expires_in {
        Some(life) => {
            let window = skew.as_secs().min(life / 2);
            obtained + Duration::from_secs(life.saturating_sub(window))
        }
        None => obtained + UNKNOWN_LIFETIME,
    }
}

impl RouteTokens {
    fn flight(&self, k: [u8; 32], session: Option<&str>) -> Arc<Flight> {
        let new = || {
            Arc::new(Flight {
                session: session.map(str::to_owned),
                ..Flight::default()
            })
        };
        let Ok(mut map) = self.flights.lock() else {
            return new();
        };
        if let Some(f) = map.get(&k) {
            return Arc::clone(f);
        }
        if map.len() >= MAX_ENTRIES {
            let now = Instant::now();
            // Keep what is in use or still fresh; if that is still too much, keep what is in use.
            let keep = |f: &Arc<Flight>, fresh_only: bool| {
                Arc::strong_count(f) > 1
                    || match f.slot.try_lock() {
                        Ok(slot) => {
                            fresh_only && matches!(&*slot, Some(Ok(c)) if c.fresh_until > now)
                        }
                        Err(_) => true,
                    }
            };
            map.retain(|_, f| keep(f, true));
            if map.len() >= MAX_ENTRIES {
                map.retain(|_, f| keep(f, false));
            }
        }
        let f = new();
        map.insert(k, Arc::clone(&f));
        f
    }

    /// Forgets every token held for `session` (logout) and returns those still usable, for
    /// revocation. A grant under way is left to finish; its token then expires unused.
    pub fn take_session(&self, session: &str) -> Vec<AccessToken> {
        let Ok(mut map) = self.flights.lock() else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut tokens = Vec::new();
        map.retain(|_, f| {
            if f.session.as_deref() != Some(session) {
                return true;
            }
            if let Ok(slot) = f.slot.try_lock() {
                if let Some(Ok(c)) = &*slot {
                    if c.fresh_until > now {
                        tokens.push(c.token.clone());
                    }
                }
            }
            false
        });
        tokens
    }

    /// The cached token for `k`, or the one `fetch` obtains (once for all concurrent callers).
    async fn get_or_fetch<F, Fut>(
        &self,
        k: [u8; 32],
        session: Option<&str>,
        fetch: F,
    ) -> Result<AccessToken, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Cached, ApiError>>,
    {
        let flight = self.flight(k, session);
        let seen = flight.attempts.load(Ordering::SeqCst);
        let mut slot = flight.slot.lock().await;
        match &*slot {
            Some(Ok(c)) if c.fresh_until > Instant::now() => return Ok(c.token.clone()),
            Some(Err(f))
                if flight.attempts.load(Ordering::SeqCst) != seen
                    || f.until.is_some_and(|u| u > Instant::now()) =>
            {
                return Err(ApiError::new(f.status, f.code, f.description.clone()));
            }
            _ => {}
        }
        // Boxed: a grant is a large future, and only a miss needs it.
        let result = Box::pin(fetch()).await;
        *slot = Some(match &result {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(Failure::from(e)),
        });
        flight.attempts.fetch_add(1, Ordering::SeqCst);
        result.map(|c| c.token)
    }

    /// How many keys are held (bounded by [`MAX_ENTRIES`] plus those in use).
    pub fn len(&self) -> usize {
        self.flights.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The user's token for `route`: the session's own access token (refreshed when due) for a
/// route without `resource`/`scopes`, else a token for exactly the route's audience and scopes.
pub async fn user_token(
    state: &AppState,
    cookies: &RequestCookies,
    session: &mut Arc<Session>,
    route: &RouteConfig,
) -> Result<AccessToken, ApiError> {
    if let Some(exchange) = &route.exchange {
        // Boxed: a large future, so the common path's future (moved through the middleware)
        // stays small.
        return Box::pin(exchanged_token(state, cookies, session, route, exchange)).await;
    }
    if !route.wants_own_token() {
        super::extract::ensure_fresh(state, cookies, session).await?;
        return Ok(session.access_token.clone());
    }
    let target = TokenTarget::of(route);
    let k = key(&format!("user\0{}", session.id), &target);
    let skew = state.config.oauth.refresh_skew;
    let target = &target;
    let sid = session.id.clone();
    state
        .route_tokens
        .get_or_fetch(k, Some(&sid), || async move {
            let obtained = Instant::now();
            // In a task of its own: once the IdP may have rotated the refresh token, the new
            // one must be recorded even if this request goes away meanwhile.
            let grant = {
                let (state, s, t) = (state.clone(), session.clone(), target.clone());
                tokio::spawn(async move { state.store.downscope(&state.idp, &s, &t).await })
            };
            let outcome = grant.await.map_err(|e| {
                ApiError::internal(anyhow::anyhow!("the downscoped grant task failed: {e}"))
            })?;
            let out = match outcome {
                Ok(out) => out,
                Err(e) => {
                    if matches!(e, RefreshError::Fatal(_)) {
                        tracing::info!(reason = %e, "session ended by the authorization server");
                        state.store.remove(cookies, Some(session)).await;
                    }
                    return Err(grant_error(e, &route.prefix));
                }
            };
            if let Some(rotated) = out.rotated {
                *session = Arc::new(rotated);
                // Server-side stores wrote it under the lease already.
                if !state.store.is_server_side() {
                    state
                        .store
                        .save(cookies, Arc::make_mut(session))
                        .await
                        .map_err(store_error)?;
                }
            }
            state.metrics.refresh("downscoped");
            Ok(Cached {
                token: out.token.access_token,
                fresh_until: fresh_until(obtained, out.token.expires_in, skew),
            })
        })
        .await
}

/// The session's (fresh) access token exchanged for one meant for the route's audience and
/// scope (RFC 8693), cached per (session, audience, scope).
async fn exchanged_token(
    state: &AppState,
    cookies: &RequestCookies,
    session: &mut Arc<Session>,
    route: &RouteConfig,
    exchange: &crate::config::Exchange,
) -> Result<AccessToken, ApiError> {
    let target = TokenTarget {
        resources: vec![exchange.audience.clone()],
        scopes: exchange.scope.iter().cloned().collect(),
    };
    let k = key(&format!("exchange\0{}", session.id), &target);
    let skew = state.config.oauth.refresh_skew;
    let sid = session.id.clone();
    state
        .route_tokens
        .get_or_fetch(k, Some(&sid), || async move {
            super::extract::ensure_fresh(state, cookies, session).await?;
            let obtained = Instant::now();
            let t = state
                .idp
                .exchange_token(&session.access_token, exchange)
                .await
                .map_err(|e| match &e {
                    IdpError::OAuth { .. } => grant_error(RefreshError::Refused(e), &route.prefix),
                    _ => grant_error(RefreshError::Transient(e), &route.prefix),
                })?;
            state.metrics.refresh("exchanged");
            Ok(Cached {
                token: t.access_token,
                fresh_until: fresh_until(obtained, t.expires_in, skew),
            })
        })
        .await
}

/// The client's own token for `route` (client-credentials grant with the route's resource and
/// scopes), cached per route.
pub async fn client_token(state: &AppState, route: &RouteConfig) -> Result<AccessToken, ApiError> {
    let target = TokenTarget::of(route);
    let k = key(&format!("client\0{}", route.prefix), &target);
    let skew = state.config.oauth.refresh_skew;
    let target = &target;
    state
        .route_tokens
        .get_or_fetch(k, None, || async move {
            let obtained = Instant::now();
            let t = state
                .idp
                .client_credentials(target)
                .await
                .map_err(|e| match &e {
                    IdpError::OAuth { error, .. }
                        if matches!(error.as_str(), "invalid_target" | "invalid_scope") =>
                    {
                        grant_error(RefreshError::Refused(e), &route.prefix)
                    }
                    _ => grant_error(RefreshError::Transient(e), &route.prefix),
                })?;
            Ok(Cached {
                token: t.access_token,
                fresh_until: fresh_until(obtained, t.expires_in, skew),
            })
        })
        .await
}

/// A failed grant as the SPA sees it.
fn grant_error(e: RefreshError, prefix: &str) -> ApiError {
    match e {
        RefreshError::Refused(cause) => {
            let code = match &cause {
                IdpError::OAuth { error, .. } if error == "invalid_scope" => "invalid_scope",
                _ => "invalid_target",
            };
            ApiError::new(
                http::StatusCode::FORBIDDEN,
                code,
                format!(
                    "the authorization server will not issue a token for the API behind {prefix} (audience or scopes not granted)"
                ),
            )
            .with_cause(cause)
        }
        RefreshError::NoRefreshToken => ApiError::new(
            http::StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the session has no refresh token to obtain this API's token with: log in again",
        ),
        RefreshError::Fatal(_) => ApiError::new(
            http::StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "the session has ended: log in again",
        ),
        RefreshError::Transient(cause) => {
            ApiError::unavailable("the authorization server is unavailable; try again shortly")
                .with_cause(cause)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(r: &[&str], s: &[&str]) -> TokenTarget {
        TokenTarget {
            resources: r.iter().map(|x| x.to_string()).collect(),
            scopes: s.iter().map(|x| x.to_string()).collect(),
        }
    }

    #[test]
    fn keys_tell_sessions_audiences_and_scopes_apart() {
        let a = target(&["http://a/"], &["x"]);
        assert_eq!(key("s1", &a), key("s1", &a.clone()));
        assert_ne!(key("s1", &a), key("s2", &a));
        assert_ne!(key("s1", &a), key("s1", &target(&["http://b/"], &["x"])));
        assert_ne!(key("s1", &a), key("s1", &target(&["http://a/"], &["y"])));
        // No ambiguity between a resource and a scope of the same text.
        assert_ne!(
            key("s1", &target(&["x"], &[])),
            key("s1", &target(&[], &["x"]))
        );
    }

    #[test]
    fn tokens_are_used_until_shortly_before_expiry() {
        let t0 = Instant::now();
        let skew = Duration::from_secs(30);
        assert_eq!(
            fresh_until(t0, Some(300), skew),
            t0 + Duration::from_secs(270)
        );
        assert_eq!(fresh_until(t0, Some(10), skew), t0 + Duration::from_secs(5));
        assert_eq!(fresh_until(t0, None, skew), t0 + UNKNOWN_LIFETIME);
    }

    #[tokio::test]
    async fn one_fetch_for_concurrent_callers_and_cached_after() {
        let cache = Arc::new(RouteTokens::default());
        let calls = Arc::new(AtomicU64::new(0));
        let k = key("s", &target(&["http://a/"], &[]));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let cache = Arc::clone(&cache);
            let calls = Arc::clone(&calls);
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(k, Some("s"), || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(Cached {
                            token: AccessToken::new("t".into()),
                            fresh_until: Instant::now() + Duration::from_secs(60),
                        })
                    })
                    .await
                    .map(|t| t.secret().clone())
                    .ok()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.ok().flatten().as_deref(), Some("t"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.take_session("other").len(), 0);
        assert_eq!(cache.len(), 1);
        let taken = cache.take_session("s");
        assert_eq!(
            taken
                .iter()
                .map(|t| t.secret().as_str())
                .collect::<Vec<_>>(),
            ["t"]
        );
        assert!(cache.is_empty(), "logout forgets the session's tokens");
    }

    #[tokio::test]
    async fn failures_are_answered_from_the_cache_for_a_while() {
        let cache = RouteTokens::default();
        let calls = AtomicU64::new(0);
        for (status, k) in [
            (
                http::StatusCode::SERVICE_UNAVAILABLE,
                key("s", &target(&["http://a/"], &[])),
            ),
            (
                http::StatusCode::FORBIDDEN,
                key("s", &target(&["http://b/"], &[])),
            ),
        ] {
            for _ in 0..3 {
                let r = cache
                    .get_or_fetch(k, Some("s"), || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Err(ApiError::new(status, "x", "failed"))
                    })
                    .await;
                assert_eq!(r.err().map(|e| e.status), Some(status));
            }
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one attempt per key, then back-off"
        );
        // A 401 (the session ended) is not cached: the next call tries again.
        let k = key("s", &target(&["http://c/"], &[]));
        for _ in 0..2 {
            let _ = cache
                .get_or_fetch(k, Some("s"), || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(ApiError::new(http::StatusCode::UNAUTHORIZED, "x", "ended"))
                })
                .await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
