//! DPoP (RFC 9449) against the real `oidc-provider` with DPoP on, nonces required and the client
//! registered with `dpop_bound_access_tokens`: the code, refresh and userinfo requests carry
//! proofs (answering the IdP's `use_dpop_nonce` challenges), every access token is bound to
//! tokengate's key (`cnf.jkt`), and each API call carries `Authorization: DPoP` with a fresh
//! proof the API can verify (signature, `htm`, `htu`, `ath`). The bare token alone is useless.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::{jwk_thumbprint, unix_now, EchoApi, Recorded, ECHO_DPOP_NONCE};
use crate::oidc_provider::{Stack, StackOptions, SECRET};

fn b64json(part: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// What an API does with a DPoP request (RFC 9449 §4.3, §7.1): the proof is a JWT signed by the
/// key in its own header, for this method and URI, recent, and hashing this very token.
/// Returns the proof's claims and its key's thumbprint.
fn verify_proof(proof: &str, htm: &str, htu: &str, token: &str) -> Result<(Value, String), String> {
    let parts: Vec<&str> = proof.split('.').collect();
    if parts.len() != 3 {
        return Err("not a JWS".into());
    }
    let header = b64json(parts[0])?;
    if header["typ"] != "dpop+jwt" || header["alg"] != "ES256" {
        return Err(format!("header {header}"));
    }
    let jwk = &header["jwk"];
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" || jwk.get("d").is_some() {
        return Err(format!("jwk {jwk}"));
    }
    let coord = |k: &str| {
        URL_SAFE_NO_PAD
            .decode(jwk[k].as_str().unwrap_or(""))
            .map_err(|e| e.to_string())
    };
    let (x, y) = (coord("x")?, coord("y")?);
    if x.len() != 32 || y.len() != 32 {
        return Err("coordinates".into());
    }
    let point = p256::EncodedPoint::from_affine_coordinates(
        x.as_slice().into(),
        y.as_slice().into(),
        false,
    );
    let key = VerifyingKey::from_encoded_point(&point).map_err(|e| e.to_string())?;
    let sig = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|e| e.to_string())?;
    let sig = Signature::from_slice(&sig).map_err(|e| e.to_string())?;
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .map_err(|_| "bad signature".to_string())?;
    let claims = b64json(parts[1])?;
    let ath = URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()));
    if claims["htm"] != htm || claims["htu"] != htu || claims["ath"] != ath.as_str() {
        return Err(format!("claims {claims} for {htm} {htu}"));
    }
    let iat = claims["iat"].as_i64().ok_or("iat")?;
    if (unix_now() - iat).abs() > 60 || !claims["jti"].is_string() {
        return Err(format!("claims {claims}"));
    }
    Ok((claims, jwk_thumbprint(jwk)))
}

const RES: &str = "http://api-r.test/";

/// An API's whole check of a call: the token is bound (`cnf.jkt`, from introspection) to the key
/// that signed a valid proof for exactly this call.
fn api_accepts(authorization: &str, proof: Option<&str>, htm: &str, htu: &str, jkt: &str) -> bool {
    let Some(token) = authorization.strip_prefix("DPoP ") else {
        return false; // a bound token never passes as a bearer token
    };
    match proof.map(|p| verify_proof(p, htm, htu, token)) {
        Some(Ok((_, key))) => key == jkt,
        _ => false,
    }
}

fn dpop_token(rec: &Recorded) -> String {
    let auth = rec
        .header("authorization")
        .expect("an Authorization header");
    auth.strip_prefix("DPoP ")
        .unwrap_or_else(|| panic!("the DPoP scheme, not {auth:.7}"))
        .to_string()
}

async fn discovery(issuer: &str) -> Value {
    reqwest::get(format!("{issuer}/.well-known/openid-configuration"))
        .await
        .expect("discovery")
        .json()
        .await
        .expect("json")
}

