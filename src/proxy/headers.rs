//! Header rules of the proxy, each a pure function with its own test.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::added::{valid_value, Added};
use crate::session::cookie::{cookie_pieces, CookieRules, RequestCookies};

/// Identity headers that some auth proxies set for their upstreams: a browser must never be able
/// to supply them, so they are dropped on the way in.
const SPOOFABLE_IDENTITY: &[&str] = &[
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-forwarded-groups",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-preferred-username",
    "x-auth-request-groups",
    "x-auth-request-access-token",
    "x-remote-user",
    "remote-user",
    "x-user",
    "x-userinfo",
    "x-id-token",
];

/// RFC 9110 §7.6.1 hop-by-hop headers, plus the legacy ones proxies still see; as header names,
/// compared without parsing or hashing a string per rule.
static HOP_BY_HOP_NAMES: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The lengths of the names in [`HOP_BY_HOP_NAMES`], as bits: with their first bytes, most
/// names are ruled out before any comparison (a test keeps this to the list).
const HOP_BY_HOP_LENS: u32 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;

/// The position of `name` in [`HOP_BY_HOP_NAMES`], if it is there.
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    let s = name.as_str().as_bytes();
    if s.len() >= 32
        || HOP_BY_HOP_LENS >> s.len() & 1 == 0
        || !matches!(s.first(), Some(b'c' | b'k' | b'p' | b't' | b'u'))
    {
        return None;
    }
    HOP_BY_HOP_NAMES.iter().position(|h| h == name)
}

