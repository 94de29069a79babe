//! Micro-benchmarks of the work tokengate does on every proxied API call (cookie store):
//! open + parse the sealed session, the header rules, the path checks; plus sealing (on login,
//! refresh, and the once-a-minute idle touch) and what ID-token validation costs (on login and
//! refresh only).
//!
//!   cargo bench --bench per_request                 # full run
//!   cargo bench --bench per_request -- --quick      # a quick look
//!
//! The end-to-end side-by-side benchmark is `bench/run.sh` (docs/benchmarks.md).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::json;

use tokengate::proxy::added::Added;
use tokengate::proxy::headers::{
    set_authorization, set_forwarded, strip_hop_by_hop, strip_our_cookies, ProtoHost,
};
use tokengate::proxy::path::{is_clean, under_prefix};
use tokengate::session::cookie::{CookieFields, CookieRules, RequestCookies};
use tokengate::session::seal::Sealer;
use tokengate::session::tokens::Session;

/// A realistic ID token body (~1 KB once signed) like oidc-provider issues.
fn id_token_claims(now: u64) -> serde_json::Value {
    json!({
        "sub": "alice", "name": "Alice", "email": "alice@example.com", "email_verified": true,
        "nonce": "n-8QyJ1c3lF3mR0W3u9G0tQm2m3yQ6c1b4", "at_hash": "x0pM3lT1kq3hVQm0d2rR6A",
        "aud": "tokengate", "iss": "http://127.0.0.1:9000",
        "iat": now, "exp": now + 3600,
    })
}

struct RsaFixture {
    token: String,
    decoding: DecodingKey,
    jwk: jsonwebtoken::jwk::Jwk,
}

fn rsa_fixture(now: u64) -> RsaFixture {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa keygen");
    let der = key.to_pkcs1_der().expect("pkcs1 der");
    let enc = EncodingKey::from_rsa_der(der.as_bytes());
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("bench-key".into());
    let token = jsonwebtoken::encode(&header, &id_token_claims(now), &enc).expect("sign");
    let n = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be());
    let decoding = DecodingKey::from_rsa_components(&n, &e).expect("rsa components");
    let jwk = serde_json::from_value(json!({
        "kty": "RSA", "kid": "bench-key", "use": "sig", "alg": "RS256", "n": n, "e": e,
    }))
    .expect("jwk");
    RsaFixture {
        token,
        decoding,
        jwk,
    }
}

/// A session as the cookie store serialises it: opaque access/refresh tokens of oidc-provider's
/// size, the RS256 ID token, scope, times. Padded to ~2.5 KB of JSON (a typical IdP's tokens
/// with a few more claims).
fn session_json(id_token: &str, now: u64) -> Vec<u8> {
    let mut v = json!({
        "sid": "Q2hbq4Jr0vP1l0h3JX7Y9w",
        "at": "Fj3kS9xQmP0rT7vWc2LbN8aHd5YeUz1oGi4Kq6Rs-_TxVnM",
        "rt": "Lp2Wq8ErTy5Ui0Op3As6Df9Gh1Jk4Zx7Cv0Bn3Mq-_WeRtYu",
        "it": id_token,
        "exp": now + 300,
        "scp": "openid profile email offline_access",
        "sub": "alice",
        "iat": now,
        "seen": now,
        "gen": 0,
    });
    let mut bytes = serde_json::to_vec(&v).expect("json");
    if bytes.len() < 2500 {
        // a longer ID token (more claims) is what makes real sessions bigger
        let extra = "x".repeat(2500 - bytes.len());
        v["it"] = json!(format!("{id_token}{extra}"));
        bytes = serde_json::to_vec(&v).expect("json");
    }
    bytes
}

/// What a browser sends on `fetch('/api/orders/42', {headers: {'X-CSRF': '1'}})`.
fn browser_headers(sealed_session: &str) -> HeaderMap {
    let cookie = format!(
        "_ga=GA1.1.1234567890.1700000000; theme=dark; tg_session={sealed_session}; \
         _ga_ABCDEF=GS1.1.1700000000.1.1.1700000100.0.0.0; consent=yes"
    );
    let pairs: Vec<(&str, String)> = vec![
        ("host", "app.example.com".into()),
        ("connection", "keep-alive".into()),
        (
            "sec-ch-ua",
            "\"Chromium\";v=\"124\", \"Google Chrome\";v=\"124\", \"Not-A.Brand\";v=\"99\"".into(),
        ),
        ("x-csrf", "1".into()),
        ("sec-ch-ua-mobile", "?0".into()),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
             Chrome/124.0.0.0 Safari/537.36"
                .into(),
        ),
        ("sec-ch-ua-platform", "\"Linux\"".into()),
        ("accept", "*/*".into()),
        ("sec-fetch-site", "same-origin".into()),
        ("sec-fetch-mode", "cors".into()),
        ("sec-fetch-dest", "empty".into()),
        ("referer", "https://app.example.com/orders".into()),
        ("accept-encoding", "gzip, deflate, br, zstd".into()),
        ("accept-language", "en-GB,en;q=0.9,de;q=0.8".into()),
        ("cookie", cookie),
    ];
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_static(k),
            HeaderValue::from_str(&v).expect("header value"),
        );
    }
    h
}

