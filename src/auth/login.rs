//! `GET /login`: starts the authorization-code flow (RFC 6749 §4.1) with a fresh `state`
//! (RFC 9700 §4.7), PKCE S256 (RFC 7636), and an OIDC `nonce`. The transaction is sealed into its
//! own short-lived cookie named after the state, so several tabs can log in at once.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{header, HeaderValue, StatusCode};
use oauth2::PkceCodeChallenge;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tower_cookies::Cookies;

use crate::config::Par;
use crate::error::ApiError;
use crate::idp::IdpError;
use crate::session::tokens::now_s;
use crate::state::AppState;

/// One pending login, sealed into the `tg_tx_<state>` cookie.
#[derive(Serialize, Deserialize)]
pub struct LoginTx {
    pub state: String,
    pub nonce: Option<String>,
    pub verifier: String,
    pub return_to: String,
    pub created_at: u64,
    /// When the login started, in Unix nanoseconds: orders the logins a browser starts within
    /// one second, so the pending-login cap drops the oldest (0 in cookies from older versions).
    #[serde(default)]
    pub started_ns: u64,
}

/// 256 random bits, base64url (43 characters).
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// True for values we could have generated with [`random_token`]: keeps the cookie-name lookup
/// at the callback to well-formed states.
pub fn is_token_shaped(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub async fn login(
    State(state): State<AppState>,
    cookies: Cookies,
    uri: http::Uri,
) -> Result<Response, ApiError> {
    let params = super::QueryParams::parse(uri.query(), &["return_to"])?;
    let md = state.idp.metadata().ok_or_else(|| {
        ApiError::unavailable("the identity provider is not reachable yet; try again in a moment")
    })?;
    let cfg = &state.config.oauth;
    let return_to =
        super::return_to::sanitize(params.get("return_to"), &state.config.server.public_url);

    let tx_state = random_token();
    let nonce = cfg.wants_openid().then(random_token);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256_len(32);
    let tx = LoginTx {
        state: tx_state.clone(),
        nonce: nonce.clone(),
        verifier: verifier.secret().clone(),
        return_to,
        created_at: now_s(),
        started_ns: now_ns(),
    };

    let mut params: Vec<(String, String)> = vec![
        ("response_type".into(), "code".into()),
        ("client_id".into(), cfg.client_id.clone()),
        ("redirect_uri".into(), cfg.redirect_uri.to_string()),
        ("scope".into(), cfg.scopes.join(" ")),
        ("state".into(), tx_state.clone()),
        ("code_challenge".into(), challenge.as_str().to_string()),
        ("code_challenge_method".into(), "S256".into()),
    ];
    if let Some(n) = &nonce {
        params.push(("nonce".into(), n.clone()));
    }
    // RFC 9449 §10: the code is bound to our DPoP key, so only we can redeem it.
    if let Some(d) = state.idp.dpop() {
        params.push(("dpop_jkt".into(), d.thumbprint().to_string()));
    }
    for r in &cfg.authorize_resources {
        params.push(("resource".into(), r.clone()));
    }
    for (k, v) in &cfg.extra_authorize_params {
        params.push((k.clone(), v.clone()));
    }
    let use_par = md.par_required
        || match cfg.par {
            Par::Required => true,
            Par::Auto => md.par_endpoint.is_some(),
            Par::Off => false,
        };
    if use_par {
        // RFC 9126 §4: the browser carries only client_id and the pushed request's handle.
        let request_uri = state
            .idp
            .push_authorization_request(&params)
            .await
            .map_err(|e| match e {
                IdpError::Unsupported(_) => ApiError::bad_gateway(
                    "oauth.par = \"required\" but the identity provider has no PAR endpoint",
                )
                .with_cause(e),
                IdpError::OAuth { .. } => {
                    ApiError::bad_gateway("the identity provider refused the pushed request")
                        .with_cause(e)
                }
                other => super::callback::idp_failure(other),
            })?;
        params = vec![
            ("client_id".into(), cfg.client_id.clone()),
            ("request_uri".into(), request_uri),
        ];
    }
    // Recorded only once the request could be made: a failed push leaves no pending login.
    let rules = state.store.rules();
    drop_excess_transactions(&state, &cookies);
    let name = rules.tx_name(&tx_state);
    let plain = serde_json::to_vec(&tx).map_err(ApiError::internal)?;
    let sealed = state.sealer.seal(name.as_bytes(), &plain);
    rules.set_tx(&cookies, &tx_state, sealed, cfg.login_transaction_ttl);
    let now = now_s();
    state.logins.started(
        &tx_state,
        now.saturating_add(cfg.login_transaction_ttl.as_secs()),
        now,
    );
    state.metrics.login("started", "");

    let mut url = md.authorization_endpoint.clone();
    url.query_pairs_mut().extend_pairs(params.iter());
    let location = HeaderValue::from_str(url.as_str()).map_err(ApiError::internal)?;
    Ok((
        StatusCode::FOUND,
        [
            (header::LOCATION, location),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}

/// Keeps at most `oauth.max_pending_logins - 1` older transactions, so with the new one the cap
/// holds: the oldest (and any unreadable or expired ones) are dropped.
fn drop_excess_transactions(state: &AppState, cookies: &Cookies) {
    let rules = state.store.rules();
    let cfg = &state.config.oauth;
    let now = now_s();
    let mut live: Vec<((u64, u64), String)> = Vec::new();
    for name in rules.tx_names(cookies) {
        let created = cookies
            .get(&name)
            .and_then(|c| state.sealer.open(name.as_bytes(), c.value()))
            .and_then(|p| serde_json::from_slice::<LoginTx>(&p).ok())
            .filter(|tx| now.saturating_sub(tx.created_at) < cfg.login_transaction_ttl.as_secs())
            .map(|tx| (tx.created_at, tx.started_ns));
        match created {
            Some(t) => live.push((t, name)),
            None => rules.clear_tx(cookies, &name),
        }
    }
    live.sort();
    let keep = cfg.max_pending_logins.saturating_sub(1);
    let excess = live.len().saturating_sub(keep);
    for (_, name) in live.into_iter().take(excess) {
        rules.clear_tx(cookies, &name);
    }
}
