//! Header rules of the proxy, each a pure function with its own test.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::session::cookie::CookieRules;

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
    let values: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    let mut kept: Vec<&[u8]> = Vec::new();
    for v in &values {
        // A session cookie is kilobytes long: split text with `str`'s fast search, and only
        // non-UTF-8 values byte by byte.
        match std::str::from_utf8(v.as_bytes()) {
            Ok(text) => text
                .split(';')
                .for_each(|p| keep_unless_ours(p.as_bytes(), rules, &mut kept)),
            Err(_) => v
                .as_bytes()
                .split(|&b| b == b';')
                .for_each(|p| keep_unless_ours(p, rules, &mut kept)),
        }
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b"; "[..])) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Adds one `name=value` pair of a `Cookie` header to `kept` unless it is empty or ours.
fn keep_unless_ours<'a>(pair: &'a [u8], rules: &CookieRules, kept: &mut Vec<&'a [u8]>) {
    let trimmed = trim_ascii(pair);
    if trimmed.is_empty() {
        return;
    }
    let name = trimmed.split(|&b| b == b'=').next().unwrap_or(b"");
    let ours = std::str::from_utf8(trim_ascii(name)).is_ok_and(|n| rules.is_ours(n));
    if !ours {
        kept.push(trimmed);
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Identity-header families (prefixes, after `_` → `-`) that auth proxies use.
const SPOOFABLE_PREFIXES: &[&str] = &["x-auth-request-", "oidc-claim-", "x-amzn-oidc-", "x-user-"];

/// Whether a client-sent header could pass for identity asserted by an auth proxy. Names are
/// compared lower-case with `_` read as `-`, because some servers treat them alike.
fn spoofable(name: &str) -> bool {
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
    if let Ok(mut v) = HeaderValue::from_str(&format!("{scheme} {access_token}")) {
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
    let xff = if prior_xff.is_empty() {
        peer.to_string()
    } else {
        format!("{prior_xff}, {peer}")
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !keep_proto_host {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_str(proto).unwrap_or(HeaderValue::from_static("http")),
        );
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(X_FORWARDED_HOST.clone(), v);
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
                .map(trim_ascii)
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