fn now_s() -> u64 {
    tokengate::session::tokens::now_s()
}

fn seal_benches(c: &mut Criterion, fx: &RsaFixture) {
    let now = now_s();
    let plain = session_json(&fx.token, now);
    let sealer = Sealer::new(&[[7u8; 32]]);
    let rotated = Sealer::new(&[[9u8; 32], [7u8; 32]]);
    let aad = b"tg_session";
    let sealed = sealer.seal(aad, &plain);

    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Bytes(plain.len() as u64));
    g.bench_function(format!("seal_{}B", plain.len()), |b| {
        b.iter(|| sealer.seal(black_box(aad), black_box(&plain)))
    });
    g.bench_function(format!("open_{}B", plain.len()), |b| {
        b.iter(|| sealer.open(black_box(aad), black_box(&sealed)))
    });
    g.bench_function("open_with_second_key (rotation)", |b| {
        b.iter(|| rotated.open(black_box(aad), black_box(&sealed)))
    });
    // the per-request load of the cookie store: open + parse
    g.bench_function("load = open + serde_json::from_slice::<Session>", |b| {
        b.iter(|| {
            let p = sealer.open(aad, black_box(&sealed)).expect("open");
            serde_json::from_slice::<Session>(&p).expect("session")
        })
    });
    // the save on login / refresh / idle touch: serialise + seal
    let session: Session = serde_json::from_slice(&plain).expect("session");
    g.bench_function("save = serde_json::to_vec + seal", |b| {
        b.iter(|| {
            let p = serde_json::to_vec(black_box(&session)).expect("json");
            sealer.seal(aad, &p)
        })
    });
    g.finish();
}

fn header_benches(c: &mut Criterion, fx: &RsaFixture) {
    let sealed = Sealer::new(&[[7u8; 32]]).seal(b"tg_session", &session_json(&fx.token, now_s()));
    let base = browser_headers(&sealed);
    let rules = CookieRules::new(false);
    let peer = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    let proto_host = ProtoHost::new("https", b"app.example.com");
    let access_token = "Fj3kS9xQmP0rT7vWc2LbN8aHd5YeUz1oGi4Kq6Rs-_TxVnM";

    let mut g = c.benchmark_group("headers");
    g.bench_function("clone_map (baseline)", |b| {
        b.iter(|| black_box(&base).clone())
    });
    g.bench_function("strip_hop_by_hop", |b| {
        b.iter_batched_ref(|| base.clone(), strip_hop_by_hop, BatchSize::SmallInput)
    });
    g.bench_function("strip_our_cookies", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| {
                let sent = RequestCookies::standalone(h, CookieFields::default());
                strip_our_cookies(h, &sent, &rules, &mut Added::default())
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("set_authorization", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| set_authorization(h, black_box(access_token), None, &mut Added::default()),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("set_forwarded", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| set_forwarded(h, peer, false, &proto_host, &mut Added::default()),
            BatchSize::SmallInput,
        )
    });
    // everything the proxy does to the request headers, in forward.rs order
    g.bench_function("all (request side)", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| {
                let mut added = Added::with_capacity(160);
                strip_hop_by_hop(h);
                let sent = RequestCookies::standalone(h, CookieFields::default());
                strip_our_cookies(h, &sent, &rules, &mut added);
                set_authorization(h, access_token, None, &mut added);
                set_forwarded(h, peer, false, &proto_host, &mut added);
                added
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn path_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    for p in [
        "/api/orders/42",
        "/api/v1/customers/8f14e45f-ceea-467f-a8e1-3c2b6f0a9d17/orders/2024-05/items;page=3",
    ] {
        g.bench_function(format!("is_clean {} B", p.len()), |b| {
            b.iter(|| is_clean(black_box(p)))
        });
    }
    g.bench_function("is_clean rejects %2e%2e", |b| {
        b.iter(|| is_clean(black_box("/api/%2e%2e/admin")))
    });
    g.bench_function("under_prefix", |b| {
        b.iter(|| under_prefix(black_box("/api/orders/42"), black_box("/api")))
    });
    g.finish();
}

fn id_token_benches(c: &mut Criterion, fx: &RsaFixture) {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&["http://127.0.0.1:9000"]);
    validation.set_audience(&["tokengate"]);
    let mut g = c.benchmark_group("id_token");
    g.bench_function("jsonwebtoken::decode RS256-2048", |b| {
        b.iter(|| {
            jsonwebtoken::decode::<serde_json::Value>(
                black_box(&fx.token),
                &fx.decoding,
                &validation,
            )
            .expect("valid")
        })
    });
    // on login and refresh only (not per request). What Idp::validate_id_token does: header,
    // key from the JWKS entry, then decode
    g.bench_function("decode_header + DecodingKey::from_jwk + decode", |b| {
        b.iter(|| {
            let _h = jsonwebtoken::decode_header(black_box(&fx.token)).expect("header");
            let key = DecodingKey::from_jwk(&fx.jwk).expect("key");
            jsonwebtoken::decode::<serde_json::Value>(&fx.token, &key, &validation).expect("valid")
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let fx = rsa_fixture(now_s());
    seal_benches(c, &fx);
    header_benches(c, &fx);
    path_benches(c);
    id_token_benches(c, &fx);
}

criterion_group!(per_request, benches);
criterion_main!(per_request);
