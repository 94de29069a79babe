//! Access-token refresh with single-flight: concurrent requests of one session share ONE refresh
//! grant, and a request that still carries the pre-rotation cookie shortly after a refresh gets the
//! new tokens instead of replaying the old refresh token (which a rotating IdP would answer with
//! `invalid_grant`, or treat as token theft and revoke the whole family).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oauth2::RefreshToken;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::store::SessionStore;
use super::tokens::{now_s, Session};
use crate::idp::{Idp, IdpError, TokenResponse, TokenTarget};
use crate::sweep::Swept;

/// How long the result of a refresh is reused for requests carrying the old refresh token.
pub const REUSE_WINDOW: Duration = Duration::from_secs(30);
/// Bound on remembered refreshes (memory stays flat under load).
const MAX_ENTRIES: usize = 100_000;

/// Why a refresh did not yield tokens.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    #[error("the session has no refresh token")]
    NoRefreshToken,
    /// `invalid_grant` (or a bad new ID token): the session is over.
    #[error("the refresh token was rejected: {0}")]
    Fatal(String),
    /// The IdP failed or timed out: keep the session, try again later.
    #[error("refresh failed for now: {0}")]
    Transient(IdpError),
    /// `invalid_target` / `invalid_scope` (RFC 8707 §2, RFC 6749 §5.2): the IdP will not issue
    /// a token for that audience or those scopes; the session itself is fine.
    #[error("the authorization server refused the audience or scopes: {0}")]
    Refused(IdpError),
}

/// The session with refreshed tokens (already persisted when the store is server-side).
type Outcome = Result<Arc<Session>, RefreshError>;

struct Entry {
    started: Instant,
    cell: Arc<OnceCell<Outcome>>,
}

/// After a transient failure the IdP is left alone for a while (per session), doubling up to
/// [`MAX_BACKOFF`]: a failing IdP must not get one refresh grant per API call.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

struct Backoff {
    until: Instant,
    next: Duration,
}

/// Coordinates refreshes within this process.
#[derive(Default)]
pub struct Refresher {
    entries: Mutex<Swept<HashMap<[u8; 32], Entry>>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refresher")
    }
}

/// The single-flight key: the session and the exact refresh token it holds (hashed: the map never
/// holds a usable token).
fn key(session_id: &str, rt: &RefreshToken) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(session_id.as_bytes());
    h.update([0]);
    h.update(rt.secret().as_bytes());
    h.finalize().into()
}

impl Refresher {
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            entries: Mutex::default(),
            backoff: Mutex::default(),
            metrics,
        }
    }

    /// Refreshes `session`'s tokens, joining a refresh already under way (or just done) for the
    /// same refresh token.
    pub async fn refresh(&self, idp: &Idp, store: &SessionStore, session: &Session) -> Outcome {
        let rt = session
            .refresh_token
            .clone()
            .ok_or(RefreshError::NoRefreshToken)?;
        let k = key(&session.id, &rt);
        if self.backing_off(&session.id) {
            return Err(RefreshError::Transient(IdpError::BackingOff));
        }
        let cell = {
            let mut map = self
                .entries
                .lock()
                .map_err(|_| RefreshError::Transient(IdpError::NotReady))?;
            let reusable = map.get(&k).is_some_and(|e| {
                e.started.elapsed() < REUSE_WINDOW
                    // A transient failure is not reused once settled: the next request retries.
                    && !matches!(e.cell.get(), Some(Err(RefreshError::Transient(_))))
            });
            if reusable {
                self.metrics.refresh("coalesced");
            } else {
                if map.len() >= MAX_ENTRIES {
                    map.retain(|_, e| e.started.elapsed() < REUSE_WINDOW);
                }
                map.insert(
                    k,
                    Entry {
                        started: Instant::now(),
                        cell: Arc::new(OnceCell::new()),
                    },
                );
            }
            map.get(&k).map(|e| Arc::clone(&e.cell))
        };
        let Some(cell) = cell else {
            return Err(RefreshError::Transient(IdpError::NotReady));
        };
        // If the request that started the refresh goes away, the next waiter takes over.
        let outcome = cell
            .get_or_init(|| async {
                let result = store.refresh(idp, session).await.map(Arc::new);
                match &result {
                    Ok(_) => {
                        self.metrics.refresh("ok");
                        tracing::debug!("access token refreshed")
                    }
                    Err(e) => {
                        self.metrics.refresh(match e {
                            RefreshError::Transient(_) => "transient",
                            RefreshError::Refused(_) => "refused",
                            _ => "fatal",
                        });
                        tracing::info!(error = %e, "refresh failed")
                    }
                }
                result
            })
            .await
            .clone();
        self.note_outcome(&session.id, &outcome);
        self.sweep();
        outcome
    }

    fn backing_off(&self, sid: &str) -> bool {
        self.backoff
            .lock()
            .map(|b| b.get(sid).is_some_and(|x| Instant::now() < x.until))
            .unwrap_or(false)
    }

    fn note_outcome(&self, sid: &str, outcome: &Outcome) {
        let Ok(mut b) = self.backoff.lock() else {
            return;
        };
        match outcome {
            Err(RefreshError::Transient(IdpError::BackingOff)) => {}
            Err(RefreshError::Transient(_)) => {
                let wait = b.get(sid).map_or(FIRST_BACKOFF, |x| x.next);
                if b.len() >= MAX_ENTRIES {
                    let now = Instant::now();
                    b.retain(|_, x| x.until > now);
                }
                b.insert(
                    sid.to_string(),
                    Backoff {
                        until: Instant::now() + wait,
                        next: (wait * 2).min(MAX_BACKOFF),
                    },
                );
            }
            _ => {
                b.remove(sid);
            }
        }
    }

    /// Settled refreshes are kept for [`REUSE_WINDOW`] only: each holds a whole session.
    fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        if let Ok(mut map) = self.entries.lock() {
            if map.due(now, REUSE_WINDOW) || map.len() > 1024 {
                map.retain(|_, e| now.saturating_duration_since(e.started) < REUSE_WINDOW);
            }
        }
    }
}

