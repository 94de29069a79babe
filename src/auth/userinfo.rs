//! `GET /userinfo`: who is logged in, for the SPA. The ID token's useful claims merged with the
//! IdP's UserInfo answer (cached per session), plus the session's timing. Never a token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderValue};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::idp::id_token::unverified_claims;
use crate::session::cookie::RequestCookies;
use crate::session::extract::{ensure_fresh, require_session};
use crate::session::tokens::now_s;
use crate::state::AppState;

/// How long the IdP's UserInfo answer is reused for one session.
const TTL: Duration = Duration::from_secs(300);
const MAX_ENTRIES: usize = 10_000;

/// ID-token claims that are protocol plumbing, not facts about the user.
const PLUMBING: &[&str] = &[
    "aud",
    "azp",
    "nonce",
    "at_hash",
    "c_hash",
    "s_hash",
    "exp",
    "iat",
    "nbf",
    "auth_time",
    "jti",
    "sid",
    "iss",
    "acr",
    "amr",
];

type Claims = Map<String, Value>;

/// UserInfo answers per session id.
#[derive(Default)]
pub struct Cache(Mutex<HashMap<String, (Instant, Claims)>>);

impl Cache {
    fn get(&self, sid: &str) -> Option<Map<String, Value>> {
        let map = self.0.lock().ok()?;
        map.get(sid)
            .filter(|(t, _)| t.elapsed() < TTL)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, sid: &str, claims: Map<String, Value>) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= MAX_ENTRIES {
                map.retain(|_, (t, _)| t.elapsed() < TTL);
            }
            if map.len() < MAX_ENTRIES {
                map.insert(sid.to_string(), (Instant::now(), claims));
            }
        }
    }

    pub fn forget(&self, sid: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(sid);
        }
    }
}

pub async fn userinfo(
    State(state): State<AppState>,
    cookies: RequestCookies,
) -> Result<Response, ApiError> {
    let mut session = require_session(&state, &cookies).await?;
    let mut out = session
        .id_token
        .as_deref()
        .and_then(unverified_claims)
        .unwrap_or_default();
    out.retain(|k, _| !PLUMBING.contains(&k.as_str()));
    out.insert("sub".into(), Value::String(session.subject.clone()));

    let has_userinfo = state
        .idp
        .metadata()
        .is_some_and(|m| m.userinfo_endpoint.is_some());
    if has_userinfo {
        let cached = state.userinfo_cache.get(&session.id);
        let extra = match cached {
            Some(c) => Some(c),
            None => {
                ensure_fresh(&state, &cookies, &mut session).await?;
                match state.idp.userinfo(&session.access_token).await {
                    Ok(c) => {
                        state.userinfo_cache.put(&session.id, c.clone());
                        Some(c)
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "userinfo endpoint failed; ID-token claims only");
                        None
                    }
                }
            }
        };
        // OIDC Core §5.3.2: UserInfo about another subject must not be used.
        if let Some(extra) =
            extra.filter(|c| c.get("sub").and_then(Value::as_str) == Some(&session.subject))
        {
            for (k, v) in extra {
                out.entry(k).or_insert(v);
            }
        }
    }

    let now = now_s();
    let cfg = &state.config.session;
    let idle_deadline = session.last_seen.saturating_add(cfg.idle_timeout.as_secs());
    let abs_deadline = session.absolute_deadline(cfg.absolute_timeout);
    out.insert(
        "session".into(),
        serde_json::json!({
            "expires_at": idle_deadline.min(abs_deadline),
            "absolute_expires_at": abs_deadline,
            "access_token_expires_in": session.expires_in(now),
            "scope": session.scope,
        }),
    );
    let mut resp = Json(Value::Object(out)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
