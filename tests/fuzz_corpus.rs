//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) under `cargo test`, with the same
//! checks as the cargo-fuzz targets in `fuzz/fuzz_targets/` (kept in step by hand: a few lines
//! each). CI runs this; long fuzzing runs are `scripts/fuzz.sh` (docs/fuzzing.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokengate::auth::return_to::sanitize;
use tokengate::auth::QueryParams;
use tokengate::idp::id_token::unverified_claims;
use tokengate::proxy::path::{is_clean, under_prefix};
use tokengate::session::cookie::{CookieRules, RequestCookies, CHUNK, MAX_CHUNKS};
use tokengate::session::seal::Sealer;
use tower_cookies::{Cookie, Cookies};
use url::Url;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("dir entry").path();
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
}

/// Runs `check` over every file of `target`'s corpus, naming the file that fails.
fn replay(target: &str, check: impl Fn(&[u8])) {
    for (path, data) in corpus(target) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{target}: {} fails: {msg}", path.display());
        }
    }
}

// ---- return_to (fuzz/fuzz_targets/return_to.rs) ----

fn check_return_to(input: &str, public_url: &Url) {
    let out = sanitize(Some(input), public_url);
    assert!(out.starts_with('/'), "{input:?} -> {out:?}: not a path");
    assert!(
        !out.starts_with("//"),
        "{input:?} -> {out:?}: scheme-relative"
    );
    assert!(
        !out.starts_with("/\\"),
        "{input:?} -> {out:?}: backslash host"
    );
    assert!(
        !out.chars().any(char::is_control),
        "{input:?} -> {out:?}: control character"
    );
    for base in [
        public_url.clone(),
        public_url
            .join("/oauth-callback?code=x&state=y")
            .expect("base"),
    ] {
        let resolved = base
            .join(&out)
            .unwrap_or_else(|e| panic!("{input:?} -> {out:?}: does not resolve: {e}"));
        assert_eq!(
            resolved.origin(),
            public_url.origin(),
            "{input:?} -> {out:?}: resolves off origin to {resolved}"
        );
    }
}

#[test]
fn return_to_corpus() {
    replay("return_to", |data| {
        let input = String::from_utf8_lossy(data);
        for base in ["https://app.example.com", "http://localhost:8080"] {
            check_return_to(&input, &Url::parse(base).expect("public_url"));
        }
    });
}

// ---- path (fuzz/fuzz_targets/path.rs) ----

fn check_path(s: &str) {
    let clean = is_clean(s);
    let under = under_prefix(s, "/api");
    if under {
        assert!(
            s.starts_with("/api"),
            "{s:?}: under /api without the prefix"
        );
        assert!(
            s.len() == 4 || s.as_bytes()[4] == b'/',
            "{s:?}: under /api off a segment boundary"
        );
    }
    if clean {
        assert!(s.starts_with('/'), "{s:?}: clean but relative");
        let lower = s.to_ascii_lowercase();
        for bad in ["%2e", "%2f", "%5c", "%00", "%25", "\\", "//"] {
            assert!(!lower.contains(bad), "{s:?}: clean but contains {bad:?}");
        }
        assert!(
            !s.chars().any(char::is_control),
            "{s:?}: clean but has a control character"
        );
        for seg in s[1..].split('/') {
            let bare = seg.split(';').next().unwrap_or("");
            assert!(
                bare != "." && bare != "..",
                "{s:?}: clean but has a dot segment {seg:?}"
            );
        }
        let base = Url::parse("http://upstream.internal").expect("base");
        if let Ok(u) = base.join(s) {
            assert_eq!(
                u.host_str(),
                Some("upstream.internal"),
                "{s:?}: changes host"
            );
            if under && !s.contains('?') && !s.contains('#') {
                assert!(
                    under_prefix(u.path(), "/api"),
                    "{s:?}: resolves out of /api to {}",
                    u.path()
                );
            }
        }
    }
}

#[test]
fn path_corpus() {
    replay("path", |data| check_path(&String::from_utf8_lossy(data)));
}

// ---- callback_query (fuzz/fuzz_targets/callback_query.rs) ----

const SINGLE: [&str; 3] = ["state", "code", "iss"];

