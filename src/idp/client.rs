//! Requests to the authorization server's token, revocation and userinfo endpoints, with client
//! authentication (RFC 6749 §2.3) and errors told apart: an OAuth error the IdP chose to send
//! (e.g. `invalid_grant`, fatal) versus the IdP failing or timing out (transient).

use std::borrow::Cow;

use oauth2::{AccessToken, RefreshToken};
use serde::Deserialize;

use super::{Idp, Metadata};
use crate::config::ClientAuth;

/// A token endpoint answer (RFC 6749 §5.1, OIDC Core §3.1.3.3).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    pub access_token: AccessToken,
    pub token_type: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<RefreshToken>,
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    /// Token exchange answers only (RFC 8693 §2.2.1).
    #[serde(default)]
    pub issued_token_type: Option<String>,
}

/// RFC 8693 §3: the token type identifier of an OAuth access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The audience and scopes one route's token is meant for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenTarget {
    /// RFC 8707 resource indicators; empty: the IdP's default audience.
    pub resources: Vec<String>,
    /// Empty: as granted.
    pub scopes: Vec<String>,
}

impl TokenTarget {
    pub fn of(route: &crate::config::RouteConfig) -> Self {
        Self {
            resources: route.resources.clone(),
            scopes: route.scopes.clone(),
        }
    }
}

/// What went wrong talking to the IdP. Messages carry no token, code or secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdpError {
    /// The IdP answered with an OAuth error (RFC 6749 §5.2).
    #[error("the authorization server answered `{error}` (HTTP {status})")]
    OAuth {
        status: u16,
        error: String,
        description: Option<String>,
    },
    #[error("the authorization server failed with HTTP {0}")]
    Status(u16),
    #[error("the authorization server did not answer in time")]
    Timeout,
    #[error("the authorization server could not be reached: {0}")]
    Transport(String),
    #[error("the authorization server sent an unusable response: {0}")]
    InvalidResponse(Cow<'static, str>),
    #[error("the authorization server's metadata is not loaded yet")]
    NotReady,
    #[error("the authorization server has no {0}")]
    Unsupported(&'static str),
    #[error("the authorization server failed recently; not asking again yet")]
    BackingOff,
}

impl IdpError {
    /// `invalid_grant`: the refresh token (or code) is dead; the session cannot go on.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, IdpError::OAuth { error, .. } if error == "invalid_grant")
    }

    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            IdpError::Timeout
        } else {
            // Without the URL: query strings could in principle carry something sensitive.
            IdpError::Transport(e.without_url().to_string())
        }
    }
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: String,
    error_description: Option<String>,
}

/// The key under which the authorization server's DPoP nonce is kept.
const AS: &str = "as";