/// The IdP's view of a token (RFC 7662), asked as the client.
async fn introspect(issuer: &str, token: &str) -> Value {
    let doc = discovery(issuer).await;
    reqwest::Client::new()
        .post(
            doc["introspection_endpoint"]
                .as_str()
                .expect("introspection"),
        )
        .basic_auth("tokengate", Some(SECRET))
        .form(&[("token", token)])
        .send()
        .await
        .expect("introspect")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn every_token_is_bound_to_tokengates_key_and_every_api_call_carries_a_proof() {
    let echo = EchoApi::start().await;
    let up = echo.url().to_string();
    let stack = Stack::start_with(StackOptions {
        extra_oauth: "dpop = true".into(),
        idp_env: vec![
            ("IDP_DPOP", "1".into()),
            ("IDP_DPOP_NONCE", "1".into()),
            ("IDP_RESOURCES", json!({ RES: "r:read" }).to_string()),
        ],
        extra_scopes: vec!["r:read".into()],
        // The IdP refuses any token request of this client without a proof.
        client_extra: json!({ "dpop_bound_access_tokens": true }),
        extra_routes: format!(
            "[[routes]]\nprefix = \"/d\"\nupstream = \"{up}\"\n\n[[routes]]\nprefix = \"/r\"\nupstream = \"{up}\"\nresource = \"{RES}\"\n"
        ),
        ..StackOptions::default()
    })
    .await;

    // The code is redeemed with a proof (after the IdP's nonce challenge).
    let r = stack.login("alice", "/").await;
    assert_eq!(r.status(), 302, "{}", r.text().await.unwrap_or_default());

    let r = stack
        .api(reqwest::Method::GET, "/d/items?q=1")
        // A proof made by the browser is never passed on.
        .header("DPoP", "browser-made")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
    let rec = echo.last();
    let token = dpop_token(&rec);
    let proof = rec.header("dpop").expect("a DPoP proof");
    let (claims, jkt) = verify_proof(proof, "GET", &format!("{up}/d/items"), &token)
        .expect("the API accepts the proof");
    assert!(claims.get("nonce").is_none(), "the API asked for no nonce");

    // The IdP bound the token to the proof's key.
    let info = introspect(&stack.issuer, &token).await;
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["cnf"]["jkt"], jkt.as_str(), "{info}");
    assert_eq!(info["sub"], "alice");

    let htu = format!("{up}/d/items");
    let bound = info["cnf"]["jkt"].as_str().expect("jkt");
    let auth = rec.header("authorization").expect("authorization");
    assert!(api_accepts(auth, Some(proof), "GET", &htu, bound));
    assert!(
        !api_accepts(&format!("Bearer {token}"), None, "GET", &htu, bound),
        "bare token"
    );
    assert!(!api_accepts(auth, None, "GET", &htu, bound), "no proof");
    assert!(
        !api_accepts(auth, Some(proof), "POST", &htu, bound),
        "proof for another method"
    );
    assert!(
        !api_accepts(auth, Some(proof), "GET", &format!("{up}/d/other"), bound),
        "proof for another URI"
    );

    // The IdP's own resource (userinfo) rejects the bare token too, and a proof made for another
    // request.
    let userinfo = discovery(&stack.issuer).await["userinfo_endpoint"]
        .as_str()
        .expect("userinfo")
        .to_string();
    let http = reqwest::Client::new();
    let bare = http
        .get(&userinfo)
        .bearer_auth(&token)
        .send()
        .await
        .expect("userinfo");
    assert_eq!(
        bare.status(),
        401,
        "a DPoP-bound token used as a bearer token"
    );
    let replayed = http
        .get(&userinfo)
        .header("authorization", format!("DPoP {token}"))
        .header("dpop", proof)
        .send()
        .await
        .expect("userinfo");
    assert_eq!(replayed.status(), 401, "a proof for another URI");

    // Each call gets a fresh proof (new jti) for its own method and URI.
    let r = stack
        .api(reqwest::Method::POST, "/d/things")
        .body("hello")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
    let rec = echo.last();
    let (claims2, jkt2) = verify_proof(
        rec.header("dpop").expect("proof"),
        "POST",
        &format!("{up}/d/things"),
        &dpop_token(&rec),
    )
    .expect("valid proof");
    assert_eq!(jkt2, jkt);
    assert_ne!(claims2["jti"], claims["jti"]);

    // An API that hands out nonces: the bodiless call is answered after one retry with it,
    // and the nonce is used from then on (also on calls with a body).
    let before = echo.requests().len();
    let r = stack
        .api(reqwest::Method::GET, "/d/dpop-nonce/a")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
    let recs = echo.requests();
    assert_eq!(recs.len() - before, 2, "challenge, then the retry");
    let (c, _) = verify_proof(
        recs[recs.len() - 1].header("dpop").expect("proof"),
        "GET",
        &format!("{up}/d/dpop-nonce/a"),
        &token,
    )
    .expect("valid proof");
    assert_eq!(c["nonce"], ECHO_DPOP_NONCE);
    let r = stack
        .api(reqwest::Method::PUT, "/d/dpop-nonce/b")
        .body("data")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200, "the known nonce is sent at once");
    assert_eq!(echo.requests().len() - before, 3);

    // The refresh grant carries a proof too; the new token is bound to the same key.
    let r = stack
        .api(reqwest::Method::POST, "/refreshtoken")
        .send()
        .await
        .expect("refresh");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let r = stack
        .api(reqwest::Method::GET, "/d/after")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200);
    let rec = echo.last();
    let fresh = dpop_token(&rec);
    assert_ne!(fresh, token, "refreshed");
    let (_, jkt3) = verify_proof(
        rec.header("dpop").expect("proof"),
        "GET",
        &format!("{up}/d/after"),
        &fresh,
    )
    .expect("valid proof");
    assert_eq!(jkt3, jkt);
    assert_eq!(
        introspect(&stack.issuer, &fresh).await["cnf"]["jkt"],
        jkt.as_str()
    );

    // A downscoped token (RFC 8707, a JWT for RES) is bound to the same key.
    let r = stack
        .api(reqwest::Method::GET, "/r/x")
        .send()
        .await
        .expect("api");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let rec = echo.last();
    let narrow = dpop_token(&rec);
    assert_ne!(narrow, fresh);
    let claims = b64json(narrow.split('.').nth(1).expect("a JWT")).expect("claims");
    assert_eq!(claims["aud"], RES);
    assert_eq!(claims["cnf"]["jkt"], jkt.as_str());
    verify_proof(
        rec.header("dpop").expect("proof"),
        "GET",
        &format!("{up}/r/x"),
        &narrow,
    )
    .expect("valid proof");
}

