//! The session cookie: opening any string, and reassembling whatever (chunked) cookies a browser
//! sends, never panic; a genuine sealed session written by `write_session` (split into chunks when
//! large) always reads back and opens, and only under its own cookie name.
//!
//! Input (plain text, so seeds are written by hand and replayed by tests/fuzz_corpus.rs):
//! byte 0 = flags (bit 0: https rules; bits 1-4: payload repeat count), then lines:
//! 1. a candidate sealed value, 2. a payload to seal, 3+. `NAME=VALUE` cookies, `$` in NAME standing
//! for the session cookie's name (`$`, `$.0` ... `$.9`, or any junk name).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tokengate::session::cookie::{CookieRules, RequestCookies};
use tokengate::session::seal::Sealer;
use tower_cookies::{Cookie, Cookies};

/// The keys the seeds were sealed with (`[7; 32]` seals, `[9; 32]` still opens).
fn sealer() -> Sealer {
    Sealer::new(&[[7u8; 32], [9u8; 32]])
}

fn check(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let rules = CookieRules::new(flags & 1 == 1);
    let repeat = 1 + usize::from((flags >> 1) & 0x0f);
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let candidate = lines.next().unwrap_or("");
    let payload = lines.next().unwrap_or("").as_bytes().repeat(repeat);
    let sealer = sealer();
    let aad = rules.session_name().as_bytes().to_vec();

    // Any string as a sealed value: never panics.
    let _ = sealer.open(&aad, candidate);

    // Whatever cookies the browser sends.
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
    if let Some(v) = rules.read_session(&sent) {
        assert!(!v.is_empty());
        let _ = sealer.open(&aad, &v);
    }

    // A genuine session of any size: written (split when large), read back, opened.
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
        assert!(
            sealed.len()
                > tokengate::session::cookie::CHUNK * tokengate::session::cookie::MAX_CHUNKS
        );
    }
}

fuzz_target!(|data: &[u8]| check(data));
