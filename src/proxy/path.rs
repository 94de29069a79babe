//! The one path check shared by route matching and forwarding: a request path is used exactly as
//! received, so it must not contain anything an upstream could resolve differently (dot segments,
//! encoded slashes or dots, backslashes, empty segments, control characters, spaces).

/// Whether `path` is safe to match against route prefixes and forward byte for byte.
pub fn is_clean(path: &str) -> bool {
    // A space is never in a request target (RFC 9112 §3.2), and URL parsers trim a trailing one:
    // `/api/.. ` would resolve to `/` upstream (found by the `path` fuzz target).
    if !path.starts_with('/')
        || path.contains('\\')
        || path.contains(' ')
        || path.chars().any(|c| c.is_control())
    {
        return false;
    }
    // %2e = '.', %2f = '/', %5c = '\', %00 = NUL, %25 = '%' (double encoding); checked only when
    // there is a '%' at all (most API paths have none: no lower-cased copy per request).
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
        // `..;` is how some servers (Tomcat) spell `..`; a trailing `/` (empty last segment) is fine.
        let bare = seg.split(';').next().unwrap_or("");
        bare != "." && bare != ".." && (!seg.is_empty() || i == last)
    })
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
