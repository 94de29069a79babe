//! `return_to` after login: whatever the browser sends, the redirect stays on our origin.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::auth::return_to::sanitize;
use url::Url;

fn check(input: &str, public_url: &Url) {
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
    // Resolved the way a browser resolves a Location header: against the origin, and against the
    // callback URL the redirect is answered from.
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

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    for base in ["https://app.example.com", "http://localhost:8080"] {
        check(&input, &Url::parse(base).expect("public_url"));
    }
});
