//! Pushed Authorization Requests (RFC 9126) with the fake IdP: what is pushed, what the browser
//! carries, and the IdP's PAR failures (refusal, server error, unusable answer, no endpoint when
//! required) as 502 JSON that leaves no pending login behind. The flow against oidc-provider's
//! PAR is in oidc_provider.rs.

use serde_json::{json, Value};

use crate::helpers::*;

const URN: &str = "urn:ietf:params:oauth:request_uri:fake-1";

#[tokio::test]
async fn the_whole_request_is_pushed_and_the_browser_carries_only_its_handle() {
    let idp = FakeIdp::start().await;
    idp.behave(|b| b.par_answer = Some((201, json!({ "request_uri": URN, "expires_in": 60 }))));
    let app = spawn_app_with(AppOptions::default().idp(&idp).oauth("dpop = true")).await;
    let r = app
        .client
        .get(app.url("/login"))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 302);
    let location = url::Url::parse(
        r.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("location"),
    )
    .expect("absolute");
    let names: Vec<String> = location
        .query_pairs()
        .map(|(k, _)| k.into_owned())
        .collect();
    assert_eq!(names, ["client_id", "request_uri"]);
    assert_eq!(location.path(), "/authorize");
    assert!(location
        .query_pairs()
        .any(|(k, v)| k == "request_uri" && v == URN));
    let pushed = idp.pushed_requests();
    assert_eq!(pushed.len(), 1);
    let p = &pushed[0];
    assert!(
        p.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic ")),
        "the push is client-authenticated"
    );
    assert_eq!(p.get("response_type"), Some("code"));
    assert_eq!(p.get("code_challenge_method"), Some("S256"));
    for name in [
        "state",
        "code_challenge",
        "nonce",
        "redirect_uri",
        "scope",
        "dpop_jkt",
    ] {
        assert!(
            p.get(name).is_some_and(|v| !v.is_empty()),
            "{name} is pushed"
        );
    }
    assert_eq!(
        p.all("client_id").len(),
        1,
        "client_id once (RFC 9126 §2.1), not twice"
    );
}

#[tokio::test]
async fn par_failures_are_502_json_and_leave_no_pending_login() {
    let idp = FakeIdp::start().await;
    // Advertised from the start (metadata is read once); the answers change below.
    idp.behave(|b| b.par_answer = Some((201, json!({ "request_uri": URN }))));
    let app = spawn_app_with(AppOptions::default().idp(&idp)).await;
    let answers: [(u16, Value, &str); 4] = [
        (
            400,
            json!({ "error": "invalid_request", "error_description": "bad" }),
            "refused the pushed request",
        ),
        (500, json!({}), "failed"),
        (201, json!({ "not": "a request_uri" }), "failed"),
        (201, json!({ "request_uri": "" }), "failed"),
    ];
    for (status, body, says) in answers {
        idp.behave(|b| b.par_answer = Some((status, body.clone())));
        let r = app
            .raw_client
            .get(app.url("/login"))
            .send()
            .await
            .expect("login");
        assert!(
            r.headers().get("set-cookie").is_none(),
            "PAR {status} {body}: no login transaction is recorded: {:?}",
            r.headers().get_all("set-cookie")
        );
        let v = assert_json_error(r, 502).await;
        assert_eq!(v["error"], "bad_gateway");
        let d = v["error_description"].as_str().unwrap_or("");
        assert!(d.contains(says), "PAR {status} {body}: {d}");
        assert!(!d.contains("bad"), "the IdP's own text is not relayed: {d}");
    }
    assert_eq!(idp.pushed_requests().len(), 4);
}

#[tokio::test]
async fn required_par_without_an_endpoint_is_a_clear_502() {
    let idp = FakeIdp::start().await;
    let app = spawn_app_with(AppOptions::default().idp(&idp).oauth("par = \"required\"")).await;
    let r = app
        .raw_client
        .get(app.url("/login"))
        .send()
        .await
        .expect("login");
    assert!(r.headers().get("set-cookie").is_none());
    let v = assert_json_error(r, 502).await;
    assert!(
        v["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("no PAR endpoint")),
        "{v}"
    );
}