fn check_callback_query(s: &str) {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let repeated = |key: &str| pairs.iter().filter(|(k, _)| k == key).count() > 1;
    match QueryParams::parse(Some(s), &SINGLE) {
        Ok(q) => {
            for key in SINGLE.iter().chain(&["error", "error_description", ""]) {
                let first = pairs
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str());
                assert_eq!(q.get(key), first, "{s:?}: {key}");
            }
            for key in SINGLE {
                assert!(!repeated(key), "{s:?}: repeated {key} accepted");
            }
        }
        Err(_) => assert!(
            SINGLE.iter().any(|key| repeated(key)),
            "{s:?}: refused without a repeated single-use parameter"
        ),
    }
}

#[test]
fn callback_query_corpus() {
    assert!(QueryParams::parse(None, &SINGLE).is_ok());
    replay("callback_query", |data| {
        check_callback_query(&String::from_utf8_lossy(data))
    });
}

// ---- jwt (fuzz/fuzz_targets/jwt.rs): must not panic ----

fn check_jwt(s: &str) {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
    let (token, jwks) = s.split_once('\n').unwrap_or((s, s));
    let header = decode_header(token).ok();
    let _ = unverified_claims(token);
    let _ = unverified_claims(s);
    let _ = decode_header(s);
    for doc in [jwks, s] {
        let Ok(set) = serde_json::from_str::<JwkSet>(doc) else {
            continue;
        };
        for jwk in &set.keys {
            let _ = set.find(jwk.common.key_id.as_deref().unwrap_or(""));
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            if let Some(h) = &header {
                let mut v = Validation::new(h.alg);
                v.validate_exp = false;
                v.validate_aud = false;
                v.required_spec_claims.clear();
                let _ = decode::<serde_json::Value>(token, &key, &v);
            }
        }
    }
}

#[test]
fn jwt_corpus() {
    replay("jwt", |data| check_jwt(&String::from_utf8_lossy(data)));
}

// ---- session_cookie (fuzz/fuzz_targets/session_cookie.rs) ----

/// Returns whether the session the browser sent opened.
fn check_session_cookie(data: &[u8]) -> bool {
    let Some((&flags, rest)) = data.split_first() else {
        return false;
    };
    let rules = CookieRules::new(flags & 1 == 1);
    let repeat = 1 + usize::from((flags >> 1) & 0x0f);
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let candidate = lines.next().unwrap_or("");
    let payload = lines.next().unwrap_or("").as_bytes().repeat(repeat);
    let sealer = Sealer::new(&[[7u8; 32], [9u8; 32]]);
    let aad = rules.session_name().as_bytes().to_vec();

    let _ = sealer.open(&aad, candidate);

    let jar = Cookies::default();
    for line in lines.take(32) {
        let (name, value) = line.split_once('=').unwrap_or((line, ""));
        let name = name.replace('$', rules.session_name());
        jar.add(Cookie::new(name, value.to_string()));
    }
    let _ = rules.tx_names(&jar);
    // The same cookies as the browser's Cookie header, which is what the session is read from.
    let sent = RequestCookies::sent_back(&jar);
    let _ = rules.has_session_cookie(&sent);
    let opened = match rules.read_session(&sent) {
        Some(v) => {
            assert!(!v.is_empty());
            sealer.open(&aad, &v).is_some()
        }
        None => false,
    };

    let sealed = sealer.seal(&aad, &payload);
    let jar = Cookies::default();
    if rules.write_session(
        &RequestCookies::writing_to(jar.clone()),
        &sealed,
        Duration::from_secs(60),
    ) {
        let sent = RequestCookies::sent_back(&jar);
        let back = rules
            .read_session(&sent)
            .expect("a written session reads back");
        assert_eq!(&*back, sealed.as_bytes());
        assert_eq!(sealer.open(&aad, &back).as_deref(), Some(&payload[..]));
        assert!(
            sealer.open(b"tg_tx_x", &back).is_none(),
            "aad binds the cookie"
        );
    } else {
        assert!(sealed.len() > CHUNK * MAX_CHUNKS);
    }
    opened
}

#[test]
fn session_cookie_corpus() {
    replay("session_cookie", |data| {
        check_session_cookie(data);
    });
    // The seeds hold genuine sessions (sealed with the keys above, one whole, one with the
    // second key, one in chunks), so the success path is replayed too.
    let opened = corpus("session_cookie")
        .iter()
        .filter(|(_, data)| check_session_cookie(data))
        .count();
    assert!(opened >= 3, "only {opened} seeds hold a session that opens");
}
