//! Where sessions live.
//! - `cookie` (the embedded default): the whole session, sealed, in the browser's cookies;
//!   stateless, nothing to run, cannot be revoked server-side.
//! - `redis`: the cookie holds a sealed opaque session id; the tokens live in Redis, sealed at rest,
//!   shared by every replica ([`super::store_redis`]).
//!
//! Swapping the backend edits `store*.rs` only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cookie::{CookieRules, RequestCookies};
use super::refresh::{grant, grant_for, RefreshError, Rotations};
use super::seal::Sealer;
use super::store_redis::RedisStore;
use super::tokens::Session;
use crate::idp::{Idp, TokenResponse, TokenTarget};
use crate::metrics::Metrics;

/// What a store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the session does not fit in the allowed cookies")]
    TooLarge,
    #[error("the session store is unavailable: {0}")]
    Unavailable(String),
    #[error("the session was changed by another request")]
    Conflict,
}

/// A loaded session, or why there is none.
// Built once per request and consumed at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Loaded {
    None,
    /// The browser sent a session cookie that we could not use (tampered, old key, junk, or a
    /// session that no longer exists server-side).
    Unreadable,
    /// Shared with the cache of opened sessions: copied only if the caller changes it.
    Some(Arc<Session>),
}

#[derive(Debug, Clone)]
enum Backend {
    Cookie,
    Redis(Arc<RedisStore>),
}

/// The session backend, with the cookie rules both backends share.
#[derive(Debug, Clone)]
pub struct SessionStore {
    backend: Backend,
    sealer: Sealer,
    rules: CookieRules,
    absolute: Duration,
    idle: Duration,
    metrics: Arc<Metrics>,
    /// Cookie store: sessions by their sealed cookie value.
    opened: Arc<OpenedCache>,
    /// Redis store: session ids by their sealed cookie value (opening it is a third of a
    /// Redis-store call's own work; the session itself is still read from Redis every time).
    opened_ids: Arc<OpenedCache<Arc<str>>>,
    /// Cookie store: refresh-token rotations seen by this process.
    rotations: Arc<Rotations>,
}

/// What a downscoped refresh grant gave.
#[derive(Debug)]
pub struct Downscoped {
    /// The IdP's answer; its access token is for the target only.
    pub token: TokenResponse,
    /// The session with the rotated refresh token, when the IdP rotated it: already persisted
    /// server-side; with the cookie store the caller writes the cookie.
    pub rotated: Option<Session>,
}

/// Cookie-store sessions already opened, by their sealed cookie value. A browser sends the same
/// cookie with every API call, and opening it (base64, XChaCha20-Poly1305, JSON) is the cookie
/// store's main cost per request. A sealed value always opens to the same session, so an entry
/// never goes stale: idle and absolute timeouts are still checked on every load, and a value
/// that was never opened here is opened (and authenticated) as before.
///
/// Two generations: lookups and inserts go to the current one, a hit in the previous one moves
/// the entry over, and every [`OPENED_PERIOD`] (or when the current one reaches its share of the
/// bounds) the previous generation is dropped and the current one becomes it. So an entry lives
/// while its session is in use and at most two periods after, and the memory held follows the
/// sessions active in the last few minutes, never more than [`OPENED_MAX`] entries and
/// [`OPENED_MAX_BYTES`].
pub(crate) struct OpenedCache<V = Arc<Session>> {
    gens: Mutex<Generations<V>>,
}

impl<V> Default for OpenedCache<V> {
    fn default() -> Self {
        Self {
            gens: Mutex::new(Generations {
                current: HashMap::default(),
                previous: HashMap::default(),
                current_bytes: 0,
                started: None,
            }),
        }
    }
}

/// What an opened sealed value is: a session (cookie store; Redis store, by its stored value),
/// or a session id (the Redis store's session cookie).
pub(crate) trait Opened: Clone {
    /// The session it belongs to, for [`OpenedCache::forget`].
    fn session_id(&self) -> &str;
}

impl Opened for Arc<Session> {
    fn session_id(&self) -> &str {
        &self.id
    }
}

impl Opened for Arc<str> {
    fn session_id(&self) -> &str {
        self
    }
}