/// A downscoped refresh grant (RFC 8707 §2.2): a token for `target` only. Returns the IdP's
/// answer; a rotated refresh token in it must be persisted by the caller. Persists nothing.
pub async fn grant_for(
    idp: &Idp,
    session: &Session,
    target: &TokenTarget,
) -> Result<TokenResponse, RefreshError> {
    let rt = session
        .refresh_token
        .as_ref()
        .ok_or(RefreshError::NoRefreshToken)?;
    idp.refresh_for(rt, target).await.map_err(|e| {
        if let IdpError::OAuth { error, .. } = &e {
            match error.as_str() {
                "invalid_target" | "invalid_scope" => return RefreshError::Refused(e),
                "invalid_grant"
                | "invalid_client"
                | "unauthorized_client"
                | "unsupported_grant_type" => return RefreshError::Fatal(e.to_string()),
                _ => {}
            }
        }
        RefreshError::Transient(e)
    })
}

/// sha256(sid, old refresh token) → (its successor, when the rotation was seen).
type Successors = HashMap<[u8; 32], (RefreshToken, Instant)>;

/// Refresh-token rotations this process has seen, for the cookie store: concurrent requests still
/// carrying the pre-rotation cookie must use the successor instead of replaying a dead refresh
/// token (which a rotating IdP may treat as theft). One lock per session serialises every grant
/// that spends the session's refresh token within this process.
#[derive(Default)]
pub struct Rotations {
    /// sha256(sid, old refresh token) → the successor, and when it was recorded.
    successors: Mutex<Swept<Successors>>,
    locks: Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Rotations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rotations")
    }
}

impl Rotations {
    /// The lock serialising refresh-token use for session `sid` (held across the grant).
    pub fn lock_for(&self, sid: &str) -> Arc<tokio::sync::Mutex<()>> {
        let Ok(mut locks) = self.locks.lock() else {
            return Arc::default();
        };
        if let Some(l) = locks.get(sid).and_then(std::sync::Weak::upgrade) {
            return l;
        }
        if locks.len() >= 1024 {
            locks.retain(|_, w| w.strong_count() > 0);
        }
        let l: Arc<tokio::sync::Mutex<()>> = Arc::default();
        locks.insert(sid.to_string(), Arc::downgrade(&l));
        l
    }

    /// `session` with its refresh token replaced by the newest known successor.
    pub fn latest(&self, session: &Session) -> Session {
        let mut s = session.clone();
        let Ok(map) = self.successors.lock() else {
            return s;
        };
        // A chain is short (one rotation per grant); the bound only guards against a cycle.
        for _ in 0..16 {
            let Some(rt) = &s.refresh_token else { break };
            match map.get(&key(&s.id, rt)) {
                Some((next, at)) if at.elapsed() < REUSE_WINDOW => {
                    s.refresh_token = Some(next.clone());
                }
                _ => break,
            }
        }
        s
    }

    /// Notes that `old` was rotated to `new` for session `sid`.
    pub fn record(&self, sid: &str, old: &RefreshToken, new: &RefreshToken) {
        if old.secret() == new.secret() {
            return;
        }
        self.record_at(sid, old, new, Instant::now());
    }

