//! Where sessions live. The embedded default keeps the whole session, sealed, in the browser's
//! cookies (stateless; nothing to run). Swapping the backend edits this file only.

use std::sync::Arc;
use std::time::Duration;

use tower_cookies::Cookies;

use super::cookie::CookieRules;
use super::seal::Sealer;
use super::tokens::Session;
use crate::metrics::Metrics;

/// What a store can fail with (the cookie store cannot; the Redis store will).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the session does not fit in the allowed cookies")]
    TooLarge,
}

/// A loaded session, or why there is none.
#[derive(Debug)]
pub enum Loaded {
    None,
    /// The browser sent a session cookie that we could not open (tampered, old key, junk).
    Unreadable,
    Some(Session),
}

/// The session backend.
#[derive(Debug, Clone)]
pub struct SessionStore {
    sealer: Sealer,
    rules: CookieRules,
    absolute: Duration,
    metrics: Arc<Metrics>,
}

impl SessionStore {
    pub fn cookie(
        sealer: Sealer,
        rules: CookieRules,
        absolute: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            sealer,
            rules,
            absolute,
            metrics,
        }
    }

    pub fn rules(&self) -> &CookieRules {
        &self.rules
    }

    pub async fn load(&self, cookies: &Cookies) -> Result<Loaded, StoreError> {
        let started = std::time::Instant::now();
        let r = self.load_inner(cookies).await;
        self.metrics.store_op("load", started.elapsed(), r.is_ok());
        r
    }

    async fn load_inner(&self, cookies: &Cookies) -> Result<Loaded, StoreError> {
        let Some(sealed) = self.rules.read_session(cookies) else {
            return Ok(if self.rules.has_session_cookie(cookies) {
                Loaded::Unreadable
            } else {
                Loaded::None
            });
        };
        let name = self.rules.session_name().as_bytes();
        Ok(self
            .sealer
            .open(name, &sealed)
            .and_then(|plain| serde_json::from_slice::<Session>(&plain).ok())
            .map_or(Loaded::Unreadable, Loaded::Some))
    }

    pub async fn save(&self, cookies: &Cookies, session: &Session) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let r = self.save_inner(cookies, session).await;
        self.metrics.store_op("save", started.elapsed(), r.is_ok());
        r
    }

    async fn save_inner(&self, cookies: &Cookies, session: &Session) -> Result<(), StoreError> {
        let plain = serde_json::to_vec(session).map_err(|_| StoreError::TooLarge)?;
        let sealed = self
            .sealer
            .seal(self.rules.session_name().as_bytes(), &plain);
        let now = super::tokens::now_s();
        let left = session.absolute_deadline(self.absolute).saturating_sub(now);
        if self
            .rules
            .write_session(cookies, &sealed, Duration::from_secs(left))
        {
            Ok(())
        } else {
            Err(StoreError::TooLarge)
        }
    }

    /// Whether the store answers (the cookie store always does).
    pub async fn ping(&self) -> bool {
        true
    }

    pub async fn remove(&self, cookies: &Cookies, _session: Option<&Session>) {
        self.rules.clear_session(cookies);
    }
}
