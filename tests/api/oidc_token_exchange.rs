//! Token exchange (RFC 8693) per route against the real `oidc-provider`, with a token-exchange
//! grant registered through its `registerGrantType` API (tests/idp/idp.mjs, `IDP_EXCHANGE`): the
//! API behind an `exchange` route receives a JWT whose `aud` is the route's audience and whose
//! scopes are the route's only, never the session's own token; exchanges are cached per
//! session; refusals are 403 JSON and reach no API.

use serde_json::{json, Value};

use crate::helpers::EchoApi;
use crate::oidc_provider::{Stack, StackOptions};
use crate::oidc_route_tokens::{bearer, jwks, scopes, set, verify};

const X: &str = "http://api-x.test/";
const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

#[tokio::test]
async fn an_exchange_route_gets_a_token_for_its_audience_from_oidc_provider() {
    let echo = EchoApi::start().await;
    let up = echo.url();
    let stack = Stack::start_with(StackOptions {
        idp_env: vec![("IDP_EXCHANGE", json!({ X: "x:read x:write" }).to_string())],
        client_extra: json!({
            "grant_types": ["authorization_code", "refresh_token", EXCHANGE],
        }),
        extra_routes: format!(
            r#"
[[routes]]
prefix = "/x"
upstream = "{up}"
exchange = {{ audience = "{X}", scope = "x:read" }}

[[routes]]
prefix = "/unknown"
upstream = "{up}"
exchange = {{ audience = "http://nope.test/" }}

[[routes]]
prefix = "/toomuch"
upstream = "{up}"
exchange = {{ audience = "{X}", scope = "x:admin" }}

[[routes]]
prefix = "/own"
upstream = "{up}"
"#
        ),
        ..StackOptions::default()
    })
    .await;

    // No session: nothing to exchange.
    let r = reqwest::Client::new()
        .get(format!("{}/x/items", stack.base))
        .header("X-CSRF", "1")
        .send()
        .await
        .expect("call");
    assert_eq!(r.status(), 401);

    assert_eq!(stack.login("alice", "/").await.status(), 302);
    for path in ["/x/items", "/x/again", "/own/me"] {
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
    let stats = stack.idp_stats().await;
    assert_eq!(
        stats["grants"][EXCHANGE], 1,
        "one exchange, the repeat served from the cache: {stats}"
    );
    let recs = echo.requests();
    let x: Vec<String> = recs
        .iter()
        .filter(|r| r.uri.starts_with("/x/"))
        .map(|r| bearer(r).expect("a token on /x"))
        .collect();
    assert_eq!(x.len(), 2);
    assert_eq!(x[0], x[1], "cached");
    let own = bearer(recs.iter().find(|r| r.uri == "/own/me").expect("own")).expect("token");
    assert_ne!(
        x[0], own,
        "the exchange route never sees the session's own token"
    );

    let keys = jwks(&stack.issuer).await;
    let claims = verify(&x[0], &keys, &stack.issuer, X).expect("a JWT for X");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(scopes(&claims), set(&["x:read"]), "the route's scope only");
    assert_eq!(claims["client_id"], "tokengate");
    assert!(
        verify(&x[0], &keys, &stack.issuer, "http://other.test/").is_err(),
        "another API rejects it"
    );

    // Refusals: a 403 in RFC 6749 style, and the API is not called.
    let before = echo.requests().len();
    for (path, code) in [
        ("/unknown/x", "invalid_target"),
        ("/toomuch/x", "invalid_scope"),
    ] {
        let r = stack
            .api(reqwest::Method::GET, path)
            .send()
            .await
            .expect("api");
        assert_eq!(r.status(), 403, "{path}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"], code, "{path}: {v}");
        assert!(!v.to_string().contains(&own), "no token in the error: {v}");
    }
    assert_eq!(echo.requests().len(), before);
    // The session itself is fine.
    let r = stack
        .api(reqwest::Method::GET, "/api/still")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
}
