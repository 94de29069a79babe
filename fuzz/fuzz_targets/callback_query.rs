//! The callback's query string (`code`, `state`, `iss`): parsing never panics, and a single-use
//! parameter is either refused as repeated or read back as its first value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::auth::QueryParams;

const SINGLE: [&str; 3] = ["state", "code", "iss"];

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    match QueryParams::parse(Some(&s), &SINGLE) {
        Ok(q) => {
            for key in SINGLE.iter().chain(&["error", "error_description", ""]) {
                let first = pairs
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str());
                assert_eq!(q.get(key), first, "{s:?}: {key}");
            }
            for key in SINGLE {
                assert!(
                    pairs.iter().filter(|(k, _)| k == key).count() <= 1,
                    "{s:?}: repeated {key} accepted"
                );
            }
        }
        Err(_) => assert!(
            SINGLE
                .iter()
                .any(|key| pairs.iter().filter(|(k, _)| k == key).count() > 1),
            "{s:?}: refused without a repeated single-use parameter"
        ),
    }
    assert!(QueryParams::parse(None, &SINGLE).is_ok());
});