#[tokio::test]
async fn an_idp_with_dpop_off_redeems_no_dpop_bound_code() {
    // DPoP off at the IdP: the code carries dpop_jkt but the IdP cannot check a proof, so it
    // refuses to redeem it; tokengate answers in RFC 6749 style and holds no session.
    let stack = Stack::start_with(StackOptions {
        extra_oauth: "dpop = true".into(),
        ..StackOptions::default()
    })
    .await;
    let r = stack.login("bob", "/").await;
    let status = r.status();
    let v: Value = r.json().await.expect("json");
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "invalid_grant", "{v}");
    let me = stack
        .api(reqwest::Method::GET, "/userinfo")
        .send()
        .await
        .expect("userinfo");
    assert_eq!(me.status(), 401, "no session");
}

#[tokio::test]
async fn replicas_sharing_the_session_keys_share_the_dpop_key() {
    // Two replicas with the same session keys and the Redis store: the code is redeemed by one,
    // the API is called and the token refreshed through the other, and every proof is made with
    // the one key the tokens are bound to.
    let redis = crate::redis_server::RedisServer::start().await;
    let echo = EchoApi::start().await;
    let up = echo.url().to_string();
    let stack = Stack::start_with(StackOptions {
        extra_oauth: "dpop = true".into(),
        extra_session: format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
        replicas: 2,
        idp_env: vec![("IDP_DPOP", "1".into())],
        client_extra: json!({ "dpop_bound_access_tokens": true }),
        extra_routes: format!("[[routes]]\nprefix = \"/d\"\nupstream = \"{up}\"\n"),
        ..StackOptions::default()
    })
    .await;
    assert_eq!(stack.login("rita", "/").await.status(), 302);
    let mut keys = Vec::new();
    for (i, path) in ["/d/one", "/refreshtoken", "/d/two"].iter().enumerate() {
        let method = if *path == "/refreshtoken" {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let r = stack
            .browser
            .request(method, format!("{}{path}", stack.bases[1 - i % 2]))
            .header("X-CSRF", "1")
            .send()
            .await
            .expect("call");
        assert_eq!(
            r.status(),
            200,
            "{path}: {}",
            r.text().await.unwrap_or_default()
        );
        if path.starts_with("/d/") {
            let rec = echo.last();
            let token = dpop_token(&rec);
            let (_, jkt) = verify_proof(
                rec.header("dpop").expect("proof"),
                "GET",
                &format!("{up}{path}"),
                &token,
            )
            .expect("valid proof");
            assert_eq!(
                introspect(&stack.issuer, &token).await["cnf"]["jkt"],
                jkt.as_str()
            );
            keys.push(jkt);
        }
    }
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "one key across the replicas");
}
