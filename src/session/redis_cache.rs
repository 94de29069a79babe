//! A replica's own copy of the sessions it read from Redis (`session.redis_cache_ms` > 0): an API
//! call on a session read a moment ago then makes no Redis round trip at all.
//!
//! Kept correct by invalidation, not by expiry alone:
//! - every session write and delete publishes the session id on [`CHANNEL`] from inside the same
//!   Lua script as the write (atomic with it; see `store_redis`), on every replica, cache or not;
//! - a task subscribed on a connection of its own drops those entries as the messages arrive;
//! - entries are served only while that subscription is up and answers its heartbeat: a closed
//!   connection turns the cache off (and empties it) at once, a silent one within
//!   [`HEARTBEAT`] + [`HEARTBEAT_TIMEOUT`]; after a reconnect the cache starts empty, since
//!   messages may have been missed meanwhile;
//! - a read that began before an invalidation (or a change of the subscription) does not fill the
//!   cache: a session written by another replica while this one was reading it is never kept;
//! - no entry is served after `redis_cache_ms`, even if every message were lost.
//!
//! What remains is the delivery time of one message (well under a millisecond on a LAN): a
//! request that reaches another replica within that time after a logout can still be served.
//! That is the trade the operator makes by setting `redis_cache_ms`; without it every call reads
//! Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::tokens::Session;
use crate::metrics::CacheMetrics;

/// The channel session writes and deletes are announced on (payload: the session id).
pub const CHANNEL: &str = "tg:sessions:changed";
/// How often the subscription is checked with a PING.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long a PING may take before the subscription counts as lost.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Sessions kept at most (about 1–2 KB each); when full, expired entries go first, then all.
const MAX_ENTRIES: usize = 10_000;
/// Longest wait between two attempts to subscribe again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The cache of one Redis store.
pub struct LocalSessions {
    ttl: Duration,
    metrics: CacheMetrics,
    inner: Mutex<Inner>,
    follower: std::sync::Once,
}

struct Inner {
    /// Advanced by every invalidation and every change of the subscription: a read that began
    /// before one of them must not fill the cache.
    epoch: u64,
    /// The subscription is up: entries may be served and filled.
    up: bool,
    entries: HashMap<Arc<str>, (Instant, Arc<Session>)>,
}

/// What the cache says about a session id.
pub enum Lookup {
    /// A copy read from Redis less than `redis_cache_ms` ago, not changed since.
    Hit(Arc<Session>),
    /// Not here: read Redis, then [`LocalSessions::fill`] with this ticket.
    Miss(Ticket),
    /// The subscription is down: read Redis, keep nothing.
    Off,
}

/// When a read began (see [`LocalSessions::fill`]).
pub struct Ticket(u64);

impl LocalSessions {
    pub fn new(ttl: Duration, metrics: CacheMetrics) -> Arc<Self> {
        Arc::new(Self {
            ttl,
            metrics,
            inner: Mutex::new(Inner {
                epoch: 0,
                up: false,
                entries: HashMap::new(),
            }),
            follower: std::sync::Once::new(),
        })
    }