/// Keyed by [`OpenedCache::key`], already a keyed SipHash of the value: hashed once, not twice.
type OpenedMap<V> = HashMap<u64, (Box<[u8]>, V), std::hash::BuildHasherDefault<KeyIsHash>>;

/// The hasher of [`OpenedMap`]: the key is itself a hash with a secret key, so it is used as is
/// (no flooding a bucket without knowing the secret).
#[derive(Default)]
struct KeyIsHash(u64);

impl std::hash::Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (u64 keys); fold anything else in, just in case.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Generations<V> {
    current: OpenedMap<V>,
    previous: OpenedMap<V>,
    /// Estimated bytes held by `current`.
    current_bytes: usize,
    started: Option<Instant>,
}

impl<V> std::fmt::Debug for OpenedCache<V> {
    // Entries hold cookie values: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.gens.lock().map_or(0, |g| g.len());
        write!(f, "OpenedCache({n} entries)")
    }
}

/// At most this many opened sessions are kept, over both generations.
const OPENED_MAX: usize = 1024;
/// At most about this many bytes of them (sealed value + session, estimated), over both.
const OPENED_MAX_BYTES: usize = 4 << 20;
/// How long a generation lasts.
const OPENED_PERIOD: Duration = Duration::from_secs(120);

/// An entry's estimated bytes: the sealed value plus what it opens to (which is smaller than
/// the value's base64 ciphertext), plus the map's own overhead.
fn entry_cost(sealed: &[u8]) -> usize {
    2 * sealed.len() + 128
}

impl<V> Generations<V> {
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    fn rotate(&mut self, now: Instant) {
        self.previous = std::mem::take(&mut self.current);
        self.current_bytes = 0;
        self.started = Some(now);
    }

    fn rotate_if_due(&mut self, now: Instant) {
        match self.started {
            Some(t) if now.saturating_duration_since(t) < OPENED_PERIOD => {}
            Some(_) => self.rotate(now),
            None => self.started = Some(now),
        }
    }

    fn insert(&mut self, k: u64, sealed: Box<[u8]>, session: V, now: Instant) {
        let cost = entry_cost(&sealed);
        if self.current.len() >= OPENED_MAX / 2 || self.current_bytes + cost > OPENED_MAX_BYTES / 2
        {
            self.rotate(now);
        }
        if let Some((old, _)) = self.current.insert(k, (sealed, session)) {
            self.current_bytes = self.current_bytes.saturating_sub(entry_cost(&old));
        }
        self.current_bytes += cost;
    }
}

impl<V: Opened> OpenedCache<V> {
    /// The sealed value's tail is its AEAD tag (random per seal): enough to find the entry,
    /// which then must match the whole value.
    fn key(sealed: &[u8]) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let tail = &sealed[sealed.len().saturating_sub(24)..];
        let mut h = RANDOM_STATE.build_hasher();
        h.write(tail);
        h.finish()
    }

    pub(crate) fn get(&self, sealed: impl AsRef<[u8]>) -> Option<V> {
        self.get_at(sealed.as_ref(), Instant::now())
    }

    fn get_at(&self, sealed: &[u8], now: Instant) -> Option<V> {
        let mut g = self.gens.lock().ok()?;
        g.rotate_if_due(now);
        let k = Self::key(sealed);
        if let Some((v, s)) = g.current.get(&k) {
            return (**v == *sealed).then(|| s.clone());
        }
        match g.previous.remove(&k) {
            Some((v, s)) if *v == *sealed => {
                let out = s.clone();
                g.insert(k, v, s, now);
                Some(out)
            }
            Some(other) => {
                // Same key, other value: leave the entry where it was.
                g.previous.insert(k, other);
                None
            }
            None => None,
        }
    }

    pub(crate) fn put(&self, sealed: impl AsRef<[u8]>, session: &V) {
        self.put_at(sealed.as_ref(), session, Instant::now());
    }

    fn put_at(&self, sealed: &[u8], session: &V, now: Instant) {
        if let Ok(mut g) = self.gens.lock() {
            g.rotate_if_due(now);
            g.insert(Self::key(sealed), sealed.into(), session.clone(), now);
        }
    }

    /// An ended session is not kept: every value it was sealed to (each touch or refresh made
    /// one) is dropped. Logouts are rare; the scan is over at most [`OPENED_MAX`] entries.
    pub(crate) fn forget(&self, sid: &str) {
        if let Ok(mut guard) = self.gens.lock() {
            let g = &mut *guard;
            let mut freed = 0;
            g.current.retain(|_, (v, s)| {
                let keep = s.session_id() != sid;
                if !keep {
                    freed += entry_cost(v);
                }
                keep
            });
            g.current_bytes = g.current_bytes.saturating_sub(freed);
            g.previous.retain(|_, (_, s)| s.session_id() != sid);
        }
    }
}

