//! The one path check shared by route matching and forwarding: a request path is used exactly as
//! received, so it must not contain anything an upstream could resolve differently (dot segments,
//! encoded slashes or dots, backslashes, empty segments, control characters, spaces).

/// Whether `path` is safe to match against route prefixes and forward byte for byte.
///
/// One pass over the bytes, nothing allocated (it runs on every API call).
pub fn is_clean(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    // Where the current segment starts, and where its first `;` is (`..;` is how some servers,
    // Tomcat, spell `..`).
    let mut seg = 1;
    let mut semi = None;
    let mut i = 1;
    while i <= b.len() {
        let c = b.get(i).copied();
        match c {
            None | Some(b'/') => {
                let bare = &b[seg..semi.unwrap_or(i)];
                // An empty segment only as the last one (a trailing `/`).
                if bare == b"." || bare == b".." || (i == seg && c.is_some()) {
                    return false;
                }
                seg = i + 1;
                semi = None;
            }
            Some(b';') => {
                semi.get_or_insert(i);
            }
            // A space is never in a request target (RFC 9112 §3.2), and URL parsers trim a
            // trailing one: `/api/.. ` would resolve to `/` upstream (found by the `path` fuzz
            // target). Backslashes, and control characters (C0, DEL, and C1: U+0080–U+009F,
            // `C2 80`–`C2 9F` in UTF-8).
            Some(b' ' | b'\\' | 0..=0x1f | 0x7f) => return false,
            Some(0xc2) if matches!(b.get(i + 1), Some(0x80..=0x9f)) => return false,
            // %2e = '.', %2f = '/', %5c = '\', %00 = NUL, %25 = '%' (double encoding).
            Some(b'%') => {
                let e = [
                    b.get(i + 1).map(u8::to_ascii_lowercase),
                    b.get(i + 2).map(u8::to_ascii_lowercase),
                ];
                if matches!(
                    e,
                    [Some(b'2'), Some(b'e' | b'f' | b'5')]
                        | [Some(b'5'), Some(b'c')]
                        | [Some(b'0'), Some(b'0')]
                ) {
                    return false;
                }
            }
            Some(_) => {}
        }
        i += 1;
    }
    true
}

/// Whether `path` falls under `prefix` on a segment boundary (`/api` matches `/api`, `/api/x`,
/// not `/apix`).
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check as first written (a lower-cased copy, a list of segments), kept as the oracle of
    /// the one-pass version.
    fn is_clean_before(path: &str) -> bool {
        if !path.starts_with('/')
            || path.contains('\\')
            || path.contains(' ')
            || path.chars().any(|c| c.is_control())
        {
            return false;
        }
        if path.contains('%') {
            let lower = path.to_ascii_lowercase();
            if ["%2e", "%2f", "%5c", "%00", "%25"]
                .iter()
                .any(|e| lower.contains(e))
            {
                return false;
            }
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        let last = segments.len().saturating_sub(1);
        segments.iter().enumerate().all(|(i, seg)| {
            let bare = seg.split(';').next().unwrap_or("");
            bare != "." && bare != ".." && (!seg.is_empty() || i == last)
        })
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        #[test]
        fn one_pass_agrees_with_the_first_version(
            path in proptest::collection::vec(
                proptest::sample::select(vec![
                    "/", "a", ".", ";", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%00",
                    "%25", "%2", "%", "\\", " ", "\u{0}", "\u{1f}", "\u{7f}", "\u{80}", "\u{9f}",
                    "\u{a0}", "\u{c0}", "é",
                ]),
                0..12,
            ).prop_map(|t| format!("/{}", t.concat()))
        ) {
            prop_assert_eq!(is_clean(&path), is_clean_before(&path), "{:?}", path);
        }
    }

    #[test]
    fn clean_paths() {
        for ok in [
            "/",
            "/api",
            "/api/",
            "/api/users/1",
            "/api/a%20b",
            "/api/x.json",
            "/api/..x",
        ] {
            assert!(is_clean(ok), "{ok}");
        }
    }

    #[test]
    fn escapes_are_refused() {
        for bad in [
            "/api/../admin",
            "/api/./x",
            "/api/..",
            "/api/%2e%2e/admin",
            "/api/%2E%2E/admin",
            "/api/.%2e/admin",
            "/api%2f..%2fadmin",
            "/api/%5c..%5cadmin",
            "/api\\..\\admin",
            "/api//evil",
            "/api/..;/admin",
            "/api/%252e%252e/admin",
            "/api/\u{0}x",
            "/api/.. ",
            "/api/x y",
            "api/x",
        ] {
            assert!(!is_clean(bad), "{bad}");
        }
    }

    #[test]
    fn prefix_boundaries() {
        assert!(under_prefix("/api", "/api"));
        assert!(under_prefix("/api/x", "/api"));
        assert!(!under_prefix("/apix", "/api"));
        assert!(!under_prefix("/ap", "/api"));
    }
}