    /// Starts (once, on the current tokio runtime) the task that follows [`CHANNEL`] through one
    /// of `clients` (the next one after a failure: any node of a cluster hears every message).
    pub fn follow(self: &Arc<Self>, clients: &[redis::Client]) {
        self.follower.call_once(|| {
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return;
            };
            rt.spawn(follow(Arc::downgrade(self), clients.to_vec()));
        });
    }

    pub fn lookup(&self, sid: &str) -> Lookup {
        let found = self.lookup_at(sid, Instant::now());
        match &found {
            Lookup::Hit(_) => self.metrics.hit.inc(),
            Lookup::Miss(_) => self.metrics.miss.inc(),
            Lookup::Off => self.metrics.off.inc(),
        };
        found
    }

    fn lookup_at(&self, sid: &str, now: Instant) -> Lookup {
        let Ok(g) = self.inner.lock() else {
            return Lookup::Off;
        };
        if !g.up {
            return Lookup::Off;
        }
        match g.entries.get(sid) {
            Some((at, s)) if now.saturating_duration_since(*at) < self.ttl => {
                Lookup::Hit(s.clone())
            }
            _ => Lookup::Miss(Ticket(g.epoch)),
        }
    }

    /// Keeps `session`, read from Redis after `ticket` was taken, unless anything was invalidated
    /// or the subscription changed since.
    pub fn fill(&self, ticket: Ticket, session: &Arc<Session>) {
        self.fill_at(ticket, session, Instant::now());
    }

    fn fill_at(&self, ticket: Ticket, session: &Arc<Session>, now: Instant) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        if !g.up || g.epoch != ticket.0 {
            return;
        }
        if g.entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            g.entries
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
            if g.entries.len() >= MAX_ENTRIES {
                g.entries.clear();
            }
        }
        g.entries
            .insert(Arc::from(session.id.as_str()), (now, Arc::clone(session)));
    }

    /// Session `sid` was written or deleted (here or on another replica).
    pub fn invalidate(&self, sid: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.epoch += 1;
            g.entries.remove(sid);
        }
    }

    /// The subscription came up (from empty: messages may have been missed) or went down.
    fn set_up(&self, up: bool) {
        if let Ok(mut g) = self.inner.lock() {
            g.epoch += 1;
            g.up = up;
            g.entries.clear();
            self.metrics.up.set(i64::from(up));
        }
    }
}

/// Turns the cache off when the subscription ends, also when its task is dropped.
struct Down(Weak<LocalSessions>);

impl Drop for Down {
    fn drop(&mut self) {
        if let Some(cache) = self.0.upgrade() {
            cache.set_up(false);
        }
    }
}

/// Subscribes, follows, and subscribes again after a failure (backing off), until the store is
/// dropped.
async fn follow(cache: Weak<LocalSessions>, clients: Vec<redis::Client>) {
    let mut backoff = Duration::from_millis(100);
    // One warning per outage, not one per attempt.
    let mut warned = false;
    for client in clients.iter().cycle() {
        let mut came_up = false;
        match subscribed(&cache, client, &mut came_up).await {
            Ok(()) => return,
            Err(e) if came_up || !warned => {
                tracing::warn!(error = %e, "session cache off: the invalidation subscription is down");
            }
            Err(e) => tracing::debug!(error = %e, "session cache: subscribing failed again"),
        }
        if came_up {
            backoff = Duration::from_millis(100);
        }
        warned = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if cache.strong_count() == 0 {
            return;
        }
    }
}