static RANDOM_STATE: std::sync::LazyLock<std::collections::hash_map::RandomState> =
    std::sync::LazyLock::new(std::collections::hash_map::RandomState::new);

impl SessionStore {
    /// `redis`: `None` for the cookie store.
    pub fn new(
        redis: Option<Arc<RedisStore>>,
        sealer: Sealer,
        rules: CookieRules,
        idle: Duration,
        absolute: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            backend: redis.map_or(Backend::Cookie, Backend::Redis),
            sealer,
            rules,
            absolute,
            idle,
            metrics,
            opened: Arc::default(),
            opened_ids: Arc::default(),
            rotations: Arc::default(),
        }
    }

    pub fn rules(&self) -> &CookieRules {
        &self.rules
    }

    /// True when sessions live on the server (revocable, shared by replicas).
    pub fn is_server_side(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    pub fn redis_store(&self) -> Option<&Arc<RedisStore>> {
        match &self.backend {
            Backend::Redis(r) => Some(r),
            Backend::Cookie => None,
        }
    }

    fn observe<T>(&self, op: &'static str, started: Instant, r: &Result<T, StoreError>) {
        self.metrics.store_op(op, started.elapsed(), r.is_ok());
    }

    pub async fn load(&self, cookies: &RequestCookies) -> Result<Loaded, StoreError> {
        let started = Instant::now();
        let r = self.load_inner(cookies).await;
        self.observe("load", started, &r);
        r
    }

    async fn load_inner(&self, cookies: &RequestCookies) -> Result<Loaded, StoreError> {
        let Some(sealed) = self.rules.read_session(cookies) else {
            return Ok(if self.rules.has_session_cookie(cookies) {
                Loaded::Unreadable
            } else {
                Loaded::None
            });
        };
        match &self.backend {
            Backend::Cookie => {
                if let Some(s) = self.opened.get(&sealed) {
                    return Ok(Loaded::Some(s));
                }
            }
            Backend::Redis(r) => {
                if let Some(sid) = self.opened_ids.get(&sealed) {
                    return Ok(Box::pin(r.get(&sid))
                        .await?
                        .map_or(Loaded::Unreadable, Loaded::Some));
                }
            }
        }
        let Some(plain) = self
            .sealer
            .open(self.rules.session_name().as_bytes(), &sealed)
        else {
            return Ok(Loaded::Unreadable);
        };
        match &self.backend {
            Backend::Cookie => match serde_json::from_slice::<Session>(&plain) {
                Ok(s) => {
                    let s = Arc::new(s);
                    self.opened.put(&sealed, &s);
                    Ok(Loaded::Some(s))
                }
                Err(_) => Ok(Loaded::Unreadable),
            },
            Backend::Redis(r) => {
                let Ok(sid) = std::str::from_utf8(&plain) else {
                    return Ok(Loaded::Unreadable);
                };
                self.opened_ids.put(&sealed, &Arc::from(sid));
                Ok(Box::pin(r.get(sid))
                    .await?
                    .map_or(Loaded::Unreadable, Loaded::Some))
            }
        }
    }

    /// Persists `session` and (re)writes its cookie. With Redis the write is a compare-and-swap on
    /// `session.generation`, which is advanced on success.
    pub async fn save(
        &self,
        cookies: &RequestCookies,
        session: &mut Session,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.save_inner(cookies, session).await;
        self.observe("save", started, &r);
        r
    }

    fn cookie_max_age(&self, session: &Session) -> Duration {
        let now = super::tokens::now_s();
        Duration::from_secs(session.absolute_deadline(self.absolute).saturating_sub(now))
    }

    async fn save_inner(
        &self,
        cookies: &RequestCookies,
        session: &mut Session,
    ) -> Result<(), StoreError> {
        let cookie_value = match &self.backend {
            Backend::Cookie => serde_json::to_vec(session).map_err(|_| StoreError::TooLarge)?,
            Backend::Redis(r) => {
                Box::pin(r.put(session, self.idle, self.absolute)).await?;
                session.id.as_bytes().to_vec()
            }
        };
        let sealed = self
            .sealer
            .seal(self.rules.session_name().as_bytes(), &cookie_value);
        if self
            .rules
            .write_session(cookies, &sealed, self.cookie_max_age(session))
        {
            Ok(())
        } else {
            Err(StoreError::TooLarge)
        }
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> bool {
        match &self.backend {
            Backend::Cookie => true,
            Backend::Redis(r) => r.ping().await,
        }
    }

    /// Ends the session: its cookies are cleared and, server-side, it is deleted for every replica.
    pub async fn remove(&self, cookies: &RequestCookies, session: Option<&Session>) {
        if let Some(s) = session {
            match &self.backend {
                Backend::Cookie => self.opened.forget(&s.id),
                Backend::Redis(_) => self.opened_ids.forget(&s.id),
            }
        }
        if let (Backend::Redis(r), Some(s)) = (&self.backend, session) {
            let started = Instant::now();
            let res = Box::pin(r.delete(s)).await;
            self.observe("delete", started, &res);
            if let Err(e) = res {
                tracing::warn!(error = %e, "could not delete the session from the store");
            }
        }
        self.rules.clear_session(cookies);
    }

    /// Refreshes the session's tokens. Cookie store: the grant alone (the caller writes the
    /// cookie). Redis: coordinated across replicas with a lease, persisted with compare-and-swap.
    pub async fn refresh(&self, idp: &Idp, session: &Session) -> Result<Session, RefreshError> {
        match &self.backend {
            Backend::Cookie => {
                let lock = self.rotations.lock_for(&session.id);
                let _serialised = lock.lock().await;
                let current = self.rotations.latest(session);
                let next = grant(idp, &current).await?;
                if let (Some(old), Some(new)) = (&current.refresh_token, &next.refresh_token) {
                    self.rotations.record(&session.id, old, new);
                }
                Ok(next)
            }
            Backend::Redis(r) => {
                r.refresh_coordinated(idp, session, self.idle, self.absolute)
                    .await
            }
        }
    }

    /// A token for `target` only, by a refresh grant with `resource`/`scope` (RFC 8707 §2.2).
    /// Spending the session's refresh token is serialised with every other refresh of the session
    /// (a lock in-process; the refresh lease with Redis), and a rotated refresh token is kept.
    pub async fn downscope(
        &self,
        idp: &Idp,
        session: &Session,
        target: &TokenTarget,
    ) -> Result<Downscoped, RefreshError> {
        match &self.backend {
            Backend::Cookie => {
                let lock = self.rotations.lock_for(&session.id);
                let _serialised = lock.lock().await;
                let mut current = self.rotations.latest(session);
                let token = grant_for(idp, &current, target).await?;
                let rotated = match (&current.refresh_token, &token.refresh_token) {
                    (Some(old), Some(new)) if old.secret() != new.secret() => {
                        self.rotations.record(&session.id, old, new);
                        current.refresh_token = Some(new.clone());
                        Some(current)
                    }
                    _ => None,
                };
                Ok(Downscoped { token, rotated })
            }
            Backend::Redis(r) => {
                r.downscope_coordinated(idp, session, target, self.idle, self.absolute)
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(sub: &str) -> Arc<Session> {
        serde_json::from_value(serde_json::json!({
            "sid": "sid", "at": "at", "sub": sub, "iat": 1, "seen": 1, "gen": 0
        }))
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("session json: {e}"))
    }

    #[test]
    fn opened_cache_answers_only_for_the_exact_sealed_value() {
        let cache = OpenedCache::default();
        let sealed = format!("{}{}", "A".repeat(100), "tagtagtagtagtagtagtagtag");
        cache.put(&sealed, &session("alice"));
        assert_eq!(
            cache.get(&sealed).map(|s| s.subject.clone()),
            Some("alice".into())
        );
        // Same tail (the lookup key), other body: never served from the cache.
        let forged = format!("{}{}", "B".repeat(100), "tagtagtagtagtagtagtagtag");
        assert!(cache.get(&forged).is_none());
        assert!(cache.get("tagtagtagtagtagtagtagtag").is_none());
        assert!(
            !format!("{cache:?}").contains("tagtag"),
            "Debug prints a cookie value"
        );
    }

    #[test]
    fn opened_cache_stays_bounded() {
        let cache = OpenedCache::default();
        for i in 0..(OPENED_MAX * 3) {
            cache.put(format!("value-{i:08}-and-some-tag-bytes"), &session("bob"));
        }
        let n = cache.gens.lock().map_or(usize::MAX, |g| g.len());
        assert!(n <= OPENED_MAX, "{n} entries");
        assert!(
            n >= OPENED_MAX / 2,
            "{n} entries: the bound is not the whole story"
        );
    }

    #[test]
    fn opened_cache_bounds_bytes_too() {
        let cache = OpenedCache::default();
        let big = "x".repeat(64 * 1024);
        for i in 0..200 {
            cache.put(format!("{big}{i:024}"), &session("carol"));
        }
        let (n, bytes) = cache.gens.lock().map_or((usize::MAX, usize::MAX), |g| {
            let all = g.current.values().chain(g.previous.values());
            (g.len(), all.map(|(v, _)| entry_cost(v)).sum())
        });
        assert!(bytes <= OPENED_MAX_BYTES, "{bytes} bytes in {n} entries");
        assert!(n < 200);
    }

    #[test]
    fn opened_cache_keeps_what_is_used_and_drops_the_rest() {
        let cache = OpenedCache::default();
        let t0 = Instant::now();
        let (used, idle) = (
            format!("{}{}", "U".repeat(100), "used-tag-used-tag-used-t"),
            format!("{}{}", "I".repeat(100), "idle-tag-idle-tag-idle-t"),
        );
        cache.put_at(used.as_bytes(), &session("u"), t0);
        cache.put_at(idle.as_bytes(), &session("i"), t0);
        let later = |n: u32| t0 + OPENED_PERIOD * n + Duration::from_secs(1);
        for n in 1..=4 {
            assert!(
                cache.get_at(used.as_bytes(), later(n)).is_some(),
                "period {n}"
            );
        }
        // Two periods without a lookup: the idle entry is gone (it would be opened again).
        assert!(cache.get_at(idle.as_bytes(), later(4)).is_none());
        let n = cache.gens.lock().map_or(usize::MAX, |g| g.len());
        assert_eq!(n, 1);
    }

    #[test]
    fn opened_cache_forgets_every_value_of_an_ended_session() {
        let cache = OpenedCache::default();
        let t0 = Instant::now();
        let (a1, a2, b) = (
            format!("{}{}", "A".repeat(100), "tag1tag1tag1tag1tag1tag1"),
            format!("{}{}", "a".repeat(100), "tag2tag2tag2tag2tag2tag2"),
            format!("{}{}", "B".repeat(100), "tag3tag3tag3tag3tag3tag3"),
        );
        let (mut alice, bob) = (session("alice"), session("bob"));
        Arc::make_mut(&mut alice).id = "sid-alice".into();
        cache.put_at(a1.as_bytes(), &alice, t0);
        // A later value of the same session, in the next generation.
        cache.put_at(
            a2.as_bytes(),
            &alice,
            t0 + OPENED_PERIOD + Duration::from_secs(1),
        );
        cache.put_at(
            b.as_bytes(),
            &bob,
            t0 + OPENED_PERIOD + Duration::from_secs(1),
        );
        cache.forget("sid-alice");
        assert!(cache.get(&a1).is_none());
        assert!(cache.get(&a2).is_none());
        assert!(cache.get(&b).is_some(), "another session was forgotten");
        let bytes = cache.gens.lock().map_or(usize::MAX, |g| g.current_bytes);
        assert_eq!(bytes, entry_cost(b.as_bytes()));
    }
}
