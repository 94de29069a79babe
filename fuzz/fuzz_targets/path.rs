//! Proxy path check: a path `is_clean` accepts carries nothing an upstream could resolve upwards.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::proxy::path::{is_clean, under_prefix};

fn check(s: &str) {
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
        // What an upstream does with it: WHATWG resolution keeps the path as is (no dot segment
        // to remove, nothing decoded), so prefix matching is done on what is forwarded.
        let base = url::Url::parse("http://upstream.internal").expect("base");
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

fuzz_target!(|data: &[u8]| {
    check(&String::from_utf8_lossy(data));
});