    fn record_at(&self, sid: &str, old: &RefreshToken, new: &RefreshToken, now: Instant) {
        if let Ok(mut map) = self.successors.lock() {
            if map.due(now, REUSE_WINDOW) || map.len() >= MAX_ENTRIES / 10 {
                map.retain(|_, (_, at)| now.saturating_duration_since(*at) < REUSE_WINDOW);
            }
            if map.len() < MAX_ENTRIES / 10 {
                map.insert(key(sid, old), (new.clone(), now));
            }
        }
    }
}

/// The refresh grant itself (RFC 6749 §6): the IdP call, the check of a new ID token, and the
/// merged session. Persists nothing.
pub async fn grant(idp: &Idp, session: &Session) -> Result<Session, RefreshError> {
    let rt = session
        .refresh_token
        .as_ref()
        .ok_or(RefreshError::NoRefreshToken)?;
    let resp = idp.refresh(rt).await.map_err(|e| {
        if let IdpError::OAuth { error, .. } = &e {
            // RFC 6749 §5.2: these mean the grant cannot succeed if retried.
            if matches!(
                error.as_str(),
                "invalid_grant"
                    | "invalid_client"
                    | "unauthorized_client"
                    | "unsupported_grant_type"
            ) {
                return RefreshError::Fatal(e.to_string());
            }
        }
        RefreshError::Transient(e)
    })?;
    // OIDC Core §12.2: a new ID token must be about the same user.
    if let Some(t) = &resp.id_token {
        let c = idp
            .validate_id_token(t, None, Duration::from_secs(600))
            .await
            .map_err(|e| RefreshError::Fatal(format!("new ID token refused: {e}")))?;
        if c.sub != session.subject {
            return Err(RefreshError::Fatal(
                "new ID token names another subject".into(),
            ));
        }
    }
    let mut next = session.clone();
    next.apply(&resp, now_s());
    Ok(next)
}

impl Session {
    /// Merges refreshed tokens: a rotated refresh token replaces the old one (RFC 6749 §6), an
    /// absent one means the old one stays valid.
    pub fn apply(&mut self, t: &crate::idp::TokenResponse, obtained_at: u64) {
        self.access_token = t.access_token.clone();
        if let Some(rt) = &t.refresh_token {
            self.refresh_token = Some(rt.clone());
        }
        if let Some(it) = &t.id_token {
            self.id_token = Some(it.clone());
        }
        self.expires_at = t.expires_in.map(|s| obtained_at.saturating_add(s));
        self.lifetime = t.expires_in;
        if t.scope.is_some() {
            self.scope = t.scope.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(started: Instant) -> Entry {
        Entry {
            started,
            cell: Arc::new(OnceCell::new()),
        }
    }

    #[test]
    fn settled_refreshes_are_forgotten_after_the_reuse_window() {
        let r = Refresher::default();
        let t0 = Instant::now();
        r.sweep_at(t0);
        if let Ok(mut m) = r.entries.lock() {
            m.insert([1; 32], entry(t0));
            m.insert([2; 32], entry(t0 + Duration::from_secs(20)));
        }
        // Within the period no sweep runs, however few entries there are.
        r.sweep_at(t0 + Duration::from_secs(10));
        assert_eq!(r.entries.lock().map(|m| m.len()).ok(), Some(2));
        // One period later the entry older than the window is gone, the recent one kept.
        r.sweep_at(t0 + REUSE_WINDOW + Duration::from_secs(1));
        let left: Vec<[u8; 32]> = r
            .entries
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        assert_eq!(left, vec![[2; 32]]);
    }

    #[test]
    fn rotations_are_forgotten_after_the_reuse_window() {
        let rot = Rotations::default();
        let t0 = Instant::now();
        let (a, b, c) = (
            RefreshToken::new("rt-a".into()),
            RefreshToken::new("rt-b".into()),
            RefreshToken::new("rt-c".into()),
        );
        rot.record_at("s1", &a, &b, t0);
        rot.record_at("s2", &b, &c, t0 + Duration::from_secs(5));
        assert_eq!(rot.successors.lock().map(|m| m.len()).ok(), Some(2));
        rot.record_at("s3", &a, &c, t0 + REUSE_WINDOW + Duration::from_secs(1));
        assert_eq!(
            rot.successors.lock().map(|m| m.len()).ok(),
            Some(2),
            "the entry of s1 (older than the window) was swept"
        );
        rot.record_at("s4", &a, &c, t0 + 3 * REUSE_WINDOW);
        assert_eq!(rot.successors.lock().map(|m| m.len()).ok(), Some(1));
    }
}