/// One subscription: `Ok` when the store is gone, `Err` when the subscription failed or ended.
async fn subscribed(
    cache: &Weak<LocalSessions>,
    client: &redis::Client,
    came_up: &mut bool,
) -> redis::RedisResult<()> {
    let within = |d, what: &'static str| {
        move |_| redis::RedisError::from((redis::ErrorKind::IoError, what, format!("{d:?}")))
    };
    let pubsub = tokio::time::timeout(HEARTBEAT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(within(HEARTBEAT_TIMEOUT, "connect timed out"))??;
    let (mut sink, mut stream) = pubsub.split();
    tokio::time::timeout(HEARTBEAT_TIMEOUT, sink.subscribe(CHANNEL))
        .await
        .map_err(within(HEARTBEAT_TIMEOUT, "SUBSCRIBE timed out"))??;
    let Some(c) = cache.upgrade() else {
        return Ok(());
    };
    c.set_up(true);
    drop(c);
    *came_up = true;
    let _down = Down(cache.clone());
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::IoError,
                        "the subscription connection closed",
                    )));
                };
                let Some(c) = cache.upgrade() else {
                    return Ok(());
                };
                match std::str::from_utf8(msg.get_payload_bytes()) {
                    Ok(sid) => c.invalidate(sid),
                    // Not a session id: nothing known to drop, so drop everything.
                    Err(_) => c.set_up(true),
                }
            }
            _ = beat.tick() => {
                if cache.strong_count() == 0 {
                    return Ok(());
                }
                tokio::time::timeout(HEARTBEAT_TIMEOUT, sink.ping::<redis::Value>())
                    .await
                    .map_err(within(HEARTBEAT_TIMEOUT, "PING timed out"))??;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> Arc<Session> {
        let mut s: Session = serde_json::from_value(serde_json::json!({
            "sid": id, "sub": "alice", "at": "at", "iat": 1, "seen": 1
        }))
        .expect("a session");
        s.generation = 3;
        Arc::new(s)
    }

    fn hit(l: Lookup) -> Option<Arc<Session>> {
        match l {
            Lookup::Hit(s) => Some(s),
            _ => None,
        }
    }

    fn ticket(l: Lookup) -> Ticket {
        match l {
            Lookup::Miss(t) => t,
            Lookup::Hit(_) => panic!("a hit"),
            Lookup::Off => panic!("off"),
        }
    }

    #[test]
    fn nothing_is_served_or_kept_while_the_subscription_is_down() {
        let c = LocalSessions::new(Duration::from_secs(5), CacheMetrics::default());
        assert!(matches!(c.lookup("a"), Lookup::Off));
        c.set_up(true);
        let t = ticket(c.lookup("a"));
        c.set_up(false);
        c.fill(t, &session("a"));
        c.set_up(true);
        assert!(
            matches!(c.lookup("a"), Lookup::Miss(_)),
            "kept across a lost subscription"
        );
    }

    #[test]
    fn a_filled_session_is_served_until_the_ttl_then_read_again() {
        let c = LocalSessions::new(Duration::from_secs(5), CacheMetrics::default());
        c.set_up(true);
        let t0 = Instant::now();
        let t = ticket(c.lookup_at("a", t0));
        c.fill_at(t, &session("a"), t0);
        let s = hit(c.lookup_at("a", t0 + Duration::from_secs(4))).expect("served");
        assert_eq!((s.id.as_str(), s.generation), ("a", 3));
        assert!(matches!(
            c.lookup_at("a", t0 + Duration::from_secs(5)),
            Lookup::Miss(_)
        ));
    }

    #[test]
    fn an_invalidation_drops_the_session_and_only_it() {
        let c = LocalSessions::new(Duration::from_secs(5), CacheMetrics::default());
        c.set_up(true);
        for id in ["a", "b"] {
            let t = ticket(c.lookup(id));
            c.fill(t, &session(id));
        }
        c.invalidate("a");
        assert!(matches!(c.lookup("a"), Lookup::Miss(_)));
        assert!(hit(c.lookup("b")).is_some());
    }

    #[test]
    fn a_read_overtaken_by_an_invalidation_is_not_kept() {
        let c = LocalSessions::new(Duration::from_secs(5), CacheMetrics::default());
        c.set_up(true);
        // The read begins, another replica writes the session, its message arrives, then the
        // (now old) read answers: it must not be kept.
        let t = ticket(c.lookup("a"));
        c.invalidate("a");
        c.fill(t, &session("a"));
        assert!(matches!(c.lookup("a"), Lookup::Miss(_)));
    }

    #[test]
    fn a_reconnect_starts_from_empty() {
        let c = LocalSessions::new(Duration::from_secs(5), CacheMetrics::default());
        c.set_up(true);
        let t = ticket(c.lookup("a"));
        c.fill(t, &session("a"));
        c.set_up(true);
        assert!(matches!(c.lookup("a"), Lookup::Miss(_)));
    }

    #[test]
    fn a_full_cache_makes_room() {
        let c = LocalSessions::new(Duration::from_secs(5), CacheMetrics::default());
        c.set_up(true);
        let t0 = Instant::now();
        for i in 0..MAX_ENTRIES {
            let id = format!("s{i}");
            let t = ticket(c.lookup_at(&id, t0));
            c.fill_at(t, &session(&id), t0);
        }
        let later = t0 + Duration::from_secs(1);
        let t = ticket(c.lookup_at("new", later));
        c.fill_at(t, &session("new"), later);
        assert!(hit(c.lookup_at("new", later)).is_some());
        let n = c.inner.lock().expect("lock").entries.len();
        assert!(n <= MAX_ENTRIES, "{n} entries");
    }
}
