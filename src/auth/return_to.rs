//! `return_to` validation: after login the browser may only be sent to a path on our own origin.
//! The value is checked the way a browser would read it (WHATWG URL parsing against `public_url`),
//! after refusing everything browsers are known to "fix up" into another host: `//host`, `/\host`,
//! schemes, control characters (tab/CR/LF are stripped by browsers), encoded variants of those,
//! and non-ASCII look-alikes of `/`, `\`, `.` and `@`.

use percent_encoding::percent_decode_str;
use url::Url;

/// Longest `return_to` kept; longer ones fall back to `/`.
pub const MAX_LEN: usize = 2048;

/// Returns a safe same-origin relative URL (`/path?query`) for `candidate`, or `/`.
pub fn sanitize(candidate: Option<&str>, public_url: &Url) -> String {
    candidate
        .and_then(|c| checked(c, public_url))
        .unwrap_or_else(|| "/".to_string())
}

fn suspicious(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() || c == '\\' || !c.is_ascii())
        || !s.starts_with('/')
        || s.starts_with("//")
}

fn checked(candidate: &str, public_url: &Url) -> Option<String> {
    if candidate.is_empty()
        || candidate.len() > MAX_LEN
        || suspicious(candidate)
        || !decoded_layers_ok(candidate)
    {
        return None;
    }
    // A path whose first segment is made of dots could resolve upwards into `//`.
    let resolved = public_url.join(candidate).ok()?;
    if resolved.origin() != public_url.origin() {
        return None;
    }
    // Re-serialise from the parsed URL: what we redirect to is what a browser resolved.
    let mut out = resolved.path().to_string();
    if out.starts_with("//") {
        return None;
    }
    if let Some(q) = resolved.query() {
        out.push('?');
        out.push_str(q);
    }
    // Resolving dot segments can bring encoded pieces together (`/x/../%2f%2fevil.com` becomes
    // `/%2f%2fevil.com`): what we hand out must pass the same layer checks as what came in.
    if !decoded_layers_ok(&out) {
        return None;
    }
    Some(out)
}

/// Looks through up to three layers of percent-encoding: an encoded `//`, `\`, control character
/// or look-alike is refused as if it were plain (some servers and frameworks decode again before
/// redirecting).
fn decoded_layers_ok(s: &str) -> bool {
    let mut layer = s.to_string();
    for _ in 0..3 {
        let decoded = percent_decode_str(&layer).decode_utf8_lossy().into_owned();
        if decoded == layer {
            break;
        }
        if suspicious(&decoded) || decoded.contains("/\\") || decoded.contains("\\/") {
            return false;
        }
        layer = decoded;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://app.example.com").expect("url")
    }

    #[test]
    fn keeps_plain_paths() {
        assert_eq!(sanitize(Some("/dashboard?x=1"), &base()), "/dashboard?x=1");
        assert_eq!(sanitize(Some("/a/b#frag"), &base()), "/a/b");
        assert_eq!(sanitize(Some("/"), &base()), "/");
        assert_eq!(sanitize(None, &base()), "/");
    }

    #[test]
    fn refuses_off_origin_tricks() {
        for bad in [
            "//evil.com",
            "/\\evil.com",
            "\\\\evil.com",
            "https://evil.com",
            "javascript:alert(1)",
            "/%2f%2fevil.com",
            "/%5cevil.com",
            "%2f%2fevil.com",
            "/\tevil.com",
            "/\t/evil.com",
            "/%09/evil.com",
            "/%0d%0aSet-Cookie:x=1",
            "/\u{ff0f}evil.com",
            "/\u{3002}evil.com",
            "/%E3%80%82evil.com",
            "/%252f%252fevil.com",
            "evil.com",
            "",
            "/./../..//evil.com",
        ] {
            let out = sanitize(Some(bad), &base());
            assert_eq!(out, "/", "{bad:?} gave {out:?}");
        }
    }

    #[test]
    fn dot_segments_stay_on_origin() {
        assert_eq!(sanitize(Some("/a/../b"), &base()), "/b");
    }
}
