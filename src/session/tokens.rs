//! What a session holds: the user's tokens and the times that bound the session's life.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oauth2::{AccessToken, RefreshToken};
use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One logged-in browser. Never serialised anywhere but into a sealed cookie or the store.
/// `AccessToken`/`RefreshToken` print `[redacted]` in `Debug`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Random session id (128 bits, base64url): keys refresh coordination and caches.
    #[serde(rename = "sid")]
    pub id: String,
    #[serde(rename = "at")]
    pub access_token: AccessToken,
    #[serde(rename = "rt", default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<RefreshToken>,
    #[serde(rename = "it", default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
    /// When the access token expires (Unix seconds); `None` when the IdP did not say.
    #[serde(rename = "exp", default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The access token's lifetime as issued (`expires_in`), to scale the refresh window.
    #[serde(rename = "life", default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<u64>,
    #[serde(rename = "scp", default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The ID token's `sub` and `sid` (kept apart so they need no re-parsing).
    #[serde(rename = "sub")]
    pub subject: String,
    #[serde(rename = "isid", default, skip_serializing_if = "Option::is_none")]
    pub idp_session_id: Option<String>,
    /// Session start (absolute timeout) and last use (idle timeout), Unix seconds.
    #[serde(rename = "iat")]
    pub created_at: u64,
    #[serde(rename = "seen")]
    pub last_seen: u64,
    /// Write generation in a server-side store (compare-and-swap); unused by the cookie store.
    #[serde(rename = "gen", default)]
    pub generation: u64,
}

/// Why a session is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Idle,
    Absolute,
}

impl Session {
    /// Seconds until the access token expires (0 when past); `None` when unknown.
    pub fn expires_in(&self, now: u64) -> Option<u64> {
        self.expires_at.map(|e| e.saturating_sub(now))
    }

    /// True when the access token expires within `skew` (so it must be refreshed before use).
    /// The window is at most half the token's lifetime: with tokens shorter than the skew, every
    /// call would otherwise spend a refresh grant.
    pub fn needs_refresh(&self, now: u64, skew: Duration) -> bool {
        let window = match self.lifetime {
            Some(life) => skew.as_secs().min(life / 2),
            None => skew.as_secs(),
        };
        match self.expires_at {
            Some(exp) => exp <= now.saturating_add(window),
            None => false,
        }
    }

    /// Checks the idle and absolute timeouts.
    pub fn check_timeouts(
        &self,
        now: u64,
        idle: Duration,
        absolute: Duration,
    ) -> Result<(), Expiry> {
        if now >= self.created_at.saturating_add(absolute.as_secs()) {
            return Err(Expiry::Absolute);
        }
        if now >= self.last_seen.saturating_add(idle.as_secs()) {
            return Err(Expiry::Idle);
        }
        Ok(())
    }

    /// When the session ends at the latest, whatever its use (Unix seconds).
    pub fn absolute_deadline(&self, absolute: Duration) -> u64 {
        self.created_at.saturating_add(absolute.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(now: u64) -> Session {
        Session {
            id: "sid".into(),
            access_token: AccessToken::new("at".into()),
            refresh_token: Some(RefreshToken::new("rt".into())),
            id_token: None,
            expires_at: Some(now + 100),
            lifetime: None,
            scope: None,
            subject: "alice".into(),
            idp_session_id: None,
            created_at: now,
            last_seen: now,
            generation: 0,
        }
    }

    #[test]
    fn refresh_skew() {
        let s = session(1000);
        assert!(!s.needs_refresh(1000, Duration::from_secs(30)));
        assert!(s.needs_refresh(1071, Duration::from_secs(30)));
        assert!(s.needs_refresh(1200, Duration::from_secs(0)));
        assert_eq!(s.expires_in(1200), Some(0));
    }

    #[test]
    fn refresh_window_is_at_most_half_the_lifetime() {
        let mut s = session(1000);
        s.expires_at = Some(1010);
        s.lifetime = Some(10);
        assert!(
            !s.needs_refresh(1004, Duration::from_secs(30)),
            "fresh for half its life"
        );
        assert!(s.needs_refresh(1005, Duration::from_secs(30)));
    }

    #[test]
    fn timeouts() {
        let s = session(1000);
        let idle = Duration::from_secs(60);
        let abs = Duration::from_secs(500);
        assert_eq!(s.check_timeouts(1059, idle, abs), Ok(()));
        assert_eq!(s.check_timeouts(1060, idle, abs), Err(Expiry::Idle));
        let mut busy = s.clone();
        busy.last_seen = 1490;
        assert_eq!(busy.check_timeouts(1500, idle, abs), Err(Expiry::Absolute));
    }

    #[test]
    fn debug_redacts_tokens() {
        let dbg = format!("{:?}", session(1));
        assert!(!dbg.contains("\"at\"") && !dbg.contains("AccessToken(\"at\")"));
    }
}