/// Largest answer read from the IdP: a hostile or broken IdP cannot make us buffer more.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Reads a response body up to [`MAX_RESPONSE_BYTES`]; larger ones are refused.
pub async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, IdpError> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(IdpError::InvalidResponse("response too large".into()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(IdpError::from_reqwest)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(IdpError::InvalidResponse("response too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// RFC 6749 §2.3.1: client id and secret are form-urlencoded before Basic encoding.
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Idp {
    pub fn ready_metadata(&self) -> Result<std::sync::Arc<Metadata>, IdpError> {
        self.metadata().ok_or(IdpError::NotReady)
    }

    /// A POST to `endpoint` with client authentication added as configured.
    fn authenticated_post<K: From<&'static str> + AsRef<str> + serde::Serialize>(
        &self,
        endpoint: &url::Url,
        mut form: Vec<(K, String)>,
    ) -> reqwest::RequestBuilder {
        let cfg = &self.config;
        // Requests that carry client_id themselves (PAR) must not get a second one.
        if form.iter().any(|(k, _)| k.as_ref() == "client_id") {
            form.retain(|(k, _)| k.as_ref() != "client_id");
            if cfg.client_auth == ClientAuth::ClientSecretBasic {
                form.push(("client_id".into(), cfg.client_id.clone()));
            }
        }
        let mut req = self
            .http()
            .post(endpoint.clone())
            .header(http::header::ACCEPT, "application/json");
        match cfg.client_auth {
            ClientAuth::ClientSecretBasic => {
                let secret = cfg
                    .client_secret
                    .as_ref()
                    .map(|s| form_encode(s.expose()))
                    .unwrap_or_default();
                req = req.basic_auth(form_encode(&cfg.client_id), Some(secret));
            }
            ClientAuth::ClientSecretPost => {
                form.push(("client_id".into(), cfg.client_id.clone()));
                if let Some(s) = &cfg.client_secret {
                    form.push(("client_secret".into(), s.expose().to_string()));
                }
            }
            ClientAuth::PrivateKeyJwt => {
                form.push(("client_id".into(), cfg.client_id.clone()));
                form.push((
                    "client_assertion_type".into(),
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion".into(), self.client_assertion()));
            }
            ClientAuth::None => form.push(("client_id".into(), cfg.client_id.clone())),
        }
        req.form(&form)
    }

    /// RFC 7523 §3: a short-lived JWT signed with the client's key. `aud` is the issuer identifier
    /// alone — not an endpoint URL — so an assertion cannot be replayed at another server
    /// (the 2025 audience-injection finding against private_key_jwt).
    fn client_assertion(&self) -> String {
        let Some(k) = &self.config.client_key else {
            return String::new();
        };
        let now = crate::session::tokens::now_s();
        let claims = serde_json::json!({
            "iss": self.config.client_id,
            "sub": self.config.client_id,
            "aud": self.config.issuer,
            "jti": crate::auth::login::random_token(),
            "iat": now,
            "exp": now + 60,
        });
        let mut header = jsonwebtoken::Header::new(k.alg);
        header.kid = k.kid.clone();
        jsonwebtoken::encode(&header, &claims, &k.key).unwrap_or_default()
    }

    /// A token request carrying `oauth.resources`.
    async fn token_request(
        &self,
        form: Vec<(&'static str, String)>,
    ) -> Result<TokenResponse, IdpError> {
        self.token_request_for(form, &self.config.resources).await
    }

    /// A token request carrying exactly these resource indicators (RFC 8707 §2.2).
    async fn token_request_for(
        &self,
        form: Vec<(&'static str, String)>,
        resources: &[String],
    ) -> Result<TokenResponse, IdpError> {
        let started = std::time::Instant::now();
        let r = self.token_request_inner(form, resources).await;
        self.metrics
            .idp_call("token", super::outcome(&r), started.elapsed());
        r
    }

    async fn token_request_inner(
        &self,
        mut form: Vec<(&'static str, String)>,
        resources: &[String],
    ) -> Result<TokenResponse, IdpError> {
        let md = self.ready_metadata()?;
        for r in resources {
            form.push(("resource", r.clone()));
        }
        let dpop = self.dpop();
        // RFC 9449 §8: an authorization server that wants a nonce answers `use_dpop_nonce` with
        // one; the request is made again once with it.
        let mut attempts = 0;
        let (status, body) = loop {
            attempts += 1;
            let mut req = self.authenticated_post(&md.token_endpoint, form.clone());
            if let Some(d) = dpop {
                req = req.header("dpop", d.proof("POST", &md.token_endpoint, None, AS));
            }
            let resp = req.send().await.map_err(IdpError::from_reqwest)?;
            let status = resp.status();
            let fresh_nonce = dpop.is_some_and(|d| d.remember_nonce(AS, resp.headers()));
            let body = read_capped(resp).await?;
            let wants_nonce = status == http::StatusCode::BAD_REQUEST
                && serde_json::from_slice::<OAuthErrorBody>(&body)
                    .is_ok_and(|e| e.error == "use_dpop_nonce");
            if wants_nonce && fresh_nonce && attempts == 1 {
                continue;
            }
            break (status, body);
        };
        if status.is_success() {
            let t: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
                IdpError::InvalidResponse("token response is not valid JSON".into())
            })?;
            // RFC 6749 §7.1: bearer tokens, or with `oauth.dpop` DPoP-bound ones only: a bearer
            // token in answer to a proof means the server ignored it, and would be replayable.
            let expected = if dpop.is_some() { "dpop" } else { "bearer" };
            if !t.token_type.eq_ignore_ascii_case(expected) {
                return Err(IdpError::InvalidResponse(
                    format!(
                        "token_type `{}` where `{expected}` was expected{}",
                        t.token_type.escape_default(),
                        if dpop.is_some() {
                            " (oauth.dpop is on: does the authorization server support DPoP?)"
                        } else {
                            ""
                        }
                    )
                    .into(),
                ));
            }
            if t.access_token.secret().is_empty() {
                return Err(IdpError::InvalidResponse("empty access_token".into()));
            }
            return Ok(t);
        }
        if status.is_client_error() {
            if let Ok(e) = serde_json::from_slice::<OAuthErrorBody>(&body) {
                return Err(IdpError::OAuth {
                    status: status.as_u16(),
                    error: e.error,
                    description: e.error_description,
                });
            }
        }
        Err(IdpError::Status(status.as_u16()))
    }

    /// Redeems an authorization code (RFC 6749 §4.1.3) with its PKCE verifier (RFC 7636 §4.5).
    pub async fn exchange_code(
        &self,
        code: &str,
        code_verifier: &str,
    ) -> Result<TokenResponse, IdpError> {
        self.token_request(vec![
            ("grant_type", "authorization_code".into()),
            ("code", code.to_string()),
            ("redirect_uri", self.config.redirect_uri.to_string()),
            ("code_verifier", code_verifier.to_string()),
        ])
        .await
    }

    /// Refresh grant (RFC 6749 §6).
    pub async fn refresh(&self, refresh_token: &RefreshToken) -> Result<TokenResponse, IdpError> {
        self.token_request(vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", refresh_token.secret().clone()),
        ])
        .await
    }

    /// A refresh grant for a narrower token (RFC 8707 §2.2, RFC 6749 §6 `scope`): meant for
    /// `target`'s audience and scopes only. `oauth.resources` is not sent unless the target has
    /// no resource of its own.
    pub async fn refresh_for(
        &self,
        refresh_token: &RefreshToken,
        target: &TokenTarget,
    ) -> Result<TokenResponse, IdpError> {
        let mut form = vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", refresh_token.secret().clone()),
        ];
        if !target.scopes.is_empty() {
            form.push(("scope", target.scopes.join(" ")));
        }
        let resources = if target.resources.is_empty() {
            &self.config.resources
        } else {
            &target.resources
        };
        self.token_request_for(form, resources).await
    }

    /// Client-credentials grant (RFC 6749 §4.4) for `target`'s audience and scopes.
    pub async fn client_credentials(
        &self,
        target: &TokenTarget,
    ) -> Result<TokenResponse, IdpError> {
        let mut form = vec![("grant_type", "client_credentials".into())];
        if !target.scopes.is_empty() {
            form.push(("scope", target.scopes.join(" ")));
        }
        self.token_request_for(form, &target.resources).await
    }

    /// Token exchange (RFC 8693 §2.1): the session's access token for one meant for `audience`
    /// (and `scope`), as the API behind an `exchange` route expects.
    pub async fn exchange_token(
        &self,
        subject: &AccessToken,
        exchange: &crate::config::Exchange,
    ) -> Result<TokenResponse, IdpError> {
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange".into(),
            ),
            ("subject_token", subject.secret().clone()),
            ("subject_token_type", ACCESS_TOKEN_TYPE.into()),
            ("requested_token_type", ACCESS_TOKEN_TYPE.into()),
            ("audience", exchange.audience.clone()),
        ];
        if let Some(scope) = &exchange.scope {
            form.push(("scope", scope.clone()));
        }
        let t = self.token_request_for(form, &[]).await?;
        match t.issued_token_type.as_deref() {
            Some(ACCESS_TOKEN_TYPE) => Ok(t),
            Some(other) => Err(IdpError::InvalidResponse(
                format!(
                    "the exchange issued a `{}`, not an access token",
                    other.escape_default()
                )
                .into(),
            )),
            // §2.2.1 makes it REQUIRED; without it the answer is not a token exchange answer.
            None => Err(IdpError::InvalidResponse(
                "the exchange answer lacks issued_token_type".into(),
            )),
        }
    }

    /// Pushed Authorization Request (RFC 9126 §2): the authorization parameters go to the AS
    /// directly (authenticated); the browser only carries the returned `request_uri`.
    pub async fn push_authorization_request(
        &self,
        params: &[(String, String)],
    ) -> Result<String, IdpError> {
        let started = std::time::Instant::now();
        let r = self.push_inner(params).await;
        self.metrics
            .idp_call("par", super::outcome(&r), started.elapsed());
        r
    }

    async fn push_inner(&self, params: &[(String, String)]) -> Result<String, IdpError> {
        #[derive(Deserialize)]
        struct Pushed {
            request_uri: String,
        }
        let md = self.ready_metadata()?;
        let endpoint = md.par_endpoint.as_ref().ok_or(IdpError::Unsupported(
            "pushed authorization request endpoint",
        ))?;
        // RFC 9126 §2.1: the authorization request's parameters, client_id included.
        let form: Vec<(String, String)> = params.to_vec();
        let resp = self
            .authenticated_post(endpoint, form)
            .send()
            .await
            .map_err(IdpError::from_reqwest)?;
        let status = resp.status();
        let body = read_capped(resp).await?;
        if status.is_success() {
            let p: Pushed = serde_json::from_slice(&body)
                .map_err(|_| IdpError::InvalidResponse("PAR response is not valid JSON".into()))?;
            if p.request_uri.is_empty() || p.request_uri.len() > 2048 {
                return Err(IdpError::InvalidResponse(
                    "PAR response has an empty or oversized request_uri".into(),
                ));
            }
            return Ok(p.request_uri);
        }
        if status.is_client_error() {
            if let Ok(e) = serde_json::from_slice::<OAuthErrorBody>(&body) {
                return Err(IdpError::OAuth {
                    status: status.as_u16(),
                    error: e.error,
                    description: e.error_description,
                });
            }
        }
        Err(IdpError::Status(status.as_u16()))
    }

    /// Token revocation (RFC 7009 §2.1). Unsupported when the IdP has no revocation endpoint.
    pub async fn revoke(&self, token: &str, hint: &'static str) -> Result<(), IdpError> {
        let started = std::time::Instant::now();
        let r = self.revoke_inner(token, hint).await;
        if !matches!(r, Err(IdpError::Unsupported(_))) {
            self.metrics
                .idp_call("revocation", super::outcome(&r), started.elapsed());
        }
        r
    }

    async fn revoke_inner(&self, token: &str, hint: &'static str) -> Result<(), IdpError> {
        let md = self.ready_metadata()?;
        let endpoint = md
            .revocation_endpoint
            .as_ref()
            .ok_or(IdpError::Unsupported("revocation endpoint"))?;
        let resp = self
            .authenticated_post(
                endpoint,
                vec![
                    ("token", token.to_string()),
                    ("token_type_hint", hint.into()),
                ],
            )
            .send()
            .await
            .map_err(IdpError::from_reqwest)?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(IdpError::Status(resp.status().as_u16()))
        }
    }

    /// The UserInfo endpoint (OIDC Core §5.3), JSON answers only.
    pub async fn userinfo(
        &self,
        access_token: &AccessToken,
    ) -> Result<serde_json::Map<String, serde_json::Value>, IdpError> {
        let started = std::time::Instant::now();
        let r = self.userinfo_inner(access_token).await;
        self.metrics
            .idp_call("userinfo", super::outcome(&r), started.elapsed());
        r
    }

    async fn userinfo_inner(
        &self,
        access_token: &AccessToken,
    ) -> Result<serde_json::Map<String, serde_json::Value>, IdpError> {
        let md = self.ready_metadata()?;
        let endpoint = md
            .userinfo_endpoint
            .as_ref()
            .ok_or(IdpError::Unsupported("userinfo endpoint"))?;
        let mut attempts = 0;
        let resp = loop {
            attempts += 1;
            let mut req = self
                .http()
                .get(endpoint.clone())
                .header(http::header::ACCEPT, "application/json");
            req = match self.dpop() {
                Some(d) => req
                    .header(
                        http::header::AUTHORIZATION,
                        format!("DPoP {}", access_token.secret()),
                    )
                    .header(
                        "dpop",
                        d.proof("GET", endpoint, Some(access_token.secret()), AS),
                    ),
                None => req.bearer_auth(access_token.secret()),
            };
            let resp = req.send().await.map_err(IdpError::from_reqwest)?;
            let retry = self.dpop().is_some_and(|d| {
                d.remember_nonce(AS, resp.headers())
                    && resp.status() == http::StatusCode::UNAUTHORIZED
                    && super::dpop::asks_for_nonce(resp.headers())
            });
            if retry && attempts == 1 {
                continue;
            }
            break resp;
        };
        if !resp.status().is_success() {
            return Err(IdpError::Status(resp.status().as_u16()));
        }
        serde_json::from_slice(&read_capped(resp).await?)
            .map_err(|_| IdpError::InvalidResponse("userinfo is not a JSON object".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_credentials_are_form_encoded() {
        assert_eq!(form_encode("a b:c/é"), "a+b%3Ac%2F%C3%A9");
    }

    #[test]
    fn invalid_grant_is_told_apart() {
        let e = IdpError::OAuth {
            status: 400,
            error: "invalid_grant".into(),
            description: None,
        };
        assert!(e.is_invalid_grant());
        assert!(!IdpError::Status(503).is_invalid_grant());
        assert!(!IdpError::Timeout.is_invalid_grant());
    }
}
