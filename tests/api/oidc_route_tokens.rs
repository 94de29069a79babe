//! One token per API against the real `oidc-provider` with RFC 8707 resource indicators: each
//! API route receives a JWT access token whose `aud` is its own resource and whose `scope` holds
//! only its own scopes (a downscoped refresh grant), a client route a client-credentials token,
//! and `user-or-anonymous` / `none` routes what they promise. The APIs here are the recording
//! echo API of the harness; the test checks each token's signature with the IdP's JWKS.

use std::collections::BTreeSet;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use crate::helpers::{redis_store, EchoApi, Recorded};
use crate::oidc_provider::{Stack, StackOptions};

const A: &str = "http://api-a.test/";
const B: &str = "http://api-b.test/";
const C: &str = "http://api-c.test/";

pub fn bearer(rec: &Recorded) -> Option<String> {
    rec.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// The IdP's signing keys.
pub async fn jwks(issuer: &str) -> Vec<Value> {
    let doc: Value = reqwest::get(format!("{issuer}/.well-known/openid-configuration"))
        .await
        .expect("discovery")
        .json()
        .await
        .expect("json");
    let uri = doc["jwks_uri"].as_str().expect("jwks_uri");
    let set: Value = reqwest::get(uri)
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    set["keys"].as_array().cloned().unwrap_or_default()
}

/// What an API for `audience` would do: verify the JWT (signature, issuer, audience, expiry).
pub fn verify(token: &str, keys: &[Value], issuer: &str, audience: &str) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let jwk = keys
        .iter()
        .find(|k| header.kid.is_none() || k["kid"].as_str() == header.kid.as_deref())
        .ok_or("no such key")?;
    let key = DecodingKey::from_rsa_components(
        jwk["n"].as_str().ok_or("n")?,
        jwk["e"].as_str().ok_or("e")?,
    )
    .map_err(|e| e.to_string())?;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[audience]);
    v.set_issuer(&[issuer]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

pub fn scopes(claims: &Value) -> BTreeSet<String> {
    claims["scope"]
        .as_str()
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn each_api_route_gets_a_jwt_for_its_own_audience_and_scopes_from_oidc_provider() {
    let echo = EchoApi::start().await;
    let redis = if redis_store() {
        Some(crate::redis_server::RedisServer::start().await)
    } else {
        None
    };
    let up = echo.url();
    let stack = Stack::start_with(StackOptions {
        extra_session: redis
            .as_ref()
            .map(|r| format!("store = \"redis\"\nredis_url = \"{}\"", r.url()))
            .unwrap_or_default(),
        idp_env: vec![(
            "IDP_RESOURCES",
            json!({ A: "a:read a:write", B: "b:read b:write", C: "c:read" }).to_string(),
        )],
        extra_scopes: ["a:read", "a:write", "b:read", "b:write"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        client_extra: json!({
            "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
        }),
        extra_routes: format!(
            r#"
[[routes]]
prefix = "/a"
upstream = "{up}"
resource = "{A}"
scopes = ["a:read"]

[[routes]]
prefix = "/b"
upstream = "{up}"
resource = "{B}"

[[routes]]
prefix = "/svc"
upstream = "{up}"
token = "client"
resource = "{C}"
scopes = ["c:read"]

[[routes]]
prefix = "/maybe"
upstream = "{up}"
token = "user-or-anonymous"

[[routes]]
prefix = "/public"
upstream = "{up}"
token = "none"
"#
        ),
        ..StackOptions::default()
    })
    .await;
    let keys = jwks(&stack.issuer).await;
    let issuer = stack.issuer.clone();

    // Anonymous first: the client route needs no session, the others send no token.
    let anon = reqwest::Client::new();
    for path in ["/svc/x", "/maybe/x", "/public/x"] {
        let r = anon
            .get(format!("{}{path}", stack.base))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("call");
        assert_eq!(r.status(), 200, "{path}");
    }
    let recs = echo.requests();
    let svc = bearer(&recs[0]).expect("the client route carries a token");
    let claims = verify(&svc, &keys, &issuer, C).expect("a client-credentials JWT for C");
    assert_eq!(scopes(&claims), set(&["c:read"]));
    assert_eq!(claims["client_id"], "tokengate");
    assert!(
        claims.get("sub").is_none() || claims["sub"] == "tokengate",
        "no user in a client token: {claims}"
    );
    assert_eq!(
        bearer(&recs[1]),
        None,
        "user-or-anonymous without a session"
    );
    assert_eq!(bearer(&recs[2]), None, "none");

    assert_eq!(stack.login("alice", "/").await.status(), 302);
    let refresh_before = stack.refresh_grants().await;

    for path in ["/a/items", "/b/items", "/a/again", "/b/again"] {
        let r = stack
            .api(reqwest::Method::GET, path)
            .send()
            .await
            .expect("api");
        assert_eq!(
            r.status(),
            200,
            "{path}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    assert_eq!(
        stack.refresh_grants().await - refresh_before,
        2,
        "one downscoped refresh grant per API; the repeat calls were served from the cache"
    );
    let recs = echo.requests();
    let token_at = |prefix: &str| -> Vec<String> {
        recs.iter()
            .filter(|r| r.uri.starts_with(prefix))
            .map(|r| bearer(r).expect("bearer"))
            .collect()
    };
    let a = token_at("/a/");
    let b = token_at("/b/");
    assert_eq!(a.len(), 2);
    assert_eq!(a[0], a[1], "cached");
    assert_eq!(b[0], b[1], "cached");

    let a_claims = verify(&a[0], &keys, &issuer, A).expect("/a got a token for A");
    assert_eq!(a_claims["sub"], "alice");
    assert_eq!(
        scopes(&a_claims),
        set(&["a:read"]),
        "only the route's scopes, not a:write, not B's"
    );
    let b_claims = verify(&b[0], &keys, &issuer, B).expect("/b got a token for B");
    assert_eq!(b_claims["sub"], "alice");
    assert_eq!(scopes(&b_claims), set(&["b:read", "b:write"]));
    // Each API rejects the other's token.
    assert!(verify(&a[0], &keys, &issuer, B).is_err(), "A's token at B");
    assert!(verify(&b[0], &keys, &issuer, A).is_err(), "B's token at A");
    assert!(
        verify(&svc, &keys, &issuer, A).is_err(),
        "the client token at A"
    );

    // The default route still gets the session's token (checked at userinfo by echo-api.mjs).
    let r = stack
        .api(reqwest::Method::GET, "/api/me")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["token_verified"], true);
    assert_eq!(body["sub"], "alice");

    // user-or-anonymous with a session: the user's token; none: still nothing.
    for path in ["/maybe/y", "/public/y"] {
        let r = stack
            .api(reqwest::Method::GET, path)
            .send()
            .await
            .expect("api");
        assert_eq!(r.status(), 200, "{path}");
    }
    let recs = echo.requests();
    let maybe = recs
        .iter()
        .rev()
        .find(|r| r.uri == "/maybe/y")
        .expect("maybe");
    let user_token = bearer(maybe).expect("the user's token when logged in");
    assert!(!a.contains(&user_token) && !b.contains(&user_token));
    let public = recs
        .iter()
        .rev()
        .find(|r| r.uri == "/public/y")
        .expect("public");
    assert_eq!(bearer(public), None);
    assert!(
        !public.header("cookie").unwrap_or("").contains("tg_"),
        "our cookies are stripped on none routes too"
    );

    // oidc-provider rotates refresh tokens and revokes the grant on reuse: refreshing now only
    // works if both downscoped grants kept the rotated token in the session.
    let r = stack
        .api(reqwest::Method::POST, "/refreshtoken")
        .send()
        .await
        .expect("refresh");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test]
async fn an_unknown_resource_is_a_403_from_oidc_provider() {
    let echo = EchoApi::start().await;
    let up = echo.url();
    let stack = Stack::start_with(StackOptions {
        idp_env: vec![("IDP_RESOURCES", json!({ A: "a:read" }).to_string())],
        // a:write is asked for at login, but A does not know it: never granted.
        extra_scopes: vec!["a:read".into(), "a:write".into()],
        extra_routes: format!(
            r#"
[[routes]]
prefix = "/a"
upstream = "{up}"
resource = "{A}"
scopes = ["a:write"]

[[routes]]
prefix = "/svc"
upstream = "{up}"
token = "client"
resource = "http://unknown.test/"
"#
        ),
        client_extra: json!({
            "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
        }),
        ..StackOptions::default()
    })
    .await;
    let r = stack
        .api(reqwest::Method::GET, "/svc/x")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "invalid_target", "{v}");

    assert_eq!(stack.login("carol", "/").await.status(), 302);
    let r = stack
        .api(reqwest::Method::GET, "/a/x")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "invalid_scope", "{v}");
    assert!(echo.requests().is_empty());
    // The session itself is fine.
    let r = stack
        .api(reqwest::Method::GET, "/api/still")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
}