/// The header names a `Connection` value lists (as sent: [`HeaderMap::remove`] of a `&str`
/// parses and lower-cases it without allocating, and ignores one that is no header name).
fn listed_in(connection: &HeaderValue) -> impl Iterator<Item = &str> {
    connection
        .to_str()
        .ok()
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// True when a `Connection` field value lists `close` (bytes as received: our server loop reads
/// it before it is a `HeaderValue`, the client from the answer's).
pub(crate) fn lists_close(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present (usually none of them is hop-by-hop, or only
    // `Connection`), then the removals in the order met, each `Connection` list right after
    // `Connection` (the order decides where `remove` moves the last header, so the order on the
    // wire). Nothing is allocated unless `Connection` comes more than once.
    let mut found = [0usize; HOP_BY_HOP_NAMES.len()];
    let mut n = 0;
    let mut listed: Option<HeaderValue> = None;
    let mut more_listed: Vec<HeaderValue> = Vec::new();
    let mut last = None;
    for (name, value) in headers.iter() {
        // `iter` gives a name's further values right after its first.
        let i = if last.is_some_and(|l| HOP_BY_HOP_NAMES[l] == *name) {
            last
        } else {
            let i = hop_by_hop(name);
            if let Some(i) = i {
                // The map's names are distinct: each is met once.
                if let Some(slot) = found.get_mut(n) {
                    *slot = i;
                    n += 1;
                }
            }
            i
        };
        last = i;
        if i == Some(0) {
            if listed.is_none() {
                listed = Some(value.clone());
            } else {
                more_listed.push(value.clone());
            }
        }
    }
    for &i in &found[..n] {
        headers.remove(&HOP_BY_HOP_NAMES[i]);
        if i == 0 {
            for v in listed.iter().chain(&more_listed) {
                for name in listed_in(v) {
                    headers.remove(name);
                }
            }
        }
    }
}

/// Removes tokengate's cookies from the `Cookie` fields the browser sent (`cookies`; the map's
/// `Cookie` fields, if it holds them, are dropped): the SPA's others, in their order, go to the
/// API as one `Cookie` field in `added`. A map's single `Cookie` with none of ours stays as it is.
pub fn strip_our_cookies(
    headers: &mut HeaderMap,
    cookies: &RequestCookies,
    rules: &CookieRules,
    added: &mut Added,
) {
    let sent = cookies.fields();
    if sent.is_empty() {
        return;
    }
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut ours = false;
    for v in sent {
        for piece in cookie_pieces(v) {
            let piece = piece.trim_ascii();
            if piece.is_empty() {
                continue;
            }
            let name = memchr::memchr(b'=', piece).map_or(piece, |eq| piece[..eq].trim_ascii());
            if std::str::from_utf8(name).is_ok_and(|n| rules.is_ours(n)) {
                ours = true;
            } else {
                kept.push(piece);
            }
        }
    }
    let in_map = headers.contains_key(header::COOKIE);
    if let [one] = sent {
        if !ours {
            if !in_map {
                added.push(&header::COOKIE, &[one]);
            }
            return;
        }
    }
    if in_map {
        headers.remove(header::COOKIE);
    }
    if !kept.is_empty() {
        added.push(&header::COOKIE, &[&kept.join(&b"; "[..])]);
    }
}

/// The first bytes of every name in [`SPOOFABLE_IDENTITY`], [`SPOOFABLE_PREFIXES`] and the
/// `oidc-` names of [`spoofable`].
const IDENTITY_FIRST_BYTES: &[u8] = b"xro";

/// The first five bytes of those names (all are longer).
const IDENTITY_HEADS: &[&[u8; 5]] = &[
    b"x-for", b"x-aut", b"x-rem", b"x-use", b"x-id-", b"x-amz", b"remot", b"oidc-",
];

/// Identity-header families (prefixes, after `_` → `-`) that auth proxies use.
const SPOOFABLE_PREFIXES: &[&str] = &["x-auth-request-", "oidc-claim-", "x-amzn-oidc-", "x-user-"];

/// Whether a client-sent header could pass for identity asserted by an auth proxy. Names are
/// compared lower-case with `_` read as `-`, because some servers treat them alike.
fn spoofable(name: &str) -> bool {
    // Every such name starts with one of these (a test keeps the lists to it): most headers are
    // ruled out by their first byte.
    if !name
        .bytes()
        .next()
        .is_some_and(|b| IDENTITY_FIRST_BYTES.contains(&b.to_ascii_lowercase()))
    {
        return false;
    }
    // The rest (`x-request-id`, `origin`, `referer`, ...) mostly by their first five bytes; a
    // name shorter than that is none of them.
    let Some(head) = name.as_bytes().get(..5) else {
        return false;
    };
    let mut h = [0u8; 5];
    for (d, &b) in h.iter_mut().zip(head) {
        *d = if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        };
    }
    if !IDENTITY_HEADS.contains(&&h) {
        return false;
    }
    // Compared byte by byte (no allocation: this runs for every header of every API call).
    let same = |b: u8, want: u8| b.to_ascii_lowercase() == want || (b == b'_' && want == b'-');
    let is = |want: &str| {
        name.len() == want.len() && name.bytes().zip(want.bytes()).all(|(b, w)| same(b, w))
    };
    let starts = |want: &str| {
        name.len() >= want.len() && name.bytes().zip(want.bytes()).all(|(b, w)| same(b, w))
    };
    SPOOFABLE_IDENTITY.iter().any(|n| is(n))
        || SPOOFABLE_PREFIXES.iter().any(|p| starts(p))
        || starts("oidc-access-token")
        || starts("oidc-id-token")
}

/// Drops the browser's `Authorization`, spoofable identity headers and every header with an
/// underscore in its name (nginx's default too: `X_User` could be read as `X-User` upstream);
/// our bearer token goes in `added` (a token with a byte no field value may hold goes nowhere).
/// With a DPoP proof (`oauth.dpop`), the token goes as `Authorization: DPoP` with the proof in
/// the `DPoP` header (RFC 9449 §7.1).
pub fn set_authorization(
    headers: &mut HeaderMap,
    access_token: &str,
    dpop_proof: Option<&str>,
    added: &mut Added,
) {
    strip_credentials(headers);
    let scheme: &[u8] = if dpop_proof.is_some() {
        b"DPoP "
    } else {
        b"Bearer "
    };
    added.push(&header::AUTHORIZATION, &[scheme, access_token.as_bytes()]);
    if let Some(proof) = dpop_proof {
        added.push(&DPOP, &[proof.as_bytes()]);
    }
}

/// The DPoP proof header (RFC 9449 §4.1).
pub const DPOP: HeaderName = HeaderName::from_static("dpop");

/// What [`set_authorization`] drops, for requests that carry no token of ours (`token = "none"`,
/// or `"user-or-anonymous"` without a session).
pub fn strip_credentials(headers: &mut HeaderMap) {
    // Usually there is nothing to drop: one pass over the names says so, instead of two lookups
    // that miss and a list of none.
    if !headers
        .keys()
        .any(|k| k == header::AUTHORIZATION || k == DPOP || dropped_as_identity(k.as_str()))
    {
        return;
    }
    headers.remove(header::AUTHORIZATION);
    // A browser-made proof would be for the browser's key, never for our token.
    headers.remove(DPOP);
    let drop: Vec<HeaderName> = headers
        .keys()
        .filter(|k| dropped_as_identity(k.as_str()))
        .cloned()
        .collect();
    for n in drop {
        headers.remove(n);
    }
}

/// Whether [`strip_credentials`] drops a header by its name alone.
fn dropped_as_identity(name: &str) -> bool {
    name.bytes().any(|b| b == b'_') || spoofable(name)
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets `X-Forwarded-For/-Proto/-Host` (in `added`). Values the client sent are believed only
/// when the peer is a trusted proxy; otherwise they and `Forwarded` are dropped.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted_peer: bool,
    proto_host: &ProtoHost,
    added: &mut Added,
) {
    // One pass over the names present instead of a lookup per header (most are absent).
    let (mut forwarded, mut xff, mut xf_proto, mut xf_host) = (false, false, false, false);
    for k in headers.keys() {
        if k == header::FORWARDED {
            forwarded = true;
        } else if k == X_FORWARDED_FOR {
            xff = true;
        } else if k == X_FORWARDED_PROTO {
            xf_proto = true;
        } else if k == X_FORWARDED_HOST {
            xf_host = true;
        }
    }
    let mut ip = [0u8; 15];
    let mut v6 = String::new();
    let ip: &[u8] = match peer {
        IpAddr::V4(v4) => {
            let n = write_ipv4(&mut ip, v4);
            &ip[..n]
        }
        IpAddr::V6(v6_addr) => {
            use std::fmt::Write;
            let _ = write!(v6, "{v6_addr}");
            v6.as_bytes()
        }
    };
    if trusted_peer && xff {
        // The chain a trusted proxy sent (its values joined by ", "), then the peer.
        let mut chain: Vec<&[u8]> = Vec::new();
        for v in headers.get_all(&X_FORWARDED_FOR) {
            if v.to_str().is_ok() {
                if !chain.is_empty() {
                    chain.push(b", ");
                }
                chain.push(v.as_bytes());
            }
        }
        if chain.iter().any(|p| !p.is_empty()) {
            chain.push(b", ");
        }
        chain.push(ip);
        added.push(&X_FORWARDED_FOR, &chain);
    } else {
        added.push(&X_FORWARDED_FOR, &[ip]);
    }
    if xff {
        headers.remove(&X_FORWARDED_FOR);
    }
    if !trusted_peer && forwarded {
        headers.remove(header::FORWARDED);
    }
    if !(trusted_peer && xf_proto && xf_host) {
        if xf_proto {
            headers.remove(&X_FORWARDED_PROTO);
        }
        if xf_host {
            headers.remove(&X_FORWARDED_HOST);
        }
        added.extend(&proto_host.0);
    }
}

/// `X-Forwarded-Proto` and `X-Forwarded-Host` as tokengate sets them: from `server.public_url`,
/// so the same for every call (made once at start, written as they are).
#[derive(Clone, Debug)]
pub struct ProtoHost(Added);

impl ProtoHost {
    /// From the public URL's scheme and `host[:port]`; a scheme that cannot be a field value
    /// reads `http`, a host that cannot be one is left out.
    pub fn new(proto: &str, host: &[u8]) -> Self {
        let proto: &[u8] = if valid_value(proto.as_bytes()) {
            proto.as_bytes()
        } else {
            b"http"
        };
        let mut lines = Added::default();
        lines.push(&X_FORWARDED_PROTO, &[proto]);
        lines.push(&X_FORWARDED_HOST, &[host]);
        Self(lines)
    }
}

/// Writes `ip` as text at the start of `out` (without going through `fmt`); returns its length.
fn write_ipv4(out: &mut [u8; 15], ip: std::net::Ipv4Addr) -> usize {
    let mut n = 0;
    let mut put = |b: u8| {
        if let Some(slot) = out.get_mut(n) {
            *slot = b;
            n += 1;
        }
    };
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            put(b'.');
        }
        if octet >= 100 {
            put(b'0' + octet / 100);
        }
        if octet >= 10 {
            put(b'0' + octet / 10 % 10);
        }
        put(b'0' + octet % 10);
    }
    n
}

