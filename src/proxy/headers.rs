//! Header rules of the proxy, each a pure function with its own test.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::session::cookie::{cookie_pieces, CookieRules};

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

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present (usually none of them is hop-by-hop, or only
    // `Connection`), instead of a lookup per rule on every request and response.
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

/// Removes tokengate's cookies from `Cookie`, keeping the SPA's others in their order.
pub fn strip_our_cookies(headers: &mut HeaderMap, rules: &CookieRules) {
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut any = false;
    for v in headers.get_all(header::COOKIE) {
        any = true;
        for piece in cookie_pieces(v.as_bytes()) {
            let piece = piece.trim_ascii();
            if piece.is_empty() {
                continue;
            }
            let name = memchr::memchr(b'=', piece).map_or(piece, |eq| piece[..eq].trim_ascii());
            if !std::str::from_utf8(name).is_ok_and(|n| rules.is_ours(n)) {
                kept.push(piece);
            }
        }
    }
    if !any {
        return;
    }
    let joined = (!kept.is_empty()).then(|| kept.join(&b"; "[..]));
    headers.remove(header::COOKIE);
    if let Some(Ok(v)) = joined.map(HeaderValue::try_from) {
        headers.insert(header::COOKIE, v);
    }
}

/// The first bytes of every name in [`SPOOFABLE_IDENTITY`], [`SPOOFABLE_PREFIXES`] and the
/// `oidc-` names of [`spoofable`].
const IDENTITY_FIRST_BYTES: &[u8] = b"xro";

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
/// sets our bearer token.
/// With a DPoP proof (`oauth.dpop`), the token goes as `Authorization: DPoP` with the proof in
/// the `DPoP` header (RFC 9449 §7.1).
pub fn set_authorization(headers: &mut HeaderMap, access_token: &str, dpop_proof: Option<&str>) {
    strip_credentials(headers);
    let scheme = if dpop_proof.is_some() {
        "DPoP"
    } else {
        "Bearer"
    };
    let mut value = Vec::with_capacity(scheme.len() + 1 + access_token.len());
    value.extend_from_slice(scheme.as_bytes());
    value.push(b' ');
    value.extend_from_slice(access_token.as_bytes());
    if let Ok(mut v) = HeaderValue::try_from(value) {
        v.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, v);
    }
    if let Some(Ok(mut v)) = dpop_proof.map(HeaderValue::from_str) {
        v.set_sensitive(true);
        headers.insert(DPOP, v);
    }
}

/// The DPoP proof header (RFC 9449 §4.1).
pub const DPOP: HeaderName = HeaderName::from_static("dpop");

/// What [`set_authorization`] drops, for requests that carry no token of ours (`token = "none"`,
/// or `"user-or-anonymous"` without a session).
pub fn strip_credentials(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    // A browser-made proof would be for the browser's key, never for our token.
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

/// Sets `X-Forwarded-For/-Proto/-Host`. Values the client sent are believed only when the peer
/// is a trusted proxy; otherwise they and `Forwarded` are replaced.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

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
    push_ip(&mut xff, peer);
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !keep_proto_host {
        let proto = match proto {
            "https" => HeaderValue::from_static("https"),
            "http" => HeaderValue::from_static("http"),
            other => HeaderValue::from_str(other).unwrap_or(HeaderValue::from_static("http")),
        };
        headers.insert(X_FORWARDED_PROTO.clone(), proto);
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(X_FORWARDED_HOST.clone(), v);
        }
    }
}

/// Appends `ip` as text; IPv4 (the common peer) without going through `fmt`.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
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
        strip_our_cookies(&mut h, &rules);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "theme=dark; lang=en");
        let mut only_ours = map(&[("cookie", "tg_session=abc")]);
        strip_our_cookies(&mut only_ours, &rules);
        assert!(!only_ours.contains_key("cookie"));
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
        set_authorization(&mut h, "real", None);
        assert_eq!(h["authorization"], "Bearer real");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["accept"], "application/json");
    }

    #[test]
    fn forwarded_headers_from_untrusted_peers_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.com"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        set_forwarded(
            &mut h,
            "10.0.0.1".parse().expect("ip"),
            false,
            "http",
            "app.example.com",
        );
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
        set_forwarded(
            &mut h,
            "10.0.0.1".parse().expect("ip"),
            true,
            "http",
            "internal",
        );
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
            set_forwarded(&mut h, ip.parse().expect("ip"), false, "https", "app");
            assert_eq!(
                h["x-forwarded-for"],
                ip.parse::<IpAddr>().expect("ip").to_string()
            );
            assert_eq!(h["x-forwarded-proto"], "https");
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