/// Drops `Set-Cookie`s from the API that would overwrite tokengate's cookies.
pub fn strip_our_set_cookies(headers: &mut HeaderMap, rules: &CookieRules) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let name = v
                .as_bytes()
                .split(|&b| b == b'=')
                .next()
                .map(<[u8]>::trim_ascii)
                .unwrap_or(b"");
            !std::str::from_utf8(name).is_ok_and(|n| rules.is_ours(n))
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::cookie::CookieFields;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    /// Runs a rule that adds fields, then puts them into the map (as for a call hyper sends).
    fn applied(h: &mut HeaderMap, rule: impl FnOnce(&mut HeaderMap, &mut Added)) {
        let mut added = Added::default();
        rule(h, &mut added);
        added.insert_into(h);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
            ("accept", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["accept"], "application/json");
    }

    #[test]
    fn only_our_cookies_are_removed() {
        let rules = CookieRules::new(false);
        let mut h = map(&[
            ("cookie", "theme=dark; tg_session=abc; tg_tx_xyz=1"),
            ("cookie", "tg_session.0=a; lang=en"),
        ]);
        let strip = |h: &mut HeaderMap| {
            let sent = RequestCookies::standalone(h, CookieFields::default());
            applied(h, |h, a| strip_our_cookies(h, &sent, &rules, a));
        };
        strip(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "theme=dark; lang=en");
        let mut only_ours = map(&[("cookie", "tg_session=abc")]);
        strip(&mut only_ours);
        assert!(!only_ours.contains_key("cookie"));
        // None of ours: the field stays as it came, where it was.
        let mut none = map(&[("cookie", "theme=dark;lang=en"), ("accept", "*/*")]);
        let sent = RequestCookies::standalone(&none, CookieFields::default());
        let mut added = Added::default();
        strip_our_cookies(&mut none, &sent, &rules, &mut added);
        assert!(added.lines().is_empty());
        assert_eq!(
            listed(&none),
            [("cookie", &b"theme=dark;lang=en"[..]), ("accept", b"*/*")]
        );
    }

    #[test]
    fn cookies_kept_out_of_the_map_come_out_the_same() {
        // The server loop keeps a request's `Cookie` fields out of its map: the rule reads them
        // from there and gives the same `Cookie` the map's fields would.
        let rules = CookieRules::new(false);
        for sent in [
            &[
                "theme=dark; tg_session=abc; tg_tx_xyz=1",
                "tg_session.0=a; lang=en",
            ][..],
            &["tg_session=abc"],
            &["theme=dark;lang=en"],
            &["a=1", "b=2"],
            &[" ; tg_csrf=1 ;x=y "],
        ] {
            let mut in_map = HeaderMap::new();
            for v in sent {
                in_map.append(header::COOKIE, HeaderValue::from_static(v));
            }
            let from_map = RequestCookies::standalone(&in_map, CookieFields::default());
            let mut expected = in_map.clone();
            applied(&mut expected, |h, a| {
                strip_our_cookies(h, &from_map, &rules, a)
            });

            let fields = sent
                .iter()
                .map(|v| bytes::Bytes::from_static(v.as_bytes()))
                .collect();
            let mut out = HeaderMap::new();
            let outside = RequestCookies::standalone(&out, CookieFields::new(fields));
            applied(&mut out, |h, a| strip_our_cookies(h, &outside, &rules, a));
            let cookies = |h: &HeaderMap| -> Vec<Vec<u8>> {
                h.get_all("cookie")
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect()
            };
            assert_eq!(cookies(&out), cookies(&expected), "{sent:?}");
            assert!(cookies(&out).len() <= 1, "{sent:?}");
        }
    }

    #[test]
    fn spoofable_names_match_in_any_case_and_with_underscores() {
        for n in [
            "x-forwarded-user",
            "X-Forwarded-User",
            "X_FORWARDED_USER",
            "x-auth-request-email",
            "OIDC_CLAIM_sub",
            "oidc-claim-email",
            "x-amzn-oidc-data",
            "X-User-Id",
            "oidc-access-token",
            "remote_user",
        ] {
            assert!(spoofable(n), "{n}");
        }
        for n in [
            "x-forwarded-for",
            "x-forwarded-userx",
            "x-forwarded-use",
            "accept",
            "x-users",
            "remote",
            "",
        ] {
            assert!(!spoofable(n), "{n}");
        }
    }

    #[test]
    fn without_a_token_the_browsers_credentials_and_identity_headers_are_still_dropped() {
        let mut h = map(&[
            ("authorization", "Bearer attacker"),
            ("x-forwarded-user", "admin"),
            ("x_user", "admin"),
            ("accept", "application/json"),
        ]);
        strip_credentials(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["accept"], "application/json");
    }

    #[test]
    fn authorization_is_replaced_and_identity_headers_dropped() {
        let mut h = map(&[
            ("authorization", "Bearer attacker"),
            ("x-forwarded-user", "admin"),
            ("x-auth-request-email", "a@b"),
            ("x_forwarded_email", "a@b"),
            ("oidc_claim_sub", "admin"),
            ("x-user-id", "1"),
            ("x-amzn-oidc-identity", "admin"),
            ("accept", "application/json"),
        ]);
        applied(&mut h, |h, a| set_authorization(h, "real", None, a));
        assert_eq!(h["authorization"], "Bearer real");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["accept"], "application/json");
        // A token that would split the request head goes nowhere.
        let mut added = Added::default();
        set_authorization(&mut h, "real\r\nx-admin: 1", None, &mut added);
        assert!(added.lines().is_empty());
        assert!(!h.contains_key("authorization"));
    }

    #[test]
    fn forwarded_headers_from_untrusted_peers_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.com"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        applied(&mut h, |h, a| {
            set_forwarded(
                h,
                "10.0.0.1".parse().expect("ip"),
                false,
                &ProtoHost::new("http", "app.example.com".as_bytes()),
                a,
            )
        });
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-host"], "app.example.com");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("forwarded"));
    }

    #[test]
    fn forwarded_headers_from_trusted_peers_are_appended() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "app.example.com"),
            ("x-forwarded-proto", "https"),
        ]);
        applied(&mut h, |h, a| {
            set_forwarded(
                h,
                "10.0.0.1".parse().expect("ip"),
                true,
                &ProtoHost::new("http", "internal".as_bytes()),
                a,
            )
        });
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.example.com");
    }

    #[test]
    fn identity_names_start_with_the_bytes_checked_first() {
        for n in SPOOFABLE_IDENTITY
            .iter()
            .chain(SPOOFABLE_PREFIXES)
            .chain(&["oidc-access-token", "oidc-id-token"])
        {
            assert!(IDENTITY_FIRST_BYTES.contains(&n.as_bytes()[0]), "{n}");
            assert!(
                IDENTITY_HEADS.iter().any(|h| n.as_bytes().starts_with(*h)),
                "{n}"
            );
            assert!(spoofable(n), "{n}");
            assert!(spoofable(&n.to_ascii_uppercase().replace('-', "_")), "{n}");
        }
        for n in [
            "accept",
            "cookie",
            "x-request-id",
            "origin",
            "referer",
            "traceparent",
            "x-request-id",
            "x-csrf",
            "x-use",
            "oidc",
            "remote",
            "X_REQUESTED_WITH",
        ] {
            assert!(!spoofable(n), "{n}");
        }
    }

    #[test]
    fn peer_addresses_are_written_as_text() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.254.200.101",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ] {
            let mut h = HeaderMap::new();
            applied(&mut h, |h, a| {
                set_forwarded(
                    h,
                    ip.parse().expect("ip"),
                    false,
                    &ProtoHost::new("https", "app".as_bytes()),
                    a,
                )
            });
            assert_eq!(
                h["x-forwarded-for"],
                ip.parse::<IpAddr>().expect("ip").to_string()
            );
            assert_eq!(h["x-forwarded-proto"], "https");
        }
    }

    #[test]
    fn connection_lists_custom_names_in_any_case_and_over_several_values() {
        let long = format!("X-{}", "Long".repeat(20));
        let mut h = map(&[
            ("x-kept", "yes"),
            ("connection", "close, X-Custom-Hop , ,bad name"),
            ("x-custom-hop", "1"),
            ("connection", &long),
            (&long, "2"),
            ("user-agent", "ua"),
            ("referer", "r"),
            ("content-encoding", "gzip"),
        ]);
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            ["x-kept", "content-encoding", "referer", "user-agent"],
            "{h:?}"
        );
    }

    #[test]
    fn hop_by_hop_names_stay_in_the_answers_map() {
        // Fields passed on past the map (proxy::passthrough) escape these rules: none may be one.
        for n in &HOP_BY_HOP_NAMES {
            assert!(
                crate::proxy::passthrough::inspected(n.as_str().as_bytes()),
                "{n}"
            );
        }
    }

    #[test]
    fn hop_by_hop_names_pass_the_quick_filter() {
        for (i, n) in HOP_BY_HOP_NAMES.iter().enumerate() {
            assert_eq!(hop_by_hop(n), Some(i), "{n}");
        }
        for n in [
            "user-agent",
            "content-encoding",
            "referer",
            "accept",
            "tee",
            "x-te",
        ] {
            let n = HeaderName::from_static(n);
            assert_eq!(hop_by_hop(&n), None, "{n}");
        }
    }

    #[test]
    fn a_trusted_peer_extends_every_prior_forwarded_for() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("accept", "*/*"),
            ("x-forwarded-for", "5.6.7.8, 9.9.9.9"),
            ("x-forwarded-proto", "https"),
        ]);
        applied(&mut h, |h, a| {
            set_forwarded(
                h,
                "10.0.0.1".parse().expect("ip"),
                true,
                &ProtoHost::new("http", "app".as_bytes()),
                a,
            )
        });
        let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, ["1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.1"]);
        // Without X-Forwarded-Host the pair is ours.
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app");
        let mut v6 = map(&[("x-forwarded-for", "")]);
        applied(&mut v6, |h, a| {
            set_forwarded(
                h,
                "::1".parse().expect("ip"),
                true,
                &ProtoHost::new("https", "app".as_bytes()),
                a,
            )
        });
        assert_eq!(v6["x-forwarded-for"], "::1");
    }

    /// The rules as they were before their single-pass versions (one `remove` per name, lists
    /// collected first), to compare with, header order included.
    mod before {
        use super::super::*;

        pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
            let mut drop: Vec<HeaderName> = Vec::new();
            for (name, value) in headers.iter() {
                if HOP_BY_HOP_NAMES.contains(name) {
                    if !drop.contains(name) {
                        drop.push(name.clone());
                    }
                    if name == header::CONNECTION {
                        let listed = value
                            .to_str()
                            .ok()
                            .into_iter()
                            .flat_map(|v| v.split(','))
                            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok());
                        for n in listed {
                            if !drop.contains(&n) {
                                drop.push(n);
                            }
                        }
                    }
                }
            }
            for n in drop {
                headers.remove(n);
            }
        }

        pub fn spoofable(name: &str) -> bool {
            if !name
                .bytes()
                .next()
                .is_some_and(|b| IDENTITY_FIRST_BYTES.contains(&b.to_ascii_lowercase()))
            {
                return false;
            }
            let same =
                |b: u8, want: u8| b.to_ascii_lowercase() == want || (b == b'_' && want == b'-');
            let is = |want: &str| {
                name.len() == want.len() && name.bytes().zip(want.bytes()).all(|(b, w)| same(b, w))
            };
            let starts = |want: &str| {
                name.len() >= want.len() && name.bytes().zip(want.bytes()).all(|(b, w)| same(b, w))
            };
            SPOOFABLE_IDENTITY.iter().any(|n| is(n))
                || SPOOFABLE_PREFIXES.iter().any(|p| starts(p))
                || starts("oidc-access-token")
                || starts("oidc-id-token")
        }

        pub fn strip_credentials(headers: &mut HeaderMap) {
            headers.remove(header::AUTHORIZATION);
            headers.remove(DPOP);
            let drop: Vec<HeaderName> = headers
                .keys()
                .filter(|k| k.as_str().contains('_') || spoofable(k.as_str()))
                .cloned()
                .collect();
            for n in drop {
                headers.remove(n);
            }
        }

        pub fn set_forwarded(
            headers: &mut HeaderMap,
            peer: IpAddr,
            trusted_peer: bool,
            proto: &str,
            host: &str,
        ) {
            let prior_xff = if trusted_peer {
                headers
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                String::new()
            };
            let keep_proto_host = trusted_peer
                && headers.contains_key(&X_FORWARDED_PROTO)
                && headers.contains_key(&X_FORWARDED_HOST);
            if !trusted_peer {
                headers.remove(header::FORWARDED);
            }
            headers.remove(&X_FORWARDED_FOR);
            let mut xff = prior_xff;
            if !xff.is_empty() {
                xff.push_str(", ");
            }
            xff.push_str(&peer.to_string());
            if let Ok(v) = HeaderValue::try_from(xff) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
            if !keep_proto_host {
                let proto = match proto {
                    "https" => HeaderValue::from_static("https"),
                    "http" => HeaderValue::from_static("http"),
                    other => {
                        HeaderValue::from_str(other).unwrap_or(HeaderValue::from_static("http"))
                    }
                };
                headers.insert(X_FORWARDED_PROTO.clone(), proto);
                if let Ok(v) = HeaderValue::from_str(host) {
                    headers.insert(X_FORWARDED_HOST.clone(), v);
                }
            }
        }
    }

    /// Header maps from a pool of names and values that touch every rule, in many orders and
    /// mixes (a fixed pseudo-random sequence).
    fn mixes() -> Vec<HeaderMap> {
        let long = format!("X-{}", "Long".repeat(20));
        let long_lower = long.to_ascii_lowercase();
        let long_bad = format!("{long}@");
        let listing = format!("keep-alive, {long}, {long_bad}");
        let pool: Vec<(&str, Vec<u8>)> = vec![
            ("host", b"app".to_vec()),
            ("accept", b"*/*".to_vec()),
            ("cookie", b"a=1".to_vec()),
            ("user-agent", b"ua".to_vec()),
            ("referer", b"r".to_vec()),
            ("content-encoding", b"gzip".to_vec()),
            (
                "connection",
                b"keep-alive, X-Custom, ,te,,bad name".to_vec(),
            ),
            ("connection", b"close".to_vec()),
            ("connection", b"upgrade, x-forwarded-for".to_vec()),
            ("connection", listing.into_bytes()),
            ("connection", b"caf\xc3\xa9, x-custom".to_vec()),
            ("keep-alive", b"timeout=5".to_vec()),
            ("proxy-connection", b"keep-alive".to_vec()),
            ("proxy-authenticate", b"Basic".to_vec()),
            ("proxy-authorization", b"Basic x".to_vec()),
            ("te", b"trailers".to_vec()),
            ("trailer", b"x".to_vec()),
            ("transfer-encoding", b"chunked".to_vec()),
            ("upgrade", b"websocket".to_vec()),
            ("x-custom", b"1".to_vec()),
            (&long_lower, b"2".to_vec()),
            ("authorization", b"Bearer attacker".to_vec()),
            ("dpop", b"proof".to_vec()),
            ("x_user", b"admin".to_vec()),
            ("x-forwarded-user", b"admin".to_vec()),
            ("oidc-claim-sub", b"admin".to_vec()),
            ("origin", b"https://app".to_vec()),
            ("x-forwarded-for", b"1.2.3.4".to_vec()),
            ("x-forwarded-for", b"5.6.7.8, 9.9.9.9".to_vec()),
            ("x-forwarded-for", b"".to_vec()),
            ("x-forwarded-for", b"caf\xc3\xa9".to_vec()),
            ("x-forwarded-proto", b"https".to_vec()),
            ("x-forwarded-host", b"evil.com".to_vec()),
            ("forwarded", b"for=6.6.6.6".to_vec()),
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize
        };
        (0..3000)
            .map(|_| {
                let mut h = HeaderMap::new();
                for _ in 0..next() % 12 {
                    let (k, v) = &pool[next() % pool.len()];
                    h.append(
                        HeaderName::from_bytes(k.as_bytes()).expect("name"),
                        HeaderValue::from_bytes(v).expect("value"),
                    );
                }
                h
            })
            .collect()
    }

    fn listed(h: &HeaderMap) -> Vec<(&str, &[u8])> {
        h.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect()
    }

    #[test]
    fn spoofable_says_what_it_said_before() {
        let names = SPOOFABLE_IDENTITY.iter().chain(SPOOFABLE_PREFIXES).chain(&[
            "oidc-access-token",
            "oidc-id-token",
            "x-request-id",
            "x-requested-with",
            "origin",
            "referer",
            "x-forwarded-for",
            "x-amz-date",
            "remote-addr",
        ]);
        let mut seen = 0;
        for n in names {
            for cut in 0..=n.len() {
                for tail in ["", "x", "-x", "_X"] {
                    let base = format!("{}{tail}", &n[..cut]);
                    for v in [
                        base.clone(),
                        base.to_ascii_uppercase(),
                        base.replace('-', "_"),
                        base.to_ascii_uppercase().replace('-', "_"),
                    ] {
                        assert_eq!(spoofable(&v), before::spoofable(&v), "{v}");
                        seen += usize::from(spoofable(&v));
                    }
                }
            }
        }
        assert!(seen > 1000, "{seen}");
    }

    #[test]
    fn the_rules_keep_every_header_and_order_as_before() {
        let peers: [IpAddr; 3] = [
            "10.0.0.1".parse().expect("ip"),
            "255.254.200.101".parse().expect("ip"),
            "2001:db8::8a2e:370:7334".parse().expect("ip"),
        ];
        for (i, h) in mixes().into_iter().enumerate() {
            let (mut new, mut old) = (h.clone(), h.clone());
            strip_hop_by_hop(&mut new);
            before::strip_hop_by_hop(&mut old);
            assert_eq!(listed(&new), listed(&old), "hop-by-hop of {h:?}");

            let (mut new, mut old) = (h.clone(), h.clone());
            strip_credentials(&mut new);
            before::strip_credentials(&mut old);
            assert_eq!(listed(&new), listed(&old), "credentials of {h:?}");

            let peer = peers[i % peers.len()];
            let proto = ["https", "http", "ws\x01"][i % 3];
            // The host is a header value made once at start (from `public_url`, always valid).
            let host = ["app.example.com", "app.example.com:8443"][i % 2];
            for trusted in [false, true] {
                let (mut new, mut old) = (h.clone(), h.clone());
                let mut added = Added::default();
                set_forwarded(
                    &mut new,
                    peer,
                    trusted,
                    &ProtoHost::new(proto, host.as_bytes()),
                    &mut added,
                );
                before::set_forwarded(&mut old, peer, trusted, proto, host);
                // The fields set go after the others (written into the head after the map's),
                // and removals move the map's last field: compared name by name, each name's
                // values in their order (the order that means something, RFC 9110 §5.3).
                const NAMES: [&str; 3] =
                    ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];
                let rest = |h: &HeaderMap| -> Vec<(String, Vec<u8>)> {
                    let mut l: Vec<_> = h
                        .iter()
                        .filter(|(k, _)| !NAMES.contains(&k.as_str()))
                        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                        .collect();
                    l.sort_by(|a, b| a.0.cmp(&b.0));
                    l
                };
                assert_eq!(rest(&new), rest(&old), "forwarded ({trusted}) of {h:?}");
                // A name set is no longer in the map: never sent twice.
                for line in added
                    .lines()
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                {
                    let name = line.split(|&b| b == b':').next().unwrap_or_default();
                    let name = std::str::from_utf8(name).expect("ascii");
                    assert!(!new.contains_key(name), "{name} twice, of {h:?}");
                }
                added.insert_into(&mut new);
                for n in NAMES {
                    let values = |h: &HeaderMap| -> Vec<Vec<u8>> {
                        h.get_all(n).iter().map(|v| v.as_bytes().to_vec()).collect()
                    };
                    assert_eq!(values(&new), values(&old), "{n} ({trusted}) of {h:?}");
                }
            }
        }
    }

    #[test]
    fn api_cannot_set_our_cookies() {
        let rules = CookieRules::new(false);
        let mut h = map(&[
            ("set-cookie", "tg_session=evil; Path=/"),
            ("set-cookie", "app=1; Path=/"),
            ("set-cookie", "tg_tx_abc=evil"),
        ]);
        strip_our_set_cookies(&mut h, &rules);
        let v: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(v, vec!["app=1; Path=/"]);
    }
}
